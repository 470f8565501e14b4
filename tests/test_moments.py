"""The MIVQUE(0) start (reml_fn.reml.moments): its equations and statistics are the dense traces
and quadratic forms, it is the ANOVA estimator on balanced one- and two-way layouts and lme4's REML
estimate on balanced sleepstudy designs, and fits start there only where it is well inside."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn import datasets
from reml_fn.datasets.models import model
from reml_fn.design import design_matrix, indicator_codes
from reml_fn.fit.start import default_init
from reml_fn.reml import moments
from reml_fn.reml.moments import GroupedDesign, mivque0_equations, mivque0_statistics, moment_start


def natural_values(s, theta: torch.Tensor) -> list[float]:
    return rf.flatten_params(s, rf.params.constrain(s, rf.unflatten_params(s, theta))).tolist()


def sleepstudy():
    d = datasets.load("sleepstudy")
    X = design_matrix(d["Days"], intercept=True).double()
    codes, _ = indicator_codes(d["Subject"])
    return d["Reaction"].double(), X, codes


# ---------------------------------------------------------------------------------- the equations


@st.composite
def grouped_models(draw):
    """One to three random terms of grouped shape, crossed or nested, each with k = 1–3 covariates
    (an intercept and random columns) and Σ Unstructured, Diagonal or Scalar; unbalanced group sizes
    (levels may be empty); X of an intercept, a covariate and optionally a group-level column."""
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(10, 30))
    generator = torch.Generator().manual_seed(seed)
    designs = []
    for _ in range(draw(st.integers(1, 3))):
        m = draw(st.integers(2, 6))
        k = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["Unstructured", "Diagonal", "Scalar"]))
        codes = torch.randint(0, m, (n,), generator=generator)
        covariates = torch.cat(
            [torch.ones(n, 1, dtype=torch.float64), torch.randn(n, k - 1, generator=generator, dtype=torch.float64)], 1
        )
        structure = getattr(rf, kind)(k)
        names = rf.param_names(structure)
        units = torch.stack(list(structure._natural_jacobian(dict.fromkeys(names, torch.zeros(())), names).values()))
        designs.append(GroupedDesign(codes, covariates, m, units.double()))
    columns = [torch.ones(n, dtype=torch.float64), torch.randn(n, generator=generator, dtype=torch.float64)]
    if draw(st.booleans()):
        columns.append(torch.randn(designs[0].size, generator=generator, dtype=torch.float64)[designs[0].codes])
    X = torch.stack(columns, 1)
    # Well conditioned: the traces' X corrections cancel, to round-off of size cond(X)²·ε.
    assume(float(torch.linalg.cond(X)) < 100)
    return designs, X, torch.randn(n, generator=generator, dtype=torch.float64)


def dense_parameter_matrices(designs, n):
    """V_j = Z_a (I ⊗ E_al) Z_aᵀ for every term and unit, then I, by n×n algebra."""
    matrices = []
    for d in designs:
        k = d.covariates.shape[1]
        Z = torch.zeros(n, d.size * k, dtype=torch.float64)
        for row in range(n):
            g = int(d.codes[row])
            Z[row, g * k : (g + 1) * k] = d.covariates[row]
        matrices += [Z @ torch.kron(torch.eye(d.size, dtype=torch.float64), E) @ Z.T for E in d.units]
    return matrices + [torch.eye(n, dtype=torch.float64)]


@settings(max_examples=80, deadline=None)
@given(grouped_models())
def test_mivque0_equations_and_statistics_are_the_dense_traces_and_forms(drawn):
    designs, X, y = drawn
    n = X.shape[0]
    K = torch.linalg.inv(X.T @ X)
    Q = torch.eye(n, dtype=torch.float64) - X @ K @ X.T
    V = dense_parameter_matrices(designs, n)
    expected = torch.stack([torch.stack([torch.trace(Q @ Vi @ Q @ Vj) for Vj in V]) for Vi in V])
    torch.testing.assert_close(mivque0_equations(designs, X, K), expected, rtol=1e-10, atol=1e-9)
    with unittest.mock.patch.object(moments, "ROW_CHUNK_ELEMENTS", 7):  # rows a few at a time
        torch.testing.assert_close(mivque0_equations(designs, X, K), expected, rtol=1e-10, atol=1e-9)
    e = Q @ y
    torch.testing.assert_close(
        mivque0_statistics(designs, e), torch.stack([e @ Vi @ e for Vi in V]), rtol=1e-10, atol=1e-9
    )


def test_balanced_one_way_layout_gives_the_anova_estimates():
    generator = torch.Generator().manual_seed(3)
    m, size = 7, 5
    codes = torch.arange(m).repeat_interleave(size)
    y = 3.0 * torch.randn(m, generator=generator, dtype=torch.float64)[codes] + torch.randn(
        m * size, generator=generator, dtype=torch.float64
    )
    means = torch.zeros(m, dtype=torch.float64).index_add(0, codes, y) / size
    within = float(((y - means[codes]) ** 2).sum()) / (m * (size - 1))
    between = size * float(((means - y.mean()) ** 2).sum()) / (m - 1)
    s = rf.Sum(g=rf.Grouped(codes), residual=rf.Scalar(m * size))
    theta, ok, _ = moment_start(s, y, torch.ones(m * size, 1, dtype=torch.float64))
    assert bool(ok)
    assert natural_values(s, theta) == pytest.approx([(between - within) / size, within], rel=1e-12)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_balanced_sleepstudy_models_give_lme4s_reml_estimates(variant):
    """(1|Subject), Days + (1|Subject), Days + (Days|Subject): every subject has the same design, so
    the moments are the REML estimates (lme4's saved fits, σ² and Σ from θ and sigmaREML)."""
    reference = datasets.references("sleepstudy")["lme4_saved_fits"][f"fit_sleepstudy_{variant}"]
    y, X, codes = sleepstudy()
    covariates = X if variant == 2 else X[:, :1]
    fixed = X[:, :1] if variant == 0 else X
    s = rf.Sum(Subject=rf.Grouped(codes, covariates=covariates), residual=rf.Scalar(180))
    theta, ok, _ = moment_start(s, y, fixed)
    assert bool(ok)
    cov = torch.tensor(reference["derived_re"][0]["cov"], dtype=torch.float64)
    expected = [cov[i, j] for i in range(cov.shape[0]) for j in range(i + 1)] + [reference["sigmaREML"] ** 2]
    assert natural_values(s, theta) == pytest.approx([float(v) for v in expected], rel=2e-5)


# ------------------------------------------------------------------------------------ the fits


@pytest.mark.parametrize("name", ["sleepstudy_2", "Dyestuff", "Rail"])
def test_fit_starts_at_the_moments_and_converges_there(name):
    """Propagate spellings (a Kronecker G with a Fixed identity; a Scalar G) start there too."""
    m = model(name)
    result = rf.fit(m.structure, m.y, m.X)
    theta, ok, _ = moment_start(m.structure, m.y, m.X)
    assert bool(ok)
    torch.testing.assert_close(result.history["params"][0], theta)
    assert bool(result.converged) and int(result.n_iter) == 0
    # …at the optimum: the score there is zero to round-off of ℓ.
    assert float(result.score.abs().max()) < 1e-5


def test_fit_keeps_the_default_start_where_a_variance_estimate_is_not_positive():
    """Dyestuff2: the moment estimate of the batch variance is negative (lme4: 0, singular)."""
    m = model("Dyestuff2")
    theta, ok, _ = moment_start(m.structure, m.y, m.X)
    assert not bool(ok)
    result = rf.fit(m.structure, m.y, m.X)
    torch.testing.assert_close(result.history["params"][0], default_init(m.structure, m.y, m.X))
    assert bool(result.converged)


def test_variance_floors_stay_on_the_default_starts_scale():
    """The start moves; the floor a variance may reach does not (it is set by the default start)."""
    y, X, codes = sleepstudy()
    s = rf.Sum(Subject=rf.Grouped(codes), residual=rf.Scalar(180))
    from reml_fn.fit.start import raw_bounds

    reference = default_init(s, y, X)
    theta, ok, _ = moment_start(s, y, X)
    assert bool(ok) and not torch.allclose(theta, reference)
    lower, _ = raw_bounds(s, reference, theta)
    torch.testing.assert_close(lower, raw_bounds(s, reference)[0])


def test_vmap_over_responses_equals_one_by_one():
    y, X, codes = sleepstudy()
    s = rf.Sum(Subject=rf.Grouped(codes, covariates=X), residual=rf.Scalar(180))
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(4, 180, generator=generator, dtype=torch.float64)
    # The last response has no subject effects: its start stays the default one (ok False).
    Y = torch.stack(
        [y, y + 20 * noise[0], y.flip(0), X @ torch.tensor([250.0, 10.0], dtype=torch.float64) + 25 * noise[1]]
    )
    theta, ok, _ = torch.func.vmap(lambda response: moment_start(s, response, X))(Y)
    for b in range(Y.shape[0]):
        alone, alone_ok, _ = moment_start(s, Y[b], X)
        assert bool(ok[b]) == bool(alone_ok)
        torch.testing.assert_close(theta[b], alone)
    assert ok.tolist() == [True, True, True, False]


def test_float32_fit_starts_at_the_moments():
    y, X, codes = sleepstudy()
    s = rf.Sum(Subject=rf.Grouped(codes, covariates=X.float()), residual=rf.Scalar(180))
    theta, ok, _ = moment_start(s, y.float(), X.float())
    assert bool(ok) and theta.dtype == torch.float32
    result = rf.fit(s, y.float(), X.float())
    assert bool(result.converged) and int(result.n_iter) <= 1
    assert float(result.loglik) == pytest.approx(-871.8141359792, abs=1e-3)


def test_models_it_does_not_serve():
    y, X, codes = sleepstudy()
    n = 180
    cases = {
        "AR1 + noise": rf.Sum(ar=rf.AR1(n), noise=rf.Scalar(n)),
        "a Propagate term with a general G": rf.Sum(
            a=rf.Propagate(Z=torch.nn.functional.one_hot(codes).double(), G=rf.Unstructured(18)), residual=rf.Scalar(n)
        ),
        "a Diagonal residual": rf.Sum(a=rf.Grouped(codes), residual=rf.Diagonal(n)),
        "a fixed variance": rf.fix(rf.Sum(a=rf.Grouped(codes), residual=rf.Scalar(n)), "residual/sigma^2", 1.0),
        "compound symmetry": rf.Sum(
            a=rf.Grouped(codes, covariates=X, cov=rf.CompoundSymmetric(2)), residual=rf.Scalar(n)
        ),
    }
    for label, s in cases.items():
        assert moment_start(s, y, X) is None, label


def test_a_propagate_design_that_is_not_grouped_is_not_used():
    """A Z whose rows touch two groups' columns: not a grouped design, so no moment start."""
    y, X, codes = sleepstudy()
    Z = torch.nn.functional.one_hot(codes, 18).double()
    Z[:, 0] = 1.0
    s = rf.Sum(u=rf.Propagate(Z=Z, G=rf.Scalar(18)), residual=rf.Scalar(180))
    theta, ok, _ = moment_start(s, y, X)
    assert not bool(ok)


@pytest.mark.parametrize("name", ["sleepstudy_2", "Dyestuff", "Orthodont"])
def test_the_equal_share_start_from_the_moment_traces_is_the_engines(name):
    """default_init with the moment start's per-unit traces = default_init with the engine's."""
    m = model(name)
    traces = moment_start(m.structure, m.y, m.X).unit_traces
    torch.testing.assert_close(
        default_init(m.structure, m.y, m.X, unit_traces=traces),
        default_init(m.structure, m.y, m.X),
        rtol=1e-12,
        atol=1e-12,
    )


# ------------------------------------------------------------------- several terms: MIVQUE(0)


def test_balanced_two_way_crossed_layout_gives_the_anova_estimates():
    """a × b cells of one observation, mean only: MIVQUE(0) = ANOVA on balanced data,
    σ̂² = MS_error, σ̂²_A = (MS_A − MS_error)/b, σ̂²_B = (MS_B − MS_error)/a."""
    generator = torch.Generator().manual_seed(7)
    a, b = 6, 5
    rows, columns = torch.arange(a * b) // b, torch.arange(a * b) % b
    y = (
        2.0 * torch.randn(a, generator=generator, dtype=torch.float64)[rows]
        + 1.5 * torch.randn(b, generator=generator, dtype=torch.float64)[columns]
        + torch.randn(a * b, generator=generator, dtype=torch.float64)
    )
    table = y.reshape(a, b)
    grand, row_means, column_means = table.mean(), table.mean(1), table.mean(0)
    ms_a = b * float(((row_means - grand) ** 2).sum()) / (a - 1)
    ms_b = a * float(((column_means - grand) ** 2).sum()) / (b - 1)
    residual = table - row_means[:, None] - column_means[None, :] + grand
    ms_error = float((residual**2).sum()) / ((a - 1) * (b - 1))
    s = rf.Sum(A=rf.Grouped(rows), B=rf.Grouped(columns), residual=rf.Scalar(a * b))
    theta, ok, _ = moment_start(s, y, torch.ones(a * b, 1, dtype=torch.float64))
    assert bool(ok)
    expected = [(ms_a - ms_error) / b, (ms_b - ms_error) / a, ms_error]
    assert natural_values(s, theta) == pytest.approx(expected, rel=1e-10)


def test_several_terms_start_at_mivque0_in_a_fit_and_in_a_batch():
    """sleepstudy's (1|Subject) + (0+Days|Subject) (two terms on one grouping, a Propagate
    spelling): the fit starts at MIVQUE(0), reaches lme4's optimum, and vmap over responses equals
    one by one."""
    m = model("sleepstudy_3")
    theta, ok, _ = moment_start(m.structure, m.y, m.X)
    assert bool(ok)
    result = rf.fit(m.structure, m.y, m.X)
    torch.testing.assert_close(result.history["params"][0], theta)
    reference = datasets.references("sleepstudy")["lme4_saved_fits"]["fit_sleepstudy_3"]
    assert float(result.loglik) == pytest.approx(reference["derived_logLik_REML"], abs=1e-7)
    generator = torch.Generator().manual_seed(2)
    Y = torch.stack([m.y, m.y + 30 * torch.randn(180, generator=generator, dtype=torch.float64), m.y.flip(0)])
    batched, batched_ok, _ = torch.func.vmap(lambda response: moment_start(m.structure, response, m.X))(Y)
    for b in range(3):
        alone, alone_ok, _ = moment_start(m.structure, Y[b], m.X)
        assert bool(batched_ok[b]) == bool(alone_ok)
        torch.testing.assert_close(batched[b], alone)


@pytest.mark.parametrize("per_dataset_codes", [False, True])
@pytest.mark.parametrize("slope", [False, True])
def test_crossed_fits_batched_equal_one_by_one(per_dataset_codes, slope):
    """Two crossed terms (random intercepts, or a random intercept and slope next to an
    intercept): fit_batched starts each response where fit does and takes the same path, with
    shared codes and with codes per dataset (the start's sort under vmap)."""
    from reml_fn.fit.batched import stack_structures

    generator = torch.Generator().manual_seed(0)
    n = 80
    structures, responses = [], []
    for b in range(3):
        if per_dataset_codes or b == 0:
            a = torch.randint(0, 8, (n,), generator=generator)
            c = torch.randint(0, 5, (n,), generator=generator)
            x = torch.randn(n, generator=generator, dtype=torch.float64)
        spread = 0.0 if b == 2 else 2.0  # no A effects in the third: σ̂²_A near 0, outside
        slopes = torch.randn(8, generator=generator, dtype=torch.float64)[a] * x if slope else 0.0
        responses.append(
            slopes
            + spread * torch.randn(8, generator=generator, dtype=torch.float64)[a]
            + 2.0 * torch.randn(5, generator=generator, dtype=torch.float64)[c]
            + torch.randn(n, generator=generator, dtype=torch.float64)
        )
        # With ``slope``, A is (1 + x | A): a two-effect term next to B, still a MIVQUE(0) start.
        covariates = torch.stack([torch.ones(n, dtype=torch.float64), x], 1) if slope else None
        structures.append(
            rf.Sum(
                A=rf.Grouped(a, covariates=covariates, num_groups=8),
                B=rf.Grouped(c, num_groups=5),
                residual=rf.Scalar(n),
            )
        )
    Y, X = torch.stack(responses), torch.ones(n, 1, dtype=torch.float64)
    if per_dataset_codes:
        s, in_dims = stack_structures(structures)
    else:
        s, in_dims = structures[0], None
    batched = rf.fit_batched(s, Y, X, in_dims=in_dims)
    starts = [moment_start(structures[b], Y[b], X) for b in range(3)]
    assert any(bool(start.inside) for start in starts)  # the moment path is exercised
    for b in range(3):
        alone = rf.fit(structures[b], Y[b], X)
        assert int(batched.status[b]) == int(alone.status) and int(batched.n_iter[b]) == int(alone.n_iter)
        torch.testing.assert_close(batched.history["params"][b, 0], alone.history["params"][0])
        assert float(batched.loglik[b]) == pytest.approx(float(alone.loglik), abs=1e-9)
        if bool(starts[b].inside):
            torch.testing.assert_close(alone.history["params"][0], starts[b].theta)


def test_the_moment_start_follows_the_structures_parameter_order():
    # The estimates come out of the equations term by term, σ² last; the start is in param_names
    # order, whatever order the Sum lists its terms in.
    d = datasets.load("sleepstudy")
    g = torch.unique(d["Subject"], return_inverse=True)[1]
    X = torch.stack([torch.ones(180, dtype=torch.float64), d["Days"]], 1)
    h = torch.arange(180) % 6
    y = d["Reaction"] + 30 * torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[h]
    slope = rf.Grouped(g, covariates=X, cov=rf.Unstructured(2))
    orders = [
        rf.Sum(a=slope, b=rf.Grouped(h), residual=rf.Scalar(180)),
        rf.Sum(residual=rf.Scalar(180), b=rf.Grouped(h), a=slope),
    ]
    starts = [moment_start(s, y, X) for s in orders]
    assert all(bool(start.inside) for start in starts)
    by_name = [
        dict(zip(rf.param_names(s), zip(start.theta.tolist(), start.unit_traces.tolist())))
        for s, start in zip(orders, starts)
    ]
    assert list(by_name[1]) == [
        "residual/sigma^2",
        "b/cov/sigma^2",
        "a/cov/sigma^2_0_0",
        "a/cov/sigma^2_1_0",
        "a/cov/sigma^2_1_1",
    ]
    for name, (theta, trace) in by_name[0].items():
        assert by_name[1][name][0] == pytest.approx(theta, rel=1e-12)
        assert by_name[1][name][1] == trace
    assert by_name[0]["residual/sigma^2"][1] == 180.0 and by_name[0]["a/cov/sigma^2_1_1"][1] == float(
        (d["Days"] ** 2).sum()
    )
