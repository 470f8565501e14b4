"""The AI-REML iterations for a batch of datasets: one scheduler for ``fit`` (a batch of one) and
``fit_batched``.

A host loop over the pure decisions of :mod:`reml_fn.fit.step` and :mod:`reml_fn.fit.boundaries`,
with per-dataset state (θ, ℓ, score, AI, damping, status). In every iteration

1. the working system (covariances as correlations, bounds held, variances with nothing left to
   gain snapped to their floor), the Newton direction and the convergence test are computed for
   all running datasets at once (batched k×k factorisations); converged datasets stop where they
   are (status 0, or 5 where a variance at its floor has no information): the point returned is
   the point whose terms passed the test. Only one with a variance still to snap to its floor
   takes a polishing step (the snap and the Newton step), kept where ℓ does not fall;
2. the line search is a per-dataset state machine over the candidate sequence (damping level,
   slot): each round evaluates a window of the next candidates of every dataset still searching in
   one vmapped engine call and keeps, per dataset, the first acceptable one — exactly the candidate
   a one-at-a-time search accepts; a dataset that exhausts ``max_tries`` levels stops (status 2 or 5);
3. a dataset whose previous line search accepted its first candidate (the usual case) evaluates
   its next first candidate as full AI terms, so an accepted step needs no second engine call; the
   others start with a window as long as their previous search, then 2, 4, 8, … candidates, at
   most ``Options.lookahead`` evaluations per round. The window changes the schedule only;
4. where two accepted steps in a row gained well beyond the quadratic model, multiples of the
   step are tried in one more call (:func:`~reml_fn.fit.step.expands`).

Two shortcuts decide the same as the rounds, with less bookkeeping: an iteration in which every
dataset's Newton step is accepted at once (no convergence, no expansion) returns after its one
engine call, and one in which every dataset has converged is no call or just the polishing steps.

Only the datasets still running (or still searching) enter each call; finished datasets stop
moving. Nothing inside vmapped code raises on values (``cholesky_ex``, ``solve_ex``, masks): V
not positive definite gives ℓ = −∞ and a rejected candidate.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from reml_fn.fit.boundaries import (
    active_bounds,
    at_bounds,
    correlation_pairs,
    information_scale,
    like,
    negligible_to_floor,
    pair_index,
    propose,
    silent_at_floor,
    working_system,
)
from reml_fn.fit.problem import (
    RUNNING,
    Batch,
    EngineCalls,
    Terms,
    check_batch_inputs,
    map_tensors,
    put,
    read_init,
    screen,
)
from reml_fn.fit.result import OVERFLOW, FitResult, build_result
from reml_fn.fit.start import variance_floor, variance_rates
from reml_fn.fit.step import (
    EXPANSION_MULTIPLIERS,
    STEP_FRACTIONS,
    Newton,
    Options,
    accepts,
    candidate_steps,
    capped,
    converged,
    expands,
    first_local_maximum,
    loglik_resolution,
    newton_direction,
    polish_accepts,
    predicted_gain,
    relaxed,
    stiffened,
    stuck_status,
)
from reml_fn.params import param_names, param_specs, tree_from_names
from reml_fn.reml.engines import select_engine
from reml_fn.transforms import columnwise

__all__ = ["solve"]

# Candidates per damping level in candidate_steps (fractions, then two block steps): only sizes the
# windows; the bookkeeping uses the number candidate_steps actually yields.
SLOTS_PER_LEVEL = len(STEP_FRACTIONS) + 2


# Variances whose remaining gain is below SNAP_MARGIN × the round-off of ℓ go to their floor.
SNAP_MARGIN = 10.0

# Memory the candidates of one line-search round may take together. They run as one vmapped engine
# call, each holding a few copies of its dataset's prepared data (the MME's cross products), so a
# large single fit (crossed factors, 10⁵ rows) evaluates a few candidates per round, not hundreds.
LINE_SEARCH_MEMORY = 1 << 30
PREPARED_COPIES_PER_CANDIDATE = 8
DENSE_MATRICES_PER_CANDIDATE = 8  # V, its factor, L⁻¹, the projector, P, … (n × n each)


class _Iteration(NamedTuple):
    """What one iteration decided for the running datasets (rows in ``running`` order)."""

    theta: Tensor
    terms: Terms  # the evaluation at theta: ℓ, score, AI, β̂, (XᵀV⁻¹X)⁻¹
    damping: Tensor
    moved: Tensor  # bool: an accepted step (line search or polishing)
    status: Tensor  # RUNNING, 0, 2 or 5
    searched: Tensor  # how many candidates the line search evaluated (0 when converged)
    understated: Tensor  # bool: the accepted step gained well beyond the quadratic model


def _rows(system, index):
    return type(system)(*(field[index] for field in system))


def _put_terms(terms: Terms, rows: Tensor, values: Terms) -> Terms:
    """``terms`` with the rows ``rows`` replaced by ``values`` (out of place)."""
    return Terms(*(put(field, rows, value) for field, value in zip(terms, values)))


def _state_terms(state: dict) -> Terms:
    return Terms(*(state[field] for field in Terms._fields))


def _sequence(score, ai, active, scaled, damping, levels: int, max_step: float, newton: Newton):
    """The next ``levels`` damping levels of each dataset's candidate sequence (fit's order):
    steps (O, levels·J, k), ok (O, levels·J), and the damping λ of each level (O, levels).
    ``newton``: the Newton direction at this point (the undamped level reuses it)."""
    steps, oks, lambdas = [], [], []
    for level in range(levels):
        level_steps, level_ok = zip(
            *candidate_steps(score, ai, active, scaled, damping, max_step, newton if level == 0 else None)
        )
        steps.append(torch.stack(level_steps, 1))
        oks.append(torch.stack(level_ok, 1))
        lambdas.append(damping)
        damping = stiffened(damping)
    return torch.cat(steps, 1), torch.cat(oks, 1), torch.stack(lambdas, 1)


def _newton_candidates(batch, engine, system, delta, snap, pairs, max_step, ll_now, resolution, extra=None):
    """The first candidate of the undamped level for the rows of ``system``: the capped Newton
    step ``delta``, evaluated with its AI terms (in one engine call with the points ``extra`` after
    them, e.g. polishing steps; ``batch`` holds both, in that order). Returns the raw proposals,
    the working steps taken, the terms, the predicted gains and :func:`~reml_fn.fit.step.accepts`."""
    proposals, taken = propose(system, capped(delta, system.scaled, max_step), pairs, snap)
    points = proposals if extra is None or extra.shape[0] == 0 else torch.cat([proposals, extra])
    terms = batch.map(engine.terms, points)
    predicted = predicted_gain(system.score, system.ai, torch.where(snap, 0.0, taken))
    ok = accepts(terms.loglik[: proposals.shape[0]], ll_now, predicted, resolution)
    return proposals, taken, terms, predicted, ok


def _iterate(batch: Batch, engine: EngineCalls, state: dict, options: Options) -> _Iteration:
    """One AI-REML iteration for every dataset of ``batch`` (all running), deciding exactly what
    the sequential search decides: convergence and polishing by :func:`~reml_fn.fit.step.converged`;
    otherwise each dataset walks its own candidate sequence (damping level λ, slot in
    :func:`~reml_fn.fit.step.candidate_steps`) and takes the first candidate that
    :func:`~reml_fn.fit.step.accepts`, evaluating windows of that sequence in vmapped calls
    (``options.lookahead``); a dataset that exhausts ``max_tries`` levels stops
    (:func:`~reml_fn.fit.step.stuck_status`).
    """
    max_step, max_tries, tol = options.max_step, options.max_tries, options.tol
    theta, score, ai = state["theta"], state["score"], state["ai"]
    lower, upper, scaled, ll_now = state["lower"], state["upper"], state["scaled"], state["loglik"]
    damping, hint = state["damping"], state["searched"]
    R, k = theta.shape
    J = SLOTS_PER_LEVEL  # corrected below to what candidate_steps yields
    device = theta.device
    pairs = state["pairs"]
    # The line search runs in working coordinates (covariances as correlations ρ), bounds held.
    system = working_system(theta, score, ai, lower, upper, scaled, pairs)
    # Variances that cannot gain anything resolvable before their floor go there and are held.
    # (With a margin over the acceptance test's round-off threshold, so that no step is left that
    # could gain only what round-off hides: that would end in a failed line search instead.)
    resolution = loglik_resolution(ll_now)  # (R,) the round-off of ℓ, for every test below
    snap = negligible_to_floor(system, state["rates"], SNAP_MARGIN * resolution, max_step)
    active = active_bounds(system.theta, system.score, system.lower, system.upper) | snap
    floor = variance_floor(theta.dtype)
    # Information on the data's scale: the AI's own (None) unless a variance is below its start.
    scale = information_scale(system.theta, system.lower, state["rates"], floor)
    newton = newton_direction(system.score, system.ai, active, scale)
    step_now = newton.delta
    done = converged(newton, ll_now, tol, resolution)
    # Converged over the others, with a variance at its floor that the data do not inform: the
    # model is not identifiable (status 5), not estimated at the boundary.
    unidentified = torch.zeros_like(done)
    if bool(done.any()) and bool((snap | (theta <= lower)).any()):
        unidentified = done & silent_at_floor(theta, ai, lower, state["rates"], floor, snap).any(-1)
    searching = ~done
    # Converged (0) or not identifiable (5). A converged dataset stops at the point whose terms
    # passed the test; only one with a variance still to go to its floor takes the polishing step
    # (the snap and the Newton step on the others, evaluated), so that the point returned is the
    # point evaluated.
    status = torch.where(done, torch.where(unidentified, 5, 0), RUNNING)
    polishing = done & (snap & (system.theta > system.lower)).any(-1)

    if not bool(searching.any()):
        # Every dataset converged (the last iteration of a fit): the polishing steps, kept where ℓ
        # does not fall by more than round-off — what the rounds below decide for them.
        keep = torch.zeros_like(done)
        new_theta, new = theta, _state_terms(state)
        polish = torch.nonzero(polishing).flatten()
        if polish.numel():
            polished, _ = propose(_rows(system, polish), step_now[polish], pairs, snap[polish])
            terms = (batch if polish.numel() == R else batch.take(polish)).map(engine.terms, polished)
            chosen = polish_accepts(terms.loglik, ll_now[polish], resolution[polish])
            kept = polish[chosen]
            keep = put(keep, kept, torch.ones_like(kept, dtype=torch.bool))
            new_theta = put(theta, kept, polished[chosen])
            new = _put_terms(new, kept, _rows(terms, chosen))
        return _Iteration(new_theta, new, damping, keep, status, torch.zeros_like(hint), torch.zeros_like(keep))
    early = None
    if not bool(done.any()) and bool((newton.definite & (damping == 0) & (hint <= 1)).all()):
        # The usual iteration: nobody converged, and every dataset's first candidate is its
        # capped Newton step, evaluated with its AI terms (the first round below). Where all of
        # them are accepted and none expands, that is the whole iteration.
        proposals, taken, terms, predicted, ok = _newton_candidates(
            batch, engine, system, newton.delta, snap, pairs, max_step, ll_now, resolution
        )
        if bool(ok.all()):
            understated = expands(terms.loglik - ll_now, predicted, ll_now, resolution)
            if not bool((understated & state["understated"]).any()):
                every = torch.ones_like(hint)
                return _Iteration(proposals, terms, damping, every.bool(), status, every, understated)
        early = proposals, taken, terms, predicted, ok

    level = torch.zeros(R, dtype=torch.long, device=device)  # damping levels already exhausted
    position = torch.zeros(R, dtype=torch.long, device=device)  # next slot within the level
    searched = torch.zeros(R, dtype=torch.long, device=device)  # candidates evaluated so far
    moved = torch.zeros(R, dtype=torch.bool, device=device)
    new_theta = theta.clone()
    new = _state_terms(state)
    needs_terms = torch.zeros(R, dtype=torch.bool, device=device)
    # The accepted line-search step of each dataset, its ℓ and predicted gain (for expansion).
    taken_step, taken_ll = torch.zeros_like(theta), ll_now.clone()
    taken_predicted = torch.zeros_like(ll_now)
    # Terminates: every round, each open dataset evaluates a candidate or passes a damping level.
    for round_ in itertools.count():
        open_ = torch.nonzero(searching & ~moved).flatten()
        polish = torch.nonzero(polishing).flatten() if round_ == 0 else open_[:0]
        if open_.numel() == 0 and polish.numel() == 0:
            break
        share = max(1, options.lookahead // max(1, open_.numel()))
        if round_ == 0:
            window = hint[open_].clamp(1, share)
        else:
            window = torch.full_like(open_, min(2**round_, share))
        if round_ == 0 and bool(((window == 1) & (damping[open_] == 0) & newton.definite[open_]).all()):
            # The usual first round: every open dataset's first candidate is its capped Newton
            # step, evaluated with its AI terms. The general round below decides the same; this
            # one skips building the candidate sequence.
            offset = open_.shape[0]
            if early is not None:  # evaluated above (every dataset open, none polishing)
                proposals, taken, terms, predicted, ok = early
            else:
                polished = propose(_rows(system, polish), step_now[polish], pairs, snap[polish])[0]
                proposals, taken, terms, predicted, ok = _newton_candidates(
                    batch.take(torch.cat([open_, polish])),
                    engine,
                    _rows(system, open_),
                    newton.delta[open_],
                    snap[open_],
                    pairs,
                    max_step,
                    ll_now[open_],
                    resolution[open_],
                    polished,
                )
            values = terms.loglik[:offset]
            if open_.shape[0] == R and polish.numel() == 0 and bool(ok.all()):
                # Everybody's Newton step is accepted (the common case): whole-array updates.
                moved = torch.ones_like(moved)
                new_theta, searched = proposals, torch.ones_like(searched)
                taken_step, taken_ll, taken_predicted = taken, values, predicted
                new = terms
                break
            winners, losers = open_[ok], open_[~ok]
            moved = put(moved, winners, torch.ones_like(winners, dtype=torch.bool))
            new_theta = put(new_theta, winners, proposals[ok])
            # λ stays 0 (relaxed(0) = 0); one candidate evaluated by everybody.
            searched = put(searched, open_, torch.ones_like(open_))
            taken_step = put(taken_step, winners, taken[ok])
            taken_ll = put(taken_ll, winners, values[ok])
            taken_predicted = put(taken_predicted, winners, predicted[ok])
            new = _put_terms(new, winners, _rows(_rows(terms, slice(0, offset)), ok))
            position = put(position, losers, torch.ones_like(losers))  # next: slot 1 of level 0
        else:
            # Damping levels spanned by each window (from its position in the current level); a window
            # short of eligible candidates there resumes at the next level in the next round.
            span = int((position[open_] + window).max()) if open_.numel() else 1
            levels = min(max_tries, -(-span // J))
            steps, oks, lambdas = _sequence(
                system.score[open_],
                system.ai[open_],
                active[open_],
                system.scaled[open_],
                damping[open_],
                levels,
                max_step,
                Newton(*(field[open_] for field in newton)),
            )
            J = steps.shape[1] // levels
            order = torch.arange(steps.shape[1], device=device)
            level_of = order // J
            eligible = oks & (order >= position[open_].unsqueeze(-1))
            eligible = eligible & (level[open_].unsqueeze(-1) + level_of < max_tries)
            rank = eligible.cumsum(-1) - 1
            chosen = eligible & (rank < window.unsqueeze(-1))  # the next `window` eligible candidates
            rows, cols = torch.nonzero(chosen, as_tuple=True)
            who = open_[rows]
            proposals, taken = propose(_rows(system, who), steps[rows, cols], pairs, snap[who])
            polished, _ = propose(_rows(system, polish), step_now[polish], pairs, snap[polish])

            # Evaluate: AI terms for single-candidate windows of round 0 (and polishing), ℓ otherwise.
            with_terms = (window[rows] == 1) if round_ == 0 else torch.zeros_like(rows, dtype=torch.bool)
            values = torch.empty(rows.shape[0], dtype=theta.dtype, device=device)
            terms_index = torch.nonzero(with_terms).flatten()
            plain_index = torch.nonzero(~with_terms).flatten()
            terms = None
            if terms_index.numel() or polish.numel():
                points = torch.cat([proposals[terms_index], polished])
                terms = batch.take(torch.cat([who[terms_index], polish])).map(engine.terms, points)
                values = values.index_put((terms_index,), terms.loglik[: terms_index.shape[0]])
            if plain_index.numel():
                plain = batch.take(who[plain_index]).map(engine.loglik, proposals[plain_index])
                values = values.index_put((plain_index,), plain)
            # The quadratic model covers the free step; a snap's gain is below round-off by definition.
            predicted = predicted_gain(system.score[who], system.ai[who], torch.where(snap[who], 0.0, taken))
            ok = accepts(values, ll_now[who], predicted)

            # Per dataset: the first acceptable candidate of its window (candidates are in order).
            first = torch.full((open_.shape[0],), steps.shape[1], dtype=torch.long, device=device)
            first = first.scatter_reduce(0, rows[ok], cols[ok], reduce="amin")
            found = first < steps.shape[1]
            winner_rows = torch.nonzero(found).flatten()
            table = torch.full(steps.shape[:2], -1, dtype=torch.long, device=device)
            table = table.index_put((rows, cols), torch.arange(rows.shape[0], device=device))
            pick = table[winner_rows, first[winner_rows]]  # index of the winner among the evaluated
            winners = open_[winner_rows]
            moved = put(moved, winners, torch.ones_like(winners, dtype=torch.bool))
            new_theta = put(new_theta, winners, proposals[pick])
            damping = put(damping, winners, relaxed(lambdas[winner_rows, level_of[first[winner_rows]]]))
            searched = put(searched, winners, searched[winners] + rank[winner_rows, first[winner_rows]] + 1)
            taken_step = put(taken_step, winners, taken[pick])
            taken_ll = put(taken_ll, winners, values[pick])
            taken_predicted = put(taken_predicted, winners, predicted[pick])
            if terms is not None:
                slot_in_terms = torch.full((rows.shape[0],), -1, dtype=torch.long, device=device)
                slot_in_terms = slot_in_terms.index_put(
                    (terms_index,), torch.arange(terms_index.shape[0], device=device)
                )
                taken = slot_in_terms[pick]
                direct = taken >= 0
                new = _put_terms(new, winners[direct], _rows(terms, taken[direct]))
                needs_terms = put(needs_terms, winners[~direct], torch.ones_like(winners[~direct], dtype=torch.bool))
            else:
                needs_terms = put(needs_terms, winners, torch.ones_like(winners, dtype=torch.bool))

            # The others continue after the last candidate they evaluated (or after the levels seen).
            losers = torch.nonzero(~found).flatten()
            if losers.numel():
                lost = open_[losers]
                evaluated_count = chosen[losers].sum(-1)
                searched = put(searched, lost, searched[lost] + evaluated_count)
                last = torch.where(chosen[losers], order, -1).amax(-1)
                resume = torch.where(evaluated_count < window[losers], torch.full_like(last, steps.shape[1]), last + 1)
                advance = resume // J
                lam = lambdas[losers].gather(1, advance.clamp(max=levels - 1).unsqueeze(1)).squeeze(1)
                damping = put(damping, lost, torch.where(advance >= levels, stiffened(lam), lam))
                level = put(level, lost, level[lost] + advance)
                position = put(position, lost, resume % J)
                gave_up = lost[level[lost] >= max_tries]
                searching = put(searching, gave_up, torch.zeros_like(gave_up, dtype=torch.bool))
                status = put(status, gave_up, stuck_status(newton.definite[gave_up]))

            offset = terms_index.shape[0]

        # Polishing: converged either way, moved only where ℓ did not decrease.
        if polish.numel():
            ok_polish = polish_accepts(terms.loglik[offset:], ll_now[polish], resolution[polish])
            moved_polish = polish[ok_polish]
            moved = put(moved, moved_polish, torch.ones_like(moved_polish, dtype=torch.bool))
            new_theta = put(new_theta, moved_polish, polished[ok_polish])
            new = _put_terms(new, moved_polish, _rows(_rows(terms, slice(offset, None)), ok_polish))

    # Expansion: where the accepted step gained well beyond the quadratic model, twice in a row
    # (once is common far from the optimum and costs nothing; persistently, the AI matrix
    # overstates the curvature and the fit would creep), try multiples of the step in one
    # evaluation and keep the first local maximum of ℓ along the ray.
    understated = moved & searching & expands(taken_ll - ll_now, taken_predicted, ll_now, resolution)
    longer = torch.nonzero(understated & state["understated"]).flatten()
    if longer.numel():
        multipliers = torch.tensor(EXPANSION_MULTIPLIERS, dtype=theta.dtype, device=device)
        M = multipliers.shape[0]
        who = longer.repeat_interleave(M)
        ray, _ = propose(
            _rows(system, who), multipliers.repeat(longer.shape[0]).unsqueeze(-1) * taken_step[who], pairs, snap[who]
        )
        along = batch.take(who).map(engine.loglik, ray).reshape(-1, M)
        best = first_local_maximum(torch.cat([taken_ll[longer].unsqueeze(-1), along], -1))
        farther = best > 0
        chosen_rows = longer[farther]
        picked = ray.reshape(-1, M, k)[farther, best[farther] - 1]
        new_theta = put(new_theta, chosen_rows, picked)
        needs_terms = put(needs_terms, chosen_rows, torch.ones_like(chosen_rows, dtype=torch.bool))
    later = torch.nonzero(needs_terms).flatten()
    if later.numel():
        new = _put_terms(new, later, batch.take(later).map(engine.terms, new_theta[later]))
    return _Iteration(new_theta, new, damping, moved, status, searched, understated)


def _lookahead_within_memory(options: Options, batch: Batch, engine_name: str) -> Options:
    """``options`` with ``lookahead`` lowered so that one line-search round's candidates fit in
    :data:`LINE_SEARCH_MEMORY`, judged by the size of the prepared data per dataset, or for the
    dense engine by its n×n matrices (the schedule changes, never the decisions)."""
    if engine_name == "dense":
        n = batch.Y.shape[-1]
        per_candidate = DENSE_MATRICES_PER_CANDIDATE * n * n * batch.Y.element_size()
    elif batch.prepared is None and batch.single is None:
        return options
    else:
        sizes: list[int] = []
        prepared = batch.prepared if batch.prepared is not None else batch.single  # (a batch of one: single)
        map_tensors(lambda leaf: sizes.append(leaf.numel() * leaf.element_size()), prepared)
        per_candidate = PREPARED_COPIES_PER_CANDIDATE * sum(sizes) / max(1, batch.size)
    cap = max(1, int(LINE_SEARCH_MEMORY // max(per_candidate, 1.0)))
    return options if cap >= options.lookahead else dataclasses.replace(options, lookahead=cap)


def _run_chunk(template, batch: Batch, init_flat: Tensor | None, engine: EngineCalls, options: Options, verbose: int):
    """Fit every dataset of ``batch``: screen, start, iterate until each has a status, then the
    final quantities. Returns a dict of per-dataset fields (leading dimension C = batch size)."""
    C, device, dtype = batch.size, batch.Y.device, batch.Y.dtype
    max_iter = options.max_iter
    k, p = len(engine.names), batch.X.shape[-1]

    def filled(*shape):
        return torch.full((C, *shape), math.nan, dtype=dtype, device=device)

    status, residual_variance = screen(batch, torch.full((C,), RUNNING, dtype=torch.long, device=device))
    good = torch.nonzero(status == RUNNING).flatten()
    everyone = good.numel() == C  # the usual case: whole arrays, no filling or indexing
    state = {}
    if not everyone:
        state = {"theta": filled(k), "lower": filled(k), "upper": filled(k), "loglik": filled(), "score": filled(k)}
        state |= {"ai": filled(k, k), "beta": filled(p), "vcov": filled(p, p)}
    if good.numel():
        batch = batch.prepare(engine)
        options = _lookahead_within_memory(options, batch, engine.chosen.name)
        sub = batch if everyone else batch.take(good)
        # The default start is on the data's scale: it sets the variance floors whatever init is.
        # Without init a fit starts there or, for a grouped model, at its MIVQUE(0) estimates.
        variance = residual_variance if everyone else residual_variance[good]
        if init_flat is None:
            reference, start, low, up = sub.map(engine.start, variance)
        else:  # (no moment start to compute: the user's init is where the fit starts)
            reference = sub.map(engine.reference, variance)
            start = init_flat if everyone else init_flat[good]
            low, up = sub.map(engine.bounds, reference, start)
        first = sub.map(engine.terms, start)
        started = torch.where(torch.isfinite(first.loglik), RUNNING, 3)
        for key, value in (("theta", start), ("lower", low), ("upper", up), *zip(Terms._fields, first)):
            state[key] = value if everyone else put(state[key], good, value)
        status = started if everyone else put(status, good, started)
        status = torch.where((status == RUNNING) & ~_finite_terms(state), OVERFLOW, status)
    state["scaled"] = torch.isfinite(state["lower"]) | torch.isfinite(state["upper"])  # log/logit scale
    pairs = pair_index(correlation_pairs(template), k, device, dtype)
    rates = like(variance_rates(template) if engine.rates is None else engine.rates, batch.Y)
    state["damping"] = torch.zeros(C, dtype=dtype, device=device)
    state["searched"] = torch.ones(C, dtype=torch.long, device=device)  # line-search length, last iteration
    state["understated"] = torch.zeros(C, dtype=torch.bool, device=device)  # as _Iteration.understated
    n_iter = torch.zeros(C, dtype=torch.long, device=device)
    history = {"loglik": [state["loglik"]], "params": [state["theta"]], "step": [torch.zeros_like(state["theta"])]}

    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc=f"AI-REML ×{C}", leave=False)
    for iteration in range(max_iter):
        running = torch.nonzero(status == RUNNING).flatten()
        if running.numel() == 0:
            break
        everyone = running.numel() == C  # the usual case: no indexing needed
        rows = dict(state) if everyone else {key: value[running] for key, value in state.items()}
        rows["pairs"] = pairs  # shared by every dataset, not indexed
        rows["rates"] = rates
        step = _iterate(batch if everyone else batch.take(running), engine, rows, options)
        previous = state["theta"]
        # A row of the history for every iteration that moved a dataset: the last one of a fit
        # only decides that it converged where it stands.
        record = bool(step.moved.any())

        if everyone:  # whole arrays, no indexing
            for key in ("theta", "damping", "understated"):
                state[key] = getattr(step, key)
            state |= step.terms._asdict()
            state["searched"] = step.searched.clamp(min=1)
            n_iter = n_iter + step.moved
            status = step.status
            if record:
                history["step"].append(step.theta - previous)
        else:
            for key in ("theta", "damping", "understated"):
                state[key] = put(state[key], running, getattr(step, key))
            for key, value in zip(Terms._fields, step.terms):
                state[key] = put(state[key], running, value)
            state["searched"] = put(state["searched"], running, step.searched.clamp(min=1))
            n_iter = put(n_iter, running, n_iter[running] + step.moved.to(torch.long))
            status = put(status, running, step.status)
            if record:
                history["step"].append(put(torch.zeros_like(previous), running, step.theta - previous[running]))
        if record:  # (only datasets that moved have new terms to check)
            status = torch.where((status == RUNNING) & ~_finite_terms(state), OVERFLOW, status)
            history["loglik"].append(state["loglik"])
            history["params"].append(state["theta"])
        if bar is not None:
            counts = {"running": int((status == RUNNING).sum()), "converged": int((status == 0).sum())}
            bar.update(1)
            bar.set_postfix(**counts)
            if verbose >= 2:
                bar.write(_progress_line(iteration + 1, counts, state))
    if bar is not None:
        bar.close()
    status = torch.where(status == RUNNING, 1, status)

    # Final quantities at the returned points: β̂ and its covariance came with their evaluation;
    # datasets never fitted (screened out, or ℓ not finite at the start) keep NaN estimates.
    theta = state["theta"]
    fitted = (status <= 2) | (status == 5) | (status == OVERFLOW)
    beta, vcov = state["beta"], state["vcov"]
    if not bool(fitted.all()):
        beta = torch.where(fitted.unsqueeze(-1), beta, math.nan)
        vcov = torch.where(fitted.unsqueeze(-1).unsqueeze(-1), vcov, math.nan)
    natural = theta  # (C, 0): a structure without free parameters
    if k:
        natural = columnwise([spec.transform for _, spec in param_specs(template) if not spec.fixed], theta)
    return {
        "theta": theta,
        "natural": natural,
        "beta": beta,
        "vcov_beta": vcov,
        "score": state["score"],
        "ai": state["ai"],
        "loglik": state["loglik"],
        "status": status,
        "at_boundary": _at_boundary(theta, state, pairs, rates),
        "n_iter": n_iter,
        "history": {name: torch.stack(rows, 1) for name, rows in history.items()},
    }


def _at_boundary(theta: Tensor, state: dict, pairs, rates: Tensor) -> Tensor:
    """``FitResult.at_boundary``: parameters at a bound, except variances at their floor without
    information (not identifiable rather than estimated at 0; the status-5 message names them)."""
    flags = at_bounds(theta, state["lower"], state["upper"], pairs)
    if not bool((theta <= state["lower"]).any()):  # no variance at its floor: nothing to judge
        return flags
    return flags & ~silent_at_floor(theta, state["ai"], state["lower"], rates, variance_floor(theta.dtype))


def _finite_terms(state: dict) -> Tensor:
    """(C,) whether each dataset's score and AI matrix are finite (they overflow before ℓ does)."""
    return torch.isfinite(torch.cat([state["score"], state["ai"].flatten(1)], -1)).all(-1)


def _progress_line(iteration: int, counts: dict, state: dict) -> str:
    if state["loglik"].shape[0] == 1:  # one dataset: its log-likelihood, score and damping
        return (
            f"iter {iteration:3d}  logLik {float(state['loglik'][0]):.8f}  "
            f"|score| {float(state['score'][0].abs().max()):.3e}  damping {float(state['damping'][0]):.1e}"
        )
    return f"iter {iteration:3d}  running {counts['running']:6d}  converged {counts['converged']:6d}"


def _pad_history(tensor: Tensor, length: int, zeros: bool) -> Tensor:
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    tail = tensor[:, -1:].expand(tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, torch.zeros_like(tail) if zeros else tail], 1)


def _concatenate(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    length = max(part["history"]["loglik"].shape[1] for part in parts)
    out = {}
    for key in parts[0]:
        if key == "history":
            out[key] = {
                name: torch.cat([_pad_history(p[key][name], length, zeros=name == "step") for p in parts])
                for name in parts[0][key]
            }
        else:
            out[key] = pytree.tree_map(lambda *leaves: torch.cat(leaves), *[p[key] for p in parts])
    return out


def solve(
    s,
    Y: Tensor,
    X: Tensor,
    init,
    *,
    in_dims,
    x_names,
    jacobian: str,
    engine: str,
    options: Options,
    chunk_size: int | None,
    verbose: int,
    single: bool = False,
    reml: bool = True,
) -> FitResult:
    """Check the inputs, read ``init``, and fit the B datasets of Y chunk by chunk: the one path
    behind ``fit`` (B = 1) and ``fit_batched``. Returns the batched :class:`FitResult`, or with
    ``single`` (B = 1) the result of that one dataset without the batch axis.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.fit.step import Options
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(12) % 3), e=rf.Scalar(12))
        >>> y = torch.tensor([1.0, 2.1, 2.9, 1.2, 2.0, 3.3, 0.8, 1.9, 3.1, 1.1, 2.2, 2.8])
        >>> kw = dict(in_dims=None, x_names=None, jacobian="closed", engine="auto", options=Options(), chunk_size=None, verbose=0)
        >>> batched = solve(s, y[None], torch.ones(12, 1), None, **kw)
        >>> single = solve(s, y[None], torch.ones(12, 1), None, single=True, **kw)
        >>> batched.loglik.shape, single.loglik.shape, bool(single.loglik == batched.loglik[0])
        (torch.Size([1]), torch.Size([]), True)
    """
    template, dims, spec = check_batch_inputs(s, Y, X, in_dims, x_names, jacobian, chunk_size, data_checked=single)
    B, n = Y.shape
    p = X.shape[-1]
    names = param_names(template)
    chosen = select_engine(template, engine)
    calls = EngineCalls(chosen, jacobian, tuple(names), reml, variance_rates(template))
    init_flat = read_init(template, init, B, Y.dtype, Y.device)
    batch = Batch(s, dims, spec, Y, X, X.dim() == 3)
    size = B if chunk_size is None else chunk_size
    parts = []
    # A host loop on small tensors: inference mode saves autograd's per-operation bookkeeping;
    # the results are cloned out of it, so they are ordinary tensors.
    with torch.inference_mode():
        for start in range(0, B, size):
            stop = min(B, start + size)
            part_init = None if init_flat is None else init_flat[start:stop]
            chunk = batch if (start, stop) == (0, B) else batch.slice(start, stop)
            parts.append(_run_chunk(template, chunk, part_init, calls, options, verbose))
        out = _concatenate(parts)
    # Out of inference mode (and, for a single fit, off the batch axis) in one copy.
    out = map_tensors(lambda leaf: (leaf[0] if single else leaf).clone(), out)
    # The parameter trees from the flat (…, k) values: views of the two copies made above.
    out["params"] = tree_from_names(names, out.pop("theta").unbind(-1)) if names else {}
    out["natural"] = tree_from_names(names, out["natural"].unbind(-1)) if names else {}
    return build_result(out, names, x_names, chosen.name, n, p, Y.dtype, reml)
