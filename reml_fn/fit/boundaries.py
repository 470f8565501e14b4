"""Bounds of the AI-REML iterations: box bounds (variance floors, correlation limits of sigmoid
parameters) and the correlation limit |ρ| ≤ 1 − 10⁻¹⁰ of unstructured covariances, held while
the other parameters move. Pure functions on (…, k) tensors, shared by every driver.
"""

from __future__ import annotations

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

    Raw θ except for every covariance c of ``pairs``, which is replaced by z = atanh(ρ) with
    c = ρ·e^{θ_i + θ_j}: ``theta``, ``score`` = Jᵀs and ``ai`` = JᵀAI J with J = ∂θ_raw/∂θ_working,
    box bounds ``lower``/``upper`` (|z| ≤ atanh(``CORRELATION_LIMIT``)), and ``scaled`` flags of the
    log/logit-scale coordinates (z included), whose steps :func:`~reml_fn.fit.step.capped` caps.
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
    along the ridge |ρ| → 1 (an uncentred random slope). In (θ_i, θ_j, atanh ρ) the cone is a box,
    a correlation at its limit is an ordinary held bound (ρ fixed while the variances move), and
    the Newton decrement sᵀAI⁻¹s is unchanged (J is invertible inside the cone).
    """
    if pairs.shape[0] == 0:
        return Working(theta, score, ai, lower, upper, scaled)
    k = theta.shape[-1]
    pairs = pairs.to(theta.device)
    i, j, c = pairs.unbind(-1)
    scale = torch.exp(theta[..., i] + theta[..., j])
    limit = torch.atanh(torch.tensor(CORRELATION_LIMIT, dtype=theta.dtype, device=theta.device))
    rho = (theta[..., c] / scale).clamp(-CORRELATION_LIMIT, CORRELATION_LIMIT)
    z = torch.atanh(rho)
    eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
    J = eye.expand(*theta.shape[:-1], k, k).clone()
    for p in range(pairs.shape[0]):
        a, b, cov = int(i[p]), int(j[p]), int(c[p])
        J[..., cov, a] = theta[..., cov]
        J[..., cov, b] = theta[..., cov]
        J[..., cov, cov] = (1.0 - rho[..., p] ** 2) * scale[..., p]
    working_score = (J.transpose(-1, -2) @ score.unsqueeze(-1)).squeeze(-1)
    working_ai = J.transpose(-1, -2) @ ai @ J
    columns = _pair_columns(pairs, k, theta.device)
    return Working(
        theta.index_copy(-1, c, z),
        working_score,
        0.5 * (working_ai + working_ai.transpose(-1, -2)),
        torch.where(columns, -limit, lower),
        torch.where(columns, limit, upper),
        scaled | columns,
    )


def raw_parameters(working: Tensor, pairs: Tensor) -> Tensor:
    """Raw θ from working coordinates: c = tanh(z)·e^{θ_i + θ_j} for every pair. Pure; batched."""
    if pairs.shape[0] == 0:
        return working
    i, j, c = pairs.to(working.device).unbind(-1)
    covariance = torch.tanh(working[..., c]) * torch.exp(working[..., i] + working[..., j])
    return working.index_copy(-1, c, covariance)


def negligible_to_floor(system: Working, rates: Tensor, resolution: Tensor) -> Tensor:
    """(…, k) flags: variances above their floor that push towards it (s_k < 0) but could gain at
    most ``resolution`` (the round-off of ℓ) by going all the way there. Pure.

    Why: on the log scale the Newton decrement of a variance heading to 0 stays finite (s and AI
    shrink as σ² and σ⁴), while the gain it can still make, linear in σ² near 0, vanishes: with
    natural x = c·e^{aθ} (``rates`` a, 0 for non-variances), going to the floor ℓ_k gains about
    s_k·expm1(a(ℓ_k − θ_k))/a. Such a variance is at its boundary for every purpose: the
    iterations move it to the floor and hold it there (:func:`propose`).
    """
    rates = rates.to(device=system.theta.device, dtype=system.theta.dtype)
    variance = rates > 0
    safe = torch.where(variance, rates, 1.0)
    remaining = system.score * torch.expm1(safe * (system.lower - system.theta)) / safe
    return variance & (system.theta > system.lower) & (system.score < 0) & (remaining <= resolution.unsqueeze(-1))


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
