"""Small helpers shared by the Python peer scripts (command line, data, timing, memory, JSON output).

Only the standard library, numpy and pandas are used, so the module also runs in the separate
Python 3.12 environment of torch-openreml. The peer scripts import it as a sibling module
(``python benchmarks/peers/xxx_peer.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_BUDGET_S = 300.0


@dataclass(frozen=True)
class PeerArgs:
    """Command line shared by every peer: ``CASE CSV REPEATS [--slope=COL] [--responses=F --logliks-out=F] [--budget=S]``."""

    case: str
    csv: Path
    repeats: int
    slope: str | None
    responses: Path | None
    logliks_out: Path | None
    budget: float


def parse_peer_args(description: str, argv: list[str] | None = None) -> PeerArgs:
    """Parse the peer command line (the same one the R peer takes)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("case", help="case name, e.g. S1")
    parser.add_argument("csv", type=Path, help="CSV with columns y, x1 … xk, g")
    parser.add_argument("repeats", type=int, help="timed repeats after one untimed warm-up fit")
    parser.add_argument("--slope", default=None, help="covariate with a random slope per group")
    parser.add_argument("--responses", type=Path, default=None, help="batch case: CSV of responses, one per row")
    parser.add_argument("--logliks-out", type=Path, default=None, help="batch case: write the REML logLiks here")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds of timed work before cutting repeats"
    )
    ns = parser.parse_args(argv)
    return PeerArgs(ns.case, ns.csv, ns.repeats, ns.slope, ns.responses, ns.logliks_out, ns.budget)


def read_case_csv(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Read a case CSV (``g`` kept as string) and return it with its covariate columns ``x1 … xk``."""
    frame = pd.read_csv(path, dtype={"g": str})
    covariates = sorted((c for c in frame.columns if c.startswith("x") and c[1:].isdigit()), key=lambda c: int(c[1:]))
    return frame, covariates


def read_responses(path: Path) -> np.ndarray:
    """Read a header-less responses CSV into a float64 array of shape (B, n)."""
    return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)


def proc_status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in MiB, or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``clear_refs`` = 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call of ``fn`` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock seconds, CPU seconds of this process (all threads) and the result of one call of ``fn``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def time_repeats(fit: Callable[[], Any], repeats: int, budget: float) -> tuple[dict[str, Any], Any]:
    """One untimed warm-up call, then ``repeats`` timed calls (fewer if they would exceed ``budget`` seconds).

    Returns:
        (timing dict with ``time_s`` = median wall time, ``cpu_s`` = median CPU time of the process,
        ``times_s``, ``cpu_times_s``, ``warmup_s``, ``repeats_requested``, ``repeats_timed``), and the
        result of the last call.
    """
    warmup_s, result = timed(fit)
    n_timed = repeats if warmup_s * repeats <= budget else max(1, math.floor(budget / warmup_s))
    times, cpu_times = [], []
    for _ in range(n_timed):
        elapsed, cpu, result = timed_cpu(fit)
        times.append(elapsed)
        cpu_times.append(cpu)
    timing = {
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "times_s": times,
        "cpu_times_s": cpu_times,
        "warmup_s": warmup_s,
        "repeats_requested": repeats,
        "repeats_timed": n_timed,
    }
    return timing, result


def time_batch(fit_one: Callable[[int], float], n_fits: int, budget: float, probe: int = 10) -> dict[str, Any]:
    """Time ``fit_one(b)`` (returning the REML logLik) over b = 0 … n_fits−1, after one untimed warm-up.

    If the first ``probe`` fits show the whole loop would exceed ``budget`` seconds, only the first
    ``max(probe, budget / per_fit)`` fits run and ``time_s`` is extrapolated to ``n_fits``
    (``extrapolated`` is then True; ``n_fits_run`` says how many ran). ``cpu_s`` is the process CPU time.
    """
    fit_one(0)
    logliks: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    limit = n_fits
    for b in range(n_fits):
        if b == probe:
            per_fit = (time.perf_counter() - start) / probe
            if per_fit * n_fits > budget:
                limit = max(probe, math.floor(budget / per_fit))
        if b >= limit:
            break
        logliks.append(fit_one(b))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    per_fit_s, per_fit_cpu_s = elapsed / len(logliks), cpu / len(logliks)
    return {
        "time_s": per_fit_s * n_fits,
        "cpu_s": per_fit_cpu_s * n_fits,
        "per_fit_s": per_fit_s,
        "per_fit_cpu_s": per_fit_cpu_s,
        "n_fits": n_fits,
        "n_fits_run": len(logliks),
        "extrapolated": len(logliks) < n_fits,
        "logliks": logliks,
    }


def finish_batch(result: dict[str, Any], logliks_out: Path | None) -> dict[str, Any]:
    """Move the logLik list out of ``result`` into a summary (and into ``logliks_out`` when given).

    Failed fits are NaN in the list and the file; the summary statistics skip them.
    """
    logliks = np.asarray(result.pop("logliks"), dtype=np.float64)
    finite = logliks[np.isfinite(logliks)]
    result["logliks_summary"] = {
        "first": float(logliks[0]),
        "mean": float(finite.mean()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "n_failed": int(logliks.size - finite.size),
    }
    if logliks_out is not None:
        np.savetxt(logliks_out, logliks, fmt="%.17g")
        result["logliks_file"] = str(logliks_out)
    return result


def emit(result: dict[str, Any]) -> None:
    """Print the result as the single JSON line on stdout (non-finite floats become null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    sys.stdout.write(json.dumps(clean(result)) + "\n")
    sys.stdout.flush()
