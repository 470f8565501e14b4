"""A correlated residual by blocks: R = blockdiag(R_1, …, R_m) over the groups of a
:class:`~reml_fn.structures.within_group.WithinGroup` residual, without an n × n matrix.

Groups of equal size form a *bucket*: its m_b groups of a_b rows are held as (m_b, a_b, …) arrays,
so nothing is padded and each bucket's blocks are built, factorised and applied at once (one
batched operation per distinct group size). Used by the blocks engine (V block-diagonal) and by
the MME engine (R⁻¹ in the cross products when random terms cross the residual's groups).

Example:
    >>> import torch
    >>> from reml_fn.structures.within_group import WithinGroup
    >>> from reml_fn.reml.residual_blocks import residual_buckets, residual_matrices, apply_blocks
    >>> residual = WithinGroup(torch.tensor([0, 0, 1, 1, 1]), "ar1")
    >>> buckets = residual_buckets(residual, torch.float64)
    >>> [tuple(b.rows.shape) for b in buckets]                 # one group of 2 rows, one of 3
    [(1, 2), (1, 3)]
    >>> raw = {"sigma^2": torch.tensor(0.0, dtype=torch.float64), "rho": torch.tensor(0.0, dtype=torch.float64)}
    >>> blocks = [residual_matrices(residual, raw, b.pairs, [], "closed")[0] for b in buckets]
    >>> apply_blocks(blocks, buckets, torch.ones(5, dtype=torch.float64)).tolist()   # R = I at ρ = 0
    [1.0, 1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.jacobian import autodiff_transform
from reml_fn.structures.base import values_readable
from reml_fn.structures.within_group import (
    RowPairs,
    WithinGroup,
    pairwise_distance,
    positions_within_groups,
    row_pairs,
    within_group_matrix_and_derivatives,
)

__all__ = ["ResidualBucket", "residual_buckets", "residual_matrices", "apply_blocks", "pair_indices", "groups_nested"]


class ResidualBucket(NamedTuple):
    """The m groups of one size a: their rows (m, a) and the residual's row pairs within them."""

    rows: Tensor
    pairs: RowPairs


def residual_buckets(residual: WithinGroup, dtype) -> tuple[ResidualBucket, ...]:
    """The groups of ``residual`` as buckets of equal size, by increasing size (θ-independent:
    computed once per structure; host computation on its codes)."""
    codes = residual.codes
    n = codes.shape[0]
    counts = torch.bincount(codes)
    # table[g, i]: the i-th row of group g (−1 beyond its size).
    table = torch.full((counts.shape[0], int(counts.max())), -1, dtype=torch.long, device=codes.device)
    table[codes, positions_within_groups(codes)] = torch.arange(n, device=codes.device)
    buckets = []
    for size in torch.unique(counts[counts > 0]).tolist():
        rows = table[torch.nonzero(counts == size).flatten(), :size]  # the groups of this size
        pairs = row_pairs(
            torch.ones(*rows.shape, size, dtype=dtype, device=codes.device),
            torch.eye(size, dtype=dtype, device=codes.device).expand(rows.shape[0], size, size),
            pairwise_distance(residual.locations.to(dtype)[rows]),
            residual.strata[rows],
            residual.covariate.to(dtype)[rows],
            residual.locations[:, 0].round().long()[rows],
        )
        buckets.append(ResidualBucket(rows, pairs))
    return tuple(buckets)


def residual_matrices(
    residual: WithinGroup, raw: Mapping, pairs: RowPairs, names: Sequence[str], jacobian: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """R's blocks (m, a, a) for one bucket at the raw parameters ``raw``, and ∂R/∂θ (m, a, a) for
    the raw parameters ``names``: in closed form (``jacobian="closed"``; dR/dθ = dR/dx · t'(θ) with
    the transform's slope folded into the closed form's scalar factors), or by
    ``torch.func.jacfwd``/``jacrev`` (``"fwd"``/``"rev"``), the reference the closed forms are checked
    against."""
    natural = residual._natural(raw)
    names = list(names)
    closed = jacobian == "closed"
    scales = {}
    if closed:
        specs = {spec.name: spec for spec in residual.specs}
        for name in names:
            slope = specs[name].transform._derivative_at(raw[name], natural[name])
            if slope is not None:
                scales[name] = slope
    R, derivatives = within_group_matrix_and_derivatives(residual, natural, names if closed else [], pairs, scales)
    if names and not closed:

        def blocks_at(values: tuple) -> Tensor:
            moved = {**raw, **dict(zip(names, values))}
            return within_group_matrix_and_derivatives(residual, residual._natural(moved), [], pairs)[0]

        columns = autodiff_transform(jacobian)(blocks_at, argnums=0)(tuple(raw[name] for name in names))
        derivatives = dict(zip(names, columns))
    return R, derivatives


def apply_blocks(blocks: Sequence[Tensor], buckets: Sequence[ResidualBucket], values: Tensor) -> Tensor:
    """blockdiag(blocks) · values for values (n,) or (n, c); ``blocks`` per bucket (…, m, a, a),
    leading dimensions (e.g. one block matrix per parameter) carried to the result (…, n[, c]).
    Out of place (vmappable)."""
    vector = values.dim() == 1
    columns = values.unsqueeze(-1) if vector else values
    lead = blocks[0].shape[:-3]
    # The buckets' rows partition 0 … n−1: their products go to their rows in one copy.
    parts = [(block @ columns[bucket.rows]).flatten(-3, -2) for block, bucket in zip(blocks, buckets)]
    rows = torch.cat([bucket.rows.flatten() for bucket in buckets])
    out = columns.new_zeros(*lead, *columns.shape).index_copy(len(lead), rows, torch.cat(parts, dim=len(lead)))
    return out.squeeze(-1) if vector else out


def pair_indices(buckets: Sequence[ResidualBucket]) -> Tensor:
    """(2, P) the rows (i, j) of every within-group pair, P = Σ_g a_g², in the order of the
    buckets' blocks flattened (bucket, group, i, j): the entries of ``torch.cat([b.flatten() for b
    in blocks])`` belong to these pairs.

    Example:
        >>> import torch
        >>> from reml_fn.structures.within_group import WithinGroup
        >>> buckets = residual_buckets(WithinGroup(torch.tensor([0, 1, 1]), "cs"), torch.float64)
        >>> pair_indices(buckets).tolist()   # the group of row 0 alone, then rows 1 and 2: 1 + 2² pairs
        [[0, 1, 1, 2, 2], [0, 1, 2, 1, 2]]
    """
    left, right = [], []
    for bucket in buckets:
        m, a = bucket.rows.shape
        left.append(bucket.rows.unsqueeze(-1).expand(m, a, a).flatten())
        right.append(bucket.rows.unsqueeze(-2).expand(m, a, a).flatten())
    return torch.stack([torch.cat(left), torch.cat(right)])


def groups_nested(inner: Tensor, outer: Tensor) -> bool:
    """Whether every group of the codes ``inner`` (n,) lies inside one group of the codes ``outer``
    (n,): ``outer`` is constant on each group of ``inner``. A host check on the codes; False where
    either cannot be read (per-dataset codes under vmap), so that the caller takes a general path.

    Example:
        >>> import torch
        >>> subject, visit = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
        >>> groups_nested(visit, subject), groups_nested(subject, visit)
        (True, False)
    """
    if not (values_readable(inner) and values_readable(outer)):
        return False
    size = int(inner.max()) + 1 if inner.numel() else 0
    largest = outer.new_full((size,), -1).scatter_reduce(0, inner, outer, "amax")
    smallest = outer.new_full((size,), -1).scatter_reduce(0, inner, outer, "amin", include_self=False)
    return bool((largest == smallest).all())
