"""Ctrl-C and SIGTERM mid-run of the real job: one line, exit 130 / 143, no traceback,
the workers and the local cluster gone, and the rerun finishes with the clean run's bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from atlinter_ray import pipeline
from atlinter_ray.cli import compose_config, conf_dir
from atlinter_ray.interrupts import Interrupted, exit_status, signal_name, stop_on_signals

GENE = "mni152_t1"
# TV-L1 takes seconds per task, so the job is still computing well after its first slab is
# written (with DIS the 5 slabs left took 0.2 s, and a loaded machine let them all finish
# before the signal was handled)
ARGS = ["model=tvl1", "run.progress=false", "resources.local_cpus=2", "resources.min_workers=1",
        "resources.max_workers=1"]


def image_digests(root: Path) -> dict[str, str]:
    """sha256 of every file of the image and its quicklook (the run's generation left out)."""
    out = {}
    image = root / f"{GENE}.ome.zarr"
    for path in sorted(p for p in image.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        if path == image / "zarr.json":
            meta = json.loads(blob)
            meta["attributes"]["atlinter_ray"].pop("generation")
            meta["attributes"]["atlinter_ray"].pop("complete", None)
            blob = json.dumps(meta, sort_keys=True).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(blob).hexdigest()
    quicklook = root / f"{GENE}.quicklook.png"
    if quicklook.is_file():
        out[quicklook.name] = hashlib.sha256(quicklook.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, str]:
    """The bytes of an uninterrupted run of the same command (in this process, no Ray)."""
    root = tmp_path_factory.mktemp("clean") / "vol"
    composed = compose_config(conf_dir(), "config", [f"output.root={root}", "run.serial=true",
                                                     *ARGS])
    assert pipeline.run(OmegaConf.to_object(composed)).ok
    return image_digests(root)


def _ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """The processes of the Ray cluster the job started (they name its temp dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if ray_tmp in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
    return found


def _wait_for_a_written_slice(job: subprocess.Popen, image: Path) -> None:
    """Until the job has written slice data (it is mid-run); fail if it ends first."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        if any(p.is_file() and p.name != "zarr.json" for p in (image / "0").rglob("*")):
            return
        time.sleep(0.1)
    pytest.fail(f"the job never got to write a slice (exit status {job.poll()})")


def test_sigterm_that_a_library_reraises_as_a_plain_keyboardinterrupt_still_exits_143() -> None:
    # ray.get runs the handler while it waits, drops its exception and raises its own
    caught: KeyboardInterrupt | None = None
    try:
        with stop_on_signals():
            try:
                signal.raise_signal(signal.SIGTERM)
            except Interrupted:
                raise KeyboardInterrupt from None
    except KeyboardInterrupt as exc:  # caught here, so that a failure does not abort pytest
        caught = exc
    assert caught is not None
    assert (signal_name(caught), exit_status(caught)) == ("SIGTERM", 143)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_so_in_one_line_and_a_rerun_finishes_it(
    tmp_path: Path, clean: dict[str, str], signum: int, status: int
) -> None:
    root = tmp_path / "vol"
    ray_tmp = tempfile.mkdtemp(prefix="i21", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "atlinter_ray", f"output.root={root}", *ARGS]
    try:
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _wait_for_a_written_slice(job, root / f"{GENE}.ome.zarr")
            if signum == signal.SIGINT:
                os.killpg(job.pid, signum)  # Ctrl-C reaches the terminal's whole group
            else:
                job.send_signal(signum)  # a scheduler ends the job's process
            out, err = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        assert job.returncode == status, err
        assert "Traceback" not in out + err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"atlinter_ray: {signal.Signals(signum).name} received, stopped")
        assert "kept in output.root" in lines[0] and "rerun the same command to resume" in lines[0]
        deadline = time.monotonic() + 120  # the cluster's processes end on their own
        while _ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(ray_tmp), "the job left its Ray cluster running"
        assert image_digests(root) != clean  # it really stopped mid-run

        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr
        assert "complete 1, incomplete 0" in again.stdout
        assert image_digests(root) == clean
    finally:
        for proc in _ray_processes(ray_tmp):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
