"""Public pure REML functions: ``reml_loglik``, ``ai_terms`` and post-estimation.

All are pure functions of ``(s, params, y, X)``: they compose with ``torch.func.grad`` (w.r.t.
params) and ``torch.func.vmap`` (over y, X, params or the structure's data leaves). They validate
shapes (static) but never values, so a dataset that makes V singular gives ℓ = −∞ rather than
raising inside a batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from reml_fn.params import as_params, flatten_params, param_names
from reml_fn.reml.dense import AITerms
from reml_fn.reml.engines import select_engine
from reml_fn.reml.ml import ml_from_reml, ml_loglik_from_reml

__all__ = [
    "reml_loglik",
    "ml_loglik",
    "ai_terms",
    "ml_ai_terms",
    "blue",
    "vcov_beta",
    "blup",
    "predict",
    "residuals",
    "check_data",
]


def check_data(s, y: Tensor, X: Tensor) -> None:
    """Shape and type checks of y (n,), X (n, p) against V's shape (n, n)."""
    if not isinstance(y, Tensor) or not isinstance(X, Tensor):
        raise TypeError(f"y and X must be tensors, got {type(y).__name__} and {type(X).__name__}")
    if y.dim() != 1:
        raise ValueError(f"y must be a 1-D tensor (n,), got shape {tuple(y.shape)}")
    if X.dim() != 2:
        raise ValueError(f"X must be a 2-D tensor (n, p), got shape {tuple(X.shape)}")
    n = y.shape[0]
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but y has {n} elements")
    if tuple(s.shape) != (n, n):
        raise ValueError(f"the structure builds a {tuple(s.shape)} matrix but y has {n} elements")
    if X.shape[1] >= n:
        raise ValueError(f"REML needs more observations than fixed effects, got n={n}, p={X.shape[1]}")
    if not y.is_floating_point() or not X.is_floating_point():
        raise TypeError(f"y and X must be floating point, got {y.dtype} and {X.dtype}")
    if y.dtype != X.dtype:
        raise TypeError(f"y and X must share a dtype, got {y.dtype} and {X.dtype}")


def _prepare(s, params, y, X):
    check_data(s, y, X)
    return as_params(s, params)


def reml_loglik(s, params: Mapping | Tensor | None, y: Tensor, X: Tensor, engine: str = "auto") -> Tensor:
    """The REML log-likelihood (lme4's ``logLik``; REML criterion = −2 ×):

        ℓ(θ) = −½ (log|V| + log|XᵀV⁻¹X| + yᵀPy) − (n − p)/2 · log 2π,
        P = V⁻¹ − V⁻¹X (XᵀV⁻¹X)⁻¹ XᵀV⁻¹.

    Args:
        s: the covariance structure of y, shape (n, n).
        params: raw free parameters (tree, flat tensor, or None for the defaults).
        y: response (n,). X: fixed-effects design (n, p), full column rank.
        engine: ``"auto"``, ``"dense"`` or a registered engine name.

    Returns:
        A 0-d tensor; −∞ where V(θ) is not positive definite.

    Example:
        >>> import torch, reml_fn as rf
        >>> y = torch.tensor([1.0, 2.0, 4.0, 3.0]); X = torch.ones(4, 1)
        >>> round(float(rf.reml_loglik(rf.Scalar(4), None, y, X)), 6)   # σ² = 1
        -5.949963
    """
    params = _prepare(s, params, y, X)
    return select_engine(s, engine).loglik(s, params, y, X)


def ml_loglik(s, params: Mapping | Tensor | None, y: Tensor, X: Tensor, engine: str = "auto") -> Tensor:
    """The (maximum-likelihood) log-likelihood at the GLS estimate β̃(θ) (lme4's ``logLik`` of a
    ``REML = FALSE`` fit; deviance = −2 ×):

        ℓ_ML(θ) = −½ (log|V| + (y − Xβ̃)ᵀV⁻¹(y − Xβ̃)) − n/2 · log 2π
                = ℓ_REML(θ) + ½ log|XᵀV⁻¹X| − p/2 · log 2π.

    Pure like :func:`reml_loglik` (``grad``, ``vmap``); −∞ where V(θ) is not positive definite.

    Example:
        >>> import torch, reml_fn as rf
        >>> y = torch.tensor([1.0, 2.0, 4.0, 3.0]); X = torch.ones(4, 1)
        >>> r = y - y.mean()                                  # σ² = 1: −½ (rᵀr + 4 log 2π)
        >>> bool(torch.isclose(rf.ml_loglik(rf.Scalar(4), None, y, X), -0.5 * (r @ r + 4 * torch.log(torch.tensor(2 * torch.pi)))))
        True
    """
    params = _prepare(s, params, y, X)
    return ml_loglik_from_reml(select_engine(s, engine), s, params, y, X)


def ml_ai_terms(
    s, params: Mapping | Tensor | None, y: Tensor, X: Tensor, jacobian: str = "closed", engine: str = "auto"
) -> AITerms:
    """ML log-likelihood, score (= ``torch.func.grad`` of :func:`ml_loglik`), average-information
    matrix AI_ML = ½ rᵀV⁻¹V̇_iV⁻¹V̇_jV⁻¹r (r = y − Xβ̃) and β̃ at θ, from the engine's REML terms
    (:mod:`reml_fn.reml.ml`).

    Example:
        >>> import torch, reml_fn as rf
        >>> y = torch.tensor([1.0, 2.0, 4.0, 3.0]); X = torch.ones(4, 1)
        >>> terms = rf.ml_ai_terms(rf.Scalar(4), None, y, X)     # V = σ²I, θ = ½ log σ² = 0
        >>> round(float(terms.score[0]), 6), round(float(terms.ai[0, 0]), 6)   # rᵀr − n, 2 rᵀr
        (1.0, 10.0)
    """
    params = _prepare(s, params, y, X)
    theta = flatten_params(s, params)
    return ml_from_reml(select_engine(s, engine), s, param_names(s), theta, y, X, jacobian)


def ai_terms(
    s,
    params: Mapping | Tensor | None,
    y: Tensor,
    X: Tensor,
    jacobian: str = "closed",
    engine: str = "auto",
    trace: str = "exact",
    generator: torch.Generator | None = None,
    probes: int | None = None,
) -> AITerms:
    """Log-likelihood, score, average-information matrix and β̂ at θ (raw free parameters):

        s_k = ½ (yᵀP V̇_k P y − tr(P V̇_k)),   AI_kj = ½ yᵀP V̇_k P V̇_j P y,   V̇_k = ∂V/∂θ_k.

    The score equals ``torch.func.grad`` of :func:`reml_loglik`; AI is symmetric PSD.

    Args:
        jacobian: how V̇ is computed: ``"closed"`` (default), ``"fwd"`` or ``"rev"``.
        trace: ``"exact"`` or ``"hutchpp"`` (stochastic Hutch++ estimate of tr(P V̇_k) for large
            n; pass a ``torch.Generator`` for reproducibility and optionally the probe count).

    Returns:
        ``AITerms(loglik, score (k,), ai (k, k), beta (p,))`` with k in ``param_names(s)`` order.

    Example:
        >>> import torch, reml_fn as rf
        >>> y = torch.tensor([1.0, 2.0, 4.0, 3.0]); X = torch.ones(4, 1)
        >>> terms = rf.ai_terms(rf.Scalar(4), None, y, X)
        >>> round(float(terms.score[0]), 6)   # ½(yᵀPV̇Py − tr PV̇) with V̇ = 2I
        2.0
    """
    params = _prepare(s, params, y, X)
    if trace not in ("exact", "hutchpp"):
        raise ValueError(f"unknown trace method {trace!r}; expected 'exact' or 'hutchpp'")
    return select_engine(s, engine).ai_terms(s, params, y, X, jacobian, trace, generator, probes)


def blue(s, params, y: Tensor, X: Tensor, engine: str = "auto") -> Tensor:
    """β̂ = (XᵀV⁻¹X)⁻¹ XᵀV⁻¹ y, the best linear unbiased estimator (p,).

    Example:
        >>> import torch, reml_fn as rf
        >>> groups = torch.arange(6) % 2
        >>> s = rf.Sum(g=rf.Grouped(groups), residual=rf.Scalar(6))
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]); X = torch.ones(6, 1)
        >>> [round(b, 10) for b in rf.blue(s, None, y, X).tolist()]   # balanced groups: the mean
        [2.5]
    """
    params = _prepare(s, params, y, X)
    return select_engine(s, engine).gls(s, params, y, X)[0]


def vcov_beta(s, params, y: Tensor, X: Tensor, engine: str = "auto") -> Tensor:
    """cov(β̂) = (XᵀV⁻¹X)⁻¹ (p, p).

    Example:
        >>> import torch, reml_fn as rf
        >>> groups = torch.arange(6) % 2
        >>> s = rf.Sum(g=rf.Grouped(groups), residual=rf.Scalar(6))
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]); X = torch.ones(6, 1)
        >>> round(float(rf.vcov_beta(s, None, y, X)), 6)   # (σ_g² + σ²/3)/2 at σ² = σ_g² = 1
        0.666667
    """
    params = _prepare(s, params, y, X)
    return select_engine(s, engine).gls(s, params, y, X)[1]


def blup(s, params, y: Tensor, X: Tensor, engine: str = "auto") -> dict[str, Tensor]:
    """Best linear unbiased predictors of the random effects, one entry per named term:

        û_i = G_i Z_iᵀ V⁻¹ (y − Xβ̂)   for every term Z_i G_i Z_iᵀ of V (Propagate or Grouped).

    Returns a dict keyed by the term's path (``{"gen": û_gen, "block": û_block}``): (q,) for a
    Propagate term, (m, k) for a Grouped term (lme4's ``ranef`` layout).

    Example:
        >>> import torch, reml_fn as rf
        >>> groups = torch.arange(6) % 2
        >>> s = rf.Sum(g=rf.Grouped(groups), residual=rf.Scalar(6))
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]); X = torch.ones(6, 1)
        >>> [round(u, 10) for u in rf.blup(s, None, y, X)["g"].flatten().tolist()]  # shrunken means − 2.5
        [-0.75, 0.75]
    """
    params = _prepare(s, params, y, X)
    return select_engine(s, engine).random_effects(s, params, y, X)


def predict(s, params, y: Tensor, X: Tensor, conditional: bool = False, engine: str = "auto") -> Tensor:
    """Fitted values: marginal Xβ̂, or conditional Xβ̂ + Σ_i Z_i û_i.

    Example:
        >>> import torch, reml_fn as rf
        >>> groups = torch.arange(6) % 2
        >>> s = rf.Sum(g=rf.Grouped(groups), residual=rf.Scalar(6))
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]); X = torch.ones(6, 1)
        >>> [round(f, 10) for f in rf.predict(s, None, y, X, conditional=True).tolist()]
        [1.75, 3.25, 1.75, 3.25, 1.75, 3.25]
    """
    params = _prepare(s, params, y, X)
    chosen = select_engine(s, engine)
    fitted = X @ chosen.gls(s, params, y, X)[0]
    if conditional:
        fitted = fitted + chosen.fitted_random(s, params, y, X)
    return fitted


def residuals(s, params, y: Tensor, X: Tensor, conditional: bool = False, engine: str = "auto") -> Tensor:
    """y − :func:`predict` (marginal or conditional).

    Example:
        >>> import torch, reml_fn as rf
        >>> groups = torch.arange(6) % 2
        >>> s = rf.Sum(g=rf.Grouped(groups), residual=rf.Scalar(6))
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]); X = torch.ones(6, 1)
        >>> [round(r, 10) for r in rf.residuals(s, None, y, X).tolist()]
        [-1.5, 0.5, -0.5, 1.5, -1.0, 1.0]
    """
    return y - predict(s, params, y, X, conditional=conditional, engine=engine)
