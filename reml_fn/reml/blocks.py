"""The blocks engine: V block-diagonal over the groups of a correlated residual, each block dense.

For models whose residual is a :class:`~reml_fn.structures.within_group.WithinGroup` (nlme's
correlation and variance functions) and whose random terms are Grouped terms nested in its groups
(every random-effect group inside one residual group: ``(1 | Subject)`` with ``cor_ar1(group =
"Subject")``, or no random term at all), V = diag(V_1, …, V_m) with

    V_g = Σ_t S_tg ∘ (X_tg Σ_t X_tgᵀ) + R_g,   S_tg[i, j] = [term t puts rows i, j in one group],

n_g × n_g for the n_g rows of group g. Blocks are padded to the largest group (padding rows carry
an identity block, zero data) and factorised all at once, so an evaluation costs O(Σ_g n_g³) time
and O(m·a²) memory (a the largest group) instead of the dense engine's O(n³) and O(n²). With
L_g L_gᵀ = V_g, C = (XᵀV⁻¹X)⁻¹, q = Py = V⁻¹(y − Xβ̂) and P_gg = V_g⁻¹ − W_g C W_gᵀ (W_g = V_g⁻¹X_g):

    ℓ = −½ (Σ_g log|V_g| + log|XᵀV⁻¹X| + Σ_g r̃_gᵀr̃_g) − (n − p)/2 log 2π,   r̃_g = L_g⁻¹(y_g − X_gβ̂),
    s_j = −½ Σ_g ⟨P_gg, V̇_jg⟩ + ½ Σ_g q_gᵀV̇_jg q_g,
    AI_jk = ½ (Σ_g u_jgᵀ V_g⁻¹ u_kg − a_jᵀ C a_k),   u_jg = V̇_jg q_g,  a_j = Σ_g W_gᵀ u_jg.

The within-group correlation and its derivatives come from the same functions that build the
full matrix (:func:`~reml_fn.structures.within_group.within_group_matrix`), evaluated on the
blocks' row pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.combinators import Grouped, Sum
from reml_fn.params import param_names
from reml_fn.reml.covariance_blocks import derivative_stack
from reml_fn.reml.dense import AITerms, inverse_from_cholesky
from reml_fn.reml.engines import register_engine, term_effects, term_fitted
from reml_fn.structures.within_group import (
    RowPairs,
    WithinGroup,
    pairwise_distance,
    row_pairs,
    within_group_matrix_and_derivatives,
)

__all__ = ["BlocksEngine", "Blocks"]


class _Model(NamedTuple):
    residual_path: str | None  # the residual's name in the Sum, None when s is the residual
    residual: WithinGroup
    terms: tuple  # (name, Grouped) in Sum order


def _model(s) -> _Model | None:
    if isinstance(s, WithinGroup):
        return _Model(None, s, ())
    if not isinstance(s, Sum):
        return None
    residuals = [(name, child) for name, child in s.items() if isinstance(child, WithinGroup)]
    terms = [(name, child) for name, child in s.items() if isinstance(child, Grouped)]
    if len(residuals) != 1 or len(residuals) + len(terms) != len(s.children):
        return None
    return _Model(residuals[0][0], residuals[0][1], tuple(terms))


def _nested(term: Grouped, residual: WithinGroup) -> bool:
    """Every group of ``term`` lies inside one group of ``residual``."""
    if torch._C._functorch.is_functorch_wrapped_tensor(term.codes):
        return False
    size = int(term.codes.max()) + 1
    largest = torch.full((size,), -1, dtype=residual.codes.dtype).scatter_reduce(0, term.codes, residual.codes, "amax")
    smallest = torch.full((size,), -1, dtype=residual.codes.dtype).scatter_reduce(
        0, term.codes, residual.codes, "amin", include_self=False
    )
    return bool((largest == smallest).all())


class Blocks(NamedTuple):
    """The θ-independent blocks of one dataset (``BlocksEngine.prepare``): row index (m, a) (``n`` for
    padding), valid (m, a), y (m, a), X (m, a, p), the residual's row pairs, and per random term
    the basis B_ab = S ∘ (x_a x_bᵀ) (k, k, m, a, a), so that its block is Σ_ab Σ_ab B_ab."""

    rows: Tensor
    valid: Tensor
    y: Tensor
    X: Tensor
    pairs: RowPairs
    bases: tuple
    padding: Tensor  # (m, a, a) the identity on padding rows, 0 elsewhere


def _pad(values: Tensor, rows: Tensor, fill: float) -> Tensor:
    padded = torch.cat([values, torch.full((1, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)])
    return padded[rows]


def blocks_of(model: _Model, y: Tensor, X: Tensor) -> Blocks:
    residual = model.residual
    codes = residual.codes
    n = codes.shape[0]
    # Codes 0 … m−1 (a code without rows is an empty block: identity, no data).
    group = codes
    counts = torch.bincount(group)
    m, a = counts.shape[0], int(counts.max())
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n, device=codes.device) - starts[group[order]]
    rows = torch.full((m, a), n, dtype=torch.long, device=codes.device)
    rows[group[order], position] = order
    valid = rows < n
    dtype = y.dtype
    pair_valid = (valid.unsqueeze(-1) & valid.unsqueeze(-2)).to(dtype)
    locations = _pad(residual.locations.to(dtype), rows, 0.0)
    pairs = row_pairs(
        pair_valid,
        torch.diag_embed(valid.to(dtype)),
        pairwise_distance(locations),
        _pad(residual.strata, rows, 0),
        _pad(residual.covariate.to(dtype), rows, 1.0),
        _pad(residual.locations[:, 0].round().long(), rows, 0),
    )
    bases = []
    for _, term in model.terms:
        x = _pad(term.covariates.to(dtype), rows, 0.0)  # (m, a, k)
        term_codes = _pad(term.codes, rows, -1)
        same = (term_codes.unsqueeze(-1) == term_codes.unsqueeze(-2)).to(dtype) * pair_valid
        bases.append(same * torch.einsum("gia,gjb->abgij", x, x))
    padding = torch.diag_embed((~valid).to(dtype))
    return Blocks(rows, valid, _pad(y, rows, 0.0), _pad(X, rows, 0.0), pairs, tuple(bases), padding)


def _subtree(params: Mapping, name: str | None) -> Mapping:
    return params if name is None else params.get(name, {})


def _matrix_and_derivatives(model: _Model, params: Mapping, blocks: Blocks, derivatives: bool, jacobian: str):
    """V blocks (m, a, a) (padding rows: identity) and, with ``derivatives``, ∂V/∂θ (K, m, a, a) in
    the order of the structure's free parameters."""
    dtype = blocks.y.dtype
    residual = model.residual
    raw = _subtree(params, model.residual_path)
    natural = residual._natural(raw)
    free = [spec for spec in residual.specs if not spec.fixed] if derivatives else []
    # dV/dθ = dV/dx · t'(θ): the slopes t' go in as scales (t' is None where it is exactly 1).
    slopes = {spec.name: spec.transform._derivative_at(raw[spec.name], natural[spec.name]) for spec in free}
    scales = {name: slope for name, slope in slopes.items() if slope is not None}
    R, d_raw = within_group_matrix_and_derivatives(
        residual, natural, [spec.name for spec in free], blocks.pairs, scales
    )
    V = R + blocks.padding
    pieces = {}
    for (name, term), basis in zip(model.terms, blocks.bases):
        term_params = params.get(name, {}).get("cov", {})
        sigma = term.cov._build(term_params).to(dtype)
        flat = basis.flatten(0, 1).flatten(1)  # (k², m·a·a)
        V = V + (sigma.flatten() @ flat).view(V.shape)
        if derivatives:
            names, D = derivative_stack(term.cov, term_params, f"{name}/cov", jacobian, dtype)
            if names:
                for path, block in zip(names, (D.flatten(1) @ flat).view(len(names), *V.shape)):
                    pieces[path] = block
    if not derivatives:
        return V, None
    prefix = "" if model.residual_path is None else f"{model.residual_path}/"
    for spec in free:
        pieces[prefix + spec.name] = d_raw[spec.name]
    return V, pieces


class _Solved(NamedTuple):
    loglik: Tensor
    beta: Tensor
    vcov: Tensor
    L: Tensor
    whitened_X: Tensor
    whitened_residual: Tensor
    ok: Tensor


def _solve(V: Tensor, blocks: Blocks, n: int) -> _Solved:
    L, info = torch.linalg.cholesky_ex(V)
    ok = (info == 0).all()
    eye = torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    L = torch.where(ok, L, eye)
    p = blocks.X.shape[-1]
    whitened = torch.linalg.solve_triangular(L, torch.cat([blocks.X, blocks.y.unsqueeze(-1)], -1), upper=False)
    wX, wy = whitened[..., :p], whitened[..., p]
    information = torch.einsum("gap,gaq->pq", wX, wX)
    chol_x, info_x = torch.linalg.cholesky_ex(information)
    ok = ok & (info_x == 0)
    chol_x = torch.where(ok, chol_x, torch.eye(p, dtype=V.dtype, device=V.device))
    beta = torch.cholesky_solve(torch.einsum("gap,ga->p", wX, wy).unsqueeze(-1), chol_x).squeeze(-1)
    residual = wy - wX @ beta
    log_det = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum() + 2.0 * torch.log(torch.diagonal(chol_x)).sum()
    value = -0.5 * (log_det + (residual * residual).sum()) - 0.5 * (n - p) * math.log(2.0 * math.pi)
    loglik = torch.where(ok, value, -math.inf)
    return _Solved(loglik, beta, inverse_from_cholesky(chol_x), L, wX, residual, ok)


class BlocksEngine:
    """REML by dense blocks per group of a correlated residual (module docstring)."""

    name = "blocks"

    def supports(self, s) -> bool:
        model = _model(s)
        return model is not None and all(_nested(term, model.residual) for _, term in model.terms)

    def prepare(self, s, y, X) -> Blocks:
        """The padded blocks of y, X and the structure's data (θ-independent; once per dataset)."""
        return blocks_of(_model(s), y, X)

    def _blocks(self, s, y, X, prepared):
        model = _model(s)
        return model, (prepared if prepared is not None else blocks_of(model, y, X))

    def loglik(self, s, params, y, X, prepared=None) -> Tensor:
        model, blocks = self._blocks(s, y, X, prepared)
        V, _ = _matrix_and_derivatives(model, params, blocks, False, "closed")
        return _solve(V, blocks, y.shape[-1]).loglik

    def gls(self, s, params, y, X, prepared=None) -> tuple[Tensor, Tensor]:
        model, blocks = self._blocks(s, y, X, prepared)
        V, _ = _matrix_and_derivatives(model, params, blocks, False, "closed")
        solved = _solve(V, blocks, y.shape[-1])
        return torch.where(solved.ok, solved.beta, math.nan), torch.where(solved.ok, solved.vcov, math.nan)

    def _Py(self, solved: _Solved) -> Tensor:
        """q = Py (m, a) blockwise: L_g⁻ᵀ r̃_g."""
        return torch.linalg.solve_triangular(solved.L.mT, solved.whitened_residual.unsqueeze(-1), upper=True).squeeze(
            -1
        )

    def ai_terms(
        self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None, prepared=None
    ) -> AITerms:
        """Exact traces always (``trace`` is accepted for the engine protocol)."""
        model, blocks = self._blocks(s, y, X, prepared)
        V, pieces = _matrix_and_derivatives(model, params, blocks, True, jacobian)
        solved = _solve(V, blocks, y.shape[-1])
        names = param_names(s)
        q = self._Py(solved)
        V_inv = inverse_from_cholesky(solved.L)
        W = torch.linalg.solve_triangular(solved.L.mT, solved.whitened_X, upper=True)  # V_g⁻¹ X_g
        # s_j = ½ ⟨V̇_j, q qᵀ − P_gg⟩ over all blocks, P_gg = V_g⁻¹ − W_g C W_gᵀ; one block derivative
        # at a time (never all K of them stacked).
        G = (0.5 * (q.unsqueeze(-1) * q.unsqueeze(-2) - V_inv + W @ solved.vcov @ W.mT)).flatten()
        score = torch.stack([pieces[name].flatten() @ G for name in names]) if names else V.new_zeros(0)
        u = (
            torch.stack([(pieces[name] @ q.unsqueeze(-1)).squeeze(-1) for name in names])
            if names
            else V.new_zeros(0, *q.shape)
        )  # (K, m, a): V̇_j q blockwise
        a = torch.einsum("gap,kga->kp", W, u)
        inner = torch.einsum("jga,gab,kgb->jk", u, V_inv, u) - a @ solved.vcov @ a.mT
        ai = 0.25 * (inner + inner.mT)
        return AITerms(
            solved.loglik,
            torch.where(solved.ok, score, math.nan),
            torch.where(solved.ok, ai, math.nan),
            torch.where(solved.ok, solved.beta, math.nan),
        )

    def jacobian_traces(self, s, params, jacobian="closed") -> Tensor:
        """tr(∂V/∂θ_k) (k,) from the blocks' diagonals."""
        model = _model(s)
        leaf = model.residual.codes
        n = leaf.shape[0]
        dtype = model.residual.locations.dtype
        dummy_y, dummy_X = torch.zeros(n, dtype=dtype), torch.zeros(n, 0, dtype=dtype)
        blocks = blocks_of(model, dummy_y, dummy_X)
        _, pieces = _matrix_and_derivatives(model, params, blocks, True, jacobian)
        return torch.stack([torch.diagonal(pieces[name], dim1=-2, dim2=-1).sum() for name in param_names(s)])

    def _full_Py(self, s, params, y, X) -> tuple[_Model, Tensor]:
        model, blocks = self._blocks(s, y, X, None)
        V, _ = _matrix_and_derivatives(model, params, blocks, False, "closed")
        q = self._Py(_solve(V, blocks, y.shape[-1]))
        Py = torch.zeros(y.shape[-1] + 1, dtype=y.dtype, device=y.device).index_put(
            (blocks.rows.flatten(),), q.flatten()
        )[:-1]
        return model, Py

    def random_effects(self, s, params, y, X) -> dict[str, Tensor]:
        """û_t = (I ⊗ Σ_t) Z_tᵀ P y per random term ((m_t, k))."""
        model, Py = self._full_Py(s, params, y, X)
        return {name: term_effects(term, params.get(name, {}), Py) for name, term in model.terms}

    def fitted_random(self, s, params, y, X) -> Tensor:
        model, Py = self._full_Py(s, params, y, X)
        total = torch.zeros_like(y)
        for name, term in model.terms:
            effects = term_effects(term, params.get(name, {}), Py)
            total = total + term_fitted(term, params.get(name, {}), effects)
        return total


register_engine("blocks", BlocksEngine(), prefer=True)
