"""Profile-likelihood intervals: where the signed root of the deviance difference reaches ±z.

For the ML deviance D(φ) (−2 × ML log-likelihood, β profiled out by GLS) over covariance
coordinates φ (log standard deviations, atanh correlations, log σ) and a parameter ψ:

    D_ψ(v) = min {D : ψ = v},   ζ_ψ(v) = sign(v − ψ̂) √(D_ψ(v) − D̂),

and the level-(1 − α) interval is {v : |ζ_ψ(v)| ≤ z_{1−α/2}} (lme4's ``profile`` + ``confint``).
For ψ = φ_j the coordinate is held at v while the others move; for ψ = β_j, with β̂(φ) and
C(φ) = cov(β̂) from the GLS fit at φ, min over β with β_j = v adds (β̂_j(φ) − v)² / C_jj(φ) to D, so

    D_{β_j}(v) = min_φ [D(φ) + (β̂_j(φ) − v)² / C_jj(φ)].

Every end of every interval is one element of a batch: Newton's method with the exact gradient and
Hessian (``torch.func``, ``vmap`` over the batch; held coordinates masked) solves all the
constrained minima at once, and Newton's method on ζ(v) = ±z moves every element's v at once —
dζ/dv = D'_ψ(v)/(2ζ) with D'_ψ(v) the objective's partial derivative in v at the constrained
minimiser (the envelope theorem), the secant step where that is unusable — from the quadratic
approximation at the optimum (ζ is close to linear in these coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["profile_limits"]

NEWTON_ITERATIONS = 40
STEP_TOLERANCE = 1e-8
ROOT_TOLERANCE = 1e-6
SECANT_ITERATIONS = 20


def _minimise(
    objective: Callable, phi: Tensor, held: Tensor, values: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """min over the coordinates not ``held`` of objective(φ, v, row) for every batch element at once
    (Newton, exact Hessian, Levenberg damping, step halving), from ``phi`` (m, K). Returns the
    minima (m,), the minimisers (m, K) and d(minimum)/dv (m,) (by the envelope theorem, the
    objective's partial derivative in v at the minimiser)."""
    value_of = torch.func.vmap(objective)
    gradient_of = torch.func.vmap(torch.func.grad(objective))
    hessian_of = torch.func.vmap(torch.func.hessian(objective))
    slope_of = torch.func.vmap(torch.func.grad(objective, argnums=1))
    free = (~held).to(phi.dtype)
    eye = torch.eye(phi.shape[-1], dtype=phi.dtype, device=phi.device)
    current = value_of(phi, values, rows)
    factor = None
    for _ in range(NEWTON_ITERATIONS):
        gradient = gradient_of(phi, values, rows) * free
        if factor is not None:
            # Converged when the step the last Hessian predicts is negligible: no new Hessian.
            predicted = torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
            if bool((predicted.abs().amax(-1) < STEP_TOLERANCE).all()):
                break
        hessian = hessian_of(phi, values, rows)
        hessian = 0.5 * (hessian + hessian.mT) * free[:, :, None] * free[:, None, :] + torch.diag_embed(1.0 - free)
        damping = torch.zeros_like(current)
        for _ in range(25):
            factor, info = torch.linalg.cholesky_ex(hessian + damping[:, None, None] * eye)
            bad = info != 0
            if not bool(bad.any()):
                break
            scale = hessian.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-8)
            damping = torch.where(bad, torch.where(damping > 0, 10.0 * damping, 1e-6 * scale), damping)
        step = -torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1) * free
        step = torch.where(torch.isfinite(step), step, 0.0).clamp(-3.0, 3.0)
        length = torch.ones_like(current)
        for _ in range(40):
            trial = value_of(phi + length[:, None] * step, values, rows)
            better = torch.isfinite(trial) & (trial <= current + 1e-13 * current.abs())
            if bool(better.all()):
                break
            length = torch.where(better, length, 0.5 * length)
        phi = torch.where(better[:, None], phi + length[:, None] * step, phi)
        current = torch.where(better, trial, current)
        if bool(((length[:, None] * step).abs().amax(-1) < STEP_TOLERANCE).all()):
            break
    return current, phi, slope_of(phi, values, rows)


def profile_limits(
    deviance: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    optimum: Tensor,
    z: float,
    bounds: list[tuple[float, float]],
) -> tuple[Tensor, Tensor]:
    """Both ends of the profile interval of every covariance coordinate φ_j and every fixed effect
    β_j (module docstring), in one batch.

    ``deviance(φ)`` returns (D(φ), β̂(φ) (p,), C(φ) (p, p)); ``optimum`` (K,) its minimiser;
    ``bounds`` per coordinate (where a standard deviation's log reaches 0 in effect, a correlation
    ±1): an end that ζ does not reach before its bound is the bound. Returns (K + p, 2) ends in φ
    units for the coordinates and β units for the fixed effects, and the (K + p, 2) final |ζ ∓ z|.

    Example:
        >>> import torch
        >>> def D(phi):   # D = φ₀²/4 + (φ₁ − φ₀)², β̂ = φ₀ with C = 1
        ...     return (phi[0] / 2) ** 2 + (phi[1] - phi[0]) ** 2, phi[:1], torch.ones(1, 1)
        >>> ends, miss = profile_limits(D, torch.zeros(2), 1.96, [(-9.0, 9.0), (-9.0, 9.0)])
        >>> [round(v, 5) for v in ends[0].tolist()]                        # ζ_φ₀(v) = v/2
        [-3.92, 3.92]
    """
    K = optimum.shape[0]
    best, beta_hat, C_hat = deviance(optimum)
    p = beta_hat.shape[-1]
    dtype, device = optimum.dtype, optimum.device
    hessian = torch.func.hessian(lambda t: deviance(t)[0])(optimum)
    covariance = torch.linalg.pinv(0.5 * (0.5 * (hessian + hessian.mT)))  # cov(φ̂) = (½ ∇²D)⁻¹

    def objective(phi: Tensor, value: Tensor, row: Tensor) -> Tensor:
        # row: [which fixed effect (one-hot, p) …, is a fixed effect (1), held coordinate (one-hot, K)]
        phi = torch.where(row[p + 1 :] > 0, value, phi)
        D, beta, C = deviance(phi)
        e, weight = row[:p], row[p]
        penalty = (e @ beta - value) ** 2 / (e @ C @ e + (1.0 - weight))
        return D + weight * penalty

    # The batch: for each coordinate and fixed effect, its lower then its upper end.
    m = 2 * (K + p)
    centre = torch.cat([optimum, beta_hat]).repeat_interleave(2)
    scale = torch.cat([covariance.diagonal().clamp(min=1e-24).sqrt(), C_hat.diagonal().clamp(min=1e-24).sqrt()])
    scale = scale.repeat_interleave(2)
    target = torch.tensor([-z, z], dtype=dtype, device=device).repeat(K + p)
    held = torch.zeros(m, K, dtype=torch.bool, device=device)
    rows = torch.zeros(m, p + 1 + K, dtype=dtype, device=device)
    low = torch.full((m,), -math.inf, dtype=dtype, device=device)
    high = torch.full((m,), math.inf, dtype=dtype, device=device)
    for j in range(K):
        held[2 * j : 2 * j + 2, j] = True
        low[2 * j : 2 * j + 2], high[2 * j : 2 * j + 2] = bounds[j][0], bounds[j][1]
    for j in range(p):
        rows[2 * (K + j) : 2 * (K + j) + 2, j] = 1.0
        rows[2 * (K + j) : 2 * (K + j) + 2, p] = 1.0
    rows[:, p + 1 :] = held.to(dtype)
    coordinate = held.to(dtype).argmax(-1)
    is_coordinate = held.any(-1)

    def start_for(values: Tensor) -> Tensor:
        """The quadratic approximation's constrained optimum: φ̂ + Σ_{·j}/Σ_jj (v − φ̂_j) for a held
        coordinate, φ̂ for a fixed effect."""
        column = covariance[:, coordinate].mT  # (m, K)
        ratio = column / column.gather(1, coordinate[:, None]).clamp(min=1e-300)
        shift = (values - centre)[:, None] * ratio
        phi = optimum + torch.where(is_coordinate[:, None], shift, 0.0)
        return torch.where(held, values[:, None], phi)

    def zeta(values: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ζ(v), the minimisers, and dζ/dv = D'(v)/(2ζ)."""
        phi = torch.where(held, values[:, None], phi)
        minima, phi, slope = _minimise(objective, phi, held, values, rows)
        z_value = torch.sign(values - centre) * (minima - best).clamp(min=0.0).sqrt()
        return z_value, phi, slope / (2.0 * z_value)

    # Newton's method on ζ(v) = target (the slope is free: the envelope theorem), the secant
    # step where that slope is unusable; v stays inside its bounds.
    b = (centre + target * scale).clamp(low + 1e-9, high - 1e-9)
    phi = start_for(b)
    zb, phi, derivative = zeta(b, phi)
    fb = zb - target
    at_bound = torch.zeros(m, dtype=torch.bool, device=device)
    a, fa = centre.clone(), -target
    for _ in range(SECANT_ITERATIONS):
        open_ = (fb.abs() > ROOT_TOLERANCE) & ~at_bound
        if not bool(open_.any()):
            break
        usable = torch.isfinite(derivative) & (derivative > 0)
        secant = torch.where(fb != fa, b - fb * (b - a) / (fb - fa), b)
        c = torch.where(usable, b - fb / derivative, secant)
        beyond = (c <= low) | (c >= high)
        edge = torch.where(target < 0, low, high)
        c = torch.where(beyond, 0.5 * (b + edge), c)
        reached = beyond & ((c - edge).abs() < 1e-6 * edge.abs().clamp(min=1.0))
        at_bound = at_bound | (reached & open_)
        c = torch.where(at_bound, edge, c)
        c = torch.where(open_, c, b)
        phi = torch.where(
            open_[:, None], phi + torch.where(is_coordinate[:, None], start_for(c) - start_for(b), 0.0), phi
        )
        a, fa = torch.where(open_, b, a), torch.where(open_, fb, fa)
        b = c
        zb, phi, derivative = zeta(b, phi)
        fb = torch.where(at_bound, 0.0, zb - target)
    return b.reshape(K + p, 2), fb.abs().reshape(K + p, 2)
