"""lme4 formulas split into their fixed part (for formulaic) and their random-effects terms.

``response ~ fixed + (expr | group) + (expr || group) + …``: every parenthesised group with a
bar ``|`` at its top level that is not a function call's argument list is a random-effects term;
what remains is the fixed part, parsed by formulaic (the Wilkinson-formula library) like the
left-hand side and every ``expr``. The grouping side is a column, an interaction ``g1:g2`` or a
nesting ``g1/g2`` (lme4's ``g1 + g2:g1``, so ``(1 | g1/g2)`` is ``(1 | g1) + (1 | g2:g1)``).
``(expr || group)`` is lme4's uncorrelated form: one term per formula term of ``expr``, the
intercept as ``(1 | group)`` and every other term ``t`` as ``(0 + t | group)``.

Example:
    >>> parsed = parse_formula("Reaction ~ Days + (Days || Subject)")
    >>> parsed.response, parsed.fixed
    ('Reaction', 'Days')
    >>> [(term.expression, term.factors) for term in parsed.random]
    [('1', ('Subject',)), ('0 + Days', ('Subject',))]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from formulaic import Formula
from formulaic.errors import FormulaicError

__all__ = ["RandomTerm", "ParsedFormula", "parse_formula", "formula_terms", "plain_message"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain_message(error: Exception) -> str:
    """An error's message without terminal colour codes (formulaic colours the position it marks)."""
    return _ANSI.sub("", str(error))


_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$|^`[^`]+`$")


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(expression | factors joined by ':')``.

    ``expression``: the covariates, a formula right-hand side (``"1"``, ``"1 + Days"``,
    ``"0 + Machine"``); ``factors``: the grouping columns whose interaction is the grouping factor;
    ``text``: the term as written in the formula (for messages)."""

    expression: str
    factors: tuple[str, ...]
    text: str

    @property
    def group(self) -> str:
        """The grouping factor's name as lme4 writes it (``"Subject"``, ``"Machine:Worker"``)."""
        return ":".join(self.factors)


@dataclass(frozen=True)
class ParsedFormula:
    """A formula's response (left-hand side), fixed part and random terms."""

    text: str
    response: str
    fixed: str
    random: tuple[RandomTerm, ...]


def _error(formula: str, position: int, message: str) -> ValueError:
    pointer = " " * position + "^"
    return ValueError(f"formula: {message} at position {position}\n    {formula}\n    {pointer}")


def _matching(text: str, start: int, formula: str, offset: int) -> int:
    """Index of the ')' closing the '(' at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    raise _error(formula, offset + start, "unmatched '('")


def _top_level_bar(inner: str) -> tuple[int, int] | None:
    """(position, width) of the first '|' or '||' outside nested parentheses."""
    depth = 0
    for index, char in enumerate(inner):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return index, 2 if inner[index + 1 : index + 2] == "|" else 1
    return None


def formula_terms(expression: str) -> tuple[bool, list[str]]:
    """Whether a right-hand side has an intercept, and its other terms as formulaic writes them
    (in formulaic's order: by degree, as R orders them).

    Example:
        >>> formula_terms("0 + a*b")
        (False, ['a', 'b', 'a:b'])
    """
    terms = list(Formula(expression))
    names = [str(term) for term in terms]
    return "1" in names, [name for name in names if name != "1"]


def _grouping(text: str, group: str, formula: str, position: int) -> list[tuple[str, ...]]:
    """The grouping factors of one bar term: ``g``, ``g1:g2`` or ``g1/g2/…`` (nesting)."""
    nested = [part.strip() for part in group.split("/")]
    levels = []
    for part in nested:
        factors = tuple(factor.strip().strip("`") for factor in part.split(":"))
        for factor in factors:
            if not factor or not _NAME.match(factor) and not factor.isidentifier():
                raise _error(
                    formula,
                    position,
                    f"the grouping side of {text} must be a column name, an interaction g1:g2 or a nesting "
                    f"g1/g2, got {group.strip()!r}",
                )
        levels.append(factors)
    # g1/g2/g3 is g1 + g2:g1 + g3:g2:g1 (lme4 writes the inner factor first).
    out = []
    for depth in range(1, len(levels) + 1):
        out.append(tuple(factor for part in reversed(levels[:depth]) for factor in part))
    return out


def parse_formula(formula: str) -> ParsedFormula:
    """Split an lme4 formula (see the module docstring); errors point at the position at fault."""
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a str such as 'y ~ x + (1 | g)', got {type(formula).__name__}")
    if formula.count("~") != 1:
        raise _error(formula, max(formula.find("~"), 0), "expected exactly one '~' between the response and the terms")
    tilde = formula.index("~")
    response, rhs = formula[:tilde].strip(), formula[tilde + 1 :]
    if not response:
        raise _error(formula, 0, "the response (left of '~') is missing")
    offset = tilde + 1
    random: list[RandomTerm] = []
    kept, index = [], 0
    while index < len(rhs):
        char = rhs[index]
        if char == ")":
            raise _error(formula, offset + index, "unmatched ')'")
        if char != "(":
            kept.append(char)
            index += 1
            continue
        end = _matching(rhs, index, formula, offset)
        before = "".join(kept).rstrip()
        is_call = bool(before) and (before[-1].isalnum() or before[-1] in "_.")
        inner = rhs[index + 1 : end]
        bar = None if is_call else _top_level_bar(inner)
        if bar is None:
            kept.append(rhs[index : end + 1])
            index = end + 1
            continue
        position, width = bar
        text = f"({inner.strip()})"
        expression, group = inner[:position].strip(), inner[position + width :].strip()
        if not expression or not group:
            raise _error(
                formula, offset + index, f"{text} needs covariates left of the bar and a grouping factor right of it"
            )
        factor_sets = _grouping(text, group, formula, offset + index)
        if width == 2:  # (expr || g): lme4's expansion, one term per formula term of expr
            try:
                intercept, terms = formula_terms(expression)
            except FormulaicError as error:
                raise ValueError(
                    f"formula: cannot parse the covariates {expression!r} of {text}: {plain_message(error)}"
                ) from None
            pieces = (["1"] if intercept else []) + [f"0 + {term}" for term in terms]
        else:
            pieces = [expression]
        for factors in factor_sets:
            random.extend(RandomTerm(piece, factors, text) for piece in pieces)
        index = end + 1
    fixed = _drop_empty_pluses("".join(kept))
    return ParsedFormula(formula, response, fixed or "1", tuple(random))


def _drop_empty_pluses(text: str) -> str:
    """The fixed part after the bar terms were cut out: no dangling or doubled '+'."""
    parts = [part.strip() for part in _split_top_level_plus(text)]
    return " + ".join(part for part in parts if part)


def _split_top_level_plus(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "+" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts
