"""Starting values, raw-scale bounds and input checks for AI-REML fits.

Default start (no hand-tuning needed for real models):

* every *variance* parameter (a positive transform: ExpPow2, Exp, Exp2, Exp10) starts at an equal
  share of the OLS residual variance s² in natural units: σ²_k = s² / (m · a_k), where m is the
  number of variance parameters and a_k = tr(∂V/∂σ²_k)/n is how much one unit of σ²_k adds to
  the average diagonal of V (1 for a random intercept or a residual; mean(x²) for a slope on x);
* every correlation ``rho`` starts at ``START_CORRELATION`` = 0.1 when that is in its range, not
  at 0: at ρ = 0 an AR(1) or equicorrelated term is white noise, indistinguishable from a residual
  Scalar, so the AI matrix of AR1 + noise is singular there by symmetry;
* everything else (covariances, Cholesky entries, user parameters) keeps its raw default.

A fit without ``init`` of a grouped model with a Scalar residual starts at its MIVQUE(0) moment
estimates instead, where they lie well inside the parameter space
(:func:`reml_fn.reml.moments.moment_start`: Grouped terms, or Propagate terms of that shape, with
linear covariances, crossed or nested). The variance floors
below are set by this default start all the same.

Bounds: a variance may shrink to 100·ε (2e-14 in float64) of its default start (an equal share of the OLS residual
variance, so the floor is on the scale of the data whatever ``init`` is) (REML boundary fits such as Dyestuff2 stop
there, flagged ``at_boundary``, instead of drifting to −∞ on the log scale); a sigmoid-bounded
parameter (a correlation) lives in raw [−20, 20] (|ρ| ≤ 1 − 4·10⁻⁹); others are unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from reml_fn.fit.boundaries import like
from reml_fn.params import ParamSpec, param_names, param_specs, tree_from_names
from reml_fn.reml.engines import select_engine
from reml_fn.transforms import Chain, Exp, Exp2, Exp10, ExpPow2, Sigmoid, Transform, columnwise

__all__ = [
    "all_finite",
    "is_variance",
    "is_bounded",
    "variance_rates",
    "ols_residual_variance",
    "exact_linear_response",
    "EXACT_FIT_TOLERANCE",
    "default_init",
    "raw_bounds",
    "check_design",
    "dependent_columns",
    "VARIANCE_FLOOR",
    "START_CORRELATION",
    "CORRELATION_RAW_LIMIT",
]

# A variance may shrink to VARIANCE_FLOOR·ε (the dtype's machine epsilon) of its default start:
# 2e-14 in float64 (so variance ratios of 1e12 still fit), 1e-5 in float32.
VARIANCE_FLOOR = 100.0


def variance_floor(dtype: torch.dtype) -> float:
    """The smallest variance, relative to its default start, that a fit reaches: 100·ε.

    Example:
        >>> import torch
        >>> variance_floor(torch.float64)  # 100 · 2⁻⁵²
        2.220446049250313e-14
    """
    return VARIANCE_FLOOR * torch.finfo(dtype).eps


START_CORRELATION = 0.1
CORRELATION_RAW_LIMIT = 20.0


# The exponential transforms of variance parameters, natural = c·e^{aθ}, with their rates a.
_VARIANCE_RATES = ((ExpPow2, 2.0), (Exp, 1.0), (Exp2, math.log(2.0)), (Exp10, math.log(10.0)))


def _variance_rate(transform: Transform) -> float:
    return next((rate for kind, rate in _VARIANCE_RATES if isinstance(transform, kind)), 0.0)


def is_variance(transform: Transform) -> bool:
    """True for positive (log-scale) transforms: the parameter is a variance-like quantity."""
    return _variance_rate(transform) > 0


def variance_rates(s) -> Tensor:
    """(k,) the rate a of each free variance parameter's exponential transform, natural = c·e^{aθ}
    (ExpPow2 2, Exp 1, Exp2 ln 2, Exp10 ln 10), and 0 for every other parameter. The iterations
    use it to bound what a variance can still gain on its way to the floor.

    Example:
        >>> import reml_fn as rf
        >>> variance_rates(rf.AR1(3)).tolist()  # σ² (ExpPow2) and ρ (a sigmoid)
        [2.0, 0.0]
    """
    return torch.tensor([_variance_rate(spec.transform) for spec in _free_specs(s)], dtype=torch.float64)


def is_bounded(transform: Transform) -> bool:
    """True for sigmoid-based transforms (a bounded natural range, e.g. a correlation)."""
    if isinstance(transform, Sigmoid):
        return True
    return isinstance(transform, Chain) and any(isinstance(t, Sigmoid) for t in transform.stages)


def _free_specs(s) -> list[ParamSpec]:
    return [spec for _, spec in param_specs(s) if not spec.fixed]


def ols_residual_variance(y: Tensor, X: Tensor) -> Tensor:
    """s² = ‖y − X β̂_OLS‖² / (n − p). Batched: y (…, n) with X (n, p) or (…, n, p).

    A shared X of full column rank (the checks make sure of it) is decomposed once, X = QR, and
    every y projected, y − Q(Qᵀy); per-dataset designs go through least squares one by one."""
    if X.dim() == 2:
        Q = torch.linalg.qr(X).Q  # (n, p)
        residual = y - (y @ Q) @ Q.mT
    else:
        design = X.expand(*y.shape[:-1], *X.shape[-2:]) if X.dim() < y.dim() + 1 else X
        beta = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution
        residual = y - (design @ beta).squeeze(-1)
    return (residual**2).sum(-1) / (y.shape[-1] - X.shape[-1])


# ‖y − Xβ̂‖ ≤ EXACT_FIT_TOLERANCE · √n · ε · ‖y‖ counts as an exact fit: lstsq's residual of an
# exactly linear y is round-off of that size (about 1e-30 relative in float64 on some BLAS, exactly
# 0 on others), while any real noise is many orders of magnitude above it.
EXACT_FIT_TOLERANCE = 10.0


def exact_linear_response(y: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """Whether y is an exact linear function of X up to round-off, and the OLS residual variance s².

    The test is relative, ‖y − Xβ̂‖² ≤ (10·√n·ε)²·‖y‖² with ε the dtype's machine epsilon, so it
    gives the same answer on every BLAS (an exactly linear y leaves a residual of 0 or of round-off
    size depending on the library) and at every scale of y. A constant y with an intercept in X is
    such a response. Pure, batched (y (…, n), X (n, p) or (…, n, p)) and vmappable; ``fit`` raises on it,
    ``fit_batched`` flags the dataset with status 6.

    Example:
        >>> import torch
        >>> X = torch.stack([torch.ones(5), torch.arange(5.0)], 1)
        >>> bool(exact_linear_response(3.0 + 2.0 * torch.arange(5.0), X)[0])
        True
        >>> bool(exact_linear_response(torch.tensor([1.0, 0.0, 2.0, 1.0, 5.0]), X)[0])
        False
    """
    n, p = y.shape[-1], X.shape[-1]
    residual_variance = ols_residual_variance(y, X)
    allowance = (EXACT_FIT_TOLERANCE * torch.finfo(y.dtype).eps) ** 2 * n * (y * y).sum(-1)
    return residual_variance * (n - p) <= allowance, residual_variance


def default_init(
    s,
    y: Tensor,
    X: Tensor,
    jacobian: str = "closed",
    engine: str = "auto",
    residual_variance: Tensor | None = None,
    unit_traces: Tensor | None = None,
) -> Tensor:
    """The default raw starting vector (flat, in ``param_names(s)`` order); see the module doc.

    ``residual_variance``: s² when the caller already has it (:func:`ols_residual_variance`);
    ``unit_traces``: tr(∂V/∂x_k) (k,) per natural unit x_k of each parameter when the caller has
    them (:func:`~reml_fn.reml.moments.moment_start` does), instead of the engine's traces at the
    raw defaults. Pure and vmappable over y and X (used per dataset by batched fits).
    """
    specs = _free_specs(s)
    if not specs:
        return y.new_zeros(0)
    theta = torch.tensor([spec.default for spec in specs], dtype=y.dtype, device=y.device)
    s2 = ols_residual_variance(y, X) if residual_variance is None else residual_variance
    n = y.shape[-1]
    variance = [k for k, spec in enumerate(specs) if is_variance(spec.transform)]
    if variance:
        index = torch.tensor(variance, device=y.device)
        # a_k = tr(∂V/∂σ²_k)/n: what one natural unit of σ²_k adds to the average diagonal of V.
        if unit_traces is None:
            # tr(∂V/∂θ_k) at the defaults, from the engine (the MME engine needs no n×n matrix).
            traces = select_engine(s, engine).jacobian_traces(s, tree_from_names(param_names(s), theta), jacobian)
            slopes = torch.stack([specs[k].transform.derivative(theta[k]) for k in variance])
            scale = traces.index_select(-1, index) / (n * slopes)
        else:
            scale = unit_traces.index_select(-1, index) / n
        usable = scale > 0
        share = s2.unsqueeze(-1) / (
            usable.sum(-1, keepdim=True).clamp(min=1) * scale.clamp(min=torch.finfo(y.dtype).tiny)
        )
        values = columnwise([specs[k].transform for k in variance], share, inverse=True)
        theta = theta.index_copy(-1, index, torch.where(usable, values, theta.index_select(-1, index)))
    for k, spec in enumerate(specs):
        if spec.name == "rho" and is_bounded(spec.transform):
            start = spec.transform.inverse(torch.tensor(START_CORRELATION, dtype=y.dtype, device=y.device))
            if math.isfinite(float(start)):  # a constant of the transform, not of the data
                theta = theta.index_copy(-1, torch.tensor([k], device=y.device), start.reshape(1))
    return theta


def raw_bounds(
    s, reference: Tensor, theta0: Tensor | None = None, rates: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Raw-scale lower and upper bounds (k,) for the free parameters. Pure and vmappable.

    ``reference`` (k,): the default start (:func:`default_init`), which is on the scale of the data,
    so a variance's floor is ``VARIANCE_FLOOR`` times its equal share of the OLS residual variance
    whatever the user's ``init``; ``theta0`` (k,): the actual start (default: ``reference``),
    which the bounds always contain. ``rates``: :func:`variance_rates` of ``s`` when the caller
    has them (a fit makes them once).

    Example:
        >>> import torch, reml_fn as rf
        >>> lower, upper = raw_bounds(rf.AR1(3), torch.tensor([0.0, 0.1]))
        >>> [round(v, 4) for v in lower.tolist()], upper.tolist()  # σ: ½ log(100ε) below; ρ: ±20 raw
        ([-15.7192, -20.0], [inf, 20.0])
    """
    theta0 = reference if theta0 is None else theta0
    specs = _free_specs(s)
    if not specs:
        return theta0.new_zeros(0), theta0.new_zeros(0)
    # For x = c·e^{aθ}, the floor x_ref·floor is θ_ref + log(floor)/a: one vector operation.
    rates = like(variance_rates(s) if rates is None else rates, theta0)
    variance = rates > 0
    floor = reference + math.log(variance_floor(reference.dtype)) / torch.where(variance, rates, 1.0)
    # ±CORRELATION_RAW_LIMIT for a bounded (sigmoid) parameter, unbounded otherwise; a variance
    # (never bounded) has its floor. Each bound is widened to contain the start.
    limit = CORRELATION_RAW_LIMIT
    bounded = [is_bounded(spec.transform) for spec in specs]
    fixed_lower = torch.tensor([-limit if b else -math.inf for b in bounded], dtype=theta0.dtype, device=theta0.device)
    fixed_upper = torch.tensor([limit if b else math.inf for b in bounded], dtype=theta0.dtype, device=theta0.device)
    return torch.minimum(torch.where(variance, floor, fixed_lower), theta0), torch.maximum(fixed_upper, theta0)


def _numerical_rank(X: Tensor) -> int:
    """``torch.linalg.matrix_rank(X)``'s answer, the singular values above max(n, p)·ε·σ_max,
    counted on the host from one ``svdvals`` call (matrix_rank adds a dozen tensor operations)."""
    values = torch.linalg.svdvals(X).tolist()
    tolerance = max(X.shape) * torch.finfo(X.dtype).eps * (values[0] if values else 0.0)
    return sum(value > tolerance for value in values)


def dependent_columns(X: Tensor) -> list[int]:
    """Indices of columns of X that are linear combinations of the columns before them."""
    if _numerical_rank(X) == X.shape[1]:  # the usual case: one decomposition
        return []
    dependent = []
    rank = 0
    for j in range(X.shape[1]):
        new_rank = _numerical_rank(X[:, : j + 1])
        if new_rank == rank:
            dependent.append(j)
        rank = new_rank
    return dependent


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite, read on the host.

    A NaN or ±inf entry makes the sum NaN or ±inf, so a finite sum answers in one reduction; only
    a non-finite sum (such an entry, or finite entries whose sum overflows) is checked entry by entry.

    Example:
        >>> import torch
        >>> big = torch.tensor([1e308, 1e308], dtype=torch.float64)  # a sum that overflows
        >>> all_finite(big), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_design(X: Tensor, x_names: Sequence[str] | None = None) -> None:
    """X must be finite and of full column rank (the dependent columns are named)."""
    if not all_finite(X):
        rows, cols = torch.nonzero(~torch.isfinite(X), as_tuple=True)
        raise ValueError(f"X contains NaN or inf (rows {rows[:10].tolist()}, columns {sorted(set(cols.tolist()))})")
    dependent = dependent_columns(X)
    if dependent:
        labels = [x_names[j] if x_names is not None else str(j) for j in dependent]
        raise ValueError(
            f"X is rank deficient: column(s) {labels} are linear combinations of earlier columns; drop them"
        )
