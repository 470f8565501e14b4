"""Fit ``Reaction ~ Days + (Days | Subject)`` to 100,000 simulated responses stored in zarr, on a Dask
LocalCluster, and summarise the estimates and the statuses — the results never gathered in one
process until the summary (``pip install "reml_fn[dask]"``).

Run:  python examples/dask_sleepstudy.py [--responses 100000] [--workers 2] [--chunk 5000]

1. simulate the responses on sleepstudy's design (as ``examples/batched_sleepstudy.py``) and write
   them to a zarr store, chunk by chunk;
2. ``reml_fn.dask.fit_batched`` fits every chunk with ``rf.fit_batched`` as a task on the cluster
   (one torch thread per task, one Dask thread per worker);
3. the per-dataset estimates go to a zarr store of results (``to_zarr``), read back to summarise.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from distributed import Client, LocalCluster

import reml_fn as rf
from reml_fn import dask as rf_dask

torch.set_default_dtype(torch.float64)


def write_responses(store: str, n_responses: int, chunk: int, seed: int = 20240303) -> rf.LmerModel:
    """Simulated responses (n_responses, 180) in ``store``; returns the sleepstudy model."""
    model = rf.lmer_model("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
    fitted = model.fit()
    array = zarr.open_array(store, mode="w", shape=(n_responses, model.nobs), chunks=(chunk, model.nobs), dtype="f8")
    for start in range(0, n_responses, chunk):
        stop = min(n_responses, start + chunk)
        array[start:stop] = fitted.simulate(stop - start, seed=seed + start).to_numpy().T
    return model


def main(n_responses: int = 100_000, workers: int = 2, chunk: int = 5000) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        responses = str(Path(folder) / "responses.zarr")
        model = write_responses(responses, n_responses, chunk)
        with (
            dask.config.set(rf_dask.worker_config()),
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        ):
            with Client(cluster):
                Y = da.from_zarr(responses)
                start = time.perf_counter()
                result = rf_dask.fit_batched(model.structure, Y, model.X, x_names=model.x_names)
                results = str(Path(folder) / "fits.zarr")
                result.to_zarr(results)
                seconds = time.perf_counter() - start
        fits = zarr.open_group(results, mode="r")
        status = fits["status"][:]
        natural = fits["natural"][:]
        beta = fits["beta"][:]
    ok = status == 0
    print(f"{n_responses} fits on {workers} workers in {seconds:.1f} s ({n_responses / seconds:.0f} per second)")
    print("statuses:", {int(code): int(count) for code, count in zip(*np.unique(status, return_counts=True))})
    print(f"{'estimate':<28}{'2.5 %':>10}{'median':>10}{'97.5 %':>10}")
    columns = {name: natural[ok, j] for j, name in enumerate(result.names)}
    columns |= {f"beta {name}": beta[ok, j] for j, name in enumerate(model.x_names)}
    for name, values in columns.items():
        low, middle, high = np.quantile(values, [0.025, 0.5, 0.975])
        print(f"{name:<28}{low:10.3f}{middle:10.3f}{high:10.3f}")
    return {"seconds": seconds, "status": status}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=5000)
    arguments = parser.parse_args()
    main(arguments.responses, arguments.workers, arguments.chunk)
