r"""The decisions of one AI-REML iteration, as pure functions on (…, k) tensors.

The one AI-REML loop (:mod:`reml_fn.fit.algorithm`, behind ``fit`` — a batch of one — and
``fit_batched``) makes its decisions through these functions and those of
:mod:`reml_fn.fit.boundaries`, and nothing else. With θ the raw
free parameters, s the score and AI the average information at θ (both in the coordinates of
:func:`~reml_fn.fit.boundaries.working_system`, covariances as correlations, held bounds removed):

* **Newton direction** (:func:`newton_direction`): Δ = AI_ff⁻¹ s_f on the free parameters, by a
  Cholesky factorisation of the unit-diagonal scaling D^{-1/2} AI_ff D^{-1/2}. The AI matrix is
  *definite* when every free parameter has information (on the data's scale, more than
  ``PIVOT_TOLERANCE``·ε of the largest) and that factorisation succeeds with every pivot above
  ``PIVOT_TOLERANCE``·ε; the Newton decrement d = s_fᵀ Δ_f ≥ 0 then approximates twice the
  log-likelihood still to gain.
* **Convergence** (:func:`converged`): definite AI *and* d ≤ :func:`decrement_tolerance` — the
  larger of ``tol`` (scaled from float64 to the dtype's ε) and 16·ε·(1 + |ℓ|), below which the
  gain d/2 cannot be resolved in ℓ. By Cauchy–Schwarz, s_k² ≤ AI_kk · d for every free k, so the
  score is then small on the scale of the information too. An indefinite or singular AI never
  converges: it is a reason to damp.
* **Candidates** (:func:`candidate_steps`): for Marquardt damping λ, Δ(λ) solves
  (AI_ff + λ D) Δ = s_f with D = diag(AI) floored at 10⁻⁸ max diag(AI) (so a parameter without
  information is still damped); λ = 0 uses the Newton direction and is skipped when AI is not
  definite. Each λ tries the capped Δ(λ) at fractions 1, ½, ¼, then the two block steps.
* **Acceptance** (:func:`accepts`): the gain ℓ(θ + Δ) − ℓ(θ) must satisfy Armijo's condition
  against the quadratic model, gain ≥ 10⁻⁴ · (sᵀΔ − ½ ΔᵀAIΔ), *and* exceed the round-off of ℓ,
  :func:`loglik_resolution`. A step that gains only round-off is no progress: damping grows.
* **Expansion** (:func:`expands`, :func:`first_local_maximum`): where an accepted step gained
  more than ``EXPANSION_RATIO`` × the quadratic model's prediction, and the previous one did
  too, the AI matrix overstates the curvature along it (e.g. a random-intercept variance absorbing
  the mean of a model without a fixed intercept); the step is then tried at ``EXPANSION_MULTIPLIERS`` × its length and the
  first local maximum of ℓ along that ray is taken. Without it such fits creep linearly.
* **Damping** (:func:`relaxed`, :func:`stiffened`): λ/10 after an accepted step (0 below 10⁻⁶),
  max(10λ, 10⁻³) after a damping level without an acceptable step.
* **Giving up** (:func:`stuck_status`): no acceptable step in ``max_tries`` damping levels stops
  the fit with status 5 (not identifiable) where the AI matrix is singular there, else 2. A fit
  that converges over the other parameters with a variance at its floor that has no information on
  the data's scale is not identifiable either (status 5, not 0).
* **Boundaries** (:mod:`reml_fn.fit.boundaries`): a parameter at a bound whose score points
  outward is held; a variance that could gain no more than round-off by going to its floor goes
  there and is held (its Newton decrement on the log scale would never vanish).
* **Stopping**: a converged fit stops at the point whose AI terms passed the test, so its
  reported ℓ, score and AI are those of the returned parameters. Only where a variance is still
  to go to its floor does it take one last full Newton step with the snap (polishing), kept when ℓ
  does not fall by more than round-off (:func:`polish_accepts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Options",
    "Newton",
    "newton_direction",
    "ai_direction",
    "capped",
    "candidate_steps",
    "predicted_gain",
    "loglik_resolution",
    "decrement_tolerance",
    "converged",
    "accepts",
    "polish_accepts",
    "relaxed",
    "stiffened",
    "expands",
    "first_local_maximum",
    "EXPANSION_MULTIPLIERS",
    "stuck_status",
    "STEP_FRACTIONS",
]

# Defaults of fit and fit_batched (one algorithm, one set of settings).
DEFAULT_MAX_ITER = 200
DEFAULT_TOL = 1e-12  # Newton decrement (float64; scaled by ε for other dtypes)
DEFAULT_MAX_STEP = 3.0
DEFAULT_MAX_TRIES = 30
DEFAULT_LOOKAHEAD = 512

# Smallest pivot (× ε) of the unit-diagonal scaled AI that counts as non-singular: about
# 2e-13 in float64 (a correlation of 1 − 1e-13 between two parameters' effects), 1e-4 in float32.
PIVOT_TOLERANCE = 1e3
# ℓ differences below ROUNDOFF·ε·(1 + |ℓ|) are round-off; convergence needs d below 4× that.
ROUNDOFF = 4.0
ARMIJO = 1e-4
# Relative floor of the Marquardt scaling D = diag(AI).
DAMPING_FLOOR = 1e-8
FLOAT64_EPSILON = torch.finfo(torch.float64).eps
# A step whose gain exceeds EXPANSION_RATIO × the predicted gain is tried longer, at these
# multiples of its length (one vmapped evaluation of all of them).
EXPANSION_RATIO = 1.5
EXPANSION_MULTIPLIERS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Options:
    """The settings of an AI-REML fit, validated once (``fit`` and ``fit_batched`` share them).

    Args:
        max_iter: iteration limit (≥ 1).
        tol: Newton decrement sᵀAI⁻¹s (≈ twice the log-likelihood still to gain) at which a fit
            converges, for float64 data; scaled by ε/ε_float64 for other dtypes, and never below
            the round-off of ℓ (:func:`decrement_tolerance`). Finite, > 0.
        max_step: cap on each |Δθ_k| per iteration for log/logit-scale parameters (finite, > 0).
        max_tries: damping levels tried per iteration before giving up (≥ 1).
        lookahead: candidates evaluated per line-search round over all searching datasets
            (``fit_batched``; 1 evaluates one candidate at a time). It changes the schedule, never
            the decisions.

    Example:
        >>> Options(max_iter=50).max_iter
        50
        >>> Options(tol=0.0)
        Traceback (most recent call last):
        ...
        ValueError: tol must be a finite float > 0, got 0.0
    """

    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    max_step: float = DEFAULT_MAX_STEP
    max_tries: int = DEFAULT_MAX_TRIES
    lookahead: int = DEFAULT_LOOKAHEAD

    def __post_init__(self):
        for name in ("max_iter", "max_tries", "lookahead"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        for name in ("tol", "max_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


class Newton(NamedTuple):
    """The undamped AI-REML step: ``delta`` (…, k), ``decrement`` (…,) = sᵀΔ, ``definite`` (…,)."""

    delta: Tensor
    decrement: Tensor
    definite: Tensor


def _free_system(ai: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    free = ~active
    both = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(ai.shape[-1], dtype=ai.dtype, device=ai.device)
    return free, both, eye


def newton_direction(score: Tensor, ai: Tensor, active: Tensor, information_scale: Tensor | None = None) -> Newton:
    """Δ_f = AI_ff⁻¹ s_f with the ``active`` parameters held (Δ = 0), and whether AI_ff is definite.

    AI_ff is scaled to unit diagonal before its Cholesky factorisation, so "definite" does not
    depend on the units of the parameters; a free parameter with no information (AI_kk·w_k² at
    most ``PIVOT_TOLERANCE``·ε of the largest, with ``information_scale`` w putting variances near
    0 on the data's scale, :func:`~reml_fn.fit.boundaries.information_scale`) makes it indefinite. Where it is not definite, Δ = 0 and the decrement is 0. Pure, batched (…, k).

    Example:
        >>> import torch
        >>> ai = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # two parameters with the same effect
        >>> newton_direction(torch.tensor([1.0, 1.0]), ai, torch.tensor([False, False])).definite
        tensor(False)
        >>> newton_direction(torch.tensor([1.0, 1.0]), ai, torch.tensor([False, True]))  # one held
        Newton(delta=tensor([0.5000, 0.0000]), decrement=tensor(0.5000), definite=tensor(True))
    """
    diagonal = torch.diagonal(ai, dim1=-2, dim2=-1)
    held = bool(active.any())  # nothing held is the usual case: then no masks are needed
    free = ~active
    eps = torch.finfo(ai.dtype).eps
    # A free parameter whose information is round-off next to the others' has none (the rule of
    # result.confounded_parameters); unit-diagonal scaling alone would hide it.
    information = diagonal if information_scale is None else diagonal * information_scale**2
    if ai.shape[-1]:
        largest = (torch.where(free, information, 0.0) if held else information).amax(-1, keepdim=True)
    else:
        largest = information
    informative = information > PIVOT_TOLERANCE * eps * largest
    if held:
        informative = informative | active
    # A free AI_kk ≤ 0 (or NaN) stays ≤ 0 after the scaling below, so the factorisation fails there.
    root = diagonal.clamp(min=torch.finfo(ai.dtype).tiny).rsqrt()
    scaled = ai * root.unsqueeze(-1) * root.unsqueeze(-2)
    rhs = score * root
    if held:
        both = free.unsqueeze(-1) & free.unsqueeze(-2)
        eye = torch.eye(ai.shape[-1], dtype=ai.dtype, device=ai.device)
        scaled = torch.where(both, scaled, eye)
        rhs = torch.where(free, rhs, 0.0)
    factor, info = torch.linalg.cholesky_ex(scaled)
    definite = (info == 0) & informative.all(-1)
    if ai.shape[-1]:
        # Pivots of the unit-diagonal factor: (L_kk)² > 10³ε.
        pivots = torch.diagonal(factor, dim1=-2, dim2=-1).amin(-1)
        definite = definite & (pivots > math.sqrt(PIVOT_TOLERANCE * eps))
    delta = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1) * root
    if held:
        delta = torch.where(free, delta, 0.0)
    decrement = (score * delta).sum(-1)
    definite = definite & torch.isfinite(decrement)  # a non-finite Δ_k makes sᵀΔ non-finite
    indefinite = ~definite
    return Newton(delta.masked_fill(indefinite.unsqueeze(-1), 0.0), decrement.masked_fill(indefinite, 0.0), definite)


def ai_direction(score: Tensor, ai: Tensor, active: Tensor, damping: Tensor | float = 0.0):
    """Solve (AI_ff + λ D) Δ_f = s_f with the active parameters held (Δ = 0). Pure, batched.

    λ = ``damping`` = 0 is the Newton (AI-REML) step of :func:`newton_direction`; λ > 0 is
    Marquardt's damping with D = diag(AI) floored at ``DAMPING_FLOOR``·max diag(AI), which bends
    the step towards the diagonally scaled score and makes the system positive definite when AI
    is singular or indefinite. Returns ``(delta, decrement, ok)``; ``ok`` is False where the
    system could not be solved or Δ is not an ascent direction (sᵀΔ ≤ 0).

    Example:
        >>> import torch
        >>> ai, score, free = torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.tensor([1.0, 0.5]), torch.tensor([False, False])
        >>> ai_direction(score, ai, free)[2].item()  # indefinite: no Newton step
        False
        >>> delta, decrement, ok = ai_direction(score, ai, free, torch.tensor(100.0))
        >>> ok.item(), decrement.item() > 0  # damped: an ascent direction
        (True, True)
    """
    if isinstance(damping, (int, float)) and damping == 0:
        newton = newton_direction(score, ai, active)
        return newton.delta, newton.decrement, newton.definite
    free, both, eye = _free_system(ai, active)
    damping = torch.as_tensor(damping, dtype=score.dtype, device=score.device)
    diagonal = torch.diagonal(ai, dim1=-2, dim2=-1)
    largest = torch.where(free, diagonal.abs(), 0.0).amax(-1, keepdim=True) if ai.shape[-1] else diagonal
    floor = (DAMPING_FLOOR * largest).clamp(min=torch.finfo(ai.dtype).tiny)
    damped = ai + damping.unsqueeze(-1).unsqueeze(-1) * torch.diag_embed(torch.maximum(diagonal, floor))
    delta, info = torch.linalg.solve_ex(torch.where(both, damped, eye), torch.where(free, score, 0.0).unsqueeze(-1))
    delta = torch.where(free, delta.squeeze(-1), 0.0)
    decrement = (score * delta).sum(-1)
    ok = (info == 0) & torch.isfinite(delta).all(-1) & (decrement > 0)
    undamped = damping == 0
    if bool(undamped.any()):
        # Rows at λ = 0 (a batch mixes levels) take the Newton step, exactly as alone.
        newton = newton_direction(score, ai, active)
        delta = torch.where(undamped.unsqueeze(-1), newton.delta, delta)
        decrement = torch.where(undamped, newton.decrement, decrement)
        ok = torch.where(undamped, newton.definite, ok)
    delta = torch.where(ok.unsqueeze(-1), delta, 0.0)
    return delta, torch.where(ok, decrement, 0.0), ok


def capped(delta: Tensor, scaled: Tensor, max_step: float) -> Tensor:
    """Clamp each log/logit-scale component (``scaled``) of Δ to [−max_step, max_step]. Pure.

    Elementwise, so one parameter whose Newton step explodes (a variance with a negligible effect
    on V, where AI is nearly singular) cannot shrink everybody else's step. Correlations ρ of
    the working coordinates count as scaled; raw steps of identity-scale parameters (Cholesky
    entries, user parameters) have no common unit and are left to the block step, the damping
    and the line search.

    Example:
        >>> import torch
        >>> capped(torch.tensor([5.0, -5.0, 5.0]), torch.tensor([True, True, False]), 3.0)
        tensor([ 3., -3.,  5.])
    """
    return torch.where(scaled, delta.clamp(-max_step, max_step), delta)


# Backtracking fractions of the full (possibly damped) AI step tried before the block steps.
STEP_FRACTIONS = (1.0, 0.5, 0.25)


def candidate_steps(
    score: Tensor,
    ai: Tensor,
    active: Tensor,
    scaled: Tensor,
    damping,
    max_step: float,
    newton: Newton | None = None,
):
    """The steps one damping level tries, in order (pure): the capped Δ(λ) at fractions 1, ½, ¼;
    then, when the model mixes log/logit-scale and identity-scale parameters, the block step with
    the identity-scale ones (covariances) held, which cannot push G out of the positive-definite
    cone while variances are far off, and the block step moving those alone.

    Yields ``(step, ok)`` pairs; ``ok`` is False where the system was not solvable (or, at λ = 0,
    not definite). ``newton``: the :func:`newton_direction` at this point when the caller has it
    (used at λ = 0 only).

    Example:
        >>> import torch
        >>> ai, score = torch.eye(2), torch.tensor([1.0, 2.0])
        >>> steps = candidate_steps(score, ai, torch.tensor([False, False]), torch.tensor([True, True]), 0.0, 3.0)
        >>> [step.tolist() for step, ok in steps][:3]  # Δ, Δ/2, Δ/4 (no block steps: one kind)
        [[1.0, 2.0], [0.5, 1.0], [0.25, 0.5]]
    """
    if isinstance(damping, (int, float)):
        undamped_level = damping == 0
    else:
        undamped_level = not bool((torch.as_tensor(damping) != 0).any())
    if undamped_level:
        damping = 0.0
        if newton is not None:
            delta, ok = newton.delta, newton.definite
        else:
            delta, _, ok = ai_direction(score, ai, active, damping)
    else:
        delta, _, ok = ai_direction(score, ai, active, damping)
    delta = capped(delta, scaled, max_step)
    for fraction in STEP_FRACTIONS:
        yield (delta if fraction == 1.0 else fraction * delta), ok
    mixed = scaled.any(-1) & ~scaled.all(-1)
    for held in (active | ~scaled, active | scaled):
        if not bool(mixed.any()):  # no dataset has two kinds of parameters: nothing to solve
            yield torch.zeros_like(delta), mixed
            continue
        block, _, block_ok = ai_direction(score, ai, held, damping)
        yield capped(block, scaled, max_step), block_ok & mixed


def predicted_gain(score: Tensor, ai: Tensor, step: Tensor) -> Tensor:
    """The gain of the quadratic model of ℓ along a raw step: sᵀΔ − ½ ΔᵀAIΔ. Pure, batched.

    Example:
        >>> import torch
        >>> predicted_gain(torch.tensor([1.0, 2.0]), torch.eye(2), torch.tensor([1.0, 2.0])).item()  # 5 − 5/2
        2.5
    """
    curvature = (step * (ai @ step.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return (score * step).sum(-1) - 0.5 * curvature


def loglik_resolution(loglik: Tensor) -> Tensor:
    """ROUNDOFF·ε·(1 + |ℓ|): log-likelihood differences below this are round-off. Pure.

    Example:
        >>> import torch
        >>> float(loglik_resolution(torch.tensor(-999.0, dtype=torch.float64)))  # 4·2⁻⁵²·1000
        8.881784197001252e-13
    """
    return ROUNDOFF * torch.finfo(loglik.dtype).eps * (1.0 + loglik.abs())


def decrement_tolerance(loglik: Tensor, tol: float, resolution: Tensor | None = None) -> Tensor:
    """The Newton decrement at which a fit has converged: ``tol`` scaled from float64 to the
    dtype's ε, and never below 4 × :func:`loglik_resolution` (a gain d/2 that ℓ cannot show).

    Example:
        >>> import torch
        >>> float(decrement_tolerance(torch.tensor(-10.0, dtype=torch.float64), 1e-12))  # tol wins
        1e-12
        >>> float(decrement_tolerance(torch.tensor(-10.0, dtype=torch.float32), 1e-12)) > 1e-5  # float32
        True
    """
    scaled_tol = tol * torch.finfo(loglik.dtype).eps / FLOAT64_EPSILON
    resolution = loglik_resolution(loglik) if resolution is None else resolution
    return torch.clamp(4.0 * resolution, min=scaled_tol)


def converged(newton: Newton, loglik: Tensor, tol: float, resolution: Tensor | None = None) -> Tensor:
    """Status-0 test (before polishing): AI definite on the free parameters and the (then
    non-negative) decrement at most :func:`decrement_tolerance`. Pure, elementwise.

    Example:
        >>> import torch
        >>> ll = torch.tensor(-500.0, dtype=torch.float64)
        >>> converged(Newton(torch.zeros(1), torch.tensor(1e-14), torch.tensor(True)), ll, 1e-12).item()
        True
        >>> converged(Newton(torch.zeros(1), torch.tensor(0.0), torch.tensor(False)), ll, 1e-12).item()  # singular AI
        False
    """
    return newton.definite & (newton.decrement <= decrement_tolerance(loglik, tol, resolution))


def accepts(ll_candidate: Tensor, ll_now: Tensor, predicted: Tensor, resolution: Tensor | None = None) -> Tensor:
    """Whether a line-search candidate replaces the current point: ℓ finite, Armijo's sufficient
    increase against the quadratic model (``predicted``, :func:`predicted_gain`), and a gain above
    the round-off of ℓ. Pure and elementwise (bool tensor).

    Example:
        >>> import torch
        >>> now = torch.tensor(-100.0, dtype=torch.float64)
        >>> accepts(now + 1e-3, now, torch.tensor(2e-3, dtype=torch.float64)).item()
        True
        >>> accepts(now + 1e-15, now, torch.tensor(1e-15, dtype=torch.float64)).item()  # round-off only
        False
    """
    gain = ll_candidate - ll_now
    resolution = loglik_resolution(ll_now) if resolution is None else resolution
    return torch.isfinite(ll_candidate) & (gain >= ARMIJO * predicted) & (gain > resolution)


def expands(gain: Tensor, predicted: Tensor, loglik: Tensor, resolution: Tensor | None = None) -> Tensor:
    """Whether an accepted step is tried at :data:`EXPANSION_MULTIPLIERS` × its length: its
    ``gain`` exceeded ``EXPANSION_RATIO`` × the ``predicted`` gain of the quadratic model, which
    is itself above the round-off of ℓ (so round-off cannot trigger it). Pure, elementwise.

    Example:
        >>> import torch
        >>> now = torch.tensor(-914.0, dtype=torch.float64)
        >>> expands(torch.tensor(1e-3), torch.tensor(5e-4), now).item()  # AI overstates the curvature
        True
        >>> expands(torch.tensor(5.1e-4), torch.tensor(5e-4), now).item()  # the model is right
        False
    """
    resolution = loglik_resolution(loglik) if resolution is None else resolution
    return (gain > EXPANSION_RATIO * predicted) & (predicted > resolution)


def first_local_maximum(values: Tensor) -> Tensor:
    """Index (…,) of the first local maximum of ``values`` (…, m) along its last dimension: the
    last entry of the leading run in which each value exceeds the one before (finite values
    only). Column 0 is the accepted step, the others its multiples. Pure.

    Example:
        >>> import torch
        >>> first_local_maximum(torch.tensor([1.0, 2.0, 3.0, 2.5, 4.0])).item()
        2
        >>> first_local_maximum(torch.tensor([1.0, float("nan"), 3.0])).item()
        0
    """
    rising = torch.isfinite(values[..., 1:]) & (values[..., 1:] > values[..., :-1])
    leading = torch.cumprod(rising.to(torch.long), -1)
    return leading.sum(-1)


def polish_accepts(ll_candidate: Tensor, ll_now: Tensor, resolution: Tensor | None = None) -> Tensor:
    """Whether the polishing step of a converged fit is kept: ℓ finite and not below the current
    value by more than round-off. Pure and elementwise.

    Example:
        >>> import torch
        >>> now = torch.tensor(-100.0, dtype=torch.float64)
        >>> polish_accepts(now - 1e-15, now).item(), polish_accepts(now - 1e-6, now).item()
        (True, False)
    """
    resolution = loglik_resolution(ll_now) if resolution is None else resolution
    return torch.isfinite(ll_candidate) & (ll_candidate >= ll_now - resolution)


def relaxed(damping: Tensor) -> Tensor:
    """Marquardt λ after an accepted step: λ/10, or 0 once it is small. Pure, elementwise.

    Example:
        >>> import torch
        >>> relaxed(torch.tensor([5.0, 1e-7])).tolist()
        [0.5, 0.0]
    """
    return torch.where(damping > 1e-6, damping / 10.0, torch.zeros_like(damping))


def stiffened(damping: Tensor) -> Tensor:
    """Marquardt λ after a damping level without an acceptable step: max(10λ, 10⁻³). Pure.

    Example:
        >>> import torch
        >>> stiffened(torch.tensor([0.0, 0.5])).tolist()
        [0.001, 5.0]
    """
    return torch.clamp(10.0 * damping, min=1e-3)


def stuck_status(definite: Tensor) -> Tensor:
    """Status when no damping level yields an acceptable step: 5 (not identifiable) where the AI
    matrix is singular at the point, else 2 (line search failed). Never 0: convergence is decided
    by :func:`converged` alone. Pure.

    Example:
        >>> import torch
        >>> stuck_status(torch.tensor([True, False])).tolist()
        [2, 5]
    """
    return torch.where(definite, 2, 5)
