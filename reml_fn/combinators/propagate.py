"""Propagate: V = Z G Zᵀ (torch-openreml's CovariancePropagation)."""

from __future__ import annotations

from collections.abc import Mapping

from reml_fn.combinators.base import Combinator, named_children, tree_map
from reml_fn.structures.base import Structure, set_fields
from reml_fn.tree import static, structure

__all__ = ["Propagate"]


@structure
class Propagate(Combinator):
    """Covariance of Z u for u ~ N(0, G): V = Z G Zᵀ, Z (n×q), G (q×q). Either may be a structure
    or a plain tensor. Usually the children are named ``Z=`` and ``G=`` (in any order); any two
    names work too (the first operand is Z), positionally (``op_0``, ``op_1``) or as one dict, as in
    torch-openreml's ``CovariancePropagation``.

    Jacobian: ∂V/∂θ_G = Z (∂G/∂θ) Zᵀ;  ∂V/∂θ_Z = (∂Z/∂θ) G Zᵀ + Z G (∂Z/∂θ)ᵀ.

    Example:
        >>> import torch, reml_fn as rf
        >>> Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> rf.Propagate(Z=Z, G=rf.Scalar(2))().tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        >>> rf.param_names(rf.Propagate(Z, rf.Scalar(2)))   # positional: op_0 is Z, op_1 is G
        ['op_1/sigma^2']
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        count = len(args[0]) if len(args) == 1 and isinstance(args[0], Mapping) else len(args) + len(kwargs)
        if count != 2:
            raise ValueError(f"Propagate needs two operands: Z= (n×q design) and G= (q×q covariance), got {count}")
        names, children = named_children("Propagate", args, kwargs, minimum=2, maximum=2)
        if set(names) == {"Z", "G"} and names[0] == "G":
            names, children = names[::-1], children[::-1]
        z, g = children
        if g.shape[0] != g.shape[1] or z.shape[1] != g.shape[0]:
            raise ValueError(f"Propagate needs Z (n×q) and G (q×q), got Z {tuple(z.shape)} and G {tuple(g.shape)}")
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        n = self.children[0].shape[0]
        return (n, n)

    def _build(self, params):
        (z_name, g_name), (z_struct, g_struct) = self.names, self.children
        Z = self._build_child(z_name, z_struct, params)
        G = self._build_child(g_name, g_struct, params)
        return Z @ G @ Z.transpose(-1, -2)

    def _jacobian(self, params):
        (z_name, g_name), (z_struct, g_struct) = self.names, self.children
        Z = self._build_child(z_name, z_struct, params)
        G = self._build_child(g_name, g_struct, params)
        children = self._children_jacobians(params)
        out = {}
        if z_name in children:
            out[z_name] = tree_map(
                lambda dZ: dZ @ G @ Z.transpose(-1, -2) + Z @ G @ dZ.transpose(-1, -2), children[z_name]
            )
        if g_name in children:
            out[g_name] = tree_map(lambda dG: Z @ dG @ Z.transpose(-1, -2), children[g_name])
        return out
