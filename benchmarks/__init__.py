"""Benchmarks for reml_fn against its peers (lme4, statsmodels, torch-openreml)."""
