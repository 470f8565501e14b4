"""Benchmark of inference: the parametric bootstrap against lme4's ``bootMer`` (in the same run,
through Rscript), and Satterthwaite / Kenward–Roger tables at n = 100,000.

Usage (from the repository root)::

    python benchmarks/bench_inference.py [--nsim 1000] [--out benchmarks/results/inference.json]

* bootstrap: ``rf.bootstrap(m, nsim)`` on sleepstudy ``Reaction ~ Days + (Days | Subject)``
  (simulation and all refits in one ``fit_batched`` call) against
  ``confint(m, method = "boot", nsim = nsim)`` (lme4's ``bootMer`` loop of refits). Target: ≤ 1/20.
* ``confint(method="profile")`` on the same model against lme4's ``confint(m, method = "profile")``.
  Target: ≤ 0.5×.
* ``coef_table(ddf="satterthwaite")`` at n = 100,000 (L1-shaped data with a random slope,
  ``y ~ x1 + x2 + x3 + (x1 | g)``, 1,000 groups). Target: under 1 s.

One torch thread. R is skipped with a message when Rscript or lme4 is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reml_fn as rf  # noqa: E402
from benchmarks.data import make_case  # noqa: E402

# lme4's time for one confint call (repeated; the fit itself is not timed).
R_TIMED = r"""
suppressMessages(library(lme4))
m <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
times <- c()
for (i in 1:{repeats}) {{
  start <- proc.time()[["elapsed"]]
  ci <- suppressWarnings(suppressMessages({call}))
  times <- c(times, proc.time()[["elapsed"]] - start)
}}
cat(sprintf("%.6f", times), sep = "\n")
"""
R_PROFILE = 'confint(m, method = "profile")'
R_BOOT = 'confint(m, method = "boot", nsim = {nsim}, seed = i)'


def time_lme4(script: str) -> list[float] | str:
    if shutil.which("Rscript") is None:
        return "Rscript not found: lme4 skipped"
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as handle:
        handle.write(script)
    done = subprocess.run(["Rscript", handle.name], capture_output=True, text=True)
    if done.returncode != 0:
        return f"lme4 skipped: {done.stderr.strip()[-300:]}"
    return [float(line) for line in done.stdout.split()]


def time_it(run, repeats: int) -> list[float]:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def compare(report: dict, label: str, key: str, ours: list[float], lme4: list[float] | str) -> None:
    """Records our times and lme4's (or why lme4 was skipped) under ``key`` with the ratio of the
    medians, and prints one line."""
    report[f"{key}_reml_fn"] = spread(ours)
    line = f"{label}: reml_fn {statistics.median(ours):.3f} s ({min(ours):.3f}–{max(ours):.3f}), lme4 "
    if isinstance(lme4, str):
        report[f"{key}_lme4"] = {"skipped": lme4}
        print(line + lme4)
        return
    report[f"{key}_lme4"] = spread(lme4)
    ratio = statistics.median(ours) / statistics.median(lme4)
    report[f"{key}_ratio"] = ratio
    print(line + f"{statistics.median(lme4):.3f} s ({min(lme4):.3f}–{max(lme4):.3f}), ratio {ratio:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsim", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"torch_threads": 1, "nsim": args.nsim}

    m = rf.lmer("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
    ours = time_it(lambda: rf.bootstrap(m, args.nsim, seed=1), args.repeats)
    lme4 = time_lme4(R_TIMED.format(call=R_BOOT.format(nsim=args.nsim), repeats=args.repeats))
    compare(report, f"bootstrap {args.nsim}", "bootstrap", ours, lme4)
    boot = rf.bootstrap(m, args.nsim, seed=1)
    report["bootstrap_reml_fn"]["converged"] = int((boot.status == 0).sum())

    ours = time_it(lambda: m.confint(method="profile"), args.repeats)
    lme4 = time_lme4(R_TIMED.format(call=R_PROFILE, repeats=args.repeats))
    compare(report, "profile confint", "profile", ours, lme4)

    data = make_case("L1").data.copy()
    rng = np.random.default_rng(7)
    slopes = rng.normal(0.0, 0.5, data["g"].nunique())
    codes = data["g"].astype("category").cat.codes.to_numpy()
    data["y"] = data["y"] + slopes[codes] * data["x1"]
    large = rf.lmer("y ~ x1 + x2 + x3 + (x1 | g)", data)
    for ddf in ("satterthwaite", "kenward-roger"):
        times = time_it(lambda d=ddf: large.coef_table(ddf=d), args.repeats)
        report[f"{ddf}_n100000"] = spread(times)
        print(
            f"coef_table(ddf={ddf!r}) at n = {large.nobs}: {statistics.median(times):.3f} s ({min(times):.3f}–{max(times):.3f})"
        )
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
