r"""Covariance blocks for the mixed-model-equation engines: a semidefinite Cholesky factor, the
stacked derivatives of a block's structure, the residual variances, and the small block helpers
both MME paths use.

The MME engines (:mod:`reml_fn.reml.mme`, :mod:`reml_fn.reml.blocks`) work with the lower
factor Λ of each random term's covariance (G = ΛΛᵀ, lme4's form, so a variance at 0 is allowed)
and with ∂Σ/∂θ_j stacked into one (K, k, k) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.jacobian import autodiff_transform
from reml_fn.structures import Diagonal, Identity

__all__ = [
    "PSD_CHOLESKY_MAX_SIZE",
    "psd_cholesky",
    "unrolled_cholesky",
    "unrolled_inverse_factor",
    "derivative_stack",
    "matrix_and_derivative_stack",
    "Residual",
    "residual_variance",
    "group_inner",
    "cast",
    "concat",
    "plus",
]

PSD_CHOLESKY_MAX_SIZE = 8
"""Covariance blocks up to this size may be positive *semi*-definite (zero variances allowed): the
MME factors them with each variance raised by 10kε of itself (``mme._factor_block``; the same
decision as :func:`psd_cholesky`); larger blocks (a Propagate term's G) use
``torch.linalg.cholesky_ex`` as they are and must be positive definite."""


def psd_cholesky(A: Tensor) -> tuple[Tensor, Tensor]:
    """A lower factor L with L Lᵀ = A for a positive *semi*-definite k×k A, and an ok flag.

    An unrolled Cholesky in which a pivot ≤ τ = 10·k·ε·max|A_ij| (= 10·k·ε·max diag A for a PSD A)
    gives a zero column instead of a failure, so A = 0 (a variance at its boundary) or a
    rank-deficient A factor exactly. ``ok`` is False when L Lᵀ misses A (A indefinite) or A has
    NaN: by more than τ on the diagonal and in columns with a positive pivot, by more than
    √(τ·max|A_ij|) off the diagonal of a column whose pivot was dropped — for a PSD A those entries
    are at most √(pivot·A_ii), so A = LLᵀ with L_00 = 10⁻¹⁴ is accepted, and a negative eigenvalue
    beyond about −τ is not. For k = 1 that is the closed form L = √a, ok ⟺ a ≥ 0. Pure,
    vmappable and differentiable at positive-definite A (a square root of
    ``where(pivot > τ, pivot, 1)`` times the mask, so no gradient is NaN). Meant for small k.

    Example:
        >>> import torch
        >>> from reml_fn.reml.mme import psd_cholesky
        >>> L, ok = psd_cholesky(torch.tensor([[4.0, 2.0], [2.0, 1.0]]))    # rank 1
        >>> L.tolist(), bool(ok)
        ([[2.0, 0.0], [1.0, 0.0]], True)
        >>> bool(psd_cholesky(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))[1])    # indefinite
        False
        >>> psd_cholesky(torch.tensor([[0.0]]))[0].tolist(), bool(psd_cholesky(torch.tensor([[-1.0]]))[1])
        ([[0.0]], False)
    """
    k = A.shape[-1]
    if k == 1:  # τ = 10ε|a|, so "a > τ" is "a > 0" and "|L² − a| ≤ τ" is "a ≥ 0"
        positive = A > 0
        return torch.sqrt(torch.where(positive, A, 1.0)) * positive, (A >= 0).reshape(A.shape[:-2])
    largest = A.abs().amax((-1, -2))
    relative = 10.0 * k * torch.finfo(A.dtype).eps
    tolerance = largest * relative
    loose = largest * math.sqrt(relative)  # √(τ·max|A_ij|), without the underflow of τ·max|A_ij|
    # Entry by entry, as :func:`unrolled_cholesky` (one operation per entry, few operations per
    # call). LLᵀ misses A exactly in the Schur-complement entries of dropped pivots (the pivot
    # itself and the column below it), and by round-off elsewhere, so those entries are the check.
    entries = A.flatten(-2).unbind(-1)
    L: list[list[Tensor | None]] = [[None] * k for _ in range(k)]
    ok = None
    for j in range(k):
        pivot = entries[j * k + j]
        for m in range(j):
            pivot = pivot - L[j][m] * L[j][m]
        positive = pivot > tolerance
        scale = torch.rsqrt(torch.where(positive, pivot, 1.0)) * positive  # 1/√pivot, or 0
        L[j][j] = pivot * scale
        good = pivot >= -tolerance
        for i in range(j + 1, k):
            value = entries[i * k + j]
            for m in range(j):
                value = value - L[i][m] * L[j][m]
            L[i][j] = value * scale
            good = good & (positive | (value.abs() <= loose))
        ok = good if ok is None else ok & good
    zero = torch.zeros_like(entries[0])
    rows = [L[i][j] if j <= i else zero for i in range(k) for j in range(k)]
    return torch.stack(rows, dim=-1).reshape(A.shape), ok


def _flatten_tree(tree: Mapping, prefix: str) -> Iterator[tuple[str, Tensor]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten_tree(value, f"{prefix}/{key}")
        else:
            yield f"{prefix}/{key}", value


def _child_derivatives(child, child_params: Mapping, method: str) -> Mapping:
    if not child_params:
        return {}
    if method == "closed":
        return child._jacobian(child_params)
    return autodiff_transform(method)(child._build)(dict(child_params))


def derivative_stack(child, child_params: Mapping, prefix: str, method: str | None, dtype):
    """``(names, Ġ)``: the child's free parameter names (``prefix/…``) and its derivatives
    Ġ_j = ∂G/∂θ_j stacked (K, a, a) by ``method`` (``"closed"``, ``"fwd"``, ``"rev"``); ``([], None)``
    when it has no free parameter or no derivatives are wanted (``method`` None).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.covariance_blocks import derivative_stack
        >>> cov = rf.Diagonal(2)
        >>> names, D = derivative_stack(cov, cov.init_params(), "g/cov", "closed", torch.float64)
        >>> names, D.tolist()                      # ∂(e^{2θ_i})/∂θ_i = 2 at θ = 0
        (['g/cov/sigma^2_0', 'g/cov/sigma^2_1'], [[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])
    """
    if method is None:
        return [], None
    return _stacked(_child_derivatives(child, child_params, method), prefix, dtype)


def matrix_and_derivative_stack(child, child_params: Mapping, prefix: str, method: str | None, dtype):
    """``(G, names, Ġ)``: the child's matrix G (in ``dtype``) and :func:`derivative_stack`'s
    answer; with the closed form, both from one evaluation of its natural values.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.covariance_blocks import matrix_and_derivative_stack
        >>> cov = rf.Diagonal(2)
        >>> G, names, D = matrix_and_derivative_stack(cov, cov.init_params(), "g/cov", "closed", torch.float64)
        >>> G.tolist(), names, D[1].tolist()
        ([[1.0, 0.0], [0.0, 1.0]], ['g/cov/sigma^2_0', 'g/cov/sigma^2_1'], [[0.0, 0.0], [0.0, 2.0]])
    """
    if method != "closed" or not child_params:
        return cast(child._build(child_params), dtype), *derivative_stack(child, child_params, prefix, method, dtype)
    G, derivatives = child._build_and_jacobian(child_params)
    return cast(G, dtype), *_stacked(derivatives, prefix, dtype)


def _stacked(derivatives: Mapping, prefix: str, dtype):
    pairs = list(_flatten_tree(derivatives, prefix))
    if not pairs:
        return [], None
    stacked = torch.stack([d for _, d in pairs])
    return [name for name, _ in pairs], stacked if stacked.dtype == dtype else stacked.to(dtype)


def _unrolled_factor(M: Tensor, guarded: bool = True):
    """The recurrences of :func:`unrolled_cholesky` entry by entry: ``(L, L⁻¹, roots, ok)`` with L
    and L⁻¹ as lists of rows of entries (None above the diagonal) and roots the L_jj. Unguarded,
    a non-positive pivot is not replaced (L and L⁻¹ then hold inf or NaN) and ok is None."""
    k = M.shape[-1]
    entries = M.flatten(-2).unbind(-1)
    L: list[list[Tensor | None]] = [[None] * k for _ in range(k)]
    roots: list[Tensor] = []
    reciprocal: list[Tensor] = []
    ok = None
    for j in range(k):
        pivot = entries[j * k + j]
        for m in range(j):
            pivot = pivot - L[j][m] * L[j][m]
        if guarded:
            positive = pivot > 0
            ok = positive if ok is None else ok & positive
            pivot = torch.where(positive, pivot, 1.0)
        root = torch.sqrt(pivot)
        L[j][j] = root
        roots.append(root)
        reciprocal.append(root.reciprocal())
        for i in range(j + 1, k):
            value = entries[i * k + j]
            for m in range(j):
                value = value - L[i][m] * L[j][m]
            L[i][j] = value * reciprocal[j]
    inverse: list[list[Tensor | None]] = [[None] * k for _ in range(k)]
    for j in range(k):
        inverse[j][j] = reciprocal[j]
        for i in range(j + 1, k):
            total = L[i][j] * inverse[j][j]
            for m in range(j + 1, i):
                total = total + L[i][m] * inverse[m][j]
            inverse[i][j] = -total * reciprocal[i]
    return L, inverse, roots, ok


def _assemble(rows: list[list[Tensor | None]], shape) -> Tensor:
    k = len(rows)
    zero = torch.zeros_like(rows[0][0])
    return torch.stack([rows[i][j] if j <= i else zero for i in range(k) for j in range(k)], dim=-1).reshape(shape)


def unrolled_cholesky(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, L⁻¹, ok)`` for symmetric positive-definite k×k blocks M (…, k, k), M = L Lᵀ, by the
    textbook recurrences written out entry by entry (pure, vmappable):

        L_jj = √(M_jj − Σ_{l<j} L_jl²),   L_ij = (M_ij − Σ_{l<j} L_il L_jl) / L_jj   (i > j),
        (L⁻¹)_jj = 1/L_jj,               (L⁻¹)_ij = −(Σ_{j≤l<i} L_il (L⁻¹)_lj) / L_ii.

    Each step is one elementwise operation over all leading dimensions, so many tiny blocks (a
    batch of datasets × groups) cost O(k³) vectorised operations instead of one LAPACK call per
    block, which is what ``torch.linalg.cholesky_ex``/``solve_triangular`` do for a batch. ``ok``
    (…,) is False where a pivot is not positive (L and L⁻¹ are then finite but meaningless).

    Example:
        >>> import torch
        >>> from reml_fn.reml.covariance_blocks import unrolled_cholesky
        >>> M = torch.tensor([[4.0, 2.0], [2.0, 5.0]])
        >>> L, L_inv, ok = unrolled_cholesky(M)
        >>> L.tolist(), (L @ L_inv).tolist(), bool(ok)
        ([[2.0, 0.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]], True)
    """
    L, inverse, _, ok = _unrolled_factor(M)
    return _assemble(L, M.shape), _assemble(inverse, M.shape), ok


def unrolled_inverse_factor(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(L⁻¹, Σ log L_jj over all blocks, ok)``: what the MME needs of the factors of many k×k
    blocks (:func:`unrolled_cholesky`'s recurrences, without assembling L). ``ok`` is one flag for
    all blocks; where it is False, L⁻¹ may hold inf or NaN (the caller masks its results).

    Example:
        >>> import torch
        >>> from reml_fn.reml.covariance_blocks import unrolled_inverse_factor
        >>> L_inv, log_det, ok = unrolled_inverse_factor(torch.tensor([[4.0, 2.0], [2.0, 5.0]]))
        >>> L_inv.tolist(), round(float(log_det), 6), bool(ok)          # log 2 + log 2
        ([[0.5, 0.0], [-0.25, 0.5]], 1.386294, True)
    """
    _, inverse, roots, _ = _unrolled_factor(M, guarded=False)
    log_det = torch.log(torch.stack(roots, dim=-1)).sum()
    # A pivot ≤ 0 (or NaN) makes its root 0 or NaN, so the sum is −∞ or NaN: one check for all.
    return _assemble(inverse, M.shape), log_det, torch.isfinite(log_det)


# ------------------------------------------------------------------------------------------------
# Small pieces shared by the MME engines


def cast(tensor: Tensor, dtype) -> Tensor:
    """``tensor.to(dtype)``, skipping the (not free) call when it already has that dtype.

    Example:
        >>> import torch
        >>> from reml_fn.reml.covariance_blocks import cast
        >>> x = torch.zeros(2, dtype=torch.float64)
        >>> cast(x, torch.float64) is x, cast(x, torch.float32).dtype
        (True, torch.float32)
    """
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def concat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy for a single piece (most models have one piece).

    Example:
        >>> import torch
        >>> from reml_fn.reml.covariance_blocks import concat
        >>> x = torch.ones(2)
        >>> concat([x], 0) is x, concat([x, x], 0).tolist()
        (True, [1.0, 1.0, 1.0, 1.0])
    """
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b where None stands for zero.

    Example:
        >>> import torch
        >>> from reml_fn.reml.covariance_blocks import plus
        >>> plus(None, torch.tensor(2.0)).item(), plus(torch.tensor(1.0), torch.tensor(2.0)).item(), plus(None, None)
        (2.0, 3.0, None)
    """
    if a is None:
        return b
    return a if b is None else a + b


def group_inner(a: Tensor, b: Tensor) -> Tensor:
    """Σ_g a_gᵀ b_g for per-group blocks a (m, k, c_a) and b (m, k, c_b): (c_a, c_b), one matmul.

    Example:
        >>> import torch
        >>> from reml_fn.reml.covariance_blocks import group_inner
        >>> a = torch.arange(8.0).reshape(2, 2, 2)
        >>> bool(torch.equal(group_inner(a, a), a[0].T @ a[0] + a[1].T @ a[1]))
        True
    """
    return a.flatten(-3, -2).mT @ b.flatten(-3, -2)


class Residual(NamedTuple):
    """R = diag(r): r is 0-d (σ², R = σ²I: only Scalar/Identity children) or (n,) (a Diagonal
    child); ``slopes`` stacks ṙ_j = ∂r/∂θ_j of the free parameters ``names``: (K_r,) or (K_r, n)."""

    r: Tensor
    names: list[str]
    slopes: Tensor | None


def _slope(spec, raw: Tensor, natural: Tensor) -> Tensor:
    """t'(θ) of a parameter from its natural value x = t(θ) where that is cheaper (the transform's
    own ``_derivative_at``: the same values as ``derivative``)."""
    slope = spec.transform._derivative_at(raw, natural)
    return torch.ones_like(natural) if slope is None else slope


def residual_variance(parts, n: int, dtype, device, derivatives: bool) -> Residual:
    """R = diag(r) of the residual terms ``parts`` = ``(path, Scalar | Identity | Diagonal, its params)``
    (summed), with the slopes ṙ_j = ∂r/∂θ_j of their free parameters when ``derivatives``.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.covariance_blocks import residual_variance
        >>> noise = rf.Scalar(3)
        >>> parts = [("residual", noise, {"sigma^2": torch.tensor(0.0)}), ("fixed", rf.Identity(3), {})]
        >>> R = residual_variance(parts, 3, torch.float64, None, derivatives=True)
        >>> R.r.item(), R.names, R.slopes.tolist()           # σ² + 1, ∂(e^{2θ})/∂θ = 2
        (2.0, ['residual/sigma^2'], [2.0])
    """
    scalar = not any(isinstance(term, Diagonal) for _, term, _ in parts)
    r, names, slopes = None, [], []
    for path, term, term_params in parts:
        if isinstance(term, Identity):
            r = plus(r, torch.ones((), dtype=dtype, device=device))
            continue
        natural = term._natural(term_params)
        if isinstance(term, Diagonal):
            r = plus(r, cast(torch.stack([natural[spec.name] for spec in term.specs]), dtype))
        else:
            r = plus(r, cast(natural["sigma^2"], dtype))
        free = [(i, spec) for i, spec in enumerate(term.specs) if not spec.fixed]
        if not derivatives or not free:
            continue
        names += [f"{path}/{spec.name}" for _, spec in free]
        values = cast(
            torch.stack([_slope(spec, term_params[spec.name], natural[spec.name]) for _, spec in free]), dtype
        )
        if isinstance(term, Diagonal):  # ṙ_j = r'_j e_j: row j of the identity, scaled
            slopes.append(torch.eye(n, dtype=dtype, device=device)[[i for i, _ in free]] * values.unsqueeze(-1))
        else:
            slopes.append(values if scalar else values.unsqueeze(-1).expand(len(free), n))
    return Residual(r, names, concat(slopes, dim=0) if slopes else None)
