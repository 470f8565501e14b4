"""Benchmark of ``fit_batched``: the B1 case (1000 responses on sleepstudy's design) in one call.

Usage (from the repository root)::

    python benchmarks/bench_batched.py [--responses 1000] [--threads 1,2] [--engines mme,dense]
                                       [--dense-responses 100] [--repeats 3] [--profile]
                                       [--lme4-logliks benchmarks/results/B1_lme4_logliks.txt]
                                       [--out benchmarks/results/bench_batched.json]

The responses are ``benchmarks.data.sleepstudy_responses()`` — the same B1 responses the peers
(lme4's refit loop, statsmodels, torch-openreml; ``benchmarks/run.py --cases B1``) fit — and the
model is ``Reaction ~ Days + (Days | Subject)``: ``Sum(Subject=Grouped(subject, Unstructured(2),
covariates=[1, Days]), residual=Scalar(180))``, which ``engine="auto"`` fits with the MME engine.

For every engine × thread count it times one ``fit_batched`` call (the median of ``--repeats``
after a warm-up on 20 responses) and reports seconds, ms per fit, how many converged, how many
stopped at a boundary, the status counts and iteration counts. With an lme4 logLik file (one
value per line, B1 order; written by ``benchmarks/run.py --cases B1 --peers lme4``) it compares
every dataset's REML logLik with lme4's; with ``benchmarks/results/peers.json`` it prints the ratio
to lme4's refit-loop time from the same machine. ``--profile`` splits the time by iteration
(how many datasets were still running) and lists the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``reml_fn`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reml_fn as rf  # noqa: E402
from benchmarks.data import sleepstudy, sleepstudy_responses  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LME4 = RESULTS / "B1_lme4_logliks.txt"
PEERS = RESULTS / "peers.json"
LOGLIK_TOL = 1e-6


def b1_problem(n_responses: int, device: str = "cpu"):
    """The B1 structure, responses Y (B, 180) and design X (180, 2), float64, on ``device``."""
    base = sleepstudy()
    codes, _ = pd.factorize(base["g"], sort=True)
    days = torch.tensor(base["x1"].to_numpy(), dtype=torch.float64)
    X = torch.stack([torch.ones_like(days), days], 1)
    subject = torch.tensor(codes, dtype=torch.int64)
    s = rf.Sum(Subject=rf.Grouped(subject, rf.Unstructured(2), covariates=X), residual=rf.Scalar(len(days)))
    Y = torch.tensor(sleepstudy_responses()[:n_responses], dtype=torch.float64)
    s = torch.utils._pytree.tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf, s)
    return s, Y.to(device), X.to(device)


def lme4_reference(path: Path | None, n: int):
    """lme4's logLiks (n,) and its refit-loop seconds for all B1 responses, when available."""
    logliks = None
    if path is not None and path.exists():
        values = np.loadtxt(path)
        logliks = torch.tensor(values[:n], dtype=torch.float64) if len(values) >= n else None
    seconds = None
    if PEERS.exists():
        try:
            seconds = json.loads(PEERS.read_text())["cases"]["B1"]["lme4"]["time_s"]
        except (KeyError, TypeError, json.JSONDecodeError):
            seconds = None
    return logliks, seconds


def synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def time_fit(s, Y, X, engine: str, threads: int, repeats: int):
    torch.set_num_threads(threads)
    rf.fit_batched(s, Y[:20], X, engine=engine)  # warm-up: first-call costs of torch and the engine
    times, result = [], None
    for _ in range(repeats):
        synchronize(Y)
        start = time.perf_counter()
        result = rf.fit_batched(s, Y, X, engine=engine)
        synchronize(Y)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def summarise(result, seconds: float, lme4_logliks, lme4_seconds) -> dict:
    result = torch.utils._pytree.tree_map(lambda leaf: leaf.cpu() if isinstance(leaf, torch.Tensor) else leaf, result)
    B = result.loglik.shape[0]
    status = {int(code): int(count) for code, count in zip(*torch.unique(result.status, return_counts=True))}
    out = {
        "seconds": seconds,
        "per_fit_ms": 1000.0 * seconds / B,
        "n": B,
        "converged": int(result.converged.sum()),
        "at_boundary": int(result.at_boundary.any(-1).sum()),
        "status": status,
        "n_iter_median": float(result.n_iter.double().median()),
        "n_iter_max": int(result.n_iter.max()),
    }
    if lme4_logliks is not None:
        difference = result.loglik - lme4_logliks[:B]
        out["loglik_minus_lme4"] = {
            "min": float(difference.min()),
            "median": float(difference.median()),
            "max": float(difference.max()),
            "below_lme4_by_more_than_1e-6": int((difference < -LOGLIK_TOL).sum()),
            "below_lme4_by_more_than_1e-2": int((difference < -1e-2).sum()),
            "below_lme4_among_converged": int(((difference < -LOGLIK_TOL) & result.converged).sum()),
        }
    if lme4_seconds is not None:
        lme4_share = lme4_seconds * B / 1000.0  # lme4's time for the same number of fits
        out["lme4_refit_loop_seconds"] = lme4_share
        out["speedup_vs_lme4"] = lme4_share / seconds
    return out


def profile(s, Y, X, engine: str, threads: int) -> None:
    """Time per iteration (datasets still running) and the top functions of one call."""
    algorithm = sys.modules["reml_fn.fit.algorithm"]
    original = algorithm._iterate
    trace: list[tuple[int, float]] = []

    def timed(batch, *args):
        start = time.perf_counter()
        out = original(batch, *args)
        trace.append((batch.size, time.perf_counter() - start))
        return out

    torch.set_num_threads(threads)
    algorithm._iterate = timed
    try:
        start = time.perf_counter()
        result = rf.fit_batched(s, Y, X, engine=engine)
        total = time.perf_counter() - start
    finally:
        algorithm._iterate = original
    in_loop = sum(t for _, t in trace)
    print(
        f"\nprofile ({engine}, {threads} thread(s)): {total:.3f} s in all, {in_loop:.3f} s in {len(trace)} iterations"
    )
    for i, (running, seconds) in enumerate(trace[:12]):
        print(f"  iteration {i + 1:3d}: {running:5d} running  {1000 * seconds:8.1f} ms")
    slow = [(running, t) for running, t in trace[12:]]
    if slow:
        print(
            f"  iterations 13–{len(trace)}: {max(r for r, _ in slow)} running at most, {sum(t for _, t in slow):.3f} s"
        )
    stuck = result.status != 0
    print(f"  datasets not converged: {int(stuck.sum())} (statuses {result.status[stuck].unique().tolist()})")
    profiler = cProfile.Profile()
    profiler.enable()
    rf.fit_batched(s, Y, X, engine=engine)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=1000, help="B1 responses fitted by the MME engine")
    parser.add_argument("--dense-responses", type=int, default=100, help="responses fitted by the dense engine")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--engines", default="mme,dense", help="comma-separated engines")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lme4-logliks", type=Path, default=DEFAULT_LME4)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu", help="torch device of the data (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "python": platform.python_version(),
    }
    print(f"machine: {machine}")
    results = {"machine": machine, "runs": []}
    for engine in args.engines.split(","):
        n = args.responses if engine != "dense" else min(args.responses, args.dense_responses)
        s, Y, X = b1_problem(n, args.device)
        lme4_logliks, lme4_seconds = lme4_reference(args.lme4_logliks, n)
        for threads in (int(t) for t in args.threads.split(",")):
            seconds, times, result = time_fit(s, Y, X, engine, threads, args.repeats)
            summary = summarise(result, seconds, lme4_logliks, lme4_seconds)
            summary |= {"engine": result.engine, "threads": threads, "times": times, "device": args.device}
            summary["logliks"] = result.loglik.cpu().tolist()
            results["runs"].append(summary)
            line = (
                f"{engine:6s} threads={threads} B={n:5d}: {seconds:7.3f} s  {summary['per_fit_ms']:7.3f} ms/fit  "
                f"converged {summary['converged']}/{n}  at boundary {summary['at_boundary']}  "
                f"status {summary['status']}  iterations median {summary['n_iter_median']:g} max {summary['n_iter_max']}"
            )
            if "speedup_vs_lme4" in summary:
                line += f"  ×{summary['speedup_vs_lme4']:.1f} vs lme4's refit loop ({summary['lme4_refit_loop_seconds']:.2f} s)"
            print(line)
            if "loglik_minus_lme4" in summary:
                print(f"        logLik − lme4: {summary['loglik_minus_lme4']}")
    if args.profile:
        s, Y, X = b1_problem(args.responses, args.device)
        profile(s, Y, X, "mme", int(args.threads.split(",")[0]))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
