"""Custom (a user's build function) and Reparam (new parameters mapped into a child's).

``Custom(function, k)``: V = f(x) for a user function of the natural parameter vector x (k,)
(torch-openreml's SimpleMatrix). Its Jacobian is the user's ``jacobian(x) → (k, *shape)`` when
given, else forward-mode autodiff; the transform chain rule is applied either way.

``Reparam(child, param_map, k)``: V(θ) = child(φ(θ)), where φ maps the k new parameters to the
child's raw free parameter vector (torch-openreml's Adapter). By the chain rule
dV/dθ_j = Σ_m (∂φ_m/∂θ_j) · dV_child/dφ_m, with ∂φ/∂θ from ``jacfwd`` and dV_child/dφ the child's
closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from reml_fn.params import ParamSpec, get_path, param_names, unflatten_params
from reml_fn.structures.base import Parametric, Structure, set_fields
from reml_fn.transforms import Identity, Transform
from reml_fn.tree import static, structure

__all__ = ["Custom", "Reparam"]


def _make_specs(num_params, names, defaults, transforms) -> tuple[ParamSpec, ...]:
    if names is None:
        if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
            raise ValueError(f"num_params must be a non-negative int, got {num_params!r}")
        names = [f"theta_{i}" for i in range(num_params)]
    else:
        names = list(names)
        if num_params is not None and num_params != len(names):
            raise ValueError(f"num_params={num_params} but {len(names)} names were given")
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names must be unique, got {names}")
    k = len(names)
    if isinstance(defaults, (int, float)) and not isinstance(defaults, bool):
        defaults = [float(defaults)] * k
    if not isinstance(defaults, (list, tuple)):
        raise TypeError(f"defaults must be a number or a list of {k} numbers, got {type(defaults).__name__}")
    defaults = list(defaults)
    if len(defaults) != k:
        raise ValueError(f"expected {k} defaults, got {len(defaults)}")
    if transforms is None or isinstance(transforms, Transform):
        transforms = [transforms or Identity()] * k
    if not isinstance(transforms, (list, tuple)):
        raise TypeError(f"transforms must be a Transform or a list of {k}, got {type(transforms).__name__}")
    transforms = list(transforms)
    if len(transforms) != k:
        raise ValueError(f"expected {k} transforms, got {len(transforms)}")
    return tuple(ParamSpec(n, d, t) for n, d, t in zip(names, defaults, transforms))


def _natural_vector(self, natural: dict[str, Tensor]) -> Tensor:
    if not self.specs:
        return torch.zeros(0)
    return torch.stack([natural[s.name] for s in self.specs])


@structure
class Custom(Parametric):
    """V = function(x), x the natural parameter vector (names ``theta_i`` unless given).

    Args:
        function: pure function of a 1-D tensor x (k,) returning a 2-D tensor; must work under
            ``torch.func`` transforms (no ``.item()``, no Python branches on values).
        num_params: k (or give ``names``).
        names: parameter names (default ``theta_0 … theta_{k-1}``).
        defaults: raw default(s) (default 0).
        transforms: a Transform or one per parameter (default Identity).
        jacobian: optional ``jacobian(x) → (k, *shape)`` tensor, dV/dx in closed form.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Custom(lambda x: torch.exp(x[0]) * torch.eye(2) + x[1], 2)
        >>> s(torch.tensor([0.0, 1.0])).tolist()
        [[2.0, 1.0], [1.0, 2.0]]
    """

    function: Callable = static()
    jacobian_function: Callable | None = static()
    out_shape: tuple[int, ...] = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(
        self,
        function: Callable[[Tensor], Tensor],
        num_params: int | None = None,
        *,
        names: Sequence[str] | None = None,
        defaults: float | Sequence[float] = 0.0,
        transforms: Transform | Sequence[Transform] | None = None,
        jacobian: Callable[[Tensor], Tensor] | None = None,
    ):
        if not callable(function):
            raise TypeError(f"Custom needs a callable build function, got {type(function).__name__}")
        if jacobian is not None and not callable(jacobian):
            raise TypeError("jacobian must be callable or None")
        specs = _make_specs(num_params, names, defaults, transforms)
        x0 = torch.stack([s.transform.forward(torch.tensor(s.default)) for s in specs]) if specs else torch.zeros(0)
        value = function(x0)
        if not isinstance(value, Tensor) or value.dim() != 2:
            raise ValueError("Custom's function must return a 2-D tensor at the default parameters")
        set_fields(
            self,
            function=function,
            jacobian_function=jacobian,
            out_shape=tuple(value.shape),
            specs=specs,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_shape

    def _build_natural(self, natural):
        return self.function(_natural_vector(self, natural))

    def _natural_jacobian(self, natural, names):
        x = _natural_vector(self, natural)
        if self.jacobian_function is not None:
            stacked = self.jacobian_function(x)
            expected = (len(self.specs), *self.out_shape)
            if not isinstance(stacked, Tensor):
                raise TypeError(
                    f"Custom jacobian must return a tensor of shape {expected}, got {type(stacked).__name__}"
                )
            if tuple(stacked.shape) != expected:
                raise ValueError(f"Custom jacobian must return shape {expected}, got {tuple(stacked.shape)}")
        else:
            stacked = torch.func.jacfwd(self.function)(x).movedim(-1, 0)
        index = {s.name: i for i, s in enumerate(self.specs)}
        return {name: stacked[index[name]] for name in names}


@structure
class Reparam(Parametric):
    """V(θ) = child(param_map(θ)): new raw parameters mapped into the child's raw free vector.

    Args:
        child: any structure.
        param_map: pure function of x (k,) returning the child's raw free vector (in
            ``param_names(child)`` order).
        num_params / names / defaults: the new parameters (Identity transforms).

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Reparam(rf.Diagonal(2), lambda x: torch.stack([torch.sigmoid(x[0]), 1 - torch.sigmoid(x[0])]), 1)
        >>> round(float(s(torch.tensor([0.0]))[0, 0]), 6)
        2.718282
    """

    child: Structure
    param_map: Callable = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(
        self,
        child: Structure,
        param_map: Callable[[Tensor], Tensor],
        num_params: int | None = None,
        *,
        names: Sequence[str] | None = None,
        defaults: float | Sequence[float] = 0.0,
    ):
        if not isinstance(child, Structure):
            raise TypeError(f"Reparam's child must be a structure, got {type(child).__name__}")
        if not callable(param_map):
            raise TypeError("param_map must be callable")
        specs = _make_specs(num_params, names, defaults, None)
        x0 = torch.tensor([s.default for s in specs])
        phi = param_map(x0)
        expected = len(param_names(child))
        if not isinstance(phi, Tensor) or tuple(phi.shape) != (expected,):
            got = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
            raise ValueError(
                f"param_map must return the child's raw free vector of shape ({expected},) "
                f"({param_names(child)}), got {got}"
            )
        set_fields(self, child=child, param_map=param_map, specs=specs)

    @property
    def shape(self):
        return self.child.shape

    def _child_params(self, natural) -> dict[str, Any]:
        return unflatten_params(self.child, self.param_map(_natural_vector(self, natural)))

    def _build_natural(self, natural):
        return self.child._build(self._child_params(natural))

    def _natural_jacobian(self, natural, names):
        x = _natural_vector(self, natural)
        map_jacobian = torch.func.jacfwd(self.param_map)(x)  # (m, k)
        child_tree = self.child._jacobian(self._child_params(natural))
        child_stack = torch.stack([get_path(child_tree, n) for n in param_names(self.child)])  # (m, *shape)
        index = {s.name: i for i, s in enumerate(self.specs)}
        return {name: torch.tensordot(map_jacobian[:, index[name]], child_stack, dims=1) for name in names}
