"""Test helpers: hypothesis strategies and assertions for covariance structures.

The library tests its own structures with these helpers, and you can test yours the same way.
A structure is right when its closed-form Jacobian agrees with ``torch.func.jacfwd`` and
``jacrev`` of its ``build``, when ``vmap`` over a batch of parameters equals a Python loop, and
when it survives a pytree round trip (torch and optree) with its static configuration intact.
Run the checks in float64 (``torch.set_default_dtype(torch.float64)``): the default
tolerances (1e-10) assume it. Use ``deadline=None``: the first ``jacfwd`` call is slow.

Example — a user's structure V(x) = e^{x_0} I + x_1 J with its closed-form Jacobian:

    >>> import torch
    >>> from hypothesis import given, settings, strategies as st
    >>> import reml_fn as rf
    >>> from reml_fn.testing import (
    ...     raw_params, raw_params_batches, fix_some,
    ...     assert_jacobian_matches, assert_vmap_matches_loop, assert_pytree_roundtrip,
    ... )
    >>> def my_structure(n):
    ...     return rf.Custom(
    ...         lambda x: torch.exp(x[0]) * torch.eye(n) + x[1] * torch.ones(n, n), 2,
    ...         jacobian=lambda x: torch.stack([torch.exp(x[0]) * torch.eye(n), torch.ones(n, n)]),
    ...     )
    >>> structures = st.integers(1, 4).map(my_structure)
    >>> @settings(max_examples=10, deadline=None, database=None, derandomize=True)
    ... @given(structures.flatmap(lambda s: raw_params(s).map(lambda p: (s, p))))
    ... def test_jacobian(pair):
    ...     assert_jacobian_matches(*pair)        # closed form = jacfwd = jacrev, leaf by leaf
    >>> @settings(max_examples=10, deadline=None, database=None, derandomize=True)
    ... @given(structures.flatmap(lambda s: raw_params_batches(s).map(lambda b: (s, b))))
    ... def test_vmap(pair):
    ...     assert_vmap_matches_loop(*pair)       # vmap(build), vmap(jacobian) = a Python loop
    >>> @settings(max_examples=10, deadline=None, database=None, derandomize=True)
    ... @given(structures.flatmap(fix_some))      # some parameters fixed at drawn values
    ... def test_pytree_and_fixed(s):
    ...     assert_pytree_roundtrip(s)
    ...     assert_jacobian_matches(s)
    >>> test_jacobian(); test_vmap(); test_pytree_and_fixed()

Strategies: :func:`base_structures` (every base structure with drawn sizes, optionally of one
shape), :func:`raw_params`, :func:`raw_params_batches`, :func:`fix_some` (some parameters fixed),
:func:`structures_with_params`; random combinator trees come from :mod:`reml_fn.testing.trees`.
"""

from reml_fn.testing.assertions import (
    assert_jacobian_matches,
    assert_pytree_roundtrip,
    assert_vmap_matches_loop,
)
from reml_fn.testing.structures import (
    BASE_KINDS,
    SQUARE_KINDS,
    base_structures,
    fix_some,
    raw_params,
    raw_params_batches,
    seeded_normal,
    structures_with_params,
)
from reml_fn.testing.trees import COMBINATOR_NAMES, SPD_KINDS, structure_trees, trees_with_params

__all__ = [
    "assert_jacobian_matches",
    "assert_pytree_roundtrip",
    "assert_vmap_matches_loop",
    "BASE_KINDS",
    "SQUARE_KINDS",
    "base_structures",
    "fix_some",
    "raw_params",
    "raw_params_batches",
    "seeded_normal",
    "structures_with_params",
    "COMBINATOR_NAMES",
    "SPD_KINDS",
    "structure_trees",
    "trees_with_params",
]
