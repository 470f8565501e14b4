"""Correlation patterns: Equicorrelation, CompoundSymmetric and AR1.

==================  ========================  =====================================  ===================================
structure           parameters                V                                      dV/dx (x natural)
==================  ========================  =====================================  ===================================
Equicorrelation(n)  ``rho``                   (1 − ρ) I + ρ J                        J − I
CompoundSymmetric   ``sigma^2``, ``rho``      σ² [(1 − ρ) I + ρ J]                   σ²: (1−ρ)I + ρJ;  ρ: σ² (J − I)
AR1(n)              ``sigma^2``, ``rho``      σ² ρ^{|i−j|}                           σ²: ρ^{|i−j|};  ρ: σ² |i−j| ρ^{|i−j|−1}
==================  ========================  =====================================  ===================================

Transforms (torch-openreml's): σ² = e^{2θ}; the equicorrelation ρ = ρ_min + (1 − ρ_min) sigmoid(θ)
with ρ_min = −1/(n − 1), the smallest value keeping V positive semi-definite (raw 0 gives
ρ = (1 + ρ_min)/2: 0.25 for n = 3); AR(1)'s ρ = 2 sigmoid(θ) − 1 ∈ (−1, 1) (raw 0 gives ρ = 0).

AR1's dV/dρ is evaluated as |i−j| ρ^{max(|i−j|−1, 0)}, exact at ρ = 0 (torch-openreml divides by
ρ there and returns NaN, crashing every AR(1) fit from its default start).

Example:
    >>> import torch, reml_fn as rf
    >>> V = rf.AR1(4)(torch.tensor([0.5, 1.0], dtype=torch.float64))
    >>> [round(v, 6) for v in V[0].tolist()]
    [2.718282, 1.256165, 0.580495, 0.268257]
"""

from __future__ import annotations

import torch

from reml_fn.params import ParamSpec
from reml_fn.structures.base import Parametric, check_size, set_fields, variance_spec
from reml_fn.transforms import Chain, ScaleShift, Sigmoid
from reml_fn.tree import static, structure

__all__ = ["Equicorrelation", "CompoundSymmetric", "AR1", "equicorrelation_rho_transform", "ar1_rho_transform"]


def equicorrelation_rho_transform(n: int) -> Chain:
    """ρ = ρ_min + (1 − ρ_min) sigmoid(θ), ρ_min = −1/(n − 1)."""
    rho_min = -1.0 / (n - 1)
    return Chain((Sigmoid(), ScaleShift(1.0 - rho_min, rho_min)))


def ar1_rho_transform() -> Chain:
    """ρ = 2 sigmoid(θ) − 1."""
    return Chain((Sigmoid(), ScaleShift(2.0, -1.0)))


def _eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _equicorrelation(rho, eye):
    """(1 − ρ) I + ρ J in one fused op: ρ + (1 − ρ) I. The products with I's 0s and 1s are exact, so
    the entries are exactly those of the two-term formula (ρ off the diagonal, (1 − ρ) + ρ on it)."""
    return torch.addcmul(rho, 1.0 - rho, eye)


@structure
class Equicorrelation(Parametric):
    """Correlation matrix with every off-diagonal entry ρ: V = (1 − ρ) I + ρ J (n ≥ 2).

    dV/dθ = (J − I) · dρ/dθ.

    Example:
        >>> import reml_fn as rf
        >>> round(float(rf.Equicorrelation(3)()[0, 1]), 6)
        0.25
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        n = check_size("n", n, minimum=2)
        set_fields(self, n=n, specs=(ParamSpec("rho", 0.0, equicorrelation_rho_transform(n)),))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def rho_min(self) -> float:
        return -1.0 / (self.n - 1)

    def _build_natural(self, natural):
        rho = natural["rho"]
        return _equicorrelation(rho, _eye(self.n, rho))

    def _natural_jacobian(self, natural, names):
        return {"rho": 1.0 - _eye(self.n, natural["rho"])}  # J − I


@structure
class CompoundSymmetric(Parametric):
    """V = σ² [(1 − ρ) I + ρ J]: common variance σ², common covariance σ² ρ (n ≥ 2).

    dV/dσ² = (1 − ρ) I + ρ J;  dV/dρ = σ² (J − I).

    Example:
        >>> import torch, reml_fn as rf
        >>> V = rf.CompoundSymmetric(3)(torch.tensor([0.5, 1.0], dtype=torch.float64))
        >>> round(float(V[0, 1]), 10)
        1.6216939605
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        n = check_size("n", n, minimum=2)
        set_fields(
            self,
            n=n,
            specs=(variance_spec(), ParamSpec("rho", 0.0, equicorrelation_rho_transform(n))),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def rho_min(self) -> float:
        return -1.0 / (self.n - 1)

    def _build_natural(self, natural):
        rho = natural["rho"]
        return natural["sigma^2"] * _equicorrelation(rho, _eye(self.n, rho))

    def _natural_jacobian(self, natural, names):
        sigma2, rho = natural["sigma^2"], natural["rho"]
        eye = _eye(self.n, rho)
        out = {}
        if "sigma^2" in names:
            out["sigma^2"] = _equicorrelation(rho, eye)
        if "rho" in names:
            out["rho"] = sigma2 * (1.0 - eye)  # σ² (J − I)
        return out


@structure
class AR1(Parametric):
    """First-order autoregressive covariance: V_ij = σ² ρ^{|i−j|} (n ≥ 1).

    dV/dσ² = ρ^{|i−j|};  dV/dρ = σ² |i−j| ρ^{|i−j|−1} (0 on the diagonal; exact at ρ = 0).

    Example:
        >>> import reml_fn as rf
        >>> rf.AR1(3)().tolist()   # raw defaults: σ² = 1, ρ = 0
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        set_fields(
            self,
            n=check_size("n", n),
            specs=(variance_spec(), ParamSpec("rho", 0.0, ar1_rho_transform())),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _lags(self, like):
        i = torch.arange(self.n, dtype=like.dtype, device=like.device)  # small integers: exact in floating point
        return (i.unsqueeze(1) - i).abs()

    def _build_natural(self, natural):
        sigma2, rho = natural["sigma^2"], natural["rho"]
        return sigma2 * torch.pow(rho, self._lags(rho))

    def _natural_jacobian(self, natural, names):
        sigma2, rho = natural["sigma^2"], natural["rho"]
        lags = self._lags(rho)
        out = {}
        if "sigma^2" in names:
            out["sigma^2"] = torch.pow(rho, lags)
        if "rho" in names:
            # |i−j| ρ^{max(|i−j|−1, 0)}: never divides by ρ, so ρ = 0 is exact.
            out["rho"] = sigma2 * lags * torch.pow(rho, (lags - 1.0).clamp(min=0.0))
        return out
