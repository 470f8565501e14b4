"""Two halves of a same-run comparison, shared by the benchmarks that time reml_fn against an R
package on one dataset (``bench_correlation.py``, ``bench_crossed.py``): reml_fn in a fresh Python
subprocess (so that its peak RSS is its own) and the R peer through Rscript.

Example:
    >>> from benchmarks.same_run import python_json
    >>> python_json("import json; print(json.dumps({'times': [0.5]}))")
    {'times': [0.5]}
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def python_json(script: str) -> dict:
    """Run ``script`` with this interpreter (``python -c``) and return the JSON object of its last
    line of output; a failing script raises ``CalledProcessError``."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rscript_times_and_loglik(script: str, path: Path) -> dict:
    """Write ``script`` to ``path`` and run it with Rscript. The script prints the fit times on its
    first line and the logLik on its second: ``{"times": [...], "loglik": x}``, or
    ``{"skipped": the end of its error output}`` when it fails."""
    path.write_text(script)
    done = subprocess.run(["Rscript", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": done.stderr.strip()[-300:]}
    lines = done.stdout.split("\n")
    return {"times": [float(v) for v in lines[0].split()], "loglik": float(lines[1])}
