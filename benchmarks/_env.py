"""The benchmarks' own virtualenv (``benchmarks/build/venv``) with pymilter.

pymilter is a C extension that compiles against libmilter, so installing it
needs ``libmilter-dev``, a C compiler and the Python headers of the
interpreter that creates the venv (Debian: ``gcc libmilter-dev python3-dev``;
a pyenv-built Python ships its own headers).

Use from Python::

    from _env import ensure_venv      # with benchmarks/ on sys.path
    python = ensure_venv()            # Path to the venv's python

or from the shell (prints the venv's python)::

    python3 benchmarks/_env.py [--recreate]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_DIR = HERE / "build" / "venv"
PYMILTER_REQ = "pymilter==1.0.5"


def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    return venv_dir / "bin" / "python"


def has_pymilter(python: Path) -> bool:
    if not python.exists():
        return False
    r = subprocess.run([str(python), "-c", "import Milter, milter"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def ensure_venv(venv_dir: Path = VENV_DIR, recreate: bool = False,
                requirement: str = PYMILTER_REQ) -> Path:
    """Create the venv if needed and install pymilter into it; return its python."""
    python = venv_python(venv_dir)
    if not recreate and has_pymilter(python):
        return python
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=recreate or not python.exists()).create(venv_dir)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", requirement], check=True)
    if not has_pymilter(python):
        raise RuntimeError(f"pymilter is not importable in {venv_dir}")
    return python


def ensure_package(python: Path, requirement: str, module: str | None = None) -> None:
    """pip-install `requirement` into the venv unless `module` already imports (e.g. matplotlib
    for the plot: a benchmark tool, not a project dependency)."""
    module = module or requirement.split("=")[0].split(">")[0].split("<")[0]
    r = subprocess.run([str(python), "-c", f"import {module}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", requirement], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="create benchmarks/build/venv with pymilter")
    ap.add_argument("--recreate", action="store_true", help="delete and rebuild the venv")
    args = ap.parse_args(argv)
    print(ensure_venv(recreate=args.recreate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
