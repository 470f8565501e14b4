r"""``fit_batched``: the same REML model fitted to B datasets at once, one bad dataset spoiling nothing.

Datasets b = 1 … B share the structure of V(θ) and differ in the response y_b (rows of Y), and
optionally in X (a (B, n, p) tensor) and in data leaves of the structure (a different Z per
dataset, selected with ``in_dims`` exactly as ``torch.func.vmap`` does). Each dataset gets its own
θ_b, found by the *same* AI-REML iterations as :func:`reml_fn.fit` — one implementation of the
start, bounds, steps, acceptance, damping and polishing — so every dataset ends at the point
``fit`` reaches for it alone (to round-off: the batched linear algebra may differ in the last bits).

How it runs: :func:`reml_fn.fit.algorithm.solve`, the same scheduler as ``fit`` (which is a batch of
one), over the pure decisions of :mod:`reml_fn.fit.step`. Datasets that cannot be fitted are
flagged before any work and never enter the computation (``status``): NaN/inf in y, in a
per-dataset X or in per-dataset structure data (4), V not positive definite at the start (3), y an
exact linear function of X, e.g. constant (6), a rank-deficient per-dataset X (7).

**Memory.** A chunk of C datasets (``chunk_size``; default all B) holds, per engine call, roughly

* dense engine: C·(k + 7)·n² floats — V, its factor, L⁻¹, the projector and P, and the k
  derivative matrices dV/dθ (k·n² once, not C·k·n², when the structure is shared);
* MME engine (Grouped/Propagate terms + Scalar/Diagonal residual): per dataset its statistics,
  C·(n + m·k·(k + d + 1) + d² + d) floats with d = q_rest + p dense columns and m groups of k
  effects of the blocked term, and the blocks of one call, O(C·(m·k·d + d²)); nothing of size n²
  (a Diagonal residual also forms C·c₁·n·(K + d) work floats per call, K = k + 1, c₁ ≈ 6) —
  sleepstudy (n = 180, m = 18, k = 2, p = 2) measured ≈ 20 KB per dataset with results and
  history;

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

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from reml_fn.fit.algorithm import solve
from reml_fn.fit.problem import check_reml, dataset_structure, stack_structures
from reml_fn.fit.result import FitResult
from reml_fn.fit.step import DEFAULT_MAX_ITER, DEFAULT_MAX_STEP, DEFAULT_MAX_TRIES, DEFAULT_TOL, Options

__all__ = ["fit_batched", "stack_structures", "dataset_structure"]


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
    REML: bool = True,  # noqa: N803  (lme4's name)
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
            tree with 0-d or (B,) leaves; default: per dataset, as ``fit``'s (moment estimates of a
            grouped model where they lie well inside, :func:`~reml_fn.fit.start.default_init`
            otherwise).
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
        its data, 6 y exactly linear in X, 7 its X rank deficient, 8 the score overflowed) and NaN
        estimates (8 at the start) or the last point (1 iteration limit, 2 failed line search,
        5 not identifiable, 8 later), as :func:`reml_fn.fit` reports them.

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
    options = Options(max_iter=max_iter, tol=tol, max_step=max_step, max_tries=max_tries)
    return solve(
        s,
        Y,
        X,
        init,
        in_dims=in_dims,
        x_names=x_names,
        jacobian=jacobian,
        engine=engine,
        options=options,
        chunk_size=chunk_size,
        verbose=verbose,
        reml=check_reml(REML),
    )
