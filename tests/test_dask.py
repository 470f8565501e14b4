"""reml_fn.dask.fit_batched on a LocalCluster with 2 worker processes: the results are those of the
in-process fit_batched, whatever the chunks, with poisoned datasets and a worker killed mid-run."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import reml_fn as rf

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from reml_fn import dask as rf_dask  # noqa: E402

FIELDS = ["loglik", "status", "beta", "params", "natural", "n_iter", "vcov_beta"]


@pytest.fixture(scope="module")
def client():
    with dask.config.set(rf_dask.worker_config()):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as connection:
        yield connection
    cluster.close()


@pytest.fixture(scope="module")
def problem():
    model = rf.lmer_model("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
    generator = torch.Generator().manual_seed(11)
    Y = model.y + 25.0 * torch.randn(41, model.nobs, generator=generator, dtype=torch.float64)
    return model.structure, Y, model.X


def in_process(s, Y, X):
    result = rf.fit_batched(s, Y, X)
    names = result.names
    return {
        "loglik": result.loglik.numpy(),
        "status": result.status.numpy(),
        "beta": result.beta.numpy(),
        "params": torch.stack([rf.params.get_path(result.params, name) for name in names], -1).numpy(),
        "natural": torch.stack([rf.params.get_path(result.natural, name) for name in names], -1).numpy(),
        "n_iter": result.n_iter.numpy(),
        "vcov_beta": result.vcov_beta.numpy(),
    }


def assert_same(ours: dict, expected: dict) -> None:
    for name in FIELDS:
        a, b = ours[name], expected[name]
        if a.dtype.kind == "f":
            finite = np.isfinite(b)
            assert np.array_equal(np.isfinite(a), finite), name
            np.testing.assert_allclose(a[finite], b[finite], rtol=1e-8, atol=1e-10, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_shared_x_and_chunks_of_unequal_sizes_equal_in_process(client, problem):
    s, Y, X = problem
    expected = in_process(s, Y, X)
    for chunks in [(10,), ((5, 12, 3, 21),)]:  # B = 41: not a multiple of 10; unequal chunks
        dY = da.from_array(Y.numpy(), chunks=(chunks[0], -1))
        assert_same(rf_dask.fit_batched(s, dY, X).compute(), expected)


def test_per_dataset_x_equals_in_process(client, problem):
    s, Y, X = problem
    generator = torch.Generator().manual_seed(3)
    Xb = X.expand(Y.shape[0], -1, -1).clone()
    Xb[:, :, 1] = Xb[:, :, 1] + 0.1 * torch.rand(Y.shape[0], 1, generator=generator, dtype=torch.float64)
    expected = in_process(s, Y, Xb)
    result = rf_dask.fit_batched(
        s, da.from_array(Y.numpy(), chunks=(8, -1)), da.from_array(Xb.numpy(), chunks=(8, -1, -1))
    )
    assert_same(result.compute(), expected)


def test_poisoned_datasets_are_flagged_and_the_others_unchanged(client, problem):
    s, Y, X = problem
    poisoned = Y.clone()
    poisoned[3, 7] = float("nan")  # status 4
    poisoned[20] = 5.0  # constant: y exactly linear in X, status 6
    result = rf_dask.fit_batched(s, da.from_array(poisoned.numpy(), chunks=(9, -1)), X).compute()
    assert result["status"][3] == 4 and result["status"][20] == 6
    clean = [b for b in range(Y.shape[0]) if b not in (3, 20)]
    expected = in_process(s, Y[clean], X)
    assert_same({name: value[clean] for name, value in result.items()}, expected)


def test_a_worker_killed_mid_run_gives_the_same_results(client, problem):
    s, Y, X = problem
    Y = Y.repeat(10, 1)  # 410 datasets in 41 tasks: long enough to kill a worker in the middle
    expected = in_process(s, Y, X)
    result = rf_dask.fit_batched(s, da.from_array(Y.numpy(), chunks=(10, -1)), X)
    futures = client.compute(result.arrays["loglik"].to_delayed().ravel().tolist())
    distributed.wait(futures, return_when="FIRST_COMPLETED")
    busy = [worker for worker, tasks in client.processing().items() if tasks]
    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
    os.kill(pid, signal.SIGKILL)  # the worker process dies mid-run; its nanny restarts it, its tasks rerun
    assert sum(future.done() for future in futures) < len(futures)
    assert_same(result.compute(), expected)
    client.wait_for_workers(2, timeout=60)


def test_to_zarr_and_status_counts(client, problem, tmp_path):
    s, Y, X = problem
    result = rf_dask.fit_batched(s, da.from_array(Y[:12].numpy(), chunks=(5, -1)), X)
    store = str(tmp_path / "fits.zarr")
    result.to_zarr(store)
    group = zarr.open_group(store, mode="r")
    np.testing.assert_allclose(group["loglik"][:], in_process(s, Y[:12], X)["loglik"], rtol=1e-10)
    assert result.status_counts() == {0: 12}


def test_the_shared_part_pickles_cheaply_and_the_core_does_not_import_dask(problem):
    s, _, X = problem
    assert len(pickle.dumps(rf_dask._Shared(s, X, {}, 1))) < 200_000
    code = "import reml_fn, sys; print('dask' in sys.modules, 'zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_argument_errors(problem):
    s, Y, X = problem
    with pytest.raises(TypeError, match="2-D dask array"):
        rf_dask.fit_batched(s, Y, X)
    with pytest.raises(ValueError, match="in_dims"):
        rf_dask.fit_batched(s, da.from_array(Y.numpy()), X, in_dims=0)
    with pytest.raises(ValueError, match="torch_threads"):
        rf_dask.fit_batched(s, da.from_array(Y.numpy()), X, torch_threads=0)
