"""The AI-REML optimizer: the cases where it used to claim a false convergence, properties over
drawn models (batched = single, no false convergence), and the pure step functions.

Expected numbers come from lme4/nlme (``scripts/optimizer_references.R`` →
``tests/data/optimizer_references.json``), closed forms, or ``reml_loglik`` at those estimates;
never from this library's own fits.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn import datasets
from reml_fn.design import design_matrix, indicator_codes
from reml_fn.fit.boundaries import (
    CORRELATION_LIMIT,
    Working,
    active_bounds,
    correlation_pairs,
    negligible_to_floor,
    propose,
    raw_parameters,
    silent_at_floor,
    working_system,
)
from reml_fn.fit.problem import read_init
from reml_fn.fit.start import default_init, raw_bounds, variance_floor
from reml_fn.fit.step import (
    Newton,
    Options,
    accepts,
    ai_direction,
    converged,
    decrement_tolerance,
    expands,
    first_local_maximum,
    loglik_resolution,
    newton_direction,
    polish_accepts,
    predicted_gain,
    relaxed,
    stiffened,
    stuck_status,
)

DATA = Path(__file__).parent / "data"
REFERENCES = json.loads((DATA / "optimizer_references.json").read_text())
SLEEPSTUDY_LOGLIK = REFERENCES["uncentred"]["lmer_default"]["logLik"]  # −871.814135979976


def read_csv(name: str) -> dict[str, torch.Tensor]:
    with open(DATA / name) as handle:
        rows = list(csv.DictReader(handle))
    return {key: torch.tensor([float(row[key]) for row in rows]) for key in rows[0]}


def sleepstudy():
    d = datasets.load("sleepstudy")
    g, _ = indicator_codes(d["Subject"])
    X = design_matrix(d["Days"], intercept=True)
    return d["Reaction"], g, X


def slope_model(g, covariates, n=180):
    return rf.Sum(Subject=rf.Grouped(g, covariates=covariates, cov=rf.Unstructured(2)), residual=rf.Scalar(n))


def variances(result) -> dict[str, float]:
    cov = result.natural["Subject"]["cov"]
    return {
        "intercept": float(cov["sigma^2_0_0"]),
        "covariance": float(cov["sigma^2_1_0"]),
        "slope": float(cov["sigma^2_1_1"]),
        "residual": float(result.natural["residual"]["sigma^2"]),
    }


def assert_relative(actual: dict, expected: dict, rel: float):
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=rel), (key, actual, expected)


# --------------------------------------------------------------- the rows of the table
def test_confounded_random_intercept_is_not_identifiable_not_converged():
    # Z's columns lie in col(X): ℓ is flat in σ²_g (lme4's ℓ-vs-θ profile in the reference file).
    y, g, _ = sleepstudy()
    reference = REFERENCES["confounded"]
    flat = reference["reml_logLik_vs_theta"]["logLik"]
    assert max(flat) - min(flat) < 1e-9  # the flatness the test relies on, from lme4
    result = rf.fit(rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(180)), y, torch.nn.functional.one_hot(g).double())
    assert int(result.status) == 5 and not bool(result.converged)
    assert "g/cov/sigma^2" in result.message
    assert float(result.loglik) == pytest.approx(reference["lmer"]["logLik"], abs=1e-7)
    residual = float(result.natural["residual"]["sigma^2"])
    assert residual == pytest.approx(reference["lmer"]["variances"]["var_residual"], rel=1e-6)


@pytest.mark.parametrize("start", [15.0, 20.0])
def test_a_start_far_off_reaches_the_optimum(start):
    y, g, X = sleepstudy()
    result = rf.fit(slope_model(g, X), y, X, init=torch.tensor([start, 0.0, start, start]))
    assert int(result.status) == 0
    assert float(result.loglik) == pytest.approx(SLEEPSTUDY_LOGLIK, abs=1e-8)
    assert not bool(result.at_boundary.any())


def test_data_times_1e80_give_the_same_optimum():
    y, g, X = sleepstudy()
    scale = 1e80
    result = rf.fit(slope_model(g, X), y * scale, X)
    assert int(result.status) == 0
    # y → c·y: V → c²V, so ℓ shifts by −(n − p)·log c and variances scale by c².
    assert float(result.loglik) == pytest.approx(SLEEPSTUDY_LOGLIK - 178 * math.log(scale), abs=1e-6)
    expected = REFERENCES["uncentred"]["lmer_default"]["variances"]
    actual = variances(result)
    assert actual["residual"] / scale**2 == pytest.approx(expected["var_residual"], rel=1e-5)
    assert actual["slope"] / scale**2 == pytest.approx(expected["var_Subject_Days"], rel=1e-5)


def test_data_times_1e_minus_80_overflow_honestly():
    y, g, X = sleepstudy()
    with pytest.raises(ValueError, match="overflowed.*divide y by its standard deviation"):
        rf.fit(slope_model(g, X), y * 1e-80, X)
    batched = rf.fit_batched(slope_model(g, X), (y * 1e-80)[None], X)
    assert batched.status.tolist() == [8] and not bool(batched.converged.any())


@pytest.mark.parametrize("case", ["ar1_noise_interior", "ar1_noise"])
def test_ar1_plus_noise_converges_from_the_default_start(case):
    # The seed's own model. At ρ = 0 its AI matrix is singular by symmetry; the start avoids it.
    y = read_csv(f"{case}.csv")["y"]
    n = y.shape[0]
    result = rf.fit(rf.Sum(ar=rf.AR1(n), noise=rf.Scalar(n)), y, torch.ones(n, 1))
    expected = REFERENCES[case]["direct_optim"]
    assert int(result.status) == 0
    assert float(result.loglik) == pytest.approx(expected["logLik"], abs=1e-8)
    assert float(result.natural["ar"]["sigma^2"]) == pytest.approx(expected["var_ar"], rel=1e-5)
    assert float(result.natural["ar"]["rho"]) == pytest.approx(expected["rho"], rel=1e-5)
    assert float(result.beta[0]) == pytest.approx(expected["mu_hat"], rel=1e-8)
    noise = float(result.natural["noise"]["sigma^2"])
    if case == "ar1_noise":  # the optimum is on the boundary σ²_noise = 0 (one-sided derivative < 0)
        assert REFERENCES[case]["boundary_fit_var_noise_0"]["dlogLik_dvar_noise_at_0"] < 0
        assert result.at_boundary.tolist() == [False, False, True] and noise < 1e-10
    else:
        assert noise == pytest.approx(expected["var_noise"], rel=1e-4)
        assert not bool(result.at_boundary.any())


def test_uncentred_slope_reaches_the_optimum_lme4_misses():
    y, g, X = sleepstudy()
    uncentred = X.clone()
    uncentred[:, 1] += 100
    result = rf.fit(slope_model(g, uncentred), y, X)
    reference = REFERENCES["uncentred"]
    assert reference["lmer_Days100"]["logLik"] < SLEEPSTUDY_LOGLIK - 9  # lme4 stops 9.9 below
    assert int(result.status) == 0
    assert float(result.loglik) == pytest.approx(SLEEPSTUDY_LOGLIK, abs=1e-8)
    implied = reference["implied_Days100_components_from_default"]
    expected = {
        "intercept": implied["var_Subject_intercept"],
        "covariance": implied["cov_Subject_intercept_Days100"],
        "slope": implied["var_Subject_Days100"],
        "residual": implied["var_residual"],
    }
    assert_relative(variances(result), expected, rel=1e-5)


def test_no_intercept_model_matches_lme4():
    y, g, X = sleepstudy()
    reference = REFERENCES["no_intercept"]
    result = rf.fit(slope_model(g, X), y, X[:, 1:])
    assert int(result.status) == 0
    assert float(result.loglik) == pytest.approx(reference["logLik"], abs=1e-7)
    # ℓ is flat to 1e-10 over β ± 1e-5 here: lme4 and nlme themselves differ by 4e-6 in β.
    assert float(result.loglik) >= min(reference["logLik"], reference["nlme_check"]["logLik"]) - 1e-10
    for beta in (reference["beta"]["Days"], reference["nlme_check"]["beta"]["Days"]):
        assert float(result.beta[0]) == pytest.approx(beta, rel=2e-5)
    expected = reference["variances"]
    assert_relative(
        variances(result),
        {
            "intercept": expected["var_Subject_intercept"],
            "covariance": expected["cov_Subject_intercept_Days"],
            "slope": expected["var_Subject_Days"],
            "residual": expected["var_residual"],
        },
        rel=1e-4,
    )


def test_no_fixed_effects_matches_lme4():
    y, g, X = sleepstudy()
    result = rf.fit(slope_model(g, X), y, X[:, :0])
    assert int(result.status) == 0
    assert float(result.loglik) == pytest.approx(REFERENCES["no_fixed"]["lmer_REML"]["logLik"], abs=1e-7)


def test_float32_converges_at_float32_accuracy_and_says_so():
    y, g, X = sleepstudy()
    result = rf.fit(slope_model(g, X.float()), y.float(), X.float())
    assert int(result.status) == 0
    assert result.loglik.dtype == torch.float32
    assert float(result.loglik) == pytest.approx(SLEEPSTUDY_LOGLIK, rel=1e-6)
    assert "float32" in result.summary()


def test_extreme_variance_ratio_is_never_a_false_convergence():
    # σ²_g/σ²_e ≈ 1e12: ℓ itself carries round-off of about 1e-3 here (V's condition number), so the
    # fit may stop short; what it must not do is report convergence away from the closed form.
    data = read_csv("extreme_ratio.csv")
    g, _ = indicator_codes(data["g"].long())
    expected = REFERENCES["extreme_ratio"]["closed_form"]
    result = rf.fit(rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(200)), data["y"], torch.ones(200, 1), max_iter=50)
    residual = float(result.natural["residual"]["sigma^2"])
    assert residual == pytest.approx(expected["var_residual"], rel=1e-2)  # the floor no longer cuts it
    if bool(result.converged):
        assert float(result.loglik) == pytest.approx(expected["logLik"], abs=1e-6)


# ------------------------------------------------------------------------ clear errors
def test_nan_in_a_covariate_names_the_term():
    y, g, X = sleepstudy()
    bad = X.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"Subject\.covariates .*NaN.*rows \[3\]"):
        rf.fit(slope_model(g, bad), y, X)


def test_forgotten_residual_is_named():
    y, g, X = sleepstudy()
    with pytest.raises(ValueError, match="no residual term"):
        rf.fit(rf.Grouped(g, covariates=X, cov=rf.Unstructured(2)), y, X)


@pytest.mark.parametrize("driver", ["fit", "fit_batched"])
@pytest.mark.parametrize(
    "init, match",
    [
        ({"g": {"cov": {"sigma^2": 0.0}}, "residual": {"sigma^2": 0.0}, "typo": 1.0}, r"not free parameters.*'typo'"),
        ({"g": {"cov": {"sigma^2": 0.0}}}, r"init is missing \['residual/sigma\^2'\]"),
        ({"g": {"cov": {"sigma^2": math.nan}}, "residual": {"sigma^2": 0.0}}, r"NaN or inf for \['g/cov/sigma\^2'\]"),
        (torch.tensor([0.0, math.inf]), r"NaN or inf for \['residual/sigma\^2'\]"),
        (torch.zeros(3), r"init must have shape"),
    ],
)
def test_init_is_read_the_same_way_by_both_drivers(driver, init, match):
    y, g, X = sleepstudy()
    s = rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(180))
    with pytest.raises(ValueError, match=match):
        if driver == "fit":
            rf.fit(s, y, X, init=init)
        else:
            rf.fit_batched(s, y[None], X, init=init)


def test_init_accepts_python_floats_in_both_drivers():
    y, g, X = sleepstudy()
    s = rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(180))
    init = {"g": {"cov": {"sigma^2": 3.0}}, "residual": {"sigma^2": 3.0}}
    single = rf.fit(s, y, X, init=init)
    batched = rf.fit_batched(s, y[None], X, init=init)
    assert int(single.status) == 0 and batched.status.tolist() == [0]
    assert read_init(s, init, 2, torch.float64, "cpu").tolist() == [[3.0, 3.0], [3.0, 3.0]]


@pytest.mark.parametrize("driver", [rf.fit, rf.fit_batched])
@pytest.mark.parametrize(
    "option, value",
    [("max_iter", 0), ("max_iter", -1), ("max_tries", 0), ("tol", 0.0), ("tol", math.nan), ("max_step", 0.0)],
)
def test_both_drivers_reject_the_same_options(driver, option, value):
    y, g, X = sleepstudy()
    s = rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(180))
    with pytest.raises(ValueError, match=option):
        driver(s, y if driver is rf.fit else y[None], X, **{option: value})


def test_variance_floor_is_on_the_data_scale_not_the_start():
    y, g, X = sleepstudy()
    s = rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(180))
    reference = default_init(s, y, X)
    low_default, _ = raw_bounds(s, reference)
    low_far, _ = raw_bounds(s, reference, reference + 10.0)  # an init ×e²⁰ in natural units
    assert torch.equal(low_default, low_far)
    # floor = 100·ε × the start's natural variance: ½ log(100 ε) below it on the log-σ scale.
    expected = reference + 0.5 * math.log(variance_floor(torch.float64))
    assert torch.allclose(low_default, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------ drawn models
def make_problem(family: str, seed: int, log_scale: float, groups: int, size: int, level: float):
    """(structure, Y (3, n), X) of one model family; ``level`` is the family's knob (the spread of
    the group effects, the slope covariate's shift, or the AR(1) ρ)."""
    generator = torch.Generator().manual_seed(seed)
    n = groups * size
    g = torch.arange(n) // size
    X = torch.ones(n, 1)
    B = 3
    noise = torch.randn(B, n, generator=generator)
    if family in ("intercept", "confounded"):
        effects = level * torch.randn(B, groups, generator=generator)
        Y = effects[:, g] + noise
        s = rf.Sum(g=rf.Grouped(g), residual=rf.Scalar(n))
        if family == "confounded":
            X = torch.nn.functional.one_hot(g).double()
    elif family == "slope":
        x = torch.arange(n, dtype=torch.float64) % size + level
        covariates = torch.stack([torch.ones(n), x], 1)
        X = covariates.clone()
        slopes = torch.randn(B, groups, generator=generator)
        Y = 2.0 + slopes[:, g] * (x - level) + noise
        s = rf.Sum(g=rf.Grouped(g, covariates=covariates, cov=rf.Unstructured(2)), residual=rf.Scalar(n))
    elif family == "ar1":
        walk = torch.randn(B, n, generator=generator)
        for t in range(1, n):
            walk[:, t] = level * walk[:, t - 1] + math.sqrt(1 - level**2) * walk[:, t]
        Y = walk + 0.5 * noise
        s = rf.Sum(ar=rf.AR1(n), noise=rf.Scalar(n))
    else:  # CompoundSymmetric + Scalar: the residual is confounded with the diagonal of CS
        Y = noise
        s = rf.Sum(cs=rf.CompoundSymmetric(n), residual=rf.Scalar(n))
    return s, 10.0**log_scale * Y, X


LEVELS = {
    "intercept": [0.0, 0.3, 3.0],
    "confounded": [0.0, 3.0],
    "slope": [0.0, 20.0],
    "ar1": [0.0, 0.5, 0.9],
    "compound": [0.0],
}


@st.composite
def drawn_problems(draw):
    """Arguments of :func:`make_problem` over its families, degenerate ones included: a variance
    at the boundary (spread 0), a confounded random intercept, an uncentred slope, groups of one,
    responses scaled by 10^±3."""
    family = draw(st.sampled_from(sorted(LEVELS)))
    return (
        family,
        draw(st.integers(0, 2**31 - 1)),
        draw(st.floats(-3, 3)),
        draw(st.integers(2, 6)),
        draw(st.integers(2 if family == "slope" else 1, 5)),
        draw(st.sampled_from(LEVELS[family])),
    )


def nearly_singular(ai: torch.Tensor, at_boundary: torch.Tensor, threshold: float = 1e-6) -> bool:
    """Whether the unit-diagonal scaled AI on the parameters off their bounds has an eigenvalue
    below ``threshold`` (or is not finite): round-off then moves θ along the weak direction and
    can tip the verdict "identifiable"."""
    free = ~at_boundary
    sub = ai[free][:, free]
    if sub.numel() == 0:
        return False
    diagonal = torch.diagonal(sub)
    if not bool(torch.isfinite(sub).all()) or bool((diagonal <= 0).any()):
        return True
    root = diagonal.rsqrt()
    try:
        smallest = torch.linalg.eigvalsh(sub * root[:, None] * root[None, :])[0]
    except torch.linalg.LinAlgError:  # eigh fails to converge only on a hopeless matrix
        return True
    return float(smallest) < threshold


@given(drawn_problems())
def test_batched_equals_single(arguments):
    """fit_batched on B datasets decides as fit does on each one.

    One dataset runs without vmap and a batch with it, so their round-off differs in the last
    bits. Where both converge: ℓ to 1e-8 and, where the problem is well conditioned, θ to 1e-6 in
    the metric of the information, (Δθ)ᵀ AI (Δθ) (a tiny fraction of a standard error). Where one
    does not (an AI matrix singular to round-off, a run that did not converge), the paths may part
    and what must hold is honesty: a fit that says "converged" is at least as good as the other's
    result, and equal verdicts on well-conditioned problems give equal ℓ.
    """
    s, Y, X = make_problem(*arguments)
    try:
        batched = rf.fit_batched(s, Y, X, max_iter=60)
    except ValueError:  # a problem of the inputs shared by every dataset: fit says the same
        with pytest.raises(ValueError):
            rf.fit(s, Y[0], X, max_iter=60)
        return
    for b in range(Y.shape[0]):
        try:
            single = rf.fit(s, Y[b], X, max_iter=60)
        except ValueError:  # fit raises what fit_batched flags before iterating
            assert int(batched.status[b]) in (3, 4, 6, 7, 8)
            continue
        status = (int(single.status), int(batched.status[b]))
        loglik = (float(single.loglik), float(batched.loglik[b]))
        tolerance = 1e-8 * (1 + abs(loglik[0]))

        def conditioned(threshold: float, single=single, b=b) -> bool:
            return not (
                nearly_singular(single.ai, single.at_boundary, threshold)
                or nearly_singular(batched.ai[b], batched.at_boundary[b], threshold)
            )

        if status == (0, 0):
            assert abs(loglik[0] - loglik[1]) <= tolerance, loglik
            if conditioned(1e-4):
                difference = single.history["params"][-1] - batched.history["params"][b, -1]
                free = ~(single.at_boundary | batched.at_boundary[b])
                distance = float(difference[free] @ single.ai[free][:, free] @ difference[free])
                # Converged points differ by what ℓ cannot resolve, along directions where the AI
                # matrix overstates the curvature: 1e-6 in its metric, far below a standard error.
                assert distance <= 100 * tolerance, (distance, difference)
        elif 0 in status:
            converged, other = (0, 1) if status[0] == 0 else (1, 0)
            assert loglik[converged] >= loglik[other] - tolerance, (status, loglik)
        else:
            assert set(status) <= {1, 2, 5, 8}, status
            if conditioned(1e-6) and status[0] == status[1] and status[0] != 1:
                assert abs(loglik[0] - loglik[1]) <= tolerance, (status, loglik)


def lbfgs_gain(s, theta: torch.Tensor, y: torch.Tensor, X: torch.Tensor) -> float:
    """How much an independent optimiser (L-BFGS on ℓ over the raw parameters) gains from θ."""
    start = float(rf.reml_loglik(s, theta, y, X))
    point = theta.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([point], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = -rf.reml_loglik(s, point, y, X)
        if torch.isfinite(loss):
            loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        end = float(rf.reml_loglik(s, point, y, X))
    return end - start if math.isfinite(end) else 0.0


@given(drawn_problems())
def test_no_false_convergence(arguments):
    s, Y, X = make_problem(*arguments)
    for b in range(Y.shape[0]):
        try:
            result = rf.fit(s, Y[b], X, max_iter=60)
        except ValueError:
            continue
        if not bool(result.converged):
            continue
        gain = lbfgs_gain(s, result.history["params"][-1], Y[b], X)
        assert gain <= 1e-6, f"status 0 but L-BFGS gains {gain:.3g} in ℓ ({result.names})"


# ------------------------------------------------------------------------ the step functions
def test_options_are_validated_once_with_the_option_named():
    assert Options().max_iter >= 1
    for name, value in [("max_iter", 1.5), ("lookahead", 0), ("max_step", math.inf), ("tol", -1.0)]:
        with pytest.raises(ValueError, match=name):
            Options(**{name: value})


def spd(k: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(k, k, generator=torch.Generator().manual_seed(seed))
    return a @ a.T + k * torch.eye(k)


def test_newton_direction_solves_the_free_system_and_holds_the_rest():
    ai, score = spd(3), torch.tensor([1.0, -2.0, 0.5])
    full = newton_direction(score, ai, torch.zeros(3, dtype=torch.bool))
    assert bool(full.definite)
    assert torch.allclose(full.delta, torch.linalg.solve(ai, score))
    assert float(full.decrement) == pytest.approx(float(score @ torch.linalg.solve(ai, score)))
    held = newton_direction(score, ai, torch.tensor([False, True, False]))
    free = [0, 2]
    assert float(held.delta[1]) == 0.0
    assert torch.allclose(held.delta[free], torch.linalg.solve(ai[free][:, free], score[free]))


def test_newton_direction_does_not_depend_on_units():
    # Rescaling a parameter (D AI D, D s) rescales its step and keeps "definite", as long as no
    # information becomes round-off next to another's (a ratio beyond 1/(10³ε) ≈ 4.5e12).
    ai, score = spd(3, seed=1), torch.tensor([0.3, 0.1, -0.7])
    D = torch.diag(torch.tensor([1e-3, 1.0, 1e3]))
    plain = newton_direction(score, ai, torch.zeros(3, dtype=torch.bool))
    scaled = newton_direction(D @ score, D @ ai @ D, torch.zeros(3, dtype=torch.bool))
    assert bool(scaled.definite)
    assert torch.allclose(D @ scaled.delta, plain.delta, rtol=1e-9)
    assert float(scaled.decrement) == pytest.approx(float(plain.decrement), rel=1e-9)


@pytest.mark.parametrize(
    "ai",
    [
        torch.tensor([[1.0, 1.0], [1.0, 1.0]]),  # singular: two parameters with one effect
        torch.tensor([[1.0, 2.0], [2.0, 1.0]]),  # indefinite
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]),  # a parameter without information
    ],
)
def test_a_singular_or_indefinite_ai_never_converges(ai):
    score = torch.tensor([0.0, 1e-30])
    newton = newton_direction(score, ai, torch.zeros(2, dtype=torch.bool))
    assert not bool(newton.definite) and float(newton.decrement) == 0.0
    assert not bool(converged(newton, torch.tensor(-10.0), 1e-12))
    assert int(stuck_status(newton.definite)) == 5


def test_damping_makes_an_indefinite_system_an_ascent_direction():
    ai, score = torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.tensor([1.0, 0.5])
    _, _, undamped_ok = ai_direction(score, ai, torch.zeros(2, dtype=torch.bool), 0.0)
    assert not bool(undamped_ok)
    delta, decrement, ok = ai_direction(score, ai, torch.zeros(2, dtype=torch.bool), torch.tensor(100.0))
    assert bool(ok) and float(decrement) > 0 and float(score @ delta) > 0
    # Heavy damping bends the step to the diagonally scaled score, s_k / (λ AI_kk).
    delta, _, _ = ai_direction(score, ai, torch.zeros(2, dtype=torch.bool), torch.tensor(1e8))
    assert torch.allclose(delta * 1e8, score / torch.diagonal(ai), rtol=1e-6)


def test_damping_grows_on_failure_and_relaxes_on_success():
    assert float(stiffened(torch.tensor(0.0))) == pytest.approx(1e-3)
    assert float(stiffened(torch.tensor(0.5))) == pytest.approx(5.0)
    assert float(relaxed(torch.tensor(5.0))) == pytest.approx(0.5)
    assert float(relaxed(torch.tensor(1e-7))) == 0.0


def test_convergence_needs_a_decrement_below_a_dtype_scaled_tolerance():
    definite = torch.tensor(True)
    loglik = torch.tensor(-500.0)
    assert bool(converged(Newton(torch.zeros(2), torch.tensor(1e-13), definite), loglik, 1e-12))
    assert not bool(converged(Newton(torch.zeros(2), torch.tensor(1e-6), definite), loglik, 1e-12))
    single = torch.tensor(-500.0, dtype=torch.float32)
    # float32: the tolerance scales with ε (2^29 larger) and the round-off of ℓ.
    assert float(decrement_tolerance(single, 1e-12)) >= 4 * float(loglik_resolution(single))
    assert float(decrement_tolerance(single, 1e-12)) > 1e3 * float(decrement_tolerance(loglik, 1e-12))


def test_acceptance_rejects_round_off_non_finite_and_insufficient_gains():
    now = torch.tensor(-871.8)
    resolution = float(loglik_resolution(now))
    assert bool(accepts(now + 1e-3, now, torch.tensor(1e-3)))
    assert not bool(accepts(now + 0.5 * resolution, now, torch.tensor(1e-20)))  # round-off only
    assert not bool(accepts(torch.tensor(-math.inf), now, torch.tensor(1.0)))
    assert not bool(accepts(torch.tensor(math.nan), now, torch.tensor(1.0)))
    assert not bool(accepts(now + 1e-5, now, torch.tensor(1.0)))  # Armijo: 1e-5 < 1e-4 · 1
    assert bool(polish_accepts(now - 0.5 * resolution, now))
    assert not bool(polish_accepts(now - 1e-6, now))


def test_predicted_gain_is_the_quadratic_model():
    ai, score, step = spd(2), torch.tensor([1.0, 2.0]), torch.tensor([0.1, -0.2])
    assert float(predicted_gain(score, ai, step)) == pytest.approx(float(score @ step - 0.5 * step @ ai @ step))


def test_expansion_only_where_the_model_understates_the_gain():
    now = torch.tensor(-914.0)
    assert bool(expands(torch.tensor(2e-3), torch.tensor(1e-3), now))
    assert not bool(expands(torch.tensor(1.1e-3), torch.tensor(1e-3), now))
    assert not bool(expands(torch.tensor(1e-12), torch.tensor(1e-14), now))  # round-off
    values = torch.tensor([[1.0, 2.0, 3.0, 2.0], [1.0, 0.5, 3.0, 4.0], [1.0, 2.0, math.nan, 5.0]])
    assert first_local_maximum(values).tolist() == [2, 0, 1]


def unstructured_point():
    s = rf.Sum(
        Subject=rf.Grouped(torch.arange(6) % 2, covariates=torch.ones(6, 2), cov=rf.Unstructured(2)), e=rf.Scalar(6)
    )
    pairs = correlation_pairs(s)
    theta = torch.tensor([0.3, -0.8, -0.2, 0.1])  # names: σ²_00, σ_10, σ²_11, residual
    return s, pairs, theta


def test_working_coordinates_round_trip_and_keep_the_decrement():
    s, pairs, theta = unstructured_point()
    assert pairs.tolist() == [[2, 0, 1]]  # variances σ²_11 and σ²_00 of covariance σ_10
    score, ai = torch.tensor([0.2, -0.1, 0.4, 0.05]), spd(4, seed=3)
    lower, upper = torch.full((4,), -30.0), torch.full((4,), math.inf)
    lower[1] = -math.inf
    scaled = torch.tensor([True, False, True, True])
    system = working_system(theta, score, ai, lower, upper, scaled, pairs)
    rho = theta[1] / math.exp(float(theta[0] + theta[2]))
    assert float(system.theta[1]) == pytest.approx(float(rho))
    assert torch.allclose(raw_parameters(system.theta, pairs), theta)
    assert bool(system.scaled.all())
    assert float(system.upper[1]) == pytest.approx(CORRELATION_LIMIT)
    free = torch.zeros(4, dtype=torch.bool)
    raw_decrement = newton_direction(score, ai, free).decrement
    working_decrement = newton_direction(system.score, system.ai, free).decrement
    assert float(working_decrement) == pytest.approx(float(raw_decrement), rel=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_working_jacobian_is_the_derivative_of_the_raw_parameters(k):
    # working_system's J (from pair_index's base and placement) must be ∂θ_raw/∂θ_working, the
    # derivative of raw_parameters, for 0, 1 and 3 correlation pairs (Unstructured(1), (2), (3)).
    s = rf.Sum(
        g=rf.Grouped(torch.arange(12) % 3, covariates=torch.ones(12, k), cov=rf.Unstructured(k)), e=rf.Scalar(12)
    )
    pairs = correlation_pairs(s)
    p = len(rf.param_names(s))
    assert pairs.shape == (k * (k - 1) // 2, 3)
    theta = torch.linspace(-0.4, 0.3, p, dtype=torch.float64)
    bounds = torch.full((p,), math.inf, dtype=torch.float64)
    score = torch.ones(p, dtype=torch.float64)
    system = working_system(theta, score, torch.eye(p, dtype=torch.float64), -bounds, bounds, bounds > 0, pairs)
    J = torch.func.jacfwd(lambda w: raw_parameters(w, pairs))(system.theta)
    assert torch.allclose(system.score, J.mT @ score, atol=1e-14)
    assert torch.allclose(system.ai, J.mT @ J, atol=1e-14)


def test_proposals_stay_in_the_box_and_the_correlation_cone():
    s, pairs, theta = unstructured_point()
    system = working_system(
        theta,
        torch.zeros(4),
        torch.eye(4),
        torch.tensor([-1.0, -math.inf, -1.0, -1.0]),
        torch.full((4,), math.inf),
        torch.tensor([True, False, True, True]),
        pairs,
    )
    raw, taken = propose(system, torch.tensor([-5.0, 50.0, 0.0, 0.0]), pairs)
    assert float(raw[0]) == -1.0  # the floor
    correlation = float(raw[1]) / math.exp(float(raw[0] + raw[2]))
    assert abs(correlation) <= CORRELATION_LIMIT
    assert float(taken[0]) == pytest.approx(-1.3)


def test_bounds_hold_only_what_pushes_outward():
    theta, lower, upper = (
        torch.tensor([-1.0, -1.0, 2.0]),
        torch.tensor([-1.0, -1.0, -5.0]),
        torch.tensor([5.0, 5.0, 2.0]),
    )
    score = torch.tensor([-0.5, 0.5, 0.1])
    assert active_bounds(theta, score, lower, upper).tolist() == [True, False, True]


def test_a_variance_with_no_resolvable_gain_left_goes_to_its_floor():
    theta = torch.tensor([-14.0, -14.0, -14.0, 0.5, -15.0, -15.0])
    lower = torch.full((6,), -15.0)
    # Gain of moving θ_k by Δ ≈ s·expm1(2Δ)/2 for ExpPow2: to the floor (Δ = −1) ≈ 0.43·|s|; from
    # the floor up by max_step = 3 ≈ 201·s.
    score = torch.tensor([-1e-13, -1e-3, 1e-13, -1e-13, 1e-16, 1e-6])
    # Near 0 a variance's log-scale information is tiny too (∝ σ⁴): going to the floor loses nothing.
    ai = torch.diag(torch.tensor([1e-20, 1e-20, 1e-20, 1.0, 1e-20, 1e-20]))
    system = Working(theta, score, ai, lower, torch.full((6,), math.inf), torch.ones(6, dtype=torch.bool))
    rates = torch.tensor([2.0, 2.0, 2.0, 0.0, 2.0, 2.0])  # the fourth is not a variance
    snap = negligible_to_floor(system, rates, loglik_resolution(torch.tensor(-500.0)), max_step=3.0)
    assert snap.tolist() == [True, False, False, False, True, False]
    raw, _ = propose(system, torch.zeros(6), torch.zeros(0, 3, dtype=torch.long), snap)
    assert raw.tolist() == [-15.0, -14.0, -14.0, 0.5, -15.0, -15.0]


def test_a_variance_at_a_stationary_point_is_not_snapped_to_its_floor():
    # Interior optimum: the score is round-off (here slightly negative) but going to the floor
    # would lose ½·AI_kk·(u/ax)² ≈ ½·40·(½)² of ℓ: not negligible.
    theta, lower = torch.tensor([1.0]), torch.tensor([-15.0])
    system = Working(
        theta, torch.tensor([-1e-14]), torch.tensor([[40.0]]), lower, torch.tensor([math.inf]), torch.tensor([True])
    )
    snap = negligible_to_floor(system, torch.tensor([2.0]), loglik_resolution(torch.tensor(-500.0)), max_step=3.0)
    assert snap.tolist() == [False]


def test_a_variance_at_its_floor_without_information_is_unidentified_not_at_the_boundary():
    floor = variance_floor(torch.float64)
    theta = torch.tensor([-10.0, -10.0, 1.0])
    lower = torch.tensor([-10.0, -10.0, -12.0])
    rates = torch.tensor([2.0, 2.0, 2.0])
    # Log-scale information at the floor shrinks as floor²: 5·floor² is an informed boundary
    # variance, 1e-60 one the data say nothing about.
    ai = torch.diag(torch.tensor([5.0 * floor**2, 1e-60, 40.0]))
    assert silent_at_floor(theta, ai, lower, rates, floor).tolist() == [False, True, False]


def test_line_search_window_is_capped_by_memory_without_changing_the_fit(monkeypatch):
    """A large fit evaluates few candidates per line-search round (their vmapped engine calls each
    hold copies of the prepared data); the window changes the schedule, never the result."""
    from reml_fn.fit import algorithm

    d = rf.datasets.load("sleepstudy")
    g, _ = rf.design.indicator_codes(d["Subject"])
    X = rf.design.design_matrix(d["Days"], intercept=True)
    s = rf.Sum(Subject=rf.Grouped(g, covariates=X, cov=rf.Unstructured(2)), residual=rf.Scalar(180))
    init = torch.tensor([15.0, 0.0, 15.0, 15.0], dtype=torch.float64)  # far off: damped rounds
    wide = rf.fit(s, d["Reaction"], X, init=init)
    monkeypatch.setattr(algorithm, "LINE_SEARCH_MEMORY", 1)  # every round: one candidate
    seen = []
    original = algorithm._lookahead_within_memory
    monkeypatch.setattr(
        algorithm,
        "_lookahead_within_memory",
        lambda o, b, name: seen.append(original(o, b, name).lookahead) or original(o, b, name),
    )
    narrow = rf.fit(s, d["Reaction"], X, init=init)
    assert seen == [1]
    assert int(narrow.status) == int(wide.status) == 0 and int(narrow.n_iter) == int(wide.n_iter)
    assert torch.equal(narrow.loglik, wide.loglik) and torch.equal(narrow.score, wide.score)
    assert abs(float(narrow.loglik) + 871.8141) < 1e-3  # lme4's optimum


def test_dense_engine_line_search_window_is_capped_by_its_matrices():
    """The dense engine's candidates each hold several n×n matrices: at n = 180 a 1 GiB round holds
    hundreds, at n = 20,000 (3.2 GB per matrix) one."""
    from reml_fn.fit import algorithm
    from reml_fn.fit.problem import Batch
    from reml_fn.fit.step import Options

    def capped(n):
        batch = Batch(None, (), None, torch.zeros(1, n), torch.zeros(n, 1), False)
        return algorithm._lookahead_within_memory(Options(), batch, "dense").lookahead

    assert capped(180) == Options().lookahead
    assert capped(20_000) == 1
    assert 1 < capped(2_000) < Options().lookahead
