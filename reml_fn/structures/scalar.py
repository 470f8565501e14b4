"""Identity, Scalar, EqualEntry and Diagonal: variances times constant patterns.

============  ================  ======================  ==============================
structure     parameters        V                       dV/dx (x natural)
============  ================  ======================  ==============================
Identity(n)   none              I_n                     —
Scalar(n)     ``sigma^2``       σ² I_n                  I_n
EqualEntry    ``sigma^2``       σ² J_{n×m}              J_{n×m}  (all ones)
Diagonal(n)   ``sigma^2_i``     diag(σ²_0 … σ²_{n−1})   e_i e_iᵀ
============  ================  ======================  ==============================

Every variance is σ² = e^{2θ} (ExpPow2) with raw default 0, so dV/dθ = 2σ² · dV/dx.

Example:
    >>> import torch, reml_fn as rf
    >>> s = rf.Diagonal(3)
    >>> s(torch.tensor([0.0, 0.5, 1.0])).diagonal().tolist()
    [1.0, 2.718281828459045, 7.38905609893065]
"""

from __future__ import annotations

import torch
from torch import Tensor

from reml_fn.params import ParamSpec
from reml_fn.structures.base import Parametric, check_size, set_fields, variance_spec
from reml_fn.tree import static, structure

__all__ = ["Identity", "Scalar", "EqualEntry", "Diagonal"]


def _like(natural: dict[str, Tensor]) -> dict:
    ref = next(iter(natural.values()), None)
    if ref is None:
        return {"dtype": torch.get_default_dtype()}
    return {"dtype": ref.dtype, "device": ref.device}


@structure
class Identity(Parametric):
    """The identity matrix I_n; no parameters.

    Example:
        >>> import reml_fn as rf
        >>> rf.Identity(2)().tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        set_fields(self, n=check_size("n", n), specs=())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _build_natural(self, natural):
        return torch.eye(self.n, **_like(natural))

    def _natural_jacobian(self, natural, names):
        return {}


@structure
class Scalar(Parametric):
    """V = σ² I_n, σ² = e^{2θ} (parameter ``sigma^2``, raw default 0).

    dV/dθ = 2σ² I_n.

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.Scalar(2)(torch.tensor([0.5], dtype=torch.float64))[0, 0].item()
        2.718281828459045
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        set_fields(self, n=check_size("n", n), specs=(variance_spec(),))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _build_natural(self, natural):
        sigma2 = natural["sigma^2"]
        return sigma2 * torch.eye(self.n, dtype=sigma2.dtype, device=sigma2.device)

    def _natural_jacobian(self, natural, names):
        sigma2 = natural["sigma^2"]
        return {"sigma^2": torch.eye(self.n, dtype=sigma2.dtype, device=sigma2.device)}


@structure
class EqualEntry(Parametric):
    """V = σ² J_{n×m}: every entry equals σ² (m defaults to n; may be non-square).

    dV/dθ = 2σ² J_{n×m}.

    Example:
        >>> import reml_fn as rf
        >>> rf.EqualEntry(2, 3)().shape
        torch.Size([2, 3])
    """

    n: int = static()
    m: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int, m: int | None = None):
        n = check_size("n", n)
        m = n if m is None else check_size("m", m)
        set_fields(self, n=n, m=m, specs=(variance_spec(),))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.m)

    def _build_natural(self, natural):
        sigma2 = natural["sigma^2"]
        return sigma2 * torch.ones(self.n, self.m, dtype=sigma2.dtype, device=sigma2.device)

    def _natural_jacobian(self, natural, names):
        sigma2 = natural["sigma^2"]
        return {"sigma^2": torch.ones(self.n, self.m, dtype=sigma2.dtype, device=sigma2.device)}


@structure
class Diagonal(Parametric):
    """V = diag(σ²_0, …, σ²_{n−1}), parameters ``sigma^2_0`` … ``sigma^2_{n-1}``.

    dV/dθ_i = 2σ²_i e_i e_iᵀ.

    Example:
        >>> import reml_fn as rf
        >>> rf.param_names(rf.Diagonal(2))
        ['sigma^2_0', 'sigma^2_1']
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        n = check_size("n", n)
        set_fields(self, n=n, specs=tuple(variance_spec(f"sigma^2_{i}") for i in range(n)))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _build_natural(self, natural):
        return torch.diag_embed(torch.stack([natural[s.name] for s in self.specs]))

    def _natural_jacobian(self, natural, names):
        units = torch.diag_embed(torch.eye(self.n, **_like(natural)))  # units[i] = e_i e_iᵀ
        index = {s.name: i for i, s in enumerate(self.specs)}
        return {name: units[index[name]] for name in names}
