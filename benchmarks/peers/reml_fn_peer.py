"""reml_fn "peer": ``rf.fit`` / ``rf.fit_batched`` on a benchmark case, in its own process like the peers.

Usage (from the repository root; the same command line as the other peers plus reml_fn's options)::

    python benchmarks/peers/reml_fn_peer.py CASE CSV REPEATS [--slope=x1] \
        [--responses=FILE --logliks-out=FILE] [--budget=SECONDS] \
        [--threads=1] [--engine=auto] [--profile-out=FILE]

Running reml_fn in a subprocess makes its peak RSS (``VmHWM`` after the data are loaded, interpreter,
torch and the data included) and its timing directly comparable with the peers'. The timed region is
the whole "data frame → fitted model" path, like lme4's ``lmer()`` with its formula processing:

* the model: X = [1, x1 … xk] as a tensor, integer group codes, and
  ``Sum(g=Grouped(codes, cov=Scalar(1)), residual=Scalar(n))`` for ``(1 | g)`` or
  ``Grouped(codes, covariates=[1, slope], cov=Unstructured(2))`` for ``(slope | g)``;
* then ``rf.fit(s, y, X)`` (single response; one untimed warm-up, then REPEATS timed fits, median),
  or one ``rf.fit_batched(s, Y, X)`` call for all B responses of a batch case (warm-up on 8
  responses, then REPEATS timed calls, median; the peers time their loop once).

``--threads`` sets torch's intra-op threads (and OMP/MKL_NUM_THREADS before torch is imported);
the default 1 matches lme4, which is single-threaded. ``--profile-out`` runs one more fit (or batch)
under cProfile after the timing, writes the top functions to FILE and adds the number of engine calls
(and of Python function calls) to the JSON (``profile``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``reml_fn`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import peer_io  # noqa: E402

WARMUP_BATCH = 8
PROFILE_LINES = 30


def parse_args(argv: list[str] | None = None) -> tuple[peer_io.PeerArgs, argparse.Namespace]:
    """The shared peer command line plus ``--threads``, ``--engine`` and ``--profile-out``."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, like lme4)")
    extra.add_argument("--engine", default="auto", help="reml_fn engine: auto, mme or dense")
    extra.add_argument("--profile-out", type=Path, default=None, help="cProfile one more fit into this file")
    options, rest = extra.parse_known_args(argv)
    return peer_io.parse_peer_args(__doc__.splitlines()[0], rest), options


def model_from_frame(frame, covariates: list[str], slope: str | None):
    """reml_fn's model of a case frame: (structure, X (n, p) float64, fixed-effect names).

    ``Sum(g=Grouped(codes, cov=Scalar(1)), residual=Scalar(n))`` for lme4's ``(1 | g)``; with
    ``slope``, ``Grouped(codes, covariates=[1, slope], cov=Unstructured(2))`` for ``(slope | g)``.
    Group codes follow the sorted labels (lme4's factor levels); a categorical ``g`` (the peer makes
    one when it loads the data, as R's ``read.csv`` + ``factor`` does outside lme4's timed region)
    gives them directly.
    """
    import numpy as np
    import pandas as pd
    import torch

    import reml_fn as rf

    n = len(frame)
    columns = [np.ones(n)] + [frame[c].to_numpy(np.float64) for c in covariates]
    X = torch.from_numpy(np.column_stack(columns))
    if isinstance(frame["g"].dtype, pd.CategoricalDtype):  # already a factor, as in R after read.csv
        codes = frame["g"].cat.codes.to_numpy()
    else:
        codes = np.unique(frame["g"].to_numpy(), return_inverse=True)[1]
    groups = torch.from_numpy(codes.astype(np.int64).reshape(-1))
    if slope is None:
        term = rf.Grouped(groups=groups, cov=rf.Scalar(1))
    else:
        design = torch.stack([torch.ones(n, dtype=torch.float64), torch.from_numpy(np.array(frame[slope], np.float64))])
        term = rf.Grouped(groups=groups, covariates=design.T.contiguous(), cov=rf.Unstructured(2))
    return rf.Sum(g=term, residual=rf.Scalar(n)), X, ["(Intercept)", *covariates]


def varcomp(result, slope: str | None) -> dict[str, float]:
    """lme4-named variance components from a single fit's natural-scale parameters."""
    cov = result.natural["g"]["cov"]
    if slope is None:
        out = {"g:(Intercept)": float(cov["sigma^2"])}
    else:
        out = {
            "g:(Intercept)": float(cov["sigma^2_0_0"]),
            f"g:{slope}": float(cov["sigma^2_1_1"]),
            f"g:(Intercept),{slope}": float(cov["sigma^2_1_0"]),
        }
    out["Residual"] = float(result.natural["residual"]["sigma^2"])
    return out


def engine_call_counts(stats) -> dict[str, int]:
    """How often the engine entry points ran (``ai_terms``, ``loglik``, ``gls``, ``_factorize`` of the MME
    and dense engines) and how many Python function calls the profiled run made in all."""
    counts: dict[str, int] = {"python_calls": stats.total_calls}
    for (filename, _, function), row in stats.stats.items():
        module = Path(filename).stem
        if module in ("mme", "dense", "engines") and function in ("ai_terms", "loglik", "gls", "_factorize"):
            key = f"{module}.{function}"
            counts[key] = counts.get(key, 0) + row[1]
    return counts


def count_aten_ops(run) -> Counter:
    """How many ATen operators each kind ``run()`` dispatches (under vmap: the batched operators).

    At small n a fit costs about a constant few µs per operator (Python, dispatcher, allocation)
    whatever its size, so this count times that cost is most of the time.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        run()
    return counts


def profile_once(run, n_fits: int, path: Path) -> dict[str, Any]:
    """cProfile one call of ``run`` (``n_fits`` fits); top functions to ``path``; a summary for the JSON:
    engine calls, Python function calls, and the ATen operators of one more (uncounted-time) call."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    wall, cpu, _ = peer_io.timed_cpu(lambda: profiler.runcall(run))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(PROFILE_LINES)
    stats.sort_stats("tottime").print_stats(PROFILE_LINES)
    ops = count_aten_ops(run)
    text.write(f"\nATen operators dispatched by one run: {sum(ops.values())}\n")
    text.writelines(f"  {count:7d}  {name}\n" for name, count in ops.most_common(PROFILE_LINES))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    summary = {"file": str(path), "n_fits": n_fits, "profiled_wall_s": wall, "profiled_cpu_s": cpu}
    calls = engine_call_counts(stats) | {"aten_ops": sum(ops.values())}
    return summary | {"calls": calls, "top_aten_ops": dict(ops.most_common(10))}


def measure(
    frame,
    covariates: list[str],
    slope: str | None,
    responses=None,
    repeats: int = 5,
    budget: float = peer_io.DEFAULT_BUDGET_S,
    engine: str = "auto",
    profile_out: Path | None = None,
) -> dict[str, Any]:
    """Time reml_fn on a case frame (``g`` categorical) and return the peer fields (no memory fields).

    Single response (``responses`` None): ``time_repeats`` of build-model-then-``rf.fit``; batch
    (``responses`` a (B, n) float64 tensor): ``repeats`` calls of build-model-then-``rf.fit_batched``
    after a warm-up on 8 responses. With ``profile_out``, one more profiled run (see :func:`profile_once`).
    """
    import numpy as np
    import torch

    import reml_fn as rf

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "engine_requested": engine}
    if responses is None:
        y = torch.tensor(frame["y"].to_numpy(np.float64))

        def run():
            s, X, names = model_from_frame(frame, covariates, slope)
            return rf.fit(s, y, X, x_names=names, engine=engine)

        timing, result = peer_io.time_repeats(run, repeats, budget)
        build_s = statistics.median(
            peer_io.timed(lambda: model_from_frame(frame, covariates, slope))[0] for _ in range(5)
        )
        out |= timing | {
            "build_model_s": build_s,
            "loglik": float(result.loglik),
            "beta": dict(zip(result.beta_names, result.beta.tolist())),
            "varcomp": varcomp(result, slope),
            "n_iter": int(result.n_iter),
            "converged": bool(result.converged),
            "status": int(result.status),
            "at_boundary": bool(result.at_boundary.any()),
            "engine": result.engine,
        }
        n_fits = 1
    else:

        def run():
            s, X, names = model_from_frame(frame, covariates, slope)
            return rf.fit_batched(s, responses, X, x_names=names, engine=engine)

        s, X, _ = model_from_frame(frame, covariates, slope)
        rf.fit_batched(s, responses[:WARMUP_BATCH], X, engine=engine)  # warm-up
        times, cpu_times = [], []
        for _ in range(max(1, repeats)):
            wall, cpu, result = peer_io.timed_cpu(run)
            times.append(wall)
            cpu_times.append(cpu)
        n_fits = responses.shape[0]
        boundary = result.at_boundary.any(-1)
        status = {int(c): int(k) for c, k in zip(*torch.unique(result.status, return_counts=True))}
        out |= {
            "time_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times),
            "times_s": times,
            "cpu_times_s": cpu_times,
            "per_fit_s": statistics.median(times) / n_fits,
            "per_fit_cpu_s": statistics.median(cpu_times) / n_fits,
            "n_fits": n_fits,
            "loop": "one rf.fit_batched(s, Y, X) call for all responses (model built inside the timed region)",
            "logliks": result.loglik.tolist(),
            "converged": int(result.converged.sum()),
            "status_counts": status,
            "boundary_fits": torch.nonzero(boundary).reshape(-1).tolist(),
            "not_converged_fits": torch.nonzero(~result.converged).reshape(-1).tolist(),
            "n_iter_median": float(result.n_iter.double().median()),
            "n_iter_max": int(result.n_iter.max()),
            "n_iter_total": int(result.n_iter.sum()),
            "engine": result.engine,
        }
    if profile_out is not None:
        out["profile"] = profile_once(run, n_fits, profile_out)
    return out


def main() -> None:
    """Run reml_fn on one case and print its JSON line."""
    args, options = parse_args()
    # Before torch is imported, so that OpenMP/MKL never start more threads than asked for.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(options.threads)
    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(options.threads)
    torch.set_default_dtype(torch.float64)
    import reml_fn  # noqa: F401  (imported before the memory baseline, like the peers' libraries)

    frame, covariates = peer_io.read_case_csv(args.csv)
    frame["g"] = pd.Categorical(frame["g"])  # sorted levels, like the R peer's factor(g)
    responses = None if args.responses is None else torch.tensor(peer_io.read_responses(args.responses))
    out: dict[str, Any] = {
        "peer": "reml_fn",
        "case": args.case,
        "n": len(frame),
        "q": int(frame["g"].nunique()),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "interop_threads": torch.get_num_interop_threads(),
    }
    out["rss_before_fit_mb"] = peer_io.proc_status_mb("VmRSS")
    peer_io.reset_peak_rss()
    # The profiled run comes after the peak is read: cProfile's bookkeeping is not reml_fn's memory.
    out |= measure(frame, covariates, args.slope, responses, args.repeats, args.budget, options.engine)
    out["peak_rss_mb"] = peer_io.proc_status_mb("VmHWM")
    if options.profile_out is not None:
        out["profile"] = measure(
            frame, covariates, args.slope, responses, 1, args.budget, options.engine, options.profile_out
        )["profile"]
    if responses is not None:
        out = peer_io.finish_batch(out, args.logliks_out)
    peer_io.emit(out)


if __name__ == "__main__":
    main()
