"""Data in for the formula front end: frames, factor codes and level labels, one definition each
for the model builder, the residual structures and prediction on new data."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["as_frame", "level_label", "factor_codes"]


def as_frame(data: Any) -> pd.DataFrame:
    """``data`` as a pandas DataFrame: a DataFrame as it is, a polars (or other) frame through its
    ``to_pandas()``, a dict of columns through ``pd.DataFrame``.

    Example:
        >>> as_frame({"y": [1.0, 2.0], "g": ["a", "b"]}).columns.tolist()
        ['y', 'g']
    """
    if isinstance(data, pd.DataFrame):
        return data
    if callable(getattr(data, "to_pandas", None)):
        return data.to_pandas()
    if isinstance(data, Mapping):
        return pd.DataFrame({key: np.asarray(value) for key, value in data.items()})
    raise TypeError(
        f"data must be a pandas DataFrame (or a polars frame, or a dict of columns), got {type(data).__name__}"
    )


def level_label(value: Any) -> str:
    """A level's label as R prints it: whole floats without ``.0`` (``308.0`` → ``"308"``).

    Example:
        >>> level_label(308.0), level_label("M01"), level_label(2.5)
        ('308', 'M01', '2.5')
    """
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def factor_codes(column: pd.Series) -> tuple[np.ndarray, list]:
    """Codes (n,) and levels of one column: a categorical's categories that occur, in their order;
    else the sorted distinct values (numbers as numbers, so 2 < 10).

    Example:
        >>> import pandas as pd
        >>> codes, levels = factor_codes(pd.Series([10, 2, 10, 3]))
        >>> codes.tolist(), levels
        ([2, 0, 2, 1], [2, 3, 10])
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = column.cat.remove_unused_categories()
        return present.cat.codes.to_numpy(dtype=np.int64), list(present.cat.categories)
    try:
        codes, uniques = pd.factorize(column, sort=True)
    except TypeError:  # labels of mixed types: ordered by their text
        codes, uniques = pd.factorize(column.map(str), sort=True)
    return codes.astype(np.int64), list(uniques)
