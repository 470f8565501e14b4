"""Hypothesis strategies for random structure trees: combinators over base structures.

* :func:`structure_trees` draws a structure: base structures at the leaves (drawn by
  :func:`~reml_fn.testing.structures.base_structures`, Custom and Reparam included), combinators (Sum,
  BlockDiagonal, Kronecker, Hadamard, Product, Transpose, Gram, Propagate, Augment, Stack,
  Inverse) above them, at most ``max_depth`` combinator levels, every matrix at most
  ``max_size`` × ``max_size``. Shapes are planned top-down, so every drawn tree is valid: a
  Product's inner dimension, a Kronecker's factor shapes, a block layout's splits are drawn to fit.
* :func:`trees_with_params` draws ``(structure, params)`` with raw free parameters uniform-ish in
  ``[low, high]`` (default [-1.5, 1.5]: variances e^{2θ} within [0.05, 20], AR(1) |ρ| ≤ 0.64).

Inverse only ever inverts matrices that are positive definite for every θ in that range and
stay well conditioned (condition number ≲ 10³): Scalar, Diagonal, AR1, CompoundSymmetric,
Equicorrelation, their sums with a Scalar, block-diagonals of them.

Example:
    >>> from hypothesis import given, settings
    >>> from reml_fn.testing.trees import trees_with_params
    >>> @settings(max_examples=5, database=None, derandomize=True)
    ... @given(trees_with_params(max_depth=2))
    ... def check_shapes(case):
    ...     structure, params = case
    ...     assert tuple(structure.build(params).shape) == tuple(structure.shape)
    >>> check_shapes()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st

from reml_fn.combinators import (
    Augment,
    BlockDiagonal,
    Gram,
    Hadamard,
    Inverse,
    Kronecker,
    Product,
    Propagate,
    Stack,
    Sum,
    Transpose,
)
from reml_fn.structures import Fixed, Scalar, Structure
from reml_fn.testing.structures import BASE_KINDS, base_structures, fix_some, raw_params, raw_params_batches

__all__ = ["COMBINATOR_NAMES", "SPD_KINDS", "structure_trees", "trees_with_params"]

COMBINATOR_NAMES = (
    "Sum",
    "BlockDiagonal",
    "Kronecker",
    "Hadamard",
    "Product",
    "Transpose",
    "Gram",
    "Propagate",
    "Augment",
    "Stack",
    "Inverse",
)

#: Base structures positive definite for every raw θ in [-1.5, 1.5], with a moderate condition number.
SPD_KINDS = ("Scalar", "Diagonal", "AR1", "CompoundSymmetric", "Equicorrelation")


# ------------------------------------------------------------------------------------------------
# Leaves


def _leaf(draw, shape: tuple[int, int], kinds: Sequence[str], max_size: int, operand: bool) -> Any:
    """A base structure of ``shape``; as an ``operand``, a Fixed may come as its plain tensor
    (the combinator wraps it in Fixed again)."""
    leaf = draw(base_structures(kinds=kinds, max_size=max_size, shape=shape))
    if operand and isinstance(leaf, Fixed) and draw(st.booleans()):
        return leaf.matrix
    return leaf


def _spd(draw, n: int, depth: int) -> Structure:
    """A structure that is positive definite and well conditioned for raw θ in [-1.5, 1.5]:
    an SPD base, its sum with a Scalar, or a block-diagonal of such."""
    options = ["base"]
    if depth > 0:
        options.append("plus_scalar")
        if n >= 2:
            options.append("block_diagonal")
    choice = draw(st.sampled_from(options))
    if choice == "plus_scalar":
        return Sum(signal=_spd(draw, n, depth - 1), noise=Scalar(n))
    if choice == "block_diagonal":
        first = draw(st.integers(1, n - 1))
        return BlockDiagonal(_spd(draw, first, depth - 1), _spd(draw, n - first, depth - 1))
    return draw(base_structures(kinds=SPD_KINDS, shape=(n, n)))


# ------------------------------------------------------------------------------------------------
# Combinators


def _split_into(draw, total: int, parts: int) -> list[int]:
    """``total`` as a sum of exactly ``parts`` positive parts (needs total ≥ parts)."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _split(draw, total: int, max_parts: int = 3) -> list[int]:
    """``total`` as a sum of 2 … max_parts positive parts (needs total ≥ 2)."""
    return _split_into(draw, total, draw(st.integers(2, min(max_parts, total))))


def _children_kwargs(draw, children: Sequence[Any]) -> tuple[tuple, dict]:
    """Positional children (named op_0, op_1, …) or keyword children, drawn at random."""
    if draw(st.booleans()):
        return tuple(children), {}
    return (), {name: child for name, child in zip("abcdefgh", children)}


def _applicable(shape: tuple[int, int], allowed: Sequence[str]) -> list[str]:
    rows, cols = shape
    square = rows == cols
    checks = {
        "Sum": True,
        "Hadamard": True,
        "Product": True,
        "Transpose": True,
        "Kronecker": True,
        "Gram": square,
        "Propagate": square,
        "Inverse": square,
        "BlockDiagonal": rows >= 2 and cols >= 2,
        "Augment": cols >= 2,
        "Stack": rows >= 2,
    }
    return [name for name in allowed if checks[name]]


def _tree(draw, shape: tuple[int, int], depth: int, config: dict, operand: bool = False) -> Any:
    options = _applicable(shape, config["combinators"]) if depth > 0 else []
    # "leaf" first: hypothesis shrinks towards it, so failures shrink to small trees.
    kind = draw(st.sampled_from(["leaf", *options]))
    if kind == "leaf":
        return _leaf(draw, shape, config["kinds"], config["max_size"], operand)
    rows, cols = shape
    size = config["max_size"]

    def sub(child_shape: tuple[int, int]) -> Any:
        return _tree(draw, child_shape, depth - 1, config, operand=True)

    if kind in ("Sum", "Hadamard"):
        count = draw(st.integers(2, 3)) if kind == "Sum" else 2
        args, kwargs = _children_kwargs(draw, [sub(shape) for _ in range(count)])
        return (Sum if kind == "Sum" else Hadamard)(*args, **kwargs)
    if kind == "Product":
        inner = draw(st.integers(1, size))
        args, kwargs = _children_kwargs(draw, [sub((rows, inner)), sub((inner, cols))])
        return Product(*args, **kwargs)
    if kind == "Transpose":
        args, kwargs = _children_kwargs(draw, [sub((cols, rows))])
        return Transpose(*args, **kwargs)
    if kind == "Kronecker":
        row_a = draw(st.sampled_from([d for d in range(1, rows + 1) if rows % d == 0]))
        col_a = draw(st.sampled_from([d for d in range(1, cols + 1) if cols % d == 0]))
        args, kwargs = _children_kwargs(draw, [sub((row_a, col_a)), sub((rows // row_a, cols // col_a))])
        return Kronecker(*args, **kwargs)
    if kind == "Gram":
        gram_type = draw(st.sampled_from(["xtx", "xxt"]))
        other = draw(st.integers(1, size))
        child = sub((other, rows)) if gram_type == "xtx" else sub((rows, other))
        args, kwargs = _children_kwargs(draw, [child])
        return Gram(*args, gram_type=gram_type, **kwargs)
    if kind == "Propagate":
        inner = draw(st.integers(1, size))
        return Propagate(Z=sub((rows, inner)), G=sub((inner, inner)))
    if kind == "Inverse":
        args, kwargs = _children_kwargs(draw, [_spd(draw, rows, depth - 1)])
        return Inverse(*args, **kwargs)
    if kind == "BlockDiagonal":
        row_parts = _split(draw, rows, max_parts=min(rows, cols, 3))
        col_parts = _split_into(draw, cols, len(row_parts))
        args, kwargs = _children_kwargs(draw, [sub((r, c)) for r, c in zip(row_parts, col_parts)])
        return BlockDiagonal(*args, **kwargs)
    if kind == "Augment":
        args, kwargs = _children_kwargs(draw, [sub((rows, c)) for c in _split(draw, cols)])
        return Augment(*args, **kwargs)
    if kind == "Stack":
        args, kwargs = _children_kwargs(draw, [sub((r, cols)) for r in _split(draw, rows)])
        return Stack(*args, **kwargs)
    raise AssertionError(f"unknown combinator {kind!r}")  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Public strategies


def _check_options(max_depth: int, max_size: int, combinators, kinds) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be an int ≥ 0, got {max_depth!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be an int ≥ 1, got {max_size!r}")
    combinators = COMBINATOR_NAMES if combinators is None else tuple(combinators)
    unknown = [c for c in combinators if c not in COMBINATOR_NAMES]
    if unknown:
        raise ValueError(f"unknown combinators {unknown}; choose from {list(COMBINATOR_NAMES)}")
    kinds = BASE_KINDS if kinds is None else tuple(kinds)
    # Every leaf shape must be reachable: EqualEntry, LowerTriangular, Fixed, Custom and Reparam
    # take any shape.
    if not set(kinds) & {"EqualEntry", "LowerTriangular", "Fixed", "Custom", "Reparam"}:
        raise ValueError(f"kinds {kinds} must include a kind of any shape (EqualEntry, LowerTriangular, Fixed, …)")
    return combinators, kinds


def structure_trees(
    max_depth: int = 3,
    *,
    max_size: int = 4,
    shape: tuple[int, int] | None = None,
    square: bool = False,
    combinators: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    fixed_params: bool = False,
) -> st.SearchStrategy[Structure]:
    """A strategy drawing random structure trees (combinators over base structures).

    Args:
        max_depth: at most this many combinator levels (0: a base structure).
        max_size: every matrix in the tree (the root, every child, every inner dimension of a
            Product, Gram or Propagate) has at most this many rows and columns.
        shape: the root's shape (default: drawn, each side in 1 … max_size).
        square: draw a square root (ignored when ``shape`` is given).
        combinators: the combinator names to use (default :data:`COMBINATOR_NAMES`).
        kinds: base-structure kinds at the leaves (default all of
            :data:`~reml_fn.testing.structures.BASE_KINDS`); Inverse operands always come from
            :data:`SPD_KINDS`.
        fixed_params: fix a drawn subset of the parameters at drawn raw values in [-1.5, 1.5]
            (:func:`~reml_fn.testing.structures.fix_some`).

    Returns:
        A strategy of structures whose shapes fit by construction.
    """
    allowed, leaf_kinds = _check_options(max_depth, max_size, combinators, kinds)
    if shape is not None:
        shape = tuple(shape)
        if len(shape) != 2 or not all(isinstance(side, int) and 1 <= side <= max_size for side in shape):
            raise ValueError(f"shape must be (rows, cols) with sides in 1 … {max_size}, got {shape!r}")
    config = {"combinators": allowed, "kinds": leaf_kinds, "max_size": max_size}

    @st.composite
    def draw_tree(draw) -> Structure:
        if shape is not None:
            root_shape = shape
        else:
            rows = draw(st.integers(1, max_size))
            root_shape = (rows, rows) if square else (rows, draw(st.integers(1, max_size)))
        tree = _tree(draw, root_shape, max_depth, config)
        return draw(fix_some(tree)) if fixed_params else tree

    return draw_tree()


def trees_with_params(
    max_depth: int = 3,
    *,
    low: float = -1.5,
    high: float = 1.5,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    **tree_options: Any,
) -> st.SearchStrategy[tuple[Structure, dict]]:
    """A strategy drawing ``(structure, params)``: a :func:`structure_trees` tree and a tree of
    its raw free parameters, each drawn from ``[low, high]``.

    Args:
        max_depth, **tree_options: passed to :func:`structure_trees`.
        low, high: range of every raw parameter. Inverse operands are only guaranteed well
            conditioned within the default [-1.5, 1.5].
        batch_size: ``None`` gives 0-d leaves; an int B gives leaves of shape (B,): B
            independent parameter sets, for ``torch.func.vmap``.
        dtype: the parameters' dtype (default: torch's default dtype when drawn).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int ≥ 1, got {batch_size!r}")
    if not low <= high:
        raise ValueError(f"need low ≤ high, got low={low!r}, high={high!r}")
    trees = structure_trees(max_depth, **tree_options)

    @st.composite
    def draw_case(draw) -> tuple[Structure, dict]:
        structure = draw(trees)
        param_dtype = dtype or torch.get_default_dtype()
        if batch_size is None:
            params = draw(raw_params(structure, low, high, dtype=param_dtype))
        else:
            params = draw(raw_params_batches(structure, batch_size, batch_size, low, high, dtype=param_dtype))
        return structure, params

    return draw_case()
