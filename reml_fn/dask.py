"""Batched fits over a Dask cluster, out of core: ``reml_fn.dask.fit_batched(s, Y, X, **options)``.

``Y`` is a ``dask.array`` (B, n) chunked along B — from zarr, HDF5 or anything Dask reads. Every
chunk of rows runs the ordinary :func:`reml_fn.fit_batched` as one task on whatever scheduler is
active (threads, processes, a ``distributed.Client`` on one machine or many); the per-dataset
results come back as lazy dask arrays (:class:`DaskFitResult`), so 10⁶ results never need to sit
in one process: ``result.to_zarr(store)`` writes them chunk by chunk, ``result.compute()`` gathers
them.

* The structure, a shared X and the options travel as **one** task input (a single Dask key that
  every chunk task depends on): shipped once to each worker, not once per chunk. A sleepstudy
  structure pickles to ≈ 60 KB.
* Each chunk task sets ``torch.set_num_threads(torch_threads)`` (default 1) before fitting: give a
  worker with t Dask threads ``torch_threads = 1`` (t chunks at once, one core each), or one Dask
  thread and ``torch_threads = t`` — not t × t threads on t cores.
* **Workers' malloc.** ``distributed`` starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``
  (to hand memory back to the OS). Setting it at all turns off glibc's adaptive mmap threshold, and
  a fit's many medium-sized tensors then cost page faults: measured here, a 5000-dataset sleepstudy
  chunk takes 0.90 s with it and 0.62 s without. :func:`worker_config` is the Dask configuration
  without it: ``with dask.config.set(rf_dask.worker_config()): LocalCluster(...)`` (or put the same
  in a cluster's configuration).
* A dataset that cannot be fitted is flagged in its ``status`` (as ``fit_batched`` does); a task
  whose worker dies is rerun by Dask, and because a chunk's fit depends only on its rows, the
  results are the same.

Dask and zarr are optional: ``pip install "reml_fn[dask]"``; ``import reml_fn`` never imports them.

Example:
    >>> import dask.array as da, torch, reml_fn as rf
    >>> from reml_fn import dask as rf_dask
    >>> s = rf.Sum(g=rf.Grouped(torch.arange(12) % 3), e=rf.Scalar(12))
    >>> y = torch.tensor([1.0, 2.1, 2.9, 1.2, 2.0, 3.3, 0.8, 1.9, 3.1, 1.1, 2.2, 2.8], dtype=torch.float64)
    >>> Y = da.from_array(torch.stack([y, y.flip(0), 2 * y, y + 1]).numpy(), chunks=(2, 12))
    >>> result = rf_dask.fit_batched(s, Y, torch.ones(12, 1, dtype=torch.float64))
    >>> result.loglik                                                    # lazy
    dask.array<concatenate, shape=(4,), dtype=float64, chunksize=(2,), chunktype=numpy.ndarray>
    >>> result.compute()["status"].tolist()
    [0, 0, 0, 0]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import torch

from reml_fn.fit import fit_batched as _fit_batched
from reml_fn.params import get_path, param_names

__all__ = ["fit_batched", "DaskFitResult", "FIELDS", "worker_config"]

# Per-dataset fields of a result: name → trailing shape from (k, p).
FIELDS = {
    "loglik": lambda k, p: (),
    "reml_criterion": lambda k, p: (),
    "aic": lambda k, p: (),
    "bic": lambda k, p: (),
    "status": lambda k, p: (),
    "converged": lambda k, p: (),
    "n_iter": lambda k, p: (),
    "params": lambda k, p: (k,),
    "natural": lambda k, p: (k,),
    "score": lambda k, p: (k,),
    "at_boundary": lambda k, p: (k,),
    "beta": lambda k, p: (p,),
    "se_beta": lambda k, p: (p,),
    "vcov_beta": lambda k, p: (p, p),
}
_DTYPES = {"status": np.int64, "converged": np.bool_, "n_iter": np.int64, "at_boundary": np.bool_}


def worker_config() -> dict:
    """Dask configuration for worker processes that fit: ``distributed``'s pre-spawn environment
    without ``MALLOC_TRIM_THRESHOLD_`` (module docstring). Use it when the cluster is created.

    Example:
        >>> import dask
        >>> "MALLOC_TRIM_THRESHOLD_" in worker_config()["distributed.nanny.pre-spawn-environ"]
        False
    """
    import distributed  # noqa: F401  (registers distributed's defaults in dask.config)

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {"distributed.nanny.pre-spawn-environ": environ}


class _Shared(NamedTuple):
    """What every chunk task needs, shipped once: the structure, X when shared, options, threads."""

    s: Any
    X: Any
    options: dict
    torch_threads: int


def _fit_chunk(Y: np.ndarray, shared: _Shared, X: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One chunk's fit, as numpy arrays per field (the task a worker runs)."""
    torch.set_num_threads(shared.torch_threads)
    Y_t = torch.from_numpy(np.ascontiguousarray(Y))
    X_t = shared.X if X is None else torch.from_numpy(np.ascontiguousarray(X))
    result = _fit_batched(shared.s, Y_t, X_t, **shared.options)
    out = {}
    for name in FIELDS:
        value = getattr(result, name)
        if name in ("params", "natural"):  # (B, k) in param_names order
            names = result.names
            value = (
                torch.stack([get_path(value, path) for path in names], -1) if names else Y_t.new_zeros(Y.shape[0], 0)
            )
        out[name] = value.detach().cpu().numpy()
    return out


@dataclass(frozen=True)
class DaskFitResult:
    """Per-dataset results as lazy dask arrays (leading dimension B, chunked as Y): ``loglik``,
    ``reml_criterion``, ``aic``, ``bic``, ``status``, ``converged``, ``n_iter``, ``params`` and
    ``natural`` (B, k) in ``names`` order, ``score`` and ``at_boundary`` (B, k), ``beta`` and
    ``se_beta`` (B, p) in ``beta_names`` order, ``vcov_beta`` (B, p, p)."""

    arrays: Mapping[str, da.Array]
    names: tuple
    beta_names: tuple

    def __getattr__(self, name: str) -> da.Array:
        arrays = object.__getattribute__(self, "arrays")
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"DaskFitResult has no field {name!r}; fields: {sorted(arrays)}")

    def compute(self, **options) -> dict[str, np.ndarray]:
        """All fields as numpy arrays, each chunk fitted once (``dask.compute`` options pass on)."""
        names = list(self.arrays)
        values = dask.compute(*[self.arrays[name] for name in names], **options)
        return dict(zip(names, values))

    def to_zarr(self, store, **options) -> None:
        """Write every field to ``store`` (a path or zarr store) as arrays of one group, chunk by
        chunk, each chunk fitted once."""
        writes = [
            da.to_zarr(array, store, component=name, compute=False, overwrite=True)
            for name, array in self.arrays.items()
        ]
        dask.compute(*writes, **options)

    def status_counts(self) -> dict[int, int]:
        """How many datasets ended with each status code (computes ``status`` only)."""
        codes, counts = np.unique(self.arrays["status"].compute(), return_counts=True)
        return {int(code): int(count) for code, count in zip(codes, counts)}


def fit_batched(s, Y: da.Array, X, *, torch_threads: int = 1, **options: Any) -> DaskFitResult:
    """Fit every row of ``Y`` (a dask array (B, n) chunked along B) with :func:`reml_fn.fit_batched`,
    one task per chunk (module docstring). ``X``: a tensor or array (n, p) shared by all datasets, or a
    dask array (B, n, p) chunked along B like Y. ``options``: those of ``fit_batched`` (``init``,
    ``max_iter``, ``engine``, ``REML``, …; not ``in_dims``).
    """
    if not isinstance(Y, da.Array) or Y.ndim != 2:
        raise TypeError(f"Y must be a 2-D dask array (B, n), got {type(Y).__name__}")
    if "in_dims" in options:
        raise ValueError("reml_fn.dask.fit_batched: per-dataset structure data (in_dims) is not supported")
    if isinstance(torch_threads, bool) or not isinstance(torch_threads, int) or torch_threads < 1:
        raise ValueError(f"torch_threads must be a positive int, got {torch_threads!r}")
    n = Y.shape[1]
    Y = Y.rechunk({1: -1})  # whole rows in every chunk
    dtype = torch.float64 if Y.dtype == np.float64 else torch.float32
    per_dataset_X = isinstance(X, da.Array)
    if per_dataset_X:
        if X.ndim != 3 or X.shape[:2] != Y.shape:
            raise ValueError(f"a per-dataset X must be a dask array (B, n, p) = ({Y.shape[0]}, {n}, p), got {X.shape}")
        X = X.rechunk((Y.chunks[0], -1, -1))
        p = X.shape[2]
        shared_X = None
    else:
        shared_X = torch.as_tensor(np.asarray(X), dtype=dtype)
        if shared_X.dim() != 2 or shared_X.shape[0] != n:
            raise ValueError(f"X must be (n, p) with n = {n} (or a dask array (B, n, p)), got {tuple(shared_X.shape)}")
        p = shared_X.shape[1]
    names = tuple(param_names(s))
    k = len(names)
    shared = dask.delayed(_Shared(s, shared_X, dict(options), torch_threads), pure=True, traverse=False)
    fields: dict[str, list] = {name: [] for name in FIELDS}
    Y_blocks = Y.to_delayed().ravel()
    X_blocks = X.to_delayed().ravel() if per_dataset_X else [None] * len(Y_blocks)
    for rows, y_block, x_block in zip(Y.chunks[0], Y_blocks, X_blocks):
        chunk = dask.delayed(_fit_chunk, pure=True)(y_block, shared, x_block)
        for name, trailing in FIELDS.items():
            fields[name].append(
                da.from_delayed(chunk[name], shape=(rows, *trailing(k, p)), dtype=_DTYPES.get(name, Y.dtype))
            )
    arrays = {name: da.concatenate(parts) for name, parts in fields.items()}
    beta_names = tuple(options.get("x_names") or (f"x{j}" for j in range(p)))
    return DaskFitResult(arrays, names, beta_names)
