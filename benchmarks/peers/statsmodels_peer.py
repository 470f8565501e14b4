"""statsmodels peer: ``MixedLM.from_formula(...).fit(reml=True)`` on a benchmark case.

Usage::

    python benchmarks/peers/statsmodels_peer.py CASE CSV REPEATS [--slope=x1] \
        [--responses=FILE --logliks-out=FILE] [--budget=SECONDS]

Single-response cases time ``MixedLM.from_formula("y ~ x1 + …", groups=g, re_formula="1" | "~x1")``
plus ``.fit(reml=True)`` (statsmodels' default optimisers), median of REPEATS after one warm-up.
The batch case (B1) times the fastest loop statsmodels offers: the array constructor
``MixedLM(y_b, X, groups, exog_re=Z).fit(reml=True)`` per response (no formula parsing in the loop).
Prints one JSON line: time, REML logLik (``llf``, constants included, comparable with lme4), β,
variance components, convergence and peak RSS during the fits.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import peer_io
import statsmodels
from statsmodels.regression.mixed_linear_model import MixedLM, MixedLMResults


def fit_formula(frame: pd.DataFrame, covariates: list[str], slope: str | None) -> MixedLMResults:
    """Fit ``y ~ x1 + … + (1 | g)`` (or ``(slope | g)``) by REML from the formula interface."""
    formula = "y ~ " + (" + ".join(covariates) if covariates else "1")
    re_formula = f"~{slope}" if slope else "1"
    model = MixedLM.from_formula(formula, frame, groups=frame["g"], re_formula=re_formula)
    return model.fit(reml=True)


def summarise(result: MixedLMResults, covariates: list[str], slope: str | None, caught: list[Any]) -> dict[str, Any]:
    """REML logLik, β, variance components (lme4's naming) and convergence of one fit."""
    beta_names = ["(Intercept)"] + covariates
    cov_re = np.asarray(result.cov_re, dtype=np.float64)
    varcomp = {"g:(Intercept)": float(cov_re[0, 0])}
    if slope:
        varcomp[f"g:{slope}"] = float(cov_re[1, 1])
        varcomp[f"g:(Intercept),{slope}"] = float(cov_re[0, 1])
    varcomp["Residual"] = float(result.scale)
    return {
        "loglik": float(result.llf),
        "beta": dict(zip(beta_names, np.asarray(result.fe_params, dtype=np.float64).tolist(), strict=True)),
        "varcomp": varcomp,
        "converged": bool(result.converged),
        "method": getattr(result, "method", None),
        "messages": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    }


def main() -> None:
    """Run the peer on one case and print its JSON line."""
    args = peer_io.parse_peer_args(__doc__.splitlines()[0])
    frame, covariates = peer_io.read_case_csv(args.csv)
    out: dict[str, Any] = {
        "peer": "statsmodels",
        "case": args.case,
        "n": len(frame),
        "q": int(frame["g"].nunique()),
        "versions": {"statsmodels": statsmodels.__version__, "numpy": np.__version__, "pandas": pd.__version__},
    }
    out["rss_before_fit_mb"] = peer_io.proc_status_mb("VmRSS")
    peer_io.reset_peak_rss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.responses is None:
            timing, result = peer_io.time_repeats(
                lambda: fit_formula(frame, covariates, args.slope), args.repeats, args.budget
            )
            out |= timing | summarise(result, covariates, args.slope, caught)
        else:
            responses = peer_io.read_responses(args.responses)
            exog = np.column_stack([np.ones(len(frame))] + [frame[c].to_numpy(np.float64) for c in covariates])
            exog_re = np.ones((len(frame), 1))
            if args.slope:
                exog_re = np.column_stack([exog_re, frame[args.slope].to_numpy(np.float64)])
            groups = frame["g"].to_numpy()
            n_nonconverged = 0

            def fit_one(b: int) -> float:
                nonlocal n_nonconverged
                fitted = MixedLM(responses[b], exog, groups, exog_re=exog_re).fit(reml=True)
                n_nonconverged += not fitted.converged
                return float(fitted.llf)

            batch = peer_io.time_batch(fit_one, responses.shape[0], args.budget)
            out |= peer_io.finish_batch(batch, args.logliks_out)
            out["loop"] = "MixedLM(y_b, X, groups, exog_re=Z).fit(reml=True) per response"
            out["n_not_converged"] = n_nonconverged
            out["n_warnings"] = len(caught)
            out["messages"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:10]
    out["peak_rss_mb"] = peer_io.proc_status_mb("VmHWM")
    peer_io.emit(out)


if __name__ == "__main__":
    main()
