"""Test configuration: float64 by default, hypothesis profiles ("ci" default, "thorough")."""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_default_dtype(torch.float64)
# The test matrices are small: one thread avoids OpenMP hand-off costs that make 2-thread
# factorisations of 200×200 matrices ~10× slower on a loaded 2-core machine.
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
