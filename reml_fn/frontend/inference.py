"""Tests and intervals for formula fits, in lme4's, lmerTest's and pbkrtest's layouts.

* :func:`anova` — likelihood-ratio comparison of nested fits (lme4's ``anova(m0, m1)``):
  ``npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq)``; with ``refit=True`` (lme4's default)
  every REML fit is refitted by ML first, as lme4 does even when the fixed effects are equal.
* :func:`coef_table` — ``Estimate, Std. Error, df, t value, Pr(>|t|)`` with Satterthwaite's df
  (lmerTest's ``summary``; :mod:`reml_fn.inference.satterthwaite`) or Kenward–Roger's adjusted
  standard errors and df (:mod:`reml_fn.inference.kenward_roger`), or without df (``"none"``).
* :func:`contest` — F test of Lβ = 0 (lmerTest's ``contest``), or one t test per row of L.
* :func:`confint` — Wald intervals (fixed effects; NaN for the covariance parameters, as lme4) or
  parametric-bootstrap percentile intervals, rows in lme4's order and names: ``.sig01, .sig02, …``
  (per random term its standard deviations and correlations, lower triangle column by column:
  sd₁, cor₂₁, cor₃₁, …, sd₂, cor₃₂, …, sd_k), ``.sigma`` (residual), then the fixed effects.
  :func:`parameter_names` says which is which.
* :func:`bootstrap` — ``nsim`` responses simulated from the fit and refitted in one
  :func:`~reml_fn.fit_batched` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from reml_fn.fit import fit_batched
from reml_fn.frontend.result import LmerResult, residual_parameter_values
from reml_fn.inference.kenward_roger import kenward_roger, kenward_roger_df
from reml_fn.inference.profile import profile_limits
from reml_fn.inference.satterthwaite import contrast_df, joint_df, variance_derivatives
from reml_fn.params import flatten_params, get_path, unconstrain
from reml_fn.reml.engines import select_engine
from reml_fn.reml.ml import ml_fit_at

__all__ = ["anova", "coef_table", "contest", "confint", "bootstrap", "Bootstrap", "parameter_names", "sdcor"]

_DDF = ("satterthwaite", "none", "kenward-roger")


# ---------------------------------------------------------------------------------------- names


def parameter_names(result: LmerResult) -> pd.DataFrame:
    """lme4's names of the covariance parameters (``.sig01``, …, ``.sigma``) and what each is:
    columns ``grp, var1, var2, kind`` (``"sd"`` or ``"cor"``), in :func:`confint`'s row order.

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
        >>> names = parameter_names(m)
        >>> names.index.tolist(), names["kind"].tolist(), names["var1"].tolist()[:3]
        (['.sig01', '.sig02', '.sig03', '.sigma'], ['sd', 'cor', 'sd', 'sd'], ['(Intercept)', '(Intercept)', 'Days'])
    """
    rows = []
    for term in result.model.terms:
        for a in range(term.k):
            rows.append((term.name, term.columns[a], None, "sd"))
            for b in range(a + 1, term.k):
                rows.append((term.name, term.columns[a], term.columns[b], "cor"))
    index = [f".sig{i + 1:02d}" for i in range(len(rows))] + [".sigma"]
    rows.append(("Residual", None, None, "sd"))
    return pd.DataFrame(rows, index=index, columns=["grp", "var1", "var2", "kind"])


def _sdcor_from_covariances(covariances: list[Tensor], residual_variance: Tensor) -> Tensor:
    """(…, m) standard deviations and correlations in :func:`parameter_names` order from the terms'
    Σ (…, k, k) and σ² (…)."""
    values = []
    for sigma in covariances:
        sd = torch.diagonal(sigma, dim1=-2, dim2=-1).clamp(min=0).sqrt()
        k = sigma.shape[-1]
        for a in range(k):
            values.append(sd[..., a])
            for b in range(a + 1, k):
                scale = sd[..., a] * sd[..., b]
                values.append(torch.where(scale > 0, sigma[..., b, a] / scale, math.nan))
    values.append(residual_variance.clamp(min=0).sqrt())
    return torch.stack(values, -1)


def sdcor(result: LmerResult) -> pd.Series:
    """The covariance parameters as standard deviations and correlations, named as lme4's
    ``.sig01 …`` and ``.sigma`` (:func:`parameter_names`)."""
    values = _sdcor_from_covariances(
        list(result.model.covariances(result.fit.params).values()),
        result.model.residual_subtree(result.fit.natural)["sigma^2"],
    )
    return pd.Series(values.detach().cpu().numpy(), index=parameter_names(result).index)


# ------------------------------------------------------------------------------------ comparison


def anova(*models: LmerResult, refit: bool = True, **named: LmerResult) -> pd.DataFrame:
    """Likelihood-ratio comparison of fits of nested models to the same data (lme4's ``anova``).

    Rows (ordered by npar, named by keyword or ``model1``, ``model2``, … in the order given):
    ``npar`` (p + covariance parameters), ``AIC``, ``BIC``, ``logLik``, ``deviance`` = −2 logLik,
    ``Chisq`` = 2 Δ logLik against the row above (≥ 0), ``Df`` = Δ npar, ``Pr(>Chisq)``.
    ``refit=True`` (lme4's default) refits every REML fit by ML first; ``refit=False`` compares
    REML fits as they are, which is only valid when their fixed effects are the same (else a
    ``ValueError``).

    Example:
        >>> import reml_fn as rf
        >>> data = rf.datasets.load_frame("sleepstudy")
        >>> m0 = rf.lmer("Reaction ~ Days + (1 | Subject)", data)
        >>> m1 = rf.lmer("Reaction ~ Days + (Days | Subject)", data)
        >>> table = rf.anova(m0=m0, m1=m1)
        >>> round(float(table.loc["m1", "Chisq"]), 3), int(table.loc["m1", "Df"])
        (42.139, 2)
    """
    entries = [(f"model{i + 1}", m) for i, m in enumerate(models)] + list(named.items())
    if len(entries) < 2:
        raise ValueError("anova needs at least two fits to compare")
    for name, m in entries:
        if not isinstance(m, LmerResult):
            raise TypeError(f"anova: {name} is a {type(m).__name__}, not a fit of rf.lmer")
    first = entries[0][1]
    for name, m in entries[1:]:
        same = m.nobs == first.nobs and torch.equal(m.model.y, first.model.y)
        if not same:
            raise ValueError(
                f"anova: {name} was not fitted to the same responses as {entries[0][0]} "
                f"({m.nobs} vs {first.nobs} observations); compare fits of the same data"
            )
    if refit:
        entries = [(name, m if not m.fit.reml else m.model.fit(REML=False)) for name, m in entries]
    else:
        kinds = {m.fit.reml for _, m in entries}
        if len(kinds) > 1:
            raise ValueError("anova(refit=False): the fits mix REML and ML; refit them (refit=True)")
        if first.fit.reml:
            for name, m in entries[1:]:
                if list(m.model.x_names) != list(first.model.x_names) or not torch.equal(m.model.X, first.model.X):
                    raise ValueError(
                        f"anova(refit=False): {name} and {entries[0][0]} have different fixed effects, and REML "
                        "likelihoods of different fixed effects are not comparable; use refit=True (ML)"
                    )
    rows = []
    for name, m in entries:
        npar = m.model.X.shape[1] + len(m.fit.names)
        rows.append((name, npar, m.aic, m.bic, m.loglik, -2.0 * m.loglik))
    rows.sort(key=lambda row: row[1])
    table = pd.DataFrame(rows, columns=["model", "npar", "AIC", "BIC", "logLik", "deviance"]).set_index("model")
    table.index.name = None
    chisq = (2.0 * table["logLik"].diff()).clip(lower=0.0)
    df = table["npar"].diff()
    table["Chisq"] = chisq
    table["Df"] = df
    table["Pr(>Chisq)"] = [
        math.nan if math.isnan(c) else float(stats.chi2.sf(c, d)) if d > 0 else math.nan for c, d in zip(chisq, df)
    ]
    return table


# --------------------------------------------------------------------------- degrees of freedom


def _theta(result: LmerResult) -> Tensor:
    return flatten_params(result.model.structure, result.fit.params)


def _parts(result: LmerResult):
    model = result.model
    return variance_derivatives(
        model.structure,
        result.fit.names,
        _theta(result),
        model.y,
        model.X,
        held=result.fit.at_boundary,
        engine=result.fit.engine,
        reml=result.fit.reml,
    )


def _check_ddf(ddf: str) -> str:
    key = ddf.lower().replace("_", "-").replace(" ", "-") if isinstance(ddf, str) else ddf
    if key not in _DDF:
        raise ValueError(f"ddf must be one of {_DDF}, got {ddf!r}")
    return key


def _kenward_roger(result: LmerResult):
    if result.model.correlation is not None or result.model.weights is not None:
        raise ValueError(
            "Kenward–Roger needs V linear in its parameters (pbkrtest's setting); a residual correlation or "
            "variance function is not: use ddf='satterthwaite'"
        )
    if not result.fit.reml:
        raise ValueError("Kenward–Roger df are defined for REML fits (pbkrtest refuses ML fits too)")
    model = result.model
    names = list(result.fit.names)
    vector = torch.stack([get_path(result.fit.natural, name) for name in names])
    return kenward_roger(model.structure, names, vector, model.y, model.X, engine=result.fit.engine)


def coef_table(result: LmerResult, ddf: str = "satterthwaite") -> pd.DataFrame:
    """The fixed-effects table: ``Estimate, Std. Error, df, t value, Pr(>|t|)`` with Satterthwaite's
    denominator df (lmerTest's ``summary(m)$coefficients``), with Kenward–Roger's adjusted standard
    errors and df (``ddf="kenward-roger"``, lmerTest's ``ddf = "Kenward-Roger"``), or
    ``Estimate, Std. Error, t value`` (``ddf="none"``, lme4's).

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
        >>> rf.coef_table(m)["df"].round(2).tolist()                      # lmerTest: 17.00, 17.00
        [17.0, 17.0]
    """
    key = _check_ddf(ddf)
    estimates = result.fixef()
    if key == "none":
        se = np.sqrt(np.diag(result.vcov().to_numpy()))
        table = pd.DataFrame({"Estimate": estimates.to_numpy(), "Std. Error": se}, index=estimates.index)
        table["t value"] = table["Estimate"] / table["Std. Error"]
        return table
    # One t test per coefficient: contest with the rows of the identity.
    rows = contest(result, np.eye(len(estimates)), ddf, joint=False)
    rows.index = estimates.index
    return rows[["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]]


def contest(
    result: LmerResult, L: Any, ddf: str = "satterthwaite", joint: bool = True, level: float = 0.95
) -> pd.DataFrame:
    """Tests of linear combinations Lβ (lmerTest's ``contest``). ``joint=True``: the F test of
    Lβ = 0 (``Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F)``); ``joint=False``: one t test per
    row of L (``Estimate, Std. Error, df, t value, lower, upper, Pr(>|t|)``).

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("score ~ Machine + (1 | Worker/Machine)", rf.datasets.load_frame("Machines"))
        >>> round(float(rf.contest(m, [[0, 1, 0], [0, 0, 1]])["F value"].iloc[0]), 3)   # lmerTest: 20.576
        20.576
    """
    key = _check_ddf(ddf)
    if key == "none":
        raise ValueError("contest needs ddf='satterthwaite' or 'kenward-roger'")
    matrix = torch.as_tensor(np.atleast_2d(np.asarray(L, dtype=float)), dtype=result.model.X.dtype)
    p = result.model.X.shape[1]
    if matrix.shape[1] != p:
        raise ValueError(
            f"contest: L must have {p} columns (one per fixed effect {list(result.model.x_names)}), "
            f"got {matrix.shape[1]}"
        )
    if key == "kenward-roger":
        kr = _kenward_roger(result)
        beta, vcov = kr.beta, kr.vcov_adjusted
        rows_df = [kenward_roger_df(kr, matrix[r : r + 1]) for r in range(matrix.shape[0])]
    else:
        parts = _parts(result)
        beta, vcov = parts.beta, parts.vcov
    if not joint:
        estimate = (matrix @ beta).detach().cpu().numpy()
        se = torch.einsum("qa,ab,qb->q", matrix, vcov, matrix).sqrt().detach().cpu().numpy()
        nu = np.asarray(rows_df) if key == "kenward-roger" else contrast_df(parts, matrix)[2].detach().cpu().numpy()
        quantile = stats.t.ppf(0.5 + level / 2.0, nu)
        t_value = estimate / se
        return pd.DataFrame(
            {
                "Estimate": estimate,
                "Std. Error": se,
                "df": nu,
                "t value": t_value,
                "lower": estimate - quantile * se,
                "upper": estimate + quantile * se,
                "Pr(>|t|)": 2.0 * stats.t.sf(np.abs(t_value), nu),
            }
        )
    if int(torch.linalg.matrix_rank(matrix)) != matrix.shape[0]:
        raise ValueError("contest: the rows of L must be linearly independent for a joint test")
    if key == "kenward-roger":
        q = matrix.shape[0]
        contrast = matrix @ beta
        F = float(contrast @ torch.linalg.solve(matrix @ vcov @ matrix.mT, contrast)) / q
        nu = kenward_roger_df(kr, matrix)
    else:
        F, q, nu = joint_df(parts, matrix)
    sigma2 = result.sigma**2
    return pd.DataFrame(
        {
            "Sum Sq": [F * q * sigma2],
            "Mean Sq": [F * sigma2],
            "NumDF": [q],
            "DenDF": [nu],
            "F value": [F],
            "Pr(>F)": [float(stats.f.sf(F, q, nu))],
        }
    )


# ------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Bootstrap:
    """A parametric bootstrap: ``replicates`` (nsim rows; columns :func:`parameter_names` then the
    fixed effects, or the ``statistic``'s), ``status`` (nsim,) of each refit, ``estimate`` (the
    fit's own values) and :meth:`confint`."""

    replicates: pd.DataFrame
    status: np.ndarray
    estimate: pd.Series

    def confint(self, level: float = 0.95) -> pd.DataFrame:
        """Percentile intervals over the refits that returned estimates (statuses 0, 1, 2, 5)."""
        usable = self.replicates[np.isin(self.status, (0, 1, 2, 5))]
        lower, upper = (1.0 - level) / 2.0, (1.0 + level) / 2.0
        return pd.DataFrame(
            {
                f"{100 * lower:.3g} %": usable.quantile(lower),
                f"{100 * upper:.3g} %": usable.quantile(upper),
            }
        )


def bootstrap(
    result: LmerResult,
    nsim: int,
    seed: int | None = None,
    statistic: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    **fit_options: Any,
) -> Bootstrap:
    """Simulate ``nsim`` responses from the fitted model (:meth:`LmerResult.simulate`) and refit them
    all by the fit's criterion (REML or ML) in one :func:`~reml_fn.fit_batched` call.

    ``statistic`` (optional) maps the replicates' default table (standard deviations,
    correlations, σ, the residual's correlation parameters and variance ratios where the model has
    them — :meth:`~reml_fn.frontend.result.LmerResult.residual_parameters`' names —, fixed effects; a
    DataFrame) to the columns wanted. Deterministic under
    ``seed``; the refits are those :func:`reml_fn.fit` gives one by one.

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
        >>> boot = rf.bootstrap(m, 50, seed=1)
        >>> boot.replicates.shape, list(boot.confint().columns)
        ((50, 6), ['2.5 %', '97.5 %'])
    """
    model = result.model
    simulated = result.simulate(nsim, seed=seed)
    Y = torch.tensor(simulated.to_numpy().T, dtype=model.y.dtype)
    refits = fit_batched(model.structure, Y, model.X, REML=result.fit.reml, engine=result.fit.engine, **fit_options)
    values = _sdcor_from_covariances(
        list(model.covariances(refits.params, batched=True).values()), model.residual_subtree(refits.natural)["sigma^2"]
    )
    # The residual's correlation parameters and variance ratios (nlme's corStruct, varStruct), if any.
    residual = residual_parameter_values(model, refits.natural)
    columns = [values] + ([torch.stack(list(residual.values()), -1)] if residual else []) + [refits.beta]
    names = list(parameter_names(result).index) + list(residual) + list(model.x_names)
    table = pd.DataFrame(np.concatenate([c.detach().cpu().numpy() for c in columns], axis=1), columns=names)
    estimate = pd.concat([sdcor(result), result.residual_parameters(), result.fixef()])
    if statistic is not None:
        table = pd.DataFrame(statistic(table))
        estimate = pd.DataFrame(statistic(estimate.to_frame().T)).iloc[0]
    return Bootstrap(table, refits.status.detach().cpu().numpy(), estimate)


# ------------------------------------------------------------------------------------- intervals


def confint(
    result: LmerResult, method: str = "wald", level: float = 0.95, nsim: int = 1000, seed: int | None = None
) -> pd.DataFrame:
    """Confidence intervals in lme4's ``confint.merMod`` layout: rows ``.sig01 …``, ``.sigma``, then
    the fixed effects; columns ``2.5 %``, ``97.5 %``.

    ``method="wald"``: β̂ ± z·SE for the fixed effects, NaN for the covariance parameters (as lme4).
    ``method="boot"``: percentile intervals of a parametric bootstrap (:func:`bootstrap`, ``nsim``
    refits in one batched call, ``seed``), with rows for a correlated residual's parameters too
    (e.g. ``rho``, ``phi``, ``ratio_Male``: nlme's ``intervals`` for the corStruct and varStruct). ``method="profile"``: where the signed root of the ML
    deviance difference reaches ±z (:mod:`reml_fn.inference.profile`), every parameter profiled
    with the others at their constrained ML optimum — of the ML fit, also for a REML fit, as lme4
    does (so a REML fit's profile intervals are its ML fit's).

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
        >>> rf.confint(m).loc["Days"].round(4).tolist()                        # lme4: 7.4376 13.4970
        [7.4376, 13.497]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lower, upper = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    columns = [f"{100 * lower:.3g} %", f"{100 * upper:.3g} %"]
    if method == "wald":
        names = parameter_names(result).index
        z = stats.norm.ppf(upper)
        estimates = result.fixef()
        se = np.sqrt(np.diag(result.vcov().to_numpy()))
        fixed = pd.DataFrame(
            np.stack([estimates.to_numpy() - z * se, estimates.to_numpy() + z * se], 1),
            index=estimates.index,
            columns=columns,
        )
        covariance = pd.DataFrame(math.nan, index=names, columns=columns)
        return pd.concat([covariance, fixed])
    if method == "boot":
        return bootstrap(result, nsim, seed=seed).confint(level)
    if method == "profile":
        return _profile_intervals(result, stats.norm.ppf(upper), columns)
    raise ValueError(f"method must be 'wald', 'boot' or 'profile', got {method!r}")


# --------------------------------------------------------------------------------- profile intervals


def _sdcor_coordinates(result: LmerResult) -> tuple[Tensor, Callable[[Tensor], dict], list[tuple[float, float]]]:
    """φ̂ (log standard deviations, atanh correlations, log σ; :func:`parameter_names` order) of
    ``result`` (an ML fit), the map φ → raw parameter tree, and each coordinate's bounds."""
    model = result.model
    covariances = list(model.covariances(result.fit.params).values())
    phi, bounds = [], []
    for sigma in covariances:
        sd = torch.diagonal(sigma).clamp(min=1e-300).sqrt()
        k = sigma.shape[-1]
        for a in range(k):
            phi.append(sd[a].log())
            bounds.append((float(sd[a].log()) - 30.0, math.inf))
            for b in range(a + 1, k):
                phi.append(torch.atanh((sigma[b, a] / (sd[a] * sd[b])).clamp(-1 + 1e-12, 1 - 1e-12)))
                bounds.append((-20.0, 20.0))
    residual = result.fit.natural["residual"]["sigma^2"].sqrt()
    phi.append(residual.log())
    bounds.append((float(residual.log()) - 30.0, math.inf))
    terms = model.terms
    structure = model.structure

    def raw(coordinates: Tensor) -> dict:
        natural, position = {}, 0
        for term in terms:
            k = term.k
            sd, correlations = [], {}
            for a in range(k):
                sd.append(coordinates[position].exp())
                position += 1
                for b in range(a + 1, k):
                    correlations[(b, a)] = torch.tanh(coordinates[position])
                    position += 1
            if k == 1:
                entries = {"sigma^2": sd[0] ** 2}
            else:
                entries = {
                    f"sigma^2_{a}_{b}": sd[a] ** 2 if a == b else correlations[(a, b)] * sd[a] * sd[b]
                    for a in range(k)
                    for b in range(a + 1)
                }
            natural[term.name] = {"cov": entries}
        natural["residual"] = {"sigma^2": coordinates[position].exp() ** 2}
        return unconstrain(structure, natural)

    return torch.stack(phi), raw, bounds


def _profile_intervals(result: LmerResult, z: float, columns: list[str]) -> pd.DataFrame:
    if result.model.correlation is not None or result.model.weights is not None:
        raise NotImplementedError(
            "profile intervals with a residual correlation or variance function are not available yet; use 'wald' or 'boot'"
        )
    ml = result if not result.fit.reml else result.model.fit(REML=False)
    model = ml.model
    engine = select_engine(model.structure, ml.fit.engine)
    phi, raw, bounds = _sdcor_coordinates(ml)

    def deviance(coordinates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loglik, beta, vcov = ml_fit_at(engine, model.structure, raw(coordinates), model.y, model.X)
        return -2.0 * loglik, beta, vcov

    ends, _ = profile_limits(deviance, phi, z, bounds)
    ends = ends.detach().cpu().numpy()
    names = parameter_names(result)
    rows = []
    for j, kind in enumerate(names["kind"]):
        low, high = ends[j]
        if kind == "sd":
            rows.append((0.0 if low <= bounds[j][0] else math.exp(low), math.exp(high)))
        else:
            rows.append(
                (-1.0 if low <= bounds[j][0] else math.tanh(low), 1.0 if high >= bounds[j][1] else math.tanh(high))
            )
    K = len(rows)
    fixed = [tuple(ends[K + j]) for j in range(model.X.shape[1])]
    return pd.DataFrame(rows + fixed, index=[*names.index, *model.x_names], columns=columns)
