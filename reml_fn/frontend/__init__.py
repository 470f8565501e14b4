"""The formula front end: lme4's language on pandas DataFrames (``rf.lmer``, ``rf.lmer_model``).

Layers: :mod:`~reml_fn.frontend.formula` splits an lme4 formula into its fixed part and random
terms; :mod:`~reml_fn.frontend.model` makes the structure, y, X and names with formulaic;
:mod:`~reml_fn.frontend.result` gives a fit lme4's accessors. pandas and formulaic are imported
only when this module is.
"""

from reml_fn.frontend.inference import Bootstrap, anova, bootstrap, coef_table, confint, contest, parameter_names
from reml_fn.frontend.model import LmerModel, TermInfo, gls, lmer, lmer_model
from reml_fn.frontend.residuals import cor_ar1, cor_car1, cor_cs, cor_exp, cor_gaus, cor_symm, var_ident, var_power
from reml_fn.frontend.result import LmerResult

__all__ = [
    "lmer",
    "lmer_model",
    "gls",
    "cor_ar1",
    "cor_car1",
    "cor_cs",
    "cor_exp",
    "cor_gaus",
    "cor_symm",
    "var_ident",
    "var_power",
    "LmerModel",
    "LmerResult",
    "TermInfo",
    "anova",
    "bootstrap",
    "Bootstrap",
    "coef_table",
    "confint",
    "contest",
    "parameter_names",
]
