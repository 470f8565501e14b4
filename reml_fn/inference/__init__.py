"""Inference after a fit: Satterthwaite (:mod:`~reml_fn.inference.satterthwaite`) and Kenward–Roger
(:mod:`~reml_fn.inference.kenward_roger`) degrees of freedom.

Model comparison, confidence intervals and the parametric bootstrap for formula fits are in
:mod:`reml_fn.frontend.inference` (they need the fit's labels); the computations that need only
(s, θ, y, X) live here.
"""

from reml_fn.inference.kenward_roger import KenwardRoger, kenward_roger, kenward_roger_df
from reml_fn.inference.satterthwaite import VarianceDerivatives, contrast_df, joint_df, variance_derivatives

__all__ = [
    "VarianceDerivatives",
    "variance_derivatives",
    "contrast_df",
    "joint_df",
    "KenwardRoger",
    "kenward_roger",
    "kenward_roger_df",
]
