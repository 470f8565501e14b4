"""Property tests over random structure trees (reml_fn.testing.trees): closed-form Jacobians equal
jacfwd and jacrev, vmap equals a loop, names and flat order agree, fixing removes one slice."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.combinators.base import tree_map
from reml_fn.params import get_path
from reml_fn.testing import (
    assert_jacobian_matches,
    assert_pytree_roundtrip,
    assert_vmap_matches_loop,
    structure_trees,
    trees_with_params,
)
from reml_fn.testing.trees import COMBINATOR_NAMES

TOL = {"atol": 1e-10, "rtol": 1e-10}


def _paths(tree, prefix=""):
    """``/``-joined leaf paths of a nested dict, in insertion order."""
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_paths(value, f"{prefix}{key}/"))
        else:
            out.append(f"{prefix}{key}")
    return out


def _without(tree: Mapping, path: str) -> dict:
    """``tree`` without the leaf at ``path``; sub-dicts left empty are dropped."""
    head, _, rest = path.partition("/")
    out = {}
    for key, value in tree.items():
        if key != head:
            out[key] = value
        elif rest:
            sub = _without(value, rest)
            if sub:
                out[key] = sub
    return out


@given(trees_with_params())
def test_closed_form_matches_jacfwd_and_jacrev(case):
    s, params = case
    assert_jacobian_matches(s, params, methods=("fwd", "rev"), **TOL)


@given(trees_with_params(fixed_params=True))
def test_closed_form_matches_autodiff_with_fixed_parameters(case):
    s, params = case
    assert_jacobian_matches(s, params, methods=("fwd",), **TOL)


@given(trees_with_params(batch_size=3))
def test_vmap_matches_loop(case):
    s, batch = case
    assume(rf.param_names(s))  # nothing to vmap over without free parameters
    assert_vmap_matches_loop(s, batch, check_jacobian=True, **TOL)
    # And by hand: vmap(build) stacks the loop's matrices.
    batched = torch.func.vmap(s.build)(batch)
    looped = torch.stack([s.build(tree_map(lambda x, b=b: x[b], batch)) for b in range(3)])
    torch.testing.assert_close(batched, looped, **TOL)


@given(trees_with_params())
def test_names_and_flat_order(case):
    s, params = case
    names = rf.param_names(s)
    assert len(set(names)) == len(names)
    assert _paths(params) == names
    assert [n for n in rf.all_param_names(s) if n in set(names)] == names
    flat = rf.flatten_params(s, params)
    assert flat.shape == (len(names),)
    assert _paths(rf.unflatten_params(s, flat)) == names
    torch.testing.assert_close(rf.flatten_params(s, rf.unflatten_params(s, flat)), flat, rtol=0, atol=0)
    torch.testing.assert_close(s(flat), s.build(params), rtol=0, atol=0)
    stack, stack_names = rf.jacobian_stack(s, params)
    assert stack_names == names
    assert stack.shape == (len(names), *s.shape)
    tree = rf.jacobian(s, params)
    assert _paths(tree) == names
    for i, name in enumerate(names):
        torch.testing.assert_close(stack[i], get_path(tree, name), rtol=0, atol=0)
    if isinstance(s, rf.Combinator):
        assert all(name.split("/")[0] in s.names for name in names)


@given(trees_with_params(), st.data())
def test_fixing_a_parameter_removes_exactly_its_slice(case, data):
    s, params = case
    names = rf.param_names(s)
    if not names:
        return
    name = data.draw(st.sampled_from(names))
    fixed = rf.fix(s, name, get_path(params, name), scale="raw")
    fixed_params = _without(params, name)
    assert rf.param_names(fixed) == [n for n in names if n != name]
    assert rf.all_param_names(fixed) == rf.all_param_names(s)
    torch.testing.assert_close(fixed.build(fixed_params), s.build(params), **TOL)
    stack, _ = rf.jacobian_stack(s, params)
    fixed_stack, fixed_names = rf.jacobian_stack(fixed, fixed_params)
    keep = [i for i, n in enumerate(names) if n != name]
    assert fixed_names == [names[i] for i in keep]
    torch.testing.assert_close(fixed_stack, stack[keep], **TOL)


@given(structure_trees(max_depth=2))
def test_pytree_round_trip(s):
    assert_pytree_roundtrip(s, s.init_params())


@given(structure_trees(max_depth=2, shape=(2, 3)))
def test_requested_shape(s):
    assert tuple(s.shape) == (2, 3)
    assert tuple(s().shape) == (2, 3)


@pytest.mark.parametrize("name", COMBINATOR_NAMES)
def test_each_combinator_alone(name):
    """Each combinator on its own (depth 1) passes the Jacobian check on a few trees."""

    @given(trees_with_params(max_depth=1, combinators=[name], square=True))
    def check(case):
        s, params = case
        assert_jacobian_matches(s, params, methods=("fwd",), **TOL)

    check()


def test_strategy_options_are_validated():
    with pytest.raises(ValueError, match="max_depth"):
        structure_trees(max_depth=-1)
    with pytest.raises(ValueError, match="unknown combinators"):
        structure_trees(combinators=["Sum", "Kron"])
    with pytest.raises(ValueError, match="shape"):
        structure_trees(shape=(9, 2))
    with pytest.raises(ValueError, match="kind of any shape"):
        structure_trees(kinds=["Scalar"])
    with pytest.raises(ValueError, match="batch_size"):
        trees_with_params(batch_size=0)
