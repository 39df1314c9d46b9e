"""Host work per 7-slice task, old worker path vs this one, on one CPU core.

Issue 14 ("How we will know"): the CPU cost per task of everything a GPU does not do
for us: reading the two sections, moving frames, converting, compressing, writing.
Target: at most 8 ms per 7-slice task on one core. Both paths run in this one
invocation, each in its own process pinned to the same core: the baseline is the
package as it was at ``--baseline-rev`` (exported from git into a temporary folder),
the candidate is this working tree.

Per path and model kind, a worker (:class:`atlinter_ray.worker.TaskWorker`, as Ray
or ``run.serial`` runs it) runs 65 tasks of a 320 x 456 uint8 coronal dataset
(sections every 8 slices; a task is a slab of 8, one section and 7 predicted slices, or
in versions before slabs one gap; ``--rgb`` for 3 channels) into
a local zarr store, ``--tasks-per-batch`` tasks per call, with a trivial model whose
forward is a handful of tensor operations, so the device's share is negligible:

* ``any-t``: blend at t (RIFE 4.x's path: one item per slice);
* ``midpoint``: blend at 0.5 driven by bisection (RIFE_HD's, CAIN's path);
* ``flow``: a zero flow (RAFT's, MaskFlowNet's path: two flows per pair, then warps).

What is measured: the process's CPU time per task (all threads, one core), and in a
separate pass the I/O alone, as the io threads do it: reading the two sections and
committing the task (``write_slices`` and ``mark_done``, with the task's reduction
where the package has one; zarr's own threads included).
On a GPU the tensor operations run on the device; their host share is the launch, about
``--launch-us`` (10 µs, the usual eager dispatch + launch cost) each, counted with
``torch.profiler`` in a second pass. The host work per task on a GPU machine is then::

    old:  process CPU time - time inside top-level torch operators + launches
          (its conversions, padding copies, channel repeats and warps are numpy/OpenCV)
    new:  I/O + launches
          (everything else is a torch operator on the device's frames)

Operator times come from the profiler's wall clock, which other processes on a busy
core inflate: that lowers the old path's host figure, never the new one's.
The raw process CPU time is reported too (an upper bound). From the host work and the
issue's device time per task in bf16 (RIFE 4.x about 0.15 ms, RAFT about 5 ms), the
GPU utilisation model is ``u = d / max(d, h / k)`` for ``k`` cores carrying I/O per GPU
(``--io-cores``): the device is busy only while the host keeps up.

Usage (from the repository root)::

    python benchmarks/bench_host_cost.py                       # ~2 min on 2 cores
    python benchmarks/bench_host_cost.py --baseline-rev HEAD~3 --rgb
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("any-t", "midpoint", "flow")
#: Device time per 7-slice task in bf16 from issue 14 (RIFE 4.x and RAFT, H100).
DEVICE_MS = {"rife_v4 (any-t)": 0.15, "raft (flow)": 5.0}


def _worker_main(kind: str, rgb: bool, tasks_per_batch: int, core: int, repeats: int) -> dict:
    """Child process: time one path (whatever ``atlinter_ray`` is on sys.path)."""
    import numpy as np
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    from atlinter_ray import planning
    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.models.base import register_model
    from atlinter_ray.models.torch_runtime import TorchFlowEstimator, TorchPairInterpolator
    from atlinter_ray.planning import plan_dataset
    from atlinter_ray.store import VolumeStore
    from atlinter_ray.worker import TaskWorker, WorkerSpec

    @register_model("bench_blend")
    class Blend(TorchPairInterpolator):
        def __init__(self, **kw: Any) -> None:
            super().__init__(torch.nn.Identity(), None, **kw)

        def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = t[:, None, None, None]
            return (1 - tt) * a + tt * b

    @register_model("bench_mid")
    class Mid(Blend):
        arbitrary_t = False

    @register_model("bench_flow")
    class Zero(TorchFlowEstimator):
        def __init__(self, **kw: Any) -> None:
            super().__init__(torch.nn.Identity(), None, **kw)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a[:, :2] - b[:, :2]) * 0.0

    name = {"any-t": "bench_blend", "midpoint": "bench_mid", "flow": "bench_flow"}[kind]
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    sections = list(range(0, 528, 8))
    yy, xx = np.mgrid[0:320, 0:456]
    inside = (((yy - 160) / 140) ** 2 + ((xx - 228) / 200) ** 2) < 1  # brain-like: background
    shape = (len(sections), 320, 456, 3) if rgb else (len(sections), 320, 456)
    noise = rng.normal(0, 8, shape)
    base = 100 + 60 * np.sin(xx / 7) * np.cos(yy / 11)
    images = (inside * (base if not rgb else base[..., None]) + noise).clip(0, 255).astype(np.uint8)
    np.save(tmp / "g.npy", images)
    (tmp / "g.json").write_text(json.dumps({"section_numbers": sections, "axis": "coronal"}))
    ds = load_dataset(str(tmp / "g"), (528, 320, 456), {})
    tasks: list[Any] = plan_dataset(ds.id, ds.section_numbers, ds.n_slices, "exact", "copy")
    layout: dict[str, Any] = {}
    if hasattr(planning, "plan_slabs"):  # since issue 19 a task owns whole slabs: 8 here,
        from atlinter_ray.layout import Layout  # a section and its 7 predicted slices

        tasks = planning.plan_slabs(tasks, ds.n_slices, 8)
        layout["layout"] = Layout(slab=8)
    tasks = [t for t in tasks if len(t.predicted) == 7]
    store = VolumeStore(str(tmp / "out"))
    extra: dict[str, Any] = {}
    mark_done = store.mark_done
    if "fingerprint" in inspect.signature(store.prepare_image).parameters:
        # since issue 9 an image and its markers are bound to the input and a generation
        from atlinter_ray.identity import fingerprint

        identity = store.prepare_image(ds, "uint8", {"bench": kind}, fingerprint(ds),
                                       **layout).identity
        extra["images"] = {ds.id: identity}
        mark_done = functools.partial(store.mark_done, identity)
    else:
        store.prepare_image(ds, "uint8", {"bench": kind})
    spec = WorkerSpec(name, None, {"device": "cpu"}, {ds.id: ds}, {ds.id: "uint8"},
                      str(tmp / "out"), **extra)
    worker = TaskWorker(spec)
    batches = [tasks[i : i + tasks_per_batch] for i in range(0, len(tasks), tasks_per_batch)]

    def one_pass() -> None:
        for batch in batches:
            rows = worker.run(batch)
            assert all(r.done for r in rows), rows

    one_pass()  # warm-up: files, caches, zarr metadata
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        one_pass()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    from atlinter_ray.dataset import read_sections

    # The I/O alone, as the io threads do it (same calls in both paths): read the two
    # sections, write the task's slices and its marker; zarr's own threads included.
    slabs = "layout" in layout
    blocks = {t.task_id: np.stack([read_sections(ds, [t.sources[0]])[0]] * len(t.jobs))
              for t in tasks}
    c0 = time.process_time()
    for t in tasks:
        read_sections(ds, t.sources)
        first = t.first if slabs else t.jobs[0].slice
        objects = store.write_slices(ds, first, blocks[t.task_id])
        record = {"task_id": t.task_id, "slices": [], "objects": objects or {}}
        if slabs:  # the marker carries the task's reduction
            from atlinter_ray.finishing import reduce_slab
            from atlinter_ray.layout import as_slab

            mark_done(t.task_id, record,
                      reduce_slab(ds, as_slab(ds, blocks[t.task_id]), first).to_bytes())
        else:
            mark_done(t.task_id, record)
    io_cpu = time.process_time() - c0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_pass()
    top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    n = len(tasks)
    return {
        "tasks": n, "cpu_ms_per_task": 1e3 * min(cpu) / n, "wall_ms_per_task": 1e3 * min(wall) / n,
        "io_ms_per_task": 1e3 * io_cpu / n,
        "torch_op_ms_per_task": 1e-3 * sum(e.cpu_time_total for e in top) / n,
        "torch_ops_per_task": len(top) / n,
    }


def _run_path(src: Path, args: argparse.Namespace, kind: str) -> dict:
    """One path in a child process with ``src`` first on sys.path."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--tasks-per-batch", str(args.tasks_per_batch), "--core", str(args.core),
           "--repeats", str(args.repeats)] + (["--rgb"] if args.rgb else [])
    out = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} in {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run both paths for every kind; print the table; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="8bbea28",
                        help="git revision of the old path (default: main before issue 14)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--rgb", action="store_true")
    parser.add_argument("--tasks-per-batch", type=int, default=16)
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--launch-us", type=float, default=10.0)
    parser.add_argument("--io-cores", default="1,4,8")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_worker_main(args.child, args.rgb, args.tasks_per_batch, args.core,
                                      args.repeats)))
        return
    load = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_rev],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for kind in args.kinds.split(","):
            for label, src in (("old", old), ("new", ROOT)):
                r = _run_path(src, args, kind)
                launches = r["torch_ops_per_task"] * args.launch_us / 1e3
                if label == "old":  # everything but the torch operators stays on the host
                    r["host_ms_per_task"] = r["cpu_ms_per_task"] - r["torch_op_ms_per_task"] + launches
                else:  # the main thread only launches operators; io threads read and commit
                    r["host_ms_per_task"] = r["io_ms_per_task"] + launches
                results.setdefault(kind, {})[label] = r
                print(f"{kind:9s} {label}: host {r['host_ms_per_task']:6.2f} ms/task  (cpu "
                      f"{r['cpu_ms_per_task']:6.2f}: io {r['io_ms_per_task']:5.2f}, torch ops "
                      f"{r['torch_op_ms_per_task']:5.2f}"
                      f" ms in {r['torch_ops_per_task']:.0f} ops; wall {r['wall_ms_per_task']:6.2f})",
                      flush=True)
    cores = [int(c) for c in args.io_cores.split(",")]
    model = {}
    for label_model, d in DEVICE_MS.items():
        kind = "flow" if "flow" in label_model else "any-t"
        if kind not in results:
            continue
        for path in ("old", "new"):
            h = results[kind][path]["host_ms_per_task"]
            ks = [1] if path == "old" else cores  # the old worker did all of it in one thread
            model[f"{label_model} {path}"] = {
                f"{k} core(s)": round(d / max(d, h / k), 4) for k in ks}
    print("GPU utilisation model u = d / max(d, h / k):")
    for key, row in model.items():
        print(f"  {key:26s} " + "  ".join(f"{c}: {u:.1%}" for c, u in row.items()))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"host-cost-{'rgb' if args.rgb else 'grey'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "baseline_rev": args.baseline_rev, "load_average_at_start": load,
        "size": [320, 456, 3 if args.rgb else 1], "slices_per_task": 7,
        "tasks_per_batch": args.tasks_per_batch, "launch_us": args.launch_us,
        "device_ms_per_task_bf16": DEVICE_MS, "paths": results, "gpu_utilisation_model": model,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
