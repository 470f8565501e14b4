"""Benchmark of the formula front end: ``rf.lmer(formula, data)`` against the structure API
(``rf.fit`` on the same structure, y and X, built beforehand) on sleepstudy and on L1.

Usage (from the repository root)::

    python benchmarks/bench_formula.py [--repeats 21] [--out benchmarks/results/formula.json]

Targets (issue "lme4's language in Python"): formula → fitted result within 2 ms of the structure
fit on sleepstudy (``Reaction ~ Days + (Days | Subject)``), and within 2× of it on L1 (n = 100,000,
1,000 groups, ``y ~ x1 + x2 + x3 + (1 | g)``). One torch thread; the times are medians with the
spread (min–max) over ``--repeats`` runs after a warm-up, the two paths interleaved so that load on
the machine falls on both.
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
from benchmarks.data import make_case  # noqa: E402


def _interleaved(first, second, repeats: int) -> tuple[list[float], list[float]]:
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        for run, times in ((first, a), (second, b)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return a, b


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def measure(name: str, formula: str, data, repeats: int) -> dict:
    model = rf.lmer_model(formula, data)
    structure, y, X = model.structure, model.y, model.X
    via_formula, via_structure = _interleaved(lambda: rf.lmer(formula, data), lambda: rf.fit(structure, y, X), repeats)
    check = rf.lmer(formula, data)
    direct = rf.fit(structure, y, X)
    out = {
        "case": name,
        "formula": formula,
        "n": model.nobs,
        "formula_fit": _summary(via_formula),
        "structure_fit": _summary(via_structure),
        "same_loglik": abs(check.loglik - float(direct.loglik)) <= 1e-9 * abs(check.loglik),
    }
    out["extra_ms"] = 1e3 * (out["formula_fit"]["median_s"] - out["structure_fit"]["median_s"])
    out["ratio"] = out["formula_fit"]["median_s"] / out["structure_fit"]["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default="benchmarks/results/formula.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [
        measure("S1", "Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"), args.repeats),
        measure("L1", "y ~ x1 + x2 + x3 + (1 | g)", make_case("L1").data, max(3, args.repeats // 4)),
    ]
    for r in results:
        f, s = r["formula_fit"], r["structure_fit"]
        print(
            f"{r['case']}: rf.lmer {1e3 * f['median_s']:.2f} ms ({1e3 * f['min_s']:.2f}–{1e3 * f['max_s']:.2f}), "
            f"structure fit {1e3 * s['median_s']:.2f} ms ({1e3 * s['min_s']:.2f}–{1e3 * s['max_s']:.2f}): "
            f"+{r['extra_ms']:.2f} ms, ratio {r['ratio']:.2f}, same logLik {r['same_loglik']}"
        )
    Path(args.out).write_text(json.dumps({"torch_threads": 1, "results": results}, indent=1))


if __name__ == "__main__":
    main()
