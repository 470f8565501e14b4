"""Parameters: names, flat ↔ tree, init/constrain, fix/unfix, and every error a wrong
parameter tree, flat vector or fix target can give (named paths, expected vs got)."""

import math

import pytest
import torch
from hypothesis import given

import reml_fn as rf
from reml_fn.params import ParamSpec, get_path
from reml_fn.testing import base_structures, fix_some, raw_params, structures_with_params
from reml_fn.transforms import ExpPow2, Identity

T0 = torch.tensor(0.0)


def _sum():
    return rf.Sum(time=rf.AR1(4), noise=rf.Scalar(4))


# ---- names and flat <-> tree ----------------------------------------------------------------


def test_nested_names_follow_child_order():
    s = _sum()
    assert rf.param_names(s) == ["time/sigma^2", "time/rho", "noise/sigma^2"]
    assert rf.all_param_names(rf.fix(s, "time/rho")) == ["time/sigma^2", "time/rho", "noise/sigma^2"]
    params = rf.unflatten_params(s, torch.tensor([0.5, 1.0, 1.0]))
    assert params == {
        "time": {"sigma^2": params["time"]["sigma^2"], "rho": params["time"]["rho"]},
        "noise": {"sigma^2": params["noise"]["sigma^2"]},
    }
    assert [float(get_path(params, n)) for n in rf.param_names(s)] == [0.5, 1.0, 1.0]


@given(structures_with_params())
def test_flatten_unflatten_round_trip(pair):
    s, params = pair
    flat = rf.flatten_params(s, params)
    assert flat.shape == (len(rf.param_names(s)),)
    assert flat.tolist() == [float(get_path(params, n)) for n in rf.param_names(s)]
    again = rf.unflatten_params(s, flat)
    rf.check_params(s, again)
    assert torch.equal(rf.flatten_params(s, again), flat)
    assert torch.equal(s.build(again), s.build(params))


@given(base_structures().flatmap(fix_some))
def test_init_params_holds_the_free_raw_defaults(s):
    params = s.init_params()
    rf.check_params(s, params)
    specs = dict(rf.params.param_specs(s))
    assert [float(get_path(params, n)) for n in rf.param_names(s)] == [specs[n].default for n in rf.param_names(s)]
    assert all(get_path(params, n).dim() == 0 for n in rf.param_names(s))
    params32 = s.init_params(torch.float32)
    assert all(get_path(params32, n).dtype == torch.float32 for n in rf.param_names(s))


@given(base_structures().flatmap(lambda s: raw_params(s).map(lambda p: (s, p))))
def test_constrain_applies_each_transform(pair):
    s, params = pair
    natural = rf.constrain(s, params)
    specs = dict(rf.params.param_specs(s))
    for name in rf.param_names(s):
        expected = specs[name].transform.forward(get_path(params, name))
        assert torch.equal(get_path(natural, name), expected)
    assert sorted(rf.param_names(s)) == sorted(_paths(natural))


def _paths(tree, prefix=""):
    out = []
    for key, value in tree.items():
        out += _paths(value, f"{prefix}{key}/") if isinstance(value, dict) else [prefix + key]
    return out


def test_flat_integer_vectors_become_floats():
    s = rf.AR1(3)
    assert torch.equal(s(torch.tensor([0, 0])), torch.eye(3))


def test_empty_child_dicts_are_accepted_for_children_without_free_parameters():
    s = rf.Sum(a=rf.Fixed(torch.eye(2)), b=rf.Scalar(2))
    assert rf.param_names(s) == ["b/sigma^2"]
    assert torch.equal(s({"b": {"sigma^2": T0}}), s({"a": {}, "b": {"sigma^2": T0}}))


# ---- fix / unfix ------------------------------------------------------------------------------


def test_fix_natural_scale():
    s = rf.fix(rf.AR1(3), "rho", 0.5)
    assert rf.param_names(s) == ["sigma^2"]
    assert rf.all_param_names(s) == ["sigma^2", "rho"]
    V = s({"sigma^2": torch.tensor(0.5)})
    assert torch.allclose(V, math.e * torch.tensor([[1.0, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 1.0]]), rtol=1e-14)
    assert list(rf.jacobian(s, {"sigma^2": T0})) == ["sigma^2"]


def test_fix_raw_scale_and_tensor_values():
    raw = rf.fix(rf.AR1(3), "rho", 1.0, scale="raw")
    natural = rf.fix(rf.AR1(3), "rho", torch.tensor(2 / (1 + math.exp(-1.0)) - 1))
    assert torch.allclose(raw(), natural(), atol=1e-15)
    assert dict(rf.params.param_specs(raw))["rho"].default == 1.0


def test_fix_at_the_default_keeps_the_raw_default():
    s = rf.fix(rf.LowerTriangular(2, 2), "L_1_0")
    spec = dict(rf.params.param_specs(s))["L_1_0"]
    assert spec.fixed and spec.default == 1.0
    assert rf.param_names(s) == ["L_0_0", "L_1_1"]


def test_fix_subtrees_lists_and_dicts():
    s = _sum()
    assert rf.param_names(rf.fix(s, "time/")) == ["noise/sigma^2"]
    assert rf.param_names(rf.fix(s, "/")) == []
    assert rf.param_names(rf.fix(s, ["time/rho", "noise/sigma^2"])) == ["time/sigma^2"]
    fixed = rf.fix(s, {"time/rho": 0.3, "noise/sigma^2": 2.0})
    assert rf.param_names(fixed) == ["time/sigma^2"]
    V = fixed({"time": {"sigma^2": T0}})
    assert V[0, 1].item() == pytest.approx(0.3, rel=1e-14)
    assert V[0, 0].item() == pytest.approx(1.0 + 2.0, rel=1e-14)
    assert rf.param_names(rf.fix(s, "time/", 0.1, scale="raw")) == ["noise/sigma^2"]


def test_fix_is_pure():
    s = rf.AR1(3)
    rf.fix(s, "rho", 0.5)
    assert rf.param_names(s) == ["sigma^2", "rho"]


def test_specs_kept_on_a_structure_follow_fix_unfix_and_pytree_rebuilds():
    # param_specs keeps each object's walk of its spec tree: a fixed, unfixed or unflattened copy
    # must read its own specs, and a caller's edits to the returned list must not reach the next.
    s = _sum()
    assert rf.param_names(s) == ["time/sigma^2", "time/rho", "noise/sigma^2"]  # walked and kept
    fixed = rf.fix(s, "time/rho", 0.3)
    assert rf.param_names(fixed) == ["time/sigma^2", "noise/sigma^2"]
    assert rf.param_names(rf.unfix(fixed, "time/rho")) == ["time/sigma^2", "time/rho", "noise/sigma^2"]
    leaves, spec = torch.utils._pytree.tree_flatten(fixed)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert rebuilt is not fixed and rf.param_names(rebuilt) == ["time/sigma^2", "noise/sigma^2"]
    specs = rf.params.param_specs(s)
    specs.clear()
    assert [path for path, _ in rf.params.param_specs(s)] == ["time/sigma^2", "time/rho", "noise/sigma^2"]
    assert repr(s) == repr(_sum())  # the kept walk is not a field


def test_unfix():
    s = rf.fix(_sum(), "time/", 0.2, scale="raw")
    back = rf.unfix(s, "time/rho")
    assert rf.param_names(back) == ["time/rho", "noise/sigma^2"]
    assert dict(rf.params.param_specs(back))["time/rho"].default == 0.2  # starts from the fixed value
    moved = rf.unfix(s, "time/sigma^2", 2.0)  # natural scale: σ² = 2
    assert dict(rf.params.param_specs(moved))["time/sigma^2"].default == pytest.approx(0.5 * math.log(2.0))
    assert rf.param_names(rf.unfix(s, "/")) == rf.param_names(_sum())


@given(base_structures().flatmap(fix_some))
def test_fixed_parameters_leave_free_set_flat_vector_and_jacobian(s):
    free = rf.param_names(s)
    specs = dict(rf.params.param_specs(s))
    assert free == [n for n in rf.all_param_names(s) if not specs[n].fixed]
    params = s.init_params()
    assert sorted(_paths(params)) == sorted(free)
    assert rf.flatten_params(s, params).shape == (len(free),)
    assert sorted(_paths(rf.jacobian(s, params))) == sorted(free)


# ---- bad parameter trees ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, error, match",
    [
        (
            {"sigma^2": T0},
            ValueError,
            r"does not match AR1: missing \['rho'\]\. Free parameters are \['sigma\^2', 'rho'\]",
        ),
        ({"sigma^2": T0, "rho": T0, "nu": T0}, ValueError, r"unexpected \['nu'\]"),
        ({"rho": T0, "nu": T0}, ValueError, r"missing \['sigma\^2'\]; unexpected \['nu'\]"),
        ({}, ValueError, r"missing \['sigma\^2', 'rho'\]"),
        ({"sigma^2": 0.0, "rho": T0}, TypeError, "parameter 'sigma\\^2' must be a 0-d tensor, got float"),
        ({"sigma^2": [0.0], "rho": T0}, TypeError, "must be a 0-d tensor, got list"),
        ({"sigma^2": {"x": T0}, "rho": T0}, TypeError, "must be a 0-d tensor, got dict"),
        (
            {"sigma^2": torch.zeros(1), "rho": T0},
            ValueError,
            r"parameter 'sigma\^2' must be a 0-d tensor, got shape \(1,\)",
        ),
        ({"sigma^2": torch.zeros(2, 2), "rho": T0}, ValueError, r"got shape \(2, 2\)"),
        (
            {"sigma^2": torch.tensor(0), "rho": T0},
            TypeError,
            "'sigma\\^2' must be a floating-point tensor, got torch.int64",
        ),
        ({"sigma^2": torch.tensor(True), "rho": T0}, TypeError, "floating-point"),
        ([T0, T0], TypeError, "parameter tree at the top level must be a dict, got list"),
        (None, TypeError, "must be a dict, got NoneType"),
        ("abc", TypeError, "must be a dict, got str"),
        ({0: T0, "sigma^2": T0, "rho": T0}, ValueError, r"unexpected \['0'\]"),
    ],
)
@pytest.mark.parametrize(
    "entry",
    ["build", "jacobian", "check_params", "flatten_params", "constrain", "rf.jacobian"],
)
def test_bad_parameter_trees(params, error, match, entry):
    s = rf.AR1(3)
    call = {
        "build": s.build,
        "jacobian": s.jacobian,
        "check_params": lambda p: rf.check_params(s, p),
        "flatten_params": lambda p: rf.flatten_params(s, p),
        "constrain": lambda p: rf.constrain(s, p),
        "rf.jacobian": lambda p: rf.jacobian(s, p, "fwd"),
    }[entry]
    if params is None and entry == "rf.jacobian":
        return  # None means "the defaults" there
    with pytest.raises(error, match=match):
        call(params)


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"noise": {"sigma^2": T0}}, ValueError, r"missing \['time/sigma\^2', 'time/rho'\]"),
        ({"time": {"sigma^2": T0, "rho": T0}, "noise": {}}, ValueError, r"missing \['noise/sigma\^2'\]"),
        (
            {"time": {"sigma^2": T0, "rho": T0, "phi": T0}, "noise": {"sigma^2": T0}},
            ValueError,
            r"unexpected \['time/phi'\]",
        ),
        ({"time": {"sigma^2": T0, "rho": T0}, "noise": {"sigma^2": T0}, "x": {}}, ValueError, r"unexpected \['x'\]"),
        ({"time": T0, "noise": {"sigma^2": T0}}, TypeError, "parameter tree at 'time' must be a dict, got Tensor"),
        (
            {"time": {"sigma^2": T0, "rho": 1}, "noise": {"sigma^2": T0}},
            TypeError,
            "parameter 'time/rho' must be a 0-d tensor, got int",
        ),
        (
            {"time": {"sigma^2": T0, "rho": T0}, "noise": {"sigma^2": torch.zeros(3)}},
            ValueError,
            r"'noise/sigma\^2' must be a 0-d tensor, got shape \(3,\)",
        ),
    ],
)
def test_bad_nested_trees_name_full_paths(params, error, match):
    with pytest.raises(error, match=match):
        _sum().build(params)


def test_fixed_parameter_given_as_free_is_unexpected():
    s = rf.fix(rf.AR1(3), "rho", 0.5)
    with pytest.raises(ValueError, match=r"unexpected \['rho'\]\. Free parameters are \['sigma\^2'\]"):
        s.build({"sigma^2": T0, "rho": T0})


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(3), ValueError, r"flat parameters of AR1 must have length 2 \(\['sigma\^2', 'rho'\]\), got 3"),
        (torch.zeros(1), ValueError, r"must have length 2 .*, got 1"),
        (torch.zeros(0), ValueError, r"must have length 2 .*, got 0"),
        (torch.zeros(1, 2), ValueError, r"flat parameters must be a 1-D tensor, got shape \(1, 2\)"),
        (torch.tensor(0.0), ValueError, r"1-D tensor, got shape \(\)"),
    ],
)
@pytest.mark.parametrize("entry", ["call", "unflatten", "jacobian", "jacobian_stack"])
def test_bad_flat_vectors(x, error, match, entry):
    s = rf.AR1(3)
    call = {
        "call": s,
        "unflatten": lambda v: rf.unflatten_params(s, v),
        "jacobian": lambda v: rf.jacobian(s, v),
        "jacobian_stack": lambda v: rf.jacobian_stack(s, v, "rev"),
    }[entry]
    with pytest.raises(error, match=match):
        call(x)


def test_flat_vector_for_structure_without_parameters():
    assert torch.equal(rf.Identity(2)(torch.zeros(0)), torch.eye(2))
    with pytest.raises(ValueError, match=r"must have length 0 \(\[\]\), got 1"):
        rf.Identity(2)(torch.zeros(1))


def test_non_tensor_flat_vector():
    with pytest.raises(TypeError, match="flat parameters must be a 1-D tensor, got list"):
        rf.unflatten_params(rf.AR1(3), [0.0, 0.0])
    with pytest.raises(TypeError, match="must be a dict, got list"):
        rf.AR1(3)([0.0, 0.0])


def test_non_structures_are_rejected():
    for call in (rf.param_names, rf.all_param_names, rf.init_params, lambda x: rf.check_params(x, {})):
        with pytest.raises(TypeError, match="expected a reml_fn structure, got dict"):
            call({"sigma^2": T0})


# ---- bad fix / unfix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("nope",), {}, ValueError, r"cannot resolve parameter path 'nope'; parameters are \['sigma\^2', 'rho'\]"),
        (("sig",), {}, ValueError, "cannot resolve parameter path 'sig'"),
        (("rho/",), {}, ValueError, "cannot resolve parameter path 'rho/'"),
        ((["rho", "nope"],), {}, ValueError, "cannot resolve parameter path 'nope'"),
        (({"nope": 0.1},), {}, ValueError, "cannot resolve parameter path 'nope'"),
        ((3,), {}, TypeError, "expected a path, a list of paths or a dict path -> value, got int"),
        ((3, 0.1), {}, TypeError, "expected a path, a list of paths or a dict path -> value, got int"),
        (([3],), {}, TypeError, "a parameter path must be a str, got int"),
        (({3: 0.1},), {}, TypeError, "a parameter path must be a str, got int"),
        (("rho", 2.0), {}, ValueError, r"value 2.0 for 'rho' is outside the range of its transform .*raw value nan"),
        (("rho", 1.0), {}, ValueError, "outside the range"),
        (("rho", -1.0), {}, ValueError, "outside the range"),
        (("sigma^2", -1.0), {}, ValueError, r"value -1.0 for 'sigma\^2' is outside the range of its transform ExpPow2"),
        (("sigma^2", 0.0), {}, ValueError, "outside the range"),
        (("rho", float("nan")), {"scale": "raw"}, ValueError, "outside the range"),
        (("rho", float("inf")), {"scale": "raw"}, ValueError, "outside the range"),
        (("rho", "0.5"), {}, TypeError, "value for 'rho' must be a number, got str"),
        (("rho", True), {}, TypeError, "value for 'rho' must be a number, got bool"),
        (("rho", torch.zeros(2)), {}, ValueError, r"value for 'rho' must be a scalar, got shape \(2,\)"),
        (("rho", 0.1), {"scale": "log"}, ValueError, "scale must be 'natural' or 'raw', got 'log'"),
        (({"rho": 0.1}, 0.2), {}, TypeError, "give either a dict {path: value} or a path and a value, not both"),
    ],
)
@pytest.mark.parametrize("function", [rf.fix, rf.unfix], ids=["fix", "unfix"])
def test_bad_fix_targets_and_values(function, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        function(rf.AR1(3), *args, **kwargs)


def test_fix_nested_paths_must_resolve_fully():
    s = _sum()
    with pytest.raises(ValueError, match=r"cannot resolve parameter path 'time'; parameters are \['time/sigma\^2'"):
        rf.fix(s, "time")
    with pytest.raises(ValueError, match="cannot resolve parameter path 'tim/'"):
        rf.fix(s, "tim/")
    with pytest.raises(ValueError, match="cannot resolve parameter path 'time/rho/'"):
        rf.fix(s, "time/rho/")


def test_equicorrelation_fix_outside_psd_range():
    # ρ_min = −1/(n−1) = −0.5 for n = 3: values at or below it are outside the transform's range.
    with pytest.raises(ValueError, match="outside the range"):
        rf.fix(rf.Equicorrelation(3), "rho", -0.5)
    assert rf.fix(rf.Equicorrelation(3), "rho", -0.4)()[0, 1].item() == pytest.approx(-0.4, rel=1e-12)


# ---- ParamSpec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("a/b", 0.0, Identity()), ValueError, "'/' is not allowed"),
        (("", 0.0, Identity()), ValueError, "non-empty str"),
        ((3, 0.0, Identity()), ValueError, "non-empty str"),
        (("a", "0", Identity()), TypeError, "default of 'a' must be a Python float, got '0'"),
        (("a", True, Identity()), TypeError, "must be a Python float"),
        (("a", torch.tensor(0.0), Identity()), TypeError, "must be a Python float"),
        (("a", float("nan"), Identity()), ValueError, "default of 'a' must be finite"),
        (("a", float("-inf"), Identity()), ValueError, "must be finite"),
        (("a", 0.0, torch.exp), TypeError, "transform of 'a' must be a Transform"),
        (("a", 0.0, ExpPow2(), 1), TypeError, "fixed of 'a' must be a bool, got int"),
    ],
)
def test_param_spec_errors(args, error, match):
    with pytest.raises(error, match=match):
        ParamSpec(*args)


def test_param_spec_converts_int_default():
    assert ParamSpec("a", 1, Identity()).default == 1.0
    assert isinstance(ParamSpec("a", 1, Identity()).default, float)
