"""The dense REML engine: any V(θ), Cholesky of the full n×n matrix.

Model: y = Xβ + ε, ε ~ N(0, V(θ)), y (n,), X (n, p) of full column rank. With
P = V⁻¹ − V⁻¹X (XᵀV⁻¹X)⁻¹ XᵀV⁻¹ and β̂ = (XᵀV⁻¹X)⁻¹ XᵀV⁻¹y, the REML log-likelihood is

    ℓ(θ) = −½ (log|V| + log|XᵀV⁻¹X| + yᵀPy) − (n − p)/2 · log 2π,

lme4's ``logLik`` (REML criterion = −2ℓ). Score and average information (Gilmour, Thompson &
Cullis 1995) with respect to the raw parameters θ_k, V̇_k = ∂V/∂θ_k:

    s_k = ½ (yᵀP V̇_k P y − tr(P V̇_k)),      AI_kj = ½ yᵀP V̇_k P V̇_j P y.

Everything is computed from L = chol(V) with ``cholesky_ex`` (no jitter is added to V); when V is
not positive definite ℓ is −∞ (and the score and AI are NaN), never an exception, so these
functions can run under ``vmap`` over datasets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.jacobian import autodiff_transform
from reml_fn.params import get_path, param_names

__all__ = [
    "AITerms",
    "DenseFactor",
    "factorize",
    "loglik_from_factor",
    "reml_loglik_dense",
    "ai_terms_dense",
    "dV_stack",
    "hutchpp_traces",
]


def inverse_from_cholesky(L: Tensor) -> Tensor:
    """A⁻¹ from the lower Cholesky factor L of A (…, p, p), as ``cholesky_solve(I, L)``.

    Why not ``torch.cholesky_inverse``: its forward-mode derivative is wrong (torch 2.13:
    ``torch.func.jacfwd`` of ``cholesky_inverse(cholesky(A(t)))`` differs from that of ``inv(A(t))``,
    while reverse mode agrees), and the ML terms differentiate (XᵀV⁻¹X)⁻¹ forward.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
        >>> inverse_from_cholesky(torch.linalg.cholesky(A)).mul(8).round().tolist()  # A⁻¹ = [[3, −2], [−2, 4]]/8
        [[3.0, -2.0], [-2.0, 4.0]]
    """
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape)
    return torch.cholesky_solve(eye, L)


class AITerms(NamedTuple):
    """Result of :func:`ai_terms`: ``loglik`` (0-d), ``score`` (k,), ``ai`` (k, k), ``beta`` (p,)."""

    loglik: Tensor
    score: Tensor
    ai: Tensor
    beta: Tensor


class DenseFactor(NamedTuple):
    """Cholesky-based pieces shared by the log-likelihood, β̂ and the AI terms."""

    chol_v: Tensor  # L, V = L Lᵀ
    chol_xvx: Tensor  # C, XᵀV⁻¹X = C Cᵀ
    beta: Tensor  # β̂
    whitened_residual: Tensor  # L⁻¹(y − Xβ̂); its squared norm is yᵀPy
    positive_definite: Tensor  # bool: V and XᵀV⁻¹X both factorised


def factorize(V: Tensor, y: Tensor, X: Tensor) -> DenseFactor:
    """Factorise V and XᵀV⁻¹X; β̂ by generalised least squares. Pure and vmappable."""
    chol_v, info_v = torch.linalg.cholesky_ex(V)
    ok_v = info_v == 0
    # Where V is not PD, keep the algebra finite with the identity; the result is masked to −∞.
    eye = torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    chol_v = torch.where(ok_v, chol_v, eye)
    whitened = torch.linalg.solve_triangular(chol_v, torch.cat([X, y.unsqueeze(-1)], dim=-1), upper=False)
    wx, wy = whitened[..., :-1], whitened[..., -1]
    xvx = wx.transpose(-1, -2) @ wx
    chol_xvx, info_x = torch.linalg.cholesky_ex(xvx)
    ok_x = info_x == 0
    eye_p = torch.eye(X.shape[-1], dtype=V.dtype, device=V.device)
    chol_xvx = torch.where(ok_x, chol_xvx, eye_p)
    beta = torch.cholesky_solve((wx.transpose(-1, -2) @ wy).unsqueeze(-1), chol_xvx).squeeze(-1)
    residual = wy - wx @ beta
    return DenseFactor(chol_v, chol_xvx, beta, residual, ok_v & ok_x)


def _log_det_from_chol(chol: Tensor) -> Tensor:
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def loglik_from_factor(factor: DenseFactor, n: int, p: int) -> Tensor:
    """ℓ = −½(log|V| + log|XᵀV⁻¹X| + yᵀPy) − (n−p)/2 log 2π; −∞ where V is not PD."""
    value = -0.5 * (
        _log_det_from_chol(factor.chol_v) + _log_det_from_chol(factor.chol_xvx) + (factor.whitened_residual**2).sum(-1)
    ) - 0.5 * (n - p) * math.log(2.0 * math.pi)
    return torch.where(factor.positive_definite, value, torch.full_like(value, -math.inf))


def reml_loglik_dense(V: Tensor, y: Tensor, X: Tensor) -> Tensor:
    """The REML log-likelihood for a given matrix V."""
    return loglik_from_factor(factorize(V, y, X), y.shape[-1], X.shape[-1])


def dV_stack(s, params: Mapping, jacobian: str = "closed") -> Tensor:
    """∂V/∂θ stacked in :func:`~reml_fn.param_names` order: shape (k, n, n)."""
    names = param_names(s)
    tree = s._jacobian(params) if jacobian == "closed" else autodiff_transform(jacobian)(s._build)(dict(params))
    return torch.stack([get_path(tree, name) for name in names])


def ai_terms_dense(
    V: Tensor,
    dV: Tensor,
    y: Tensor,
    X: Tensor,
    trace: str = "exact",
    generator: torch.Generator | None = None,
    probes: int | None = None,
) -> AITerms:
    """Log-likelihood, score, AI matrix and β̂ from V and its stacked derivatives dV (k, n, n)."""
    return ai_terms_and_factor_dense(V, dV, y, X, trace, generator, probes)[0]


def ai_terms_and_factor_dense(
    V: Tensor,
    dV: Tensor,
    y: Tensor,
    X: Tensor,
    trace: str = "exact",
    generator: torch.Generator | None = None,
    probes: int | None = None,
) -> tuple[AITerms, DenseFactor]:
    """:func:`ai_terms_dense` and the factorisation it used (for (XᵀV⁻¹X)⁻¹ = (C Cᵀ)⁻¹ at the same
    point, C = ``factor.chol_xvx``).

    Example:
        >>> import torch
        >>> V, X, y = torch.eye(3) * 2.0, torch.ones(3, 1), torch.tensor([1.0, 2.0, 3.0])
        >>> terms, factor = ai_terms_and_factor_dense(V, V.unsqueeze(0) / 2.0, y, X)
        >>> round(float(terms.beta[0]), 12), round(float(inverse_from_cholesky(factor.chol_xvx)[0, 0]), 12)  # mean, σ²/n
        (2.0, 0.666666666667)
    """
    n, p = y.shape[-1], X.shape[-1]
    factor = factorize(V, y, X)
    loglik = loglik_from_factor(factor, n, p)
    L, C = factor.chol_v, factor.chol_xvx
    # P = L⁻ᵀ (I − W (WᵀW)⁻¹ Wᵀ) L⁻¹ with W = L⁻¹X, built without forming V⁻¹ separately.
    eye = torch.eye(n, dtype=V.dtype, device=V.device)
    inv_l = torch.linalg.solve_triangular(L, eye, upper=False)
    w = inv_l @ X
    k_w = torch.linalg.solve_triangular(C, w.transpose(-1, -2), upper=False)  # C⁻¹Wᵀ (p, n)
    projector = eye - k_w.transpose(-1, -2) @ k_w
    P = inv_l.transpose(-1, -2) @ projector @ inv_l
    P = 0.5 * (P + P.transpose(-1, -2))
    Py = torch.linalg.solve_triangular(L.transpose(-1, -2), factor.whitened_residual.unsqueeze(-1), upper=True)
    Py = Py.squeeze(-1)
    dV_Py = dV @ Py  # (k, n)
    quadratic = dV_Py @ Py  # yᵀP V̇_k P y
    if trace == "exact":
        traces = (P.unsqueeze(0) * dV.transpose(-1, -2)).sum((-1, -2))
    elif trace == "hutchpp":
        # tr(P V̇) = tr(Π L⁻¹ V̇ L⁻ᵀ Π) with Π = I − W(WᵀW)⁻¹Wᵀ: a symmetric matrix, as Hutch++ needs.
        def apply(M):
            return projector @ (inv_l @ (dV @ (inv_l.transpose(-1, -2) @ (projector @ M))))

        traces = hutchpp_traces(apply, n, dV.shape[0], V, generator, probes)
    else:
        raise ValueError(f"unknown trace method {trace!r}; expected 'exact' or 'hutchpp'")
    score = 0.5 * (quadratic - traces)
    ai = 0.5 * dV_Py @ P @ dV_Py.transpose(-1, -2)
    ai = 0.5 * (ai + ai.transpose(-1, -2))
    return AITerms(loglik, score, ai, factor.beta), factor


def hutchpp_traces(apply, n: int, k: int, like: Tensor, generator: torch.Generator | None, probes: int | None):
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) estimates of tr(A_j), j < k, where
    ``apply(M)`` returns A_j M for M (n, m) and A_j M_j for M (k, n, m), stacked (k, n, m). Uses m = ``probes`` Rademacher
    probes split between a sketch S (range finder) and an independent estimator G:

        tr(A) ≈ tr(Qᵀ A Q) + (1/m_G) tr(Gᵀ (I − QQᵀ) A (I − QQᵀ) G),  Q = orth(A S)

    for symmetric A_j.

    ``generator`` makes the draw reproducible; probes default to max(12, n // 10).
    """
    m = probes if probes is not None else max(12, n // 10)
    m_s = max(1, m // 3)
    m_g = max(1, m - 2 * m_s)
    draw = torch.randint(0, 2, (n, m_s + m_g), generator=generator, device=like.device).to(like.dtype) * 2 - 1
    S, G = draw[:, :m_s], draw[:, m_s:]
    Q, _ = torch.linalg.qr(apply(S))  # (k, n, m_s): one sketch basis per A_j
    exact_part = (Q * apply(Q)).sum((-1, -2))  # tr(Q_jᵀ A_j Q_j); apply maps (k, n, m) blockwise
    G_perp = G - Q @ (Q.transpose(-1, -2) @ G)  # (I − Q_j Q_jᵀ) G, (k, n, m_g)
    estimate = (G_perp * apply(G_perp)).sum((-1, -2)) / m_g
    return exact_part + estimate
