r"""The mixed-model-equation (MME) engine: REML for V = Σ_t Z_t G_t Z_tᵀ + R without any n×n matrix.

Model: y = Xβ + Σ_t Z_t u_t + ε, u_t ~ N(0, G_t), ε ~ N(0, R), R = diag(r) (``Scalar``,
``Identity`` or ``Diagonal`` children of the Sum; several add up). Random terms are
:class:`~reml_fn.combinators.Grouped` (Z_t implicit, G_t = I_m ⊗ Σ_t) or
:class:`~reml_fn.combinators.Propagate` with a ``Fixed`` Z of modest width q_t.

**Formulation (lme4's, Bates et al. 2015).** With Λ = blockdiag(Λ_t), G = ΛΛᵀ (Λ_t a lower
Cholesky factor of Σ_t or G_t; for k×k blocks with k ≤ 8 a *semidefinite* Cholesky that gives a
zero column for a zero pivot, so a variance at 0 works), spherical effects ũ (u = Λũ), the
augmented design W = [ZΛ, X] and D = blockdiag(I_q, 0_p), everything follows from one
symmetric positive-definite matrix of size q + p,

    Ω = WᵀR⁻¹W + D = [[ΛᵀZᵀR⁻¹ZΛ + I,  ΛᵀZᵀR⁻¹X],
                      [XᵀR⁻¹ZΛ,         XᵀR⁻¹X  ]],     Ω [ũ; β̂] = WᵀR⁻¹y,

which is PD even when G is singular (no G⁻¹ anywhere). Its Cholesky factor L gives

    log|V| = log|R| + log|I + ΛᵀZᵀR⁻¹ZΛ|           (determinant lemma: the first q pivots of L)
    log|XᵀV⁻¹X| = the last p pivots of L            (they factor the Schur complement XᵀV⁻¹X)
    yᵀPy = ‖R^{-½}(y − Xβ̂ − ZΛũ)‖² + ‖ũ‖²          (penalised residual sum of squares)
    P y = e = R⁻¹(y − Xβ̂ − Zû),  û = Λũ             (the BLUPs)
    P = R⁻¹ − R⁻¹ W Ω⁻¹ Wᵀ R⁻¹.

**Block structure.** The Grouped term with the most groups is the *blocked* term b: its part of
Ω is block diagonal (m blocks of k×k, ``I + Λ_bᵀ (Σ_{i∈g} x_i x_iᵀ/r_i) Λ_b``), factorised by a
batched k×k Cholesky. The other random terms and X form a dense block s of size d = q_rest + p,
factorised after the Schur complement S = Ω_ss − Σ_g F_gᵀF_g, F_g = L_g⁻¹ Ω_{g,s}. All cross
products are segment sums (``index_add``) over observations: O(n·(k + d)²) to form,
O(m·k³ + d³) to factor; memory O(n·(k + d) + m·k·d + d²).

**Score and AI** (raw parameters θ_j; V̇_j = Z_t (I ⊗ Σ̇_t) Z_tᵀ, Z_t Ġ_t Z_tᵀ or diag(ṙ)):

    s_j = ½ (eᵀ V̇_j e − tr(P V̇_j))
    eᵀV̇_j e = (Z_tᵀe)ᵀ Ġ_t (Z_tᵀe)   or   Σ_i ṙ_i e_i²
    tr(P Z_t Ġ_t Z_tᵀ) = tr(Ġ_t · Z_tᵀPZ_t),   ZᵀPZ = ZᵀR⁻¹Z − UᵀΩ⁻¹U,  U = WᵀR⁻¹Z
        (for a Grouped term only Σ_g of its k×k diagonal blocks is needed: tr(Σ̇ Σ_g (ZᵀPZ)_gg))
    tr(P diag(ṙ)) = ṙ · tr(P),  tr(P) = (n − p − Σ_t tr(G_t Z_tᵀPZ_t)) / σ²   when R = σ²I
        (from tr(PV) = n − p), else Σ_i ṙ_i P_ii with P_ii = 1/r_i − ‖L⁻¹w_i‖²/r_i² (w_i: row i of W)
    AI_jl = ½ v_jᵀ P v_l with the working variates v_j = V̇_j e, never formed as n-vectors for
        random-term parameters: v_j = Z a_j with a_j = Ġ_j Z_tᵀe (q-space). With S = [Z A, V_r]
        (V_r: residual variates; just e when R = σ²I, since then every ṙ_j e ∝ e)
        SᵀPS = SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖², where SᵀR⁻¹S and WᵀR⁻¹S come from the cross products
        (AᵀZᵀR⁻¹ZA, AᵀZᵀR⁻¹e = w·Aᵀ(Zᵀe), eᵀR⁻¹e) plus, for a Diagonal R, one pass over V_r.

The cost per ``ai_terms`` call is one pass over the data for the cross products and the
residuals (O(n·(k + d)²)) and q-space algebra for everything else (O(m·k²·K + d²·(m·k + K))).
Subtractions such as ZᵀR⁻¹Z − UᵀΩ⁻¹U lose about log₁₀(n_g·σ_b²/σ²) digits when group sizes
n_g and variance ratios are extreme; the dense engine's P loses as much (the two still agree to
1e-8 at n_g·σ_b²/σ² = 5·10⁸).

Everything is pure and vmappable (``cholesky_ex``, ``index_add``, ``torch.where``; no value
checks): V not positive definite (a residual variance ≤ 0, an indefinite Σ_t or G_t, a
rank-deficient X) gives ℓ = −∞ and NaN score, AI and β̂. Note that the MME needs G ⪰ 0: an
indefinite Σ (possible with ``Unstructured``'s unconstrained covariances) is −∞ here even where
R dominates and the dense V would still be PD.

Example:
    >>> import torch, reml_fn as rf
    >>> g = torch.arange(12) % 3
    >>> s = rf.Sum(group=rf.Grouped(g), residual=rf.Scalar(12))
    >>> y = torch.tensor([1.0, 2.1, 2.9, 1.2, 2.0, 3.3, 0.8, 1.9, 3.1, 1.1, 2.2, 2.8]); X = torch.ones(12, 1)
    >>> rf.reml.select_engine(s).name
    'mme'
    >>> mme = rf.reml_loglik(s, None, y, X, engine="mme")
    >>> dense = rf.reml_loglik(s, None, y, X, engine="dense")
    >>> bool(torch.isclose(mme, dense, rtol=1e-12, atol=0))
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from reml_fn.params import param_names
from reml_fn.reml.dense import AITerms
from reml_fn.reml.engines import register_engine
from reml_fn.structures.base import first_leaf

__all__ = ["MMEEngine", "psd_cholesky", "PSD_CHOLESKY_MAX_SIZE"]

PSD_CHOLESKY_MAX_SIZE = 8
"""Covariance blocks up to this size use :func:`psd_cholesky` (zero variances allowed); larger
blocks (a Propagate term's G) use ``torch.linalg.cholesky_ex`` and must be positive definite."""


# ------------------------------------------------------------------------------------------------
# Small pieces


def psd_cholesky(A: Tensor) -> tuple[Tensor, Tensor]:
    """A lower factor L with L Lᵀ = A for a positive *semi*-definite k×k A, and an ok flag.

    An unrolled Cholesky in which a pivot ≤ τ = 10·k·ε·max|diag A| gives a zero column instead
    of a failure, so A = 0 (a variance at its boundary) or a rank-deficient A factor exactly.
    ``ok`` is False when L Lᵀ misses A by more than τ (A indefinite) or A has NaN. Pure,
    vmappable and differentiable (double-``where``) at positive-definite A. Meant for small k.

    Example:
        >>> import torch
        >>> from reml_fn.reml.mme import psd_cholesky
        >>> L, ok = psd_cholesky(torch.tensor([[4.0, 2.0], [2.0, 1.0]]))    # rank 1
        >>> L.tolist(), bool(ok)
        ([[2.0, 0.0], [1.0, 0.0]], True)
        >>> bool(psd_cholesky(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))[1])    # indefinite
        False
    """
    k = A.shape[-1]
    diagonal = torch.diagonal(A, dim1=-2, dim2=-1)
    tolerance = 10.0 * k * torch.finfo(A.dtype).eps * diagonal.abs().amax(-1)
    rows = torch.arange(k, device=A.device)
    columns: list[Tensor] = []
    for j in range(k):
        v = A[..., :, j]
        for column in columns:
            v = v - column * column[..., j : j + 1]
        pivot = v[..., j]
        positive = pivot > tolerance
        root = torch.sqrt(torch.where(positive, pivot, torch.ones_like(pivot)))
        column = torch.where(positive.unsqueeze(-1) & (rows >= j), v / root.unsqueeze(-1), torch.zeros_like(v))
        columns.append(column)
    L = torch.stack(columns, dim=-1)
    error = (L @ L.transpose(-1, -2) - A).abs().amax((-1, -2))
    return L, error <= tolerance


def _factor_block(block: Tensor) -> tuple[Tensor, Tensor]:
    if block.shape[-1] <= PSD_CHOLESKY_MAX_SIZE:
        return psd_cholesky(block)
    L, info = torch.linalg.cholesky_ex(block)
    ok = info == 0
    return torch.where(ok, L, torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)), ok


def _weigh(w: Tensor, values: Tensor) -> Tensor:
    """diag(w) · values for per-observation weights w (n,); for a scalar w (R = σ²I) the values
    are returned unweighted and :func:`_rescale` multiplies the (small) result instead."""
    if w.dim() == 0:
        return values
    return values * w.reshape(*w.shape, *([1] * (values.dim() - 1)))


def _rescale(w: Tensor, result: Tensor) -> Tensor:
    return result * w if w.dim() == 0 else result


def _segment_sum(codes: Tensor, values: Tensor, size: int) -> Tensor:
    """out[g] = Σ_{i: codes_i = g} values_i, out of place (vmappable)."""
    return values.new_zeros((size, *values.shape[1:])).index_add(0, codes, values)


def _block_diag(blocks: list[Tensor]) -> Tensor:
    """blockdiag(blocks) by zero padding (vmappable, unlike ``torch.block_diag``)."""
    total, start, bands = sum(b.shape[-1] for b in blocks), 0, []
    for block in blocks:
        size = block.shape[-1]
        bands.append(F.pad(block, (start, total - start - size)))
        start += size
    return torch.cat(bands, dim=-2)


def _embed_blocks(blocks: Tensor) -> Tensor:
    """(m, k, k) diagonal blocks → the dense (m·k, m·k) block-diagonal matrix."""
    m, k = blocks.shape[-3], blocks.shape[-1]
    eye = torch.eye(m, dtype=blocks.dtype, device=blocks.device)
    return (blocks.unsqueeze(-2) * eye[:, None, :, None]).reshape(m * k, m * k)


def _flatten_tree(tree: Mapping, prefix: str) -> Iterator[tuple[str, Tensor]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten_tree(value, f"{prefix}/{key}")
        else:
            yield f"{prefix}/{key}", value


def _child_derivatives(child, child_params: Mapping, method: str) -> Mapping:
    if not child_params:
        return {}
    if method == "closed":
        return child._jacobian(child_params)
    if method == "fwd":
        return torch.func.jacfwd(child._build)(dict(child_params))
    if method == "rev":
        return torch.func.jacrev(child._build)(dict(child_params))
    raise ValueError(f"unknown Jacobian method {method!r}; expected 'closed', 'fwd' or 'rev'")


# ------------------------------------------------------------------------------------------------
# What the structure looks like (static)


def _leaves(s, params: Mapping, prefix: str = "") -> Iterator[tuple[str, object, Mapping]]:
    """The non-Sum terms of nested Sums: ``(path, structure, its params)``."""
    from reml_fn.combinators import Sum

    if isinstance(s, Sum):
        for name, child in s.items():
            yield from _leaves(child, params.get(name, {}), f"{prefix}{name}/")
    else:
        yield prefix.rstrip("/"), s, params


def _kind(term) -> str | None:
    from reml_fn.combinators import Grouped, Propagate
    from reml_fn.structures import Diagonal, Fixed, Identity, Scalar

    if isinstance(term, Grouped):
        return "grouped"
    if isinstance(term, Propagate) and isinstance(term.children[0], Fixed):
        return "dense"
    if isinstance(term, (Scalar, Identity, Diagonal)):
        return "residual"
    return None


def _layout(s) -> tuple[list, list] | None:
    """``(random, residual)`` lists of ``(path, term)``, or None when the MME cannot handle ``s``."""
    from reml_fn.combinators import Sum

    if not isinstance(s, Sum):
        return None
    random, residual = [], []
    for path, term, _ in _leaves(s, {}):
        kind = _kind(term)
        if kind is None:
            return None
        (residual if kind == "residual" else random).append((path, term))
    if not random or not residual:
        return None
    return random, residual


class _Columns(NamedTuple):
    """A block of columns of the MME design: a Grouped term's implicit Z or a dense matrix."""

    size: int
    codes: Tensor | None = None  # grouped: (n,) group codes
    x: Tensor | None = None  # grouped: (n, k) covariates
    m: int = 0
    k: int = 0
    dense: Tensor | None = None  # dense: (n, size)


def _grouped_columns(term, dtype) -> _Columns:
    return _Columns(term.q, term.codes, term.covariates.to(dtype), term.num_groups, term.k)


def _cross_grouped(a: _Columns, w: Tensor, values: Tensor) -> Tensor:
    """Z_aᵀ diag(w) Y for Y (n, c) as (m_a, k_a, c)."""
    return _rescale(w, _segment_sum(a.codes, a.x.unsqueeze(-1) * _weigh(w, values).unsqueeze(-2), a.m))


def _cross_two_grouped(a: _Columns, b: _Columns, w: Tensor) -> Tensor:
    """Z_aᵀ diag(w) Z_b for two different Grouped terms, (m_a, k_a, m_b·k_b)."""
    outer = a.x.unsqueeze(-1) * _weigh(w, b.x).unsqueeze(-2)  # (n, k_a, k_b)
    sums = _rescale(w, _segment_sum(a.codes * b.m + b.codes, outer, a.m * b.m)).reshape(a.m, b.m, a.k, b.k)
    return sums.permute(0, 2, 1, 3).reshape(a.m, a.k, b.size)


def _cross(a: _Columns, b: _Columns, w: Tensor, same: bool) -> Tensor:
    """Z_aᵀ diag(w) Z_b, dense (size_a, size_b)."""
    if a.dense is not None and b.dense is not None:
        return _rescale(w, a.dense.transpose(-1, -2) @ _weigh(w, b.dense))
    if a.dense is None and b.dense is not None:
        return _cross_grouped(a, w, b.dense).reshape(a.size, b.size)
    if a.dense is not None:
        return _cross(b, a, w, same).transpose(-1, -2)
    if same:
        return _embed_blocks(_group_cross_products(a, w))
    return _cross_two_grouped(a, b, w).reshape(a.size, b.size)


def _group_cross_products(a: _Columns, w: Tensor) -> Tensor:
    """Σ_{i∈g} w_i x_i x_iᵀ for every group (m, k, k)."""
    outer = a.x.unsqueeze(-1) * _weigh(w, a.x).unsqueeze(-2)
    return _rescale(w, _segment_sum(a.codes, outer, a.m))


def _cross_blocked(b: _Columns, other: _Columns, w: Tensor) -> Tensor:
    """Z_bᵀ diag(w) Z_other for the blocked (Grouped) term b, (m_b, k_b, size_other)."""
    if other.dense is not None:
        return _cross_grouped(b, w, other.dense)
    return _cross_two_grouped(b, other, w)


def _dense_design(c: _Columns) -> Tensor:
    if c.dense is not None:
        return c.dense
    indicator = (c.codes.unsqueeze(-1) == torch.arange(c.m, device=c.codes.device)).to(c.x.dtype)
    return (indicator.unsqueeze(-1) * c.x.unsqueeze(-2)).reshape(c.codes.shape[-1], c.size)


def _times(c: _Columns, values: Tensor) -> Tensor:
    """Z_c v for v (size,) or (size, K) → (n,) or (n, K)."""
    if c.dense is not None:
        return c.dense @ values
    rows = values.reshape(c.m, c.k, *values.shape[1:])[c.codes]
    if rows.dim() == 2:
        return (c.x * rows).sum(-1)
    return (c.x.unsqueeze(-1) * rows).sum(-2)


def _transpose_times(c: _Columns, values: Tensor) -> Tensor:
    """Z_cᵀ v for v (n,) or (n, K) → (size,) or (size, K)."""
    if c.dense is not None:
        return c.dense.transpose(-1, -2) @ values
    if values.dim() == 1:
        return _segment_sum(c.codes, c.x * values.unsqueeze(-1), c.m).reshape(c.size)
    return _segment_sum(c.codes, c.x.unsqueeze(-1) * values.unsqueeze(-2), c.m).reshape(c.size, -1)


# ------------------------------------------------------------------------------------------------
# Per-call model pieces


class _Term(NamedTuple):
    """One random term at the current parameters."""

    path: str
    grouped: bool
    columns: _Columns
    child: object  # Σ (grouped) or G (dense)
    child_params: Mapping
    prefix: str  # parameter-name prefix of the child: "subject/cov", "gen/G"
    block: Tensor  # Σ (k×k) or G (q×q)
    lam: Tensor  # its factor Λ
    ok: Tensor


class _Residual(NamedTuple):
    """R = diag(r): r is 0-d (σ², R = σ²I: only Scalar/Identity children) or (n,) (a Diagonal
    child); each derivative ṙ = ∂r/∂θ has the same shape as r."""

    r: Tensor
    derivatives: list[tuple[str, Tensor]]


def _terms(s, params: Mapping, dtype, device) -> tuple[list[_Term], _Residual]:
    random, residual_parts = [], []
    for path, term, term_params in _leaves(s, params):
        kind = _kind(term)
        if kind == "grouped":
            child_params = term_params.get("cov", {})
            block = term.cov._build(child_params).to(dtype)
            lam, ok = _factor_block(block)
            columns = _grouped_columns(term, dtype)
            random.append(_Term(path, True, columns, term.cov, child_params, f"{path}/cov", block, lam, ok))
        elif kind == "dense":
            (z_name, g_name), (z, g) = term.names, term.children
            child_params = term_params.get(g_name, {})
            block = g._build(child_params).to(dtype)
            lam, ok = _factor_block(block)
            design = z._build(term_params.get(z_name, {})).to(dtype)
            columns = _Columns(design.shape[-1], dense=design)
            random.append(_Term(path, False, columns, g, child_params, f"{path}/{g_name}", block, lam, ok))
        else:
            residual_parts.append((path, term, term_params))
    return random, _residual(residual_parts, s.shape[0], dtype, device)


def _residual(parts, n: int, dtype, device) -> _Residual:
    from reml_fn.structures import Diagonal, Identity

    scalar = not any(isinstance(term, Diagonal) for _, term, _ in parts)
    ones = torch.ones(n, dtype=dtype, device=device)
    r = torch.zeros((), dtype=dtype, device=device) if scalar else torch.zeros(n, dtype=dtype, device=device)
    derivatives = []
    for path, term, term_params in parts:
        if isinstance(term, Identity):
            r = r + 1.0
            continue
        natural = term._natural(term_params)
        if isinstance(term, Diagonal):
            r = r + torch.stack([natural[spec.name] for spec in term.specs]).to(dtype)
        else:
            r = r + natural["sigma^2"].to(dtype) * (1.0 if scalar else ones)
        for i, spec in enumerate(term.specs):
            if spec.fixed:
                continue
            slope = spec.transform.derivative(term_params[spec.name]).to(dtype)
            if isinstance(term, Diagonal):
                slope = slope * F.one_hot(torch.tensor(i, device=device), n).to(dtype)
            elif not scalar:
                slope = slope * ones
            derivatives.append((f"{path}/{spec.name}", slope))
    return _Residual(r, derivatives)


# ------------------------------------------------------------------------------------------------
# Assembling and factorising Ω


class _Factor(NamedTuple):
    blocked: _Term | None
    rest: list[_Term]
    residual: _Residual
    w: Tensor  # 1/r
    X: Tensor  # (n, p)
    p: int
    lam_s: Tensor  # Λ of the dense block: blockdiag(Λ_rest, I_p)
    C_bb: Tensor | None  # (m, k, k)   Z_bᵀR⁻¹Z_b blocks
    C_bs: Tensor | None  # (m, k, d)   Z_bᵀR⁻¹[Z_rest, X]
    C_ss: Tensor  # (d, d)      [Z_rest, X]ᵀR⁻¹[Z_rest, X]
    L_bb: Tensor | None  # (m, k, k)
    F: Tensor | None  # (m, k, d)   L_bb⁻¹ Ω_bs
    L_ss: Tensor  # (d, d)
    u_b: Tensor | None  # (m, k) spherical effects ũ_b
    u_s: Tensor  # (d,) [ũ_rest, β̂]
    e: Tensor  # P y
    loglik: Tensor
    ok: Tensor


def _rest_sizes(rest: list[_Term]) -> int:
    return sum(t.columns.size for t in rest)


def _lam_full(term: _Term) -> Tensor:
    """Λ_t for all of the term's columns: I_m ⊗ Λ_Σ (grouped) or Λ_G (dense)."""
    if not term.grouped:
        return term.lam
    from reml_fn.combinators.products import kron

    eye = torch.eye(term.columns.m, dtype=term.lam.dtype, device=term.lam.device)
    return kron(eye, term.lam)


def _forward(fac: _Factor, rb: Tensor | None, rs: Tensor) -> tuple[Tensor | None, Tensor]:
    """L⁻¹ [rb; rs] for rb (m, k, c), rs (d, c), with L = [[L_bb, 0], [Fᵀ, L_ss]]."""
    if fac.blocked is None:
        return None, torch.linalg.solve_triangular(fac.L_ss, rs, upper=False)
    ab = torch.linalg.solve_triangular(fac.L_bb, rb, upper=False)
    as_ = torch.linalg.solve_triangular(fac.L_ss, rs - torch.einsum("gkd,gkc->dc", fac.F, ab), upper=False)
    return ab, as_


def _backward(fac: _Factor, ab: Tensor | None, as_: Tensor) -> tuple[Tensor | None, Tensor]:
    """L⁻ᵀ [ab; as]."""
    zs = torch.linalg.solve_triangular(fac.L_ss.transpose(-1, -2), as_, upper=True)
    if fac.blocked is None:
        return None, zs
    zb = torch.linalg.solve_triangular(
        fac.L_bb.transpose(-1, -2), ab - torch.einsum("gkd,dc->gkc", fac.F, zs), upper=True
    )
    return zb, zs


def _log_diag_sum(L: Tensor) -> Tensor:
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def _factorize(s, params: Mapping, y: Tensor, X: Tensor) -> _Factor:
    n, p = y.shape[-1], X.shape[-1]
    dtype = y.dtype
    random, residual = _terms(s, params, dtype, y.device)
    grouped = [i for i, t in enumerate(random) if t.grouped]
    # The Grouped term with the most groups is factorised block by block; the rest is dense.
    blocked_index = max(grouped, key=lambda i: random[i].columns.m) if grouped else None
    blocked = random[blocked_index] if blocked_index is not None else None
    rest = [t for i, t in enumerate(random) if i != blocked_index]
    q_rest = _rest_sizes(rest)
    d = q_rest + p

    positive = (residual.r > 0).all()
    r = torch.where(residual.r > 0, residual.r, torch.ones_like(residual.r))
    w = 1.0 / r  # 0-d when R = σ²I: products are then formed unweighted and rescaled
    # y-free cross products first, so that under vmap over y only the y columns are batched.
    # X and the blocked term's covariates side by side: one pass gives Z_bᵀR⁻¹[X, Z_b].
    stacked = torch.cat([X] + ([blocked.columns.x] if blocked is not None else []), dim=-1)
    s_columns = [t.columns for t in rest] + [_Columns(p, dense=stacked[..., :p])]
    rows = []
    for i, a in enumerate(s_columns):
        rows.append(torch.cat([_cross(a, b, w, i == j) for j, b in enumerate(s_columns)], dim=-1))
    C_ss = torch.cat(rows, dim=-2)  # (d, d)
    wy = _weigh(w, y)
    c_sy = torch.cat([_transpose_times(t.columns, wy) for t in rest] + [X.transpose(-1, -2) @ wy], dim=-1)
    c_sy = _rescale(w, c_sy)  # (d,)
    eye_p = torch.eye(p, dtype=dtype, device=y.device)
    lam_s = _block_diag([_lam_full(t) for t in rest] + [eye_p])  # (d, d)
    unit = torch.cat([torch.ones(q_rest, dtype=dtype), torch.zeros(p, dtype=dtype)]).to(y.device)
    omega_ss = lam_s.transpose(-1, -2) @ C_ss @ lam_s + torch.diag_embed(unit)
    rhs_s = lam_s.transpose(-1, -2) @ c_sy

    ok = positive
    for t in random:
        ok = ok & t.ok
    if blocked is not None:
        bc = blocked.columns
        with_x = _cross_grouped(bc, w, stacked)  # (m, k, p + k)
        C_bb = with_x[..., p:]
        C_bs = torch.cat([_cross_blocked(bc, t.columns, w) for t in rest] + [with_x[..., :p]], dim=-1)  # (m, k, d)
        c_by = _rescale(w, _segment_sum(bc.codes, bc.x * wy.unsqueeze(-1), bc.m))  # (m, k)
        lam = blocked.lam
        eye_k = torch.eye(bc.k, dtype=dtype, device=y.device)
        M_bb = lam.transpose(-1, -2) @ C_bb @ lam + eye_k
        E = lam.transpose(-1, -2) @ C_bs @ lam_s  # (m, k, d)
        L_bb, info_b = torch.linalg.cholesky_ex(M_bb)
        ok_b = info_b == 0
        L_bb = torch.where(ok_b[..., None, None], L_bb, eye_k)
        ok = ok & ok_b.all(-1)
        F_ = torch.linalg.solve_triangular(L_bb, E, upper=False)
        schur = omega_ss - torch.einsum("gkd,gke->de", F_, F_)
        rhs_b = (c_by @ lam).unsqueeze(-1)  # Λ_bᵀ Z_bᵀR⁻¹y by group, (m, k, 1)
    else:
        C_bb = C_bs = L_bb = F_ = rhs_b = None
        schur = omega_ss
    L_ss, info_s = torch.linalg.cholesky_ex(schur)
    ok_s = info_s == 0
    L_ss = torch.where(ok_s, L_ss, torch.eye(d, dtype=dtype, device=y.device))
    ok = ok & ok_s
    partial = _Factor(blocked, rest, residual, w, X, p, lam_s, C_bb, C_bs, C_ss, L_bb, F_, L_ss, None, None, y, y, ok)
    ab, as_ = _forward(partial, rhs_b, rhs_s.unsqueeze(-1))
    zb, zs = _backward(partial, ab, as_)
    u_b = zb.squeeze(-1) if zb is not None else None
    u_s = zs.squeeze(-1)

    # Residual y − Xβ̂ − Σ Z_t Λ_t ũ_t, e = R⁻¹ residual = P y, yᵀPy = ‖R^{-½} residual‖² + ‖ũ‖².
    fitted = X @ u_s[..., q_rest:]
    penalty = (u_s[..., :q_rest] ** 2).sum(-1)
    offset = 0
    for t in rest:
        size = t.columns.size
        fitted = fitted + _times(t.columns, _lam_full(t) @ u_s[..., offset : offset + size])
        offset += size
    if blocked is not None:
        fitted = fitted + _times(blocked.columns, (u_b @ blocked.lam.transpose(-1, -2)).reshape(-1))
        penalty = penalty + (u_b**2).sum((-1, -2))
    residual_vector = y - fitted
    e = w * residual_vector
    pwrss = (e * residual_vector).sum(-1) + penalty

    log_det_r = n * torch.log(r) if r.dim() == 0 else torch.log(r).sum(-1)
    log_det_v = log_det_r + 2.0 * _log_diag_sum(L_ss[..., :q_rest, :q_rest])
    if blocked is not None:
        log_det_v = log_det_v + 2.0 * _log_diag_sum(L_bb).sum(-1)
    log_det_xvx = 2.0 * _log_diag_sum(L_ss[..., q_rest:, q_rest:])
    value = -0.5 * (log_det_v + log_det_xvx + pwrss) - 0.5 * (n - p) * math.log(2.0 * math.pi)
    loglik = torch.where(ok, value, torch.full_like(value, -math.inf))
    return partial._replace(u_b=u_b, u_s=u_s, e=e, loglik=loglik)


def _effects(fac: _Factor) -> dict[str, Tensor]:
    """û per term path: (m, k) for Grouped terms, (q,) for Propagate terms."""
    out = {}
    if fac.blocked is not None:
        out[fac.blocked.path] = fac.u_b @ fac.blocked.lam.transpose(-1, -2)
    offset = 0
    for t in fac.rest:
        size = t.columns.size
        spherical = fac.u_s[..., offset : offset + size]
        if t.grouped:
            out[t.path] = spherical.reshape(t.columns.m, t.columns.k) @ t.lam.transpose(-1, -2)
        else:
            out[t.path] = t.lam @ spherical
        offset += size
    return out


# ------------------------------------------------------------------------------------------------
# Traces of P V̇ and the AI matrix


def _ztpz_blocked(fac: _Factor) -> Tensor:
    """Σ_g (Z_bᵀPZ_b)_gg (k×k) for the blocked term: Σ_g C_g − Σ_g (UᵀΩ⁻¹U)_gg."""
    b, d = fac.blocked, fac.L_ss.shape[-1]
    m, k = b.columns.m, b.columns.k
    # Columns of U = WᵀR⁻¹Z_b for group g: blocked rows Λ_bᵀC_g (only block g), dense rows (C_bs Λ_s)_gᵀ.
    ab = torch.linalg.solve_triangular(fac.L_bb, b.lam.transpose(-1, -2) @ fac.C_bb, upper=False)  # (m,k,k)
    dense_rows = (fac.C_bs @ fac.lam_s).permute(2, 0, 1)  # (d, m, k)
    dense_rows = dense_rows - torch.einsum("gkd,gkl->dgl", fac.F, ab)
    as_ = torch.linalg.solve_triangular(fac.L_ss, dense_rows.reshape(d, m * k), upper=False).reshape(d, m, k)
    return fac.C_bb.sum(0) - torch.einsum("gkl,gkj->lj", ab, ab) - torch.einsum("dgk,dgl->kl", as_, as_)


def _ztpz_rest(fac: _Factor) -> Tensor:
    """(Z_restᵀ P Z_rest) (q_rest × q_rest), dense."""
    q_rest = _rest_sizes(fac.rest)
    rs = fac.lam_s.transpose(-1, -2) @ fac.C_ss[..., :q_rest]  # (d, q_rest)
    rb = None
    if fac.blocked is not None:
        rb = fac.blocked.lam.transpose(-1, -2) @ fac.C_bs[..., :q_rest]  # (m, k, q_rest)
    ab, as_ = _forward(fac, rb, rs)
    quadratic = as_.transpose(-1, -2) @ as_
    if ab is not None:
        quadratic = quadratic + torch.einsum("gkc,gke->ce", ab, ab)
    return fac.C_ss[..., :q_rest, :q_rest] - quadratic


def _diag_p(fac: _Factor, n: int) -> Tensor:
    """P_ii = 1/r_i − ‖L⁻¹ w_i‖² / r_i² for every row w_i of W = [ZΛ, X] (n,)."""
    d = fac.L_ss.shape[-1]
    dense_rows = torch.cat([_dense_design(t.columns) @ _lam_full(t) for t in fac.rest] + [fac.X], dim=-1)  # (n, d)
    quadratic = 0.0
    if fac.blocked is not None:
        b = fac.blocked
        rows_b = b.columns.x @ b.lam  # (n, k): (Λ_bᵀ x_i)ᵀ
        ab = torch.linalg.solve_triangular(fac.L_bb[b.columns.codes], rows_b.unsqueeze(-1), upper=False)
        ab = ab.squeeze(-1)  # (n, k)
        dense_rows = dense_rows - torch.einsum("nkd,nk->nd", fac.F[b.columns.codes], ab)
        quadratic = (ab**2).sum(-1)
    as_ = torch.linalg.solve_triangular(fac.L_ss, dense_rows.transpose(-1, -2).reshape(d, n), upper=False)
    quadratic = quadratic + (as_**2).sum(-2)
    return fac.w - fac.w**2 * quadratic


class _Variates(NamedTuple):
    """The working variates v_j = V̇_j P y of the random-term parameters, v_j = Z a_j, by their
    random-effect-space coefficients a_j: ``blocked`` (m, k, K) and ``rest`` (q_rest, K)."""

    blocked: Tensor | None
    rest: Tensor


def _stack_columns(columns: list[Tensor], shape: tuple, like: Tensor) -> Tensor:
    if not columns:
        return like.new_zeros((*shape, 0))
    return torch.stack(columns, dim=-1)


def _score_and_ai(fac: _Factor, s, params: Mapping, y: Tensor, method: str) -> tuple[Tensor, Tensor]:
    n, p = y.shape[-1], fac.p
    e, w = fac.e, fac.w
    q_rest = _rest_sizes(fac.rest)
    quadratic, traces = {}, {}
    random_names, blocked_columns, rest_columns = [], [], []
    trace_g_ztpz = torch.zeros((), dtype=y.dtype, device=y.device)  # Σ_t tr(G_t Z_tᵀPZ_t)
    ze_blocked, ze_rest = None, []  # Z_tᵀ P y = Z_tᵀ e per term
    rest_ztpz = _ztpz_rest(fac) if fac.rest else None
    offset = 0
    for t in ([fac.blocked] if fac.blocked is not None else []) + list(fac.rest):
        c = t.columns
        if t is fac.blocked:
            ztpz = _ztpz_blocked(fac)
            ze = _segment_sum(c.codes, c.x * e.unsqueeze(-1), c.m)  # (m, k)
            ze_blocked = ze
        else:
            ztpz = rest_ztpz[..., offset : offset + c.size, offset : offset + c.size]
            if t.grouped:  # Σ over groups of the k×k diagonal blocks
                ztpz = torch.diagonal(ztpz.reshape(c.m, c.k, c.m, c.k), dim1=0, dim2=2).sum(-1)
            ze = _transpose_times(c, e)  # (q_t,)
            ze_rest.append(ze)
        trace_g_ztpz = trace_g_ztpz + (t.block * ztpz.transpose(-1, -2)).sum((-1, -2))
        derivatives = list(_flatten_tree(_child_derivatives(t.child, t.child_params, method), t.prefix))
        for name, derivative in derivatives:
            derivative = derivative.to(y.dtype)
            if t.grouped:
                blocks = ze.reshape(c.m, c.k)
                a = blocks @ derivative.transpose(-1, -2)  # row g: Σ̇ ze_g, (m, k)
                quadratic[name] = (a * blocks).sum((-1, -2))
            else:
                a = derivative @ ze
                quadratic[name] = (a * ze).sum(-1)
            traces[name] = (derivative * ztpz.transpose(-1, -2)).sum((-1, -2))
            random_names.append(name)
            if t is fac.blocked:
                blocked_columns.append(a)
                rest_columns.append(y.new_zeros(q_rest))
            else:
                if fac.blocked is not None:
                    blocked_columns.append(y.new_zeros(fac.blocked.columns.m, fac.blocked.columns.k))
                rest_columns.append(F.pad(a.reshape(c.size), (offset, q_rest - offset - c.size)))
        if t is not fac.blocked:
            offset += c.size
    blocked_shape = (fac.blocked.columns.m, fac.blocked.columns.k) if fac.blocked is not None else ()
    variates = _Variates(
        _stack_columns(blocked_columns, blocked_shape, y) if fac.blocked is not None else None,
        _stack_columns(rest_columns, (q_rest,), y),
    )

    residual = fac.residual
    residual_names = [name for name, _ in residual.derivatives]
    if residual.r.dim() == 0:
        # R = σ²I: every residual variate is a multiple ṙ_j e of e = Py; tr(P) from tr(PV) = n − p.
        trace_p = (n - p - trace_g_ztpz) / torch.where(residual.r > 0, residual.r, torch.ones_like(residual.r))
        squares = (e * e).sum(-1)
        for name, dr in residual.derivatives:
            quadratic[name], traces[name] = dr * squares, dr * trace_p
        residual_vectors = e.unsqueeze(-1)
        ze_r_blocked = ze_blocked.unsqueeze(-1) * w if ze_blocked is not None else None
        ze_r_rest = torch.cat([z * w for z in ze_rest]).unsqueeze(-1) if ze_rest else y.new_zeros(0, 1)
        gram_rr = (squares * w).reshape(1, 1)
        mixing_residual = [dr.reshape(1) for _, dr in residual.derivatives]
    else:
        diag_p = _diag_p(fac, n) if residual.derivatives else None
        for name, dr in residual.derivatives:
            quadratic[name], traces[name] = (dr * e * e).sum(-1), (dr * diag_p).sum(-1)
        residual_vectors = _stack_columns([dr * e for _, dr in residual.derivatives], (n,), y)
        weighted = w.unsqueeze(-1) * residual_vectors
        ze_r_blocked, ze_r_rest = None, y.new_zeros(0, residual_vectors.shape[-1])
        if fac.blocked is not None:
            b = fac.blocked.columns
            ze_r_blocked = _segment_sum(b.codes, b.x.unsqueeze(-1) * weighted.unsqueeze(-2), b.m)
        if fac.rest:
            ze_r_rest = torch.cat([_transpose_times(t.columns, weighted) for t in fac.rest], dim=-2)
        gram_rr = residual_vectors.transpose(-1, -2) @ weighted
        count = len(residual.derivatives)
        mixing_residual = list(torch.eye(count, dtype=y.dtype, device=y.device))

    names = param_names(s)
    if not names:
        return y.new_zeros(0), y.new_zeros(0, 0)
    score = 0.5 * (torch.stack([quadratic[k] for k in names]) - torch.stack([traces[k] for k in names]))
    inner = _p_inner_products(fac, variates, residual_vectors, ze_r_blocked, ze_r_rest, gram_rr)
    # Each parameter's working variate as a combination of the columns [Z a_1 … Z a_K, residual vectors].
    K_random, K_columns = len(random_names), inner.shape[-1]
    unit_rows = torch.eye(K_columns, dtype=y.dtype, device=y.device)
    rows = {name: unit_rows[j] for j, name in enumerate(random_names)}
    for name, mix in zip(residual_names, mixing_residual):
        rows[name] = F.pad(mix, (K_random, 0))
    mixing = torch.stack([rows[k] for k in names])  # (K, K_columns)
    ai = 0.5 * mixing @ inner @ mixing.transpose(-1, -2)
    ai = 0.5 * (ai + ai.transpose(-1, -2))
    return score, ai


def _p_inner_products(fac: _Factor, variates: _Variates, residual_vectors, ze_r_blocked, ze_r_rest, gram_rr) -> Tensor:
    """SᵀPS for the columns S = [Z A, V_r] (random-term variates by their coefficients A, then the
    residual variates V_r (n, K_r)) as SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖², from q-space quantities:
    ZᵀR⁻¹Z A from the cross products, and ZᵀR⁻¹V_r (``ze_r_*``), V_rᵀR⁻¹V_r (``gram_rr``) given."""
    q_rest, d = _rest_sizes(fac.rest), fac.L_ss.shape[-1]
    A_b, A_r = variates
    C_rr = fac.C_ss[..., :q_rest, :q_rest]
    C_xr = fac.C_ss[..., q_rest:d, :q_rest]
    CA_r = C_rr @ A_r  # ZᵀR⁻¹Z A, rest rows
    XA = C_xr @ A_r  # XᵀR⁻¹Z A
    if fac.blocked is not None:
        C_b_rest, C_b_x = fac.C_bs[..., :q_rest], fac.C_bs[..., q_rest:d]
        CA_b = fac.C_bb @ A_b + torch.einsum("gkc,cj->gkj", C_b_rest, A_r)
        CA_r = CA_r + torch.einsum("gkc,gkj->cj", C_b_rest, A_b)
        XA = XA + torch.einsum("gkx,gkj->xj", C_b_x, A_b)
    gram_aa = A_r.transpose(-1, -2) @ CA_r
    gram_ar = A_r.transpose(-1, -2) @ ze_r_rest
    if fac.blocked is not None:
        gram_aa = gram_aa + torch.einsum("gkj,gkl->jl", A_b, CA_b)
        gram_ar = gram_ar + torch.einsum("gkj,gkl->jl", A_b, ze_r_blocked)
    gram = torch.cat(
        [torch.cat([gram_aa, gram_ar], dim=-1), torch.cat([gram_ar.transpose(-1, -2), gram_rr], dim=-1)], dim=-2
    )
    x = fac.X
    x_r = _rescale(fac.w, x.transpose(-1, -2) @ _weigh(fac.w, residual_vectors))  # XᵀR⁻¹V_r
    rs = fac.lam_s.transpose(-1, -2) @ torch.cat(
        [torch.cat([CA_r, ze_r_rest], dim=-1), torch.cat([XA, x_r], dim=-1)], dim=-2
    )
    rb = None
    if fac.blocked is not None:
        rb = fac.blocked.lam.transpose(-1, -2) @ torch.cat([CA_b, ze_r_blocked], dim=-1)
    ab, as_ = _forward(fac, rb, rs)
    projection = as_.transpose(-1, -2) @ as_
    if ab is not None:
        projection = projection + torch.einsum("gkj,gkl->jl", ab, ab)
    return gram - projection


# ------------------------------------------------------------------------------------------------
# The engine


class MMEEngine:
    """Henderson's mixed-model equations in lme4's spherical form (see the module docstring).

    Supports ``Sum``s (nested allowed) of Grouped terms, Propagate terms with a ``Fixed`` Z, and
    at least one residual term that is ``Scalar``, ``Identity`` or ``Diagonal``; the dense part
    (all random columns except the largest Grouped term's) must have at most n/2 columns.
    """

    name = "mme"

    def supports(self, s) -> bool:
        layout = _layout(s)
        if layout is None:
            return False
        random = [term for _, term in layout[0]]
        grouped = [term for term in random if _kind(term) == "grouped"]
        total = sum(term.q if _kind(term) == "grouped" else term.children[0].shape[1] for term in random)
        blocked = max(grouped, key=lambda term: term.num_groups).q if grouped else 0
        return total - blocked <= s.shape[0] // 2

    def loglik(self, s, params, y, X) -> Tensor:
        return _factorize(s, params, y, X).loglik

    def ai_terms(self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None) -> AITerms:
        """Exact traces always (``trace="hutchpp"`` is accepted and computed exactly: they are cheap here)."""
        if trace not in ("exact", "hutchpp"):
            raise ValueError(f"unknown trace method {trace!r}; expected 'exact' or 'hutchpp'")
        fac = _factorize(s, params, y, X)
        score, ai = _score_and_ai(fac, s, params, y, jacobian)
        nan = torch.full_like(fac.loglik, math.nan)
        score = torch.where(fac.ok, score, nan)
        ai = torch.where(fac.ok, ai, nan)
        beta = torch.where(fac.ok, fac.u_s[..., _rest_sizes(fac.rest) :], nan)
        return AITerms(fac.loglik, score, ai, beta)

    def jacobian_traces(self, s, params, jacobian="closed") -> Tensor:
        """tr(∂V/∂θ_k) (k,) in O(n·k²): tr(Σ̇ Σ_i x_i x_iᵀ) for a Grouped term, tr(Ġ ZᵀZ) for a
        Propagate term, Σ_i ṙ_i for the residual."""
        leaf = first_leaf(params)
        dtype = leaf.dtype if leaf is not None else torch.get_default_dtype()
        random, residual = _terms(s, params, dtype, leaf.device if leaf is not None else None)
        traces = {}
        for t in random:
            c = t.columns
            gram = c.x.transpose(-1, -2) @ c.x if t.grouped else c.dense.transpose(-1, -2) @ c.dense
            for name, derivative in _flatten_tree(_child_derivatives(t.child, t.child_params, jacobian), t.prefix):
                traces[name] = (derivative.to(dtype) * gram.transpose(-1, -2)).sum((-1, -2))
        n = s.shape[0]
        for name, dr in residual.derivatives:
            traces[name] = n * dr if dr.dim() == 0 else dr.sum(-1)
        names = param_names(s)
        return torch.stack([traces[k] for k in names]) if names else torch.zeros(0, dtype=dtype)

    def gls(self, s, params, y, X) -> tuple[Tensor, Tensor]:
        """β̂ and (XᵀV⁻¹X)⁻¹ from the last p×p block of the factor."""
        fac = _factorize(s, params, y, X)
        q_rest = _rest_sizes(fac.rest)
        nan = torch.full_like(fac.loglik, math.nan)
        beta = torch.where(fac.ok, fac.u_s[..., q_rest:], nan)
        vcov = torch.where(fac.ok, torch.cholesky_inverse(fac.L_ss[..., q_rest:, q_rest:]), nan)
        return beta, vcov

    def random_effects(self, s, params, y, X) -> dict[str, Tensor]:
        """û = Λũ per term path: (m, k) for Grouped terms, (q,) for Propagate terms."""
        return _effects(_factorize(s, params, y, X))

    def fitted_random(self, s, params, y, X) -> Tensor:
        """Σ_t Z_t û_t (n,)."""
        fac = _factorize(s, params, y, X)
        effects = _effects(fac)
        total = torch.zeros_like(y)
        for t in ([fac.blocked] if fac.blocked is not None else []) + list(fac.rest):
            total = total + _times(t.columns, effects[t.path].reshape(t.columns.size))
        return total


register_engine("mme", MMEEngine(), prefer=True)
