"""Base structures: torch-openreml's observed values (inventory §3–§4), names and defaults,
calling conventions, vmap = loop, and every constructor error."""

import math

import pytest
import torch
from hypothesis import given

import reml_fn as rf
from reml_fn.testing import (
    BASE_KINDS,
    SQUARE_KINDS,
    assert_vmap_matches_loop,
    base_structures,
    raw_params_batches,
    structures_with_params,
)

E = math.e  # σ² at raw 0.5
E2 = 7.38905609893065  # σ² at raw 1.0


def _flat(*values):
    return torch.tensor(values, dtype=torch.float64)


def _toeplitz(row):
    n = len(row)
    return torch.tensor([[row[abs(i - j)] for j in range(n)] for i in range(n)], dtype=torch.float64)


def _off_diagonal(n, off, diag=0.0):
    return torch.full((n, n), off, dtype=torch.float64).fill_diagonal_(diag)


# ---- observed values (torch-openreml 0.4.0a0, float64) -------------------------------------
# Each case: structure, flat raw parameters, expected V, expected Jacobian stack (k, *shape).

_OBSERVED = {
    "ScalarMatrix(3)": (rf.Scalar(3), _flat(0.5), E * torch.eye(3), (5.43656365691809 * torch.eye(3))[None]),
    "EqualEntryMatrix(3,2)": (
        rf.EqualEntry(3, 2),
        _flat(0.5),
        torch.full((3, 2), 2.718281828459045),
        torch.full((1, 3, 2), 5.43656365691809),
    ),
    "DiagonalMatrix(3)": (
        rf.Diagonal(3),
        _flat(0.0, 0.5, 1.0),
        torch.diag(_flat(1.0, 2.718281828459045, 7.38905609893065)),
        torch.diag_embed(torch.diag(_flat(2.0, 5.43656365691809, 14.7781121978613))),
    ),
    "EquicorrelationMatrix(3) θ=1": (
        rf.Equicorrelation(3),
        _flat(1.0),
        _off_diagonal(3, 0.5965878679450074, 1.0),
        _off_diagonal(3, 0.2949178998622228)[None],
    ),
    "EquicorrelationMatrix(3) θ=-2": (
        rf.Equicorrelation(3),
        _flat(-2.0),
        _off_diagonal(3, -0.3211956169668237, 1.0),
        _off_diagonal(3, 0.15749037810525976)[None],
    ),
    "CompoundSymmetricMatrix(3)": (
        rf.CompoundSymmetric(3),
        _flat(0.5, 1.0),
        _off_diagonal(3, 1.6216939605140381, 2.718281828459045),
        torch.stack([_off_diagonal(3, 3.2433879210280763, 5.43656365691809), _off_diagonal(3, 0.8016699680827845)]),
    ),
    "AR1Matrix(4)": (
        rf.AR1(4),
        _flat(0.5, 1.0),
        _toeplitz([2.718281828459045, 1.2561646711990355, 0.5804952469049532, 0.2682568133026645]),
        torch.stack(
            [
                _toeplitz([5.43656365691809, 2.512329342398071, 1.1609904938099065, 0.536513626605329]),
                _toeplitz([0.0, 1.068893290777046, 0.9879078578963713, 0.6847937563888451]),
            ]
        ),
    ),
    "UnconstrainedMatrix(3)": (
        rf.Unstructured(3),
        _flat(0.0, 0.5, 1.0, 0.2, -0.3, 0.4),
        torch.tensor([[1.0, 0.5, 0.2], [0.5, 7.38905609893065, -0.3], [0.2, -0.3, 2.225540928492468]]),
        None,  # checked entry by entry below
    ),
    "LowerTriangularMatrix(3,2)": (
        rf.LowerTriangular(3, 2),
        _flat(0.0, 0.5, 1.0, 0.2, -0.3),
        torch.tensor([[0.0, 0.0], [0.5, 1.0], [0.2, -0.3]]),
        None,
    ),
}


@pytest.mark.parametrize("case", list(_OBSERVED))
def test_observed_values(case):
    s, theta, V, J = _OBSERVED[case]
    assert torch.allclose(s(theta), V, atol=1e-12, rtol=0)
    if J is not None:
        stack, _ = rf.jacobian_stack(s, theta)
        assert torch.allclose(stack, J, atol=1e-12, rtol=0)


def test_observed_unstructured_jacobian():
    s, theta, _, _ = _OBSERVED["UnconstrainedMatrix(3)"]
    J, names = rf.jacobian_stack(s, theta)
    diagonal = {"sigma^2_0_0": 2.0, "sigma^2_1_1": 14.7781121978613, "sigma^2_2_2": 4.451081856984936}
    for k, name in enumerate(names):
        i, j = (int(v) for v in name.split("_")[-2:])
        expected = torch.zeros(3, 3)
        expected[i, j] = expected[j, i] = diagonal.get(name, 1.0)
        assert torch.allclose(J[k], expected, atol=1e-12, rtol=0), name


def test_observed_lower_triangular_jacobian():
    s, theta, _, _ = _OBSERVED["LowerTriangularMatrix(3,2)"]
    J, names = rf.jacobian_stack(s, theta)
    assert names == ["L_0_0", "L_1_0", "L_1_1", "L_2_0", "L_2_1"]
    for k, (i, j) in enumerate([(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]):
        expected = torch.zeros(3, 2)
        expected[i, j] = 1.0
        assert torch.equal(J[k], expected)


def _adapter():
    """torch-openreml's observed Adapter: DiagonalMatrix(2) with θ ↦ [σ(θ), 1 − σ(θ)]."""
    return rf.Reparam(rf.Diagonal(2), lambda x: torch.stack([torch.sigmoid(x[0]), 1.0 - torch.sigmoid(x[0])]), 1)


def test_observed_adapter():
    s = _adapter()
    assert torch.allclose(s(_flat(0.0)), E * torch.eye(2), atol=1e-12, rtol=0)
    J, names = rf.jacobian_stack(s, _flat(0.7))
    assert names == ["theta_0"]
    expected = torch.diag(_flat(1.6873354486947492, -0.8610519310651596))
    assert torch.allclose(J[0], expected, atol=1e-12, rtol=0)


# ---- names, defaults, transforms ----------------------------------------------------------


@pytest.mark.parametrize(
    "s, names",
    [
        (rf.Identity(3), []),
        (rf.Scalar(3), ["sigma^2"]),
        (rf.EqualEntry(2, 3), ["sigma^2"]),
        (rf.Diagonal(3), ["sigma^2_0", "sigma^2_1", "sigma^2_2"]),
        (rf.Equicorrelation(3), ["rho"]),
        (rf.CompoundSymmetric(3), ["sigma^2", "rho"]),
        (rf.AR1(3), ["sigma^2", "rho"]),
        (
            rf.Unstructured(3),
            ["sigma^2_0_0", "sigma^2_1_0", "sigma^2_1_1", "sigma^2_2_0", "sigma^2_2_1", "sigma^2_2_2"],
        ),
        (rf.LowerTriangular(2, 3), ["L_0_0", "L_1_0", "L_1_1"]),
        (rf.LowerTriangular(3, 1), ["L_0_0", "L_1_0", "L_2_0"]),
        (rf.Fixed(torch.eye(2)), []),
        (rf.Custom(lambda x: x[0] * torch.eye(2) + x[1], 2), ["theta_0", "theta_1"]),
        (rf.Custom(lambda x: x[0] * torch.eye(2), names=["scale"]), ["scale"]),
        (_adapter(), ["theta_0"]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, rf.Structure) else "",
)
def test_param_names_follow_torch_openreml(s, names):
    assert rf.param_names(s) == names


@pytest.mark.parametrize(
    "s, expected",
    [
        (rf.Identity(2), torch.eye(2)),
        (rf.Scalar(2), torch.eye(2)),
        (rf.EqualEntry(2, 3), torch.ones(2, 3)),
        (rf.Diagonal(2), torch.eye(2)),
        (rf.Equicorrelation(2), torch.eye(2)),  # ρ = (1 + ρ_min)/2 = 0 for n = 2
        (rf.Equicorrelation(3), _off_diagonal(3, 0.25, 1.0)),
        (rf.Equicorrelation(4), _off_diagonal(4, 1.0 / 3.0, 1.0)),
        (rf.CompoundSymmetric(3), _off_diagonal(3, 0.25, 1.0)),
        (rf.AR1(3), torch.eye(3)),  # raw 0 gives ρ = 0 exactly
        (rf.Unstructured(3), torch.eye(3)),
        (rf.LowerTriangular(3, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, rf.Structure) else "",
)
def test_raw_defaults(s, expected):
    assert torch.allclose(s(), expected, atol=1e-15, rtol=0)
    assert torch.equal(s(), s.build(s.init_params()))


def test_transforms_and_defaults_of_each_parameter():
    specs = dict(rf.params.param_specs(rf.AR1(3)))
    assert specs["sigma^2"].transform == rf.transforms.ExpPow2()
    assert specs["rho"].transform == rf.transforms.Chain((rf.transforms.Sigmoid(), rf.transforms.ScaleShift(2.0, -1.0)))
    rho = dict(rf.params.param_specs(rf.Equicorrelation(4)))["rho"]
    assert rho.transform == rf.transforms.Chain(
        (rf.transforms.Sigmoid(), rf.transforms.ScaleShift(4.0 / 3.0, -1.0 / 3.0))
    )
    assert rf.Equicorrelation(4).rho_min == pytest.approx(-1.0 / 3.0)
    unstructured = dict(rf.params.param_specs(rf.Unstructured(2)))
    assert unstructured["sigma^2_1_1"].transform == rf.transforms.ExpPow2()
    assert unstructured["sigma^2_1_0"].transform == rf.transforms.Identity()
    assert {spec.default for _, spec in rf.params.param_specs(rf.LowerTriangular(2, 2))} == {1.0}


def test_constrain_gives_natural_values():
    s = rf.AR1(3)
    natural = s.constrain({"sigma^2": torch.tensor(0.5), "rho": torch.tensor(0.0)})
    assert natural["sigma^2"].item() == pytest.approx(E, rel=1e-15)
    assert natural["rho"].item() == 0.0


# ---- calling conventions and invariants ---------------------------------------------------


@given(structures_with_params())
def test_call_accepts_tree_flat_and_build_agrees(pair):
    s, params = pair
    V = s.build(params)
    assert tuple(V.shape) == tuple(s.shape)
    assert torch.equal(s(params), V)
    assert torch.equal(s(rf.flatten_params(s, params)), V)
    assert V.dtype == torch.float64
    if type(s).__name__ in SQUARE_KINDS:
        assert torch.equal(V, V.T)


@given(structures_with_params(kinds=[k for k in BASE_KINDS if k != "Fixed"]))
def test_dtype_follows_parameters(pair):
    s, params = pair
    params32 = {k: v.to(torch.float32) for k, v in params.items()}
    if params32:
        assert s.build(params32).dtype == torch.float32


@given(
    base_structures(kinds=[k for k in BASE_KINDS if k not in ("Identity", "Fixed")]).flatmap(
        lambda s: raw_params_batches(s).map(lambda batch: (s, batch))
    )
)
def test_vmap_build_and_jacobian_equal_a_loop(pair):
    assert_vmap_matches_loop(*pair)


def test_vmap_batch_of_one_and_several():
    s = rf.CompoundSymmetric(3)
    assert_vmap_matches_loop(s, {"sigma^2": torch.tensor([0.2]), "rho": torch.tensor([-0.4])})
    assert_vmap_matches_loop(s, {"sigma^2": torch.linspace(-1, 1, 7), "rho": torch.linspace(2, -2, 7)})


def test_fixed_matrix_is_a_leaf_and_integers_become_floats():
    M = torch.arange(6).reshape(2, 3)
    s = rf.Fixed(M)
    assert s.shape == (2, 3)
    assert s().dtype == torch.get_default_dtype()
    assert torch.equal(s(), M.to(torch.float64))
    assert rf.param_names(s) == [] and rf.jacobian(s, {}) == {}


def test_custom_jacobian_is_used_when_given():
    calls = []

    def jacobian(x):
        calls.append(1)
        return torch.stack([torch.eye(2), torch.ones(2, 2)])

    s = rf.Custom(lambda x: x[0] * torch.eye(2) + x[1] * torch.ones(2, 2), 2, jacobian=jacobian)
    J, _ = rf.jacobian_stack(s, _flat(0.3, -0.2))
    assert calls and torch.equal(J, torch.stack([torch.eye(2), torch.ones(2, 2)]))


def test_custom_applies_transforms_and_defaults():
    s = rf.Custom(lambda x: x[0] * torch.eye(2), 1, transforms=rf.transforms.ExpPow2(), defaults=0.5)
    assert torch.allclose(s(), E * torch.eye(2), rtol=1e-15)
    assert torch.allclose(rf.jacobian_stack(s)[0][0], 2 * E * torch.eye(2), rtol=1e-15)


def test_repr_names_the_structure_and_fixed_values():
    assert repr(rf.AR1(3)) == "AR1(n=3)"
    assert repr(rf.fix(rf.AR1(3), "rho", 0.0, scale="raw")) == "AR1(n=3, fixed(raw)=[rho=0])"
    assert "<tensor (2, 2)>" in repr(rf.Fixed(torch.eye(2)))


# ---- bad input ------------------------------------------------------------------------------

_SIZED = [rf.Identity, rf.Scalar, rf.Diagonal, rf.AR1, rf.Unstructured, rf.Equicorrelation, rf.CompoundSymmetric]


@pytest.mark.parametrize("cls", _SIZED + [rf.EqualEntry], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "n, error, match",
    [
        (0, ValueError, "'n' must be at least"),
        (-2, ValueError, "'n' must be at least"),
        (2.0, TypeError, "'n' must be an int, got float"),
        (True, TypeError, "'n' must be an int, got bool"),
        ("3", TypeError, "'n' must be an int, got str"),
        (None, TypeError, "'n' must be an int, got NoneType"),
        (torch.tensor(3), TypeError, "'n' must be an int, got Tensor"),
    ],
)
def test_bad_sizes(cls, n, error, match):
    with pytest.raises(error, match=match):
        cls(n)


@pytest.mark.parametrize("cls", [rf.EqualEntry, rf.LowerTriangular], ids=lambda c: c.__name__)
@pytest.mark.parametrize("m, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (False, TypeError)])
def test_bad_second_size(cls, m, error):
    with pytest.raises(error, match="'m' must be"):
        cls(2, m)


def test_lower_triangular_needs_both_sizes():
    with pytest.raises(TypeError):
        rf.LowerTriangular(2)


@pytest.mark.parametrize("cls", [rf.Equicorrelation, rf.CompoundSymmetric], ids=lambda c: c.__name__)
def test_equicorrelation_needs_two_rows(cls):
    with pytest.raises(ValueError, match="'n' must be at least 2, got 1"):
        cls(1)


@pytest.mark.parametrize(
    "matrix, error, match",
    [
        ([[1.0, 0.0], [0.0, 1.0]], TypeError, "2-D torch.Tensor, got list"),
        (3.0, TypeError, "got float"),
        (torch.ones(3), ValueError, r"2-D tensor, got shape \(3,\)"),
        (torch.ones(2, 2, 2), ValueError, r"2-D tensor, got shape \(2, 2, 2\)"),
        (torch.tensor(1.0), ValueError, r"got shape \(\)"),
    ],
)
def test_fixed_bad_input(matrix, error, match):
    with pytest.raises(error, match=match):
        rf.Fixed(matrix)


def _two_by_two(x):
    return x[0] * torch.eye(2)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: rf.Custom(3, 1), TypeError, "callable build function, got int"),
        (lambda: rf.Custom(lambda x: x, 2), ValueError, "must return a 2-D tensor"),
        (lambda: rf.Custom(lambda x: [[1.0]], 1), ValueError, "must return a 2-D tensor"),
        (lambda: rf.Custom(lambda x: torch.ones(2, 2, 2), 1), ValueError, "must return a 2-D tensor"),
        (lambda: rf.Custom(_two_by_two), ValueError, "num_params must be a non-negative int, got None"),
        (lambda: rf.Custom(_two_by_two, -1), ValueError, "num_params must be a non-negative int"),
        (lambda: rf.Custom(_two_by_two, 1.0), ValueError, "num_params must be a non-negative int"),
        (lambda: rf.Custom(_two_by_two, 2, names=["a"]), ValueError, "num_params=2 but 1 names"),
        (lambda: rf.Custom(_two_by_two, names=["a", "a"]), ValueError, "unique"),
        (lambda: rf.Custom(_two_by_two, names=["a/b"]), ValueError, "'/' is not allowed"),
        (lambda: rf.Custom(_two_by_two, names=[""]), ValueError, "non-empty str"),
        (lambda: rf.Custom(_two_by_two, 1, defaults=[0.0, 1.0]), ValueError, "expected 1 defaults, got 2"),
        (lambda: rf.Custom(_two_by_two, 1, defaults=None), TypeError, "defaults must be a number or a list"),
        (lambda: rf.Custom(_two_by_two, 1, defaults="0"), TypeError, "defaults must be a number or a list"),
        (lambda: rf.Custom(_two_by_two, 1, defaults=[float("nan")]), ValueError, "must be finite"),
        (lambda: rf.Custom(_two_by_two, 1, transforms=[]), ValueError, "expected 1 transforms, got 0"),
        (lambda: rf.Custom(_two_by_two, 1, transforms=torch.exp), TypeError, "transforms must be a Transform"),
        (lambda: rf.Custom(_two_by_two, 1, transforms=[torch.exp]), TypeError, "must be a Transform"),
        (lambda: rf.Custom(_two_by_two, 1, jacobian=3), TypeError, "jacobian must be callable"),
    ],
)
def test_custom_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: rf.Reparam(3, lambda x: x, 1), TypeError, "child must be a structure, got int"),
        (lambda: rf.Reparam(torch.eye(2), lambda x: x, 1), TypeError, "child must be a structure, got Tensor"),
        (lambda: rf.Reparam(rf.Diagonal(2), 3, 1), TypeError, "param_map must be callable"),
        (lambda: rf.Reparam(rf.Diagonal(2), lambda x: x, 1), ValueError, r"shape \(2,\).*got \(1,\)"),
        (lambda: rf.Reparam(rf.Diagonal(2), lambda x: x.repeat(3), 1), ValueError, r"shape \(2,\).*got \(3,\)"),
        (lambda: rf.Reparam(rf.Diagonal(2), lambda x: x.repeat(2)[None], 1), ValueError, r"got \(1, 2\)"),
        (lambda: rf.Reparam(rf.Diagonal(2), lambda x: [x, x], 1), ValueError, "got list"),
        (lambda: rf.Reparam(rf.Diagonal(2), lambda x: x), ValueError, "num_params must be"),
    ],
)
def test_reparam_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()
