"""Benchmark: the same model written two ways — B1 (1,000 sleepstudy refits in one ``fit_batched``
call) with ``Grouped(g, Unstructured(2), covariates=[1, Days])`` and with the seed's
``Propagate(Z=Z, G=Kronecker(groups=I_18, cov=Unstructured(2)))``.

Usage (from the repository root)::

    python benchmarks/bench_spelling.py [--repeats 5] [--out benchmarks/results/spelling.json]

Target (issue "One mixed-model-equation algebra"): the Propagate spelling within 1.5× of the Grouped
one. One torch thread; medians with min–max; both fits' logLiks must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reml_fn as rf  # noqa: E402
from benchmarks.data import sleepstudy_responses  # noqa: E402
from reml_fn.datasets.models import model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/spelling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    Y = torch.tensor(sleepstudy_responses(), dtype=torch.float64)
    propagate = model("sleepstudy_2")
    grouped = rf.lmer_model("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
    report = {}
    results = {}
    for name, (s, X) in {
        "grouped": (grouped.structure, grouped.X),
        "propagate": (propagate.structure, propagate.X),
    }.items():
        rf.fit_batched(s, Y[:20], X)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = rf.fit_batched(s, Y, X)
            times.append(time.perf_counter() - start)
        report[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    report["ratio"] = report["propagate"]["median_s"] / report["grouped"]["median_s"]
    report["max_loglik_difference"] = float((results["propagate"].loglik - results["grouped"].loglik).abs().max())
    print(
        f"B1 grouped {report['grouped']['median_s']:.3f} s, propagate {report['propagate']['median_s']:.3f} s: "
        f"{report['ratio']:.2f}x; max |ΔlogLik| {report['max_loglik_difference']:.1e}"
    )
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
