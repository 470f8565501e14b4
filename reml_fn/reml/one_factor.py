r"""The MME engine's fast path for lme4's most common model: one grouping factor, R = σ²I.

Model: V = Z (I_m ⊗ Σ) Zᵀ + σ² I_n — a single :class:`~reml_fn.combinators.Grouped` term
``(x | g)`` with a k×k covariance Σ and a residual made of ``Scalar``/``Identity`` children
(sleepstudy's ``(Days | Subject)``, Dyestuff's ``(1 | Batch)``, …). Everything an AI-REML
iteration needs then follows from *sufficient statistics* computed once per dataset
(:func:`statistics`), per group g (x_i: the term's covariates, X_i: a row of X):

    C_g = Σ_{i∈g} x_i x_iᵀ (m, k, k),   B_g = Σ_{i∈g} x_i X_iᵀ (m, k, p),   A = XᵀX (p, p),
    c_g = Σ_{i∈g} x_i y_c,i (m, k),     b = Xᵀy_c (p,),   ‖y_c‖²,

for the response centred by its least-squares fit, y_c = y − Xβ₀ (P X = 0, so y_c has y's REML
likelihood; β̂ = β₀ + the estimate below). Centring keeps the cross products small, so that the
differences formed from them keep their digits.

With Λ the lower (semidefinite) Cholesky factor of Σ, w = 1/σ² and the blocks of the
mixed-model matrix of :mod:`reml_fn.reml.mme` (lme4's Λ form, so Σ may be singular),

    M_g = I_k + w ΛᵀC_gΛ = L_g L_gᵀ,         G_g = L_g⁻¹Λᵀ,   F_g = w G_g B_g (k×p),
    S = w A − Σ_g F_gᵀF_g = L_s L_sᵀ           (S = XᵀV⁻¹X),
    z_g = w G_g c_g,   z_s = L_s⁻¹(w b − Σ_g F_gᵀ z_g),   β̂ − β₀ = L_s⁻ᵀ z_s,
    ũ_g = L_g⁻ᵀ(z_g − F_g (β̂ − β₀)),   û_g = Λ ũ_g,

and with the residual r = y − Xβ̂ − Zû, e = P y = w r,

    ℓ = −½ (n log σ² + yᵀPy) − Σ_g Σ_a log (L_g)_aa − Σ_a log (L_s)_aa − ½ (n − p) log 2π,
    yᵀPy = e·r + ‖ũ‖² = w‖y_c‖² − ‖z‖² − ‖z_s‖².

A single dataset takes the first form (one pass over the data, the most accurate); under vmap,
where those passes dominate the cost, everything comes from the statistics: the second form, and
ze = Zᵀe = w (c − C û − B (β̂ − β₀)), e·e = w (yᵀPy − ‖ũ‖²). The k×k blocks M_g are then
factorised by unrolled recurrences over all datasets and groups at once
(:func:`~reml_fn.reml.covariance_blocks.unrolled_cholesky`), not one LAPACK call per block.

Score and AI, for the parameters θ_j of Σ (Σ̇_j) and of σ² (ṙ_j), with ze_g = Σ_{i∈g} x_i e_i
and T = Σ_g (ZᵀPZ)_gg (k×k):

    T = w Σ_g C_g − Σ_g Q_gᵀQ_g − Σ_g D_gᵀD_g,   Q_g = w G_g C_g,   D = L_s⁻¹ [w B_gᵀ − F_gᵀQ_g]_g,
    2 s_j = tr(Σ̇_j (Σ_g ze_g ze_gᵀ − T)),       2 s_r = ṙ (e·e − w (n − p − tr(Σ T))),
    AI = ½ SᵀPS for the working variates S = [Z a_j, ṙ e], a_{j,g} = Σ̇_j ze_g:
    SᵀPS = w SᵀS − ‖L⁻¹ w WᵀS‖², W = [ZΛ, X], with every product taken from the statistics
    (SᵀS from C_g, ze and e·e; WᵀS = [ΛᵀC_g a_g, Σ_g B_gᵀa_g; Λᵀze_g ṙ, Xᵀe ṙ = 0]).

Per call: O(m·k³ + m·k·p² + p³) for the algebra plus (single datasets) a few O(n·k) operations
for the residual — about two hundred tensor operations at any n, a third of the general MME path,
which forms cross products over the data in every call. The results are those of the general
path to round-off (tested).

Everything is pure and vmappable: Σ indefinite, σ² ≤ 0 or X rank-deficient give ℓ = −∞ and NaN
score, AI and β̂, never an exception.

Example:
    >>> import torch, reml_fn as rf
    >>> from reml_fn.reml import one_factor
    >>> g = torch.arange(12) % 3
    >>> s = rf.Sum(group=rf.Grouped(g), residual=rf.Scalar(12))
    >>> y = torch.tensor([1.0, 2.1, 2.9, 1.2, 2.0, 3.3, 0.8, 1.9, 3.1, 1.1, 2.2, 2.8]); X = torch.ones(12, 1)
    >>> model = one_factor.layout(s)
    >>> stats = one_factor.statistics(model, y, X)
    >>> fast = one_factor.ai_terms(model, s.init_params(), y, X, stats)
    >>> dense = rf.ai_terms(s, s.init_params(), y, X, engine="dense")
    >>> bool(torch.allclose(fast.ai, dense.ai, rtol=1e-12, atol=0))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.combinators import Grouped, Sum
from reml_fn.params import param_names, subtree
from reml_fn.reml.covariance_blocks import (
    PSD_CHOLESKY_MAX_SIZE,
    cast,
    derivative_stack,
    group_inner,
    psd_cholesky,
    residual_variance,
    unrolled_cholesky,
)
from reml_fn.reml.dense import AITerms, inverse_from_cholesky
from reml_fn.structures import Identity, Scalar
from reml_fn.structures.base import first_leaf

# Whether a tensor carries a vmap batch dimension (a structural fact, not a value: allowed under vmap).
_batched = torch._C._functorch.is_batchedtensor

__all__ = ["Layout", "Statistics", "layout", "statistics", "loglik", "ai_terms", "gls", "jacobian_traces"]


class Layout(NamedTuple):
    """Where the pieces of a supported Sum ``structure`` are: the Grouped term's path segments and
    the residual terms' ``(path segments, term)``; ``in_order``: whether Σ's free parameters come
    before σ²'s in ``param_names`` (else results are permuted into that order)."""

    term_path: tuple[str, ...]
    term: Grouped
    residual: tuple[tuple[tuple[str, ...], object], ...]
    in_order: bool
    structure: Sum


class Statistics(NamedTuple):
    """The θ-independent sufficient statistics of one dataset (see the module docstring).

    ``C``, ``B``, ``A`` and ``C_total`` = Σ_g C_g depend on the design only; the others on the
    response, centred by its least-squares fit: y_c = y − Xβ₀ has the same REML likelihood (P X = 0)
    and small cross products, so that sums such as ‖y_c‖² − ‖L⁻¹ WᵀR⁻¹y_c‖² keep their digits."""

    C: Tensor  # (m, k, k)
    B: Tensor  # (m, k, p)
    A: Tensor  # (p, p)
    C_total: Tensor  # (k, k)
    c: Tensor  # (m, k)   of the centred response y_c = y − Xβ₀
    b: Tensor  # (p,)     Xᵀy_c (≈ 0)
    offset: Tensor  # (p,) β₀, least squares: β̂ = β₀ + the GLS estimate for y_c
    yy: Tensor  # ()      ‖y_c‖²


def _leaves(s, path: tuple[str, ...] = ()):
    if isinstance(s, Sum):
        for name, child in s.items():
            yield from _leaves(child, (*path, name))
    else:
        yield path, s


def layout(s) -> Layout | None:
    """The :class:`Layout` of ``s`` when it is one Grouped term (with a k×k covariance, k ≤ 8)
    plus Scalar/Identity residual terms in (nested) Sums; None otherwise.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import one_factor
        >>> g = torch.arange(6) % 2
        >>> model = one_factor.layout(rf.Sum(residual=rf.Scalar(6), group=rf.Grouped(g)))
        >>> model.term_path, model.in_order                 # σ² comes first in param_names
        (('group',), False)
        >>> one_factor.layout(rf.Sum(a=rf.Grouped(g), b=rf.Grouped(g), residual=rf.Scalar(6))) is None
        True
    """
    if not isinstance(s, Sum):
        return None
    grouped, residual, in_order = [], [], True
    for path, term in _leaves(s):
        if isinstance(term, Grouped):
            grouped.append((path, term))
        elif isinstance(term, (Scalar, Identity)):
            residual.append((path, term))
            if not grouped and isinstance(term, Scalar) and not term.specs[0].fixed:
                in_order = False  # a free σ² parameter precedes Σ's
        else:
            return None
    if len(grouped) != 1 or not residual or grouped[0][1].k > PSD_CHOLESKY_MAX_SIZE:
        return None
    return Layout(grouped[0][0], grouped[0][1], tuple(residual), in_order, s)


def _to_param_order(model: Layout, order: list[str]) -> Tensor | None:
    """Indices that permute results computed in ``order`` (Σ's names, then σ²'s) into
    ``param_names`` order; None when they already are in it."""
    if model.in_order:
        return None
    return torch.tensor([order.index(name) for name in param_names(model.structure)], device=model.term.codes.device)


def design_statistics(term: Grouped, X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(C, B, A, C_total)``: the statistics that do not involve y, C_g = Σ_{i∈g} x_i x_iᵀ (m, k, k),
    B_g = Σ_{i∈g} x_i X_iᵀ (m, k, p), A = XᵀX and C_total = Σ_g C_g.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.one_factor import design_statistics
        >>> C, B, A, C_total = design_statistics(rf.Grouped(torch.tensor([0, 0, 1])), torch.ones(3, 1))
        >>> C.flatten().tolist(), B.flatten().tolist(), A.tolist(), C_total.tolist()   # group sizes
        ([2.0, 1.0], [2.0, 1.0], [[3.0]], [[3.0]])
    """
    x = cast(term.covariates, X.dtype)
    m = term.num_groups
    both = torch.cat([x, X], dim=-1)  # one segment sum gives Z_gᵀ[x, X]
    sums = both.new_zeros(m, x.shape[-1], both.shape[-1]).index_add(0, term.codes, x.unsqueeze(-1) * both.unsqueeze(-2))
    k = x.shape[-1]
    C = sums[..., :k]
    return C, sums[..., k:], X.mT @ X, C.sum(-3)


def statistics(model: Layout, y: Tensor, X: Tensor) -> Statistics:
    """All sufficient statistics of one dataset (pure; vmappable over y, X and the term's data):
    :func:`design_statistics`, β₀ = (XᵀX)⁻¹Xᵀy, and c_g = Σ_{i∈g} x_i y_c,i, b = Xᵀy_c, ‖y_c‖² for
    y_c = y − Xβ₀ (below: β₀ the mean 2.5, c the group sums of y − 2.5, ‖y_c‖² = 7).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import one_factor
        >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
        >>> model = one_factor.layout(s)
        >>> stats = one_factor.statistics(model, y, X)
        >>> [round(v, 10) for v in (*stats.offset.tolist(), *stats.c.flatten().tolist(), float(stats.yy))]
        [2.5, -3.0, 3.0, 7.0]
    """
    term = model.term
    C, B, A, C_total = design_statistics(term, X)
    # β₀ from the normal equations: any β₀ gives the same likelihood, it only makes y_c small.
    factor = torch.linalg.cholesky_ex(A)[0]
    offset = torch.cholesky_solve((X.mT @ y).unsqueeze(-1), factor).squeeze(-1)
    centred = y - X @ offset
    x = cast(term.covariates, y.dtype)
    c = y.new_zeros(term.num_groups, x.shape[-1]).index_add(0, term.codes, x * centred.unsqueeze(-1))
    return Statistics(C, B, A, C_total, c, X.mT @ centred, offset, centred @ centred)


class _Point(NamedTuple):
    """Everything at one parameter point."""

    ok: Tensor
    w: Tensor  # 1/σ²
    sigma: Tensor  # Σ (k, k)
    lam: Tensor  # Λ (k, k)
    L_inv: Tensor  # (m, k, k) L_g⁻¹
    G: Tensor  # (m, k, k) L_g⁻¹Λᵀ
    F: Tensor  # (m, k, p)
    L_s: Tensor  # (p, p)
    beta: Tensor  # (p,)
    u_spherical: Tensor | None  # (m, k) ũ
    loglik: Tensor | None


def _residual_variance(model: Layout, params: Mapping, dtype, derivatives: bool):
    """σ² (0-d) and, when ``derivatives``, the names and slopes dσ²/dθ_r (K_r,) of its parameters."""
    parts = [("/".join(path), term, subtree(params, path)) for path, term in model.residual]
    term = model.term
    residual = residual_variance(parts, term.codes.shape[-1], dtype, term.codes.device, derivatives)
    return residual.r, residual.names, residual.slopes


def _factor_covariance(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Λ with ΛΛᵀ = Σ and an ok flag: LAPACK's Cholesky when Σ is positive definite, else (a
    variance at 0, or Σ indefinite) :func:`psd_cholesky`. Under torch.func transforms (vmap, grad,
    jacfwd) the value-dependent choice is not made: psd_cholesky (exact for positive-definite Σ too)
    serves every case."""
    if torch._C._functorch.is_functorch_wrapped_tensor(sigma):
        return psd_cholesky(sigma)
    lam, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return lam, info == 0
    return psd_cholesky(sigma)


def _point(
    model: Layout,
    sigma: Tensor,
    variance: Tensor,
    stats: Statistics,
    y: Tensor,
    X: Tensor,
    evaluate: bool = True,
    products: bool = False,
):
    """Factor, solve and evaluate ℓ at (Σ, σ²). ``evaluate=False`` stops after β̂ (no ũ or ℓ);
    ``products=True`` also returns ze = Zᵀe (m, k) and e·e for e = P y (else None, None).

    The residual r = y − Xβ̂ − Zû is formed over the data (n-vectors) for a single dataset; under
    vmap, where those passes dominate the cost, the same quantities come from the statistics:
    yᵀPy = w‖y_c‖² − ‖L⁻¹WᵀR⁻¹y_c‖², ze = w (c − C û − B (β̂ − β₀)), e·e = w (yᵀPy − ‖ũ‖²)."""
    term = model.term
    n, p, k = y.shape[-1], X.shape[-1], sigma.shape[-1]
    lam, ok = _factor_covariance(sigma)
    positive = variance > 0
    w = torch.where(positive, variance, 1.0).reciprocal()
    eye_k = torch.eye(k, dtype=y.dtype, device=y.device)
    M = _blocks_times(_blocks_times(stats.C, lam).mT, lam) * w + eye_k  # I + w ΛᵀC_gΛ (C_g symmetric)
    # M_g ⪰ I, so ‖L_g⁻¹‖ ≤ 1: explicit k×k inverses are as accurate as solves and cheaper to apply.
    if _batched(M):
        # Under vmap (many datasets × groups) LAPACK runs once per tiny block; the unrolled
        # recurrences run once for all of them.
        L, L_inv, factored = unrolled_cholesky(M)
        factored = factored.all()
    else:
        L, info = torch.linalg.cholesky_ex(M)
        L_inv = torch.linalg.solve_triangular(L, eye_k, upper=False)
        factored = (info == 0).all()
    G = _blocks_times(L_inv, lam.mT)
    F = G @ stats.B * w
    F_rows = F.flatten(-3, -2)  # (m·k, p)
    L_s, info_s = torch.linalg.cholesky_ex(stats.A * w - F_rows.mT @ F_rows)
    ok = ok & positive & factored & (info_s == 0)
    # Not positive definite (X rank deficient): keep the algebra finite; the results are masked.
    L_s = torch.where(ok, L_s, torch.eye(p, dtype=y.dtype, device=y.device))

    z = (G @ stats.c.unsqueeze(-1)).squeeze(-1) * w  # (m, k)
    rhs = (stats.b * w - F_rows.mT @ z.flatten()).unsqueeze(-1)
    z_s = torch.linalg.solve_triangular(L_s, rhs, upper=False)
    beta_c = torch.linalg.solve_triangular(L_s.mT, z_s, upper=True).squeeze(-1)  # GLS estimate for y_c
    beta = stats.offset + beta_c
    if not evaluate:  # β̂ and L_s are all gls needs
        return _Point(ok, w, sigma, lam, L_inv, G, F, L_s, beta, None, None), None, None
    u_spherical = (L_inv.mT @ (z - F @ beta_c).unsqueeze(-1)).squeeze(-1)
    effects = u_spherical @ lam.mT  # û_g = Λ ũ_g
    u_squares = (u_spherical * u_spherical).sum()

    ze = squares = None
    if _batched(effects):
        penalised = w * stats.yy - (z * z).sum() - (z_s * z_s).sum()
        if products:
            fitted = (stats.C @ effects.unsqueeze(-1)).squeeze(-1) + stats.B @ beta_c
            ze, squares = (stats.c - fitted) * w, w * (penalised - u_squares)
    else:
        x = cast(term.covariates, y.dtype)
        residual = y - X @ beta - (x * effects.index_select(0, term.codes)).sum(-1)
        e = residual * w
        penalised = e @ residual + u_squares
        if products:
            ze = e.new_zeros(term.num_groups, x.shape[-1]).index_add(0, term.codes, x * e.unsqueeze(-1))
            squares = e @ e
    log_det = _log_diagonal_sum(L) + torch.log(torch.diagonal(L_s)).sum()
    value = -0.5 * (n * torch.log(torch.where(positive, variance, 1.0)) + penalised) - log_det
    value = value - 0.5 * (n - p) * math.log(2.0 * math.pi)
    loglik = torch.where(ok, value, -math.inf)
    return _Point(ok, w, sigma, lam, L_inv, G, F, L_s, beta, u_spherical, loglik), ze, squares


def _log_diagonal_sum(L: Tensor) -> Tensor:
    """Σ_g Σ_a log (L_g)_aa; under vmap through the per-group products of the k diagonal entries
    (one log per group: elementwise logs of strided diagonals are slow there), in float64 where
    a product of k ≤ 8 pivots of M_g ⪰ I cannot overflow."""
    diagonal = torch.diagonal(L, dim1=-2, dim2=-1)
    if _batched(L) and L.dtype == torch.float64:
        return torch.log(diagonal.prod(-1)).sum()
    return torch.log(diagonal).sum()


def _covariance(model: Layout, params: Mapping, dtype) -> Tensor:
    cov = model.term.cov
    return cast(cov._build(subtree(params, (*model.term_path, "cov"))), dtype)


def _point_at(model: Layout, params: Mapping, y: Tensor, X: Tensor, stats: Statistics, evaluate: bool) -> _Point:
    """:func:`_point` at a parameter tree (no derivatives)."""
    cov = model.term.cov
    sigma = cast(cov._build(subtree(params, (*model.term_path, "cov"))), y.dtype)
    variance = _residual_variance(model, params, y.dtype, derivatives=False)[0]
    return _point(model, sigma, variance, stats, y, X, evaluate=evaluate)[0]


def loglik(model: Layout, params: Mapping, y: Tensor, X: Tensor, stats: Statistics) -> Tensor:
    """The REML log-likelihood ℓ(θ) (0-d), ℓ = −½ (n log σ² + yᵀPy) − Σ log diag L − ½(n − p) log 2π
    (module docstring).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import one_factor
        >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
        >>> model = one_factor.layout(s)
        >>> stats = one_factor.statistics(model, y, X)
        >>> value = one_factor.loglik(model, s.init_params(), y, X, stats)
        >>> bool(torch.isclose(value, rf.reml_loglik(s, None, y, X, engine="dense")))
        True
    """
    return _point_at(model, params, y, X, stats, evaluate=True).loglik


def gls(model: Layout, params: Mapping, y: Tensor, X: Tensor, stats: Statistics) -> tuple[Tensor, Tensor]:
    """β̂ = β₀ + L_s⁻ᵀ z_s and (XᵀV⁻¹X)⁻¹ = (L_s L_sᵀ)⁻¹.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import one_factor
        >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
        >>> model = one_factor.layout(s)
        >>> stats = one_factor.statistics(model, y, X)
        >>> beta, vcov = one_factor.gls(model, s.init_params(), y, X, stats)
        >>> round(float(beta), 10), round(float(vcov), 6)     # (σ_g² + σ²/3)/2 at σ_g² = σ² = 1
        (2.5, 0.666667)
    """
    point = _point_at(model, params, y, X, stats, evaluate=False)
    beta = torch.where(point.ok, point.beta, math.nan)
    return beta, torch.where(point.ok, inverse_from_cholesky(point.L_s), math.nan)


def jacobian_traces(model: Layout, params: Mapping, jacobian: str = "closed") -> Tensor:
    """tr(∂V/∂θ_j) (k,) in ``param_names`` order: tr(Σ̇_j Σ_i x_i x_iᵀ) for Σ's parameters, n ṙ_j for σ²'s.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import one_factor
        >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> one_factor.jacobian_traces(one_factor.layout(s), s.init_params()).tolist()   # 2·σ²·n each
        [12.0, 12.0]
    """
    term = model.term
    x = term.covariates
    cov_path = (*model.term_path, "cov")
    leaf = first_leaf(params)
    dtype = leaf.dtype if leaf is not None else torch.get_default_dtype()
    names, D = derivative_stack(term.cov, subtree(params, cov_path), "/".join(cov_path), jacobian, dtype)
    residual_names, slopes = _residual_variance(model, params, dtype, derivatives=True)[1:]
    pieces = []
    if D is not None:
        gram = x.mT @ x
        pieces.append((D * cast(gram, D.dtype)).sum((-1, -2)))
    if slopes is not None:
        pieces.append(term.codes.shape[-1] * slopes)
    if not pieces:
        return torch.zeros(0, dtype=dtype, device=x.device)
    traces = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    index = _to_param_order(model, [*names, *residual_names])
    if index is not None:
        traces = traces[index]
    return traces


def _blocks_times(blocks: Tensor, matrix: Tensor) -> Tensor:
    """blocks_g @ matrix for every group (m, r, c) @ (c, d) → (m, r, d); under vmap as one
    (m·r, c) @ (c, d) product per dataset instead of one per group and dataset."""
    if not _batched(blocks) and not _batched(matrix):
        return blocks @ matrix
    return (blocks.flatten(-3, -2) @ matrix).unflatten(-2, blocks.shape[-3:-1])


def ai_terms(
    model: Layout, params: Mapping, y: Tensor, X: Tensor, stats: Statistics, jacobian: str = "closed"
) -> AITerms:
    """ℓ, score, AI (in ``param_names`` order) and β̂ at ``params``: 2 s_j = tr(Σ̇_j (Σ_g ze_g ze_gᵀ − T)),
    AI = ½ SᵀPS for the working variates S (see the module docstring).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import one_factor
        >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
        >>> model = one_factor.layout(s)
        >>> stats = one_factor.statistics(model, y, X)
        >>> fast = one_factor.ai_terms(model, s.init_params(), y, X, stats)
        >>> torch.func.grad(lambda p: one_factor.loglik(model, p, y, X, stats))(s.init_params())["residual"]
        {'sigma^2': tensor(...)}
        >>> bool(torch.allclose(fast.score, rf.ai_terms(s, None, y, X, engine="dense").score))
        True
    """
    dtype = y.dtype
    n, p = y.shape[-1], X.shape[-1]
    cov = model.term.cov
    cov_path = (*model.term_path, "cov")
    cov_params = subtree(params, cov_path)
    sigma = cast(cov._build(cov_params), dtype)
    variance, residual_names, slopes = _residual_variance(model, params, dtype, derivatives=True)
    point, ze, squares = _point(model, sigma, variance, stats, y, X, products=True)
    w, lam, F, L_s = point.w, point.lam, point.F, point.L_s
    names, D = derivative_stack(cov, cov_params, "/".join(cov_path), jacobian, dtype)

    # T = Σ_g (ZᵀPZ)_gg.
    Q = point.G @ stats.C * w  # (m, k, k)
    dense_rows = (stats.B * w - Q.mT @ F).flatten(-3, -2)  # (m·k, p): rows of w B_g − Q_gᵀF_g
    solved = torch.linalg.solve_triangular(L_s.mT, dense_rows, upper=True, left=False).unflatten(0, Q.shape[-3:-1])
    solved = solved.transpose(-3, -2).flatten(-2)  # (k, m·p): Σ_g R_g R_gᵀ as one product
    T = stats.C_total * w - group_inner(Q, Q) - solved @ solved.mT

    twice_score, variates_b, variates_s, gram = [], [], [], None
    if D is not None:
        twice_score.append((D * (ze.mT @ ze - T)).sum((-1, -2)))
        A = (ze @ D.mT).movedim(0, -1)  # (m, k, K): a_{j,g} = Σ̇_j ze_g
        CA = stats.C @ A
        variates_b.append(_blocks_times(CA.mT, lam).mT * w)  # Λᵀ C_g A_g
        variates_s.append(group_inner(stats.B, A) * w)
        gram = group_inner(A, CA) * w
    if slopes is not None:
        twice_score.append(slopes * (squares - w * (n - p - (sigma * T).sum())))
        projected = (ze @ lam).unsqueeze(-1) * (slopes * w)  # Λᵀze_g ṙ w (m, k, K_r); Xᵀe = 0
        variates_b.append(projected)
        variates_s.append(ze.new_zeros(p, slopes.shape[0]))
        residual_gram = squares * w * slopes.unsqueeze(-1) * slopes
        if gram is None:
            gram = residual_gram
        else:
            cross = ((A.flatten(-3, -2).mT @ ze.flatten()) * w).unsqueeze(-1) * slopes  # (K, K_r)
            gram = torch.cat([torch.cat([gram, cross], dim=-1), torch.cat([cross.mT, residual_gram], dim=-1)], dim=-2)
    if gram is None:
        zero = y.new_zeros(0)
        return AITerms(point.loglik, zero, y.new_zeros(0, 0), torch.where(point.ok, point.beta, math.nan))
    blocked = point.L_inv @ (variates_b[0] if len(variates_b) == 1 else torch.cat(variates_b, dim=-1))
    dense = variates_s[0] if len(variates_s) == 1 else torch.cat(variates_s, dim=-1)
    dense = torch.linalg.solve_triangular(L_s, dense - group_inner(F, blocked), upper=False)
    inner = gram - group_inner(blocked, blocked) - dense.mT @ dense
    ai = 0.25 * (inner + inner.mT)
    score = 0.5 * (twice_score[0] if len(twice_score) == 1 else torch.cat(twice_score))
    index = _to_param_order(model, [*names, *residual_names])
    if index is not None:
        score, ai = score[index], ai[index][:, index]
    return AITerms(
        point.loglik,
        torch.where(point.ok, score, math.nan),
        torch.where(point.ok, ai, math.nan),
        torch.where(point.ok, point.beta, math.nan),
    )
