"""A fitted formula model with lme4's accessors, in pandas types and lme4's names.

Quantities at the REML estimates θ̂ (Σ_t per term, σ²), β̂ = (XᵀV⁻¹X)⁻¹XᵀV⁻¹y and the BLUPs
û_t = (I ⊗ Σ_t) Z_tᵀ V⁻¹ (y − Xβ̂):

* ``fixef()`` β̂; ``vcov()`` (XᵀV⁻¹X)⁻¹; ``varcorr()`` the variances, standard deviations,
  covariances and correlations (lme4's ``as.data.frame(VarCorr(m))``);
* ``ranef()`` û per grouping factor and level; ``coef()`` β̂ + û (lme4's ``coef``);
* ``fitted()`` Xβ̂ + Σ_t Z_t û_t, ``residuals()`` y − fitted, ``predict(newdata)`` the same on new
  rows (``re_form=False``: Xβ̂ only; a level not seen in fitting contributes 0 when
  ``allow_new_levels``, as lme4's population prediction);
* ``simulate(nsim)`` responses drawn from the fitted model: Xβ̂ + Σ_t Z_t u_t + e with
  u_t ~ N(0, I ⊗ Σ_t), e ~ N(0, σ² I).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from reml_fn.fit.result import FitResult
from reml_fn.frontend.data import as_frame, level_label
from reml_fn.frontend.model import CONTEXT, LmerModel
from reml_fn.reml import blup
from reml_fn.reml.blocks import residual_draws
from reml_fn.structures.within_group import row_weights, symm_correlation

__all__ = ["LmerResult"]


def residual_parameter_values(model: LmerModel, natural) -> dict[str, Tensor]:
    """The residual's correlation parameters and variance ratios (:meth:`LmerResult.residual_parameters`)
    from a natural parameter tree whose leaves are 0-d or batched (B,) (e.g. a bootstrap's refits):
    nlme's cor(i, j), i < j, for ``cor_symm``, then the others by name; empty for an independent
    residual.

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("distance ~ age + (1 | Subject)", rf.datasets.load_frame("Orthodont"),
        ...             correlation=rf.cor_ar1(group="Subject"))
        >>> values = residual_parameter_values(m.model, m.fit.natural)
        >>> list(values), round(float(values["rho"]), 4) == round(float(m.residual_parameters()["rho"]), 4)
        (['rho'], True)
    """
    natural = model.residual_subtree(natural)
    values = {name: value for name, value in natural.items() if name != "sigma^2" and not name.startswith("L_")}
    correlation = model.correlation
    if correlation is not None and correlation.kind == "symm":
        residual = model.residual
        subtree = dict(natural)
        if next(iter(subtree.values())).dim():
            C = torch.func.vmap(lambda tree: symm_correlation(residual, tree))(subtree)
        else:
            C = symm_correlation(residual, subtree)
        size = C.shape[-1]
        pairs = {f"cor({i + 1},{j + 1})": C[..., i, j] for i in range(size) for j in range(i + 1, size)}
        values = pairs | values
    return values


@dataclass(frozen=True)
class LmerResult:
    """An lme4-style fit: ``model`` (:class:`~reml_fn.frontend.model.LmerModel`) and ``fit`` (the
    :class:`~reml_fn.FitResult` of :func:`reml_fn.fit`).

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("Yield ~ 1 + (1 | Batch)", rf.datasets.load_frame("Dyestuff"))
        >>> m.varcorr().round(2)[["grp", "vcov", "sdcor"]].values.tolist()
        [['Batch', 1764.05, 42.0], ['Residual', 2451.25, 49.51]]
    """

    model: LmerModel
    fit: FitResult

    # -- scalars ----------------------------------------------------------------------------------
    @property
    def loglik(self) -> float:
        """REML log-likelihood (lme4's ``logLik``)."""
        return float(self.fit.loglik)

    @property
    def reml(self) -> bool:
        """Whether this is a REML fit (else ML)."""
        return self.fit.reml

    @property
    def reml_criterion(self) -> float:
        """−2 × REML log-likelihood (lme4's ``REMLcrit``) of a REML fit."""
        if not self.reml:
            raise ValueError("an ML fit has no REML criterion: see deviance (−2 × its log-likelihood)")
        return float(self.fit.reml_criterion)

    @property
    def deviance(self) -> float:
        """−2 × log-likelihood: lme4's ``deviance`` of an ML fit; of a REML fit, its REML criterion."""
        return -2.0 * self.loglik

    @property
    def aic(self) -> float:
        return float(self.fit.aic)

    @property
    def bic(self) -> float:
        return float(self.fit.bic)

    @property
    def nobs(self) -> int:
        return self.model.nobs

    @property
    def ngroups(self) -> dict[str, int]:
        return self.model.ngroups

    @property
    def converged(self) -> bool:
        return bool(self.fit.converged)

    @property
    def status(self) -> int:
        return int(self.fit.status)

    @property
    def message(self) -> str:
        return self.fit.message

    @property
    def sigma(self) -> float:
        """Residual standard deviation σ̂."""
        return math.sqrt(float(self.model.residual_subtree(self.fit.natural)["sigma^2"]))

    def _residual_sd(self) -> np.ndarray | float:
        """σ w_i per row (σ when the residual has no variance function)."""
        model = self.model
        if model.weights is None:
            return self.sigma
        residual = model.residual
        natural = model.residual_subtree(self.fit.natural)
        w = row_weights(residual, natural, residual.strata, residual.covariate.to(model.y.dtype))
        return self.sigma * w.detach().cpu().numpy()

    def residual_parameters(self) -> pd.Series:
        """The residual's correlation parameters and variance ratios on the natural scale (nlme's
        ``coef(m$modelStruct$corStruct, unconstrained = FALSE)`` and ``varStruct``), empty for an
        independent residual."""
        values = residual_parameter_values(self.model, self.fit.natural)
        return pd.Series({name: float(value) for name, value in values.items()}, dtype=float, name="residual")

    # -- fixed effects -------------------------------------------------------------------------------
    def fixef(self) -> pd.Series:
        """β̂ indexed by lme4's coefficient names."""
        return pd.Series(self.fit.beta.detach().cpu().numpy(), index=list(self.model.x_names), name="fixef")

    def vcov(self) -> pd.DataFrame:
        """(XᵀV⁻¹X)⁻¹ at θ̂, rows and columns named."""
        names = list(self.model.x_names)
        return pd.DataFrame(self.fit.vcov_beta.detach().cpu().numpy(), index=names, columns=names)

    # -- covariance parameters -----------------------------------------------------------------------
    def _covariances(self) -> dict[str, np.ndarray]:
        """Σ_t (k×k) of every term at θ̂, by term name."""
        return {name: sigma.detach().cpu().numpy() for name, sigma in self.model.covariances(self.fit.params).items()}

    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(m))``: per term its variances (``var1`` = the column,
        ``var2`` empty, ``vcov`` the variance, ``sdcor`` its square root), then its covariances in
        lme4's order ((1,2), (1,3), …, (2,3), …; ``sdcor`` the correlation); ``Residual`` last."""
        rows = []
        covariances = self._covariances()
        for term in self.model.terms:
            sigma = covariances[term.name]
            for a in range(term.k):
                rows.append((term.name, term.columns[a], None, sigma[a, a], math.sqrt(max(sigma[a, a], 0.0))))
            for a in range(term.k):
                for b in range(a + 1, term.k):
                    scale = math.sqrt(max(sigma[a, a], 0.0) * max(sigma[b, b], 0.0))
                    correlation = sigma[b, a] / scale if scale > 0 else math.nan
                    rows.append((term.name, term.columns[a], term.columns[b], sigma[b, a], correlation))
        rows.append(("Residual", None, None, self.sigma**2, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    # -- random effects ------------------------------------------------------------------------------
    @functools.cached_property
    def _blups(self) -> dict[str, Tensor]:
        """û per term path, computed once per result (ranef, coef, fitted, predict use them)."""
        model = self.model
        return blup(model.structure, self.fit.params, model.y, model.X)

    def ranef(self) -> dict[str, pd.DataFrame]:
        """û per grouping factor: a DataFrame indexed by level labels with one column per
        covariate; terms of the same factor (``(1 | g) + (0 + x | g)``) share one frame."""
        effects = self._blups
        out: dict[str, pd.DataFrame] = {}
        for term in self.model.terms:
            values = effects[term.name].detach().cpu().numpy().reshape(len(term.levels), term.k)
            frame = pd.DataFrame(values, index=pd.Index(term.levels, name=term.group), columns=list(term.columns))
            out[term.group] = frame if term.group not in out else pd.concat([out[term.group], frame], axis=1)
        return out

    def coef(self) -> dict[str, pd.DataFrame]:
        """β̂ + û per grouping factor and level (lme4's ``coef``): every fixed effect, plus the
        random effect of the same name where the factor has one."""
        fixed = self.fixef()
        out = {}
        for group, effects in self.ranef().items():
            frame = pd.DataFrame(
                np.tile(fixed.to_numpy(), (len(effects), 1)), index=effects.index, columns=list(fixed.index)
            )
            for column in effects.columns:
                if column in frame.columns:
                    frame[column] = frame[column] + effects[column]
                else:
                    frame[column] = effects[column]
            out[group] = frame
        return out

    # -- fitted values, prediction, simulation -------------------------------------------------------
    def _random_part(self, codes: dict[str, Tensor], covariates: dict[str, Tensor]) -> Tensor | float:
        if not self.model.terms:  # gls: no random effects
            return 0.0
        effects = self._blups
        total = None
        for term in self.model.terms:
            index = codes[term.name]
            u = effects[term.name].reshape(len(term.levels), term.k)
            known = index >= 0
            rows = u.index_select(0, index.clamp(min=0)) * known.unsqueeze(-1).to(u.dtype)
            part = (covariates[term.name] * rows).sum(-1)
            total = part if total is None else total + part
        return total

    def fitted(self) -> pd.Series:
        """Xβ̂ + Σ_t Z_t û_t on the rows fitted (indexed as in ``data``)."""
        model = self.model
        codes = {name: child.codes for name, child in _grouped(model)}
        covariates = {name: child.covariates for name, child in _grouped(model)}
        values = model.X @ self.fit.beta + self._random_part(codes, covariates)
        return pd.Series(values.detach().cpu().numpy(), index=model.index, name="fitted")

    def residuals(self, scaled: bool = False) -> pd.Series:
        """y − fitted (divided by σ̂ when ``scaled``), indexed as in ``data``."""
        values = self.model.y.detach().cpu().numpy() - self.fitted().to_numpy()
        if scaled:  # by each row's residual sd σ w_i (nlme's Pearson residuals under a variance function)
            values = values / self._residual_sd()
        return pd.Series(values, index=self.model.index, name="residuals")

    def predict(self, newdata: Any = None, re_form: Any = None, allow_new_levels: bool = False) -> pd.Series:
        """Predictions with lme4's semantics.

        ``re_form=None``: conditional on the random effects (Xβ̂ + Σ_t Z_t û_t); ``re_form=False``
        (lme4's ``re.form = NA`` or ``~0``): the fixed part Xβ̂ only. ``newdata``: a DataFrame with the
        columns the model uses (not the response); its factor levels must be among those fitted, and
        grouping levels too unless ``allow_new_levels``, when an unseen level predicts at the
        population level (its random effect 0). Default: the fitted rows (:meth:`fitted`)."""
        if (
            re_form is not None
            and re_form is not False
            and not (isinstance(re_form, str) and re_form.replace(" ", "") in ("~0", "NA"))
        ):
            raise ValueError(
                f"re_form must be None (all random effects) or False (none, lme4's NA or ~0), got {re_form!r}"
            )
        conditional = re_form is None
        model = self.model
        if newdata is None:
            if conditional:
                return self.fitted().rename("predict")
            return pd.Series((model.X @ self.fit.beta).detach().cpu().numpy(), index=model.index, name="predict")
        frame = as_frame(newdata)
        dtype = model.X.dtype
        X = _new_matrix(model.fixed_spec, frame, "the fixed effects", dtype)
        values = X @ self.fit.beta
        if conditional:
            codes, covariates = {}, {}
            for term in model.terms:
                codes[term.name] = _new_codes(term, frame, allow_new_levels)
                if term.spec is None:
                    covariates[term.name] = torch.ones(len(frame), 1, dtype=dtype)
                else:
                    covariates[term.name] = _new_matrix(term.spec, frame, f"the random term {term.text}", dtype)
            values = values + self._random_part(codes, covariates)
        return pd.Series(values.detach().cpu().numpy(), index=frame.index, name="predict")

    def simulate(self, nsim: int = 1, seed: int | None = None) -> pd.DataFrame:
        """``nsim`` responses drawn from the fitted model (columns ``sim_1`` … ``sim_nsim``, rows as
        fitted): Xβ̂ + Σ_t Z_t u_t + e, u_t ~ N(0, I_m ⊗ Σ̂_t), e ~ N(0, σ̂² I) — or e ~ N(0, R̂) for a
        correlated residual, drawn group block by group block."""
        if isinstance(nsim, bool) or not isinstance(nsim, int) or nsim < 1:
            raise ValueError(f"nsim must be a positive int, got {nsim!r}")
        model = self.model
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        dtype, n = model.y.dtype, model.nobs
        mean = model.X @ self.fit.beta
        if model.correlation is None and model.weights is None:
            draws = mean.unsqueeze(-1) + self.sigma * torch.randn(n, nsim, generator=generator, dtype=dtype)
        else:  # e ~ N(0, R), group block by group block
            residual = model.residual
            natural = model.residual_subtree(self.fit.natural)
            draws = mean.unsqueeze(-1) + residual_draws(residual, natural, nsim, generator, dtype)
        covariances = self._covariances()
        for name, child in _grouped(model):
            sigma = torch.as_tensor(covariances[name], dtype=dtype)
            factor = _psd_factor(sigma)
            standard = torch.randn(child.num_groups, nsim, sigma.shape[0], generator=generator, dtype=dtype)
            u = standard @ factor.mT  # (m, nsim, k): rows with covariance Σ
            draws = draws + (child.covariates.to(dtype).unsqueeze(1) * u.index_select(0, child.codes)).sum(-1)
        columns = [f"sim_{i + 1}" for i in range(nsim)]
        return pd.DataFrame(draws.detach().cpu().numpy(), index=model.index, columns=columns)

    # -- printing --------------------------------------------------------------------------------
    def summary(self) -> str:
        """lme4's ``summary(m)`` layout: criterion, scaled residuals, random effects, fixed effects
        and their correlations."""
        method = "REML" if self.reml else "maximum likelihood"
        kind = "Linear mixed model" if self.model.terms else "Generalized least squares"
        lines = [f"{kind} fit by {method}", f"Formula: {self.model.formula}", ""]
        if self.reml:
            lines.append(f"REML criterion at convergence: {self.reml_criterion:.4f}")
        else:
            lines += _table(
                ["AIC", "BIC", "logLik", "deviance", "df.resid"],
                [
                    [
                        f"{self.aic:.1f}",
                        f"{self.bic:.1f}",
                        f"{self.loglik:.1f}",
                        f"{self.deviance:.1f}",
                        str(self.nobs - self.model.X.shape[1] - len(self.fit.names)),
                    ]
                ],
                index=None,
            )
        if not self.converged:
            lines.append(f"Status {self.status}: {self.message}")
        if self.model.n_dropped:
            lines.append(f"({self.model.n_dropped} observations deleted due to missingness)")
        lines += ["", "Scaled residuals:"]
        quantiles = np.quantile(self.residuals(scaled=True).to_numpy(), [0.0, 0.25, 0.5, 0.75, 1.0])
        lines += _table(["Min", "1Q", "Median", "3Q", "Max"], [[f"{q:.4f}" for q in quantiles]], index=None)
        lines += ["", "Random effects:"]
        lines += self._random_table()
        extra = self.residual_parameters()
        if len(extra):
            weights = self.model.weights
            specs = [self.model.correlation, *(weights if isinstance(weights, (tuple, list)) else (weights,))]
            what = [str(spec) for spec in specs if spec is not None]
            lines.append(f"Residual structure: {'; '.join(what)}")
            lines.append("  " + ", ".join(f"{name} = {value:.6g}" for name, value in extra.items()))
        groups = ", ".join(f"{group}, {count}" for group, count in self.ngroups.items())
        lines += [f"Number of obs: {self.nobs}" + (f", groups:  {groups}" if groups else ""), "", "Fixed effects:"]
        estimates = self.fixef()
        errors = np.sqrt(np.diag(self.vcov().to_numpy()))
        rows = [
            [f"{b:.6g}", f"{e:.6g}", f"{b / e:.3f}" if e > 0 else "NaN"] for b, e in zip(estimates.to_numpy(), errors)
        ]
        lines += _table(["Estimate", "Std. Error", "t value"], rows, index=list(estimates.index))
        if len(estimates) > 1:
            lines += ["", "Correlation of Fixed Effects:"]
            vcov = self.vcov().to_numpy()
            correlation = vcov / np.outer(errors, errors)
            short = [_abbreviate(name) for name in estimates.index]
            body = [
                [f"{correlation[i, j]:.3f}" if j < i else "" for j in range(len(short) - 1)]
                for i in range(1, len(short))
            ]
            lines += _table(short[:-1], body, index=list(estimates.index[1:]))
        return "\n".join(lines)

    def _random_table(self) -> list[str]:
        frame = self.varcorr()
        rows = []
        for term in self.model.terms:
            part = frame[(frame["grp"] == term.name) & frame["var2"].isna()]
            pairs = frame[(frame["grp"] == term.name) & frame["var2"].notna()]
            for a, (_, row) in enumerate(part.iterrows()):
                correlations = [
                    f"{float(pairs[(pairs['var1'] == term.columns[b]) & (pairs['var2'] == term.columns[a])]['sdcor'].iloc[0]):.2f}"
                    for b in range(a)
                ]
                rows.append(
                    [
                        term.name if a == 0 else "",
                        row["var1"],
                        f"{row['vcov']:.6g}",
                        f"{row['sdcor']:.6g}",
                        *correlations,
                    ]
                )
        rows.append(["Residual", "", f"{self.sigma**2:.6g}", f"{self.sigma:.6g}"])
        width = max(len(r) for r in rows)
        rows = [r + [""] * (width - len(r)) for r in rows]
        header = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] + [""] * (width - 5) if width > 4 else [])
        return _table(header, rows, index=None, left=2)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        fixed = ", ".join(f"{name}={value:.6g}" for name, value in self.fixef().items())
        criterion = f"REML criterion {self.reml_criterion:.4f}" if self.reml else f"deviance {self.deviance:.4f}"
        return f"LmerResult({self.model.formula!r}, {criterion}, status {self.status}, fixef: {fixed})"

    # -- inference (reml_fn.frontend.inference) ---------------------------------------------------
    def coef_table(self, ddf: str = "satterthwaite") -> pd.DataFrame:
        """Fixed effects with Satterthwaite df and p-values (:func:`reml_fn.frontend.inference.coef_table`)."""
        from reml_fn.frontend.inference import coef_table

        return coef_table(self, ddf)

    def contest(self, L: Any, ddf: str = "satterthwaite", joint: bool = True) -> pd.DataFrame:
        """Tests of Lβ (:func:`reml_fn.frontend.inference.contest`)."""
        from reml_fn.frontend.inference import contest

        return contest(self, L, ddf, joint)

    def confint(self, method: str = "wald", level: float = 0.95, **options: Any) -> pd.DataFrame:
        """Confidence intervals in lme4's layout (:func:`reml_fn.frontend.inference.confint`)."""
        from reml_fn.frontend.inference import confint

        return confint(self, method, level, **options)


def _grouped(model: LmerModel):
    for term in model.terms:
        yield term.name, model.structure[term.name]


def _psd_factor(sigma: Tensor) -> Tensor:
    """F with F Fᵀ = Σ for a positive semi-definite Σ (a variance at 0 included)."""
    values, vectors = torch.linalg.eigh(sigma)
    return vectors * values.clamp(min=0).sqrt().unsqueeze(-2)


def _new_matrix(spec, frame: pd.DataFrame, where: str, dtype) -> Tensor:
    try:
        matrix = spec.get_model_matrix(frame, na_action="raise", context=CONTEXT)
    except Exception as error:
        raise ValueError(f"newdata: cannot build {where}: {type(error).__name__}: {error}") from None
    return torch.tensor(np.asarray(matrix, dtype=float), dtype=dtype).reshape(len(frame), -1)


def _new_codes(term, frame: pd.DataFrame, allow_new_levels: bool) -> Tensor:
    """Codes of the fitted levels for new rows; −1 for a level not seen in fitting."""
    missing = [factor for factor in term.factors if factor not in frame.columns]
    if missing:
        raise ValueError(f"newdata lacks the grouping column(s) {missing} of the random term {term.text}")
    labels = frame[list(term.factors)].apply(lambda row: ":".join(level_label(v) for v in row), axis=1)
    lookup = {level: code for code, level in enumerate(term.levels)}
    codes = np.array([lookup.get(label, -1) for label in labels], dtype=np.int64)
    unseen = sorted({label for label, code in zip(labels, codes) if code < 0})
    if unseen and not allow_new_levels:
        raise ValueError(
            f"new levels of {term.group!r} in newdata: {unseen[:10]}{' …' if len(unseen) > 10 else ''}; pass "
            "allow_new_levels=True to predict them at the population level (random effect 0)"
        )
    return torch.as_tensor(codes)


def _abbreviate(name: str) -> str:
    """lme4's short labels for the fixed-effect correlation table (``(Intercept)`` → ``(Intr)``)."""
    if name == "(Intercept)":
        return "(Intr)"
    return name if len(name) <= 6 else name[:6]


def _table(header: list[str], rows: list[list[str]], index: list[str] | None, left: int = 0) -> list[str]:
    """Right-aligned text columns (the first ``left`` columns left-aligned), an optional row index."""
    columns = len(header)
    labels = index if index is not None else []
    cells = [header] + rows
    widths = [max(len(str(row[j])) for row in cells) for j in range(columns)]
    label_width = max((len(label) for label in labels), default=0)
    out = []
    for r, row in enumerate(cells):
        label = "" if r == 0 or index is None else labels[r - 1]
        parts = [str(cell).ljust(widths[j]) if j < left else str(cell).rjust(widths[j]) for j, cell in enumerate(row)]
        prefix = (label.ljust(label_width) + " ") if index is not None else " "
        out.append((prefix + " ".join(parts)).rstrip())
    return out
