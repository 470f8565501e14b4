"""``fit``: AI-REML for one dataset — a batch of one through the same algorithm as
``fit_batched`` (:func:`reml_fn.fit.algorithm.solve`, decisions in :mod:`reml_fn.fit.step`).

The differences from ``fit_batched`` are in the words only: ``y`` is (n,), the result has no batch
axis, and a dataset that cannot be fitted (NaN in y, y exactly linear in X, V not positive
definite at the start) is an error with a message instead of a status code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from reml_fn.fit.algorithm import solve
from reml_fn.fit.problem import check_reml
from reml_fn.fit.result import OVERFLOW, STATUS, FitResult
from reml_fn.fit.step import DEFAULT_MAX_ITER, DEFAULT_MAX_STEP, DEFAULT_MAX_TRIES, DEFAULT_TOL, Options
from reml_fn.reml.likelihood import check_data

__all__ = ["fit"]


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
    REML: bool = True,  # noqa: N803  (lme4's name)
) -> FitResult:
    """Fit the REML linear mixed model y ~ N(Xβ, V(θ)) by AI-REML.

    Args:
        s: the covariance structure of y, V(θ) (n, n).
        y: response (n,). X: fixed-effects design (n, p), full column rank.
        init: raw starting parameters (tree or flat tensor); default: variance components at
            equal shares of the OLS residual variance, correlations at 0.1 (``fit.start``); for
            grouped models with a Scalar residual, their MIVQUE(0) moment estimates where they lie
            well inside the parameter space (``reml.moments``; on balanced data the ANOVA
            estimates, and sleepstudy's REML estimates).
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
        REML: True (default) maximises the REML log-likelihood (:func:`~reml_fn.reml_loglik`);
            False the ML log-likelihood (:func:`~reml_fn.ml_loglik`, lme4's ``REML = FALSE``), with
            the same algorithm and the ML average-information matrix (:mod:`reml_fn.reml.ml`).

    Returns:
        A :class:`FitResult`; ``print(result)`` shows an lme4-style summary.

    Raises:
        ValueError / TypeError before any iteration for NaN/inf data, shape mismatches,
        rank-deficient X (naming the columns), NaN in a structure's data (naming the term),
        parameter trees that do not match ``s``, a starting point where V is not positive
        definite (with a hint when no term covers each observation: a forgotten residual), or a
        score that overflows at the start (status 8: rescale y).

    Statuses of the result (:data:`~reml_fn.fit.result.STATUS`): 0 converged (AI positive definite
    on the free parameters, Newton decrement below ``tol`` scaled to the dtype), 1 iteration
    limit, 2 no step gains more than round-off, 5 not identifiable (the message names the
    parameters), 8 overflow during the iterations.

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
    options = Options(max_iter=max_iter, tol=tol, max_step=max_step, max_tries=max_tries)
    check_data(s, y, X)  # shapes and dtypes, in the words of one dataset (y (n,), X (n, p))
    result = solve(
        s,
        y.unsqueeze(0),
        X,
        init,
        in_dims=None,
        x_names=x_names,
        jacobian=jacobian,
        engine=engine,
        options=options,
        chunk_size=None,
        verbose=verbose,
        single=True,
        reml=check_reml(REML),
    )
    code = int(result.status)
    if code in UNFITTABLE or (code == OVERFLOW and int(result.n_iter) == 0):
        raise ValueError(_unfittable_message(code, s, y, X, result))
    return result


# Statuses given before any iteration: fit raises them (fit_batched flags them); so is 8 (overflow)
# at the starting point.
UNFITTABLE = (3, 4, 6, 7)


def _unfittable_message(code: int, s, y: Tensor, X: Tensor, result: FitResult) -> str:
    """The error of ``fit`` for a dataset that the screen flagged, with what is known about it."""
    if code == 4:
        bad = torch.nonzero(~torch.isfinite(y)).flatten().tolist()
        return f"y contains NaN or inf at positions {bad[:10]}{' …' if len(bad) > 10 else ''}"
    if code == 6:
        return f"{STATUS[6]} (up to round-off; e.g. a constant response with an intercept in X)"
    if code == 3:
        names = list(result.names)
        hint = _missing_residual_hint(s, result)
        return (
            f"V is not positive definite at the starting point (log-likelihood {float(result.loglik)}){hint}; "
            f"pass a different init= (raw parameters {names})"
        )
    return STATUS[code]


def _missing_residual_hint(s, result: FitResult) -> str:
    """Why V is singular at the start, when the reason is structural: V has rank below n for
    every θ when no term covers each observation separately (a forgotten residual term)."""
    n = result.n
    if n > 4000:
        return ""
    try:
        V = s.build(result.params)
    except Exception:  # a structure that cannot be built densely: no hint
        return ""
    rank = int(torch.linalg.matrix_rank(V.to(torch.float64)))
    if rank < n:
        return (
            f": V has rank {rank} < n = {n}, as when the model has no residual term "
            f"(add e.g. residual=rf.Scalar({n}) to the Sum)"
        )
    return ""
