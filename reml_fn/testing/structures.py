"""Hypothesis strategies for base structures and their raw parameters.

Each strategy draws *small* structures (sizes 1…4 by default), so a property test that calls
``jacfwd``/``jacrev`` on every example stays fast:

* :func:`base_structures` — every base structure (Identity, Scalar, EqualEntry, Diagonal,
  Equicorrelation, CompoundSymmetric, AR1, Unstructured, LowerTriangular, Fixed, Custom,
  Reparam) with drawn sizes, optionally of one given shape;
* :func:`raw_params` — a tree of raw 0-d tensors for the free parameters of a given structure,
  drawn uniformly from ``[low, high]``;
* :func:`raw_params_batches` — the same with a leading batch dimension (for ``vmap`` tests);
* :func:`fix_some` — a structure with a random subset of its parameters fixed at drawn values;
* :func:`structures_with_params` — ``(structure, params)`` pairs.

Random matrices (a Fixed matrix, a Custom function's coefficients, a Reparam map) come from a
drawn integer seed, so hypothesis shrinks them as integers and failures replay exactly.

Example:
    >>> import reml_fn as rf
    >>> from hypothesis import given, settings
    >>> from reml_fn.testing import structures_with_params, assert_jacobian_matches
    >>> @settings(max_examples=5, deadline=None, database=None, derandomize=True)
    ... @given(structures_with_params(kinds=("AR1", "Diagonal")))
    ... def test_jacobian(pair):
    ...     s, params = pair
    ...     assert_jacobian_matches(s, params)
    >>> test_jacobian()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

import reml_fn as rf
from reml_fn import transforms as T
from reml_fn.params import all_param_names, param_names, tree_from_names

__all__ = [
    "BASE_KINDS",
    "SQUARE_KINDS",
    "base_structures",
    "raw_params",
    "raw_params_batches",
    "fix_some",
    "structures_with_params",
    "seeded_normal",
]

#: Every base structure, by class name.
BASE_KINDS: tuple[str, ...] = (
    "Identity",
    "Scalar",
    "EqualEntry",
    "Diagonal",
    "Equicorrelation",
    "CompoundSymmetric",
    "AR1",
    "Unstructured",
    "LowerTriangular",
    "Fixed",
    "Custom",
    "Reparam",
)
#: The base structures that are always square.
SQUARE_KINDS: tuple[str, ...] = (
    "Identity",
    "Scalar",
    "Diagonal",
    "Equicorrelation",
    "CompoundSymmetric",
    "AR1",
    "Unstructured",
)
_AT_LEAST_TWO = ("Equicorrelation", "CompoundSymmetric")

# Transforms a Custom structure's parameters may carry: smooth on [-1.5, 1.5] with moderate values.
_CUSTOM_TRANSFORMS = (T.Identity(), T.ExpPow2(), T.Sigmoid(), T.Chain((T.Sigmoid(), T.ScaleShift(2.0, -1.0))))


def seeded_normal(seed: int, shape: Sequence[int], scale: float = 1.0) -> Tensor:
    """A standard normal tensor (default dtype) from a seed: reproducible random data for strategies."""
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(torch.get_default_dtype())


_seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _custom_function(coefficients: Tensor, product: Tensor) -> Callable[[Tensor], Tensor]:
    """V(x) = Σ_k A_k sin(x_k) + x_0 x_{k−1} B: nonlinear, mixes parameters, any shape."""

    def function(x: Tensor) -> Tensor:
        A, B = coefficients.to(x.dtype), product.to(x.dtype)
        return torch.tensordot(torch.sin(x), A, dims=1) + (x[0] * x[-1]) * B

    return function


def _custom_jacobian(coefficients: Tensor, product: Tensor) -> Callable[[Tensor], Tensor]:
    """dV/dx_k = cos(x_k) A_k + (δ_{k0} x_{k−1} + δ_{k,k−1} x_0) B, stacked to (k, n, m)."""

    def jacobian(x: Tensor) -> Tensor:
        A, B = coefficients.to(x.dtype), product.to(x.dtype)
        unit = torch.eye(x.shape[0], dtype=x.dtype)
        weight = unit[0] * x[-1] + unit[-1] * x[0]
        return torch.cos(x)[:, None, None] * A + weight[:, None, None] * B

    return jacobian


def _linear_tanh_map(matrix: Tensor, offset: Tensor) -> Callable[[Tensor], Tensor]:
    """φ(x) = M tanh(x) + c: a smooth, nonlinear map into a child's raw parameter vector."""

    def param_map(x: Tensor) -> Tensor:
        return matrix.to(x.dtype) @ torch.tanh(x) + offset.to(x.dtype)

    return param_map


@st.composite
def _custom(draw, n: int, m: int) -> rf.Custom:
    k = draw(st.integers(1, 3))
    seed = draw(_seeds)
    coefficients = seeded_normal(seed, (k, n, m))
    product = seeded_normal(seed + 1, (n, m))
    transforms = [draw(st.sampled_from(_CUSTOM_TRANSFORMS)) for _ in range(k)]
    with_jacobian = draw(st.booleans())
    return rf.Custom(
        _custom_function(coefficients, product),
        k,
        transforms=transforms,
        jacobian=_custom_jacobian(coefficients, product) if with_jacobian else None,
    )


@st.composite
def _reparam(draw, n: int, m: int, max_size: int) -> rf.Reparam:
    child_kinds = tuple(k for k in BASE_KINDS if k not in ("Reparam", "Identity", "Fixed"))
    child = draw(base_structures(kinds=child_kinds, max_size=max_size, shape=(n, m)))
    k = draw(st.integers(1, 3))
    seed = draw(_seeds)
    width = len(param_names(child))
    # Scaled so the child's raw values stay within about ±1.5 (σ² = e^{2θ} stays moderate).
    matrix = seeded_normal(seed, (width, k), scale=0.6 / k)
    offset = seeded_normal(seed + 1, (width,), scale=0.3)
    return rf.Reparam(child, _linear_tanh_map(matrix, offset), k)


def _kinds_for(kinds: Sequence[str], n: int | None, m: int | None) -> list[str]:
    out = []
    for kind in kinds:
        if n is not None and m is not None and n != m and kind in SQUARE_KINDS:
            continue
        if n is not None and n < 2 and kind in _AT_LEAST_TWO:
            continue
        out.append(kind)
    return out


def _build_kind(kind: str, n: int, m: int, max_size: int) -> st.SearchStrategy:
    """A strategy for one kind at a fixed shape (n, m) (m ignored by square kinds)."""
    simple = {
        "Identity": lambda: rf.Identity(n),
        "Scalar": lambda: rf.Scalar(n),
        "EqualEntry": lambda: rf.EqualEntry(n, m),
        "Diagonal": lambda: rf.Diagonal(n),
        "Equicorrelation": lambda: rf.Equicorrelation(n),
        "CompoundSymmetric": lambda: rf.CompoundSymmetric(n),
        "AR1": lambda: rf.AR1(n),
        "Unstructured": lambda: rf.Unstructured(n),
        "LowerTriangular": lambda: rf.LowerTriangular(n, m),
    }
    if kind in simple:
        return st.builds(simple[kind])
    if kind == "Fixed":
        return _seeds.map(lambda seed: rf.Fixed(seeded_normal(seed, (n, m))))
    if kind == "Custom":
        return _custom(n, m)
    if kind == "Reparam":
        return _reparam(n, m, max_size)
    raise ValueError(f"unknown structure kind {kind!r}; expected one of {BASE_KINDS}")


@st.composite
def _one_base(draw, kinds: tuple[str, ...], max_size: int, shape, square: bool):
    if shape is not None:
        n, m = shape
        kind = draw(st.sampled_from(_kinds_for(kinds, n, m)))
    else:
        # The kind first, then sizes that suit it, so every kind is drawn equally often.
        kind = draw(st.sampled_from(kinds))
        smallest = 2 if kind in _AT_LEAST_TWO else 1
        n = draw(st.integers(smallest, max(smallest, max_size)))
        m = n if square or kind in SQUARE_KINDS else draw(st.integers(1, max_size))
    if kind in SQUARE_KINDS:
        m = n
    return draw(_build_kind(kind, n, m, max_size))


def base_structures(
    *,
    kinds: Sequence[str] | None = None,
    max_size: int = 4,
    shape: tuple[int, int] | None = None,
    square: bool = False,
) -> st.SearchStrategy:
    """Draw base structures with small sizes.

    Args:
        kinds: class names to draw from (default :data:`BASE_KINDS`, all twelve).
        max_size: largest n (and m) drawn.
        shape: draw only structures of this shape ``(n, m)`` (for combinators whose operands
            must agree); kinds that cannot have it are skipped.
        square: draw only square matrices.

    Custom draws a nonlinear function of 1–3 parameters with random transforms, with or without
    a closed-form Jacobian; Reparam wraps a drawn child in φ(x) = M tanh(x) + c.

    Example:
        >>> from hypothesis import find
        >>> from reml_fn.testing import base_structures
        >>> find(base_structures(kinds=("AR1", "Fixed"), shape=(3, 3)), lambda s: True)   # the simplest one
        AR1(n=3)
    """
    kinds = tuple(BASE_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in BASE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown structure kinds {unknown}; expected a non-empty subset of {BASE_KINDS}")
    if shape is not None:
        shape = tuple(shape)
        if len(shape) != 2 or not _kinds_for(kinds, *shape):
            raise ValueError(f"no structure among {kinds} has shape {shape}")
    return _one_base(kinds, max_size, shape, square)


def raw_params(
    s: Any,
    low: float = -1.5,
    high: float = 1.5,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[dict]:
    """A tree of raw 0-d tensors (``dtype``) for the free parameters of ``s``, each in ``[low, high]``.

    Example:
        >>> import reml_fn as rf
        >>> from hypothesis import find
        >>> from reml_fn.testing import raw_params
        >>> find(raw_params(rf.AR1(3)), lambda p: float(p["rho"]) > 0.5)
        {'sigma^2': tensor(0.), 'rho': tensor(...)}
    """
    names = param_names(s)
    values = st.floats(low, high, allow_nan=False, allow_infinity=False)
    return st.lists(values, min_size=len(names), max_size=len(names)).map(
        lambda xs: tree_from_names(names, [torch.tensor(x, dtype=dtype) for x in xs])
    )


def raw_params_batches(
    s: Any,
    min_batch: int = 1,
    max_batch: int = 4,
    low: float = -1.5,
    high: float = 1.5,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[dict]:
    """A parameter tree whose leaves have shape ``(B,)``: B parameter sets for ``vmap``.

    Example:
        >>> import reml_fn as rf
        >>> from hypothesis import find
        >>> from reml_fn.testing import raw_params_batches
        >>> find(raw_params_batches(rf.Scalar(2), min_batch=3), lambda b: True)
        {'sigma^2': tensor([0., 0., 0.])}
    """
    names = param_names(s)
    values = st.floats(low, high, allow_nan=False, allow_infinity=False)

    @st.composite
    def draw_batch(draw):
        size = draw(st.integers(min_batch, max_batch))
        rows = [draw(st.lists(values, min_size=size, max_size=size)) for _ in names]
        return tree_from_names(names, [torch.tensor(row, dtype=dtype) for row in rows])

    return draw_batch()


@st.composite
def fix_some(draw, s: Any, low: float = -1.5, high: float = 1.5) -> Any:
    """``s`` with a drawn subset of its parameters fixed at drawn raw values (possibly none, possibly all).

    Example:
        >>> import reml_fn as rf
        >>> from hypothesis import find
        >>> from reml_fn.testing import fix_some
        >>> s = find(fix_some(rf.Diagonal(3)), lambda s: len(rf.param_names(s)) == 1)
        >>> len(rf.param_names(s)), len(rf.all_param_names(s))   # two fixed, one free
        (1, 3)
    """
    names = all_param_names(s)
    if not names:
        return s
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    values = {name: draw(st.floats(low, high, allow_nan=False, allow_infinity=False)) for name in chosen}
    return rf.fix(s, values, scale="raw") if values else s


def structures_with_params(
    structures: st.SearchStrategy | None = None,
    *,
    low: float = -1.5,
    high: float = 1.5,
    **base_kwargs: Any,
) -> st.SearchStrategy[tuple[Any, dict]]:
    """``(structure, params)`` pairs: a drawn structure and a drawn raw parameter tree for it.

    Args:
        structures: the structure strategy (default ``base_structures(**base_kwargs)``).
        low, high: range of the raw parameter values.

    Example:
        >>> import reml_fn as rf
        >>> from hypothesis import find
        >>> from reml_fn.testing import structures_with_params
        >>> find(structures_with_params(kinds=("Scalar", "Diagonal")), lambda pair: pair[0].n == 2)
        (Scalar(n=2), {'sigma^2': tensor(0.)})
    """
    if structures is None:
        structures = base_structures(**base_kwargs)
    elif base_kwargs:
        raise TypeError("give either a structure strategy or base_structures keyword arguments, not both")
    return structures.flatmap(lambda s: raw_params(s, low, high).map(lambda params: (s, params)))
