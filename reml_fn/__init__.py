"""reml_fn: functional REML for linear mixed models on torch.func.

Structures are immutable pytree dataclasses with a pure ``build(params)``; parameters are a
separate nested dict of raw tensors; Jacobians have closed forms checked against autodiff; the REML
log-likelihood is a pure function that composes with ``vmap`` and ``grad``.
"""

from reml_fn import design, transforms
from reml_fn.combinators import (
    Augment,
    BlockDiagonal,
    Combinator,
    Gram,
    Grouped,
    Hadamard,
    Inverse,
    Kronecker,
    Product,
    Propagate,
    Stack,
    Sum,
    Transpose,
    mixed_model,
)
from reml_fn.fit import FitResult, fit, fit_batched
from reml_fn.jacobian import jacobian, jacobian_stack
from reml_fn.params import (
    ParamSpec,
    all_param_names,
    check_params,
    constrain,
    fix,
    flatten_params,
    init_params,
    param_names,
    unconstrain,
    unfix,
    unflatten_params,
)
from reml_fn.reml import ai_terms, blue, blup, ml_ai_terms, ml_loglik, predict, reml_loglik, residuals, vcov_beta
from reml_fn.structures import (
    AR1,
    CompoundSymmetric,
    Custom,
    Diagonal,
    EqualEntry,
    Equicorrelation,
    Fixed,
    Identity,
    LowerTriangular,
    Reparam,
    Scalar,
    Structure,
    Unstructured,
    WithinGroup,
)
from reml_fn.tree import replace, static, structure

__version__ = "0.1.0"

_FRONTEND = (
    "lmer",
    "lmer_model",
    "LmerModel",
    "LmerResult",
    "anova",
    "bootstrap",
    "coef_table",
    "confint",
    "contest",
    "gls",
    "cor_ar1",
    "cor_car1",
    "cor_cs",
    "cor_exp",
    "cor_gaus",
    "cor_symm",
    "var_ident",
    "var_power",
)


def __getattr__(name: str):
    # The formula front end imports pandas and formulaic: only when it is first used.
    if name in _FRONTEND:
        from reml_fn import frontend

        return getattr(frontend, name)
    if name == "datasets":
        import importlib

        return importlib.import_module("reml_fn.datasets")
    raise AttributeError(f"module 'reml_fn' has no attribute {name!r}")


__all__ = [
    "transforms",
    "design",
    "structure",
    "static",
    "replace",
    "ParamSpec",
    "param_names",
    "all_param_names",
    "check_params",
    "constrain",
    "unconstrain",
    "init_params",
    "flatten_params",
    "unflatten_params",
    "fix",
    "unfix",
    "jacobian",
    "jacobian_stack",
    "Structure",
    "Identity",
    "Scalar",
    "EqualEntry",
    "Diagonal",
    "Equicorrelation",
    "CompoundSymmetric",
    "AR1",
    "Unstructured",
    "WithinGroup",
    "LowerTriangular",
    "Fixed",
    "Custom",
    "Reparam",
    "Combinator",
    "Sum",
    "Propagate",
    "Grouped",
    "BlockDiagonal",
    "Kronecker",
    "Hadamard",
    "Product",
    "Transpose",
    "Gram",
    "Augment",
    "Stack",
    "Inverse",
    "reml_loglik",
    "ml_loglik",
    "ml_ai_terms",
    "ai_terms",
    "blue",
    "vcov_beta",
    "blup",
    "predict",
    "residuals",
    "fit",
    "fit_batched",
    "mixed_model",
    "FitResult",
    *_FRONTEND,
]
