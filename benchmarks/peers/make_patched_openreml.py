"""Lightweight alternative to the Python 3.12 venv: a torch-openreml copy that imports on Python 3.10/3.11.

torch-openreml 0.4.0a0 declares ``Requires-Python >=3.10`` but ``covariance/matrix.py`` nests double
quotes inside double-quoted f-strings (``f"... {type(spec["fixed"]).__name__}"``), legal only from
Python 3.12 (PEP 701). Those f-strings are error messages of the parameter-spec validation; this
script extracts the wheel and re-quotes them (``spec['fixed']``), nothing else, so the package runs
on the torch already installed for Python 3.11 (no 5 GB CUDA torch for 3.12 needed).

Usage::

    python3 benchmarks/peers/make_patched_openreml.py [--dest /work/peer-openreml-py311] [--wheel FILE.whl]

then the peer runner uses ``PYTHONPATH=DEST python3`` when the 3.12 venv is not there (set
``REML_FN_OPENREML_PATCHED`` to use another DEST). Without ``--wheel`` the wheel is fetched with
``pip download --no-deps torch-openreml==0.4.0a0``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_DEST = Path("/work/peer-openreml-py311")
PACKAGE = "torch_openreml"
REQUIREMENT = "torch-openreml==0.4.0a0"
NESTED_QUOTE = re.compile(r'spec\["(\w+)"\]')


def fetch_wheel(directory: Path) -> Path:
    """Download the torch-openreml wheel (no dependencies) into ``directory`` and return its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", REQUIREMENT, "-d", str(directory)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return next(directory.glob("torch_openreml-*.whl"))


def requote(source: str) -> tuple[str, int]:
    """Re-quote ``spec["key"]`` inside f-string lines as ``spec['key']``; returns (new source, lines changed)."""
    changed = 0
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if 'f"' in line and NESTED_QUOTE.search(line):
            head, fstring = line.split('f"', 1)
            lines[i] = head + 'f"' + NESTED_QUOTE.sub(r"spec['\1']", fstring)
            changed += 1
    return "".join(lines), changed


def main() -> None:
    """Extract, patch and byte-compile-check the package."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="directory that will hold torch_openreml/")
    parser.add_argument("--wheel", type=Path, default=None, help="torch_openreml wheel (else pip download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(PACKAGE + "/")]
            archive.extractall(args.dest, members=members)
    matrix = args.dest / PACKAGE / "covariance" / "matrix.py"
    patched, changed = requote(matrix.read_text())
    matrix.write_text(patched)
    for path in (args.dest / PACKAGE).rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    (args.dest / "PATCHED.txt").write_text(
        f"{REQUIREMENT} from {Path(wheel).name}; {changed} f-string lines in {PACKAGE}/covariance/matrix.py "
        "re-quoted (spec[\"k\"] -> spec['k']) so that Python < 3.12 can parse them. Nothing else changed.\n"
    )
    print(f"patched {changed} lines; use PYTHONPATH={args.dest} {sys.executable}")


if __name__ == "__main__":
    main()
