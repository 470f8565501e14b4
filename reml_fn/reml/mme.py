r"""The mixed-model-equation (MME) engine: REML for V = Σ_t Z_t G_t Z_tᵀ + R without any n×n matrix.

Model: y = Xβ + Σ_t Z_t u_t + ε, u_t ~ N(0, G_t), ε ~ N(0, R), R = diag(r) (``Scalar``,
``Identity`` or ``Diagonal`` children of the Sum; several add up) or R = blockdiag(R_g) over the
groups of one :class:`~reml_fn.structures.within_group.WithinGroup` child (nlme's correlation
and variance functions; see *A correlated residual* below). Random terms are
:class:`~reml_fn.combinators.Grouped` (Z_t implicit, G_t = I_m ⊗ Σ_t) or
:class:`~reml_fn.combinators.Propagate` with a ``Fixed`` Z of modest width q_t; a Propagate term
of grouped shape (a block-indicator Z with ``Kronecker(Identity(m), Σ)``) is run as the Grouped
term it is (:mod:`reml_fn.reml.grouped_form`). One algebra serves every such model, lme4's
``(1 | g)`` as well as crossed and nested factors, as in MixedModels.jl (``createAL``/``updateL!``).

**Formulation (lme4's, Bates et al. 2015).** With Λ = blockdiag(Λ_t), G = ΛΛᵀ (Λ_t a lower
Cholesky factor of Σ_t or G_t; for k×k blocks with k ≤ 8 the factor of Σ_t with each variance
raised by 10kε of itself, so that a positive *semi*-definite Σ_t — a variance at 0 — factors),
spherical effects ũ (u = Λũ), the
augmented design W = [ZΛ, X] and D = blockdiag(I_q, 0_p), everything follows from one
symmetric positive-definite matrix of size q + p,

    Ω = WᵀR⁻¹W + D = [[ΛᵀZᵀR⁻¹ZΛ + I,  ΛᵀZᵀR⁻¹X],
                      [XᵀR⁻¹ZΛ,         XᵀR⁻¹X  ]],     Ω [ũ; β̂] = WᵀR⁻¹y,

which is PD even when G is singular (no G⁻¹ anywhere). Its Cholesky factor L gives

    log|V| = log|R| + log|I + ΛᵀZᵀR⁻¹ZΛ|           (determinant lemma: the first q pivots of L)
    log|XᵀV⁻¹X| = the last p pivots of L            (they factor the Schur complement XᵀV⁻¹X)
    yᵀPy = yᵀR⁻¹y − ‖L⁻¹WᵀR⁻¹y‖² = ‖R^{-½}(y − Xβ̂ − ZΛũ)‖² + ‖ũ‖²
    P y = e = R⁻¹(y − Xβ̂ − Zû),  û = Λũ             (the BLUPs)
    P = R⁻¹ − R⁻¹ W Ω⁻¹ Wᵀ R⁻¹.

**Statistics prepared once.** Everything an evaluation needs comes from the cross products of
T = [Z_b, Z_rest, X] (the unscaled design) and of the response centred by its least-squares fit,
y_c = y − Xβ₀ (P X = 0, so y_c has y's likelihood; β̂ = β₀ + the estimate for y_c; centring
keeps the cross products small, so that the differences formed from them keep their digits):

    C = TᵀT (C_bb, C_bs, C_ss below),   c = Tᵀy_c,   ‖y_c‖².

For R = σ²I they do not depend on θ: :func:`statistics` computes them once per dataset
(:meth:`MMEEngine.prepare`; the fit loops pass them back as ``prepared=``) and an evaluation
scales them by w = 1/σ². For a Diagonal R the same function forms TᵀR⁻¹T at each evaluation (one
pass over the data). After that no evaluation touches an n-vector, but for the diagonal of P and
the residual working variates of a Diagonal R.

**Block structure.** The Grouped term with the most groups is the *blocked* term b: its part of
Ω is block diagonal (m blocks of k×k, M_g = I + w Λ_bᵀ C_g Λ_b), factorised for all groups at
once (unrolled recurrences for k ≤ 4, :func:`~reml_fn.reml.covariance_blocks.unrolled_cholesky`;
LAPACK above), whose inverses L_g⁻¹ are then applied by matmuls (M_g ⪰ I, so ‖L_g⁻¹‖ ≤ 1 and the
explicit inverse is as accurate as a triangular solve). The other random terms and X form a
dense block s of size d = q_rest + p, factorised after the Schur complement
S = Ω_ss − Σ_g F_gᵀF_g, F_g = L_g⁻¹ Ω_{g,s}. The model with one grouping factor is the case
d = p. Per evaluation: O(m·k³ + m·k·d² + d³) arithmetic and no pass over the data.

**Crossed factors.** Λ_s is applied term by term (I_m ⊗ Λ_Σ on each group's columns; one
broadcast product when every rest term is a random intercept), never as a (d×d) product. With
K_g = G_g C_bs,g (F = KΛ_s), H = Σ_g K_gᵀK_g is formed once: S = Λ_sᵀ(w C_ss − H)Λ_s + D, and its
first q_rest columns are the projection that Z_restᵀPZ_rest needs. Of Z_restᵀPZ_rest only the
blocks the scores use are formed. In a large crossed design each group of the blocked term meets
few levels of the others (a student rates a few dozen of InstEval's 1,128 lecturers):
:func:`column_pairs` lists, from the codes, the dense columns each group can meet and their pairs,
and H and the blocked term's Σ_g R_g S⁻¹ R_gᵀ are summed over those pairs (O(Σ_g c_g²) for c_g
columns per group) instead of O(m·k·d²) dense products.

**Solution and likelihood.** With G_g = L_g⁻¹Λ_bᵀ, z_g = w G_g c_g and
z_s = L_ss⁻¹(w Λ_sᵀc_s − Σ_g F_gᵀz_g) (Λ_s = blockdiag(Λ_rest, I_p)),

    [ũ_rest; β̂ − β₀] = L_ssᵀ⁻¹ z_s,   ũ_g = L_g⁻ᵀ(z_g − F_g [ũ_rest; β̂ − β₀]),
    yᵀPy = w‖y_c‖² − ‖z‖² − ‖z_s‖²,
    ℓ = −½ (log|R| + yᵀPy) − Σ log diag L − ½ (n − p) log 2π,

and from the cross products, with b̂ = [û_b; û_rest; β̂ − β₀]: Zᵀe = w (Zᵀy_c − ZᵀT b̂) and
e·e = w (yᵀPy − ‖ũ‖²) (R = σ²I).

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

**A correlated residual** (R = blockdiag(R_g), blocks of a_g rows, held by buckets of equal size:
:mod:`reml_fn.reml.residual_blocks`). Every evaluation factorises and inverts the blocks (O(Σ_g a_g³))
and forms the cross products with R⁻¹ block by block (O(Σ_g a_g²) per column): the blocked term
is a Grouped term whose groups contain the residual's, so that R⁻¹Z_b keeps Z_b's codes and
Z_bᵀR⁻¹Z_b stays block diagonal; two Grouped terms that cross the residual's groups meet over the
within-group row pairs (i, j), Σ (R⁻¹)_ij z_i z_jᵀ. For R's parameters (Ṙ_j block-diagonal too)

    eᵀṘ_j e block by block,   tr(PṘ_j) = Σ_g ⟨R_g⁻¹, Ṙ_jg⟩ − Σ_g tr(Ã_gᵀ Ṙ_jg Ã_g),

with Ã the rows of L⁻¹(R⁻¹W)ᵀ (n × (k + d)), and the working variates Ṙ_j e as n-vectors. Random
terms nested in the residual's groups alone run on the blocks engine (:mod:`reml_fn.reml.blocks`),
which is tried first.

Subtractions such as ZᵀR⁻¹Z − UᵀΩ⁻¹U lose about log₁₀(n_g·σ_b²/σ²) digits when group sizes
n_g and variance ratios are extreme; the dense engine's P loses as much (the two still agree to
1e-8 at n_g·σ_b²/σ² = 5·10⁸).

At small n a call costs the number of tensor operations it makes (a few µs each), not flops, so
the code avoids einsum on tiny tensors, scales each cross product once per call and skips the
parts a model does not have (no rest, no residual parameters) instead of forming empty tensors.
Which parts a model has is read from the structure (:func:`layout`), never from the tensors.

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
from reml_fn.params import param_names, subtree
from reml_fn.reml.covariance_blocks import (
    PSD_CHOLESKY_MAX_SIZE,
    Residual,
    cast,
    concat,
    derivative_stack,
    group_inner,
    matrix_and_derivative_stack,
    plus,
    psd_cholesky,
    residual_variance,
    unrolled_inverse_factor,
)
from reml_fn.reml.dense import AITerms, inverse_from_cholesky
from reml_fn.reml.engines import register_engine
from reml_fn.reml.grouped_form import grouped_form, grouped_params, propagate_effects
from reml_fn.reml.residual_blocks import (
    apply_blocks,
    groups_nested,
    pair_indices,
    residual_buckets,
    residual_matrices,
)
from reml_fn.structures import Diagonal, Fixed, Identity, Scalar
from reml_fn.structures.base import first_leaf, values_readable
from reml_fn.structures.within_group import WithinGroup
from reml_fn.tree import derived

__all__ = [
    "MMEEngine",
    "Layout",
    "Statistics",
    "layout",
    "statistics",
    "column_pairs",
    "psd_cholesky",
    "PSD_CHOLESKY_MAX_SIZE",
]

UNROLLED_CHOLESKY_MAX_SIZE = 4
"""The blocked term's k×k blocks M_g are factorised by unrolled recurrences up to this k (O(k³)
vectorised operations over all groups, and datasets under vmap) and by LAPACK above (one call,
which loops over the blocks)."""

# ------------------------------------------------------------------------------------------------
# Small pieces


def _factor_block(block: Tensor) -> tuple[Tensor, Tensor]:
    """Λ with ΛΛᵀ = Σ_t (or G_t) and an ok flag; small blocks may be singular (a variance at 0).

    For k ≤ 8, LAPACK's Cholesky of Σ + diag(10kε·Σ_ii + tiny): each variance moved by 10kε of
    itself (the correlations by as little), so a positive *semi*-definite Σ factors (a zero variance
    gets a Λ column of about 1e-154), and a Σ whose correlation matrix has an eigenvalue below
    about −10kε fails (ok False). :func:`psd_cholesky` decides alike with a tolerance relative to
    max|Σ| instead of each variance, in about thirty operations where this takes a handful."""
    if block.shape[-1] <= PSD_CHOLESKY_MAX_SIZE:
        k = block.shape[-1]
        finfo = torch.finfo(block.dtype)
        diagonal = torch.diagonal(block, dim1=-2, dim2=-1)
        shift = diagonal.abs() * (10.0 * k * finfo.eps) + finfo.tiny
        L, info = torch.linalg.cholesky_ex(block + torch.diag_embed(shift))
        return L, info == 0
    L, info = torch.linalg.cholesky_ex(block)
    ok = info == 0
    return torch.where(ok, L, torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)), ok


def _factor_groups(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(L⁻¹, Σ log diag L, ok)`` for the blocked term's blocks M_g = L_g L_gᵀ (m, k, k), M_g ⪰ I."""
    k = M.shape[-1]
    if k <= UNROLLED_CHOLESKY_MAX_SIZE:
        return unrolled_inverse_factor(M)
    L, info = torch.linalg.cholesky_ex(M)
    eye = torch.eye(k, dtype=M.dtype, device=M.device)
    return torch.linalg.solve_triangular(L, eye, upper=False), _log_diagonal_sum(L), (info == 0).all()


def _blocks_times(blocks: Tensor, matrix: Tensor) -> Tensor:
    """blocks_g @ matrix for every group, (m, r, c) @ (c, d) → (m, r, d), as one (m·r, c) @ (c, d)
    product (under vmap one per dataset instead of one per group and dataset)."""
    return (blocks.flatten(-3, -2) @ matrix).unflatten(-2, blocks.shape[-3:-1])


def _weigh(w, values: Tensor) -> Tensor:
    """R⁻¹ · values for values (n, …): diag(w) · values for weights w (n,) or 0-d, blockwise
    R_g⁻¹ · values_g for a correlated residual (:class:`_BlockResidual`); None stands for R = I."""
    if w is None:
        return values
    if isinstance(w, _BlockResidual):
        return apply_blocks(w.inverse, w.buckets, values)
    return values * w.reshape(*w.shape, *([1] * (values.dim() - 1)))


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


def _log_diagonal_sum(L: Tensor) -> Tensor:
    """Σ log L_ii over all (batched) blocks of a triangular factor."""
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum()


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
    if isinstance(term, (Scalar, Identity, Diagonal, WithinGroup)):
        return "residual"
    return None


class Layout(NamedTuple):
    """Where the pieces of a supported Sum are, read from the structure alone.

    ``structure`` is the Sum with grouped-shaped Propagate terms as Grouped terms (``converted``:
    :func:`~reml_fn.reml.grouped_form.grouped_form`); ``blocked`` the ``(path, Grouped term)`` with
    the most groups (None without a Grouped term); ``rest`` the other random terms in order;
    ``residual`` the residual terms; ``scalar_residual``: R = σ²I (no Diagonal term), so that the
    cross products do not depend on θ; ``within`` the ``(path, WithinGroup)`` of a correlated
    residual (then the only residual term, and the blocked term one whose groups contain the
    residual's, so that Z_bᵀR⁻¹Z_b stays block diagonal)."""

    structure: Sum
    converted: dict
    blocked: tuple[str, Grouped] | None
    rest: tuple[tuple[str, object], ...]
    residual: tuple[tuple[str, object], ...]
    scalar_residual: bool
    within: tuple[str, WithinGroup] | None = None


def layout(s) -> Layout | None:
    """The :class:`Layout` of ``s``, or None when the MME cannot handle it (not a Sum of Grouped
    terms, Propagate terms with a Fixed Z and Scalar/Identity/Diagonal residual terms, or one
    WithinGroup residual term alone, with at least one random and one residual term).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.mme import layout
        >>> g, h = torch.arange(12) % 3, torch.arange(12) % 4
        >>> model = layout(rf.Sum(a=rf.Grouped(g), b=rf.Grouped(h), residual=rf.Scalar(12)))
        >>> model.blocked[0], [path for path, _ in model.rest], model.scalar_residual
        ('b', ['a'], True)
        >>> layout(rf.Sum(a=rf.AR1(12), residual=rf.Scalar(12))) is None
        True

    It reads the structure (and, through :func:`grouped_form`, whether its data are readable)
    only, so it is found once per structure object and kept there (:func:`~reml_fn.tree.derived`;
    a fit asks three times), without its reference to ``s`` itself.
    """
    kept = derived(s, "mme_layout", lambda: _detached(_find_layout(s), s))
    if kept is None or kept.structure is not None:
        return kept
    return kept._replace(structure=s)


def _detached(model: Layout | None, s) -> Layout | None:
    """``model`` with ``structure`` None where it is ``s`` (kept on ``s``: no reference cycle)."""
    return model._replace(structure=None) if model is not None and model.structure is s else model


def _find_layout(s) -> Layout | None:
    structure, converted = grouped_form(s)
    if not isinstance(structure, Sum):
        return None
    random, residual = [], []
    for path, term, _ in _leaves(structure, {}):
        kind = _kind(term)
        if kind is None:
            return None
        (residual if kind == "residual" else random).append((path, term))
    if not random or not residual:
        return None
    grouped = [pair for pair in random if isinstance(pair[1], Grouped)]
    within = next((pair for pair in residual if isinstance(pair[1], WithinGroup)), None)
    if within is not None:
        # A correlated residual alone (its σ² is the residual variance), with readable groups.
        if len(residual) != 1 or not values_readable(within[1].codes):
            return None
        # Blocked terms: those whose groups contain the residual's, so Z_bᵀR⁻¹Z_b stays block diagonal.
        grouped = [pair for pair in grouped if groups_nested(within[1].codes, pair[1].codes)]
    blocked = max(grouped, key=lambda pair: pair[1].num_groups) if grouped else None
    rest = tuple(pair for pair in random if pair is not blocked)
    scalar = within is None and not any(isinstance(term, Diagonal) for _, term in residual)
    return Layout(structure, converted, blocked, rest, tuple(residual), scalar, within)


def _width(term) -> int:
    """The number of columns of a random term's Z: q = m·k for a Grouped term, Z's width else."""
    return term.q if isinstance(term, Grouped) else term.children[0].shape[1]


class _Columns(NamedTuple):
    """A block of columns of the MME design: a Grouped term's implicit Z or a dense matrix."""

    size: int
    codes: Tensor | None = None  # grouped: (n,) group codes
    x: Tensor | None = None  # grouped: (n, k) covariates
    m: int = 0
    k: int = 0
    dense: Tensor | None = None  # dense: (n, size)


def _columns(term, dtype) -> _Columns:
    if isinstance(term, Grouped):
        return _Columns(term.q, term.codes, cast(term.covariates, dtype), term.num_groups, term.k)
    design = cast(term.children[0].matrix, dtype)
    return _Columns(design.shape[-1], dense=design)


def _cross_grouped(a: _Columns, w: Tensor | None, values: Tensor) -> Tensor:
    """Z_aᵀ diag(w) Y for Y (n, c) as (m_a, k_a, c)."""
    return _segment_sum(a.codes, a.x.unsqueeze(-1) * _weigh(w, values).unsqueeze(-2), a.m)


def _cross_two_grouped(a: _Columns, b: _Columns, w: Tensor | None) -> Tensor:
    """Z_aᵀ diag(w) Z_b for two different Grouped terms, (m_a, k_a, m_b·k_b)."""
    outer = a.x.unsqueeze(-1) * _weigh(w, b.x).unsqueeze(-2)  # (n, k_a, k_b)
    sums = _segment_sum(a.codes * b.m + b.codes, outer, a.m * b.m).reshape(a.m, b.m, a.k, b.k)
    return sums.permute(0, 2, 1, 3).reshape(a.m, a.k, b.size)


def _cross(a: _Columns, b: _Columns, w, same: bool) -> Tensor:
    """Z_aᵀ R⁻¹ Z_b, dense (size_a, size_b), for R⁻¹ = diag(w) (:func:`_weigh`; for a correlated
    residual only where one side is dense or, ``same``, a Grouped term whose groups contain the
    residual's: :func:`_pair_cross` does the others)."""
    if a.dense is not None and b.dense is not None:
        return a.dense.transpose(-1, -2) @ _weigh(w, b.dense)
    if a.dense is None and b.dense is not None:
        return _cross_grouped(a, w, b.dense).reshape(a.size, b.size)
    if a.dense is not None:
        return _cross(b, a, w, same).transpose(-1, -2)
    if same:
        return _embed_blocks(_cross_grouped(a, w, a.x))
    return _cross_two_grouped(a, b, w).reshape(a.size, b.size)


def _pair_cross(a: _Columns, b: _Columns, blocks: _BlockResidual) -> Tensor:
    """Z_aᵀR⁻¹Z_b (size_a, size_b) for two Grouped terms and a block-diagonal R: the sum over the
    residual's within-group row pairs (i, j) of (R⁻¹)_ij z_a,i z_b,jᵀ (O(Σ_g a_g² k_a k_b))."""
    left, right = blocks.pairs.unbind(0)
    omega = torch.cat([inverse.flatten() for inverse in blocks.inverse])
    rows_a = _Columns(a.size, a.codes[left], a.x[left], a.m, a.k)
    rows_b = _Columns(b.size, b.codes[right], b.x[right], b.m, b.k)
    return _cross_two_grouped(rows_a, rows_b, omega).reshape(a.size, b.size)


def _dense_design(c: _Columns) -> Tensor:
    if c.dense is not None:
        return c.dense
    indicator = (c.codes.unsqueeze(-1) == torch.arange(c.m, device=c.codes.device)).to(c.x.dtype)
    return (indicator.unsqueeze(-1) * c.x.unsqueeze(-2)).reshape(c.codes.shape[-1], c.size)


def _times(c: _Columns, values: Tensor) -> Tensor:
    """Z_c v for v (size,) or (size, K) → (n,) or (n, K)."""
    if c.dense is not None:
        return c.dense @ values
    effects = values.reshape(c.m, c.k, *values.shape[1:])
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
# The statistics: cross products of T = [Z_b, Z_rest, X] and the centred response


class Statistics(NamedTuple):
    """The cross products of one dataset (module docstring), for W = I (R = σ²I: computed once
    per dataset by :func:`statistics`) or W = R⁻¹ (a Diagonal R: formed per evaluation).

    A part the model does not have (no blocked term; a Diagonal R's prepared statistics, which are
    only β₀ and y_c) is an empty tensor, so that the tuple maps and vmaps like any other."""

    offset: Tensor  # (p,)      β₀, least squares: β̂ = β₀ + the GLS estimate for y_c
    centred: Tensor  # (n,)     y_c = y − Xβ₀
    C_bb: Tensor  # (m, k, k)   Z_bᵀWZ_b blocks
    C_bs: Tensor  # (m, k, d)   Z_bᵀW[Z_rest, X]
    C_ss: Tensor  # (d, d)      [Z_rest, X]ᵀW[Z_rest, X]
    c_b: Tensor  # (m, k)       Z_bᵀW y_c
    c_s: Tensor  # (d,)         [Z_rest, X]ᵀW y_c
    yy: Tensor  # ()            y_cᵀW y_c
    entries: Tensor  # (2, nnz) (g, j): the dense columns j group g of the blocked term can meet
    pairs: Tensor  # (3, P)     pairs of those entries within a group (:func:`column_pairs`);
    #                             both empty: dense products
    residual_blocks: tuple = ()  # a correlated residual: its buckets (residual_blocks.residual_buckets)
    residual_pairs: Tensor | tuple = ()  # and (2, P) its within-group row pairs, where crossed terms need them


def _cross_statistics(model: Layout, centred: Tensor, X: Tensor, w, offset: Tensor) -> Statistics:
    """:class:`Statistics` with R⁻¹ given by the weights w (n,) (None: unweighted) or the blocks of a
    correlated residual (:class:`_BlockResidual`)."""
    dtype = X.dtype
    rest = [_columns(term, dtype) for _, term in model.rest]
    blocked = _columns(model.blocked[1], dtype) if model.blocked is not None else None
    return _cross_products(rest, blocked, centred, X, w, offset)


def _cross_products(
    rest: list[_Columns], blocked: _Columns | None, centred: Tensor, X: Tensor, w, offset: Tensor
) -> Statistics:
    """:func:`_cross_statistics` from the columns of the rest terms and of the blocked term."""
    p = X.shape[-1]
    dense = rest + [_Columns(p, dense=X)]
    block = isinstance(w, _BlockResidual)

    def cross(a: _Columns, b: _Columns, same: bool) -> Tensor:
        if block and a.dense is None and b.dense is None:  # two Grouped terms the residual's groups may cross
            return _pair_cross(a, b, w)
        return _cross(a, b, w, same)

    C_ss = concat(
        [concat([cross(a, b, i == j) for j, b in enumerate(dense)], dim=-1) for i, a in enumerate(dense)], dim=-2
    )
    wy = _weigh(w, centred)
    c_s = concat([_transpose_times(c, wy) for c in rest] + [X.mT @ wy], dim=-1)
    empty = X.new_zeros(0)
    C_bb = C_bs = c_b = empty
    if blocked is not None:
        b = blocked
        # X and the blocked term's covariates side by side: one pass gives Z_bᵀW[X, Z_b]. The response's
        # sums come apart, so that under vmap over y alone the design's are made once.
        both = _cross_grouped(b, w, torch.cat([X, b.x], dim=-1))  # (m, k, p + k)
        # Z_bᵀR⁻¹Z_c with R⁻¹ on the blocked term's side: its groups contain the residual's, so
        # R⁻¹Z_b keeps Z_b's codes (a Diagonal R: either side).
        weighted_b = b._replace(x=_weigh(w, b.x)) if block else b
        pieces = []
        for c in rest:
            if c.dense is not None:
                pieces.append(_cross_grouped(b, w, c.dense))
            else:
                pieces.append(_cross_two_grouped(weighted_b, c, None) if block else _cross_two_grouped(b, c, w))
        C_bs = concat(pieces + [both[..., :p]], dim=-1)
        C_bb, c_b = both[..., p:], _transpose_times(b, wy).reshape(b.m, b.k)
    return Statistics(offset, centred, C_bb, C_bs, C_ss, c_b, c_s, centred @ wy, empty.long(), empty.long())


def statistics(model: Layout, y: Tensor, X: Tensor) -> Statistics:
    """What does not change with θ, for one dataset (pure; vmappable over y, X and the terms' data):
    β₀ = (XᵀX)⁻¹Xᵀy, y_c = y − Xβ₀ and, for R = σ²I, the cross products of T = [Z_b, Z_rest, X]
    and y_c. Below: β₀ is the mean 2.5, c_b the group sums of y − 2.5, ‖y_c‖² = 7.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.mme import layout, statistics
        >>> s = rf.Sum(group=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
        >>> stats = statistics(layout(s), y, X)
        >>> [round(v, 10) for v in (*stats.offset.tolist(), *stats.c_b.flatten().tolist(), float(stats.yy))]
        [2.5, -3.0, 3.0, 7.0]
        >>> stats.C_bb.flatten().tolist()                # group sizes
        [3.0, 3.0]
    """
    # β₀ from the normal equations: any β₀ gives the same likelihood, it only makes y_c small.
    factor, info = torch.linalg.cholesky_ex(X.mT @ X)
    offset = torch.cholesky_solve((X.mT @ y).unsqueeze(-1), factor).squeeze(-1)
    offset = torch.where(info == 0, offset, 0.0)  # X rank deficient: the fit fails later, finitely
    centred = y - X @ offset
    if not model.scalar_residual:
        empty = X.new_zeros(0)
        stats = Statistics(offset, centred, empty, empty, empty, empty, empty, empty, empty.long(), empty.long())
        if model.within is None:
            return stats
        buckets = residual_buckets(model.within[1], X.dtype)
        crossing = any(isinstance(term, Grouped) for _, term in model.rest)
        stats = stats._replace(residual_blocks=buckets, residual_pairs=pair_indices(buckets) if crossing else ())
        # Z_bᵀR⁻¹Z_rest meets the columns Z_bᵀZ_rest meets (the residual's groups lie in the blocked
        # term's): the same column pairs.
        pairs = column_pairs(model, X.shape[-1])
        return stats if pairs is None else stats._replace(entries=pairs[0], pairs=pairs[1])
    stats = _cross_statistics(model, centred, X, None, offset)
    pairs = column_pairs(model, X.shape[-1])
    return stats if pairs is None else stats._replace(entries=pairs[0], pairs=pairs[1])


PAIR_LIST_MIN_SIZE = 1 << 18
"""Crossed designs with m·k·d ≥ this many entries in the blocked term's cross products (m groups
of k effects, d dense columns) form Σ_g K_gᵀK_g from the column pairs each group can couple
(:func:`column_pairs`) instead of one dense (d × m·k)(m·k × d) product."""

PAIR_LIST_MAX_PAIRS = 1 << 24
"""At most this many column pairs (three int64 each: 384 MiB)."""

PAIR_LIST_MAX_DENSITY = 0.25
"""Pair lists only where the groups' column pairs are at most this fraction of m·d² (a product
over pairs costs a few times a dense product per entry)."""


def column_pairs(model: Layout, p: int) -> tuple[Tensor, Tensor] | None:
    """For each group g of the blocked term, the dense columns (those of the rest terms and of X)
    where Z_bᵀ[Z_rest, X] can be non-zero in g, and the pairs of them, so that Σ_g K_gᵀK_g for
    K_g = G_g C_bs,g has its entries in these pairs only (:func:`_column_pair_list`). Read from the terms'
    codes (not the data): a Grouped rest term's level h couples with g when some observation has
    both; a Propagate rest term and X couple with every g. None when the product is small or
    about as dense as the full one (below :data:`PAIR_LIST_MIN_SIZE`, above
    :data:`PAIR_LIST_MAX_DENSITY` of m·d² pairs or :data:`PAIR_LIST_MAX_PAIRS`). Host computation
    on the codes, once per dataset in :func:`statistics`.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml import mme
        >>> a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 2])
        >>> s = rf.Sum(a=rf.Grouped(a), b=rf.Grouped(b), e=rf.Scalar(4))   # b (3 levels) is blocked
        >>> model = mme.layout(s)
        >>> mme.column_pairs(model, 1) is None                               # far too small
        True
        >>> mme._column_pattern(model, 1).int().tolist()     # b's levels meet a's columns 0, 1 and X
        [[1, 0, 1], [1, 1, 1], [0, 1, 1]]
        >>> entries, pairs = mme._column_pair_list(mme._column_pattern(model, 1))
        >>> entries[:, :2].tolist(), pairs[:, :3].tolist()    # group 0: columns 0, 2; pairs i ≤ j
        ([[0, 0], [0, 2]], [[0, 0, 1], [0, 1, 1], [0, 2, 8]])
    """
    if model.blocked is None or not model.rest:
        return None
    term = model.blocked[1]
    codes = [term.codes] + [other.codes for _, other in model.rest if isinstance(other, Grouped)]
    if not all(values_readable(c) for c in codes):  # per-dataset codes under vmap: dense products
        return None
    d = sum(_width(other) for _, other in model.rest) + p
    if term.num_groups * term.k * d < PAIR_LIST_MIN_SIZE:
        return None
    pattern = _column_pattern(model, p)
    counts = pattern.sum(-1)
    total = int((counts * counts).sum())
    if total > min(PAIR_LIST_MAX_PAIRS, PAIR_LIST_MAX_DENSITY * term.num_groups * d * d):
        return None
    return _column_pair_list(pattern)


def _column_pattern(model: Layout, p: int) -> Tensor:
    """(m, d) bool: which dense columns group g of the blocked term can meet (whole k-blocks of a
    Grouped rest term, since its Λ mixes them)."""
    term = model.blocked[1]
    m, codes = term.num_groups, term.codes
    parts = []
    for _, other in model.rest:
        if isinstance(other, Grouped):
            seen = torch.zeros(m * other.num_groups, dtype=torch.bool, device=codes.device)
            seen[codes * other.num_groups + other.codes] = True
            parts.append(seen.reshape(m, other.num_groups, 1).expand(m, other.num_groups, other.k).reshape(m, -1))
        else:
            parts.append(torch.ones(m, _width(other), dtype=torch.bool, device=codes.device))
    parts.append(torch.ones(m, p, dtype=torch.bool, device=codes.device))
    return torch.cat(parts, dim=-1)


def _column_pair_list(pattern: Tensor) -> tuple[Tensor, Tensor]:
    """``(entries, pairs)`` for ``pattern`` (m, d): entries (2, nnz) the pattern's (group, column)
    entries by group then column; pairs (3, P) for each group's column pairs i ≤ j the positions of
    the two entries and the output position i·d + j."""
    d = pattern.shape[-1]
    entries = pattern.nonzero()  # (nnz, 2)
    counts = pattern.sum(-1)
    ends = torch.cumsum(counts, 0)
    # Entry e (in group g) pairs with itself and the entries after it in its group: ends_g − e.
    position = torch.arange(entries.shape[0], device=pattern.device)
    lengths = ends[entries[:, 0]] - position
    first = torch.repeat_interleave(position, lengths)
    run_starts = torch.cumsum(lengths, 0) - lengths
    second = first + torch.arange(first.shape[0], device=pattern.device) - torch.repeat_interleave(run_starts, lengths)
    columns = entries[:, 1]
    return entries.T.contiguous(), torch.stack([first, second, columns[first] * d + columns[second]])


def _pair_gram(K: Tensor, entries: Tensor, pairs: Tensor) -> Tensor:
    """Σ_g K_gᵀK_g (d, d) for K (m, k, d) whose non-zero columns in group g are among the pattern's
    (:func:`column_pairs`): its entries of K gathered once (a small array), then one product per
    pair i ≤ j, and the other triangle by symmetry."""
    d = K.shape[-1]
    compact = K[entries[0], :, entries[1]]  # (nnz, k)
    values = (compact[pairs[0]] * compact[pairs[1]]).sum(-1)
    upper = K.new_zeros(d * d).index_add(0, pairs[2], values).reshape(d, d)
    return upper + upper.mT - torch.diag_embed(torch.diagonal(upper))


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


def _covariance_of(path: str, term, params: Mapping) -> tuple:
    """``(structure, its params, its path)`` of a random term's covariance: Σ of a Grouped term, G of
    a Propagate term."""
    term_params = subtree(params, path.split("/"))
    if isinstance(term, Grouped):
        return term.cov, term_params.get("cov", {}), f"{path}/cov"
    g_name = term.names[1]
    return term.children[1], term_params.get(g_name, {}), f"{path}/{g_name}"


def _term(path: str, term, params: Mapping, dtype, method: str | None) -> _Term:
    block, names, derivatives = matrix_and_derivative_stack(*_covariance_of(path, term, params), method, dtype)
    lam, ok = _factor_block(block)
    return _Term(path, isinstance(term, Grouped), _columns(term, dtype), block, lam, ok, names, derivatives)


def _residual(model: Layout, params: Mapping, n: int, dtype, device, derivatives: bool) -> Residual:
    parts = [(path, term, subtree(params, path.split("/"))) for path, term in model.residual]
    return residual_variance(parts, n, dtype, device, derivatives)


class _BlockResidual(NamedTuple):
    """R = blockdiag(R_g) of a correlated (WithinGroup) residual at the current parameters, by
    buckets of equal group size (:mod:`reml_fn.reml.residual_blocks`)."""

    buckets: tuple  # ResidualBucket per group size
    pairs: Tensor | tuple  # (2, P) within-group row pairs (where crossed Grouped terms need them)
    inverse: tuple  # R_b⁻¹ (m_b, a_b, a_b) per bucket
    names: list[str]  # its free parameters (paths)
    slopes: tuple | None  # Ṙ_j per bucket (K_r, m_b, a_b, a_b); None without derivatives
    log_det: Tensor  # log|R|
    ok: Tensor  # every block positive definite


def _block_residual(
    model: Layout, params: Mapping, buckets: tuple, pairs, dtype, jacobian: str | None
) -> _BlockResidual:
    """R's blocks at ``params`` for the residual's ``buckets`` (and ``pairs``: :class:`Statistics`),
    factorised and inverted, and Ṙ_j when a Jacobian method is given."""
    path, residual = model.within
    raw = subtree(params, path.split("/"))
    free = [spec.name for spec in residual.specs if not spec.fixed] if jacobian is not None else []
    inverse, slopes = [], []
    log_det, ok = None, None
    for bucket in buckets:
        R, derivatives = residual_matrices(residual, raw, bucket.pairs, free, jacobian or "closed")
        R = cast(R, dtype)
        L, info = torch.linalg.cholesky_ex(R)
        good = (info == 0).all()
        # Not positive definite: keep the algebra finite; the result is masked to −∞.
        L = torch.where(good, L, torch.eye(R.shape[-1], dtype=dtype, device=R.device))
        inverse.append(torch.cholesky_inverse(L))
        log_det = plus(log_det, 2.0 * _log_diagonal_sum(L))
        ok = good if ok is None else ok & good
        if free:
            slopes.append(cast(torch.stack([derivatives[name] for name in free]), dtype))
    names = [f"{path}/{name}" for name in free]
    return _BlockResidual(buckets, pairs, tuple(inverse), names, tuple(slopes) if free else None, log_det, ok)


def _spherical(residual) -> bool:
    """R = σ²I (a 0-d variance): the cross products are prepared once and scaled by 1/σ²."""
    return isinstance(residual, Residual) and residual.r.dim() == 0


# ------------------------------------------------------------------------------------------------
# Assembling and factorising Ω
#
# Rows and columns of Ω (and of the cross products C = TᵀR⁻¹T, W = TΛ_full) come in two parts:
# the blocked term's, by group (m, k, ·), and the dense part (d, ·). :class:`_Split` carries a
# matrix with rows split that way.


class _Point(NamedTuple):
    """Everything at one parameter point: Ω's factor and, after :func:`_solve`, the solution."""

    blocked: _Term | None
    rest: list[_Term]
    residual: Residual | _BlockResidual
    w: Tensor | _BlockResidual  # R⁻¹: 1/r, 0-d (R = σ²I) or (n,); or the blocks of a correlated R
    X: Tensor  # (n, p)
    offset: Tensor  # (p,) β₀
    centred: Tensor  # (n,) y_c
    C_bb: Tensor | None  # (m, k, k)   Z_bᵀR⁻¹Z_b blocks
    C_bs: Tensor | None  # (m, k, d)   Z_bᵀR⁻¹[Z_rest, X], without the 1/σ² of R = σ²I (:func:`_scaled`)
    C_ss: Tensor  # (d, d)      [Z_rest, X]ᵀR⁻¹[Z_rest, X], likewise
    c_b: Tensor | None  # (m, k)  Z_bᵀR⁻¹y_c
    c_s: Tensor  # (d,)    [Z_rest, X]ᵀR⁻¹y_c
    yy: Tensor  # ()       y_cᵀR⁻¹y_c
    lam_s: _LamS | None  # Λ_s = blockdiag(Λ_rest, I_p); None without a rest (Λ_s = I)
    entries: Tensor  # the column pattern of :func:`column_pairs` (empty: dense products)
    pairs: Tensor
    L_bb_inv: Tensor | None  # (m, k, k) L_g⁻¹ for the blocks L_g of the blocked term's factor
    G: Tensor | None  # (m, k, k) L_g⁻¹Λ_bᵀ
    F: Tensor | None  # (m, k, d) L_g⁻¹ Ω_{g,s}
    H: Tensor | None  # (d, d) Σ_g K_gᵀK_g, K_g = L_g⁻¹Λ_bᵀC_bs,g (F = KΛ_s), with a rest
    L_ss: Tensor  # (d, d)
    log_det: Tensor  # Σ log diag L over all pivots
    log_det_r: Tensor  # log|R|
    ok: Tensor
    u_b: Tensor | None = None  # (m, k) spherical effects ũ_b
    u_s: Tensor | None = None  # (d,) [ũ_rest, β̂ − β₀]
    penalised: Tensor | None = None  # yᵀPy
    loglik: Tensor | None = None


class _Split(NamedTuple):
    """A matrix with rows indexed like the columns of T = [Z_b, Z_rest, X]: ``blocked`` (m, k, c)
    for the blocked term's, ``dense`` (d, c) for the others; None stands for a zero part."""

    blocked: Tensor | None
    dense: Tensor | None


def _rest_sizes(rest: list[_Term]) -> int:
    return sum(t.columns.size for t in rest)


def _design_times_lam(term: _Term) -> Tensor:
    """Z_t Λ_t (n, q_t) as a dense matrix: a Grouped term's rows x_iᵀΛ_Σ in their group's columns
    (Λ_t = I_m ⊗ Λ_Σ is never formed), a dense Z times Λ_G."""
    c = term.columns
    if not term.grouped:
        return c.dense @ term.lam
    return _dense_design(c._replace(x=c.x @ term.lam))


class _LamS(NamedTuple):
    """Λ_s = blockdiag(Λ_rest, I_p): the rest terms, and Λ_s's diagonal (d,) when it is diagonal
    (every rest term a Grouped term with k = 1, as in crossed random intercepts)."""

    rest: list[_Term]
    diagonal: Tensor | None


def _lam_s(rest: list[_Term], p: int) -> _LamS | None:
    if not rest:
        return None
    if not all(t.grouped and t.columns.k == 1 for t in rest):
        return _LamS(rest, None)
    lam = rest[0].lam
    ones = torch.ones(p, dtype=lam.dtype, device=lam.device)
    return _LamS(rest, torch.cat([t.lam.reshape(1).expand(t.columns.m) for t in rest] + [ones]))


def _times_lam_s(a: Tensor, lam_s: _LamS | None, transpose: bool = False) -> Tensor:
    """a Λ_s (or a Λ_sᵀ) over a's last dimension, Λ_s = blockdiag(Λ_rest, I_p) (None: Λ_s = I),
    term by term: a Grouped term's I_m ⊗ Λ_Σ acts on each group's k columns, so no (d×d) product
    is formed; a diagonal Λ_s is one broadcast product."""
    if lam_s is None:
        return a
    if lam_s.diagonal is not None:
        return a * lam_s.diagonal
    pieces, offset = [], 0
    for t in lam_s.rest:
        size = t.columns.size
        part = a[..., offset : offset + size]
        lam = t.lam.mT if transpose else t.lam
        if not t.grouped:
            part = part @ lam
        elif t.columns.k == 1:
            part = part * lam.reshape(())
        else:
            part = (part.unflatten(-1, (t.columns.m, t.columns.k)) @ lam).flatten(-2)
        pieces.append(part)
        offset += size
    pieces.append(a[..., offset:])
    return torch.cat(pieces, dim=-1)


def _weighted(model: Layout, stats: Statistics, X: Tensor, w: Tensor) -> tuple:
    """``(C_bb, C_bs, C_ss, c_b, c_s, yᵀy)`` with R⁻¹: the small ones (C_bb, c_b, c_s, ‖y_c‖²)
    weighted; the large C_bs and C_ss, for R = σ²I (w 0-d), as prepared, with 1/σ² applied where
    they are used (:func:`_scaled`; no weighted copy of an (m·k × d) or (d × d) matrix is held). A
    Diagonal R forms them all with its weights w (n,) now."""
    if not model.scalar_residual:
        stats = _cross_statistics(model, stats.centred, X, w, stats.offset)
    blocked = model.blocked is not None
    C_bb, C_bs, c_b = (_scaled(stats.C_bb, w), stats.C_bs, _scaled(stats.c_b, w)) if blocked else (None, None, None)
    return C_bb, C_bs, stats.C_ss, c_b, _scaled(stats.c_s, w), _scaled(stats.yy, w)


def _scaled(value: Tensor, w) -> Tensor:
    """value · 1/σ² for a product of the cross products held unweighted (R = σ²I: w = 1/σ² is 0-d);
    value itself where they were formed with R⁻¹ (a Diagonal R, w (n,), or a correlated one)."""
    return value * w if isinstance(w, Tensor) and w.dim() == 0 else value


def _factor(model: Layout, params: Mapping, stats: Statistics, X: Tensor, jacobian: str | None = None) -> _Point:
    """Ω's factor at ``params`` (and the derivatives of the random terms' covariances when a
    Jacobian method is given)."""
    p, dtype, device = X.shape[-1], X.dtype, X.device
    blocked = _term(*model.blocked, params, dtype, jacobian) if model.blocked is not None else None
    rest = [_term(path, term, params, dtype, jacobian) for path, term in model.rest]
    if model.within is not None:
        residual = _block_residual(model, params, stats.residual_blocks, stats.residual_pairs, dtype, jacobian)
        ok, w, log_det_r = residual.ok, residual, residual.log_det
    else:
        residual = _residual(model, params, X.shape[-2], dtype, device, jacobian is not None)
        positive = residual.r > 0
        ok = positive if positive.dim() == 0 else positive.all()
        r = torch.where(positive, residual.r, 1.0)
        w = r.reciprocal()
        log_det_r = X.shape[-2] * torch.log(r) if r.dim() == 0 else torch.log(r).sum()
    for t in [blocked] + rest if blocked is not None else rest:
        ok = ok & t.ok
    C_bb, C_bs, C_ss, c_b, c_s, yy = _weighted(model, stats, X, w)
    lam_s = _lam_s(rest, p)
    L_bb_inv = G = F_ = H = log_det = None
    schur = _scaled(C_ss, w)  # Ω_ss before Λ_s and D, less the blocked term's part below
    if blocked is not None:
        lam = blocked.lam
        eye_k = torch.eye(lam.shape[-1], dtype=dtype, device=device)
        # I + ΛᵀC_gΛ is positive definite whenever Λ and C are finite: a failure is flagged, not repaired.
        L_bb_inv, log_det, factored = _factor_groups(_blocks_times(_blocks_times(C_bb, lam).mT, lam) + eye_k)
        ok = ok & factored
        G = _blocks_times(L_bb_inv, lam.mT)
        K = _scaled(G, w) @ C_bs  # K_g = G_g C_bs,g with R⁻¹
        if rest:
            # H = Σ_g K_gᵀK_g with K_g = G_g C_bs,g: F = KΛ_s, so Σ_g F_gᵀF_g = Λ_sᵀHΛ_s, and H's
            # first q_rest columns give the projection of Z_restᵀPZ_rest (:func:`_ztpz_rest`): the one
            # m·k·d² product of an evaluation is made once.
            H = group_inner(K, K) if stats.pairs.numel() == 0 else _pair_gram(K, stats.entries, stats.pairs)
            F_, schur = _times_lam_s(K, lam_s), schur - H
        else:
            F_, schur = K, schur - group_inner(K, K)
        del K  # (m, k, d): a large crossed design's peak memory is in this function
    if rest:  # S = Λ_sᵀ(C_ss − H)Λ_s + D, D = blockdiag(I_q, 0_p)
        q_rest = _rest_sizes(rest)
        scaled = _times_lam_s(_times_lam_s(schur, lam_s).mT, lam_s)
        del schur
        unit = F.pad(torch.ones(q_rest, dtype=dtype, device=device), (0, p))  # its diagonal, not a d×d matrix
        schur = torch.diagonal_scatter(scaled, torch.diagonal(scaled, dim1=-2, dim2=-1) + unit, dim1=-2, dim2=-1)
        del scaled
    L_ss, info_s = torch.linalg.cholesky_ex(schur)
    ok_s = info_s == 0
    # Not positive definite (X rank deficient): keep the algebra finite; the results are masked.
    L_ss = torch.where(ok_s, L_ss, torch.eye(schur.shape[-1], dtype=dtype, device=device))
    log_det = plus(log_det, _log_diagonal_sum(L_ss))
    return _Point(
        blocked, rest, residual, w, X, stats.offset, stats.centred, C_bb, C_bs, C_ss, c_b, c_s, yy,
        lam_s, stats.entries, stats.pairs, L_bb_inv, G, F_, H, L_ss, log_det, log_det_r, ok & ok_s,
    )  # fmt: skip


def _solve(pt: _Point, effects: bool = True) -> _Point:
    """The spherical effects ũ, β̂ − β₀ (Ω [ũ; β̂ − β₀] = WᵀR⁻¹y_c), yᵀPy and ℓ; without
    ``effects`` only yᵀPy and ℓ (the forward half of the solve)."""
    rhs = _times_lam_s(pt.c_s, pt.lam_s)  # Λ_sᵀ c_s
    z_b = None
    if pt.blocked is not None:
        z_b = (pt.G @ pt.c_b.unsqueeze(-1)).squeeze(-1)  # (m, k)
        rhs = rhs - z_b.flatten(-2) @ pt.F.flatten(-3, -2)  # − Σ_g F_gᵀ z_g
    z_s = torch.linalg.solve_triangular(pt.L_ss, rhs.unsqueeze(-1), upper=False)
    penalised = pt.yy - (z_s * z_s).sum()
    if pt.blocked is not None:
        penalised = penalised - (z_b * z_b).sum()
    u_b = u_s = None
    if effects:
        u_s = torch.linalg.solve_triangular(pt.L_ss.mT, z_s, upper=True).squeeze(-1)
        if pt.blocked is not None:
            u_b = (pt.L_bb_inv.mT @ (z_b - pt.F @ u_s).unsqueeze(-1)).squeeze(-1)
    n, p = pt.centred.shape[-1], pt.X.shape[-1]
    value = -0.5 * (pt.log_det_r + penalised) - pt.log_det - 0.5 * (n - p) * math.log(2.0 * math.pi)
    loglik = torch.where(pt.ok, value, -math.inf)
    return pt._replace(u_b=u_b, u_s=u_s, penalised=penalised, loglik=loglik)


def _evaluate(
    model: Layout, params: Mapping, stats: Statistics, X: Tensor, jacobian: str | None = None, effects: bool = True
) -> _Point:
    return _solve(_factor(model, params, stats, X, jacobian), effects)


def _beta(pt: _Point) -> Tensor:
    return pt.offset + pt.u_s[..., _rest_sizes(pt.rest) :]


def _vcov_beta(pt: _Point) -> Tensor:
    """(XᵀV⁻¹X)⁻¹ from the last p×p block of the factor (NaN where V is not positive definite)."""
    q_rest = _rest_sizes(pt.rest)
    return torch.where(pt.ok, inverse_from_cholesky(pt.L_ss[..., q_rest:, q_rest:]), math.nan)


def _effects(pt: _Point) -> dict[str, Tensor]:
    """û per term path: (m, k) for Grouped terms, (q,) for Propagate terms."""
    out = {}
    if pt.blocked is not None:
        out[pt.blocked.path] = pt.u_b @ pt.blocked.lam.mT
    offset = 0
    for t in pt.rest:
        size = t.columns.size
        spherical = pt.u_s[..., offset : offset + size]
        if t.grouped:
            out[t.path] = spherical.reshape(t.columns.m, t.columns.k) @ t.lam.mT
        else:
            out[t.path] = t.lam @ spherical
        offset += size
    return out


def _coefficients(pt: _Point) -> tuple[Tensor | None, Tensor]:
    """b̂ = [û_b; û_rest; β̂ − β₀] in T's columns: (m, k) for the blocked term and (d,)."""
    u_b = pt.u_b @ pt.blocked.lam.mT if pt.blocked is not None else None
    return u_b, _times_lam_s(pt.u_s, pt.lam_s, transpose=True)  # Λ_s u_s


def _z_transpose_e(pt: _Point) -> _Split:
    """Zᵀe for e = P y from the cross products: Zᵀe = Zᵀ R⁻¹(y_c − T b̂), as a :class:`_Split`
    without X rows (blocked (m, k), rest (q_rest,))."""
    u_b, b_s = _coefficients(pt)
    blocked = dense = None
    if pt.blocked is not None:
        blocked = pt.c_b - (pt.C_bb @ u_b.unsqueeze(-1)).squeeze(-1) - _scaled(pt.C_bs @ b_s, pt.w)
    if pt.rest:
        q_rest = _rest_sizes(pt.rest)
        dense = pt.c_s[..., :q_rest] - _scaled(pt.C_ss[..., :q_rest, :] @ b_s, pt.w)
        if pt.blocked is not None:
            dense = dense - _scaled(u_b.flatten(-2) @ pt.C_bs[..., :q_rest].flatten(-3, -2), pt.w)
    return _Split(blocked, dense)


def _fitted_random(pt: _Point) -> Tensor:
    """Σ_t Z_t û_t (n,), by one pass over the data."""
    effects = _effects(pt)
    terms = ([pt.blocked] if pt.blocked is not None else []) + list(pt.rest)
    return sum(_times(t.columns, effects[t.path].reshape(t.columns.size)) for t in terms)


def _residual_vector(pt: _Point) -> Tensor:
    """e = P y = R⁻¹(y_c − T b̂) (n,), by one pass over the data (a Diagonal R's score needs it)."""
    fitted = pt.X @ pt.u_s[..., _rest_sizes(pt.rest) :] + _fitted_random(pt)
    return _weigh(pt.w, pt.centred - fitted)


def _lam_transpose_times(fac: _Point, a: _Split) -> _Split:
    """Λ_fullᵀ a: from products with T to products with W = TΛ_full."""
    blocked = dense = None
    if a.blocked is not None:
        blocked = fac.blocked.lam.mT @ a.blocked
    if a.dense is not None:
        dense = _times_lam_s(a.dense.mT, fac.lam_s).mT
    return _Split(blocked, dense)


def _cross_times(fac: _Point, a: _Split) -> _Split:
    """C a = TᵀR⁻¹T a from the cross products."""
    blocked = dense = None
    if a.blocked is not None:
        blocked, dense = fac.C_bb @ a.blocked, _scaled(group_inner(fac.C_bs, a.blocked), fac.w)
    if a.dense is not None:
        dense = plus(dense, _scaled(fac.C_ss @ a.dense, fac.w))
        if fac.blocked is not None:
            blocked = plus(blocked, _scaled(fac.C_bs @ a.dense, fac.w))
    return _Split(blocked, dense)


def _inner(a: _Split, b: _Split) -> Tensor:
    """aᵀb (c_a, c_b) over both parts (at least one part must be present in both)."""
    blocked = group_inner(a.blocked, b.blocked) if a.blocked is not None and b.blocked is not None else None
    dense = a.dense.mT @ b.dense if a.dense is not None and b.dense is not None else None
    return plus(blocked, dense)


def _columns_side_by_side(a: _Split, b: _Split) -> _Split:
    """[a, b] side by side (a has a dense part; one missing from b is zero)."""
    blocked = None if a.blocked is None else torch.cat([a.blocked, b.blocked], dim=-1)
    dense = F.pad(a.dense, (0, b.blocked.shape[-1])) if b.dense is None else torch.cat([a.dense, b.dense], dim=-1)
    return _Split(blocked, dense)


def _forward(fac: _Point, a: _Split) -> _Split:
    """L⁻¹ a with L = [[L_bb, 0], [Fᵀ, L_ss]] (a.dense may be None: zero)."""
    if fac.blocked is None or a.blocked is None:
        return _Split(None, torch.linalg.solve_triangular(fac.L_ss, a.dense, upper=False))
    blocked = fac.L_bb_inv @ a.blocked
    projected = group_inner(fac.F, blocked)
    dense = -projected if a.dense is None else a.dense - projected
    return _Split(blocked, torch.linalg.solve_triangular(fac.L_ss, dense, upper=False))


def _p_gram(fac: _Point, gram: Tensor, cross: _Split) -> Tensor:
    """SᵀPS = SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖² for columns S, from ``gram`` = SᵀR⁻¹S and ``cross`` = TᵀR⁻¹S."""
    solved = _forward(fac, _lam_transpose_times(fac, cross))
    return gram - _inner(solved, solved)


# ------------------------------------------------------------------------------------------------
# Traces of P V̇ and the AI matrix


def _pair_weights(inverse: Tensor, pairs: Tensor) -> Tensor:
    """S⁻¹'s entry for each column pair (i, j, out) of :func:`column_pairs` (i ≤ j), doubled where
    i < j: a pair stands for both orders."""
    first, second, out = pairs.unbind(0)
    return inverse.reshape(-1)[out] * torch.where(first == second, 1.0, 2.0).to(inverse.dtype)


def _pair_form(rows: Tensor, fac: _Point) -> Tensor:
    """Σ_g R_g S⁻¹ R_gᵀ (k×k) for R (m, k, d) with the column pattern of :func:`column_pairs`,
    S⁻¹ = (L_ss L_ssᵀ)⁻¹: one pass over the pairs i ≤ j (those with i < j count twice; the result
    is symmetrised)."""
    inverse = torch.cholesky_inverse(fac.L_ss)
    compact = rows[fac.entries[0], :, fac.entries[1]]  # (nnz, k)
    first, second, _ = fac.pairs.unbind(0)
    half = (compact[first] * _pair_weights(inverse, fac.pairs).unsqueeze(-1)).mT @ compact[second]
    return 0.5 * (half + half.mT)


GROUP_CHUNK_ELEMENTS = 1 << 22
"""The traces work on chunks of the blocked term's groups with at most this many entries."""


def _group_chunks(m: int, width: int) -> list[slice | None]:
    """Chunks of the blocked term's m groups, each with at most :data:`GROUP_CHUNK_ELEMENTS` entries
    of ``width`` per group: ``[None]`` (all groups at once, no slicing) when one chunk holds them."""
    step = max(1, GROUP_CHUNK_ELEMENTS // max(1, width))
    return [None] if step >= m else [slice(start, start + step) for start in range(0, m, step)]


def _rows_of(tensor: Tensor, chunk: slice | None) -> Tensor:
    return tensor if chunk is None else tensor[chunk]


def _ztpz_blocked(fac: _Point) -> Tensor:
    """Σ_g (Z_bᵀPZ_b)_gg (k×k) for the blocked term: Σ_g C_g − Σ_g (UᵀΩ⁻¹U)_gg.

    The columns of U = WᵀR⁻¹Z_b for group g are Λ_bᵀC_g in the blocked rows of group g only and
    (C_bs,g Λ_s)ᵀ in the dense rows, so L⁻¹U_g = [L_g⁻¹Λ_bᵀC_g; L_ss⁻¹((C_bs,g Λ_s)ᵀ − F_gᵀ L_g⁻¹Λ_bᵀC_g)].
    """
    b = fac.blocked
    m, k, d = b.columns.m, b.columns.k, fac.L_ss.shape[-1]
    blocked = fac.L_bb_inv @ (b.lam.mT @ fac.C_bb)  # (m, k, k)
    own = fac.C_bb.sum(-3) - group_inner(blocked, blocked)
    if fac.pairs.numel():
        # Σ_g R_g S⁻¹ R_gᵀ (S = L_ss L_ssᵀ, R_g the dense rows of group g) over the column pairs
        # group g can couple: its columns are those of C_bs,g, F_g and their Λ_s-blocks.
        return own - _pair_form(_scaled(_times_lam_s(fac.C_bs, fac.lam_s), fac.w) - blocked.mT @ fac.F, fac)
    # R_g L_ss⁻ᵀ by one triangular solve per chunk of groups: a large crossed design never holds
    # all of its (m·k × d) intermediates at once.
    for chunk in _group_chunks(m, k * d) if d else []:  # d = 0 (no X, no rest): no dense rows
        C_bs, F_, blocked_part = (_rows_of(t, chunk) for t in (fac.C_bs, fac.F, blocked))
        rows = _scaled(_times_lam_s(C_bs, fac.lam_s), fac.w) - blocked_part.mT @ F_  # (c, k, d)
        solved = torch.linalg.solve_triangular(fac.L_ss.mT, rows.reshape(-1, d), upper=True, left=False)
        flat = solved.reshape(-1, k, d).transpose(0, 1).reshape(k, -1)  # (k, c·d): Σ_g s_g s_gᵀ in one product
        own = own - flat @ flat.mT
    return own


def _ztpz_rest(fac: _Point) -> list[Tensor]:
    """Per rest term t, the part of Z_tᵀPZ_t its score needs: Σ_g of the k×k diagonal blocks for a
    Grouped term, the whole (q_t × q_t) for a Propagate term. Z_restᵀPZ_rest = C_rr − ‖L⁻¹U_r‖²
    (:func:`_p_gram`), of which only these blocks are formed (not the q_rest × q_rest matrix).

    L⁻¹U_r has the blocked rows L_bb⁻¹Λ_bᵀC_b,rest, taken in chunks of groups, and the dense rows
    L_ss⁻¹(Λ_sᵀC_s,rest − Fᵀ L_bb⁻¹Λ_bᵀC_b,rest), where Fᵀ L_bb⁻¹Λ_bᵀC_b,rest = Λ_sᵀ H[:, :q_rest]
    (no second m·k·d·q_rest product)."""
    q_rest = _rest_sizes(fac.rest)
    dense = _scaled(_times_lam_s(fac.C_ss[..., :q_rest].mT, fac.lam_s).mT, fac.w)  # Λ_sᵀ C_s,rest (d, q_rest)
    if fac.blocked is not None:
        dense = dense - _times_lam_s(fac.H[..., :q_rest].mT, fac.lam_s).mT
    blocks, offset = [], 0
    for t in fac.rest:
        c, columns = t.columns, slice(offset, offset + t.columns.size)
        gram = fac.C_ss[..., columns, columns]
        if t.grouped:  # Σ_g of the diagonal blocks
            gram = torch.diagonal(gram.reshape(c.m, c.k, c.m, c.k), dim1=0, dim2=2).sum(-1)
        gram = _scaled(gram, fac.w)
        blocks.append(gram)
        offset += c.size
    blocks = _minus_rest_blocks(blocks, fac.rest, torch.linalg.solve_triangular(fac.L_ss, dense, upper=False))
    if fac.blocked is not None:
        b, C_b_rest = fac.blocked, fac.C_bs[..., :q_rest]
        lam_t = _scaled(b.lam.mT, fac.w)  # Λ_bᵀ with R⁻¹
        for chunk in _group_chunks(b.columns.m, b.columns.k * q_rest):
            C, L_inv = _rows_of(C_b_rest, chunk), _rows_of(fac.L_bb_inv, chunk)
            blocks = _minus_rest_blocks(blocks, fac.rest, (L_inv @ (lam_t @ C)).flatten(-3, -2))
    return blocks


def _minus_rest_blocks(blocks: list[Tensor], rest: list[_Term], rows: Tensor) -> list[Tensor]:
    """Each rest term's block less its part of rowsᵀrows for rows (r, q_rest): for a Grouped term
    Σ_g of the k×k diagonal blocks (rows × (m·k) taken as (rows·m) × k), else its whole block."""
    out, offset = [], 0
    for gram, t in zip(blocks, rest):
        c, part = t.columns, rows[..., offset : offset + t.columns.size]
        if t.grouped:
            part = part.reshape(-1, c.k)
        out.append(gram - part.mT @ part)
        offset += c.size
    return out


def _residual_traces(fac: _Point, n: int) -> Tensor:
    """tr(P Ṙ_j) (K_r,) for the residual's parameters of a Diagonal or correlated R
    (:func:`_block_residual_traces` for the latter).

    P = R⁻¹ − R⁻¹W Ω⁻¹ WᵀR⁻¹ for W = [ZΛ, X], so with ã_i = L⁻¹(R⁻¹W)_iᵀ = w_i L⁻¹W_iᵀ (row i
    taken through Ω's factor), P_ii = w_i − ‖ã_i‖², and tr(PṘ_j) = Σ_i ṙ_ji P_ii. The blocked term's
    part of each row is taken through L_g⁻¹ row by row. Forms the (n × d) rows of the dense part."""
    if isinstance(fac.residual, _BlockResidual):
        return _block_residual_traces(fac)
    d = fac.L_ss.shape[-1]
    dense_rows = _weigh(fac.w, torch.cat([_design_times_lam(t) for t in fac.rest] + [fac.X], dim=-1))  # (n, d)
    diagonal = fac.w
    if fac.blocked is not None:
        b = fac.blocked
        rows_b = _weigh(fac.w, b.columns.x @ b.lam)  # (n, k): rows of R⁻¹Z_bΛ_b, in group codes_i
        ab = fac.L_bb_inv.index_select(0, b.columns.codes) @ rows_b.unsqueeze(-1)  # (n, k, 1)
        dense_rows = dense_rows - (ab.mT @ fac.F[b.columns.codes]).squeeze(-2)
        diagonal = diagonal - (ab * ab).sum((-1, -2))
    solved = torch.linalg.solve_triangular(fac.L_ss, dense_rows.mT.reshape(d, n), upper=False)  # (d, n)
    return fac.residual.slopes @ (diagonal - (solved * solved).sum(-2))


def _block_residual_traces(fac: _Point) -> Tensor:
    """tr(P Ṙ_j) (K_r,) for a correlated (block-diagonal) R, without an n-row pass through Ω's factor:

        tr(PṘ_j) = Σ_g ⟨R_g⁻¹, Ṙ_jg⟩ − tr(Ω⁻¹ A_j),   A_j = WᵀM_jW,   M_j = R⁻¹Ṙ_jR⁻¹,

    with A_j = Λᵀ(TᵀM_jT)Λ from the cross products Ω's come from, weighted by M_j's blocks (block
    diagonal too), and Ω⁻¹ by blocks: Ω⁻¹_gg = L_g⁻ᵀL_g⁻¹ + E_gS⁻¹E_gᵀ, Ω⁻¹_gs = −E_gS⁻¹,
    Ω⁻¹_ss = S⁻¹ (E_g = L_g⁻ᵀF_g), so that

        tr(Ω⁻¹A) = ⟨S⁻¹, A_ss⟩ + Σ_g ⟨L_g⁻ᵀL_g⁻¹, A_gg⟩ + Σ_g tr(E_g S⁻¹ (A_ggE_g − 2A_gs)ᵀ),

    the last over the column pairs of :func:`column_pairs` where there are some (O(Σ_g c_g²)), else
    by chunks of groups (O(m·k·d²)). A pass over the rows through Ω's factor took O(n·d²) and
    (n × d) memory."""
    residual = fac.residual
    traces = None
    for slopes, inverse in zip(residual.slopes, residual.inverse):
        traces = plus(traces, (slopes * inverse).sum((-1, -2, -3)))
    inverse_s = torch.cholesky_inverse(fac.L_ss)  # S⁻¹ (d, d)
    blocked = fac.blocked.columns if fac.blocked is not None else None
    projected, coupled = [], []
    for j in range(len(residual.names)):
        weights = residual._replace(
            inverse=tuple(inverse @ slopes[j] @ inverse for slopes, inverse in zip(residual.slopes, residual.inverse))
        )
        cross = _cross_products([t.columns for t in fac.rest], blocked, fac.centred, fac.X, weights, fac.offset)
        value = (inverse_s * _times_lam_s(_times_lam_s(cross.C_ss, fac.lam_s).mT, fac.lam_s)).sum()
        if fac.blocked is not None:
            lam = fac.blocked.lam
            A_gg = _blocks_times(_blocks_times(cross.C_bb, lam).mT, lam)  # Λ_bᵀ C_g Λ_b (m, k, k)
            A_gs = lam.mT @ _times_lam_s(cross.C_bs, fac.lam_s)  # Λ_bᵀ C_bs,g Λ_s (m, k, d)
            value = value + ((fac.L_bb_inv.mT @ fac.L_bb_inv) * A_gg).sum()
            coupled.append((A_gg, A_gs))
        projected.append(value)
    if coupled:
        for j, value in enumerate(_coupled_traces(fac, coupled, inverse_s)):
            projected[j] = projected[j] + value
    return traces - torch.stack(projected)


def _coupled_traces(fac: _Point, coupled: list[tuple[Tensor, Tensor]], inverse_s: Tensor) -> list[Tensor]:
    """Σ_g tr(E_g S⁻¹ (A_gg E_g − 2A_gs)ᵀ) for each ``(A_gg (m, k, k), A_gs (m, k, d))`` of
    ``coupled``, E_g = L_g⁻ᵀF_g: over the column pairs of :func:`column_pairs` where the statistics
    have them (E_g and A_gs are 0 outside group g's columns), else with E S⁻¹ by chunks of groups."""
    left = fac.L_bb_inv.mT  # L_g⁻ᵀ (m, k, k)
    if fac.pairs.numel():
        groups, columns = fac.entries
        E = (left[groups] @ fac.F[groups, :, columns].unsqueeze(-1)).squeeze(-1)  # (nnz, k)
        first, second, _ = fac.pairs.unbind(0)
        weights = 0.5 * _pair_weights(inverse_s, fac.pairs)  # both orders are summed below
        values = []
        for A_gg, A_gs in coupled:
            V = (A_gg[groups] @ E.unsqueeze(-1)).squeeze(-1) - 2.0 * A_gs[groups, :, columns]
            both = (E[first] * V[second]).sum(-1) + (E[second] * V[first]).sum(-1)
            values.append((weights * both).sum())
        return values
    m, k, d = fac.F.shape[-3:]
    values = [inverse_s.new_zeros(()) for _ in coupled]
    for chunk in _group_chunks(m, k * d) if d else []:
        E = _rows_of(left, chunk) @ _rows_of(fac.F, chunk)  # (c, k, d)
        solved = E @ inverse_s
        values = [
            value + (solved * (_rows_of(A_gg, chunk) @ E - 2.0 * _rows_of(A_gs, chunk))).sum()
            for value, (A_gg, A_gs) in zip(values, coupled)
        ]
    return values


def _random_parts(pt: _Point, ze: _Split, need_trace_g: bool):
    """Per random term t: its parameters' score terms and working variates.

    With ze_t = Z_tᵀe: 2 s_j = eᵀV̇_j e − tr(PV̇_j) = tr(Ġ_j (ze_t ze_tᵀ − Z_tᵀPZ_t)) (for a
    Grouped term Ġ_j = I ⊗ Σ̇_j and only Σ_g of the k×k diagonal blocks of both matrices is
    needed), and V̇_j e = Z_t a_j with a_j = Ġ_j ze_t.

    Returns ``(names, twice_score [(K_t,)], A, trace_g)``: A the coefficients of all K
    random-term variates as a :class:`_Split` (dense rows of X are zero); trace_g =
    Σ_t tr(G_t Z_tᵀPZ_t) when ``need_trace_g``."""
    blocked, rest, p = pt.blocked, pt.rest, pt.X.shape[-1]
    rest_ztpz = iter(_ztpz_rest(pt)) if rest else None
    names, twice_score, coefficients = [], [], []
    trace_g = own_blocked = None
    offset = 0
    for t in ([blocked] if blocked is not None else []) + rest:
        c = t.columns
        if t is blocked:
            ztpz, z = _ztpz_blocked(pt), ze.blocked
        else:
            ztpz = next(rest_ztpz)  # Σ over groups of the k×k diagonal blocks for a Grouped term
            z = ze.dense[..., offset : offset + c.size]
            if t.grouped:
                z = z.reshape(c.m, c.k)
            offset += c.size
        if need_trace_g:  # ztpz and G_t are symmetric: tr(G ZᵀPZ) = Σ G ⊙ ZᵀPZ
            trace_g = plus(trace_g, (t.block * ztpz).sum((-1, -2)))
        D = t.derivatives
        if D is None:
            if t is not blocked:
                coefficients.append(z.new_zeros(c.size, 0))
            continue
        names += t.names
        outer = z.mT @ z if t.grouped else z.unsqueeze(-1) * z  # Σ_g ze_g ze_gᵀ, or ze zeᵀ
        twice_score.append((D * (outer - ztpz)).sum((-1, -2)))
        # Row g of a_j for a Grouped term: Σ̇_j ze_g, so a = ze Σ̇_jᵀ (K, m, k); Ġ_j ze otherwise (K, q).
        a = z @ D.mT if t.grouped else D @ z
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
            A_blocked = pt.c_b.new_zeros(blocked.columns.m, blocked.columns.k, len(names))
        else:
            A_blocked = F.pad(own_blocked, (0, len(names) - count_blocked)) if rest else own_blocked
    return names, twice_score, _Split(A_blocked, A_dense), trace_g


def _residual_parts(pt: _Point, ze: _Split, trace_g: Tensor | None):
    """The residual parameters' score terms 2 s_j = Σ_i ṙ_ji (e_i² − P_ii) and working variates
    V_r = [ṙ_j ∘ e]: ``(twice_score (K_r,), TᵀR⁻¹V_r as a _Split, V_rᵀR⁻¹V_r)``."""
    residual, w, p = pt.residual, pt.w, pt.X.shape[-1]
    n = pt.centred.shape[-1]
    slopes = residual.slopes
    if _spherical(residual):
        # R = σ²I: V_r = e ṙᵀ; tr(P) from tr(PV) = n − p; XᵀR⁻¹V_r = 0 since XᵀPy = 0;
        # e·e = w (yᵀPy − ‖ũ‖²) since yᵀPy = e·r + ‖ũ‖² and e = w r.
        u_squares = None  # ‖ũ‖² over the random terms
        if pt.rest:
            spherical = pt.u_s[..., : _rest_sizes(pt.rest)]
            u_squares = (spherical * spherical).sum()
        if pt.blocked is not None:
            u_squares = plus(u_squares, (pt.u_b * pt.u_b).sum())
        squares = w * (pt.penalised if u_squares is None else pt.penalised - u_squares)
        twice_score = slopes * (squares - (n - p - trace_g) * w)
        weighted_slopes = w * slopes
        cross = _Split(
            ze.blocked.unsqueeze(-1) * weighted_slopes if ze.blocked is not None else None,
            F.pad(ze.dense.unsqueeze(-1) * weighted_slopes, (0, 0, 0, p)) if ze.dense is not None else None,
        )
        return twice_score, cross, squares * (weighted_slopes.unsqueeze(-1) * slopes)
    e = _residual_vector(pt)
    # The working variates Ṙ_j e (K_r, n): eᵀṘ_j e is the data part of the score.
    variates = apply_blocks(slopes, residual.buckets, e) if isinstance(residual, _BlockResidual) else slopes * e
    twice_score = (variates * e).sum(-1) - _residual_traces(pt, n)
    vectors = variates.mT  # (n, K_r)
    weighted = _weigh(w, vectors)
    blocked = None
    if pt.blocked is not None:
        b = pt.blocked.columns
        blocked = _segment_sum(b.codes, b.x.unsqueeze(-1) * weighted.unsqueeze(-2), b.m)
    dense = concat([_transpose_times(t.columns, weighted) for t in pt.rest] + [pt.X.mT @ weighted], dim=-2)
    return twice_score, _Split(blocked, dense), vectors.mT @ weighted


def _score_and_ai(pt: _Point, names: list[str]) -> tuple[Tensor, Tensor]:
    """Score and AI in the order of ``names``.

    With the working variates S = [Z A, V_r] (random-term variates by their coefficients A, then
    the residual variates V_r): AI = ½ SᵀPS, SᵀPS = SᵀR⁻¹S − ‖L⁻¹ WᵀR⁻¹S‖², where SᵀR⁻¹S and
    TᵀR⁻¹S = [C A, TᵀR⁻¹V_r] come from the cross products (:func:`_cross_times`)."""
    if not names:
        return pt.c_s.new_zeros(0), pt.c_s.new_zeros(0, 0)
    residual = pt.residual
    need_trace_g = _spherical(residual) and residual.slopes is not None
    ze = _z_transpose_e(pt)
    order, twice_score, A, trace_g = _random_parts(pt, ze, need_trace_g)
    cross = _cross_times(pt, A)
    if residual.slopes is None:
        gram = _inner(A, cross)
    else:
        twice_score_r, cross_r, gram_rr = _residual_parts(pt, ze, trace_g)
        cross = _columns_side_by_side(cross, cross_r)
        top = _inner(A, cross)  # [AᵀCA, AᵀTᵀR⁻¹V_r]
        gram = torch.cat([top, torch.cat([top[..., len(order) :].mT, gram_rr], dim=-1)], dim=-2)
        order, twice_score = order + residual.names, twice_score + [twice_score_r]
    score = 0.5 * concat(twice_score, dim=-1)
    inner = _p_gram(pt, gram, cross)
    ai = 0.25 * (inner + inner.mT)  # ½ SᵀPS, symmetrised
    if order != names:
        index = torch.tensor([order.index(name) for name in names], device=score.device)
        score, ai = score[..., index], ai[..., index, :][..., index]
    return score, ai


# ------------------------------------------------------------------------------------------------
# The engine


def _inputs(s, params, y: Tensor, X: Tensor, prepared: Statistics | None):
    """``(layout, params in its structure's form, statistics)`` for an engine call."""
    model = layout(s)
    stats = prepared if prepared is not None else statistics(model, y, X)
    return model, grouped_params(params, model.converted), stats


class MMEEngine:
    """Henderson's mixed-model equations in lme4's spherical form (see the module docstring).

    Supports ``Sum``s (nested allowed) of Grouped terms, Propagate terms with a ``Fixed`` Z, and
    at least one residual term that is ``Scalar``, ``Identity`` or ``Diagonal``, or one
    ``WithinGroup`` residual term alone (with codes readable on the host); the dense part
    (all random columns except the largest Grouped term's) must have at most n/2 columns.
    """

    name = "mme"

    def supports(self, s) -> bool:
        model = layout(s)
        if model is None:
            return False
        return sum(_width(term) for _, term in model.rest) <= model.structure.shape[0] // 2

    def prepare(self, s, y, X) -> Statistics:
        """What does not change between iterations, computed once per dataset (:func:`statistics`).
        Pure and vmappable; pass the result as ``prepared=`` to :meth:`loglik`, :meth:`ai_terms`
        and :meth:`gls` with the same ``s``, y and X.

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
        return statistics(layout(s), y, X)

    def loglik(self, s, params, y, X, prepared=None) -> Tensor:
        model, params, stats = _inputs(s, params, y, X, prepared)
        return _evaluate(model, params, stats, X, effects=False).loglik

    def ai_terms(
        self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None, prepared=None
    ) -> AITerms:
        """Exact traces always (``trace="hutchpp"`` is accepted and computed exactly: they are cheap here)."""
        if trace not in ("exact", "hutchpp"):
            raise ValueError(f"unknown trace method {trace!r}; expected 'exact' or 'hutchpp'")
        return self.ai_terms_and_vcov(s, params, y, X, jacobian, prepared)[0]

    def ai_terms_and_vcov(self, s, params, y, X, jacobian="closed", prepared=None) -> tuple[AITerms, Tensor]:
        """:meth:`ai_terms` and (XᵀV⁻¹X)⁻¹ (:meth:`gls`'s) from the same factor."""
        model, params, stats = _inputs(s, params, y, X, prepared)
        pt = _evaluate(model, params, stats, X, jacobian)
        score, ai = _score_and_ai(pt, param_names(model.structure))
        score = torch.where(pt.ok, score, math.nan)
        ai = torch.where(pt.ok, ai, math.nan)
        return AITerms(pt.loglik, score, ai, torch.where(pt.ok, _beta(pt), math.nan)), _vcov_beta(pt)

    def jacobian_traces(self, s, params, jacobian="closed") -> Tensor:
        """tr(∂V/∂θ_k) (k,) in O(n·k²): tr(Σ̇ Σ_i x_i x_iᵀ) for a Grouped term, tr(Ġ ZᵀZ) for a
        Propagate term, Σ_i ṙ_i for the residual."""
        model = layout(s)
        params = grouped_params(params, model.converted)
        leaf = first_leaf(params)
        dtype = leaf.dtype if leaf is not None else torch.get_default_dtype()
        device = leaf.device if leaf is not None else None
        random = ([model.blocked] if model.blocked is not None else []) + list(model.rest)
        traces = {}
        for path, term in random:
            names, derivatives = derivative_stack(*_covariance_of(path, term, params), jacobian, dtype)
            if derivatives is None:
                continue
            c = _columns(term, dtype)
            gram = c.x.mT @ c.x if c.dense is None else c.dense.mT @ c.dense
            traces.update(zip(names, (derivatives * gram.mT).sum((-1, -2))))
        n = model.structure.shape[0]
        if model.within is not None:
            buckets = residual_buckets(model.within[1], dtype)
            residual = _block_residual(model, params, buckets, (), dtype, jacobian)
            if residual.slopes is not None:
                diagonals = [torch.diagonal(slopes, dim1=-2, dim2=-1).sum((-1, -2)) for slopes in residual.slopes]
                traces.update(zip(residual.names, sum(diagonals)))
        else:
            residual = _residual(model, params, n, dtype, device, True)
            if residual.slopes is not None:
                traces.update(
                    zip(residual.names, n * residual.slopes if residual.r.dim() == 0 else residual.slopes.sum(-1))
                )
        names = param_names(model.structure)
        return torch.stack([traces[k] for k in names]) if names else torch.zeros(0, dtype=dtype)

    def gls(self, s, params, y, X, prepared=None) -> tuple[Tensor, Tensor]:
        """β̂ and (XᵀV⁻¹X)⁻¹ from the last p×p block of the factor."""
        model, params, stats = _inputs(s, params, y, X, prepared)
        pt = _evaluate(model, params, stats, X)
        return torch.where(pt.ok, _beta(pt), math.nan), _vcov_beta(pt)

    def random_effects(self, s, params, y, X) -> dict[str, Tensor]:
        """û = Λũ per term path: (m, k) for Grouped terms, (q,) for Propagate terms."""
        model, params, stats = _inputs(s, params, y, X, None)
        return propagate_effects(_effects(_evaluate(model, params, stats, X)), model.converted)

    def fitted_random(self, s, params, y, X) -> Tensor:
        """Σ_t Z_t û_t (n,)."""
        model, params, stats = _inputs(s, params, y, X, None)
        return _fitted_random(_evaluate(model, params, stats, X))


register_engine("mme", MMEEngine(), prefer=True)
