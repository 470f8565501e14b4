"""Bounds of the AI-REML iterations: box bounds (variance floors, correlation limits of sigmoid
parameters) and the correlation limit |ρ| ≤ 1 − 10⁻¹⁰ of unstructured covariances, held while
the other parameters move. Pure functions on (…, k) tensors, shared by every driver.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import Tensor

from reml_fn.fit.step import PIVOT_TOLERANCE
from reml_fn.params import param_specs
from reml_fn.transforms import ExpPow2
from reml_fn.transforms import Identity as IdentityTransform
from reml_fn.tree import derived

__all__ = [
    "CORRELATION_LIMIT",
    "like",
    "Working",
    "active_bounds",
    "working_system",
    "Pairs",
    "pair_index",
    "raw_parameters",
    "correlation_pairs",
    "at_correlation_limit",
    "at_bounds",
    "propose",
    "negligible_to_floor",
    "silent_at_floor",
    "information_scale",
]


def active_bounds(theta: Tensor, score: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """(…, k) flags: parameters at a box bound whose score points outward (held by the step). Pure.

    Example:
        >>> import torch
        >>> theta, lower, upper = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, -5.0]), torch.tensor([5.0, 5.0, 1.0])
        >>> active_bounds(theta, torch.tensor([-1.0, 1.0, 1.0]), lower, upper).tolist()
        [True, False, True]
    """
    return ((theta <= lower) & (score < 0)) | ((theta >= upper) & (score > 0))


# |ρ| of an unstructured covariance stops here (the edge of the positive semi-definite cone).
CORRELATION_LIMIT = 1.0 - 1e-10
# |ρ| at least this is at the limit, up to the round-off of c = ρ·e^{θ_i + θ_j}.
LIMIT_REACHED = CORRELATION_LIMIT * (1.0 - 1e-12)
_COVARIANCE_NAME = re.compile(r"sigma\^2_(\d+)_(\d+)$")


def like(tensor: Tensor, reference: Tensor) -> Tensor:
    """``tensor`` on ``reference``'s device in its dtype, without the (not free) conversion call
    when it is there already.

    Example:
        >>> import torch
        >>> x = torch.zeros(2, dtype=torch.float64)
        >>> like(x, torch.ones(1, dtype=torch.float64)) is x, like(x, torch.ones(1, dtype=torch.float32)).dtype
        (True, torch.float32)
    """
    if tensor.dtype == reference.dtype and tensor.device == reference.device:
        return tensor
    return tensor.to(device=reference.device, dtype=reference.dtype)


def correlation_pairs(s) -> Tensor:
    """Flat indices ``(i, j, c)`` (m, 3) of every free covariance c = ``…/sigma^2_a_b`` (a ≠ b,
    Identity transform) whose variances ``…/sigma^2_a_a`` and ``…/sigma^2_b_b`` are free ExpPow2
    parameters: the entries of :class:`~reml_fn.Unstructured` blocks, where
    c = ρ·e^{θ_i + θ_j} with correlation |ρ| ≤ 1.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2, covariates=torch.ones(6, 2), cov=rf.Unstructured(2)), e=rf.Scalar(6))
        >>> correlation_pairs(s).tolist()  # σ²_11 (2), σ²_00 (0) and their covariance σ_10 (1)
        [[2, 0, 1]]
    """
    triples = derived(s, "correlation_pairs", lambda: _correlation_triples(s))
    return torch.tensor(triples, dtype=torch.long).reshape(-1, 3)


def _correlation_triples(s) -> tuple[tuple[int, int, int], ...]:
    """:func:`correlation_pairs` as host triples (read from the names and transforms once per structure)."""
    specs = {path: spec for path, spec in param_specs(s) if not spec.fixed}
    index = {name: k for k, name in enumerate(specs)}
    pairs = []
    for name, spec in specs.items():
        match = _COVARIANCE_NAME.search(name)
        if not match or match.group(1) == match.group(2) or not isinstance(spec.transform, IdentityTransform):
            continue
        prefix = name[: match.start()]
        a, b = (f"{prefix}sigma^2_{g}_{g}" for g in match.groups())
        if all(v in specs and isinstance(specs[v].transform, ExpPow2) for v in (a, b)):
            pairs.append((index[a], index[b], index[name]))
    return tuple(pairs)


class Pairs(NamedTuple):
    """The index tensors of :func:`correlation_pairs`, made once per fit (:func:`pair_index`):
    variances ``i``, ``j`` and covariance ``c`` (m,), ``columns`` (k,) flags of the c's, and what
    :func:`working_system` builds J = ∂θ_raw/∂θ_working from without indexing."""

    i: Tensor
    j: Tensor
    c: Tensor
    columns: Tensor
    base: Tensor  # (k, k) the identity without the (c, c) entries
    placement: Tensor  # (3m, k·k) one-hot: where ∂c/∂θ_i, ∂c/∂θ_j, ∂c/∂ρ go in J
    lower: Tensor  # (k,) −CORRELATION_LIMIT at the c's, −∞ elsewhere (the working box's floor there)

    @property
    def count(self) -> int:
        return self.c.shape[0]


def pair_index(pairs: Tensor | Pairs, k: int, device, dtype: torch.dtype | None = None) -> Pairs:
    """``pairs`` (m, 3) from :func:`correlation_pairs` as :class:`Pairs` on ``device`` in ``dtype``
    (default: the default dtype); a :class:`Pairs` is returned as it is. Every function here takes
    either.

    Example:
        >>> import torch
        >>> pairs = pair_index(torch.tensor([[2, 0, 1]]), 4, "cpu")
        >>> pairs.count, pairs.columns.tolist(), pairs.placement.nonzero()[:, 1].tolist()  # J[1, 2], J[1, 0], J[1, 1]
        (1, [False, True, False, False], [6, 4, 5])
    """
    if isinstance(pairs, Pairs):
        return pairs
    dtype = dtype or torch.get_default_dtype()
    # Built on the host from the few index triples (static data of the structure): one tensor
    # made from a list each, not a chain of indexed writes.
    triples = [tuple(row) for row in pairs.tolist()]
    i, j, c = ([t[n] for t in triples] for n in range(3))
    columns = [False] * k
    for index in c:
        columns[index] = True
    base = [[float(r == q and not columns[r]) for q in range(k)] for r in range(k)]
    entries = [x * k + y for x, y in zip(c * 3, i + j + c)]
    placement = [[float(e == q) for q in range(k * k)] for e in entries]
    lower = [-CORRELATION_LIMIT if flag else -math.inf for flag in columns]

    def tensor(values, kind=dtype):
        return torch.tensor(values, dtype=kind, device=device)

    i, j, c = tensor(i, torch.long), tensor(j, torch.long), tensor(c, torch.long)
    columns, base, lower = tensor(columns, torch.bool), tensor(base).reshape(k, k), tensor(lower)
    placement = tensor(placement).reshape(len(entries), k * k)
    return Pairs(i, j, c, columns, base, placement, lower)


def at_correlation_limit(theta: Tensor, pairs: Tensor | Pairs) -> Tensor:
    """(…, k) flags: the covariances of ``pairs`` whose |ρ| reached the limit. Pure.

    Example:
        >>> import torch
        >>> at_correlation_limit(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([[0, 2, 1]])).tolist()  # ρ = 1
        [False, True, False]
    """
    flags = torch.zeros_like(theta, dtype=torch.bool)
    pairs = pair_index(pairs, theta.shape[-1], theta.device)
    if pairs.count == 0:
        return flags
    i, j, c = pairs.i, pairs.j, pairs.c
    reached = theta[..., c].abs() >= LIMIT_REACHED * torch.exp(theta[..., i] + theta[..., j])
    return flags.index_copy(-1, c, reached)  # each covariance is in one pair


class Working(NamedTuple):
    """The AI-REML system in working coordinates (all (…, k) or (…, k, k)).

    Raw θ except for every covariance c of ``pairs``, which is replaced by its correlation ρ with
    c = ρ·e^{θ_i + θ_j}: ``theta``, ``score`` = Jᵀs and ``ai`` = JᵀAI J with J = ∂θ_raw/∂θ_working,
    box bounds ``lower``/``upper`` (|ρ| ≤ ``CORRELATION_LIMIT``), and ``scaled`` flags of the
    unit-free coordinates (log scale, logit scale, ρ), whose steps :func:`~reml_fn.fit.step.capped`
    caps.
    """

    theta: Tensor
    score: Tensor
    ai: Tensor
    lower: Tensor
    upper: Tensor
    scaled: Tensor


def working_system(theta: Tensor, score: Tensor, ai: Tensor, lower: Tensor, upper: Tensor, scaled: Tensor, pairs):
    """Move the raw system to working coordinates (:class:`Working`). Pure; batched (…, k).

    Why: a raw covariance has no natural unit and its admissible range |c| ≤ e^{θ_i + θ_j} moves
    with the variances, so Newton steps on (θ_i, θ_j, c) leave the positive-definite cone or crawl
    along the ridge |ρ| → 1 (an uncentred random slope: lme4 stops 10 log-likelihood units short
    there). In (θ_i, θ_j, ρ) the cone is a box, a correlation at its limit is an ordinary held
    bound (ρ fixed while the variances move), and the Newton decrement sᵀAI⁻¹s is unchanged (J is
    invertible inside the cone). ρ rather than atanh ρ: the limit is reached in a step, not
    approached exponentially (1000 sleepstudy refits: the same answers, 20 % faster).

    Example:
        >>> import torch
        >>> theta = torch.tensor([0.0, 0.5, 0.0])  # log σ_a, covariance, log σ_b: ρ = 0.5
        >>> w = working_system(theta, torch.ones(3), torch.eye(3), torch.full((3,), -9.0), torch.full((3,), 9.0),
        ...                    torch.ones(3, dtype=torch.bool), torch.tensor([[0, 2, 1]]))
        >>> w.theta.tolist(), w.score.tolist()  # Jᵀs: ∂c/∂θ_a = ∂c/∂θ_b = c, ∂c/∂ρ = 1
        ([0.0, 0.5, 0.0], [1.5, 1.0, 1.5])
    """
    pairs = pair_index(pairs, theta.shape[-1], theta.device)
    if pairs.count == 0:
        return Working(theta, score, ai, lower, upper, scaled)
    i, j, c = pairs.i, pairs.j, pairs.c
    scale = torch.exp(theta.index_select(-1, i) + theta.index_select(-1, j))
    limit = CORRELATION_LIMIT
    covariance = theta.index_select(-1, c)
    rho = (covariance / scale).clamp(-limit, limit)
    # At the limit up to the round-off of c = ρ·e^{θ_i+θ_j}, ρ is exactly the bound, so a
    # correlation held there stays an active bound.
    rho = torch.where(rho.abs() >= LIMIT_REACHED, rho.sign() * limit, rho)
    # J = ∂θ_raw/∂θ_working: the identity but in the rows of the covariances, where
    # ∂c/∂θ_i = ∂c/∂θ_j = c and ∂c/∂ρ = e^{θ_i + θ_j} (placed by one product, no indexed write).
    k = theta.shape[-1]
    values = torch.cat([covariance, covariance, scale], -1)
    J = like(pairs.base, theta) + (values @ like(pairs.placement, theta)).unflatten(-1, (k, k))
    working_score = (score.unsqueeze(-2) @ J).squeeze(-2)
    working_ai = J.mT @ ai @ J
    # Raw covariances are unbounded (Identity transform): the working box there is |ρ| ≤ limit.
    floor = like(pairs.lower, theta)
    return Working(
        theta.index_copy(-1, c, rho),
        working_score,
        working_ai,
        torch.maximum(lower, floor),
        torch.minimum(upper, -floor),
        scaled | pairs.columns,
    )


def raw_parameters(working: Tensor, pairs: Tensor | Pairs) -> Tensor:
    """Raw θ from working coordinates: c = ρ·e^{θ_i + θ_j} for every pair. Pure; batched.

    Example:
        >>> import torch, math
        >>> raw = raw_parameters(torch.tensor([math.log(2.0), 0.5, 0.0]), torch.tensor([[0, 2, 1]]))
        >>> [round(v, 6) for v in raw.tolist()]  # c = 0.5 · 2 · 1
        [0.693147, 1.0, 0.0]
    """
    pairs = pair_index(pairs, working.shape[-1], working.device)
    if pairs.count == 0:
        return working
    i, j, c = pairs.i, pairs.j, pairs.c
    covariance = working[..., c] * torch.exp(working[..., i] + working[..., j])
    return working.index_copy(-1, c, covariance)


def negligible_to_floor(system: Working, rates: Tensor, resolution: Tensor, max_step: float) -> Tensor:
    """(…, k) flags: variances for which going to the floor, or staying there, changes ℓ by at
    most ``resolution`` (the round-off of ℓ). Pure.

    Why: on the log scale the Newton decrement of a variance at or near 0 stays finite (s and AI
    shrink as σ² and σ⁴) while what it can gain, linear in σ² there, vanishes; the iterations
    then move it to the floor (:func:`propose`) and hold it there. With natural x = c·e^{aθ}
    (``rates`` a, 0 for non-variances), moving θ_k by Δ changes x by u = x·expm1(aΔ) and ℓ by
    about s_k·u/(a x) − ½·AI_kk·(u/(a x))² (the quadratic model in x). A variance above its
    floor with s_k < 0 is flagged when both the gain and the loss of going to the floor are
    negligible — near 0, not merely near a stationary point, where the loss term is large; one
    at its floor with s_k ≥ 0 when a capped step up would gain that little.

    Example:
        >>> import torch
        >>> system = Working(torch.tensor([-14.0, 1.0]), torch.tensor([-1e-14, -1e-14]),
        ...                  torch.diag(torch.tensor([1e-20, 40.0])), torch.full((2,), -15.0),
        ...                  torch.full((2,), float("inf")), torch.ones(2, dtype=torch.bool))
        >>> negligible_to_floor(system, torch.tensor([2.0, 2.0]), torch.tensor(1e-12), 3.0).tolist()
        [True, False]
    """
    rates = like(rates, system.theta)
    variance = rates > 0
    safe = rates.masked_fill(~variance, 1.0)
    above = system.theta > system.lower
    # u/(a x) for the move considered: to the floor from above, a capped step up at the floor.
    move = torch.expm1(safe * (system.lower - system.theta).masked_fill(~above, max_step)) / safe
    linear = system.score * move
    curvature = 0.5 * torch.diagonal(system.ai, dim1=-2, dim2=-1) * move * move
    pushing = (system.score < 0) == above  # down from above, up at the floor
    limit = resolution.unsqueeze(-1)
    # (the loss of going down counts from above only)
    return variance & pushing & (linear <= limit) & ((curvature <= limit) | ~above)


def information_scale(theta: Tensor, lower: Tensor, rates: Tensor, floor: float) -> Tensor | None:
    """(…, k) factors w_k that put each parameter's information on the scale of the data: for a
    variance more than 10³ below its data-scale start x_ref, w = x_ref/x (its floor is
    ``floor``·x_ref, so w = e^{a(ℓ_k − θ_k)}/``floor``), else 1; None when every w is 1 (the usual
    case, cheaply told). Pure; a host-side test decides None.

    Why: a variance's log-scale information AI_kk shrinks as x² on the way to 0 whether or not
    the data inform it; AI_kk·w_k² is the information it would have at the data's scale — of the
    order of the others' for a variance estimated at the boundary, 0 for one confounded with the
    fixed effects or another term (:func:`~reml_fn.fit.step.newton_direction` tells them apart by
    it).

    Example:
        >>> import torch
        >>> floor = 1e-14  # lower = θ_ref + log(floor)/a
        >>> lower = torch.tensor([0.5 * math.log(floor), 0.5 * math.log(floor)])
        >>> information_scale(torch.tensor([0.0, -0.1]), lower, torch.tensor([2.0, 2.0]), floor) is None
        True
        >>> float(information_scale(torch.tensor([-5.0, 0.0]), lower, torch.tensor([2.0, 2.0]), floor)[0])  # e¹⁰
        22026.46...
    """
    rates = like(rates, theta)
    log_relative = rates * (lower - theta) - math.log(floor)  # log(x_ref / x) for a variance
    # Below x_ref/10³ only: above it w² < 10⁶ cannot move information across the 10³ε threshold
    # of newton_direction for a variance the data inform (its AI_kk is then ≥ 10⁻⁶ of its size
    # at x_ref), so w = 1 decides the same, cheaper.
    below = (rates > 0) & (log_relative > SCALED_BELOW)
    if not bool(below.any()):
        return None
    return torch.where(below, log_relative.clamp(max=700.0).exp(), 1.0)


SCALED_BELOW = math.log(1e3)


def silent_at_floor(
    theta: Tensor, ai: Tensor, lower: Tensor, rates: Tensor, floor: float, snapped: Tensor | None = None
) -> Tensor:
    """(…, k) flags: variances at their floor (or ``snapped`` there this iteration) without
    information on the scale of the data (:func:`information_scale`) — not identifiable, rather
    than estimated at the boundary. Pure.

    Example:
        >>> import torch
        >>> floor, lower = 1e-14, torch.tensor([0.5 * math.log(1e-14), -20.0])
        >>> ai = torch.diag(torch.tensor([1e-60, 40.0]))
        >>> silent_at_floor(lower.clone(), ai, lower, torch.tensor([2.0, 2.0]), floor).tolist()
        [True, False]
    """
    rates = like(rates, theta)
    variance = rates > 0
    at_floor = variance & (theta <= lower)
    if snapped is not None:  # going to the floor this iteration (:func:`negligible_to_floor`)
        at_floor = at_floor | (variance & snapped)
    diagonal = torch.diagonal(ai, dim1=-2, dim2=-1)
    information = torch.where(torch.isfinite(diagonal), diagonal.abs(), 0.0)
    scale = information_scale(theta, lower, rates, floor)
    if scale is not None:
        information = information * scale**2
    largest = information.amax(-1, keepdim=True) if theta.shape[-1] else information
    return at_floor & (information <= PIVOT_TOLERANCE * torch.finfo(theta.dtype).eps * largest)


def propose(system: Working, step: Tensor, pairs: Tensor | Pairs, snap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The candidate θ + Δ of a working-coordinate step: clamped to the box (variance floors,
    correlation limits), with the ``snap`` variances (:func:`negligible_to_floor`) at their floor.
    Returns the raw θ to evaluate and the step actually taken (working). Pure.

    Example:
        >>> import torch
        >>> system = Working(torch.tensor([0.0, 0.0]), torch.zeros(2), torch.eye(2), torch.tensor([-1.0, -1.0]),
        ...                  torch.tensor([1.0, 1.0]), torch.ones(2, dtype=torch.bool))
        >>> raw, taken = propose(system, torch.tensor([-5.0, 0.5]), torch.zeros(0, 3, dtype=torch.long))
        >>> raw.tolist(), taken.tolist()  # clamped to the box
        ([-1.0, 0.5], [-1.0, 0.5])
    """
    new = torch.clamp(system.theta + step, system.lower, system.upper)
    if snap is not None:
        new = torch.where(snap, system.lower, new)
    return raw_parameters(new, pairs), new - system.theta


def at_bounds(theta: Tensor, lower: Tensor, upper: Tensor, pairs: Tensor | Pairs) -> Tensor:
    """(…, k) flags: parameters that stopped at a bound (``FitResult.at_boundary``). Pure.

    Example:
        >>> import torch
        >>> at_bounds(torch.tensor([-1.0, 0.0]), torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]),
        ...           torch.zeros(0, 3, dtype=torch.long)).tolist()
        [True, False]
    """
    return (theta <= lower) | (theta >= upper) | at_correlation_limit(theta, pairs)
