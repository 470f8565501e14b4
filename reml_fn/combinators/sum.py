"""Sum: V = Σ_i A_i over two or more named children of identical shape."""

from __future__ import annotations

from reml_fn.combinators.base import Combinator, named_children, shapes_text
from reml_fn.structures.base import Structure, set_fields
from reml_fn.tree import static, structure

__all__ = ["Sum"]


@structure
class Sum(Combinator):
    """Sum of two or more covariance matrices of the same shape: V = Σ_i A_i.

    The Jacobian is each child's own: ∂V/∂θ = ∂A_i/∂θ for θ a parameter of child i.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(time=rf.AR1(4), noise=rf.Scalar(4))
        >>> V = s(torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
        >>> round(float(V[0, 0]), 4), round(float(V[0, 1]), 4)
        (10.1073, 1.2562)
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Sum", args, kwargs, minimum=2)
        shapes = {tuple(c.shape) for c in children}
        if len(shapes) > 1:
            raise ValueError(f"Sum needs operands of one shape, got {shapes_text(names, children)}")
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return tuple(self.children[0].shape)

    def _build(self, params):
        total = None
        for name, child in self.items():
            value = self._build_child(name, child, params)
            total = value if total is None else total + value
        return total

    def _jacobian(self, params):
        return self._children_jacobians(params)
