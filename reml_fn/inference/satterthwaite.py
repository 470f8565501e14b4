"""Satterthwaite's denominator degrees of freedom for linear combinations of β̂ (lmerTest's
``ddf = "Satterthwaite"``), with exact derivatives from ``torch.func``.

For a contrast l (p,), with C(θ) = (XᵀV(θ)⁻¹X)⁻¹ the covariance of β̂ and A the asymptotic
covariance of θ̂ (the inverse of the observed REML information, −∇²ℓ(θ̂)):

    var_l = lᵀ C(θ̂) l,   g_j = lᵀ (∂C/∂θ_j) l,   ν_l = 2 var_l² / (gᵀ A g).

ν is the same in any parametrisation of θ (g and A transform together at a stationary point), so
the raw parameters of the fit serve; lmerTest differentiates numerically in lme4's θ and σ, this
module exactly (``jacrev`` of C, ``hessian`` of ℓ, through the fit's engine). A joint test of a
q × p matrix L (lmerTest's ``contestMD``) rotates L C Lᵀ to its eigenvectors and combines the q
one-dimensional ν_m: F = Σ_m (p_mᵀLβ̂)²/(d_m q), ν = 2E/(E − q), E = Σ ν_m/(ν_m − 2) (ν = 2
when some ν_m ≤ 2; ν_1 when q = 1).

Parameters at a bound (a variance at its floor, a correlation at ±1) are held: they are left out of
A and g, as their derivative directions are not free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.params import tree_from_names
from reml_fn.reml.engines import select_engine
from reml_fn.reml.ml import ml_loglik_from_reml

__all__ = ["VarianceDerivatives", "variance_derivatives", "contrast_df", "joint_df"]


class VarianceDerivatives(NamedTuple):
    """What every Satterthwaite computation of one fit shares: β̂ (p,), C = cov(β̂) (p, p),
    ∂C/∂θ (p, p, k) and A = cov(θ̂) (k, k), both over the parameters not at a bound."""

    beta: Tensor
    vcov: Tensor
    vcov_gradient: Tensor
    theta_covariance: Tensor


def variance_derivatives(
    s,
    names: Sequence[str],
    theta: Tensor,
    y: Tensor,
    X: Tensor,
    held: Tensor | None = None,
    engine: str = "auto",
    reml: bool = True,
) -> VarianceDerivatives:
    """β̂, C, ∂C/∂θ and A = (−∇²ℓ)⁻¹ at the raw parameters ``theta`` (in ``names`` order) of a fit
    (ℓ the REML log-likelihood, or the ML one when not ``reml``); ``held`` (k,) flags parameters at
    a bound (left out). Pure; derivatives by ``torch.func``.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(8) % 2), e=rf.Scalar(8))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5, 0.5, 3.0]), torch.ones(8, 1)
        >>> fit = rf.fit(s, y, X)
        >>> parts = variance_derivatives(s, fit.names, torch.stack([fit.params["g"]["cov"]["sigma^2"], fit.params["e"]["sigma^2"]]), y, X)
        >>> parts.vcov_gradient.shape, parts.theta_covariance.shape
        (torch.Size([1, 1, 2]), torch.Size([2, 2]))
    """
    chosen = select_engine(s, engine)
    names = list(names)
    k = theta.shape[-1]
    free = torch.ones(k, dtype=torch.bool) if held is None else ~held.to(torch.bool).cpu()
    index = torch.nonzero(free).flatten().to(theta.device)

    def with_free(values: Tensor) -> Tensor:
        return theta.index_put((index,), values)

    def loglik(values: Tensor) -> Tensor:
        params = tree_from_names(names, with_free(values).unbind(-1))
        return chosen.loglik(s, params, y, X) if reml else ml_loglik_from_reml(chosen, s, params, y, X)

    def vcov(values: Tensor) -> Tensor:
        return chosen.gls(s, tree_from_names(names, with_free(values).unbind(-1)), y, X)[1]

    start = theta[index]
    beta, C = chosen.gls(s, tree_from_names(names, theta.unbind(-1)), y, X)
    gradient = torch.func.jacrev(vcov)(start)  # (p, p, k_free)
    information = -torch.func.hessian(loglik)(start)
    information = 0.5 * (information + information.mT)
    return VarianceDerivatives(beta, C, gradient, torch.linalg.inv(information))


def contrast_df(parts: VarianceDerivatives, L: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each row l of ``L`` (q, p): the estimate lᵀβ̂, its variance lᵀCl and Satterthwaite's ν.

    Example:
        >>> import torch
        >>> parts = VarianceDerivatives(torch.tensor([2.0]), torch.tensor([[4.0]]), torch.tensor([[[8.0]]]), torch.tensor([[0.5]]))
        >>> [t.tolist() for t in contrast_df(parts, torch.eye(1))]   # ν = 2·16/(8·0.5·8)
        [[2.0], [4.0], [1.0]]
    """
    L = L.to(parts.vcov.dtype)
    estimate = L @ parts.beta
    variance = torch.einsum("qa,ab,qb->q", L, parts.vcov, L)
    g = torch.einsum("qa,abk,qb->qk", L, parts.vcov_gradient, L)
    denominator = torch.einsum("qk,kj,qj->q", g, parts.theta_covariance, g)
    return estimate, variance, 2.0 * variance**2 / denominator


def joint_df(parts: VarianceDerivatives, L: Tensor, tol: float = 1e-8) -> tuple[float, int, float]:
    """The F statistic of H₀: Lβ = 0 for ``L`` (q, p) of full row rank, q, and its Satterthwaite
    denominator df (lmerTest's ``contestMD``; module docstring).

    Example:
        >>> import torch
        >>> parts = VarianceDerivatives(torch.tensor([2.0]), torch.tensor([[4.0]]), torch.tensor([[[8.0]]]), torch.tensor([[0.5]]))
        >>> joint_df(parts, torch.eye(1))     # F = 2²/4, ν as for one contrast
        (1.0, 1, 1.0)
    """
    L = L.to(parts.vcov.dtype)
    q = L.shape[0]
    values, vectors = torch.linalg.eigh(L @ parts.vcov @ L.mT)
    rotated = vectors.mT @ L  # rows p_mᵀL
    estimate, _, nu = contrast_df(parts, rotated)
    F = float((estimate**2 / values).sum()) / q
    if q == 1:
        return F, q, float(nu[0])
    if bool(((nu[1:] - nu[:-1]).abs() < tol).all()):
        return F, q, float(nu.mean())
    if bool((nu <= 2).any()):
        return F, q, 2.0
    E = float((nu / (nu - 2)).sum())
    return F, q, 2.0 * E / (E - q)
