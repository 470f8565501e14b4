"""Combinators: structures built from named child structures."""

from reml_fn.combinators.base import Combinator
from reml_fn.combinators.block import Augment, BlockDiagonal, Stack
from reml_fn.combinators.grouped import Grouped
from reml_fn.combinators.mixed import mixed_model
from reml_fn.combinators.products import Hadamard, Kronecker, Product
from reml_fn.combinators.propagate import Propagate
from reml_fn.combinators.sum import Sum
from reml_fn.combinators.unary import Gram, Inverse, Transpose

__all__ = [
    "Combinator",
    "Sum",
    "Propagate",
    "Grouped",
    "BlockDiagonal",
    "Kronecker",
    "Hadamard",
    "Product",
    "Transpose",
    "Gram",
    "Augment",
    "Stack",
    "Inverse",
    "mixed_model",
]
