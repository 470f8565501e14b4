"""Grouped: the lme4 term (covariates | groups) equals its dense Propagate form (build and
Jacobian), closed-form Jacobian = jacfwd = jacrev, label coding, O(n·k) products, vmap, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reml_fn as rf
from reml_fn.reml.engines import propagate_terms, random_terms
from reml_fn.testing import assert_jacobian_matches, assert_pytree_roundtrip, assert_vmap_matches_loop

TOL = {"atol": 1e-12, "rtol": 1e-12}


def close(actual, expected, **tolerances):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **(tolerances or TOL))


def make(seed: int, n: int, m: int, k: int, cov_kind: str, intercept: bool = True):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, m, (n,), generator=generator)
    covariates = torch.randn(n, k, generator=generator)
    if intercept:
        covariates[:, 0] = 1.0
    cov = {"Scalar": rf.Scalar(1), "Diagonal": rf.Diagonal(k), "Unstructured": rf.Unstructured(k)}[cov_kind]
    return rf.Grouped(codes, cov, covariates=covariates, num_groups=m)


def propagate_equivalent(s: rf.Grouped) -> rf.Propagate:
    """Z (I_m ⊗ Σ) Zᵀ with the dense design: the reference Grouped must equal."""
    return rf.Propagate(Z=s.design(), G=rf.Kronecker(groups=torch.eye(s.num_groups), cov=s.cov))


def as_propagate_params(params: dict) -> dict:
    return {"G": {"cov": params["cov"]}} if params else {}


CASES = {
    "intercept": (7, 12, 4, 1, "Scalar"),
    "intercept_and_slope": (8, 15, 3, 2, "Unstructured"),
    "independent_slopes": (9, 10, 3, 3, "Diagonal"),
    "one_group": (10, 6, 1, 2, "Unstructured"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_and_jacobian_equal_the_dense_propagate_form(case):
    s = make(*CASES[case])
    params = rf.unflatten_params(s, torch.linspace(-0.4, 0.3, len(rf.param_names(s))))
    reference = propagate_equivalent(s)
    close(s.build(params), reference.build(as_propagate_params(params)))
    closed = rf.jacobian(s, params)
    expected = rf.jacobian(reference, as_propagate_params(params))["G"]["cov"]
    for name in params["cov"]:
        close(closed["cov"][name], expected[name])
    assert_jacobian_matches(s, params)


@st.composite
def grouped_with_params(draw):
    k = draw(st.integers(1, 3))
    kinds = ["Scalar", "Diagonal", "Unstructured"] if k == 1 else ["Diagonal", "Unstructured"]
    s = make(
        draw(st.integers(0, 10_000)), draw(st.integers(1, 9)), draw(st.integers(1, 4)), k, draw(st.sampled_from(kinds))
    )
    values = draw(st.lists(st.floats(-1.5, 1.5), min_size=len(rf.param_names(s)), max_size=len(rf.param_names(s))))
    return s, rf.unflatten_params(s, torch.tensor(values))


@given(grouped_with_params())
def test_random_grouped_terms_match_propagate_and_autodiff(pair):
    s, params = pair
    close(s.build(params), propagate_equivalent(s).build(as_propagate_params(params)))
    assert_jacobian_matches(s, params)


def test_parameter_paths_nest_under_cov():
    s = rf.Sum(subject=rf.Grouped(torch.tensor([0, 1, 1]), rf.Unstructured(1)), residual=rf.Scalar(3))
    assert rf.param_names(s) == ["subject/cov/sigma^2_0_0", "residual/sigma^2"]
    slope = rf.Grouped(torch.tensor([0, 1, 1]), covariates=torch.ones(3, 2))
    assert rf.param_names(slope) == ["cov/sigma^2_0_0", "cov/sigma^2_1_0", "cov/sigma^2_1_1"]  # lme4's default
    fixed = rf.fix(s, "subject/cov/sigma^2_0_0", 0.25)
    assert rf.param_names(fixed) == ["residual/sigma^2"]
    close(fixed.build(fixed.init_params())[1, 2], 0.25)


def test_labels_are_coded_by_sorted_levels():
    s = rf.Grouped(["b", "c", "a", "b"])
    assert s.levels == ("a", "b", "c") and s.num_groups == 3
    assert s.codes.tolist() == [1, 2, 0, 1]
    numeric = rf.Grouped(np.array([30, 10, 30]))
    assert numeric.levels == (10, 30) and numeric.codes.tolist() == [1, 0, 1]
    assert_pytree_roundtrip(s)
    tensor_codes = rf.Grouped(torch.tensor([2, 0]), num_groups=5)
    assert tensor_codes.levels is None and tensor_codes.num_groups == 5 and tensor_codes.q == 5
    close(tensor_codes(), torch.eye(2))


def test_empty_groups_and_products_match_the_design():
    s = make(3, 11, 5, 2, "Unstructured")
    s = rf.Grouped(s.codes, s.cov, covariates=s.covariates, num_groups=7)  # two levels without data
    Z = s.design()
    assert Z.shape == (11, 14)
    v = torch.randn(11, 3)
    close(s.sum_by_group(v).reshape(14, 3), Z.T @ v)
    close(s.sum_by_group(v[:, 0]).reshape(14), Z.T @ v[:, 0])
    u = torch.randn(7, 2, 3)
    close(s.expand(u), Z @ u.reshape(14, 3))
    close(s.expand(u[..., 0]), Z @ u[..., 0].reshape(14))
    close(s.expand(u[..., 0].reshape(14)), Z @ u[..., 0].reshape(14))
    w = torch.rand(11)
    blocks = s.group_cross_products(w)
    dense = Z.T @ (w[:, None] * Z)
    for g in range(7):
        close(blocks[g], dense[2 * g : 2 * g + 2, 2 * g : 2 * g + 2])
    with pytest.raises(ValueError, match="effects must be"):
        s.expand(torch.zeros(3, 3))


def test_engines_see_grouped_terms():
    term = make(4, 9, 3, 2, "Diagonal")
    s = rf.Sum(outer=rf.Sum(subject=term, other=rf.Scalar(9)), residual=rf.Scalar(9))
    params = s.init_params()
    [(path, found, found_params)] = list(random_terms(s, params))
    assert path == "outer/subject" and found is term and "cov" in found_params
    [(path, Z, G)] = list(propagate_terms(s, params))
    close(Z @ G @ Z.T, term.build(params["outer"]["subject"]))


def test_pytree_roundtrip_and_vmap_over_parameters():
    s = make(5, 8, 3, 2, "Unstructured")
    assert_pytree_roundtrip(s)
    batch = rf.unflatten_params(s, torch.zeros(3))
    batch = {"cov": {name: torch.tensor([0.1, -0.2, 0.3]) * (i + 1) for i, name in enumerate(batch["cov"])}}
    assert_vmap_matches_loop(s, batch)


def test_vmap_over_the_data_leaves():
    s = make(6, 7, 3, 2, "Unstructured")
    covariates = torch.randn(4, 7, 2)
    codes = torch.randint(0, 3, (4, 7))
    params = s.init_params()

    def build(codes, covariates):
        return rf.replace(s, codes=codes, covariates=covariates).build(params)

    batched = torch.func.vmap(build)(codes, covariates)
    for b in range(4):
        close(batched[b], build(codes[b], covariates[b]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"groups": torch.tensor([0, 3, 1]), "num_groups": 3}, ValueError, "must be < num_groups = 3"),
        ({"groups": torch.tensor([0, -1, 1])}, ValueError, "non-negative"),
        ({"groups": torch.tensor([0.0, 1.0])}, TypeError, "integer tensor"),
        ({"groups": torch.tensor([True, False])}, TypeError, "integer tensor"),
        ({"groups": torch.tensor([[0, 1]])}, ValueError, "1-D tensor"),
        ({"groups": torch.tensor([], dtype=torch.int64)}, ValueError, "empty"),
        ({"groups": []}, ValueError, "empty"),
        ({"groups": "abc"}, TypeError, "string"),
        ({"groups": {1, 2}}, TypeError, "sequence of labels"),
        ({"groups": ["a", 1]}, TypeError, "sortable"),
        ({"groups": ["a", "b"], "num_groups": 3}, ValueError, "2 levels but num_groups = 3"),
        ({"groups": torch.tensor([0, 1]), "num_groups": 0}, ValueError, "at least 1"),
        ({"groups": torch.tensor([0, 1]), "num_groups": 2.0}, TypeError, "num_groups must be an int"),
        ({"groups": torch.tensor([0, 1]), "covariates": torch.ones(3, 1)}, ValueError, "3 rows but groups has 2"),
        ({"groups": torch.tensor([0, 1]), "covariates": torch.ones(2)}, ValueError, r"2-D \(n, k\).*x\[:, None\]"),
        ({"groups": torch.tensor([0, 1]), "covariates": [[1.0], [1.0]]}, TypeError, "torch.Tensor"),
        ({"groups": torch.tensor([0, 1]), "covariates": torch.ones(2, 0)}, ValueError, "at least one column"),
        ({"groups": torch.tensor([0, 1]), "cov": rf.Scalar(2)}, ValueError, r"k×k with k = 1"),
        ({"groups": torch.tensor([0, 1]), "covariates": torch.ones(2, 2), "cov": rf.Scalar(1)}, ValueError, "k = 2"),
        ({"groups": torch.tensor([0, 1]), "cov": "Scalar"}, TypeError, "must be a structure"),
    ],
)
def test_bad_input_is_rejected_clearly(kwargs, error, message):
    with pytest.raises(error, match=message):
        rf.Grouped(**kwargs)


def test_integer_covariates_and_tensor_cov_are_converted():
    s = rf.Grouped(torch.tensor([0, 0, 1]), torch.tensor([[2.0]]), covariates=torch.tensor([[1], [2], [1]]))
    assert s.covariates.dtype == torch.get_default_dtype()
    assert rf.param_names(s) == []
    close(s(), torch.tensor([[2.0, 4.0, 0.0], [4.0, 8.0, 0.0], [0.0, 0.0, 2.0]]))
    assert "Grouped(n=3, num_groups=2, k=1" in repr(s)
