"""Benchmark of ``reml_fn.dask.fit_batched``: throughput of a 2-worker LocalCluster (1 thread each)
against one in-process ``rf.fit_batched`` with 1 thread, on 100,000 sleepstudy-shaped responses read
from zarr.

Usage (from the repository root)::

    python benchmarks/bench_dask.py [--responses 100000] [--chunk 5000] [--out benchmarks/results/dask.json]

Both read the same zarr store chunk by chunk and fit ``Reaction ~ Days + (Days | Subject)``. The
in-process run fits the chunks one after another (``rf.fit_batched`` per chunk, 1 torch thread);
the cluster runs one task per chunk on 2 worker processes and writes the results to zarr. Workers
are warmed up first (reml_fn imported, one small fit), as a long-lived cluster is. Target (issue
"Beyond one machine"): cluster throughput ≥ 1.7× the in-process one; the peak memory per worker is
recorded (it is bounded by the chunk size).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reml_fn as rf  # noqa: E402
from reml_fn import dask as rf_dask  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from dask_sleepstudy import write_responses  # noqa: E402


def _warm() -> int:
    import torch

    import reml_fn as rf

    s = rf.Sum(g=rf.Grouped(torch.arange(12) % 3), e=rf.Scalar(12))
    rf.fit_batched(s, torch.randn(4, 12, dtype=torch.float64), torch.ones(12, 1, dtype=torch.float64))
    return 0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--out", default="benchmarks/results/dask.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"responses": args.responses, "chunk": args.chunk}
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "responses.zarr")
        model = write_responses(store, args.responses, args.chunk)
        responses = zarr.open_array(store, mode="r")

        start = time.perf_counter()
        in_process = []
        for first in range(0, args.responses, args.chunk):
            Y = torch.from_numpy(responses[first : first + args.chunk])
            in_process.append(rf.fit_batched(model.structure, Y, model.X).loglik.numpy())
        report["in_process_s"] = time.perf_counter() - start
        report["in_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        with (
            dask.config.set(rf_dask.worker_config()),
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        ):
            with Client(cluster) as client:
                client.run(_warm)
                start = time.perf_counter()
                result = rf_dask.fit_batched(model.structure, da.from_zarr(store), model.X)
                result.to_zarr(str(Path(folder) / "fits.zarr"))
                report["cluster_s"] = time.perf_counter() - start
                report["worker_peak_rss_mb"] = list(client.run(_peak_rss_mb).values())
        fitted = zarr.open_group(str(Path(folder) / "fits.zarr"), mode="r")
        report["same_logliks"] = bool(np.allclose(fitted["loglik"][:], np.concatenate(in_process), rtol=1e-10))
        report["status_counts"] = {int(c): int(n) for c, n in zip(*np.unique(fitted["status"][:], return_counts=True))}
    report["in_process_per_s"] = args.responses / report["in_process_s"]
    report["cluster_per_s"] = args.responses / report["cluster_s"]
    report["speedup"] = report["in_process_s"] / report["cluster_s"]
    print(
        f"{args.responses} fits: in-process {report['in_process_s']:.1f} s ({report['in_process_per_s']:.0f}/s), "
        f"2-worker cluster {report['cluster_s']:.1f} s ({report['cluster_per_s']:.0f}/s): {report['speedup']:.2f}×; "
        f"worker peak RSS {[round(v) for v in report['worker_peak_rss_mb']]} MB; same logLiks {report['same_logliks']}"
    )
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
