"""Parameter specifications, names, flat ↔ tree conversion, and fixing parameters.

Every scalar parameter of a structure has a :class:`ParamSpec`: its name, its raw default, its
transform (raw → natural) and whether it is fixed. A structure exposes them as a nested dict
(``param_specs_tree()``); combinators nest their children's dicts under the children's names.

The *parameter tree* a user passes to ``build`` holds only the **free** parameters, as raw 0-d
tensors, nested the same way: ``Sum(time=AR1(4), noise=Scalar(4))`` takes
``{"time": {"sigma^2": θ₀, "rho": θ₁}, "noise": {"sigma^2": θ₂}}``. Its flat names are the
``/``-joined paths, in child order: ``['time/sigma^2', 'time/rho', 'noise/sigma^2']``; the flat
vector of :func:`flatten_params` follows that order (the seed page's ``free_params``).

Example:
    >>> import torch
    >>> import reml_fn as rf
    >>> s = rf.Sum(time=rf.AR1(4), noise=rf.Scalar(4))
    >>> rf.param_names(s)
    ['time/sigma^2', 'time/rho', 'noise/sigma^2']
    >>> p = rf.unflatten_params(s, torch.tensor([0.5, 1.0, 1.0]))
    >>> rf.flatten_params(s, p).tolist()
    [0.5, 1.0, 1.0]
    >>> rf.param_names(rf.fix(s, "time/rho", 0.3))
    ['time/sigma^2', 'noise/sigma^2']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from reml_fn.transforms import Transform
from reml_fn.tree import derived

__all__ = [
    "ParamSpec",
    "param_names",
    "all_param_names",
    "param_specs",
    "init_params",
    "check_params",
    "flatten_params",
    "unflatten_params",
    "as_params",
    "constrain",
    "unconstrain",
    "fix",
    "unfix",
    "get_path",
    "map_leaves",
]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One scalar parameter: ``name``, raw ``default`` (a Python float), ``transform`` and ``fixed``.

    A fixed parameter keeps its ``default`` (raw scale) and leaves the free set, the flat vector
    and the Jacobian.

    Example:
        >>> from reml_fn.params import ParamSpec
        >>> from reml_fn.transforms import ExpPow2
        >>> ParamSpec("sigma^2", 0.0, ExpPow2())
        ParamSpec(name='sigma^2', default=0.0, transform=ExpPow2(), fixed=False)
    """

    name: str
    default: float
    transform: Transform
    fixed: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"parameter name must be a non-empty str, got {self.name!r}")
        if "/" in self.name:
            raise ValueError(f"invalid parameter name {self.name!r}: '/' is not allowed")
        if isinstance(self.default, bool) or not isinstance(self.default, (int, float)):
            raise TypeError(f"default of {self.name!r} must be a Python float, got {self.default!r}")
        if not math.isfinite(self.default):
            raise ValueError(f"default of {self.name!r} must be finite, got {self.default!r}")
        object.__setattr__(self, "default", float(self.default))
        if not isinstance(self.transform, Transform):
            raise TypeError(f"transform of {self.name!r} must be a Transform, got {self.transform!r}")
        if not isinstance(self.fixed, bool):
            raise TypeError(f"fixed of {self.name!r} must be a bool, got {type(self.fixed).__name__}")


# --------------------------------------------------------------------------------------------
# Walking the spec tree


def _spec_items(spec_tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, ParamSpec]]:
    for key, node in spec_tree.items():
        path = f"{prefix}{key}"
        if isinstance(node, ParamSpec):
            yield path, node
        else:
            yield from _spec_items(node, path + "/")


def _spec_tree(s) -> Mapping[str, Any]:
    """``s.param_specs_tree()``, with a clear error when ``s`` is not a structure."""
    if not callable(getattr(s, "param_specs_tree", None)):
        raise TypeError(f"expected a reml_fn structure, got {_describe(s)}")
    return s.param_specs_tree()


def param_specs(s) -> list[tuple[str, ParamSpec]]:
    """All parameters of ``s`` (free and fixed) as ``(path, ParamSpec)`` pairs, in order.

    The specs are static fields of an immutable structure: the walk of its spec tree is made
    once per structure object (:func:`~reml_fn.tree.derived`; a fit asks a dozen times).
    """
    return list(derived(s, "param_specs", lambda: tuple(_spec_items(_spec_tree(s)))))


def param_names(s) -> list[str]:
    """The free parameter names of ``s``: ``/``-joined paths, in flat-vector order.

    Example:
        >>> import reml_fn as rf
        >>> rf.param_names(rf.Sum(time=rf.AR1(3), noise=rf.Scalar(3)))
        ['time/sigma^2', 'time/rho', 'noise/sigma^2']
    """
    return [path for path, spec in param_specs(s) if not spec.fixed]


def all_param_names(s) -> list[str]:
    """Every parameter name of ``s``, fixed ones included.

    Example:
        >>> import reml_fn as rf
        >>> rf.all_param_names(rf.fix(rf.AR1(3), "rho", 0.2))
        ['sigma^2', 'rho']
    """
    return [path for path, _ in param_specs(s)]


def _free_tree(spec_tree: Mapping[str, Any]) -> dict:
    """The spec tree restricted to free parameters; children without free parameters dropped."""
    out = {}
    for key, node in spec_tree.items():
        if isinstance(node, ParamSpec):
            if not node.fixed:
                out[key] = node
        else:
            sub = _free_tree(node)
            if sub:
                out[key] = sub
    return out


def map_leaves(fn, tree: Any) -> Any:
    """Apply ``fn`` to every leaf of a nested dict (a parameter tree, a Jacobian tree, a spec tree)."""
    if isinstance(tree, Mapping):
        return {k: map_leaves(fn, v) for k, v in tree.items()}
    return fn(tree)


def init_params(s, dtype: torch.dtype | None = None, device=None) -> dict:
    """The raw defaults of the free parameters of ``s``, as a nested dict of 0-d tensors.

    Example:
        >>> import reml_fn as rf
        >>> rf.init_params(rf.AR1(3))
        {'sigma^2': tensor(0.), 'rho': tensor(0.)}
    """
    dtype = dtype or torch.get_default_dtype()
    return map_leaves(
        lambda spec: torch.tensor(spec.default, dtype=dtype, device=device),
        _free_tree(_spec_tree(s)),
    )


# --------------------------------------------------------------------------------------------
# Validation


def _describe(x) -> str:
    return type(x).__name__


def _check(free: Mapping, full: Mapping, params: Any, prefix: str, problems: dict) -> None:
    if not isinstance(params, Mapping):
        where = f"at '{prefix.rstrip('/')}'" if prefix else "at the top level"
        raise TypeError(f"parameter tree {where} must be a dict, got {_describe(params)}")
    for key, node in free.items():
        path = prefix + key
        if key not in params:
            if isinstance(node, ParamSpec):
                problems["missing"].append(path)
            else:
                problems["missing"].extend(prefix + p for p, _ in _spec_items({key: node}))
            continue
        value = params[key]
        if isinstance(node, ParamSpec):
            if not isinstance(value, Tensor):
                raise TypeError(f"parameter '{path}' must be a 0-d tensor, got {_describe(value)}")
            if value.dim() != 0:
                raise ValueError(f"parameter '{path}' must be a 0-d tensor, got shape {tuple(value.shape)}")
            # torch.func differentiates floating-point inputs only (jacfwd rejects int64 primals).
            if not value.is_floating_point():
                raise TypeError(f"parameter '{path}' must be a floating-point tensor, got {value.dtype}")
        else:
            _check(node, full[key], value, path + "/", problems)
    for key in params:
        if key not in free:
            value = params[key]
            # A child without free parameters may appear as an empty dict.
            if key in full and isinstance(value, Mapping) and not value:
                continue
            problems["unexpected"].append(prefix + str(key))


def check_params(s, params: Any) -> None:
    """Raise a ``TypeError``/``ValueError`` naming every missing or unexpected path when ``params``
    is not a parameter tree of ``s``'s free parameters (raw 0-d tensors).

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.check_params(rf.AR1(3), {"sigma^2": torch.tensor(0.0)})
        Traceback (most recent call last):
        ...
        ValueError: parameter tree does not match AR1: missing ['rho']. Free parameters are ['sigma^2', 'rho']
    """
    problems: dict[str, list[str]] = {"missing": [], "unexpected": []}
    full = _spec_tree(s)
    _check(_free_tree(full), full, params, "", problems)
    if problems["missing"] or problems["unexpected"]:
        parts = []
        if problems["missing"]:
            parts.append(f"missing {problems['missing']}")
        if problems["unexpected"]:
            parts.append(f"unexpected {problems['unexpected']}")
        raise ValueError(
            f"parameter tree does not match {type(s).__name__}: {'; '.join(parts)}. "
            f"Free parameters are {param_names(s)}"
        )


# --------------------------------------------------------------------------------------------
# Flat ↔ tree


def get_path(tree: Mapping, path: str):
    """The value at a /-joined path of a nested dict."""
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def subtree(tree: Mapping, path: Sequence[str]) -> Mapping:
    """The nested dict at ``path`` (a sequence of keys; ``()`` is the tree itself), ``{}`` where a key is
    absent (a child whose parameters are all fixed has no entry in a free-parameter tree).

    >>> subtree({"a": {"b": {"x": 1}}}, ("a", "b")), subtree({"a": {}}, ("a", "b"))
    ({'x': 1}, {})
    """
    for key in path:
        tree = tree.get(key, {})
    return tree


def _set(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def flatten_params(s, params: Mapping) -> Tensor:
    """The free raw parameters as a 1-D tensor, in :func:`param_names` order.

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.flatten_params(rf.AR1(3), {"rho": torch.tensor(1.0), "sigma^2": torch.tensor(0.5)}).tolist()
        [0.5, 1.0]
    """
    check_params(s, params)
    names = param_names(s)
    if not names:
        return torch.zeros(0)
    return torch.stack([get_path(params, name) for name in names])


def unflatten_params(s, vector: Tensor) -> dict:
    """The parameter tree of ``s`` from a flat raw vector in :func:`param_names` order.

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.unflatten_params(rf.AR1(3), torch.tensor([0.5, 1.0]))
        {'sigma^2': tensor(0.5000), 'rho': tensor(1.)}
    """
    if not isinstance(vector, Tensor):
        raise TypeError(f"flat parameters must be a 1-D tensor, got {_describe(vector)}")
    if vector.dim() != 1:
        raise ValueError(f"flat parameters must be a 1-D tensor, got shape {tuple(vector.shape)}")
    names = param_names(s)
    if vector.shape[0] != len(names):
        raise ValueError(
            f"flat parameters of {type(s).__name__} must have length {len(names)} ({names}), got {vector.shape[0]}"
        )
    if not vector.is_floating_point():
        vector = vector.to(torch.get_default_dtype())
    return tree_from_names(names, vector)


def tree_from_names(names: Sequence[str], vector: Tensor | Sequence) -> dict:
    """The nested dict ``{path: vector[i]}`` for /-joined ``names`` (no checks: for hot loops that
    validated once, e.g. an optimiser unflattening the same structure's parameters every step,
    or a strategy assembling drawn leaves)."""
    out: dict = {}
    for i, name in enumerate(names):
        _set(out, name, vector[i])
    return out


def as_params(s, x: Any = None) -> dict:
    """Accept ``None`` (the defaults), a parameter tree, or a flat 1-D tensor of free raw values;
    return a checked parameter tree."""
    if x is None:
        return s.init_params()
    if isinstance(x, Tensor):
        return unflatten_params(s, x)
    check_params(s, x)
    return x


def constrain(s, params: Mapping) -> dict:
    """Natural-scale values of the free parameters, as a tree with the same paths as ``params``.

    Example:
        >>> import torch, reml_fn as rf
        >>> {k: round(float(v), 6) for k, v in rf.constrain(rf.AR1(3), {"sigma^2": torch.tensor(0.5), "rho": torch.tensor(0.0)}).items()}
        {'sigma^2': 2.718282, 'rho': 0.0}
    """
    check_params(s, params)
    out: dict = {}
    for path, spec in param_specs(s):
        if not spec.fixed:
            _set(out, path, spec.transform.forward(get_path(params, path)))
    return out


def unconstrain(s, natural: Mapping) -> dict:
    """Raw parameters from natural-scale values (the inverse of :func:`constrain`).

    Example:
        >>> import reml_fn as rf
        >>> s = rf.AR1(3)
        >>> p = rf.unconstrain(s, {"sigma^2": 4.0, "rho": 0.5})
        >>> {k: round(float(v), 6) for k, v in rf.constrain(s, p).items()}
        {'sigma^2': 4.0, 'rho': 0.5}
    """
    free = [(path, spec) for path, spec in param_specs(s) if not spec.fixed]
    out: dict = {}
    for path, spec in free:
        try:
            value = get_path(natural, path)
        except (KeyError, TypeError):
            raise ValueError(f"natural values miss {path!r}; free parameters are {param_names(s)}") from None
        value = torch.as_tensor(value, dtype=value.dtype if isinstance(value, Tensor) else torch.get_default_dtype())
        _set(out, path, spec.transform.inverse(value))
    check_params(s, out)
    return out


# --------------------------------------------------------------------------------------------
# Fixing parameters


def _resolve(s, target: str) -> list[str]:
    if not isinstance(target, str):
        raise TypeError(f"a parameter path must be a str, got {_describe(target)}")
    names = all_param_names(s)
    if target == "/":
        return names
    if target.endswith("/"):
        selected = [n for n in names if n.startswith(target)]
    else:
        selected = [n for n in names if n == target]
    if not selected:
        raise ValueError(f"cannot resolve parameter path {target!r}; parameters are {names}")
    return selected


def _to_raw(spec: ParamSpec, value: Any, scale: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"value for {spec.name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value for {spec.name!r} must be a number, got {_describe(value)}")
    if scale == "raw":
        raw = float(value)
    else:
        raw = float(spec.transform.inverse(torch.tensor(float(value), dtype=torch.float64)))
    if not math.isfinite(raw):
        raise ValueError(
            f"value {value!r} for {spec.name!r} is outside the range of its transform "
            f"{spec.transform!r} (raw value {raw})"
        )
    return raw


def _with_value(targets, value):
    """Merge ``fix``/``unfix``'s ``(targets, value)`` into the form ``_update_specs`` takes."""
    if value is None:
        return targets
    if isinstance(targets, Mapping):
        raise TypeError("give either a dict {path: value} or a path and a value, not both")
    if isinstance(targets, str):
        return {targets: value}
    if isinstance(targets, (list, tuple)):
        return {t: value for t in targets}
    raise TypeError(f"expected a path, a list of paths or a dict path -> value, got {_describe(targets)}")


def _update_specs(s, targets, fixed: bool, scale: str):
    if scale not in ("natural", "raw"):
        raise ValueError(f"scale must be 'natural' or 'raw', got {scale!r}")
    if isinstance(targets, str):
        targets = {targets: None}
    elif isinstance(targets, Mapping):
        targets = dict(targets)
    elif isinstance(targets, (list, tuple)):
        targets = {t: None for t in targets}
    else:
        raise TypeError(f"expected a path, a list of paths or a dict path -> value, got {_describe(targets)}")
    specs = dict(param_specs(s))
    for target, value in targets.items():
        for path in _resolve(s, target):
            spec = specs[path]
            default = spec.default if value is None else _to_raw(spec, value, scale)
            s = s.with_spec(tuple(path.split("/")), dataclasses.replace(spec, default=default, fixed=fixed))
            specs[path] = dataclasses.replace(spec, default=default, fixed=fixed)
    return s


def fix(s, targets, value: Any = None, *, scale: str = "natural"):
    """A new structure with some parameters fixed, so they leave the free set and the Jacobian.

    Args:
        s: a structure.
        targets: a path (``"time/rho"``), a subtree (``"time/"``; ``"/"`` is everything), a list
            of them, or a dict ``{path: value}``.
        value: with a single path or subtree, the value to fix at (default: keep the raw default).
        scale: ``"natural"`` (default: ``value`` is on the matrix scale, e.g. ρ = 0.3) or ``"raw"``.

    Example:
        >>> import reml_fn as rf
        >>> s = rf.fix(rf.AR1(3), "rho", 0.5)
        >>> rf.param_names(s)
        ['sigma^2']
        >>> round(float(s.build(s.init_params())[0, 1]), 6)
        0.5
    """
    return _update_specs(s, _with_value(targets, value), True, scale)


def unfix(s, targets, value: Any = None, *, scale: str = "natural"):
    """A new structure with some parameters free again (optionally with a new starting default).

    Example:
        >>> import reml_fn as rf
        >>> s = rf.fix(rf.AR1(3), "rho", 0.5)
        >>> rf.param_names(rf.unfix(s, "rho"))   # free again, starting from ρ = 0.5
        ['sigma^2', 'rho']
    """
    return _update_specs(s, _with_value(targets, value), False, scale)
