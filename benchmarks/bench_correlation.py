"""Benchmark of correlated residuals: a random intercept + AR(1) within subject on 100,000 rows
(10,000 subjects with 5–15 unequally many visits), reml_fn against nlme's ``lme`` in the same run;
and the same data with a crossed random intercept for 50 raters (``--case crossed``).

Usage (from the repository root)::

    python benchmarks/bench_correlation.py [--case nested|crossed] [--raters 50] [--no-nlme] [--repeats 3] [--out FILE]

Target (issue "Residual correlation and variance structures"): ≤ 0.5× nlme's time, at ≤ 1 GB and at
or above nlme's REML logLik. reml_fn runs ``rf.lmer("y ~ x + (1 | g)", data,
correlation=rf.cor_ar1(group="g"))`` (the blocks engine) in a fresh subprocess, so that its peak
memory is its own; nlme runs ``lme(y ~ x, random = ~ 1 | g, correlation = corAR1(form = ~ 1 | g))``
through Rscript. One torch thread. nlme is skipped with a message when Rscript or nlme is missing.

``--case crossed`` adds ``(1 | r)`` for 50 raters (``--raters``) crossing the subjects (the MME engine with R⁻¹
block by block). nlme has no crossed terms; its standard device is one constant group with
``pdBlocked(list(pdIdent(~ 0 + g), pdIdent(~ 0 + r)))`` and ``corAR1(form = ~ 1 | dummy/g)``, which
puts every effect in one dense group: it runs on the first 300 subjects (about 3,000 rows), where
both are timed; reml_fn alone also runs on all 100,000 rows.
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
if (!is.null(d$r)) d$r <- factor(d$r)
d$dummy <- factor(1)
times <- c()
for (i in 1:{repeats}) {{
  start <- proc.time()[["elapsed"]]
  m <- {call}
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
    m = rf.lmer({formula!r}, d, correlation=rf.cor_ar1(group="g"))
    times.append(time.perf_counter() - start)
print(json.dumps({{"times": times, "loglik": m.loglik, "status": m.status, "engine": m.fit.engine,
                  "rho": float(m.residual_parameters()["rho"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

NLME_CALLS = {
    "nested": 'lme(y ~ x, d, random = ~ 1 | g, correlation = corAR1(form = ~ 1 | g), method = "REML")',
    "crossed": "lme(y ~ x, d, random = list(dummy = pdBlocked(list(pdIdent(~ 0 + g), pdIdent(~ 0 + r)))), "
    'correlation = corAR1(form = ~ 1 | dummy/g), method = "REML")',
}
FORMULAS = {"nested": "y ~ x + (1 | g)", "crossed": "y ~ x + (1 | g) + (1 | r)"}
CROSSED_NLME_SUBJECTS = 300


def make_data(seed: int = 20261207, raters: int = 50) -> pd.DataFrame:
    """10,000 subjects with 5–15 visits: y = 1 + 0.5 x + u_g + e, e AR(1) (ρ = 0.6) within subject;
    for the crossed case a rater r per row (``raters`` of them) and y_crossed = y + 0.7 v_r (y itself is
    unchanged, so the nested case reproduces the earlier runs)."""
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
    rng_r = np.random.default_rng(seed + 1)
    r = rng_r.integers(0, raters, g.shape[0])
    return pd.DataFrame({"y": y, "x": x, "g": g, "r": r, "y_crossed": y + 0.7 * rng_r.normal(size=raters)[r]})


def run_case(data: pd.DataFrame, case: str, repeats: int, folder: Path, peer: bool) -> dict:
    """reml_fn (fresh subprocess) and, with ``peer``, nlme on ``data``: times, logLik, peak RSS."""
    path = folder / f"{case}_{len(data)}.csv"
    data.to_csv(path, index=False)
    report: dict = {"n": len(data), "groups": int(data["g"].nunique())}
    script = PY_SCRIPT.format(root=str(ROOT), path=str(path), repeats=repeats, formula=FORMULAS[case])
    report["reml_fn"] = python_json(script)
    if not peer:
        report["nlme"] = {
            "skipped": "nlme has no crossed terms: its pdBlocked device is one dense group of every effect"
        }
    elif shutil.which("Rscript") is None:
        report["nlme"] = {"skipped": "Rscript not found"}
    else:
        script = R_SCRIPT.format(path=str(path), repeats=repeats, call=NLME_CALLS[case])
        report["nlme"] = rscript_times_and_loglik(script, folder / "nlme.R")
    ours_s = statistics.median(report["reml_fn"]["times"])
    line = f"{case} n={len(data)}: reml_fn {ours_s:.2f} s ({min(report['reml_fn']['times']):.2f}–"
    line += f"{max(report['reml_fn']['times']):.2f}), peak RSS {report['reml_fn']['peak_rss_mb']:.0f} MB, "
    line += f"logLik {report['reml_fn']['loglik']:.6f}, engine {report['reml_fn']['engine']}"
    if "times" in report["nlme"]:
        theirs = statistics.median(report["nlme"]["times"])
        report["ratio"] = ours_s / theirs
        report["loglik_difference"] = report["reml_fn"]["loglik"] - report["nlme"]["loglik"]
        line += f"; nlme {theirs:.2f} s, ratio {report['ratio']:.3f}, ΔlogLik {report['loglik_difference']:.2e}"
    print(line)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["nested", "crossed"], default="nested")
    parser.add_argument("--raters", type=int, default=50, help="crossed case: how many raters")
    parser.add_argument("--no-nlme", action="store_true", help="crossed case: reml_fn on all rows only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/correlation[_crossed].json")
    args = parser.parse_args()
    suffix = "" if args.case == "nested" else "_crossed" + ("" if args.raters == 50 else f"_{args.raters}")
    out = args.out or f"benchmarks/results/correlation{suffix}.json"
    data = make_data(raters=args.raters)
    report: dict = {"torch_threads": 1, "case": args.case, "raters": args.raters}
    with tempfile.TemporaryDirectory() as folder:
        if args.case == "nested":
            report |= run_case(data.drop(columns=["r", "y_crossed"]), "nested", args.repeats, Path(folder), True)
        else:
            crossed = data.assign(y=data["y_crossed"]).drop(columns=["y_crossed"])
            if not args.no_nlme:
                small = crossed[crossed["g"] < CROSSED_NLME_SUBJECTS]
                report["small"] = run_case(small, "crossed", args.repeats, Path(folder), True)
            report["large"] = run_case(crossed, "crossed", args.repeats, Path(folder), False)
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
