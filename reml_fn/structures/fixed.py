"""Fixed: a constant matrix (a design matrix Z, a kinship matrix K, …) with no parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from reml_fn.params import ParamSpec
from reml_fn.structures.base import Parametric, set_fields
from reml_fn.tree import static, structure

__all__ = ["Fixed"]


@structure
class Fixed(Parametric):
    """A constant matrix: V = M. The tensor is a pytree *leaf*, so ``vmap`` can batch over it
    (a different Z per dataset) and it moves with ``.to``-style tree maps.

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.Fixed(torch.ones(2, 3)).shape
        (2, 3)
    """

    matrix: Tensor
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, matrix: Tensor):
        if not isinstance(matrix, Tensor):
            raise TypeError(f"Fixed needs a 2-D torch.Tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2:
            raise ValueError(f"Fixed needs a 2-D tensor, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            matrix = matrix.to(torch.get_default_dtype())
        set_fields(self, matrix=matrix, specs=())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def _build_natural(self, natural):
        return self.matrix

    def _natural_jacobian(self, natural, names):
        return {}
