"""torch-openreml peer: ``MarginalREML(V).optimize(y, X, θ₀)`` on a benchmark case (float64, dense V).

Usage (needs an interpreter that can ``import torch_openreml``, i.e. Python >= 3.12; see README)::

    /work/peer-venv312/bin/python benchmarks/peers/openreml_peer.py CASE CSV REPEATS [--slope=x1] \
        [--responses=FILE --logliks-out=FILE] [--budget=SECONDS] [--max-gb=4] [--max-fit-s=120]

Model, built from torch-openreml's covariance algebra (Z dense, columns in sorted group order):

* random intercept:  ``V = Sum(CP=CovariancePropagation(Z=Z, G=ScalarMatrix(q)), R=ScalarMatrix(n))``,
  free parameters ``[CP/G/sigma^2, R/sigma^2]`` (raw log σ), θ₀ = ½·log(s²/2) for both, s² the OLS
  residual variance;
* random intercept + slope (sleepstudy): Z has columns (1, x) per group, ``G = KroneckerProduct(I_q,
  UnconstrainedMatrix(2))`` and θ₀ = [3, 0, 1.5, 3] (inventory §8.3).

``optimize`` runs with its defaults (AI steps, η = 1, tolerances 1e-4, max_iter 200). The reported
``loglik`` is ``MarginalREML.loglik`` at the returned θ plus the constant −(n−p)/2·log 2π, so it is
comparable with lme4's REML logLik (torch-openreml adds a 1e-6 jitter to V, which moves it by ~1e-6).
Cases are skipped, with a message, when the dense algebra would need more than ``--max-gb`` GiB
(estimated as 8·n²·(6 + 4k) bytes for k variance parameters) or when one AI step at θ₀ predicts a fit
longer than ``--max-fit-s`` seconds (8 iterations assumed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import peer_io
import torch
import torch_openreml
from torch_openreml import MarginalREML
from torch_openreml.covariance import (
    CovariancePropagation,
    KroneckerProduct,
    ScalarMatrix,
    Sum,
    UnconstrainedMatrix,
)

DTYPE = torch.float64
EXPECTED_ITERATIONS = 8
SLOPE_THETA0 = (3.0, 0.0, 1.5, 3.0)


def parse_args() -> tuple[peer_io.PeerArgs, float, float]:
    """The shared peer command line plus ``--max-gb`` and ``--max-fit-s``."""
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--max-gb", type=float, default=4.0)
    extra.add_argument("--max-fit-s", type=float, default=120.0)
    limits, rest = extra.parse_known_args()
    return peer_io.parse_peer_args(__doc__.splitlines()[0], rest), limits.max_gb, limits.max_fit_s


def n_variance_params(slope: str | None) -> int:
    """Free covariance parameters: 2 (intercept var, residual) or 4 (2×2 G, residual)."""
    return 4 if slope else 2


def dense_memory_gb(n: int, k: int) -> float:
    """Rough peak of MarginalREML.ai_step: V, L, the n×n projection pieces and 4 stacks of k n×n matrices."""
    return 8.0 * n * n * (6 + 4 * k) / 2**30


def build_model(frame: pd.DataFrame, slope: str | None) -> tuple[MarginalREML, torch.Tensor]:
    """The marginal covariance V(θ) as torch-openreml structures, wrapped in MarginalREML; returns (model, Z)."""
    codes, levels = pd.factorize(frame["g"], sort=True)
    n, q = len(frame), len(levels)
    rows = torch.arange(n)
    group = torch.as_tensor(codes, dtype=torch.long)
    if slope is None:
        z = torch.zeros(n, q, dtype=DTYPE)
        z[rows, group] = 1.0
        g = ScalarMatrix(q)
    else:
        z = torch.zeros(n, 2 * q, dtype=DTYPE)
        z[rows, 2 * group] = 1.0
        z[rows, 2 * group + 1] = torch.tensor(frame[slope].to_numpy(np.float64))
        g = KroneckerProduct(torch.eye(q, dtype=DTYPE), UnconstrainedMatrix(2))
    v = Sum(CP=CovariancePropagation(Z=z, G=g), R=ScalarMatrix(n))
    return MarginalREML(v), z


def initial_theta(y: torch.Tensor, x: torch.Tensor, slope: str | None) -> torch.Tensor:
    """θ₀: the inventory's sleepstudy start for slopes, else half the OLS residual variance to each component."""
    if slope:
        return torch.tensor(SLOPE_THETA0, dtype=DTYPE)
    residual = y - x @ torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)
    s2 = float(residual @ residual) / (x.shape[0] - x.shape[1])
    return torch.full((2,), 0.5 * math.log(s2 / 2), dtype=DTYPE)


def reml_constant(n: int, p: int) -> float:
    """−(n−p)/2·log 2π, the term torch-openreml leaves out of its REML log-likelihood."""
    return -0.5 * (n - p) * math.log(2 * math.pi)


def fit(model: MarginalREML, y: torch.Tensor, x: torch.Tensor, theta0: torch.Tensor) -> dict[str, Any]:
    """One ``optimize`` call; returns θ̂, β̂, iterations and the logLik (with constant) at θ̂."""
    theta, beta, n_iter = model.optimize(y, x, theta0.clone())
    loglik = float(model.loglik(y, x, theta)) + reml_constant(x.shape[0], x.shape[1])
    return {"theta": theta, "beta": beta, "n_iter": int(n_iter), "loglik": loglik}


def varcomp(theta: torch.Tensor, slope: str | None) -> dict[str, float]:
    """Natural-scale variance components in lme4's naming (σ² = e^{2θ}; the G off-diagonal is raw)."""
    t = theta.tolist()
    if slope is None:
        return {"g:(Intercept)": math.exp(2 * t[0]), "Residual": math.exp(2 * t[1])}
    return {
        "g:(Intercept)": math.exp(2 * t[0]),
        f"g:{slope}": math.exp(2 * t[2]),
        f"g:(Intercept),{slope}": t[1],
        "Residual": math.exp(2 * t[3]),
    }


def main() -> None:
    """Run the peer on one case and print its JSON line."""
    args, max_gb, max_fit_s = parse_args()
    frame, covariates = peer_io.read_case_csv(args.csv)
    n, k = len(frame), n_variance_params(args.slope)
    out: dict[str, Any] = {
        "peer": "torch-openreml",
        "case": args.case,
        "n": n,
        "q": int(frame["g"].nunique()),
        "versions": {
            "torch_openreml": torch_openreml.__version__,
            "torch": torch.__version__,
            "python": ".".join(map(str, __import__("sys").version_info[:3])),
            "torch_openreml_path": str(Path(torch_openreml.__file__).parent),
        },
        "threads": torch.get_num_threads(),
        "dtype": "float64",
    }
    memory_gb = dense_memory_gb(n, k)
    out["estimated_memory_gb"] = memory_gb
    if memory_gb > max_gb:
        out["skipped"] = f"dense V needs ~{memory_gb:.1f} GiB (> {max_gb:g} GiB limit) at n={n}"
        peer_io.emit(out)
        return

    x = torch.tensor(np.column_stack([np.ones(n)] + [frame[c].to_numpy(np.float64) for c in covariates]))
    y = torch.tensor(frame["y"].to_numpy(np.float64))
    out["rss_before_fit_mb"] = peer_io.proc_status_mb("VmRSS")
    peer_io.reset_peak_rss()
    model, _ = build_model(frame, args.slope)
    theta0 = initial_theta(y, x, args.slope)
    out["theta0"] = theta0.tolist()
    out["param_names"] = list(model.v.free_param_names)

    with torch.no_grad():
        step_s, _ = peer_io.timed(lambda: model.ai_step(y, x, theta0))
    out["ai_step_s"] = step_s
    if step_s * EXPECTED_ITERATIONS > max_fit_s:
        out["skipped"] = (
            f"one AI step takes {step_s:.1f} s at n={n}: a fit would take ~{step_s * EXPECTED_ITERATIONS:.0f} s "
            f"(> {max_fit_s:g} s limit)"
        )
        out["peak_rss_mb"] = peer_io.proc_status_mb("VmHWM")
        peer_io.emit(out)
        return

    p = x.shape[1]
    beta_names = ["(Intercept)"] + covariates
    if args.responses is None:
        timing, result = peer_io.time_repeats(lambda: fit(model, y, x, theta0), args.repeats, args.budget)
        out |= timing
        out |= {
            "loglik": result["loglik"],
            "loglik_without_constant": result["loglik"] - reml_constant(n, p),
            "n_iter": result["n_iter"],
            "converged": bool(model.is_converged()),
            "theta": result["theta"].tolist(),
            "beta": dict(zip(beta_names, result["beta"].reshape(-1).tolist(), strict=True)),
            "varcomp": varcomp(result["theta"], args.slope),
        }
    else:
        responses = torch.tensor(peer_io.read_responses(args.responses))
        iterations: dict[int, int] = {}
        failures: dict[int, str] = {}

        def fit_one(b: int) -> float:
            # AI steps without step control can leave the PD region (inventory §9.9): record, go on.
            try:
                result = fit(model, responses[b], x, theta0)
            except (torch.linalg.LinAlgError, RuntimeError) as exc:
                failures[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                return float("nan")
            iterations[b] = result["n_iter"]
            return result["loglik"]

        batch = peer_io.time_batch(fit_one, responses.shape[0], args.budget)
        out |= peer_io.finish_batch(batch, args.logliks_out)
        out["loop"] = "one MarginalREML model, optimize(y_b, X, θ₀) per response"
        out["n_iter_mean"] = float(np.mean(list(iterations.values()))) if iterations else None
        out["n_iter_max"] = max(iterations.values(), default=None)
        out["n_iter_at_max_iter"] = sum(it >= 200 for it in iterations.values())
        out["failed_fits"] = sorted(failures)
        out["failure_messages"] = sorted(set(failures.values()))[:5]
    out["peak_rss_mb"] = peer_io.proc_status_mb("VmHWM")
    peer_io.emit(out)


if __name__ == "__main__":
    main()
