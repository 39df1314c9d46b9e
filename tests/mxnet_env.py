"""An isolated, cached venv with mxnet 1.9.1 for the predecessor's MaskFlowNet oracle.

mxnet 1.9.1 imports only with numpy <= 1.23.5, so it can never share a process (or a
venv) with zarr 3 and numpy 2: the oracle runs :mod:`tests.mxnet_oracle` as a script in
its own venv, built here on first use from PyPI (``mxnet==1.9.1 numpy==1.23.5``, about
15 s and 300 MB) under ``$ATLINTER_RAY_TEST_CACHE/mxnet-venv`` (default
``<repo>/.cache``), and exchanges arrays with it through ``.npy``/``.npz`` files.

A venv is used only once a marker file records a complete install; an interrupted
build is removed and redone. A file lock keeps parallel test processes from building
it twice.

Usage::

    python = mxnet_python()
    run_oracle("make-params", str(path), "--seed", "0")
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # scripts (benchmarks) import this module too
    sys.path.insert(0, str(HERE))

from pypi import CACHE, extract  # noqa: E402

REQUIREMENTS = ("mxnet==1.9.1", "numpy==1.23.5")
VENV = CACHE / "mxnet-venv"
MARKER = VENV / "atlinter-ray-complete.txt"
ORACLE = HERE / "mxnet_oracle.py"


def _python(root: Path) -> Path:
    """The interpreter of the venv at ``root``."""
    return root / "bin" / "python"


def mxnet_python() -> Path:
    """Path of the isolated venv's python, building the venv first if needed."""
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if MARKER.is_file() and MARKER.read_text() == wanted:
        return _python(VENV)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "mxnet-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if MARKER.is_file() and MARKER.read_text() == wanted:
            return _python(VENV)
        shutil.rmtree(VENV, ignore_errors=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        result = subprocess.run(
            [str(_python(VENV)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *REQUIREMENTS],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"could not build the mxnet oracle venv at {VENV} (pip install "
                f"{' '.join(REQUIREMENTS)} failed):\n{result.stdout}\n{result.stderr}"
            )
        MARKER.write_text(wanted)
    return _python(VENV)


def predecessor_src() -> Path:
    """The ``src`` folder of the predecessor's unpacked sdist (downloaded once)."""
    src = extract("atlinter==0.2.3", sdist=True) / "atlinter-0.2.3" / "src"
    if not (src / "atlinter" / "optical_flow.py").is_file():
        raise FileNotFoundError(f"{src}/atlinter/optical_flow.py missing; delete {src.parent}")
    return src


def run_oracle(*args: str, threads: int = 2, timeout: float = 600) -> str:
    """Run ``mxnet_oracle.py SRC *args`` in the isolated venv; return its stdout."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONWARNINGS": "ignore",
    }
    if "OMP_WAIT_POLICY" in os.environ:
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    cmd = [str(mxnet_python()), str(ORACLE), str(predecessor_src()), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"mxnet oracle failed ({' '.join(cmd)}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-5000:]}"
        )
    return result.stdout
