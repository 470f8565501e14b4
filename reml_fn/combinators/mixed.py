"""``mixed_model``: V for y = Xβ + Σ_i Z_i u_i + e, u_i ~ N(0, G_i), e ~ N(0, R)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from reml_fn.combinators.propagate import Propagate
from reml_fn.combinators.sum import Sum
from reml_fn.structures.base import Structure

__all__ = ["mixed_model"]


def mixed_model(random: Mapping[str, tuple | Structure], residual: Structure | Tensor) -> Structure:
    """The marginal covariance V = Σ_i Z_i G_i Z_iᵀ + R as ``Sum(<term>=Propagate(Z, G), …, residual=R)``.

    Args:
        random: ``{name: (Z_i, G_i)}`` with Z_i an (n, q_i) tensor or structure and G_i a q_i×q_i
            structure; a value may also be a ready structure (e.g. ``Grouped``). Any number of
            terms, one included (torch-openreml's MixedModelREML fails with one).
        residual: R, an n×n structure (``Scalar(n)`` for iid errors) or tensor.

    Parameter paths are ``<name>/G/...`` and ``residual/...``.

    Example:
        >>> import torch, reml_fn as rf
        >>> Z = torch.nn.functional.one_hot(torch.arange(6) % 2).double()
        >>> V = rf.mixed_model({"block": (Z, rf.Scalar(2))}, residual=rf.Scalar(6))
        >>> rf.param_names(V)
        ['block/G/sigma^2', 'residual/sigma^2']
    """
    if not isinstance(random, Mapping):
        raise TypeError(f"random must be a dict {{name: (Z, G)}}, got {type(random).__name__}")
    terms: dict[str, Structure] = {}
    for name, term in random.items():
        if name == "residual":
            raise ValueError("'residual' is reserved for the residual term; rename the random term")
        if isinstance(term, Structure):
            terms[name] = term
        elif isinstance(term, (tuple, list)) and len(term) == 2:
            terms[name] = Propagate(Z=term[0], G=term[1])
        else:
            raise ValueError(f"random term {name!r} must be a (Z, G) pair or a structure, got {type(term).__name__}")
    if not terms:
        if isinstance(residual, Tensor):
            raise ValueError("a model without random terms needs a residual structure with parameters")
        return residual
    return Sum(**terms, residual=residual)
