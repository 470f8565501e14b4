"""Fit ``Reaction ~ Days + (Days | Subject)`` to 1000 simulated responses in one call and print the
distribution of the estimates.

Run:  python examples/batched_sleepstudy.py [--responses 1000] [--seed 20240303]

The responses are simulated on sleepstudy's design (18 subjects × 10 days) from lme4's published
REML estimates: per-subject (intercept, slope) ~ N(0, G), G = [[612.09, 9.60], [9.60, 35.07]],
residual variance 654.94, fixed effects (251.4, 10.47). ``rf.fit_batched`` fits all of them with
the AI-REML iterations of ``rf.fit``, dataset by dataset, in vmapped steps; the table shows
quantiles of the REML estimates over the converged fits next to the true values (REML variance
estimates are nearly unbiased; their spread is what a single sleepstudy fit cannot show).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import reml_fn as rf
from reml_fn import datasets
from reml_fn.design import design_matrix, indicator_codes
from reml_fn.fit.result import status_message

torch.set_default_dtype(torch.float64)
# Batched fits of small models are many small tensor operations: one thread is fastest.
torch.set_num_threads(1)

G = torch.tensor([[612.09, 9.60], [9.60, 35.07]])
RESIDUAL_VARIANCE = 654.94
BETA = torch.tensor([251.4, 10.47])


def simulate(X: torch.Tensor, subject: torch.Tensor, n_responses: int, seed: int) -> torch.Tensor:
    """Y (n_responses, 180) = Xβ + Z b + e with b_s ~ N(0, G), e ~ N(0, σ² I); deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    effects = torch.randn(n_responses, int(subject.max()) + 1, 2, generator=generator) @ torch.linalg.cholesky(G).T
    noise = math.sqrt(RESIDUAL_VARIANCE) * torch.randn(n_responses, X.shape[0], generator=generator)
    return X @ BETA + (X * effects[:, subject]).sum(-1) + noise


def main(n_responses: int = 1000, seed: int = 20240303) -> rf.FitResult:
    data = datasets.load("sleepstudy", categorical=("Subject",))
    X = design_matrix(data["Days"], intercept=True)  # [1, Days]
    subject, _ = indicator_codes(data["Subject"])
    V = rf.Sum(
        Subject=rf.Grouped(groups=subject, covariates=X, cov=rf.Unstructured(2)),  # (1 + Days | Subject)
        residual=rf.Scalar(X.shape[0]),
    )
    Y = simulate(X, subject, n_responses, seed)

    start = time.perf_counter()
    result = rf.fit_batched(V, Y, X, x_names=["(Intercept)", "Days"])
    elapsed = time.perf_counter() - start

    ok = result.converged
    print(
        f"{n_responses} fits in {elapsed:.2f} s ({1000 * elapsed / n_responses:.2f} ms per fit, engine {result.engine})"
    )
    print(f"converged {int(ok.sum())}, at a boundary {int(result.at_boundary.any(-1).sum())}")
    for code, count in zip(*torch.unique(result.status, return_counts=True)):
        print(f"  status {int(code)} ({status_message(int(code))}): {int(count)}")
    cov = result.natural["Subject"]["cov"]
    rows = [
        ("(Intercept)", result.beta[:, 0], BETA[0]),
        ("Days", result.beta[:, 1], BETA[1]),
        ("var(Intercept)", cov["sigma^2_0_0"], G[0, 0]),
        ("cov(Intercept, Days)", cov["sigma^2_1_0"], G[1, 0]),
        ("var(Days)", cov["sigma^2_1_1"], G[1, 1]),
        ("residual variance", result.natural["residual"]["sigma^2"], torch.tensor(RESIDUAL_VARIANCE)),
    ]
    levels = torch.tensor([0.025, 0.25, 0.5, 0.75, 0.975])
    print()
    print(
        f"{'estimate (converged fits)':<26}{'true':>9}{'mean':>10}"
        + "".join(f"{f'q{q:g}':>10}" for q in levels.tolist())
    )
    for name, values, truth in rows:
        values = values[ok]
        quantiles = torch.quantile(values, levels).tolist()
        print(f"{name:<26}{float(truth):9.2f}{float(values.mean()):10.2f}" + "".join(f"{q:10.2f}" for q in quantiles))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=1000, help="number of simulated responses")
    parser.add_argument("--seed", type=int, default=20240303, help="seed of the simulation")
    arguments = parser.parse_args()
    main(arguments.responses, arguments.seed)
