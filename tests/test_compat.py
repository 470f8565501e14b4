"""reml_fn.compat: torch-openreml's spelling over the functional core.

The seed page's examples run verbatim (import changed) and print its numbers; every member listed
on the seed page exists and works; compat results equal the functional core's; torch-openreml's
observed values (inventory §3–§5) reproduce through the compat names; its messages are kept where
sensible and its bugs (§9.2, §9.4, §9.5, §9.12) are absent.
"""

import doctest
import math

import pytest
import torch

import reml_fn as rf
from reml_fn import compat
from reml_fn.compat import (
    Adapter,
    AR1Matrix,
    Augment,
    BlockDiagonal,
    CompoundSymmetricMatrix,
    CovariancePropagation,
    DiagonalMatrix,
    DummyMatrix,
    EqualEntryMatrix,
    EquicorrelationMatrix,
    Gram,
    HadamardProduct,
    IdentityMatrix,
    Inverse,
    KroneckerProduct,
    LowerTriangularMatrix,
    Matrix,
    Product,
    ScalarMatrix,
    SimpleMatrix,
    Stack,
    Sum,
    Transpose,
    UnconstrainedMatrix,
)
from reml_fn.compat.transform import (
    Transform,
    TransformChain,
    TransformExp,
    TransformExp2,
    TransformExp10,
    TransformExpPow2,
    TransformIdentity,
    TransformPow,
    TransformScaleShift,
    TransformSigmoid,
)

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


# -- the seed page, verbatim ------------------------------------------------------------------

SEED_CALL = """
>>> import torch
>>> from torch_openreml.covariance import AR1Matrix, ScalarMatrix, Sum
>>> op = Sum(time=AR1Matrix(4), noise=ScalarMatrix(4))
>>> free_params = torch.tensor([0.5, 1.0, 1.0])
>>> op(free_params)
tensor([[10.1073,  1.2562,  0.5805,  0.2683],
        [ 1.2562, 10.1073,  1.2562,  0.5805],
        [ 0.5805,  1.2562, 10.1073,  1.2562],
        [ 0.2683,  0.5805,  1.2562, 10.1073]])
"""

SEED_MANUAL_GRAD = """
>>> import torch
>>> from torch_openreml.covariance import AR1Matrix, ScalarMatrix, Sum
>>> op = Sum(time=AR1Matrix(4), noise=ScalarMatrix(4))
>>> free_params = torch.tensor([0.5, 1.0, 1.0])
>>> grad, grad_names = op.manual_grad(free_params)
>>> grad
tensor([[[ 5.4366,  2.5123,  1.1610,  0.5365],
         [ 2.5123,  5.4366,  2.5123,  1.1610],
         [ 1.1610,  2.5123,  5.4366,  2.5123],
         [ 0.5365,  1.1610,  2.5123,  5.4366]],
<BLANKLINE>
        [[ 0.0000,  1.0689,  0.9879,  0.6848],
         [ 1.0689,  0.0000,  1.0689,  0.9879],
         [ 0.9879,  1.0689,  0.0000,  1.0689],
         [ 0.6848,  0.9879,  1.0689,  0.0000]],
<BLANKLINE>
        [[14.7781,  0.0000,  0.0000,  0.0000],
         [ 0.0000, 14.7781,  0.0000,  0.0000],
         [ 0.0000,  0.0000, 14.7781,  0.0000],
         [ 0.0000,  0.0000,  0.0000, 14.7781]]])
>>> grad_names
['time/sigma^2', 'time/rho', 'noise/sigma^2']
"""


def run_seed_snippet(text: str) -> None:
    """Run a seed snippet as a doctest, with only its import changed."""
    source = text.replace("torch_openreml.covariance", "reml_fn.compat")
    test = doctest.DocTestParser().get_doctest(source, {}, "seed", "seed page", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("snippet", [SEED_CALL, SEED_MANUAL_GRAD], ids=["call", "manual_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_examples_run_verbatim(snippet, dtype):
    """torch's default dtype is float32 for users (the seed's) and float64 in this suite."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        run_seed_snippet(snippet)
    finally:
        torch.set_default_dtype(previous)


SEED_METHODS = [
    "__call__",
    "auto_grad",
    "build_operands",
    "build_params",
    "get_intermediates",
    "grad",
    "manual_grad",
    "map_theta_to_dv",
    "map_theta_to_v",
    "operands_grad",
    "reset_intermediates",
    "set_intermediates",
    "trans_grad",
]
SEED_ATTRIBUTES = [
    "fixed_param_defaults",
    "fixed_param_index",
    "fixed_param_names",
    "fixed_param_trans",
    "free_param_defaults",
    "free_param_index",
    "free_param_names",
    "free_param_trans",
    "num_fixed_params",
    "num_free_params",
    "num_params",
    "operands",
    "param_defaults",
    "param_names",
    "param_specs",
    "param_trans",
    "repr_dict",
    "shape",
]


def seed_op():
    return Sum(time=AR1Matrix(4), noise=ScalarMatrix(4))


def test_every_seed_member_exists_and_works():
    op = seed_op()
    x = t(0.5, 1.0, 1.0)
    for name in SEED_METHODS:
        assert callable(getattr(op, name)), name
    V = op(x)
    assert torch.equal(op.map_theta_to_v(x), V)
    assert torch.allclose(op.map_theta_to_dv(x), op.grad(x)[0])
    grad, names = op.auto_grad(x)
    assert torch.allclose(grad, op.manual_grad(x)[0]) and names == op.free_param_names
    A, B = op.build_operands(x)
    assert torch.allclose(A + B, V)
    grads, grad_names = op.operands_grad(x)
    assert grad_names == [["time/sigma^2", "time/rho"], ["noise/sigma^2"]]
    assert torch.allclose(torch.cat(grads), op.manual_grad(x)[0])
    assert torch.allclose(
        op.trans_grad(x), 2 * torch.exp(2 * t(0.5, 1.0, 1.0)) * t(1.0, 0.0, 1.0) + t(0, 0.39322386648296376, 0)
    )
    assert op.build_params(x).shape == (3,)
    assert op.get_intermediates(x) is None
    assert op.set_intermediates(x, {"v": V}) is None and op.get_intermediates(x) is None
    assert op.reset_intermediates() is None

    assert op.shape == (4, 4)
    assert op.param_names == op.free_param_names == ["time/sigma^2", "time/rho", "noise/sigma^2"]
    assert op.fixed_param_names == [] and op.fixed_param_index == [] and op.free_param_index == [0, 1, 2]
    assert (op.num_params, op.num_free_params, op.num_fixed_params) == (3, 3, 0)
    assert list(op.param_defaults) == op.param_names
    assert all(torch.equal(v, torch.tensor([0.0])) for v in op.free_param_defaults.values())
    assert op.fixed_param_defaults == {} and op.fixed_param_trans == {}
    assert isinstance(op.param_trans["time/sigma^2"], TransformExpPow2)
    assert list(op.free_param_trans) == op.free_param_names
    assert set(op.param_specs["time/rho"]) == {"fixed", "default", "trans"}
    assert list(op.operands) == ["time", "noise"] and isinstance(op.operands["time"], AR1Matrix)
    assert list(op.repr_dict) == ["operands"]
    assert "AR1Matrix" in repr(op) and "ScalarMatrix" in repr(op)
    for name in SEED_ATTRIBUTES:
        getattr(op, name)


# -- compat results equal the functional core's -----------------------------------------------

CASES = [
    (lambda: ScalarMatrix(3), rf.Scalar(3)),
    (lambda: EqualEntryMatrix(3, 2), rf.EqualEntry(3, 2)),
    (lambda: DiagonalMatrix(3), rf.Diagonal(3)),
    (lambda: EquicorrelationMatrix(3), rf.Equicorrelation(3)),
    (lambda: CompoundSymmetricMatrix(3), rf.CompoundSymmetric(3)),
    (lambda: AR1Matrix(4), rf.AR1(4)),
    (lambda: UnconstrainedMatrix(3), rf.Unstructured(3)),
    (lambda: LowerTriangularMatrix(3, 2), rf.LowerTriangular(3, 2)),
    (lambda: Sum(a=AR1Matrix(3), b=ScalarMatrix(3)), rf.Sum(a=rf.AR1(3), b=rf.Scalar(3))),
    (lambda: BlockDiagonal(ScalarMatrix(2), AR1Matrix(2)), rf.BlockDiagonal(rf.Scalar(2), rf.AR1(2))),
    (
        lambda: CovariancePropagation(z=LowerTriangularMatrix(3, 2), g=ScalarMatrix(2)),
        rf.Propagate(z=rf.LowerTriangular(3, 2), g=rf.Scalar(2)),
    ),
    (lambda: KroneckerProduct(UnconstrainedMatrix(2), AR1Matrix(3)), rf.Kronecker(rf.Unstructured(2), rf.AR1(3))),
    (
        lambda: HadamardProduct(CompoundSymmetricMatrix(3), AR1Matrix(3)),
        rf.Hadamard(rf.CompoundSymmetric(3), rf.AR1(3)),
    ),
    (
        lambda: Product(LowerTriangularMatrix(3, 2), EqualEntryMatrix(2, 3)),
        rf.Product(rf.LowerTriangular(3, 2), rf.EqualEntry(2, 3)),
    ),
    (lambda: Transpose(LowerTriangularMatrix(3, 2)), rf.Transpose(rf.LowerTriangular(3, 2))),
    (lambda: Gram(LowerTriangularMatrix(3, 2), gram_type="xxt"), rf.Gram(rf.LowerTriangular(3, 2), gram_type="xxt")),
    (lambda: Augment(ScalarMatrix(3), EqualEntryMatrix(3, 2)), rf.Augment(rf.Scalar(3), rf.EqualEntry(3, 2))),
    (lambda: Stack(ScalarMatrix(3), EqualEntryMatrix(2, 3)), rf.Stack(rf.Scalar(3), rf.EqualEntry(2, 3))),
    (lambda: Inverse(CompoundSymmetricMatrix(3)), rf.Inverse(rf.CompoundSymmetric(3))),
]


@pytest.mark.parametrize("make, functional", CASES, ids=[type(f).__name__ for _, f in CASES])
def test_compat_equals_functional_core(make, functional):
    m = make()
    assert m.free_param_names == rf.param_names(functional)
    assert m.shape == functional.shape
    k = m.num_free_params
    x = torch.linspace(-0.4, 0.6, k, dtype=F64)
    params = rf.unflatten_params(functional, x)
    assert torch.equal(m(x), functional.build(params))
    expected, names = rf.jacobian_stack(functional, params)
    grad, grad_names = m.manual_grad(x)
    assert grad_names == names and torch.equal(grad, expected)
    for method in ("jacfwd", "jacrev", "jacobian"):
        m.jacobian_method = method
        auto, auto_names = m.auto_grad(x)
        assert auto_names == names
        torch.testing.assert_close(auto, expected, rtol=1e-12, atol=1e-12)
    m.grad_mode = "auto"
    torch.testing.assert_close(m.grad(x)[0], expected, rtol=1e-12, atol=1e-12)
    assert type(m.structure) is type(functional)


# -- observed torch-openreml values (inventory §3, §5.2) through the compat names ---------------


def test_observed_leaf_values():
    assert torch.allclose(ScalarMatrix(3)(t(0.5)), 2.718281828459045 * torch.eye(3, dtype=F64))
    assert torch.allclose(ScalarMatrix(3).grad(t(0.5))[0][0], 5.43656365691809 * torch.eye(3, dtype=F64))
    assert torch.allclose(EqualEntryMatrix(3, 2).grad(t(0.5))[0], torch.full((1, 3, 2), 5.43656365691809, dtype=F64))
    V = DiagonalMatrix(3)(t(0, 0.5, 1))
    assert torch.allclose(V.diagonal(), t(1, 2.718281828459045, 7.38905609893065))
    R = EquicorrelationMatrix(3)
    assert math.isclose(R(t(1.0))[0, 1], 0.5965878679450074) and math.isclose(
        R.grad(t(-2.0))[0][0, 0, 1], 0.15749037810525976
    )
    assert R.rho_min == -0.5
    CS = CompoundSymmetricMatrix(3)
    grad, _ = CS.grad(t(0.5, 1))
    assert math.isclose(CS(t(0.5, 1))[0, 1], 1.6216939605140381) and math.isclose(grad[1, 0, 1], 0.8016699680827845)
    V = AR1Matrix(4)(t(0.5, 1))
    assert torch.allclose(V[0], t(2.718281828459045, 1.2561646711990355, 0.5804952469049532, 0.2682568133026645))
    V = UnconstrainedMatrix(3)(t(0, 0.5, 1, 0.2, -0.3, 0.4))
    assert torch.allclose(V, t(1, 0.5, 0.2, 0.5, 7.38905609893065, -0.3, 0.2, -0.3, 2.225540928492468).reshape(3, 3))
    assert LowerTriangularMatrix(3, 2)(t(0, 0.5, 1, 0.2, -0.3)).tolist() == [[0, 0], [0.5, 1], [0.2, -0.3]]
    assert LowerTriangularMatrix(2, 3).param_names == ["L_0_0", "L_1_0", "L_1_1"]


def test_ar1_gradient_is_exact_at_rho_zero():
    """torch-openreml's closed form was NaN at ρ = 0, its default start (§9.2)."""
    m = AR1Matrix(4)
    manual, _ = m.manual_grad()
    auto, _ = m.auto_grad()
    assert torch.isfinite(manual).all() and torch.allclose(manual, auto)
    assert math.isclose(manual[1, 0, 1], 0.5)


def test_observed_operator_values():
    V = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(3))(t(1, 1, 1))
    assert math.isclose(V[0, 0], 54.59815003314424) and math.isclose(V[0, 3], 25.230741884972126)
    V = CovariancePropagation(z=LowerTriangularMatrix(3, 2), g=ScalarMatrix(2))(t(1, 0.5, 2, -1, 0.3, 0.2))
    assert torch.allclose(V[0], t(1.4918246976412703, 0.7459123488206352, -1.4918246976412703))
    assert torch.allclose(V.diagonal(), t(1.4918246976412703, 6.340254964975399, 1.6260889204289848))
    x = t(0, 0.5, 1, 0.2, -0.3)
    xtx = Gram(LowerTriangularMatrix(3, 2))
    assert torch.allclose(xtx(x), t(0.29, 0.44, 0.44, 1.09).reshape(2, 2))
    assert torch.allclose(
        Gram(LowerTriangularMatrix(3, 2), gram_type="xxt")(x), t(0, 0, 0, 0, 1.25, -0.2, 0, -0.2, 0.13).reshape(3, 3)
    )
    grads = t(0, 0, 0, 0, 1, 1, 1, 0, 0, 0.5, 0.5, 2, 0.4, -0.3, -0.3, 0, 0, 0.2, 0.2, -0.6).reshape(5, 2, 2)
    assert torch.allclose(xtx.grad(x)[0], grads)
    inv = Inverse(ScalarMatrix(3))
    assert torch.allclose(inv(t(0.5)), 0.36787944117144233 * torch.eye(3, dtype=F64))
    assert torch.allclose(inv.grad(t(0.5))[0][0], -0.7357588823428847 * torch.eye(3, dtype=F64))
    inv = Inverse(CompoundSymmetricMatrix(3))
    V, (grad, _) = inv(t(0.2, 0.7)), inv.grad(t(0.2, 0.7))
    assert math.isclose(V[0, 0], 1.0093229493533655) and math.isclose(V[0, 1], -0.3374629530543963)
    assert math.isclose(grad[0, 0, 0], -2.0186458987067315) and math.isclose(grad[1, 0, 1], -0.3369542998722318)
    assert Augment(ScalarMatrix(3), EqualEntryMatrix(3, 2), torch.ones(3, 1))(t(0.5, 1)).shape == (3, 6)
    assert Stack(ScalarMatrix(3), EqualEntryMatrix(2, 3))(t(0.5, 1)).shape == (5, 3)


def test_mixed_model_names():
    """Inventory §5.2: MixedModelREML's V spelled with compat operators."""
    g1, g2 = ["a", "b", "c", "a", "b", "c"], ["x", "y", "x", "y", "x", "y"]
    cp = CovariancePropagation(
        Z=Augment(g1=DummyMatrix(g1), g2=DummyMatrix(g2)),
        G=BlockDiagonal(g1=ScalarMatrix(3), g2=ScalarMatrix(2)),
    )
    v = Sum(CP=cp, R=ScalarMatrix(6))
    assert v.free_param_names == ["CP/G/g1/sigma^2", "CP/G/g2/sigma^2", "R/sigma^2"]
    Z = torch.cat([DummyMatrix(g1)(), DummyMatrix(g2)()], dim=1)
    assert torch.allclose(v(), Z @ Z.T + torch.eye(6))


def test_positional_names_nest():
    op = Sum(Sum(DiagonalMatrix(2), ScalarMatrix(2)), torch.eye(2))
    assert op.free_param_names == ["op_0/op_0/sigma^2_0", "op_0/op_0/sigma^2_1", "op_0/op_1/sigma^2"]
    cp = CovariancePropagation(torch.ones(3, 1), ScalarMatrix(1))
    assert cp.free_param_names == ["op_1/sigma^2"] and torch.equal(cp(), torch.ones(3, 3))


# -- parameters: free_params forms, build_params, fixed parameters ------------------------------


def fixed_example():
    """Inventory §9.4's case: A/sigma^2_0 fixed at raw 1 (natural e² = 7.389…)."""
    op = Sum(A=DiagonalMatrix(2), B=ScalarMatrix(2))
    op.set_param_specs("A/sigma^2_0", fixed=True, default=torch.tensor([1.0]))
    return op


def test_build_params_dict_is_aligned_with_fixed_parameters():
    op = fixed_example()
    assert op.free_param_names == ["A/sigma^2_1", "B/sigma^2"] and op.fixed_param_names == ["A/sigma^2_0"]
    assert op.free_param_index == [1, 2] and op.fixed_param_index == [0]
    x = t(0.25, 0.5)
    got = op.build_params(x, out_format="dict")
    assert list(got) == ["A/sigma^2_0", "A/sigma^2_1", "B/sigma^2"]
    assert all(v.shape == (1,) for v in got.values())
    assert torch.allclose(torch.cat(list(got.values())), torch.exp(2 * t(1.0, 0.25, 0.5)))
    assert torch.allclose(op.build_params(x), torch.exp(2 * t(1.0, 0.25, 0.5)))
    raw = op.build_params(x, include_fixed=False, trans=False, out_format="dict")
    assert list(raw) == ["A/sigma^2_1", "B/sigma^2"] and torch.equal(torch.cat(list(raw.values())), x)
    assert torch.equal(op.build_params(x, trans=False), t(1.0, 0.25, 0.5))
    assert op.fixed_param_defaults == {"A/sigma^2_0": torch.tensor([1.0])}
    V = op(x)
    assert torch.allclose(V.diagonal(), torch.exp(2 * t(1.0, 0.25)) + math.exp(1.0))
    grad, names = op.grad(x)
    assert names == ["A/sigma^2_1", "B/sigma^2"] and grad.shape == (2, 2, 2)
    assert torch.allclose(grad, op.auto_grad(x)[0])


def test_build_params_empty_and_bad_format():
    m = IdentityMatrix(2)
    assert m.build_params().shape == (0,) and m.build_params(out_format="dict") == {}
    assert m.trans_grad().shape == (0,)
    with pytest.raises(ValueError, match="Unexpected 'out_format': list!"):
        ScalarMatrix(2).build_params(out_format="list")


def test_free_params_as_dict():
    op = seed_op()
    flat = op(t(0.5, 1.0, 1.0))
    one_element = {"time/sigma^2": t(0.5), "time/rho": t(1.0), "noise/sigma^2": t(1.0)}
    zero_dim = {k: v.reshape(()) for k, v in one_element.items()}
    assert torch.equal(op(one_element), flat) and torch.equal(op(zero_dim), flat)
    assert torch.equal(op.grad(one_element)[0], op.grad(t(0.5, 1.0, 1.0))[0])
    assert torch.equal(op(op.free_param_defaults), op())


@pytest.mark.parametrize(
    "free_params, error, match",
    [
        ({"time/sigma^2": t(0.0), "time/rho": t(0.0)}, ValueError, r"Missing free parameters: \{'noise/sigma\^2'\}!"),
        (
            {"time/sigma^2": t(0.0), "time/rho": t(0.0), "noise/sigma^2": t(0.0), "x": t(0.0)},
            ValueError,
            r"Unexpected free parameters: \{'x'\}!",
        ),
        (
            {"time/sigma^2": t(0.0), "time/rho": torch.tensor([0.0], dtype=torch.float32), "noise/sigma^2": t(0.0)},
            ValueError,
            "All free parameters must share the same dtype and device!",
        ),
        (
            {"time/sigma^2": 0.0, "time/rho": t(0.0), "noise/sigma^2": t(0.0)},
            TypeError,
            "Parameters must be a Torch tensor!",
        ),
        (
            {"time/sigma^2": t(0.0, 1.0), "time/rho": t(0.0), "noise/sigma^2": t(0.0)},
            ValueError,
            "Parameters must have length 1, got 2!",
        ),
        ([0.5, 1.0, 1.0], TypeError, "Parameters must be a Torch tensor!"),
        (torch.zeros(1, 3), ValueError, "Parameters must be a 1D tensor!"),
        (torch.zeros(2), ValueError, "Parameters must have length 3, got 2!"),
    ],
)
def test_free_params_errors(free_params, error, match):
    op = seed_op()
    for method in (op.__call__, op.grad, op.auto_grad, op.build_params, op.trans_grad, op.build_operands):
        with pytest.raises(error, match=match):
            method(free_params)


def test_fixed_parameter_name_in_dict_is_unexpected():
    op = fixed_example()
    with pytest.raises(ValueError, match=r"Unexpected free parameters: \{'A/sigma\^2_0'\}!"):
        op({"A/sigma^2_0": t(0.0), "A/sigma^2_1": t(0.0), "B/sigma^2": t(0.0)})


def test_dtype_and_device_follow_the_input():
    """Parameter-less pieces and fixed tensors follow the input too (the default dtype is float64)."""
    op = Sum(a=IdentityMatrix(3), b=ScalarMatrix(3), c=torch.ones(3, 3, dtype=F64))
    x32 = torch.tensor([0.5], dtype=torch.float32)
    assert op(x32).dtype == torch.float32
    assert op.grad(x32)[0].dtype == torch.float32 and op.auto_grad(x32)[0].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in op.build_operands(x32))
    assert op.build_params(x32).dtype == torch.float32
    assert torch.get_default_dtype() == F64  # restored
    fixed = ScalarMatrix(2)
    fixed.set_param_specs("sigma^2", fixed=True, default=0.25)
    assert Sum(a=fixed, b=ScalarMatrix(2))(x32).dtype == torch.float32
    assert op(torch.tensor([0])).dtype == F64  # integer input: promoted to the default dtype
    assert op().dtype == F64


@pytest.mark.parametrize("make, functional", CASES, ids=[type(f).__name__ for _, f in CASES])
def test_float32_auto_grad_stays_float32(make, functional):
    """Under jacfwd, a Python float times a 0-d float32 tensor has a float64 tangent
    (pytorch/functorch#1073): Diagonal leaked float64 Jacobians and Unstructured crashed in
    index_put before the core cast the natural parameters (structures/base.py)."""
    m = make()
    x = torch.linspace(-0.3, 0.4, m.num_free_params, dtype=torch.float32)
    manual, _ = m.manual_grad(x)
    for method in ("jacfwd", "jacrev"):
        m.jacobian_method = method
        auto, _ = m.auto_grad(x)
        assert auto.dtype == torch.float32, method
        torch.testing.assert_close(auto, manual, rtol=1e-4, atol=1e-5)


def test_requires_grad_flows_through():
    x = t(0.5, 1.0, 1.0).requires_grad_()
    seed_op()(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- set_param_specs ---------------------------------------------------------------------------


def test_set_param_specs_replaces_the_structure_and_reaches_shared_operands():
    time = AR1Matrix(4)
    op = Sum(time=time, noise=ScalarMatrix(4))
    before = op.structure
    op.set_param_specs("time/rho", fixed=True, default=torch.tensor([1.0]))
    assert op.structure is not before and before.param_specs_tree()["time"]["rho"].fixed is False  # immutable
    assert time.free_param_names == ["sigma^2"]  # the operand object is shared, as in torch-openreml
    time.set_param_specs("rho", fixed=False)
    assert op.free_param_names == ["time/sigma^2", "time/rho", "noise/sigma^2"]
    op.set_param_specs("time/", fixed=True)
    assert op.free_param_names == ["noise/sigma^2"] and op.grad(t(1.0))[1] == ["noise/sigma^2"]
    op.set_param_specs("/", fixed=False)
    assert op.num_free_params == 3
    op.set_param_specs("noise/sigma^2", trans=TransformExp())
    assert torch.allclose(op(t(0.0, 0.0, 1.0)), torch.eye(4, dtype=F64) * (1 + math.e))


def test_set_param_specs_subtree_of_nested_operators():
    op = Sum(inner=Sum(DiagonalMatrix(2), ScalarMatrix(2)), extra=ScalarMatrix(2))
    op.set_param_specs("inner/op_0/", fixed=True)
    assert op.free_param_names == ["inner/op_1/sigma^2", "extra/sigma^2"]


@pytest.mark.parametrize(
    "key, kwargs, error, match",
    [
        (1, {"fixed": True}, TypeError, "'key' must be a str, got int!"),
        ("nope", {"fixed": True}, ValueError, "Cannot resolve key 'nope'!"),
        ("time", {"fixed": True}, ValueError, "Cannot resolve key 'time'!"),
        ("tim/", {"fixed": True}, ValueError, "Cannot resolve key 'tim/'!"),
        ("time/rho", {"fixed": 0}, TypeError, "field 'fixed' must be a bool, got int!"),
        ("time/rho", {"default": "0"}, TypeError, "field 'default' must be a torch.Tensor, got str!"),
        ("time/rho", {"default": torch.zeros(2)}, ValueError, "Parameters must have length 1, got 2!"),
        ("time/rho", {"trans": abs}, TypeError, "field 'trans' must be a Transform, got builtin_function_or_method!"),
    ],
)
def test_set_param_specs_errors(key, kwargs, error, match):
    op = seed_op()
    with pytest.raises(error, match=match):
        op.set_param_specs(key, **kwargs)
    assert op.num_free_params == 3


def test_param_specs_is_read_only():
    op = seed_op()
    with pytest.raises(TypeError, match="set_param_specs"):
        op.param_specs["time/rho"]["fixed"] = True
    with pytest.raises(TypeError, match="set_param_specs"):
        op.param_specs["x"] = {}
    assert op.num_free_params == 3


def test_constructor_param_specs():
    specs = {
        "sigma^2": {"fixed": False, "default": torch.tensor([0.5]), "trans": TransformExpPow2()},
        "rho": {
            "fixed": True,
            "default": torch.tensor([1.0]),
            "trans": TransformChain([TransformSigmoid(), TransformScaleShift(2.0, -1.0)]),
        },
    }
    m = AR1Matrix(3, param_specs=specs)
    assert m.free_param_names == ["sigma^2"] and torch.equal(m.free_param_defaults["sigma^2"], torch.tensor([0.5]))
    assert torch.allclose(m(), AR1Matrix(3)(t(0.5, 1.0)))
    assert ScalarMatrix(2, param_specs={}).free_param_names == ["sigma^2"]  # {} means defaults
    with pytest.raises(TypeError, match="'param_specs' must be a dict!"):
        ScalarMatrix(2, param_specs=[1])
    with pytest.raises(TypeError, match="Parameter name must be a str, got int!"):
        ScalarMatrix(2, param_specs={1: {}})
    with pytest.raises(ValueError, match="Invalid parameter name 'a/b': '/' is not allowed!"):
        ScalarMatrix(2, param_specs={"a/b": {}})
    with pytest.raises(TypeError, match="Individual parameter specification must be a dict, got int!"):
        ScalarMatrix(2, param_specs={"sigma^2": 1})
    with pytest.raises(TypeError, match="fields must be 'fixed', 'default', and 'trans'"):
        ScalarMatrix(2, param_specs={"sigma^2": {"fixed": False}})
    with pytest.raises(ValueError, match=r"must name its parameters \['sigma\^2'\]"):
        ScalarMatrix(
            2, param_specs={"s": {"fixed": False, "default": torch.tensor([0.0]), "trans": TransformIdentity()}}
        )


# -- grad modes and parameter-less matrices ----------------------------------------------------


def test_grad_modes_and_jacobian_method_errors():
    m = AR1Matrix(3)
    x = t(0.3, -0.2)
    m.grad_mode = "manual"
    manual = m.grad(x)[0]
    m.grad_mode = "auto"
    torch.testing.assert_close(m.grad(x)[0], manual)
    m.grad_mode = "xx"
    with pytest.raises(RuntimeError, match="Unknown grad mode 'xx'"):
        m.grad(x)
    m.jacobian_method = "foo"
    with pytest.raises(
        ValueError, match=r"Unknown Jacobian method 'foo'! Expected one of 'jacrev', 'jacfwd', 'jacobian'\."
    ):
        m.auto_grad(x)


@pytest.mark.parametrize("make", [lambda: IdentityMatrix(3), lambda: DummyMatrix(["a", "b", "a"])])
def test_no_free_parameters(make):
    m = make()
    assert m.grad() == (None, []) and m.manual_grad() == (None, []) and m.auto_grad() == (None, [])
    assert m.map_theta_to_dv(torch.zeros(0)) is None
    with pytest.raises(ValueError, match="Parameters must have length 0, got 1!"):
        m(torch.zeros(1))
    all_fixed = Sum(a=m, b=torch.ones(m.shape))
    assert all_fixed.grad() == (None, []) and all_fixed.operands_grad() == ([None, None], [[], []])


def test_identity_follows_input_dtype():
    assert IdentityMatrix(2)(torch.zeros(0, dtype=torch.float32)).dtype == torch.float32
    assert torch.equal(IdentityMatrix(2)(), torch.eye(2))


# -- DummyMatrix, SimpleMatrix, Adapter, Matrix(structure) --------------------------------------


def test_dummy_matrix():
    m = DummyMatrix(["rep1", "rep2", "rep2"], ["block1", "block2", "block1"])
    assert m.colnames == ["rep1⋈block1", "rep1⋈block2", "rep2⋈block1", "rep2⋈block2"]
    assert m().tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert m.shape == (3, 4) and repr(m) == "DummyMatrix(shape=(3, 4))"
    assert m(torch.zeros(0, dtype=torch.float32)).dtype == torch.float32
    V = m()
    V[0, 0] = 5.0
    assert m()[0, 0] == 1.0  # a clone each call
    with pytest.warns(RuntimeWarning, match=r"Unknown combination \('z',\) dropped!"):
        z = DummyMatrix(["a", "z"], levels=["a"], drop_first=False)
    assert z().tolist() == [[1.0], [0.0]]
    assert DummyMatrix(["a", "b", "c"], levels=["c", "b", "a"], lex_order=False).colnames == ["c", "b", "a"]


def test_simple_matrix():
    Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)

    def call(theta):
        return torch.exp(theta[0]) * Z @ Z.T + torch.exp(theta[1]) * torch.eye(3, dtype=theta.dtype)

    def manual_grad(theta):
        return torch.stack([torch.exp(theta[0]) * Z @ Z.T, torch.exp(theta[1]) * torch.eye(3)]), ["theta_0", "theta_1"]

    plain = SimpleMatrix(2, call)
    closed = SimpleMatrix(2, call, manual_grad=manual_grad, default=torch.tensor([0.5]))
    x = t(0.2, -0.1)
    assert plain.free_param_names == ["theta_0", "theta_1"] and plain.shape == (3, 3)
    assert torch.allclose(plain(x), call(x)) and torch.allclose(closed.grad(x)[0], plain.grad(x)[0])
    assert torch.allclose(closed(), call(t(0.5, 0.5)))
    with pytest.raises(ValueError, match="'call' must be provided."):
        SimpleMatrix(2)
    with pytest.raises(TypeError, match=r"default must be a 1D torch tensor of shape \(1\)\."):
        SimpleMatrix(2, call, default=0.5)
    with pytest.raises(ValueError, match=r"Default must be a 1D tensor with shape \(1\)\."):
        SimpleMatrix(2, call, default=torch.zeros(2))


def test_adapter_observed_values():
    """Inventory §4: adaptee Diagonal(2), θ ↦ [σ(θ), 1 − σ(θ)]."""
    specs = compat.simple_param_specs(1)

    def param_map(theta):
        s = torch.sigmoid(theta[0])
        return torch.stack([s, 1 - s])

    adaptee = DiagonalMatrix(2)
    m = Adapter(adaptee, specs, param_map)
    assert m.free_param_names == ["theta_0"] and m.adaptee is adaptee and m.param_map is param_map
    assert torch.allclose(m(t(0.0)), math.e * torch.eye(2, dtype=F64))
    grad, names = m.grad(t(0.7))
    assert names == ["theta_0"]
    assert torch.allclose(grad[0].diagonal(), t(1.6873354486947492, -0.8610519310651596))
    assert torch.allclose(m.auto_grad(t(0.7))[0], grad)
    adaptee.set_param_specs("sigma^2_1", fixed=True)  # shared with the adapter, as in torch-openreml
    assert m.structure.child.param_specs_tree()["sigma^2_1"].fixed
    bad = {"theta_0": {"fixed": False, "default": torch.tensor([0.0]), "trans": TransformExp()}}
    with pytest.raises(ValueError, match="other than TransformIdentity!"):
        Adapter(DiagonalMatrix(2), bad, param_map)


def test_matrix_wraps_any_functional_structure():
    s = rf.Sum(a=rf.AR1(3), b=rf.Scalar(3))
    m = Matrix(s)
    assert m.structure is s and m.free_param_names == rf.param_names(s)
    m.set_param_specs("a/rho", fixed=True)
    assert m.free_param_names == ["a/sigma^2", "b/sigma^2"] and rf.param_names(s) == ["a/sigma^2", "a/rho", "b/sigma^2"]
    op = KroneckerProduct(a=rf.Unstructured(2), b=Inverse(a=AR1Matrix(3)))  # functional and compat operands mix
    assert op.free_param_names == ["a/sigma^2_0_0", "a/sigma^2_1_0", "a/sigma^2_1_1", "b/a/sigma^2", "b/a/rho"]
    assert isinstance(op.operands["a"], Matrix)
    with pytest.raises(TypeError, match="Matrix wraps a reml_fn structure, got int"):
        Matrix(3)


# -- operator construction -----------------------------------------------------------------------


def test_operator_forms():
    a, b = ScalarMatrix(2), AR1Matrix(2)
    assert Sum(a, b).free_param_names == ["op_0/sigma^2", "op_1/sigma^2", "op_1/rho"]
    assert Sum({"x": a, "y": b}).free_param_names == ["x/sigma^2", "y/sigma^2", "y/rho"]
    tensor = torch.eye(2)
    op = Sum(x=a, k=tensor)
    assert op.operands["k"] is tensor and op.free_param_names == ["x/sigma^2"]
    grads, names = op.operands_grad(t(0.5))
    assert names == [["x/sigma^2"], []] and grads[1] is None
    kron = KroneckerProduct(a=AR1Matrix(2), b=ScalarMatrix(2))
    grads, _ = kron.operands_grad(t(0.1, 0.2, 0.3))
    assert torch.allclose(grads[0], AR1Matrix(2).grad(t(0.1, 0.2))[0])  # the operand's own dA, not dA ⊗ B


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Sum(ScalarMatrix(2), b=ScalarMatrix(2)), ValueError, "either as keyword arguments or as positional"),
        (lambda: Sum({1: ScalarMatrix(2), "b": ScalarMatrix(2)}), TypeError, "Operand name must be a string, got int!"),
        (lambda: Sum({"": ScalarMatrix(2), "b": ScalarMatrix(2)}), ValueError, "Operand name must not be empty!"),
        (
            lambda: Sum({"a/b": ScalarMatrix(2), "b": ScalarMatrix(2)}),
            ValueError,
            "Invalid operand name 'a/b': '/' is not allowed!",
        ),
        (lambda: Sum(ScalarMatrix(2), "x"), TypeError, "Operand 'op_1' must be a Matrix or torch.Tensor, got str!"),
        (lambda: Sum(ScalarMatrix(2)), ValueError, "At least two operands are required"),
        (lambda: BlockDiagonal(ScalarMatrix(2)), ValueError, "At least two operands are required"),
        (lambda: Augment(ScalarMatrix(2)), ValueError, "At least two operands are required"),
        (lambda: Stack(ScalarMatrix(2)), ValueError, "At least two operands are required"),
        (lambda: KroneckerProduct(ScalarMatrix(2)), ValueError, "Two operands are required"),
        (lambda: HadamardProduct(*[ScalarMatrix(2)] * 3), ValueError, "Two operands are required"),
        (lambda: Product(ScalarMatrix(2)), ValueError, "Two operands are required"),
        (lambda: CovariancePropagation(ScalarMatrix(2)), ValueError, "Two operands are required"),
        (lambda: Transpose(ScalarMatrix(2), ScalarMatrix(2)), ValueError, "One operand is required"),
        (lambda: Inverse(), ValueError, "One operand is required"),
        (lambda: Gram(ScalarMatrix(2), gram_type="foo"), ValueError, "gram_type must be 'xtx' or 'xxt', got 'foo'"),
        (lambda: Gram(gram_type="foo"), ValueError, "gram_type must be 'xtx' or 'xxt', got 'foo'"),
        (lambda: Gram(), ValueError, "One operand is required"),
    ],
)
def test_operator_construction_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: Sum(ScalarMatrix(3), torch.tensor([[5.0]])),  # torch-openreml broadcast this silently
        lambda: HadamardProduct(ScalarMatrix(3), ScalarMatrix(2)),
        lambda: Product(ScalarMatrix(2), ScalarMatrix(3)),
        lambda: CovariancePropagation(LowerTriangularMatrix(3, 2), ScalarMatrix(3)),
        lambda: Augment(ScalarMatrix(3), ScalarMatrix(2)),
        lambda: Stack(ScalarMatrix(3), ScalarMatrix(2)),
        lambda: Inverse(EqualEntryMatrix(2, 3)),
    ],
)
def test_shape_errors_at_construction(build):
    with pytest.raises(ValueError, match="got"):
        build()


def test_gram_and_repr():
    op = Gram(x=LowerTriangularMatrix(3, 2), gram_type="xxt")
    assert op.gram_type == "xxt" and op.shape == (3, 3)
    assert "gram_type='xxt'" in repr(op)
    assert repr(Sum(a=ScalarMatrix(2), b=torch.eye(2))).count("torch.Size([2, 2])") == 1
    assert repr(DiagonalMatrix(3)).startswith("DiagonalMatrix(shape=(3, 3), param_specs={'sigma^2_0': ")


# -- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transform, functional",
    [
        (TransformIdentity(), rf.transforms.Identity()),
        (TransformExp(), rf.transforms.Exp()),
        (TransformExp2(), rf.transforms.Exp2()),
        (TransformExp10(), rf.transforms.Exp10()),
        (TransformExpPow2(), rf.transforms.ExpPow2()),
        (TransformSigmoid(), rf.transforms.Sigmoid()),
        (TransformScaleShift(2.0, -1.0), rf.transforms.ScaleShift(2.0, -1.0)),
        (TransformPow(3.0), rf.transforms.Pow(3.0)),
        (
            TransformChain([TransformSigmoid(), TransformScaleShift(2.0, -1.0)]),
            rf.transforms.Chain((rf.transforms.Sigmoid(), rf.transforms.ScaleShift(2.0, -1.0))),
        ),
    ],
)
def test_transforms_are_functional_transforms_with_grad(transform, functional):
    x = t(-1.0, 0.0, 0.5, 2.0).abs() + 0.1
    assert isinstance(transform, rf.transforms.Transform) and isinstance(transform, Transform)
    assert torch.equal(transform(x), functional.forward(x))
    assert torch.equal(transform.grad(x), functional.derivative(x)) and transform.grad(x).shape == x.shape
    torch.testing.assert_close(transform.inverse(transform(x)), x)


def test_transform_reprs_and_chain_errors():
    assert repr(TransformScaleShift(a=2.0, b=-1.5)) == "TransformScaleShift(a=2.0, b=-1.5)"
    assert (
        repr(TransformPow(factor=3.0)) == "TransformPow(factor=3.0)"
        and repr(TransformExpPow2()) == "TransformExpPow2()"
    )
    assert repr(TransformChain(TransformExp())) == "TransformChain([TransformExp()])"
    with pytest.raises(TypeError, match="Chain needs to be a list or a tuple of Transform objects!"):
        TransformChain([TransformExp(), abs])
    assert torch.allclose(
        compat.transform.TransformChain([TransformSigmoid(), TransformScaleShift(2.0, -1.0)]).grad(t(0.5, 2.0)),
        t(0.470007424403189, 0.20998717080701323),
    )


def test_user_defined_transform_in_torch_openreml_style():
    class Square(Transform):
        def __call__(self, x):
            return x * x

        def inverse(self, x):
            return x.sqrt()

        def grad(self, x):
            return 2 * x

    m = ScalarMatrix(2)
    m.set_param_specs("sigma^2", trans=Square())
    assert torch.allclose(m(t(3.0)), 9 * torch.eye(2, dtype=F64))
    assert torch.allclose(m.grad(t(3.0))[0], m.auto_grad(t(3.0))[0])
    assert torch.allclose(m.trans_grad(t(3.0)), t(6.0))
    with pytest.raises(NotImplementedError):
        Transform()(t(1.0))
