r"""Moment estimates of variance components: where a REML fit of a grouped model starts.

Model: V = Σ_a Z_a (I_{m_a} ⊗ Σ_a) Z_aᵀ + σ²I for random terms a of grouped shape (group codes,
k_a covariates per row; a Grouped term, or a Propagate term of that shape) whose k_a × k_a
covariance is linear in its natural parameters, Σ_a = Σ_l θ_al E_al (``Unstructured``,
``Diagonal``, ``Scalar``). Every parameter enters V linearly, V = Σ_j θ_j V_j, so with
Q = I − X(XᵀX)⁻¹Xᵀ and the least-squares residual e = Qy,

    E[eᵀV_i e] = tr(QV_iQV) = Σ_j tr(QV_iQV_j) θ_j.

Equating eᵀV_i e with its expectation gives one linear equation per parameter: MIVQUE(0), Rao's
minimum-variance quadratic unbiased estimator with the prior V₀ = I, which is SAS PROC MIXED's
default start. It needs no iteration and no n×n matrix (:func:`mivque0_equations`):
eᵀV_al e = Σ_g c_gᵀE_al c_g with c_g = Z_aᵀe by group, and with N_ab = Z_aᵀZ_b, P_a = Z_aᵀX,
K = (XᵀX)⁻¹ and D_al = I ⊗ E_al,

    tr(QV_alQV_bl') = tr(D_al N_ab D_bl' N_abᵀ) − 2 tr(D_al N_ab D_bl' P_b K P_aᵀ)
                      + tr(P_aᵀD_al P_a K P_bᵀD_bl' P_b K),
    tr(QV_alQ)      = ⟨E_al, Σ_r x_a,r x_a,rᵀ⟩ − tr(P_aᵀD_al P_a K),      tr(QQ) = n − p.

N_ab has a k_a × k_b block for every pair of levels (g, h) that share a row: one sort of the pair
keys gives them, with no m_a × m_b table, for crossed factors as for nested ones.

On balanced data MIVQUE(0) is the ANOVA estimator, and where the REML likelihood factors it is
the REML estimate whenever that lies inside the parameter space. Examples: the one-way and
two-way layouts, and sleepstudy's ``(Days | Subject)``, whose fit then converges where it starts.
Elsewhere it is a start on the scale of the answer. On InstEval's
``(1|s) + (1|d) + (1|dept:service)`` it lands within 20 % of the REML estimates, and the fit takes
3 iterations instead of 6. Either way the fit goes on from it and claims convergence only where
the score and AI matrix at the point it returns pass its test.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.combinators import Grouped, Kronecker, Propagate, Sum
from reml_fn.params import param_names, param_specs
from reml_fn.reml.covariance_blocks import cast
from reml_fn.reml.mme import _columns as mme_columns
from reml_fn.reml.mme import _leaves as mme_leaves
from reml_fn.reml.mme import _segment_sum as segment_sum
from reml_fn.structures import Diagonal, Fixed, Identity, Scalar, Unstructured
from reml_fn.transforms import columnwise
from reml_fn.tree import derived

__all__ = [
    "LINEAR_COVARIANCES",
    "ROW_CHUNK_ELEMENTS",
    "MIN_VARIANCE_SHARE",
    "MIN_CORRELATION_EIGENVALUE",
    "GroupedDesign",
    "mivque0_equations",
    "mivque0_statistics",
    "MomentStart",
    "moment_start",
]

LINEAR_COVARIANCES = (Unstructured, Diagonal, Scalar)
"""The covariance structures whose matrix is linear in their natural parameters."""

MIN_VARIANCE_SHARE = 1e-3
"""A moment start is taken only where every variance adds at least this share of σ̂² to the
average diagonal of V. Nearer the boundary the REML optimum may lie on it, and the default start
(an equal share of the residual variance) approaches it as well as any."""

MIN_CORRELATION_EIGENVALUE = 0.05
"""…and where the smallest eigenvalue of each Σ̂_a's correlation matrix is at least this
(|ρ| ≤ 0.95 for k = 2), for the same reason."""


class GroupedDesign(NamedTuple):
    """One random term's design: row r lies in group ``codes[r]`` (of ``size``) with the k values
    ``covariates[r]``, and Σ's natural-parameter units E_l (L, k, k)."""

    codes: Tensor  # (n,) int64
    covariates: Tensor  # (n, k)
    size: int  # m
    units: Tensor  # (L, k, k)


def _pair_blocks(a: GroupedDesign, b: GroupedDesign) -> Tensor:
    """The blocks N_gh = Σ_{r in g and h} x_a,r x_b,rᵀ (k_a × k_b) of Z_aᵀZ_b, one per pair of
    levels sharing a row (rows past the number of pairs are 0): (n, k_a, k_b), by one sort of the
    pair keys (O(n log n), vmappable)."""
    keys, order = torch.sort(a.codes * b.size + b.codes)
    first = torch.ones_like(keys[:1], dtype=torch.bool)
    segment = torch.cumsum(torch.cat([first, keys[1:] != keys[:-1]]).to(torch.long), 0) - 1
    outer = a.covariates[order].unsqueeze(-1) * b.covariates[order].unsqueeze(-2)
    return segment_sum(segment, outer, keys.shape[-1])


ROW_CHUNK_ELEMENTS = 1 << 22
"""The per-row weights w_l,r (L × rows × p per term) of :func:`mivque0_equations` are formed for at
most this many values per term at a time (32 MiB in float64), so the start's memory stays
bounded whatever n, L and p."""


def _row_crosses(designs: list[GroupedDesign], projected: list[Tensor], K: Tensor) -> list[list[Tensor]]:
    """Σ_r w_al,rᵀ K w_bl',r (L_a × L_b) for every pair of distinct terms a < b, with the per-row
    weights w_al,r = P_a[g_a,r]ᵀ E_al x_a,r, summed over chunks of rows."""
    n, p = designs[0].covariates.shape[0], K.shape[-1]
    T = len(designs)
    totals: list[list[Tensor]] = [[K.new_zeros(0)] * T for _ in range(T)]
    if T == 1:  # no pair of distinct terms
        return totals
    widest = max(d.units.shape[0] for d in designs) * max(p, 1)
    step = max(1, ROW_CHUNK_ELEMENTS // widest)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        weights = [
            ((d.covariates[rows] @ d.units.mT).unsqueeze(-2) @ P[d.codes[rows]]).squeeze(-2).flatten(1)
            for P, d in zip(projected, designs)
        ]  # (L, chunk·p) each
        for a in range(T - 1):
            left = (weights[a].unflatten(-1, (-1, p)) @ K).flatten(1) if p else weights[a]
            for b in range(a + 1, T):
                part = left @ weights[b].mT
                totals[a][b] = part if start == 0 else totals[a][b] + part
    return totals


def mivque0_equations(designs: list[GroupedDesign], X: Tensor, K: Tensor) -> Tensor:
    """The coefficients A (P × P, P = Σ_a L_a + 1) of MIVQUE(0) (module docstring):
    A_ij = tr(QV_iQV_j) over the parameters of every term in order, then σ² (V = I), so that
    E[eᵀV_i e] = Σ_j A_ij θ_j. X (n, p), K = (XᵀX)⁻¹. Depends on the design only: under vmap
    over responses it is formed once. O(n·(L·p + k²) + m·k²·p²) arithmetic and one sort per pair of
    terms. A term's own block needs only its groups' sums (Z_aᵀZ_a and the cross term are block
    diagonal); the per-row products of two distinct terms run over chunks of rows of at most
    :data:`ROW_CHUNK_ELEMENTS` values per term.

    Example (a balanced two-way crossed layout, 3 × 2 cells of one row, mean only: the row
    factor's equation is E[eᵀZ_AZ_Aᵀe] = 8σ²_A + 0σ²_B + 4σ², its a − 1 = 2 degrees of
    freedom weighed by b² = 4, and by b = 2 for σ²):
        >>> import torch
        >>> one = torch.ones(6, 1, dtype=torch.float64)
        >>> unit = torch.ones(1, 1, 1, dtype=torch.float64)
        >>> rows, columns = GroupedDesign(torch.arange(6) // 2, one, 3, unit), GroupedDesign(torch.arange(6) % 2, one, 2, unit)
        >>> A = mivque0_equations([rows, columns], one, torch.tensor([[1 / 6]], dtype=torch.float64))
        >>> [round(v, 12) + 0.0 for v in A[0].tolist()]
        [8.0, 0.0, 4.0]
    """
    n, p = X.shape[-2:]
    # One pass per term for P_a = Z_aᵀX and its own N_aa = Z_aᵀZ_a (block diagonal): the group sums
    # of x_a,r [X_r, x_a,r]ᵀ.
    joint = [
        segment_sum(d.codes, d.covariates.unsqueeze(-1) * torch.cat([X, d.covariates], -1).unsqueeze(-2), d.size)
        for d in designs
    ]
    projected = [sums[..., :p] for sums in joint]  # P_a (m_a, k_a, p)
    # Per term: S_l = P_aᵀD_al P_a (L, p, p) and KS_lK flattened (L, p²), so that the traces below
    # are products of flat matrices.
    sandwiches, weighted = [], []
    for P, d in zip(projected, designs):
        S = (P.mT.unsqueeze(0) @ (d.units.unsqueeze(1) @ P.unsqueeze(0))).sum(1)
        sandwiches.append(S)
        weighted.append((K @ S @ K).flatten(-2))
    T = len(designs)
    crosses = _row_crosses(designs, projected, K)
    blocks: list[list[Tensor | None]] = [[None] * T for _ in range(T)]
    for a in range(T):
        for b in range(a, T):
            da, db = designs[a], designs[b]
            if a == b:
                # Z_aᵀZ_a is block diagonal (the groups' N_g = Σ x xᵀ), and so is the cross term's
                # D N D' P K Pᵀ there: tr(D N D' N) − 2 tr(D N D' P K Pᵀ) = Σ_g tr(E_l N_g E_l' (N_g − 2 P_g K P_gᵀ)).
                N = joint[a][..., p:]
                P = projected[a]
                other = N - 2 * (P @ K @ P.mT)
            else:
                N = _pair_blocks(da, db)
                other = N
            # tr(E_l N E_l' Oᵀ) summed over the blocks: ⟨E_l N, (E_l' Oᵀ)ᵀ⟩.
            left = (da.units.unsqueeze(1) @ N).flatten(1)
            right = (db.units.unsqueeze(1) @ other.mT).mT.flatten(1)
            both = weighted[a] @ sandwiches[b].flatten(-2).mT
            blocks[a][b] = left @ right.mT + both if a == b else left @ right.mT - 2 * crosses[a][b] + both
            blocks[b][a] = blocks[a][b].mT
    residual = torch.cat(
        [
            (d.units * (d.covariates.mT @ d.covariates)).sum((-1, -2)) - (S * K).sum((-1, -2))
            for d, S in zip(designs, sandwiches)
        ]
    )
    top = torch.cat([torch.cat(row, -1) for row in blocks], 0)
    corner = residual.new_full((1,), float(n - p))
    return torch.cat([torch.cat([top, residual.unsqueeze(-1)], -1), torch.cat([residual, corner]).unsqueeze(0)], 0)


def mivque0_statistics(designs: list[GroupedDesign], e: Tensor) -> Tensor:
    """The quadratic forms eᵀV_i e (P,) that :func:`mivque0_equations`' A maps the parameters to
    in expectation: Σ_g c_gᵀE_al c_g (c_g = Σ_{r in g} x_a,r e_r) per term and unit, then eᵀe.

    Example (the layout of :func:`mivque0_equations`: the rows' sums of e, squared):
        >>> import torch
        >>> one, unit = torch.ones(6, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64)
        >>> e = torch.tensor([1.0, 2.0, -1.0, 0.0, -1.0, -1.0], dtype=torch.float64)
        >>> mivque0_statistics([GroupedDesign(torch.arange(6) // 2, one, 3, unit)], e).tolist()
        [14.0, 8.0]
    """
    forms = []
    for d in designs:
        sums = segment_sum(d.codes, d.covariates * e.unsqueeze(-1), d.size)  # (m, k)
        forms.append(d.units.flatten(-2) @ (sums.mT @ sums).flatten())  # ⟨E_l, Σ_g c_g c_gᵀ⟩ (no einsum: tiny)
    return torch.cat([*forms, (e @ e).reshape(1)])


class _Factor(NamedTuple):
    """A random-effects term of grouped shape, read from the structure alone."""

    term: object  # the Grouped or Propagate term
    cov: object  # Σ (k×k), whose natural parameters are a
    prefix: str  # the path of Σ's parameters in the structure's parameter tree
    units: object  # callable(dtype, device) → the E_l (L, k, k)
    k: int  # effects per group


def _linear_units(cov):
    names = param_names(cov)

    def units(dtype, device):
        zero = torch.zeros((), dtype=dtype, device=device)
        unit_of = cov._natural_jacobian(dict.fromkeys(names, zero), names)
        return torch.stack([cast(unit_of[name], dtype) for name in names])

    return units


def _may_be_identity(structure) -> bool:
    """An ``Identity``, or a square ``Fixed`` matrix (whether it is I_m is a tensor test)."""
    if isinstance(structure, Identity):
        return True
    return isinstance(structure, Fixed) and structure.matrix.shape[-1] == structure.matrix.shape[-2]


def _unit_variance(dtype, device) -> Tensor:
    return torch.ones(1, 1, 1, dtype=dtype, device=device)  # σ² of σ²I_m, one effect per group


def _factor(path: str, term) -> _Factor | None:
    """A ``Grouped`` term with a linear Σ, or a ``Propagate`` with a Fixed Z and G = Scalar(m)
    (σ²I_m, a random intercept for Z's m columns) or Kronecker(Identity(m), Σ) (Σ linear), with
    every parameter free; None for anything else."""
    if isinstance(term, Grouped):
        found = _Factor(term, term.cov, f"{path}/cov", _linear_units(term.cov), term.k)
    elif isinstance(term, Propagate) and isinstance(term.children[0], Fixed):
        g, g_name = term.children[1], term.names[1]
        if isinstance(g, Scalar):
            found = _Factor(term, g, f"{path}/{g_name}", _unit_variance, 1)
        elif isinstance(g, Kronecker) and _may_be_identity(g.children[0]):
            cov = g.children[1]
            found = _Factor(term, cov, f"{path}/{g_name}/{g.names[1]}", _linear_units(cov), cov.shape[0])
        else:
            return None
    else:
        return None
    if not isinstance(found.cov, LINEAR_COVARIANCES) or any(spec.fixed for _, spec in param_specs(found.cov)):
        return None
    return found


def _random_terms(s) -> tuple[list[_Factor], tuple] | None:
    """The random terms and the ``(path, Scalar)`` residual when ``s`` is a Sum of random-effects
    terms of grouped shape (:func:`_factor`) and one free Scalar residual; None otherwise. Reads
    no tensor values, so that a fit and a batch with per-dataset Z decide alike (and the answer
    is kept on ``s``: :func:`~reml_fn.tree.derived`); whether a Propagate Z really is a
    group-indicator design is a tensor test (:func:`_grouped_design`)."""
    return derived(s, "moment_terms", lambda: _find_random_terms(s))


def _find_random_terms(s) -> tuple[list[_Factor], tuple] | None:
    if not isinstance(s, Sum):
        return None
    terms = [(path, term) for path, term, _ in mme_leaves(s, {})]
    residual = [pair for pair in terms if isinstance(pair[1], Scalar)]
    if len(residual) != 1 or any(spec.fixed for _, spec in param_specs(residual[0][1])):
        return None
    factors = [_factor(path, term) for path, term in terms if not isinstance(term, Scalar)]
    if not factors or any(factor is None for factor in factors):
        return None
    return factors, residual[0]


def _grouped_design(factor: _Factor, dtype) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Group codes (n,), covariates (n, k), m, and whether every row of the design lies in one
    group (): None (always) for a Grouped term; for a Propagate term's Z (n, m·k), a test on its values
    (the row's nonzeros within one block of k columns, as grouped_form's) and, for a Kronecker G
    with a Fixed first factor, on that factor being I_m: by tensor operations."""
    term = factor.term
    if isinstance(term, Grouped):
        columns = mme_columns(term, dtype)
        return columns.codes, columns.x, columns.m, None
    Z = term.children[0].matrix.to(dtype)
    k = factor.k
    m = Z.shape[-1] // k  # Propagate has checked that G, m·k × m·k, matches Z
    blocks = Z.reshape(*Z.shape[:-1], m, k)
    used = (blocks != 0).any(-1)  # (n, m)
    codes = used.to(torch.int64).argmax(-1)
    covariates = torch.take_along_dim(blocks, codes[:, None, None], dim=-2).squeeze(-2)
    grouped = (used.sum(-1) <= 1).all()
    g = term.children[1]
    if isinstance(g, Kronecker) and isinstance(g.children[0], Fixed):
        left = g.children[0].matrix
        grouped = grouped & (left == torch.eye(left.shape[-1], dtype=left.dtype, device=left.device)).all()
    return codes, covariates, m, grouped


class MomentStart(NamedTuple):
    """:func:`moment_start`'s answer."""

    theta: Tensor  # (k,) raw parameters of the moment estimates (0 where not ``inside``)
    inside: Tensor  # () whether a fit starts there
    unit_traces: Tensor  # (k,) tr(∂V/∂x_j) per natural unit x_j of each parameter (default_init's)


def moment_start(s, y: Tensor, X: Tensor) -> MomentStart | None:
    """The raw parameter vector (k,) of the MIVQUE(0) estimates (module docstring), whether to
    start there (), and tr(∂V/∂x_j) (k,) for the natural value x_j of each parameter (what the
    equal-share start needs: ⟨E_l, Σ_r x_r x_rᵀ⟩, and n for σ²). None for a model it does not serve,
    a decision on the structure alone: random terms of grouped shape with linear covariances
    (:func:`_random_terms`) and one Scalar residual, every parameter free.

    A fit starts there where the equations are solved, σ̂² > 0, every variance adds at least
    :data:`MIN_VARIANCE_SHARE` of σ̂² to the average diagonal of V and each Σ̂_a's correlation
    matrix has eigenvalues at least :data:`MIN_CORRELATION_EIGENVALUE`. Pure and vmappable over
    y and X; under ``vmap`` over responses the design's part is formed once.

    Example (sleepstudy: lme4's REML estimates, Σ̂ = [[612.09, 9.60], [9.60, 35.07]], σ̂² = 654.94):
        >>> import torch, reml_fn as rf
        >>> from reml_fn import datasets
        >>> from reml_fn.design import design_matrix, indicator_codes
        >>> d = datasets.load("sleepstudy")
        >>> X = design_matrix(d["Days"], intercept=True)
        >>> s = rf.Sum(Subject=rf.Grouped(indicator_codes(d["Subject"])[0], covariates=X), residual=rf.Scalar(180))
        >>> theta, ok, _ = moment_start(s, d["Reaction"], X)
        >>> natural = rf.params.constrain(s, rf.unflatten_params(s, theta))
        >>> [round(float(v), 2) for v in rf.flatten_params(s, natural)], bool(ok)
        ([612.09, 9.6, 35.07, 654.94], True)
    """
    found = _random_terms(s)
    if found is None:
        return None
    factors, (residual_path, residual) = found
    dtype, device, n = X.dtype, X.device, y.shape[-1]
    designs, tests = [], []  # tests: whether each Propagate Z is a group-indicator design
    for factor in factors:
        codes, covariates, size, is_grouped = _grouped_design(factor, dtype)
        designs.append(GroupedDesign(codes, covariates, size, factor.units(dtype, device)))
        tests += [] if is_grouped is None else [is_grouped]
    # The least-squares residual; what involves only the design is formed once under vmap.
    K = torch.cholesky_inverse(torch.linalg.cholesky_ex(X.mT @ X)[0])  # (XᵀX)⁻¹
    e = y - X @ (K @ (X.mT @ y))
    solution, info = torch.linalg.solve_ex(mivque0_equations(designs, X, K), mivque0_statistics(designs, e))
    sigma2 = solution[-1]
    ok = (info == 0) & torch.isfinite(solution).all() & (sigma2 > 0)
    for test in tests:
        ok = ok & test
    traces, solved, offset = [], [], 0  # solved: the parameter names in the solution's order
    for factor, design in zip(factors, designs):
        values = solution[offset : offset + design.units.shape[0]]
        offset += design.units.shape[0]
        sigma = (values @ design.units.flatten(1)).unflatten(-1, design.units.shape[1:])  # Σ_l θ_l E_l
        variances = torch.diagonal(sigma)
        gram = design.covariates.mT @ design.covariates  # Σ_r x_r x_rᵀ: tr(Z(I ⊗ E)Zᵀ) = ⟨E, gram⟩
        # What one unit of each variance adds to the average diagonal of V: mean x_j² over the rows.
        ok = ok & (variances * torch.diagonal(gram) / n >= MIN_VARIANCE_SHARE * sigma2).all()
        if design.units.shape[-1] > 1:
            # The correlation matrix D^{-1/2}ΣD^{-1/2} (D = diag Σ, positive where ok) has eigenvalues
            # at least c exactly when it less c·I is positive definite, that is (congruence by D^{1/2})
            # when Σ − c·D has a Cholesky factor.
            shifted = sigma - MIN_CORRELATION_EIGENVALUE * torch.diag_embed(variances)
            ok = ok & (torch.linalg.cholesky_ex(shifted)[1] == 0)
        traces.append((design.units * gram).sum((-1, -2)))
        solved += [f"{factor.prefix}/{name}" for name in param_names(factor.cov)]
    solved.append(f"{residual_path}/{param_names(residual)[0]}")
    traces.append(y.new_full((1,), float(n), dtype=dtype))  # tr(∂V/∂σ²) = n
    natural, traces = solution, torch.cat(traces)
    names = param_names(s)  # every parameter is free (_random_terms): the same names, maybe reordered
    if names != solved:
        position = {name: j for j, name in enumerate(solved)}
        order = [position[name] for name in names]
        natural, traces = natural[order], traces[order]
    theta = columnwise([spec.transform for _, spec in param_specs(s)], natural, inverse=True)
    # (Finite wherever ok: its variances are positive, the rest finite with the solution.)
    return MomentStart(torch.where(ok, theta, 0.0), ok, traces)
