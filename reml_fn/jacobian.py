"""Jacobians dV/dθ of a structure with respect to its raw free parameters.

``jacobian(s, params, method)`` returns a tree shaped like ``params`` whose leaves have the
matrix's shape: leaf ``p`` is ∂V/∂θ_p. ``method`` chooses how it is computed:

* ``"closed"`` (default): the structure's closed form (combinators compose their children's);
* ``"fwd"``: ``torch.func.jacfwd`` of ``build`` (the autodiff default: few inputs, n² outputs);
* ``"rev"``: ``torch.func.jacrev`` (far slower for n² outputs; for checks).

``jacobian_stack`` gives the seed page's ``manual_grad`` format: a tensor of shape
``(k, *matrix shape)`` with slices in :func:`~reml_fn.param_names` order, and the names.

Example:
    >>> import torch, reml_fn as rf
    >>> s = rf.Sum(time=rf.AR1(4), noise=rf.Scalar(4))
    >>> grad, names = rf.jacobian_stack(s, rf.unflatten_params(s, torch.tensor([0.5, 1.0, 1.0])))
    >>> tuple(grad.shape), names
    ((3, 4, 4), ['time/sigma^2', 'time/rho', 'noise/sigma^2'])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from reml_fn.params import as_params, get_path, param_names

__all__ = ["jacobian", "jacobian_stack", "METHODS"]

METHODS = ("closed", "fwd", "rev")


def autodiff_transform(method: str):
    """The ``torch.func`` transform of an autodiff Jacobian method: ``jacfwd`` for ``"fwd"``,
    ``jacrev`` for ``"rev"`` (the one place that maps the names; ``"closed"`` is each structure's
    own ``_jacobian``).

    Example:
        >>> import torch
        >>> from reml_fn.jacobian import autodiff_transform
        >>> autodiff_transform("fwd")(torch.sin)(torch.tensor(0.0)).item()    # d sin/dx at 0
        1.0
    """
    if method == "fwd":
        return torch.func.jacfwd
    if method == "rev":
        return torch.func.jacrev
    raise ValueError(f"unknown Jacobian method {method!r}; expected 'closed', 'fwd' or 'rev'")


def jacobian(s, params: Mapping | Tensor | None = None, method: str = "closed") -> dict:
    """dV/dθ as a tree shaped like ``params`` (leaves of shape ``s.shape``).

    Args:
        s: a structure.
        params: a tree of raw free parameters, a flat tensor, or None (the defaults).
        method: ``"closed"``, ``"fwd"`` or ``"rev"``.

    Example:
        >>> import torch, reml_fn as rf
        >>> J = rf.jacobian(rf.Scalar(2), {"sigma^2": torch.tensor(0.0)})   # dσ²/dθ · I = 2 I
        >>> J["sigma^2"].tolist()
        [[2.0, 0.0], [0.0, 2.0]]
    """
    if method not in METHODS:
        raise ValueError(f"unknown Jacobian method {method!r}; expected one of {METHODS}")
    params = as_params(s, params)
    if method == "closed":
        return s._jacobian(params)
    if not param_names(s):
        return {}
    return autodiff_transform(method)(s._build)(dict(params))


def jacobian_stack(s, params: Mapping | Tensor | None = None, method: str = "closed") -> tuple[Tensor, list[str]]:
    """``(J, names)`` with J of shape ``(k, *s.shape)``, J[i] = ∂V/∂θ_{names[i]}.

    With no free parameters J has shape ``(0, *s.shape)`` and names is ``[]``.

    Example:
        >>> import reml_fn as rf
        >>> J, names = rf.jacobian_stack(rf.AR1(3))
        >>> tuple(J.shape), names
        ((2, 3, 3), ['sigma^2', 'rho'])
    """
    params = as_params(s, params)
    tree = jacobian(s, params, method)
    names = param_names(s)
    if not names:
        return torch.zeros((0, *s.shape)), []
    return torch.stack([get_path(tree, name) for name in names]), names
