"""Correlated and heteroscedastic residuals for formula fits: nlme's ``correlation =`` and
``weights =`` arguments, as specifications the model builder turns into a
:class:`~reml_fn.structures.within_group.WithinGroup` residual.

==============================================  ==========================================
reml_fn                                          nlme
==============================================  ==========================================
``rf.cor_ar1(group="g")``                        ``corAR1(form = ~ 1 | g)`` (row order)
``rf.cor_ar1(group="g", time="t")``              AR(1) by the position of t within g (gaps
                                                 ignored); nlme's ``corAR1(form = ~ t | g)``
                                                 uses integer lags t_i − t_j instead: for
                                                 that, ``rf.cor_car1(group="g", time="t")``
``rf.cor_car1(group="g", time="t")``             ``corCAR1(form = ~ t | g)``
``rf.cor_cs(group="g")``                         ``corCompSymm(form = ~ 1 | g)``
``rf.cor_symm(group="g")``, ``time="t"``         ``corSymm(form = ~ 1 | g)`` (row order), ``~ t | g``
``rf.cor_exp(group="g", time="t")``,             ``corExp(form = ~ t | g)``,
``coords=("x", "y")``, ``nugget=True``           ``corExp(form = ~ x + y | g, nugget = TRUE)``
``rf.cor_gaus(...)``                             ``corGaus(...)``
``rf.var_ident(by="s")``                         ``varIdent(form = ~ 1 | s)``
``rf.var_power(covariate="v")``                  ``varPower(form = ~ v)``
``weights=(rf.var_ident(…), rf.var_power(…))``   ``varComb(varIdent(…), varPower(…))``
==============================================  ==========================================

Example:
    >>> import reml_fn as rf
    >>> rf.cor_car1(group="Rat", time="Time")
    Correlation(kind='car1', group='Rat', time='Time', coords=None, nugget=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from reml_fn.frontend.data import factor_codes
from reml_fn.structures.within_group import WithinGroup

__all__ = [
    "Correlation",
    "VarIdent",
    "cor_ar1",
    "cor_car1",
    "cor_cs",
    "cor_exp",
    "cor_gaus",
    "var_ident",
    "residual_structure",
]


@dataclass(frozen=True)
class Correlation:
    """A residual correlation within the groups of ``group`` (see the module table)."""

    kind: str
    group: str
    time: str | None = None
    coords: tuple[str, ...] | None = None
    nugget: bool = False

    @property
    def columns(self) -> list[str]:
        return [self.group, *([self.time] if self.time else []), *(self.coords or ())]

    def __str__(self) -> str:
        """nlme's spelling of the same structure (AR(1) by the rank of a time has none)."""
        if self.kind == "ar1":
            return f"corAR1(form = ~ 1 | {self.group})" + (f", ordered by {self.time}" if self.time else "")
        if self.kind == "car1":
            return f"corCAR1(form = ~ {self.time} | {self.group})"
        if self.kind == "cs":
            return f"corCompSymm(form = ~ 1 | {self.group})"
        if self.kind == "symm":
            return f"corSymm(form = ~ {self.time or 1} | {self.group})"
        where = self.time or " + ".join(self.coords or ())
        name = "corExp" if self.kind == "exp" else "corGaus"
        return f"{name}(form = ~ {where} | {self.group}{', nugget = TRUE' if self.nugget else ''})"


@dataclass(frozen=True)
class VarIdent:
    """A residual standard deviation per level of ``by`` (nlme's ``varIdent``): σ_s = σ δ_s, δ = 1
    for the first level."""

    by: str

    @property
    def columns(self) -> list[str]:
        return [self.by]

    def __str__(self) -> str:
        return f"varIdent(form = ~ 1 | {self.by})"


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a column name (str), got {value!r}")
    return value


def cor_ar1(group: str, time: str | None = None) -> Correlation:
    """AR(1) by position within each group: c_ij = ρ^{|p_i − p_j|}, p the row's rank by ``time``
    within its group (the row order when ``time`` is None)."""
    return Correlation("ar1", _name(group, "group"), None if time is None else _name(time, "time"))


def cor_car1(group: str, time: str) -> Correlation:
    """Continuous-time AR(1): c_ij = φ^{|t_i − t_j|} on the values of ``time``."""
    return Correlation("car1", _name(group, "group"), _name(time, "time"))


def cor_symm(group: str, time: str | None = None) -> Correlation:
    """An unstructured correlation C[k_i, k_j] over the within-group index k: the distinct values of
    ``time`` in order (0, 1, … for visits 8, 10, 12, 14; nlme's ``corSymm(form = ~ t | g)`` with
    t = 1, 2, …), or the row's position in its group when ``time`` is None (``corSymm(form = ~ 1 | g)``)."""
    return Correlation("symm", _name(group, "group"), None if time is None else _name(time, "time"))


def cor_cs(group: str) -> Correlation:
    """Compound symmetry within each group: c_ij = ρ."""
    return Correlation("cs", _name(group, "group"))


def _spatial(kind: str, group: str, time: str | None, coords: Sequence[str] | None, nugget: bool) -> Correlation:
    if (time is None) == (coords is None):
        raise ValueError(f"cor_{kind} needs either time= (one column) or coords= (columns), not both or neither")
    coords = None if coords is None else tuple(_name(c, "coords") for c in coords)
    return Correlation(kind, _name(group, "group"), None if time is None else _name(time, "time"), coords, bool(nugget))


def cor_exp(
    group: str, time: str | None = None, coords: Sequence[str] | None = None, nugget: bool = False
) -> Correlation:
    """Exponential: c_ij = (1 − ν) e^{−d_ij/r}, d the distance in ``time`` or ``coords``."""
    return _spatial("exp", group, time, coords, nugget)


def cor_gaus(
    group: str, time: str | None = None, coords: Sequence[str] | None = None, nugget: bool = False
) -> Correlation:
    """Gaussian: c_ij = (1 − ν) e^{−(d_ij/r)²}."""
    return _spatial("gaus", group, time, coords, nugget)


@dataclass(frozen=True)
class VarPower:
    """A residual standard deviation σ |v|^π in a covariate v (nlme's ``varPower(form = ~ v)``)."""

    covariate: str

    @property
    def columns(self) -> list[str]:
        return [self.covariate]

    def __str__(self) -> str:
        return f"varPower(form = ~ {self.covariate})"


def var_power(covariate: str) -> VarPower:
    """σ_i = σ |v_i|^π (``varPower(form = ~ covariate)``); v must not be 0."""
    return VarPower(_name(covariate, "covariate"))


def variance_functions(weights) -> tuple[VarIdent | None, VarPower | None]:
    """``weights`` (a :class:`VarIdent`, a :class:`VarPower`, or a tuple of one of each) split."""
    items = weights if isinstance(weights, (tuple, list)) else (weights,)
    ident = [w for w in items if isinstance(w, VarIdent)]
    power = [w for w in items if isinstance(w, VarPower)]
    if len(ident) + len(power) != len(items) or len(ident) > 1 or len(power) > 1:
        raise TypeError(
            f"weights must be rf.var_ident(...), rf.var_power(...) or a tuple of one of each, got {weights!r}"
        )
    return (ident[0] if ident else None), (power[0] if power else None)


def var_ident(by: str) -> VarIdent:
    """A residual standard deviation per level of ``by`` (``varIdent(form = ~ 1 | by)``)."""
    return VarIdent(_name(by, "by"))


def residual_structure(
    frame: pd.DataFrame,
    correlation: Correlation | None,
    weights,
    dtype: torch.dtype,
    blocks: torch.Tensor | None = None,
) -> WithinGroup:
    """The :class:`WithinGroup` residual of ``correlation`` and ``weights`` on the rows of ``frame``.
    Without a correlation the residual is diagonal and its groups only organise the computation:
    ``blocks`` (n,) codes (default: every row alone)."""
    n = len(frame)
    strata, names, covariate = None, None, None
    ident, power = variance_functions(weights) if weights is not None else (None, None)
    if power is not None:
        values = frame[power.covariate].to_numpy(dtype=float)
        if (values == 0).any():
            raise ValueError(
                f"var_power: the covariate {power.covariate!r} has zeros, where |v|^power is 0 or infinite"
            )
        covariate = torch.tensor(values, dtype=dtype)
    if ident is not None:
        codes, levels = factor_codes(frame[ident.by])
        # A level's name becomes part of the parameter name ratio_<level>: no '/' there.
        strata, names = torch.as_tensor(codes), [str(level).replace("/", "_") for level in levels]
    if correlation is None:
        codes = torch.arange(n) if blocks is None else blocks
        return WithinGroup(codes, "none", strata=strata, strata_names=names, power_covariate=covariate)
    groups = torch.as_tensor(factor_codes(frame[correlation.group])[0])
    locations = None
    if correlation.kind == "ar1" and correlation.time is not None:
        # Positions: the rank of the time within the group (ties in row order).
        ranks = frame.groupby(correlation.group, sort=False, observed=True)[correlation.time].rank(method="first")
        locations = torch.tensor(ranks.to_numpy(dtype=float) - 1.0, dtype=dtype)
    elif correlation.kind == "symm" and correlation.time is not None:
        # The index: the distinct values of the column in order, 0, 1, … (visits 8, 10, 12, 14 → 0 … 3).
        locations = torch.tensor(factor_codes(frame[correlation.time])[0], dtype=dtype)
    elif correlation.kind in ("car1", "exp", "gaus"):
        columns = [correlation.time] if correlation.time else list(correlation.coords)
        locations = torch.tensor(frame[columns].to_numpy(dtype=float), dtype=dtype)
    return WithinGroup(
        groups,
        correlation.kind,
        locations,
        nugget=correlation.nugget,
        strata=strata,
        strata_names=names,
        power_covariate=covariate,
    )
