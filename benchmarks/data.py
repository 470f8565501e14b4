"""Deterministic benchmark datasets (numpy, fixed seeds).

Every case is a linear mixed model with one grouping factor::

    y = X β + Z b + e,   b_g ~ N(0, G) per group,   e ~ N(0, σ² I)

stored in a tidy :class:`pandas.DataFrame` with the columns ``y, x1 … xk, g`` (``g`` is a string
label, zero-padded so that lexicographic and numeric order agree). X is ``[1, x1 … xk]``. The random
effects are a random intercept per ``g``, plus a random slope on ``Case.slope`` when it is set.

Cases (``make_case(name)``):

========  ==========================================================================================
S1        sleepstudy, ``Reaction ~ Days + (Days | Subject)``: y = Reaction, x1 = Days, g = Subject
M1        n = 3,000, 100 groups, random intercept, X = [1, x1, x2], group sd 1.0, residual sd 0.7
L1        n = 100,000, 1,000 groups, random intercept, X = [1, x1, x2, x3], same sds
B1        sleepstudy's design with 1,000 simulated responses (``Case.responses``, shape (1000, 180))
          from lme4's published REML estimates; ``Case.data.y`` holds the first of them
SC_n{n}_q{q}  scaling: random intercept, X = [1, x1, x2], n/q observations per group
========  ==========================================================================================

Run ``python benchmarks/data.py --write DIR`` to write every case as CSV (what the R peer reads).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

DATA_DIR = Path(__file__).resolve().parent / "data"
SLEEPSTUDY_CSV = DATA_DIR / "sleepstudy.csv"

GROUP_SD = 1.0
RESIDUAL_SD = 0.7
SIM_BETA = (1.0, 0.5, -0.3, 0.2)

# lme4's REML fit of Reaction ~ Days + (Days | Subject) (Bates et al., JSS; lme4 vignette),
# used as the true parameters of the B1 simulation.
SLEEPSTUDY_G = ((612.09, 9.60), (9.60, 35.07))
SLEEPSTUDY_RESIDUAL_VAR = 654.94
SLEEPSTUDY_BETA = (251.4, 10.47)
B1_N_RESPONSES = 1000

SEEDS = {"M1": 20_240_301, "L1": 20_240_302, "B1": 20_240_303}
SCALING_SEED = 20_240_304

SCALING_N = (1_000, 3_000, 10_000, 30_000, 100_000)
SCALING_Q_AT_N10K = (10, 100, 1_000)


def _scaling_sizes() -> list[tuple[int, int]]:
    """(n, q) pairs of the scaling study: q = n/100 for each n, then q ∈ {10, 100, 1000} at n = 10,000."""
    sizes = [(n, n // 100) for n in SCALING_N]
    sizes += [(10_000, q) for q in SCALING_Q_AT_N10K if (10_000, q) not in sizes]
    return sizes


SCALING_CASES = tuple(f"SC_n{n}_q{q}" for n, q in _scaling_sizes())
MAIN_CASES = ("S1", "M1", "L1", "B1")
CASE_NAMES = MAIN_CASES + SCALING_CASES


@dataclass(frozen=True, eq=False)
class Case:
    """One benchmark dataset and its model.

    Attributes:
        name: case name (``S1``, ``M1``, ``L1``, ``B1`` or ``SC_n{n}_q{q}``).
        description: one line for tables and logs.
        data: DataFrame with columns ``y, x1 … xk, g``.
        covariates: the covariate columns ``x1 … xk``; the intercept is implicit.
        slope: covariate that also gets a random slope per group, or None (random intercept only).
        responses: (B, n) array of extra responses for batch cases (B1), else None.
        seed: the numpy seed that generated the data (None for real data).
    """

    name: str
    description: str
    data: pd.DataFrame
    covariates: tuple[str, ...]
    slope: str | None = None
    responses: np.ndarray | None = field(default=None, repr=False)
    seed: int | None = None

    @property
    def n(self) -> int:
        """Number of observations."""
        return len(self.data)

    @property
    def q(self) -> int:
        """Number of groups."""
        return int(self.data["g"].nunique())

    @property
    def p(self) -> int:
        """Number of fixed effects (intercept included)."""
        return 1 + len(self.covariates)

    @property
    def is_batch(self) -> bool:
        """True when the case fits many responses on one design (B1)."""
        return self.responses is not None

    @property
    def lme4_formula(self) -> str:
        """The model as an lme4 formula, e.g. ``y ~ x1 + (x1 | g)``."""
        fixed = " + ".join(self.covariates) if self.covariates else "1"
        return f"y ~ {fixed} + ({self.slope or 1} | g)"

    def design(self) -> np.ndarray:
        """Fixed-effect design X = [1, x1 … xk], shape (n, p), float64."""
        columns = [np.ones(self.n)] + [self.data[c].to_numpy(dtype=np.float64) for c in self.covariates]
        return np.column_stack(columns)

    def spec(self) -> dict:
        """JSON-serialisable model description that the peer scripts read next to the CSV."""
        return {
            "name": self.name,
            "description": self.description,
            "n": self.n,
            "q": self.q,
            "p": self.p,
            "covariates": list(self.covariates),
            "slope": self.slope,
            "lme4_formula": self.lme4_formula,
            "n_responses": None if self.responses is None else int(self.responses.shape[0]),
            "seed": self.seed,
        }


def _group_labels(q: int, per_group: int) -> np.ndarray:
    """Balanced, contiguous labels ``g000 … g{q-1}`` (zero-padded), each repeated ``per_group`` times."""
    width = len(str(q - 1))
    return np.repeat(np.array([f"g{i:0{width}d}" for i in range(q)]), per_group)


def random_intercept_data(
    n: int,
    q: int,
    n_covariates: int,
    seed: int,
    group_sd: float = GROUP_SD,
    residual_sd: float = RESIDUAL_SD,
) -> pd.DataFrame:
    """Simulate ``y = 1 + Σ β_j x_j + b_g + e`` with x_j ~ N(0, 1), b_g ~ N(0, group_sd²), e ~ N(0, residual_sd²).

    Groups are balanced (n/q observations each, contiguous rows); β = (1.0, 0.5, −0.3, 0.2)[: 1 + n_covariates].

    Args:
        n: number of observations; must be a multiple of q.
        q: number of groups.
        n_covariates: number of covariates k (≤ 3).
        seed: seed of ``numpy.random.default_rng``.
        group_sd: standard deviation of the random intercepts.
        residual_sd: residual standard deviation.

    Returns:
        DataFrame with columns ``y, x1 … xk, g``.

    Example:
        >>> df = random_intercept_data(200, 10, 2, seed=1)
        >>> list(df.columns), len(df), df["g"].nunique()
        (['y', 'x1', 'x2', 'g'], 200, 10)
    """
    if n % q:
        raise ValueError(f"n={n} must be a multiple of q={q}")
    if n_covariates > len(SIM_BETA) - 1:
        raise ValueError(f"at most {len(SIM_BETA) - 1} covariates")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_covariates))
    b = group_sd * rng.standard_normal(q)
    e = residual_sd * rng.standard_normal(n)
    beta = np.asarray(SIM_BETA[: 1 + n_covariates])
    y = beta[0] + x @ beta[1:] + np.repeat(b, n // q) + e
    columns = {"y": y} | {f"x{j + 1}": x[:, j] for j in range(n_covariates)}
    return pd.DataFrame(columns | {"g": _group_labels(q, n // q)})


def sleepstudy() -> pd.DataFrame:
    """lme4's sleepstudy (180 rows) as ``y = Reaction, x1 = Days, g = Subject`` (Subject as string)."""
    raw = pd.read_csv(SLEEPSTUDY_CSV)
    return pd.DataFrame(
        {"y": raw["Reaction"].astype(np.float64), "x1": raw["Days"].astype(np.float64), "g": raw["Subject"].astype(str)}
    )


def sleepstudy_responses(n_responses: int = B1_N_RESPONSES, seed: int = SEEDS["B1"]) -> np.ndarray:
    """Simulate responses on sleepstudy's design from lme4's REML estimates.

    y = X β + Z b + e with X = [1, Days], per-subject (b0, b1) ~ N(0, G), G = [[612.09, 9.60], [9.60, 35.07]],
    e ~ N(0, 654.94 I), β = (251.4, 10.47). Subjects follow sleepstudy's row order.

    Returns:
        float64 array of shape (n_responses, 180).

    Example:
        >>> sleepstudy_responses(3).shape
        (3, 180)
    """
    base = sleepstudy()
    days = base["x1"].to_numpy()
    subject_codes, _ = pd.factorize(base["g"], sort=True)
    n_subjects = int(subject_codes.max()) + 1
    rng = np.random.default_rng(seed)
    chol_g = np.linalg.cholesky(np.asarray(SLEEPSTUDY_G))
    b = rng.standard_normal((n_responses, n_subjects, 2)) @ chol_g.T
    e = np.sqrt(SLEEPSTUDY_RESIDUAL_VAR) * rng.standard_normal((n_responses, len(days)))
    fixed = SLEEPSTUDY_BETA[0] + SLEEPSTUDY_BETA[1] * days
    return fixed + b[:, subject_codes, 0] + b[:, subject_codes, 1] * days + e


@cache
def make_case(name: str) -> Case:
    """Build a case by name (cached; the data are deterministic).

    Example:
        >>> make_case("S1").lme4_formula
        'y ~ x1 + (x1 | g)'
        >>> make_case("SC_n1000_q10").q
        10
    """
    if name == "S1":
        return Case("S1", "sleepstudy, Reaction ~ Days + (Days | Subject)", sleepstudy(), ("x1",), slope="x1")
    if name == "M1":
        data = random_intercept_data(3_000, 100, 2, SEEDS["M1"])
        return Case("M1", "n=3000, 100 groups, random intercept, 2 covariates", data, ("x1", "x2"), seed=SEEDS["M1"])
    if name == "L1":
        data = random_intercept_data(100_000, 1_000, 3, SEEDS["L1"])
        description = "n=100000, 1000 groups, random intercept, 3 covariates"
        return Case("L1", description, data, ("x1", "x2", "x3"), seed=SEEDS["L1"])
    if name == "B1":
        responses = sleepstudy_responses()
        data = sleepstudy().assign(y=responses[0])
        description = f"{B1_N_RESPONSES} simulated responses on sleepstudy's design, (Days | Subject)"
        return Case("B1", description, data, ("x1",), slope="x1", responses=responses, seed=SEEDS["B1"])
    if name in SCALING_CASES:
        n, q = (int(part[1:]) for part in name.split("_")[1:])
        data = random_intercept_data(n, q, 2, SCALING_SEED)
        description = f"scaling: n={n}, {q} groups, random intercept, 2 covariates"
        return Case(name, description, data, ("x1", "x2"), seed=SCALING_SEED)
    raise KeyError(f"unknown case {name!r}; known: {', '.join(CASE_NAMES)}")


def write_case(case: Case, directory: str | Path) -> dict[str, str]:
    """Write ``{name}.csv`` (and ``{name}_responses.csv``, ``{name}.json``) into ``directory``.

    The responses CSV has no header: one response per row, shape (B, n). Floats are written with 17
    significant digits so that every peer reads bit-identical data.

    Returns:
        ``{"csv": ..., "spec": ..., "responses": ...}`` (``responses`` only for batch cases).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / f"{case.name}.csv", "spec": directory / f"{case.name}.json"}
    case.data.to_csv(paths["csv"], index=False, float_format="%.17g")
    paths["spec"].write_text(json.dumps(case.spec(), indent=1))
    if case.responses is not None:
        paths["responses"] = directory / f"{case.name}_responses.csv"
        np.savetxt(paths["responses"], case.responses, delimiter=",", fmt="%.17g")
    return {key: str(path) for key, path in paths.items()}


def main() -> None:
    """Command line: ``python benchmarks/data.py --write DIR [--cases S1,M1]`` writes the CSVs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="DIR", required=True, help="directory for the CSV files")
    parser.add_argument("--cases", default=",".join(CASE_NAMES), help="comma-separated case names")
    args = parser.parse_args()
    for name in args.cases.split(","):
        case = make_case(name)
        paths = write_case(case, args.write)
        print(f"{name:14s} n={case.n:7d} q={case.q:5d} p={case.p}  {paths['csv']}")


if __name__ == "__main__":
    main()
