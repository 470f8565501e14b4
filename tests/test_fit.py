"""The AI-REML driver: default starts, AR(1) from ρ = 0, FitResult, verbose output, bad input."""

from __future__ import annotations

import math

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import reml_fn as rf
from reml_fn import datasets
from reml_fn.design import indicator_matrix
from reml_fn.fit.start import dependent_columns, exact_linear_response


def peer_sim():
    d = datasets.load("peer_sim")
    y, n = d["y"], len(d["y"])
    X = torch.stack([torch.ones(n), d["x1"]], 1)
    Z1, _ = indicator_matrix(d["g1"])
    return y, X, Z1


def test_ar1_residual_fit_from_the_default_start():
    """torch-openreml crashes here (NaN AR(1) Jacobian at ρ = 0); its fit from a hand-picked start
    (inventory §8.1) gives θ̂ = [0.0011996, −0.2856694, 0.6949833], loglik −24.673456 (no constant,
    with its 1e-6 jitter)."""
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), R=rf.AR1(60))
    result = rf.fit(s, y, X)
    assert bool(result.converged)
    theta = rf.flatten_params(s, result.params)
    assert torch.allclose(
        theta, torch.tensor([0.0011996470393052276, -0.28566938397818625, 0.6949832615524528]), atol=2e-4
    )
    constant = 0.5 * (60 - 2) * math.log(2 * math.pi)
    assert float(result.loglik) == pytest.approx(-24.67345646420823 - constant, abs=1e-5)
    assert result.engine == "dense"


def test_fit_result_is_a_pytree_and_prints_a_summary():
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), residual=rf.Scalar(60))
    result = rf.fit(s, y, X, x_names=["(Intercept)", "x1"])
    leaves, spec = torch_pytree.tree_flatten(result)
    again = torch_pytree.tree_unflatten(leaves, spec)
    assert again.names == result.names and again.engine == result.engine and torch.equal(again.beta, result.beta)
    assert len(optree.tree_leaves(result, namespace="reml_fn")) == len(leaves)
    text = str(result)
    for piece in ("REML criterion at convergence", "g/G/sigma^2", "residual/sigma^2", "(Intercept)", "x1", "logLik"):
        assert piece in text
    assert repr(result).startswith("FitResult(loglik=")
    assert result.natural["g"]["G"]["sigma^2"] == pytest.approx(
        float(rf.constrain(s, result.params)["g"]["G"]["sigma^2"])
    )
    assert torch.allclose(result.se_beta, torch.diagonal(result.vcov_beta).sqrt())
    assert float(result.aic) == pytest.approx(float(result.reml_criterion) + 2 * (2 + 2))
    assert float(result.bic) == pytest.approx(float(result.reml_criterion) + 4 * math.log(60))


def test_verbose_levels(capsys):
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), residual=rf.Scalar(60))
    rf.fit(s, y, X, verbose=2)
    captured = capsys.readouterr()
    assert "iter   1  logLik" in captured.out + captured.err
    rf.fit(s, y, X, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_init_tree_and_flat_give_the_same_fit():
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), residual=rf.Scalar(60))
    flat = torch.tensor([0.3, -0.4])
    a = rf.fit(s, y, X, init=flat)
    b = rf.fit(s, y, X, init=rf.unflatten_params(s, flat))
    assert torch.equal(a.history["params"][0], flat)
    assert torch.equal(a.beta, b.beta)


def test_iteration_limit_is_reported():
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), residual=rf.Scalar(60))
    result = rf.fit(s, y, X, max_iter=1)
    assert not bool(result.converged) and int(result.status) == 1
    assert "iteration limit" in result.message and int(result.n_iter) == 1


@pytest.mark.parametrize("shift", [1e-2, 1e-9, 1e-13, 3e-15, 0.0])
def test_full_rank_test_is_matrix_ranks(shift):
    # dependent_columns' one-decomposition test reads the singular values itself; it must draw
    # the line where torch.linalg.matrix_rank does (σ_min > max(n, p)·ε·σ_max), up to a column
    # that differs from another by round-off.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, dtype=torch.float64, generator=generator)
    X = torch.stack(
        [torch.ones(40, dtype=torch.float64), x, x + shift * torch.randn(40, dtype=torch.float64, generator=generator)],
        1,
    )
    full_rank = int(torch.linalg.matrix_rank(X)) == 3
    assert (dependent_columns(X) == []) == full_rank
    assert full_rank == (shift >= 1e-13)  # both sides of the line are exercised


@pytest.mark.parametrize(
    "change, error, match",
    [
        ("nan_y", ValueError, r"y contains NaN or inf at positions \[3\]"),
        ("inf_X", ValueError, r"X contains NaN or inf \(rows \[5\], columns \[1\]\)"),
        ("short_y", ValueError, "rows but y has"),
        ("rank", ValueError, r"rank deficient: column\(s\) \['x1 copy'\]"),
        ("exact", ValueError, "exact linear function"),
        ("names", ValueError, "x_names has 1 names"),
        ("init_tree", ValueError, r"missing \['residual/sigma\^2'\]"),
        ("init_length", ValueError, "length 2"),
        ("not_pd", ValueError, "not positive definite at the starting point.*init="),
    ],
)
def test_bad_input_is_rejected_before_iterating(change, error, match):
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), residual=rf.Scalar(60))
    kwargs = {}
    names = ["(Intercept)", "x1"]
    if change == "nan_y":
        y = y.clone()
        y[3] = float("nan")
    elif change == "inf_X":
        X = X.clone()
        X[5, 1] = float("inf")
    elif change == "short_y":
        y = y[:-1]
    elif change == "rank":
        X = torch.cat([X, X[:, 1:] * 2.0], 1)
        names = ["(Intercept)", "x1", "x1 copy"]
    elif change == "exact":
        y = X @ torch.tensor([1.0, 2.0])
    elif change == "names":
        names = ["(Intercept)"]
    elif change == "init_tree":
        kwargs["init"] = {"g": {"G": {"sigma^2": torch.tensor(0.0)}}}
    elif change == "init_length":
        kwargs["init"] = torch.zeros(3)
    elif change == "not_pd":
        s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Unstructured(10)), residual=rf.Scalar(60))
        init = rf.flatten_params(s, s.init_params())
        init[-1] = -30.0  # residual variance e^{-60}; G's covariance drives V indefinite
        init[1] = 5.0
        kwargs["init"] = init
    with pytest.raises(error, match=match):
        rf.fit(s, y, X, x_names=names, **kwargs)


def test_singular_random_slope_fit_stops_at_the_correlation_limit():
    """With perfectly correlated random intercepts and slopes the REML optimum has |ρ| = 1 (lme4:
    a singular fit). The fit must converge there, flag the covariance, and reach the maximum of
    the rank-one model G = a aᵀ, which is the boundary itself."""
    g = torch.Generator().manual_seed(6)
    data = datasets.load("sleepstudy", categorical=("Subject",))
    days = data["Days"]
    codes = torch.arange(180) // 10
    X = torch.stack([torch.ones(180), days], 1)
    u = torch.randn(18, generator=g)
    y = 250 + 10 * days + 20 * u[codes] + 4 * u[codes] * days + 25 * torch.randn(180, generator=g)
    s = rf.Sum(subject=rf.Grouped(groups=codes, covariates=X, cov=rf.Unstructured(2)), residual=rf.Scalar(180))
    result = rf.fit(s, y, X)
    assert bool(result.converged), result.message
    assert result.boundary_names == ["subject/cov/sigma^2_1_0"]
    cov = result.natural["subject"]["cov"]
    rho = cov["sigma^2_1_0"] / (cov["sigma^2_0_0"] * cov["sigma^2_1_1"]).sqrt()
    assert abs(float(rho)) == pytest.approx(1.0, abs=1e-9)
    rank_one = rf.Sum(
        subject=rf.Grouped(groups=codes, covariates=X, cov=rf.Gram(rf.LowerTriangular(2, 1), gram_type="xxt")),
        residual=rf.Scalar(180),
    )
    a = torch.tensor([cov["sigma^2_0_0"].sqrt(), cov["sigma^2_1_0"] / cov["sigma^2_0_0"].sqrt()])
    start = torch.cat([a, rf.flatten_params(s, result.params)[-1:]])
    best = rf.fit(rank_one, y, X, init=start)
    assert float(result.loglik) == pytest.approx(float(best.loglik), abs=1e-6)
    assert float(result.loglik) >= float(best.loglik) - 1e-6


@pytest.mark.parametrize("case", ["constant", "linear", "linear_roundoff", "linear_huge", "constant_float32"])
def test_exact_fit_is_rejected_by_fit_and_flagged_by_fit_batched(case):
    """One relative test in both drivers: an exactly linear y leaves a residual of exactly 0 on
    some BLAS and of round-off size (≈1e-30 relative) on others; both must be refused."""
    y, X, Z1 = peer_sim()
    s = rf.Sum(g=rf.Propagate(Z=Z1, G=rf.Scalar(10)), residual=rf.Scalar(60))
    exact = X @ torch.tensor([1.0, 2.0])
    if case == "constant":
        y = torch.full_like(y, 7.25)
    elif case == "linear":
        y = exact
    elif case == "linear_roundoff":  # what lstsq leaves on some BLAS, made explicit
        y = exact * (1.0 + 1e-16 * torch.sin(torch.arange(60.0)))
    elif case == "linear_huge":
        y = exact * 1e80
    else:
        y, X = torch.full((60,), 3.5, dtype=torch.float32), X.float()
        s = rf.Sum(g=rf.Propagate(Z=Z1.float(), G=rf.Scalar(10)), residual=rf.Scalar(60))
    with pytest.raises(ValueError, match="exact linear function of X"):
        rf.fit(s, y, X)
    batched = rf.fit_batched(s, y[None], X)
    assert batched.status.tolist() == [6]


def test_small_real_noise_is_not_an_exact_fit():
    """The tolerance is relative to ‖y‖ and to ε: noise of 1e-9 relative on a linear trend is data."""
    y, X, _ = peer_sim()
    y = (X @ torch.tensor([1.0, 2.0])) * 1e60 + 1e51 * y
    exact, s2 = exact_linear_response(y, X)
    assert not bool(exact) and float(s2) > 0


class _WithoutVcov:
    """An engine with only the required methods (no ``ai_terms_and_vcov``): the fit takes
    (XᵀV⁻¹X)⁻¹ from its ``gls``."""

    name = "minimal"

    def __init__(self, inner):
        self.inner = inner

    def supports(self, s):
        return True

    def loglik(self, s, params, y, X, prepared=None):
        return self.inner.loglik(s, params, y, X)

    def ai_terms(self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None, prepared=None):
        return self.inner.ai_terms(s, params, y, X, jacobian)

    def jacobian_traces(self, s, params, jacobian="closed"):
        return self.inner.jacobian_traces(s, params, jacobian)

    def gls(self, s, params, y, X, prepared=None):
        return self.inner.gls(s, params, y, X)


@pytest.mark.parametrize("engine", ["mme", "dense", "blocks", "ml", "minimal"])
def test_beta_and_its_covariance_belong_to_the_returned_parameters(engine, monkeypatch):
    """β̂ and (XᵀV⁻¹X)⁻¹ of a fit come with the evaluation of its last point (no separate GLS call):
    they equal rf.blue and rf.vcov_beta at the returned parameters, for every engine, for ML fits
    and for an engine that has only ``gls``."""
    from reml_fn.reml import engines

    data = datasets.load("sleepstudy")
    g, _ = rf.design.indicator_codes(data["Subject"])
    X = rf.design.design_matrix(data["Days"], intercept=True).double()
    y = data["Reaction"].double()
    if engine == "blocks":
        s = rf.Sum(g=rf.Grouped(g), residual=rf.WithinGroup(g, "ar1"))
    else:
        s = rf.Sum(g=rf.Grouped(g, covariates=X, cov=rf.Unstructured(2)), residual=rf.Scalar(180))
    options = {"engine": engine} if engine in ("mme", "dense", "blocks") else {}
    if engine == "ml":
        options["REML"] = False
    if engine == "minimal":
        monkeypatch.setitem(engines.ENGINES, "minimal", _WithoutVcov(engines.ENGINES["dense"]))
        options["engine"] = "minimal"
    result = rf.fit(s, y, X, **options)
    assert int(result.status) == 0
    theta = rf.flatten_params(s, result.params)
    torch.testing.assert_close(result.beta, rf.blue(s, theta, y, X, engine="dense"), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.vcov_beta, rf.vcov_beta(s, theta, y, X, engine="dense"), rtol=1e-9, atol=1e-12)


def test_what_a_fit_keeps_on_a_structure_does_not_keep_it_alive():
    # param_specs, the MME layout and the moment start's terms are kept on the structure object
    # (reml_fn.tree.derived); none may refer back to it, or a large model's data would wait for
    # the cyclic garbage collector instead of going with the last reference.
    import gc
    import weakref

    d = datasets.load("sleepstudy")
    g = torch.unique(d["Subject"], return_inverse=True)[1]
    X = torch.stack([torch.ones(180, dtype=torch.float64), d["Days"]], 1)
    s = rf.Sum(Subject=rf.Grouped(g, covariates=X, cov=rf.Unstructured(2)), residual=rf.Scalar(180))
    rf.fit(s, d["Reaction"], X)
    assert any(key.startswith("_reml_fn_") for key in vars(s))  # something was kept
    alive = weakref.ref(s)
    gc.disable()
    try:
        del s
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_value_in_a_structures_shared_data_is_named(bad):
    g = torch.arange(12) % 3
    covariates = torch.stack([torch.ones(12, dtype=torch.float64), torch.arange(12, dtype=torch.float64)], 1)
    covariates[5, 1] = bad
    s = rf.Sum(g=rf.Grouped(g, covariates=covariates, cov=rf.Unstructured(2)), residual=rf.Scalar(12))
    y = torch.linspace(0.0, 1.0, 12, dtype=torch.float64).sin()
    with pytest.raises(
        ValueError, match=r"the structure's data g\.covariates \(shape \(12, 2\)\) contains NaN or inf \(rows \[5\]\)"
    ):
        rf.fit(s, y, torch.ones(12, 1, dtype=torch.float64))


def test_a_fitted_structure_pickles_and_copies_without_what_the_fit_kept_on_it():
    # What a fit keeps on a structure (reml_fn.tree.derived) includes closures, which do not
    # pickle: a structure fitted here and then sent to Dask workers must still pickle, and the copy
    # must fit to the same answer.
    import copy
    import pickle

    d = datasets.load("sleepstudy")
    g = torch.unique(d["Subject"], return_inverse=True)[1]
    X = torch.stack([torch.ones(180, dtype=torch.float64), d["Days"]], 1)
    s = rf.Sum(Subject=rf.Grouped(g, covariates=X, cov=rf.Unstructured(2)), residual=rf.Scalar(180))
    first = rf.fit(s, d["Reaction"], X)
    assert any(key.startswith("_reml_fn_") for key in vars(s))
    for other in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.copy(s)):
        assert not any(key.startswith("_reml_fn_") for key in vars(other))
        assert float(rf.fit(other, d["Reaction"], X).loglik) == float(first.loglik)
