"""torch-openreml's transform names (``torch_openreml.covariance.transform``) over :mod:`reml_fn.transforms`.

Each ``TransformX`` is the functional transform ``X`` with torch-openreml's spelling: calling it
is the forward map, ``inverse`` the inverse and ``grad(θ)`` the derivative d forward/dθ (the
functional ``derivative``). They are valid functional transforms, so they can be given to
``set_param_specs(..., trans=...)`` or to a :class:`~reml_fn.params.ParamSpec`.

============================  ===================================  ====================
torch-openreml                reml_fn.compat.transform             reml_fn.transforms
============================  ===================================  ====================
TransformIdentity()           TransformIdentity()                  Identity()
TransformExp()                TransformExp()                       Exp()
TransformExp2()               TransformExp2()                      Exp2()
TransformExp10()              TransformExp10()                     Exp10()
TransformExpPow2()            TransformExpPow2()                   ExpPow2()
TransformSigmoid()            TransformSigmoid()                   Sigmoid()
TransformScaleShift(a, b)     TransformScaleShift(a, b)            ScaleShift(a, b)
TransformPow(factor)          TransformPow(factor)                 Pow(factor)
TransformChain([t1, t2])      TransformChain([t1, t2])             Chain((t1, t2))
Transform (subclass it)       Transform (define __call__/grad)     Transform (forward/derivative)
============================  ===================================  ====================

Unlike torch-openreml, ``TransformScaleShift(a, b).grad(θ)`` has θ's shape (torch-openreml returns
a tensor of shape (1,), which broke some closed-form Jacobians).

Example:
    >>> import torch
    >>> from reml_fn.compat.transform import TransformChain, TransformScaleShift, TransformSigmoid
    >>> rho = TransformChain([TransformSigmoid(), TransformScaleShift(2.0, -1.0)])
    >>> rho
    TransformChain([TransformSigmoid(), TransformScaleShift(a=2.0, b=-1.0)])
    >>> rho(torch.tensor([0.0, 2.0])).tolist(), rho.grad(torch.tensor([0.0])).tolist()
    ([0.0, 0.7615941559557646], [0.5])
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from reml_fn import transforms as functional

__all__ = [
    "Transform",
    "TransformChain",
    "TransformIdentity",
    "TransformExp",
    "TransformExp2",
    "TransformExp10",
    "TransformSigmoid",
    "TransformScaleShift",
    "TransformPow",
    "TransformExpPow2",
    "as_compat_transform",
]


class Transform(functional.Transform):
    """torch-openreml's transform base: ``t(θ)`` forward, ``t.inverse(x)``, ``t.grad(θ)`` derivative.

    A subclass written for torch-openreml (defining ``__call__``, ``inverse`` and ``grad``) works
    as a functional transform too: ``forward`` calls ``__call__`` and ``derivative`` calls ``grad``.
    """

    def __call__(self, raw: Tensor) -> Tensor:
        return self.forward(raw)

    def grad(self, raw: Tensor) -> Tensor:
        """d forward / dθ at the raw value θ (the functional ``derivative``)."""
        return self.derivative(raw)

    def forward(self, raw: Tensor) -> Tensor:
        if type(self).__call__ is Transform.__call__:
            raise NotImplementedError(f"{type(self).__name__} defines neither forward nor __call__")
        return self(raw)

    def derivative(self, raw: Tensor) -> Tensor:
        if type(self).grad is Transform.grad:
            raise NotImplementedError(f"{type(self).__name__} defines neither derivative nor grad")
        return self.grad(raw)


class TransformIdentity(functional.Identity, Transform):
    """f(θ) = θ; :class:`reml_fn.transforms.Identity`."""


class TransformExp(functional.Exp, Transform):
    """f(θ) = e^θ; :class:`reml_fn.transforms.Exp`."""


class TransformExp2(functional.Exp2, Transform):
    """f(θ) = 2^θ; :class:`reml_fn.transforms.Exp2`."""


class TransformExp10(functional.Exp10, Transform):
    """f(θ) = 10^θ; :class:`reml_fn.transforms.Exp10`."""


class TransformExpPow2(functional.ExpPow2, Transform):
    """σ² = e^{2θ}; :class:`reml_fn.transforms.ExpPow2`."""


class TransformSigmoid(functional.Sigmoid, Transform):
    """f(θ) = 1 / (1 + e^{−θ}); :class:`reml_fn.transforms.Sigmoid`."""


class TransformScaleShift(functional.ScaleShift, Transform):
    """f(θ) = a θ + b; :class:`reml_fn.transforms.ScaleShift`."""


class TransformPow(functional.Pow, Transform):
    """f(θ) = θ^p; :class:`reml_fn.transforms.Pow`."""


class TransformChain(functional.Chain, Transform):
    """Stages applied in list order; :class:`reml_fn.transforms.Chain`.

    Args:
        chain: a Transform or a list/tuple of Transforms.
    """

    def __init__(self, chain: Any):
        if isinstance(chain, functional.Transform):
            chain = [chain]
        if not isinstance(chain, (list, tuple)) or not all(isinstance(t, functional.Transform) for t in chain):
            raise TypeError("Chain needs to be a list or a tuple of Transform objects!")
        super().__init__(tuple(as_compat_transform(t) for t in chain))

    @property
    def chain(self) -> list[functional.Transform]:
        """The stages, in order."""
        return list(self.stages)

    def __repr__(self) -> str:
        return f"TransformChain([{', '.join(repr(t) for t in self.stages)}])"


_COMPAT = {
    functional.Identity: TransformIdentity,
    functional.Exp: TransformExp,
    functional.Exp2: TransformExp2,
    functional.Exp10: TransformExp10,
    functional.ExpPow2: TransformExpPow2,
    functional.Sigmoid: TransformSigmoid,
    functional.ScaleShift: TransformScaleShift,
    functional.Pow: TransformPow,
}


def as_compat_transform(t: functional.Transform) -> functional.Transform:
    """The torch-openreml-spelled twin of a functional transform (same map, plus ``grad``).

    Transforms that already have ``grad``, and user-defined ones, are returned unchanged.

    Example:
        >>> from reml_fn.transforms import ExpPow2
        >>> as_compat_transform(ExpPow2())
        TransformExpPow2()
    """
    if isinstance(t, Transform):
        return t
    if type(t) is functional.Chain:
        return TransformChain(list(t.stages))
    twin = _COMPAT.get(type(t))
    if twin is None:
        return t
    if twin is TransformScaleShift:
        return twin(t.a, t.b)
    if twin is TransformPow:
        return twin(t.factor)
    return twin()
