"""Kenward–Roger: the adjusted covariance of β̂ and denominator df (pbkrtest's ``vcovAdj`` and
``Lb_ddf``, as lmerTest's ``ddf = "Kenward-Roger"`` uses them), with exact derivatives.

In the linear parametrisation of V — σ = the variances and covariances of every term and the
residual variance, V = Σ_i σ_i G_i — with Φ = (XᵀV⁻¹X)⁻¹ and P the REML projection:

    P_i  = ∂(XᵀV⁻¹X)/∂σ_i = −XᵀV⁻¹G_iV⁻¹X,
    Q_ij = XᵀV⁻¹G_iV⁻¹G_jV⁻¹X,   so ∂²(XᵀV⁻¹X)/∂σ_i∂σ_j = Q_ij + Q_ji,
    W    = (½ tr(P G_i P G_j))⁻¹ = (∇²_σ ℓ_REML(σ; y = 0))⁻¹   (yᵀPy vanishes at y = 0),
    Φ_A  = Φ + 2 Φ [Σ_ij W_ij (Q_ij − P_i Φ P_j)] Φ.

Both second derivatives come from ``torch.func`` through the fit's engine (the natural
parameters of Scalar and Unstructured terms are exactly these σ). For a q × p matrix L, with
Θ = Lᵀ(LΦLᵀ)⁻¹L: A₁ = Σ_ij W_ij tr(ΘΦP_iΦ) tr(ΘΦP_jΦ), A₂ = Σ_ij W_ij tr(ΘΦP_iΦΘΦP_jΦ),
B = (A₁ + 6A₂)/(2q), g = ((q+1)A₁ − (q+4)A₂)/((q+2)A₂), c₁ = g/(3q + 2(1−g)),
c₂ = (q−g)/(3q + 2(1−g)), c₃ = (q+2−g)/(3q + 2(1−g)),
ρ = V*/(2E*²) = ((1 − A₂/q)/(1 − c₂B))² (1 + c₁B)/(q(1 − c₃B)), and ν = 4 + (q+2)/(qρ − 1)
(pbkrtest's Lb_ddf).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.params import tree_from_names, unconstrain
from reml_fn.reml.engines import select_engine

__all__ = ["KenwardRoger", "kenward_roger", "kenward_roger_df"]


class KenwardRoger(NamedTuple):
    """β̂ (p,), Φ = cov(β̂) (p, p), the adjusted Φ_A (p, p), P (k, p, p) and W (k, k)."""

    beta: Tensor
    vcov: Tensor
    vcov_adjusted: Tensor
    P: Tensor
    W: Tensor


def kenward_roger(s, names: Sequence[str], natural: Tensor, y: Tensor, X: Tensor, engine: str = "auto") -> KenwardRoger:
    """Φ, Φ_A, P_i and W at the natural (variance–covariance) parameters ``natural`` (in ``names``
    order) of a REML fit whose V is linear in them (Scalar and Unstructured terms, a Scalar
    residual: every formula model). Pure; derivatives by ``torch.func``.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(8) % 2), e=rf.Scalar(8))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5, 0.5, 3.0]), torch.ones(8, 1)
        >>> parts = kenward_roger(s, rf.param_names(s), torch.tensor([0.5, 1.0]), y, X)
        >>> parts.P.shape, parts.W.shape, bool(torch.allclose(parts.vcov_adjusted, parts.vcov))  # balanced: Φ_A = Φ
        (torch.Size([2, 1, 1]), torch.Size([2, 2]), True)
    """
    chosen = select_engine(s, engine)
    names = list(names)

    def params(sigma: Tensor) -> dict:
        return unconstrain(s, tree_from_names(names, sigma.unbind(-1)))

    def information(sigma: Tensor) -> Tensor:  # XᵀV⁻¹X
        return torch.linalg.inv(chosen.gls(s, params(sigma), y, X)[1])

    def restricted(sigma: Tensor) -> Tensor:  # ℓ_REML at y = 0: −½(log|V| + log|XᵀV⁻¹X|) − c
        return chosen.loglik(s, params(sigma), torch.zeros_like(y), X)

    beta, Phi = chosen.gls(s, params(natural), y, X)
    P = torch.func.jacrev(information)(natural).movedim(-1, 0)  # (k, p, p)
    H = torch.func.jacfwd(torch.func.jacrev(information))(natural)  # (p, p, k, k) = Q_ij + Q_ji
    expected = torch.func.hessian(restricted)(natural)
    W = torch.linalg.inv(0.5 * (expected + expected.mT))
    U = 0.5 * torch.einsum("ij,abij->ab", W, H) - torch.einsum("ij,iab,bc,jcd->ad", W, P, Phi, P)
    adjusted = Phi + 2.0 * Phi @ U @ Phi
    return KenwardRoger(beta, Phi, 0.5 * (adjusted + adjusted.mT), P, W)


def kenward_roger_df(parts: KenwardRoger, L: Tensor) -> float:
    """pbkrtest's ``Lb_ddf``: the Kenward–Roger denominator df of H₀: Lβ = 0 for ``L`` (q, p) of
    full row rank (module docstring).

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(8) % 2), e=rf.Scalar(8))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5, 0.5, 3.0]), torch.ones(8, 1)
        >>> parts = kenward_roger(s, rf.param_names(s), torch.tensor([0.5, 1.0]), y, X)
        >>> round(kenward_roger_df(parts, torch.eye(1)), 6)   # balanced one-way: m − 1 = 1
        1.0
    """
    L = L.to(parts.vcov.dtype)
    q = L.shape[0]
    Phi = parts.vcov
    Theta = L.mT @ torch.linalg.solve(L @ Phi @ L.mT, L)
    u = Theta @ Phi @ parts.P @ Phi  # (k, p, p): ΘΦP_iΦ
    traces = torch.diagonal(u, dim1=-2, dim2=-1).sum(-1)
    A1 = float(traces @ parts.W @ traces)
    A2 = float(torch.einsum("ij,iab,jba->", parts.W, u, u))
    B = (A1 + 6.0 * A2) / (2.0 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    denominator = 3.0 * q + 2.0 * (1.0 - g)
    c1, c2, c3 = g / denominator, (q - g) / denominator, (q + 2 - g) / denominator
    v0 = 1.0 + c1 * B
    v0 = 0.0 if abs(v0) < 1e-10 else v0
    v1, v2 = 1.0 - c2 * B, 1.0 - c3 * B
    rho = ((1.0 - A2 / q) / v1) ** 2 * v0 / (q * v2) if v1 != 0 else 0.0  # V*/(2E*²)
    return 4.0 + (q + 2.0) / (q * rho - 1.0)
