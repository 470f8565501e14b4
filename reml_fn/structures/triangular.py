"""Unstructured (symmetric) and LowerTriangular matrices: one parameter per free entry.

====================  =====================================  =================  ==================================
structure             parameters (row-major lower triangle)  transform          V
====================  =====================================  =================  ==================================
Unstructured(n)       ``sigma^2_i_j``, 0 ≤ j ≤ i < n         diag ExpPow2,      V_ij = V_ji = x_ij
                                                             off-diag Identity
LowerTriangular(n,m)  ``L_i_j``, j ≤ i, j < m                Identity,          L_ij = x_ij (j ≤ i), 0 above
                                                             raw default 1.0
====================  =====================================  =================  ==================================

dV/dx_ij is the unit matrix E_ij + E_ji (E_ii on the diagonal) for Unstructured and E_ij for
LowerTriangular. Unstructured is symmetric but not guaranteed positive definite; for a PD
parameterisation use ``Gram(LowerTriangular(n, n), gram_type="xxt")``.

Example:
    >>> import torch, reml_fn as rf
    >>> rf.param_names(rf.Unstructured(2))
    ['sigma^2_0_0', 'sigma^2_1_0', 'sigma^2_1_1']
    >>> rf.Unstructured(2)(torch.tensor([0.0, 0.3, 0.0])).tolist()
    [[1.0, 0.3], [0.3, 1.0]]
"""

from __future__ import annotations

import functools
from types import MappingProxyType

import torch

from reml_fn.params import ParamSpec
from reml_fn.structures.base import Parametric, check_size, set_fields
from reml_fn.transforms import ExpPow2, Identity
from reml_fn.tree import static, structure

__all__ = ["Unstructured", "LowerTriangular"]


@functools.lru_cache(maxsize=256)
def _layout(names: tuple[str, ...], rows: int, cols: int, symmetric: bool):
    """Where each parameter goes, parsed once per configuration from the names ``<prefix>_i_j``.

    Returns ``cells``: for each matrix entry in row-major order, the index into ``names`` of the
    parameter stored there, or -1 for a structural zero (both (i, j) and (j, i) when ``symmetric``);
    and ``flat``: each name's flat position i·cols + j among the ``rows·cols`` unit matrices
    (read-only: the result is cached). Python ints only, never tensors.
    """
    cells = [-1] * (rows * cols)
    flat = {}
    for k, name in enumerate(names):
        i, j = (int(part) for part in name.split("_")[-2:])
        cells[i * cols + j] = k
        if symmetric:
            cells[j * cols + i] = k
        flat[name] = i * cols + j
    return tuple(cells), MappingProxyType(flat)


def _fill(self, natural, symmetric: bool):
    # One stack of the rows·cols entries (0-d natural values, each off-diagonal one referenced twice
    # when symmetric) and a view: a couple of ATen calls whatever the size, and vmappable.
    names = tuple(s.name for s in self.specs)
    cells, _ = _layout(names, *self.shape, symmetric)
    values = [natural[name] for name in names]
    if -1 in cells:
        ref = values[0]
        values.append(torch.zeros((), dtype=ref.dtype, device=ref.device))  # index -1: the zero
    return torch.stack([values[k] for k in cells]).view(self.shape)


def _units(self, natural, names, symmetric: bool):
    # All rows·cols unit matrices E_ij at once (the rows of an identity, viewed as matrices), made
    # symmetric with E_ij + E_ji = max(E_ij, E_ji); each name gets its own (single) view of that
    # fresh tensor: nothing is shared between calls.
    ref = next(iter(natural.values()))
    rows, cols = self.shape
    _, flat = _layout(tuple(s.name for s in self.specs), rows, cols, symmetric)
    units = torch.eye(rows * cols, dtype=ref.dtype, device=ref.device).view(rows * cols, rows, cols)
    if symmetric:
        units = torch.maximum(units, units.transpose(1, 2))
    return {name: units[flat[name]] for name in names}


@structure
class Unstructured(Parametric):
    """A general symmetric n×n matrix: V_ij = V_ji = x_ij (torch-openreml's UnconstrainedMatrix).

    Diagonal entries ``sigma^2_i_i`` = e^{2θ}; off-diagonal ``sigma^2_i_j`` (i > j) are the
    covariances themselves (Identity transform). All raw defaults 0 (V = I).

    Example:
        >>> import torch, reml_fn as rf
        >>> rf.Unstructured(2)(torch.tensor([0.0, 0.5, 0.0])).tolist()
        [[1.0, 0.5], [0.5, 1.0]]
    """

    n: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int):
        n = check_size("n", n)
        specs = tuple(
            ParamSpec(f"sigma^2_{i}_{j}", 0.0, ExpPow2() if i == j else Identity())
            for i in range(n)
            for j in range(i + 1)
        )
        set_fields(self, n=n, specs=specs)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _build_natural(self, natural):
        return _fill(self, natural, symmetric=True)

    def _natural_jacobian(self, natural, names):
        return _units(self, natural, names, symmetric=True)


@structure
class LowerTriangular(Parametric):
    """An n×m lower-triangular matrix L with free entries ``L_i_j`` (j ≤ i, j < m), raw default 1.

    Example:
        >>> import reml_fn as rf
        >>> rf.param_names(rf.LowerTriangular(2, 3))
        ['L_0_0', 'L_1_0', 'L_1_1']
    """

    n: int = static()
    m: int = static()
    specs: tuple[ParamSpec, ...] = static()

    def __init__(self, n: int, m: int):
        n, m = check_size("n", n), check_size("m", m)
        specs = tuple(ParamSpec(f"L_{i}_{j}", 1.0, Identity()) for i in range(n) for j in range(min(i + 1, m)))
        set_fields(self, n=n, m=m, specs=specs)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.m)

    def _build_natural(self, natural):
        return _fill(self, natural, symmetric=False)

    def _natural_jacobian(self, natural, names):
        return _units(self, natural, names, symmetric=False)
