"""Grouped: the lme4 random-effects term ``(covariates | groups)`` as a covariance structure.

Observation i belongs to group g_i ∈ {0, …, m−1} and has covariates x_i ∈ ℝᵏ (a 1 for a random
intercept; (1, t_i) for a random intercept and slope on t). Each group has its own effect
u_g ~ N(0, Σ), Σ = ``cov`` (k×k), independently, so y_i gets x_iᵀ u_{g_i} and

    V = Z G Zᵀ,   G = I_m ⊗ Σ,   Z[i, g·k + a] = [g_i = g] · x_ia      (Z is n × m·k),
    V_ij = [g_i = g_j] · x_iᵀ Σ x_j,
    ∂V/∂θ = Z (I_m ⊗ ∂Σ/∂θ) Zᵀ,   (∂V/∂θ)_ij = [g_i = g_j] · x_iᵀ (∂Σ/∂θ) x_j.

Z is never stored: the structure keeps the integer group codes (n,) and the covariates (n, k),
both *data* leaves (so ``vmap`` can batch over them), and the number of groups m as static
configuration. ``build`` forms the dense n×n matrix (O(n²): for checks and the dense engine);
the mixed-model-equation engine (:mod:`reml_fn.reml.mme`) only uses the O(n·k) operations
:meth:`Grouped.sum_by_group` (Zᵀv), :meth:`Grouped.expand` (Zu) and
:meth:`Grouped.group_cross_products` (the diagonal blocks of ZᵀWZ).

Grouped lives with the combinators because it has a child structure (``cov``, parameter paths
``cov/...``) and reuses the combinator machinery for parameter routing, ``fix`` and Jacobians.

Example:
    >>> import torch, reml_fn as rf
    >>> s = rf.Grouped(groups=["b", "a", "b"], cov=rf.Scalar(1))
    >>> s.levels, s.codes.tolist()
    (('a', 'b'), [1, 0, 1])
    >>> s(torch.tensor([0.5])).tolist()     # σ² = e^{2·0.5} within a group, 0 between groups
    [[2.718281828459045, 0.0, 2.718281828459045], [0.0, 2.718281828459045, 0.0], [2.718281828459045, 0.0, 2.718281828459045]]
    >>> rf.param_names(rf.Sum(subject=rf.Grouped(torch.tensor([0, 0, 1]), rf.Unstructured(1)), residual=rf.Scalar(3)))
    ['subject/cov/sigma^2_0_0', 'residual/sigma^2']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from reml_fn.combinators.base import Combinator, child_params, named_children, tree_map
from reml_fn.structures.base import Structure, set_fields, values_readable
from reml_fn.structures.scalar import Scalar
from reml_fn.structures.triangular import Unstructured
from reml_fn.tree import static, structure

__all__ = ["Grouped"]


def _is_transformed(t: Tensor) -> bool:
    """True inside vmap/grad/jacfwd, where a tensor's values cannot be read."""
    return not values_readable(t)


def _codes_from_tensor(groups: Tensor, num_groups: int | None) -> tuple[Tensor, int]:
    if groups.dim() != 1:
        raise ValueError(f"Grouped: groups must be a 1-D tensor of group codes (n,), got shape {tuple(groups.shape)}")
    if groups.dtype == torch.bool or groups.is_floating_point() or groups.is_complex():
        raise TypeError(
            f"Grouped: group codes must be an integer tensor, got {groups.dtype}; pass labels as a list "
            "(e.g. groups.tolist()) to have them coded by their sorted unique values"
        )
    if groups.shape[0] == 0:
        raise ValueError("Grouped: groups is empty; need at least one observation")
    codes = groups.to(torch.int64)
    if _is_transformed(codes):
        if num_groups is None:
            raise ValueError("Grouped: give num_groups= when constructing a Grouped inside vmap/grad")
        return codes, num_groups
    low, high = int(codes.min()), int(codes.max())
    if low < 0:
        bad = torch.nonzero(codes < 0).flatten()[:5].tolist()
        raise ValueError(f"Grouped: group codes must be non-negative, got {low} (at positions {bad})")
    if num_groups is None:
        num_groups = high + 1
    elif high >= num_groups:
        bad = torch.nonzero(codes >= num_groups).flatten()[:5].tolist()
        raise ValueError(f"Grouped: group codes must be < num_groups = {num_groups}, got {high} (at positions {bad})")
    return codes, num_groups


def _codes_from_labels(groups: Any, num_groups: int | None) -> tuple[Tensor, int, tuple]:
    if isinstance(groups, (str, bytes)):
        raise TypeError("Grouped: groups must be a sequence of labels or an integer code tensor, got a string")
    if callable(getattr(groups, "tolist", None)):
        if getattr(groups, "ndim", 1) != 1:
            raise ValueError(f"Grouped: groups must be one-dimensional, got shape {tuple(groups.shape)}")
        groups = groups.tolist()
    if not isinstance(groups, (list, tuple)):
        raise TypeError(
            f"Grouped: groups must be an integer tensor of codes or a sequence of labels, got {type(groups).__name__}"
        )
    if not groups:
        raise ValueError("Grouped: groups is empty; need at least one observation")
    labels = [g.item() if isinstance(g, Tensor) else g for g in groups]
    try:
        levels = tuple(sorted(set(labels)))
    except TypeError as error:
        raise TypeError(f"Grouped: group labels must be sortable (all str or all numbers): {error}") from None
    if num_groups is not None and num_groups != len(levels):
        raise ValueError(f"Grouped: the labels have {len(levels)} levels but num_groups = {num_groups}")
    index = {level: g for g, level in enumerate(levels)}
    codes = torch.tensor([index[label] for label in labels], dtype=torch.int64)
    return codes, len(levels), levels


@structure
class Grouped(Combinator):
    """The random-effects term ``(covariates | groups)``: V = Z (I_m ⊗ Σ) Zᵀ (n × n).

    V_ij = [g_i = g_j] · x_iᵀ Σ x_j;  ∂V/∂θ = Z (I_m ⊗ ∂Σ/∂θ) Zᵀ, with ∂Σ/∂θ the child's closed form.

    Args:
        groups: an integer code tensor (n,) with values in 0 … m−1, or a sequence of labels (list,
            tuple, 1-D numpy array, pandas Series), coded by their sorted unique values, which are
            kept as ``levels`` (level j is group j).
        cov: Σ, a k×k structure (``Scalar(1)``, ``Unstructured(k)``, ``Diagonal(k)``, …) or tensor;
            default lme4's: ``Scalar(1)`` for k = 1, ``Unstructured(k)`` otherwise. Its parameters
            have paths ``cov/...``.
        covariates: an (n, k) tensor (default: a column of ones, a random intercept).
        num_groups: m (default: max code + 1, or the number of label levels). Groups without
            observations are allowed; their effects are predicted as 0.

    Shapes: ``codes`` (n,) int64, ``covariates`` (n, k); V (n, n).

    Example:
        >>> import torch, reml_fn as rf
        >>> days = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])     # intercept and slope
        >>> s = rf.Grouped(torch.tensor([0, 0, 1]), rf.Unstructured(2), covariates=days)
        >>> rf.param_names(s), s.shape, s.num_groups
        (['cov/sigma^2_0_0', 'cov/sigma^2_1_0', 'cov/sigma^2_1_1'], (3, 3), 2)
        >>> s().tolist()                                                   # Σ = I
        [[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    """

    children: tuple[Structure, ...]
    codes: Tensor
    covariates: Tensor
    names: tuple[str, ...] = static()
    num_groups: int = static()
    levels: tuple | None = static(default=None)

    def __init__(
        self,
        groups: Any,
        cov: Structure | Tensor | None = None,
        covariates: Tensor | None = None,
        num_groups: int | None = None,
    ):
        if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int)):
            raise TypeError(f"Grouped: num_groups must be an int, got {type(num_groups).__name__}")
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"Grouped: num_groups must be at least 1, got {num_groups}")
        if isinstance(groups, Tensor):
            codes, num_groups = _codes_from_tensor(groups, num_groups)
            levels = None
        else:
            codes, num_groups, levels = _codes_from_labels(groups, num_groups)
        n = codes.shape[0]
        if covariates is None:
            covariates = torch.ones(n, 1, device=codes.device)
        if not isinstance(covariates, Tensor):
            raise TypeError(
                f"Grouped: covariates must be an (n, k) torch.Tensor, got {type(covariates).__name__}; "
                "use torch.as_tensor(...)"
            )
        if covariates.dim() != 2:
            hint = " (use x[:, None] for a single covariate)" if covariates.dim() == 1 else ""
            raise ValueError(f"Grouped: covariates must be 2-D (n, k), got shape {tuple(covariates.shape)}{hint}")
        if covariates.shape[0] != n:
            raise ValueError(f"Grouped: covariates have {covariates.shape[0]} rows but groups has {n} observations")
        if covariates.shape[1] < 1:
            raise ValueError("Grouped: covariates need at least one column")
        if not covariates.is_floating_point():
            covariates = covariates.to(torch.get_default_dtype())
        k = covariates.shape[1]
        if cov is None:
            cov = Scalar(1) if k == 1 else Unstructured(k)
        names, children = named_children("Grouped", (), {"cov": cov}, minimum=1, maximum=1)
        if tuple(children[0].shape) != (k, k):
            raise ValueError(
                f"Grouped: cov must be k×k with k = {k} (the number of covariate columns), "
                f"got shape {tuple(children[0].shape)}"
            )
        set_fields(
            self,
            children=children,
            codes=codes,
            covariates=covariates,
            names=names,
            num_groups=num_groups,
            levels=levels,
        )

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        n = self.codes.shape[-1]
        return (n, n)

    @property
    def k(self) -> int:
        """Number of effects per group (covariate columns)."""
        return self.covariates.shape[-1]

    @property
    def q(self) -> int:
        """Number of random effects, m·k (columns of Z)."""
        return self.num_groups * self.k

    @property
    def cov(self) -> Structure:
        """The k×k covariance structure Σ of one group's effects."""
        return self.children[0]

    # -- dense matrices (O(n²) / O(n·m·k): for checks and the dense engine) -------------------
    def _same_group(self, dtype) -> Tensor:
        return (self.codes.unsqueeze(-1) == self.codes.unsqueeze(-2)).to(dtype)

    def _build(self, params: Mapping) -> Tensor:
        sigma = self.cov._build(child_params(params, "cov"))
        x = self.covariates.to(sigma.dtype)
        return (x @ sigma @ x.transpose(-1, -2)) * self._same_group(sigma.dtype)

    def _jacobian(self, params: Mapping) -> dict:
        children = self._children_jacobians(params)
        if not children:
            return {}
        x = self.covariates
        same = self._same_group(x.dtype)
        return {
            "cov": tree_map(lambda d: (x.to(d.dtype) @ d @ x.to(d.dtype).transpose(-1, -2)) * same, children["cov"])
        }

    def design(self) -> Tensor:
        """The dense design Z (n, m·k), Z[i, g·k + a] = [g_i = g] x_ia (for checks; O(n·m·k) memory).

        Example:
            >>> import torch, reml_fn as rf
            >>> rf.Grouped(torch.tensor([1, 0, 1])).design().tolist()
            [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
        """
        groups = torch.arange(self.num_groups, device=self.codes.device)
        indicator = (self.codes.unsqueeze(-1) == groups).to(self.covariates.dtype)  # (n, m)
        z = indicator.unsqueeze(-1) * self.covariates.unsqueeze(-2)  # (n, m, k)
        return z.reshape(*z.shape[:-2], self.q)

    # -- O(n·k) products used by the mixed-model-equation engine --------------------------------
    def sum_by_group(self, values: Tensor) -> Tensor:
        """Zᵀ v as per-group sums: out[g] = Σ_{i: g_i = g} x_i ⊗ v_i.

        Args:
            values: (n,) or (n, c).

        Returns:
            (m, k) for v (n,); (m, k, c) for v (n, c). Reshape to (m·k[, c]) for Zᵀv in Z's column order.

        Example:
            >>> import torch, reml_fn as rf
            >>> rf.Grouped(torch.tensor([1, 0, 1])).sum_by_group(torch.tensor([1.0, 2.0, 3.0])).tolist()
            [[2.0], [4.0]]
        """
        x = self.covariates.to(values.dtype)
        if values.dim() == 1:
            source = x * values.unsqueeze(-1)
        else:
            source = x.unsqueeze(-1) * values.unsqueeze(-2)
        return source.new_zeros((self.num_groups, *source.shape[1:])).index_add(0, self.codes, source)

    def expand(self, effects: Tensor) -> Tensor:
        """Z u: row i gets x_iᵀ u_{g_i}.

        Args:
            effects: (m, k), or (m, k, c) for c vectors at once (also (m·k,) / (m·k, c)).

        Returns:
            (n,) or (n, c).

        Example:
            >>> import torch, reml_fn as rf
            >>> rf.Grouped(torch.tensor([1, 0, 1])).expand(torch.tensor([[10.0], [20.0]])).tolist()
            [20.0, 10.0, 20.0]
        """
        m, k = self.num_groups, self.k
        if tuple(effects.shape[:2]) != (m, k):
            if effects.dim() not in (1, 2) or effects.shape[0] != m * k:
                raise ValueError(f"Grouped.expand: effects must be (m, k) = {(m, k)}, got {tuple(effects.shape)}")
            effects = effects.reshape(m, k, *effects.shape[1:])
        rows = effects[self.codes]  # (n, k) or (n, k, c)
        x = self.covariates.to(effects.dtype)
        if rows.dim() == 2:
            return (x * rows).sum(-1)
        return (x.unsqueeze(-1) * rows).sum(-2)

    def group_cross_products(self, weights: Tensor | None = None) -> Tensor:
        """The diagonal blocks of Zᵀ diag(w) Z: out[g] = Σ_{i: g_i = g} w_i x_i x_iᵀ, shape (m, k, k).

        Example:
            >>> import torch, reml_fn as rf
            >>> rf.Grouped(torch.tensor([1, 0, 1])).group_cross_products().flatten().tolist()
            [1.0, 2.0]
        """
        x = self.covariates
        if weights is not None:
            x = x.to(weights.dtype)
        outer = x.unsqueeze(-1) * x.unsqueeze(-2)
        if weights is not None:
            outer = outer * weights[:, None, None]
        return outer.new_zeros((self.num_groups, *outer.shape[1:])).index_add(0, self.codes, outer)

    def __repr__(self) -> str:
        cov = repr(self.cov).replace("\n", "\n  ")
        return f"Grouped(n={self.shape[0]}, num_groups={self.num_groups}, k={self.k}, cov={cov})"
