"""The problems a fit works on: a batch of datasets (structure with per-dataset leaves, Y, X, the
engine's prepared data), the checks of their inputs, the screen of datasets that cannot be fitted,
and the one path that reads ``init``. ``fit`` is a batch of one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
import torch.utils._pytree as pytree
from torch import Tensor

from reml_fn.fit.start import all_finite, check_design, default_init, exact_linear_response, raw_bounds
from reml_fn.params import param_names, tree_from_names
from reml_fn.reml.engines import prepared_data, prepared_keyword, terms_and_vcov
from reml_fn.reml.likelihood import check_data
from reml_fn.reml.ml import ml_loglik_from_reml, ml_terms_and_vcov
from reml_fn.reml.moments import moment_start
from reml_fn.structures.base import Structure
from reml_fn.tree import NAMESPACE, derived

__all__ = [
    "Batch",
    "EngineCalls",
    "Terms",
    "dataset_structure",
    "stack_structures",
    "check_batch_inputs",
    "read_init",
    "check_reml",
    "screen",
    "put",
    "map_tensors",
    "RUNNING",
]

RUNNING = -1  # status of a dataset still iterating
_JACOBIANS = ("closed", "fwd", "rev")

# ------------------------------------------------------------------------------------------------
# Per-dataset data: the structure's batched leaves, Y and X


def map_tensors(fn, tree):
    """``fn`` applied to every tensor of a tree of dicts, tuples and named tuples (the engines'
    outputs and prepared data, a fit's fields); other leaves (None, numbers) kept. The fit's host
    loop calls it on every engine output: plain recursion costs a fraction of
    ``torch.utils._pytree.tree_map`` there.

    Example:
        >>> import torch
        >>> map_tensors(lambda t: t * 2, {"a": torch.tensor(1.0), "b": (torch.tensor(2.0), None)})
        {'a': tensor(2.), 'b': (tensor(4.), None)}
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: map_tensors(fn, value) for key, value in tree.items()}
    if isinstance(tree, tuple):
        mapped = [map_tensors(fn, value) for value in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else type(tree)(mapped)
    return tree


class Batch(NamedTuple):
    """The data of a batch: structure ``s`` (some leaves batched), their in_dims, Y, X."""

    s: Any
    leaf_dims: tuple  # in_dim (int or None) per leaf of s, in pytree leaf order
    spec: Any  # pytree spec of s
    Y: Tensor  # (C, n)
    X: Tensor  # (n, p) shared or (C, n, p)
    x_batched: bool
    prepared: Any = None  # the engine's θ-independent data per dataset (leaves (C, …)), or None
    single: Any = None  # a batch of one: its prepared data without the batch axis (then prepared is None)

    @property
    def size(self) -> int:
        return self.Y.shape[0]

    @property
    def s_in_dims(self):
        if all(d is None for d in self.leaf_dims):
            return None
        return pytree.tree_unflatten(list(self.leaf_dims), self.spec)

    @property
    def x_in_dim(self):
        return 0 if self.x_batched else None

    def take(self, index: Tensor) -> Batch:
        """The datasets ``index`` (a 1-D index tensor), in that order."""
        if index.shape[0] == self.size and bool((index == torch.arange(self.size, device=index.device)).all()):
            return self
        leaves = pytree.tree_leaves(self.s)
        taken = [
            leaf if d is None else leaf.index_select(d, index.to(leaf.device))
            for leaf, d in zip(leaves, self.leaf_dims)
        ]
        s = pytree.tree_unflatten(taken, self.spec) if any(d is not None for d in self.leaf_dims) else self.s
        X = self.X.index_select(0, index) if self.x_batched else self.X
        prepared = self.prepared
        if prepared is not None:
            prepared = map_tensors(lambda leaf: leaf.index_select(0, index), prepared)
        elif self.single is not None:  # a batch of one: its preparation, once per index
            prepared = map_tensors(lambda leaf: leaf.unsqueeze(0).expand(index.shape[0], *leaf.shape), self.single)
        return self._replace(s=s, Y=self.Y.index_select(0, index), X=X, prepared=prepared, single=None)

    def slice(self, start: int, stop: int) -> Batch:
        return self.take(torch.arange(start, stop, device=self.Y.device))

    def map(self, fn, *per_dataset: Tensor):
        """``vmap(fn)(s_b, y_b, X_b, prepared_b, *per_dataset_b)`` over the batch."""
        if self.size == 1:
            # One dataset (the tail of a batch): the plain call, without vmap's per-operation cost.
            s = dataset_structure(self.s, self.s_in_dims, 0) if self.s_in_dims is not None else self.s
            prepared = self.single
            if prepared is None and self.prepared is not None:
                prepared = map_tensors(lambda leaf: leaf[0], self.prepared)
            X = self.X[0] if self.x_batched else self.X
            out = fn(s, self.Y[0], X, prepared, *(value[0] for value in per_dataset))
            return map_tensors(lambda leaf: leaf.unsqueeze(0), out)
        in_dims = (self.s_in_dims, 0, self.x_in_dim, None if self.prepared is None else 0, *([0] * len(per_dataset)))
        return torch.func.vmap(fn, in_dims=in_dims)(self.s, self.Y, self.X, self.prepared, *per_dataset)

    def prepare(self, engine: EngineCalls) -> Batch:
        """The batch with the engine's per-dataset preparation (:meth:`EngineCalls.prepare`) attached."""
        first = self if self.size == 1 else self.take(torch.zeros(1, dtype=torch.long, device=self.Y.device))
        probe = prepared_data(
            engine.chosen,
            first.s if first.s_in_dims is None else dataset_structure(first.s, first.s_in_dims, 0),
            first.Y[0],
            first.X[0] if self.x_batched else first.X,
        )
        if probe is None:  # this engine prepares nothing for this structure
            return self
        if self.size == 1:  # the probe is this dataset's preparation
            return self._replace(single=probe)
        return self._replace(prepared=self.map(engine.prepare))


def dataset_structure(s, in_dims, b: int):
    """Dataset ``b``'s own structure: every batched leaf of ``s`` (``in_dims`` as for
    :func:`fit_batched`) indexed at ``b`` along its batch dimension.

    Example:
        >>> import torch, reml_fn as rf
        >>> Z = torch.stack([torch.eye(3), torch.ones(3, 3)])            # (B=2, n=3, q=3)
        >>> from reml_fn.fit.batched import stack_structures, dataset_structure
        >>> batched, dims = stack_structures([
        ...     rf.Sum(u=rf.Propagate(Z=Z[b], G=rf.Scalar(3)), residual=rf.Scalar(3)) for b in range(2)])
        >>> dataset_structure(batched, dims, 1)["u"]["Z"].matrix.tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    leaves, spec = pytree.tree_flatten(s)
    dims = _leaf_dims(s, in_dims, leaves, spec)
    return pytree.tree_unflatten([leaf if d is None else leaf.select(d, b) for leaf, d in zip(leaves, dims)], spec)


def stack_structures(structures: Sequence) -> tuple[Any, Any]:
    """One structure with batched data leaves from B structures of the same form, and its ``in_dims``.

    Leaves that are equal in every structure stay shared (in_dim None, computed once under vmap);
    the others are stacked along a new leading dimension (in_dim 0). Use it to fit datasets with
    different designs Z: ``s, in_dims = stack_structures([make(Z_b) for Z_b in Zs])``, then
    ``fit_batched(s, Y, X, in_dims=in_dims)``.

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.fit.batched import stack_structures
        >>> Zs = [torch.eye(4)[:, :2], torch.ones(4, 2)]
        >>> s, in_dims = stack_structures([rf.Sum(u=rf.Propagate(Z=Z, G=rf.Scalar(2)), e=rf.Scalar(4)) for Z in Zs])
        >>> tuple(s["u"]["Z"].matrix.shape), in_dims["u"]["Z"].matrix
        ((2, 4, 2), 0)
    """
    structures = list(structures)
    if not structures:
        raise ValueError("stack_structures needs at least one structure")
    flat = [pytree.tree_flatten(s) for s in structures]
    spec = flat[0][1]
    for b, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ValueError(
                f"stack_structures: structure {b} differs in form (types, sizes, names or parameter specs) from "
                "structure 0; only data leaves (tensors) may differ"
            )
    leaves, dims = [], []
    for i, leaf in enumerate(flat[0][0]):
        column = [leaves_b[i] for leaves_b, _ in flat]
        if not isinstance(leaf, Tensor):
            leaves.append(leaf)
            dims.append(None)
            continue
        if any(c.shape != leaf.shape or c.dtype != leaf.dtype for c in column):
            raise ValueError(f"stack_structures: data leaf {i} has different shapes or dtypes across structures")
        if all(c is leaf or torch.equal(c, leaf) for c in column):
            leaves.append(leaf)
            dims.append(None)
        else:
            leaves.append(torch.stack(column))
            dims.append(0)
    return pytree.tree_unflatten(leaves, spec), pytree.tree_unflatten(dims, spec)


def _leaf_dims(s, in_dims, leaves, spec) -> tuple:
    if in_dims is None:
        return (None,) * len(leaves)
    dims = pytree._broadcast_to_and_flatten(in_dims, spec)
    if dims is None:
        raise ValueError(
            "in_dims must be None, an int, or a tree shaped like the structure (as torch.func.vmap's in_dims), "
            f"with an int or None per data leaf; the structure has {len(leaves)} data leaves"
        )
    return tuple(dims)


# ------------------------------------------------------------------------------------------------
# Input checks (before any work)


def check_batch_inputs(s, Y, X, in_dims, x_names, jacobian, chunk_size=None, data_checked: bool = False):
    """Shapes, types and shared data checked once before any work (errors, never flags); returns
    the structure of dataset 0 (``template``), the in_dim of each data leaf and the pytree spec
    (None when ``in_dims`` is None: every leaf shared, nothing to unflatten).

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2), e=rf.Scalar(6))
        >>> Y, X = torch.tensor([[1.0, 2.0, 0.5, 2.5, 1.5, 3.0], [1.0] * 6]), torch.ones(6, 1)
        >>> template, dims, spec = check_batch_inputs(s, Y, X, None, None, "closed")
        >>> set(dims)  # every data leaf shared
        {None}
        >>> check_batch_inputs(s, Y[0], X, None, None, "closed")
        Traceback (most recent call last):
        ...
        ValueError: Y must be a 2-D tensor (B, n) of B responses, got shape (6,) (for one dataset use Y[None] or rf.fit)
    """
    if not isinstance(s, Structure):
        raise TypeError(f"s must be a reml_fn structure, got {type(s).__name__}")
    if not isinstance(Y, Tensor) or not isinstance(X, Tensor):
        raise TypeError(f"Y and X must be tensors, got {type(Y).__name__} and {type(X).__name__}")
    if Y.dim() != 2:
        hint = " (for one dataset use Y[None] or rf.fit)" if Y.dim() == 1 else ""
        raise ValueError(f"Y must be a 2-D tensor (B, n) of B responses, got shape {tuple(Y.shape)}{hint}")
    B, n = Y.shape
    if B == 0:
        raise ValueError("Y has no datasets (B = 0)")
    if not Y.is_floating_point():
        raise TypeError(f"Y must be floating point, got {Y.dtype}")
    if X.dim() not in (2, 3):
        raise ValueError(
            f"X must be (n, p) shared by all datasets or (B, n, p) per dataset, got shape {tuple(X.shape)}"
        )
    if X.dim() == 3 and X.shape[0] != B:
        raise ValueError(f"X has {X.shape[0]} datasets (X.shape[0]) but Y has {B} (Y.shape[0])")
    if X.shape[-2] != n:
        raise ValueError(f"X has {X.shape[-2]} rows but Y has {n} columns (observations per dataset)")
    if X.dtype != Y.dtype:
        raise TypeError(f"Y and X must share a dtype, got {Y.dtype} and {X.dtype}")
    if jacobian not in _JACOBIANS:
        raise ValueError(f"unknown Jacobian method {jacobian!r}; expected 'closed', 'fwd' or 'rev'")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")

    if in_dims is None:  # the usual case, every data leaf shared: the leaves only (kept on s), no spec
        leaves, spec = derived(s, "data_leaves", lambda: tuple(optree.tree_leaves(s, namespace=NAMESPACE))), None
    else:
        leaves, spec = pytree.tree_flatten(s)
    dims = _leaf_dims(s, in_dims, leaves, spec)
    for i, (leaf, d) in enumerate(zip(leaves, dims)):
        if d is None:
            continue
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"in_dims: data leaf {i} has in_dim {d!r}; expected an int or None")
        if not isinstance(leaf, Tensor) or not -leaf.dim() <= d < leaf.dim():
            raise ValueError(
                f"in_dims: data leaf {i} of shape {tuple(getattr(leaf, 'shape', ()))} has no dimension {d}"
            )
        if leaf.shape[d] != B:
            raise ValueError(
                f"in_dims: data leaf {i} has {leaf.shape[d]} entries along its batch dimension {d} but Y has {B} datasets"
            )
    if all(d is None for d in dims):  # every data leaf shared: dataset 0's structure is s itself
        template = s
    else:
        template = pytree.tree_unflatten(
            [leaf if d is None else leaf.select(d, 0) for leaf, d in zip(leaves, dims)], spec
        )
    if not data_checked:  # (fit checks its one dataset itself, in the words of one dataset)
        try:
            check_data(template, Y[0], X[0] if X.dim() == 3 else X)
        except ValueError as error:
            raise ValueError(f"{error} (checked on dataset 0: Y (B, n), X (n, p) or (B, n, p), V (n, n))") from None
    p = X.shape[-1]
    if x_names is not None and len(x_names) != p:
        raise ValueError(f"x_names has {len(x_names)} names but X has {p} columns")
    if X.dim() == 2:
        # Shared X: a value problem concerns every dataset, so it is an error (checked once).
        check_design(X, x_names)
    for i, (leaf, d) in enumerate(zip(leaves, dims)):
        if d is None and isinstance(leaf, Tensor) and leaf.is_floating_point() and not all_finite(leaf):
            rows = torch.nonzero(~torch.isfinite(leaf), as_tuple=True)[0].unique()[:10].tolist()
            raise ValueError(
                f"the structure's data {_leaf_path(s, i)} (shape {tuple(leaf.shape)}) contains NaN or inf "
                f"(rows {rows}); drop or impute those observations"
            )
    return template, dims, spec


def _leaf_path(s, i: int) -> str:
    """The i-th data leaf of ``s`` as a path such as ``Subject.covariates`` (for messages)."""
    try:
        path = pytree.tree_flatten_with_path(s)[0][i][0]
    except Exception:  # a structure registered without key paths
        return f"leaf {i}"
    parts, node, names = [], s, None
    for key in path:
        value = next((getattr(key, a) for a in ("name", "key", "idx") if hasattr(key, a)), key)
        if names is not None and isinstance(value, int):  # a named child of a combinator
            parts.append(str(names[value]))
            node, names = node[value], None
            continue
        names = getattr(node, "names", None) if value == "children" else None
        node = getattr(node, str(value), None) if isinstance(value, str) else node[value]
        if names is None:
            parts.append(str(value))
    return ".".join(parts) or f"leaf {i}"


def check_reml(REML) -> bool:  # noqa: N803  (lme4's argument name)
    """``REML`` of ``fit``/``fit_batched``: True (REML) or False (ML), nothing else.

    Example:
        >>> check_reml(False)
        False
    """
    if not isinstance(REML, bool):
        raise TypeError(f"REML must be True or False, got {REML!r}")
    return REML


def read_init(s, init, B: int, dtype, device) -> Tensor | None:
    """``init`` as raw flat starts (B, k) in ``param_names(s)`` order, or None for the default start.

    The one path that reads starting values, for ``fit`` (B = 1) and ``fit_batched``: a flat tensor
    (k,) or (B, k), or a parameter tree whose leaves are numbers, 0-d tensors or (B,) tensors. A
    tree must hold exactly the free parameters of ``s`` (a missing or an extra name is an error,
    so a misspelt name cannot be silently ignored); values must be finite.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2), e=rf.Scalar(6))
        >>> read_init(s, {"g": {"cov": {"sigma^2": 0.5}}, "e": {"sigma^2": 1.0}}, 2, torch.float64, "cpu").tolist()
        [[0.5, 1.0], [0.5, 1.0]]
        >>> read_init(s, {"g": {"cov": {"sigma^2": 0.5}}}, 1, torch.float64, "cpu")
        Traceback (most recent call last):
        ...
        ValueError: init is missing ['e/sigma^2']; free parameters are ['g/cov/sigma^2', 'e/sigma^2']
    """
    if init is None:
        return None
    names = param_names(s)
    k = len(names)
    if isinstance(init, Mapping):
        flat, missing = [], [name for name in names if not _has_path(init, name)]
        if missing:
            raise ValueError(f"init is missing {missing}; free parameters are {names}")
        for name in names:
            node = init
            for part in name.split("/"):
                node = node[part]
            value = torch.as_tensor(node, dtype=dtype, device=device)
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != B):
                raise ValueError(
                    f"init[{name!r}] must be a scalar or have shape (B,) = ({B},), got {tuple(value.shape)}"
                )
            flat.append(value.expand(B))
        extra = sorted(set(_tree_paths(init)) - set(names))
        if extra:
            raise ValueError(
                f"init has parameters that are not free parameters of the model: {extra}; free are {names}"
            )
        theta = torch.stack(flat, dim=-1) if flat else torch.zeros(B, 0, dtype=dtype, device=device)
    elif isinstance(init, Tensor):
        init = init.to(dtype=dtype, device=device)
        if init.dim() == 1 and init.shape[0] == k:
            theta = init.expand(B, k).clone()
        elif init.dim() == 2 and tuple(init.shape) == (B, k):
            theta = init.clone()
        else:
            shapes = f"(k,) = ({k},)" + (f" or (B, k) = ({B}, {k})" if B > 1 else "")
            raise ValueError(
                f"init must have shape {shapes} (length {k}, in param_names order {names}), got {tuple(init.shape)}"
            )
    else:
        raise TypeError(f"init must be None, a parameter tree or a tensor of raw values, got {type(init).__name__}")
    if not bool(torch.isfinite(theta).all()):
        bad = sorted({names[j] for j in torch.nonzero(~torch.isfinite(theta))[:, 1].tolist()})
        raise ValueError(f"init contains NaN or inf for {bad}")
    return theta


def _has_path(tree: Mapping, name: str) -> bool:
    node = tree
    for part in name.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _tree_paths(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _tree_paths(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}"


# ------------------------------------------------------------------------------------------------
# Datasets that cannot be fitted (flagged, never computed)


def screen(batch: Batch, status: Tensor) -> tuple[Tensor, Tensor]:
    """Status codes 4, 7, 6 for datasets that cannot be fitted (host code on batched tensors), and
    the OLS residual variance s² of the others (NaN for those flagged before it is computed).

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2), e=rf.Scalar(6))
        >>> Y, X = torch.tensor([[1.0, 2.0, 0.5, 2.5, 1.5, 3.0], [1.0] * 6]), torch.ones(6, 1)
        >>> template, dims, spec = check_batch_inputs(s, Y, X, None, None, "closed")
        >>> status, s2 = screen(Batch(s, dims, spec, Y, X, False), torch.full((2,), RUNNING))
        >>> status.tolist()  # the second response is constant: y exactly linear in X
        [-1, 6]
    """
    finite = torch.isfinite(batch.Y).all(-1)
    if batch.x_batched:
        finite = finite & torch.isfinite(batch.X).all(-1).all(-1)
    if any(d is not None for d in batch.leaf_dims):
        for leaf, d in zip(pytree.tree_leaves(batch.s), batch.leaf_dims):
            if d is not None and leaf.is_floating_point():
                finite = finite & torch.isfinite(leaf.movedim(d, 0)).flatten(1).all(-1)
    status = torch.where(finite, status, 4)
    if batch.x_batched:
        p = batch.X.shape[-1]
        safe_X = torch.where(finite[:, None, None], batch.X, torch.zeros_like(batch.X))
        full_rank = torch.linalg.matrix_rank(safe_X) == p
        status = torch.where((status == RUNNING) & ~full_rank, 7, status)
    ok = status == RUNNING
    index = torch.nonzero(ok).flatten()
    if index.numel() == status.shape[0]:  # the usual case: every dataset, no indexing
        degenerate, residual_variance = exact_linear_response(batch.Y, batch.X)
        return torch.where(degenerate, 6, status), residual_variance
    residual_variance = torch.full(status.shape, math.nan, dtype=batch.Y.dtype, device=batch.Y.device)
    if index.numel():
        sub = batch.take(index)
        degenerate, variance = exact_linear_response(sub.Y, sub.X)
        status = status.index_put((index,), torch.where(degenerate, 6, status[index]))
        residual_variance = residual_variance.index_put((index,), variance)
    return status, residual_variance


def put(target: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``target`` with rows ``index`` replaced by ``values`` (out of place).

    Example:
        >>> import torch
        >>> put(torch.zeros(4), torch.tensor([1, 3]), torch.tensor([5.0, 7.0])).tolist()
        [0.0, 5.0, 0.0, 7.0]
    """
    return target.index_put((index,), values if values.dtype == target.dtype else values.to(target.dtype))


class Terms(NamedTuple):
    """What the fit keeps of one evaluation: the AI terms (ℓ, score, AI, β̂) and (XᵀV⁻¹X)⁻¹, so that
    the returned point's β̂ and its covariance need no further engine call."""

    loglik: Tensor
    score: Tensor
    ai: Tensor
    beta: Tensor
    vcov: Tensor


class EngineCalls(NamedTuple):
    """The vmappable per-dataset functions of the chosen engine. ``names``: the free parameters
    of the structure in ``param_names`` order, checked once, so that each call unflattens θ
    without walking the structure again; ``rates``: its :func:`~reml_fn.fit.start.variance_rates`,
    made once (None: from the structure at each call).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.engines import select_engine
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2), e=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 2.0, 0.5, 2.5, 1.5, 3.0]), torch.ones(6, 1)
        >>> calls = EngineCalls(select_engine(s), "closed", tuple(rf.param_names(s)))
        >>> theta = torch.zeros(2)
        >>> bool(torch.isclose(calls.loglik(s, y, X, calls.prepare(s, y, X, None), theta), rf.reml_loglik(s, theta, y, X)))
        True
    """

    chosen: Any
    jacobian: str
    names: tuple
    reml: bool = True  # False: the ML log-likelihood and its terms (reml_fn.reml.ml)
    rates: Tensor | None = None

    def _params(self, theta):
        return tree_from_names(self.names, theta.unbind(-1))

    def prepare(self, s, y, X, prepared):
        return prepared_data(self.chosen, s, y, X)

    def terms(self, s, y, X, prepared, theta) -> Terms:
        if not self.reml:
            ai, vcov = ml_terms_and_vcov(self.chosen, s, self.names, theta, y, X, self.jacobian, prepared)
        else:
            ai, vcov = terms_and_vcov(self.chosen, s, self._params(theta), y, X, self.jacobian, prepared)
        return Terms(*ai, vcov)

    def loglik(self, s, y, X, prepared, theta):
        if not self.reml:
            return ml_loglik_from_reml(self.chosen, s, self._params(theta), y, X, prepared)
        return self.chosen.loglik(s, self._params(theta), y, X, **prepared_keyword(prepared))

    def reference(self, s, y, X, prepared, residual_variance):
        """The default start on the data's scale (:func:`~reml_fn.fit.start.default_init`): it sets
        the variance floors whatever the point a fit starts from (a fit with ``init``)."""
        return default_init(s, y, X, self.jacobian, self.chosen.name, residual_variance)

    def start(self, s, y, X, prepared, residual_variance):
        """A fit without ``init``: ``(reference, start, lower, upper)``, the default start
        (:meth:`reference`), the point the fit starts from, and :meth:`bounds` there. The start is
        the MIVQUE(0) estimates of a grouped model where they lie well inside the parameter space
        (:func:`~reml_fn.reml.moments.moment_start`, whose per-unit traces the default start
        takes), the default start elsewhere."""
        moments = moment_start(s, y, X)
        traces = None if moments is None else moments.unit_traces
        reference = default_init(s, y, X, self.jacobian, self.chosen.name, residual_variance, traces)
        start = reference if moments is None else torch.where(moments.inside, moments.theta, reference)
        return reference, start, *self.bounds(s, y, X, prepared, reference, start)

    def bounds(self, s, y, X, prepared, reference, theta):
        return raw_bounds(s, reference, theta, self.rates)
