"""torch-openreml's ``Matrix`` API as a thin, stateful shell around an immutable functional structure.

A compat object holds one functional structure (``.structure``) and answers torch-openreml's
questions about it: ``m(free_params)`` builds V, ``m.grad(free_params)`` gives ``(dV, names)``,
``m.free_param_names`` lists the flat order, and so on. All numbers come from the functional core
(:meth:`~reml_fn.structures.Structure.build`, :func:`~reml_fn.jacobian_stack`); this module only
translates arguments and names.

``free_params`` is, everywhere: ``None`` (the raw defaults of the free parameters, in torch's
default dtype), a flat 1-D tensor of the free raw values in ``free_param_names`` order, or a dict
``{free name: 1-element or 0-d tensor}`` with exactly the free names. Its dtype and device decide
the dtype and device of everything built, fixed operands and parameter-less pieces included.

Differences from torch-openreml, all deliberate:

* structures are immutable, so :meth:`Matrix.set_param_specs` *replaces* the wrapped structure
  and ``param_specs`` is a read-only view (assigning into it raises ``TypeError`` pointing to
  ``set_param_specs``);
* there is no cache: ``get_intermediates``/``set_intermediates``/``reset_intermediates`` are
  no-ops kept so torch-openreml code runs;
* ``build_params(out_format="dict")`` names every value correctly, fixed parameters included
  (torch-openreml's operators misaligned names and values), always as 1-element tensors;
* AR1's closed-form Jacobian is exact at ρ = 0 (torch-openreml's is NaN there).

Example:
    >>> import torch
    >>> from reml_fn.compat import AR1Matrix
    >>> m = AR1Matrix(3)
    >>> m.free_param_names, m.shape
    (['sigma^2', 'rho'], (3, 3))
    >>> m.set_param_specs("rho", fixed=True, default=torch.tensor([1.0]))
    >>> m.free_param_names, m.fixed_param_names
    (['sigma^2'], ['rho'])
    >>> m.build_params(torch.tensor([0.5]), out_format="dict")
    {'sigma^2': tensor([2.7183]), 'rho': tensor([0.4621])}
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor

from reml_fn import params as P
from reml_fn.compat.transform import Transform, as_compat_transform
from reml_fn.design import indicator_matrix
from reml_fn.jacobian import jacobian_stack
from reml_fn.params import ParamSpec
from reml_fn.structures import (
    AR1,
    CompoundSymmetric,
    Custom,
    Diagonal,
    EqualEntry,
    Equicorrelation,
    Fixed,
    Identity,
    LowerTriangular,
    Reparam,
    Scalar,
    Structure,
    Unstructured,
)
from reml_fn.transforms import Identity as IdentityTransform
from reml_fn.transforms import Transform as FunctionalTransform
from reml_fn.tree import replace

__all__ = [
    "Matrix",
    "IdentityMatrix",
    "ScalarMatrix",
    "EqualEntryMatrix",
    "DiagonalMatrix",
    "EquicorrelationMatrix",
    "CompoundSymmetricMatrix",
    "AR1Matrix",
    "UnconstrainedMatrix",
    "LowerTriangularMatrix",
    "SimpleMatrix",
    "Adapter",
    "DummyMatrix",
    "simple_param_specs",
    "ReadOnlyView",
]

JACOBIAN_METHODS = ("jacrev", "jacfwd", "jacobian")
GRAD_MODES = ("default", "manual", "auto")


# --------------------------------------------------------------------------------------------
# Read-only views (param_specs, operands)


class ReadOnlyView(Mapping):
    """A read-only dict view; assigning raises a ``TypeError`` that says what to do instead."""

    def __init__(self, data: Mapping, hint: str):
        self._data = dict(data)
        self._hint = hint

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key, value):
        raise TypeError(f"this mapping is read-only in reml_fn.compat: {self._hint}")

    __delitem__ = __setitem__

    def __repr__(self) -> str:
        return repr(self._data)


_SPEC_HINT = "structures are immutable, use set_param_specs(key, fixed=..., default=..., trans=...)"


def _set_text(names: list) -> str:
    return "{" + ", ".join(repr(n) for n in names) + "}"


# --------------------------------------------------------------------------------------------
# dtype / device of the input drive everything built


@contextlib.contextmanager
def _defaults_like(reference: Tensor):
    """Make torch's default dtype and device those of ``reference`` for the duration.

    Parameter-less pieces (Identity, fully fixed leaves) see no input tensor in the functional
    core and build in torch's defaults; torch-openreml builds them in the input's dtype/device.
    """
    previous = torch.get_default_dtype()
    switch = reference.is_floating_point() and reference.dtype != previous
    if switch:
        torch.set_default_dtype(reference.dtype)
    try:
        if reference.device.type != "cpu":
            with torch.device(reference.device):
                yield
        else:
            yield
    finally:
        if switch:
            torch.set_default_dtype(previous)


def _cast(structure: Structure, reference: Tensor) -> Structure:
    """The structure with its floating-point data (fixed operands) in ``reference``'s dtype/device."""

    def needs_cast(leaf) -> bool:
        return (
            isinstance(leaf, Tensor)
            and leaf.is_floating_point()
            and (leaf.dtype != reference.dtype or leaf.device != reference.device)
        )

    if not any(needs_cast(leaf) for leaf in torch_pytree.tree_leaves(structure)):
        return structure
    return torch_pytree.tree_map(
        lambda leaf: leaf.to(dtype=reference.dtype, device=reference.device) if needs_cast(leaf) else leaf,
        structure,
    )


# --------------------------------------------------------------------------------------------
# torch-openreml parameter specifications → ParamSpec


def _check_param_specs(param_specs: Any) -> None:
    """torch-openreml's validation of a ``param_specs`` dict (same exceptions and messages)."""
    if not isinstance(param_specs, dict):
        raise TypeError("'param_specs' must be a dict!")
    for name, spec in param_specs.items():
        if not isinstance(name, str):
            raise TypeError(f"Parameter name must be a str, got {type(name).__name__}!")
        if not name:
            raise ValueError("Parameter name must not be empty!")
        if "/" in name:
            raise ValueError(f"Invalid parameter name '{name}': '/' is not allowed!")
        if not isinstance(spec, dict):
            raise TypeError(f"Individual parameter specification must be a dict, got {type(spec).__name__}!")
        if sorted(spec) != ["default", "fixed", "trans"]:
            raise TypeError(
                f"Parameter specification fields must be 'fixed', 'default', and 'trans', got {sorted(spec)}!"
            )
        _check_fixed(spec["fixed"])
        _check_default(spec["default"])
        _check_trans(spec["trans"])


def _check_fixed(fixed: Any) -> bool:
    if not isinstance(fixed, bool):
        raise TypeError(f"Parameter specification field 'fixed' must be a bool, got {type(fixed).__name__}!")
    return fixed


def _check_default(default: Any) -> float:
    """A raw default: a 1-element tensor (torch-openreml's 1-D ``tensor([x])``) or a number."""
    if isinstance(default, Tensor):
        if default.ndim > 1:
            raise TypeError(f"Parameter specification field 'default' must be a 1D torch.Tensor, got {default.shape}!")
        if default.numel() != 1:
            raise ValueError(f"Parameters must have length 1, got {default.numel()}!")
        return float(default.detach().reshape(()))
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(default)
    raise TypeError(f"Parameter specification field 'default' must be a torch.Tensor, got {type(default).__name__}!")


def _check_trans(trans: Any) -> FunctionalTransform:
    if not isinstance(trans, FunctionalTransform):
        raise TypeError(f"Parameter specification field 'trans' must be a Transform, got {type(trans).__name__}!")
    return trans


def _to_param_specs(param_specs: dict) -> list[ParamSpec]:
    _check_param_specs(param_specs)
    return [
        ParamSpec(name, _check_default(spec["default"]), spec["trans"], spec["fixed"])
        for name, spec in param_specs.items()
    ]


def _apply_param_specs(structure: Structure, param_specs: dict | None) -> Structure:
    """A leaf structure with torch-openreml ``param_specs`` applied (None or {} keep the defaults)."""
    if param_specs is None:
        return structure
    if isinstance(param_specs, dict) and not param_specs:
        return structure  # torch-openreml: an empty dict means "use the defaults"
    specs = _to_param_specs(param_specs)
    expected = P.all_param_names(structure)
    if [spec.name for spec in specs] != expected:
        raise ValueError(
            f"param_specs of {type(structure).__name__} must name its parameters {expected} in this order, "
            f"got {[spec.name for spec in specs]}"
        )
    for spec in specs:
        structure = structure.with_spec((spec.name,), spec)
    return structure


def simple_param_specs(n: int, default: Tensor | None = None, trans: Transform | None = None) -> dict:
    """torch-openreml's ``{"theta_i": {"fixed": False, "default": default, "trans": trans}}`` for i < n.

    Example:
        >>> list(simple_param_specs(2))
        ['theta_0', 'theta_1']
    """
    if default is None:
        default = torch.tensor([0.0])
    if not isinstance(default, Tensor):
        raise TypeError("default must be a 1D torch tensor of shape (1).")
    if tuple(default.shape) != (1,):
        raise ValueError("Default must be a 1D tensor with shape (1).")
    from reml_fn.compat.transform import TransformIdentity

    trans = TransformIdentity() if trans is None else trans
    return {f"theta_{i}": {"fixed": False, "default": default.detach().clone(), "trans": trans} for i in range(n)}


# --------------------------------------------------------------------------------------------
# The base class


class Matrix:
    """torch-openreml's ``Matrix`` over a functional structure; ``Matrix(structure)`` wraps any.

    Attributes:
        grad_mode: ``"default"`` (closed form), ``"manual"`` (closed form) or ``"auto"``
            (autodiff with ``jacobian_method``), as torch-openreml.
        jacobian_method: ``"jacfwd"`` (default), ``"jacrev"`` or ``"jacobian"``.
        jacobian_chunk_size: passed to ``torch.func.jacrev``.
    """

    grad_mode: str = "default"
    jacobian_method: str = "jacfwd"
    jacobian_chunk_size: int | None = None
    cache: bool = False

    def __init__(self, structure: Structure | Matrix, param_specs: dict | None = None):
        if isinstance(structure, Matrix):
            structure = structure.structure
        if not isinstance(structure, Structure):
            raise TypeError(f"Matrix wraps a reml_fn structure, got {type(structure).__name__}")
        self._structure = _apply_param_specs(structure, param_specs)

    # -- the functional structure --------------------------------------------------------------
    @property
    def structure(self) -> Structure:
        """The immutable functional structure this object stands for (current specs)."""
        return self._structure

    @property
    def shape(self) -> tuple[int, ...]:
        """Output matrix shape."""
        return tuple(self.structure.shape)

    # -- parameter bookkeeping -----------------------------------------------------------------
    def _specs(self) -> list[tuple[str, ParamSpec]]:
        return P.param_specs(self.structure)

    @property
    def param_specs(self) -> ReadOnlyView:
        """Parameter specifications ``{name: {"fixed", "default", "trans"}}`` (a read-only view)."""
        return ReadOnlyView(
            {
                name: ReadOnlyView(
                    {
                        "fixed": spec.fixed,
                        "default": torch.tensor([spec.default]),
                        "trans": as_compat_transform(spec.transform),
                    },
                    _SPEC_HINT,
                )
                for name, spec in self._specs()
            },
            _SPEC_HINT,
        )

    @property
    def param_names(self) -> list[str]:
        """Parameter names (free and fixed), ``/``-joined through operators."""
        return [name for name, _ in self._specs()]

    @property
    def free_param_names(self) -> list[str]:
        """Free parameter names: the flat ``free_params`` order and the Jacobian's slices."""
        return [name for name, spec in self._specs() if not spec.fixed]

    @property
    def fixed_param_names(self) -> list[str]:
        """Fixed parameter names."""
        return [name for name, spec in self._specs() if spec.fixed]

    @property
    def free_param_index(self) -> list[int]:
        """Positions of the free parameters in ``param_names``."""
        return [i for i, (_, spec) in enumerate(self._specs()) if not spec.fixed]

    @property
    def fixed_param_index(self) -> list[int]:
        """Positions of the fixed parameters in ``param_names``."""
        return [i for i, (_, spec) in enumerate(self._specs()) if spec.fixed]

    @property
    def num_params(self) -> int:
        """Total number of parameters."""
        return len(self._specs())

    @property
    def num_free_params(self) -> int:
        """Number of free parameters."""
        return len(self.free_param_names)

    @property
    def num_fixed_params(self) -> int:
        """Number of fixed parameters."""
        return len(self.fixed_param_names)

    def _defaults(self, select: Callable[[ParamSpec], bool]) -> dict[str, Tensor]:
        return {name: torch.tensor([spec.default]) for name, spec in self._specs() if select(spec)}

    @property
    def param_defaults(self) -> dict[str, Tensor]:
        """Raw defaults ``{name: tensor([value])}``."""
        return self._defaults(lambda spec: True)

    @property
    def free_param_defaults(self) -> dict[str, Tensor]:
        """Raw defaults of the free parameters (a valid ``free_params`` dict)."""
        return self._defaults(lambda spec: not spec.fixed)

    @property
    def fixed_param_defaults(self) -> dict[str, Tensor]:
        """Raw values of the fixed parameters."""
        return self._defaults(lambda spec: spec.fixed)

    def _trans(self, select: Callable[[ParamSpec], bool]) -> dict[str, FunctionalTransform]:
        return {name: as_compat_transform(spec.transform) for name, spec in self._specs() if select(spec)}

    @property
    def param_trans(self) -> dict[str, FunctionalTransform]:
        """Transforms (raw → natural) of all parameters."""
        return self._trans(lambda spec: True)

    @property
    def free_param_trans(self) -> dict[str, FunctionalTransform]:
        """Transforms of the free parameters."""
        return self._trans(lambda spec: not spec.fixed)

    @property
    def fixed_param_trans(self) -> dict[str, FunctionalTransform]:
        """Transforms of the fixed parameters."""
        return self._trans(lambda spec: spec.fixed)

    def get_default_dtype_device(self) -> tuple[torch.device, torch.dtype]:
        """``(device, dtype)`` of ``free_params=None`` (torch's defaults)."""
        return torch.empty(0).device, torch.get_default_dtype()

    # -- free_params → flat raw vector ---------------------------------------------------------
    def _free_vector(self, free_params: Any) -> Tensor:
        """Validate ``free_params`` (None, flat tensor or dict) into a flat floating raw vector."""
        specs = [(name, spec) for name, spec in self._specs() if not spec.fixed]
        names = [name for name, _ in specs]
        if free_params is None:
            vector = torch.tensor([spec.default for _, spec in specs], dtype=torch.get_default_dtype())
        elif isinstance(free_params, Mapping):
            missing = [name for name in names if name not in free_params]
            if missing:
                raise ValueError(f"Missing free parameters: {_set_text(missing)}!")
            extra = [key for key in free_params if key not in names]
            if extra:
                raise ValueError(f"Unexpected free parameters: {_set_text(extra)}!")
            values = [free_params[name] for name in names]
            for value in values:
                if not isinstance(value, Tensor):
                    raise TypeError("Parameters must be a Torch tensor!")
                if value.numel() != 1:
                    raise ValueError(f"Parameters must have length 1, got {value.numel()}!")
            if len({(value.dtype, value.device) for value in values}) > 1:
                raise ValueError("All free parameters must share the same dtype and device!")
            if values:
                vector = torch.stack([value.reshape(()) for value in values])
            else:
                vector = torch.zeros(0)
        elif isinstance(free_params, Tensor):
            if free_params.dim() != 1:
                raise ValueError("Parameters must be a 1D tensor!")
            if free_params.shape[0] != len(names):
                raise ValueError(f"Parameters must have length {len(names)}, got {free_params.shape[0]}!")
            vector = free_params
        else:
            raise TypeError("Parameters must be a Torch tensor!")
        if not vector.is_floating_point():
            vector = vector.to(torch.get_default_dtype())
        return vector

    def _run(self, vector: Tensor, function: Callable[[Structure, Tensor], Any]) -> Any:
        """``function(structure, vector)`` with data and defaults in ``vector``'s dtype/device."""
        structure = _cast(self.structure, vector)
        with _defaults_like(vector):
            return function(structure, vector)

    # -- building ------------------------------------------------------------------------------
    def __call__(self, free_params: Any = None) -> Tensor:
        """The matrix V at ``free_params`` (None, flat raw tensor or dict); shape :attr:`shape`."""
        return self._run(self._free_vector(free_params), lambda s, v: s._build(P.unflatten_params(s, v)))

    def map_theta_to_v(self, theta: Any) -> Tensor:
        """torch-openreml's REML interface: ``self(theta)``."""
        return self(theta)

    def map_theta_to_dv(self, theta: Any) -> Tensor | None:
        """torch-openreml's REML interface: ``self.grad(theta)[0]`` (None without free parameters)."""
        return self.grad(theta)[0]

    def build_params(
        self,
        free_params: Any = None,
        include_fixed: bool = True,
        trans: bool = True,
        out_format: str = "tensor",
    ) -> Tensor | dict[str, Tensor]:
        """All parameter values: free ones from ``free_params``, fixed ones from their defaults.

        Args:
            free_params: None, a flat raw tensor or a dict (see the module docstring).
            include_fixed: include the fixed parameters (in ``param_names`` order).
            trans: apply each parameter's transform (natural scale) rather than return raw values.
            out_format: ``"tensor"`` (1-D) or ``"dict"`` (``{name: 1-element tensor}``).
        """
        if out_format not in ("tensor", "dict"):
            raise ValueError(f"Unexpected 'out_format': {out_format}!")
        vector = self._free_vector(free_params)
        names, values = [], []
        position = 0
        for name, spec in self._specs():
            if spec.fixed:
                if not include_fixed:
                    continue
                raw = torch.full((), spec.default, dtype=vector.dtype, device=vector.device)
            else:
                raw = vector[position]
                position += 1
            names.append(name)
            values.append(spec.transform.forward(raw) if trans else raw)
        if out_format == "dict":
            return {name: value.reshape(1) for name, value in zip(names, values)}
        return torch.stack(values) if values else vector.new_zeros(0)

    def trans_grad(self, free_params: Any = None) -> Tensor:
        """d natural / d raw of each free parameter at ``free_params`` (1-D, ``num_free_params``)."""
        vector = self._free_vector(free_params)
        free = [spec for _, spec in self._specs() if not spec.fixed]
        if not free:
            return vector.new_zeros(0)
        return torch.stack([spec.transform.derivative(vector[i]) for i, spec in enumerate(free)])

    # -- Jacobians -----------------------------------------------------------------------------
    def manual_grad(self, free_params: Any = None) -> tuple[Tensor | None, list[str]]:
        """Closed-form Jacobian ``(dV of shape (num_free_params, *shape), free names)``;
        ``(None, [])`` without free parameters. The functional :func:`~reml_fn.jacobian_stack`."""
        vector = self._free_vector(free_params)
        if vector.numel() == 0:
            return None, []
        return self._run(vector, lambda s, v: jacobian_stack(s, P.unflatten_params(s, v), method="closed"))

    def auto_grad(self, free_params: Any = None) -> tuple[Tensor | None, list[str]]:
        """The Jacobian by autodiff (``jacobian_method``: jacfwd, jacrev or jacobian), same format
        as :meth:`manual_grad`."""
        method = self.jacobian_method
        if method not in JACOBIAN_METHODS:
            raise ValueError(f"Unknown Jacobian method '{method}'! Expected one of 'jacrev', 'jacfwd', 'jacobian'.")
        vector = self._free_vector(free_params)
        if vector.numel() == 0:
            return None, []

        def differentiate(s: Structure, v: Tensor) -> Tensor:
            def build(x):
                return s._build(P.unflatten_params(s, x))

            if method == "jacfwd":
                jac = torch.func.jacfwd(build)(v)
            elif method == "jacrev":
                jac = torch.func.jacrev(build, chunk_size=self.jacobian_chunk_size)(v)
            else:
                jac = torch.autograd.functional.jacobian(build, v)
            return jac.movedim(-1, 0)

        return self._run(vector, differentiate), self.free_param_names

    def grad(self, free_params: Any = None) -> tuple[Tensor | None, list[str]]:
        """The Jacobian w.r.t. the raw free parameters, by ``grad_mode``: ``"default"`` and
        ``"manual"`` use the closed form, ``"auto"`` autodiff."""
        if self.grad_mode in ("default", "manual"):
            return self.manual_grad(free_params)
        if self.grad_mode == "auto":
            return self.auto_grad(free_params)
        raise RuntimeError(f"Unknown grad mode '{self.grad_mode}'")

    # -- changing specifications ---------------------------------------------------------------
    def _resolve_key(self, key: Any) -> list[str]:
        if not isinstance(key, str):
            raise TypeError(f"'key' must be a str, got {type(key).__name__}!")
        names = self.param_names
        if key == "/":
            return names
        if key.endswith("/"):
            segments = key[:-1].split("/")
            depth = len(segments)
            selected = [n for n in names if n.split("/")[:depth] == segments and n.count("/") >= depth]
        else:
            selected = [n for n in names if n == key]
        if not selected:
            raise ValueError(f"Cannot resolve key '{key}'!")
        return selected

    def set_param_specs(
        self,
        key: str,
        *,
        fixed: bool | None = None,
        default: Tensor | float | None = None,
        trans: FunctionalTransform | None = None,
    ) -> None:
        """Change the specification of one parameter (``key`` = its name) or of a subtree (``key``
        ending in "/", e.g. ``"time/"``; ``"/"`` is every parameter).

        The functional structure is immutable, so this *replaces* the wrapped structure (and, for
        an operator, the structures of the operands concerned; the compat operand objects are
        shared, as torch-openreml shares its spec dicts). ``default`` is a raw value.
        """
        paths = self._resolve_key(key)
        changes: dict[str, Any] = {}
        if fixed is not None:
            changes["fixed"] = _check_fixed(fixed)
        if default is not None:
            changes["default"] = _check_default(default)
        if trans is not None:
            changes["transform"] = _check_trans(trans)
        for path in paths:
            self._set_spec(path, changes)

    def _set_spec(self, path: str, changes: dict[str, Any]) -> None:
        structure = self.structure
        spec = dict(P.param_specs(structure))[path]
        self._structure = structure.with_spec(tuple(path.split("/")), dataclasses.replace(spec, **changes))

    # -- torch-openreml's cache: there is none ---------------------------------------------------
    def get_intermediates(self, params: Any) -> None:
        """No-op (returns None): the functional core is pure and keeps no cache."""
        return None

    def set_intermediates(self, params: Any, intermediates: Any) -> None:
        """No-op: the functional core is pure and keeps no cache."""
        return None

    def reset_intermediates(self) -> None:
        """No-op: the functional core is pure and keeps no cache."""
        return None

    def enable_cache(self) -> None:
        """No-op: the functional core is pure and keeps no cache."""
        return None

    def disable_cache(self) -> None:
        """No-op: the functional core is pure and keeps no cache."""
        return None

    # -- display -------------------------------------------------------------------------------
    @property
    def repr_dict(self) -> dict[str, Any]:
        """Key-value pairs used to build the string representation."""
        return {"shape": self.shape, "param_specs": self.param_specs}

    def __repr__(self) -> str:
        return self._repr_indented(0)

    def _repr_indented(self, level: int) -> str:
        parts = []
        for key, value in self.repr_dict.items():
            if not value:
                continue
            if key == "param_specs" and len(value) >= 3:
                items = list(value.items())
                (first, first_spec), (last, last_spec) = items[0], items[-1]
                parts.append(f"{key}={{{first!r}: {first_spec!r}, ..., {last!r}: {last_spec!r}}}")
            else:
                parts.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------------------------------
# Leaf classes: one functional structure each


class IdentityMatrix(Matrix):
    """I_n, no parameters: :class:`reml_fn.Identity`."""

    def __init__(self, n: int):
        super().__init__(Identity(n))


class ScalarMatrix(Matrix):
    """σ² I_n: :class:`reml_fn.Scalar`."""

    def __init__(self, n: int, param_specs: dict | None = None):
        super().__init__(Scalar(n), param_specs)


class EqualEntryMatrix(Matrix):
    """σ² J_{n×m}: :class:`reml_fn.EqualEntry`."""

    def __init__(self, n: int, m: int | None = None, param_specs: dict | None = None):
        super().__init__(EqualEntry(n, m), param_specs)


class DiagonalMatrix(Matrix):
    """diag(σ²_0 … σ²_{n−1}): :class:`reml_fn.Diagonal`."""

    def __init__(self, n: int, param_specs: dict | None = None):
        super().__init__(Diagonal(n), param_specs)


class EquicorrelationMatrix(Matrix):
    """(1 − ρ) I + ρ J: :class:`reml_fn.Equicorrelation`."""

    def __init__(self, n: int, param_specs: dict | None = None):
        super().__init__(Equicorrelation(n), param_specs)

    @property
    def rho_min(self) -> float:
        """−1/(n − 1), the smallest ρ keeping V positive semi-definite."""
        return self.structure.rho_min


class CompoundSymmetricMatrix(Matrix):
    """σ² [(1 − ρ) I + ρ J]: :class:`reml_fn.CompoundSymmetric`."""

    def __init__(self, n: int, param_specs: dict | None = None):
        super().__init__(CompoundSymmetric(n), param_specs)

    @property
    def rho_min(self) -> float:
        """−1/(n − 1), the smallest ρ keeping V positive semi-definite."""
        return self.structure.rho_min


class AR1Matrix(Matrix):
    """σ² ρ^{|i−j|}: :class:`reml_fn.AR1`."""

    def __init__(self, n: int, param_specs: dict | None = None):
        super().__init__(AR1(n), param_specs)


class UnconstrainedMatrix(Matrix):
    """Symmetric V_ij = V_ji = x_ij: :class:`reml_fn.Unstructured`."""

    def __init__(self, n: int, param_specs: dict | None = None):
        super().__init__(Unstructured(n), param_specs)


class LowerTriangularMatrix(Matrix):
    """Lower-triangular L (n×m): :class:`reml_fn.LowerTriangular`."""

    def __init__(self, n: int, m: int, param_specs: dict | None = None):
        super().__init__(LowerTriangular(n, m), param_specs)


class SimpleMatrix(Matrix):
    """V = call(θ) for a user function of the raw parameters ``theta_i``: :class:`reml_fn.Custom`.

    Args:
        num_free_params: k.
        call: pure function of a 1-D tensor (k,) returning the matrix.
        manual_grad: optional ``manual_grad(θ) → (dV (k, *shape), names)``; autodiff otherwise.
        default: raw default of every parameter, a tensor of shape (1,) (default 0).
    """

    def __init__(
        self,
        num_free_params: int,
        call: Callable[[Tensor], Tensor] | None = None,
        manual_grad: Callable[[Tensor], tuple[Tensor, list[str]]] | None = None,
        default: Tensor | None = None,
    ):
        if call is None:
            raise ValueError("'call' must be provided.")
        specs = simple_param_specs(num_free_params, default)
        defaults = [_check_default(spec["default"]) for spec in specs.values()]
        jacobian = None if manual_grad is None else (lambda x: manual_grad(x)[0])
        super().__init__(Custom(call, num_free_params, defaults=defaults, jacobian=jacobian))


class Adapter(Matrix):
    """V(θ) = adaptee(param_map(θ)): new raw parameters mapped into the adaptee's raw free vector;
    :class:`reml_fn.Reparam`.

    Args:
        adaptee: a compat Matrix or a functional structure. A compat adaptee stays shared: later
            ``adaptee.set_param_specs(...)`` calls reach this adapter, as in torch-openreml.
        param_specs: the adapter's own parameters (torch-openreml format; Identity transforms only).
        param_map: pure function θ (k,) → the adaptee's raw free vector.
    """

    def __init__(self, adaptee: Matrix | Structure, param_specs: dict, param_map: Callable[[Tensor], Tensor]):
        adaptee = adaptee if isinstance(adaptee, Matrix) else Matrix(adaptee)
        specs = _to_param_specs(param_specs)
        if not all(isinstance(spec.transform, IdentityTransform) for spec in specs):
            raise ValueError(
                "Adapter preprocessing does not support parameter transformations other than TransformIdentity!"
            )
        structure = Reparam(
            adaptee.structure,
            param_map,
            names=[spec.name for spec in specs],
            defaults=[spec.default for spec in specs],
        )
        for spec in specs:
            structure = structure.with_spec((spec.name,), spec)
        self._adaptee = adaptee
        super().__init__(structure)

    @property
    def structure(self) -> Structure:
        child = self._adaptee.structure
        if self._structure.child is not child:
            self._structure = replace(self._structure, child=child)
        return self._structure

    @property
    def adaptee(self) -> Matrix:
        """The wrapped matrix."""
        return self._adaptee

    @property
    def param_map(self) -> Callable[[Tensor], Tensor]:
        """θ → the adaptee's raw free parameters."""
        return self.structure.param_map

    @property
    def repr_dict(self) -> dict[str, Any]:
        return {"adaptee": self._adaptee, "param_specs": self.param_specs, "param_map": "<fn>"}


class DummyMatrix(Matrix):
    """Indicator design matrix of label sequences, no parameters: :func:`reml_fn.design.indicator_matrix`
    wrapped in :class:`reml_fn.Fixed`.

    Example:
        >>> m = DummyMatrix(["rep1", "rep2", "rep2"], ["block1", "block2", "block1"])
        >>> m.colnames
        ['rep1⋈block1', 'rep1⋈block2', 'rep2⋈block1', 'rep2⋈block2']
        >>> m().tolist()
        [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    """

    def __init__(
        self,
        *args: Any,
        levels: Any = None,
        lex_order: bool = True,
        drop_first: bool = False,
        drop_empty_cols: bool = False,
    ):
        matrix, names = indicator_matrix(
            *args, levels=levels, lex_order=lex_order, drop_first=drop_first, drop_empty_cols=drop_empty_cols
        )
        self._colnames = names
        super().__init__(Fixed(matrix))

    @property
    def colnames(self) -> list[str]:
        """Column names: level combinations joined with "⋈"."""
        return list(self._colnames)

    @property
    def repr_dict(self) -> dict[str, Any]:
        return {"shape": self.shape}

    def __call__(self, free_params: Any = None) -> Tensor:
        # A clone, so callers may modify the result without touching the stored design.
        return super().__call__(free_params).clone()
