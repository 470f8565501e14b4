"""Fitting: AI-REML driver, starting values and bounds, the FitResult pytree."""

from reml_fn.fit.batched import dataset_structure, fit_batched, stack_structures
from reml_fn.fit.driver import fit
from reml_fn.fit.result import STATUS, FitResult
from reml_fn.fit.start import default_init, raw_bounds
from reml_fn.fit.step import Options, ai_direction

__all__ = [
    "fit",
    "fit_batched",
    "stack_structures",
    "dataset_structure",
    "ai_direction",
    "Options",
    "FitResult",
    "STATUS",
    "default_init",
    "raw_bounds",
]
