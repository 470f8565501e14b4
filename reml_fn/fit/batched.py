r"""``fit_batched``: the same REML model fitted to B datasets at once, one bad dataset spoiling nothing.

Datasets b = 1 … B share the structure of V(θ) and differ in the response y_b (rows of Y), and
optionally in X (a (B, n, p) tensor) and in data leaves of the structure (a different Z per
dataset, selected with ``in_dims`` exactly as ``torch.func.vmap`` does). Each dataset gets its own
θ_b, found by the *same* AI-REML iterations as :func:`reml_fn.fit` — the same start, bounds,
active sets, capped steps, candidate sequence (:func:`~reml_fn.fit.driver.candidate_steps`),
acceptance test, Marquardt damping and final polishing step — so every dataset ends at the point
``fit`` reaches for it alone (to round-off: the batched linear algebra may differ in the last bits).

How it runs: a host loop over *vmapped pure steps* with per-dataset state (θ, score, AI, damping,
status). In every iteration

1. the AI direction, active set and Newton decrement are computed for all running datasets at once
   (batched k×k solves); datasets with decrement < ``tol`` are polished and stop (status 0), those
   with a singular AI stop (status 5);
2. the line search is a per-dataset state machine over the candidate sequence of ``fit`` (damping
   level, slot): each round evaluates a window of the next candidates of every dataset still
   searching in one vmapped call and keeps, per dataset, the first acceptable one — exactly the
   candidate the sequential search of ``fit`` accepts; datasets that accept leave the search, the
   others continue after their window; one that exhausts ``max_tries`` damping levels stops
   (status 0 at round-off, else 2);
3. a dataset whose previous line search accepted its first candidate (the usual case) evaluates its
   next first candidate as full AI terms, so an accepted step needs no second engine call; the
   others start with a window as long as their previous search, then 2, 4, 8, … candidates
   (``LOOKAHEAD_BUDGET`` bounds the evaluations per round).

Only the datasets still running (or still searching) enter each vmapped call; finished datasets stop
moving. Nothing inside vmapped code raises on values (``cholesky_ex``, ``solve_ex``, masks): V not
positive definite gives ℓ = −∞ and a rejected candidate. Datasets that cannot be fitted are flagged
before any work and never enter the computation (``status``): NaN/inf in y, in a per-dataset X or
in per-dataset structure data (4), V not positive definite at the start (3), y an exact linear
function of X, e.g. constant (6), a rank-deficient per-dataset X (7).

**Memory.** A chunk of C datasets (``chunk_size``; default all B) holds, per engine call, roughly

* dense engine: C·(k + 7)·n² floats — V, its factor, L⁻¹, the projector and P, and the k
  derivative matrices dV/dθ (k·n² once, not C·k·n², when the structure is shared);
* MME engine, one grouping factor + Scalar residual (the fast path, :mod:`reml_fn.reml.one_factor`):
  per dataset its sufficient statistics, C·(m·k·(k + p + 1) + p² + …) floats, and the k×k blocks of
  one call; nothing of size n — sleepstudy (n = 180, m = 18, k = 2, p = 2) measured ≈ 20 KB per
  dataset with results and history;
* MME engine, other models (Grouped/Propagate terms + Scalar/Diagonal residual):
  C·(c₁·n·(K + d) + m·k·d + d²) floats with K = k + 1 work vectors, d = q_rest + p dense columns,
  m groups of k effects of the blocked term (c₁ ≈ 6); nothing of size n².

The engine's preparation (``engine.prepare``: the statistics) runs once per dataset and travels
with the batch.

Peak memory is that of one engine call on the whole chunk; results and history add C·T·k floats for
T iterations. Chunks run one after another, so peak memory is bounded by ``chunk_size`` whatever B.

Example:
    >>> import torch, reml_fn as rf
    >>> g = torch.arange(12) % 3
    >>> s = rf.Sum(group=rf.Grouped(g), residual=rf.Scalar(12))
    >>> y = torch.tensor([1.0, 2.1, 2.9, 1.2, 2.0, 3.3, 0.8, 1.9, 3.1, 1.1, 2.2, 2.8])
    >>> Y = torch.stack([y, y.flip(0), 2.0 * y])
    >>> result = rf.fit_batched(s, Y, torch.ones(12, 1))
    >>> result.converged.tolist(), tuple(result.beta.shape)
    ([True, True, True], (3, 1))
    >>> alone = rf.fit(s, Y[1], torch.ones(12, 1))
    >>> bool(torch.isclose(result.loglik[1], alone.loglik, rtol=1e-10, atol=0))
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from reml_fn.fit.driver import (
    DEFAULT_MAX_ITER,
    DEFAULT_MAX_STEP,
    DEFAULT_MAX_TRIES,
    DEFAULT_TOL,
    STEP_FRACTIONS,
    accepts,
    ai_direction,
    at_correlation_limit,
    boundary_system,
    candidate_steps,
    correlation_pairs,
    propose,
    relaxed,
    stalled_status,
    stiffened,
)
from reml_fn.fit.result import FitResult
from reml_fn.fit.start import check_design, default_init, exact_linear_response, raw_bounds
from reml_fn.params import constrain, param_names, unflatten_params
from reml_fn.reml.engines import prepared_data, prepared_keyword, select_engine
from reml_fn.reml.likelihood import check_data
from reml_fn.structures.base import Structure

__all__ = ["fit_batched", "stack_structures", "dataset_structure"]

RUNNING = -1  # internal status of a dataset still iterating
# Candidates per damping level in candidate_steps (fractions, then two block steps): only sizes the
# windows; the bookkeeping uses the number candidate_steps actually yields.
SLOTS_PER_LEVEL = len(STEP_FRACTIONS) + 2
_JACOBIANS = ("closed", "fwd", "rev")


# ------------------------------------------------------------------------------------------------
# Per-dataset data: the structure's batched leaves, Y and X


class _Batch(NamedTuple):
    """The data of a batch: structure ``s`` (some leaves batched), their in_dims, Y, X."""

    s: Any
    leaf_dims: tuple  # in_dim (int or None) per leaf of s, in pytree leaf order
    spec: Any  # pytree spec of s
    Y: Tensor  # (C, n)
    X: Tensor  # (n, p) shared or (C, n, p)
    x_batched: bool
    prepared: Any = None  # the engine's θ-independent data per dataset (leaves (C, …)), or None

    @property
    def size(self) -> int:
        return self.Y.shape[0]

    @property
    def s_in_dims(self):
        if all(d is None for d in self.leaf_dims):
            return None
        return pytree.tree_unflatten(list(self.leaf_dims), self.spec)

    @property
    def x_in_dim(self):
        return 0 if self.x_batched else None

    def take(self, index: Tensor) -> _Batch:
        """The datasets ``index`` (a 1-D index tensor), in that order."""
        if index.shape[0] == self.size and bool((index == torch.arange(self.size, device=index.device)).all()):
            return self
        leaves = pytree.tree_leaves(self.s)
        taken = [
            leaf if d is None else leaf.index_select(d, index.to(leaf.device))
            for leaf, d in zip(leaves, self.leaf_dims)
        ]
        s = pytree.tree_unflatten(taken, self.spec) if any(d is not None for d in self.leaf_dims) else self.s
        X = self.X.index_select(0, index) if self.x_batched else self.X
        prepared = self.prepared
        if prepared is not None:
            prepared = pytree.tree_map(lambda leaf: leaf.index_select(0, index), prepared)
        return self._replace(s=s, Y=self.Y.index_select(0, index), X=X, prepared=prepared)

    def slice(self, start: int, stop: int) -> _Batch:
        return self.take(torch.arange(start, stop, device=self.Y.device))

    def map(self, fn, *per_dataset: Tensor):
        """``vmap(fn)(s_b, y_b, X_b, prepared_b, *per_dataset_b)`` over the batch."""
        if self.size == 1:
            # One dataset (the tail of a batch): the plain call, without vmap's per-operation cost.
            s = dataset_structure(self.s, self.s_in_dims, 0) if self.s_in_dims is not None else self.s
            prepared = None if self.prepared is None else pytree.tree_map(lambda leaf: leaf[0], self.prepared)
            X = self.X[0] if self.x_batched else self.X
            out = fn(s, self.Y[0], X, prepared, *(value[0] for value in per_dataset))
            return pytree.tree_map(lambda leaf: leaf.unsqueeze(0), out)
        in_dims = (self.s_in_dims, 0, self.x_in_dim, None if self.prepared is None else 0, *([0] * len(per_dataset)))
        return torch.func.vmap(fn, in_dims=in_dims)(self.s, self.Y, self.X, self.prepared, *per_dataset)

    def prepare(self, engine: _Engine) -> _Batch:
        """The batch with the engine's per-dataset preparation (:meth:`_Engine.prepare`) attached."""
        first = self.take(torch.zeros(1, dtype=torch.long, device=self.Y.device))
        probe = prepared_data(
            engine.chosen,
            dataset_structure(first.s, first.s_in_dims, 0),
            first.Y[0],
            first.X[0] if self.x_batched else first.X,
        )
        if probe is None:  # this engine prepares nothing for this structure
            return self
        return self._replace(prepared=self.map(engine.prepare))


def dataset_structure(s, in_dims, b: int):
    """Dataset ``b``'s own structure: every batched leaf of ``s`` (``in_dims`` as for
    :func:`fit_batched`) indexed at ``b`` along its batch dimension.

    Example:
        >>> import torch, reml_fn as rf
        >>> Z = torch.stack([torch.eye(3), torch.ones(3, 3)])            # (B=2, n=3, q=3)
        >>> from reml_fn.fit.batched import stack_structures, dataset_structure
        >>> batched, dims = stack_structures([
        ...     rf.Sum(u=rf.Propagate(Z=Z[b], G=rf.Scalar(3)), residual=rf.Scalar(3)) for b in range(2)])
        >>> dataset_structure(batched, dims, 1)["u"]["Z"].matrix.tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    leaves, spec = pytree.tree_flatten(s)
    dims = _leaf_dims(s, in_dims, leaves, spec)
    return pytree.tree_unflatten([leaf if d is None else leaf.select(d, b) for leaf, d in zip(leaves, dims)], spec)


def stack_structures(structures: Sequence) -> tuple[Any, Any]:
    """One structure with batched data leaves from B structures of the same form, and its ``in_dims``.

    Leaves that are equal in every structure stay shared (in_dim None, computed once under vmap);
    the others are stacked along a new leading dimension (in_dim 0). Use it to fit datasets with
    different designs Z: ``s, in_dims = stack_structures([make(Z_b) for Z_b in Zs])``, then
    ``fit_batched(s, Y, X, in_dims=in_dims)``.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.fit.batched import stack_structures
        >>> Zs = [torch.eye(4)[:, :2], torch.ones(4, 2)]
        >>> s, in_dims = stack_structures([rf.Sum(u=rf.Propagate(Z=Z, G=rf.Scalar(2)), e=rf.Scalar(4)) for Z in Zs])
        >>> tuple(s["u"]["Z"].matrix.shape), in_dims["u"]["Z"].matrix
        ((2, 4, 2), 0)
    """
    structures = list(structures)
    if not structures:
        raise ValueError("stack_structures needs at least one structure")
    flat = [pytree.tree_flatten(s) for s in structures]
    spec = flat[0][1]
    for b, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ValueError(
                f"stack_structures: structure {b} differs in form (types, sizes, names or parameter specs) from "
                "structure 0; only data leaves (tensors) may differ"
            )
    leaves, dims = [], []
    for i, leaf in enumerate(flat[0][0]):
        column = [leaves_b[i] for leaves_b, _ in flat]
        if not isinstance(leaf, Tensor):
            leaves.append(leaf)
            dims.append(None)
            continue
        if any(c.shape != leaf.shape or c.dtype != leaf.dtype for c in column):
            raise ValueError(f"stack_structures: data leaf {i} has different shapes or dtypes across structures")
        if all(c is leaf or torch.equal(c, leaf) for c in column):
            leaves.append(leaf)
            dims.append(None)
        else:
            leaves.append(torch.stack(column))
            dims.append(0)
    return pytree.tree_unflatten(leaves, spec), pytree.tree_unflatten(dims, spec)


def _leaf_dims(s, in_dims, leaves, spec) -> tuple:
    if in_dims is None:
        return (None,) * len(leaves)
    dims = pytree._broadcast_to_and_flatten(in_dims, spec)
    if dims is None:
        raise ValueError(
            "in_dims must be None, an int, or a tree shaped like the structure (as torch.func.vmap's in_dims), "
            f"with an int or None per data leaf; the structure has {len(leaves)} data leaves"
        )
    return tuple(dims)


# ------------------------------------------------------------------------------------------------
# Input checks (before any work)


def _check_batch_inputs(s, Y, X, in_dims, x_names, jacobian, max_iter, max_tries, chunk_size):
    if not isinstance(s, Structure):
        raise TypeError(f"s must be a reml_fn structure, got {type(s).__name__}")
    if not isinstance(Y, Tensor) or not isinstance(X, Tensor):
        raise TypeError(f"Y and X must be tensors, got {type(Y).__name__} and {type(X).__name__}")
    if Y.dim() != 2:
        hint = " (for one dataset use Y[None] or rf.fit)" if Y.dim() == 1 else ""
        raise ValueError(f"Y must be a 2-D tensor (B, n) of B responses, got shape {tuple(Y.shape)}{hint}")
    B, n = Y.shape
    if B == 0:
        raise ValueError("Y has no datasets (B = 0)")
    if not Y.is_floating_point():
        raise TypeError(f"Y must be floating point, got {Y.dtype}")
    if X.dim() not in (2, 3):
        raise ValueError(
            f"X must be (n, p) shared by all datasets or (B, n, p) per dataset, got shape {tuple(X.shape)}"
        )
    if X.dim() == 3 and X.shape[0] != B:
        raise ValueError(f"X has {X.shape[0]} datasets (X.shape[0]) but Y has {B} (Y.shape[0])")
    if X.shape[-2] != n:
        raise ValueError(f"X has {X.shape[-2]} rows but Y has {n} columns (observations per dataset)")
    if X.dtype != Y.dtype:
        raise TypeError(f"Y and X must share a dtype, got {Y.dtype} and {X.dtype}")
    if jacobian not in _JACOBIANS:
        raise ValueError(f"unknown Jacobian method {jacobian!r}; expected 'closed', 'fwd' or 'rev'")
    for name, value, minimum in (("max_iter", max_iter, 0), ("max_tries", max_tries, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")

    leaves, spec = pytree.tree_flatten(s)
    dims = _leaf_dims(s, in_dims, leaves, spec)
    for i, (leaf, d) in enumerate(zip(leaves, dims)):
        if d is None:
            continue
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"in_dims: data leaf {i} has in_dim {d!r}; expected an int or None")
        if not isinstance(leaf, Tensor) or not -leaf.dim() <= d < leaf.dim():
            raise ValueError(
                f"in_dims: data leaf {i} of shape {tuple(getattr(leaf, 'shape', ()))} has no dimension {d}"
            )
        if leaf.shape[d] != B:
            raise ValueError(
                f"in_dims: data leaf {i} has {leaf.shape[d]} entries along its batch dimension {d} but Y has {B} datasets"
            )
    template = pytree.tree_unflatten([leaf if d is None else leaf.select(d, 0) for leaf, d in zip(leaves, dims)], spec)
    try:
        check_data(template, Y[0], X[0] if X.dim() == 3 else X)
    except ValueError as error:
        raise ValueError(f"{error} (checked on dataset 0: Y (B, n), X (n, p) or (B, n, p), V (n, n))") from None
    p = X.shape[-1]
    if x_names is not None and len(x_names) != p:
        raise ValueError(f"x_names has {len(x_names)} names but X has {p} columns")
    if X.dim() == 2:
        # Shared X: a value problem concerns every dataset, so it is an error (checked once).
        check_design(X, x_names)
    for i, (leaf, d) in enumerate(zip(leaves, dims)):
        if d is None and isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise ValueError(f"the structure's shared data leaf {i} (shape {tuple(leaf.shape)}) contains NaN or inf")
    return template, dims, spec


def _initial_flat(s, init, B: int, k: int, dtype, device) -> Tensor | None:
    """``init`` as raw flat starts (B, k), or None for the default start."""
    if init is None:
        return None
    if isinstance(init, Mapping):
        names = param_names(s)
        flat = []
        for name in names:
            node = init
            for part in name.split("/"):
                if not isinstance(node, Mapping) or part not in node:
                    raise ValueError(f"init misses parameter {name!r}; free parameters are {names}")
                node = node[part]
            value = torch.as_tensor(node, dtype=dtype, device=device)
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != B):
                raise ValueError(
                    f"init[{name!r}] must be a scalar or have shape (B,) = ({B},), got {tuple(value.shape)}"
                )
            flat.append(value.expand(B))
        theta = torch.stack(flat, dim=-1) if flat else torch.zeros(B, 0, dtype=dtype, device=device)
        return theta
    if not isinstance(init, Tensor):
        raise TypeError(f"init must be None, a parameter tree or a tensor (k,) or (B, k), got {type(init).__name__}")
    init = init.to(dtype=dtype, device=device)
    if init.dim() == 1 and init.shape[0] == k:
        return init.expand(B, k).clone()
    if init.dim() == 2 and tuple(init.shape) == (B, k):
        return init.clone()
    raise ValueError(
        f"init must have shape (k,) = ({k},) or (B, k) = ({B}, {k}) in param_names order, got {tuple(init.shape)}"
    )


# ------------------------------------------------------------------------------------------------
# Datasets that cannot be fitted (flagged, never computed)


def _screen(batch: _Batch, status: Tensor) -> tuple[Tensor, Tensor]:
    """Status codes 4, 7, 6 for datasets that cannot be fitted (host code on batched tensors), and
    the OLS residual variance s² of the others (NaN for those flagged before it is computed)."""
    finite = torch.isfinite(batch.Y).all(-1)
    if batch.x_batched:
        finite = finite & torch.isfinite(batch.X).all(-1).all(-1)
    for leaf, d in zip(pytree.tree_leaves(batch.s), batch.leaf_dims):
        if d is not None and leaf.is_floating_point():
            finite = finite & torch.isfinite(leaf.movedim(d, 0)).flatten(1).all(-1)
    status = torch.where(finite, status, 4)
    if batch.x_batched:
        p = batch.X.shape[-1]
        safe_X = torch.where(finite[:, None, None], batch.X, torch.zeros_like(batch.X))
        full_rank = torch.linalg.matrix_rank(safe_X) == p
        status = torch.where((status == RUNNING) & ~full_rank, 7, status)
    ok = status == RUNNING
    index = torch.nonzero(ok).flatten()
    residual_variance = torch.full(status.shape, math.nan, dtype=batch.Y.dtype, device=batch.Y.device)
    if index.numel():
        sub = batch.take(index)
        degenerate, variance = torch.func.vmap(exact_linear_response, in_dims=(0, sub.x_in_dim))(sub.Y, sub.X)
        status = status.index_put((index,), torch.where(degenerate, 6, status[index]))
        residual_variance = residual_variance.index_put((index,), variance)
    return status, residual_variance


# ------------------------------------------------------------------------------------------------
# The fit of one chunk


def _put(target: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``target`` with rows ``index`` replaced by ``values`` (out of place)."""
    return target.index_put((index,), values.to(target.dtype))


class _Engine(NamedTuple):
    """The vmappable per-dataset functions of the chosen engine."""

    chosen: Any
    jacobian: str

    def prepare(self, s, y, X, prepared):
        return prepared_data(self.chosen, s, y, X)

    def terms(self, s, y, X, prepared, theta):
        return self.chosen.ai_terms(s, unflatten_params(s, theta), y, X, self.jacobian, **prepared_keyword(prepared))

    def loglik(self, s, y, X, prepared, theta):
        return self.chosen.loglik(s, unflatten_params(s, theta), y, X, **prepared_keyword(prepared))

    def start(self, s, y, X, prepared, residual_variance):
        return default_init(s, y, X, self.jacobian, self.chosen.name, residual_variance)

    def bounds(self, s, y, X, prepared, theta):
        return raw_bounds(s, theta)

    def gls(self, s, y, X, prepared, theta):
        return self.chosen.gls(s, unflatten_params(s, theta), y, X, **prepared_keyword(prepared))


class _Iterate(NamedTuple):
    """What one iteration decided for the running datasets (rows in ``running`` order)."""

    theta: Tensor
    loglik: Tensor
    score: Tensor
    ai: Tensor
    damping: Tensor
    moved: Tensor  # bool: an accepted step (line search or polishing)
    status: Tensor  # RUNNING, 0, 2 or 5
    searched: Tensor  # how many candidates the line search evaluated (0 when converged)


# Candidates evaluated per line-search round over all searching datasets. A dataset that accepted
# its first candidate in the previous iteration evaluates its next first candidate as full AI
# terms (usually accepted: no second engine call); the others evaluate as many candidates as they
# needed last time, then windows of 2, 4, 8, … (ℓ only), at most this many evaluations per round.
# The decisions are those of the sequential search: the first acceptable candidate in fit's order.
LOOKAHEAD_BUDGET = 512


def _sequence(score, ai, active, scaled, damping, levels: int, max_step: float):
    """The next ``levels`` damping levels of each dataset's candidate sequence (fit's order):
    steps (O, levels·J, k), ok (O, levels·J), and the damping λ of each level (O, levels)."""
    steps, oks, lambdas = [], [], []
    for _ in range(levels):
        level_steps, level_ok = zip(*candidate_steps(score, ai, active, scaled, damping, max_step))
        steps.append(torch.stack(level_steps, 1))
        oks.append(torch.stack(level_ok, 1))
        lambdas.append(damping)
        damping = stiffened(damping)
    return torch.cat(steps, 1), torch.cat(oks, 1), torch.stack(lambdas, 1)


def _iteration(batch: _Batch, engine: _Engine, state: dict, max_step: float, max_tries: int, tol: float) -> _Iterate:
    """One AI-REML iteration of :func:`reml_fn.fit` for every dataset of ``batch`` (all running).

    Convergence and polishing as in ``fit``; then the line search: each dataset walks its own
    candidate sequence (damping level λ, slot in :func:`~reml_fn.fit.driver.candidate_steps`)
    and takes the first candidate that :func:`~reml_fn.fit.driver.accepts`, evaluating windows of
    that sequence in vmapped calls (see ``LOOKAHEAD_BUDGET``).
    """
    theta, score, ai = state["theta"], state["score"], state["ai"]
    lower, upper, scaled, ll_now = state["lower"], state["upper"], state["scaled"], state["loglik"]
    damping, hint = state["damping"], state["searched"]
    R, k = theta.shape
    J = SLOTS_PER_LEVEL  # corrected below to what candidate_steps yields
    device = theta.device
    pairs = state["pairs"]
    # Held bounds in reduced coordinates, as in fit; the line search runs on this system.
    active, score_r, ai_r, boundary = boundary_system(theta, score, ai, lower, upper, pairs)
    step_now, decrement, solvable = ai_direction(score_r, ai_r, active)
    polishing = solvable & (decrement < tol)
    searching = solvable & ~polishing
    status = torch.where(solvable, RUNNING, 5)
    status = torch.where(polishing, 0, status)  # converged; the polishing step moves them or not

    level = torch.zeros(R, dtype=torch.long, device=device)  # damping levels already exhausted
    position = torch.zeros(R, dtype=torch.long, device=device)  # next slot within the level
    searched = torch.zeros(R, dtype=torch.long, device=device)  # candidates evaluated so far
    moved = torch.zeros(R, dtype=torch.bool, device=device)
    new_theta = theta.clone()
    new_ll, new_score, new_ai = ll_now.clone(), score.clone(), ai.clone()
    needs_terms = torch.zeros(R, dtype=torch.bool, device=device)
    # Terminates: every round, each open dataset evaluates a candidate or passes a damping level.
    for round_ in itertools.count():
        open_ = torch.nonzero(searching & ~moved).flatten()
        polish = torch.nonzero(polishing).flatten() if round_ == 0 else open_[:0]
        if open_.numel() == 0 and polish.numel() == 0:
            break
        share = max(1, LOOKAHEAD_BUDGET // max(1, open_.numel()))
        if round_ == 0:
            window = hint[open_].clamp(1, share)
        else:
            window = torch.full_like(open_, min(2**round_, share))
        # Damping levels spanned by each window (from its position in the current level); a window
        # short of eligible candidates there resumes at the next level in the next round.
        span = int((position[open_] + window).max()) if open_.numel() else 1
        levels = min(max_tries, -(-span // J))
        steps, oks, lambdas = _sequence(
            score_r[open_], ai_r[open_], active[open_], scaled[open_], damping[open_], levels, max_step
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
        proposals = propose(theta[who], steps[rows, cols], lower[who], upper[who], pairs, boundary[who])
        polished = propose(theta[polish], step_now[polish], lower[polish], upper[polish], pairs, boundary[polish])

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
        ok = accepts(values, ll_now[who])

        # Per dataset: the first acceptable candidate of its window (candidates are in order).
        first = torch.full((open_.shape[0],), steps.shape[1], dtype=torch.long, device=device)
        first = first.scatter_reduce(0, rows[ok], cols[ok], reduce="amin")
        found = first < steps.shape[1]
        winner_rows = torch.nonzero(found).flatten()
        table = torch.full(steps.shape[:2], -1, dtype=torch.long, device=device)
        table = table.index_put((rows, cols), torch.arange(rows.shape[0], device=device))
        pick = table[winner_rows, first[winner_rows]]  # index of the winner among the evaluated
        winners = open_[winner_rows]
        moved = _put(moved, winners, torch.ones_like(winners, dtype=torch.bool))
        new_theta = _put(new_theta, winners, proposals[pick])
        damping = _put(damping, winners, relaxed(lambdas[winner_rows, level_of[first[winner_rows]]]))
        searched = _put(searched, winners, searched[winners] + rank[winner_rows, first[winner_rows]] + 1)
        if terms is not None:
            slot_in_terms = torch.full((rows.shape[0],), -1, dtype=torch.long, device=device)
            slot_in_terms = slot_in_terms.index_put((terms_index,), torch.arange(terms_index.shape[0], device=device))
            taken = slot_in_terms[pick]
            direct = taken >= 0
            new_ll = _put(new_ll, winners[direct], terms.loglik[taken[direct]])
            new_score = _put(new_score, winners[direct], terms.score[taken[direct]])
            new_ai = _put(new_ai, winners[direct], terms.ai[taken[direct]])
            needs_terms = _put(needs_terms, winners[~direct], torch.ones_like(winners[~direct], dtype=torch.bool))
        else:
            needs_terms = _put(needs_terms, winners, torch.ones_like(winners, dtype=torch.bool))

        # The others continue after the last candidate they evaluated (or after the levels seen).
        losers = torch.nonzero(~found).flatten()
        if losers.numel():
            lost = open_[losers]
            evaluated_count = chosen[losers].sum(-1)
            searched = _put(searched, lost, searched[lost] + evaluated_count)
            last = torch.where(chosen[losers], order, -1).amax(-1)
            resume = torch.where(evaluated_count < window[losers], torch.full_like(last, steps.shape[1]), last + 1)
            advance = resume // J
            lam = lambdas[losers].gather(1, advance.clamp(max=levels - 1).unsqueeze(1)).squeeze(1)
            damping = _put(damping, lost, torch.where(advance >= levels, stiffened(lam), lam))
            level = _put(level, lost, level[lost] + advance)
            position = _put(position, lost, resume % J)
            gave_up = lost[level[lost] >= max_tries]
            searching = _put(searching, gave_up, torch.zeros_like(gave_up, dtype=torch.bool))
            status = _put(status, gave_up, stalled_status(decrement[gave_up]))

        # Polishing: converged either way, moved only where ℓ did not decrease.
        if polish.numel():
            offset = terms_index.shape[0]
            ok_polish = accepts(terms.loglik[offset:], ll_now[polish])
            moved_polish = polish[ok_polish]
            moved = _put(moved, moved_polish, torch.ones_like(moved_polish, dtype=torch.bool))
            new_theta = _put(new_theta, moved_polish, polished[ok_polish])
            new_ll = _put(new_ll, moved_polish, terms.loglik[offset:][ok_polish])
            new_score = _put(new_score, moved_polish, terms.score[offset:][ok_polish])
            new_ai = _put(new_ai, moved_polish, terms.ai[offset:][ok_polish])
    later = torch.nonzero(needs_terms).flatten()
    if later.numel():
        terms = batch.take(later).map(engine.terms, new_theta[later])
        new_ll = _put(new_ll, later, terms.loglik)
        new_score = _put(new_score, later, terms.score)
        new_ai = _put(new_ai, later, terms.ai)
    return _Iterate(new_theta, new_ll, new_score, new_ai, damping, moved, status, searched)


def _fit_chunk(s_template, batch: _Batch, init_flat, engine: _Engine, max_iter, tol, max_step, max_tries, verbose):
    C, device, dtype = batch.size, batch.Y.device, batch.Y.dtype
    k, p = len(param_names(s_template)), batch.X.shape[-1]

    def filled(*shape):
        return torch.full((C, *shape), math.nan, dtype=dtype, device=device)

    status, residual_variance = _screen(batch, torch.full((C,), RUNNING, dtype=torch.long, device=device))
    state = {"theta": filled(k), "lower": filled(k), "upper": filled(k), "loglik": filled(), "score": filled(k)}
    state["ai"] = filled(k, k)
    good = torch.nonzero(status == RUNNING).flatten()
    if good.numel():
        batch = batch.prepare(engine)
        sub = batch.take(good)
        start = sub.map(engine.start, residual_variance[good]) if init_flat is None else init_flat[good]
        low, up = sub.map(engine.bounds, start)
        first = sub.map(engine.terms, start)
        for key, value in (
            ("theta", start),
            ("lower", low),
            ("upper", up),
            ("loglik", first.loglik),
            ("score", first.score),
            ("ai", first.ai),
        ):
            state[key] = _put(state[key], good, value)
        status = _put(status, good, torch.where(torch.isfinite(first.loglik), RUNNING, 3))
    state["scaled"] = torch.isfinite(state["lower"]) | torch.isfinite(state["upper"])  # as in fit
    pairs = correlation_pairs(s_template)
    state["damping"] = torch.zeros(C, dtype=dtype, device=device)
    state["searched"] = torch.ones(C, dtype=torch.long, device=device)  # line-search length, last iteration
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
        rows = {key: value[running] for key, value in state.items()}
        rows["pairs"] = pairs  # shared by every dataset, not indexed
        step = _iteration(batch.take(running), engine, rows, max_step, max_tries, tol)
        previous = state["theta"]
        for key in ("theta", "loglik", "score", "ai", "damping"):
            state[key] = _put(state[key], running, getattr(step, key))
        state["searched"] = _put(state["searched"], running, step.searched.clamp(min=1))
        n_iter = _put(n_iter, running, n_iter[running] + step.moved.to(torch.long))
        status = _put(status, running, step.status)
        history["step"].append(_put(torch.zeros_like(previous), running, step.theta - previous[running]))
        history["loglik"].append(state["loglik"])
        history["params"].append(state["theta"])
        if bar is not None:
            counts = {"running": int((status == RUNNING).sum()), "converged": int((status == 0).sum())}
            bar.update(1)
            bar.set_postfix(**counts)
            if verbose >= 2:
                bar.write(
                    f"iter {iteration + 1:3d}  running {counts['running']:6d}  converged {counts['converged']:6d}"
                )
    if bar is not None:
        bar.close()
    status = torch.where(status == RUNNING, 1, status)

    # Final quantities at the returned points; datasets never fitted keep NaN estimates.
    theta = state["theta"]
    beta, vcov = filled(p), filled(p, p)
    fitted = torch.nonzero((status <= 2) | (status == 5)).flatten()
    if fitted.numel():
        b_fit, v_fit = batch.take(fitted).map(engine.gls, theta[fitted])
        beta, vcov = _put(beta, fitted, b_fit), _put(vcov, fitted, v_fit)
    params, natural = {}, {}  # a structure without free parameters
    if k:
        params = torch.func.vmap(lambda t: unflatten_params(s_template, t))(theta)
        natural = torch.func.vmap(lambda tree: constrain(s_template, tree))(params)
    return {
        "params": params,
        "natural": natural,
        "beta": beta,
        "vcov_beta": vcov,
        "score": state["score"],
        "ai": state["ai"],
        "loglik": state["loglik"],
        "status": status,
        "at_boundary": (theta <= state["lower"]) | (theta >= state["upper"]) | at_correlation_limit(theta, pairs),
        "n_iter": n_iter,
        "history": {name: torch.stack(rows, 1) for name, rows in history.items()},
    }


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


# ------------------------------------------------------------------------------------------------
# Public entry point


def fit_batched(
    s,
    Y: Tensor,
    X: Tensor,
    init: Mapping | Tensor | None = None,
    *,
    in_dims: Any = None,
    x_names: Sequence[str] | None = None,
    jacobian: str = "closed",
    engine: str = "auto",
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    max_step: float = DEFAULT_MAX_STEP,
    max_tries: int = DEFAULT_MAX_TRIES,
    chunk_size: int | None = None,
    verbose: int = 0,
) -> FitResult:
    r"""Fit y_b ~ N(X_b β_b, V_b(θ_b)) by AI-REML for every dataset b = 0 … B−1 at once.

    Same algorithm, options and defaults as :func:`reml_fn.fit`, dataset by dataset (see the
    module docstring for how the batch runs and for peak memory).

    Args:
        s: the covariance structure V(θ) (n, n), shared by all datasets, except for data leaves
            marked in ``in_dims``.
        Y: responses (B, n), one dataset per row.
        X: fixed-effects design, (n, p) shared (checked once: finite, full column rank; an error
            otherwise) or (B, n, p) per dataset (a dataset with NaN or a rank-deficient X is
            flagged, not an error).
        init: raw starts: a flat tensor (k,) or (B, k) in ``param_names(s)`` order, or a parameter
            tree with 0-d or (B,) leaves; default: :func:`~reml_fn.fit.start.default_init` per dataset.
        in_dims: which data leaves of ``s`` are per dataset, as ``torch.func.vmap``'s in_dims for
            ``s``: None (all shared), an int (every leaf batched along that dimension) or a tree
            shaped like ``s`` with an int or None per leaf; see :func:`stack_structures`.
        x_names: names of X's columns. jacobian, engine, max_iter, tol, max_step, max_tries,
            verbose: as for :func:`reml_fn.fit` (verbose: a progress bar counting running and
            converged datasets; 2 adds a line per iteration).
        chunk_size: fit at most this many datasets at a time (chunks run one after another; peak
            memory ∝ chunk_size, see the module docstring). Results do not depend on it.

    Returns:
        A :class:`FitResult` whose tensor fields have a leading batch dimension: ``loglik`` (B,),
        ``beta`` (B, p), ``vcov_beta`` (B, p, p), ``score`` (B, k), ``ai`` (B, k, k),
        ``converged``/``status``/``n_iter`` (B,), ``at_boundary`` (B, k), ``params``/``natural``
        trees with (B,) leaves, ``history`` entries (B, T), (B, T, k) — row t is the point after t
        accepted steps, repeated once a dataset has stopped (its ``step`` rows are then 0).
        Datasets that could not be fitted have ``converged=False``, a ``status`` code
        (:data:`~reml_fn.fit.result.STATUS`: 3 V not positive definite at the start, 4 NaN/inf in
        its data, 6 y exactly linear in X, 7 its X rank deficient) and NaN estimates.

    Raises:
        ValueError / TypeError before any work for shapes that do not fit (Y not 2-D, X neither
        (n, p) nor (B, n, p), batch sizes that differ, V's size ≠ n, in_dims that do not match
        ``s``), NaN or rank deficiency in a shared X, bad options.

    Example:
        >>> import torch, reml_fn as rf
        >>> g = torch.arange(12) % 3
        >>> s = rf.Sum(group=rf.Grouped(g), residual=rf.Scalar(12))
        >>> Y = torch.stack([torch.linspace(0, 1, 12) + g, torch.full((12,), 7.0)])   # the second is constant
        >>> result = rf.fit_batched(s, Y, torch.ones(12, 1))
        >>> result.converged.tolist(), result.message
        ([True, False], ['converged', 'y is an exact linear function of X (zero residual variance): nothing to estimate'])
    """
    template, dims, spec = _check_batch_inputs(s, Y, X, in_dims, x_names, jacobian, max_iter, max_tries, chunk_size)
    B, n = Y.shape
    p = X.shape[-1]
    names = param_names(template)
    chosen = select_engine(template, engine)
    runner = _Engine(chosen, jacobian)
    init_flat = _initial_flat(template, init, B, len(names), Y.dtype, Y.device)
    batch = _Batch(s, dims, spec, Y, X, X.dim() == 3)
    size = B if chunk_size is None else chunk_size
    parts = []
    # Host loop on small tensors, as in fit: inference mode saves autograd's bookkeeping; the
    # results are cloned out of it below.
    with torch.inference_mode():
        for start in range(0, B, size):
            stop = min(B, start + size)
            part_init = None if init_flat is None else init_flat[start:stop]
            chunk = batch if (start, stop) == (0, B) else batch.slice(start, stop)
            parts.append(_fit_chunk(template, chunk, part_init, runner, max_iter, tol, max_step, max_tries, verbose))
        out = _concatenate(parts)
    out = pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, out)
    loglik, status, vcov = out["loglik"], out["status"], out["vcov_beta"]
    k = len(names)
    return FitResult(
        params=out["params"],
        natural=out["natural"],
        beta=out["beta"],
        vcov_beta=vcov,
        se_beta=torch.sqrt(torch.diagonal(vcov, dim1=-2, dim2=-1)),
        score=out["score"],
        ai=out["ai"],
        loglik=loglik,
        reml_criterion=-2.0 * loglik,
        aic=-2.0 * loglik + 2.0 * (p + k),
        bic=-2.0 * loglik + (p + k) * math.log(n),
        converged=status == 0,
        status=status,
        at_boundary=out["at_boundary"],
        n_iter=out["n_iter"],
        history=out["history"],
        names=tuple(names),
        beta_names=tuple(x_names) if x_names is not None else tuple(f"x{j}" for j in range(p)),
        engine=chosen.name,
        n=n,
        p=p,
    )
