"""Block layouts: BlockDiagonal, Augment (side by side) and Stack (one above the other).

Each operand occupies a fixed block of V, so each Jacobian is the child's own placed in that block
with zeros elsewhere. Blocks are placed by zero padding (``torch.nn.functional.pad``), which is
pure and batches under ``vmap`` (no writes into a preallocated buffer).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from reml_fn.combinators.base import Combinator, named_children, shapes_text, tree_map
from reml_fn.structures.base import Structure, set_fields
from reml_fn.tree import static, structure

__all__ = ["BlockDiagonal", "Augment", "Stack"]


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    """``[(before, after), …]``: how much of the total lies before and after each size."""
    total, start, out = sum(sizes), 0, []
    for size in sizes:
        out.append((start, total - start - size))
        start += size
    return out


class _Blocks(Combinator):
    """Operands laid out in blocks; subclasses give each child's ``(row, column)`` padding."""

    def _padding(self) -> list[tuple[int, int, int, int]]:
        """Per child, ``(left, right, top, bottom)`` zero padding that places it in V."""
        raise NotImplementedError

    def _place(self, index: int, block: Tensor) -> Tensor:
        return F.pad(block, self._padding()[index])

    def _build(self, params: Mapping) -> Tensor:
        blocks = [self._build_child(name, child, params) for name, child in self.items()]
        return self._assemble(blocks)

    def _assemble(self, blocks: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _jacobian(self, params: Mapping) -> dict:
        children = self._children_jacobians(params)
        index = {name: i for i, name in enumerate(self.names)}
        return {name: tree_map(lambda d, i=index[name]: self._place(i, d), tree) for name, tree in children.items()}


@structure
class BlockDiagonal(_Blocks):
    """Block-diagonal matrix of two or more operands (non-square blocks allowed):
    V = blockdiag(A_0, A_1, …), shape (Σ rows, Σ columns); A_i occupies rows r_i : r_i + m_i and
    columns c_i : c_i + n_i, zeros elsewhere.

    Jacobian: ∂V/∂θ_i is ∂A_i/∂θ in A_i's block, zeros elsewhere.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.BlockDiagonal(g1=rf.Scalar(1), g2=torch.tensor([[2.0, 3.0]]))
        >>> s().tolist()
        [[1.0, 0.0, 0.0], [0.0, 2.0, 3.0]]
        >>> rf.jacobian_stack(s)[0].tolist()
        [[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("BlockDiagonal", args, kwargs, minimum=2)
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return (sum(c.shape[0] for c in self.children), sum(c.shape[1] for c in self.children))

    def _padding(self):
        rows = _offsets([c.shape[0] for c in self.children])
        cols = _offsets([c.shape[1] for c in self.children])
        return [(left, right, top, bottom) for (top, bottom), (left, right) in zip(rows, cols)]

    def _assemble(self, blocks):
        # Row bands [0 … A_i … 0] concatenated: no full-size zero matrix per block.
        bands = [F.pad(block, pad[:2]) for block, pad in zip(blocks, self._padding())]
        return torch.cat(bands, dim=-2)


@structure
class Augment(_Blocks):
    """Operands side by side (column-wise concatenation): V = [A_0 | A_1 | …]. All operands have
    the same number of rows m; V is (m, Σ columns).

    Jacobian: ∂V/∂θ_i is ∂A_i/∂θ in A_i's column block, zeros elsewhere.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Augment(g1=torch.tensor([[1.0], [0.0]]), g2=rf.EqualEntry(2, 2))
        >>> s().tolist()
        [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Augment", args, kwargs, minimum=2)
        if len({c.shape[0] for c in children}) > 1:
            raise ValueError(f"Augment needs operands with the same number of rows, got {shapes_text(names, children)}")
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return (self.children[0].shape[0], sum(c.shape[1] for c in self.children))

    def _padding(self):
        cols = _offsets([c.shape[1] for c in self.children])
        return [(left, right, 0, 0) for left, right in cols]

    def _assemble(self, blocks):
        return torch.cat(blocks, dim=-1)


@structure
class Stack(_Blocks):
    """Operands one above the other (row-wise concatenation): V = [A_0; A_1; …]. All operands
    have the same number of columns n; V is (Σ rows, n).

    Jacobian: ∂V/∂θ_i is ∂A_i/∂θ in A_i's row block, zeros elsewhere.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Stack(top=rf.Scalar(2), bottom=torch.tensor([[3.0, 4.0]]))
        >>> s().tolist()
        [[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Stack", args, kwargs, minimum=2)
        if len({c.shape[1] for c in children}) > 1:
            raise ValueError(
                f"Stack needs operands with the same number of columns, got {shapes_text(names, children)}"
            )
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return (sum(c.shape[0] for c in self.children), self.children[0].shape[1])

    def _padding(self):
        rows = _offsets([c.shape[0] for c in self.children])
        return [(0, 0, top, bottom) for top, bottom in rows]

    def _assemble(self, blocks):
        return torch.cat(blocks, dim=-2)
