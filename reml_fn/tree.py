"""The ``@structure`` decorator: frozen dataclasses that are pytrees for torch.func *and* optree.

``torch.func`` (vmap, jacfwd, jacrev, grad) only sees the pure-Python registry
``torch.utils._pytree``; optree keeps its own registry. ``@structure`` registers a class in both:

* fields declared with :func:`static` (sizes, names, transforms, fixed flags) live in the tree
  *spec*; every other field is a child node (tensors, nested structures, tuples of them);
* unflattening bypasses ``__init__`` (``object.__new__`` + ``object.__setattr__``), because
  ``vmap`` unflattens with integer ``in_dims`` leaves and ``jacfwd`` with Jacobian-shaped leaves,
  which any validating constructor would reject or silently corrupt;
* a tensor in a static field is a ``TypeError`` at construction;
* optree uses the private namespace ``"reml_fn"`` with insertion-ordered dicts, so optree and
  torch flatten parameter trees in the same leaf order.

Example:
    >>> import torch, optree
    >>> import torch.utils._pytree as torch_pytree
    >>> from reml_fn.tree import structure, static
    >>> @structure
    ... class Scaled:
    ...     matrix: torch.Tensor
    ...     label: str = static(default="K")
    >>> s = Scaled(torch.eye(2))
    >>> leaves, spec = torch_pytree.tree_flatten(s)
    >>> len(leaves), torch_pytree.tree_unflatten(leaves, spec).label
    (1, 'K')
    >>> len(optree.tree_leaves(s, namespace="reml_fn"))
    1
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

__all__ = ["structure", "static", "replace", "derived", "NAMESPACE", "is_structure"]

NAMESPACE = "reml_fn"

# Entered once and never left, like torch/utils/_cxx_pytree.py does for its own namespace:
# optree would otherwise sort dict keys and disagree with torch about the flat parameter order.
_DICT_ORDER = optree.dict_insertion_ordered(True, namespace=NAMESPACE)
_DICT_ORDER.__enter__()

T = TypeVar("T")


def static(**kwargs: Any) -> Any:
    """A dataclass field stored in the tree spec (configuration), not as a leaf (see the module
    example: ``label: str = static(default="K")``)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def _contains_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_contains_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_tensor(v) for v in value.values())
    return False


def structure(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass registered as a pytree in torch and optree (namespace
    ``reml_fn``). A class body may define its own ``__init__`` (assigning with
    ``object.__setattr__``); it runs only when users construct objects, never on unflatten."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(cls)
    data_names = tuple(f.name for f in fields if not f.metadata.get("static"))
    static_names = tuple(f.name for f in fields if f.metadata.get("static"))
    cls._data_fields = data_names  # type: ignore[attr-defined]
    cls._static_fields = static_names  # type: ignore[attr-defined]

    original_init = cls.__init__

    @functools.wraps(original_init)
    def checked_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if type(self) is cls:
            for name in static_names:
                if _contains_tensor(getattr(self, name)):
                    raise TypeError(
                        f"{cls.__name__}.{name} is a static (configuration) field and cannot hold "
                        "a tensor; tensors belong in data fields"
                    )

    cls.__init__ = checked_init  # type: ignore[method-assign]

    if "__getstate__" not in cls.__dict__:

        def __getstate__(self):
            # The fields only: what ``derived`` kept on the object is recomputed by a copy or an
            # unpickled object (it may hold closures, which do not pickle).
            return {k: v for k, v in self.__dict__.items() if not k.startswith(_DERIVED_PREFIX)}

        cls.__getstate__ = __getstate__  # type: ignore[attr-defined]

    def flatten(obj):
        return [getattr(obj, k) for k in data_names], tuple(getattr(obj, k) for k in static_names)

    def unflatten(values, context):
        obj = object.__new__(cls)
        for k, v in zip(data_names, values):
            object.__setattr__(obj, k, v)
        for k, v in zip(static_names, context):
            object.__setattr__(obj, k, v)
        return obj

    def flatten_with_keys(obj):
        children, context = flatten(obj)
        return [(torch_pytree.GetAttrKey(k), v) for k, v in zip(data_names, children)], context

    torch_pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    optree.register_pytree_node(
        cls,
        lambda obj: (*flatten(obj), data_names),
        lambda context, values: unflatten(values, context),
        namespace=NAMESPACE,
    )
    cls._is_reml_fn_structure = True  # type: ignore[attr-defined]
    return cls


def is_structure(obj: Any) -> bool:
    """True for instances of ``@structure`` classes."""
    return getattr(type(obj), "_is_reml_fn_structure", False)


_DERIVED_PREFIX = "_reml_fn_"  # the attribute names ``derived`` keeps values under (never pickled or copied)


def derived(obj: Any, key: str, compute):
    """``compute()``, kept on ``obj`` under ``key`` after the first call: for what a fit reads from
    an immutable structure again and again (its parameter specs, its MME layout, which terms a
    moment start can use, its data leaves), within a fit and across fits of the same object.
    ``replace``, ``fix``, pytree unflattening, ``copy`` and ``pickle`` make new objects, which
    compute their own (a ``@structure``'s ``__getstate__`` leaves these values out). The value must
    not refer back to ``obj`` (no reference cycle: the object would then wait for the cyclic
    garbage collector) and must not be mutated by callers; objects without a ``__dict__`` compute
    it every time.

    Example:
        >>> import reml_fn as rf
        >>> s = rf.Scalar(3)
        >>> derived(s, "_example", lambda: ["computed once"]) is derived(s, "_example", list)
        True
    """
    store = getattr(obj, "__dict__", None)
    if store is None:
        return compute()
    name = _DERIVED_PREFIX + key
    if name not in store:
        store[name] = compute()  # bypasses a frozen dataclass's __setattr__; not a field
    return store[name]


def replace(obj: T, **changes: Any) -> T:
    """A copy of a ``@structure`` object with some fields replaced, bypassing ``__init__``
    (so it also works for classes whose constructor takes other arguments).

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.replace(rf.Fixed(torch.eye(2)), matrix=torch.ones(2, 2))().tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    cls = type(obj)
    unknown = set(changes) - set(cls._data_fields) - set(cls._static_fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    for name in cls._static_fields:
        if name in changes and _contains_tensor(changes[name]):
            raise TypeError(f"{cls.__name__}.{name} is a static field and cannot hold a tensor")
    new = object.__new__(cls)
    for name in (*cls._data_fields, *cls._static_fields):
        object.__setattr__(new, name, changes.get(name, getattr(obj, name)))
    return new
