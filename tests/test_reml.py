"""Pure REML functions: log-likelihood, score and AI terms, post-estimation, engines, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.testing import trees_with_params


def simulated(n: int = 24, groups: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(n) % groups
    Z = torch.nn.functional.one_hot(codes, groups).double()
    x = torch.randn(n, generator=g)
    X = torch.stack([torch.ones(n), x], 1)
    y = 1.0 + 0.5 * x + Z @ torch.randn(groups, generator=g) + 0.7 * torch.randn(n, generator=g)
    return Z, X, y


def model(n: int = 24, groups: int = 4):
    Z, X, y = simulated(n, groups)
    s = rf.Sum(group=rf.Propagate(Z=Z, G=rf.Scalar(groups)), time=rf.AR1(n), residual=rf.Scalar(n))
    return s, X, y


def naive_loglik(V, y, X):
    """ℓ from the textbook formula with explicit inverses."""
    n, p = X.shape
    Vinv = torch.linalg.inv(V)
    xvx = X.T @ Vinv @ X
    P = Vinv - Vinv @ X @ torch.linalg.inv(xvx) @ X.T @ Vinv
    return -0.5 * (torch.logdet(V) + torch.logdet(xvx) + y @ P @ y) - 0.5 * (n - p) * math.log(2 * math.pi)


def test_loglik_matches_textbook_formula_and_vmaps():
    s, X, y = model()
    params = rf.unflatten_params(s, torch.tensor([0.2, -0.3, 0.4, -0.5]))
    value = rf.reml_loglik(s, params, y, X)
    assert float(value) == pytest.approx(float(naive_loglik(s.build(params), y, X)), rel=1e-12)
    Y = torch.stack([y, y * 2.0, y - 1.0])
    batched = torch.func.vmap(rf.reml_loglik, in_dims=(None, None, 0, None))(s, params, Y, X)
    loop = torch.stack([rf.reml_loglik(s, params, row, X) for row in Y])
    assert torch.allclose(batched, loop, rtol=1e-12, atol=0)


def test_score_equals_autodiff_gradient_and_ai_is_symmetric_psd():
    s, X, y = model()
    params = rf.unflatten_params(s, torch.tensor([0.1, 0.5, -0.2, 0.3]))
    terms = rf.ai_terms(s, params, y, X)
    gradient = torch.func.grad(lambda p: rf.reml_loglik(s, p, y, X))(params)
    assert torch.allclose(terms.score, rf.flatten_params(s, gradient), rtol=1e-10, atol=1e-12)
    assert torch.equal(terms.ai, terms.ai.T)
    assert float(torch.linalg.eigvalsh(terms.ai).min()) >= -1e-10
    assert float(terms.loglik) == pytest.approx(float(rf.reml_loglik(s, params, y, X)), rel=1e-14)


@given(trees_with_params(max_depth=2, shape=(4, 4)), st.integers(0, 2**16))
def test_score_equals_autodiff_on_random_structures(tree_and_params, seed):
    s, params = tree_and_params
    assume(rf.param_names(s))
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(4, generator=g)
    X = torch.stack([torch.ones(4), torch.randn(4, generator=g)], 1)
    # Only symmetric positive definite V defines a likelihood: add a ridge through a Sum.
    V = rf.Sum(model=s, ridge=rf.Scalar(4))
    ridge = {"sigma^2": torch.tensor(1.0)}
    V_params = {"model": params, "ridge": ridge} if params else {"ridge": ridge}
    built = V.build(V_params)
    assume(torch.allclose(built, built.T) and float(torch.linalg.eigvalsh(0.5 * (built + built.T)).min()) > 1e-3)
    terms = rf.ai_terms(V, V_params, y, X)
    gradient = torch.func.grad(lambda p: rf.reml_loglik(V, p, y, X))(V_params)
    expected = rf.flatten_params(V, gradient)
    assert torch.allclose(terms.score, expected, rtol=1e-8, atol=1e-8 * (1 + float(expected.abs().max())))


@pytest.mark.parametrize("method", ["fwd", "rev"])
def test_jacobian_methods_give_the_same_ai_terms(method):
    s, X, y = model()
    params = rf.unflatten_params(s, torch.tensor([0.1, 0.5, -0.2, 0.3]))
    closed = rf.ai_terms(s, params, y, X)
    other = rf.ai_terms(s, params, y, X, jacobian=method)
    for a, b in zip(closed, other):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_hutchpp_trace_is_reproducible_and_exact_with_enough_probes():
    s, X, y = model()
    params = rf.unflatten_params(s, torch.tensor([0.1, 0.5, -0.2, 0.3]))
    exact = rf.ai_terms(s, params, y, X)
    full = rf.ai_terms(s, params, y, X, trace="hutchpp", generator=torch.Generator().manual_seed(1), probes=3 * 24)
    assert torch.allclose(full.score, exact.score, rtol=1e-9, atol=1e-9)
    one = rf.ai_terms(s, params, y, X, trace="hutchpp", generator=torch.Generator().manual_seed(7), probes=12)
    two = rf.ai_terms(s, params, y, X, trace="hutchpp", generator=torch.Generator().manual_seed(7), probes=12)
    assert torch.equal(one.score, two.score)
    # The AI matrix and log-likelihood stay exact; only the trace part of the score is estimated.
    assert torch.equal(one.ai, exact.ai) and torch.equal(one.loglik, exact.loglik)


def test_hutchpp_is_unbiased_on_average():
    s, X, y = model()
    params = rf.unflatten_params(s, torch.tensor([0.1, 0.5, -0.2, 0.3]))
    exact = rf.ai_terms(s, params, y, X).score
    draws = torch.stack(
        [
            rf.ai_terms(s, params, y, X, trace="hutchpp", generator=torch.Generator().manual_seed(k), probes=6).score
            for k in range(200)
        ]
    )
    spread = draws.std(0) / math.sqrt(200)
    assert bool(((draws.mean(0) - exact).abs() <= 5 * spread + 1e-9).all())


def test_not_positive_definite_gives_minus_infinity_not_an_exception():
    n = 5
    s = rf.Unstructured(n)
    params = s.init_params()
    params["sigma^2_1_0"] = torch.tensor(3.0)  # |cov| > variances: indefinite
    y, X = torch.randn(n), torch.ones(n, 1)
    assert float(rf.reml_loglik(s, params, y, X)) == -math.inf
    batch = {k: torch.stack([v, torch.zeros(())]) for k, v in params.items()}
    values = torch.func.vmap(lambda p: rf.reml_loglik(s, p, y, X))(batch)
    assert float(values[0]) == -math.inf and math.isfinite(float(values[1]))


def test_post_estimation_formulas():
    Z, X, y = simulated()
    s = rf.Sum(group=rf.Propagate(Z=Z, G=rf.Scalar(4)), residual=rf.Scalar(24))
    params = rf.unflatten_params(s, torch.tensor([0.3, -0.2]))
    V = s.build(params)
    Vinv = torch.linalg.inv(V)
    beta = torch.linalg.solve(X.T @ Vinv @ X, X.T @ Vinv @ y)
    assert torch.allclose(rf.blue(s, params, y, X), beta, rtol=1e-10)
    assert torch.allclose(rf.vcov_beta(s, params, y, X), torch.linalg.inv(X.T @ Vinv @ X), rtol=1e-10)
    G = math.exp(0.6) * torch.eye(4)
    u = G @ Z.T @ Vinv @ (y - X @ beta)
    effects = rf.blup(s, params, y, X)
    assert list(effects) == ["group"]
    assert torch.allclose(effects["group"].reshape(-1), u, rtol=1e-9, atol=1e-12)
    assert torch.allclose(rf.predict(s, params, y, X), X @ beta, rtol=1e-10)
    conditional = rf.predict(s, params, y, X, conditional=True)
    assert torch.allclose(conditional, X @ beta + Z @ u, rtol=1e-9)
    assert torch.allclose(rf.residuals(s, params, y, X, conditional=True), y - conditional, rtol=1e-9)


def test_mixed_model_convenience():
    Z, X, y = simulated()
    one = rf.mixed_model({"group": (Z, rf.Scalar(4))}, residual=rf.Scalar(24))
    assert rf.param_names(one) == ["group/G/sigma^2", "residual/sigma^2"]
    two = rf.mixed_model({"a": (Z, rf.Scalar(4)), "b": (Z[:, :2], rf.Diagonal(2))}, residual=rf.Scalar(24))
    assert rf.param_names(two) == ["a/G/sigma^2", "b/G/sigma^2_0", "b/G/sigma^2_1", "residual/sigma^2"]
    assert rf.mixed_model({}, residual=rf.Scalar(24)).shape == (24, 24)
    with pytest.raises(ValueError, match="reserved"):
        rf.mixed_model({"residual": (Z, rf.Scalar(4))}, residual=rf.Scalar(24))
    with pytest.raises(ValueError, match=r"\(Z, G\) pair"):
        rf.mixed_model({"a": Z}, residual=rf.Scalar(24))
    with pytest.raises(TypeError, match="dict"):
        rf.mixed_model([(Z, rf.Scalar(4))], residual=rf.Scalar(24))
    with pytest.raises(ValueError, match="Propagate needs Z"):
        rf.mixed_model({"a": (Z, rf.Scalar(3))}, residual=rf.Scalar(24))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda s, y, X: (s, y[:-1], X), ValueError, "rows but y has"),
        (lambda s, y, X: (s, y.reshape(-1, 1), X), ValueError, "1-D"),
        (lambda s, y, X: (s, y, X[:, 0]), ValueError, "2-D"),
        (lambda s, y, X: (rf.Scalar(5), y, X), ValueError, "builds a"),
        (lambda s, y, X: (s, y.float(), X), TypeError, "share a dtype"),
        (lambda s, y, X: (s, y.long(), X), TypeError, "floating point"),
        (lambda s, y, X: (s, list(y), X), TypeError, "must be tensors"),
    ],
)
def test_bad_data_is_rejected(mutate, error, match):
    s, X, y = model()
    s2, y2, X2 = mutate(s, y, X)
    with pytest.raises(error, match=match):
        rf.reml_loglik(s2, None, y2, X2)


def test_wrong_parameter_trees_and_options_are_rejected():
    s, X, y = model()
    with pytest.raises(ValueError, match=r"missing \['time/rho'\]"):
        rf.reml_loglik(
            s,
            {
                "group": {"G": {"sigma^2": torch.tensor(0.0)}},
                "time": {"sigma^2": torch.tensor(0.0)},
                "residual": {"sigma^2": torch.tensor(0.0)},
            },
            y,
            X,
        )
    with pytest.raises(ValueError, match="length 4"):
        rf.reml_loglik(s, torch.zeros(3), y, X)
    with pytest.raises(ValueError, match="unknown trace"):
        rf.ai_terms(s, None, y, X, trace="magic")
    with pytest.raises(ValueError, match="unknown Jacobian"):
        rf.ai_terms(s, None, y, X, jacobian="magic")
    with pytest.raises(ValueError, match="unknown engine"):
        rf.reml_loglik(s, None, y, X, engine="magic")
    with pytest.raises(ValueError, match="cannot handle"):
        rf.reml_loglik(s, None, y, X, engine="mme")  # AR(1) residual: no MME form
