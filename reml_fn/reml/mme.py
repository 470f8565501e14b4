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
        (so log|V| + log|XᵀV⁻¹X| = log|R| + 2 Σ log L_ii over all pivots)
    yᵀPy = ‖R^{-½}(y − Xβ̂ − ZΛũ)‖² + ‖ũ‖²          (penalised residual sum of squares)
    P y = e = R⁻¹(y − Xβ̂ − Zû),  û = Λũ             (the BLUPs)
    P = R⁻¹ − R⁻¹ W Ω⁻¹ Wᵀ R⁻¹.

**Block structure.** The Grouped term with the most groups is the *blocked* term b: its part of
Ω is block diagonal (m blocks of k×k, M_g = ``I + Λ_bᵀ (Σ_{i∈g} x_i x_iᵀ/r_i) Λ_b``), factorised
by a batched k×k Cholesky M_g = L_g L_gᵀ whose inverses L_g⁻¹ are then applied by matmuls (M_g ⪰ I,
so ‖L_g⁻¹‖ ≤ 1 and the explicit inverse is as accurate as a triangular solve). The other random
terms and X form a dense block s of size d = q_rest + p, factorised after the Schur complement
S = Ω_ss − Σ_g F_gᵀF_g, F_g = L_g⁻¹ Ω_{g,s}. All cross products are segment sums (``index_add``)
over observations: O(n·(k + d)²) to form, O(m·k³ + d³) to factor; memory
O(n·(k + d) + m·k·d + d²).

**Score and AI** (raw parameters θ_j; V̇_j = Z_t (I ⊗ Σ̇_t) Z_tᵀ, Z_t Ġ_t Z_tᵀ or diag(ṙ)):

    s_j = ½ (eᵀ V̇_j e − tr(P V̇_j))
    eᵀV̇_j e = (Z_tᵀe)ᵀ Ġ_t (Z_tᵀe)   or   Σ_i ṙ_i e_i²
    tr(P Z_t Ġ_t Z_tᵀ) = tr(Ġ_t · Z_tᵀPZ_t),   ZᵀPZ = ZᵀR⁻¹Z − UᵀΩ⁻¹U,  U = WᵀR⁻¹Z
        so s_j = ½ tr(Ġ_t (Z_tᵀe eᵀZ_t − Z_tᵀPZ_t)) for a random-term parameter (for a Grouped
        term only Σ_g of the k×k diagonal blocks of both matrices is needed)
    tr(P diag(ṙ)) = ṙ · tr(P),  tr(P) = (n − p − Σ_t tr(G_t Z_tᵀPZ_t)) / σ²   when R = σ²I
        (from tr(PV) = n − p), else Σ_i ṙ_i P_ii with P_ii = 1/r_i − ‖L⁻¹w_i‖²/r_i² (w_i: row i of W)
    AI_jl = ½ v_jᵀ P v_l with the working variates v_j = V̇_j e, never formed as n-vectors for
        random-term parameters: v_j = Z a_j with a_j = Ġ_j Z_tᵀe (q-space). With S = [Z A, V_r]
        (V_r = [ṙ_j ∘ e]: the residual variates; e ṙᵀ when R = σ²I, and then XᵀR⁻¹V_r = 0 since
        XᵀPy = 0) SᵀPS = SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖², where SᵀR⁻¹S and WᵀR⁻¹S come from the cross
        products (AᵀZᵀR⁻¹ZA, AᵀZᵀR⁻¹e = w·Aᵀ(Zᵀe), eᵀR⁻¹e) plus, for a Diagonal R, one pass over V_r.

The cost per ``ai_terms`` call is one pass over the data for the cross products and the
residuals (O(n·(k + d)²)) and q-space algebra for everything else (O(m·k²·K + d²·(m·k + K))).
Subtractions such as ZᵀR⁻¹Z − UᵀΩ⁻¹U lose about log₁₀(n_g·σ_b²/σ²) digits when group sizes
n_g and variance ratios are extreme; the dense engine's P loses as much (the two still agree to
1e-8 at n_g·σ_b²/σ² = 5·10⁸).

At small n a call costs the number of tensor operations it makes (a few µs each), not flops, so
the code avoids einsum on tiny tensors, computes each cross product once per call and skips the
parts a model does not have (no rest, no residual parameters) instead of forming empty tensors.

**Fast path.** lme4's most common model — one Grouped term and a Scalar (or Identity) residual —
goes to :mod:`reml_fn.reml.one_factor`, which works from sufficient statistics computed once per
dataset (:meth:`MMEEngine.prepare`; the fit loops pass them back as ``prepared=``) and needs about
a third of this path's operations per call. Everything else (crossed or nested factors, Propagate
terms, Diagonal residuals) runs the general code below.

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

from reml_fn.combinators import Grouped, Propagate, Sum
from reml_fn.combinators.products import kron
from reml_fn.params import param_names
from reml_fn.reml import one_factor
from reml_fn.reml.covariance_blocks import (
    PSD_CHOLESKY_MAX_SIZE,
    Residual,
    cast,
    concat,
    derivative_stack,
    group_inner,
    plus,
    psd_cholesky,
    residual_variance,
)
from reml_fn.reml.dense import AITerms, inverse_from_cholesky
from reml_fn.reml.engines import register_engine
from reml_fn.reml.grouped_form import grouped_form, grouped_params, propagate_effects
from reml_fn.structures import Diagonal, Fixed, Identity, Scalar
from reml_fn.structures.base import first_leaf

__all__ = ["MMEEngine", "psd_cholesky", "PSD_CHOLESKY_MAX_SIZE"]

# ------------------------------------------------------------------------------------------------
# Small pieces


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
    """blockdiag(blocks) of (possibly rectangular) blocks by zero padding (vmappable, unlike
    ``torch.block_diag``)."""
    total, start, bands = sum(b.shape[-1] for b in blocks), 0, []
    for block in blocks:
        size = block.shape[-1]
        bands.append(F.pad(block, (start, total - start - size)))
        start += size
    return concat(bands, dim=-2)


def _embed_blocks(blocks: Tensor) -> Tensor:
    """(m, k, k) diagonal blocks → the dense (m·k, m·k) block-diagonal matrix."""
    m, k = blocks.shape[-3], blocks.shape[-1]
    eye = torch.eye(m, dtype=blocks.dtype, device=blocks.device)
    return (blocks.unsqueeze(-2) * eye[:, None, :, None]).reshape(m * k, m * k)


# ------------------------------------------------------------------------------------------------
# What the structure looks like (static)


def _leaves(s, params: Mapping, prefix: str = "") -> Iterator[tuple[str, object, Mapping]]:
    """The non-Sum terms of nested Sums: ``(path, structure, its params)``."""
    if isinstance(s, Sum):
        for name, child in s.items():
            yield from _leaves(child, params.get(name, {}), f"{prefix}{name}/")
    else:
        yield prefix.rstrip("/"), s, params


def _kind(term) -> str | None:
    if isinstance(term, Grouped):
        return "grouped"
    if isinstance(term, Propagate) and isinstance(term.children[0], Fixed):
        return "dense"
    if isinstance(term, (Scalar, Identity, Diagonal)):
        return "residual"
    return None


def _layout(s) -> tuple[list, list] | None:
    """``(random, residual)`` lists of ``(path, term)``, or None when the MME cannot handle ``s``."""
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
    return _Columns(term.q, term.codes, cast(term.covariates, dtype), term.num_groups, term.k)


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
    return _expand(c, values.reshape(c.m, c.k, *values.shape[1:]))


def _expand(c: _Columns, effects: Tensor) -> Tensor:
    """Z_c u for a Grouped term's effects u (m, k) or (m, k, K): row i gets x_iᵀ u_{g_i}."""
    rows = effects.index_select(0, c.codes)
    if rows.dim() == 2:
        return torch.linalg.vecdot(c.x, rows)
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
    block: Tensor  # Σ (k×k) or G (q×q)
    lam: Tensor  # its factor Λ
    ok: Tensor
    names: list[str]  # its free parameters (those of Σ or G), in the order of ``derivatives``
    derivatives: Tensor | None  # Σ̇ (K, k, k) or Ġ (K, q, q); None without free parameters


def _terms(s, params: Mapping, dtype, device, method: str | None = None) -> tuple[list[_Term], Residual]:
    """The random terms and the residual at ``params``; the derivatives of Σ_t / G_t only when a
    Jacobian ``method`` is given."""
    random, residual_parts = [], []
    for path, term, term_params in _leaves(s, params):
        kind = _kind(term)
        if kind == "residual":
            residual_parts.append((path, term, term_params))
            continue
        if kind == "grouped":
            child, child_params, prefix = term.cov, term_params.get("cov", {}), f"{path}/cov"
            columns = _grouped_columns(term, dtype)
        else:
            (z_name, g_name), (z, child) = term.names, term.children
            child_params, prefix = term_params.get(g_name, {}), f"{path}/{g_name}"
            design = cast(z._build(term_params.get(z_name, {})), dtype)
            columns = _Columns(design.shape[-1], dense=design)
        block = cast(child._build(child_params), dtype)
        lam, ok = _factor_block(block)
        names, derivatives = derivative_stack(child, child_params, prefix, method, dtype)
        random.append(_Term(path, kind == "grouped", columns, block, lam, ok, names, derivatives))
    return random, residual_variance(residual_parts, s.shape[0], dtype, device, method is not None)


# ------------------------------------------------------------------------------------------------
# Assembling and factorising Ω
#
# Rows and columns of Ω (and of the cross products C = TᵀR⁻¹T of the unscaled design
# T = [Z_b, Z_rest, X], W = TΛ_full) come in two parts: the blocked term's, by group (m, k, ·),
# and the dense part (d, ·). :class:`_Split` carries a matrix with rows split that way.


class _Factor(NamedTuple):
    blocked: _Term | None
    rest: list[_Term]
    residual: Residual
    w: Tensor  # 1/r
    X: Tensor  # (n, p)
    lam_s: Tensor | None  # Λ_s = blockdiag(Λ_rest, I_p); None when there is no rest (Λ_s = I)
    C_bb: Tensor | None  # (m, k, k)   Z_bᵀR⁻¹Z_b blocks
    C_bs: Tensor | None  # (m, k, d)   Z_bᵀR⁻¹[Z_rest, X]
    C_ss: Tensor  # (d, d)      [Z_rest, X]ᵀR⁻¹[Z_rest, X]
    L_bb_inv: Tensor | None  # (m, k, k) L_g⁻¹ for the blocks L_g of the blocked term's factor
    F: Tensor | None  # (m, k, d)   L_bb⁻¹ Ω_bs
    L_ss: Tensor  # (d, d)
    u_b: Tensor | None  # (m, k) spherical effects ũ_b
    u_s: Tensor  # (d,) [ũ_rest, β̂]
    e: Tensor  # P y
    loglik: Tensor
    ok: Tensor


class _Split(NamedTuple):
    """A matrix with rows indexed like the columns of T = [Z_b, Z_rest, X]: ``blocked`` (m, k, c)
    for the blocked term's, ``dense`` (d, c) for the others; None stands for a zero part."""

    blocked: Tensor | None
    dense: Tensor | None


def _rest_sizes(rest: list[_Term]) -> int:
    return sum(t.columns.size for t in rest)


def _lam_full(term: _Term) -> Tensor:
    """Λ_t for all of the term's columns: I_m ⊗ Λ_Σ (grouped) or Λ_G (dense)."""
    if not term.grouped:
        return term.lam
    eye = torch.eye(term.columns.m, dtype=term.lam.dtype, device=term.lam.device)
    return kron(eye, term.lam)


def _times_lam_s(a: Tensor, lam_s: Tensor | None) -> Tensor:
    """a Λ_s (Λ_s = I when there is no rest)."""
    return a if lam_s is None else a @ lam_s


def _lam_transpose_times(fac: _Factor, a: _Split) -> _Split:
    """Λ_fullᵀ a: from products with T to products with W = TΛ_full."""
    blocked = dense = None
    if a.blocked is not None:
        blocked = fac.blocked.lam.mT @ a.blocked
    if a.dense is not None:
        dense = a.dense if fac.lam_s is None else fac.lam_s.mT @ a.dense
    return _Split(blocked, dense)


def _cross_times(fac: _Factor, a: _Split) -> _Split:
    """C a = TᵀR⁻¹T a from the cross products."""
    blocked = dense = None
    if a.blocked is not None:
        blocked, dense = fac.C_bb @ a.blocked, group_inner(fac.C_bs, a.blocked)
    if a.dense is not None:
        dense = plus(dense, fac.C_ss @ a.dense)
        if fac.blocked is not None:
            blocked = plus(blocked, fac.C_bs @ a.dense)
    return _Split(blocked, dense)


def _inner(a: _Split, b: _Split) -> Tensor:
    """aᵀb (c_a, c_b) over both parts (at least one part must be present in both)."""
    blocked = group_inner(a.blocked, b.blocked) if a.blocked is not None and b.blocked is not None else None
    dense = a.dense.mT @ b.dense if a.dense is not None and b.dense is not None else None
    return plus(blocked, dense)


def _columns(a: _Split, b: _Split) -> _Split:
    """[a, b] side by side (a has a dense part; one missing from b is zero)."""
    blocked = None if a.blocked is None else torch.cat([a.blocked, b.blocked], dim=-1)
    dense = F.pad(a.dense, (0, b.blocked.shape[-1])) if b.dense is None else torch.cat([a.dense, b.dense], dim=-1)
    return _Split(blocked, dense)


def _forward(fac: _Factor, a: _Split) -> _Split:
    """L⁻¹ a with L = [[L_bb, 0], [Fᵀ, L_ss]] (a.dense may be None: zero)."""
    if fac.blocked is None or a.blocked is None:
        return _Split(None, torch.linalg.solve_triangular(fac.L_ss, a.dense, upper=False))
    blocked = fac.L_bb_inv @ a.blocked
    projected = group_inner(fac.F, blocked)
    dense = -projected if a.dense is None else a.dense - projected
    return _Split(blocked, torch.linalg.solve_triangular(fac.L_ss, dense, upper=False))


def _backward(fac: _Factor, a: _Split) -> _Split:
    """L⁻ᵀ a."""
    dense = torch.linalg.solve_triangular(fac.L_ss.mT, a.dense, upper=True)
    if fac.blocked is None:
        return _Split(None, dense)
    return _Split(fac.L_bb_inv.mT @ (a.blocked - fac.F @ dense), dense)


def _p_gram(fac: _Factor, gram: Tensor, cross: _Split) -> Tensor:
    """SᵀPS = SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖² for columns S, from ``gram`` = SᵀR⁻¹S and ``cross`` = TᵀR⁻¹S."""
    solved = _forward(fac, _lam_transpose_times(fac, cross))
    return gram - _inner(solved, solved)


def _cross_products(blocked: _Term | None, rest: list[_Term], X: Tensor, w: Tensor):
    """C_bb (m, k, k), C_bs (m, k, d) and C_ss (d, d): the blocks of TᵀR⁻¹T."""
    p = X.shape[-1]
    dense = [t.columns for t in rest] + [_Columns(p, dense=X)]
    C_ss = concat(
        [concat([_cross(a, b, w, i == j) for j, b in enumerate(dense)], dim=-1) for i, a in enumerate(dense)], dim=-2
    )
    if blocked is None:
        return None, None, C_ss
    # X and the blocked term's covariates side by side: one pass gives Z_bᵀR⁻¹[X, Z_b].
    b = blocked.columns
    with_x = _cross_grouped(b, w, torch.cat([X, b.x], dim=-1))  # (m, k, p + k)
    C_bs = concat([_cross_blocked(b, t.columns, w) for t in rest] + [with_x[..., :p]], dim=-1)
    return with_x[..., p:], C_bs, C_ss


def _log_diag_sum(L: Tensor) -> Tensor:
    """Σ log L_ii over all (batched) blocks of a triangular factor."""
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum()


def _factorize(s, params: Mapping, y: Tensor, X: Tensor, jacobian: str | None = None) -> _Factor:
    """Everything at ``params``: Ω's factor, the solution, e = P y and ℓ (and the derivatives of the
    random terms' covariances when a Jacobian method is given)."""
    return _loglik(_solve(_factor(s, params, X, jacobian), y), y)


def _factor(s, params: Mapping, X: Tensor, jacobian: str | None = None) -> _Factor:
    """Ω's factor at ``params`` (y-free: under vmap over y nothing here is batched)."""
    random, residual = _terms(s, params, X.dtype, X.device, jacobian)
    grouped = [i for i, t in enumerate(random) if t.grouped]
    # The Grouped term with the most groups is factorised block by block; the rest is dense.
    blocked_index = max(grouped, key=lambda i: random[i].columns.m) if grouped else None
    blocked = random[blocked_index] if blocked_index is not None else None
    rest = [t for i, t in enumerate(random) if i != blocked_index]
    return _factor_omega(blocked, rest, residual, X)


def _factor_omega(blocked: _Term | None, rest: list[_Term], residual: Residual, X: Tensor) -> _Factor:
    """Cross products and the Cholesky factor of Ω."""
    p, dtype, device = X.shape[-1], X.dtype, X.device
    q_rest = _rest_sizes(rest)
    positive = residual.r > 0
    ok = positive if positive.dim() == 0 else positive.all()
    for t in [blocked] + rest if blocked is not None else rest:
        ok = ok & t.ok
    w = torch.where(positive, residual.r, 1.0).reciprocal()  # 0-d when R = σ²I: products unweighted, rescaled
    C_bb, C_bs, C_ss = _cross_products(blocked, rest, X, w)
    lam_s, omega_ss = None, C_ss
    if rest:
        lam_s = _block_diag([_lam_full(t) for t in rest] + [torch.eye(p, dtype=dtype, device=device)])
        unit = F.pad(torch.eye(q_rest, dtype=dtype, device=device), (0, p, 0, p))  # D = blockdiag(I_q, 0_p)
        omega_ss = lam_s.mT @ C_ss @ lam_s + unit
    L_bb_inv = F_ = None
    schur = omega_ss
    if blocked is not None:
        lam = blocked.lam
        eye_k = torch.eye(lam.shape[-1], dtype=dtype, device=device)
        # I + ΛᵀC_gΛ is positive definite whenever Λ and C are finite: a failure is flagged, not repaired.
        L_bb, info_b = torch.linalg.cholesky_ex(lam.mT @ C_bb @ lam + eye_k)
        ok = ok & (info_b == 0).all()
        # M_g ⪰ I, so ‖L_g⁻¹‖ ≤ 1: the explicit k×k inverses are as accurate as solves and cheaper to apply.
        L_bb_inv = torch.linalg.solve_triangular(L_bb, eye_k, upper=False)
        F_ = L_bb_inv @ (lam.mT @ _times_lam_s(C_bs, lam_s))
        schur = omega_ss - group_inner(F_, F_)
    L_ss, info_s = torch.linalg.cholesky_ex(schur)
    ok_s = info_s == 0
    # Not positive definite (X rank deficient): keep the algebra finite; the results are masked.
    L_ss = torch.where(ok_s, L_ss, torch.eye(schur.shape[-1], dtype=dtype, device=device))
    ok = ok & ok_s
    return _Factor(
        blocked, rest, residual, w, X, lam_s, C_bb, C_bs, C_ss, L_bb_inv, F_, L_ss, None, None, None, None, ok
    )


def _solve(fac: _Factor, y: Tensor) -> _Factor:
    """The spherical effects ũ and β̂: Ω [ũ; β̂] = WᵀR⁻¹y."""
    blocked, rest, X, w = fac.blocked, fac.rest, fac.X, fac.w
    wy = _weigh(w, y)
    c_by = None
    if blocked is not None:
        b = blocked.columns
        c_by = _rescale(w, _segment_sum(b.codes, b.x * wy.unsqueeze(-1), b.m)).unsqueeze(-1)  # (m, k, 1)
    c_sy = _rescale(w, concat([_transpose_times(t.columns, wy) for t in rest] + [X.mT @ wy], dim=-1))  # (d,)
    solution = _backward(fac, _forward(fac, _lam_transpose_times(fac, _Split(c_by, c_sy.unsqueeze(-1)))))
    u_b = solution.blocked.squeeze(-1) if blocked is not None else None
    return fac._replace(u_b=u_b, u_s=solution.dense.squeeze(-1))


def _loglik(fac: _Factor, y: Tensor) -> _Factor:
    """e = P y and ℓ from the solution."""
    blocked, rest, X, w, u_b, u_s = fac.blocked, fac.rest, fac.X, fac.w, fac.u_b, fac.u_s
    n, p, q_rest = y.shape[-1], X.shape[-1], _rest_sizes(rest)
    # Residual y − Xβ̂ − Σ Z_t Λ_t ũ_t, e = R⁻¹ residual = P y, yᵀPy = ‖R^{-½} residual‖² + ‖ũ‖².
    fitted, penalty = X @ u_s[..., q_rest:], None
    if rest:
        penalty = u_s[..., :q_rest] @ u_s[..., :q_rest]
        offset = 0
        for t in rest:
            size = t.columns.size
            fitted = fitted + _times(t.columns, _lam_full(t) @ u_s[..., offset : offset + size])
            offset += size
    if blocked is not None:
        fitted = fitted + _expand(blocked.columns, u_b @ blocked.lam.mT)
        penalty = plus(penalty, (u_b * u_b).sum())
    residual_vector = y - fitted
    e = w * residual_vector
    pwrss = e @ residual_vector + penalty

    # log|V| + log|XᵀV⁻¹X| = log|R| + 2 Σ log diag L (all pivots of Ω's factor; log|R| = −Σ log w).
    log_det_r = -n * torch.log(w) if w.dim() == 0 else -torch.log(w).sum()
    log_det_l = _log_diag_sum(fac.L_ss)
    if blocked is not None:
        log_det_l = log_det_l - _log_diag_sum(fac.L_bb_inv)
    value = -0.5 * (log_det_r + pwrss) - log_det_l - 0.5 * (n - p) * math.log(2.0 * math.pi)
    loglik = torch.where(fac.ok, value, -math.inf)
    return fac._replace(e=e, loglik=loglik)


def _effects(fac: _Factor) -> dict[str, Tensor]:
    """û per term path: (m, k) for Grouped terms, (q,) for Propagate terms."""
    out = {}
    if fac.blocked is not None:
        out[fac.blocked.path] = fac.u_b @ fac.blocked.lam.mT
    offset = 0
    for t in fac.rest:
        size = t.columns.size
        spherical = fac.u_s[..., offset : offset + size]
        if t.grouped:
            out[t.path] = spherical.reshape(t.columns.m, t.columns.k) @ t.lam.mT
        else:
            out[t.path] = t.lam @ spherical
        offset += size
    return out


# ------------------------------------------------------------------------------------------------
# Traces of P V̇ and the AI matrix


def _ztpz_blocked(fac: _Factor) -> Tensor:
    """Σ_g (Z_bᵀPZ_b)_gg (k×k) for the blocked term: Σ_g C_g − Σ_g (UᵀΩ⁻¹U)_gg.

    The columns of U = WᵀR⁻¹Z_b for group g are Λ_bᵀC_g in the blocked rows of group g only and
    (C_bs,g Λ_s)ᵀ in the dense rows, so L⁻¹U_g = [L_g⁻¹Λ_bᵀC_g; L_ss⁻¹((C_bs,g Λ_s)ᵀ − F_gᵀ L_g⁻¹Λ_bᵀC_g)].
    """
    b = fac.blocked
    m, k, d = b.columns.m, b.columns.k, fac.L_ss.shape[-1]
    blocked = fac.L_bb_inv @ (b.lam.mT @ fac.C_bb)  # (m, k, k)
    dense_rows = _times_lam_s(fac.C_bs, fac.lam_s) - blocked.mT @ fac.F  # (m, k, d)
    # One triangular solve for all groups: the transposed rows times L_ss⁻ᵀ.
    dense = torch.linalg.solve_triangular(fac.L_ss.mT, dense_rows.reshape(m * k, d), upper=True, left=False)
    dense = dense.reshape(m, k, d).mT  # (m, d, k): L_ss⁻¹ (dense rows of U_g)
    return fac.C_bb.sum(-3) - group_inner(blocked, blocked) - group_inner(dense, dense)


def _ztpz_rest(fac: _Factor) -> Tensor:
    """(Z_restᵀ P Z_rest) (q_rest × q_rest), dense."""
    q_rest = _rest_sizes(fac.rest)
    cross = _Split(fac.C_bs[..., :q_rest] if fac.blocked is not None else None, fac.C_ss[..., :q_rest])
    return _p_gram(fac, fac.C_ss[..., :q_rest, :q_rest], cross)


def _diag_p(fac: _Factor, n: int) -> Tensor:
    """P_ii = 1/r_i − ‖L⁻¹ w_i‖² / r_i² for every row w_i of W = [ZΛ, X] (n,)."""
    d = fac.L_ss.shape[-1]
    dense_rows = torch.cat([_dense_design(t.columns) @ _lam_full(t) for t in fac.rest] + [fac.X], dim=-1)  # (n, d)
    quadratic = 0.0
    if fac.blocked is not None:
        b = fac.blocked
        rows_b = b.columns.x @ b.lam  # (n, k): (Λ_bᵀ x_i)ᵀ
        ab = fac.L_bb_inv.index_select(0, b.columns.codes) @ rows_b.unsqueeze(-1)  # (n, k, 1)
        dense_rows = dense_rows - (ab.mT @ fac.F[b.columns.codes]).squeeze(-2)
        quadratic = (ab**2).sum((-1, -2))
    as_ = torch.linalg.solve_triangular(fac.L_ss, dense_rows.mT.reshape(d, n), upper=False)
    quadratic = quadratic + (as_**2).sum(-2)
    return fac.w - fac.w**2 * quadratic


def _random_parts(fac: _Factor, e: Tensor, need_trace_g: bool):
    """Per random term t: its parameters' score terms and working variates.

    With ze_t = Z_tᵀe: 2 s_j = eᵀV̇_j e − tr(PV̇_j) = tr(Ġ_j (ze_t ze_tᵀ − Z_tᵀPZ_t)) (for a
    Grouped term Ġ_j = I ⊗ Σ̇_j and only Σ_g of the k×k diagonal blocks of both matrices is
    needed), and V̇_j e = Z_t a_j with a_j = Ġ_j ze_t.

    Returns ``(names, twice_score [(K_t,)], A, ze, trace_g)``: A the coefficients of all K
    random-term variates as a :class:`_Split` (dense rows of X are zero); ze = Zᵀe as a
    :class:`_Split` without X rows (blocked (m, k), rest (q_rest,)); trace_g = Σ_t tr(G_t Z_tᵀPZ_t)
    when ``need_trace_g``."""
    blocked, rest, p = fac.blocked, fac.rest, fac.X.shape[-1]
    rest_ztpz = _ztpz_rest(fac) if rest else None
    names, twice_score, coefficients, ze_rest = [], [], [], []
    trace_g = ze_blocked = own_blocked = None
    offset = 0
    for t in ([blocked] if blocked is not None else []) + rest:
        c = t.columns
        if t is blocked:
            ztpz = _ztpz_blocked(fac)
            ze = ze_blocked = _segment_sum(c.codes, c.x * e.unsqueeze(-1), c.m)  # (m, k)
        else:
            ztpz = rest_ztpz[..., offset : offset + c.size, offset : offset + c.size]
            if t.grouped:  # Σ over groups of the k×k diagonal blocks
                ztpz = torch.diagonal(ztpz.reshape(c.m, c.k, c.m, c.k), dim1=0, dim2=2).sum(-1)
            ze_rest.append(_transpose_times(c, e))  # (q_t,)
            ze = ze_rest[-1].reshape(c.m, c.k) if t.grouped else ze_rest[-1]
            offset += c.size
        if need_trace_g:  # ztpz and G_t are symmetric: tr(G ZᵀPZ) = Σ G ⊙ ZᵀPZ
            trace_g = plus(trace_g, (t.block * ztpz).sum((-1, -2)))
        D = t.derivatives
        if D is None:
            if t is not blocked:
                coefficients.append(e.new_zeros(c.size, 0))
            continue
        names += t.names
        outer = ze.mT @ ze if t.grouped else ze.unsqueeze(-1) * ze  # Σ_g ze_g ze_gᵀ, or ze zeᵀ
        twice_score.append((D * (outer - ztpz)).sum((-1, -2)))
        # Row g of a_j for a Grouped term: Σ̇_j ze_g, so a = ze Σ̇_jᵀ (K, m, k); Ġ_j ze otherwise (K, q).
        a = ze @ D.mT if t.grouped else D @ ze
        if t is blocked:
            own_blocked = a.movedim(0, -1)  # (m, k, K_b)
        else:
            coefficients.append(a.reshape(len(t.names), c.size).mT)  # (q_t, K_t)
    count_blocked = own_blocked.shape[-1] if own_blocked is not None else 0
    A_dense = A_blocked = None
    if rest:  # rows of X are zero; the columns of the blocked term's parameters come first
        A_dense = F.pad(_block_diag(coefficients), (count_blocked, 0, 0, p))
    if blocked is not None:
        if own_blocked is None:
            A_blocked = e.new_zeros(blocked.columns.m, blocked.columns.k, len(names))
        else:
            A_blocked = F.pad(own_blocked, (0, len(names) - count_blocked)) if rest else own_blocked
    ze = _Split(ze_blocked, concat(ze_rest, dim=-1) if rest else None)
    return names, twice_score, _Split(A_blocked, A_dense), ze, trace_g


def _residual_parts(fac: _Factor, e: Tensor, ze: _Split, trace_g: Tensor | None):
    """The residual parameters' score terms 2 s_j = Σ_i ṙ_ji (e_i² − P_ii) and working variates
    V_r = [ṙ_j ∘ e]: ``(twice_score (K_r,), TᵀR⁻¹V_r as a _Split, V_rᵀR⁻¹V_r)``."""
    residual, w, n, p = fac.residual, fac.w, e.shape[-1], fac.X.shape[-1]
    slopes = residual.slopes
    if residual.r.dim() == 0:
        # R = σ²I: V_r = e ṙᵀ; tr(P) from tr(PV) = n − p; XᵀR⁻¹V_r = 0 since XᵀPy = 0.
        squares = e @ e
        twice_score = slopes * (squares - (n - p - trace_g) * w)
        weighted_slopes = w * slopes
        cross = _Split(
            ze.blocked.unsqueeze(-1) * weighted_slopes if ze.blocked is not None else None,
            F.pad(ze.dense.unsqueeze(-1) * weighted_slopes, (0, 0, 0, p)) if ze.dense is not None else None,
        )
        return twice_score, cross, squares * (weighted_slopes.unsqueeze(-1) * slopes)
    twice_score = (slopes * (e * e - _diag_p(fac, n))).sum(-1)
    vectors = (slopes * e).mT  # (n, K_r)
    weighted = w.unsqueeze(-1) * vectors
    blocked = None
    if fac.blocked is not None:
        b = fac.blocked.columns
        blocked = _segment_sum(b.codes, b.x.unsqueeze(-1) * weighted.unsqueeze(-2), b.m)
    dense = concat([_transpose_times(t.columns, weighted) for t in fac.rest] + [fac.X.mT @ weighted], dim=-2)
    return twice_score, _Split(blocked, dense), vectors.mT @ weighted


def _score_and_ai(fac: _Factor, names: list[str]) -> tuple[Tensor, Tensor]:
    """Score and AI in the order of ``names``.

    With the working variates S = [Z A, V_r] (random-term variates by their coefficients A, then
    the residual variates V_r): AI = ½ SᵀPS, SᵀPS = SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖², where SᵀR⁻¹S and
    TᵀR⁻¹S = [C A, TᵀR⁻¹V_r] come from the cross products (:func:`_cross_times`)."""
    e = fac.e
    if not names:
        return e.new_zeros(0), e.new_zeros(0, 0)
    residual = fac.residual
    need_trace_g = residual.r.dim() == 0 and residual.slopes is not None
    order, twice_score, A, ze, trace_g = _random_parts(fac, e, need_trace_g)
    cross = _cross_times(fac, A)
    if residual.slopes is None:
        gram = _inner(A, cross)
    else:
        twice_score_r, cross_r, gram_rr = _residual_parts(fac, e, ze, trace_g)
        cross = _columns(cross, cross_r)
        top = _inner(A, cross)  # [AᵀCA, AᵀTᵀR⁻¹V_r]
        gram = torch.cat([top, torch.cat([top[..., len(order) :].mT, gram_rr], dim=-1)], dim=-2)
        order, twice_score = order + residual.names, twice_score + [twice_score_r]
    score = 0.5 * concat(twice_score, dim=-1)
    inner = _p_gram(fac, gram, cross)
    ai = 0.25 * (inner + inner.mT)  # ½ SᵀPS, symmetrised
    if order != names:
        index = torch.tensor([order.index(name) for name in names], device=e.device)
        score, ai = score[..., index], ai[..., index, :][..., index]
    return score, ai


# ------------------------------------------------------------------------------------------------
# The engine


def _one_factor_inputs(s, y, X, prepared):
    """``(layout, statistics)`` of the one-factor fast path for ``s`` (the statistics ``prepared``
    or computed now), or ``(None, None)`` when ``s`` takes the general path."""
    model = one_factor.layout(s)
    if model is None:
        return None, None
    return model, prepared if prepared is not None else one_factor.statistics(model, y, X)


def _grouped(s, params):
    """``s`` and ``params`` with grouped-shaped Propagate terms as Grouped (:mod:`grouped_form`)."""
    grouped, converted = grouped_form(s)
    return grouped, grouped_params(params, converted)


class MMEEngine:
    """Henderson's mixed-model equations in lme4's spherical form (see the module docstring).

    Supports ``Sum``s (nested allowed) of Grouped terms, Propagate terms with a ``Fixed`` Z, and
    at least one residual term that is ``Scalar``, ``Identity`` or ``Diagonal``; the dense part
    (all random columns except the largest Grouped term's) must have at most n/2 columns.
    """

    name = "mme"

    def supports(self, s) -> bool:
        s, _ = grouped_form(s)
        layout = _layout(s)
        if layout is None:
            return False
        random = [term for _, term in layout[0]]
        grouped = [term for term in random if _kind(term) == "grouped"]
        total = sum(term.q if _kind(term) == "grouped" else term.children[0].shape[1] for term in random)
        blocked = max(grouped, key=lambda term: term.num_groups).q if grouped else 0
        return total - blocked <= s.shape[0] // 2

    def prepare(self, s, y, X) -> one_factor.Statistics | None:
        """What does not change between iterations, computed once per dataset: the sufficient
        statistics of :mod:`reml_fn.reml.one_factor` when ``s`` is one Grouped term plus a
        Scalar residual (lme4's ``(x | g)`` models), else None. Pure and vmappable; pass the
        result as ``prepared=`` to :meth:`loglik`, :meth:`ai_terms` and :meth:`gls` with the
        same ``s``, y and X.

        Example:
            >>> import torch, reml_fn as rf
            >>> from reml_fn.reml import ENGINES
            >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
            >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
            >>> prepared = ENGINES["mme"].prepare(s, y, X)
            >>> type(prepared).__name__, bool(ENGINES["mme"].loglik(s, s.init_params(), y, X, prepared=prepared)
            ...                                == ENGINES["mme"].loglik(s, s.init_params(), y, X))
            ('Statistics', True)
        """
        model = one_factor.layout(grouped_form(s)[0])
        return None if model is None else one_factor.statistics(model, y, X)

    def loglik(self, s, params, y, X, prepared=None) -> Tensor:
        s, params = _grouped(s, params)
        model, stats = _one_factor_inputs(s, y, X, prepared)
        if model is not None:
            return one_factor.loglik(model, params, y, X, stats)
        return _factorize(s, params, y, X).loglik

    def ai_terms(
        self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None, prepared=None
    ) -> AITerms:
        """Exact traces always (``trace="hutchpp"`` is accepted and computed exactly: they are cheap here)."""
        if trace not in ("exact", "hutchpp"):
            raise ValueError(f"unknown trace method {trace!r}; expected 'exact' or 'hutchpp'")
        s, params = _grouped(s, params)
        model, stats = _one_factor_inputs(s, y, X, prepared)
        if model is not None:
            return one_factor.ai_terms(model, params, y, X, stats, jacobian)
        fac = _factorize(s, params, y, X, jacobian)
        score, ai = _score_and_ai(fac, param_names(s))
        score = torch.where(fac.ok, score, math.nan)
        ai = torch.where(fac.ok, ai, math.nan)
        beta = torch.where(fac.ok, fac.u_s[..., _rest_sizes(fac.rest) :], math.nan)
        return AITerms(fac.loglik, score, ai, beta)

    def jacobian_traces(self, s, params, jacobian="closed") -> Tensor:
        """tr(∂V/∂θ_k) (k,) in O(n·k²): tr(Σ̇ Σ_i x_i x_iᵀ) for a Grouped term, tr(Ġ ZᵀZ) for a
        Propagate term, Σ_i ṙ_i for the residual."""
        s, params = _grouped(s, params)
        model = one_factor.layout(s)
        if model is not None:
            return one_factor.jacobian_traces(model, params, jacobian)
        leaf = first_leaf(params)
        dtype = leaf.dtype if leaf is not None else torch.get_default_dtype()
        random, residual = _terms(s, params, dtype, leaf.device if leaf is not None else None, jacobian)
        traces = {}
        for t in random:
            if t.derivatives is None:
                continue
            c = t.columns
            gram = c.x.mT @ c.x if t.grouped else c.dense.mT @ c.dense
            traces.update(zip(t.names, (t.derivatives * gram.mT).sum((-1, -2))))
        if residual.slopes is not None:
            n = s.shape[0]
            traces.update(
                zip(residual.names, n * residual.slopes if residual.r.dim() == 0 else residual.slopes.sum(-1))
            )
        names = param_names(s)
        return torch.stack([traces[k] for k in names]) if names else torch.zeros(0, dtype=dtype)

    def gls(self, s, params, y, X, prepared=None) -> tuple[Tensor, Tensor]:
        """β̂ and (XᵀV⁻¹X)⁻¹ from the last p×p block of the factor."""
        s, params = _grouped(s, params)
        model, stats = _one_factor_inputs(s, y, X, prepared)
        if model is not None:
            return one_factor.gls(model, params, y, X, stats)
        fac = _solve(_factor(s, params, X), y)
        q_rest = _rest_sizes(fac.rest)
        beta = torch.where(fac.ok, fac.u_s[..., q_rest:], math.nan)
        vcov = torch.where(fac.ok, inverse_from_cholesky(fac.L_ss[..., q_rest:, q_rest:]), math.nan)
        return beta, vcov

    def random_effects(self, s, params, y, X) -> dict[str, Tensor]:
        """û = Λũ per term path: (m, k) for Grouped terms, (q,) for Propagate terms."""
        grouped, converted = grouped_form(s)
        effects = _effects(_solve(_factor(grouped, grouped_params(params, converted), X), y))
        return propagate_effects(effects, converted)

    def fitted_random(self, s, params, y, X) -> Tensor:
        """Σ_t Z_t û_t (n,)."""
        s, params = _grouped(s, params)
        fac = _solve(_factor(s, params, X), y)
        effects = _effects(fac)
        total = torch.zeros_like(y)
        for t in ([fac.blocked] if fac.blocked is not None else []) + list(fac.rest):
            total = total + _times(t.columns, effects[t.path].reshape(t.columns.size))
        return total


register_engine("mme", MMEEngine(), prefer=True)
