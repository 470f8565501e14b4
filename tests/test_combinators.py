"""Combinators: dense references, torch-openreml's observed values (inventory §5.2), the seed
example, Kronecker of non-contiguous operands, and bad input."""

from __future__ import annotations

from collections.abc import Mapping

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import reml_fn as rf
from reml_fn.combinators.base import tree_map
from reml_fn.combinators.products import kron
from reml_fn.testing import assert_jacobian_matches, assert_vmap_matches_loop

TOL = {"atol": 1e-10, "rtol": 1e-10}


def t(*values):
    """A 1-D float64 tensor (a flat parameter vector)."""
    return torch.tensor(values, dtype=torch.float64)


def scalar(value):
    """A 0-d float64 tensor (a parameter-tree leaf)."""
    return torch.tensor(value, dtype=torch.float64)


def close(actual, expected, **tolerances):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, **(tolerances or TOL))


# ------------------------------------------------------------------------------------------------
# kron


def test_kron_matches_torch_kron_on_contiguous_input():
    a, b = torch.randn(2, 3), torch.randn(4, 1)
    close(kron(a, b), torch.kron(a, b), atol=0, rtol=0)


def test_kron_non_contiguous_and_batched():
    a = torch.randn(3, 2).T  # non-contiguous: torch.kron raises on it in torch 2.13
    b = torch.linalg.inv(torch.eye(2) + 0.1 * torch.ones(2, 2)).T
    close(kron(a, b), torch.kron(a.contiguous(), b.contiguous()), atol=0, rtol=0)
    batch = torch.randn(5, 2, 3)
    close(kron(batch, b), torch.stack([torch.kron(x, b.contiguous()) for x in batch]), atol=0, rtol=0)
    close(torch.func.vmap(kron, in_dims=(0, None))(batch, b), kron(batch, b), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Dense references: each combinator equals its formula on the children's matrices


def _children_values(s, params):
    return [child.build(params.get(name, {})) for name, child in s.items()]


DENSE = {
    "BlockDiagonal": (
        lambda: rf.BlockDiagonal(a=rf.AR1(2), b=rf.LowerTriangular(2, 3), c=torch.ones(1, 1)),
        lambda xs: torch.block_diag(*xs),
    ),
    "Kronecker": (lambda: rf.Kronecker(a=rf.Unstructured(2), b=rf.EqualEntry(1, 3)), lambda xs: torch.kron(*xs)),
    "Hadamard": (lambda: rf.Hadamard(a=rf.CompoundSymmetric(3), b=rf.Unstructured(3)), lambda xs: xs[0] * xs[1]),
    "Product": (lambda: rf.Product(a=rf.LowerTriangular(3, 2), b=rf.EqualEntry(2, 4)), lambda xs: xs[0] @ xs[1]),
    "Transpose": (lambda: rf.Transpose(a=rf.LowerTriangular(2, 3)), lambda xs: xs[0].T),
    "Gram xtx": (lambda: rf.Gram(x=rf.LowerTriangular(3, 2)), lambda xs: xs[0].T @ xs[0]),
    "Gram xxt": (lambda: rf.Gram(x=rf.LowerTriangular(3, 2), gram_type="xxt"), lambda xs: xs[0] @ xs[0].T),
    "Augment": (
        lambda: rf.Augment(a=rf.Scalar(3), b=rf.EqualEntry(3, 2), c=torch.ones(3, 1)),
        lambda xs: torch.cat(xs, dim=1),
    ),
    "Stack": (lambda: rf.Stack(a=rf.Scalar(3), b=rf.EqualEntry(2, 3)), lambda xs: torch.cat(xs, dim=0)),
    "Inverse": (lambda: rf.Inverse(a=rf.CompoundSymmetric(3)), lambda xs: torch.linalg.inv(xs[0])),
}


@pytest.mark.parametrize("case", DENSE, ids=list(DENSE))
def test_dense_reference_jacobians_and_vmap(case):
    make, formula = DENSE[case]
    s = make()
    generator = torch.Generator().manual_seed(0)
    flat = 0.8 * torch.rand(len(rf.param_names(s)), generator=generator, dtype=torch.float64) - 0.4
    params = rf.unflatten_params(s, flat)
    V = s.build(params)
    assert tuple(V.shape) == tuple(s.shape)
    close(V, formula(_children_values(s, params)))
    assert_jacobian_matches(s, params, methods=("fwd", "rev"), **TOL)
    flats = torch.stack([flat, 0.5 * flat, -flat])
    close(torch.func.vmap(s)(flats), torch.stack([s(row) for row in flats]))


# ------------------------------------------------------------------------------------------------
# Kronecker of a non-contiguous operand (the output of an inverse), alone and nested


def _kron_of_inverse():
    return rf.Kronecker(a=rf.Unstructured(2), b=rf.Inverse(a=rf.AR1(3)))


@pytest.mark.parametrize("nested", [False, True], ids=["alone", "in_sum"])
def test_kronecker_of_inverse_closed_fwd_rev_and_vmap(nested):
    s = _kron_of_inverse()
    if nested:
        s = rf.Sum(kron=s, noise=rf.Scalar(6))
    names = rf.param_names(s)
    flat = torch.linspace(-0.7, 0.6, len(names), dtype=torch.float64)
    params = rf.unflatten_params(s, flat)
    closed, _ = rf.jacobian_stack(s, params)
    for method in ("fwd", "rev"):
        close(rf.jacobian_stack(s, params, method=method)[0], closed)
    a = rf.Unstructured(2)(flat[:3])
    b = torch.linalg.inv(rf.AR1(3)(flat[3:5]))
    expected = torch.kron(a, b.contiguous()) + (rf.Scalar(6)(flat[5:]) if nested else 0.0)
    close(s.build(params), expected)
    batch = tree_map(lambda value: torch.stack([value, value + 0.1, value - 0.2]), params)
    assert_vmap_matches_loop(s, batch, check_jacobian=True, **TOL)


# ------------------------------------------------------------------------------------------------
# torch-openreml's observed values (inventory §5.2)


def test_inventory_kronecker():
    s = rf.Kronecker(time=rf.AR1(2), subject=rf.Scalar(3))
    V = s(t(1.0, 1.0, 1.0))
    close(V.diagonal(), torch.full((6,), 54.59815003314424))
    close(V[0, 3], 25.230741884972126)
    assert rf.param_names(s) == ["time/sigma^2", "time/rho", "subject/sigma^2"]


def test_inventory_propagate():
    s = rf.Propagate(Z=rf.LowerTriangular(3, 2), G=rf.Scalar(2))
    V = s(t(1.0, 0.5, 2.0, -1.0, 0.3, 0.2))
    upper = [
        [1.4918246976412703, 0.7459123488206352, -1.4918246976412703],
        [0.7459123488206352, 6.340254964975399, 0.14918246976412697],
        [-1.4918246976412703, 0.14918246976412697, 1.6260889204289848],
    ]
    close(V, upper)


def test_inventory_gram():
    theta = t(0.0, 0.5, 1.0, 0.2, -0.3)
    xtx = rf.Gram(rf.LowerTriangular(3, 2), gram_type="xtx")
    xxt = rf.Gram(rf.LowerTriangular(3, 2), gram_type="xxt")
    close(xtx(theta), [[0.29, 0.44], [0.44, 1.09]])
    close(xxt(theta), [[0.0, 0.0, 0.0], [0.0, 1.25, -0.2], [0.0, -0.2, 0.13]])
    grads, names = rf.jacobian_stack(xtx, theta)
    expected = [
        [[0, 0], [0, 0]],
        [[1, 1], [1, 0]],
        [[0, 0.5], [0.5, 2]],
        [[0.4, -0.3], [-0.3, 0]],
        [[0, 0.2], [0.2, -0.6]],
    ]
    close(grads, expected)
    assert names == ["op_0/L_0_0", "op_0/L_1_0", "op_0/L_1_1", "op_0/L_2_0", "op_0/L_2_1"]


def test_inventory_inverse_scalar():
    s = rf.Inverse(rf.Scalar(3))
    close(s(t(0.5)), 0.36787944117144233 * torch.eye(3))
    grads, names = rf.jacobian_stack(s, t(0.5))
    close(grads[0], -0.7357588823428847 * torch.eye(3))
    assert names == ["op_0/sigma^2"]


def test_inventory_inverse_compound_symmetric():
    s = rf.Inverse(rf.CompoundSymmetric(3))
    theta = t(0.2, 0.7)
    off = 1.0 - torch.eye(3)

    def pattern(diagonal, off_diagonal):
        return diagonal * torch.eye(3) + off_diagonal * off

    close(s(theta), pattern(1.0093229493533655, -0.3374629530543963))
    grads, _ = rf.jacobian_stack(s, theta)
    close(grads[0], pattern(-2.0186458987067315, 0.6749259061087928))
    close(grads[1], pattern(0.5629515718451037, -0.3369542998722318))


def test_inventory_augment_and_stack_shapes():
    augment = rf.Augment(rf.Scalar(3), rf.EqualEntry(3, 2), torch.ones(3, 1))
    assert augment.shape == (3, 6) and augment(t(0.5, 1.0)).shape == (3, 6)
    assert rf.param_names(augment) == ["op_0/sigma^2", "op_1/sigma^2"]
    stack = rf.Stack(rf.Scalar(3), rf.EqualEntry(2, 3))
    assert stack.shape == (5, 3) and stack().shape == (5, 3)


def _dummy(labels, levels):
    return torch.tensor([[1.0 if label == level else 0.0 for level in levels] for label in labels])


def test_inventory_mixed_model_names():
    g1 = _dummy(["a", "b", "c", "a", "b", "c"], ["a", "b", "c"])
    g2 = _dummy(["x", "x", "x", "y", "y", "y"], ["x", "y"])
    s = rf.Sum(
        CP=rf.Propagate(
            Z=rf.Augment(g1=rf.Fixed(g1), g2=rf.Fixed(g2)),
            G=rf.BlockDiagonal(g1=rf.Scalar(3), g2=rf.Scalar(2)),
        ),
        R=rf.Scalar(6),
    )
    assert rf.param_names(s) == ["CP/G/g1/sigma^2", "CP/G/g2/sigma^2", "R/sigma^2"]
    theta = t(0.1, -0.2, 0.3)
    sigma = torch.exp(2 * theta)
    expected = sigma[0] * g1 @ g1.T + sigma[1] * g2 @ g2.T + sigma[2] * torch.eye(6)
    close(s(theta), expected)
    grads, _ = rf.jacobian_stack(s, theta)
    close(grads, torch.stack([2 * sigma[0] * g1 @ g1.T, 2 * sigma[1] * g2 @ g2.T, 2 * sigma[2] * torch.eye(6)]))
    assert_jacobian_matches(s, rf.unflatten_params(s, theta), **TOL)


# ------------------------------------------------------------------------------------------------
# The seed page's example (seed/torch_openreml.covariance.Sum.txt), to its printed 4 decimals


def test_seed_example():
    s = rf.Sum(time=rf.AR1(4), noise=rf.Scalar(4))
    V = s(t(0.5, 1.0, 1.0))
    printed = [
        [10.1073, 1.2562, 0.5805, 0.2683],
        [1.2562, 10.1073, 1.2562, 0.5805],
        [0.5805, 1.2562, 10.1073, 1.2562],
        [0.2683, 0.5805, 1.2562, 10.1073],
    ]
    close(V, printed, atol=5e-5, rtol=0)
    grads, names = rf.jacobian_stack(s, t(0.5, 1.0, 1.0))
    printed_grads = [
        [
            [5.4366, 2.5123, 1.1610, 0.5365],
            [2.5123, 5.4366, 2.5123, 1.1610],
            [1.1610, 2.5123, 5.4366, 2.5123],
            [0.5365, 1.1610, 2.5123, 5.4366],
        ],
        [
            [0.0000, 1.0689, 0.9879, 0.6848],
            [1.0689, 0.0000, 1.0689, 0.9879],
            [0.9879, 1.0689, 0.0000, 1.0689],
            [0.6848, 0.9879, 1.0689, 0.0000],
        ],
        [
            [14.7781, 0.0, 0.0, 0.0],
            [0.0, 14.7781, 0.0, 0.0],
            [0.0, 0.0, 14.7781, 0.0],
            [0.0, 0.0, 0.0, 14.7781],
        ],
    ]
    assert grads.shape == (3, 4, 4)
    close(grads, printed_grads, atol=5e-5, rtol=0)
    assert names == ["time/sigma^2", "time/rho", "noise/sigma^2"]


# ------------------------------------------------------------------------------------------------
# Naming, statics, pytrees


def test_children_naming_styles():
    positional = rf.Kronecker(rf.AR1(2), rf.Scalar(2))
    keyword = rf.Kronecker(time=rf.AR1(2), subject=rf.Scalar(2))
    mapping = rf.Kronecker({"time": rf.AR1(2), "subject": rf.Scalar(2)})
    assert positional.names == ("op_0", "op_1")
    assert keyword.names == mapping.names == ("time", "subject")
    assert isinstance(rf.Hadamard(torch.ones(2, 2), rf.Scalar(2))["op_0"], rf.Fixed)
    assert rf.param_names(rf.Hadamard(torch.ones(2, 2), rf.Scalar(2))) == ["op_1/sigma^2"]


def test_combinator_without_free_parameters():
    s = rf.Gram(torch.tensor([[1.0, 2.0]]))
    assert rf.param_names(s) == []
    J, names = rf.jacobian_stack(s)
    assert J.shape == (0, 2, 2) and names == []
    close(s(), [[1.0, 2.0], [2.0, 4.0]])


def test_gram_type_is_static_and_survives_pytree_round_trips():
    s = rf.Gram(x=rf.LowerTriangular(3, 2), gram_type="xxt")
    leaves, spec = torch_pytree.tree_flatten(s)
    assert torch_pytree.tree_unflatten(leaves, spec).gram_type == "xxt"
    o_leaves, o_spec = optree.tree_flatten(s, namespace="reml_fn")
    assert optree.tree_unflatten(o_spec, o_leaves).shape == (3, 3)
    assert "gram_type='xxt'" in repr(s)


def test_inverse_of_singular_member_gives_non_finite_values_without_raising():
    s = rf.Inverse(a=rf.Unstructured(2))
    flats = t(0.0, 0.5, 0.0, 0.0, 1.0, 0.0).reshape(2, 3)  # the second is [[1, 1], [1, 1]]: singular
    V = torch.func.vmap(s)(flats)
    close(V[0], torch.linalg.inv(torch.tensor([[1.0, 0.5], [0.5, 1.0]])))
    assert not torch.isfinite(V[1]).all()
    assert not torch.isfinite(s(flats[1])).all()


def test_vmap_over_batched_fixed_operand():
    """A fixed operand is a pytree leaf: vmap over the structure batches the data."""
    Zs = torch.randn(4, 3, 2)

    def build(Z):
        return rf.Gram(Z=Z, gram_type="xxt")()

    close(torch.func.vmap(build)(Zs), Zs @ Zs.transpose(-1, -2))


# ------------------------------------------------------------------------------------------------
# Bad input


SHAPE_ERRORS = [
    (lambda: rf.Hadamard(a=rf.Scalar(2), b=rf.Scalar(3)), ["Hadamard", "a (2, 2)", "b (3, 3)"]),
    (lambda: rf.Hadamard(a=rf.EqualEntry(2, 3), b=torch.ones(1, 3)), ["a (2, 3)", "b (1, 3)"]),
    (lambda: rf.Product(a=rf.EqualEntry(2, 3), b=rf.Scalar(2)), ["Product", "a (2, 3)", "b (2, 2)"]),
    (lambda: rf.Augment(a=rf.Scalar(2), b=rf.EqualEntry(2, 1), c=rf.EqualEntry(3, 1)), ["a (2, 2)", "c (3, 1)"]),
    (lambda: rf.Stack(a=rf.Scalar(2), b=rf.EqualEntry(1, 3)), ["Stack", "a (2, 2)", "b (1, 3)"]),
    (lambda: rf.Inverse(a=rf.EqualEntry(2, 3)), ["Inverse", "square", "a (2, 3)"]),
    (lambda: rf.Sum(a=rf.Scalar(2), b=rf.Scalar(3)), ["Sum", "a (2, 2)", "b (3, 3)"]),
    (lambda: rf.Propagate(Z=rf.EqualEntry(3, 2), G=rf.Scalar(3)), ["Z (3, 2)", "G (3, 3)"]),
]


@pytest.mark.parametrize("make, fragments", SHAPE_ERRORS)
def test_mismatched_shapes_name_every_child(make, fragments):
    with pytest.raises(ValueError) as error:
        make()
    for fragment in fragments:
        assert fragment in str(error.value)


def test_any_shapes_allowed_for_kronecker_and_block_diagonal():
    assert rf.Kronecker(rf.EqualEntry(2, 3), rf.LowerTriangular(3, 1)).shape == (6, 3)
    s = rf.BlockDiagonal(rf.EqualEntry(2, 3), rf.LowerTriangular(3, 1), rf.Scalar(1))
    assert s.shape == (6, 5)
    close(s(), torch.block_diag(torch.ones(2, 3), torch.tril(torch.ones(3, 1)), torch.eye(1)))


COUNT_ERRORS = [
    (lambda: rf.BlockDiagonal(rf.Scalar(2)), "BlockDiagonal needs at least 2 operands, got 1"),
    (lambda: rf.BlockDiagonal(), "BlockDiagonal needs at least 2 operands, got 0"),
    (lambda: rf.Augment(a=rf.Scalar(2)), "Augment needs at least 2 operands, got 1"),
    (lambda: rf.Stack(rf.Scalar(2)), "Stack needs at least 2 operands, got 1"),
    (lambda: rf.Kronecker(rf.Scalar(2)), "Kronecker needs exactly 2 operands, got 1"),
    (lambda: rf.Kronecker(rf.Scalar(2), rf.Scalar(2), rf.Scalar(2)), "Kronecker needs exactly 2 operands, got 3"),
    (lambda: rf.Hadamard(a=rf.Scalar(2)), "Hadamard needs exactly 2 operands, got 1"),
    (lambda: rf.Product(), "Product needs exactly 2 operands, got 0"),
    (lambda: rf.Transpose(rf.Scalar(2), rf.Scalar(2)), "Transpose needs exactly 1 operand, got 2"),
    (lambda: rf.Transpose(), "Transpose needs exactly 1 operand, got 0"),
    (lambda: rf.Gram(a=rf.Scalar(2), b=rf.Scalar(2)), "Gram needs exactly 1 operand, got 2"),
    (lambda: rf.Inverse(), "Inverse needs exactly 1 operand, got 0"),
    (lambda: rf.Kronecker(rf.Scalar(2), b=rf.Scalar(2)), "either as keyword arguments or positionally"),
]


@pytest.mark.parametrize("make, message", COUNT_ERRORS)
def test_wrong_operand_counts(make, message):
    with pytest.raises(ValueError, match=message):
        make()


class _PairsMapping(Mapping):
    """A mapping whose ``items()`` repeats a key: the only way to hand a combinator duplicate names."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __getitem__(self, key):
        return dict(self.pairs)[key]

    def __iter__(self):
        return (key for key, _ in self.pairs)

    def __len__(self):
        return len(self.pairs)

    def items(self):
        return list(self.pairs)


@pytest.mark.parametrize("combinator", [rf.BlockDiagonal, rf.Kronecker, rf.Hadamard, rf.Augment, rf.Stack])
def test_bad_names(combinator):
    with pytest.raises(ValueError, match="must not be empty"):
        combinator({"": rf.Scalar(2), "b": rf.Scalar(2)})
    with pytest.raises(ValueError, match="'a/b': '/' is not allowed"):
        combinator(**{"a/b": rf.Scalar(2), "c": rf.Scalar(2)})
    with pytest.raises(TypeError, match="names must be str, got int"):
        combinator({1: rf.Scalar(2), "b": rf.Scalar(2)})
    with pytest.raises(ValueError, match="duplicate operand name 'a'"):
        combinator(_PairsMapping([("a", rf.Scalar(2)), ("a", rf.Scalar(2))]))


@pytest.mark.parametrize("combinator", [rf.Transpose, rf.Gram, rf.Inverse])
def test_bad_operands_of_unary_combinators(combinator):
    with pytest.raises(TypeError, match="operand 'op_0' must be a structure or a torch.Tensor, got str"):
        combinator("Scalar(2)")
    with pytest.raises(ValueError, match="operand 'x' must be a matrix, got shape"):
        combinator(x=torch.ones(3))
    with pytest.raises(ValueError, match="must not be empty"):
        combinator({"": rf.Scalar(2)})


def test_non_structure_operand():
    with pytest.raises(TypeError, match="operand 'b' must be a structure or a torch.Tensor, got list"):
        rf.Kronecker(a=rf.Scalar(2), b=[[1.0]])
    with pytest.raises(TypeError, match="operand 'op_1' must be a structure or a torch.Tensor, got int"):
        rf.BlockDiagonal(rf.Scalar(2), 3)


def test_gram_type_checked_first():
    with pytest.raises(ValueError, match="gram_type must be 'xtx' or 'xxt', got 'foo'"):
        rf.Gram(rf.Scalar(2), gram_type="foo")
    with pytest.raises(ValueError, match="gram_type must be 'xtx' or 'xxt', got 'foo'"):
        rf.Gram(gram_type="foo")  # before the operand count
    with pytest.raises(ValueError, match="gram_type must be 'xtx' or 'xxt', got None"):
        rf.Gram(rf.Scalar(2), rf.Scalar(2), gram_type=None)
    with pytest.raises(ValueError, match="Gram needs exactly 1 operand, got 2"):
        rf.Gram(rf.Scalar(2), "xxt")  # gram_type is keyword-only


def _nested():
    return rf.Kronecker(outer=rf.Sum(time=rf.AR1(3), noise=rf.Scalar(3)), b=rf.Scalar(2))


def test_wrong_parameter_trees_name_nested_paths():
    s = _nested()
    params = s.init_params()
    assert rf.param_names(s) == ["outer/time/sigma^2", "outer/time/rho", "outer/noise/sigma^2", "b/sigma^2"]
    bad = {
        "outer": {"time": {"sigma^2": scalar(0.0), "phi": scalar(0.0)}, "noise": params["outer"]["noise"]},
        "b": params["b"],
    }
    with pytest.raises(ValueError) as error:
        s.build(bad)
    assert "missing ['outer/time/rho']" in str(error.value)
    assert "unexpected ['outer/time/phi']" in str(error.value)
    with pytest.raises(ValueError, match=r"missing \['b/sigma\^2'\]"):
        s.jacobian({"outer": params["outer"]})
    with pytest.raises(TypeError, match="at 'outer/time' must be a dict"):
        s.build({"outer": {"time": scalar(0.0), "noise": params["outer"]["noise"]}, "b": params["b"]})
    with pytest.raises(ValueError, match="parameter 'b/sigma\\^2' must be a 0-d tensor"):
        s.build({"outer": params["outer"], "b": {"sigma^2": t(0.0, 1.0)}})
    with pytest.raises(ValueError, match="must have length 4"):
        s(t(0.0, 1.0))


def test_fix_subtree_and_unresolvable_paths():
    s = rf.Kronecker(time=rf.AR1(3), subject=rf.Scalar(2))
    fixed = rf.fix(s, "time/")
    assert rf.param_names(fixed) == ["subject/sigma^2"]
    theta = t(0.3, -0.4, 0.2)
    full, _ = rf.jacobian_stack(s, rf.unflatten_params(s, theta))
    at_default = rf.fix(s, {"time/sigma^2": 0.3, "time/rho": -0.4}, scale="raw")
    J, names = rf.jacobian_stack(at_default, t(0.2))
    assert names == ["subject/sigma^2"]
    close(J, full[2:])
    close(at_default(t(0.2)), s(theta))
    nested = rf.fix(_nested(), "outer/time/")
    assert rf.param_names(nested) == ["outer/noise/sigma^2", "b/sigma^2"]
    assert rf.param_names(rf.unfix(nested, "outer/")) == rf.param_names(_nested())
    for path in ("time", "time/phi", "nope/", "subject/sigma^2/x"):
        with pytest.raises(ValueError, match="cannot resolve parameter path"):
            rf.fix(s, path)
