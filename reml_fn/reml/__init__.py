"""REML: pure log-likelihood, score/AI terms and post-estimation, per engine."""

from reml_fn.reml.dense import AITerms
from reml_fn.reml.engines import ENGINES, register_engine, select_engine
from reml_fn.reml.likelihood import (
    ai_terms,
    blue,
    blup,
    check_data,
    ml_ai_terms,
    ml_loglik,
    predict,
    reml_loglik,
    residuals,
    vcov_beta,
)
from reml_fn.reml.mme import MMEEngine  # registers the "mme" engine

# isort: split
# Registered after mme, so tried before it: a correlated residual whose random terms are all nested
# in its groups runs on the blocks engine (dense blocks of V); the MME takes the crossed ones.
from reml_fn.reml.blocks import BlocksEngine  # registers the "blocks" engine

__all__ = [
    "AITerms",
    "MMEEngine",
    "BlocksEngine",
    "ENGINES",
    "register_engine",
    "select_engine",
    "reml_loglik",
    "ml_loglik",
    "ml_ai_terms",
    "ai_terms",
    "blue",
    "vcov_beta",
    "blup",
    "predict",
    "residuals",
    "check_data",
]
