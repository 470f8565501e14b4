"""Engines: how the REML quantities are computed for a given structure.

The user describes V(θ) once; an engine computes the log-likelihood, score and AI matrix, the
GLS estimate β̂ with its covariance, and the BLUPs. Every engine agrees with the dense one to
round-off. :func:`select_engine` picks one from the structure (``engine="auto"``) or by name.

An engine implements ``supports(s) -> bool`` and the methods of :class:`DenseEngine`:
``prepare(s, y, X)`` returns what does not depend on θ (or None), and ``loglik``, ``ai_terms`` and
``gls`` accept it back as ``prepared=`` (the fit loops call ``prepare`` once per dataset).
``ai_terms_and_vcov`` (optional) returns the AI terms and (XᵀV⁻¹X)⁻¹ from one evaluation; the fit
loops then need no ``gls`` call at the end (:func:`terms_and_vcov` falls back on ``gls``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from reml_fn.reml.dense import (
    AITerms,
    ai_terms_and_factor_dense,
    ai_terms_dense,
    dV_stack,
    factorize,
    inverse_from_cholesky,
    reml_loglik_dense,
)

__all__ = [
    "DenseEngine",
    "ENGINES",
    "register_engine",
    "select_engine",
    "random_terms",
    "propagate_terms",
    "term_effects",
    "term_fitted",
    "prepared_data",
    "prepared_keyword",
    "terms_and_vcov",
]


def random_terms(s, params: Mapping, prefix: str = "") -> Iterator[tuple[str, object, Mapping]]:
    """``(path, term, term_params)`` for every Propagate or Grouped term reachable from ``s``
    through (nested) Sums, in order; ``term_params`` is the term's own parameter sub-tree."""
    from reml_fn.combinators import Grouped, Propagate, Sum

    if isinstance(s, (Propagate, Grouped)):
        yield prefix.rstrip("/"), s, params
    elif isinstance(s, Sum):
        for name, child in s.items():
            yield from random_terms(child, params.get(name, {}), f"{prefix}{name}/")


def propagate_terms(s, params: Mapping, prefix: str = "") -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(path, Z, G)`` for every Propagate or Grouped term reachable from ``s`` through Sums.

    Dense matrices: for a Grouped term Z is its (n, m·k) design and G = I_m ⊗ Σ (for checks; the
    engines use :func:`term_effects` and :func:`term_fitted`, which never form them).
    """
    from reml_fn.combinators import Grouped
    from reml_fn.combinators.products import kron

    for path, term, term_params in random_terms(s, params, prefix):
        if isinstance(term, Grouped):
            sigma = term.cov._build(term_params.get("cov", {}))
            eye = torch.eye(term.num_groups, dtype=sigma.dtype, device=sigma.device)
            yield path, term.design().to(sigma.dtype), kron(eye, sigma)
        else:
            (z_name, g_name), (z, g) = term.names, term.children
            yield path, z._build(term_params.get(z_name, {})), g._build(term_params.get(g_name, {}))


def term_effects(term, term_params: Mapping, Py: Tensor) -> Tensor:
    """The BLUP û = G Zᵀ P y of one random term from P y (n,).

    Shapes: (m, k) for a Grouped term (row g: the effects of group g, lme4's ``ranef`` layout);
    (q,) for a Propagate term.
    """
    from reml_fn.combinators import Grouped

    if isinstance(term, Grouped):
        sigma = term.cov._build(term_params.get("cov", {}))
        return term.sum_by_group(Py) @ sigma.transpose(-1, -2)
    (z_name, g_name), (z, g) = term.names, term.children
    Z, G = z._build(term_params.get(z_name, {})), g._build(term_params.get(g_name, {}))
    return G @ (Z.transpose(-1, -2) @ Py)


def term_fitted(term, term_params: Mapping, effects: Tensor) -> Tensor:
    """Z û (n,) of one random term, with û shaped as :func:`term_effects` returns it."""
    from reml_fn.combinators import Grouped

    if isinstance(term, Grouped):
        return term.expand(effects)
    z_name, z = term.names[0], term.children[0]
    return z._build(term_params.get(z_name, {})) @ effects


class DenseEngine:
    """Cholesky of the full n×n V: O(n³) time, O(k n²) memory; works for every structure."""

    name = "dense"

    def supports(self, s) -> bool:
        return True

    def prepare(self, s, y, X) -> None:
        """Nothing to precompute: V(θ) is rebuilt and factorised at every θ. (Engines may return
        per-dataset data that do not depend on θ; the fit loops pass it back as ``prepared=``.)"""
        return None

    def loglik(self, s, params, y, X, prepared=None) -> Tensor:
        return reml_loglik_dense(s._build(params), y, X)

    def ai_terms(
        self, s, params, y, X, jacobian="closed", trace="exact", generator=None, probes=None, prepared=None
    ) -> AITerms:
        return ai_terms_dense(s._build(params), dV_stack(s, params, jacobian), y, X, trace, generator, probes)

    def ai_terms_and_vcov(self, s, params, y, X, jacobian="closed", prepared=None) -> tuple[AITerms, Tensor]:
        """:meth:`ai_terms` and (XᵀV⁻¹X)⁻¹ from the same factorisation."""
        terms, factor = ai_terms_and_factor_dense(s._build(params), dV_stack(s, params, jacobian), y, X)
        return terms, inverse_from_cholesky(factor.chol_xvx)

    def jacobian_traces(self, s, params, jacobian="closed") -> Tensor:
        """tr(∂V/∂θ_k) for every free parameter, in ``param_names`` order (k,); e.g. for default
        starting values (how much a unit of θ_k adds to the average variance)."""
        return torch.diagonal(dV_stack(s, params, jacobian), dim1=-2, dim2=-1).sum(-1)

    def gls(self, s, params, y, X, prepared=None) -> tuple[Tensor, Tensor]:
        """β̂ and its covariance (XᵀV⁻¹X)⁻¹."""
        factor = factorize(s._build(params), y, X)
        return factor.beta, inverse_from_cholesky(factor.chol_xvx)

    def random_effects(self, s, params, y, X) -> dict[str, Tensor]:
        """û_i = G_i Z_iᵀ P y for every Propagate or Grouped term, keyed by its path
        ((m, k) for a Grouped term, (q,) for a Propagate term)."""
        factor = factorize(s._build(params), y, X)
        Py = torch.linalg.solve_triangular(
            factor.chol_v.transpose(-1, -2), factor.whitened_residual.unsqueeze(-1), upper=True
        ).squeeze(-1)
        return {path: term_effects(term, p, Py) for path, term, p in random_terms(s, params)}

    def fitted_random(self, s, params, y, X) -> Tensor:
        """Σ_i Z_i û_i, the random part of the conditional prediction."""
        effects = self.random_effects(s, params, y, X)
        total = torch.zeros_like(y)
        for path, term, p in random_terms(s, params):
            total = total + term_fitted(term, p, effects[path])
        return total


def prepared_data(engine, s, y: Tensor, X: Tensor):
    """``engine.prepare(s, y, X)``, or None for an engine without ``prepare`` (written against the
    original protocol). Pure and vmappable when the engine's ``prepare`` is."""
    return engine.prepare(s, y, X) if hasattr(engine, "prepare") else None


def prepared_keyword(prepared) -> dict:
    """The keyword that passes prepared data back to an engine call: ``{"prepared": prepared}``, or
    none at all when there is nothing prepared (so engines without ``prepared=`` keep working).

    Example:
        >>> import torch, reml_fn as rf
        >>> from reml_fn.reml.engines import prepared_data, prepared_keyword, select_engine
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2), residual=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5]), torch.ones(6, 1)
        >>> engine = select_engine(s)
        >>> keyword = prepared_keyword(prepared_data(engine, s, y, X))
        >>> sorted(keyword), float(engine.loglik(s, s.init_params(), y, X, **keyword)) == float(rf.reml_loglik(s, None, y, X))
        (['prepared'], True)
        >>> prepared_keyword(None)
        {}
    """
    return {} if prepared is None else {"prepared": prepared}


ENGINES: dict[str, object] = {"dense": DenseEngine()}
# Preference order for engine="auto": specialised engines first, dense last.
_AUTO_ORDER: list[str] = ["dense"]


def register_engine(name: str, engine, prefer: bool = True) -> None:
    """Add an engine; ``prefer`` puts it before the dense engine in automatic selection."""
    ENGINES[name] = engine
    if name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(0 if prefer else len(_AUTO_ORDER), name)


def select_engine(s, engine: str = "auto"):
    """The engine object for ``s``: by name, or the first that supports ``s`` when ``"auto"``."""
    if engine == "auto":
        for name in _AUTO_ORDER:
            if ENGINES[name].supports(s):
                return ENGINES[name]
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected 'auto' or one of {sorted(ENGINES)}")
    chosen = ENGINES[engine]
    if not chosen.supports(s):
        raise ValueError(f"engine {engine!r} cannot handle {type(s).__name__}; use engine='dense' or 'auto'")
    return chosen


def terms_and_vcov(engine, s, params, y: Tensor, X: Tensor, jacobian: str = "closed", prepared=None):
    """``(AITerms, (XᵀV⁻¹X)⁻¹)`` at ``params``: from one evaluation where the engine has
    ``ai_terms_and_vcov``, else from its ``ai_terms`` and ``gls``. Pure and vmappable.

    Example:
        >>> import torch, reml_fn as rf
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(6) % 2), e=rf.Scalar(6))
        >>> y, X = torch.tensor([1.0, 2.0, 0.5, 2.5, 1.5, 3.0]), torch.ones(6, 1)
        >>> terms, vcov = terms_and_vcov(select_engine(s), s, s.init_params(), y, X)
        >>> bool(torch.allclose(vcov, rf.vcov_beta(s, s.init_params(), y, X)))
        True
    """
    keyword = prepared_keyword(prepared)
    if hasattr(engine, "ai_terms_and_vcov"):
        return engine.ai_terms_and_vcov(s, params, y, X, jacobian, **keyword)
    return engine.ai_terms(s, params, y, X, jacobian, **keyword), engine.gls(s, params, y, X, **keyword)[1]
