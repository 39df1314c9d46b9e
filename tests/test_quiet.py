"""Quiet failures: one line per failure, worker tracebacks only with run.debug=true."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset
from atlinter_ray.execution import batches, run_work
from atlinter_ray.planning import plan_dataset, plan_slabs
from atlinter_ray.quiet import quiet_failures, traceback_log
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import prepare_image, real_volume, sections_of, write_dataset
from atlinter_ray.worker import WorkerSpec

SECTIONS = [4, 20, 40, 60, 86]


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """A console handler on the root logger, removed (with its filters) afterwards."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    yield out
    root.removeHandler(handler)
    quiet_failures(False)


def _fail(logger: logging.Logger) -> None:
    try:
        raise FileNotFoundError("in/vanished.npy")
    except FileNotFoundError:
        logger.exception("task g/4-20 failed")


def test_a_failure_of_ours_is_dropped_or_named_with_its_traceback_file(console) -> None:
    ours, theirs = logging.getLogger("atlinter_ray.worker"), logging.getLogger("elsewhere")
    quiet_failures(False)
    _fail(ours)
    ours.warning("a plain warning stays")
    _fail(theirs)
    text = console.getvalue()
    assert "task g/4-20 failed" not in text.split("a plain warning stays")[0]
    assert "a plain warning stays" in text and text.count("Traceback") == 1  # others' only

    console.seek(0)
    console.truncate()
    log_file = traceback_log()
    before = log_file.read_text() if log_file.exists() else ""
    quiet_failures(True)
    _fail(ours)
    line = console.getvalue()
    assert "Traceback" not in line
    assert line.strip() == (f"task g/4-20 failed: FileNotFoundError: in/vanished.npy "
                            f"(traceback in {log_file})")
    kept = log_file.read_text()[len(before):]
    assert "Traceback (most recent call last)" in kept and "in _fail" in kept


def _worker_stderr(pid: int) -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # the actor's own .err
    return "".join(p.read_text() for p in logs.glob(f"worker-*-{pid}.err"))


@pytest.mark.ray
@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_worker_tracebacks_reach_stderr_only_with_debug(ray_cluster, tmp_path: Path,
                                                        debug: bool) -> None:
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    ds = load_dataset(str(tmp_path / "in" / "g"), None)
    identity = prepare_image(VolumeStore(str(tmp_path / "out")), ds).identity
    broken = dataclasses.replace(ds, images_url=str(tmp_path / "in" / "vanished.npy"))
    spec = WorkerSpec("linear", None, {}, {ds.id: broken}, {ds.id: "uint8"},
                      str(tmp_path / "out"), images={ds.id: identity})
    resources = Config().resources
    resources.min_workers = resources.max_workers = 1
    quiet_failures(debug)
    try:
        tasks = plan_slabs(plan_dataset(ds.id, ds.section_numbers, ds.n_slices), ds.n_slices,
                           8)[:2]
        rows = list(run_work(batches(tasks, 1), spec, resources, lambda _: []))
    finally:
        quiet_failures(False)
    assert all(not r.done and "vanished.npy" in r.error for r in rows)
    stderr = _worker_stderr(rows[0].worker.pid)
    assert "failed" not in stderr or debug
    assert "Traceback" not in stderr
    if debug:
        named = [ln for ln in stderr.splitlines() if "(traceback in " in ln]
        assert named and "vanished.npy" in named[0]
        path = Path(named[0].rsplit("(traceback in ", 1)[1].rstrip(")"))
        assert "Traceback (most recent call last)" in path.read_text()


@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_an_outage_prints_one_line_per_failure_and_a_traceback_file_only_with_debug(
        faulty_s3, tmp_path: Path, debug: bool) -> None:
    """The command line, serial: a store that refuses every slice write (exit 1)."""
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    name = f"outage-{'debug' if debug else 'quiet'}"
    faulty_s3.proxy.add("503", method="PUT", path=rf"/atlas-out/{name}/g\.ome\.zarr/0/c/")
    opts = [f"+output.storage_options.{k}={v}" for k, v in faulty_s3.options.items()]
    args = ["data=allen", f"data.root={tmp_path / 'in'}", "data.genes=[g]", "model=linear",
            "run.serial=true", "run.progress=false", f"run.debug={str(debug).lower()}", *opts,
            f"output.root=s3://atlas-out/{name}", "resources.max_storage_errors=2",
            "+output.storage_options.config_kwargs.retries.max_attempts=1"]
    job = subprocess.run([sys.executable, "-m", "atlinter_ray", *args], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert job.returncode == 1, job.stderr
    printed = job.stdout + job.stderr
    assert "storage failures in a row" in printed
    failures = [ln for ln in printed.splitlines() if "failed" in ln and "task" in ln]
    assert failures
    if not debug:
        assert "Traceback" not in printed and "(traceback in " not in printed
        return
    named = [ln for ln in printed.splitlines() if "(traceback in " in ln]
    assert named and "Traceback" not in "\n".join(named)
    path = Path(named[0].rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in path.read_text()
