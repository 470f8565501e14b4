"""Raw ↔ natural parameter maps.

A transform maps a *raw* (unconstrained, optimiser-scale) value θ to the *natural* value that
enters a covariance matrix. Every transform is an immutable, hashable dataclass (so it can live in
a structure's static configuration) with three pure, elementwise, shape-preserving methods:

* ``forward(θ)``   (also ``transform(θ)``): the natural value,
* ``inverse(x)``:   the raw value whose forward is ``x``,
* ``derivative(θ)``: d forward / dθ, evaluated at the raw value.

The formulas follow torch-openreml 0.4.0a0 (``torch_openreml.covariance.transform``):

============  ======================  =====================  ==========================
transform     forward f(θ)            inverse f⁻¹(x)         derivative f'(θ)
============  ======================  =====================  ==========================
Identity      θ                       x                      1
Exp           e^θ                     log x                  e^θ
Exp2          2^θ                     log₂ x                 2^θ ln 2
Exp10         10^θ                    log₁₀ x                10^θ ln 10
ExpPow2       e^{2θ}                  ½ log x                2 e^{2θ}
Sigmoid       1 / (1 + e^{-θ})        logit x                σ(θ)(1 − σ(θ))
ScaleShift    a θ + b                 (x − b) / a            a   (same shape as θ)
Pow           θ^p                     x^{1/p}                p θ^{p−1}
Chain         f_k ∘ … ∘ f_1           f_1⁻¹ ∘ … ∘ f_k⁻¹      ∏ f_i'(θ_i)  (chain rule)
============  ======================  =====================  ==========================

Two private hooks serve the structures' hot path (``reml_fn.structures.base.Parametric``), where each
ATen call costs a few microseconds: ``_derivative_at(θ, x)`` is f'(θ) given x = f(θ) already computed
(None when f' ≡ 1, so the chain-rule product is skipped), and ``_keeps_tangent_dtype`` says that
``forward`` uses no Python-number arithmetic, so its forward-mode tangent keeps θ's dtype under
``torch.func.jvp``/``jacfwd`` (a Python float times a 0-d float32 tensor gets a float64 tangent,
pytorch/functorch#1073) and the structures need not copy its result to cast the tangent back.

Example:
    >>> import torch
    >>> from reml_fn.transforms import ExpPow2, Chain, Sigmoid, ScaleShift
    >>> ExpPow2().forward(torch.tensor(0.5, dtype=torch.float64)).item()
    2.718281828459045
    >>> rho = Chain((Sigmoid(), ScaleShift(2.0, -1.0)))   # AR(1): ρ = 2σ(θ) − 1
    >>> rho.forward(torch.tensor(0.0, dtype=torch.float64)).item()
    0.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Transform",
    "Identity",
    "Exp",
    "Exp2",
    "Exp10",
    "ExpPow2",
    "Sigmoid",
    "ScaleShift",
    "Pow",
    "Chain",
    "columnwise",
]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Base class of raw → natural maps. Subclasses define ``forward``, ``inverse``, ``derivative``."""

    domain = "ℝ"
    codomain = "ℝ"
    # True only where ``forward`` is built from tensor-tensor and unary ops (no Python numbers), so
    # its forward-mode tangent has θ's dtype (see the module docstring).
    _keeps_tangent_dtype = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The two hooks describe the formulas of the class that states them: a subclass redefining
        # ``forward``/``derivative`` without restating them falls back to the safe generic versions.
        own = vars(cls)
        if "forward" in own and "_keeps_tangent_dtype" not in own:
            cls._keeps_tangent_dtype = False
        if ("forward" in own or "derivative" in own) and "_derivative_at" not in own:
            cls._derivative_at = Transform._derivative_at

    def forward(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, natural: Tensor) -> Tensor:
        raise NotImplementedError

    def derivative(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def _derivative_at(self, raw: Tensor, natural: Tensor) -> Tensor | None:
        """f'(θ) given ``natural`` = f(θ); None means exactly 1 everywhere. Same values as ``derivative``."""
        return self.derivative(raw)

    def __call__(self, raw: Tensor) -> Tensor:
        return self.forward(raw)

    def __str__(self) -> str:
        return f"{type(self).__name__}: {self.domain} ↦ {self.codomain}"


def _is_number(x) -> bool:
    """A real Python number, not a bool (True would silently mean 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_float(x):
    """Python numbers become float64 tensors so ``inverse(0.3)`` works; tensors pass through."""
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    """f(θ) = θ."""

    _keeps_tangent_dtype = True

    def forward(self, raw):
        return _as_float(raw)

    def inverse(self, natural):
        return _as_float(natural)

    def derivative(self, raw):
        return torch.ones_like(_as_float(raw))

    def _derivative_at(self, raw, natural):
        return None


@dataclasses.dataclass(frozen=True)
class Exp(Transform):
    """f(θ) = e^θ, f'(θ) = e^θ."""

    codomain = "ℝ⁺"
    _keeps_tangent_dtype = True

    def forward(self, raw):
        return torch.exp(_as_float(raw))

    def inverse(self, natural):
        return torch.log(_as_float(natural))

    def derivative(self, raw):
        return torch.exp(_as_float(raw))

    def _derivative_at(self, raw, natural):
        return natural


@dataclasses.dataclass(frozen=True)
class Exp2(Transform):
    """f(θ) = 2^θ, f'(θ) = 2^θ ln 2."""

    codomain = "ℝ⁺"

    def forward(self, raw):
        return torch.exp2(_as_float(raw))

    def inverse(self, natural):
        return torch.log2(_as_float(natural))

    def derivative(self, raw):
        return torch.exp2(_as_float(raw)) * math.log(2.0)

    def _derivative_at(self, raw, natural):
        return natural * math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Exp10(Transform):
    """f(θ) = 10^θ, f'(θ) = 10^θ ln 10."""

    codomain = "ℝ⁺"

    def forward(self, raw):
        return torch.exp(_as_float(raw) * math.log(10.0))

    def inverse(self, natural):
        return torch.log10(_as_float(natural))

    def derivative(self, raw):
        return torch.exp(_as_float(raw) * math.log(10.0)) * math.log(10.0)


@dataclasses.dataclass(frozen=True)
class ExpPow2(Transform):
    """σ² = f(θ) = e^{2θ} (θ = log σ), f'(θ) = 2 e^{2θ}. The variance transform of every structure.

    2θ and 2x are computed as θ + θ and x + x: the same values as 2.0 · θ (doubling is exact), with no
    Python number whose float64 forward-mode tangent would leak (see the module docstring).
    """

    codomain = "ℝ⁺"
    _keeps_tangent_dtype = True

    def forward(self, raw):
        raw = _as_float(raw)
        return torch.exp(raw + raw)

    def inverse(self, natural):
        return 0.5 * torch.log(_as_float(natural))

    def derivative(self, raw):
        raw = _as_float(raw)
        natural = torch.exp(raw + raw)
        return natural + natural

    def _derivative_at(self, raw, natural):
        return natural + natural


@dataclasses.dataclass(frozen=True)
class Sigmoid(Transform):
    """f(θ) = 1 / (1 + e^{-θ}), f'(θ) = f(θ)(1 − f(θ))."""

    codomain = "(0, 1)"
    _keeps_tangent_dtype = True

    def forward(self, raw):
        return torch.sigmoid(_as_float(raw))

    def inverse(self, natural):
        return torch.logit(_as_float(natural))

    def derivative(self, raw):
        s = torch.sigmoid(_as_float(raw))
        return s * (1.0 - s)

    def _derivative_at(self, raw, natural):
        return natural * (1.0 - natural)


@dataclasses.dataclass(frozen=True)
class ScaleShift(Transform):
    """f(θ) = a θ + b, f'(θ) = a (a tensor of θ's shape, unlike torch-openreml's shape-(1,) bug)."""

    a: float
    b: float = 0.0

    def __post_init__(self):
        if not (_is_number(self.a) and _is_number(self.b)):
            raise TypeError(f"ScaleShift(a, b) needs Python numbers, got a={self.a!r}, b={self.b!r}")
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError(f"ScaleShift(a, b) needs finite numbers, got a={self.a!r}, b={self.b!r}")
        if self.a == 0:
            raise ValueError("ScaleShift(a, b) needs a != 0 to be invertible")

    def forward(self, raw):
        return self.a * _as_float(raw) + self.b

    def inverse(self, natural):
        return (_as_float(natural) - self.b) / self.a

    def derivative(self, raw):
        return torch.full_like(_as_float(raw), float(self.a))


@dataclasses.dataclass(frozen=True)
class Pow(Transform):
    """f(θ) = θ^p, inverse x^{1/p}, f'(θ) = p θ^{p−1} (NaN for θ < 0 with non-integer p)."""

    factor: float = 2.0

    def __post_init__(self):
        if not _is_number(self.factor):
            raise TypeError(f"Pow(factor) needs a Python number, got {self.factor!r}")
        if not math.isfinite(self.factor) or self.factor == 0:
            raise ValueError(f"Pow(factor) needs a finite non-zero number, got {self.factor!r}")

    def forward(self, raw):
        return torch.pow(_as_float(raw), self.factor)

    def inverse(self, natural):
        return torch.pow(_as_float(natural), 1.0 / self.factor)

    def derivative(self, raw):
        return self.factor * torch.pow(_as_float(raw), self.factor - 1.0)


@dataclasses.dataclass(frozen=True)
class Chain(Transform):
    """Apply ``stages`` in order: f = f_k ∘ … ∘ f_1.

    The derivative is the chain rule, ∏_i f_i'(θ_i), where θ_1 = θ and θ_{i+1} = f_i(θ_i).

    Example:
        >>> import torch
        >>> t = Chain((Sigmoid(), ScaleShift(2.0, -1.0)))
        >>> round(t.derivative(torch.tensor(0.0)).item(), 6)
        0.5
    """

    stages: tuple[Transform, ...]

    def __init__(self, stages):
        if isinstance(stages, Transform):
            stages = (stages,)
        if not isinstance(stages, (list, tuple)) or not stages:
            raise TypeError("Chain needs a non-empty list or tuple of Transform objects")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Transform):
                raise TypeError(f"Chain stage {i} must be a Transform, got {type(stage).__name__}")
        object.__setattr__(self, "stages", tuple(stages))

    @property
    def domain(self):  # type: ignore[override]
        return self.stages[0].domain

    @property
    def codomain(self):  # type: ignore[override]
        return self.stages[-1].codomain

    @property
    def _keeps_tangent_dtype(self):  # type: ignore[override]
        return all(stage._keeps_tangent_dtype for stage in self.stages)

    def forward(self, raw):
        x = _as_float(raw)
        for stage in self.stages:
            x = stage.forward(x)
        return x

    def inverse(self, natural):
        x = _as_float(natural)
        for stage in reversed(self.stages):
            x = stage.inverse(x)
        return x

    def derivative(self, raw):
        x = _as_float(raw)
        result = None
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if i < last:  # f_i'(θ_i) from θ_{i+1} = f_i(θ_i), which the next stage needs anyway
                following = stage.forward(x)
                slope = stage._derivative_at(x, following)
                x = following
            else:
                slope = stage.derivative(x)
            if slope is not None:  # None: exactly 1
                result = slope if result is None else result * slope
        if not (isinstance(result, Tensor) and result.shape == x.shape):  # all 1, or a custom stage's 0-d slope
            result = torch.ones_like(x) if result is None else torch.ones_like(x) * result
        return result


def columnwise(transforms: Sequence[Transform], values: Tensor, inverse: bool = False) -> Tensor:
    """``values`` (…, k) with column j mapped by ``transforms[j]`` (``forward``, or ``inverse``):
    one call per distinct transform on the columns that share it, Identity columns untouched.
    Pure and vmappable.

    Example:
        >>> import torch
        >>> raw = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
        >>> natural = columnwise([ExpPow2(), Identity(), ExpPow2()], raw)
        >>> [round(v, 4) for v in natural.tolist()]  # e^{2θ}, θ, e^{2θ}
        [1.0, 0.5, 7.3891]
        >>> torch.allclose(columnwise([ExpPow2(), Identity(), ExpPow2()], natural, inverse=True), raw)
        True
    """
    groups: list[tuple[Transform, list[int]]] = []  # by equality (a custom transform need not hash)
    for j, transform in enumerate(transforms):
        group = next((columns for known, columns in groups if known == transform), None)
        if group is None:
            groups.append((transform, [j]))
        else:
            group.append(j)
    out = values
    for transform, columns in groups:
        if isinstance(transform, Identity):
            continue
        apply = transform.inverse if inverse else transform.forward
        if len(columns) == values.shape[-1]:  # one transform for every column
            return apply(values)
        index = torch.tensor(columns, device=values.device)
        out = out.index_copy(-1, index, apply(values.index_select(-1, index)))
    return out
