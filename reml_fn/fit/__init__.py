"""Fitting: AI-REML driver, starting values and bounds, the FitResult pytree."""

from reml_fn.fit.driver import ai_direction, fit
from reml_fn.fit.result import STATUS, FitResult
from reml_fn.fit.start import default_init, raw_bounds

__all__ = ["fit", "ai_direction", "FitResult", "STATUS", "default_init", "raw_bounds"]
