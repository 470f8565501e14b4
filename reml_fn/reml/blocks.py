"""The blocks engine: V block-diagonal over the groups of a correlated residual, each block dense.

For models whose residual is a :class:`~reml_fn.structures.within_group.WithinGroup` (nlme's
correlation and variance functions) and whose random terms are Grouped terms nested in its groups
(every random-effect group inside one residual group: ``(1 | Subject)`` with ``cor_ar1(group =
"Subject")``, or no random term at all), V = diag(V_1, …, V_m) with

    V_g = Σ_t S_tg ∘ (X_tg Σ_t X_tgᵀ) + R_g,   S_tg[i, j] = [term t puts rows i, j in one group],

n_g × n_g for the n_g rows of group g. Groups of equal size form a bucket whose blocks are
factorised at once (no padding), so an evaluation costs O(Σ_g n_g³) time and O(Σ_g n_g²) memory
instead of the dense engine's O(n³) and O(n²), in one pass per distinct group size. With
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
from reml_fn.params import param_names, subtree
from reml_fn.reml.covariance_blocks import matrix_and_derivative_stack
from reml_fn.reml.dense import AITerms, inverse_from_cholesky
from reml_fn.reml.engines import register_engine, term_effects, term_fitted
from reml_fn.reml.residual_blocks import groups_nested, residual_buckets, residual_matrices
from reml_fn.structures.within_group import RowPairs, WithinGroup, within_group_matrix

__all__ = ["BlocksEngine", "Blocks", "blocks_of", "residual_draws"]


class _Model(NamedTuple):
    residual_path: tuple[str, ...]  # (the residual's name in the Sum,), or () when s is the residual
    residual: WithinGroup
    terms: tuple  # (name, Grouped) in Sum order


def _model(s) -> _Model | None:
    if isinstance(s, WithinGroup):
        return _Model((), s, ())
    if not isinstance(s, Sum):
        return None
    residuals = [(name, child) for name, child in s.items() if isinstance(child, WithinGroup)]
    terms = [(name, child) for name, child in s.items() if isinstance(child, Grouped)]
    if len(residuals) != 1 or len(residuals) + len(terms) != len(s.children):
        return None
    return _Model((residuals[0][0],), residuals[0][1], tuple(terms))


class Blocks(NamedTuple):
    """The θ-independent blocks of the m groups of one size a (``BlocksEngine.prepare`` makes one per
    group size): row index (m, a), y (m, a), X (m, a, p), the residual's row pairs,
    and per random term the basis B_ab = S ∘ (x_a x_bᵀ) (k, k, m, a, a), so that its block is
    Σ_ab Σ_ab B_ab."""

    rows: Tensor
    y: Tensor
    X: Tensor
    pairs: RowPairs
    bases: tuple


def blocks_of(model: _Model, y: Tensor, X: Tensor) -> tuple[Blocks, ...]:
    """The groups of the residual as buckets of equal size: bucket b holds its m_b groups of a_b rows
    as (m_b, a_b, …) arrays, so nothing is padded (one bucket per distinct group size)."""
    dtype = y.dtype
    buckets = []
    for rows, pairs in residual_buckets(model.residual, dtype):
        bases = []
        for _, term in model.terms:
            x = term.covariates.to(dtype)[rows]  # (m_b, a_b, k)
            term_codes = term.codes[rows]
            same = (term_codes.unsqueeze(-1) == term_codes.unsqueeze(-2)).to(dtype)
            bases.append(same * torch.einsum("gia,gjb->abgij", x, x))
        buckets.append(Blocks(rows, y[..., rows], X[rows], pairs, tuple(bases)))
    return tuple(buckets)


def _matrix_and_derivatives(model: _Model, params: Mapping, blocks: Blocks, derivatives: bool, jacobian: str):
    """V blocks (m, a, a) of one bucket and, with ``derivatives``, ∂V/∂θ (K, m, a, a) by parameter name."""
    dtype = blocks.y.dtype
    residual = model.residual
    raw = subtree(params, model.residual_path)
    free = [spec for spec in residual.specs if not spec.fixed] if derivatives else []
    R, d_raw = residual_matrices(residual, raw, blocks.pairs, [spec.name for spec in free], jacobian)
    V = R
    pieces = {}
    for (name, term), basis in zip(model.terms, blocks.bases):
        term_params = params.get(name, {}).get("cov", {})
        method = jacobian if derivatives else None
        sigma, names, D = matrix_and_derivative_stack(term.cov, term_params, f"{name}/cov", method, dtype)
        flat = basis.flatten(0, 1).flatten(1)  # (k², m·a·a)
        V = V + (sigma.flatten() @ flat).view(V.shape)
        if derivatives:
            if names:
                for path, block in zip(names, (D.flatten(1) @ flat).view(len(names), *V.shape)):
                    pieces[path] = block
    if not derivatives:
        return V, None
    prefix = "".join(f"{name}/" for name in model.residual_path)
    for spec in free:
        pieces[prefix + spec.name] = d_raw[spec.name]
    return V, pieces


class _Solved(NamedTuple):
    loglik: Tensor
    beta: Tensor
    vcov: Tensor
    L: tuple  # per bucket (m_b, a_b, a_b)
    whitened_X: tuple
    whitened_residual: tuple
    ok: Tensor


def _solve(V: tuple, buckets: tuple, n: int) -> _Solved:
    """Factor every bucket's blocks; β̂ and C from the sums over all groups; ℓ."""
    p = buckets[0].X.shape[-1]
    dtype, device = V[0].dtype, V[0].device
    ok = torch.ones((), dtype=torch.bool, device=device)
    factors, whitened_X, whitened_y = [], [], []
    information = torch.zeros(p, p, dtype=dtype, device=device)
    right = torch.zeros(p, dtype=dtype, device=device)
    log_det = torch.zeros((), dtype=dtype, device=device)
    for V_b, blocks in zip(V, buckets):
        L, info = torch.linalg.cholesky_ex(V_b)
        ok = ok & (info == 0).all()
        L = torch.where(ok, L, torch.eye(V_b.shape[-1], dtype=dtype, device=device))
        whitened = torch.linalg.solve_triangular(L, torch.cat([blocks.X, blocks.y.unsqueeze(-1)], -1), upper=False)
        wX, wy = whitened[..., :p], whitened[..., p]
        information = information + torch.einsum("gap,gaq->pq", wX, wX)
        right = right + torch.einsum("gap,ga->p", wX, wy)
        log_det = log_det + 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum()
        factors.append(L)
        whitened_X.append(wX)
        whitened_y.append(wy)
    chol_x, info_x = torch.linalg.cholesky_ex(information)
    ok = ok & (info_x == 0)
    chol_x = torch.where(ok, chol_x, torch.eye(p, dtype=dtype, device=device))
    beta = torch.cholesky_solve(right.unsqueeze(-1), chol_x).squeeze(-1)
    residuals = [wy - wX @ beta for wX, wy in zip(whitened_X, whitened_y)]
    squares = sum((r * r).sum() for r in residuals)
    log_det = log_det + 2.0 * torch.log(torch.diagonal(chol_x)).sum()
    value = -0.5 * (log_det + squares) - 0.5 * (n - p) * math.log(2.0 * math.pi)
    loglik = torch.where(ok, value, -math.inf)
    return _Solved(loglik, beta, inverse_from_cholesky(chol_x), tuple(factors), tuple(whitened_X), tuple(residuals), ok)


class BlocksEngine:
    """REML by dense blocks per group of a correlated residual (module docstring)."""

    name = "blocks"

    def supports(self, s) -> bool:
        model = _model(s)
        # Every group of each random term inside one group of the residual: V is block diagonal.
        return model is not None and all(groups_nested(term.codes, model.residual.codes) for _, term in model.terms)

    def prepare(self, s, y, X) -> tuple[Blocks, ...]:
        """The blocks of y, X and the structure's data by group size (θ-independent; once per dataset)."""
        return blocks_of(_model(s), y, X)

    def _factor(self, s, params, y, X, prepared, derivatives: bool, jacobian: str = "closed"):
        model = _model(s)
        buckets = prepared if prepared is not None else blocks_of(model, y, X)
        built = [_matrix_and_derivatives(model, params, blocks, derivatives, jacobian) for blocks in buckets]
        solved = _solve(tuple(V for V, _ in built), buckets, y.shape[-1])
        return model, buckets, solved, [pieces for _, pieces in built]

    def loglik(self, s, params, y, X, prepared=None) -> Tensor:
        return self._factor(s, params, y, X, prepared, False)[2].loglik

    def gls(self, s, params, y, X, prepared=None) -> tuple[Tensor, Tensor]:
        solved = self._factor(s, params, y, X, prepared, False)[2]
        return torch.where(solved.ok, solved.beta, math.nan), torch.where(solved.ok, solved.vcov, math.nan)

    @staticmethod
    def _Py(L: Tensor, whitened_residual: Tensor) -> Tensor:
        """q = Py blockwise (m_b, a_b): L_g⁻ᵀ r̃_g."""
        return torch.linalg.solve_triangular(L.mT, whitened_residual.unsqueeze(-1), upper=True).squeeze(-1)

    def ai_terms(
        self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None, prepared=None
    ) -> AITerms:
        """Exact traces always (``trace`` is accepted for the engine protocol)."""
        return self.ai_terms_and_vcov(s, params, y, X, jacobian, prepared)[0]

    def ai_terms_and_vcov(self, s, params, y, X, jacobian="closed", prepared=None) -> tuple[AITerms, Tensor]:
        """:meth:`ai_terms` and (XᵀV⁻¹X)⁻¹ (:meth:`gls`'s) from the same factorisation."""
        model, buckets, solved, pieces = self._factor(s, params, y, X, prepared, True, jacobian)
        names = param_names(s)
        K, p = len(names), solved.beta.shape[-1]
        dtype, device = solved.beta.dtype, solved.beta.device
        score = torch.zeros(K, dtype=dtype, device=device)
        a = torch.zeros(K, p, dtype=dtype, device=device)
        inner = torch.zeros(K, K, dtype=dtype, device=device)
        for L, wX, residual, bucket_pieces in zip(solved.L, solved.whitened_X, solved.whitened_residual, pieces):
            q = self._Py(L, residual)
            V_inv = inverse_from_cholesky(L)
            W = torch.linalg.solve_triangular(L.mT, wX, upper=True)  # V_g⁻¹ X_g
            # s_j = ½ ⟨V̇_j, q qᵀ − P_gg⟩, P_gg = V_g⁻¹ − W_g C W_gᵀ; one block derivative at a time.
            G = (0.5 * (q.unsqueeze(-1) * q.unsqueeze(-2) - V_inv + W @ solved.vcov @ W.mT)).flatten()
            if not K:
                continue
            score = score + torch.stack([bucket_pieces[name].flatten() @ G for name in names])
            u = torch.stack([(bucket_pieces[name] @ q.unsqueeze(-1)).squeeze(-1) for name in names])  # V̇_j q
            a = a + torch.einsum("gap,kga->kp", W, u)
            inner = inner + torch.einsum("jga,gab,kgb->jk", u, V_inv, u)
        inner = inner - a @ solved.vcov @ a.mT
        ai = 0.25 * (inner + inner.mT)
        terms = AITerms(
            solved.loglik,
            torch.where(solved.ok, score, math.nan),
            torch.where(solved.ok, ai, math.nan),
            torch.where(solved.ok, solved.beta, math.nan),
        )
        return terms, torch.where(solved.ok, solved.vcov, math.nan)

    def jacobian_traces(self, s, params, jacobian="closed") -> Tensor:
        """tr(∂V/∂θ_k) (k,) from the blocks' diagonals."""
        model = _model(s)
        n = model.residual.codes.shape[0]
        dtype = model.residual.locations.dtype
        buckets = blocks_of(model, torch.zeros(n, dtype=dtype), torch.zeros(n, 0, dtype=dtype))
        names = param_names(s)
        total = torch.zeros(len(names), dtype=dtype)
        for blocks in buckets:
            _, pieces = _matrix_and_derivatives(model, params, blocks, True, jacobian)
            total = total + torch.stack([torch.diagonal(pieces[name], dim1=-2, dim2=-1).sum() for name in names])
        return total

    def _full_Py(self, s, params, y, X) -> tuple[_Model, Tensor]:
        model, buckets, solved, _ = self._factor(s, params, y, X, None, False)
        Py = torch.zeros(y.shape[-1], dtype=y.dtype, device=y.device)
        for blocks, L, residual in zip(buckets, solved.L, solved.whitened_residual):
            Py = Py.index_put((blocks.rows.flatten(),), self._Py(L, residual).flatten())
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


def residual_draws(residual: WithinGroup, natural: Mapping, nsim: int, generator: torch.Generator, dtype) -> Tensor:
    """``nsim`` draws e ~ N(0, R) (n, nsim) of a :class:`WithinGroup` residual at its natural
    parameters, group block by group block (R_g = L_g L_gᵀ, e_g = L_g z_g): O(Σ_g n_g³), never n × n."""
    n = residual.codes.shape[0]
    draws = torch.zeros(n, nsim, dtype=dtype)
    for rows, pairs in residual_buckets(residual, dtype):
        L = torch.linalg.cholesky(within_group_matrix(residual, dict(natural), pairs))
        z = torch.randn(*rows.shape, nsim, generator=generator, dtype=dtype)
        draws = draws.index_put((rows.flatten(),), (L @ z).flatten(0, 1))
    return draws


register_engine("blocks", BlocksEngine(), prefer=True)
