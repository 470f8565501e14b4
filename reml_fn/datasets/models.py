"""The reference models of the shipped datasets, ready to fit: ``model(name) -> ReferenceModel``.

Each model is the lme4/nlme specification whose REML results ``references.json`` records:

=====================  ===========================================================
name                   lme4 formula
=====================  ===========================================================
Dyestuff, Dyestuff2    Yield ~ 1 + (1|Batch)
sleepstudy_0           Reaction ~ 1 + (1|Subject)
sleepstudy_1           Reaction ~ Days + (1|Subject)
sleepstudy_2           Reaction ~ Days + (Days|Subject)
sleepstudy_3           Reaction ~ Days + (1|Subject) + (0+Days|Subject)
Orthodont              distance ~ age + (age|Subject)
Oxboys                 height ~ age + (age|Subject)
Rail                   travel ~ 1 + (1|Rail)
dietox_intercept       Weight ~ Time + (1|Pig)
dietox_slope           Weight ~ Time + (Time|Pig)
john_alpha             yield ~ rep + (1|gen) + (1|rep:block)
peer_sim               y ~ x1 + (1|g1) + (1|g2)
lme00 … lme11 (drf)    endog ~ 0 + exog_fe_* + (0 + exog_re_* | groups)
lme06 … lme11 (irf)    … + (0 + exog_re_0 | groups) + (0 + exog_re_1 | groups)
=====================  ===========================================================

A random term ``(x_1 + … + x_k | g)`` is V_g = Z (I_m ⊗ Σ) Zᵀ with Z's columns grouped by level:
:func:`random_term`. Σ is ``Scalar(1)`` for one covariate, ``Unstructured(k)`` for correlated
effects and ``Diagonal(k)`` for independent ones. The residual is ``Scalar(n)``.

Example:
    >>> from reml_fn.datasets.models import model
    >>> m = model("sleepstudy_2")
    >>> m.x_names, tuple(m.X.shape)
    (['(Intercept)', 'Days'], (180, 2))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reml_fn.combinators import Kronecker, Propagate, Sum
from reml_fn.datasets import load
from reml_fn.design import indicator_codes, indicator_matrix, interaction
from reml_fn.structures import Diagonal, Scalar, Unstructured
from reml_fn.structures.base import Structure

__all__ = ["ReferenceModel", "model", "MODELS", "random_term", "grouped_design"]


@dataclass(frozen=True)
class ReferenceModel:
    """A dataset's model: the structure V(θ), the response y, the design X and its column names."""

    name: str
    structure: Structure
    y: Tensor
    X: Tensor
    x_names: list[str]


def grouped_design(codes: Tensor, covariates: Tensor, num_groups: int) -> Tensor:
    """Z (n, m·k) of a random term: Z[i, g_i·k + j] = covariates[i, j], zero elsewhere."""
    n, k = covariates.shape
    Z = covariates.new_zeros(n, num_groups, k)
    Z[torch.arange(n), codes] = covariates
    return Z.reshape(n, num_groups * k)


def random_term(groups, covariates: Tensor | None = None, cov: Structure | None = None) -> Structure:
    """The lme4 term ``(covariates | groups)`` as Propagate(Z, I_m ⊗ cov) (dense Z)."""
    codes, levels = indicator_codes(groups)
    n, m = codes.shape[0], len(levels)
    covariates = torch.ones(n, 1) if covariates is None else covariates.reshape(n, -1)
    k = covariates.shape[1]
    cov = cov if cov is not None else (Scalar(1) if k == 1 else Unstructured(k))
    Z = grouped_design(codes, covariates, m)
    if k == 1 and isinstance(cov, Scalar):
        return Propagate(Z=Z, G=Scalar(m))
    return Propagate(Z=Z, G=Kronecker(groups=torch.eye(m), cov=cov))


def _ones(n: int) -> Tensor:
    return torch.ones(n, 1)


def _dyestuff(name):
    d = load(name)
    y = d["Yield"]
    return ReferenceModel(
        name, Sum(Batch=random_term(d["Batch"]), residual=Scalar(len(y))), y, _ones(len(y)), ["(Intercept)"]
    )


def _sleepstudy(variant: int):
    def build(name):
        d = load("sleepstudy", categorical=("Subject",))
        y, days, n = d["Reaction"], d["Days"], len(d["Reaction"])
        if variant == 0:
            X, x_names = _ones(n), ["(Intercept)"]
        else:
            X, x_names = torch.stack([torch.ones(n), days], 1), ["(Intercept)", "Days"]
        if variant in (0, 1):
            terms = {"Subject": random_term(d["Subject"])}
        elif variant == 2:
            terms = {"Subject": random_term(d["Subject"], torch.stack([torch.ones(n), days], 1))}
        else:
            terms = {"Subject": random_term(d["Subject"]), "Subject.Days": random_term(d["Subject"], days)}
        return ReferenceModel(name, Sum(**terms, residual=Scalar(n)), y, X, x_names)

    return build


def _slope_model(dataset, response, covariate, group):
    def build(name):
        d = load(dataset, categorical=(group,))
        y, x, n = d[response], d[covariate], len(d[response])
        X = torch.stack([torch.ones(n), x], 1)
        term = random_term(d[group], X)
        return ReferenceModel(name, Sum(**{group: term}, residual=Scalar(n)), y, X, ["(Intercept)", covariate])

    return build


def _rail(name):
    d = load("Rail", categorical=("Rail",))
    y = d["travel"]
    return ReferenceModel(
        name, Sum(Rail=random_term(d["Rail"]), residual=Scalar(len(y))), y, _ones(len(y)), ["(Intercept)"]
    )


def _dietox_intercept(name):
    d = load("dietox", categorical=("Pig",))
    y, n = d["Weight"], len(d["Weight"])
    X = torch.stack([torch.ones(n), d["Time"]], 1)
    return ReferenceModel(name, Sum(Pig=random_term(d["Pig"]), residual=Scalar(n)), y, X, ["(Intercept)", "Time"])


def _john_alpha(name):
    d = load("john_alpha")
    y, n = d["yield"], len(d["yield"])
    reps, rep_names = indicator_matrix(d["rep"], drop_first=True)
    X = torch.cat([torch.ones(n, 1), reps], 1)
    terms = {"gen": random_term(d["gen"]), "rep:block": random_term(interaction(d["rep"], d["block"], sep=":"))}
    return ReferenceModel(
        name, Sum(**terms, residual=Scalar(n)), y, X, ["(Intercept)", *[f"rep{r}" for r in rep_names]]
    )


def _peer_sim(name):
    d = load("peer_sim")
    y, n = d["y"], len(d["y"])
    X = torch.stack([torch.ones(n), d["x1"]], 1)
    terms = {"g1": random_term(d["g1"]), "g2": random_term(d["g2"])}
    return ReferenceModel(name, Sum(**terms, residual=Scalar(n)), y, X, ["(Intercept)", "x1"])


def _statsmodels(number: int, independent: bool):
    def build(name):
        d = load(f"statsmodels_lme/lme{number:02d}", categorical=("groups",))
        y, n = d["endog"], len(d["endog"])
        fe = sorted(c for c in d if c.startswith("exog_fe_"))
        re = sorted(c for c in d if c.startswith("exog_re_"))
        X = torch.stack([d[c] for c in fe], 1)
        Zcov = torch.stack([d[c] for c in re], 1)
        if len(re) == 1:
            term = random_term(d["groups"], Zcov, Scalar(1))
        else:
            term = random_term(d["groups"], Zcov, Diagonal(len(re)) if independent else Unstructured(len(re)))
        return ReferenceModel(name, Sum(groups=term, residual=Scalar(n)), y, X, fe)

    return build


MODELS = {
    "Dyestuff": _dyestuff,
    "Dyestuff2": _dyestuff,
    **{f"sleepstudy_{v}": _sleepstudy(v) for v in range(4)},
    "Orthodont": _slope_model("Orthodont", "distance", "age", "Subject"),
    "Oxboys": _slope_model("Oxboys", "height", "age", "Subject"),
    "Rail": _rail,
    "dietox_intercept": _dietox_intercept,
    "dietox_slope": _slope_model("dietox", "Weight", "Time", "Pig"),
    "john_alpha": _john_alpha,
    "peer_sim": _peer_sim,
    **{f"lme{k:02d}": _statsmodels(k, False) for k in range(12)},
    **{f"lme{k:02d}_irf": _statsmodels(k, True) for k in range(6, 12)},
}


def model(name: str) -> ReferenceModel:
    """Build the reference model ``name`` (see the module table)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    builder = MODELS[name]
    return builder(name.split("_")[0] if builder is _dyestuff else name)
