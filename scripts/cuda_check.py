"""Device check: the numerics on CUDA agree with the CPU, and how long the main jobs take there.

Run on a machine with a GPU (the project's device check):  python scripts/cuda_check.py OUT_DIR

1. Every reference model (reml_fn.datasets.models) is fitted on the CPU and on CUDA in float64;
   log-likelihood, β and parameters must agree (1e-9 relative / 1e-6 absolute on raw parameters).
2. The batched sleepstudy benchmark (1000 datasets) with fit_batched on CUDA vs CPU.
3. The L1 case (n = 100,000, 1,000 groups, random intercept, 3 covariates) timed on both.
Writes a JSON report to OUT_DIR/cuda_check.json and prints a summary; exits 1 on disagreement.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.utils._pytree as torch_pytree

import reml_fn as rf
from reml_fn.datasets.models import MODELS, model

torch.set_default_dtype(torch.float64)


def to(tree, device):
    """Move every tensor leaf of a structure (or any pytree) to ``device``."""
    return torch_pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def timed(fn, repeats=3):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def main(out_dir: str) -> int:
    device = os.environ.get("REML_FN_CHECK_DEVICE", "cuda")
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    report = {"device": name, "torch": torch.__version__, "models": {}}
    failures = []
    for name in sorted(MODELS):
        m = model(name)
        cpu, cpu_time = timed(lambda m=m: rf.fit(m.structure, m.y, m.X), repeats=1)
        s, y, X = to(m.structure, device), m.y.to(device), m.X.to(device)
        gpu, gpu_time = timed(lambda s=s, y=y, X=X: rf.fit(s, y, X), repeats=1)
        theta_cpu = rf.flatten_params(m.structure, cpu.params)
        theta_gpu = rf.flatten_params(s, gpu.params).cpu()
        agree = (
            abs(float(cpu.loglik) - float(gpu.loglik)) <= 1e-9 * abs(float(cpu.loglik))
            and torch.allclose(cpu.beta, gpu.beta.cpu(), rtol=1e-8, atol=1e-10)
            and torch.allclose(theta_cpu, theta_gpu, atol=1e-5)
            and bool(gpu.converged)
        )
        report["models"][name] = {
            "agree": agree,
            "loglik_cpu": float(cpu.loglik),
            "loglik_gpu": float(gpu.loglik),
            "engine": gpu.engine,
            "cpu_s": cpu_time,
            "gpu_s": gpu_time,
        }
        if not agree:
            failures.append(name)
        print(
            f"{name:18s} {'ok ' if agree else 'BAD'} {float(cpu.loglik):.10f} {float(gpu.loglik):.10f} "
            f"cpu {cpu_time * 1e3:7.1f} ms  gpu {gpu_time * 1e3:7.1f} ms  ({gpu.engine})",
            flush=True,
        )

    # L1: n = 100,000, 1,000 groups, random intercept, 3 covariates.
    g = torch.Generator().manual_seed(1)
    n, groups = 100_000, 1_000
    codes = torch.randint(0, groups, (n,), generator=g)
    X = torch.cat([torch.ones(n, 1), torch.randn(n, 3, generator=g)], 1)
    y = (
        X @ torch.tensor([1.0, 0.5, -0.3, 0.2])
        + torch.randn(groups, generator=g)[codes]
        + 0.7 * torch.randn(n, generator=g)
    )
    s = rf.Sum(g=rf.Grouped(groups=codes), residual=rf.Scalar(n))
    cpu, cpu_time = timed(lambda: rf.fit(s, y, X))
    sg, yg, Xg = to(s, device), y.to(device), X.to(device)
    gpu, gpu_time = timed(lambda: rf.fit(sg, yg, Xg))
    report["L1"] = {
        "cpu_s": cpu_time,
        "gpu_s": gpu_time,
        "loglik_cpu": float(cpu.loglik),
        "loglik_gpu": float(gpu.loglik),
    }
    print(
        f"L1 n=100k: cpu {cpu_time:.3f} s, gpu {gpu_time:.3f} s, loglik {float(cpu.loglik):.6f} / {float(gpu.loglik):.6f}"
    )
    if abs(float(cpu.loglik) - float(gpu.loglik)) > 1e-8 * abs(float(cpu.loglik)):
        failures.append("L1")

    # B1: 1000 sleepstudy responses in one fit_batched call.
    if hasattr(rf, "fit_batched"):
        m = model("sleepstudy_2")
        gen = torch.Generator().manual_seed(2)
        Y = m.y + 20.0 * torch.randn(1000, m.y.shape[0], generator=gen)
        cpu_b, cpu_time = timed(lambda: rf.fit_batched(m.structure, Y, m.X), repeats=1)
        sg = to(m.structure, device)
        gpu_b, gpu_time = timed(lambda: rf.fit_batched(sg, Y.to(device), m.X.to(device)), repeats=1)
        diff = float((cpu_b.loglik - gpu_b.loglik.cpu()).abs().max())
        report["B1"] = {
            "cpu_s": cpu_time,
            "gpu_s": gpu_time,
            "max_loglik_diff": diff,
            "converged_gpu": int(gpu_b.converged.sum()),
        }
        print(
            f"B1 1000 fits: cpu {cpu_time:.3f} s, gpu {gpu_time:.3f} s, max |Δloglik| {diff:.2e}, "
            f"converged {int(gpu_b.converged.sum())}"
        )
        if diff > 1e-7:
            failures.append("B1")

    report["failures"] = failures
    with open(f"{out_dir}/cuda_check.json", "w") as handle:
        json.dump(report, handle, indent=1)
    print("FAILURES:", failures if failures else "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
