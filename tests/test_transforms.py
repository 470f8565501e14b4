"""Transforms: inverse ∘ forward = identity, derivative = autograd, shape and dtype preserved,
torch-openreml's observed values (inventory §1), and every constructor error."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn import transforms as T
from reml_fn.params import ParamSpec

# Each entry: (transform, range of raw values on which forward is smooth and invertible in float64).
_raw_range = (-2.0, 2.0)
_scales = st.floats(0.25, 3.0).flatmap(lambda a: st.sampled_from([a, -a]))
_shifts = st.floats(-2.0, 2.0)


@st.composite
def transforms_with_range(draw):
    """A transform and the interval of raw values it is tested on."""
    kind = draw(
        st.sampled_from(["Identity", "Exp", "Exp2", "Exp10", "ExpPow2", "Sigmoid", "ScaleShift", "Pow", "Chain"])
    )
    if kind == "ScaleShift":
        return T.ScaleShift(draw(_scales), draw(_shifts)), _raw_range
    if kind == "Pow":
        # Non-integer powers need positive raw values.
        return T.Pow(draw(st.sampled_from([0.5, 2.0, 3.0, 1.5, -1.0]))), (0.2, 3.0)
    if kind == "Chain":
        chain = draw(
            st.sampled_from(
                [
                    lambda a, b: T.Chain((T.Sigmoid(), T.ScaleShift(a, b))),
                    lambda a, b: T.Chain((T.ScaleShift(a, b), T.Exp())),
                    lambda a, b: T.Chain((T.ScaleShift(a, b), T.Sigmoid(), T.ScaleShift(2.0, -1.0))),
                    lambda a, b: T.Chain((T.Exp(), T.Pow(2.0), T.ScaleShift(a, b))),
                    lambda a, b: T.Chain(T.ExpPow2()),
                ]
            )
        )
        return chain(draw(_scales), draw(_shifts)), _raw_range
    return getattr(T, kind)(), _raw_range


@st.composite
def transform_and_raw(draw):
    transform, (low, high) = draw(transforms_with_range())
    shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    count = math.prod(shape)
    values = draw(st.lists(st.floats(low, high), min_size=count, max_size=count))
    return transform, torch.tensor(values, dtype=torch.float64).reshape(shape)


@given(transform_and_raw())
def test_inverse_of_forward_is_identity(pair):
    transform, raw = pair
    assert torch.allclose(transform.inverse(transform.forward(raw)), raw, atol=1e-9, rtol=1e-9)


@given(transform_and_raw())
def test_derivative_equals_autograd(pair):
    transform, raw = pair
    raw = raw.clone().requires_grad_(True)
    # Elementwise maps: the gradient of the sum is the elementwise derivative.
    (expected,) = torch.autograd.grad(transform.forward(raw).sum(), raw)
    assert torch.allclose(transform.derivative(raw.detach()), expected, atol=1e-12, rtol=1e-12)


@given(transform_and_raw())
def test_derivative_equals_jacfwd_diagonal_and_is_elementwise(pair):
    transform, raw = pair
    flat = raw.reshape(-1)
    jac = torch.func.jacfwd(transform.forward)(flat)
    assert torch.allclose(jac, torch.diag_embed(transform.derivative(flat)), atol=1e-12, rtol=1e-12)


@given(transform_and_raw(), st.sampled_from([torch.float32, torch.float64]))
def test_shape_and_dtype_preserved(pair, dtype):
    transform, raw = pair
    raw = raw.to(dtype)
    natural = transform.forward(raw)
    for out in (natural, transform.inverse(natural), transform.derivative(raw), transform(raw)):
        assert out.shape == raw.shape
        assert out.dtype == dtype


@given(transform_and_raw(), st.sampled_from([torch.float32, torch.float64]))
def test_derivative_at_the_natural_value_is_the_derivative_exactly(pair, dtype):
    # The structures' shortcut (f' from x = f(θ); None for f' ≡ 1) gives the very same numbers.
    transform, raw = pair
    raw = raw.to(dtype)
    slope = transform._derivative_at(raw, transform.forward(raw))
    assert torch.equal(torch.ones_like(raw) if slope is None else slope, transform.derivative(raw))


@given(transform_and_raw(), st.sampled_from([torch.float32, torch.float64]))
def test_chain_derivative_is_the_product_of_the_stage_derivatives_exactly(pair, dtype):
    transform, raw = pair
    raw = raw.to(dtype)
    stages = transform.stages if isinstance(transform, T.Chain) else (transform,)
    x, expected = raw, torch.ones_like(raw)
    for stage in stages:
        expected = expected * stage.derivative(x)
        x = stage.forward(x)
    assert torch.equal(T.Chain(stages).derivative(raw), expected)
    assert torch.equal(T.Chain(stages).forward(raw), x)


def test_exppow2_doubles_by_addition_with_the_same_values():
    raw = torch.linspace(-30.0, 30.0, 1001)
    assert torch.equal(T.ExpPow2().forward(raw), torch.exp(2.0 * raw))
    assert torch.equal(T.ExpPow2().derivative(raw), 2.0 * torch.exp(2.0 * raw))


def test_subclasses_redefining_the_formulas_lose_the_shortcuts():
    class Exp3(T.Exp):  # e^{3θ}, with Python-number arithmetic
        def forward(self, raw):
            return torch.exp(3.0 * raw)

        def derivative(self, raw):
            return 3.0 * torch.exp(3.0 * raw)

    class LoggedExp(T.Exp):  # restates nothing: same formulas
        def inverse(self, natural):
            return super().inverse(natural)

    raw = torch.tensor(0.2)
    assert not Exp3()._keeps_tangent_dtype
    assert torch.equal(Exp3()._derivative_at(raw, Exp3().forward(raw)), Exp3().derivative(raw))
    assert LoggedExp()._keeps_tangent_dtype and T.Exp()._keeps_tangent_dtype
    s = rf.Scalar(2).with_spec(("sigma^2",), ParamSpec("sigma^2", 0.0, Exp3()))
    assert torch.equal(rf.jacobian(s, {"sigma^2": raw})["sigma^2"], 3.0 * torch.exp(3.0 * raw) * torch.eye(2))


def test_chain_accepts_a_stage_with_a_0d_slope():
    class Half(T.Transform):  # a user transform whose derivative ignores x's shape
        def forward(self, raw):
            return raw * 0.5

        def derivative(self, raw):
            return torch.tensor(0.5)

    x = torch.linspace(-1.0, 1.0, 3)
    assert torch.equal(T.Chain((Half(), T.Identity())).derivative(x), torch.full((3,), 0.5))
    assert torch.equal(T.Chain((T.Identity(), T.Identity())).derivative(x), torch.ones(3))


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_scale_shift_derivative_has_the_shape_of_x(shape):
    # torch-openreml returns tensor([a]) of shape (1,) whatever x's shape (inventory §9.5).
    x = torch.zeros(shape)
    derivative = T.ScaleShift(2.5, -1.0).derivative(x)
    assert derivative.shape == x.shape
    assert torch.equal(derivative, torch.full(shape, 2.5))


def test_python_numbers_are_accepted():
    assert T.ExpPow2().inverse(1.0).item() == 0.0
    assert T.Sigmoid().forward(0).item() == 0.5
    assert T.Identity().derivative(3.0).item() == 1.0


# ---- observed values (torch-openreml, inventory §1) ------------------------------------------

_X = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)


def test_observed_exppow2():
    t = T.ExpPow2()
    expected_forward = [0.1353352832366127, 1.0, 2.718281828459045, 54.598150033144236]
    expected_grad = [0.2706705664732254, 2.0, 5.43656365691809, 109.19630006628847]
    assert torch.allclose(t.forward(_X), torch.tensor(expected_forward), atol=1e-12, rtol=1e-14)
    assert torch.allclose(t.derivative(_X), torch.tensor(expected_grad), atol=1e-12, rtol=1e-14)


def test_observed_sigmoid_scale_shift_chain():
    t = T.Chain((T.Sigmoid(), T.ScaleShift(2.0, -1.0)))
    expected_forward = [-0.4621171572600098, 0.0, 0.2449186624037092, 0.7615941559557646]
    expected_grad = [0.3932238664829637, 0.5, 0.470007424403189, 0.20998717080701323]
    assert torch.allclose(t.forward(_X), torch.tensor(expected_forward), atol=1e-12)
    assert torch.allclose(t.derivative(_X), torch.tensor(expected_grad), atol=1e-12)


@pytest.mark.parametrize(
    "transform, x, forward, derivative",
    [
        (T.Identity(), 0.7, 0.7, 1.0),
        (T.Exp(), 1.0, math.e, math.e),
        (T.Exp2(), 3.0, 8.0, 8.0 * math.log(2.0)),
        (T.Exp10(), 2.0, 100.0, 100.0 * math.log(10.0)),
        (T.Sigmoid(), 0.0, 0.5, 0.25),
        (T.ScaleShift(3.0, 1.0), 2.0, 7.0, 3.0),
        (T.Pow(3.0), 2.0, 8.0, 12.0),
        (T.Pow(0.5), 4.0, 2.0, 0.25),
    ],
)
def test_formulas(transform, x, forward, derivative):
    raw = torch.tensor(x)
    assert transform.forward(raw).item() == pytest.approx(forward, rel=1e-14)
    assert transform.derivative(raw).item() == pytest.approx(derivative, rel=1e-14)
    assert transform.inverse(torch.tensor(forward)).item() == pytest.approx(x, rel=1e-14)


def test_chain_applies_stages_in_order_and_inverts_in_reverse():
    t = T.Chain([T.ScaleShift(2.0), T.Exp()])  # e^{2x}
    x = torch.tensor(0.3)
    assert t.forward(x).item() == pytest.approx(math.exp(0.6), rel=1e-15)
    assert t.inverse(torch.tensor(math.exp(0.6))).item() == pytest.approx(0.3, rel=1e-14)
    assert t.stages == (T.ScaleShift(2.0), T.Exp())
    assert T.Chain(T.Exp()).stages == (T.Exp(),)


def test_transforms_are_hashable_values():
    # They live in structures' static configuration (tree specs), so equality is by value.
    a = T.Chain((T.Sigmoid(), T.ScaleShift(2.0, -1.0)))
    b = T.Chain([T.Sigmoid(), T.ScaleShift(2.0, -1.0)])
    assert a == b and hash(a) == hash(b)
    assert T.ScaleShift(2.0) != T.ScaleShift(3.0)
    with pytest.raises(AttributeError):
        a.stages = ()  # frozen


def test_str_shows_domain_and_codomain():
    assert str(T.ExpPow2()) == "ExpPow2: ℝ ↦ ℝ⁺"
    assert str(T.Chain((T.Sigmoid(), T.Exp()))) == "Chain: ℝ ↦ ℝ⁺"


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: T.ScaleShift(0.0), ValueError, "a != 0"),
        (lambda: T.ScaleShift(0), ValueError, "a != 0"),
        (lambda: T.ScaleShift(float("nan")), ValueError, "finite"),
        (lambda: T.ScaleShift(1.0, float("inf")), ValueError, "finite"),
        (lambda: T.ScaleShift(torch.tensor(1.0)), TypeError, "Python numbers"),
        (lambda: T.ScaleShift("2"), TypeError, "Python numbers"),
        (lambda: T.ScaleShift(True), TypeError, "Python numbers"),
        (lambda: T.Pow(0), ValueError, "non-zero"),
        (lambda: T.Pow(float("nan")), ValueError, "finite"),
        (lambda: T.Pow("2"), TypeError, "Python number"),
        (lambda: T.Pow(True), TypeError, "Python number"),
        (lambda: T.Chain([T.Exp(), 3]), TypeError, "stage 1 must be a Transform, got int"),
        (lambda: T.Chain([torch.exp]), TypeError, "stage 0 must be a Transform"),
        (lambda: T.Chain([]), TypeError, "non-empty list or tuple"),
        (lambda: T.Chain(3), TypeError, "non-empty list or tuple"),
        (lambda: T.Chain("Exp"), TypeError, "non-empty list or tuple"),
    ],
)
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_base_transform_is_abstract():
    with pytest.raises(NotImplementedError):
        T.Transform().forward(torch.tensor(0.0))
