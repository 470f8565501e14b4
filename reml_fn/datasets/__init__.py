"""Classic mixed-model datasets shipped with reml_fn, and their published lme4/nlme REML results.

The CSV files and ``references.json`` are copies of the project's reference data (sources and
conventions in ``data/REFERENCE_README.md``): Dyestuff, Dyestuff2, sleepstudy, Orthodont, Oxboys,
Rail, dietox, john_alpha, peer_sim, and statsmodels' lme00–lme11 with lme4 results; lme4's cake
and Penicillin and nlme's Machines and ergoStool (for the formula front end's tests).

Example:
    >>> from reml_fn import datasets
    >>> d = datasets.load("Dyestuff")
    >>> len(d["Yield"]), d["Batch"][:3]
    (30, ['A', 'A', 'A'])
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from importlib import resources

import torch

__all__ = ["load", "load_frame", "references", "statsmodels_references", "available"]

_DATA = resources.files(__package__) / "data"


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    names = [p.name[:-4] for p in _DATA.iterdir() if p.name.endswith(".csv")]
    names += [
        f"statsmodels_lme/{p.name[:-4]}" for p in (_DATA / "statsmodels_lme").iterdir() if p.name.endswith(".csv")
    ]
    return sorted(names)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load(name: str, categorical: tuple[str, ...] = ()) -> dict[str, torch.Tensor | list[str]]:
    """Load a dataset as ``{column: values}``: numeric columns as float64 tensors, other columns
    (and those named in ``categorical``) as lists of strings. R's ``rownames`` column is dropped;
    ``NA`` becomes NaN in numeric columns."""
    path = _DATA / f"{name}.csv"
    if not path.is_file():
        raise ValueError(f"unknown dataset {name!r}; available: {available()}")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    header = ["rownames" if h == "" else h for h in header]
    if body and len(body[0]) == len(header) + 1:  # R's write.csv without a rownames header
        header = ["rownames", *header]
    columns: dict[str, torch.Tensor | list[str]] = {}
    for j, column in enumerate(header):
        if column == "rownames":
            continue
        values = [row[j] for row in body]
        numbers = [_number(v) if v != "NA" else float("nan") for v in values]
        if column in categorical or any(x is None for x in numbers):
            columns[column] = values
        else:
            columns[column] = torch.tensor(numbers, dtype=torch.float64)
    return columns


def load_frame(name: str):
    """Load a dataset as a pandas DataFrame (R's ``rownames`` column dropped), the form
    :func:`reml_fn.lmer` takes.

    Example:
        >>> from reml_fn import datasets
        >>> datasets.load_frame("sleepstudy").columns.tolist()
        ['Reaction', 'Days', 'Subject']
    """
    import pandas as pd

    path = _DATA / f"{name}.csv"
    if not path.is_file():
        raise ValueError(f"unknown dataset {name!r}; available: {available()}")
    with path.open(newline="") as handle:
        frame = pd.read_csv(handle)
    return frame.drop(columns=[c for c in frame.columns if c in ("rownames", "Unnamed: 0")])


@lru_cache(maxsize=1)
def _references() -> dict:
    return json.loads((_DATA / "references.json").read_text())


def references(name: str) -> dict:
    """Published results for a dataset (the ``references.json`` block), e.g. ``["REML"]``."""
    refs = _references()
    if name not in refs:
        raise ValueError(f"no references for {name!r}; available: {sorted(k for k in refs if not k.startswith('_'))}")
    return refs[name]


@lru_cache(maxsize=1)
def statsmodels_references() -> dict:
    """lme4 results for statsmodels' lme00–lme11 (``{"lme06": {"reml_drf": {...}, ...}}``)."""
    return json.loads((_DATA / "statsmodels_lme" / "lme_r_results.json").read_text())
