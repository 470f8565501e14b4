"""Assertions for covariance structures: Jacobians, vmap, pytree round trips.

* :func:`assert_jacobian_matches` — the closed-form Jacobian equals ``jacfwd`` and ``jacrev`` of
  ``build``, leaf by leaf: |closed − autodiff| ≤ atol + rtol·|autodiff| for every entry;
* :func:`assert_vmap_matches_loop` — ``vmap`` of ``build`` (and of the closed-form Jacobian)
  over a batch of parameter trees equals a Python loop over the batch;
* :func:`assert_pytree_roundtrip` — flattening and unflattening a structure with
  ``torch.utils._pytree`` and with optree (namespace ``reml_fn``) gives back the same statics and
  leaves, the two registries agree on leaf order and paths, and parameter trees flatten in
  :func:`~reml_fn.param_names` order.

Each raises ``AssertionError`` with a message naming the structure, the parameter path and the
size of the disagreement.

Example:
    >>> import torch, reml_fn as rf
    >>> from reml_fn.testing import assert_jacobian_matches
    >>> assert_jacobian_matches(rf.AR1(3), {"sigma^2": torch.tensor(0.2), "rho": torch.tensor(0.0)})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor

from reml_fn.jacobian import jacobian
from reml_fn.params import as_params, get_path, param_names
from reml_fn.tree import NAMESPACE

__all__ = ["assert_jacobian_matches", "assert_vmap_matches_loop", "assert_pytree_roundtrip"]

_METHOD_NAMES = {"fwd": "jacfwd", "rev": "jacrev", "closed": "closed form"}


def _leaves_by_path(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a/b': leaf}`` for a nested dict (non-dict values are leaves)."""
    if not isinstance(tree, Mapping):
        return {prefix.rstrip("/"): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves_by_path(value, f"{prefix}{key}/"))
    return out


def _label(s: Any) -> str:
    return f"{type(s).__name__}{tuple(s.shape)}"


def _mismatch(actual: Any, expected: Tensor, atol: float, rtol: float) -> str | None:
    """Why ``actual`` differs from ``expected`` (None when they agree within tolerance)."""
    if not isinstance(actual, Tensor):
        return f"is a {type(actual).__name__}, not a tensor"
    if actual.shape != expected.shape:
        return f"has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    error = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    # NaN anywhere fails: NaN > bound is False, so test "within bound" instead.
    bad = ~(error <= bound)
    if not bool(bad.any()):
        return None
    worst = torch.where(bad, torch.nan_to_num(error - bound, nan=float("inf")), torch.zeros_like(error))
    index = tuple(int(i) for i in torch.unravel_index(worst.argmax(), worst.shape)) if worst.dim() else ()
    return (
        f"max |error| = {float(error.max()):.3e} at index {index} "
        f"(got {float(actual[index]):.17g}, expected {float(expected[index]):.17g}; atol={atol:g}, rtol={rtol:g})"
    )


def assert_jacobian_matches(
    s: Any,
    params: Mapping | Tensor | None = None,
    atol: float = 1e-10,
    methods: Sequence[str] = ("fwd", "rev"),
    *,
    rtol: float = 1e-10,
) -> None:
    """Assert that the closed-form Jacobian of ``s`` equals autodiff, parameter by parameter.

    For every free parameter path p and every method m in ``methods``:
    |∂V/∂θ_p (closed) − ∂V/∂θ_p (m)| ≤ atol + rtol·|∂V/∂θ_p (m)| entrywise, where ``"fwd"`` is
    ``torch.func.jacfwd(s.build)`` and ``"rev"`` is ``jacrev``. Also checks that the closed form
    has exactly the free parameter paths, leaves of shape ``s.shape``, and no NaN.

    Args:
        s: a structure.
        params: a raw parameter tree, a flat tensor of free raw values, or None (the defaults).
        atol, rtol: tolerances (defaults suit float64).
        methods: autodiff references, any of ``"fwd"``, ``"rev"``.

    Raises:
        AssertionError: naming the structure, the parameter path, the method and the largest error.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.testing import assert_jacobian_matches
        >>> assert_jacobian_matches(rf.Unstructured(2), torch.tensor([0.1, -0.4, 0.3]))
        >>> wrong = rf.Custom(lambda x: x[0] ** 2 * torch.eye(2), 1, jacobian=lambda x: x[0] * torch.eye(2)[None])
        >>> assert_jacobian_matches(wrong, torch.tensor([1.0]))
        Traceback (most recent call last):
        ...
        AssertionError: Custom(2, 2): closed-form Jacobian differs from autodiff:
          'theta_0' vs jacfwd: max |error| = 1.000e+00 at index (0, 0) (got 1, expected 2; atol=1e-10, rtol=1e-10)
          'theta_0' vs jacrev: max |error| = 1.000e+00 at index (0, 0) (got 1, expected 2; atol=1e-10, rtol=1e-10)
    """
    for method in methods:
        if method not in ("fwd", "rev"):
            raise ValueError(f"methods must be 'fwd' and/or 'rev', got {method!r}")
    params = as_params(s, params)
    names = param_names(s)
    closed = _leaves_by_path(jacobian(s, params, "closed"))
    problems = []
    if sorted(closed) != sorted(names):
        problems.append(f"  paths {sorted(closed)}, expected the free parameters {names}")
    for name in names:
        leaf = closed.get(name)
        if isinstance(leaf, Tensor) and tuple(leaf.shape) != tuple(s.shape):
            problems.append(f"  {name!r}: closed form has shape {tuple(leaf.shape)}, expected {tuple(s.shape)}")
    if not problems:
        for method in methods:
            reference = jacobian(s, params, method)
            for name in names:
                why = _mismatch(closed[name], get_path(reference, name), atol, rtol)
                if why is not None:
                    problems.append(f"  {name!r} vs {_METHOD_NAMES[method]}: {why}")
    if problems:
        raise AssertionError(f"{_label(s)}: closed-form Jacobian differs from autodiff:\n" + "\n".join(problems))


def _batch_size(params_batch: Mapping) -> int:
    leaves = _leaves_by_path(params_batch)
    if not leaves or not params_batch:
        raise ValueError("params_batch has no leaves: a structure without free parameters has nothing to vmap over")
    sizes = {}
    for path, leaf in leaves.items():
        if not isinstance(leaf, Tensor) or leaf.dim() != 1:
            got = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(f"params_batch leaf {path!r} must be a 1-D tensor (batch,), got {got}")
        sizes[path] = leaf.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"params_batch leaves disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def _select(tree: Any, b: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _select(v, b) for k, v in tree.items()}
    return tree[b]


def assert_vmap_matches_loop(
    s: Any,
    params_batch: Mapping,
    atol: float = 1e-12,
    *,
    rtol: float = 1e-12,
    check_jacobian: bool = True,
) -> None:
    """Assert ``vmap(s.build)(params_batch)[b] == s.build(params_b)`` for every batch member b,
    and the same for the closed-form Jacobian (``check_jacobian``).

    Args:
        s: a structure.
        params_batch: a parameter tree of ``s`` whose leaves have shape ``(B,)``.
        atol, rtol: tolerances (vmap and the loop run the same operations, so only round-off).
        check_jacobian: also compare ``vmap(lambda p: rf.jacobian(s, p))`` with the loop.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.testing import assert_vmap_matches_loop
        >>> assert_vmap_matches_loop(rf.AR1(3), {"sigma^2": torch.tensor([0.0, 0.5]), "rho": torch.tensor([-1.0, 1.0])})
    """
    size = _batch_size(params_batch)
    problems = []
    batched = torch.func.vmap(s.build)(params_batch)
    batched_jacobian = torch.func.vmap(lambda p: jacobian(s, p))(params_batch) if check_jacobian else {}
    for b in range(size):
        member = _select(params_batch, b)
        why = _mismatch(batched[b], s.build(member), atol, rtol)
        if why is not None:
            problems.append(f"  build, batch member {b}: {why}")
        if check_jacobian:
            looped = _leaves_by_path(jacobian(s, member))
            for name in param_names(s):
                why = _mismatch(get_path(batched_jacobian, name)[b], looped[name], atol, rtol)
                if why is not None:
                    problems.append(f"  jacobian {name!r}, batch member {b}: {why}")
    if problems:
        raise AssertionError(f"{_label(s)}: vmap differs from a Python loop:\n" + "\n".join(problems))


def _torch_path(keys: tuple) -> tuple:
    """A torch key path as plain values (attribute names, indices, dict keys) like optree's."""
    out = []
    for key in keys:
        for attribute in ("name", "idx", "key"):
            if hasattr(key, attribute):
                out.append(getattr(key, attribute))
                break
        else:
            out.append(key)
    return tuple(out)


def assert_pytree_roundtrip(s: Any, params: Mapping | None = None) -> None:
    """Assert that ``s`` survives flatten → unflatten in torch and in optree, and that both agree.

    Checks: unflattening gives an object of the same type and tree spec (so every static field of
    every node is kept) with the same leaves; torch and optree list the same leaves in the same
    order under the same paths; the rebuilt structure builds the same matrix; and the parameter
    tree (``params`` or the defaults) flattens, in both registries, in ``param_names`` order.

    Example:
        >>> import reml_fn as rf
        >>> from reml_fn.testing import assert_pytree_roundtrip
        >>> assert_pytree_roundtrip(rf.fix(rf.AR1(3), "rho", 0.5))
    """
    problems = []
    leaves, spec = torch_pytree.tree_flatten(s)
    rebuilt = torch_pytree.tree_unflatten(leaves, spec)
    if type(rebuilt) is not type(s):
        problems.append(f"  torch unflatten gave a {type(rebuilt).__name__}")
    rebuilt_leaves, rebuilt_spec = torch_pytree.tree_flatten(rebuilt)
    if rebuilt_spec != spec or any(a is not b for a, b in zip(rebuilt_leaves, leaves)):
        problems.append("  torch round trip changed the tree spec (static fields) or the leaves")

    o_leaves, o_spec = optree.tree_flatten(s, namespace=NAMESPACE)
    o_rebuilt = optree.tree_unflatten(o_spec, o_leaves)
    if type(o_rebuilt) is not type(s):
        problems.append(f"  optree unflatten gave a {type(o_rebuilt).__name__}")
    o_rebuilt_leaves, o_rebuilt_spec = optree.tree_flatten(o_rebuilt, namespace=NAMESPACE)
    if o_rebuilt_spec != o_spec or any(a is not b for a, b in zip(o_rebuilt_leaves, o_leaves)):
        problems.append("  optree round trip changed the tree spec (static fields) or the leaves")

    if len(o_leaves) != len(leaves) or any(a is not b for a, b in zip(o_leaves, leaves)):
        problems.append(f"  torch and optree disagree on the leaves ({len(leaves)} vs {len(o_leaves)})")
    torch_paths = [_torch_path(path) for path, _ in torch_pytree.tree_flatten_with_path(s)[0]]
    optree_paths = [tuple(path) for path in optree.tree_paths(s, namespace=NAMESPACE)]
    if torch_paths != optree_paths:
        problems.append(f"  torch and optree disagree on leaf paths: {torch_paths} vs {optree_paths}")

    params = s.init_params() if params is None else params
    names = param_names(s)
    expected = [get_path(params, name) for name in names] if names else []
    for registry, p_leaves in (
        ("torch", torch_pytree.tree_leaves(params)),
        ("optree", optree.tree_leaves(params, namespace=NAMESPACE)),
    ):
        if len(p_leaves) != len(expected) or any(a is not b for a, b in zip(p_leaves, expected)):
            problems.append(f"  {registry} flattens the parameter tree out of param_names order {names}")
    if not problems:
        for label, other in (("torch", rebuilt), ("optree", o_rebuilt)):
            if param_names(other) != names or tuple(other.shape) != tuple(s.shape):
                problems.append(f"  the {label}-rebuilt structure has other parameters or another shape")
            elif not torch.equal(other.build(params), s.build(params)):
                problems.append(f"  the {label}-rebuilt structure builds another matrix")
    if problems:
        raise AssertionError(f"{_label(s)}: pytree round trip failed:\n" + "\n".join(problems))
