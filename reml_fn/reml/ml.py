"""Maximum likelihood from the REML pieces every engine has (ℓ, score, AI and the GLS fit).

With C = (XᵀV⁻¹X)⁻¹, β̃(θ) = C XᵀV⁻¹y and r = y − Xβ̃:

    ℓ_ML(θ)  = −½ (log|V| + rᵀV⁻¹r + n log 2π) = ℓ_REML(θ) + ½ log|XᵀV⁻¹X| − ½ p log 2π,
    s_ML     = s_REML + ½ ∂ log|XᵀV⁻¹X| / ∂θ,
    AI_ML    = ½ rᵀV⁻¹V̇_iV⁻¹V̇_jV⁻¹r = AI_REML + ½ Bᵀ (XᵀV⁻¹X) B,   B = ∂β̃/∂θ (p × k).

(AI_REML = ½ yᵀPV̇_iPV̇_jPy with Py = V⁻¹r and P = V⁻¹ − V⁻¹XCXᵀV⁻¹; the difference is
½ a_iᵀCa_j with a_j = XᵀV⁻¹V̇_jV⁻¹r, and ∂β̃/∂θ_j = −C a_j.) The two derivatives — of log|XᵀV⁻¹X|
and of β̃ — come from one forward-mode pass (``torch.func.jacfwd``) through the engine's ``gls``,
so every engine fits by ML without ML-specific code, under ``vmap`` too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reml_fn.params import tree_from_names
from reml_fn.reml.dense import AITerms
from reml_fn.reml.engines import prepared_keyword, terms_and_vcov

__all__ = ["ml_from_reml", "ml_terms_and_vcov", "ml_loglik_from_reml", "ml_fit_at"]


def _information_logdet(vcov: Tensor) -> Tensor:
    """log|XᵀV⁻¹X| = −log|C| from C's Cholesky factor (NaN where C is not positive definite)."""
    if vcov.shape[-1] == 0:
        return vcov.new_zeros(())
    factor, info = torch.linalg.cholesky_ex(vcov)
    logdet = -2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)
    return torch.where(info == 0, logdet, math.nan)


def _shift(reml_loglik: Tensor, logdet: Tensor, p: int) -> Tensor:
    # ℓ_REML = −∞ (V not positive definite) stays −∞ rather than becoming NaN.
    value = reml_loglik + 0.5 * logdet - 0.5 * p * math.log(2.0 * math.pi)
    return torch.where(torch.isfinite(reml_loglik), value, reml_loglik)


def ml_fit_at(engine, s, params, y: Tensor, X: Tensor, prepared=None) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ_ML, β̃, C = (XᵀV⁻¹X)⁻¹) at ``params`` (a parameter tree) from ``engine.loglik`` and
    ``engine.gls``. Pure."""
    keyword = prepared_keyword(prepared)
    reml = engine.loglik(s, params, y, X, **keyword)
    beta, vcov = engine.gls(s, params, y, X, **keyword)
    return _shift(reml, _information_logdet(vcov), X.shape[-1]), beta, vcov


def ml_loglik_from_reml(engine, s, params, y: Tensor, X: Tensor, prepared=None) -> Tensor:
    """ℓ_ML at ``params`` (a parameter tree) from ``engine.loglik`` and ``engine.gls``. Pure."""
    return ml_fit_at(engine, s, params, y, X, prepared)[0]


def ml_from_reml(engine, s, names, theta: Tensor, y: Tensor, X: Tensor, jacobian: str = "closed", prepared=None):
    """ML log-likelihood, score, AI matrix and β̂ (an :class:`AITerms`) at the flat raw parameters
    ``theta`` (in ``names`` order), from the engine's REML terms and one ``jacfwd`` of its GLS fit
    (module docstring). Pure and vmappable.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.engines import select_engine
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(8) % 2), e=rf.Scalar(8))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5, 0.5, 3.0]), torch.ones(8, 1)
        >>> names, theta = rf.param_names(s), torch.tensor([0.3, -0.2])
        >>> terms = ml_from_reml(select_engine(s), s, names, theta, y, X)
        >>> grad = torch.func.grad(lambda t: rf.ml_loglik(s, t, y, X))(theta)
        >>> bool(torch.allclose(terms.score, grad))
        True
    """
    return ml_terms_and_vcov(engine, s, names, theta, y, X, jacobian, prepared)[0]


def ml_terms_and_vcov(engine, s, names, theta: Tensor, y: Tensor, X: Tensor, jacobian: str = "closed", prepared=None):
    """:func:`ml_from_reml` and (XᵀV⁻¹X)⁻¹ at the same point (ML and REML share it).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.engines import select_engine
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(8) % 2), e=rf.Scalar(8))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5, 0.5, 3.0]), torch.ones(8, 1)
        >>> names, theta = rf.param_names(s), torch.tensor([0.3, -0.2])
        >>> terms, vcov = ml_terms_and_vcov(select_engine(s), s, names, theta, y, X)
        >>> bool(torch.allclose(vcov, rf.vcov_beta(s, theta, y, X)))
        True
    """
    keyword = prepared_keyword(prepared)
    params = tree_from_names(names, theta.unbind(-1))
    p = X.shape[-1]
    if p == 0 or theta.shape[-1] == 0:
        reml, vcov = terms_and_vcov(engine, s, params, y, X, jacobian, prepared)
        return AITerms(_shift(reml.loglik, reml.loglik.new_zeros(()), p), reml.score, reml.ai, reml.beta), vcov
    reml = engine.ai_terms(s, params, y, X, jacobian, **keyword)

    def fitted(t: Tensor):
        beta, vcov = engine.gls(s, tree_from_names(names, t.unbind(-1)), y, X, **keyword)
        logdet = _information_logdet(vcov)
        return (logdet, beta), (logdet, vcov)

    (logdet_gradient, B), (logdet, vcov) = torch.func.jacfwd(fitted, has_aux=True)(theta)
    # ½ Bᵀ (XᵀV⁻¹X) B through a solve with C, not its inverse.
    factor, _ = torch.linalg.cholesky_ex(vcov)
    weighted = torch.linalg.solve_triangular(factor, B, upper=False)
    correction = 0.5 * weighted.mT @ weighted
    terms = AITerms(
        _shift(reml.loglik, logdet, p),
        reml.score + 0.5 * logdet_gradient,
        reml.ai + correction,
        reml.beta,
    )
    return terms, vcov
