"""Doctests run in float64 like the test suite."""

import torch

torch.set_default_dtype(torch.float64)
