"""Inference: ML fits, anova, Satterthwaite df (coef_table, contest), Wald and bootstrap intervals.

Expected numbers: lme4 1.1-31, lmerTest 3.1-3 and pbkrtest 0.5.2 in R 4.2.2, stored in
tests/data/inference/inference_references.json (made by tests/data/inference/make_references.R).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import reml_fn as rf
from reml_fn import datasets

REFERENCES = json.loads((Path(__file__).parent / "data" / "inference" / "inference_references.json").read_text())
DATA = {
    "sleepstudy": "sleepstudy",
    "Dyestuff": "Dyestuff",
    "Machines": "Machines",
    "Penicillin": "Penicillin",
    "cake": "cake",
}


def frame(name: str) -> pd.DataFrame:
    data = datasets.load_frame(name)
    if name == "cake":
        data["temperature"] = data["temperature"].astype("category")
    return data


def dataset_of(formula: str) -> str:
    for word, name in [
        ("Reaction", "sleepstudy"),
        ("Yield", "Dyestuff"),
        ("score", "Machines"),
        ("diameter", "Penicillin"),
        ("angle", "cake"),
    ]:
        if formula.startswith(word):
            return name
    raise KeyError(formula)


_FITS: dict = {}


def lmer(formula: str, REML: bool = True):  # noqa: N803
    key = (formula, REML)
    if key not in _FITS:
        _FITS[key] = rf.lmer(formula, frame(dataset_of(formula)), REML=REML)
    return _FITS[key]


def table(block: dict) -> pd.DataFrame:
    """A stored R table ({rownames, columns, <column>: values}) as a DataFrame (null → NaN)."""
    return pd.DataFrame(
        {c: [np.nan if v is None else v for v in block[c]] for c in block["columns"]}, index=block["rownames"]
    )


# ------------------------------------------------------------------------------------------ ML


@pytest.mark.parametrize("key", sorted(REFERENCES["ml_fits"]))
def test_ml_fits_equal_lme4(key):
    reference = REFERENCES["ml_fits"][key]
    m = lmer(reference["formula"], REML=False)
    assert m.converged and not m.reml
    assert m.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    assert m.loglik >= reference["logLik"] - 1e-9  # at least lme4's optimum
    assert m.deviance == pytest.approx(reference["deviance"], abs=2e-6)
    assert m.aic == pytest.approx(reference["AIC"], abs=2e-6) and m.bic == pytest.approx(reference["BIC"], abs=2e-6)
    # lme4's printed digits (its ML optimum of Reaction ~ 1 + (Days | Subject) is 1.3e-6 off in β).
    np.testing.assert_allclose(m.fixef().to_numpy(), list(reference["fixef"].values()), rtol=1e-5)
    ours, theirs = m.varcorr(), pd.DataFrame(reference["varcorr"])
    assert ours["grp"].tolist() == theirs["grp"].tolist()
    np.testing.assert_allclose(ours["sdcor"].to_numpy(), theirs["sdcor"].to_numpy(), rtol=2e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no REML criterion"):
        _ = m.reml_criterion
    assert "fit by maximum likelihood" in m.summary()


def test_ml_batched_equals_single_and_score_is_the_gradient():
    model = rf.lmer_model("Reaction ~ Days + (Days | Subject)", frame("sleepstudy"))
    Y = torch.stack([model.y, model.y * 1.1 + 3.0])
    batched = rf.fit_batched(model.structure, Y, model.X, REML=False)
    for b in range(2):
        single = rf.fit(model.structure, Y[b], model.X, REML=False)
        assert float(batched.loglik[b]) == pytest.approx(float(single.loglik), abs=1e-8)
    theta = torch.tensor([3.0, 0.4, 1.5, 3.1], dtype=torch.float64)
    for engine in ("dense", "mme"):
        grad = torch.func.grad(lambda t, e=engine: rf.ml_loglik(model.structure, t, model.y, model.X, engine=e))(theta)
        terms = rf.ml_ai_terms(model.structure, theta, model.y, model.X, engine=engine)
        torch.testing.assert_close(terms.score, grad, rtol=1e-9, atol=1e-10)


def test_forward_and_reverse_derivatives_of_vcov_agree():
    # torch.cholesky_inverse's forward-mode derivative is wrong; the engines avoid it.
    model = rf.lmer_model("Reaction ~ Days + (Days | Subject)", frame("sleepstudy"))
    theta = torch.tensor([3.0, 0.4, 1.5, 3.1], dtype=torch.float64)
    for engine in ("dense", "mme"):

        def vcov(t, engine=engine):
            return rf.vcov_beta(model.structure, t, model.y, model.X, engine=engine)

        torch.testing.assert_close(torch.func.jacfwd(vcov)(theta), torch.func.jacrev(vcov)(theta))


# --------------------------------------------------------------------------------------- anova


@pytest.mark.parametrize("key", sorted(REFERENCES["anova_lrt"]))
def test_anova_equals_lme4(key):
    reference = REFERENCES["anova_lrt"][key]
    refit = "refit = FALSE" not in reference["fitted_with"]
    m0, m1 = lmer(reference["m0"]), lmer(reference["m1"])
    ours = rf.anova(m0=m0, m1=m1, refit=refit)
    theirs = table(reference["table"])
    assert list(ours.columns) == list(theirs.columns) and list(ours.index) == list(theirs.index)
    assert ours["npar"].tolist() == theirs["npar"].tolist()
    np.testing.assert_allclose(ours["Df"].to_numpy()[1:], theirs["Df"].to_numpy()[1:])
    for column in ["AIC", "BIC", "logLik", "deviance"]:
        np.testing.assert_allclose(ours[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(ours["Chisq"].to_numpy()[1:], theirs["Chisq"].to_numpy()[1:], rtol=1e-6)
    np.testing.assert_allclose(ours["Pr(>Chisq)"].to_numpy()[1:], theirs["Pr(>Chisq)"].to_numpy()[1:], rtol=1e-5)


def test_anova_refuses_what_lme4_refuses():
    m0, m1 = lmer("Reaction ~ 1 + (Days | Subject)"), lmer("Reaction ~ Days + (Days | Subject)")
    with pytest.raises(ValueError, match="different fixed effects"):
        rf.anova(m0, m1, refit=False)
    other = rf.lmer("Reaction ~ Days + (1 | Subject)", frame("sleepstudy").iloc[:170])
    with pytest.raises(ValueError, match="not fitted to the same responses"):
        rf.anova(m1, other)
    with pytest.raises(ValueError, match="at least two"):
        rf.anova(m1)


# ---------------------------------------------------------------------------- Satterthwaite df


@pytest.mark.parametrize("key", sorted(REFERENCES["lmertest_coefficients"]))
def test_satterthwaite_table_equals_lmertest(key):
    reference = REFERENCES["lmertest_coefficients"][key]
    ours = lmer(reference["formula"]).coef_table(ddf="satterthwaite")
    theirs = table(reference["coefficients_satterthwaite"])
    assert list(ours.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    assert list(ours.index) == list(theirs.index)
    for column in ["Estimate", "Std. Error", "df", "t value"]:
        np.testing.assert_allclose(ours[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4)
    check_p_values(ours["Pr(>|t|)"], theirs["Pr(>|t|)"])


def check_p_values(ours, theirs) -> None:
    """p to 1e-4 relative; in the far tail (p < 1e-4) to 5e-3: there p ∝ |t|^(−df) moves ≈ log|t|
    times as much as df, and lmerTest's df carry its numerical Hessian's error (sleepstudy:
    16.9997 against the exact 17)."""
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    rtol = np.where(theirs < 1e-4, 5e-3, 1e-4)
    assert (np.abs(ours - theirs) <= rtol * theirs).all(), (ours, theirs)


def test_contest_equals_lmertest():
    reference = REFERENCES["lmertest_contest"]
    m = lmer("score ~ Machine + (1 | Worker/Machine)")
    joint = m.contest(reference["L_joint"])
    theirs = table(reference["joint_satterthwaite"])
    for column in ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value"]:
        np.testing.assert_allclose(joint[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4)
    check_p_values(joint["Pr(>F)"], theirs["Pr(>F)"])
    single = m.contest([reference["L_single"]], joint=False)
    theirs = table(reference["single_1d_satterthwaite"])
    for column in ["Estimate", "Std. Error", "df", "t value", "lower", "upper"]:
        np.testing.assert_allclose(single[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4)
    check_p_values(single["Pr(>|t|)"], theirs["Pr(>|t|)"])


@pytest.mark.parametrize("key", sorted(REFERENCES["lmertest_coefficients"]))
def test_kenward_roger_table_equals_lmertest(key):
    reference = REFERENCES["lmertest_coefficients"][key]
    ours = lmer(reference["formula"]).coef_table(ddf="kenward-roger")
    theirs = table(reference["coefficients_kenward_roger"])
    np.testing.assert_allclose(ours["df"].to_numpy(), theirs["df"].to_numpy(), rtol=1e-4)
    for column in ["Estimate", "Std. Error", "t value"]:
        np.testing.assert_allclose(ours[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4)
    check_p_values(ours["Pr(>|t|)"], theirs["Pr(>|t|)"])


def test_kenward_roger_contest_and_adjusted_vcov_equal_pbkrtest():
    reference = REFERENCES["lmertest_contest"]
    m = lmer("score ~ Machine + (1 | Worker/Machine)")
    joint = m.contest(reference["L_joint"], ddf="kenward-roger")
    theirs = table(reference["joint_kenward_roger"])
    for column in ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value"]:
        np.testing.assert_allclose(joint[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4)
    single = m.contest([reference["L_single"]], ddf="kenward-roger", joint=False)
    theirs = table(reference["single_1d_kenward_roger"])
    for column in ["Estimate", "Std. Error", "df", "t value", "lower", "upper"]:
        np.testing.assert_allclose(single[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4)
    adjusted = REFERENCES["vcovAdj"]["sleepstudy_slopes"]["vcovAdj"]["rows"]
    parts = rf.frontend.inference._kenward_roger(lmer("Reaction ~ Days + (Days | Subject)"))
    np.testing.assert_allclose(parts.vcov_adjusted.numpy(), np.array(adjusted), rtol=2e-5)


def test_ddf_none_and_what_is_not_available_yet():
    m = lmer("Reaction ~ Days + (Days | Subject)")
    assert list(m.coef_table(ddf="none").columns) == ["Estimate", "Std. Error", "t value"]
    with pytest.raises(ValueError, match="REML fits"):
        lmer("Reaction ~ Days + (Days | Subject)", REML=False).coef_table(ddf="kenward-roger")
    with pytest.raises(ValueError, match="ddf must be one of"):
        m.coef_table(ddf="containment")
    with pytest.raises(ValueError, match="method must be"):
        m.confint(method="likelihood")


# ------------------------------------------------------------------------------------ intervals


def test_wald_intervals_equal_lme4():
    reference = table(REFERENCES["confint"]["sleepstudy_reml_wald"])
    ours = lmer("Reaction ~ Days + (Days | Subject)").confint(method="wald")
    assert list(ours.index) == list(reference.index) and list(ours.columns) == list(reference.columns)
    assert ours.iloc[:4].isna().all().all()
    # Exact formula; the difference is lme4's θ̂ stopping ~1e-6 short of the optimum.
    np.testing.assert_allclose(ours.iloc[4:].to_numpy(), reference.iloc[4:].to_numpy(), rtol=1e-6)
    assert rf.frontend.parameter_names(lmer("Reaction ~ Days + (Days | Subject)"))["kind"].tolist() == [
        "sd",
        "cor",
        "sd",
        "sd",
    ]


def test_bootstrap_is_deterministic_and_equals_one_by_one_refits():
    m = lmer("Reaction ~ Days + (Days | Subject)")
    first, again = rf.bootstrap(m, 20, seed=3), rf.bootstrap(m, 20, seed=3)
    pd.testing.assert_frame_equal(first.replicates, again.replicates)
    simulated = m.simulate(20, seed=3)
    for b in (0, 7):
        y = torch.tensor(simulated.iloc[:, b].to_numpy(), dtype=torch.float64)
        single = rf.fit(m.model.structure, y, m.model.X)
        np.testing.assert_allclose(first.replicates.iloc[b][["(Intercept)", "Days"]], single.beta.numpy(), rtol=1e-8)
        sigma = float(single.natural["residual"]["sigma^2"]) ** 0.5
        assert first.replicates.iloc[b][".sigma"] == pytest.approx(sigma, rel=1e-8)
    # The bootstrap intervals cover lme4's estimates and have lme4's layout.
    intervals = rf.confint(m, method="boot", nsim=200, seed=1)
    assert list(intervals.index) == [".sig01", ".sig02", ".sig03", ".sigma", "(Intercept)", "Days"]
    estimates = pd.concat([rf.frontend.inference.sdcor(m), m.fixef()])
    assert ((intervals["2.5 %"] < estimates) & (estimates < intervals["97.5 %"])).all()


def test_bootstrap_statistic():
    m = lmer("Reaction ~ Days + (Days | Subject)")
    boot = rf.bootstrap(m, 10, seed=2, statistic=lambda t: t[["Days"]] * 2)
    assert list(boot.replicates.columns) == ["Days"] and boot.estimate["Days"] == pytest.approx(2 * m.fixef()["Days"])


PROFILES = [
    ("sleepstudy_reml_profile", "Reaction ~ Days + (Days | Subject)", True),
    ("sleepstudy_ml_profile", "Reaction ~ Days + (Days | Subject)", False),
    ("dyestuff_reml_profile", "Yield ~ 1 + (1 | Batch)", True),
    ("machines_nested_reml_profile", "score ~ Machine + (1 | Worker/Machine)", True),
]


@pytest.mark.parametrize("key, formula, reml", PROFILES)
def test_profile_intervals_equal_lme4(key, formula, reml):
    reference = table(REFERENCES["confint"][key])
    ours = lmer(formula, REML=reml).confint(method="profile")
    assert list(ours.index) == list(reference.index) and list(ours.columns) == list(reference.columns)
    # lme4 interpolates its profile with splines; the ends here are roots of ζ to 1e-6.
    np.testing.assert_allclose(ours.to_numpy(), reference.to_numpy(), rtol=1e-3)


def test_profile_of_a_reml_fit_is_that_of_its_ml_fit():
    # lme4 profiles the ML deviance for a REML fit too (sleepstudy: .sig01 14.3814–37.7160 either way).
    reml = lmer("Reaction ~ Days + (Days | Subject)").confint(method="profile")
    ml = lmer("Reaction ~ Days + (Days | Subject)", REML=False).confint(method="profile")
    np.testing.assert_allclose(reml.to_numpy(), ml.to_numpy(), rtol=1e-6)
