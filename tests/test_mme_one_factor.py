"""The MME engine on lme4's most common model, one grouping factor + Scalar residual (the one
algebra's case with no dense random part): equal to the dense engine on drawn models, prepared
statistics equal to statistics formed in the call, vmap (unrolled k×k factors) equal to a loop,
singular and invalid points handled."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.reml import ENGINES, mme
from reml_fn.reml.covariance_blocks import unrolled_cholesky
from reml_fn.reml.engines import register_engine

MME, DENSE = ENGINES["mme"], ENGINES["dense"]


def close(actual, expected, rel=1e-9):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    scale = 1.0 + expected.abs().max()
    error = (actual - expected).abs().max()
    assert bool(error <= rel * scale), f"max error {float(error):.3e} (scale {float(scale):.3e})"


@st.composite
def one_factor_models(draw):
    n = draw(st.integers(12, 40))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = draw(st.integers(1, 3))
    X = torch.cat([torch.ones(n, 1), torch.randn(n, p - 1, generator=generator)], dim=1)
    k = draw(st.integers(1, 3))
    covariates = torch.cat([torch.ones(n, 1), torch.randn(n, k - 1, generator=generator)], dim=1)
    kind = draw(st.sampled_from(["Unstructured", "Diagonal", "Gram"]))
    cov = {
        "Unstructured": rf.Unstructured(k),
        "Diagonal": rf.Diagonal(k),
        "Gram": rf.Gram(rf.LowerTriangular(k, k), gram_type="xxt"),
    }[kind]
    m = draw(st.integers(1, 7))
    term = rf.Grouped(torch.randint(0, m, (n,), generator=generator), cov, covariates=covariates, num_groups=m)
    residual = {"residual": rf.Scalar(n)}
    if draw(st.booleans()):
        residual["extra"] = rf.Identity(n)
    terms = {**residual, "subject": term} if draw(st.booleans()) else {"subject": term, **residual}
    s = rf.Sum(**terms)
    if draw(st.booleans()):
        s = rf.fix(s, "residual/sigma^2", 0.3)
    values = []
    for name in rf.param_names(s):
        if name.startswith("residual") or name.startswith("subject/cov/sigma^2_") or kind == "Diagonal":
            values.append(draw(st.floats(-1.0, 1.0)))
        else:
            values.append(draw(st.floats(-0.6, 0.6)))
    params = rf.unflatten_params(s, torch.tensor(values))
    if kind == "Unstructured":  # keep Σ positive definite: covariances well inside the correlation bound
        params = rf.unflatten_params(s, _damp_covariances(s, torch.tensor(values)))
    y = torch.randn(n, generator=generator) * 3.0 + 10.0
    return s, params, y, X


def _damp_covariances(s, theta):
    names = rf.param_names(s)
    out = theta.clone()
    for index, name in enumerate(names):
        if name.startswith("subject/cov/sigma^2_"):
            i, j = (int(v) for v in name.split("_")[-2:])
            if i != j:
                a, b = names.index(f"subject/cov/sigma^2_{i}_{i}"), names.index(f"subject/cov/sigma^2_{j}_{j}")
                out[index] = 0.3 * torch.tanh(theta[index]) * torch.exp(theta[a] + theta[b])
    return out


@given(one_factor_models())
def test_one_factor_equals_dense(case):
    s, params, y, X = case
    model = mme.layout(s)
    assert model.blocked is not None and not model.rest and model.scalar_residual
    fast = rf.ai_terms(s, params, y, X, engine="mme")
    dense = rf.ai_terms(s, params, y, X, engine="dense")
    sigma = s["subject"].cov.build(params["subject"]["cov"])
    lam, valid = mme._factor_block(sigma)  # the factor the engine uses
    if not bool(valid):
        # A near-singular LLᵀ whose round-off makes Σ indefinite beyond the tolerance: the MME needs
        # G ⪰ 0 and says so (−∞, NaN), where the dense V may still be positive definite.
        assert fast.loglik == -math.inf and bool(torch.isnan(fast.score).all())
        return
    # The MME works with ΛΛᵀ = Σ + diag(10kε·Σ_ii + tiny): the results move with that perturbation
    # of Σ, times the sensitivity of a near-singular Σ; for a well-conditioned Σ rel = 1e-8.
    perturbation = float((lam @ lam.mT - sigma).abs().max() / sigma.abs().max().clamp_min(1e-300))
    rel = max(1e-8, 1e3 * perturbation)
    close(fast.loglik, dense.loglik, rel)
    close(fast.score, dense.score, rel)
    close(fast.ai, dense.ai, rel)
    close(fast.beta, dense.beta, rel)
    close(rf.reml_loglik(s, params, y, X, engine="mme"), dense.loglik, rel)
    close(rf.vcov_beta(s, params, y, X, engine="mme"), rf.vcov_beta(s, params, y, X, engine="dense"), rel)
    close(MME.jacobian_traces(s, params), DENSE.jacobian_traces(s, params), 1e-10)
    prepared = MME.prepare(s, y, X)
    close(MME.ai_terms(s, params, y, X, prepared=prepared).ai, fast.ai, 1e-12)
    close(MME.loglik(s, params, y, X, prepared=prepared), fast.loglik, 1e-12)


def sleepstudy_like(B=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    n, m = 60, 6
    days = torch.arange(n, dtype=torch.float64) % 10
    X = torch.stack([torch.ones(n), days], 1)
    codes = torch.arange(n) // 10
    s = rf.Sum(g=rf.Grouped(codes, rf.Unstructured(2), covariates=X.clone(), num_groups=m), residual=rf.Scalar(n))
    effects = torch.randn(B, m, 2, generator=generator) * torch.tensor([5.0, 1.0])
    Y = 250.0 + 10.0 * days + (effects[:, codes] * X).sum(-1) + 4.0 * torch.randn(B, n, generator=generator)
    return s, Y, X


def test_vmapped_engine_equals_a_loop():
    """Under vmap the same code runs on batched statistics; it must agree with the unbatched
    computation dataset by dataset."""
    s, Y, X = sleepstudy_like()
    theta = torch.tensor([[1.5, 0.2, 0.1, 2.5], [2.0, -1.0, 0.5, 2.0], [1.0, 0.0, -0.5, 3.0]]).repeat(2, 1)[
        : Y.shape[0]
    ]

    def terms(y, t):
        return rf.ai_terms(s, rf.unflatten_params(s, t), y, X)

    batched = torch.func.vmap(terms)(Y, theta)
    for b in range(Y.shape[0]):
        alone = terms(Y[b], theta[b])
        for field in ("loglik", "score", "ai", "beta"):
            close(getattr(batched, field)[b], getattr(alone, field), 1e-11)


def test_vmapped_engine_with_per_dataset_covariates():
    """Batched term data: per-dataset statistics."""
    s, Y, X = sleepstudy_like(B=3)
    covariates = torch.stack([X, X * torch.tensor([1.0, 0.5]), X * torch.tensor([1.0, 2.0])])
    theta = torch.tensor([1.5, 0.2, 0.1, 2.5])

    def terms(y, x):
        term = rf.Grouped(s["g"].codes, rf.Unstructured(2), covariates=x, num_groups=s["g"].num_groups)
        model = rf.Sum(g=term, residual=rf.Scalar(y.shape[-1]))
        return rf.ai_terms(model, rf.unflatten_params(model, theta), y, X)

    batched = torch.func.vmap(terms)(Y, covariates)
    for b in range(3):
        close(batched.ai[b], terms(Y[b], covariates[b]).ai, 1e-11)


def test_vmap_over_parameters_only():
    s, Y, X = sleepstudy_like(B=1)
    thetas = torch.tensor([[1.5, 0.2, 0.1, 2.5], [2.0, -1.0, 0.5, 2.0]])
    values = torch.func.vmap(lambda t: rf.reml_loglik(s, rf.unflatten_params(s, t), Y[0], X))(thetas)
    for t, value in zip(thetas, values):
        close(value, rf.reml_loglik(s, rf.unflatten_params(s, t), Y[0], X, engine="dense"), 1e-10)


def test_singular_covariance_and_bad_points():
    s, Y, X = sleepstudy_like(B=1)
    y = Y[0]
    # Σ of rank one (perfect correlation): finite, equal to dense (the dense V is still PD).
    a, b = 1.0, 0.2
    singular = rf.unflatten_params(s, torch.tensor([a, math.exp(a + b), b, 2.0]))
    fast = rf.ai_terms(s, singular, y, X)
    dense = rf.ai_terms(s, singular, y, X, engine="dense")
    assert bool(torch.isfinite(fast.loglik))
    close(fast.loglik, dense.loglik, 1e-8)
    # An indefinite Σ: −∞ and NaN, no exception; also under vmap.
    bad = torch.tensor([a, 3.0 * math.exp(a + b), b, 2.0])
    terms = rf.ai_terms(s, rf.unflatten_params(s, bad), y, X)
    assert terms.loglik == -math.inf and bool(torch.isnan(terms.score).all()) and bool(torch.isnan(terms.beta).all())
    both = torch.func.vmap(lambda t: rf.ai_terms(s, rf.unflatten_params(s, t), y, X))(
        torch.stack([bad, torch.tensor([a, 0.1, b, 2.0])])
    )
    assert both.loglik[0] == -math.inf and bool(torch.isfinite(both.loglik[1]))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_unrolled_cholesky(k):
    generator = torch.Generator().manual_seed(k)
    A = torch.randn(4, 3, k, k, generator=generator, dtype=torch.float64)
    M = A @ A.mT + 0.1 * torch.eye(k, dtype=torch.float64)
    L, L_inv, ok = unrolled_cholesky(M)
    assert bool(ok.all())
    close(L, torch.linalg.cholesky(M), 1e-12)
    close(L_inv, torch.linalg.inv(torch.linalg.cholesky(M)), 1e-11)
    indefinite = M.clone()
    indefinite[0, 0] = -indefinite[0, 0]
    _, _, flags = unrolled_cholesky(indefinite)
    assert not bool(flags[0, 0]) and bool(flags[1:].all())
    vmapped = torch.func.vmap(unrolled_cholesky)(M)
    close(vmapped[1], L_inv, 1e-14)


def test_dense_engine_prepares_nothing_and_engines_without_prepare_still_fit():
    s, Y, X = sleepstudy_like(B=1)
    assert DENSE.prepare(s, Y[0], X) is None

    class Plain:  # an engine written against the original protocol: no prepare, no prepared=
        name = "plain_dense"

        def supports(self, s):
            return True

        def loglik(self, s, params, y, X):
            return DENSE.loglik(s, params, y, X)

        def ai_terms(self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None):
            return DENSE.ai_terms(s, params, y, X, jacobian)

        def jacobian_traces(self, s, params, jacobian="closed"):
            return DENSE.jacobian_traces(s, params, jacobian)

        def gls(self, s, params, y, X):
            return DENSE.gls(s, params, y, X)

    register_engine("plain_dense", Plain(), prefer=False)
    try:
        plain = rf.fit(s, Y[0], X, engine="plain_dense")
        fast = rf.fit(s, Y[0], X)
        assert plain.engine == "plain_dense" and fast.engine == "mme"
        close(plain.loglik, fast.loglik, 1e-10)
        batched = rf.fit_batched(s, torch.stack([Y[0], Y[0] * 1.1]), X, engine="plain_dense")
        close(batched.loglik[0], fast.loglik, 1e-10)
    finally:
        ENGINES.pop("plain_dense")
        from reml_fn.reml import engines

        engines._AUTO_ORDER.remove("plain_dense")


def test_fit_results_are_ordinary_tensors():
    """fit and fit_batched run in inference mode internally; what they return is not."""
    s, Y, X = sleepstudy_like(B=2)
    for result in (rf.fit(s, Y[0], X), rf.fit_batched(s, Y, X)):
        for leaf in torch.utils._pytree.tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                assert not leaf.is_inference()
        beta = result.beta
        beta += 0.0  # in place, outside inference mode
        assert result.beta.clone().requires_grad_().requires_grad


@pytest.mark.parametrize("offset, ratio", [(1e6, 1.0), (0.0, 1e4), (1e4, 1e6)])
def test_vmapped_statistics_keep_their_digits(offset, ratio):
    """Under vmap yᵀPy, Zᵀe and e·e come from the (centred) statistics instead of a pass over the
    data; with a large mean and a large variance ratio they still agree with the data pass."""
    s, Y, X = sleepstudy_like(B=3, seed=11)
    generator = torch.Generator().manual_seed(5)
    codes = s["g"].codes
    Y = offset + Y + math.sqrt(ratio) * torch.randn(3, s["g"].num_groups, generator=generator, dtype=Y.dtype)[:, codes]
    alone = [rf.fit(s, y, X) for y in Y]
    theta = torch.stack([r.history["params"][-1] for r in alone])

    def terms(y, t):
        return rf.ai_terms(s, rf.unflatten_params(s, t), y, X)

    batched = torch.func.vmap(terms)(Y, theta)
    for b in range(3):
        single = terms(Y[b], theta[b])
        close(batched.loglik[b], single.loglik, 1e-10)
        close(batched.beta[b], single.beta, 1e-9)
        # At the optimum the score is ~0: compare it on the scale of the AI (its natural unit).
        assert float((batched.score[b] - single.score).abs().max()) <= 1e-7 * (1.0 + float(single.ai.abs().max()))
        close(batched.ai[b], single.ai, 1e-8)
    together = rf.fit_batched(s, Y, X)
    for b in range(3):
        close(together.loglik[b], alone[b].loglik, 1e-10)
        close(together.beta[b], alone[b].beta, 1e-7)


def test_nearly_singular_gram_covariance_is_accepted_like_dense():
    """Σ = LLᵀ with L_00 = 1e-14 is PSD to round-off: its off-diagonal entries (5e-15) exceed τ but
    not √(τ·max Σ); the MME keeps a finite likelihood equal to the dense engine's."""
    n = 12
    generator = torch.Generator().manual_seed(0)
    covariates = torch.cat([torch.ones(n, 1), torch.randn(n, 1, generator=generator)], dim=1)
    cov = rf.Gram(rf.LowerTriangular(2, 2), gram_type="xxt")
    s = rf.Sum(subject=rf.Grouped(torch.zeros(n, dtype=torch.long), cov, covariates=covariates), residual=rf.Scalar(n))
    params = {
        "subject": {
            "cov": {"op_0": {"L_0_0": torch.tensor(1e-14), "L_1_0": torch.tensor(0.5), "L_1_1": torch.tensor(0.0)}}
        },
        "residual": {"sigma^2": torch.tensor(0.3)},
    }
    y, X = torch.randn(n, generator=generator) * 3.0 + 10.0, torch.ones(n, 1)
    fast, dense = rf.ai_terms(s, params, y, X), rf.ai_terms(s, params, y, X, engine="dense")
    assert bool(torch.isfinite(fast.loglik))
    close(fast.loglik, dense.loglik, 1e-10)
    close(fast.score, dense.score, 1e-8)


def test_psd_cholesky_tolerances():
    from reml_fn.reml.covariance_blocks import psd_cholesky

    for off_diagonal, psd in ((1e-9, True), (1e-7, False)):  # eigenvalue ≈ −off² against τ ≈ 4e-15
        A = torch.tensor([[0.0, off_diagonal], [off_diagonal, 1.0]], dtype=torch.float64)
        assert bool(psd_cholesky(A)[1]) is psd
    assert not bool(psd_cholesky(torch.tensor([[-1e-9, 0.0], [0.0, 1.0]], dtype=torch.float64))[1])
