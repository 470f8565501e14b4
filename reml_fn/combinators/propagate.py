"""Propagate: V = Z G Zᵀ (torch-openreml's CovariancePropagation)."""

from __future__ import annotations

from reml_fn.combinators.base import Combinator, child_params, named_children, tree_map
from reml_fn.structures.base import Structure, set_fields
from reml_fn.tree import static, structure

__all__ = ["Propagate"]


@structure
class Propagate(Combinator):
    """Covariance of Z u for u ~ N(0, G): V = Z G Zᵀ, Z (n×q), G (q×q). Children are named
    ``Z`` and ``G``; either may be a structure or a plain tensor.

    Jacobian: ∂V/∂θ_G = Z (∂G/∂θ) Zᵀ;  ∂V/∂θ_Z = (∂Z/∂θ) G Zᵀ + Z G (∂Z/∂θ)ᵀ.

    Example:
        >>> import torch, reml_fn as rf
        >>> Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> rf.Propagate(Z=Z, G=rf.Scalar(2))().tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, Z=None, G=None):
        if Z is None or G is None:
            raise ValueError("Propagate needs two operands: Z= (n×q design) and G= (q×q covariance)")
        names, children = named_children("Propagate", (), {"Z": Z, "G": G}, minimum=2, maximum=2)
        z, g = children
        if g.shape[0] != g.shape[1] or z.shape[1] != g.shape[0]:
            raise ValueError(f"Propagate needs Z (n×q) and G (q×q), got Z {tuple(z.shape)} and G {tuple(g.shape)}")
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        n = self.children[0].shape[0]
        return (n, n)

    def _build(self, params):
        z_struct, g_struct = self.children
        Z = z_struct._build(child_params(params, "Z"))
        G = g_struct._build(child_params(params, "G"))
        return Z @ G @ Z.transpose(-1, -2)

    def _jacobian(self, params):
        z_struct, g_struct = self.children
        Z = z_struct._build(child_params(params, "Z"))
        G = g_struct._build(child_params(params, "G"))
        children = self._children_jacobians(params)
        out = {}
        if "Z" in children:
            out["Z"] = tree_map(lambda dZ: dZ @ G @ Z.transpose(-1, -2) + Z @ G @ dZ.transpose(-1, -2), children["Z"])
        if "G" in children:
            out["G"] = tree_map(lambda dG: Z @ dG @ Z.transpose(-1, -2), children["G"])
        return out
