"""The formula front end (rf.lmer, rf.lmer_model): formulas → designs, fits against lme4/nlme,
missing data, prediction, result types and error messages.

Expected numbers come from lme4 1.1-31 (tests/data/formula/lme4_formula_references.json, made by
tests/data/formula/make_references.R) and from the shipped references (reml_fn.datasets). Design
matrices are checked against designs built by hand from their definitions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import reml_fn as rf
from reml_fn import datasets
from reml_fn.design import indicator_codes
from reml_fn.frontend.formula import parse_formula

REFERENCES = json.loads((Path(__file__).parent / "data" / "formula" / "lme4_formula_references.json").read_text())
NA_DATA = Path(__file__).parent / "data" / "formula" / "sleepstudy_na.csv"


def frame(name: str) -> pd.DataFrame:
    """A shipped dataset prepared as the R reference fits prepared it (factor level orders)."""
    data = datasets.load_frame(name)
    if name == "cake":
        data["temperature"] = data["temperature"].astype("category")  # an unordered factor, as in R
    if name == "Machines":  # nlme's Worker is a factor with levels 6, 2, 4, 1, 3, 5
        data["Worker"] = pd.Categorical(data["Worker"], categories=[6, 2, 4, 1, 3, 5])
    if name == "ergoStool":
        data["Subject"] = pd.Categorical(data["Subject"], categories=[8, 5, 4, 9, 6, 3, 7, 1, 2])
    if name == "Orthodont":
        data["Sex"] = pd.Categorical(data["Sex"], categories=["Male", "Female"])
    return data


_FITS: dict = {}


def lmer(formula: str, name: str, **options):
    key = (formula, name, tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in _FITS:
        data = pd.read_csv(NA_DATA) if name == "sleepstudy_na" else frame(name)
        _FITS[key] = rf.lmer(formula, data, **options)
    return _FITS[key]


# ------------------------------------------------------------------------------------ the parser


def test_parser_splits_fixed_and_random_parts():
    parsed = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert (parsed.response, parsed.fixed) == ("Reaction", "Days")
    assert [(t.expression, t.factors) for t in parsed.random] == [("Days", ("Subject",))]
    # No fixed term left: the intercept (lme4's y ~ (1|g)); 0 + … keeps no intercept.
    assert parse_formula("y ~ (1 | g)").fixed == "1"
    assert parse_formula("y ~ 0 + (1 | g)").fixed == "0"
    # A function call's parentheses are not a random term.
    assert parse_formula("y ~ np.log(x) + (1|g)").fixed == "np.log(x)"


def test_parser_expands_double_bar_and_nesting_as_lme4():
    uncorrelated = parse_formula("y ~ x + (1 + x + z || g)").random
    assert [(t.expression, t.factors) for t in uncorrelated] == [("1", ("g",)), ("0 + x", ("g",)), ("0 + z", ("g",))]
    nested = parse_formula("y ~ (1 | a/b/c)").random
    assert [t.factors for t in nested] == [("a",), ("b", "a"), ("c", "b", "a")]
    crossed = parse_formula("y ~ (1 | a) + (1 | b) + (1 | a:b)").random
    assert [t.group for t in crossed] == ["a", "b", "a:b"]


@pytest.mark.parametrize(
    "formula, message",
    [
        ("y ~ x + (1 | g", "unmatched '(' at position 8"),
        ("y ~ x) + (1 | g)", "unmatched ')' at position 5"),
        ("y x + (1 | g)", "exactly one '~'"),
        ("y ~ x + (1 | g + h)", "grouping side of (1 | g + h)"),
        ("y ~ x + ( | g)", "needs covariates left of the bar"),
    ],
)
def test_parser_errors_point_at_the_fault(formula, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_formula(formula)


# ------------------------------------------------------------------------------- designs by hand


def test_cake_interaction_design_is_the_hand_built_treatment_coding():
    data = frame("cake")
    model = rf.lmer_model("angle ~ recipe * temperature + (1 | recipe:replicate)", data)
    reference = REFERENCES["cake_interaction"]
    assert model.x_names == reference["model_matrix_colnames"]
    recipe = data["recipe"].astype(str).to_numpy()
    temperature = data["temperature"].astype(str).to_numpy()
    columns = []
    for name in model.x_names:
        value = np.ones(len(data))
        if name != "(Intercept)":
            for part in name.split(":"):
                if part.startswith("recipe"):
                    value = value * (recipe == part[len("recipe") :])
                else:
                    value = value * (temperature == part[len("temperature") :])
        columns.append(value)
    assert torch.equal(model.X, torch.tensor(np.stack(columns, 1), dtype=torch.float64))
    # The grouping factor recipe:replicate: 45 levels, first factor slowest, replicate numerically.
    (term,) = model.terms
    assert term.group == "recipe:replicate"
    assert list(term.levels) == [f"{r}:{k}" for r in "ABC" for k in range(1, 16)]
    labels = [f"{r}:{k}" for r, k in zip(recipe, data["replicate"])]
    assert [term.levels[c] for c in model.structure["recipe:replicate"].codes.tolist()] == labels


@pytest.mark.parametrize(
    "kind, coding",
    [("sum", {"A": [1, 0], "B": [0, 1], "C": [-1, -1]}), ("helmert", {"A": [-1, -1], "B": [1, -1], "C": [0, 2]})],
)
def test_sum_and_helmert_contrasts_code_as_r(kind, coding):
    data = frame("cake")
    model = rf.lmer_model("angle ~ recipe + temp + (1 | replicate)", data, contrasts={"recipe": kind})
    assert model.x_names == ["(Intercept)", "recipe1", "recipe2", "temp"]
    expected = np.array([coding[r] for r in data["recipe"]], dtype=float)
    assert torch.equal(model.X[:, 1:3], torch.tensor(expected))


def test_uncorrelated_terms_are_separate_scalar_terms():
    model = rf.lmer_model("Reaction ~ Days + (Days || Subject)", frame("sleepstudy"))
    assert [term.name for term in model.terms] == ["Subject", "Subject.1"]
    assert [term.columns for term in model.terms] == [("(Intercept)",), ("Days",)]
    for term in model.terms:
        assert isinstance(model.structure[term.name]["cov"], rf.Scalar)
    days = torch.tensor(frame("sleepstudy")["Days"].to_numpy(), dtype=torch.float64)
    assert torch.equal(model.structure["Subject.1"].covariates[:, 0], days)


def test_nested_terms_are_the_factor_and_the_interaction():
    data = frame("Machines")
    model = rf.lmer_model("score ~ Machine + (1 | Worker/Machine)", data)
    assert [term.group for term in model.terms] == ["Machine:Worker", "Worker"]  # more levels first
    nested = model.terms[0]
    assert list(nested.levels) == REFERENCES["machines_nested"]["ranef_level_order"]["Machine:Worker"]
    codes = model.structure["Machine:Worker"].codes.tolist()
    assert [nested.levels[c] for c in codes] == [f"{m}:{w}" for m, w in zip(data["Machine"], data["Worker"])]


def test_crossed_factors_and_correlated_factor_slopes():
    model = rf.lmer_model("diameter ~ 1 + (1 | plate) + (1 | sample)", frame("Penicillin"))
    assert [(t.group, len(t.levels)) for t in model.terms] == [("plate", 24), ("sample", 6)]
    slopes = rf.lmer_model("score ~ Machine + (0 + Machine | Worker)", frame("Machines"))
    (term,) = slopes.terms
    assert term.columns == ("MachineA", "MachineB", "MachineC")
    assert isinstance(slopes.structure["Worker"]["cov"], rf.Unstructured)


def test_grouping_levels_sort_numbers_as_numbers_everywhere():
    # indicator_codes, Grouped and the formula front end put 10 after 3.
    codes, levels = indicator_codes([1, 2, 10, 3])
    assert levels == ["1", "2", "3", "10"] and codes.tolist() == [0, 1, 3, 2]
    assert rf.Grouped([1, 2, 10, 3]).levels == (1, 2, 3, 10)
    data = pd.DataFrame({"y": [1.0, 2.0, 4.0, 3.0, 5.0, 6.5], "g": [1, 2, 10, 3, 10, 2]})
    (term,) = rf.lmer_model("y ~ 1 + (1 | g)", data).terms
    assert term.levels == ("1", "2", "3", "10")


# --------------------------------------------------------------------------------- lme4's fits


FORMULA_CASES = {
    "sleepstudy_slope": "sleepstudy",
    "sleepstudy_uncorrelated": "sleepstudy",
    "sleepstudy_intercept": "sleepstudy",
    "sleepstudy_no_intercept": "sleepstudy",
    "sleepstudy_log_quadratic": "sleepstudy",
    "cake_interaction": "cake",
    "machines_nested": "Machines",
    "machines_explicit": "Machines",
    "machines_slope": "Machines",
    "ergostool": "ergoStool",
    "penicillin": "Penicillin",
    "sleepstudy_na": "sleepstudy_na",
}


def _options(key: str) -> dict:
    reference = REFERENCES[key]
    kinds = reference.get("contrasts")
    return {"contrasts": {v: k.removeprefix("contr.") for v, k in kinds.items()}} if kinds else {}


def check_against_lme4(m, reference: dict) -> None:
    # REML criterion to 1e-6 (ours at least as good as lme4's optimum, which stops early by ~1e-8).
    assert m.reml_criterion == pytest.approx(
        reference["reml_criterion"], abs=1e-6 * max(1.0, abs(reference["reml_criterion"]))
    )
    assert m.reml_criterion <= reference["reml_criterion"] + 1e-7
    assert m.loglik == pytest.approx(reference["loglik"], abs=1e-6 * abs(reference["loglik"]))
    assert m.aic == pytest.approx(reference["aic"], abs=1e-5 * abs(reference["aic"]))
    assert m.bic == pytest.approx(reference["bic"], abs=1e-5 * abs(reference["bic"]))
    assert m.nobs == reference["nobs"]
    assert m.ngroups == reference["ngroups"]
    fixef = m.fixef()
    assert list(fixef.index) == list(reference["fixef"])
    np.testing.assert_allclose(fixef.to_numpy(), list(reference["fixef"].values()), rtol=1e-5, atol=1e-8)
    # vcov depends on θ̂, where lme4 stops ~1e-4 relative early on flat surfaces (machines_slope).
    np.testing.assert_allclose(m.vcov().to_numpy(), np.array(reference["vcov_beta"]), rtol=1e-3, atol=1e-8)
    ours = m.varcorr()
    theirs = pd.DataFrame(reference["varcorr"])
    assert ours["grp"].tolist() == theirs["grp"].tolist()
    assert ours["var1"].fillna("").tolist() == theirs["var1"].fillna("").tolist()
    assert ours["var2"].fillna("").tolist() == theirs["var2"].fillna("").tolist()
    # lme4 prints 4-5 digits; its optimizer stops ~1e-6 relative from the optimum.
    np.testing.assert_allclose(ours["vcov"].to_numpy(), theirs["vcov"].to_numpy(), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(ours["sdcor"].to_numpy(), theirs["sdcor"].to_numpy(), rtol=2e-4, atol=1e-6)
    ranef = m.ranef()
    for group, block in reference["ranef"].items():
        assert list(ranef[group].columns) == block["columns"]
        assert list(ranef[group].index) == reference["ranef_level_order"][group]
        np.testing.assert_allclose(
            ranef[group].loc[block["levels"]].to_numpy(), np.array(block["values"]), rtol=2e-4, atol=1e-5
        )
    np.testing.assert_allclose(m.fitted().to_numpy()[:6], reference["fitted_head"], rtol=1e-6)
    np.testing.assert_allclose(m.residuals().to_numpy()[:6], reference["residuals_head"], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("key", sorted(FORMULA_CASES))
def test_lmer_reproduces_lme4(key):
    reference = REFERENCES[key]
    m = lmer(reference["formula"], FORMULA_CASES[key], **_options(key))
    assert m.converged, m.message
    check_against_lme4(m, reference)


@pytest.mark.parametrize("key", ["cake_sum", "cake_helmert"])
def test_lmer_contrasts_reproduce_lme4(key):
    reference = REFERENCES[key]
    m = rf.lmer(reference["formula"], frame("cake"), **_options(key))
    check_against_lme4(m, reference)


def test_nested_and_explicit_interaction_are_the_same_fit():
    nested = lmer(REFERENCES["machines_nested"]["formula"], "Machines")
    explicit = lmer(REFERENCES["machines_explicit"]["formula"], "Machines")
    assert nested.reml_criterion == pytest.approx(explicit.reml_criterion, abs=1e-9)


# Shipped references (lme4 and nlme) through formulas.


def test_sleepstudy_saved_lme4_fits_through_formulas():
    saved = datasets.references("sleepstudy")["lme4_saved_fits"]
    for fit_name, formula in [
        ("fit_sleepstudy_0", "Reaction ~ 1 + (1|Subject)"),
        ("fit_sleepstudy_1", "Reaction ~ Days + (1|Subject)"),
        ("fit_sleepstudy_2", "Reaction ~ Days + (Days|Subject)"),
        ("fit_sleepstudy_3", "Reaction ~ Days + (1|Subject) + (0+Days|Subject)"),
        ("fit_sleepstudy_3", "Reaction ~ Days + (Days||Subject)"),
    ]:
        reference = saved[fit_name]
        m = lmer(formula, "sleepstudy")
        assert m.reml_criterion == pytest.approx(reference["REML_criterion"], rel=1e-9), formula
        np.testing.assert_allclose(m.fixef().to_numpy(), reference["beta"], rtol=1e-8)
        assert m.sigma == pytest.approx(reference["sigmaREML"], rel=1e-4)


def test_dyestuff_rail_orthodont_oxboys_dietox_through_formulas():
    dyestuff = datasets.references("Dyestuff")["REML"]
    m = lmer("Yield ~ 1 + (1|Batch)", "Dyestuff")
    assert m.reml_criterion == pytest.approx(dyestuff["REML_criterion"], rel=1e-9)
    assert m.sigma == pytest.approx(dyestuff["sigma_bobyqa_comment"], rel=1e-6)

    rail = datasets.references("Rail")["REML"]
    m = lmer("travel ~ 1 + (1|Rail)", "Rail")
    assert m.loglik == pytest.approx(rail["logLik"], abs=5e-4)
    assert m.varcorr()["sdcor"].tolist() == pytest.approx([rail["sd_Rail"], rail["sigma"]], abs=5e-4)

    orthodont = datasets.references("Orthodont")["REML_age_slope"]
    m = lmer("distance ~ age + (age|Subject)", "Orthodont")
    np.testing.assert_allclose(m.fixef().to_numpy(), orthodont["beta"], rtol=1e-7)
    vc = m.varcorr()
    np.testing.assert_allclose(
        vc["sdcor"].to_numpy(), [*orthodont["sd"], orthodont["cor"], orthodont["sigma"]], rtol=2e-4
    )
    # With Sex a factor with R's level order (Male, Female), the coefficient is SexFemale.
    m = lmer("distance ~ age * Sex + (age|Subject)", "Orthodont")
    assert m.fixef().index.tolist() == ["(Intercept)", "age", "SexFemale", "age:SexFemale"]

    oxboys = datasets.references("Oxboys")["REML"]
    m = lmer("height ~ age + (age|Subject)", "Oxboys")
    np.testing.assert_allclose(m.fixef().to_numpy(), oxboys["beta"], rtol=1e-8)
    assert m.loglik == pytest.approx(oxboys["logLik_printed"], abs=5e-4)

    dietox = datasets.references("dietox")["REML_slope"]
    m = lmer("Weight ~ Time + (Time|Pig)", "dietox")
    np.testing.assert_allclose(m.fixef().to_numpy(), dietox["beta"], rtol=1e-6)
    assert m.loglik == pytest.approx(dietox["logLik"], abs=5e-4)


def test_no_intercept_categorical_and_c_designs():
    cake = frame("cake")
    model = rf.lmer_model("angle ~ recipe - 1 + (1 | replicate)", cake)
    assert model.x_names == ["recipeA", "recipeB", "recipeC"]
    expected = np.stack([(cake["recipe"] == r).to_numpy(dtype=float) for r in "ABC"], 1)
    assert torch.equal(model.X, torch.tensor(expected))
    model = rf.lmer_model("Reaction ~ C(Days) + (1 | Subject)", frame("sleepstudy"))
    assert model.x_names == ["(Intercept)", *[f"C(Days){d}" for d in range(1, 10)]]
    days = frame("sleepstudy")["Days"].to_numpy()
    assert torch.equal(model.X[:, 1:], torch.tensor(np.stack([(days == d) * 1.0 for d in range(1, 10)], 1)))


def test_float_group_labels_print_as_r_prints_them():
    data = frame("sleepstudy").assign(Subject=lambda d: d["Subject"].astype(float))
    (term,) = rf.lmer_model("Reaction ~ Days + (1 | Subject)", data).terms
    assert term.levels[:2] == ("308", "309")


def test_dietox_intercept_through_a_formula():
    dietox = datasets.references("dietox")["REML_intercept"]
    m = lmer("Weight ~ Time + (1|Pig)", "dietox")
    np.testing.assert_allclose(m.fixef().to_numpy(), dietox["beta"], rtol=1e-6)
    assert m.varcorr()["vcov"].tolist() == pytest.approx([dietox["var_Pig"], dietox["sigma2"]], rel=2e-4)


# statsmodels' lme sets: correlated random effects (drf) in every set, uncorrelated (irf, lme4's ||) in 6–11.
STATSMODELS_CASES = [(k, "reml_drf", "|") for k in range(12)] + [(k, "reml_irf", "||") for k in range(6, 12)]


@pytest.mark.parametrize("number, kind, bar", STATSMODELS_CASES)
def test_statsmodels_lme_sets_through_formulas(number, kind, bar):
    data = datasets.load_frame(f"statsmodels_lme/lme{number:02d}")
    fixed = " + ".join(sorted(c for c in data if c.startswith("exog_fe_")))
    random = " + ".join(sorted(c for c in data if c.startswith("exog_re_")))
    reference = datasets.statsmodels_references()[f"lme{number:02d}"][kind]
    m = rf.lmer(f"endog ~ 0 + {fixed} + (0 + {random} {bar} groups)", data)
    np.testing.assert_allclose(m.fixef().to_numpy(), reference["coef"], rtol=2e-6, atol=1e-7)
    assert m.loglik == pytest.approx(reference["loglike"][0], abs=5e-4)
    assert m.sigma**2 == pytest.approx(reference["scale"][0], rel=2e-4)


# ---------------------------------------------------------------------------- missing data


def test_missing_rows_are_dropped_and_counted():
    m = lmer("Reaction ~ Days + (Days | Subject)", "sleepstudy_na")
    assert m.model.n_dropped == 3 and m.nobs == 177
    assert "3 observations deleted due to missingness" in m.summary()
    assert 0 not in m.fitted().index and 4 not in m.fitted().index and 9 not in m.fitted().index
    with pytest.raises(ValueError, match=r"missing values in \{'Reaction': 2, 'Days': 1\}"):
        rf.lmer("Reaction ~ Days + (Days | Subject)", pd.read_csv(NA_DATA), na_action="raise")


def test_missing_group_labels_are_dropped_never_a_group():
    data = frame("sleepstudy").astype({"Subject": object})
    data.loc[[3, 50], "Subject"] = np.nan
    model = rf.lmer_model("Reaction ~ Days + (1 | Subject)", data)
    assert model.n_dropped == 2 and model.nobs == 178
    assert len(model.terms[0].levels) == 18 and "nan" not in model.terms[0].levels


# ------------------------------------------------------------------------------------ prediction


def test_predict_on_new_data_as_lme4():
    reference = REFERENCES["sleepstudy_predict"]
    m = lmer(reference["formula"], "sleepstudy")
    newdata = pd.DataFrame(reference["newdata"])
    np.testing.assert_allclose(
        m.predict(newdata, allow_new_levels=True), reference["allow_new_levels"]["values"], rtol=1e-6
    )
    np.testing.assert_allclose(m.predict(newdata, re_form=False), reference["re_form_NA"]["values"], rtol=1e-7)
    known = newdata.iloc[[0, 1, 3]]
    np.testing.assert_allclose(m.predict(known), reference["known_levels"]["values"], rtol=1e-6)
    zero = pd.DataFrame(reference["re_form_zero"]["newdata"])
    np.testing.assert_allclose(m.predict(zero, re_form="~0"), reference["re_form_zero"]["values"], rtol=1e-7)
    with pytest.raises(ValueError, match=r"new levels of 'Subject' in newdata: \['999'\]"):
        m.predict(newdata)
    # Numbers and their labels are the same level (sleepstudy's Subject is read as numbers).
    np.testing.assert_allclose(
        m.predict(known.assign(Subject=[308, 309, 308])), reference["known_levels"]["values"], rtol=1e-6
    )
    # Default: the fitted values.
    assert m.predict().equals(m.fitted().rename("predict"))


def test_predict_reports_unknown_fixed_factor_levels():
    m = lmer("effort ~ Type + (1 | Subject)", "ergoStool")
    with pytest.raises(ValueError, match="newdata: cannot build the fixed effects"):
        m.predict(pd.DataFrame({"Type": ["T9"], "Subject": [1]}))


# ------------------------------------------------------------------------------ result objects


def test_result_types_and_names():
    m = lmer("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    assert isinstance(m.fixef(), pd.Series) and list(m.fixef().index) == ["(Intercept)", "Days"]
    assert list(m.varcorr().columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    ranef = m.ranef()
    assert list(ranef) == ["Subject"] and ranef["Subject"].shape == (18, 2)
    assert list(ranef["Subject"].index[:3]) == ["308", "309", "310"]
    coef = m.coef()["Subject"]
    np.testing.assert_allclose(coef.to_numpy(), ranef["Subject"].to_numpy() + m.fixef().to_numpy(), rtol=1e-12)
    assert isinstance(m.fitted(), pd.Series) and len(m.fitted()) == 180
    np.testing.assert_allclose(m.fitted() + m.residuals(), frame("sleepstudy")["Reaction"], rtol=1e-12)
    summary = m.summary()
    for text in [
        "REML criterion at convergence: 1743.628",
        "Subject  (Intercept)",
        "Number of obs: 180, groups:  Subject, 18",
        "Correlation of Fixed Effects:",
        "Days -0.138",
    ]:
        assert text in summary, summary
    assert rf.param_names(m.model.structure) == list(m.fit.names)


def test_model_parts_feed_fit_batched():
    model = rf.lmer_model("Reaction ~ Days + (Days | Subject)", frame("sleepstudy"))
    Y = model.y + torch.zeros(3, model.nobs, dtype=torch.float64)
    batched = rf.fit_batched(model.structure, Y, model.X)
    single = model.fit()
    np.testing.assert_allclose(batched.loglik.numpy(), [single.loglik] * 3, rtol=1e-12)


def test_simulate_draws_from_the_fitted_model():
    m = lmer("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    first, again = m.simulate(3, seed=7), m.simulate(3, seed=7)
    assert first.shape == (180, 3) and list(first.columns) == ["sim_1", "sim_2", "sim_3"]
    assert first.equals(again)
    # Moments: mean Xβ̂, covariance of one subject's 10 rows Z Σ̂ Zᵀ + σ̂² I (closed form).
    draws = m.simulate(4000, seed=1).to_numpy()[:10]
    days = np.arange(10.0)
    Z = np.stack([np.ones(10), days], 1)
    vc = m.varcorr()["vcov"].to_numpy()
    sigma = np.array([[vc[0], vc[2]], [vc[2], vc[1]]])
    V = Z @ sigma @ Z.T + vc[3] * np.eye(10)
    mean = m.fixef().to_numpy() @ Z.T
    error = np.abs(draws.mean(1) - mean)
    assert (error <= 4 * np.sqrt(np.diag(V) / 4000)).all(), (error, np.sqrt(np.diag(V) / 4000))
    np.testing.assert_allclose(np.cov(draws), V, rtol=0.12, atol=0.12 * V.max())


# -------------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    "formula, message",
    [
        ("Reaction ~ Dayz + (1 | Subject)", "the fixed effects of .*: column 'Dayz' not in data"),
        ("Reaction ~ Days + (Dayz | Subject)", r"the random term \(Dayz \| Subject\): column 'Dayz' not in data"),
        ("Reaction ~ Days + (1 | Subj)", r"grouping factor 'Subj' of the random term \(1 \| Subj\) is not a column"),
        ("Reactio ~ Days + (1 | Subject)", "the response 'Reactio': column 'Reactio' not in data"),
        ("Reaction ~ Days", "has no random-effects term"),
        ("Reaction ~ Days + (1 | One)", r"grouping factor 'One' of the random term \(1 \| One\) has 1 level"),
        ("Reaction ~ Days + (1 | Row)", "as many levels"),
    ],
)
def test_errors_name_the_column_or_term(formula, message):
    data = frame("sleepstudy").assign(One="a", Row=np.arange(180))
    with pytest.raises(ValueError, match=message):
        rf.lmer(formula, data)


def test_other_argument_errors():
    data = frame("sleepstudy")
    with pytest.raises(ValueError, match="contrasts name \\['Sex'\\]"):
        rf.lmer_model("Reaction ~ Days + (1 | Subject)", data, contrasts={"Sex": "sum"})
    with pytest.raises(ValueError, match="expected one of 'treatment', 'sum'"):
        rf.lmer_model("Reaction ~ Days + (1 | Subject)", data, contrasts={"Days": "deviation"})
    with pytest.raises(ValueError, match="na_action must be"):
        rf.lmer_model("Reaction ~ Days + (1 | Subject)", data, na_action="pass")
    with pytest.raises(TypeError, match="REML must be True or False"):
        rf.lmer("Reaction ~ Days + (1 | Subject)", data, REML="no")
    with pytest.raises(TypeError, match="pandas DataFrame"):
        rf.lmer("Reaction ~ Days + (1 | Subject)", [1, 2, 3])


def test_dict_data_and_string_levels():
    data = frame("sleepstudy")
    as_dict = {column: data[column].to_numpy() for column in data}
    as_dict["Subject"] = as_dict["Subject"].astype(str)
    m = rf.lmer("Reaction ~ Days + (Days | Subject)", as_dict)
    assert m.reml_criterion == pytest.approx(REFERENCES["sleepstudy_slope"]["reml_criterion"], rel=1e-9)
    assert math.isfinite(m.aic)


def test_frames_with_to_pandas_are_converted():
    class Frame:  # what a polars DataFrame offers
        def __init__(self, data):
            self.data = data

        def to_pandas(self):
            return self.data

    m = rf.lmer("Reaction ~ Days + (Days | Subject)", Frame(frame("sleepstudy")))
    assert m.reml_criterion == pytest.approx(REFERENCES["sleepstudy_slope"]["reml_criterion"], rel=1e-9)


def test_formulaic_syntax_errors_name_the_part_and_carry_no_terminal_codes():
    with pytest.raises(ValueError, match=r"the fixed effects of .*cannot parse 'Days \*'") as caught:
        rf.lmer_model("Reaction ~ Days * (1|Subject)", frame("sleepstudy"))
    assert "\x1b" not in str(caught.value)


def test_lazy_front_end_names_are_the_front_end_s_public_names():
    """`import reml_fn` lists the front end's names without importing it (pandas, formulaic): every
    listed name is the front end's and resolves to it, and the front end's other public names are
    the ones kept under `reml_fn.frontend` on purpose (types and a helper), so the lists cannot drift."""
    import reml_fn
    from reml_fn import frontend

    assert set(reml_fn._FRONTEND) <= set(frontend.__all__)
    assert set(frontend.__all__) - set(reml_fn._FRONTEND) == {"Bootstrap", "TermInfo", "parameter_names"}
    for name in reml_fn._FRONTEND:
        assert getattr(rf, name) is getattr(frontend, name)
