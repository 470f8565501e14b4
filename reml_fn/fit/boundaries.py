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

from reml_fn.params import param_specs
from reml_fn.transforms import ExpPow2
from reml_fn.transforms import Identity as IdentityTransform

__all__ = [
    "CORRELATION_LIMIT",
    "Working",
    "active_bounds",
    "working_system",
    "raw_parameters",
    "correlation_pairs",
    "at_correlation_limit",
    "at_bounds",
    "propose",
    "negligible_to_floor",
    "silent_at_floor",
    "information_scale",
    "any_variance_below_start",
]


def active_bounds(theta: Tensor, score: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """(…, k) flags: parameters at a box bound whose score points outward (held by the step). Pure."""
    return ((theta <= lower) & (score < 0)) | ((theta >= upper) & (score > 0))


# |ρ| of an unstructured covariance stops here (the edge of the positive semi-definite cone).
CORRELATION_LIMIT = 1.0 - 1e-10
_COVARIANCE_NAME = re.compile(r"sigma\^2_(\d+)_(\d+)$")


def correlation_pairs(s) -> Tensor:
    """Flat indices ``(i, j, c)`` (m, 3) of every free covariance c = ``…/sigma^2_a_b`` (a ≠ b,
    Identity transform) whose variances ``…/sigma^2_a_a`` and ``…/sigma^2_b_b`` are free ExpPow2
    parameters: the entries of :class:`~reml_fn.Unstructured` blocks, where
    c = ρ·e^{θ_i + θ_j} with correlation |ρ| ≤ 1."""
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
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 3)


def at_correlation_limit(theta: Tensor, pairs: Tensor) -> Tensor:
    """(…, k) flags: the covariances of ``pairs`` whose |ρ| reached the limit. Pure."""
    flags = torch.zeros_like(theta, dtype=torch.bool)
    if pairs.shape[0] == 0:
        return flags
    i, j, c = pairs.to(theta.device).unbind(-1)
    reached = theta[..., c].abs() >= CORRELATION_LIMIT * torch.exp(theta[..., i] + theta[..., j]) * (1.0 - 1e-12)
    columns = torch.arange(theta.shape[-1], device=theta.device) == c.unsqueeze(-1)
    return flags | (reached.unsqueeze(-1) & columns).any(-2)


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


def _pair_columns(pairs: Tensor, k: int, device) -> Tensor:
    return torch.zeros(k, dtype=torch.bool, device=device).index_fill(0, pairs[:, 2].to(device), True)


def working_system(theta: Tensor, score: Tensor, ai: Tensor, lower: Tensor, upper: Tensor, scaled: Tensor, pairs):
    """Move the raw system to working coordinates (:class:`Working`). Pure; batched (…, k).

    Why: a raw covariance has no natural unit and its admissible range |c| ≤ e^{θ_i + θ_j} moves
    with the variances, so Newton steps on (θ_i, θ_j, c) leave the positive-definite cone or crawl
    along the ridge |ρ| → 1 (an uncentred random slope: lme4 stops 10 log-likelihood units short
    there). In (θ_i, θ_j, ρ) the cone is a box, a correlation at its limit is an ordinary held
    bound (ρ fixed while the variances move), and the Newton decrement sᵀAI⁻¹s is unchanged (J is
    invertible inside the cone). ρ rather than atanh ρ: the limit is reached in a step, not
    approached exponentially (1000 sleepstudy refits: the same answers, 20 % faster).
    """
    if pairs.shape[0] == 0:
        return Working(theta, score, ai, lower, upper, scaled)
    k = theta.shape[-1]
    pairs = pairs.to(theta.device)
    i, j, c = pairs.unbind(-1)
    scale = torch.exp(theta[..., i] + theta[..., j])
    limit = CORRELATION_LIMIT
    rho = (theta[..., c] / scale).clamp(-limit, limit)
    # At the limit up to the round-off of c = ρ·e^{θ_i+θ_j}, ρ is exactly the bound, so a
    # correlation held there stays an active bound.
    rho = torch.where(rho.abs() >= limit * (1.0 - 1e-12), torch.sign(rho) * limit, rho)
    # J = ∂θ_raw/∂θ_working: the identity but for the rows of the covariances, where
    # ∂c/∂θ_i = ∂c/∂θ_j = c and ∂c/∂ρ = e^{θ_i + θ_j}.
    J = torch.eye(k, dtype=theta.dtype, device=theta.device).expand(*theta.shape[:-1], k, k).clone()
    covariance = theta[..., c]
    J[..., c, i] = covariance
    J[..., c, j] = covariance
    J[..., c, c] = scale
    working_score = (J.transpose(-1, -2) @ score.unsqueeze(-1)).squeeze(-1)
    working_ai = J.transpose(-1, -2) @ ai @ J
    columns = _pair_columns(pairs, k, theta.device)
    return Working(
        theta.index_copy(-1, c, rho),
        working_score,
        0.5 * (working_ai + working_ai.transpose(-1, -2)),
        torch.where(columns, -limit, lower),
        torch.where(columns, limit, upper),
        scaled | columns,
    )


def raw_parameters(working: Tensor, pairs: Tensor) -> Tensor:
    """Raw θ from working coordinates: c = ρ·e^{θ_i + θ_j} for every pair. Pure; batched."""
    if pairs.shape[0] == 0:
        return working
    i, j, c = pairs.to(working.device).unbind(-1)
    covariance = working[..., c] * torch.exp(working[..., i] + working[..., j])
    return working.index_copy(-1, c, covariance)


def negligible_to_floor(system: Working, rates: Tensor, resolution: Tensor, max_step: float) -> Tensor:
    """(…, k) flags: variances that can gain at most ``resolution`` (the round-off of ℓ) by moving
    — above the floor pushing down (s_k < 0) all the way to it, or at the floor pushing up
    (s_k ≥ 0) by a capped step. Pure.

    Why: on the log scale the Newton decrement of a variance at or near 0 stays finite (s and AI
    shrink as σ² and σ⁴) while the gain it can make, linear in σ² there, vanishes: with natural
    x = c·e^{aθ} (``rates`` a, 0 for non-variances), moving θ_k by Δ gains about
    s_k·expm1(aΔ)/a. Such a variance is at its boundary for every purpose: the iterations move it
    to the floor (:func:`propose`) and hold it there.
    """
    rates = rates.to(device=system.theta.device, dtype=system.theta.dtype)
    variance = rates > 0
    safe = torch.where(variance, rates, 1.0)
    above = system.theta > system.lower
    down = system.score * torch.expm1(safe * (system.lower - system.theta)) / safe
    up = system.score * torch.expm1(safe * max_step) / safe
    gain = torch.where(above, torch.where(system.score < 0, down, math.inf), torch.where(system.score >= 0, up, -1.0))
    return variance & (gain <= resolution.unsqueeze(-1)) & (gain >= 0)


def information_scale(theta: Tensor, lower: Tensor, rates: Tensor, floor: float) -> Tensor:
    """(…, k) factors w_k that put each parameter's information on the scale of the data: for a
    variance below its data-scale start x_ref, w = x_ref/x (its floor is ``floor``·x_ref, so
    w = e^{a(ℓ_k − θ_k)}/``floor``), else 1. Pure.

    Why: a variance's log-scale information AI_kk shrinks as x² on the way to 0 whether or not
    the data inform it; AI_kk·w_k² is the information it would have at the data's scale — of the
    order of the others' for a variance estimated at the boundary, 0 for one confounded with the
    fixed effects or another term (:func:`~reml_fn.fit.step.newton_direction` tells them apart by
    it).
    """
    rates = rates.to(device=theta.device, dtype=theta.dtype)
    relative = torch.exp(rates * (lower - theta)) / floor  # x_ref / x for a variance
    return torch.where((rates > 0) & torch.isfinite(relative), relative.clamp(min=1.0), 1.0)


def any_variance_below_start(theta: Tensor, lower: Tensor, rates: Tensor, floor: float) -> bool:
    """Whether some variance is below its data-scale start (where :func:`information_scale` is
    not 1): a cheap test that lets the usual iteration skip it. Host-side (a bool)."""
    rates = rates.to(device=theta.device, dtype=theta.dtype)
    return bool(((rates > 0) & (rates * (lower - theta) > math.log(floor))).any())


def silent_at_floor(
    theta: Tensor, ai: Tensor, lower: Tensor, rates: Tensor, floor: float, snapped: Tensor | None = None
) -> Tensor:
    """(…, k) flags: variances at their floor (or ``snapped`` there this iteration) without
    information on the scale of the data (:func:`information_scale`) — not identifiable, rather
    than estimated at the boundary. Pure."""
    rates = rates.to(device=theta.device, dtype=theta.dtype)
    variance = rates > 0
    at_floor = variance & (theta <= lower)
    if snapped is not None:  # going to the floor this iteration (:func:`negligible_to_floor`)
        at_floor = at_floor | (variance & snapped)
    diagonal = torch.diagonal(ai, dim1=-2, dim2=-1)
    information = (
        torch.where(torch.isfinite(diagonal), diagonal.abs(), 0.0) * information_scale(theta, lower, rates, floor) ** 2
    )
    largest = information.amax(-1, keepdim=True) if theta.shape[-1] else information
    return at_floor & (information <= SILENT * torch.finfo(theta.dtype).eps * largest)


# A parameter whose information is below SILENT·ε of the largest has none (the rule of
# newton_direction and result.confounded_parameters).
SILENT = 1e3


def propose(system: Working, step: Tensor, pairs: Tensor, snap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The candidate θ + Δ of a working-coordinate step: clamped to the box (variance floors,
    correlation limits), with the ``snap`` variances (:func:`negligible_to_floor`) at their floor.
    Returns the raw θ to evaluate and the step actually taken (working). Pure."""
    new = torch.clamp(system.theta + step, system.lower, system.upper)
    if snap is not None:
        new = torch.where(snap, system.lower, new)
    return raw_parameters(new, pairs), new - system.theta


def at_bounds(theta: Tensor, lower: Tensor, upper: Tensor, pairs: Tensor) -> Tensor:
    """(…, k) flags: parameters that stopped at a bound (``FitResult.at_boundary``). Pure."""
    return (theta <= lower) | (theta >= upper) | at_correlation_limit(theta, pairs)
