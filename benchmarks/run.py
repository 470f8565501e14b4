"""Benchmark runner: reml_fn against lme4, statsmodels and torch-openreml on the same cases, same run.

Usage (from the repository root)::

    python benchmarks/run.py [--cases S1,M1,L1,B1 | main | scaling | all] [--peers lme4,statsmodels,openreml]
                             [--repeats 5] [--budget 300] [--timeout 1800] [--wait-idle 0]
                             [--out benchmarks/results/latest.json] [--no-reml-fn]

Prints two Markdown tables (wall time with logLik agreement; CPU time and peak RSS) and writes every
raw result to ``--out`` as JSON. Batch logLiks (B1) go next to it as ``B1_{peer}_logliks.txt``.
Peers run in subprocesses through :func:`benchmarks.peers.common.run_peer`; a missing peer shows as
``skip`` with its reason in the JSON. reml_fn is timed in this process by :func:`time_reml_fn`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``reml_fn`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data import CASE_NAMES, MAIN_CASES, SCALING_CASES, Case, make_case  # noqa: E402
from benchmarks.peers.common import PEERS, run_peer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEER_LABELS = {"reml_fn": "reml_fn", "lme4": "lme4", "statsmodels": "statsmodels", "openreml": "torch-openreml"}
LOGLIK_TOL = 1e-4


def time_reml_fn(case: Case, repeats: int = 5) -> dict[str, Any]:
    """Time reml_fn on ``case`` — the hook the lead wires to the library's fit API.

    Contract (same keys as the peers, so the tables and ratios work unchanged):

    * single-response cases: ``time_s`` (median wall seconds of ``repeats`` fits after one warm-up),
      ``cpu_s``, ``loglik`` (REML logLik with the −(n−p)/2·log 2π constant, i.e. lme4's ``logLik``),
      ``beta`` ({"(Intercept)": …, "x1": …}), ``varcomp`` (lme4 names: ``g:(Intercept)``, ``g:x1``,
      ``g:(Intercept),x1``, ``Residual``), ``n_iter``;
    * batch cases (``case.is_batch``, Y = ``case.responses`` of shape (B, n)): ``time_s`` for all B
      fits, ``per_fit_s``, ``logliks`` (length-B list or array);
    * or ``{"skipped": reason}``.

    The model: X = ``case.design()``; groups ``case.data["g"]``; a random intercept per group, plus a
    random slope on ``case.slope`` when set (sleepstudy cases, 2×2 unstructured G); residual σ² I.
    """
    try:
        import torch

        import reml_fn as rf
    except ImportError as exc:
        return {"skipped": f"reml_fn is not importable: {exc}"}
    structure, X, x_names = reml_fn_model(case)
    if case.is_batch:
        Y = torch.as_tensor(case.responses, dtype=torch.float64)
        if not hasattr(rf, "fit_batched"):
            return {"skipped": "reml_fn has no fit_batched"}
        rf.fit_batched(structure, Y[:8], X)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        result = rf.fit_batched(structure, Y, X)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {
            "time_s": wall,
            "cpu_s": cpu,
            "per_fit_s": wall / Y.shape[0],
            "logliks": result.loglik.tolist(),
            "converged": int(result.converged.sum()),
            "at_boundary": int(result.at_boundary.any(-1).sum()),
            "engine": result.engine,
            "threads": torch.get_num_threads(),
        }
    y = torch.as_tensor(case.data["y"].to_numpy(), dtype=torch.float64)
    rf.fit(structure, y, X)  # warm-up
    times, cpu_times = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = rf.fit(structure, y, X, x_names=x_names)
        times.append(time.perf_counter() - wall)
        cpu_times.append(time.process_time() - cpu)
    natural = result.natural
    cov = natural["g"]["cov"]
    if "sigma^2" in cov:
        varcomp = {"g:(Intercept)": float(cov["sigma^2"])}
    else:
        varcomp = {
            "g:(Intercept)": float(cov["sigma^2_0_0"]),
            f"g:{case.slope}": float(cov["sigma^2_1_1"]),
            f"g:(Intercept),{case.slope}": float(cov["sigma^2_1_0"]),
        }
    varcomp["Residual"] = float(natural["residual"]["sigma^2"])
    return {
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "times_s": times,
        "loglik": float(result.loglik),
        "beta": dict(zip(x_names, result.beta.tolist())),
        "varcomp": varcomp,
        "n_iter": int(result.n_iter),
        "converged": bool(result.converged),
        "engine": result.engine,
        "threads": torch.get_num_threads(),
    }


def reml_fn_model(case: Case):
    """The case's model in reml_fn: ``Sum(g=Grouped(groups, covariates, cov), residual=Scalar(n))``
    with a random intercept (``Scalar(1)``) or a correlated intercept and slope
    (``Unstructured(2)``), lme4's ``(1 | g)`` or ``(x | g)``."""
    import torch

    import reml_fn as rf
    from reml_fn.design import indicator_codes

    X = torch.as_tensor(case.design(), dtype=torch.float64)
    codes, _ = indicator_codes([str(g) for g in case.data["g"].tolist()])
    if case.slope is not None:
        covariates = torch.stack(
            [
                torch.ones(case.n, dtype=torch.float64),
                torch.as_tensor(case.data[case.slope].to_numpy(), dtype=torch.float64),
            ],
            1,
        )
        term = rf.Grouped(groups=codes, covariates=covariates, cov=rf.Unstructured(2))
    else:
        term = rf.Grouped(groups=codes, cov=rf.Scalar(1))
    structure = rf.Sum(g=term, residual=rf.Scalar(case.n))
    return structure, X, ["(Intercept)", *case.covariates]


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
    """CPU model, core count, Python and load at the start of the run."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
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


def batch_logliks(result: dict[str, Any]) -> np.ndarray | None:
    """The per-response logLiks of a batch result (from ``logliks`` or ``logliks_file``), or None."""
    if "logliks" in result:
        return np.asarray(result["logliks"], dtype=np.float64)
    if "logliks_file" in result and Path(result["logliks_file"]).exists():
        return np.loadtxt(result["logliks_file"], dtype=np.float64, ndmin=1)
    return None


def _seconds(result: dict[str, Any], key: str = "time_s") -> str:
    if "skipped" in result:
        return "skip"
    if "error" in result:
        return "error"
    value = result.get(key)
    if value is None:
        return "–"
    text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return text + ("*" if result.get("extrapolated") else "")


def _loglik_delta(result: dict[str, Any], reference: dict[str, Any]) -> str:
    """Peer logLik minus lme4's; for batches, max |Δ| over the responses and how many exceed LOGLIK_TOL."""
    if "skipped" in result or "error" in result or "skipped" in reference or "error" in reference:
        return "–"
    mine, theirs = batch_logliks(result), batch_logliks(reference)
    if mine is not None and theirs is not None:
        m = min(len(mine), len(theirs))
        delta = np.abs(mine[:m] - theirs[:m])
        ok = np.isfinite(delta)
        if not ok.any():
            return "all failed"
        text = f"max {delta[ok].max():.1e} ({int((delta[ok] > LOGLIK_TOL).sum())}/{m} > {LOGLIK_TOL:g}"
        failed = int((~np.isfinite(mine[:m])).sum())
        return text + (f", {failed} failed)" if failed else ")")
    if "loglik" in result and "loglik" in reference:
        return f"{result['loglik'] - reference['loglik']:+.1e}"
    return "–"


def _ratio(result: dict[str, Any], reference: dict[str, Any]) -> str:
    if "time_s" in result and "time_s" in reference and reference["time_s"]:
        return f"{result['time_s'] / reference['time_s']:.2f}"
    return "–"


def tables(results: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """Markdown: (1) wall time, reml_fn/lme4 ratio, lme4 logLik and Δ logLik; (2) CPU time and peak RSS."""
    labels = [PEER_LABELS[c] for c in columns]
    others = [c for c in columns if c != "lme4"]
    head = ["case", "n", "q"] + [f"{label} s" for label in labels]
    if "reml_fn" in columns:
        head.append("reml_fn/lme4")
    head += ["lme4 REML logLik"] + [f"Δ {PEER_LABELS[c]}" for c in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        lme4 = row.get("lme4", {"skipped": "not run"})
        cells = [name, str(row["n"]), str(row["q"])] + [_seconds(row.get(c, {"skipped": ""})) for c in columns]
        if "reml_fn" in columns:
            cells.append(_ratio(row.get("reml_fn", {}), lme4))
        logliks = batch_logliks(lme4) if "skipped" not in lme4 else None
        if logliks is not None:
            cells.append(f"mean {statistics.fmean(logliks):.6f} (B={len(logliks)})")
        else:
            cells.append(f"{lme4['loglik']:.9f}" if "loglik" in lme4 else "–")
        cells += [_loglik_delta(row.get(c, {"skipped": ""}), lme4) for c in others]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = ["case"] + [f"{label} CPU s" for label in labels] + [f"{label} peak RSS MB" for label in labels]
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for name, row in results.items():
        cells = [name] + [_seconds(row.get(c, {"skipped": ""}), "cpu_s") for c in columns]
        for c in columns:
            rss = row.get(c, {}).get("peak_rss_mb")
            cells.append(f"{rss:.0f}" if isinstance(rss, int | float) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        "--update", action="store_true", help="merge into an existing --out file (rerun some peers/cases only)"
    )
    args = parser.parse_args()

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    columns = ([] if args.no_reml_fn else ["reml_fn"]) + peers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "cases": {}}
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
        if not args.no_reml_fn:
            wait_for_idle(args.wait_idle)
            row["reml_fn"] = time_reml_fn(case, args.repeats)
        for peer in peers:
            row[peer] = _run_one(peer, case, args)
            status = (
                row[peer].get("skipped") or row[peer].get("error") or f"{row[peer].get('time_s', float('nan')):.3g} s"
            )
            print(f"[{name}] {PEER_LABELS.get(peer, peer)}: {status}", file=sys.stderr, flush=True)
        report["cases"][name] = row
        args.out.write_text(json.dumps(report, indent=1, default=str))
    all_columns = [c for c in ["reml_fn", *PEERS] if any(c in row for row in report["cases"].values())]
    print(tables(report["cases"], all_columns if args.update else columns))


def _run_one(peer: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Wait for an idle machine if asked, then run one peer on one case."""
    busy = wait_for_idle(args.wait_idle)
    result = run_peer(peer, case, args.repeats, logliks_dir=args.out.parent, budget=args.budget, timeout=args.timeout)
    return result | {"cpu_busy_before": busy}


if __name__ == "__main__":
    main()
