"""The mixed-model-equation engine: agrees with the dense engine (log-likelihood, score, AI, β̂,
cov(β̂), BLUPs, predictions) on fixed and hypothesis-drawn models, is selected automatically, is
pure (vmap = loop, score = grad), handles zero variances and non-PD points like dense, and runs at
n = 200,000 where the dense V would need 320 GB."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.combinators.base import tree_map
from reml_fn.datasets.models import MODELS, model
from reml_fn.params import param_specs
from reml_fn.reml import ENGINES, select_engine
from reml_fn.reml.mme import psd_cholesky
from reml_fn.transforms import ExpPow2

MME = ENGINES["mme"]
DENSE = ENGINES["dense"]


def close(actual, expected, rel=1e-8):
    """|actual − expected| ≤ rel · (1 + max|expected|): agreement to 1e-8 of the quantity's scale."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = 1.0 + (expected.abs().max() if expected.numel() else 0.0)
    error = (actual - expected).abs().max() if expected.numel() else torch.tensor(0.0)
    assert bool(error <= rel * scale), f"max error {float(error):.3e} (scale {float(scale):.3e})"


def assert_engines_agree(s, params, y, X, rel=1e-8):
    assert MME.supports(s)
    mme = rf.ai_terms(s, params, y, X, engine="mme")
    dense = rf.ai_terms(s, params, y, X, engine="dense")
    close(mme.loglik, dense.loglik, rel)
    close(mme.score, dense.score, rel)
    close(mme.ai, dense.ai, rel)
    close(mme.beta, dense.beta, rel)
    close(rf.reml_loglik(s, params, y, X, engine="mme"), dense.loglik, rel)
    close(rf.blue(s, params, y, X, engine="mme"), rf.blue(s, params, y, X, engine="dense"), rel)
    close(rf.vcov_beta(s, params, y, X, engine="mme"), rf.vcov_beta(s, params, y, X, engine="dense"), rel)
    blup_mme, blup_dense = rf.blup(s, params, y, X, engine="mme"), rf.blup(s, params, y, X, engine="dense")
    assert blup_mme.keys() == blup_dense.keys()
    for path in blup_dense:
        close(blup_mme[path], blup_dense[path], rel)
    for conditional in (False, True):
        close(
            rf.predict(s, params, y, X, conditional=conditional, engine="mme"),
            rf.predict(s, params, y, X, conditional=conditional, engine="dense"),
            rel,
        )
    return mme


def simulate(seed, n, p=2):
    generator = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.ones(n, 1), torch.randn(n, p - 1, generator=generator)], dim=1)
    return generator, X


def codes(generator, n, m):
    return torch.randint(0, m, (n,), generator=generator)


def models() -> dict:
    n = 40
    generator, X = simulate(0, n, p=3)
    g, h = codes(generator, n, 6), codes(generator, n, 4)
    t = torch.randn(n, 1, generator=generator)
    slope = torch.cat([torch.ones(n, 1), t], dim=1)
    Z = torch.randn(n, 3, generator=generator)
    y = (
        X @ torch.tensor([1.0, -0.5, 0.3])
        + torch.randn(6, generator=generator)[g]
        + torch.randn(n, generator=generator)
    )
    return (
        {
            "random_intercept": (rf.Sum(subject=rf.Grouped(g), residual=rf.Scalar(n)), [0.2, -0.1]),
            "intercept_and_slope": (
                rf.Sum(subject=rf.Grouped(g, rf.Unstructured(2), covariates=slope), residual=rf.Scalar(n)),
                [0.3, 0.25, -0.4, -0.2],
            ),
            "independent_slopes": (
                rf.Sum(subject=rf.Grouped(g, rf.Diagonal(2), covariates=slope), residual=rf.Scalar(n)),
                [0.3, -0.4, -0.2],
            ),
            "crossed": (rf.Sum(a=rf.Grouped(g), b=rf.Grouped(h), residual=rf.Scalar(n)), [0.3, -0.5, 0.1]),
            "diagonal_residual": (
                rf.Sum(subject=rf.Grouped(g), residual=rf.Diagonal(n)),
                [0.1] + torch.linspace(-0.5, 0.5, n).tolist(),
            ),
            "scalar_plus_diagonal_residual": (
                rf.Sum(subject=rf.Grouped(g), noise=rf.Scalar(n), residual=rf.Diagonal(n)),
                [0.1, -1.0] + torch.linspace(-0.8, 0.2, n).tolist(),
            ),
            "propagate_and_grouped": (
                rf.Sum(
                    subject=rf.Grouped(g, rf.Unstructured(2), covariates=slope),
                    marker=rf.Propagate(Z=Z, G=rf.Diagonal(3)),
                    block=rf.Grouped(h),
                    residual=rf.Scalar(n),
                    fixed_noise=rf.Identity(n),
                ),
                [0.2, 0.1, -0.3, -0.5, 0.0, -0.2, 0.1, -0.3],
            ),
            "propagate_only": (rf.Sum(marker=rf.Propagate(Z=Z, G=rf.Unstructured(3)), residual=rf.Scalar(n)), None),
            "nested_sums_and_fixed": (
                rf.fix(
                    rf.Sum(outer=rf.Sum(a=rf.Grouped(g), b=rf.Grouped(h)), residual=rf.Scalar(n)),
                    "outer/b/cov/sigma^2",
                    0.7,
                ),
                [0.3, 0.1],
            ),
            "large_propagate_block": (
                rf.Sum(
                    subject=rf.Grouped(g),
                    marker=rf.Propagate(Z=torch.randn(n, 10, generator=generator), G=rf.CompoundSymmetric(10)),
                    residual=rf.Scalar(n),
                ),
                [0.1, -0.3, 0.4, 0.0],
            ),
        },
        y,
        X,
    )


MODELS_, Y, XMAT = models()


@pytest.mark.parametrize("name", sorted(MODELS_))
def test_mme_equals_dense(name):
    s, values = MODELS_[name]
    params = s.init_params() if values is None else rf.unflatten_params(s, torch.tensor(values))
    assert select_engine(s).name == "mme"
    terms = assert_engines_agree(s, params, Y, XMAT)
    for method in ("fwd", "rev"):
        other = rf.ai_terms(s, params, Y, XMAT, jacobian=method, engine="mme")
        close(other.score, terms.score, 1e-12)
        close(other.ai, terms.ai, 1e-12)
    close(rf.ai_terms(s, params, Y, XMAT, trace="hutchpp", engine="mme").score, terms.score, 0)
    close(MME.jacobian_traces(s, params), DENSE.jacobian_traces(s, params), 1e-12)


def test_blup_shapes():
    s, values = MODELS_["propagate_and_grouped"]
    effects = rf.blup(s, rf.unflatten_params(s, torch.tensor(values)), Y, XMAT)
    assert effects["subject"].shape == (6, 2) and effects["block"].shape == (4, 1) and effects["marker"].shape == (3,)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mme_equals_dense_on_reference_models(name):
    m = model(name)
    # Variances near the response variance (perturbed so none sits at a special value), covariances 0.
    scale = 0.5 * math.log(float(m.y.var()))
    specs = [spec for _, spec in param_specs(m.structure) if not spec.fixed]
    raw = [scale + 0.1 * i if isinstance(spec.transform, ExpPow2) else 0.0 for i, spec in enumerate(specs)]
    params = rf.unflatten_params(m.structure, torch.tensor(raw))
    if MME.supports(m.structure):
        assert_engines_agree(m.structure, params, m.y, m.X)
    else:
        # Wider dense parts than automatic selection allows (q > n/2): the algebra still holds.
        mme, dense = MME.ai_terms(m.structure, params, m.y, m.X), DENSE.ai_terms(m.structure, params, m.y, m.X)
        for got, expected in zip(mme, dense):
            close(got, expected)
        for got, expected in zip(MME.gls(m.structure, params, m.y, m.X), DENSE.gls(m.structure, params, m.y, m.X)):
            close(got, expected)


# ------------------------------------------------------------------------------------------------
# Hypothesis-drawn mixed models


@st.composite
def mixed_models(draw):
    n = draw(st.integers(30, 40))  # the dense part (≤ 6·2 + 3 = 15 columns) stays within n/2: MME supports it
    generator, X = simulate(draw(st.integers(0, 2**31 - 1)), n, p=draw(st.integers(1, 3)))
    terms, values = {}, []
    correlation = st.floats(-0.9, 0.9)
    log_sd = st.floats(-1.5, 1.0)
    for i in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, 2))
        kind = draw(st.sampled_from(["Scalar", "Unstructured"] if k == 1 else ["Diagonal", "Unstructured"]))
        covariates = torch.cat([torch.ones(n, 1), torch.randn(n, k - 1, generator=generator)], dim=1)
        cov = {"Scalar": rf.Scalar(1), "Diagonal": rf.Diagonal(k), "Unstructured": rf.Unstructured(k)}[kind]
        m = draw(st.integers(1, 6))
        terms[f"g{i}"] = rf.Grouped(codes(generator, n, m), cov, covariates=covariates, num_groups=m)
        if kind == "Unstructured" and k == 2:
            a, b, rho = draw(log_sd), draw(log_sd), draw(correlation)
            values += [a, rho * math.exp(a + b), b]  # Σ = [[e^{2a}, ρe^{a+b}], [·, e^{2b}]] is PD
        else:
            values += [draw(log_sd) for _ in range(k)]
    if draw(st.booleans()):
        q = draw(st.integers(1, 3))
        terms["marker"] = rf.Propagate(Z=torch.randn(n, q, generator=generator), G=rf.Diagonal(q))
        values += [draw(log_sd) for _ in range(q)]
    if draw(st.booleans()):
        terms["residual"] = rf.Scalar(n)
        values.append(draw(log_sd))
    else:
        terms["residual"] = rf.Diagonal(n)
        values += [draw(log_sd) for _ in range(n)]
    s = rf.Sum(**terms)
    y = torch.randn(n, generator=generator) * 2.0 + 1.0
    return s, rf.unflatten_params(s, torch.tensor(values)), y, X


@given(mixed_models())
def test_random_models_agree_with_dense(case):
    s, params, y, X = case
    terms = assert_engines_agree(s, params, y, X)
    assert bool(torch.isfinite(terms.loglik))


@given(mixed_models())
def test_column_pair_products_equal_dense_products(case):
    """Crossed designs above a size use products over the column pairs each group of the blocked
    term can couple (mme.column_pairs); forced on for small drawn models, they give the dense
    engine's numbers."""
    from reml_fn.reml import mme

    s, params, y, X = case
    model = mme.layout(s)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mme, "PAIR_LIST_MIN_SIZE", 0)
        patch.setattr(mme, "PAIR_LIST_MAX_DENSITY", 1.0)
        stats = MME.prepare(s, y, X)
        paired = model.blocked is not None and bool(model.rest) and model.scalar_residual
        assert (stats.pairs.numel() > 0) == paired
        terms = assert_engines_agree(s, params, y, X)
        close(MME.ai_terms(s, params, y, X, prepared=stats).ai, terms.ai, 1e-12)
    assert bool(torch.isfinite(terms.loglik))


@pytest.mark.parametrize("name", ["crossed", "propagate_and_grouped", "intercept_and_slope"])
def test_blocked_trace_in_chunks_of_groups_equals_dense(name):
    """The blocked term's trace runs over chunks of groups in large designs; forced to chunks of a
    group or two, it gives the dense engine's numbers."""
    from reml_fn.reml import mme

    s, values = MODELS_[name]
    params = rf.unflatten_params(s, torch.tensor(values))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mme, "GROUP_CHUNK_ELEMENTS", 3)
        assert_engines_agree(s, params, Y, XMAT)


def test_column_pairs_in_batched_fits_equal_single_fits():
    """fit_batched of a crossed design with pair lists forced on: a shared structure (its pairs
    computed once, used under vmap) and per-dataset structures (codes inside vmap cannot be read:
    dense products) give each dataset's single fit."""
    from reml_fn.fit import stack_structures
    from reml_fn.reml import mme

    n, generator = 60, torch.Generator().manual_seed(3)

    def crossed(seed):
        draw = torch.Generator().manual_seed(seed)
        a, b = torch.randint(0, 8, (n,), generator=draw), torch.randint(0, 5, (n,), generator=draw)
        return rf.Sum(a=rf.Grouped(a, num_groups=8), b=rf.Grouped(b, num_groups=5), e=rf.Scalar(n))

    Y, X = torch.randn(3, n, generator=generator), torch.ones(n, 1)
    structures = [crossed(seed) for seed in range(3)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mme, "PAIR_LIST_MIN_SIZE", 0)
        patch.setattr(mme, "PAIR_LIST_MAX_DENSITY", 1.0)
        assert MME.prepare(structures[0], Y[0], X).pairs.numel() > 0
        shared = rf.fit_batched(structures[0], Y, X)
        stacked, in_dims = stack_structures(structures)
        separate = rf.fit_batched(stacked, Y, X, in_dims=in_dims)
        for b in range(3):
            close(shared.loglik[b], rf.fit(structures[0], Y[b], X).loglik, 1e-10)
            close(separate.loglik[b], rf.fit(structures[b], Y[b], X).loglik, 1e-10)
    assert bool((shared.status == 0).all()) and bool((separate.status == 0).all())


def test_column_pairs_of_a_sparse_crossed_design():
    """Each group of the blocked term meets few levels of the crossed term: the pair list holds
    exactly the pairs of the levels it meets (and X's columns), and the fit equals the dense
    products'."""
    from reml_fn.reml import mme

    generator = torch.Generator().manual_seed(7)
    n, m_a, m_b = 300, 60, 40
    a, b = codes(generator, n, m_a), codes(generator, n, m_b)
    X = torch.cat([torch.ones(n, 1), torch.randn(n, 1, generator=generator)], dim=1)
    y = torch.randn(m_a, generator=generator)[a] + 0.5 * torch.randn(m_b, generator=generator)[b]
    y = y + torch.randn(n, generator=generator)
    s = rf.Sum(a=rf.Grouped(a), b=rf.Grouped(b), residual=rf.Scalar(n))
    model = mme.layout(s)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mme, "PAIR_LIST_MIN_SIZE", 0)
        entries, pairs = mme.column_pairs(model, 2)
        met = {(g, h) for g, h in zip(a.tolist(), b.tolist())}
        expected = sorted({(g, h) for g, h in met} | {(g, m_b + c) for g in range(m_a) for c in range(2)})
        assert sorted(map(tuple, entries.T.tolist())) == expected
        assert pairs.shape[1] == sum(c * (c + 1) // 2 for c in torch.bincount(entries[0], minlength=m_a).tolist())
        paired = rf.fit(s, y, X)
    patch_free = rf.fit(s, y, X)
    assert int(paired.status) == int(patch_free.status) == 0
    close(paired.loglik, patch_free.loglik, 1e-12)
    close(paired.beta, patch_free.beta, 1e-8)


# ------------------------------------------------------------------------------------------------
# Engine selection


def test_automatic_selection_and_overrides():
    s, _ = MODELS_["random_intercept"]
    n = s.shape[0]
    assert select_engine(s).name == "mme" and select_engine(s, "dense").name == "dense"
    unsupported = {
        "AR1 residual": rf.Sum(a=s["subject"], residual=rf.AR1(n)),
        "no residual": rf.Sum(a=s["subject"], b=rf.Grouped(torch.arange(n) % 2)),
        "no random term": rf.Sum(a=rf.Scalar(n), b=rf.Diagonal(n)),
        "bare Grouped": s["subject"],
        "parametric Z": rf.Sum(a=rf.Propagate(Z=rf.LowerTriangular(n, 2), G=rf.Scalar(2)), residual=rf.Scalar(n)),
        "wide dense part": rf.Sum(a=rf.Propagate(Z=torch.eye(n), G=rf.Scalar(n)), residual=rf.Scalar(n)),
    }
    for why, structure in unsupported.items():
        assert not MME.supports(structure), why
        assert select_engine(structure).name == "dense", why
    with pytest.raises(ValueError, match="engine 'mme' cannot handle"):
        rf.reml_loglik(unsupported["AR1 residual"], None, Y, XMAT, engine="mme")
    with pytest.raises(ValueError, match="unknown engine"):
        rf.reml_loglik(s, None, Y, XMAT, engine="sparse")
    with pytest.raises(ValueError, match="unknown trace method"):
        MME.ai_terms(s, s.init_params(), Y, XMAT, trace="stochastic")
    with pytest.raises(ValueError, match="unknown Jacobian method"):
        rf.ai_terms(s, None, Y, XMAT, jacobian="central", engine="mme")


# ------------------------------------------------------------------------------------------------
# Purity: vmap = loop, score = grad


def test_vmap_over_y_equals_a_loop():
    s, values = MODELS_["intercept_and_slope"]
    params = rf.unflatten_params(s, torch.tensor(values))
    Ys = Y + torch.randn(5, Y.shape[0], generator=torch.Generator().manual_seed(3))
    batched = torch.func.vmap(lambda y: MME.ai_terms(s, params, y, XMAT))(Ys)
    effects = torch.func.vmap(lambda y: MME.random_effects(s, params, y, XMAT))(Ys)
    for b in range(5):
        single = MME.ai_terms(s, params, Ys[b], XMAT)
        for got, expected in zip(batched, single):
            close(got[b], expected, 1e-12)
        close(effects["subject"][b], MME.random_effects(s, params, Ys[b], XMAT)["subject"], 1e-12)


def test_vmap_over_params_and_diagonal_residual_equals_a_loop():
    s, values = MODELS_["diagonal_residual"]
    base = rf.unflatten_params(s, torch.tensor(values))
    batch = tree_map(lambda v: torch.stack([v, v + 0.2, v - 0.3]), base)
    batched = torch.func.vmap(lambda p: MME.ai_terms(s, p, Y, XMAT))(batch)
    for b in range(3):
        single = MME.ai_terms(s, tree_map(lambda v, b=b: v[b], batch), Y, XMAT)
        close(batched.loglik[b], single.loglik, 1e-12)
        close(batched.score[b], single.score, 1e-12)
        close(batched.ai[b], single.ai, 1e-12)


def test_vmap_over_the_structure_data_leaves():
    s, values = MODELS_["crossed"]
    params = rf.unflatten_params(s, torch.tensor(values))
    generator = torch.Generator().manual_seed(5)
    n = Y.shape[0]
    codes_a = torch.randint(0, 6, (3, n), generator=generator)
    covariates_b = 1.0 + torch.rand(3, n, 1, generator=generator)

    def loglik(codes_a, covariates_b):
        a = rf.replace(s["a"], codes=codes_a)
        b = rf.replace(s["b"], covariates=covariates_b)
        return MME.ai_terms(rf.Sum(a=a, b=b, residual=s["residual"]), params, Y, XMAT)

    batched = torch.func.vmap(loglik)(codes_a, covariates_b)
    for i in range(3):
        single = loglik(codes_a[i], covariates_b[i])
        close(batched.loglik[i], single.loglik, 1e-12)
        close(batched.ai[i], single.ai, 1e-12)
        structure = rf.Sum(
            a=rf.replace(s["a"], codes=codes_a[i]),
            b=rf.replace(s["b"], covariates=covariates_b[i]),
            residual=s["residual"],
        )
        close(single.loglik, DENSE.loglik(structure, params, Y, XMAT))


def test_float32_follows_the_data():
    s, values = MODELS_["intercept_and_slope"]
    params = tree_map(lambda v: v.float(), rf.unflatten_params(s, torch.tensor(values)))
    terms = rf.ai_terms(s, params, Y.float(), XMAT.float())
    assert terms.loglik.dtype == terms.ai.dtype == torch.float32
    expected = rf.ai_terms(s, rf.unflatten_params(s, torch.tensor(values)), Y, XMAT)
    close(terms.loglik.double(), expected.loglik, 1e-5)


@pytest.mark.parametrize("name", ["intercept_and_slope", "crossed", "propagate_and_grouped", "diagonal_residual"])
def test_score_is_the_gradient_of_the_mme_loglik(name):
    s, values = MODELS_[name]
    params = rf.unflatten_params(s, torch.tensor(values))
    gradient = torch.func.grad(lambda p: MME.loglik(s, p, Y, XMAT))(params)
    close(rf.flatten_params(s, gradient), MME.ai_terms(s, params, Y, XMAT).score, 1e-10)


def test_vmap_of_grad_over_y():
    s, values = MODELS_["random_intercept"]
    params = rf.unflatten_params(s, torch.tensor(values))
    Ys = torch.stack([Y, 2.0 * Y, Y - 1.0])
    grads = torch.func.vmap(torch.func.grad(lambda p, y: MME.loglik(s, p, y, XMAT)), in_dims=(None, 0))(params, Ys)
    for b in range(3):
        close(
            rf.flatten_params(s, tree_map(lambda v, b=b: v[b], grads)),
            MME.ai_terms(s, params, Ys[b], XMAT).score,
            1e-10,
        )


# ------------------------------------------------------------------------------------------------
# Boundaries and non-positive-definite points


@pytest.mark.parametrize("raw", [-3.0, -20.0, -400.0])  # σ²_b = e^{2·raw}: e^{-800} underflows to exactly 0
def test_zero_variance_gives_finite_values_equal_to_dense(raw):
    s, _ = MODELS_["random_intercept"]
    params = rf.unflatten_params(s, torch.tensor([raw, 0.1]))
    terms = assert_engines_agree(s, params, Y, XMAT)
    assert bool(torch.isfinite(terms.score).all() and torch.isfinite(terms.ai).all())
    gradient = torch.func.grad(lambda p: MME.loglik(s, p, Y, XMAT))(params)
    assert bool(torch.isfinite(rf.flatten_params(s, gradient)).all())


def test_singular_covariance_is_handled_without_inverting_it():
    n = Y.shape[0]
    generator, _ = simulate(1, n)
    slope = torch.cat([torch.ones(n, 1), torch.randn(n, 1, generator=generator)], dim=1)
    for sigma in ([[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]):
        term = rf.Grouped(codes(generator, n, 5), torch.tensor(sigma), covariates=slope)
        s = rf.Sum(subject=term, residual=rf.Scalar(n))
        assert_engines_agree(s, s.init_params(), Y, XMAT)


def test_non_positive_definite_points_give_minus_infinity():
    s, _ = MODELS_["intercept_and_slope"]
    indefinite = rf.unflatten_params(s, torch.tensor([0.0, 3.0, 0.0, 0.0]))  # |covariance| > variances
    terms = rf.ai_terms(s, indefinite, Y, XMAT, engine="mme")
    assert float(terms.loglik) == -math.inf
    assert bool(torch.isnan(terms.score).all() and torch.isnan(terms.ai).all() and torch.isnan(terms.beta).all())
    zero_column = torch.cat([XMAT, torch.zeros(Y.shape[0], 1)], dim=1)  # XᵀV⁻¹X singular
    for engine in ("mme", "dense"):
        assert float(rf.reml_loglik(s, None, Y, zero_column, engine=engine)) == -math.inf


def test_one_bad_member_does_not_spoil_a_batch():
    s, values = MODELS_["intercept_and_slope"]
    good = torch.tensor(values)
    bad = torch.tensor([0.0, 3.0, 0.0, 0.0])
    thetas = torch.stack([good, bad, good + 0.1])
    out = torch.func.vmap(lambda t: MME.ai_terms(s, rf.unflatten_params(s, t), Y, XMAT))(thetas)
    assert float(out.loglik[1]) == -math.inf
    for b in (0, 2):
        single = MME.ai_terms(s, rf.unflatten_params(s, thetas[b]), Y, XMAT)
        close(out.loglik[b], single.loglik, 1e-12)
        close(out.ai[b], single.ai, 1e-12)


def test_psd_cholesky():
    A = torch.tensor([[4.0, 2.0, 0.4], [2.0, 3.0, 0.1], [0.4, 0.1, 1.0]])
    L, ok = psd_cholesky(A)
    assert bool(ok)
    close(L, torch.linalg.cholesky(A), 1e-14)
    direction = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 0.3, 0.7], [0.2, 0.7, -1.0]])  # symmetric
    derivative = torch.func.jvp(lambda a: psd_cholesky(a)[0], (A,), (direction,))[1]
    close(derivative, torch.func.jvp(torch.linalg.cholesky, (A,), (direction,))[1], 1e-12)
    for singular in ([[0.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]):
        singular = torch.tensor(singular)
        L, ok = psd_cholesky(singular)
        assert bool(ok) and bool(torch.isfinite(L).all())
        close(L @ L.T, singular, 1e-14)
    for indefinite in ([[-1.0]], [[0.0, 1.0], [1.0, 0.0]], [[1.0, 2.0], [2.0, 1.0]], [[math.nan]]):
        assert not bool(psd_cholesky(torch.tensor(indefinite))[1])
    batched = torch.func.vmap(psd_cholesky)(torch.stack([A, -A]))
    assert batched[1].tolist() == [True, False]


# ------------------------------------------------------------------------------------------------
# Scale: n = 200,000 (a dense V would be 200,000² × 8 bytes = 320 GB)


def random_intercept_reference(y, X, codes, m, sigma2_b, sigma2):
    """The REML log-likelihood of y = Xβ + u_g + e by the closed form of the compound-symmetric
    blocks V_g = σ²I + σ_b² 11ᵀ (an independent check: per-group sums, no MME)."""
    n, p = X.shape
    counts = torch.bincount(codes, minlength=m).to(y.dtype)
    shrink = sigma2_b / (sigma2 + counts * sigma2_b)  # V_g⁻¹ = (I − shrink_g 11ᵀ)/σ²

    def group_sums(values):
        return torch.zeros(m, *values.shape[1:], dtype=y.dtype).index_add(0, codes, values)

    def inner(a, b):  # aᵀV⁻¹b
        return (a.T @ b - (group_sums(a) * shrink.reshape(-1, *[1] * (a.dim() - 1))).T @ group_sums(b)) / sigma2

    xvx, xvy, yvy = inner(X, X), inner(X, y[:, None]), inner(y[:, None], y[:, None])
    beta = torch.linalg.solve(xvx, xvy)
    ypy = (yvy - xvy.T @ beta).squeeze()
    log_det_v = (n - m) * math.log(sigma2) + torch.log(sigma2 + counts * sigma2_b).sum()
    log_det_xvx = torch.linalg.slogdet(xvx).logabsdet
    return -0.5 * (log_det_v + log_det_xvx + ypy) - 0.5 * (n - p) * math.log(2 * math.pi)


def test_two_hundred_thousand_observations_in_linear_memory():
    n, m = 200_000, 500
    generator, X = simulate(11, n, p=3)
    group = codes(generator, n, m)
    y = (
        X @ torch.tensor([2.0, 1.0, -1.0])
        + 0.7 * torch.randn(m, generator=generator)[group]
        + torch.randn(n, generator=generator)
    )
    s = rf.Sum(subject=rf.Grouped(group), residual=rf.Scalar(n))
    assert select_engine(s).name == "mme"
    params = rf.unflatten_params(s, torch.tensor([math.log(0.7), 0.05]))
    start = time.perf_counter()
    loglik = rf.reml_loglik(s, params, y, X)
    terms = rf.ai_terms(s, params, y, X)
    elapsed = time.perf_counter() - start
    expected = random_intercept_reference(y, X, group, m, 0.49, math.exp(0.1))
    close(loglik, expected, 1e-10)
    close(terms.loglik, expected, 1e-10)
    assert bool(torch.isfinite(terms.score).all()) and bool(torch.linalg.eigvalsh(terms.ai).min() > 0)
    gradient = torch.func.grad(lambda p: MME.loglik(s, p, y, X))(params)
    close(rf.flatten_params(s, gradient), terms.score, 1e-8)
    assert elapsed < 20.0


MEMORY_SCRIPT = """
import resource, torch, reml_fn as rf
torch.set_default_dtype(torch.float64)
n, m = 200_000, 500
g = torch.Generator().manual_seed(0)
group = torch.randint(0, m, (n,), generator=g)
X = torch.cat([torch.ones(n, 1), torch.randn(n, 2, generator=g)], dim=1)
y = X.sum(1) + torch.randn(m, generator=g)[group] + torch.randn(n, generator=g)
s = rf.Sum(subject=rf.Grouped(group), residual=rf.Scalar(n))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rf.reml_loglik(s, None, y, X)
rf.ai_terms(s, None, y, X)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e3)  # kB -> MB
"""


def test_memory_stays_linear_in_n():
    # A fresh process: the peak RSS of this one reflects whatever ran before.
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 500, f"peak RSS grew by {growth_mb:.0f} MB (a dense V would need 320 GB)"


# ------------------------------------------------------------------------------------------------
# Propagate terms of grouped shape take the Grouped paths (reml_fn.reml.grouped_form)


def test_propagate_spelling_equals_grouped_spelling_and_takes_the_grouped_path():
    from reml_fn.datasets.models import model
    from reml_fn.reml.grouped_form import grouped_form
    from reml_fn.reml.mme import layout

    propagate = model("sleepstudy_2")  # Propagate(Z, Kronecker(groups=I_18, cov=Unstructured(2)))
    grouped, converted = grouped_form(propagate.structure)
    assert converted == {"Subject": ("G", "cov")}
    model = layout(propagate.structure)  # the Grouped term, blocked, with no dense random part
    assert model.blocked[0] == "Subject" and isinstance(model.blocked[1], rf.Grouped) and not model.rest
    formula = rf.lmer_model("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
    theta = torch.tensor([3.2, 9.6, 1.7, 3.2], dtype=torch.float64)
    a = rf.ai_terms(propagate.structure, theta, propagate.y, propagate.X, engine="mme")
    b = rf.ai_terms(formula.structure, theta, formula.y, formula.X, engine="mme")
    c = rf.ai_terms(propagate.structure, theta, propagate.y, propagate.X, engine="dense")
    for got, expected in (
        (a.loglik, b.loglik),
        (a.score, b.score),
        (a.ai, b.ai),
        (a.loglik, c.loglik),
        (a.score, c.score),
    ):
        close(got, expected, 1e-9)
    effects = rf.blup(propagate.structure, theta, propagate.y, propagate.X, engine="mme")["Subject"]
    close(effects, rf.blup(propagate.structure, theta, propagate.y, propagate.X, engine="dense")["Subject"], 1e-9)
    assert effects.shape == (36,)  # the Propagate term's (q,) layout, as the dense engine gives it


def test_propagate_terms_not_of_grouped_shape_stay_as_they_are():
    from reml_fn.reml.grouped_form import grouped_form

    n = 6
    overlapping = torch.ones(n, 4, dtype=torch.float64)  # every row in both blocks of 2 columns
    s = rf.Sum(u=rf.Propagate(Z=overlapping, G=rf.Kronecker(a=rf.Identity(2), b=rf.Unstructured(2))), e=rf.Scalar(n))
    assert grouped_form(s)[1] == {}
    swapped = rf.Sum(
        u=rf.Propagate(Z=overlapping, G=rf.Kronecker(a=rf.Unstructured(2), b=rf.Identity(2))), e=rf.Scalar(n)
    )
    assert grouped_form(swapped)[1] == {}


def _dense_projection(s, params, X):
    """P = V⁻¹ − V⁻¹X(XᵀV⁻¹X)⁻¹XᵀV⁻¹ from the structure's n×n V."""
    V_inv = torch.linalg.inv(s.build(params))
    VX = V_inv @ X
    return V_inv - VX @ torch.linalg.solve(X.mT @ VX, VX.mT)


def _design_of(term, dtype):
    """A random term's Z (n, q): group indicators times covariates for Grouped, Z itself for Propagate."""
    from reml_fn.reml import mme

    if isinstance(term, rf.Grouped):
        columns = mme._columns(term, dtype)
        Z = torch.zeros(columns.codes.shape[0], columns.m, columns.k, dtype=dtype)
        Z[torch.arange(columns.codes.shape[0]), columns.codes] = columns.x
        return Z.reshape(columns.codes.shape[0], -1), columns.k
    return term.children[0].matrix.to(dtype), None


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("name", ["crossed", "propagate_and_grouped", "intercept_and_slope", "nested_sums_and_fixed"])
def test_selected_blocks_of_the_inverse_equal_the_dense_inverses(name, paired):
    """The AI traces read selected blocks of ZᵀPZ (P = V⁻¹ − V⁻¹X(XᵀV⁻¹X)⁻¹XᵀV⁻¹) from the blocked
    factor without forming Ω⁻¹: Σ_g of the blocked term's k×k diagonal blocks, and per rest term the
    sum of its diagonal blocks (Grouped) or its whole block (Propagate). Each must equal the same
    blocks of Zᵀ P Z from the dense n×n V, with the column-pair path forced on and off."""
    from reml_fn.reml import mme

    s, values = MODELS_[name]
    params = rf.unflatten_params(s, torch.tensor(values))
    with pytest.MonkeyPatch.context() as patch:
        if paired:
            patch.setattr(mme, "PAIR_LIST_MIN_SIZE", 1)
            patch.setattr(mme, "PAIR_LIST_MAX_DENSITY", 1.0)
        model, grouped, stats = mme._inputs(s, params, Y, XMAT, None)
        fac = mme._evaluate(model, grouped, stats, XMAT, "closed")
        blocked, rest = mme._ztpz_blocked(fac), mme._ztpz_rest(fac) if model.rest else []
    assert (stats.pairs.numel() > 0) == (paired and bool(model.rest))
    P = _dense_projection(s, params, XMAT)

    def dense_blocks(term):
        Z, k = _design_of(term, torch.float64)
        full = Z.mT @ P @ Z
        if k is None:  # a Propagate term: the whole block
            return full
        m = full.shape[-1] // k
        return torch.diagonal(full.reshape(m, k, m, k), dim1=0, dim2=2).permute(2, 0, 1).sum(0)

    close(blocked, dense_blocks(model.blocked[1]), 1e-9)
    assert len(rest) == len(model.rest)
    for (_, term), block in zip(model.rest, rest):
        close(block, dense_blocks(term), 1e-9)
