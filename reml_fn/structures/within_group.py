"""Residual correlation and heteroscedasticity within groups of any sizes, in any row order
(nlme's ``corStruct`` and ``varIdent`` on unbalanced data).

``WithinGroup`` is V = σ² W ∘ C on the rows of each group, 0 between groups:

    V_ij = σ² w_i w_j [g_i = g_j] c_ij,   c_ii = 1,   w_i = δ_{s_i} (δ = 1 for the first stratum),

===========  ====================================  ===================  =====================================
kind         c_ij (i ≠ j, same group)              parameters           nlme
===========  ====================================  ===================  =====================================
``"ar1"``    ρ^{|p_i − p_j|}, p = position          ``rho`` ∈ (−1, 1)     ``corAR1(form = ~ 1 | g)``
``"car1"``   φ^{|t_i − t_j|}                        ``phi`` ∈ (0, 1)      ``corCAR1(form = ~ t | g)``
``"cs"``     ρ                                      ``rho`` ≥ −1/(m−1)   ``corCompSymm(form = ~ 1 | g)``
``"exp"``    (1 − ν) e^{−d_ij/r}, d = ‖x_i − x_j‖   ``range`` r > 0 [,    ``corExp(form = ~ x | g[, nugget])``
                                                    ``nugget`` ν]
``"gaus"``   (1 − ν) e^{−(d_ij/r)²}                 as exp                ``corGaus``
``"none"``   0                                      –                     (a variance function only)
===========  ====================================  ===================  =====================================

with ``sigma^2`` = σ² (σ² = e^{2θ}) first, then the variance ratios ``ratio_<stratum>`` = δ_s (e^θ,
``varIdent``) and a ``power`` π of a covariate v (``varPower``: w_i = δ_{s_i} |v_i|^π) last. The closed-form derivatives (natural parameters): ∂V/∂σ² = W ∘ C ∘ M;
∂/∂ρ (ar1) σ² W ∘ M ∘ L ρ^{L−1} with L = |p_i − p_j|; ∂/∂φ (car1) σ² W ∘ M ∘ D φ^{D−1};
∂/∂ρ (cs) σ² W ∘ (M − I); ∂/∂r (exp) σ²(1 − ν) W ∘ M' ∘ e^{−d/r} d/r², (gaus) … 2d²/r³; ∂/∂ν −σ² W ∘ M' ∘ e^{…};
∂/∂δ_s σ² C ∘ M ∘ (a_i w_j + w_i a_j) with a_i = [s_i = s] w_i/δ_s; ∂/∂π V ∘ (log|v_i| + log|v_j|);
M the same-group mask and M' = M − I.

The ``range`` and the ratios use ``Chain((Exp(),))`` — positive, but not variances (the optimizer's
variance floor and default shares apply to variances only).

Example:
    >>> import torch
    >>> s = WithinGroup(torch.tensor([0, 0, 1, 0]), "ar1")         # group 0 has rows 0, 1, 3
    >>> V = s(torch.tensor([0.0, 0.0]))                              # σ² = 1, ρ = 0: the identity
    >>> bool(torch.equal(V, torch.eye(4)))
    True
    >>> import reml_fn as rf
    >>> rf.param_names(s)
    ['sigma^2', 'rho']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.params import ParamSpec
from reml_fn.structures.base import Parametric, set_fields, variance_spec
from reml_fn.structures.correlation import ar1_rho_transform, equicorrelation_rho_transform
from reml_fn.transforms import Chain, Exp, Identity, Sigmoid
from reml_fn.tree import static, structure

__all__ = [
    "WithinGroup",
    "KINDS",
    "RowPairs",
    "positions_within_groups",
    "row_pairs",
    "pairwise_distance",
    "row_weights",
    "within_group_correlation",
    "within_group_matrix",
    "within_group_derivatives",
    "within_group_matrix_and_derivatives",
    "symm_correlation",
    "symm_correlation_derivatives",
]

KINDS = ("ar1", "car1", "cs", "exp", "gaus", "symm", "none")


def positions_within_groups(codes: Tensor) -> Tensor:
    """Each row's position within its group, in row order (0, 1, 2, … per group).

    Example:
        >>> positions_within_groups(torch.tensor([1, 0, 1, 1, 0])).tolist()
        [0, 0, 1, 2, 1]
    """
    n = codes.shape[0]
    order = torch.argsort(codes, stable=True)
    sorted_codes = codes[order]
    starts = torch.ones(n, dtype=torch.bool, device=codes.device)
    starts[1:] = sorted_codes[1:] != sorted_codes[:-1]
    index = torch.arange(n, device=codes.device)
    first = torch.cummax(torch.where(starts, index, 0), 0).values
    positions = torch.empty(n, dtype=torch.long, device=codes.device)
    positions[order] = index - first
    return positions


@structure
class WithinGroup(Parametric):
    """Correlated (and optionally heteroscedastic) residuals within groups (module docstring).

    Args:
        codes: group code per row (n,), any order; rows of a group need not be adjacent.
        kind: one of ``"ar1"``, ``"car1"``, ``"cs"``, ``"exp"``, ``"gaus"``, ``"none"``.
        locations: (n,) positions (ar1; default: the order of the rows within each group), times
            (car1) or (n,) / (n, d) coordinates (exp, gaus).
        nugget: with a ``nugget`` parameter (exp, gaus).
        strata: stratum code per row (n,) for a variance ratio per stratum (``varIdent``); the first
            stratum's ratio is 1. ``strata_names`` name the ratios (default ``"1"``, ``"2"``, …).
        power_covariate: v (n,) for a ``power`` parameter, w_i ∝ |v_i|^π (``varPower``); v ≠ 0.
    """

    codes: Tensor
    locations: Tensor
    strata: Tensor
    covariate: Tensor
    kind: str = static()
    nugget: bool = static()
    n: int = static()
    specs: tuple[ParamSpec, ...] = static()
    size: int = static(default=0)  # symm: the number of within-group indices

    def __init__(
        self,
        codes: Tensor,
        kind: str,
        locations: Tensor | None = None,
        nugget: bool = False,
        strata: Tensor | None = None,
        strata_names: Sequence[str] | None = None,
        power_covariate: Tensor | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"WithinGroup: kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(codes, Tensor) or codes.dim() != 1 or codes.is_floating_point():
            raise TypeError("WithinGroup: codes must be a 1-D integer tensor of group codes")
        n = codes.shape[0]
        if nugget and kind not in ("exp", "gaus"):
            raise ValueError(f"WithinGroup: a nugget applies to 'exp' and 'gaus', not {kind!r}")
        if locations is None:
            if kind in ("car1", "exp", "gaus"):
                raise ValueError(f"WithinGroup: kind {kind!r} needs locations (times or coordinates)")
            locations = positions_within_groups(codes).to(torch.get_default_dtype())
        locations = torch.as_tensor(locations)
        if not locations.is_floating_point():
            locations = locations.to(torch.get_default_dtype())
        if locations.shape[0] != n or locations.dim() not in (1, 2):
            raise ValueError(
                f"WithinGroup: locations must be (n,) or (n, d) with n = {n}, got {tuple(locations.shape)}"
            )
        if locations.dim() == 1:
            locations = locations.unsqueeze(-1)
        strata = torch.zeros(n, dtype=torch.long) if strata is None else torch.as_tensor(strata).long()
        levels = int(strata.max()) + 1 if n else 1
        names = list(strata_names) if strata_names is not None else [str(s + 1) for s in range(levels)]
        specs = [variance_spec()]
        if kind == "ar1":
            specs.append(ParamSpec("rho", 0.0, ar1_rho_transform()))
        elif kind == "car1":
            specs.append(ParamSpec("phi", 0.0, Sigmoid()))
        elif kind == "cs":
            largest = int(torch.bincount(codes).max()) if n else 2
            specs.append(ParamSpec("rho", 0.0, equicorrelation_rho_transform(max(largest, 2))))
        elif kind in ("exp", "gaus"):
            specs.append(ParamSpec("range", 0.0, Chain((Exp(),))))
            if nugget:
                specs.append(ParamSpec("nugget", 0.0, Sigmoid()))
        elif kind == "symm":
            index = locations.reshape(n, -1)[:, 0]
            if bool((index != index.round()).any()) or bool((index < 0).any()):
                raise ValueError("WithinGroup: 'symm' needs locations that are within-group indices 0, 1, 2, …")
            size = int(index.max()) + 1 if n else 1
            # C = S (L Lᵀ) S, L unit lower-triangular with free entries L_a_b (a > b), S = diag(L Lᵀ)^{−½}:
            # every value positive definite.
            specs += [ParamSpec(f"L_{a}_{b}", 0.0, Identity()) for a in range(1, size) for b in range(a)]
        specs += [ParamSpec(f"ratio_{name}", 0.0, Chain((Exp(),))) for name in names[1:levels]]
        if power_covariate is not None:
            power_covariate = torch.as_tensor(power_covariate)
            if power_covariate.shape != (n,):
                raise ValueError(
                    f"WithinGroup: power_covariate must be (n,) = ({n},), got {tuple(power_covariate.shape)}"
                )
            if bool((power_covariate == 0).any()):
                raise ValueError("WithinGroup: power_covariate has zeros, where |v|^π is 0 or infinite")
            if not power_covariate.is_floating_point():
                power_covariate = power_covariate.to(torch.get_default_dtype())
            specs.append(ParamSpec("power", 0.0, Identity()))
        else:
            power_covariate = torch.ones(n)
        set_fields(
            self,
            codes=codes,
            locations=locations,
            strata=strata,
            covariate=power_covariate,
            kind=kind,
            nugget=nugget,
            n=n,
            specs=tuple(specs),
            size=int(locations[:, 0].max()) + 1 if kind == "symm" and n else 0,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    # -- the matrix and its derivatives, from row pairs -------------------------------------------
    def pairs(self, like: Tensor) -> RowPairs:
        """The n × n row pairs of this structure (engines that work block by block make the same
        for each group's rows, :class:`RowPairs`)."""
        x = self.locations.to(like.dtype)
        return row_pairs(
            (self.codes.unsqueeze(-1) == self.codes).to(like.dtype),
            torch.eye(self.n, dtype=like.dtype, device=like.device),
            pairwise_distance(x),
            self.strata,
            self.covariate.to(like.dtype),
            self.locations[:, 0].round().long(),
        )

    def _build_natural(self, natural):
        return within_group_matrix(self, natural, self.pairs(natural["sigma^2"]))

    def _natural_jacobian(self, natural, names):
        return within_group_derivatives(self, natural, names, self.pairs(natural["sigma^2"]))


class RowPairs(NamedTuple):
    """Row pairs on which :class:`WithinGroup` is evaluated: (…, a, a) ``same`` (1 for two valid rows
    of one group, the diagonal of valid rows included), ``eye`` (the diagonal of valid rows),
    ``distance`` between their locations, and per row (…, a) ``strata`` and ``covariate``; derived
    once (:func:`row_pairs`): ``off`` = same − eye, ``lag`` = off ∘ distance, ``exponent`` =
    max(distance − 1, 0)."""

    same: Tensor
    eye: Tensor
    distance: Tensor
    strata: Tensor
    covariate: Tensor
    off: Tensor
    lag: Tensor
    exponent: Tensor
    position: Tensor  # (…, a) within-group index (symm)


def row_pairs(
    same: Tensor, eye: Tensor, distance: Tensor, strata: Tensor, covariate: Tensor, position: Tensor
) -> RowPairs:
    """:class:`RowPairs` with its derived fields."""
    off = same - eye
    return RowPairs(
        same, eye, distance, strata, covariate, off, off * distance, (distance - 1.0).clamp(min=0.0), position
    )


def pairwise_distance(x: Tensor) -> Tensor:
    """|x_i − x_j| (…, a, a) for locations (…, a, 1), or ‖x_i − x_j‖ for (…, a, d)."""
    difference = x.unsqueeze(-2) - x.unsqueeze(-3)
    if x.shape[-1] == 1:
        return difference.squeeze(-1).abs()
    return difference.pow(2).sum(-1).sqrt()


def row_weights(s: WithinGroup, natural: dict, strata: Tensor, covariate: Tensor) -> Tensor | None:
    """w (…, a) with w_i = δ_{s_i} |v_i|^π for rows of ``strata`` and power ``covariate``, or None when
    every w_i is 1."""
    like = natural["sigma^2"]
    ratios = [natural[spec.name] for spec in s.specs if spec.name.startswith("ratio_")]
    w = None
    if ratios:
        delta = torch.cat([torch.ones(1, dtype=like.dtype, device=like.device), torch.stack(ratios)])
        w = delta[strata]
    if "power" in natural:
        powered = torch.pow(covariate.abs(), natural["power"])
        w = powered if w is None else w * powered
    return w


def _outer(w: Tensor | None, like: Tensor) -> Tensor:
    if w is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return w.unsqueeze(-1) * w.unsqueeze(-2)


def _decay(s: WithinGroup, natural: dict, distance: Tensor) -> Tensor:
    scaled = distance / natural["range"]
    return torch.exp(-scaled) if s.kind == "exp" else torch.exp(-scaled * scaled)


def _correlation(s: WithinGroup, natural: dict, pairs: RowPairs) -> tuple[Tensor, Tensor | None]:
    """C ∘ M on the pairs, and what its derivatives reuse: value^{L−1} for ar1/car1 (off the
    diagonal ρ^L = ρ·ρ^{L−1}, and ∂ρ^L/∂ρ = L ρ^{L−1}), the decay for exp/gaus, else None."""
    eye, off = pairs.eye, pairs.off
    if s.kind == "none":
        return eye, None
    if s.kind == "cs":
        return eye + natural["rho"] * off, None
    if s.kind == "symm":
        C = symm_correlation(s, natural)
        return eye + off * C[pairs.position.unsqueeze(-1), pairs.position.unsqueeze(-2)], None
    if s.kind in ("ar1", "car1"):
        value = natural["rho" if s.kind == "ar1" else "phi"]
        # Exact at ρ = 0 for the integer lags of ar1 (L ≥ 1 off the diagonal); φ > 0 for car1.
        lower = torch.pow(value, pairs.exponent if s.kind == "ar1" else pairs.distance - 1.0)
        if s.kind == "car1":  # a tie (L = 0) within a group: c = φ⁰ = 1
            return eye + off * torch.where(pairs.distance > 0, value * lower, 1.0), lower
        return torch.addcmul(eye, off * value, lower), lower
    decay = _decay(s, natural, pairs.distance)
    level = 1.0 - natural["nugget"] if s.nugget else 1.0
    return eye + off * level * decay, decay


def within_group_correlation(s: WithinGroup, natural: dict, pairs: RowPairs) -> Tensor:
    """C ∘ M on the pairs: c_ii = 1 on valid rows, c_ij within a group, 0 elsewhere."""
    return _correlation(s, natural, pairs)[0]


def within_group_matrix(s: WithinGroup, natural: dict, pairs: RowPairs) -> Tensor:
    """σ² W ∘ C ∘ M on the pairs."""
    like = natural["sigma^2"]
    return (
        like
        * _outer(row_weights(s, natural, pairs.strata, pairs.covariate), like)
        * within_group_correlation(s, natural, pairs)
    )


def within_group_derivatives(s: WithinGroup, natural: dict, names, pairs: RowPairs) -> dict[str, Tensor]:
    """∂V/∂x for the natural parameters ``names`` on the pairs (the module docstring's formulas)."""
    return within_group_matrix_and_derivatives(s, natural, names, pairs)[1]


def within_group_matrix_and_derivatives(
    s: WithinGroup, natural: dict, names, pairs: RowPairs, scales: dict | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """V = σ² W ∘ C ∘ M and ∂V/∂x for the natural parameters ``names``, sharing the work (one power
    of ρ for AR(1): ρ^L = ρ·ρ^{L−1} off the diagonal). ``scales`` (0-d per name, e.g. dx/dθ) multiply
    the derivatives — folded into their scalar factors, so no extra pass over the arrays."""
    scales = scales or {}
    one = torch.ones((), dtype=natural["sigma^2"].dtype, device=natural["sigma^2"].device)

    def scale(name: str) -> Tensor:
        return scales.get(name, one)

    sigma2 = natural["sigma^2"]
    w = row_weights(s, natural, pairs.strata, pairs.covariate)
    weights = _outer(w, sigma2)
    off = pairs.off
    distance = pairs.distance
    out = {}
    correlation, reused = _correlation(s, natural, pairs)
    if s.kind in ("ar1", "car1"):
        name = "rho" if s.kind == "ar1" else "phi"
        if name in names:  # L value^{L−1} (0 where L = 0: the diagonal, ties)
            factor = sigma2 * scale(name)
            lag = pairs.lag
            out[name] = lag * (reused * factor) if weights.dim() == 0 else (weights * factor) * lag * reused
    matrix = sigma2 * weights * correlation
    if "sigma^2" in names:
        out["sigma^2"] = (weights * scale("sigma^2")) * correlation
    if s.kind == "cs" and "rho" in names:
        out["rho"] = (sigma2 * scale("rho") * weights) * off
    if s.kind == "symm":
        free = [name for name in names if name.startswith("L_")]
        if free:
            derivatives = symm_correlation_derivatives(s, natural)
            rows, cols = pairs.position.unsqueeze(-1), pairs.position.unsqueeze(-2)
            for name in free:
                out[name] = (sigma2 * scale(name) * weights) * off * derivatives[name][rows, cols]
    if s.kind in ("exp", "gaus"):
        r = natural["range"]
        decay = reused
        level = 1.0 - natural["nugget"] if s.nugget else 1.0
        if "range" in names:
            factor = distance / (r * r) if s.kind == "exp" else 2.0 * distance * distance / (r * r * r)
            out["range"] = (sigma2 * scale("range") * level * weights) * off * decay * factor
        if s.nugget and "nugget" in names:
            out["nugget"] = (-sigma2 * scale("nugget") * weights) * off * decay
    ratios = [spec.name for spec in s.specs if spec.name.startswith("ratio_")]
    if ratios:
        delta = torch.cat(
            [torch.ones(1, dtype=sigma2.dtype, device=sigma2.device), torch.stack([natural[r] for r in ratios])]
        )
        for level, name in enumerate(ratios, start=1):
            if name not in names:
                continue
            # ∂w_i/∂δ_s = [s_i = s] w_i/δ_s.
            d_w = (pairs.strata == level).to(sigma2.dtype) * w / delta[level]
            out[name] = (
                (sigma2 * scale(name))
                * correlation
                * (d_w.unsqueeze(-1) * w.unsqueeze(-2) + w.unsqueeze(-1) * d_w.unsqueeze(-2))
            )
    if "power" in names:
        logs = torch.log(pairs.covariate.abs())
        out["power"] = (matrix * scale("power")) * (logs.unsqueeze(-1) + logs.unsqueeze(-2))
    return matrix, out


def _unit_lower(s: WithinGroup, natural: dict) -> Tensor:
    like = natural["sigma^2"]
    K = s.size
    values = [
        natural[f"L_{a}_{b}"]
        if a > b
        else (torch.ones((), dtype=like.dtype) if a == b else torch.zeros((), dtype=like.dtype))
        for a in range(K)
        for b in range(K)
    ]
    return torch.stack(values).view(K, K)


def symm_correlation(s: WithinGroup, natural: dict) -> Tensor:
    """C = S M S (K × K), M = L Lᵀ, S = diag(M)^{−½}: the unstructured correlation of ``symm``."""
    L = _unit_lower(s, natural)
    M = L @ L.mT
    M = 0.5 * (M + M.mT)  # exactly symmetric (a product's rounding need not be)
    scale = torch.diagonal(M).rsqrt()
    return M * (scale.unsqueeze(-1) * scale)  # s_i s_j = s_j s_i exactly: C stays symmetric


def symm_correlation_derivatives(s: WithinGroup, natural: dict) -> dict[str, Tensor]:
    """∂C/∂L_ab (K × K each): ∂M = E_ab Lᵀ + L E_ba, ∂s_i = −δ_ia L_ab M_aa^{−3/2},
    ∂C_ij = ∂s_i M_ij s_j + s_i ∂M_ij s_j + s_i M_ij ∂s_j."""
    L = _unit_lower(s, natural)
    M = L @ L.mT
    M = 0.5 * (M + M.mT)
    K = s.size
    scale = torch.diagonal(M).rsqrt()
    eye = torch.eye(K, dtype=M.dtype, device=M.device)
    out = {}
    for a in range(1, K):
        for b in range(a):
            E = eye[:, a : a + 1] * eye[b : b + 1, :]  # E_ab
            half = E @ L.mT
            dM = half + half.mT
            d_scale = -eye[a] * L[a, b] * M[a, a] ** -1.5
            side = d_scale.unsqueeze(-1) * (M * scale)  # ∂s_i M_ij s_j; its transpose is s_i M_ij ∂s_j
            out[f"L_{a}_{b}"] = side + side.mT + dM * (scale.unsqueeze(-1) * scale)
    return out
