"""From an lme4 formula and a DataFrame to the model reml_fn fits: structure, y, X and names.

``lmer_model(formula, data)`` builds an :class:`LmerModel`; ``lmer(formula, data)`` builds and
fits it. The fixed part and every random term's covariates are model matrices made by formulaic
(treatment contrasts by default, R's rules for full rank); each random term ``(expr | g)`` becomes
``Grouped(codes of g, cov, covariates=model matrix of expr)`` with ``cov`` ``Scalar(1)`` for one
column and ``Unstructured(k)`` otherwise; the residual is ``Scalar(n)``:

    V = Σ_t Z_t (I_{m_t} ⊗ Σ_t) Z_tᵀ + σ² I.

Terms are ordered as lme4 orders them (more levels first; ties keep the formula's order) and
named by their grouping factor, repeated names getting ``.1``, ``.2`` (lme4's VarCorr names).

Example:
    >>> import reml_fn as rf
    >>> data = rf.datasets.load_frame("sleepstudy")
    >>> model = rf.lmer_model("Reaction ~ Days + (Days | Subject)", data)
    >>> model.x_names, [term.name for term in model.terms], model.nobs
    (['(Intercept)', 'Days'], ['Subject'], 180)
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from formulaic import Formula, model_matrix
from formulaic.errors import FormulaicError
from torch import Tensor

from reml_fn.combinators import Grouped, Sum
from reml_fn.frontend.data import as_frame, factor_codes, level_label
from reml_fn.frontend.formula import ParsedFormula, formula_terms, parse_formula, plain_message
from reml_fn.frontend.residuals import Correlation, VarIdent, residual_structure, variance_functions
from reml_fn.reml.engines import select_engine
from reml_fn.structures import Scalar, Unstructured

__all__ = ["LmerModel", "TermInfo", "lmer_model", "lmer", "gls", "CONTEXT"]

# Names a formula may call besides the columns: numpy as np, and R's spellings of common transforms.
CONTEXT = {
    "np": np,
    "numpy": np,
    "log": np.log,
    "log2": np.log2,
    "log10": np.log10,
    "log1p": np.log1p,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "abs": np.abs,
}

# Above this many rows a model that only the dense engine can fit gets a warning (n × n matrices).
DENSE_WARNING_ROWS = 5000

_CONTRASTS = {"treatment": "contr.treatment", "sum": "contr.sum", "helmert": "contr.helmert", "poly": "contr.poly"}
_NA_ACTIONS = ("omit", "raise")
_ENCODED = re.compile(r"^(?P<variable>.+)\[(?:(?P<kind>[TSHP])\.)?(?P<level>.*)\]$")


@dataclass(frozen=True)
class TermInfo:
    """What a fitted model needs to know about one random term: its ``name`` in the structure
    (lme4's VarCorr name), grouping ``group`` and its ``factors``, covariate ``columns``, the level
    labels in code order, and the formulaic spec of its covariates (None for a plain intercept)."""

    name: str
    group: str
    factors: tuple[str, ...]
    columns: tuple[str, ...]
    levels: tuple[str, ...]
    spec: Any
    text: str
    expression: str

    @property
    def k(self) -> int:
        return len(self.columns)


@dataclass(frozen=True)
class LmerModel:
    """An unfitted linear mixed model built from a formula: fit it with :meth:`fit` (or take its
    ``structure``, ``y``, ``X`` to :func:`reml_fn.fit` / :func:`reml_fn.fit_batched`).

    Fields: ``formula``; ``structure`` (a :class:`~reml_fn.Sum` of Grouped terms and ``residual``);
    ``y`` (n,), ``X`` (n, p) float tensors; ``x_names`` (lme4's coefficient names); ``response``;
    ``terms`` (:class:`TermInfo`, structure order); ``fixed_spec`` (formulaic's spec of X, for new
    data); ``index`` (the rows of ``data`` used); ``n_dropped`` (rows omitted for missing values);
    ``contrasts``."""

    formula: str
    structure: Any
    y: Tensor
    X: Tensor
    x_names: list
    response: str
    terms: tuple
    fixed_spec: Any
    index: Any
    n_dropped: int
    contrasts: Mapping | None
    residual_path: tuple = ("residual",)  # where σ² (and any correlation parameters) sit in the tree
    correlation: Any = None
    weights: Any = None

    def residual_subtree(self, tree: Mapping) -> Mapping:
        """The residual's part of a parameter tree (raw or natural): ``sigma^2`` and any correlation
        parameters or variance ratios."""
        for key in self.residual_path:
            tree = tree[key]
        return tree

    @property
    def residual(self):
        """The residual's structure: the ``residual`` child of the Sum, or the whole structure for a
        model without random terms (gls)."""
        structure = self.structure
        for key in self.residual_path:
            structure = structure[key]
        return structure

    @property
    def nobs(self) -> int:
        return int(self.y.shape[0])

    @property
    def ngroups(self) -> dict[str, int]:
        """Levels per grouping factor (lme4's ``ngrps``: one entry per factor, in term order)."""
        out: dict[str, int] = {}
        for term in self.terms:
            out.setdefault(term.group, len(term.levels))
        return out

    def covariances(self, params: Mapping, batched: bool = False) -> dict[str, Tensor]:
        """Σ_t (k × k) of every random term at the raw parameters ``params``, by term name; with
        ``batched``, params of a batch of fits and Σ_t (B, k, k).

        Example:
            >>> import reml_fn as rf
            >>> m = rf.lmer_model("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
            >>> Sigma = m.covariances(rf.init_params(m.structure))["Subject"]
            >>> tuple(Sigma.shape), bool(torch.allclose(Sigma, Sigma.mT))
            ((2, 2), True)
        """
        out = {}
        for term in self.terms:
            cov = self.structure[term.name].children[0]
            build = torch.func.vmap(cov.build) if batched else cov.build
            out[term.name] = build(params[term.name]["cov"]).reshape(*((-1,) if batched else ()), term.k, term.k)
        return out

    def fit(self, REML: bool = True, **fit_options):  # noqa: N803  (lme4's argument name)
        """Fit by REML (or ML with ``REML=False``) with :func:`reml_fn.fit` (``fit_options``:
        ``init``, ``max_iter``, ``tol``, ``engine``, …) and return an
        :class:`~reml_fn.frontend.result.LmerResult`; a fit that does not converge raises nothing
        here: its ``status`` and ``message`` say so."""
        from reml_fn.fit import fit
        from reml_fn.frontend.result import LmerResult

        result = fit(self.structure, self.y, self.X, x_names=list(self.x_names), REML=REML, **fit_options)
        return LmerResult(self, result)


def _group_codes(frame: pd.DataFrame, factors: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Codes (n,) and labels of the interaction of ``factors``: levels ordered with the first factor
    slowest, each factor in its own level order (lme4's ``g1:g2``); only combinations that occur."""
    per_factor = [factor_codes(frame[factor]) for factor in factors]
    if len(factors) == 1:
        codes, levels = per_factor[0]
        return codes, [level_label(level) for level in levels]
    ranks = np.stack([codes for codes, _ in per_factor], axis=1)
    combos, codes = np.unique(ranks, axis=0, return_inverse=True)  # lexicographic: first factor slowest
    labels = [":".join(level_label(per_factor[f][1][r]) for f, r in enumerate(row)) for row in combos.tolist()]
    return codes.reshape(-1), labels


def _rewrite_contrasts(expression: str, contrasts: Mapping[str, str], used: set, where: str) -> str:
    """The right-hand side with each variable of ``contrasts`` wrapped as ``C(variable, contr.kind)``
    (formulaic parses it; the terms are written back in its order)."""
    if not contrasts:
        return expression
    try:
        intercept, _ = formula_terms(expression)
        terms = list(Formula(expression))
    except FormulaicError as error:
        raise ValueError(f"{where}: cannot parse {expression!r}: {plain_message(error)}") from None
    rewritten = []
    for term in terms:
        if str(term) == "1":
            continue
        factors = []
        for factor in term.factors:
            name = factor.expr
            if name in contrasts:
                used.add(name)
                factors.append(f"C({name}, {contrasts[name]})")
            else:
                factors.append(name)
        rewritten.append(":".join(factors))
    return " + ".join(["1" if intercept else "0", *rewritten])


def _contrast_kinds(contrasts: Mapping | None) -> dict[str, str]:
    if contrasts is None:
        return {}
    if not isinstance(contrasts, Mapping):
        raise TypeError(f"contrasts must be a dict such as {{'recipe': 'sum'}}, got {type(contrasts).__name__}")
    out = {}
    for variable, kind in contrasts.items():
        key = kind.removeprefix("contr.") if isinstance(kind, str) else None
        if key not in _CONTRASTS:
            raise ValueError(
                f"contrasts[{variable!r}] = {kind!r}: expected one of 'treatment', 'sum', 'helmert', 'poly' "
                "(or R's 'contr.treatment', 'contr.sum', …)"
            )
        out[variable] = _CONTRASTS[key]
    return out


def _lme4_names(columns: list[str], spec, originals: dict[str, str]) -> list[str]:
    """formulaic's column names in lme4's spelling: ``Intercept`` → ``(Intercept)``, treatment
    dummies ``recipe[T.B]`` → ``recipeB``, sum and Helmert columns ``recipe[S.A]`` → ``recipe1``
    (R numbers them), interactions joined by ``:``; ``originals`` maps a rewritten ``C(x, contr.sum)``
    back to ``x``."""
    state = getattr(spec, "encoder_state", {}) or {}

    def one(piece: str) -> str:
        match = _ENCODED.match(piece)
        if match is None:
            return originals.get(piece, piece)
        variable, kind, level = match.group("variable"), match.group("kind"), match.group("level")
        name = originals.get(variable, variable)
        levels = [level_label(value) for value in (state.get(variable, (None, {}))[1] or {}).get("categories", [])]
        if kind in ("S", "H") and level in levels:
            return f"{name}{levels.index(level) + (1 if kind == 'S' else 0)}"
        if kind == "P":
            return piece
        return f"{name}{level}"

    out = []
    for column in columns:
        column = column.replace(" ** ", "^")  # I(Days ** 2) as R writes it: I(Days^2)
        if column == "Intercept":
            out.append("(Intercept)")
        else:
            out.append(":".join(one(piece) for piece in column.split(":")))
    return out


def _r_powers(expression: str) -> str:
    """R's ``^`` inside ``I(…)`` as Python's ``**`` (``I(Days^2)``), so lme4 formulas run unchanged."""
    out, index = [], 0
    while index < len(expression):
        start = expression.find("I(", index)
        if start < 0 or (start > 0 and (expression[start - 1].isalnum() or expression[start - 1] in "_.")):
            if start < 0:
                out.append(expression[index:])
                break
            out.append(expression[index : start + 2])
            index = start + 2
            continue
        depth, end = 0, start + 1
        for end in range(start + 1, len(expression)):
            depth += {"(": 1, ")": -1}.get(expression[end], 0)
            if depth == 0:
                break
        out.append(expression[index:start] + expression[start : end + 1].replace("^", "**"))
        index = end + 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> Formula:
    # Parsing is a pure function of the text: refits of one formula (a simulation, a bootstrap by
    # hand) parse it once.
    return Formula(text)


def _parse(text: str, wheres: list[str], parts: list[str]) -> Formula:
    """The combined formula, parsed once; a syntax error names the part it is in."""
    try:
        return _parsed(text)
    except FormulaicError:
        for part, where in zip(parts, wheres):
            try:
                Formula(part)
            except FormulaicError as error:
                raise ValueError(f"{where}: cannot parse {part!r}: {plain_message(error)}") from None
        raise


def _matrices(formula: Formula, frame: pd.DataFrame, wheres: list[str]):
    try:
        return model_matrix(formula, frame, ensure_full_rank=True, na_action="raise", context=CONTEXT, output="numpy")
    except Exception as error:  # formulaic's and the transforms' (numpy, pandas) errors name the factor
        raise ValueError(
            f"cannot build the model matrices of {', '.join(wheres)}: {type(error).__name__}: {plain_message(error)}"
        ) from None


def _check_columns(names: set[str], frame: pd.DataFrame, where: str) -> None:
    missing = sorted(name for name in names if name not in frame.columns)
    if missing:
        raise ValueError(
            f"{where}: {'column' if len(missing) == 1 else 'columns'} {', '.join(map(repr, missing))} "
            f"not in data; its columns are {list(frame.columns)}"
        )


def lmer_model(
    formula: str,
    data: Any,
    *,
    na_action: str = "omit",
    contrasts: Mapping[str, str] | None = None,
    correlation: Correlation | None = None,
    weights: VarIdent | None = None,
    dtype: torch.dtype = torch.float64,
) -> LmerModel:
    """The model of an lme4 formula on ``data`` (see the module docstring), unfitted.

    Args:
        formula: ``"response ~ fixed + (expr | group) + …"`` in lme4's language; the fixed part and
            ``expr`` in formulaic's Wilkinson syntax (``a*b``, ``a:b``, ``0 +``, ``- 1``,
            ``np.log(x)``, ``C(x)``, ``I(x^2)``).
        data: a pandas DataFrame (a polars frame or a dict of columns is converted).
        na_action: ``"omit"`` drops rows with a missing value in any column the model uses (the
            count is ``n_dropped``); ``"raise"`` raises naming the columns.
        contrasts: ``{"column": "sum" | "helmert" | "treatment" | "poly"}`` (default treatment).
        correlation, weights: a residual correlation within groups (``rf.cor_ar1``, ``rf.cor_car1``,
            ``rf.cor_cs``, ``rf.cor_exp``, ``rf.cor_gaus``) and a variance function (``rf.var_ident``),
            nlme's arguments (:mod:`reml_fn.frontend.residuals`); the residual is then a
            :class:`~reml_fn.structures.within_group.WithinGroup` instead of ``Scalar(n)``.
        dtype: of y, X and the covariates (float64, lme4's precision, by default).
    """
    return _model(formula, data, na_action, contrasts, correlation, weights, dtype, random_required=True)


def _model(formula, data, na_action, contrasts, correlation, weights, dtype, random_required: bool) -> LmerModel:
    frame = as_frame(data)
    if correlation is not None and not isinstance(correlation, Correlation):
        raise TypeError(f"correlation must come from rf.cor_ar1, rf.cor_car1, … , got {type(correlation).__name__}")
    weight_specs = [w for w in variance_functions(weights) if w is not None] if weights is not None else []
    if na_action not in _NA_ACTIONS:
        raise ValueError(f"na_action must be 'omit' or 'raise', got {na_action!r}")
    parsed: ParsedFormula = parse_formula(formula)
    if random_required and not parsed.random:
        raise ValueError(f"formula {formula!r} has no random-effects term such as (1 | group); lmer needs at least one")
    if not random_required and parsed.random:
        raise ValueError(f"formula {formula!r} has random-effects terms: fit it with rf.lmer (rf.gls has none)")
    kinds = _contrast_kinds(contrasts)
    response = _r_powers(parsed.response)
    # One formulaic formula for every model matrix, parsed once: response ~ fixed | expr_1 | …
    # (the random terms with covariates besides an intercept), contrasts written in as C(x, contr.…).
    expressions = [_r_powers(term.expression) for term in parsed.random]
    plain = [expression.strip() == "1" for expression in expressions]
    parts = [_r_powers(parsed.fixed)] + [e for e, is_plain in zip(expressions, plain) if not is_plain]
    wheres = [f"the fixed effects of {formula!r}"] + [
        f"the random term {term.text}" for term, is_plain in zip(parsed.random, plain) if not is_plain
    ]
    used_contrasts: set = set()
    parts = [_rewrite_contrasts(part, kinds, used_contrasts, where) for part, where in zip(parts, wheres)]
    combined = _parse(
        f"{response} ~ {' | '.join(parts)}", [f"the response {parsed.response!r}", *wheres], [response, *parts]
    )
    right = [combined.rhs] if len(parts) == 1 else list(combined.rhs)

    # Columns each part uses, checked by name before any model matrix is made.
    used: dict[str, None] = {}
    for names, where in zip(
        [combined.lhs.required_variables, *(part.required_variables for part in right)],
        [f"the response {parsed.response!r}", *wheres],
    ):
        names = set(names) - set(CONTEXT)
        _check_columns(names, frame, where)
        used.update(dict.fromkeys(sorted(names)))
    for term in parsed.random:
        for factor in term.factors:
            if factor not in frame.columns:
                raise ValueError(
                    f"the grouping factor {factor!r} of the random term {term.text} is not a column of data; "
                    f"its columns are {list(frame.columns)}"
                )
        used.update(dict.fromkeys(term.factors))
    for spec, what in [(correlation, "correlation"), *((w, "weights") for w in weight_specs)]:
        if spec is not None:
            _check_columns(set(spec.columns), frame, f"the {what} {spec}")
            used.update(dict.fromkeys(spec.columns))
    unknown_contrasts = sorted(set(kinds) - set(used))
    if unknown_contrasts:
        raise ValueError(f"contrasts name {unknown_contrasts}, which the formula does not use; it uses {list(used)}")

    # Missing values: a row missing anything the model uses is dropped (or an error).
    columns = list(used)
    missing = np.stack([frame[column].isna().to_numpy() for column in columns], axis=1)
    dropped_rows = missing.any(axis=1)
    n_dropped = int(dropped_rows.sum())
    if n_dropped:
        if na_action == "raise":
            counts = {name: int(count) for name, count in zip(columns, missing.sum(axis=0)) if count}
            raise ValueError(
                f"missing values in {counts} (rows with any: {n_dropped}); use na_action='omit' to drop them"
            )
        frame = frame.loc[~dropped_rows]
    n = len(frame)
    if n == 0:
        raise ValueError("no rows left after dropping the rows with missing values")

    originals = {f"C({variable}, {kind})": variable for variable, kind in kinds.items()}
    matrices = _matrices(combined, frame, wheres)
    lhs = matrices.lhs
    blocks = [matrices.rhs] if len(parts) == 1 else list(matrices.rhs)
    if lhs.shape[1] != 1:
        raise ValueError(
            f"the response {parsed.response!r} must be one numeric column, got {lhs.shape[1]} columns "
            f"{list(lhs.model_spec.column_names)} (a categorical response?)"
        )
    y = torch.tensor(np.asarray(lhs, dtype=float)[:, 0], dtype=dtype)
    X = torch.tensor(np.asarray(blocks[0], dtype=float), dtype=dtype).reshape(n, -1)
    fixed_spec = blocks[0].model_spec
    x_names = _lme4_names(list(fixed_spec.column_names), fixed_spec, originals)

    built, next_block = [], iter(blocks[1:])
    for term, expression, is_plain in zip(parsed.random, expressions, plain):
        where = f"the random term {term.text}"
        if is_plain:
            Z, names, spec = torch.ones(n, 1, dtype=dtype), ["(Intercept)"], None
        else:
            matrix = next(next_block)
            if matrix.shape[1] == 0:
                raise ValueError(f"{where}: the covariates {term.expression!r} give no column")
            spec = matrix.model_spec
            Z = torch.tensor(np.asarray(matrix, dtype=float), dtype=dtype).reshape(n, -1)
            names = _lme4_names(list(spec.column_names), spec, originals)
        codes, levels = _group_codes(frame, term.factors)
        m = len(levels)
        if m < 2:
            raise ValueError(
                f"the grouping factor {term.group!r} of the random term {term.text} has {m} level "
                f"({levels[0] if levels else 'none'}); a random effect needs at least 2"
            )
        if m >= n:
            raise ValueError(
                f"the grouping factor {term.group!r} of {term.text} has as many levels ({m}) as there are "
                f"observations ({n}): its effects cannot be told from the residual (lme4 refuses this too)"
            )
        built.append((term, expression, spec, Z, names, torch.tensor(codes), levels))

    # lme4's order: more levels first, ties in the formula's order; VarCorr names, repeats suffixed.
    order = sorted(range(len(built)), key=lambda i: -len(built[i][6]))
    children, terms, taken = {}, [], {"residual"}
    for i in order:
        term, expression, spec, Z, names, codes, levels = built[i]
        name, repeat = term.group, 0
        while name in taken:
            repeat += 1
            name = f"{term.group}.{repeat}"
        taken.add(name)
        cov = Scalar(1) if Z.shape[1] == 1 else Unstructured(Z.shape[1])
        children[name] = Grouped(codes, cov, covariates=Z, num_groups=len(levels))
        terms.append(TermInfo(name, term.group, term.factors, tuple(names), tuple(levels), spec, term.text, expression))
    custom = correlation is not None or weights is not None
    # A variance function alone has no groups of its own: take the random term with the most levels'
    # (the blocks engine then factorises by its groups), or every row alone (gls).
    blocks = next(iter(children.values())).codes if children else torch.arange(n)
    residual = residual_structure(frame, correlation, weights, dtype, blocks) if custom else Scalar(n)
    structure = Sum(**children, residual=residual) if children else residual
    if custom and n > DENSE_WARNING_ROWS and select_engine(structure).name == "dense":
        warnings.warn(
            f"the random terms of {formula!r} are not nested in the groups of the residual's correlation, and "
            f"those that cross them have more columns than the mixed-model equations take (n/2), so this model "
            f"runs on the dense engine: n × n matrices for n = {n} (about {8 * n * n / 1e9:.1f} GB each)",
            stacklevel=3,
        )
    return LmerModel(
        formula=formula,
        structure=structure,
        y=y,
        X=X,
        x_names=x_names,
        response=parsed.response,
        terms=tuple(terms),
        fixed_spec=fixed_spec,
        index=frame.index,
        n_dropped=n_dropped,
        contrasts=dict(kinds) or None,
        residual_path=("residual",) if children else (),
        correlation=correlation,
        weights=weights,
    )


def lmer(
    formula: str,
    data: Any,
    *,
    REML: bool = True,  # noqa: N803  (lme4's argument name)
    na_action: str = "omit",
    contrasts: Mapping[str, str] | None = None,
    correlation: Correlation | None = None,
    weights: VarIdent | None = None,
    **fit_options: Any,
):
    """Fit a linear mixed model given in lme4's formula language, as lme4's ``lmer`` does.

    ``rf.lmer("Reaction ~ Days + (Days | Subject)", data)`` is ``lmer_model(…).fit(…)``: REML (or
    ML with ``REML=False``) by AI-REML (:func:`reml_fn.fit`, whose options ``fit_options`` passes on). Returns an
    :class:`~reml_fn.frontend.result.LmerResult` with lme4's accessors (``fixef()``, ``varcorr()``,
    ``ranef()``, ``coef()``, ``predict()``, ``summary()``, …).

    Example:
        >>> import reml_fn as rf
        >>> m = rf.lmer("Reaction ~ Days + (Days | Subject)", rf.datasets.load_frame("sleepstudy"))
        >>> round(m.reml_criterion, 4), m.fixef().round(3).to_dict()
        (1743.6283, {'(Intercept)': 251.405, 'Days': 10.467})
    """
    model = lmer_model(
        formula, data, na_action=na_action, contrasts=contrasts, correlation=correlation, weights=weights
    )
    return model.fit(REML=REML, **fit_options)


def gls(
    formula: str,
    data: Any,
    *,
    correlation: Correlation | None = None,
    weights: VarIdent | None = None,
    REML: bool = True,  # noqa: N803  (nlme's method = "REML")
    na_action: str = "omit",
    contrasts: Mapping[str, str] | None = None,
    **fit_options: Any,
):
    """Generalised least squares with correlated and/or heteroscedastic residuals and no random
    effects (nlme's ``gls``): V = σ² W ∘ C (:class:`~reml_fn.structures.within_group.WithinGroup`),
    fitted by REML (or ML) with the same optimizer.

    Example:
        >>> import reml_fn as rf
        >>> m = rf.gls("distance ~ age", rf.datasets.load_frame("Orthodont"), correlation=rf.cor_cs(group="Subject"))
        >>> round(m.loglik, 4)                                    # nlme: -223.5013
        -223.5013
    """
    model = _model(formula, data, na_action, contrasts, correlation, weights, torch.float64, random_required=False)
    return model.fit(REML=REML, **fit_options)
