"""Propagate terms of grouped shape, recognised as the Grouped terms they are.

``Propagate(Z=Z, G=Kronecker(a=Identity(m), b=Σ))`` with Z (n, m·k) a grouped design — each row's
nonzeros within one block of k columns, blocks in group order — is V = Z (I_m ⊗ Σ) Zᵀ =
``Grouped(codes, Σ, covariates=x)`` with codes[i] the row's block and x_i its k values there (the
seed's spelling of lme4's ``(x | g)``). :func:`grouped_form` rewrites such terms so that the MME
engine runs its Grouped paths (the blocked term's k×k blocks among them) on them; the free parameters
keep their order, so scores and AI matrices need no permutation.

Example:
    >>> import torch, reml_fn as rf
    >>> codes = torch.tensor([0, 0, 1, 1, 2, 2])
    >>> Z = torch.nn.functional.one_hot(codes).double()
    >>> s = rf.Sum(u=rf.Propagate(Z=Z, G=rf.Kronecker(a=rf.Identity(3), b=rf.Scalar(1))), e=rf.Scalar(6))
    >>> grouped, converted = grouped_form(s)
    >>> type(grouped["u"]).__name__, converted
    ('Grouped', {'u': ('G', 'b')})
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from reml_fn.combinators import Grouped, Kronecker, Propagate, Sum
from reml_fn.structures import Fixed, Identity
from reml_fn.structures.base import values_readable

__all__ = ["grouped_form", "grouped_params", "propagate_effects"]


def _is_identity(structure) -> int | None:
    """m when ``structure`` is I_m (an ``Identity`` or a ``Fixed`` identity matrix), else None."""
    if isinstance(structure, Identity):
        return structure.n
    if isinstance(structure, Fixed):
        matrix = structure.matrix
        if matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1] and values_readable(matrix):
            if bool(torch.equal(matrix, torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device))):
                return matrix.shape[0]
    return None


def _as_grouped(term: Propagate) -> tuple[Grouped, tuple[str, str]] | None:
    (_, g_name), (z, g) = term.names, term.children
    if not isinstance(z, Fixed) or not isinstance(g, Kronecker):
        return None
    m = _is_identity(g.children[0])
    if m is None:
        return None
    cov = g.children[1]
    k = cov.shape[0]
    Z = z.matrix
    if not values_readable(Z) or Z.dim() != 2 or Z.shape[1] != m * k:
        return None
    blocks = Z.reshape(Z.shape[0], m, k)
    used = (blocks != 0).any(-1)  # (n, m): which blocks a row touches
    if bool((used.sum(-1) > 1).any()):
        return None
    codes = used.to(torch.int64).argmax(-1)  # a row touching no block: code 0, covariates 0
    covariates = blocks[torch.arange(Z.shape[0], device=Z.device), codes]
    return Grouped(codes, cov, covariates=covariates, num_groups=m), (g_name, g.names[1])


def grouped_form(s) -> tuple[object, dict[str, tuple[str, str]]]:
    """``s`` with its grouped-shaped Propagate terms as Grouped terms (module docstring), and for each
    converted term path the path of its covariance's parameters inside the Propagate term."""
    if not isinstance(s, Sum):
        return s, {}
    converted: dict[str, tuple[str, str]] = {}
    children = {}
    for name, child in s.items():
        if isinstance(child, Propagate):
            grouped = _as_grouped(child)
            if grouped is not None:
                children[name], converted[name] = grouped
                continue
        if isinstance(child, Sum):
            inner, inner_converted = grouped_form(child)
            children[name] = inner
            converted.update({f"{name}/{path}": where for path, where in inner_converted.items()})
            continue
        children[name] = child
    if not converted:
        return s, {}
    return Sum(**children), converted


def grouped_params(params: Mapping, converted: Mapping[str, tuple[str, str]]) -> Mapping:
    """The parameter tree of :func:`grouped_form`'s structure: a converted term's ``{G: {b: θ}}``
    becomes ``{cov: θ}``."""
    if not converted:
        return params
    out = dict(params)
    for path, (g_name, b_name) in converted.items():
        parts = path.split("/")
        node = out
        for part in parts[:-1]:
            node[part] = dict(node[part])
            node = node[part]
        term = params
        for part in parts:
            term = term.get(part, {})
        node[parts[-1]] = {"cov": term.get(g_name, {}).get(b_name, {})}
    return out


def propagate_effects(effects: Mapping[str, Tensor], converted: Mapping) -> dict[str, Tensor]:
    """Random effects keyed as the original structure has them: a converted term's (m, k) as the
    Propagate term's (q,) = (m·k,)."""
    return {
        path: value.reshape(*value.shape[:-2], -1) if path in converted else value for path, value in effects.items()
    }
