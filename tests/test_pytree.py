"""Structures as pytrees: round trips keep statics (torch and optree), both registries agree on
leaf order and paths (parameter dicts with unsorted keys too), static fields reject tensors, and
torch.func's vmap / jacfwd / jacrev / grad take and return structures and parameter trees."""

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given
from torch.func import grad, jacfwd, jacrev, vmap

import reml_fn as rf
from reml_fn.testing import assert_pytree_roundtrip, base_structures, fix_some, seeded_normal
from reml_fn.tree import NAMESPACE, is_structure, replace, static, structure


@structure
class Labelled:
    """A minimal user structure: one data field, two static fields, a counting __init__."""

    matrix: torch.Tensor
    label: str = static(default="K")
    sizes: tuple = static(default=())
    inits = [0]

    def __init__(self, matrix, label="K", sizes=()):
        type(self).inits[0] += 1
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "sizes", sizes)


# ---- round trips --------------------------------------------------------------------------------


@given(base_structures().flatmap(fix_some))
def test_round_trip_of_every_base_structure(s):
    assert_pytree_roundtrip(s)


def _composite():
    Z = seeded_normal(0, (4, 2))
    return rf.Sum(
        zeta=rf.Propagate(Z=Z, G=rf.fix(rf.Unstructured(2), "sigma^2_1_0", 0.2)),
        alpha=rf.AR1(4),
        mid=rf.Fixed(torch.eye(4)),
    )


def test_round_trip_of_a_composite_with_unsorted_names():
    s = _composite()
    assert_pytree_roundtrip(s)
    assert rf.param_names(s)[:2] == ["zeta/G/sigma^2_0_0", "zeta/G/sigma^2_1_1"]
    rebuilt = torch_pytree.tree_unflatten(*torch_pytree.tree_flatten(s))
    assert rebuilt.names == ("zeta", "alpha", "mid")
    assert rebuilt["zeta"]["G"].specs == s["zeta"]["G"].specs


def test_statics_survive_and_leaves_are_the_data_fields():
    s = rf.fix(rf.AR1(5), "rho", 0.3)
    torch_leaves, torch_spec = torch_pytree.tree_flatten(s)
    optree_leaves, optree_spec = optree.tree_flatten(s, namespace=NAMESPACE)
    assert torch_leaves == [] and optree_leaves == []  # AR1 has no data tensors: sizes and specs are static
    for other in (torch_pytree.tree_unflatten([], torch_spec), optree.tree_unflatten(optree_spec, [])):
        assert other.n == 5 and other.specs == s.specs and rf.param_names(other) == ["sigma^2"]
    M = torch.randn(2, 3)
    fixed = rf.Fixed(M)
    assert torch_pytree.tree_leaves(fixed)[0] is M
    assert optree.tree_leaves(fixed, namespace=NAMESPACE)[0] is M


def test_unflatten_never_calls_init():
    x = Labelled(torch.eye(2), label="Z", sizes=(2, 2))
    before = Labelled.inits[0]
    leaves, spec = torch_pytree.tree_flatten(x)
    # vmap unflattens with integer in_dims; a validating __init__ would reject them.
    y = torch_pytree.tree_unflatten([0], spec)
    o_leaves, o_spec = optree.tree_flatten(x, namespace=NAMESPACE)
    z = optree.tree_unflatten(o_spec, [None])
    assert Labelled.inits[0] == before
    assert (y.matrix, y.label, y.sizes) == (0, "Z", (2, 2))
    assert (z.matrix, z.label, z.sizes) == (None, "Z", (2, 2))
    # A structure's __init__ validates (Fixed rejects non-tensors), yet unflatten with an int works.
    assert torch_pytree.tree_unflatten([0], torch_pytree.tree_structure(rf.Fixed(torch.eye(2)))).matrix == 0


def test_user_structure_round_trip():
    x = Labelled(torch.eye(2), label="Z", sizes=(2, 2))
    leaves, spec = torch_pytree.tree_flatten(x)
    y = torch_pytree.tree_unflatten(leaves, spec)
    assert y.matrix is x.matrix and y.label == "Z" and y.sizes == (2, 2)
    assert is_structure(x) and is_structure(rf.AR1(2)) and not is_structure(torch.eye(2))


# ---- leaf order: torch and optree agree ---------------------------------------------------------


def test_parameter_dicts_with_unsorted_keys_flatten_alike():
    p = {
        "zeta": torch.tensor(1.0),
        "alpha": {"omega": torch.tensor(2.0), "beta": torch.tensor(3.0)},
        "mu": torch.tensor(4.0),
    }
    torch_leaves = torch_pytree.tree_leaves(p)
    optree_leaves = optree.tree_leaves(p, namespace=NAMESPACE)
    assert [float(v) for v in torch_leaves] == [1.0, 2.0, 3.0, 4.0]
    assert all(a is b for a, b in zip(torch_leaves, optree_leaves))
    assert [tuple(path) for path in optree.tree_paths(p, namespace=NAMESPACE)] == [
        ("zeta",),
        ("alpha", "omega"),
        ("alpha", "beta"),
        ("mu",),
    ]


def test_parameter_trees_flatten_in_param_names_order():
    s = rf.Sum(zeta=rf.CompoundSymmetric(3), alpha=rf.Diagonal(3), mu=rf.Scalar(3))
    params = rf.unflatten_params(s, torch.arange(6.0))
    names = rf.param_names(s)
    assert names == ["zeta/sigma^2", "zeta/rho", "alpha/sigma^2_0", "alpha/sigma^2_1", "alpha/sigma^2_2", "mu/sigma^2"]
    for leaves in (torch_pytree.tree_leaves(params), optree.tree_leaves(params, namespace=NAMESPACE)):
        assert [float(v) for v in leaves] == list(range(6))
    assert torch.equal(rf.flatten_params(s, params), torch.arange(6.0))
    assert [float(v) for v in torch_pytree.tree_leaves(s.init_params())] == [0.0] * 6


def test_structure_leaf_order_and_paths_agree():
    s = _composite()
    torch_leaves = torch_pytree.tree_leaves(s)
    optree_leaves = optree.tree_leaves(s, namespace=NAMESPACE)
    assert len(torch_leaves) == 2  # the Propagate's Z and the Fixed identity
    assert all(a is b for a, b in zip(torch_leaves, optree_leaves))
    assert [tuple(p) for p in optree.tree_paths(s, namespace=NAMESPACE)] == [
        ("children", 0, "children", 0, "matrix"),
        ("children", 2, "matrix"),
    ]


# ---- static fields reject tensors ---------------------------------------------------------------


@pytest.mark.parametrize("label", [torch.tensor(1.0), (torch.tensor(1.0),), {"a": [torch.tensor(1.0)]}])
def test_tensor_in_static_field_is_a_type_error(label):
    with pytest.raises(TypeError, match="Labelled.label is a static .* field and cannot hold a tensor"):
        Labelled(torch.eye(2), label=label)


def test_replace_rejects_tensors_in_static_fields_and_unknown_fields():
    with pytest.raises(TypeError, match="AR1.n is a static field and cannot hold a tensor"):
        replace(rf.AR1(3), n=torch.tensor(3))
    with pytest.raises(TypeError, match=r"AR1 has no fields \['m'\]"):
        replace(rf.AR1(3), m=3)
    moved = replace(rf.Fixed(torch.eye(2)), matrix=torch.ones(2, 2))
    assert torch.equal(moved(), torch.ones(2, 2))


def test_structures_are_frozen():
    with pytest.raises(AttributeError):
        rf.AR1(3).n = 4


# ---- torch.func accepts structures and parameter trees ------------------------------------------


def test_vmap_over_a_batched_fixed_matrix_leaf():
    Zs = seeded_normal(1, (5, 4, 2))
    # The same structure with the (5, 4, 2) stack in place of its Z leaf.
    spec = torch_pytree.tree_structure(rf.Propagate(Z=Zs[0], G=rf.Diagonal(2)))
    batched = torch_pytree.tree_unflatten([Zs], spec)
    params = {"G": {"sigma^2_0": torch.tensor(0.3), "sigma^2_1": torch.tensor(-0.2)}}
    out = vmap(lambda st: st.build(params))(batched)
    for b in range(5):
        assert torch.allclose(out[b], rf.Propagate(Z=Zs[b], G=rf.Diagonal(2)).build(params), atol=1e-14)
    # Per-leaf in_dims as a structure-shaped tree: batch Z and the parameters together.
    in_dims = torch_pytree.tree_unflatten([0], spec)
    many = {"G": {"sigma^2_0": torch.linspace(-1, 1, 5), "sigma^2_1": torch.zeros(5)}}
    out = vmap(lambda st, p: st.build(p), in_dims=(in_dims, 0))(batched, many)
    for b in range(5):
        member = {"G": {k: v[b] for k, v in many["G"].items()}}
        assert torch.allclose(out[b], rf.Propagate(Z=Zs[b], G=rf.Diagonal(2)).build(member), atol=1e-14)


def test_vmap_over_parameters_with_the_structure_unbatched():
    s = _composite()
    batch = vmap(lambda th: rf.unflatten_params(s, th))(seeded_normal(2, (3, len(rf.param_names(s)))))
    out = vmap(s.build)(batch)
    assert out.shape == (3, 4, 4)
    jac = vmap(lambda p: rf.jacobian(s, p))(batch)
    assert jac["alpha"]["rho"].shape == (3, 4, 4)


def test_functions_may_return_structures():
    Ms = seeded_normal(3, (4, 2, 3))
    out = vmap(lambda M: replace(rf.Fixed(torch.zeros(2, 3)), matrix=2 * M))(Ms)
    assert isinstance(out, rf.Fixed) and out.shape == (4, 2, 3)
    assert torch.equal(out.matrix, 2 * Ms)
    J = jacfwd(lambda M: replace(rf.Fixed(torch.zeros(2, 3)), matrix=M.sin()))(Ms[0])
    assert isinstance(J, rf.Fixed)
    assert torch.allclose(J.matrix, torch.diag_embed(Ms[0].cos().reshape(-1)).reshape(2, 3, 2, 3))
    G = jacrev(lambda p: {"double": {"x": 2 * p["x"]}})({"x": torch.tensor(1.5)})
    assert G == {"double": {"x": {"x": torch.tensor(2.0)}}}


@pytest.mark.parametrize("transform", [jacfwd, jacrev], ids=["jacfwd", "jacrev"])
def test_jacobians_with_respect_to_a_structure_input(transform):
    """dV/dZ for V = Z G Zᵀ: ∂V_ij/∂Z_kl = δ_ik (G Zᵀ)_lj + (Z G)_il δ_jk."""
    Z = seeded_normal(4, (3, 2))
    s = rf.Propagate(Z=Z, G=rf.Unstructured(2))
    params = rf.unflatten_params(s, torch.tensor([0.2, 0.3, -0.1]))
    J = transform(lambda st: st.build(params))(s)
    assert isinstance(J, rf.Propagate)
    G = s["G"].build(params["G"])
    eye = torch.eye(3)
    expected = torch.einsum("ik,lj->ijkl", eye, G @ Z.T) + torch.einsum("il,jk->ijkl", Z @ G, eye)
    assert torch.allclose(J["Z"].matrix, expected, atol=1e-13)


def test_grad_with_respect_to_structure_and_parameters():
    Z = seeded_normal(5, (3, 2))
    s = rf.Propagate(Z=Z, G=rf.CompoundSymmetric(2))
    params = rf.unflatten_params(s, torch.tensor([0.4, -0.3]))

    def loss(st, p):
        return (st.build(p) ** 2).sum()

    g_struct, g_params = grad(loss, argnums=(0, 1))(s, params)
    assert isinstance(g_struct, rf.Propagate) and g_struct["Z"].shape == (3, 2)
    Z_req = Z.clone().requires_grad_(True)
    theta = torch.tensor([0.4, -0.3], requires_grad=True)
    value = loss(rf.Propagate(Z=Z_req, G=rf.CompoundSymmetric(2)), rf.unflatten_params(s, theta))
    dZ, dtheta = torch.autograd.grad(value, (Z_req, theta))
    assert torch.allclose(g_struct["Z"].matrix, dZ, atol=1e-12)
    assert list(g_params) == ["G"] and list(g_params["G"]) == ["sigma^2", "rho"]
    assert torch.allclose(rf.flatten_params(s, g_params), dtheta, atol=1e-12)


def test_grad_of_a_scalar_of_the_closed_form_jacobian():
    s = rf.AR1(4)
    g = grad(lambda p: rf.jacobian(s, p)["rho"].sum())({"sigma^2": torch.tensor(0.1), "rho": torch.tensor(0.0)})
    assert set(g) == {"sigma^2", "rho"} and all(torch.isfinite(v) for v in g.values())
