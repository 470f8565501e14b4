"""Combinators: structures built from named child structures."""

from reml_fn.combinators.base import Combinator
from reml_fn.combinators.propagate import Propagate
from reml_fn.combinators.sum import Sum

__all__ = ["Combinator", "Sum", "Propagate"]
