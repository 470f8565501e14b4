"""One-operand combinators: Transpose (Aᵀ), Gram (XᵀX or XXᵀ) and Inverse (A⁻¹).

Jacobians from the child's closed form: dAᵀ; Xᵀ dX + dXᵀ X (or dX Xᵀ + X dXᵀ); −A⁻¹ dA A⁻¹.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from reml_fn.combinators.base import Combinator, named_children, shapes_text, tree_map
from reml_fn.structures.base import Structure, set_fields
from reml_fn.tree import static, structure

__all__ = ["Transpose", "Gram", "Inverse", "GRAM_TYPES"]

GRAM_TYPES = ("xtx", "xxt")


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class _Unary(Combinator):
    """One operand; subclasses implement ``_apply(A)`` and ``_differential(A, V, dA)``."""

    def _operand(self, params: Mapping) -> Tensor:
        (name,), (child,) = self.names, self.children
        return self._build_child(name, child, params)

    def _build(self, params):
        return self._apply(self._operand(params))

    def _jacobian(self, params):
        children = self._children_jacobians(params)
        if not children:
            return {}
        a = self._operand(params)
        value = self._apply(a)
        (name,) = self.names
        return {name: tree_map(lambda da: self._differential(a, value, da), children[name])}

    def _apply(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _differential(self, a: Tensor, value: Tensor, da: Tensor) -> Tensor:
        """dV for a change dA of the operand, with V = ``_apply(a)`` given."""
        raise NotImplementedError


@structure
class Transpose(_Unary):
    """The transpose of one operand: V = Aᵀ, A (m×n), V (n×m).

    Jacobian: ∂V/∂θ = (∂A/∂θ)ᵀ.

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.Transpose(Z=torch.tensor([[1.0, 2.0]]))().tolist()
        [[1.0], [2.0]]
        >>> rf.Transpose(rf.LowerTriangular(2, 2)).shape, rf.param_names(rf.Transpose(rf.Scalar(2)))
        ((2, 2), ['op_0/sigma^2'])
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Transpose", args, kwargs, minimum=1, maximum=1)
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        m, n = self.children[0].shape
        return (n, m)

    def _apply(self, a):
        return _transpose(a)

    def _differential(self, a, value, da):
        return _transpose(da)


@structure
class Gram(_Unary):
    """Gram matrix of one operand X (n×m): V = XᵀX (m×m) for ``gram_type="xtx"`` (the default, as
    in torch-openreml) or V = XXᵀ (n×n) for ``gram_type="xxt"``. ``Gram(LowerTriangular(n, n),
    gram_type="xxt")`` is a Cholesky-parameterised covariance, positive semi-definite for any θ.

    Jacobian: xtx: ∂V/∂θ = Xᵀ dX + dXᵀ X;  xxt: ∂V/∂θ = dX Xᵀ + X dXᵀ  (dX = ∂X/∂θ).

    Args:
        *args, **kwargs: the one operand (a structure or a tensor), named or positional.
        gram_type: keyword-only, ``"xtx"`` or ``"xxt"`` (checked before anything else).

    Example:
        >>> import torch, reml_fn as rf
        >>> X = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
        >>> rf.Gram(X=X)().tolist()
        [[2.0, 2.0], [2.0, 5.0]]
        >>> rf.Gram(X=X, gram_type="xxt")().tolist()
        [[5.0, 2.0, 1.0], [2.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()
    gram_type: str = static(default="xtx")

    def __init__(self, *args, gram_type: str = "xtx", **kwargs):
        if not isinstance(gram_type, str) or gram_type not in GRAM_TYPES:
            raise ValueError(f"gram_type must be 'xtx' or 'xxt', got {gram_type!r}")
        names, children = named_children("Gram", args, kwargs, minimum=1, maximum=1)
        set_fields(self, children=children, names=names, gram_type=gram_type)

    @property
    def shape(self):
        n, m = self.children[0].shape
        return (m, m) if self.gram_type == "xtx" else (n, n)

    def _apply(self, x):
        return _transpose(x) @ x if self.gram_type == "xtx" else x @ _transpose(x)

    def _differential(self, x, value, dx):
        if self.gram_type == "xtx":
            half = _transpose(x) @ dx
        else:
            half = dx @ _transpose(x)
        return half + _transpose(half)


@structure
class Inverse(_Unary):
    """The inverse of one square operand: V = A⁻¹.

    Jacobian: ∂V/∂θ = −A⁻¹ (∂A/∂θ) A⁻¹.

    Computed with ``torch.linalg.inv_ex``, which never raises on data, so a batch under ``vmap``
    survives a singular member: a singular (or numerically singular) A gives inf/NaN entries in V
    and its Jacobian instead of an exception. Invert only well-conditioned matrices (covariances
    that are positive definite over the parameter range); use a Cholesky-based solve downstream
    when only products A⁻¹ B are needed.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Inverse(precision=rf.Diagonal(2))
        >>> theta = torch.tensor([0.0, 0.5])      # A = diag(1, e)
        >>> s(theta).tolist()
        [[1.0, 0.0], [0.0, 0.36787944117144233]]
        >>> J, names = rf.jacobian_stack(s, theta)  # −A⁻¹ (2σ²_i e_i e_iᵀ) A⁻¹ = −2/σ²_i e_i e_iᵀ
        >>> names, J.diagonal(dim1=1, dim2=2).tolist()
        (['precision/sigma^2_0', 'precision/sigma^2_1'], [[-2.0, -0.0], [-0.0, -0.7357588823428847]])
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Inverse", args, kwargs, minimum=1, maximum=1)
        m, n = children[0].shape
        if m != n:
            raise ValueError(f"Inverse needs a square operand, got {shapes_text(names, children)}")
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return tuple(self.children[0].shape)

    def _apply(self, a):
        return torch.linalg.inv_ex(a).inverse

    def _differential(self, a, value, da):
        return -(value @ da @ value)
