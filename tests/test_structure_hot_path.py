"""The parametric structures' ``_build``/``_jacobian`` hot path: a handful of ATen calls (each costs
microseconds at these sizes), the textbook values, float32 kept under forward mode
(pytorch/functorch#1073) and fresh, writable results on every call."""

import pytest
import torch
from torch.func import jacfwd, jacrev, jvp
from torch.utils._python_dispatch import TorchDispatchMode

import reml_fn as rf
from reml_fn import transforms as T
from reml_fn.params import ParamSpec
from reml_fn.structures.correlation import ar1_rho_transform, equicorrelation_rho_transform


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops(fn, *args) -> int:
    with _CountOps() as counter:
        fn(*args)
    return counter.count


def _params(s, dtype=torch.float64):
    return {name: value + 0.1 * (i + 1) for i, (name, value) in enumerate(s.init_params(dtype).items())}


def _respec(s, name, transform=None, default=None, fixed=False):
    old = dict(rf.params.param_specs(s))[name]
    spec = ParamSpec(name, old.default if default is None else default, transform or old.transform, fixed)
    return s.with_spec((name,), spec)


# ---- ATen-call budgets --------------------------------------------------------------------------
# (structure, build, jacobian): the calls one evaluation may make. The per-entry code this replaced
# made 23/44 (Unstructured(2)), 28/84 (Unstructured(3)), 11/28 (Diagonal(3)), 14/24
# (LowerTriangular(2, 2)); the budgets leave a little room for torch versions.
_BUDGETS = [
    (rf.Unstructured(2), 8, 17),
    (rf.Unstructured(3), 10, 24),
    (rf.Scalar(3), 5, 6),
    (rf.EqualEntry(2, 3), 5, 6),
    (rf.Diagonal(3), 10, 19),
    (rf.LowerTriangular(2, 2), 4, 7),
    (rf.LowerTriangular(3, 3), 4, 10),
    (rf.Equicorrelation(3), 8, 14),
    (rf.CompoundSymmetric(3), 11, 22),
    (rf.AR1(3), 13, 26),
]


@pytest.mark.parametrize("s, build, jacobian", _BUDGETS, ids=[repr(b[0]) for b in _BUDGETS])
def test_aten_call_budget(s, build, jacobian):
    params = _params(s)
    assert _ops(s._build, params) <= build
    assert _ops(s._jacobian, params) <= jacobian


def test_a_fixed_parameter_costs_one_call_plus_its_transform():
    free = rf.Unstructured(2)
    fixed = _respec(free, "sigma^2_1_0", fixed=True, default=0.3)  # Identity: the free one costs nothing
    assert _ops(fixed._build, _params(fixed)) == _ops(free._build, _params(free)) + 1


# ---- values ---------------------------------------------------------------------------------------


def _variants():
    """Structures with every kind of parameter: default, re-transformed, fixed."""
    u = rf.Unstructured(3)
    u = _respec(u, "sigma^2_1_0", T.Chain((T.Sigmoid(), T.ScaleShift(2.0, -1.0))))
    u = _respec(u, "sigma^2_0_0", T.Exp10())
    u = _respec(u, "sigma^2_2_2", T.Pow(3.0), default=0.5)
    u = _respec(u, "sigma^2_1_1", fixed=True, default=0.3)
    u = _respec(u, "sigma^2_2_0", fixed=True, default=-0.7)
    lower = _respec(_respec(rf.LowerTriangular(3, 2), "L_1_0", fixed=True, default=0.25), "L_2_1", T.Exp())
    return {
        "Unstructured(3)": rf.Unstructured(3),
        "Unstructured(3) re-specified": u,
        "LowerTriangular(3, 2)": rf.LowerTriangular(3, 2),
        "LowerTriangular(2, 3)": rf.LowerTriangular(2, 3),
        "LowerTriangular(3, 2) re-specified": lower,
        "Diagonal(3) one fixed": _respec(rf.Diagonal(3), "sigma^2_1", fixed=True, default=0.4),
        "Scalar(2) Exp2": _respec(rf.Scalar(2), "sigma^2", T.Exp2()),
        "CompoundSymmetric(3)": rf.CompoundSymmetric(3),
        "CompoundSymmetric(4) rho fixed": _respec(rf.CompoundSymmetric(4), "rho", fixed=True, default=0.4),
        "Equicorrelation(4)": rf.Equicorrelation(4),
        "AR1(4) sigma^2 fixed": _respec(rf.AR1(4), "sigma^2", fixed=True, default=0.4),
    }


_VARIANTS = _variants()


def _raw(s, params, spec):
    return params[spec.name] if not spec.fixed else torch.tensor(spec.default, dtype=torch.float64)


def _entry(name):
    i, j = name.split("_")[-2:]
    return int(i), int(j)


@pytest.mark.parametrize("name", [k for k in _VARIANTS if k.startswith(("Unstructured", "LowerTriangular"))])
def test_triangular_values_are_the_formulas(name):
    s = _VARIANTS[name]
    params = _params(s)
    symmetric = isinstance(s, rf.Unstructured)
    V = torch.zeros(s.shape)
    for spec in s.specs:
        i, j = _entry(spec.name)
        V[i, j] = spec.transform.forward(_raw(s, params, spec))
        if symmetric:
            V[j, i] = V[i, j]
    assert torch.equal(s.build(params), V)
    J = s.jacobian(params)
    assert list(J) == rf.param_names(s)
    for spec in s.specs:
        if spec.fixed:
            continue
        i, j = _entry(spec.name)
        unit = torch.zeros(s.shape)
        unit[i, j] = 1.0
        if symmetric:
            unit[j, i] = 1.0
        assert torch.equal(J[spec.name], unit * spec.transform.derivative(params[spec.name])), spec.name


def test_correlation_values_are_the_two_term_formulas():
    for n in (2, 3, 4, 7):
        for raw in (-3.0, -0.4, 0.0, 0.9, 5.0):
            s = rf.CompoundSymmetric(n)
            params = {"sigma^2": torch.tensor(0.3), "rho": torch.tensor(raw)}
            natural = s.constrain(params)
            sigma2, rho = natural["sigma^2"], natural["rho"]
            eye, ones = torch.eye(n), torch.ones(n, n)
            assert torch.equal(s.build(params), sigma2 * ((1.0 - rho) * eye + rho * ones))
            J = s.jacobian(params)
            rho_slope = equicorrelation_rho_transform(n).derivative(params["rho"])
            assert torch.equal(J["sigma^2"], ((1.0 - rho) * eye + rho * ones) * (2.0 * sigma2))
            assert torch.equal(J["rho"], sigma2 * (ones - eye) * rho_slope)
            eq = rf.Equicorrelation(n)
            assert torch.equal(eq.build({"rho": params["rho"]}), (1.0 - rho) * eye + rho * ones)
            lags = torch.tensor([[abs(i - j) for j in range(n)] for i in range(n)], dtype=torch.float64)
            ar1 = rf.AR1(n)
            rho = ar1_rho_transform().forward(params["rho"])
            assert torch.equal(ar1.build(params), sigma2 * torch.pow(rho, lags))


def test_overflowing_variance_is_inf_not_nan():
    # V_ii = x_ii exactly (the matrix is stacked from its entries; x + x − x used to give inf − inf).
    V = rf.Unstructured(2).build(
        {"sigma^2_0_0": torch.tensor(400.0), "sigma^2_1_0": torch.tensor(0.5), "sigma^2_1_1": torch.tensor(0.0)}
    )
    assert V[0, 0].item() == float("inf") and V[1, 0].item() == V[0, 1].item() == 0.5 and V[1, 1].item() == 1.0


# ---- forward mode keeps float32 ----------------------------------------------------------------------


def _dtypes(tree):
    if isinstance(tree, dict):
        return {d for value in tree.values() for d in _dtypes(value)}
    return {tree.dtype}


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_float32_stays_float32_under_jacfwd_and_jacrev(name):
    s = _VARIANTS[name]
    params = _params(s, torch.float32)
    assert s.build(params).dtype == torch.float32
    assert _dtypes(s.jacobian(params)) == {torch.float32}
    for transform in (jacfwd, jacrev):
        assert _dtypes(transform(s._build)(params)) == {torch.float32}, transform.__name__
        assert _dtypes(transform(s._jacobian)(params)) == {torch.float32}, transform.__name__
    tangents = {k: torch.ones_like(v) for k, v in params.items()}
    _, natural_tangents = jvp(s._natural, (params,), (tangents,))
    assert _dtypes(natural_tangents) == {torch.float32}


_TANGENT_SAFE = [T.Identity(), T.Exp(), T.ExpPow2(), T.Sigmoid(), T.Chain((T.Sigmoid(), T.Exp(), T.ExpPow2()))]
_TANGENT_UNSAFE = [T.ScaleShift(2.0, -1.0), T.Exp10(), T.Pow(2.0), T.Exp2(), ar1_rho_transform()]


@pytest.mark.parametrize("transform", _TANGENT_SAFE, ids=str)
def test_transforms_that_skip_the_copy_keep_the_tangent_dtype(transform):
    assert transform._keeps_tangent_dtype
    x = torch.tensor(0.3, dtype=torch.float32)
    value, tangent = jvp(transform.forward, (x,), (torch.ones_like(x),))
    assert value.dtype == tangent.dtype == torch.float32


@pytest.mark.parametrize("transform", _TANGENT_UNSAFE, ids=str)
def test_other_transforms_are_copied(transform):
    assert not transform._keeps_tangent_dtype


# ---- fresh results ----------------------------------------------------------------------------------
# Jacobian leaves may be views of one tensor made in the call (the unit matrices): writing into one
# changes neither its siblings nor any later result, and the parameters are never written.


@pytest.mark.parametrize("s", [rf.Unstructured(3), rf.LowerTriangular(3, 2), rf.Diagonal(3), rf.Scalar(2)], ids=repr)
def test_results_are_fresh_on_every_call(s):
    params = _params(s)
    V, J = s.build(params), s.jacobian(params)
    V_copy, J_copy = V.clone(), {k: v.clone() for k, v in J.items()}
    V.add_(1.0)
    first = next(iter(J))
    J[first].add_(5.0)
    assert all(torch.equal(J[k], J_copy[k]) for k in J if k != first)
    assert torch.equal(s.build(params), V_copy)
    again = s.jacobian(params)
    assert all(torch.equal(again[k], J_copy[k]) for k in J)
    assert all(torch.equal(params[k], v) for k, v in _params(s).items())
