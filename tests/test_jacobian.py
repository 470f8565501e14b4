"""Jacobians: closed form = jacfwd = jacrev for every base structure (hypothesis), a
finite-difference anchor (gradcheck), AR1 exact at ρ = 0, fixed parameters leave the Jacobian,
the stacked format, and bad input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.testing import (
    BASE_KINDS,
    assert_jacobian_matches,
    base_structures,
    fix_some,
    raw_params,
    seeded_normal,
    structures_with_params,
)


@pytest.mark.parametrize("kind", BASE_KINDS)
@given(data=st.data())
def test_closed_form_equals_jacfwd_and_jacrev(kind, data):
    s, params = data.draw(structures_with_params(kinds=(kind,)), label="structure, params")
    assert_jacobian_matches(s, params, atol=1e-10, methods=("fwd", "rev"))


@given(base_structures().flatmap(fix_some).flatmap(lambda s: raw_params(s).map(lambda params: (s, params))))
def test_partially_fixed_structures_keep_exact_jacobians(pair):
    s, params = pair
    assert_jacobian_matches(s, params)
    assert sorted(rf.params.param_names(s)) == sorted(_paths(rf.jacobian(s, params)))


@given(base_structures().flatmap(fix_some).flatmap(lambda s: raw_params(s).map(lambda params: (s, params))))
def test_matrix_and_derivatives_from_one_pass_equal_the_separate_calls(pair):
    # The engines build Σ and its Jacobian from one evaluation of the natural values
    # (matrix_and_derivative_stack); it must give exactly what build and jacobian give apart.
    from reml_fn.reml.covariance_blocks import derivative_stack, matrix_and_derivative_stack

    s, params = pair
    G, names, D = matrix_and_derivative_stack(s, params, "cov", "closed", torch.float64)
    expected_names, expected_D = derivative_stack(s, params, "cov", "closed", torch.float64)
    assert torch.equal(G, s.build(params).to(torch.float64))
    assert names == expected_names
    assert (D is None and expected_D is None) or torch.equal(D, expected_D)


def test_a_structure_with_its_own_jacobian_keeps_it_in_the_one_pass_path():
    # A Parametric subclass may override _jacobian itself; the engines' one-pass matrix and
    # Jacobian must then run that override, not the natural-value chain rule.
    from reml_fn.reml.covariance_blocks import matrix_and_derivative_stack

    class Halved(rf.Scalar):
        def _jacobian(self, params):
            return {name: 0.5 * value for name, value in super()._jacobian(params).items()}

    s = Halved(2)
    params = s.init_params(torch.float64)
    G, names, D = matrix_and_derivative_stack(s, params, "cov", "closed", torch.float64)
    assert names == ["cov/sigma^2"]
    assert torch.equal(D[0], 0.5 * rf.Scalar(2).jacobian(params)["sigma^2"])
    assert torch.equal(G, torch.eye(2, dtype=torch.float64))


def _paths(tree, prefix=""):
    out = []
    for key, value in tree.items():
        out += _paths(value, f"{prefix}{key}/") if isinstance(value, dict) else [prefix + key]
    return out


@given(base_structures(), st.data())
def test_fixed_parameters_leave_the_jacobian_and_the_rest_is_unchanged(s, data):
    """Fixing p at raw value c: the free slices equal the unfixed Jacobian's at θ_p = c."""
    names = rf.all_param_names(s)
    if not names:
        return
    fixed = data.draw(st.lists(st.sampled_from(names), unique=True, min_size=1), label="fixed")
    full = data.draw(raw_params(s), label="params")
    values = {name: float(rf.params.get_path(full, name)) for name in fixed}
    s_fixed = rf.fix(s, values, scale="raw")
    free = [n for n in names if n not in fixed]
    assert rf.param_names(s_fixed) == free
    free_params = rf.unflatten_params(s_fixed, torch.stack([rf.params.get_path(full, n) for n in free])) if free else {}
    assert torch.allclose(s_fixed.build(free_params), s.build(full), atol=1e-14, rtol=1e-14)
    J_fixed, names_fixed = rf.jacobian_stack(s_fixed, free_params)
    J_full, names_full = rf.jacobian_stack(s, full)
    assert names_fixed == free
    assert J_fixed.shape == (len(free), *s.shape)
    keep = [names_full.index(n) for n in free]
    assert torch.allclose(J_fixed, J_full[keep], atol=1e-14, rtol=1e-14)


# ---- finite-difference anchor ---------------------------------------------------------------


def _custom():
    A, B = seeded_normal(1, (2, 3, 3)), seeded_normal(2, (3, 3))
    return rf.Custom(lambda x: torch.tensordot(torch.sin(x), A, dims=1) + x[0] * x[1] * B, 2)


def _reparam():
    M = seeded_normal(3, (2, 2), scale=0.5)
    return rf.Reparam(rf.AR1(3), lambda x: M @ torch.tanh(x), 2)


_ANCHORS = {
    "Scalar": lambda: rf.Scalar(3),
    "EqualEntry": lambda: rf.EqualEntry(2, 3),
    "Diagonal": lambda: rf.Diagonal(3),
    "Equicorrelation": lambda: rf.Equicorrelation(3),
    "CompoundSymmetric": lambda: rf.CompoundSymmetric(4),
    "AR1": lambda: rf.AR1(4),
    "Unstructured": lambda: rf.Unstructured(3),
    "LowerTriangular": lambda: rf.LowerTriangular(3, 2),
    "Custom": _custom,
    "Reparam": _reparam,
}


@pytest.mark.parametrize("name", list(_ANCHORS))
def test_closed_form_matches_finite_differences(name):
    """torch.autograd.gradcheck compares autograd with central differences; the closed form
    must equal autograd (same point), so both are anchored to finite differences."""
    s = _ANCHORS[name]()
    k = len(rf.param_names(s))
    theta = seeded_normal(k, (k,), scale=0.7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda th: s(th), (theta,), eps=1e-6, atol=1e-7, rtol=1e-6)
    closed, _ = rf.jacobian_stack(s, theta.detach())
    h = 1e-6
    for i in range(k):
        step = torch.zeros(k)
        step[i] = h
        central = (s(theta.detach() + step) - s(theta.detach() - step)) / (2 * h)
        assert torch.allclose(closed[i], central, atol=1e-7, rtol=1e-6), rf.param_names(s)[i]


# ---- AR(1) at and near ρ = 0 ------------------------------------------------------------------


def _ar1_rho_jacobian(n, raw_sigma2, raw_rho):
    """dV/dθ_ρ[i, j] = σ² |i−j| ρ^{|i−j|−1} dρ/dθ, with ρ = 2σ(θ) − 1, dρ/dθ = 2σ(θ)(1 − σ(θ))."""
    sigma2 = math.exp(2 * raw_sigma2)
    p = 1 / (1 + math.exp(-raw_rho))
    rho, drho = 2 * p - 1, 2 * p * (1 - p)
    return torch.tensor(
        [[sigma2 * abs(i - j) * rho ** (abs(i - j) - 1) * drho if i != j else 0.0 for j in range(n)] for i in range(n)]
    )


@pytest.mark.parametrize("raw_rho", [0.0, 1e-7, -1e-7, 1e-12, 1e-3, 0.8])
@pytest.mark.parametrize("raw_sigma2", [0.0, 0.4])
def test_ar1_jacobian_exact_at_and_near_rho_zero(raw_rho, raw_sigma2):
    s = rf.AR1(5)
    params = {"sigma^2": torch.tensor(raw_sigma2), "rho": torch.tensor(raw_rho)}
    closed = rf.jacobian(s, params)
    assert all(torch.isfinite(leaf).all() for leaf in closed.values())
    assert_jacobian_matches(s, params, atol=1e-12, rtol=1e-12)
    assert torch.allclose(closed["rho"], _ar1_rho_jacobian(5, raw_sigma2, raw_rho), atol=1e-14, rtol=1e-12)


def test_ar1_lag_one_derivative_is_half_at_the_default_start():
    # σ² = 1 and dρ/dθ = 2σ(0)(1 − σ(0)) = 0.5; torch-openreml gives NaN at θ = 0 and 0.025 at 1e-7.
    for raw_rho in (0.0, 1e-7):
        J = rf.jacobian(rf.AR1(4), {"sigma^2": torch.tensor(0.0), "rho": torch.tensor(raw_rho)})
        assert J["rho"][0, 1].item() == pytest.approx(0.5, abs=1e-12)
        assert J["rho"][1, 0].item() == pytest.approx(0.5, abs=1e-12)
        assert J["rho"][0, 2].item() == pytest.approx(2 * math.tanh(raw_rho / 2) * 0.5, abs=1e-15)
        assert torch.all(J["rho"].diagonal() == 0)
    J0 = rf.jacobian(rf.AR1(4))  # the defaults: ρ = 0 exactly
    assert torch.equal(J0["rho"], 0.5 * (torch.diag(torch.ones(3), 1) + torch.diag(torch.ones(3), -1)))
    assert torch.equal(J0["sigma^2"], 2 * torch.eye(4))


# ---- formats -----------------------------------------------------------------------------------


def test_jacobian_tree_and_stack_agree():
    s = rf.CompoundSymmetric(3)
    theta = torch.tensor([0.5, 1.0])
    tree = rf.jacobian(s, theta)
    stack, names = rf.jacobian_stack(s, theta)
    assert names == ["sigma^2", "rho"] and list(tree) == names
    assert stack.shape == (2, 3, 3)
    for i, name in enumerate(names):
        assert torch.equal(stack[i], tree[name])
    for method in ("fwd", "rev"):
        other, other_names = rf.jacobian_stack(s, theta, method=method)
        assert other_names == names and torch.allclose(other, stack, atol=1e-14)


def test_jacobian_accepts_tree_flat_and_none():
    s = rf.AR1(3)
    defaults = rf.jacobian(s, s.init_params())
    for params in (None, torch.zeros(2), {"sigma^2": torch.tensor(0.0), "rho": torch.tensor(0.0)}):
        for name, leaf in rf.jacobian(s, params).items():
            assert torch.equal(leaf, defaults[name])
    assert torch.equal(s.jacobian(s.init_params())["rho"], defaults["rho"])


@pytest.mark.parametrize("method", ["closed", "fwd", "rev"])
@pytest.mark.parametrize(
    "s", [rf.Identity(3), rf.Fixed(torch.ones(2, 3)), rf.fix(rf.AR1(3), "/")], ids=["Identity", "Fixed", "all fixed"]
)
def test_no_free_parameters(s, method):
    assert rf.jacobian(s, {}, method) == {}
    stack, names = rf.jacobian_stack(s, None, method)
    assert names == [] and stack.shape == (0, *s.shape)


def test_closed_form_is_differentiable_and_vmappable():
    """The closed form is a pure function: autodiff through it gives second derivatives."""
    s = rf.AR1(3)
    theta = torch.tensor([0.3, -0.2])
    second = torch.func.jacfwd(lambda th: rf.jacobian_stack(s, th)[0])(theta)  # (2, 3, 3, 2)
    reference = torch.func.jacfwd(torch.func.jacfwd(lambda th: s(th)))(theta).movedim(-2, 0)
    assert torch.allclose(second, reference, atol=1e-12)


# ---- bad input ---------------------------------------------------------------------------------


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown Jacobian method 'foo'; expected one of"):
        rf.jacobian(rf.AR1(3), None, method="foo")
    with pytest.raises(ValueError, match="unknown Jacobian method"):
        rf.jacobian_stack(rf.AR1(3), None, method="jacobian")


def test_not_a_structure():
    with pytest.raises(TypeError, match="expected a reml_fn structure, got int"):
        rf.jacobian(3, {})
    with pytest.raises(TypeError, match="expected a reml_fn structure, got Tensor"):
        rf.jacobian_stack(torch.eye(2), {})


@pytest.mark.parametrize("method", ["closed", "fwd", "rev"])
def test_bad_parameters_are_named(method):
    s = rf.AR1(3)
    with pytest.raises(ValueError, match=r"missing \['sigma\^2'\]"):
        rf.jacobian(s, {"rho": torch.tensor(0.0)}, method)
    with pytest.raises(ValueError, match=r"must have length 2 \(\['sigma\^2', 'rho'\]\), got 3"):
        rf.jacobian(s, torch.zeros(3), method)
    with pytest.raises(TypeError, match="floating-point"):
        rf.jacobian(s, {"sigma^2": torch.tensor(0), "rho": torch.tensor(0)}, method)


@pytest.mark.parametrize(
    "jacobian, error, match",
    [
        (lambda x: torch.ones(2, 2), ValueError, r"must return shape \(1, 2, 2\), got \(2, 2\)"),
        (lambda x: torch.ones(2, 2, 2), ValueError, r"must return shape \(1, 2, 2\), got \(2, 2, 2\)"),
        (lambda x: 1.0, TypeError, "must return a tensor of shape"),
        (lambda x: [torch.eye(2)], TypeError, "got list"),
    ],
)
def test_custom_bad_jacobian_output(jacobian, error, match):
    s = rf.Custom(lambda x: x[0] * torch.eye(2), 1, jacobian=jacobian)
    with pytest.raises(error, match=match):
        rf.jacobian(s, None)
    with pytest.raises(error, match=match):
        s.jacobian(s.init_params())
    # autodiff does not use the user's Jacobian
    assert torch.equal(rf.jacobian(s, None, "fwd")["theta_0"], torch.eye(2))


def test_assert_jacobian_matches_reports_the_parameter_and_error():
    wrong = rf.Custom(
        lambda x: torch.stack([x[0] ** 2, x[1]]).diag(), 2, jacobian=lambda x: torch.stack([torch.eye(2), torch.eye(2)])
    )
    with pytest.raises(AssertionError) as info:
        assert_jacobian_matches(wrong, torch.tensor([3.0, 0.0]), methods=("rev",))
    message = str(info.value)
    assert "Custom(2, 2)" in message and "'theta_0' vs jacrev" in message and "max |error| = 5.000e+00" in message
    assert "theta_1" in message  # dV/dθ_1 has its 1 at (1, 1), not (0, 0)
    with pytest.raises(ValueError, match="methods must be"):
        assert_jacobian_matches(rf.AR1(2), None, methods=("closed",))
