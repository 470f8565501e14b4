"""Benchmark runner: reml_fn against lme4, statsmodels and torch-openreml on the same cases, same run.

Usage (from the repository root)::

    python benchmarks/run.py [--cases S1,M1,L1,B1 | main | scaling | all] [--peers lme4,statsmodels,openreml]
                             [--repeats 5] [--budget 300] [--timeout 1800] [--wait-idle 0]
                             [--reml-fn-threads 1[,2]] [--reml-fn-inprocess] [--profile]
                             [--out benchmarks/results/latest.json] [--no-reml-fn] [--update]
    python benchmarks/run.py --report benchmarks/results/peers.json    # tables of an earlier run

Every library runs in its own subprocess (:func:`benchmarks.peers.common.run_peer`; reml_fn through
``peers/reml_fn_peer.py``), so time and peak RSS are measured the same way for all of them. reml_fn
runs with 1 torch thread by default (lme4 is single-threaded): the column ``reml_fn``, which the
targets use; ``--reml-fn-threads 1,2`` adds ``reml_fn_2t`` (2 threads). ``--reml-fn-inprocess`` times reml_fn in this process instead (no
peak RSS then).

Prints Markdown tables — wall time with ratios; the logLik check against lme4; CPU time and peak
RSS; the issue targets with PASS/MISS; the scaling study with fitted log-log exponents — and writes
every raw field, the targets and the exponents to ``--out`` as JSON. Batch logLiks (B1) go next to
it as ``B1_{library}_logliks.txt``. A missing peer shows as ``skip`` with its reason in the JSON.

**logLik check.** Each library's REML logLik is compared with lme4's before its time is reported:
it agrees when it is at most 1e-6 *below* lme4's (higher is a better optimum, so it counts as
agreeing and is listed as "above"). A time whose logLik does not agree is marked ✗; for a batch,
one response more than 1e-6 below lme4 (or a failed fit) is enough.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``reml_fn`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data import CASE_NAMES, MAIN_CASES, SCALING_CASES, Case, make_case  # noqa: E402
from benchmarks.peers.common import PEERS, run_peer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEER_LABELS = {"reml_fn": "reml_fn", "lme4": "lme4", "statsmodels": "statsmodels", "openreml": "torch-openreml"}
LOGLIK_TOL = 1e-6
MEMORY_LIMIT_MB = 1024.0
# Targets of issues 5 and 6: reml_fn's time over lme4's at most this ratio (L1 also peak RSS ≤ 1 GiB).
TARGET_RATIOS = {"S1": 0.5, "M1": 1.0, "L1": 1.0, "B1": 1 / 50}
DISAGREES = "✗"
LARGE_N = 10_000  # the scaling table also fits the exponent over n ≥ LARGE_N


# ------------------------------------------------------------------------------------------------
# reml_fn in this process (optional; the default runs it as a subprocess peer)


def time_reml_fn(case: Case, repeats: int = 5, threads: int | None = None, engine: str = "auto") -> dict[str, Any]:
    """Time reml_fn on ``case`` in this process (``--reml-fn-inprocess``), the same code path as the peer.

    Same keys as the peers (``time_s``, ``cpu_s``, ``loglik``, ``beta``, ``varcomp``, ``n_iter``; for a
    batch case ``per_fit_s`` and ``logliks`` of length B), except the memory fields: the runner's own
    RSS is not reml_fn's. ``threads`` sets ``torch.set_num_threads`` for the call (None: unchanged).
    Returns ``{"skipped": reason}`` when reml_fn cannot be imported.
    """
    try:
        import pandas as pd
        import torch

        import reml_fn  # noqa: F401
        from benchmarks.peers.reml_fn_peer import measure
    except ImportError as exc:
        return {"skipped": f"reml_fn is not importable: {exc}"}
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        frame = case.data.assign(g=pd.Categorical(case.data["g"]))
        responses = None if case.responses is None else torch.tensor(case.responses, dtype=torch.float64)
        out = measure(frame, list(case.covariates), case.slope, responses, repeats, engine=engine)
    finally:
        torch.set_num_threads(previous)
    return out | {"peer": "reml_fn", "in_process": True}


def reml_fn_model(case: Case):
    """The case's model in reml_fn: (structure, X, fixed-effect names); see
    :func:`benchmarks.peers.reml_fn_peer.model_from_frame`."""
    from benchmarks.peers.reml_fn_peer import model_from_frame

    return model_from_frame(case.data, list(case.covariates), case.slope)


# ------------------------------------------------------------------------------------------------
# Cases, machine, idle waiting


def resolve_cases(spec: str) -> list[str]:
    """Expand ``all`` / ``main`` / ``scaling`` and comma-separated names into case names."""
    groups = {"all": CASE_NAMES, "main": MAIN_CASES, "scaling": SCALING_CASES}
    names: list[str] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        for name in groups.get(item, (item,)):
            if name not in CASE_NAMES:
                raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASE_NAMES)}, or all/main/scaling")
            if name not in names:
                names.append(name)
    return names


def machine_info() -> dict[str, Any]:
    """CPU model (lscpu's "Model name"), cores, memory, kernel, Python, torch and load at the start."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_version,
        "load_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cpu_busy_fraction(interval_s: float = 2.0) -> float:
    """Fraction of all cores busy over ``interval_s`` (from /proc/stat; 0.0 where unavailable)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(max_wait_s: float, busy_threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait_s``) until other processes use less than ``busy_threshold`` of the CPUs.

    The machine may be shared with other work, and a peer timed next to a busy process is slowed
    (torch's OpenMP threads suffer most, up to 60× here), so the runner can wait for a quiet moment.
    Returns the last busy fraction measured (0.0 when ``max_wait_s`` ≤ 0: nothing measured).
    """
    if max_wait_s <= 0:
        return 0.0
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction()
    while busy >= busy_threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


# ------------------------------------------------------------------------------------------------
# logLik agreement, targets, scaling exponents (pure functions of the result dicts)


def batch_logliks(result: dict[str, Any]) -> np.ndarray | None:
    """The per-response logLiks of a batch result (from ``logliks`` or ``logliks_file``), or None."""
    if "logliks" in result:
        return np.asarray(result["logliks"], dtype=np.float64)
    if "logliks_file" in result and Path(result["logliks_file"]).exists():
        return np.loadtxt(result["logliks_file"], dtype=np.float64, ndmin=1)
    return None


def _ran(result: dict[str, Any] | None) -> bool:
    return bool(result) and "skipped" not in result and "error" not in result and "time_s" in result


def agreement(result: dict[str, Any], reference: dict[str, Any], tol: float = LOGLIK_TOL) -> dict[str, Any] | None:
    """Compare a library's REML logLik with lme4's: ``agrees`` when it is at most ``tol`` below.

    A logLik above lme4's is a better optimum of the same likelihood and counts as agreeing
    (``above`` says so). Single response: ``{"delta", "agrees", "above"}``. Batch: per response,
    ``{"n", "below", "above", "failed", "min_delta", "max_delta", "below_indices", "agrees"}``
    with ``agrees`` only when no response is below by more than ``tol`` and none failed.
    None when either side did not run.

    Example:
        >>> agreement({"time_s": 1, "loglik": -10.0 + 2e-7}, {"time_s": 1, "loglik": -10.0})["agrees"]
        True
        >>> agreement({"time_s": 1, "loglik": -10.001}, {"time_s": 1, "loglik": -10.0})["agrees"]
        False
    """
    if not (_ran(result) and _ran(reference)):
        return None
    mine, theirs = batch_logliks(result), batch_logliks(reference)
    if mine is not None and theirs is not None:
        m = min(len(mine), len(theirs))
        delta = mine[:m] - theirs[:m]
        finite = np.isfinite(delta)
        below = finite & (delta < -tol)
        return {
            "n": m,
            "below": int(below.sum()),
            "above": int((finite & (delta > tol)).sum()),
            "failed": int((~finite).sum()),
            "min_delta": float(delta[finite].min()) if finite.any() else None,
            "max_delta": float(delta[finite].max()) if finite.any() else None,
            "below_indices": np.flatnonzero(below).tolist(),
            "agrees": bool(not below.any() and finite.all()),
        }
    if "loglik" in result and "loglik" in reference:
        delta = result["loglik"] - reference["loglik"]
        return {"delta": delta, "agrees": bool(delta >= -tol), "above": bool(delta > tol)}
    return None


def check_row(row: dict[str, Any], columns: list[str]) -> None:
    """Add ``agreement`` (see :func:`agreement`) to every library's result in a case row."""
    reference = row.get("lme4", {})
    for column in columns:
        result = row.get(column)
        if column != "lme4" and isinstance(result, dict):
            result["agreement"] = agreement(result, reference)


def targets(cases: dict[str, dict[str, Any]], column: str = "reml_fn") -> list[dict[str, Any]]:
    """The issue targets for reml_fn (``column``) against lme4 on S1, M1, L1 and B1, with PASS/MISS.

    Speed: reml_fn's median time over lme4's ≤ :data:`TARGET_RATIOS`; every target also needs the
    logLik check to pass (for B1: every response at or above lme4's, to 1e-6); L1 also needs peak
    RSS ≤ 1 GiB. B1 also reports how many fits ended at a boundary (reml_fn) or singular (lme4).
    """
    out = []
    for name, limit in TARGET_RATIOS.items():
        row = cases.get(name, {})
        mine, lme4 = row.get(column), row.get("lme4")
        entry: dict[str, Any] = {"case": name, "max_ratio": limit}
        if not (_ran(mine) and _ran(lme4)):
            out.append(entry | {"result": "not run"})
            continue
        ratio = mine["time_s"] / lme4["time_s"]
        check = mine.get("agreement") or agreement(mine, lme4)
        passed = ratio <= limit and bool(check and check["agrees"])
        entry |= {"ratio": ratio, "reml_fn_s": mine["time_s"], "lme4_s": lme4["time_s"], "loglik_ok": check["agrees"]}
        if name == "L1":
            rss = mine.get("peak_rss_mb")
            entry["peak_rss_mb"] = rss
            passed = passed and rss is not None and rss <= MEMORY_LIMIT_MB
        if name == "B1":
            entry["boundary_fits"] = len(mine.get("boundary_fits", []))
            entry["lme4_singular_fits"] = len(lme4.get("singular_fits", []))
            entry["below_lme4"] = check.get("below")
            entry["speedup"] = 1.0 / ratio
        entry["result"] = "PASS" if passed else "MISS"
        out.append(entry)
    return out


def loglog_exponent(sizes: list[float], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(size) (None with fewer than 2 points).

    Example:
        >>> round(loglog_exponent([1e3, 1e4, 1e5], [0.01, 0.1, 1.0]), 6)
        1.0
    """
    if len(sizes) < 2:
        return None
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def scaling_series(cases: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The scaling cases present: ``n`` (q = n/100, increasing n) and ``q`` (n = 10⁴, increasing q)."""
    present = [name for name in SCALING_CASES if name in cases]
    by_n = sorted((c for c in present if cases[c]["q"] * 100 == cases[c]["n"]), key=lambda c: cases[c]["n"])
    by_q = sorted((c for c in present if cases[c]["n"] == 10_000), key=lambda c: cases[c]["q"])
    return {"n": by_n, "q": by_q}


def scaling_exponents(cases: dict[str, dict[str, Any]], columns: list[str]) -> dict[str, dict[str, Any]]:
    """Per library: the log-log slopes of time against n (q = n/100; also over n ≥ 10⁴ only) and against
    q (n = 10⁴), over the cases it ran, with the points used; also the slope of the fit's own memory (peak RSS − RSS before
    the fit, where both are known and the difference is at least 1 MB) against n."""
    series = scaling_series(cases)
    out: dict[str, dict[str, Any]] = {}
    for column in columns:
        entry: dict[str, Any] = {}
        for axis, names in series.items():
            points = [(cases[c][axis], cases[c][column]["time_s"]) for c in names if _ran(cases[c].get(column))]
            entry[f"time_vs_{axis}"] = loglog_exponent([p[0] for p in points], [p[1] for p in points])
            entry[f"time_vs_{axis}_points"] = len(points)
            if axis == "n":  # the asymptotic part, where fixed per-call costs no longer dominate
                large = [p for p in points if p[0] >= LARGE_N]
                entry["time_vs_large_n"] = loglog_exponent([p[0] for p in large], [p[1] for p in large])
                entry["time_vs_large_n_points"] = len(large)
        footprint = []
        for c in series["n"]:
            result = cases[c].get(column) or {}
            if _ran(result) and result.get("peak_rss_mb") and result.get("rss_before_fit_mb"):
                extra = result["peak_rss_mb"] - result["rss_before_fit_mb"]
                if extra >= 1.0:
                    footprint.append((cases[c]["n"], extra))
        entry["memory_vs_n"] = loglog_exponent([p[0] for p in footprint], [p[1] for p in footprint])
        entry["memory_vs_n_points"] = len(footprint)
        out[column] = entry
    return out


# ------------------------------------------------------------------------------------------------
# Markdown tables


def label(column: str) -> str:
    """Column heading of a library: ``reml_fn``, ``reml_fn (2 threads)``, ``torch-openreml``, …"""
    if column.startswith("reml_fn_") and column.endswith("t"):
        return f"reml_fn ({column[len('reml_fn_') : -1]} threads)"
    return PEER_LABELS.get(column, column)


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _seconds(result: dict[str, Any] | None, key: str = "time_s") -> str:
    """A time cell: 3 significant digits, ``*`` when extrapolated, ✗ when the logLik check failed."""
    if not result or "skipped" in result:
        return "skip"
    if "error" in result:
        return "error"
    value = result.get(key)
    if value is None:
        return "–"
    text = _number(value) + ("*" if result.get("extrapolated") else "")
    check = result.get("agreement")
    return text + (f" {DISAGREES}" if check is not None and not check["agrees"] else "")


def _delta(result: dict[str, Any] | None) -> str:
    """logLik minus lme4's: the difference, or for a batch how many responses are below/above and the range."""
    check = (result or {}).get("agreement")
    if check is None:
        return "–"
    if "delta" in check:
        text = f"{check['delta']:+.1e}"
        return text if check["agrees"] else f"{text} {DISAGREES}"
    if check["min_delta"] is None:
        return "all failed"
    text = f"{check['below']}/{check['n']} below, {check['above']} above; {check['min_delta']:+.1e} … {check['max_delta']:+.1e}"
    if check["failed"]:
        text += f"; {check['failed']} failed"
    return text if check["agrees"] else f"{text} {DISAGREES}"


def _ratio(result: dict[str, Any] | None, reference: dict[str, Any] | None) -> str:
    if _ran(result) and _ran(reference) and reference["time_s"]:
        return f"{result['time_s'] / reference['time_s']:.3g}"
    return "–"


def _mb(result: dict[str, Any] | None) -> str:
    rss = (result or {}).get("peak_rss_mb")
    return f"{rss:.0f}" if isinstance(rss, int | float) else "–"


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def main_tables(cases: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """(1) Median wall time per library and the ratios reml_fn / each peer; (2) lme4's REML logLik and
    every library's difference from it; (3) CPU time and peak RSS."""
    mine = "reml_fn" if "reml_fn" in columns else None
    peers = [c for c in columns if not c.startswith("reml_fn")]
    others = [c for c in columns if c != "lme4"]
    head = ["case", "n", "q"] + [f"{label(c)} s" for c in columns]
    if mine:
        head += [f"reml_fn/{label(c)}" for c in peers]
    rows = []
    for name, row in cases.items():
        cells = [name, str(row["n"]), str(row["q"])] + [_seconds(row.get(c)) for c in columns]
        if mine:
            cells += [_ratio(row.get(mine), row.get(c)) for c in peers]
        rows.append(cells)
    times = _markdown(head, rows)
    rows = []
    for name, row in cases.items():
        lme4 = row.get("lme4") or {}
        logliks = batch_logliks(lme4) if _ran(lme4) else None
        if logliks is not None:
            reference = f"mean {statistics.fmean(logliks):.6f} (B={len(logliks)})"
        else:
            reference = f"{lme4['loglik']:.9f}" if "loglik" in lme4 else "–"
        rows.append([name, reference] + [_delta(row.get(c)) for c in others])
    logliks_table = _markdown(["case", "lme4 REML logLik"] + [f"Δ {label(c)}" for c in others], rows)
    head = ["case"] + [f"{label(c)} CPU s" for c in columns] + [f"{label(c)} peak RSS MB" for c in columns]
    rows = [
        [name] + [_seconds(row.get(c), "cpu_s") for c in columns] + [_mb(row.get(c)) for c in columns]
        for name, row in cases.items()
    ]
    return "\n".join(times + [""] + logliks_table + [""] + _markdown(head, rows))


def targets_table(entries: list[dict[str, Any]]) -> str:
    """Markdown of :func:`targets`."""
    wording = {
        "S1": "≤ 0.5× lme4",
        "M1": "≤ 1× lme4",
        "L1": "≤ 1× lme4 and peak RSS ≤ 1 GiB",
        "B1": "≤ 1/50 of lme4's refit loop, every response ≥ lme4's logLik − 1e-6",
    }
    rows = []
    for e in entries:
        if e["result"] == "not run":
            rows.append([e["case"], wording[e["case"]], "–", "–", "–", "–", "not run"])
            continue
        measured = f"{_number(e['reml_fn_s'])} s vs {_number(e['lme4_s'])} s"
        if "peak_rss_mb" in e and e["peak_rss_mb"] is not None:
            measured += f"; {e['peak_rss_mb']:.0f} MB"
        check = "yes" if e["loglik_ok"] else "NO"
        if e["case"] == "B1":
            check += (
                f" ({e['below_lme4']} below; reml_fn boundary fits {e['boundary_fits']},"
                f" lme4 singular {e['lme4_singular_fits']})"
            )
            ratio = f"{e['ratio']:.4f} (1/{e['speedup']:.1f})"
        else:
            ratio = f"{e['ratio']:.3f}"
        rows.append([e["case"], wording[e["case"]], measured, ratio, f"{e['max_ratio']:.4g}", check, e["result"]])
    return "\n".join(_markdown(["case", "target", "reml_fn vs lme4", "ratio", "limit", "logLik ok", "result"], rows))


def scaling_table(cases: dict[str, dict[str, Any]], columns: list[str], exponents: dict[str, dict]) -> str:
    """Time and peak RSS (with the fit's own part, peak − RSS before the fit) of every scaling case,
    then the fitted log-log exponents per library."""
    series = scaling_series(cases)
    names = series["n"] + [c for c in series["q"] if c not in series["n"]]
    if not names:
        return ""

    def memory(result: dict[str, Any] | None) -> str:
        if not _ran(result) or result.get("peak_rss_mb") is None:
            return "–"
        extra = result["peak_rss_mb"] - (result.get("rss_before_fit_mb") or 0.0)
        return f"{result['peak_rss_mb']:.0f} (+{extra:.0f})"

    head = ["case", "n", "q"] + [f"{label(c)} s" for c in columns] + [f"{label(c)} MB (+fit)" for c in columns]
    rows = [
        [name, str(cases[name]["n"]), str(cases[name]["q"])]
        + [_seconds(cases[name].get(c)) for c in columns]
        + [memory(cases[name].get(c)) for c in columns]
        for name in names
    ]

    def slope(c: str, key: str) -> str:
        value, points = exponents[c][key], exponents[c][f"{key}_points"]
        full = {
            "time_vs_n": len(series["n"]),
            "time_vs_large_n": sum(cases[c]["n"] >= LARGE_N for c in series["n"]),
            "time_vs_q": len(series["q"]),
        }.get(key, points)
        if value is None:
            return "–"
        return f"{value:.2f}" + ("" if points == full else f" ({points} pts)")

    blank = [""] * len(columns)
    rows.append(["**time exponent vs n** (q = n/100)", "", ""] + [slope(c, "time_vs_n") for c in columns] + blank)
    rows.append(["**time exponent vs n, n ≥ 10⁴**", "", ""] + [slope(c, "time_vs_large_n") for c in columns] + blank)
    rows.append(["**time exponent vs q** (n = 10⁴)", "", ""] + [slope(c, "time_vs_q") for c in columns] + blank)
    rows.append(["**fit-memory exponent vs n**", "", ""] + blank + [slope(c, "memory_vs_n") for c in columns])
    return "\n".join(_markdown(head, rows))


def report_text(report: dict[str, Any]) -> str:
    """All tables of a run (or merged runs) as Markdown."""
    cases = report["cases"]
    present = {c for row in cases.values() for c in row if isinstance(row.get(c), dict)}
    extra = sorted(c for c in present if c.startswith("reml_fn_"))
    columns = [c for c in ["reml_fn", *extra, *PEERS] if c in present]
    for row in cases.values():
        check_row(row, columns)
    parts = [main_tables(cases, columns)]
    if "reml_fn" in columns:
        report["targets"] = targets(cases)
        parts.append(targets_table(report["targets"]))
    report["scaling_exponents"] = scaling_exponents(cases, columns)
    table = scaling_table(cases, columns, report["scaling_exponents"])
    if table:
        parts.append(table)
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Command line


def main() -> None:
    """Parse the command line, run everything, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="main", help="comma-separated case names, or all / main / scaling")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers (lme4,statsmodels,openreml)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of timed work per peer and case")
    parser.add_argument("--timeout", type=float, default=1800.0, help="hard limit per peer subprocess, seconds")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this long (s) for an idle CPU (< 25%% busy) before each run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json", help="raw results (JSON)")
    parser.add_argument("--no-reml-fn", action="store_true", help="peers only")
    parser.add_argument(
        "--reml-fn-threads",
        default="1",
        help="torch threads for reml_fn, e.g. 1,2: 1 thread is the column reml_fn (the targets), t > 1 reml_fn_{t}t",
    )
    parser.add_argument("--reml-fn-inprocess", action="store_true", help="time reml_fn in this process (no peak RSS)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one more 1-thread reml_fn fit per case (results/profile_{case}_reml_fn.txt)",
    )
    parser.add_argument(
        "--update", action="store_true", help="merge into an existing --out file (rerun some peers/cases only)"
    )
    parser.add_argument("--report", type=Path, default=None, help="print the tables of an earlier --out file")
    args = parser.parse_args()

    if args.report is not None:
        report = json.loads(args.report.read_text())
        print(report_text(report))
        return

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    threads = [int(t) for t in args.reml_fn_threads.split(",") if t.strip()]
    mine = [] if args.no_reml_fn else [("reml_fn" if t == 1 else f"reml_fn_{t}t", t) for t in threads]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "cases": {}}
    report["args"]["report"] = None
    if args.update and args.out.exists():
        previous = json.loads(args.out.read_text())
        report["cases"] = previous.get("cases", {})
        report["earlier_runs"] = previous.get("earlier_runs", []) + [
            {"machine": previous.get("machine"), "args": previous.get("args")}
        ]
    for name in resolve_cases(args.cases):
        case = make_case(name)
        row: dict[str, Any] = report["cases"].get(name, {})
        row |= {"n": case.n, "q": case.q, "p": case.p, "description": case.description}
        for column, count in mine:
            row[column] = _run_reml_fn(case, column, count, args)
            _log(name, column, row[column])
        for peer in peers:
            row[peer] = _run_one(peer, case, args)
            _log(name, peer, row[peer])
        report["cases"][name] = row
        args.out.write_text(json.dumps(report, indent=1, default=str))
    text = report_text(report)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(text)


def _log(case: str, column: str, result: dict[str, Any]) -> None:
    status = result.get("skipped") or result.get("error") or f"{result.get('time_s', float('nan')):.3g} s"
    if "peak_rss_mb" in result and result["peak_rss_mb"] is not None:
        status += f", {result['peak_rss_mb']:.0f} MB"
    print(f"[{case}] {label(column)}: {status}", file=sys.stderr, flush=True)


def _run_reml_fn(case: Case, column: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """reml_fn with ``threads`` torch threads: a subprocess peer (default) or in this process."""
    busy = wait_for_idle(args.wait_idle)
    context = {"cpu_busy_before": busy, "load_before": os.getloadavg()[0]}
    if args.reml_fn_inprocess:
        return time_reml_fn(case, args.repeats, threads) | context
    extra = [f"--threads={threads}"]
    if args.profile and threads == 1:
        extra.append(f"--profile-out={args.out.parent / f'profile_{case.name}_{column}.txt'}")
    result = run_peer(
        "reml_fn",
        case,
        args.repeats,
        logliks_dir=args.out.parent,
        budget=args.budget,
        timeout=args.timeout,
        extra_args=extra,
        tag=column,
    )
    return result | {"cpu_busy_before": busy}


def _run_one(peer: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Wait for an idle machine if asked, then run one peer on one case."""
    busy = wait_for_idle(args.wait_idle)
    result = run_peer(peer, case, args.repeats, logliks_dir=args.out.parent, budget=args.budget, timeout=args.timeout)
    return result | {"cpu_busy_before": busy}


if __name__ == "__main__":
    main()
