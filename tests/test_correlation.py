"""Correlated and heteroscedastic residuals within groups (WithinGroup, rf.gls, lmer(correlation=,
weights=)) against nlme 3.1-162 (tests/data/correlation/nlme_references.json, made by
tests/data/correlation/make_references.R), on full data and on subsets with 15 % of the rows
removed at random (unbalanced groups).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn import datasets
from reml_fn.testing import assert_jacobian_matches

REFERENCES = json.loads((Path(__file__).parent / "data" / "correlation" / "nlme_references.json").read_text())["models"]

OVARY = "follicles ~ np.sin(2*np.pi*Time) + np.cos(2*np.pi*Time)"


def frame(name: str, rows: list[int] | None) -> pd.DataFrame:
    data = datasets.load_frame(name)
    if name == "BodyWeight":
        data["Diet"] = data["Diet"].astype("category")
    return data if rows is None else data.iloc[[r - 1 for r in rows]]


# key: (dataset, function, formula, correlation, weights)
CASES = {
    "orthodont_cs": ("Orthodont", "gls", "distance ~ age", rf.cor_cs(group="Subject"), None),
    "orthodont_ar1_lme": ("Orthodont", "lmer", "distance ~ age + (1 | Subject)", rf.cor_ar1(group="Subject"), None),
    "ovary_ar1": ("Ovary", "lmer", OVARY + " + (1 | Mare)", rf.cor_ar1(group="Mare"), None),
    "bodyweight_car1": (
        "BodyWeight",
        "lmer",
        "weight ~ Time * Diet + (Time | Rat)",
        rf.cor_car1(group="Rat", time="Time"),
        None,
    ),
    "orthodont_varident": ("Orthodont", "lmer", "distance ~ age + (1 | Subject)", None, rf.var_ident(by="Sex")),
    "orthodont_exp_gls": ("Orthodont", "gls", "distance ~ age", rf.cor_exp(group="Subject", time="age"), None),
    "orthodont_exp_nugget_gls": (
        "Orthodont",
        "gls",
        "distance ~ age",
        rf.cor_exp(group="Subject", time="age", nugget=True),
        None,
    ),
    "orthodont_gaus_gls": ("Orthodont", "gls", "distance ~ age", rf.cor_gaus(group="Subject", time="age"), None),
    "orthodont_symm": ("Orthodont", "gls", "distance ~ age", rf.cor_symm(group="Subject"), None),
}
CASES |= {
    f"{key}_subset": CASES[key]
    for key in ("orthodont_cs", "orthodont_ar1_lme", "ovary_ar1", "bodyweight_car1", "orthodont_varident")
}

# nlme's names of the residual parameters, and ours.
PARAMETER = {"Rho": "rho", "Phi": "phi", "range": "range", "nugget": "nugget", "Male": "ratio_Male"}


@pytest.mark.parametrize("key", sorted(CASES))
def test_fits_equal_nlme(key):
    reference = REFERENCES[key]
    name, function, formula, correlation, weights = CASES[key]
    fit = rf.gls if function == "gls" else rf.lmer
    m = fit(formula, frame(name, reference.get("rows")), correlation=correlation, weights=weights)
    assert m.converged, m.message
    assert m.nobs == reference["nobs"]
    # REML logLik to 1e-6 (at least nlme's optimum), β and the parameters to nlme's precision.
    assert m.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    assert m.loglik >= reference["logLik"] - 1e-8
    np.testing.assert_allclose(m.fixef().to_numpy(), list(reference["fixef"].values()), rtol=1e-5, atol=1e-7)
    assert m.sigma == pytest.approx(reference["sigma"], rel=1e-4)
    ours = m.residual_parameters()
    for struct in ("corStruct", "varStruct"):
        if struct in reference:
            natural = reference[struct]["natural"]
            if isinstance(natural, list):  # corSymm: unnamed, in nlme's pair order
                natural = {f"cor{pair}": value for pair, value in zip(reference["corSymm_pairs"], natural)}
            for their_name, value in natural.items():
                # nlme calls both AR(1) parameters Phi; ours: rho (by position), phi (continuous time).
                mine = (
                    "rho"
                    if their_name == "Phi" and correlation.kind == "ar1"
                    else PARAMETER.get(their_name, their_name)
                )
                assert ours[mine] == pytest.approx(value, rel=2e-4, abs=1e-6), their_name
    if "random" in reference:
        sd = m.varcorr()
        random = sd[sd["grp"] != "Residual"]
        variances = random[random["var2"].isna()]["sdcor"].to_numpy()
        np.testing.assert_allclose(variances, list(reference["random"]["sd"].values()), rtol=2e-4)


def test_nlme_ar1_is_by_position_after_rows_are_removed():
    # With rows removed, neighbouring remaining rows are lag 1 (nlme's corAR1(form = ~ 1 | g)):
    # the same rows fitted with car1 on the visit ages (lags of 2 years) give another answer.
    reference = REFERENCES["orthodont_ar1_lme_subset"]
    data = frame("Orthodont", reference["rows"])
    by_position = rf.lmer("distance ~ age + (1 | Subject)", data, correlation=rf.cor_ar1(group="Subject"))
    by_time = rf.lmer("distance ~ age + (1 | Subject)", data, correlation=rf.cor_car1(group="Subject", time="age"))
    assert by_position.residual_parameters()["rho"] == pytest.approx(reference["corStruct"]["natural"]["Phi"], rel=2e-4)
    assert abs(by_time.loglik - by_position.loglik) > 1e-3


def test_summary_shows_the_residual_structure():
    m = rf.gls("distance ~ age", frame("Orthodont", None), correlation=rf.cor_cs(group="Subject"))
    text = m.summary()
    assert "Generalized least squares fit by REML" in text
    assert "corCompSymm(form = ~ 1 | Subject)" in text and "rho = 0.6857" in text


def test_gls_and_lmer_refuse_each_others_formulas():
    data = frame("Orthodont", None)
    with pytest.raises(ValueError, match="fit it with rf.lmer"):
        rf.gls("distance ~ age + (1 | Subject)", data, correlation=rf.cor_cs(group="Subject"))
    with pytest.raises(ValueError, match="column 'Visit' not in data"):
        rf.gls("distance ~ age", data, correlation=rf.cor_car1(group="Subject", time="Visit"))
    with pytest.raises(ValueError, match="either time= .* or coords="):
        rf.cor_exp(group="Subject")
    with pytest.raises(TypeError, match="rf.cor_ar1"):
        rf.lmer("distance ~ age + (1 | Subject)", data, correlation="AR1")
    m = rf.lmer("distance ~ age + (1 | Subject)", data, correlation=rf.cor_ar1(group="Subject"))
    with pytest.raises(ValueError, match="Kenward–Roger needs V linear"):
        m.coef_table(ddf="kenward-roger")


# ----------------------------------------------------------------------------- the structure itself

KINDS = [
    ("ar1", False),
    ("car1", False),
    ("cs", False),
    ("exp", False),
    ("exp", True),
    ("gaus", True),
    ("symm", False),
    ("none", False),
]


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
    stratified=st.booleans(),
)
def test_closed_form_jacobians_equal_autodiff_on_unbalanced_shuffled_groups(sizes, kind, seed, stratified):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    codes = codes[torch.randperm(codes.shape[0], generator=generator)]  # groups interleaved
    n = codes.shape[0]
    times = torch.rand(n, generator=generator, dtype=torch.float64) * 5.0
    strata = torch.randint(0, 2, (n,), generator=generator) if stratified else None
    name, nugget = kind
    s = rf.WithinGroup(
        codes, name, None if name in ("ar1", "cs", "symm", "none") else times, nugget=nugget, strata=strata
    )
    k = len(rf.param_names(s))
    theta = (torch.rand(k, generator=generator, dtype=torch.float64) - 0.5) * 0.8
    assert_jacobian_matches(s, theta)
    V = s(theta)
    assert torch.equal(V, V.mT) and float(torch.linalg.eigvalsh(V).min()) > 0
    different = codes.unsqueeze(-1) != codes
    assert bool((V[different] == 0).all())


def test_dense_engine_equals_the_same_model_written_with_kronecker_on_balanced_sorted_data():
    # Balanced, sorted groups: WithinGroup(ar1) = Kronecker(Identity(m), AR1(t)) (the old way).
    m, t = 4, 5
    codes = torch.arange(m).repeat_interleave(t)
    theta = torch.tensor([0.3, 0.7], dtype=torch.float64)
    ours = rf.WithinGroup(codes, "ar1")(theta)
    theirs = rf.Kronecker(a=rf.Identity(m), b=rf.AR1(t))(theta)
    torch.testing.assert_close(ours, theirs)


def test_vmap_over_parameters_equals_a_loop():
    codes = torch.tensor([0, 1, 0, 1, 1, 2, 2])
    s = rf.WithinGroup(
        codes, "car1", torch.arange(7.0, dtype=torch.float64), strata=torch.tensor([0, 1, 0, 1, 0, 1, 0])
    )
    thetas = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batched = torch.func.vmap(s)(thetas)
    torch.testing.assert_close(batched, torch.stack([s(t) for t in thetas]))


VARPOWER = json.loads((Path(__file__).parent / "data" / "correlation" / "nlme_varpower.json").read_text())["models"]
POWER_CASES = {
    "orthodont_varpower": ("Orthodont", "lmer", "distance ~ age + (1 | Subject)", None),
    "orthodont_varpower_gls": ("Orthodont", "gls", "distance ~ age", None),
    "bodyweight_varpower": ("BodyWeight", "lmer", "weight ~ Time * Diet + (Time | Rat)", None),
    "bodyweight_car1_varpower": (
        "BodyWeight",
        "lmer",
        "weight ~ Time * Diet + (Time | Rat)",
        rf.cor_car1(group="Rat", time="Time"),
    ),
}


@pytest.mark.parametrize("key", sorted(POWER_CASES))
def test_var_power_fits_equal_nlme(key):
    reference = VARPOWER[key]
    name, function, formula, correlation = POWER_CASES[key]
    covariate = "age" if name == "Orthodont" else "Time"
    fit = rf.gls if function == "gls" else rf.lmer
    m = fit(formula, frame(name, None), correlation=correlation, weights=rf.var_power(covariate=covariate))
    assert m.converged, m.message
    assert m.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    np.testing.assert_allclose(m.fixef().to_numpy(), list(reference["fixef"].values()), rtol=1e-5, atol=1e-7)
    # nlme's power moves by ~3e-6 between starting points (its report): compared to 1e-5.
    assert m.residual_parameters()["power"] == pytest.approx(reference["varStruct"]["natural"]["power"], abs=1e-5)


def test_var_ident_and_var_power_combine_and_scale_the_residuals():
    data = frame("Orthodont", None)
    both = rf.gls("distance ~ age", data, weights=(rf.var_power(covariate="age"), rf.var_ident(by="Sex")))
    assert set(both.residual_parameters().index) == {"ratio_Male", "power"}
    assert "varPower(form = ~ age); varIdent(form = ~ 1 | Sex)" in both.summary()
    power = rf.gls("distance ~ age", data, weights=rf.var_power(covariate="age"))
    # Pearson residuals: divided by each row's σ|age|^power.
    expected = power.residuals() / (power.sigma * data["age"].abs() ** power.residual_parameters()["power"])
    np.testing.assert_allclose(power.residuals(scaled=True), expected, rtol=1e-12)
    with pytest.raises(TypeError, match="weights must be"):
        rf.gls("distance ~ age", data, weights=(rf.var_power(covariate="age"), rf.var_power(covariate="age")))


# ------------------------------------------------------------------------------ the blocks engine


def _assert_engine_equals_dense(s, theta, y, X, engine: str) -> None:
    """``engine``'s AI terms (the residual's derivatives in closed form and by jacfwd/jacrev), β̂,
    its covariance and the conditional predictions equal the dense engine's."""
    dense = rf.ai_terms(s, theta, y, X, engine="dense")
    terms = rf.ai_terms(s, theta, y, X, engine=engine)
    for method in ("fwd", "rev"):  # the residual's closed-form derivatives against autodiff, in the engine
        other = rf.ai_terms(s, theta, y, X, engine=engine, jacobian=method)
        torch.testing.assert_close(other.score, terms.score, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other.ai, terms.ai, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.loglik, dense.loglik, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(terms.score, dense.score, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(terms.ai, dense.ai, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(rf.blue(s, theta, y, X, engine=engine), rf.blue(s, theta, y, X, engine="dense"))
    torch.testing.assert_close(
        rf.vcov_beta(s, theta, y, X, engine=engine), rf.vcov_beta(s, theta, y, X, engine="dense")
    )
    torch.testing.assert_close(
        rf.predict(s, theta, y, X, conditional=True, engine=engine),
        rf.predict(s, theta, y, X, conditional=True, engine="dense"),
    )


def _drawn_residual(sizes, kind, generator):
    """Residual groups of ``sizes`` with their rows shuffled, times in [0, 4) and a WithinGroup of
    ``kind`` = (name, nugget) over them with two variance strata and a power covariate."""
    codes = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    codes = codes[torch.randperm(codes.shape[0], generator=generator)]
    n = codes.shape[0]
    times = torch.rand(n, generator=generator, dtype=torch.float64) * 4.0
    name, nugget = kind
    residual = rf.WithinGroup(
        codes,
        name,
        None if name in ("ar1", "cs", "symm", "none") else times,
        nugget=nugget,
        strata=torch.randint(0, 2, (n,), generator=generator),
        power_covariate=times + 0.5,
    )
    return codes, times, residual


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=3, max_size=6).filter(lambda sizes: sum(sizes) >= 6),
    kind=st.sampled_from(KINDS),
    slope=st.booleans(),
    nested=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocks_engine_equals_dense_on_drawn_unbalanced_layouts(sizes, kind, slope, nested, seed):
    generator = torch.Generator().manual_seed(seed)
    codes, times, residual = _drawn_residual(sizes, kind, generator)
    n = codes.shape[0]
    covariates = torch.stack([torch.ones(n, dtype=torch.float64), times], 1) if slope else None
    # A random term on the residual's groups, or on groups nested in them (each split in two).
    term_codes = codes * 2 + (torch.arange(n) % 2) if nested else codes
    s = rf.Sum(g=rf.Grouped(term_codes, covariates=covariates), residual=residual)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    X = torch.stack([torch.ones(n, dtype=torch.float64), torch.randn(n, generator=generator, dtype=torch.float64)], 1)
    k = len(rf.param_names(s))
    theta = (torch.rand(k, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    from reml_fn.reml.engines import select_engine

    assert select_engine(s).name == "blocks"
    _assert_engine_equals_dense(s, theta, y, X, "blocks")


# ------------------------------------------------------------------------------ the MME engine


def _crossed_model(sizes, kind, levels, slope, blocked, dense_term, seed):
    """A drawn unbalanced layout: residual groups of ``sizes`` (rows shuffled), a Grouped term
    whose ``levels`` cross them, optionally a term on the residual's groups (blocked in the MME)
    and a Propagate term with a dense Z."""
    generator = torch.Generator().manual_seed(seed)
    codes, times, residual = _drawn_residual(sizes, kind, generator)
    n = codes.shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    covariates = torch.stack([ones, times], 1) if slope else None
    children = {"crossed": rf.Grouped(torch.randint(0, levels, (n,), generator=generator), covariates=covariates)}
    if blocked:
        children["subject"] = rf.Grouped(codes, covariates=covariates)
    if dense_term:
        Z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        children["dense"] = rf.Propagate(Z=rf.Fixed(Z), G=rf.Diagonal(2))
    s = rf.Sum(**children, residual=residual)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    X = torch.stack([ones, torch.randn(n, generator=generator, dtype=torch.float64)], 1)
    k = len(rf.param_names(s))
    theta = (torch.rand(k, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    return s, theta, y, X


@settings(max_examples=25, deadline=None)
@given(
    # n ≥ 20: the crossed and dense terms' columns (at most 4·2 + 2) within the MME's n/2.
    sizes=st.lists(st.integers(1, 7), min_size=4, max_size=8).filter(lambda sizes: sum(sizes) >= 20),
    kind=st.sampled_from(KINDS),
    levels=st.integers(2, 4),
    slope=st.booleans(),
    blocked=st.booleans(),
    dense_term=st.booleans(),
    pairs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mme_with_a_correlated_residual_equals_dense_on_drawn_crossed_layouts(
    sizes, kind, levels, slope, blocked, dense_term, pairs, seed
):
    """Random terms crossing the residual's groups: the MME with R⁻¹ block by block (R's
    derivatives in closed form and by jacfwd/jacrev; the traces over the column pairs of large
    crossed designs, forced on with ``pairs``, or by chunks of one group) equals the dense engine."""
    from reml_fn.reml import mme as mme_module
    from reml_fn.reml.engines import ENGINES, select_engine

    s, theta, y, X = _crossed_model(sizes, kind, levels, slope, blocked, dense_term, seed)
    assert select_engine(s).name == "mme"
    dense = rf.ai_terms(s, theta, y, X, engine="dense")
    with pytest.MonkeyPatch.context() as patch:
        if pairs:
            patch.setattr(mme_module, "PAIR_LIST_MIN_SIZE", 0)
            patch.setattr(mme_module, "PAIR_LIST_MAX_DENSITY", 1.0)
        else:  # the dense route, one group per chunk
            patch.setattr(mme_module, "GROUP_CHUNK_ELEMENTS", 1)
        prepared = ENGINES["mme"].prepare(s, y, X)
        assert (prepared.pairs.numel() > 0) == (pairs and blocked)
        paired = ENGINES["mme"].ai_terms(s, rf.unflatten_params(s, theta), y, X, prepared=prepared)
    torch.testing.assert_close(paired.score, dense.score, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(paired.ai, dense.ai, rtol=1e-8, atol=1e-8)
    _assert_engine_equals_dense(s, theta, y, X, "mme")
    params = rf.unflatten_params(s, theta)
    torch.testing.assert_close(
        ENGINES["mme"].jacobian_traces(s, params), ENGINES["dense"].jacobian_traces(s, params), rtol=1e-10, atol=1e-10
    )


def test_mme_with_a_correlated_residual_vmaps_and_fits_like_the_dense_engine():
    s, theta, y, X = _crossed_model([4, 6, 3, 5, 6, 2, 5], ("car1", False), 3, True, True, False, 7)
    thetas = theta + 0.1 * torch.randn(5, theta.shape[0], generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    batched = torch.func.vmap(lambda t: rf.reml_loglik(s, t, y, X, engine="mme"))(thetas)
    torch.testing.assert_close(batched, torch.stack([rf.reml_loglik(s, t, y, X, engine="mme") for t in thetas]))
    fits = {engine: rf.fit(s, y, X, engine=engine) for engine in ("mme", "dense")}
    assert fits["mme"].engine == "mme" and int(fits["mme"].status) == int(fits["dense"].status)
    assert float(fits["mme"].loglik) == pytest.approx(float(fits["dense"].loglik), abs=1e-8)
    Y = torch.stack([y, y.flip(0), 2.0 * y])
    batched_fit = rf.fit_batched(s, Y, X)
    for b in range(3):
        single = rf.fit(s, Y[b], X)
        assert float(batched_fit.loglik[b]) == pytest.approx(float(single.loglik), abs=1e-8)


CROSSED = json.loads((Path(__file__).parent / "data" / "correlation" / "nlme_crossed.json").read_text())["models"]
CROSSED_FORMULA = "y ~ x + (1 | Subject) + (1 | Rater)"


@pytest.mark.parametrize(
    "key, correlation",
    [
        ("crossed_car1", rf.cor_car1(group="Subject", time="Time")),
        ("crossed_ar1_visit", rf.cor_ar1(group="Subject")),  # rows are in visit order within Subject
    ],
)
def test_crossed_random_terms_with_a_correlated_residual_equal_nlme(key, correlation):
    """Subjects × raters crossed, CAR(1)/AR(1) within subject, 4–9 irregular visits per subject
    (tests/data/correlation/make_crossed.R: nlme's lme with pdBlocked(pdIdent, pdIdent) on a
    constant group). Runs on the MME engine; parameters against nlme's optimum polished by Newton
    steps on the analytic REML gradient (nlme's own stop is 5e-7 relative from it)."""
    reference = CROSSED[key]
    data = pd.read_csv(Path(__file__).parent / "data" / "correlation" / "crossed_ar1.csv")
    m = rf.lmer(CROSSED_FORMULA, data, correlation=correlation)
    assert m.fit.engine == "mme" and m.status == 0
    assert m.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    assert m.loglik >= reference["logLik"] - 1e-9
    optimum = reference["direct_check"]["newton_polished"]
    natural = m.fit.natural
    found = {
        "var_subject": float(natural["Subject"]["cov"]["sigma^2"]),
        "var_rater": float(natural["Rater"]["cov"]["sigma^2"]),
        "sigma2": float(natural["residual"]["sigma^2"]),
        "Phi": float(natural["residual"]["phi" if key == "crossed_car1" else "rho"]),
    }
    for name, value in optimum["params"].items():
        assert found[name] == pytest.approx(value, rel=1e-5), name
    np.testing.assert_allclose(m.fit.beta.numpy(), list(optimum["fixef"].values()), rtol=1e-6)


def test_crossed_random_terms_with_a_confounded_residual_say_not_identifiable():
    """Compound symmetry within subject next to a random intercept for subject: V depends on
    σ²(1 − ρ) and σ²_subject + σ²ρ only (nlme stops anywhere on that ridge). reml_fn reaches nlme's
    logLik, β and the two identified combinations, and says the model is not identifiable."""
    reference, check = (
        CROSSED["crossed_cs"],
        json.loads((Path(__file__).parent / "data" / "correlation" / "nlme_crossed.json").read_text())["checks"][
            "cs_identifiability"
        ],
    )
    data = pd.read_csv(Path(__file__).parent / "data" / "correlation" / "crossed_ar1.csv")
    m = rf.lmer(CROSSED_FORMULA, data, correlation=rf.cor_cs(group="Subject"))
    assert m.fit.engine == "mme" and m.status == 5
    assert m.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    natural = m.fit.natural
    sigma2, rho = float(natural["residual"]["sigma^2"]), float(natural["residual"]["rho"])
    assert sigma2 * (1 - rho) == pytest.approx(check["nugget_none"], rel=1e-5)
    assert float(natural["Subject"]["cov"]["sigma^2"]) + sigma2 * rho == pytest.approx(
        check["shared_within_subject_none"], rel=1e-5
    )
    assert float(natural["Rater"]["cov"]["sigma^2"]) == pytest.approx(check["var_rater_none"], rel=1e-5)
    np.testing.assert_allclose(m.fit.beta.numpy(), list(reference["fixef"].values()), rtol=1e-6)


def test_blocks_engine_takes_the_residual_derivatives_by_the_method_asked(monkeypatch):
    """jacobian="fwd"/"rev" differentiates the residual's blocks by torch.func (not the closed form)."""
    from reml_fn.reml import residual_blocks

    model = rf.lmer_model(
        "distance ~ age + (1 | Subject)", frame("Orthodont", None), correlation=rf.cor_ar1(group="Subject")
    )
    s, theta = model.structure, torch.tensor([0.3, 0.4, 0.8], dtype=torch.float64)
    calls = []
    original = residual_blocks.autodiff_transform
    monkeypatch.setattr(residual_blocks, "autodiff_transform", lambda method: calls.append(method) or original(method))
    closed = rf.ai_terms(s, theta, model.y, model.X, engine="blocks")
    assert calls == []
    for method in ("fwd", "rev"):
        other = rf.ai_terms(s, theta, model.y, model.X, engine="blocks", jacobian=method)
        torch.testing.assert_close(other.ai, closed.ai, rtol=1e-10, atol=1e-10)
    assert set(calls) == {"fwd", "rev"}


def test_blocks_engine_is_not_chosen_for_crossed_terms_and_batches_equal_single_fits():
    from reml_fn.reml.engines import select_engine

    codes = torch.arange(12) % 3
    crossed = rf.Sum(a=rf.Grouped(torch.arange(12) % 4), residual=rf.WithinGroup(codes, "ar1"))
    assert select_engine(crossed).name == "mme"  # groups of a cross the residual's groups
    model = rf.lmer_model(
        "distance ~ age + (1 | Subject)", frame("Orthodont", None), correlation=rf.cor_ar1(group="Subject")
    )
    Y = torch.stack([model.y, model.y.flip(0)])
    batched = rf.fit_batched(model.structure, Y, model.X)
    for b in range(2):
        single = rf.fit(model.structure, Y[b], model.X)
        assert float(batched.loglik[b]) == pytest.approx(float(single.loglik), abs=1e-8)
        assert single.engine == "blocks"


def test_cor_symm_by_the_values_of_a_time_column_equals_by_position_on_complete_visits():
    # Orthodont has every visit (ages 8, 10, 12, 14) for every child: the index by age is the position.
    data = frame("Orthodont", None)
    by_age = rf.gls("distance ~ age", data, correlation=rf.cor_symm(group="Subject", time="age"))
    assert by_age.loglik == pytest.approx(REFERENCES["orthodont_symm"]["logLik"], abs=1e-6)


def test_simulate_draws_the_correlated_residual_block_by_block():
    data = frame("Orthodont", None)
    m = rf.lmer(
        "distance ~ age + (1 | Subject)", data, correlation=rf.cor_ar1(group="Subject"), weights=rf.var_ident(by="Sex")
    )
    draws = m.simulate(20000, seed=5).to_numpy()
    V = m.model.structure.build(m.fit.params).numpy()  # closed form, dense
    first = np.arange(4)  # one subject's four visits
    np.testing.assert_allclose(np.cov(draws[first]), V[np.ix_(first, first)], rtol=0.06, atol=0.06 * V.max())
    np.testing.assert_allclose(draws.mean(1)[first], (m.model.X @ m.fit.beta).numpy()[first], atol=0.1)
    # A bootstrap of a correlated-residual fit runs on the same draws.
    boot = rf.bootstrap(m, 5, seed=1)
    assert boot.replicates.shape[0] == 5 and (boot.status == 0).all()


SYMM_SUBSETS = json.loads((Path(__file__).parent / "data" / "correlation" / "nlme_symm_subset.json").read_text())


@pytest.mark.parametrize(
    "key, correlation",
    [
        ("orthodont_symm_subset", rf.cor_symm(group="Subject")),  # nlme: the row's position in its group
        ("orthodont_symm_age_subset", rf.cor_symm(group="Subject", time="age")),  # the visit, from the age
    ],
)
def test_cor_symm_on_an_unbalanced_subset_equals_nlme(key, correlation):
    reference = SYMM_SUBSETS[key]
    m = rf.gls("distance ~ age", frame("Orthodont", reference["rows"]), correlation=correlation)
    assert m.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    np.testing.assert_allclose(m.fixef().to_numpy(), list(reference["fixef"].values()), rtol=1e-5)
    ours = m.residual_parameters()
    theirs = reference["correlations"]
    values = list(theirs.values()) if isinstance(theirs, dict) else theirs
    pairs = [f"cor{pair}" for pair in reference["correlation_pairs"]]
    np.testing.assert_allclose([ours[pair] for pair in pairs], values, rtol=2e-4, atol=1e-5)


def test_variance_functions_alone_run_block_by_block():
    # Without a correlation the residual is diagonal: its blocks are the random term's groups (lmer)
    # or single rows (gls), never one n × n block.
    data = frame("Orthodont", None)
    m = rf.lmer("distance ~ age + (1 | Subject)", data, weights=rf.var_ident(by="Sex"))
    g = rf.gls("distance ~ age", data, weights=rf.var_power(covariate="age"))
    assert m.fit.engine == "blocks" and g.fit.engine == "blocks"
    assert int(torch.bincount(g.model.structure.codes).max()) == 1
    dense = rf.fit(m.model.structure, m.model.y, m.model.X, engine="dense")
    assert m.loglik == pytest.approx(float(dense.loglik), abs=1e-8)


def test_a_large_model_only_the_dense_engine_can_fit_is_announced():
    n = 6000
    rng = np.random.default_rng(1)
    data = pd.DataFrame(
        {"y": rng.normal(size=n), "a": np.arange(n) % 50, "b": np.arange(n) % 37, "c": np.arange(n) * 2 // 3}
    )
    # Crossed terms with few levels run on the MME: no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rf.lmer_model("y ~ 1 + (1 | b)", data, correlation=rf.cor_ar1(group="a"))
    assert rf.reml.select_engine(model.structure).name == "mme"
    # A crossed term with 4,000 levels (more than n/2 columns) is beyond the MME.
    with pytest.warns(UserWarning, match="not nested in the groups of the residual's correlation"):
        rf.lmer_model("y ~ 1 + (1 | c)", data, correlation=rf.cor_ar1(group="a"))


def test_bootstrap_intervals_cover_the_residual_parameters():
    """rf.bootstrap / confint(method="boot") carry the residual's correlation parameters and
    variance ratios (nlme's intervals() has them for corStruct and varStruct): a column per
    residual_parameters() name, between the σ and the fixed effects, with the fit's value as estimate."""
    m = rf.lmer(
        "distance ~ age + (1 | Subject)",
        frame("Orthodont", None),
        correlation=rf.cor_ar1(group="Subject"),
        weights=rf.var_ident(by="Sex"),
    )
    boot = rf.bootstrap(m, 40, seed=3)
    residual = list(m.residual_parameters().index)
    assert residual == ["rho", "ratio_Male"]
    assert list(boot.replicates.columns) == [".sig01", ".sigma", *residual, "(Intercept)", "age"]
    assert boot.estimate[residual].tolist() == m.residual_parameters().tolist()
    usable = boot.replicates[boot.status == 0]
    assert len(usable) >= 30 and usable["rho"].between(-1, 1).all() and (usable["ratio_Male"] > 0).all()
    intervals = m.confint(method="boot", nsim=40, seed=3)
    assert intervals.loc["rho"].iloc[0] < intervals.loc["rho"].iloc[1]
    symm = rf.gls("distance ~ age", frame("Orthodont", None), correlation=rf.cor_symm(group="Subject"))
    columns = rf.bootstrap(symm, 5, seed=1).replicates.columns
    assert [c for c in columns if c.startswith("cor(")] == [
        f"cor({i},{j})" for i in range(1, 5) for j in range(i + 1, 5)
    ]
