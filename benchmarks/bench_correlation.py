"""Benchmark of correlated residuals: a random intercept + AR(1) within subject on 100,000 rows
(10,000 subjects with 5–15 unequally many visits), reml_fn against nlme's ``lme`` in the same run.

Usage (from the repository root)::

    python benchmarks/bench_correlation.py [--repeats 3] [--out benchmarks/results/correlation.json]

Target (issue "Residual correlation and variance structures"): ≤ 0.5× nlme's time, at ≤ 1 GB and at
or above nlme's REML logLik. reml_fn runs ``rf.lmer("y ~ x + (1 | g)", data,
correlation=rf.cor_ar1(group="g"))`` (the blocks engine) in a fresh subprocess, so that its peak
memory is its own; nlme runs ``lme(y ~ x, random = ~ 1 | g, correlation = corAR1(form = ~ 1 | g))``
through Rscript. One torch thread. nlme is skipped with a message when Rscript or nlme is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.same_run import python_json, rscript_times_and_loglik  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

R_SCRIPT = r"""
suppressMessages(library(nlme))
d <- read.csv("{path}")
d$g <- factor(d$g)
times <- c()
for (i in 1:{repeats}) {{
  start <- proc.time()[["elapsed"]]
  m <- lme(y ~ x, d, random = ~ 1 | g, correlation = corAR1(form = ~ 1 | g), method = "REML")
  times <- c(times, proc.time()[["elapsed"]] - start)
}}
cat(sprintf("%.6f", times), "\n")
cat(sprintf("%.10f", as.numeric(logLik(m))), "\n")
"""

PY_SCRIPT = r"""
import json, resource, sys, time, statistics
import pandas as pd, torch
sys.path.insert(0, {root!r})
import reml_fn as rf
torch.set_num_threads(1)
d = pd.read_csv({path!r})
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    m = rf.lmer("y ~ x + (1 | g)", d, correlation=rf.cor_ar1(group="g"))
    times.append(time.perf_counter() - start)
print(json.dumps({{"times": times, "loglik": m.loglik, "status": m.status, "engine": m.fit.engine,
                  "rho": float(m.residual_parameters()["rho"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_data(seed: int = 20261207) -> pd.DataFrame:
    """10,000 subjects with 5–15 visits: y = 1 + 0.5 x + u_g + e, e AR(1) (ρ = 0.6) within subject."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 16, 10_000)
    g = np.repeat(np.arange(sizes.shape[0]), sizes)
    innovations = rng.normal(size=g.shape[0])
    e = np.empty_like(innovations)
    start = 0
    for size in sizes:
        block = innovations[start : start + size]
        e[start] = block[0]
        for i in range(1, size):
            e[start + i] = 0.6 * e[start + i - 1] + np.sqrt(1 - 0.36) * block[i]
        start += size
    x = rng.normal(size=g.shape[0])
    y = 1.0 + 0.5 * x + rng.normal(size=sizes.shape[0])[g] + e
    return pd.DataFrame({"y": y, "x": x, "g": g})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/correlation.json")
    args = parser.parse_args()
    report: dict = {"torch_threads": 1}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ar1.csv"
        data = make_data()
        data.to_csv(path, index=False)
        report["n"], report["groups"] = len(data), int(data["g"].nunique())
        report["reml_fn"] = python_json(PY_SCRIPT.format(root=str(ROOT), path=str(path), repeats=args.repeats))
        if shutil.which("Rscript") is None:
            report["nlme"] = {"skipped": "Rscript not found"}
        else:
            script = R_SCRIPT.format(path=str(path), repeats=args.repeats)
            report["nlme"] = rscript_times_and_loglik(script, Path(folder) / "nlme.R")
    ours_s = statistics.median(report["reml_fn"]["times"])
    line = f"reml_fn {ours_s:.2f} s ({min(report['reml_fn']['times']):.2f}–{max(report['reml_fn']['times']):.2f}), "
    line += f"peak RSS {report['reml_fn']['peak_rss_mb']:.0f} MB, logLik {report['reml_fn']['loglik']:.6f}"
    if "times" in report["nlme"]:
        theirs = statistics.median(report["nlme"]["times"])
        report["ratio"] = ours_s / theirs
        report["loglik_difference"] = report["reml_fn"]["loglik"] - report["nlme"]["loglik"]
        line += f"; nlme {theirs:.2f} s, ratio {report['ratio']:.2f}, ΔlogLik {report['loglik_difference']:.2e}"
    print(line)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
