"""``fit``: AI-REML iterations with step control, boundaries and honest convergence.

Each iteration at θ (raw free parameters) computes the score s and average information AI, then

1. holds *active* parameters: those at a bound whose score points outward (a variance at its
   floor with s_k < 0, a correlation at its limit pushing further; an unstructured covariance at
   |ρ| = 1 − 10⁻¹⁰ holds ρ while its variances move, :func:`boundary_system`);
2. solves AI_ff Δ_f = s_f for the others (the AI-REML / Fisher-scoring direction) and measures
   the Newton decrement d = s_fᵀ Δ_f (≈ twice the log-likelihood still to gain);
3. stops as converged when d < ``tol``, after one last full AI step that polishes the digits;
4. otherwise clamps each log/logit-scale step to ±``max_step`` and tries θ + tΔ (clamped to the
   bounds) for t = 1, ½, ¼, then block steps (identity-scale parameters such as covariances held,
   then moved alone) — :func:`candidate_steps` — accepting the first that does not decrease the
   log-likelihood (and keeps V positive definite); if none does, all are retried with
   Marquardt damping (AI + λ diag AI) Δ = s, λ growing tenfold; λ shrinks after each success.

The returned parameters, β̂, log-likelihood, score and AI all belong to the same point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from reml_fn.fit.result import FitResult
from reml_fn.fit.start import check_inputs, default_init, raw_bounds
from reml_fn.params import (
    as_params,
    constrain,
    flatten_params,
    param_names,
    param_specs,
    tree_from_names,
    unflatten_params,
)
from reml_fn.reml.engines import prepared_data, prepared_keyword, select_engine
from reml_fn.transforms import ExpPow2
from reml_fn.transforms import Identity as IdentityTransform

__all__ = [
    "fit",
    "ai_direction",
    "capped",
    "candidate_steps",
    "accepts",
    "relaxed",
    "stiffened",
    "stalled_status",
    "correlation_pairs",
    "boundary_system",
    "propose",
    "at_correlation_limit",
]

# Defaults of fit and fit_batched (one algorithm, one set of settings).
DEFAULT_MAX_ITER = 200
DEFAULT_TOL = 1e-12  # Newton decrement sᵀAI⁻¹s at which the polishing step ends the fit
DEFAULT_MAX_STEP = 3.0
DEFAULT_MAX_TRIES = 30

# A Newton decrement this small cannot be realised in float64 log-likelihoods of ordinary size.
ROUNDOFF_DECREMENT = 1e-8


def ai_direction(score: Tensor, ai: Tensor, active: Tensor, damping: Tensor | float = 0.0):
    """Solve (AI_ff + λ diag(AI_ff)) Δ_f = s_f with the active parameters held (Δ = 0). Pure.

    λ = ``damping`` = 0 gives the AI-REML (Fisher scoring) step; λ > 0 is Marquardt's scale-invariant
    damping, which bends the step towards the diagonally scaled score when the full step fails
    (badly scaled parameters, such as a covariance next to a huge variance).

    Returns ``(delta, decrement, ok)``: the decrement s_fᵀΔ_f is ≈ twice the log-likelihood
    still to gain (for λ = 0); ``ok`` is False when the reduced system is singular. Active rows
    and columns are replaced by identity rows, so the system keeps its size and the function works
    under ``vmap`` with a different active set per dataset.
    """
    free = ~active
    both_free = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(score.shape[-1], dtype=score.dtype, device=score.device)
    if isinstance(damping, (int, float)) and damping == 0:
        damped = ai
    else:
        damping = torch.as_tensor(damping, dtype=score.dtype, device=score.device)  # on score's device: CUDA too
        damped = ai + damping.unsqueeze(-1).unsqueeze(-1) * torch.diag_embed(torch.diagonal(ai, dim1=-2, dim2=-1))
    reduced = torch.where(both_free, damped, eye)  # active rows and columns: those of the identity
    rhs = torch.where(free, score, 0.0)
    delta, info = torch.linalg.solve_ex(reduced, rhs.unsqueeze(-1))
    delta = torch.where(free, delta.squeeze(-1), 0.0)
    ok = (info == 0) & torch.isfinite(delta).all(-1)
    delta = torch.where(ok.unsqueeze(-1), delta, 0.0)
    return delta, (score * delta).sum(-1), ok


def capped(delta: Tensor, scaled: Tensor, max_step: float) -> Tensor:
    """Clamp each log/logit-scale component (``scaled``) of Δ to [−max_step, max_step]. Pure.

    Elementwise, so one parameter whose Newton step explodes (a variance with a negligible effect
    on V, where AI is nearly singular) cannot shrink everybody else's step. Raw steps of
    identity-scale parameters (covariances, user parameters) have no common unit and are left to
    the block step, the damping and the line search.
    """
    return torch.where(scaled, delta.clamp(-max_step, max_step), delta)


# Backtracking fractions of the full (possibly damped) AI step tried before the block steps.
STEP_FRACTIONS = (1.0, 0.5, 0.25)


def candidate_steps(
    score: Tensor,
    ai: Tensor,
    active: Tensor,
    scaled: Tensor,
    damping,
    max_step: float,
    undamped: tuple[Tensor, Tensor] | None = None,
):
    """The steps one damping level tries, in order (pure; the same sequence for fit and
    fit_batched): the capped AI step Δ(λ) at fractions 1, ½, ¼; then, when the model mixes
    log/logit-scale and identity-scale parameters, the block step with the identity-scale ones
    (covariances) held, which cannot push G out of the positive-definite cone while variances
    are far off, and the block step moving those alone.

    Yields ``(step, ok)`` pairs; ``ok`` is False where the reduced system was singular.
    ``undamped``: the ``(delta, ok)`` of :func:`ai_direction` at λ = 0 when the caller already has
    it (used only where ``damping`` is 0).
    """
    if isinstance(damping, (int, float)):
        undamped_level = damping == 0
    else:
        undamped_level = not bool((torch.as_tensor(damping) != 0).any())
    if undamped is not None and undamped_level:
        delta, ok = undamped
    else:
        delta, _, ok = ai_direction(score, ai, active, damping)
    delta = capped(delta, scaled, max_step)
    for fraction in STEP_FRACTIONS:
        yield (delta if fraction == 1.0 else fraction * delta), ok
    mixed = scaled.any(-1) & ~scaled.all(-1)
    for held in (active | ~scaled, active | scaled):
        block, _, block_ok = ai_direction(score, ai, held, damping)
        yield capped(block, scaled, max_step), block_ok & mixed


def _active(theta, score, lower, upper):
    return ((theta <= lower) & (score < 0)) | ((theta >= upper) & (score > 0))


# |ρ| of an unstructured covariance stops here (the edge of the positive semi-definite cone).
CORRELATION_LIMIT = 1.0 - 1e-10
_COVARIANCE_NAME = re.compile(r"sigma\^2_(\d+)_(\d+)$")


def correlation_pairs(s) -> Tensor:
    """Flat indices ``(i, j, c)`` (m, 3) of every free covariance c = ``…/sigma^2_a_b`` (a ≠ b,
    Identity transform) whose variances ``…/sigma^2_a_a`` and ``…/sigma^2_b_b`` are free ExpPow2
    parameters: the entries of :class:`~reml_fn.Unstructured` blocks, where
    c = ρ·e^{θ_i + θ_j} with correlation |ρ| ≤ 1."""
    specs = {path: spec for path, spec in param_specs(s) if not spec.fixed}
    index = {name: k for k, name in enumerate(specs)}
    pairs = []
    for name, spec in specs.items():
        match = _COVARIANCE_NAME.search(name)
        if not match or match.group(1) == match.group(2) or not isinstance(spec.transform, IdentityTransform):
            continue
        prefix = name[: match.start()]
        a, b = (f"{prefix}sigma^2_{g}_{g}" for g in match.groups())
        if all(v in specs and isinstance(specs[v].transform, ExpPow2) for v in (a, b)):
            pairs.append((index[a], index[b], index[name]))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 3)


def at_correlation_limit(theta: Tensor, pairs: Tensor) -> Tensor:
    """(…, k) flags: the covariances of ``pairs`` whose |ρ| reached the limit. Pure."""
    flags = torch.zeros_like(theta, dtype=torch.bool)
    if pairs.shape[0] == 0:
        return flags
    i, j, c = pairs.to(theta.device).unbind(-1)
    reached = theta[..., c].abs() >= CORRELATION_LIMIT * torch.exp(theta[..., i] + theta[..., j]) * (1.0 - 1e-12)
    columns = torch.arange(theta.shape[-1], device=theta.device) == c.unsqueeze(-1)
    return flags | (reached.unsqueeze(-1) & columns).any(-2)


class BoundarySystem(NamedTuple):
    """The AI-REML system with parameters at bounds held: ``active`` (…, k) flags, the score and
    AI in reduced coordinates, and ``boundary`` (…, m): correlations held at |ρ| = limit."""

    active: Tensor
    score: Tensor
    ai: Tensor
    boundary: Tensor


def boundary_system(theta: Tensor, score: Tensor, ai: Tensor, lower: Tensor, upper: Tensor, pairs: Tensor):
    """Hold what sits at a bound and pushes outward. Pure; works on batches (…, k).

    Box bounds (variance floors, correlation limits of sigmoid parameters) hold the parameter. A
    covariance at the correlation limit whose score pushes |ρ| further holds ρ instead: the
    system moves to coordinates (θ_i, θ_j) with c = ρ e^{θ_i + θ_j}, i.e. s ← Jᵀs, AI ← JᵀAI J
    with ∂c/∂θ_i = ∂c/∂θ_j = c, and :func:`propose` keeps ρ fixed along every step.
    """
    active = _active(theta, score, lower, upper)
    if pairs.shape[0] == 0:
        return BoundarySystem(
            active, score, ai, torch.zeros((*theta.shape[:-1], 0), dtype=torch.bool, device=theta.device)
        )
    i, j, c = pairs.to(theta.device).unbind(-1)
    cov = theta[..., c]
    limit = CORRELATION_LIMIT * torch.exp(theta[..., i] + theta[..., j])
    boundary = (cov.abs() >= limit * (1.0 - 1e-12)) & (torch.sign(cov) * score[..., c] > 0)
    if not torch._C._functorch.is_batchedtensor(boundary) and not bool(boundary.any()):
        return BoundarySystem(active, score, ai, boundary)  # the common case: nothing to reduce
    k = theta.shape[-1]
    eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
    J = eye.expand(*theta.shape[:-1], k, k)
    for p in range(pairs.shape[0]):
        weight = (boundary[..., p].to(theta.dtype) * cov[..., p]).unsqueeze(-1).unsqueeze(-1)
        e_i, e_j, e_c = eye[int(i[p])], eye[int(j[p])], eye[int(c[p])]
        J = J + weight * (e_c[:, None] * (e_i + e_j)[None, :])
        J = J - boundary[..., p].to(theta.dtype).unsqueeze(-1).unsqueeze(-1) * (e_c[:, None] * e_c[None, :])
    held = active | (boundary.unsqueeze(-1) & (torch.arange(k, device=theta.device) == c.unsqueeze(-1))).any(-2)
    score_r = (J.transpose(-1, -2) @ score.unsqueeze(-1)).squeeze(-1)
    ai_r = J.transpose(-1, -2) @ ai @ J
    return BoundarySystem(held, score_r, 0.5 * (ai_r + ai_r.transpose(-1, -2)), boundary)


def propose(theta: Tensor, step: Tensor, lower: Tensor, upper: Tensor, pairs: Tensor, boundary: Tensor) -> Tensor:
    """The candidate θ + Δ: clamped to the box bounds, with every covariance of ``pairs`` kept
    inside |ρ| ≤ limit, and the held ones (``boundary``) moved so that ρ stays fixed. Pure."""
    new = torch.clamp(theta + step, lower, upper)
    if pairs.shape[0] == 0:
        return new
    i, j, c = pairs.to(theta.device).unbind(-1)
    scale = torch.exp(new[..., i] + new[..., j])
    rho = theta[..., c] / torch.exp(theta[..., i] + theta[..., j])
    bound = CORRELATION_LIMIT * scale
    covariance = torch.where(boundary, rho * scale, torch.maximum(torch.minimum(new[..., c], bound), -bound))
    return new.index_copy(-1, c, covariance)


# Round-off allowance of the acceptance test: near the optimum ℓ is flat to ~1e-13 relative.
ACCEPT_SLACK = 1e-11


def accepts(ll_candidate: Tensor, ll_now: Tensor) -> Tensor:
    """Whether a candidate with log-likelihood ``ll_candidate`` may replace the current point:
    finite and not below ``ll_now`` by more than round-off. Pure and elementwise (bool tensor)."""
    return torch.isfinite(ll_candidate) & (ll_candidate >= ll_now - ACCEPT_SLACK * (1.0 + ll_now.abs()))


def _accepted(ll_candidate: Tensor, ll_now: Tensor, in_float64: bool) -> bool:
    """:func:`accepts` for one fit: in float64 the same test on host floats (one read, no tensor
    operations); otherwise the tensor test in the data's precision."""
    if not in_float64:
        return bool(accepts(ll_candidate, ll_now))
    candidate, now = float(ll_candidate), float(ll_now)
    return math.isfinite(candidate) and candidate >= now - ACCEPT_SLACK * (1.0 + abs(now))


def relaxed(damping: Tensor | float) -> Tensor | float:
    """Marquardt λ after an accepted step: λ/10, or 0 once it is small. Pure, elementwise (a
    Python float for fit's host loop gives the same value as the 0-d tensor)."""
    if isinstance(damping, float):
        return damping / 10.0 if damping > 1e-6 else 0.0
    return torch.where(damping > 1e-6, damping / 10.0, torch.zeros_like(damping))


def stiffened(damping: Tensor | float) -> Tensor | float:
    """Marquardt λ after a damping level without an acceptable step: max(10λ, 10⁻³). Pure."""
    if isinstance(damping, float):
        return max(10.0 * damping, 1e-3)
    return torch.clamp(10.0 * damping, min=1e-3)


def stalled_status(decrement: Tensor) -> Tensor:
    """Status when no step is acceptable: 0 (optimum up to round-off) or 2 (stuck). Pure."""
    return torch.where(decrement < ROUNDOFF_DECREMENT, 0, 2)


def fit(
    s,
    y: Tensor,
    X: Tensor,
    init: Mapping | Tensor | None = None,
    *,
    x_names: Sequence[str] | None = None,
    jacobian: str = "closed",
    engine: str = "auto",
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    max_step: float = DEFAULT_MAX_STEP,
    max_tries: int = DEFAULT_MAX_TRIES,
    verbose: int = 0,
) -> FitResult:
    """Fit the REML linear mixed model y ~ N(Xβ, V(θ)) by AI-REML.

    Args:
        s: the covariance structure of y, V(θ) (n, n).
        y: response (n,). X: fixed-effects design (n, p), full column rank.
        init: raw starting parameters (tree or flat tensor); default: variance components at
            equal shares of the OLS residual variance, correlations at 0 (``fit.start``).
        x_names: names of X's columns for the summary (default ``x0, x1, …``).
        jacobian: ``"closed"`` (default), ``"fwd"`` or ``"rev"`` derivatives of V.
        engine: ``"auto"``, ``"dense"``, ``"mme"``, …
        max_iter: iteration limit. tol: convergence threshold on the Newton decrement
            sᵀ AI⁻¹ s (≈ twice the log-likelihood still to gain).
        max_step: cap on each |Δθ_k| per iteration for log/logit-scale parameters.
        max_tries: how many damping levels (each trying the steps of :func:`candidate_steps`)
            per iteration before giving up.
        verbose: 0 silent; 1 a tqdm progress bar with the log-likelihood; 2 also a line per
            iteration.

    Returns:
        A :class:`FitResult`; ``print(result)`` shows an lme4-style summary.

    Raises:
        ValueError / TypeError before any iteration for NaN/inf data, shape mismatches,
        rank-deficient X (naming the columns), parameter trees that do not match ``s``, or a
        starting point where V is not positive definite.

    Example:
        >>> import torch, reml_fn as rf
        >>> g = torch.arange(12) % 3
        >>> Z = torch.nn.functional.one_hot(g).double()
        >>> y = torch.tensor([1.0, 2.1, 2.9, 1.2, 2.0, 3.3, 0.8, 1.9, 3.1, 1.1, 2.2, 2.8])
        >>> s = rf.Sum(group=rf.Propagate(Z=Z, G=rf.Scalar(3)), residual=rf.Scalar(12))
        >>> result = rf.fit(s, y, torch.ones(12, 1))
        >>> bool(result.converged), round(float(result.beta[0]), 4)
        (True, 2.0333)
    """
    residual_variance = check_inputs(s, y, X, x_names)
    # The loop is host code on tiny tensors: inference mode skips autograd's per-operation
    # bookkeeping (~15 % of a small fit). The results are cloned out of it, so they are ordinary
    # tensors (usable with autograd and in-place operations).
    with torch.inference_mode():
        result = _fit(
            s, y, X, init, x_names, jacobian, engine, max_iter, tol, max_step, max_tries, verbose, residual_variance
        )
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, result)


def _fit(
    s, y, X, init, x_names, jacobian, engine, max_iter, tol, max_step, max_tries, verbose, residual_variance
) -> FitResult:
    names = param_names(s)
    chosen = select_engine(s, engine)
    if init is None:
        theta = default_init(s, y, X, jacobian, engine, residual_variance)
    else:
        theta = flatten_params(s, as_params(s, init)).to(dtype=y.dtype, device=y.device)
    lower, upper = raw_bounds(s, theta)
    scaled = torch.isfinite(lower) | torch.isfinite(upper)  # log- or logit-scale parameters
    pairs = correlation_pairs(s)

    # What does not depend on θ, once (engines without ``prepare`` get no keyword).
    extra = prepared_keyword(prepared_data(chosen, s, y, X))

    def loglik(t: Tensor) -> Tensor:
        return chosen.loglik(s, tree_from_names(names, t), y, X, **extra)

    def terms(t: Tensor):
        return chosen.ai_terms(s, tree_from_names(names, t), y, X, jacobian, **extra)

    current = terms(theta)
    if not bool(torch.isfinite(current.loglik)):
        raise ValueError(
            "V is not positive definite at the starting point (log-likelihood "
            f"{float(current.loglik)}); pass a different init= (raw parameters {names})"
        )
    history_ll, history_theta, history_step = [current.loglik], [theta], [torch.zeros_like(theta)]
    status = 1
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="AI-REML", leave=False)
    damping = 0.0  # Marquardt λ, a host float in this loop (a tensor per dataset in fit_batched)
    in_float64 = theta.dtype == torch.float64
    for _ in range(max_iter):
        system = boundary_system(theta, current.score, current.ai, lower, upper, pairs)
        step_now, decrement, ok_now = ai_direction(system.score, system.ai, system.active)
        if not bool(ok_now):
            status = 5
            break
        if float(decrement) < tol:
            # One last full AI step polishes the estimates (AI-REML converges fast here; the
            # decrement bounds the log-likelihood gap, not the parameters' last digits).
            polished = propose(theta, step_now, lower, upper, pairs, system.boundary)
            final = terms(polished)
            if _accepted(final.loglik, current.loglik, in_float64):
                history_step.append(polished - theta)
                theta, current = polished, final
                history_ll.append(current.loglik)
                history_theta.append(theta)
            status = 0
            break
        accepted, accepted_terms, first = None, None, True
        for _ in range(max_tries):
            steps = candidate_steps(
                system.score, system.ai, system.active, scaled, damping, max_step, undamped=(step_now, ok_now)
            )
            for step, ok in steps:
                if not bool(ok):
                    continue
                candidate = propose(theta, step, lower, upper, pairs, system.boundary)
                # The first candidate is usually accepted: evaluating it with the AI terms saves
                # a second factorisation of the same point; later ones only need ℓ.
                evaluated = terms(candidate) if first else None
                value = evaluated.loglik if first else loglik(candidate)
                first = False
                if _accepted(value, current.loglik, in_float64):
                    accepted, accepted_terms = candidate, evaluated
                    break
            if accepted is not None:
                damping = relaxed(damping)
                break
            damping = stiffened(damping)
        if accepted is None:
            # No step gains anything: at the optimum up to round-off, or genuinely stuck.
            status = int(stalled_status(decrement))
            break
        history_step.append(accepted - theta)
        theta = accepted
        current = accepted_terms if accepted_terms is not None else terms(theta)
        history_ll.append(current.loglik)
        history_theta.append(theta)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loglik=f"{float(current.loglik):.6f}")
            if verbose >= 2:
                bar.write(
                    f"iter {len(history_ll) - 1:3d}  logLik {float(current.loglik):.8f}  "
                    f"|score| {float(current.score.abs().max()):.3e}  damping {float(damping):.1e}  "
                    f"decrement {float(decrement):.3e}"
                )
    if bar is not None:
        bar.close()

    params = unflatten_params(s, theta)
    beta, vcov = chosen.gls(s, params, y, X, **extra)
    loglik_value = current.loglik
    k, n, p = len(names), y.shape[0], X.shape[1]
    at_boundary = (theta <= lower) | (theta >= upper) | at_correlation_limit(theta, pairs)
    return FitResult(
        params=params,
        natural=constrain(s, params),
        beta=beta,
        vcov_beta=vcov,
        se_beta=torch.sqrt(torch.diagonal(vcov)),
        score=current.score,
        ai=current.ai,
        loglik=loglik_value,
        reml_criterion=-2.0 * loglik_value,
        aic=-2.0 * loglik_value + 2.0 * (p + k),
        bic=-2.0 * loglik_value + (p + k) * math.log(n),
        converged=torch.tensor(status == 0, device=y.device),
        status=torch.tensor(status, device=y.device),
        at_boundary=at_boundary,
        n_iter=torch.tensor(len(history_ll) - 1, device=y.device),
        history={
            "loglik": torch.stack(history_ll),
            "params": torch.stack(history_theta),
            "step": torch.stack(history_step),
        },
        names=tuple(names),
        beta_names=tuple(x_names) if x_names is not None else tuple(f"x{j}" for j in range(p)),
        engine=chosen.name,
        n=n,
        p=p,
    )
