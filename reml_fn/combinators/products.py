"""Products of two operands: Kronecker (A ⊗ B), Hadamard (A ⊙ B) and the matrix product (A B).

All three are bilinear, V = f(A, B), so the product rule gives each Jacobian from the children's
closed forms: ∂V/∂θ = f(∂A/∂θ, B) for θ a parameter of A, and f(A, ∂B/∂θ) for θ of B.

:func:`kron` is the Kronecker product used here and elsewhere in reml_fn: ``torch.kron`` (torch
2.13) raises "view size is not compatible with input tensor's size and stride" for non-contiguous
operands (the output of ``torch.linalg.inv`` or of a transpose), also under ``jacfwd``/``jacrev``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from reml_fn.combinators.base import Combinator, named_children, shapes_text, tree_map
from reml_fn.structures.base import Structure, set_fields
from reml_fn.tree import static, structure

__all__ = ["kron", "Kronecker", "Hadamard", "Product"]


def kron(a: Tensor, b: Tensor) -> Tensor:
    """Kronecker product over the last two dimensions: (A ⊗ B)[i·mb + k, j·nb + l] = A_ij B_kl.

    Leading (batch) dimensions broadcast. Works for non-contiguous operands and under
    ``vmap``/``jacfwd``/``jacrev``, unlike ``torch.kron`` in torch 2.13.

    Args:
        a: (..., ma, na).
        b: (..., mb, nb).

    Returns:
        (..., ma·mb, na·nb).

    Example:
        >>> import torch
        >>> from reml_fn.combinators.products import kron
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).T   # non-contiguous
        >>> kron(a, torch.eye(2)).tolist()
        [[1.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 3.0], [2.0, 0.0, 4.0, 0.0], [0.0, 2.0, 0.0, 4.0]]
    """
    ma, na = a.shape[-2:]
    mb, nb = b.shape[-2:]
    # (..., ma, 1, na, 1) * (..., 1, mb, 1, nb) -> (..., ma, mb, na, nb), a fresh contiguous tensor,
    # so the reshape never needs a view of the (possibly non-contiguous) operands.
    blocks = a[..., :, None, :, None] * b[..., None, :, None, :]
    return blocks.reshape(*blocks.shape[:-4], ma * mb, na * nb)


class _Bilinear(Combinator):
    """Two operands A, B combined by a bilinear ``_combine(A, B)``; product-rule Jacobian."""

    @staticmethod
    def _combine(a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def _operands(self, params: Mapping) -> list[Tensor]:
        return [self._build_child(name, child, params) for name, child in self.items()]

    def _build(self, params):
        a, b = self._operands(params)
        return self._combine(a, b)

    def _jacobian(self, params):
        a, b = self._operands(params)
        name_a, name_b = self.names
        children = self._children_jacobians(params)
        out = {}
        if name_a in children:
            out[name_a] = tree_map(lambda da: self._combine(da, b), children[name_a])
        if name_b in children:
            out[name_b] = tree_map(lambda db: self._combine(a, db), children[name_b])
        return out


@structure
class Kronecker(_Bilinear):
    """Kronecker product of exactly two operands of any shapes: V = A ⊗ B, shape (ma·mb, na·nb),
    V[i·mb + k, j·nb + l] = A_ij B_kl.

    Jacobian: ∂V/∂θ_A = (∂A/∂θ) ⊗ B;  ∂V/∂θ_B = A ⊗ (∂B/∂θ).

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Kronecker(time=rf.AR1(2), subject=rf.Scalar(3))
        >>> s.shape, rf.param_names(s)
        ((6, 6), ['time/sigma^2', 'time/rho', 'subject/sigma^2'])
        >>> rf.Kronecker(a=torch.tensor([[1.0, 2.0]]), b=torch.eye(2))().tolist()
        [[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 2.0]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Kronecker", args, kwargs, minimum=2, maximum=2)
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        (ma, na), (mb, nb) = (c.shape for c in self.children)
        return (ma * mb, na * nb)

    _combine = staticmethod(kron)


@structure
class Hadamard(_Bilinear):
    """Element-wise (Hadamard) product of two operands of one shape: V = A ⊙ B, V_ij = A_ij B_ij.
    Shapes must be equal (no broadcasting).

    Jacobian: ∂V/∂θ_A = (∂A/∂θ) ⊙ B;  ∂V/∂θ_B = A ⊙ (∂B/∂θ).

    Example:
        >>> import torch, reml_fn as rf
        >>> K = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
        >>> s = rf.Hadamard(kinship=K, genetic=rf.EqualEntry(2))
        >>> s().tolist()                     # σ² = 1 at the raw default
        [[1.0, 0.5], [0.5, 1.0]]
        >>> rf.jacobian_stack(s)[0].tolist()  # K ⊙ dσ²/dθ J = 2 K
        [[[2.0, 1.0], [1.0, 2.0]]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Hadamard", args, kwargs, minimum=2, maximum=2)
        if tuple(children[0].shape) != tuple(children[1].shape):
            raise ValueError(f"Hadamard needs two operands of one shape, got {shapes_text(names, children)}")
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return tuple(self.children[0].shape)

    @staticmethod
    def _combine(a, b):
        return a * b


@structure
class Product(_Bilinear):
    """Matrix product of two operands: V = A B, A (m×k), B (k×n), V (m×n).

    Jacobian: ∂V/∂θ_A = (∂A/∂θ) B;  ∂V/∂θ_B = A (∂B/∂θ).

    Example:
        >>> import torch, reml_fn as rf
        >>> Z = torch.tensor([[1.0], [2.0]])
        >>> rf.Product(Z=Z, u=rf.EqualEntry(1, 3))().tolist()
        [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """

    children: tuple[Structure, ...]
    names: tuple[str, ...] = static()

    def __init__(self, *args, **kwargs):
        names, children = named_children("Product", args, kwargs, minimum=2, maximum=2)
        if children[0].shape[1] != children[1].shape[0]:
            raise ValueError(
                f"Product needs A (m×k) and B (k×n) with matching inner dimension k, got {shapes_text(names, children)}"
            )
        set_fields(self, children=children, names=names)

    @property
    def shape(self):
        return (self.children[0].shape[0], self.children[1].shape[1])

    @staticmethod
    def _combine(a, b):
        return a @ b
