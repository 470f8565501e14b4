"""What every covariance structure shares, and the machinery of parametric (leaf) structures.

A *structure* describes a matrix V(θ). It is an immutable ``@structure`` dataclass with

* ``shape``: the matrix shape (static);
* ``param_specs_tree()``: its parameters' :class:`~reml_fn.params.ParamSpec` as a nested dict;
* ``build(params)``: the matrix, a pure function of a tree of raw free parameters;
* ``jacobian(params)``: the closed-form Jacobian dV/dθ, a tree shaped like ``params`` whose
  leaves have the matrix's shape;
* ``init_params()``, ``constrain(params)`` and ``s(x)`` (``x`` a tree, a flat tensor or None).

A *parametric* structure computes natural values ``x = t(θ)`` of its parameters (fixed ones from
their defaults) and implements two small methods: ``_build_natural(x)`` and
``_natural_jacobian(x, names)`` (dV/dx for the named parameters). The chain rule
dV/dθ = dV/dx · t'(θ) is applied here, once for all structures.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from reml_fn import params as P
from reml_fn.params import ParamSpec
from reml_fn.tree import replace

__all__ = ["Structure", "Parametric", "check_size", "first_leaf", "set_fields", "values_readable", "variance_spec"]


def check_size(name: str, value: Any, minimum: int = 1) -> int:
    """Validate a static size argument (a Python int ≥ ``minimum``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{name}' must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"'{name}' must be at least {minimum}, got {value}")
    return value


def values_readable(tensor: Tensor) -> bool:
    """Whether ``tensor``'s values can be read on the host: False inside ``vmap``, ``grad`` or
    ``jacfwd`` (a functorch-wrapped tensor), where code may use its shape only. Analyses of a
    structure's data that need its values (a Propagate Z of grouped shape, the nesting of groups,
    the column pairs of a crossed design) are skipped there and the general path runs: the answer
    is the same, only the way to it differs.

    Example:
        >>> import torch
        >>> from reml_fn.structures.base import values_readable
        >>> values_readable(torch.zeros(2)), bool(torch.func.vmap(lambda t: torch.tensor(values_readable(t)))(torch.zeros(2)).any())
        (True, False)
    """
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def first_leaf(tree: Any) -> Tensor | None:
    """The first tensor in a nested dict (used for the dtype and device of built matrices)."""
    if isinstance(tree, Tensor):
        return tree
    if isinstance(tree, Mapping):
        for value in tree.values():
            leaf = first_leaf(value)
            if leaf is not None:
                return leaf
    return None


class Structure:
    """Behaviour shared by every structure (base structures and combinators)."""

    # -- to implement -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def param_specs_tree(self) -> dict:
        raise NotImplementedError

    def with_spec(self, segments: tuple[str, ...], spec: ParamSpec) -> Structure:
        raise NotImplementedError

    def _build(self, params: Mapping) -> Tensor:
        raise NotImplementedError

    def _jacobian(self, params: Mapping) -> dict:
        """Closed-form Jacobian; structures without one fall back to forward-mode autodiff."""
        return torch.func.jacfwd(self._build)(dict(params))

    def _build_and_jacobian(self, params: Mapping) -> tuple[Tensor, dict]:
        """``(_build(params), _jacobian(params))``; a structure whose two share work overrides it."""
        return self._build(params), self._jacobian(params)

    # -- public, generic ----------------------------------------------------------------------
    def init_params(self, dtype: torch.dtype | None = None, device=None) -> dict:
        """Raw defaults of the free parameters, a nested dict of 0-d tensors."""
        return P.init_params(self, dtype, device)

    def build(self, params: Mapping) -> Tensor:
        """The matrix V(θ) for a tree of raw free parameters."""
        P.check_params(self, params)
        return self._build(params)

    def jacobian(self, params: Mapping) -> dict:
        """Closed-form dV/dθ: a tree shaped like ``params``, leaves of shape ``self.shape``.

        The leaves are made afresh on every call but may be views of one tensor (a structure's unit
        matrices): read them, or copy before writing into them in place."""
        P.check_params(self, params)
        return self._jacobian(params)

    def constrain(self, params: Mapping) -> dict:
        """Natural-scale values of the free parameters (same paths as ``params``)."""
        return P.constrain(self, params)

    def __call__(self, x: Any = None) -> Tensor:
        """Build from a parameter tree, a flat tensor of free raw values, or None (defaults)."""
        return self._build(P.as_params(self, x))

    def __repr__(self) -> str:
        cls = type(self)
        parts = []
        for name in cls._static_fields:
            if name == "specs":
                continue
            parts.append(f"{name}={getattr(self, name)!r}")
        for name in cls._data_fields:
            value = getattr(self, name)
            if isinstance(value, Tensor):
                parts.append(f"{name}=<tensor {tuple(value.shape)}>")
            else:
                parts.append(f"{name}={value!r}")
        fixed = [f"{spec.name}={spec.default:g}" for spec in getattr(self, "specs", ()) if spec.fixed]
        if fixed:
            parts.append(f"fixed(raw)=[{', '.join(fixed)}]")
        return f"{cls.__name__}({', '.join(parts)})"


class Parametric(Structure):
    """A leaf structure with its own scalar parameters in the static field ``specs``."""

    specs: tuple[ParamSpec, ...]

    def param_specs_tree(self) -> dict:
        return {spec.name: spec for spec in self.specs}

    def with_spec(self, segments: tuple[str, ...], spec: ParamSpec) -> Structure:
        if len(segments) != 1 or segments[0] not in {s.name for s in self.specs}:
            raise ValueError(f"{type(self).__name__} has no parameter {'/'.join(segments)!r}")
        specs = tuple(spec if s.name == segments[0] else s for s in self.specs)
        return replace(self, specs=specs)

    def _natural(self, params: Mapping) -> dict[str, Tensor]:
        """Natural values of all parameters (fixed ones from their raw defaults)."""
        natural = {}
        like = None
        for spec in self.specs:
            if spec.fixed:
                if like is None:
                    ref = first_leaf(params)
                    like = (
                        {"dtype": torch.get_default_dtype()}
                        if ref is None
                        else {"dtype": ref.dtype, "device": ref.device}
                    )
                # A constant: no tangent, so no cast (below) is needed.
                natural[spec.name] = spec.transform.forward(torch.full((), spec.default, **like))
                continue
            raw = params[spec.name]
            value = spec.transform.forward(raw)
            if not spec.transform._keeps_tangent_dtype:
                # copy=True also casts the forward-mode tangent: under torch.func.jvp/jacfwd a Python float
                # times a 0-d float32 tensor gets a float64 tangent (pytorch/functorch#1073), which would leak
                # float64 Jacobians. Transforms without Python-number arithmetic (Identity, ExpPow2, …) skip it.
                value = value.to(raw.dtype, copy=True)
            natural[spec.name] = value
        return natural

    def _build(self, params: Mapping) -> Tensor:
        return self._build_natural(self._natural(params))

    def _jacobian(self, params: Mapping) -> dict:
        return self._jacobian_at(params, self._natural(params))

    def _build_and_jacobian(self, params: Mapping) -> tuple[Tensor, dict]:
        # The natural values once for both (an evaluation of the likelihood needs both), unless a
        # subclass defines its own _build or _jacobian: then those are what must run.
        cls = type(self)
        if cls._build is not Parametric._build or cls._jacobian is not Parametric._jacobian:
            return super()._build_and_jacobian(params)
        natural = self._natural(params)
        return self._build_natural(natural), self._jacobian_at(params, natural)

    def _jacobian_at(self, params: Mapping, natural: dict[str, Tensor]) -> dict:
        """dV/dθ of the free parameters, given the natural values ``natural`` = ``_natural(params)``."""
        free = [spec for spec in self.specs if not spec.fixed]
        if not free:
            return {}
        d_natural = self._natural_jacobian(natural, [spec.name for spec in free])
        out = {}
        for spec in free:
            # dV/dθ = dV/dx · t'(θ); t' is computed from x where cheaper, and skipped where it is exactly 1
            # (the product would be dV/dx itself: same values, and a 0-d factor never changes the dtype).
            slope = spec.transform._derivative_at(params[spec.name], natural[spec.name])
            out[spec.name] = d_natural[spec.name] if slope is None else d_natural[spec.name] * slope
        return out

    # -- to implement -------------------------------------------------------------------------
    def _build_natural(self, natural: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _natural_jacobian(self, natural: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError


def set_fields(obj: Any, **fields: Any) -> None:
    """Assign fields of a frozen dataclass inside a custom ``__init__``."""
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


def variance_spec(name: str = "sigma^2") -> ParamSpec:
    """σ² = e^{2θ} with raw default 0 (σ² = 1), torch-openreml's variance parameter."""
    from reml_fn.transforms import ExpPow2

    return ParamSpec(name, 0.0, ExpPow2())
