"""Acceptance: fits from default starts reproduce published lme4/nlme REML results.

Tolerances (refdata README §5): REML criterion and β about 1e-8 relative where the reference has
the digits; variance components about 2e-4 relative (flat surfaces); printed values to their
printed precision. The data and references ship with the package (reml_fn.datasets).
"""

from __future__ import annotations

import math

import pytest
import torch

import reml_fn as rf
from reml_fn import datasets
from reml_fn.datasets.models import MODELS, model


def fitted(name: str, **options) -> tuple:
    m = model(name)
    return m, rf.fit(m.structure, m.y, m.X, x_names=m.x_names, **options)


_CACHE: dict[str, tuple] = {}


def cached_fit(name: str):
    if name not in _CACHE:
        _CACHE[name] = fitted(name)
    return _CACHE[name]


def close(actual, expected, rel=0.0, abs=0.0):
    actual = torch.as_tensor(actual, dtype=torch.float64).flatten()
    expected = torch.as_tensor(expected, dtype=torch.float64).flatten()
    assert actual.shape == expected.shape, (actual, expected)
    bound = abs + rel * expected.abs()
    error = (actual - expected).abs()
    assert bool((error <= bound).all()), (
        f"actual {actual.tolist()} vs expected {expected.tolist()} (error {error.tolist()})"
    )


def criterion_at(structure, natural: dict, y, X) -> float:
    """−2 ℓ at natural-scale parameter values."""
    return float(-2.0 * rf.reml_loglik(structure, rf.unconstrain(structure, natural), y, X))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_reference_model_converges_from_default_start(name):
    m, result = cached_fit(name)
    assert bool(result.converged), result.message
    assert bool(torch.isfinite(result.loglik))
    # The returned loglik belongs to the returned parameters (no off-by-one).
    assert float(rf.reml_loglik(m.structure, result.params, m.y, m.X)) == pytest.approx(float(result.loglik), abs=1e-9)
    assert float(result.reml_criterion) == pytest.approx(-2 * float(result.loglik), rel=1e-15)


# ------------------------------------------------------------------------------------------ lme4


def test_dyestuff():
    ref = datasets.references("Dyestuff")["REML"]
    m, r = cached_fit("Dyestuff")
    assert float(r.reml_criterion) <= ref["REML_criterion"] + 1e-7
    close(r.reml_criterion, ref["REML_criterion"], rel=1e-9)
    close(r.beta, ref["beta"], rel=1e-10)
    natural = r.natural
    close(natural["Batch"]["G"]["sigma^2"], ref["var_Batch_bobyqa_comment"], rel=2e-5)
    close(natural["residual"]["sigma^2"] ** 0.5, ref["sigma_bobyqa_comment"], rel=1e-6)
    close(r.vcov_beta, ref["vcov_beta_bobyqa_comment"], rel=1e-5)
    assert not bool(r.at_boundary.any())


@pytest.mark.parametrize("theta, key", [(0.0, "REML_criterion_at_theta_0"), (1.0, "REML_criterion_at_theta_1")])
def test_dyestuff_profiled_criterion_matches_lme4_remlfun(theta, key):
    """lme4's REMLfun(θ): the REML criterion with σ² profiled out, V = σ²(θ² ZZᵀ + I)."""
    ref = datasets.references("Dyestuff")["REML"][key]
    m = model("Dyestuff")
    n, p = m.X.shape
    Z = m.structure["Batch"]["Z"].matrix
    V0 = theta**2 * Z @ Z.T + torch.eye(n)
    residual = rf.residuals(rf.Fixed(V0), {}, m.y, m.X)
    sigma2 = float(residual @ torch.linalg.solve(V0, residual)) / (n - p)
    criterion = -2.0 * float(rf.reml_loglik(rf.Fixed(sigma2 * V0), {}, m.y, m.X))
    assert criterion == pytest.approx(ref, abs=1e-10 * ref)


def test_dyestuff2_boundary_fit():
    ref = datasets.references("Dyestuff2")["REML"]
    m, r = cached_fit("Dyestuff2")
    assert bool(r.converged)
    assert r.boundary_names == ["Batch/G/sigma^2"]
    assert float(r.natural["Batch"]["G"]["sigma^2"]) < 1e-6
    close(r.beta, ref["beta"], rel=1e-10)
    close(r.se_beta, ref["se_beta"], rel=1e-8)
    close(r.beta / r.se_beta, ref["t_value"], rel=1e-8)
    close(r.reml_criterion, ref["REML_criterion_printed"], abs=5e-5)
    close(r.natural["residual"]["sigma^2"] ** 0.5, ref["sd_Residual_printed"], abs=5e-4)
    assert "boundary" in str(r)


SLEEPSTUDY = {
    "sleepstudy_0": "fit_sleepstudy_0",
    "sleepstudy_1": "fit_sleepstudy_1",
    "sleepstudy_2": "fit_sleepstudy_2",
    "sleepstudy_3": "fit_sleepstudy_3",
}


def _sleepstudy_natural(name: str, ref: dict) -> dict:
    """lme4's θ (relative Cholesky factor, column-wise) and σ as our natural parameters."""
    theta, sigma2 = ref["theta"], ref["sigmaREML"] ** 2
    if name in ("sleepstudy_0", "sleepstudy_1"):
        return {"Subject": {"G": {"sigma^2": sigma2 * theta[0] ** 2}}, "residual": {"sigma^2": sigma2}}
    if name == "sleepstudy_3":
        return {
            "Subject": {"G": {"sigma^2": sigma2 * theta[0] ** 2}},
            "Subject.Days": {"G": {"sigma^2": sigma2 * theta[1] ** 2}},
            "residual": {"sigma^2": sigma2},
        }
    lam = torch.tensor([[theta[0], 0.0], [theta[1], theta[2]]])
    cov = sigma2 * lam @ lam.T
    return {
        "Subject": {"G": {"cov": {"sigma^2_0_0": cov[0, 0], "sigma^2_1_0": cov[1, 0], "sigma^2_1_1": cov[1, 1]}}},
        "residual": {"sigma^2": sigma2},
    }


@pytest.mark.parametrize("name", sorted(SLEEPSTUDY))
def test_sleepstudy_saved_lme4_fits(name):
    ref = datasets.references("sleepstudy")["lme4_saved_fits"][SLEEPSTUDY[name]]
    m, r = cached_fit(name)
    # Our optimum is at least as good as lme4's, and equal to it to 1e-9 relative.
    assert float(r.reml_criterion) <= ref["REML_criterion"] + 1e-7
    close(r.reml_criterion, ref["REML_criterion"], rel=1e-9)
    close(r.beta, ref["beta"], rel=1e-8)
    close(r.natural["residual"]["sigma^2"] ** 0.5, ref["sigmaREML"], rel=1e-4)
    for group in ref["derived_re"]:
        cov = torch.tensor(group["cov"])
        if name == "sleepstudy_2":
            c = r.natural["Subject"]["G"]["cov"]
            ours = torch.stack([c["sigma^2_0_0"], c["sigma^2_1_0"], c["sigma^2_1_1"]])
            close(ours, [cov[0, 0], cov[1, 0], cov[1, 1]], rel=2e-4)
        elif name == "sleepstudy_3":
            key = "Subject" if group["terms"] == ["(Intercept)"] else "Subject.Days"
            close(r.natural[key]["G"]["sigma^2"], cov[0, 0], rel=2e-4)
        else:
            close(r.natural["Subject"]["G"]["sigma^2"], cov[0, 0], rel=2e-4)
    # Our criterion evaluated at lme4's parameters reproduces lme4's criterion.
    natural = _sleepstudy_natural(name, ref)
    assert criterion_at(m.structure, natural, m.y, m.X) == pytest.approx(ref["REML_criterion"], rel=1e-10)


def test_sleepstudy_published_summary_values():
    m, r = cached_fit("sleepstudy_2")
    # Bates et al. (JSS): fixed effects 251.405 (SE 6.825), 10.467 (SE 1.546); lmer-1.R: corr(β̂) −0.1375.
    close(r.se_beta, [6.825, 1.546], abs=5e-4)
    corr = r.vcov_beta[0, 1] / (r.se_beta[0] * r.se_beta[1])
    close(corr, -0.1375, abs=1e-4)
    # nlme's vcov(β) for the same model (its optimum differs from lme4's by ~1e-6 relative).
    close(r.vcov_beta, [[46.57401896884941, -1.451005281955385], [-1.451005281955385, 2.3894443107455516]], rel=1e-4)


# ------------------------------------------------------------------------------------------ nlme


def test_orthodont():
    ref = datasets.references("Orthodont")["REML_age_slope"]
    m, r = cached_fit("Orthodont")
    close(r.beta, ref["beta"], rel=1e-7)
    close(r.se_beta, ref["se_beta"], rel=2e-6)
    c = r.natural["Subject"]["G"]["cov"]
    sd = torch.stack([c["sigma^2_0_0"].sqrt(), c["sigma^2_1_1"].sqrt()])
    close(sd, ref["sd"], rel=2e-4)
    close(c["sigma^2_1_0"] / (sd[0] * sd[1]), ref["cor"], rel=2e-4)
    close(r.natural["residual"]["sigma^2"] ** 0.5, ref["sigma"], rel=2e-4)
    close(r.loglik, ref["logLik_printed"], abs=5e-4)


def test_oxboys():
    ref = datasets.references("Oxboys")["REML"]
    m, r = cached_fit("Oxboys")
    close(r.beta, ref["beta"], rel=1e-8)
    c = r.natural["Subject"]["G"]["cov"]
    sd = torch.stack([c["sigma^2_0_0"].sqrt(), c["sigma^2_1_1"].sqrt(), r.natural["residual"]["sigma^2"].sqrt()])
    close(sd, ref["sd"], rel=2e-4)
    close(c["sigma^2_1_0"] / (sd[0] * sd[1]), ref["corr_printed"], abs=5e-4)
    close(r.loglik, ref["logLik_printed"], abs=5e-4)


def test_rail():
    ref = datasets.references("Rail")["REML"]
    m, r = cached_fit("Rail")
    close(r.loglik, ref["logLik"], abs=5e-4)
    close(r.aic, ref["AIC"], abs=5e-3)
    # lme4's BIC counts n observations; nlme's REML BIC counts n − p (its printed 130.68).
    df = len(r.names) + r.p
    close(r.bic, float(r.reml_criterion) + df * math.log(r.n), rel=1e-12)
    close(float(r.reml_criterion) + df * math.log(r.n - r.p), ref["BIC"], abs=5e-3)
    close(r.natural["Rail"]["G"]["sigma^2"] ** 0.5, ref["sd_Rail"], abs=5e-4)
    close(r.natural["residual"]["sigma^2"] ** 0.5, ref["sigma"], abs=5e-5)
    close(r.beta, [ref["beta"]], rel=1e-10)
    close(r.se_beta, [ref["se_beta"]], abs=5e-4)


# ------------------------------------------------------------------------------------------ statsmodels / lme4


def test_dietox_random_intercept():
    ref = datasets.references("dietox")["REML_intercept"]
    m, r = cached_fit("dietox_intercept")
    close(r.beta, ref["beta"], rel=1e-6)
    close(r.se_beta, ref["se_beta"], rel=1e-5)
    close(r.natural["residual"]["sigma^2"], ref["sigma2"], rel=2e-4)
    close(r.natural["Pig"]["G"]["sigma^2"], ref["var_Pig"], rel=2e-4)
    close(r.loglik, ref["logLik"], abs=5e-4)


def test_dietox_random_slope():
    ref = datasets.references("dietox")["REML_slope"]
    m, r = cached_fit("dietox_slope")
    close(r.beta, ref["beta"], rel=1e-6)
    close(r.se_beta, ref["se_beta"], rel=1e-5)
    close(r.natural["residual"]["sigma^2"], ref["sigma2"], rel=2e-4)
    c = r.natural["Pig"]["G"]["cov"]
    close(
        torch.stack([c["sigma^2_0_0"], c["sigma^2_1_0"], c["sigma^2_1_1"]]),
        [ref["re_cov"][i] for i in (0, 1, 3)],
        rel=2e-4,
    )
    close(r.loglik, ref["logLik"], abs=5e-4)


def test_john_alpha():
    m, r = cached_fit("john_alpha")
    close(r.loglik, -46.596910121, abs=1e-8)
    close(r.beta, [4.51825, 0.2978458333, -0.4140458333], rel=1e-8)
    n = r.natural
    close(
        torch.stack([n["gen"]["G"]["sigma^2"], n["rep:block"]["G"]["sigma^2"], n["residual"]["sigma^2"]]),
        [0.14290210363, 0.07021833184, 0.08161713477],
        rel=2e-4,
    )


def test_peer_sim():
    m, r = cached_fit("peer_sim")
    lme4 = {
        "g1": {"G": {"sigma^2": 1.0217864955}},
        "g2": {"G": {"sigma^2": 0.3574575817}},
        "residual": {"sigma^2": 0.2459237288},
    }
    at_lme4 = rf.unconstrain(m.structure, lme4)
    # Our optimum is at least as high as lme4's point (which sits ~2e-11 below the maximum) ...
    assert float(r.loglik) >= float(rf.reml_loglik(m.structure, at_lme4, m.y, m.X)) - 1e-12
    close(r.loglik, -64.9006201345, abs=1e-8)
    # ... so β is compared at lme4's variance components to 1e-8, and at ours to 1e-7.
    close(rf.blue(m.structure, at_lme4, m.y, m.X), [0.8112241475, 0.3485579218], rel=1e-8)
    close(r.beta, [0.8112241475, 0.3485579218], rel=1e-7)
    n = r.natural
    close(
        torch.stack([n["g1"]["G"]["sigma^2"], n["g2"]["G"]["sigma^2"], n["residual"]["sigma^2"]]),
        [1.0217864955, 0.3574575817, 0.2459237288],
        rel=2e-4,
    )


def _cov_re(r) -> torch.Tensor:
    g = r.natural["groups"]["G"]
    if "sigma^2" in g:
        return g["sigma^2"].reshape(1, 1)
    c = g["cov"]
    if "sigma^2_0" in c:
        return torch.diag(torch.stack([c["sigma^2_0"], c["sigma^2_1"]]))
    return torch.stack(
        [torch.stack([c["sigma^2_0_0"], c["sigma^2_1_0"]]), torch.stack([c["sigma^2_1_0"], c["sigma^2_1_1"]])]
    )


STATSMODELS = [(f"lme{k:02d}", "reml_drf") for k in range(12)] + [(f"lme{k:02d}_irf", "reml_irf") for k in range(6, 12)]


@pytest.mark.parametrize("name, kind", STATSMODELS)
def test_statsmodels_lme_sets(name, kind):
    ref = datasets.statsmodels_references()[name[:5]][kind]
    m, r = cached_fit(name)
    close(r.beta, ref["coef"], rel=2e-6, abs=1e-7)
    close(r.loglik, ref["loglike"][0], abs=5e-4)
    close(r.natural["residual"]["sigma^2"], ref["scale"][0], rel=2e-4)
    close(_cov_re(r), ref["cov_re"], rel=2e-4, abs=2e-6)  # abs: lme01 sits at the boundary
    close(r.vcov_beta, ref["vcov"], rel=2e-4)
    if "ranef_mean" in ref:
        effects = rf.blup(m.structure, r.params, m.y, m.X)["groups"]
        k = len(ref["ranef_mean"])
        close(effects[:k], ref["ranef_mean"], rel=2e-4, abs=2e-6)


# ------------------------------------------------------------------------------------------ options


def test_jacobian_methods_and_engines_agree():
    m, closed = cached_fit("sleepstudy_2")
    for options in ({"jacobian": "fwd"}, {"jacobian": "rev"}, {"engine": "dense"}):
        _, other = fitted("sleepstudy_2", **options)
        close(other.loglik, closed.loglik, rel=1e-12)
        close(other.beta, closed.beta, rel=1e-9)
        close(rf.flatten_params(m.structure, other.params), rf.flatten_params(m.structure, closed.params), abs=1e-5)


def test_bad_start_recovers():
    m, good = cached_fit("sleepstudy_2")
    bad = rf.flatten_params(m.structure, good.params) + torch.tensor([4.0, 0.0, -4.0, 3.0])
    result = rf.fit(m.structure, m.y, m.X, init=bad)
    assert bool(result.converged)
    close(result.loglik, good.loglik, rel=1e-10)
    # The log-likelihood never decreases along the path (step halving).
    history = result.history["loglik"]
    assert bool((history[1:] >= history[:-1] - 1e-9 * history.abs()[:-1]).all())


def test_extreme_start_recovers_or_stops_with_a_clear_message():
    """Variances e^{±16} off and a covariance 50 raw units away: the capped, damped steps find the
    optimum (9 iterations); cut short, the fit says why."""
    m, good = cached_fit("sleepstudy_2")
    extreme = rf.flatten_params(m.structure, good.params) + torch.tensor([8.0, -50.0, -8.0, 8.0])
    result = rf.fit(m.structure, m.y, m.X, init=extreme)
    assert bool(result.converged)
    close(result.loglik, good.loglik, rel=1e-10)
    short = rf.fit(m.structure, m.y, m.X, init=extreme, max_iter=3)
    assert bool(torch.isfinite(short.loglik)) and bool(torch.isfinite(short.beta).all())
    assert short.message == "iteration limit reached before convergence"
    assert "iteration limit" in str(short)


def test_history_rows_are_consistent():
    m, r = cached_fit("Dyestuff")
    h = r.history
    assert h["loglik"].shape[0] == h["params"].shape[0] == h["step"].shape[0] == int(r.n_iter) + 1
    assert torch.equal(h["params"][-1], rf.flatten_params(m.structure, r.params))
    assert float(h["loglik"][-1]) == float(r.loglik)
    assert math.isclose(float(r.aic), float(r.reml_criterion) + 2 * (1 + 2))
