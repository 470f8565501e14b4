"""fit_batched: batched = one-by-one, poisoned batches, B = 1, shared/per-dataset X and Z, chunks, bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import reml_fn as rf
from reml_fn.datasets.models import model
from reml_fn.fit.batched import dataset_structure, stack_structures
from reml_fn.fit.result import STATUS

TOL = 1e-8


def close(actual, expected, tol=TOL):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    error = torch.where(both_nan, 0.0, (actual - expected).abs() / (1.0 + expected.abs()))
    assert bool((error <= tol).all()), f"{actual} vs {expected} (max relative error {float(error.max()):.3g})"


def assert_same_as_alone(batched, b: int, alone: rf.FitResult) -> None:
    """Dataset b of a batched result is the fit of that dataset alone (same point, same decisions)."""
    assert int(batched.status[b]) == int(alone.status), (b, batched.message[b], alone.message)
    assert int(batched.n_iter[b]) == int(alone.n_iter), b
    assert batched.at_boundary[b].tolist() == alone.at_boundary.tolist(), b
    close(batched.loglik[b], alone.loglik)
    close(batched.history["params"][b, -1], alone.history["params"][-1])
    close(batched.beta[b], alone.beta)
    close(batched.se_beta[b], alone.se_beta)
    close(batched.score[b], alone.score, tol=1e-6)
    T = alone.history["loglik"].shape[0]
    close(batched.history["loglik"][b, :T], alone.history["loglik"])


def random_intercept_batch(B=6, n=30, q=6, seed=0):
    """Random-intercept data with group sd varying over the batch; dataset 2 has no group effect."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) % q
    X = torch.stack([torch.ones(n), torch.linspace(-1.0, 1.0, n)], 1)
    sd = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.3])[:B]
    effects = torch.randn(B, q, generator=generator) * sd[:, None]
    Y = 1.0 + 0.5 * X[:, 1] + effects[:, groups] + torch.randn(B, n, generator=generator)
    return groups, X, Y


def grouped_model(groups, n):
    return rf.Sum(group=rf.Grouped(groups), residual=rf.Scalar(n))


def dense_model(groups, n):
    Z = torch.nn.functional.one_hot(groups).double()
    return rf.Sum(group=rf.Propagate(Z=Z, G=rf.Scalar(Z.shape[1])), residual=rf.Scalar(n))


# ------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("make, engine", [(grouped_model, "mme"), (dense_model, "dense")])
def test_batched_equals_one_by_one_with_a_boundary_fit(make, engine):
    groups, X, Y = random_intercept_batch()
    s = make(groups, Y.shape[1])
    result = rf.fit_batched(s, Y, X, engine=engine)
    assert result.engine == engine
    assert bool(result.converged.all()), result.message
    assert bool(result.at_boundary[:, 0].any()), "the batch must contain a fit at the variance floor"
    for b in range(Y.shape[0]):
        assert_same_as_alone(result, b, rf.fit(s, Y[b], X, engine=engine))


def test_sleepstudy_random_slopes_batch_equals_fit_and_lme4():
    m = model("sleepstudy_2")
    days = m.X[:, 1]
    subject = m.structure["Subject"]["Z"].matrix.reshape(180, 18, 2)[:, :, 0].argmax(-1)
    s = rf.Sum(Subject=rf.Grouped(subject, covariates=m.X), residual=rf.Scalar(180))
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(3, 180, generator=generator) * 25.0
    effects = torch.randn(3, 18, 2, generator=generator) * torch.tensor([24.7, 5.9])
    Y = torch.cat([m.y[None], 251.4 + 10.47 * days + effects[:, subject, 0] + effects[:, subject, 1] * days + noise])
    result = rf.fit_batched(s, Y, m.X)
    # lme4: REML criterion 1743.6283 for the real sleepstudy response (row 0).
    assert float(result.reml_criterion[0]) == pytest.approx(1743.628272, abs=1e-5)
    for b in range(Y.shape[0]):
        assert_same_as_alone(result, b, rf.fit(s, Y[b], m.X))


def test_b_equals_one():
    groups, X, Y = random_intercept_batch(B=1)
    s = grouped_model(groups, Y.shape[1])
    result = rf.fit_batched(s, Y, X)
    assert tuple(result.loglik.shape) == (1,) and tuple(result.beta.shape) == (1, 2)
    assert_same_as_alone(result, 0, rf.fit(s, Y[0], X))


def test_shared_and_per_dataset_X_agree_and_match_fit():
    groups, X, Y = random_intercept_batch(B=4)
    s = grouped_model(groups, Y.shape[1])
    shared = rf.fit_batched(s, Y, X)
    per_dataset = rf.fit_batched(s, Y, X.expand(4, -1, -1).clone())
    close(per_dataset.loglik, shared.loglik)
    close(per_dataset.beta, shared.beta)
    X_varied = X.expand(4, -1, -1).clone()
    X_varied[1, :, 1] = torch.linspace(0.0, 3.0, Y.shape[1]) ** 2
    varied = rf.fit_batched(s, Y, X_varied)
    for b in range(4):
        assert_same_as_alone(varied, b, rf.fit(s, Y[b], X_varied[b]))


def test_per_dataset_Z_through_in_dims():
    generator = torch.Generator().manual_seed(5)
    n, q, B = 20, 4, 4
    X = torch.ones(n, 1)
    Zs = [torch.nn.functional.one_hot(torch.randint(0, q, (n,), generator=generator), q).double() for _ in range(B)]
    structures = [rf.Sum(u=rf.Propagate(Z=Z, G=rf.Scalar(q)), e=rf.Scalar(n)) for Z in Zs]
    Y = torch.stack([Z @ torch.randn(q, generator=generator) for Z in Zs]) + torch.randn(B, n, generator=generator)
    s, in_dims = stack_structures(structures)
    assert in_dims["u"]["Z"].matrix == 0
    torch.testing.assert_close(dataset_structure(s, in_dims, 2)["u"]["Z"].matrix, Zs[2])
    result = rf.fit_batched(s, Y, X, in_dims=in_dims)
    for b in range(B):
        assert_same_as_alone(result, b, rf.fit(structures[b], Y[b], X))
    # in_dims=0 (every data leaf batched) is the same here: Z is the only leaf.
    close(rf.fit_batched(s, Y, X, in_dims=0).loglik, result.loglik)


def test_per_dataset_groups_through_in_dims():
    generator = torch.Generator().manual_seed(6)
    n, q, B = 24, 4, 3
    codes = [torch.randint(0, q, (n,), generator=generator) for _ in range(B)]
    structures = [rf.Sum(g=rf.Grouped(c, num_groups=q), e=rf.Scalar(n)) for c in codes]
    Y = torch.stack([2.0 * torch.randn(q, generator=generator)[c] for c in codes]) + torch.randn(
        B, n, generator=generator
    )
    s, in_dims = stack_structures(structures)
    result = rf.fit_batched(s, Y, torch.ones(n, 1), in_dims=in_dims)
    for b in range(B):
        assert_same_as_alone(result, b, rf.fit(structures[b], Y[b], torch.ones(n, 1)))


def test_chunked_equals_unchunked():
    groups, X, Y = random_intercept_batch()
    s = grouped_model(groups, Y.shape[1])
    whole = rf.fit_batched(s, Y, X)
    for chunk in (1, 4):
        part = rf.fit_batched(s, Y, X, chunk_size=chunk)
        for field in ("loglik", "beta", "vcov_beta", "score", "ai", "status", "n_iter", "at_boundary"):
            close(getattr(part, field).double(), getattr(whole, field).double(), tol=1e-12)
        for name in ("loglik", "params", "step"):
            assert part.history[name].shape == whole.history[name].shape
            # A chunk of one runs without vmap (another summation order): round-off differences
            # of 1e-15 grow along the path of a variance heading for its floor (log σ → −16).
            close(part.history[name], whole.history[name], tol=1e-9)


def test_history_rows_repeat_the_final_point_after_a_dataset_stops():
    groups, X, Y = random_intercept_batch()
    result = rf.fit_batched(grouped_model(groups, Y.shape[1]), Y, X)
    T = result.history["loglik"].shape[1]
    assert T == int(result.n_iter.max()) + 1
    for b in range(Y.shape[0]):
        stop = int(result.n_iter[b])
        assert bool((result.history["params"][b, stop:] == result.history["params"][b, -1]).all())
        assert bool((result.history["step"][b, stop + 1 :] == 0).all())
        close(result.history["loglik"][b, -1], result.loglik[b], tol=0)


def test_init_as_tree_flat_or_per_dataset():
    groups, X, Y = random_intercept_batch(B=3)
    s = grouped_model(groups, Y.shape[1])
    flat = torch.tensor([0.2, -0.1])
    a = rf.fit_batched(s, Y, X, init=flat)
    b = rf.fit_batched(
        s, Y, X, init={"group": {"cov": {"sigma^2": 0.2}}, "residual": {"sigma^2": torch.full((3,), -0.1)}}
    )
    c = rf.fit_batched(s, Y, X, init=flat.expand(3, 2))
    close(b.loglik, a.loglik, tol=0)
    close(c.loglik, a.loglik, tol=0)
    assert_same_as_alone(a, 1, rf.fit(s, Y[1], X, init=flat))


def test_structure_without_free_parameters():
    groups, X, Y = random_intercept_batch(B=3)
    s = rf.fix(grouped_model(groups, Y.shape[1]), ["group/cov/sigma^2", "residual/sigma^2"], 1.0)
    result = rf.fit_batched(s, Y, X)
    assert result.params == {} and tuple(result.score.shape) == (3, 0)
    for b in range(3):
        assert_same_as_alone(result, b, rf.fit(s, Y[b], X))


def test_closed_and_forward_jacobians_agree_in_batches():
    groups, X, Y = random_intercept_batch(B=3)
    s = dense_model(groups, Y.shape[1])
    closed = rf.fit_batched(s, Y, X, engine="dense")
    forward = rf.fit_batched(s, Y, X, engine="dense", jacobian="fwd")
    close(forward.loglik, closed.loglik)


def test_result_fields_have_a_batch_dimension():
    groups, X, Y = random_intercept_batch(B=5)
    r = rf.fit_batched(grouped_model(groups, Y.shape[1]), Y, X)
    k, p = 2, 2
    shapes = {
        "loglik": (5,),
        "reml_criterion": (5,),
        "aic": (5,),
        "bic": (5,),
        "converged": (5,),
        "status": (5,),
        "n_iter": (5,),
        "beta": (5, p),
        "se_beta": (5, p),
        "vcov_beta": (5, p, p),
        "score": (5, k),
        "ai": (5, k, k),
        "at_boundary": (5, k),
    }
    for field, shape in shapes.items():
        assert tuple(getattr(r, field).shape) == shape, field
    assert tuple(r.params["group"]["cov"]["sigma^2"].shape) == (5,)
    close(r.natural["residual"]["sigma^2"], torch.exp(2 * r.params["residual"]["sigma^2"]))
    assert r.names == ("group/cov/sigma^2", "residual/sigma^2") and r.n == 30 and r.p == 2
    assert len(r.message) == 5 and "5 converged" in str(r)


def test_defaults_match_fit():
    batched = inspect.signature(rf.fit_batched).parameters
    for name, parameter in inspect.signature(rf.fit).parameters.items():
        if parameter.default is not inspect.Parameter.empty and name in batched:
            assert batched[name].default == parameter.default, name


def test_verbose_progress(capsys):
    groups, X, Y = random_intercept_batch(B=2)
    rf.fit_batched(grouped_model(groups, Y.shape[1]), Y, X, verbose=2)
    assert "converged" in capsys.readouterr().err


# ------------------------------------------------------------------------------ poisoned batches


def test_poisoned_batch_leaves_the_others_unchanged_and_flags_the_bad_ones():
    groups, X, Y = random_intercept_batch()
    s = grouped_model(groups, Y.shape[1])
    clean = rf.fit_batched(s, Y, X)
    starts = clean.history["params"][:, 0]  # the default starts
    nan_y, constant, linear, inf_y = Y[0].clone(), torch.full_like(Y[0], 3.0), 1.0 - 2.0 * X[:, 1], Y[1].clone()
    nan_y[5], inf_y[0] = math.nan, math.inf
    rows = [Y[0], Y[1], nan_y, Y[2], Y[3], Y[4], Y[5], Y[0], constant, linear, inf_y]
    singular_start = starts[0].clone()
    singular_start[1] = -400.0  # residual σ² = e^{-800} = 0: V = ZGZᵀ is singular at the start
    init = torch.stack([starts[0], starts[1], starts[0], *starts[2:], singular_start, *starts[:3]])
    result = rf.fit_batched(s, torch.stack(rows), X, init=init)
    bad = [2, 7, 8, 9, 10]
    assert result.status[bad].tolist() == [4, 3, 6, 6, 4]
    assert not bool(result.converged[bad].any())
    assert "NaN" in result.message[2] and "not positive definite" in result.message[7]
    assert STATUS[6].startswith("y is an exact linear function")
    for b in bad:
        assert bool(torch.isnan(result.beta[b]).all()), b
    for b, original in [(0, 0), (1, 1), (3, 2), (4, 3), (5, 4), (6, 5)]:
        for field in ("loglik", "beta", "score", "n_iter", "status", "at_boundary"):
            close(getattr(result, field)[b].double(), getattr(clean, field)[original].double())
        T = clean.history["params"].shape[1]
        close(result.history["params"][b, :T], clean.history["params"][original])


def test_per_dataset_bad_X_and_bad_Z_are_flagged_not_errors():
    groups, X, Y = random_intercept_batch(B=4)
    s = grouped_model(groups, Y.shape[1])
    Xs = X.expand(4, -1, -1).clone()
    Xs[1, :, 1] = 2.0  # collinear with the intercept
    Xs[2, 3, 1] = float("nan")
    result = rf.fit_batched(s, Y, Xs)
    assert result.status.tolist() == [0, 7, 4, 0]
    assert_same_as_alone(result, 3, rf.fit(s, Y[3], X))

    Z = torch.nn.functional.one_hot(groups).double()
    structures = [rf.Sum(u=rf.Propagate(Z=Z.clone(), G=rf.Scalar(6)), e=rf.Scalar(30)) for _ in range(4)]
    structures[1]["u"]["Z"].matrix[0, 0] = float("nan")
    batched, in_dims = stack_structures(structures)
    flagged = rf.fit_batched(batched, Y, X, in_dims=in_dims)
    assert flagged.status.tolist()[1] == 4 and bool(flagged.converged[[0, 2, 3]].all())


def test_singular_V_midway_is_a_rejected_step_not_an_error():
    # An AR1 residual with a huge start can push ρ to its limit; whatever happens, nothing raises
    # and the batch reports one status per dataset.
    groups, X, Y = random_intercept_batch(B=3)
    s = rf.Sum(group=rf.Grouped(groups), time=rf.AR1(30))
    result = rf.fit_batched(s, Y, X, engine="dense", max_iter=30)
    assert result.status.shape == (3,)
    for b in range(3):
        alone = rf.fit(s, Y[b], X, engine="dense", max_iter=30)
        assert int(result.status[b]) == int(alone.status)
        close(result.loglik[b], alone.loglik)


# ------------------------------------------------------------------------------------ bad input


def _inputs():
    groups, X, Y = random_intercept_batch(B=3)
    return grouped_model(groups, Y.shape[1]), Y, X


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda s, Y, X: (s, Y[0], X, {}), ValueError, r"Y must be a 2-D tensor \(B, n\)"),
        (lambda s, Y, X: (s, Y[None], X, {}), ValueError, "Y must be a 2-D"),
        (lambda s, Y, X: (s, Y, X[:, 0], {}), ValueError, r"X must be \(n, p\) shared"),
        (lambda s, Y, X: (s, Y, X.expand(2, -1, -1), {}), ValueError, "X has 2 datasets"),
        (lambda s, Y, X: (s, Y, X[:-1], {}), ValueError, "X has 29 rows but Y has 30"),
        (lambda s, Y, X: (s, Y[:, :-1], X[:-1], {}), ValueError, r"builds a \(30, 30\) matrix but y has 29"),
        (lambda s, Y, X: (s, Y, X.float(), {}), TypeError, "share a dtype"),
        (lambda s, Y, X: (s, Y.long(), X, {}), TypeError, "floating point"),
        (
            lambda s, Y, X: (s, Y, torch.cat([X, X[:, 1:] * 2], 1), {}),
            ValueError,
            r"rank deficient: column\(s\) \['2'\]",
        ),
        (
            lambda s, Y, X: (s, Y, X.index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(math.nan)), {}),
            ValueError,
            "X contains NaN",
        ),
        (lambda s, Y, X: (s, Y[:0], X, {}), ValueError, "no datasets"),
        (lambda s, Y, X: ("model", Y, X, {}), TypeError, "reml_fn structure"),
        (lambda s, Y, X: (s, Y, X, {"in_dims": (0, 0, 0)}), ValueError, "in_dims must be"),
        (lambda s, Y, X: (s, Y, X, {"in_dims": 0}), ValueError, "entries along its batch dimension"),
        (lambda s, Y, X: (s, Y, X, {"init": torch.zeros(3)}), ValueError, r"init must have shape \(k,\)"),
        (lambda s, Y, X: (s, Y, X, {"init": {"group": {}}}), ValueError, "init is missing"),
        (lambda s, Y, X: (s, Y, X, {"chunk_size": 0}), ValueError, "chunk_size"),
        (lambda s, Y, X: (s, Y, X, {"max_iter": -1}), ValueError, "max_iter"),
        (lambda s, Y, X: (s, Y, X, {"jacobian": "numeric"}), ValueError, "unknown Jacobian"),
        (lambda s, Y, X: (s, Y, X, {"engine": "sparse"}), ValueError, "unknown engine"),
        (lambda s, Y, X: (s, Y, X, {"x_names": ["a"]}), ValueError, "x_names has 1 names"),
    ],
)
def test_bad_input_is_an_error_before_any_work(change, error, match):
    s, Y, X, options = change(*_inputs())
    with pytest.raises(error, match=match):
        rf.fit_batched(s, Y, X, **options)


def test_stack_structures_rejects_different_forms():
    with pytest.raises(ValueError, match="differs in form"):
        stack_structures([rf.Scalar(3), rf.Scalar(4)])
    with pytest.raises(ValueError, match="at least one"):
        stack_structures([])


# -------------------------------------------------------------------- users' own loops compose


def test_vmap_of_grad_of_reml_loglik_is_the_batched_score():
    groups, X, Y = random_intercept_batch(B=4)
    s = grouped_model(groups, Y.shape[1])
    theta = torch.tensor([[0.1, -0.2], [0.0, 0.0], [0.3, 0.1], [-0.5, 0.2]])

    def loss(t, y):
        return rf.reml_loglik(s, t, y, X)

    scores = torch.func.vmap(torch.func.grad(loss))(theta, Y)
    terms = torch.func.vmap(lambda t, y: rf.ai_terms(s, t, y, X))(theta, Y)
    close(scores, terms.score, tol=1e-10)
    for b in range(4):
        close(terms.ai[b], rf.ai_terms(s, theta[b], Y[b], X).ai, tol=1e-12)


# ----------------------------------------------------------------------------- docs and example


def test_docs_batched_md_code_blocks_run():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "batched.md").read_text()
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/batched.md", "exec"), namespace)
    assert namespace["flagged"].status.tolist() == [0, 4, 6, 0]
    assert bool(namespace["per_design"].converged.all())


def test_batched_sleepstudy_example_runs(capsys):
    import pathlib
    import runpy

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "batched_sleepstudy.py"
    module = runpy.run_path(str(path))
    threads = torch.get_num_threads()
    try:
        result = module["main"](n_responses=40)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "40 fits" in out and "var(Days)" in out and "residual variance" in out
    assert result.loglik.shape == (40,)


def test_singular_random_slope_fits_match_fit_one_by_one():
    """Responses whose optimum has |ρ| = 1 (held at the correlation limit) fit alike in a batch."""
    data = rf.datasets.load("sleepstudy", categorical=("Subject",))
    days, codes = data["Days"], torch.arange(180) // 10
    X = torch.stack([torch.ones(180), days], 1)
    s = rf.Sum(subject=rf.Grouped(groups=codes, covariates=X, cov=rf.Unstructured(2)), residual=rf.Scalar(180))
    rows = []
    for seed in (0, 1, 4, 6):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(18, generator=g)
        rows.append(250 + 10 * days + 20 * u[codes] + 4 * u[codes] * days + 25 * torch.randn(180, generator=g))
    Y = torch.stack(rows)
    batched = rf.fit_batched(s, Y, X)
    for b in range(Y.shape[0]):
        alone = rf.fit(s, Y[b], X)
        assert bool(batched.converged[b]) and bool(alone.converged)
        assert torch.equal(batched.at_boundary[b], alone.at_boundary)
        assert float(batched.loglik[b]) == pytest.approx(float(alone.loglik), abs=1e-8)
    assert int(batched.at_boundary.any(-1).sum()) == 3
