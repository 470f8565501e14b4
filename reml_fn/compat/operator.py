"""torch-openreml's operators (``Sum``, ``KroneckerProduct``, …) over the functional combinators.

An operator keeps its operands (compat matrices, shared with the caller, or tensors) and builds
the functional combinator from their current structures whenever they change, so
``op.set_param_specs("time/rho", fixed=True)`` and ``time.set_param_specs("rho", fixed=True)``
both reach ``op`` — torch-openreml shares its spec dicts between an operator and its operands in
the same way.

Operands are given as keyword arguments (names kept), positionally (named ``op_0``, ``op_1``, …)
or as one dict; each is a compat matrix, a functional structure or a tensor (a fixed operand).
Shapes are checked at construction by the functional combinator (torch-openreml checked nothing
and broadcast silently).

Example:
    >>> import torch
    >>> from reml_fn.compat import AR1Matrix, KroneckerProduct, ScalarMatrix
    >>> op = KroneckerProduct(time=AR1Matrix(2), subject=ScalarMatrix(3))
    >>> op.free_param_names
    ['time/sigma^2', 'time/rho', 'subject/sigma^2']
    >>> V = op(torch.tensor([1.0, 1.0, 1.0]))
    >>> round(float(V[0, 0]), 10), round(float(V[0, 3]), 10)
    (54.5981500331, 25.230741885)
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import Tensor

from reml_fn import combinators
from reml_fn.combinators.base import child_params
from reml_fn.compat.matrix import Matrix
from reml_fn.params import unflatten_params
from reml_fn.structures import Structure

__all__ = [
    "Operator",
    "Sum",
    "BlockDiagonal",
    "CovariancePropagation",
    "KroneckerProduct",
    "HadamardProduct",
    "Product",
    "Transpose",
    "Gram",
    "Augment",
    "Stack",
    "Inverse",
]

_COUNT_ERRORS = {
    (1, 1): "One operand is required",
    (2, 2): "Two operands are required",
    (2, None): "At least two operands are required",
}


def _parse_operands(args: tuple, kwargs: dict) -> dict[str, Any]:
    """torch-openreml's operand forms and checks (same exceptions and messages)."""
    if args and kwargs:
        raise ValueError(
            "Operands must be provided either as keyword arguments or as positional arguments, but not both!"
        )
    if len(args) == 1 and isinstance(args[0], dict):
        operands = dict(args[0])
    elif kwargs:
        operands = dict(kwargs)
    else:
        operands = {f"op_{i}": operand for i, operand in enumerate(args)}
    for name, operand in operands.items():
        if not isinstance(name, str):
            raise TypeError(f"Operand name must be a string, got {type(name).__name__}!")
        if not name:
            raise ValueError("Operand name must not be empty!")
        if "/" in name:
            raise ValueError(f"Invalid operand name '{name}': '/' is not allowed!")
        if not isinstance(operand, (Matrix, Structure, Tensor)):
            raise TypeError(f"Operand '{name}' must be a Matrix or torch.Tensor, got {type(operand).__name__}!")
    return operands


class Operator(Matrix):
    """torch-openreml's ``Operator``: a functional combinator over named operands.

    Subclasses set ``functional`` (the combinator class) and ``arity`` (minimum, maximum or
    None operands).
    """

    functional: type
    arity: tuple[int, int | None] = (2, None)

    def __init__(self, *args: Any, **kwargs: Any):
        operands = _parse_operands(args, kwargs)
        low, high = self.arity
        if len(operands) < low or (high is not None and len(operands) > high):
            raise ValueError(_COUNT_ERRORS[self.arity])
        self._operands = {
            name: Matrix(operand) if isinstance(operand, Structure) else operand for name, operand in operands.items()
        }
        self._composed: Structure | None = None
        self._composed_from: tuple = ()
        self.structure  # noqa: B018 - build now, so shape errors surface at construction

    def _options(self) -> dict[str, Any]:
        """Extra keyword arguments of the functional combinator."""
        return {}

    @property
    def structure(self) -> Structure:
        """The functional combinator over the operands' current structures."""
        children = {
            name: operand.structure if isinstance(operand, Matrix) else operand
            for name, operand in self._operands.items()
        }
        parts = tuple(children.values())
        if self._composed is None or any(a is not b for a, b in zip(parts, self._composed_from)):
            self._composed = self.functional(children, **self._options())
            self._composed_from = parts
        return self._composed

    @property
    def operands(self) -> MappingProxyType:
        """Mapping from operand names to operand matrices or tensors (read-only)."""
        return MappingProxyType(self._operands)

    def _set_spec(self, path: str, changes: dict[str, Any]) -> None:
        name, rest = path.split("/", 1)
        self._operands[name]._set_spec(rest, changes)

    def build_operands(self, free_params: Any = None) -> list[Tensor]:
        """Each operand evaluated at ``free_params`` (tensors cast to its dtype/device)."""

        def evaluate(s, v):
            tree = unflatten_params(s, v)
            return [child._build(child_params(tree, name)) for name, child in s.items()]

        return self._run(self._free_vector(free_params), evaluate)

    def operands_grad(self, free_params: Any = None) -> tuple[list[Tensor | None], list[list[str]]]:
        """``(grads, names)``: each operand's own Jacobian (its ``grad``, following its
        ``grad_mode``) and its namespaced free names; ``None`` and ``[]`` for tensors and
        operands without free parameters."""
        vector = self._free_vector(free_params)
        grads, names, start = [], [], 0
        for name, operand in self._operands.items():
            if not isinstance(operand, Matrix) or operand.num_free_params == 0:
                grads.append(None)
                names.append([])
                continue
            stop = start + operand.num_free_params
            grad, grad_names = operand.grad(vector[start:stop])
            start = stop
            grads.append(grad)
            names.append([f"{name}/{n}" for n in grad_names])
        return grads, names

    @property
    def repr_dict(self) -> dict[str, Any]:
        return {"operands": dict(self._operands)}

    def _repr_indented(self, level: int) -> str:
        pad, inner = "  " * (level + 1), "  " * (level + 2)
        lines = []
        for name, operand in self._operands.items():
            shown = operand._repr_indented(level + 2) if isinstance(operand, Matrix) else repr(operand.shape)
            lines.append(f"{inner}{name!r}: {shown}")
        extra = "".join(f",\n{pad}{key}={value!r}" for key, value in self._options().items())
        body = ",\n".join(lines)
        return f"{type(self).__name__}(\n{pad}operands={{\n{body}\n{pad}}}{extra}\n{'  ' * level})"


class Sum(Operator):
    """V = Σ_i A_i (two or more operands of one shape): :class:`reml_fn.Sum`.

    Example:
        >>> import torch
        >>> from reml_fn.compat import AR1Matrix, ScalarMatrix
        >>> op = Sum(time=AR1Matrix(4), noise=ScalarMatrix(4))
        >>> op(torch.tensor([0.5, 1.0, 1.0]))[0]
        tensor([10.1073,  1.2562,  0.5805,  0.2683])
    """

    functional = combinators.Sum
    arity = (2, None)


class BlockDiagonal(Operator):
    """V = blockdiag(A_0, A_1, …): :class:`reml_fn.BlockDiagonal`."""

    functional = combinators.BlockDiagonal
    arity = (2, None)


class CovariancePropagation(Operator):
    """V = Z G Zᵀ, operands (Z, G) in this order: :class:`reml_fn.Propagate`."""

    functional = combinators.Propagate
    arity = (2, 2)


class KroneckerProduct(Operator):
    """V = A ⊗ B: :class:`reml_fn.Kronecker`."""

    functional = combinators.Kronecker
    arity = (2, 2)


class HadamardProduct(Operator):
    """V = A ⊙ B (same shapes; torch-openreml broadcast): :class:`reml_fn.Hadamard`."""

    functional = combinators.Hadamard
    arity = (2, 2)


class Product(Operator):
    """V = A B: :class:`reml_fn.Product`."""

    functional = combinators.Product
    arity = (2, 2)


class Transpose(Operator):
    """V = Aᵀ: :class:`reml_fn.Transpose`."""

    functional = combinators.Transpose
    arity = (1, 1)


class Augment(Operator):
    """V = [A_0 | A_1 | …] (columns side by side): :class:`reml_fn.Augment`."""

    functional = combinators.Augment
    arity = (2, None)


class Stack(Operator):
    """V = [A_0 ; A_1 ; …] (rows one above the other): :class:`reml_fn.Stack`."""

    functional = combinators.Stack
    arity = (2, None)


class Inverse(Operator):
    """V = A⁻¹: :class:`reml_fn.Inverse`."""

    functional = combinators.Inverse
    arity = (1, 1)


class Gram(Operator):
    """V = XᵀX (``gram_type="xtx"``) or XXᵀ (``"xxt"``): :class:`reml_fn.Gram`."""

    functional = combinators.Gram
    arity = (1, 1)

    def __init__(self, *args: Any, gram_type: str = "xtx", **kwargs: Any):
        if gram_type not in ("xtx", "xxt"):
            raise ValueError(f"gram_type must be 'xtx' or 'xxt', got '{gram_type}'")
        self._gram_type = gram_type
        super().__init__(*args, **kwargs)

    @property
    def gram_type(self) -> str:
        """``"xtx"`` or ``"xxt"``."""
        return self._gram_type

    def _options(self) -> dict[str, Any]:
        return {"gram_type": self._gram_type}
