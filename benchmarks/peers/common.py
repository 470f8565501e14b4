"""Run a peer (lme4, statsmodels, torch-openreml, or reml_fn itself) on a benchmark case in a subprocess.

``run_peer(name, case)`` writes the case's CSV files (once per process), runs the peer script, parses
the JSON line it prints and returns it as a dict, plus what the parent measured (``wall_s`` of the
whole subprocess, the 1-minute load average before and after, the command). It never raises for an
absent or failing peer:

* ``{"skipped": "<reason>"}`` when the peer is not installed (no Rscript, no lme4/jsonlite, no
  statsmodels, no torch-openreml environment), or when the peer itself skips the case (too large);
* ``{"error": "<reason>", "stderr_tail": ...}`` when it ran and failed or timed out.

Interpreters and locations come from the environment:

* ``REML_FN_PEER_PY312``: Python that can import torch_openreml (default ``/work/peer-venv312/bin/python``);
* ``REML_FN_OPENREML_PATCHED``: fallback directory made by ``make_patched_openreml.py`` (default
  ``/work/peer-openreml-py311``), used with this interpreter via ``PYTHONPATH`` when the venv is absent;
* ``REML_FN_RSCRIPT``: the Rscript binary (default: ``Rscript`` on ``PATH``).

Example (from the repository root)::

    >>> from benchmarks.peers.common import run_peer
    >>> run_peer("lme4", "S1", repeats=3)["loglik"]   # doctest: +SKIP
    -871.814135979976
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.data import Case, make_case, write_case  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent
PEERS = ("lme4", "statsmodels", "openreml")
ALIASES = {"torch-openreml": "openreml", "torch_openreml": "openreml", "sm": "statsmodels", "r": "lme4"}
DEFAULT_PY312 = "/work/peer-venv312/bin/python"
DEFAULT_PATCHED = "/work/peer-openreml-py311"
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_BUDGET_S = 300.0


def _probe(command: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> tuple[bool, str]:
    """Run a short availability check; (ok, last line of stderr or the failure)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    message = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode == 0, message


def _reml_fn_env() -> dict[str, str]:
    """The environment with the repository root on PYTHONPATH (reml_fn need not be installed)."""
    root = str(PEERS_DIR.parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


@cache
def peer_command(name: str) -> tuple[list[str], dict[str, str]] | str:
    """How to start a peer: (argv prefix, environment), or the reason it is unavailable (a str)."""
    name = ALIASES.get(name, name)
    if name == "lme4":
        rscript = os.environ.get("REML_FN_RSCRIPT") or shutil.which("Rscript")
        if not rscript:
            return "Rscript not found (apt-get install -y r-cran-lme4 r-cran-nlme; see benchmarks/README.md)"
        ok, message = _probe([rscript, "-e", "suppressPackageStartupMessages({library(lme4); library(jsonlite)})"])
        if not ok:
            return f"R packages lme4/jsonlite not loadable ({message}); apt-get install -y r-cran-lme4"
        return [rscript, str(PEERS_DIR / "lme4_bench.R")], dict(os.environ)
    if name == "reml_fn":
        ok, message = _probe([sys.executable, "-c", "import reml_fn, pandas"], env=_reml_fn_env())
        if not ok:
            return f"reml_fn not importable in {sys.executable} ({message})"
        return [sys.executable, str(PEERS_DIR / "reml_fn_peer.py")], _reml_fn_env()
    if name == "statsmodels":
        ok, message = _probe([sys.executable, "-c", "import statsmodels, pandas"])
        if not ok:
            return f"statsmodels not importable in {sys.executable} ({message}); pip install statsmodels pandas"
        return [sys.executable, str(PEERS_DIR / "statsmodels_peer.py")], dict(os.environ)
    if name == "openreml":
        script = str(PEERS_DIR / "openreml_peer.py")
        python312 = os.environ.get("REML_FN_PEER_PY312", DEFAULT_PY312)
        probe = [python312, "-c", "import torch_openreml, pandas"]
        reasons = []
        if Path(python312).exists():
            ok, message = _probe(probe)
            if ok:
                return [python312, script], dict(os.environ)
            reasons.append(f"{python312} cannot import torch_openreml ({message})")
        else:
            reasons.append(f"no {python312} (REML_FN_PEER_PY312)")
        patched = os.environ.get("REML_FN_OPENREML_PATCHED", DEFAULT_PATCHED)
        if (Path(patched) / "torch_openreml").is_dir():
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [patched, os.environ.get("PYTHONPATH")])))
            ok, message = _probe([sys.executable, "-c", "import torch_openreml, pandas"], env=env)
            if ok:
                return [sys.executable, script], env
            reasons.append(f"patched copy {patched} not importable ({message})")
        else:
            reasons.append(f"no patched copy in {patched} (REML_FN_OPENREML_PATCHED)")
        return "torch-openreml unavailable: " + "; ".join(reasons) + " (see benchmarks/README.md)"
    raise KeyError(f"unknown peer {name!r}; known: reml_fn, {', '.join(PEERS)}")


def peer_available(name: str) -> tuple[bool, str]:
    """(True, "") if the peer can run, else (False, reason)."""
    how = peer_command(name)
    return (False, how) if isinstance(how, str) else (True, "")


@cache
def _default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="reml_fn_bench_"))


@cache
def _written(case_name: str, workdir: Path) -> dict[str, str]:
    return write_case(make_case(case_name), workdir)


def case_files(case: str | Case, workdir: Path | None = None) -> dict[str, str]:
    """Paths of the case's CSV files in ``workdir`` (default: a temporary directory), written once."""
    name = case if isinstance(case, str) else case.name
    return _written(name, Path(workdir) if workdir else _default_workdir())


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_peer(
    name: str,
    case: str | Case,
    repeats: int = 5,
    *,
    workdir: Path | str | None = None,
    logliks_dir: Path | str | None = None,
    budget: float = DEFAULT_BUDGET_S,
    timeout: float = DEFAULT_TIMEOUT_S,
    extra_args: list[str] | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Run one peer on one case and return its result dict.

    Args:
        name: ``lme4``, ``statsmodels``, ``openreml`` (``torch-openreml`` also accepted) or ``reml_fn``
            (``reml_fn_peer.py`` with this interpreter).
        case: case name (see ``benchmarks.data.CASE_NAMES``) or a :class:`~benchmarks.data.Case`.
        repeats: timed repeats after one warm-up (single-response cases).
        workdir: where the case CSVs are written (default: one temporary directory per process).
        logliks_dir: batch cases: where ``{case}_{peer}_logliks.txt`` goes (default: ``workdir``).
        budget: seconds of timed work a peer may spend before cutting repeats (or extrapolating a batch).
        timeout: hard limit for the subprocess, seconds.
        extra_args: more arguments for the peer script (e.g. ``["--max-gb=8"]`` for openreml,
            ``["--threads=2"]`` for reml_fn).
        tag: name used in the batch logLik file instead of the peer's (``B1_{tag}_logliks.txt``), so
            that two runs of one peer (reml_fn with 1 and 2 threads) keep both files.

    Returns:
        The peer's JSON fields (``time_s``, ``cpu_s``, ``loglik``, ``beta``, ``varcomp``, ``peak_rss_mb``, …;
        batch cases ``per_fit_s``, ``logliks_file``), plus ``wall_s``, ``load_before``, ``load_after``,
        ``command``; or ``{"skipped": reason}`` / ``{"error": reason, ...}``.
    """
    peer = ALIASES.get(name, name)
    how = peer_command(peer)
    if isinstance(how, str):
        return {"peer": peer, "skipped": how}
    prefix, env = how
    case_obj = make_case(case) if isinstance(case, str) else case
    workdir_path = Path(workdir) if workdir else _default_workdir()
    files = case_files(case_obj, workdir_path)
    command = prefix + [case_obj.name, files["csv"], str(repeats), f"--budget={budget:g}"]
    if case_obj.slope:
        command.append(f"--slope={case_obj.slope}")
    if case_obj.is_batch:
        out_dir = Path(logliks_dir) if logliks_dir else workdir_path
        out_dir.mkdir(parents=True, exist_ok=True)
        logliks = out_dir / f"{case_obj.name}_{tag or peer}_logliks.txt"
        command += [f"--responses={files['responses']}", f"--logliks-out={logliks}"]
    command += extra_args or []
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {
            "peer": peer,
            "case": case_obj.name,
            "error": f"timed out after {timeout:g} s",
            "stderr_tail": stderr[-2000:],
        }
    wall_s = time.perf_counter() - start
    parsed = _last_json_line(done.stdout)
    context = {
        "wall_s": wall_s,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "command": " ".join(command),
    }
    if done.returncode != 0 or parsed is None:
        reason = f"exit code {done.returncode}" if done.returncode else "no JSON line on stdout"
        return {"peer": peer, "case": case_obj.name, "error": reason, "stderr_tail": done.stderr[-2000:]} | context
    return parsed | context


def main() -> None:
    """``python benchmarks/peers/common.py PEER CASE [REPEATS]``: run one peer and print its JSON."""
    if len(sys.argv) < 3:
        raise SystemExit("usage: python benchmarks/peers/common.py PEER CASE [REPEATS]")
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    print(json.dumps(run_peer(sys.argv[1], sys.argv[2], repeats), indent=1))


if __name__ == "__main__":
    main()
