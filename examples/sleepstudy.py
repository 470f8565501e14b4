"""Fit lme4's sleepstudy model ``Reaction ~ Days + (Days | Subject)`` by REML and print the summary.

Run:  python examples/sleepstudy.py

The covariance of the 180 reaction times is V = Z (I₁₈ ⊗ Σ) Zᵀ + σ² I: a correlated random
intercept and slope per subject (Σ, 2×2 unstructured) plus independent residual noise. lme4
reports REML criterion 1743.6283, fixed effects 251.405 (SE 6.825) and 10.467 (SE 1.546),
variances 612.09 / 35.07 (covariance 9.60) and residual variance 654.94.
"""

import torch

import reml_fn as rf
from reml_fn import datasets
from reml_fn.design import design_matrix, indicator_codes

torch.set_default_dtype(torch.float64)

data = datasets.load("sleepstudy", categorical=("Subject",))
y = data["Reaction"]
X = design_matrix(data["Days"], intercept=True)  # [1, Days]
subject, levels = indicator_codes(data["Subject"])

V = rf.Sum(
    Subject=rf.Grouped(groups=subject, covariates=X, cov=rf.Unstructured(2)),  # (1 + Days | Subject)
    residual=rf.Scalar(len(y)),
)
result = rf.fit(V, y, X, x_names=["(Intercept)", "Days"])
print(result)

effects = rf.blup(V, result.params, y, X)["Subject"]
print(f"\nBLUPs of the first subject ({levels[0]}): intercept {effects[0, 0]:.4f}, slope {effects[0, 1]:.4f}")
