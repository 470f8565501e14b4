"""FitResult: the immutable pytree a fit returns (batched fits give the same with a batch axis)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from reml_fn.fit.step import PIVOT_TOLERANCE
from reml_fn.tree import static, structure

__all__ = ["FitResult", "STATUS", "OVERFLOW", "status_message", "confounded_parameters", "build_result"]

# Status codes (``FitResult.status``): an int per fit, so batched results can carry them.
STATUS = {
    0: "converged",
    1: "iteration limit reached before convergence",
    2: "line search failed: no step along the AI direction increases the log-likelihood",
    3: "V is not positive definite at the starting point",
    4: "the data contain NaN or inf",
    5: "the AI matrix is singular: parameters are not identifiable from these data",
    6: "y is an exact linear function of X (zero residual variance): nothing to estimate",
    7: "X is rank deficient",
    8: (
        "the score or AI matrix overflowed (not finite) at a finite log-likelihood: y's scale is too "
        "extreme for this dtype; divide y by its standard deviation (variances scale by its square, "
        "logLik shifts by (n - p)·log sd)"
    ),
}


# Status of a fit whose score or AI matrix is not finite where ℓ is.
OVERFLOW = 8


def status_message(code: int) -> str:
    return STATUS.get(int(code), f"unknown status {int(code)}")


def confounded_parameters(ai: Tensor, names: Sequence[str], at_boundary: Tensor | None = None) -> list[str]:
    """The free parameters in the null space of the AI matrix (k, k): those without information
    (AI_kk ≈ 0) and those with a large component in the eigenvector of the smallest eigenvalue of
    the unit-diagonal scaled AI, when that eigenvalue is below 10³·ε (``PIVOT_TOLERANCE``, the
    rule of :func:`~reml_fn.fit.step.newton_direction`) (parameters at a bound are
    left out). Names the parameters of a status-5 fit.

    Example:
        >>> import torch
        >>> ai = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
        >>> confounded_parameters(ai, ["a", "b", "c"])
        ['a', 'b']

    Example:
        >>> status_message(5)
        'the AI matrix is singular: parameters are not identifiable from these data'
        >>> status_message(42)
        'unknown status 42'
    """
    free = torch.ones(len(names), dtype=torch.bool) if at_boundary is None else ~at_boundary.cpu()
    ai = ai.detach().cpu().to(torch.float64)
    index = [j for j in range(len(names)) if bool(free[j])]
    if not index:
        return []
    sub = ai[index][:, index]
    diagonal = torch.diagonal(sub)
    tiny = PIVOT_TOLERANCE * torch.finfo(torch.float64).eps * float(diagonal.abs().max().clamp(min=1e-300))
    silent = [index[j] for j in range(len(index)) if float(diagonal[j]) <= tiny]
    informative = [j for j in range(len(index)) if float(diagonal[j]) > tiny]
    named = set(silent)
    if len(informative) > 1:
        root = diagonal[informative].rsqrt()
        scaled = sub[informative][:, informative] * root[:, None] * root[None, :]
        values, vectors = torch.linalg.eigh(scaled)
        if float(values[0]) <= PIVOT_TOLERANCE * torch.finfo(torch.float64).eps * len(informative):
            weights = vectors[:, 0].abs()
            named |= {index[informative[j]] for j in range(len(informative)) if float(weights[j]) > 0.1}
    return [names[j] for j in sorted(named)]


def _leaves(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


@structure
class FitResult:
    """Result of :func:`reml_fn.fit` (or, with a leading batch axis, :func:`reml_fn.fit_batched`).

    Fields (k free covariance parameters, p fixed effects):

    * ``params``: raw parameter tree; ``natural``: natural-scale tree (same paths); ``names`` (k);
    * ``beta`` (p,), ``vcov_beta`` (p, p) = (XᵀV⁻¹X)⁻¹, ``se_beta`` (p,), ``beta_names`` (p);
    * ``score`` (k,) and ``ai`` (k, k) at the returned point;
    * ``loglik`` (REML, lme4's logLik), ``reml_criterion`` = −2 loglik, ``aic`` = −2ℓ + 2(p + k),
      ``bic`` = −2ℓ + (p + k) log n;
    * ``converged`` (bool), ``status`` (int, see :data:`STATUS`), ``at_boundary`` (k,) bool,
      ``n_iter``;
    * ``history``: ``{"loglik": (T,), "params": (T, k), "step": (T, k)}``: the start (row 0), then
      a row per iteration that moved (for one dataset, T = ``n_iter`` + 1);
    * ``engine``: which engine ran; ``n``, ``p``.

    Every quantity belongs to the same point: the returned parameters.

    Example:
        >>> import torch, reml_fn as rf
        >>> y = torch.tensor([1.0, 3.0, 2.0, 4.0, 1.5, 3.5, 0.5, 3.0])
        >>> s = rf.Sum(g=rf.Grouped(torch.arange(8) % 2), residual=rf.Scalar(8))
        >>> result = rf.fit(s, y, torch.ones(8, 1))
        >>> result.names, bool(result.converged), result.beta.shape
        (('g/cov/sigma^2', 'residual/sigma^2'), True, torch.Size([1]))
    """

    params: dict
    natural: dict
    beta: Tensor
    vcov_beta: Tensor
    se_beta: Tensor
    score: Tensor
    ai: Tensor
    loglik: Tensor
    reml_criterion: Tensor
    aic: Tensor
    bic: Tensor
    converged: Tensor
    status: Tensor
    at_boundary: Tensor
    n_iter: Tensor
    history: dict
    names: tuple = static()
    beta_names: tuple = static()
    engine: str = static()
    n: int = static()
    p: int = static()
    dtype: str = static(default="float64")
    reml: bool = static(default=True)  # False: an ML fit (loglik is the ML log-likelihood)

    @property
    def message(self) -> str | list[str]:
        """Human-readable status (a list for batched results); status 5 names the parameters that
        the data cannot separate (:func:`confounded_parameters`)."""
        if self.status.dim() == 0:
            return self._message_of(self.status, self.ai, self.at_boundary)
        return [
            self._message_of(code, ai, bound)
            for code, ai, bound in zip(
                self.status.flatten(),
                self.ai.reshape(-1, *self.ai.shape[-2:]),
                self.at_boundary.reshape(-1, self.at_boundary.shape[-1]),
            )
        ]

    def _message_of(self, code: Tensor, ai: Tensor, at_boundary: Tensor) -> str:
        text = status_message(code)
        if int(code) == 5 and bool(torch.isfinite(ai).all()):
            named = confounded_parameters(ai, self.names, at_boundary)
            if named:
                text += f"; confounded or without effect: {', '.join(named)}"
        return text

    def dataset(self, b: int) -> FitResult:
        """Dataset ``b`` of a batched result, as the result of a single fit."""
        leaves, spec = pytree.tree_flatten(self)
        return pytree.tree_unflatten([leaf[b] for leaf in leaves], spec)

    @property
    def boundary_names(self) -> list[str]:
        """Names of parameters that stopped at a bound (single fits)."""
        return [name for name, flag in zip(self.names, self.at_boundary.tolist()) if flag]

    @property
    def deviance(self) -> Tensor:
        """−2 × log-likelihood: lme4's deviance of an ML fit, its REML criterion of a REML fit."""
        return -2.0 * self.loglik

    @property
    def criterion_name(self) -> str:
        return "REML" if self.reml else "ML"

    def summary(self) -> str:
        """An lme4-style summary: variance components, fixed effects, log-likelihood."""
        if self.loglik.dim() != 0:
            return (
                f"FitResult of {self.loglik.shape[0]} datasets (engine {self.engine}): "
                f"{int(self.converged.sum())} converged; mean {self.criterion_name} logLik "
                f"{float(self.loglik.mean()):.4f}"
            )
        method = "REML" if self.reml else "maximum likelihood"
        lines = [f"Linear mixed model fit by {method} (reml_fn, {self.engine} engine, {self.dtype})"]
        if self.reml:
            lines.append(f"REML criterion at convergence: {float(self.reml_criterion):.4f}")
        else:
            lines.append(f"deviance at convergence: {float(self.deviance):.4f}")
        lines.append("")
        lines.append("Covariance parameters:")
        width = max([len(name) for name in self.names] + [9])
        lines.append(f" {'parameter':<{width}}  {'estimate':>12}  {'std.dev':>10}  {'raw':>10}")
        raw = dict(_leaves(self.params))
        for name, value in _leaves(self.natural):
            v = float(value)
            leaf = name.rsplit("/", 1)[-1]
            is_var = leaf.startswith("sigma^2") and (leaf.count("_") < 2 or len(set(leaf.split("_")[-2:])) == 1)
            sd = f"{math.sqrt(v):10.4f}" if is_var and v >= 0 else " " * 10
            flag = "  (at boundary)" if name in self.boundary_names else ""
            lines.append(f" {name:<{width}}  {v:12.6g}  {sd}  {float(raw[name]):10.4f}{flag}")
        lines.append(f"Number of obs: {self.n}")
        lines.append("")
        lines.append("Fixed effects:")
        bw = max([len(b) for b in self.beta_names] + [11])
        lines.append(f" {'':<{bw}}  {'Estimate':>12}  {'Std. Error':>11}  {'t value':>8}")
        for name, b, se in zip(self.beta_names, self.beta.tolist(), self.se_beta.tolist()):
            lines.append(f" {name:<{bw}}  {b:12.6g}  {se:11.5g}  {b / se:8.3f}")
        lines.append("")
        lines.append(
            f"logLik ({self.criterion_name}) {float(self.loglik):.4f}   AIC {float(self.aic):.4f}   BIC {float(self.bic):.4f}"
        )
        lines.append(f"{self.message} after {int(self.n_iter)} iterations")
        if self.boundary_names:
            lines.append(f"boundary (singular) fit: {', '.join(self.boundary_names)} at a bound")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        if self.loglik.dim() == 0:
            return (
                f"FitResult(loglik={float(self.loglik):.6f}, converged={bool(self.converged)}, "
                f"n_iter={int(self.n_iter)}, engine={self.engine!r}, dtype={self.dtype!r})"
            )
        return f"FitResult(batch={tuple(self.loglik.shape)}, converged={int(self.converged.sum())}, engine={self.engine!r})"


def build_result(
    out: dict,
    names: Sequence[str],
    x_names: Sequence[str] | None,
    engine: str,
    n: int,
    p: int,
    dtype: torch.dtype,
    reml: bool = True,
) -> FitResult:
    """The batched :class:`FitResult` from the per-dataset fields of the fit (leading dimension B):
    ``params``, ``natural``, ``beta``, ``vcov_beta``, ``score``, ``ai``, ``loglik``, ``status``,
    ``at_boundary``, ``n_iter``, ``history``. The criteria are computed here, once for both drivers.

    Example:
        >>> import torch
        >>> out = {"params": {"a": torch.zeros(1)}, "natural": {"a": torch.ones(1)}, "beta": torch.zeros(1, 1),
        ...        "vcov_beta": torch.full((1, 1, 1), 4.0), "score": torch.zeros(1, 1), "ai": torch.ones(1, 1, 1),
        ...        "loglik": torch.tensor([-10.0]), "status": torch.tensor([0]), "at_boundary": torch.zeros(1, 1, dtype=torch.bool),
        ...        "n_iter": torch.tensor([3]), "history": {}}
        >>> result = build_result(out, ["a"], None, "dense", 20, 1, torch.float64)
        >>> result.se_beta.tolist(), result.aic.tolist(), result.converged.tolist()  # −2ℓ + 2(p + k)
        ([[2.0]], [24.0], [True])
    """
    loglik, status, vcov = out["loglik"], out["status"], out["vcov_beta"]
    k = len(names)
    deviance = -2.0 * loglik
    return FitResult(
        params=out["params"],
        natural=out["natural"],
        beta=out["beta"],
        vcov_beta=vcov,
        se_beta=torch.sqrt(torch.diagonal(vcov, dim1=-2, dim2=-1)),
        score=out["score"],
        ai=out["ai"],
        loglik=loglik,
        reml_criterion=deviance,
        aic=deviance + 2.0 * (p + k),
        bic=deviance + (p + k) * math.log(n),
        converged=status == 0,
        status=status,
        at_boundary=out["at_boundary"],
        n_iter=out["n_iter"],
        history=out["history"],
        names=tuple(names),
        beta_names=tuple(x_names) if x_names is not None else tuple(f"x{j}" for j in range(p)),
        engine=engine,
        n=n,
        p=p,
        dtype=str(dtype).removeprefix("torch."),
        reml=reml,
    )
