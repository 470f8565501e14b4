"""What combinators share: named children, parameter routing, shape errors.

A combinator holds its children in the data field ``children`` (a tuple of structures: pytree
nodes) and their names in the static field ``names``, so ``vmap`` over a combinator works. The
parameter tree nests each child's tree under its name; a child without free parameters has no
entry (an empty dict is accepted too).

Children are given as keyword arguments (``Sum(time=AR1(4), noise=Scalar(4))``), positionally
(named ``op_0``, ``op_1``, … as in torch-openreml), or as one dict. A plain tensor child becomes a
:class:`~reml_fn.structures.Fixed` operand.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from reml_fn.params import ParamSpec
from reml_fn.params import map_leaves as tree_map  # noqa: F401  (the combinators' Jacobian helper)
from reml_fn.structures.base import Structure, first_leaf
from reml_fn.structures.fixed import Fixed
from reml_fn.tree import replace

__all__ = ["Combinator", "named_children", "child_params", "shapes_text"]


def named_children(
    kind: str,
    args: tuple,
    kwargs: dict,
    minimum: int,
    maximum: int | None = None,
) -> tuple[tuple[str, ...], tuple[Structure, ...]]:
    """Parse a combinator's children into ``(names, structures)``, with clear errors."""
    if args and kwargs:
        raise ValueError(f"{kind}: give children either as keyword arguments or positionally, not both")
    if len(args) == 1 and isinstance(args[0], Mapping):
        items = list(args[0].items())
    elif kwargs:
        items = list(kwargs.items())
    else:
        items = [(f"op_{i}", child) for i, child in enumerate(args)]
    count = len(items)
    if maximum is not None and minimum == maximum and count != minimum:
        raise ValueError(f"{kind} needs exactly {minimum} operand{'s' if minimum > 1 else ''}, got {count}")
    if count < minimum:
        raise ValueError(f"{kind} needs at least {minimum} operands, got {count}")
    if maximum is not None and count > maximum:
        raise ValueError(f"{kind} takes at most {maximum} operands, got {count}")
    names, children = [], []
    for name, child in items:
        if not isinstance(name, str):
            raise TypeError(f"{kind}: operand names must be str, got {type(name).__name__}")
        if not name:
            raise ValueError(f"{kind}: operand names must not be empty")
        if "/" in name:
            raise ValueError(f"{kind}: invalid operand name {name!r}: '/' is not allowed")
        if name in names:
            raise ValueError(f"{kind}: duplicate operand name {name!r}")
        if isinstance(child, Tensor):
            # Checked here, not left to Fixed, so the message names the operand.
            if child.dim() != 2:
                raise ValueError(f"{kind}: operand {name!r} must be a matrix, got shape {tuple(child.shape)}")
            child = Fixed(child)
        elif not isinstance(child, Structure):
            raise TypeError(
                f"{kind}: operand {name!r} must be a structure or a torch.Tensor, got {type(child).__name__}"
            )
        if len(child.shape) != 2:
            raise ValueError(f"{kind}: operand {name!r} must be a matrix, got shape {child.shape}")
        names.append(name)
        children.append(child)
    return tuple(names), tuple(children)


def child_params(params: Mapping, name: str) -> Mapping:
    """The sub-tree of a child (empty when the child has no free parameters)."""
    return params.get(name, {})


def shapes_text(names, children) -> str:
    return ", ".join(f"{n} {tuple(c.shape)}" for n, c in zip(names, children))


class Combinator(Structure):
    """Shared behaviour; subclasses declare ``children`` (data) and ``names`` (static)."""

    children: tuple[Structure, ...]
    names: tuple[str, ...]

    def param_specs_tree(self) -> dict:
        return {name: child.param_specs_tree() for name, child in zip(self.names, self.children)}

    def with_spec(self, segments: tuple[str, ...], spec: ParamSpec) -> Structure:
        if not segments or segments[0] not in self.names:
            raise ValueError(f"{type(self).__name__} has no operand {segments[0] if segments else ''!r}")
        i = self.names.index(segments[0])
        children = list(self.children)
        children[i] = children[i].with_spec(segments[1:], spec)
        return replace(self, children=tuple(children))

    def __getitem__(self, name: str) -> Structure:
        """The child called ``name``."""
        if name not in self.names:
            raise KeyError(f"{type(self).__name__} has no operand {name!r}; operands are {list(self.names)}")
        return self.children[self.names.index(name)]

    def items(self):
        """``(name, child)`` pairs in order."""
        return zip(self.names, self.children)

    def _build_child(self, name: str, child: Structure, params: Mapping) -> Tensor:
        """Build one child; a child without parameters of its own (Identity, Fixed, a tensor
        operand) follows the dtype and device of the parent's parameters, as if it had some."""
        value = child._build(child_params(params, name))
        reference = first_leaf(params)
        if reference is not None and (value.dtype != reference.dtype or value.device != reference.device):
            value = value.to(dtype=reference.dtype, device=reference.device)
        return value

    def _children_jacobians(self, params: Mapping) -> dict[str, dict]:
        """Each child's closed-form Jacobian tree, for children with free parameters."""
        return {name: child._jacobian(params[name]) for name, child in self.items() if name in params and params[name]}

    def __repr__(self) -> str:
        inner = ",\n".join("  " + f"{name}={child!r}".replace("\n", "\n  ") for name, child in self.items())
        extra = [f"{k}={getattr(self, k)!r}" for k in type(self)._static_fields if k != "names"]
        tail = (",\n  " + ", ".join(extra)) if extra else ""
        return f"{type(self).__name__}(\n{inner}{tail}\n)"
