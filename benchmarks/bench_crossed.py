"""Benchmark of crossed random effects: lme4's InstEval models, and a synthetic crossed design of
1,000,000 rows, reml_fn against lme4 in the same run.

Usage (from the repository root)::

    python benchmarks/bench_crossed.py [--cases insteval3 insteval4 synthetic] [--repeats 1]
                                       [--out benchmarks/results/crossed.json]

Cases (issue "One mixed-model-equation algebra … crossed random effects at MixedModels.jl speed"):

* ``insteval3``: ``y ~ service + (1|s) + (1|d) + (1|dept:service)`` on lme4's ``InstEval``
  (73,421 rows, 2,972 students × 1,128 lecturers);
* ``insteval4``: ``y ~ service + (1|s) + (1|d) + (1|dept) + (0 + service|dept)``;
* ``synthetic``: ``y ~ x + (1|u) + (1|v)``, 1,000,000 rows, 6,000 × 4,000 crossed levels, drawn
  deterministically by :func:`make_synthetic` (lme4 takes about 15 minutes on it here).

InstEval is read from R's lme4 package (there is no copy in this repository), so every case needs
Rscript with lme4; without it the benchmark says so and stops. reml_fn runs ``rf.lmer`` in a fresh
subprocess (its peak memory is its own) with one torch thread; lme4 runs ``lmer(..., REML = TRUE)``
through Rscript. Reported: median times, the ratio, peak RSS and the logLik difference (reml_fn
minus lme4; targets ask for ≥ −1e-6).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.same_run import python_json, rscript_times_and_loglik  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FORMULAS = {
    "insteval3": "y ~ service + (1|s) + (1|d) + (1|dept:service)",
    "insteval4": "y ~ service + (1|s) + (1|d) + (1|dept) + (0 + service|dept)",
    "synthetic": "y ~ x + (1|u) + (1|v)",
}

EXPORT_INSTEVAL = r"""
suppressMessages(library(lme4))
d <- InstEval
write.csv(data.frame(s = as.integer(d$s), d = as.integer(d$d), dept = as.integer(d$dept),
                     service = as.integer(d$service) - 1L, y = d$y), "{path}", row.names = FALSE)
"""

R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv("{path}")
for (column in intersect(c("s", "d", "dept", "service", "u", "v"), names(d))) d[[column]] <- factor(d[[column]])
times <- c()
for (i in 1:{repeats}) {{
  start <- proc.time()[["elapsed"]]
  m <- lmer({formula}, d, REML = TRUE)
  times <- c(times, proc.time()[["elapsed"]] - start)
}}
cat(sprintf("%.6f", times), "\n")
cat(sprintf("%.10f", as.numeric(logLik(m))), "\n")
"""

PY_SCRIPT = r"""
import json, resource, sys, time
import pandas as pd, torch
sys.path.insert(0, {root!r})
import reml_fn as rf
import reml_fn.frontend, formulaic, scipy.stats  # imported by the first rf.lmer; lme4's library() is not timed either
torch.set_num_threads(1)
d = pd.read_csv({path!r})
for column in ("s", "d", "dept", "service", "u", "v"):
    if column in d:
        d[column] = d[column].astype(str)
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    m = rf.lmer({formula!r}, d)
    times.append(time.perf_counter() - start)
print(json.dumps({{"times": times, "loglik": m.loglik, "status": m.status, "engine": m.fit.engine,
                  "iterations": int(m.fit.n_iter),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_synthetic(seed: int = 20261207, n: int = 1_000_000, levels: tuple[int, int] = (6000, 4000)) -> pd.DataFrame:
    """y = 1 + 0.5 x + a_u + b_v + e with u, v drawn uniformly (crossed), σ_a = 1, σ_b = 0.7, σ = 1."""
    rng = np.random.default_rng(seed)
    u, v = rng.integers(0, levels[0], n), rng.integers(0, levels[1], n)
    x = rng.normal(size=n)
    a, b = rng.normal(size=levels[0]), 0.7 * rng.normal(size=levels[1])
    return pd.DataFrame({"y": 1.0 + 0.5 * x + a[u] + b[v] + rng.normal(size=n), "x": x, "u": u, "v": v})


def run_case(name: str, path: Path, folder: Path, repeats: int) -> dict:
    formula = FORMULAS[name]
    ours = python_json(PY_SCRIPT.format(root=str(ROOT), path=str(path), repeats=repeats, formula=formula))
    result: dict = {"formula": formula, "reml_fn": ours}
    script = R_SCRIPT.format(path=str(path), repeats=repeats, formula=formula)
    result["lme4"] = rscript_times_and_loglik(script, folder / f"{name}.R")
    if "skipped" in result["lme4"]:
        return result
    result["ratio"] = statistics.median(result["reml_fn"]["times"]) / statistics.median(result["lme4"]["times"])
    result["loglik_difference"] = result["reml_fn"]["loglik"] - result["lme4"]["loglik"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["insteval3"], choices=sorted(FORMULAS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/crossed.json")
    args = parser.parse_args()
    if shutil.which("Rscript") is None:
        print("bench_crossed: Rscript not found; InstEval comes from R's lme4 and lme4 is the peer. Skipped.")
        return
    report: dict = {"torch_threads": 1, "cases": {}}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        paths = {}
        if any(case.startswith("insteval") for case in args.cases):
            paths["insteval"] = folder / "insteval.csv"
            exported = subprocess.run(
                ["Rscript", "-e", EXPORT_INSTEVAL.format(path=paths["insteval"])], capture_output=True, text=True
            )
            if exported.returncode != 0:
                print(f"bench_crossed: could not read lme4::InstEval ({exported.stderr.strip()[-200:]}). Skipped.")
                return
        if "synthetic" in args.cases:
            paths["synthetic"] = folder / "synthetic.csv"
            make_synthetic().to_csv(paths["synthetic"], index=False)
        for case in args.cases:
            path = paths["insteval" if case.startswith("insteval") else "synthetic"]
            result = report["cases"][case] = run_case(case, path, folder, args.repeats)
            ours = statistics.median(result["reml_fn"]["times"])
            line = f"{case}: reml_fn {ours:.2f} s, peak RSS {result['reml_fn']['peak_rss_mb']:.0f} MB"
            if "ratio" in result:
                theirs = statistics.median(result["lme4"]["times"])
                line += f"; lme4 {theirs:.2f} s, ratio {result['ratio']:.2f}, ΔlogLik {result['loglik_difference']:.2e}"
            print(line, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
