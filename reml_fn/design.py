"""Design matrices from data: indicator (dummy) columns from labels, interactions, numeric columns.

These are plain functions run once, before fitting (not under ``vmap``). They return tensors (or a
:class:`~reml_fn.structures.Fixed` structure) plus column names, and never modify their inputs.

* :func:`indicator_matrix` — torch-openreml's ``DummyMatrix``: Z_ic = 1 when row i has the level
  combination of column c, else 0. Columns are the Cartesian product of the label levels.
* :func:`indicator` — the same as a :class:`~reml_fn.structures.Fixed` structure, ready to be the
  ``Z`` of :class:`~reml_fn.combinators.Propagate`.
* :func:`indicator_codes` — integer group codes (row i belongs to group ``codes[i]``).
* :func:`interaction` — element-wise joined labels ("rep1⋈block2").
* :func:`design_matrix` — numeric columns side by side (torch-openreml's
  ``numeric_to_design_matrix``, without its 2-D bug).

Labels may be lists, tuples, 1-D numpy arrays, 1-D tensors or pandas Series (pandas is never
imported); non-string labels are converted with ``str()`` (so ``1`` and ``"1"`` are one level).

Example:
    >>> from reml_fn.design import indicator_matrix
    >>> Z, names = indicator_matrix(["rep1", "rep2", "rep2"], ["block1", "block2", "block1"])
    >>> names
    ['rep1⋈block1', 'rep1⋈block2', 'rep2⋈block1', 'rep2⋈block2']
    >>> Z.tolist()
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from reml_fn.structures.fixed import Fixed

__all__ = ["SEPARATOR", "indicator_matrix", "indicator", "indicator_codes", "interaction", "design_matrix"]

SEPARATOR = "⋈"
"""Joins the labels of an interaction (U+22C8, as torch-openreml)."""


# --------------------------------------------------------------------------------------------
# Label sequences


def _label_list(labels: Any, position: int, function: str) -> list[str]:
    """One label argument as a list of str (list/tuple/1-D array/tensor/Series; items via str())."""
    if isinstance(labels, (list, tuple)):
        items = list(labels)
    elif callable(getattr(labels, "tolist", None)) and not isinstance(labels, (str, bytes)):
        if getattr(labels, "ndim", 1) != 1:
            raise ValueError(
                f"{function}: argument {position} must be one-dimensional, got shape {tuple(labels.shape)}"
            )
        items = labels.tolist()
    else:
        raise TypeError(
            f"{function}: argument {position} must be a list, a tuple, a 1-D numpy array or tensor, "
            f"or a pandas Series, got {type(labels).__name__}"
        )
    return [item if isinstance(item, str) else str(item) for item in items]


def sorted_levels(labels: Any, items: list[str]) -> list[str]:
    """The distinct labels in level order: by value when every label is a number (so 2 < 10, as
    :class:`~reml_fn.Grouped` and the formula front end order them), else as strings.

    Example:
        >>> sorted_levels([1, 2, 10, 3], ["1", "2", "10", "3"]), sorted_levels(["b", "a"], ["b", "a"])
        (['1', '2', '3', '10'], ['a', 'b'])
    """
    raw = list(labels) if isinstance(labels, (list, tuple)) else labels.tolist()
    numeric = bool(raw) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
    if numeric:
        by_label = {label: value for label, value in zip(items, raw)}
        return sorted(by_label, key=by_label.__getitem__)
    return sorted(set(items))


def _label_lists(labels: tuple, function: str) -> list[list[str]]:
    if not labels:
        raise ValueError(f"{function} needs at least one label sequence")
    lists = [_label_list(x, i, function) for i, x in enumerate(labels)]
    for i, items in enumerate(lists[1:], start=1):
        if len(items) != len(lists[0]):
            raise ValueError(
                f"{function}: argument {i} has {len(items)} labels but argument 0 has {len(lists[0])}; "
                "all label sequences must have the same length"
            )
    return lists


def _level_list(levels: Any, position: int) -> list[str]:
    if callable(getattr(levels, "tolist", None)) and not isinstance(levels, (str, bytes)):
        levels = levels.tolist()
    if not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels of argument {position} must be a list or tuple, got {type(levels).__name__}")
    out = [level if isinstance(level, str) else str(level) for level in levels]
    duplicates = sorted({level for level in out if out.count(level) > 1})
    if duplicates:
        raise ValueError(f"levels of argument {position} repeat {duplicates}")
    return out


def _resolve_levels(levels: Any, lists: list[list[str]], labels: tuple) -> list[list[str]]:
    """Per argument: the given levels, or the distinct labels in :func:`sorted_levels` order when None."""
    defaults = [sorted_levels(raw, items) for raw, items in zip(labels, lists)]
    if levels is None:
        return defaults
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels must be a list (one entry per label argument), got {type(levels).__name__}")
    if len(lists) == 1 and levels and all(not isinstance(x, (list, tuple)) and x is not None for x in levels):
        levels = [levels]  # a flat list of levels for a single label argument
    if len(levels) != len(lists):
        raise ValueError(f"levels needs one entry per label argument ({len(lists)}), got {len(levels)}")
    return [
        default if given is None else _level_list(given, i) for i, (given, default) in enumerate(zip(levels, defaults))
    ]


# --------------------------------------------------------------------------------------------
# Public functions


def interaction(*labels: Any, sep: str = SEPARATOR) -> list[str]:
    """Element-wise joined labels: ``out[i] = sep.join(a[i], b[i], …)``.

    Unlike torch-openreml's ``interaction``, sequences of different lengths are an error (not
    silently truncated).

    Args:
        *labels: one or more label sequences of equal length.
        sep: separator (default "⋈").

    Returns:
        A list of str, one per row.

    Example:
        >>> interaction(["R1", "R1", "R2"], ["B1", "B2", "B1"], sep=":")
        ['R1:B1', 'R1:B2', 'R2:B1']
    """
    if not isinstance(sep, str):
        raise TypeError(f"sep must be a str, got {type(sep).__name__}")
    lists = _label_lists(labels, "interaction")
    return [sep.join(row) for row in zip(*lists)]


def indicator_codes(labels: Any, levels: Sequence | None = None) -> tuple[Tensor, list[str]]:
    """Integer group codes: ``codes[i] = levels.index(labels[i])``.

    Args:
        labels: one label sequence (use :func:`interaction` first for combinations).
        levels: the levels in code order (default: sorted unique labels). A label not among them
            is an error.

    Returns:
        ``(codes, levels)``: a LongTensor (n,) and the list of levels.

    Example:
        >>> codes, levels = indicator_codes(["b", "a", "b", "c"])
        >>> codes.tolist(), levels
        ([1, 0, 1, 2], ['a', 'b', 'c'])
    """
    (items,) = _label_lists((labels,), "indicator_codes")
    level_list = sorted_levels(labels, items) if levels is None else _level_list(levels, 0)
    index = {level: i for i, level in enumerate(level_list)}
    unknown = sorted({item for item in items if item not in index})
    if unknown:
        raise ValueError(f"indicator_codes: labels {unknown} are not among the levels {level_list}")
    return torch.tensor([index[item] for item in items], dtype=torch.long), level_list


def indicator_matrix(
    *labels: Any,
    levels: Sequence | None = None,
    lex_order: bool = True,
    drop_first: bool = False,
    drop_empty_cols: bool = False,
    sep: str = SEPARATOR,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, list[str]]:
    """Indicator (dummy) design matrix of one or several label sequences (torch-openreml's
    ``DummyMatrix``).

    With label sequences a, b, … of length n, the columns are the level combinations
    c = (l_a, l_b, …) of the Cartesian product of the levels, and

        Z_ic = 1 if (a_i, b_i, …) = c, else 0.

    Column order: the Cartesian product (last argument varying fastest), sorted by the level
    tuples when ``lex_order`` (so even custom ``levels`` come out in sorted order), kept in the
    given level order otherwise. Then ``drop_first`` removes the first column and
    ``drop_empty_cols`` removes every all-zero column. A row whose combination is not a column
    (a label missing from custom ``levels``) stays all zero and raises a ``RuntimeWarning``
    ``"Unknown combination ('z',) dropped!"`` (once per distinct combination).

    Args:
        *labels: one or more label sequences of equal length.
        levels: the levels of each argument, a list with one entry per argument (a list of
            levels, or None for the sorted unique labels); with a single argument a flat list of
            levels is accepted too.
        lex_order: sort the columns by their level tuples (default True).
        drop_first: drop the first column (e.g. for a fixed-effect design with an intercept).
        drop_empty_cols: drop columns without any 1.
        sep: joins a combination into its column name (default "⋈").
        dtype, device: of the result (default: torch's defaults).

    Returns:
        ``(Z, names)``: a tensor (n, number of columns) and the column names.

    Example:
        >>> Z, names = indicator_matrix(["b", "a", "c", "a"], drop_first=True)
        >>> names, Z.tolist()
        (['b', 'c'], [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     Z, names = indicator_matrix(["b", "a", "z"], levels=["b", "a"], lex_order=False)
        >>> names, Z.tolist(), str(caught[0].message)
        (['b', 'a'], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "Unknown combination ('z',) dropped!")
    """
    lists = _label_lists(labels, "indicator_matrix")
    level_lists = _resolve_levels(levels, lists, labels)
    combinations = list(itertools.product(*level_lists))
    if lex_order:
        combinations.sort()
    column = {combination: j for j, combination in enumerate(combinations)}
    rows, cols, unknown = [], [], []
    for i, row in enumerate(zip(*lists)):
        j = column.get(row)
        if j is None:
            if row not in unknown:
                unknown.append(row)
        else:
            rows.append(i)
            cols.append(j)
    for row in unknown:
        warnings.warn(f"Unknown combination {row!r} dropped!", RuntimeWarning, stacklevel=2)
    n = len(lists[0])
    dtype = dtype or torch.get_default_dtype()
    matrix = torch.zeros(n, len(combinations), dtype=dtype, device=device)
    if rows:
        index = (torch.tensor(rows, device=matrix.device), torch.tensor(cols, device=matrix.device))
        matrix = matrix.index_put(index, torch.ones((), dtype=dtype, device=matrix.device))
    names = [sep.join(combination) for combination in combinations]
    if drop_first:
        matrix, names = matrix[:, 1:], names[1:]
    if drop_empty_cols:
        keep = [j for j, nonzero in enumerate((matrix != 0).any(dim=0).tolist()) if nonzero]
        matrix, names = matrix[:, keep], [names[j] for j in keep]
    return matrix, names


def indicator(*labels: Any, **options: Any) -> tuple[Fixed, list[str]]:
    """:func:`indicator_matrix` as a :class:`~reml_fn.structures.Fixed` structure, plus the names.

    Example:
        >>> import reml_fn as rf
        >>> Z, names = indicator(["g1", "g2", "g1"])
        >>> V = rf.Propagate(Z=Z, G=rf.Scalar(2))   # Z σ² I Zᵀ: rows of one group covary
        >>> V().tolist()
        [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    matrix, names = indicator_matrix(*labels, **options)
    return Fixed(matrix), names


def _numeric_block(column: Any, position: int) -> Tensor:
    """One argument of :func:`design_matrix` as a tensor (n,) or (n, k), never a view to write to."""
    if callable(getattr(column, "to_numpy", None)):  # pandas Series / DataFrame
        column = column.to_numpy()
    if isinstance(column, Tensor):
        block = column
    else:
        try:
            # torch.tensor copies (as_tensor would share, and warn on, read-only pandas/numpy memory)
            block = torch.tensor(column)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"design_matrix: argument {position} must be numeric (a tensor, a list or tuple of numbers, "
                f"a numpy array or a pandas Series), got {type(column).__name__}: {error}"
            ) from None
    if block.is_complex():
        raise TypeError(f"design_matrix: argument {position} must be real, got {block.dtype}")
    if block.dim() not in (1, 2):
        raise ValueError(
            f"design_matrix: argument {position} must be 1-D (n,) or 2-D (n, k), got shape {tuple(block.shape)}"
        )
    return block


def design_matrix(
    *columns: Any,
    intercept: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Numeric columns side by side: X = [1 | x_1 | x_2 | …] (n, k).

    A 1-D argument (n,) gives one column; a 2-D argument (n, k) gives k columns. Inputs are never
    modified (torch-openreml's ``numeric_to_design_matrix`` turned a 2-D tensor into a 4-D result
    and unsqueezed the caller's tensor in place).

    Args:
        *columns: tensors, lists/tuples of numbers, numpy arrays or pandas Series/DataFrames.
        intercept: prepend a column of ones.
        dtype: of the result; default: the promoted dtype of the floating-point inputs (so float64
            data is never rounded to float32), torch's default dtype when no input is floating.
        device: of the result; default: the device of the first tensor argument.

    Returns:
        A tensor (n, k) (k counts the intercept).

    Example:
        >>> import torch
        >>> design_matrix([1.0, 2.0, 3.0], torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), intercept=True).tolist()
        [[1.0, 1.0, 0.0, 1.0], [1.0, 2.0, 1.0, 0.0], [1.0, 3.0, 1.0, 1.0]]
    """
    if not columns:
        raise ValueError("design_matrix needs at least one column")
    blocks = [_numeric_block(column, i) for i, column in enumerate(columns)]
    n = blocks[0].shape[0]
    for i, block in enumerate(blocks[1:], start=1):
        if block.shape[0] != n:
            raise ValueError(f"design_matrix: argument {i} has {block.shape[0]} rows but argument 0 has {n}")
    if dtype is None:
        floating = [block.dtype for block in blocks if block.is_floating_point()]
        dtype = floating[0] if floating else torch.get_default_dtype()
        for other in floating[1:]:
            dtype = torch.promote_types(dtype, other)
    if device is None:
        device = next((column.device for column in columns if isinstance(column, Tensor)), None)
    parts = [block.to(dtype=dtype, device=device) for block in blocks]
    parts = [part if part.dim() == 2 else part.unsqueeze(1) for part in parts]
    if intercept:
        parts.insert(0, torch.ones(n, 1, dtype=dtype, device=device))
    return torch.cat(parts, dim=1)
