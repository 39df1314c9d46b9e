"""The package as users install it: a wheel (not editable), run from an empty folder.

The wheel is built from this checkout and installed into a fresh venv that borrows the
already-installed dependencies (a ``.pth`` line to this environment's site-packages,
``pip install --no-deps``), so the test costs seconds, not a full install. From an empty
folder, with no checkout in sight, every console script must start and the interpolation
job must reconstruct the bundled sample and print its scores.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import atlinter_ray
from atlinter_ray.models import available_models, base

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("atlinter-ray", "atlinter-ray-evaluate", "atlinter-ray-download", "atlinter-ray-align")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout (pip's isolated build: setuptools from PyPI)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )
    (found,) = out.glob("atlinter_ray-*.whl")
    return found


@pytest.mark.network
def test_the_wheel_carries_the_configs_the_sample_and_the_type_marker(wheel: Path) -> None:
    assert wheel.name.startswith(f"atlinter_ray-{atlinter_ray.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"atlinter_ray/{c}" for c in configs} <= names  # every file of conf/, shipped
    assert {"atlinter_ray/py.typed", "atlinter_ray/sample/mni152_t1.npy"} <= names
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    on_disk = {
        p.parent.relative_to(REPO).as_posix() for p in (REPO / "atlinter_ray").rglob("__init__.py")
    }
    assert on_disk <= packages, f"subpackages missing from the wheel: {on_disk - packages}"
    # the licence and the attributions travel with the wheel, and its metadata says which
    info = next(n.rsplit("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"{info}/licenses/LICENSE", f"{info}/licenses/NOTICE"} <= names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: " in metadata and "Classifier: " in metadata


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network
def test_every_job_runs_from_an_empty_folder(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("PYTHONPATH", None)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(python), "-c", "import atlinter_ray; print(atlinter_ray.__file__)")
    assert where.stdout.startswith(str(env_dir)), where.stdout  # the wheel, not the checkout
    for script in SCRIPTS[1:]:
        shown = run(str(env_dir / "bin" / script), "--help")
        assert shown.returncode == 0 and shown.stdout.startswith(f"{script}: "), shown.stderr
        assert "exit status:" in shown.stdout and "Hydra" not in shown.stdout
    done = run(str(env_dir / "bin" / "atlinter-ray"), "run.progress=false",
               "resources.local_cpus=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs held-out truth" in done.stdout and "PSNR" in done.stdout
    assert (empty / "outputs" / "volumes" / "mni152_t1.ome.zarr" / "zarr.json").is_file()
    bad = run(str(env_dir / "bin" / "atlinter-ray-download"), "genes=[]")
    assert bad.returncode == 2 and "genes" in bad.stderr  # one exit rule for every job


def test_every_registered_model_has_its_config_group() -> None:
    for name in available_models():
        path = REPO / "conf" / "model" / f"{name}.yaml"
        assert path.is_file(), f"model {name!r} has no conf/model/{name}.yaml"
        assert OmegaConf.load(path).name == name
    on_disk = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    assert on_disk == set(available_models())


def _init_defaults(factory: type) -> dict[str, object]:
    """Keyword defaults of a model class's constructors, subclass last (it wins)."""
    found: dict[str, object] = {}
    for klass in reversed(factory.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            for p in inspect.signature(init).parameters.values():
                if p.default is not inspect.Parameter.empty:
                    found[p.name] = getattr(factory, f"default_{p.name}", p.default) \
                        if p.default is None else p.default
    return found


def test_model_config_groups_list_the_model_defaults() -> None:
    """conf/model/*.yaml show each option at the model's own default: one truth, two views."""
    for module in set(base._LAZY_MODULES.values()):
        importlib.import_module(module)
    for name in available_models():
        params = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml").params)
        defaults = _init_defaults(base._REGISTRY[name])
        for key, value in params.items():
            assert key in defaults, f"conf/model/{name}.yaml: {key!r} is not an option of {name}"
            default = defaults[key]
            default = list(default) if isinstance(default, tuple) else default
            assert value == default, f"conf/model/{name}.yaml: {key}={value!r}, the model's is {default!r}"


def test_the_lazy_table_names_exactly_what_its_modules_register() -> None:
    for module in set(base._LAZY_MODULES.values()):
        importlib.import_module(module)
    assert set(base._REGISTRY) == set(available_models())
