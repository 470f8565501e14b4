"""``fit``: AI-REML iterations with step control, boundaries and honest convergence.

Each iteration at θ (raw free parameters) computes the score s and average information AI, then

1. holds *active* parameters: those at a bound whose score points outward (a variance at its
   floor with s_k < 0, a correlation at its limit pushing further);
2. solves AI_ff Δ_f = s_f for the others (the AI-REML / Fisher-scoring direction) and measures
   the Newton decrement d = s_fᵀ Δ_f (≈ twice the log-likelihood still to gain);
3. stops as converged when d < ``tol``;
4. otherwise caps the step (max |Δ| ≤ ``max_step``), clamps θ + tΔ to the bounds and halves t
   until the log-likelihood does not decrease (and V stays positive definite).

The returned parameters, β̂, log-likelihood, score and AI all belong to the same point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from reml_fn.fit.result import FitResult
from reml_fn.fit.start import check_inputs, default_init, raw_bounds
from reml_fn.params import as_params, constrain, flatten_params, param_names, unflatten_params
from reml_fn.reml.engines import select_engine

__all__ = ["fit", "ai_direction"]


def ai_direction(score: Tensor, ai: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Solve AI_ff Δ_f = s_f with the active parameters held (Δ = 0 there). Pure.

    Returns ``(delta, decrement, ok)``; ``ok`` is False when the reduced AI is singular.
    The active rows/columns are replaced by identity rows, so the system keeps its size and the
    function works under ``vmap`` with a different active set per dataset.
    """
    free = (~active).to(score.dtype)
    eye = torch.eye(score.shape[-1], dtype=score.dtype, device=score.device)
    reduced = ai * free.unsqueeze(-1) * free.unsqueeze(-2) + eye * (1.0 - free).unsqueeze(-1)
    delta, info = torch.linalg.solve_ex(reduced, (score * free).unsqueeze(-1))
    delta = delta.squeeze(-1) * free
    ok = (info == 0) & torch.isfinite(delta).all(-1)
    delta = torch.where(ok.unsqueeze(-1), delta, torch.zeros_like(delta))
    return delta, (score * delta).sum(-1), ok


def _active(theta, score, lower, upper):
    return ((theta <= lower) & (score < 0)) | ((theta >= upper) & (score > 0))


def fit(
    s,
    y: Tensor,
    X: Tensor,
    init: Mapping | Tensor | None = None,
    *,
    x_names: Sequence[str] | None = None,
    jacobian: str = "closed",
    engine: str = "auto",
    max_iter: int = 200,
    tol: float = 1e-10,
    max_step: float = 3.0,
    max_halvings: int = 30,
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
        max_step: cap on max |Δθ| per iteration (raw scale). max_halvings: line-search halvings.
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
    check_inputs(s, y, X, x_names)
    names = param_names(s)
    chosen = select_engine(s, engine)
    if init is None:
        theta = default_init(s, y, X, jacobian)
    else:
        theta = flatten_params(s, as_params(s, init)).to(dtype=y.dtype, device=y.device)
    lower, upper = raw_bounds(s, theta)

    def loglik(t: Tensor) -> Tensor:
        return chosen.loglik(s, unflatten_params(s, t), y, X)

    def terms(t: Tensor):
        return chosen.ai_terms(s, unflatten_params(s, t), y, X, jacobian)

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
    for _ in range(max_iter):
        active = _active(theta, current.score, lower, upper)
        delta, decrement, ok = ai_direction(current.score, current.ai, active)
        if not bool(ok):
            status = 5
            break
        if float(decrement) < tol:
            status = 0
            break
        largest = float(delta.abs().max())
        step = min(1.0, max_step / largest) if largest > 0 else 1.0
        accepted = None
        ll_now = float(current.loglik)
        for _ in range(max_halvings):
            candidate = torch.clamp(theta + step * delta, lower, upper)
            ll_candidate = float(loglik(candidate))
            # Round-off allowance: near the optimum the log-likelihood is flat to ~1e-13 relative.
            if math.isfinite(ll_candidate) and ll_candidate >= ll_now - 1e-11 * (1.0 + abs(ll_now)):
                accepted = candidate
                break
            step *= 0.5
        if accepted is None:
            status = 2
            break
        history_step.append(accepted - theta)
        theta = accepted
        current = terms(theta)
        history_ll.append(current.loglik)
        history_theta.append(theta)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loglik=f"{float(current.loglik):.6f}")
            if verbose >= 2:
                bar.write(
                    f"iter {len(history_ll) - 1:3d}  logLik {float(current.loglik):.8f}  "
                    f"|score| {float(current.score.abs().max()):.3e}  step {step:.3g}  "
                    f"decrement {float(decrement):.3e}"
                )
    if bar is not None:
        bar.close()

    params = unflatten_params(s, theta)
    beta, vcov = chosen.gls(s, params, y, X)
    loglik_value = current.loglik
    k, n, p = len(names), y.shape[0], X.shape[1]
    at_boundary = (theta <= lower) | (theta >= upper)
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
        converged=torch.tensor(status == 0),
        status=torch.tensor(status),
        at_boundary=at_boundary,
        n_iter=torch.tensor(len(history_ll) - 1),
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
