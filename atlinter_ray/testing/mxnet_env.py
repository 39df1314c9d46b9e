"""An isolated, cached venv with mxnet 1.9.1 for the predecessor's MaskFlowNet oracle.

mxnet 1.9.1 imports only with numpy <= 1.23.5, so it can never share a process (or a
venv) with zarr 3 and numpy 2: the oracle runs :mod:`atlinter_ray.testing.mxnet_oracle` as a script in
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
import struct
import subprocess
import venv
from pathlib import Path

import numpy as np

from atlinter_ray.testing.predecessor import predecessor_src
from atlinter_ray.testing.pypi import CACHE

REQUIREMENTS = ("mxnet==1.9.1", "numpy==1.23.5")
VENV = CACHE / "mxnet-venv"
MARKER = VENV / "atlinter-ray-complete.txt"
#: Run as a script by the isolated venv's python (it cannot import this package).
ORACLE = Path(__file__).resolve().with_name("mxnet_oracle.py")


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


def write_ndarray_list(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write float32 arrays as MXNet does (V2 records); checked against mxnet's bytes."""
    out = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
    for value in arrays.values():
        value = np.ascontiguousarray(value, dtype="<f4")
        out.append(struct.pack("<Iii", 0xF993FAC9, 0, value.ndim))
        out.append(struct.pack(f"<{value.ndim}q", *value.shape))
        out.append(struct.pack("<iii", 1, 0, 0))
        out.append(value.tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        raw = name.encode()
        out.append(struct.pack("<Q", len(raw)) + raw)
    path.write_bytes(b"".join(out))


def random_params() -> Path:
    """A random-weight maskflownet.params written by mxnet itself, in the original layout (cached)."""
    path = CACHE / "bench" / "maskflownet-random-seed0.params"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        run_oracle("make-params", str(tmp), "--seed", "0", "--flow-gain", "1.0")
        tmp.rename(path)
    return path
