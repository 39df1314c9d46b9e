"""Scale: many datasets in one job, ``s3://`` against local disk, 12 genes against the predecessor.

Issue 9's benchmark. One invocation measures, each run in its own process on a local
Ray cluster started before the clock (as on a real cluster), model ``linear``, every
job as a user runs it (manifest, finishing with pyramid, quick-look and montage):

* **many small datasets** (``--small 50,200``): a manifest of ``n`` copies of the bundled
  sample's volume (91 x 79 x 77 grey uint8, a section every 8 slices), 2 workers:
  slices/s and the peak memory of the driver process (PSS from ``smaps_rollup`` and
  peak RSS). The ratios are against the first ``n``: driver memory must stay flat;
* **s3:// against local** (``--s3-genes 2``): the same full-size genes read from and
  written to an S3 server on loopback (``--s3-server``: moto, in this parent process,
  or SeaweedFS, its own process; either way on the same 2 cores), against the same
  genes on local disk. Target: >= 80 % of local slices/s. One gene then runs again
  through the fault proxy (no fault set), which counts its requests by kind (level 0,
  pyramid, input, markers, reductions...) and per slice (target: <= 0.5);
* **client CPU per slice written to S3** (``--client-cpu``, on with ``--s3-genes``):
  one full-size gene's slices written with ``VolumeStore.write_slices`` a slab a task,
  each with its reduction and marker, to SeaweedFS (its own process, so this process's
  CPU is the client's alone), through s3fs (the client before issue 19) and through
  obstore (:mod:`atlinter_ray.objects`), and to local disk (the floor: encoding and
  files), 3 rounds each, alternating;
* **12 full-size genes** (``--genes 12``; 528 x 320 x 456 RGB uint8, a section every 8
  slices, made as ``bench_pipeline.py`` makes its data) with 2 workers, against the
  predecessor's own loop (atlinter 0.2.3's ``predict_volume``, as ``bench_pipeline.py``
  runs it) on one gene. Target: >= 12x the predecessor's time per gene (issue 19).
  ``--rounds N`` runs the two N times, interleaved, so both see the same load; the
  ratio is the median of the rounds' ratios (the same for local and s3://).

``--profile N`` instead runs N full-size genes in this process (``run.serial``) under
cProfile, the io threads' commits included, and prints where the write path spends
its time (compression, zarr, file writes, finishing). ``--profile-writes`` times one
slice's write (320 x 456 RGB uint8) per zstd level, and ``VolumeStore.write_slices``
(whole slabs of shards) against zarr's own write of the same shards, per slice.
``--quick`` is a smoke run (< 2 min): 5 and 20 small datasets, 1 gene on S3, 2 genes.

Usage::

    python benchmarks/bench_scale.py --out benchmarks/results      # ~6 min on 2 cores
    python benchmarks/bench_scale.py --genes 0 --small '' --s3-server seaweedfs
    python benchmarks/bench_scale.py --quick
    python benchmarks/bench_scale.py --profile 2
    python benchmarks/bench_scale.py --profile-writes
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import REFERENCE, SPACING, PeakPSS, make_dataset, predecessor

#: Storage options of the S3 server, handed to the child processes.
S3_ENV = "ATLINTER_BENCH_S3"
#: ``output.slab`` of every job (``--slab``), handed to the child processes.
SLAB_ENV = "ATLINTER_BENCH_SLAB"
#: ``output.zstd_level`` of every job (``--zstd-level``), handed to the child processes.
LEVEL_ENV = "ATLINTER_BENCH_ZSTD_LEVEL"


def small_datasets(folder: Path, n: int) -> Path:
    """``n`` copies of the bundled sample's volume as datasets; return their manifest."""
    from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset

    volume = real_volume()
    sections = list(range(3, volume.shape[0], SPACING))
    images = sections_of(volume, sections, "coronal")
    paths = [write_dataset(folder, f"s{i:03d}", images, sections,
                           reference_shape=list(volume.shape)) for i in range(n)]
    return manifest(folder / f"small-{n}.txt", [str(p) for p in paths])


def manifest(path: Path, urls: list[str]) -> Path:
    """Write a manifest (one dataset URL per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(urls) + "\n")
    return path


def upload(paths: list[Path], options: dict[str, Any], prefix: str) -> list[str]:
    """Copy datasets (``.npy`` + ``.json``) to ``prefix`` on S3; return their URLs."""
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    urls = []
    for npy in paths:
        for local in (npy, npy.with_suffix(".json")):
            fs.put_file(str(local), f"{prefix}/{local.name}")
        urls.append(f"s3://{prefix}/{npy.name}")
    return urls


def warm_up(options: dict[str, Any]) -> None:
    """Write a few objects to the output bucket before the clock: SeaweedFS makes a
    bucket's volumes on its first write (seconds, once per server), which an S3 bucket in
    use does not; without this the first s3:// round alone paid for it."""
    from atlinter_ray.objects import open_objects

    objects = open_objects("s3://atlas-out/warm-up", options)
    blobs = {f"o{i}": bytes(2**20) for i in range(8)}
    objects.put_many(blobs)
    objects.delete(list(blobs))


def config(manifest_path: Path, root: str, options: dict[str, Any], workers: int,
           tasks_per_batch: int = 1) -> Any:
    """The job's config: the manifest's datasets, model linear, ``workers`` actors."""
    from atlinter_ray.config import Config

    cfg = Config()
    cfg.data.manifest = str(manifest_path)
    cfg.data.storage_options = dict(options)
    cfg.model.name, cfg.model.params = "linear", {}
    cfg.output.root, cfg.output.storage_options = root, dict(options)
    cfg.resources.min_workers = cfg.resources.max_workers = workers
    cfg.resources.tasks_per_batch = tasks_per_batch
    cfg.output.slab = int(os.environ.get(SLAB_ENV, cfg.output.slab))
    cfg.output.zstd_level = int(os.environ.get(LEVEL_ENV, cfg.output.zstd_level))
    cfg.run.progress = False
    return cfg


def pipeline(manifest_path: Path, root: str, options: dict[str, Any], workers: int,
             tasks_per_batch: int) -> dict:
    """The job on a local Ray cluster started before the clock."""
    import ray

    from atlinter_ray.pipeline import run
    from atlinter_ray.testing.ray_head import start_local_ray

    start_local_ray(num_cpus=2)
    cfg = config(manifest_path, root, options, workers, tasks_per_batch)
    start = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    assert summary.ok, (summary.failures, summary.incomplete)
    return {"wall_s": wall, "slices": summary.slices_written, "datasets": len(summary.datasets)}


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print its JSON result (called in a fresh process)."""
    options = json.loads(os.environ.get(S3_ENV, "{}")) if args.root.startswith("s3://") else {}
    cpu = time.process_time()
    with PeakPSS() as mem:
        if args.mode == "predecessor":
            npy = Path(Path(args.manifest).read_text().split()[0])
            out = Path(args.root)
            out.mkdir(parents=True, exist_ok=True)
            result = predecessor(npy, "linear", out)
            result["datasets"] = 1
        else:
            result = pipeline(Path(args.manifest), args.root, options, args.workers,
                              args.tasks_per_batch)
    result["driver_cpu_s"] = time.process_time() - cpu  # Ray's start included
    result["driver_peak_pss_mb"] = mem.driver_peak / 2**20
    result["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_pss_with_workers_mb"] = mem.peak / 2**20
    result["slices_per_s"] = result["slices"] / result["wall_s"]
    result["s_per_dataset"] = result["wall_s"] / result["datasets"]
    print("RESULT " + json.dumps(result), flush=True)


def machine_cpu_s() -> float:
    """CPU seconds every process of the machine has used (idle and I/O wait excluded)."""
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def measure(mode: str, manifest_path: Path, root: str, workers: int,
            s3: dict[str, Any] | None, tasks_per_batch: int = 1,
            server: Any = None) -> dict:
    """One measurement in a child process, with the load average before it and the CPU
    the S3 server (``server``, an :class:`S3Server`) used during it."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           S3_ENV: json.dumps(s3 or {})}
    cmd = [sys.executable, __file__, "--mode", mode, "--manifest", str(manifest_path),
           "--root", root, "--workers", str(workers),
           "--tasks-per-batch", str(tasks_per_batch)]
    load, cpu = os.getloadavg()[0], server.server_cpu_s() if server else 0.0
    busy = machine_cpu_s()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    busy = machine_cpu_s() - busy
    if done.returncode:
        raise RuntimeError(f"{mode} {manifest_path.name} failed:\n{done.stderr[-4000:]}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    stored = 0
    if "://" not in root:  # the next run starts on an empty disk cache of outputs
        stored = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
        shutil.rmtree(root, ignore_errors=True)
    return {**json.loads(line[7:]), "load_average_1min_before": load, "output_bytes": stored,
            "s3_server_cpu_s": (server.server_cpu_s() - cpu) if server else 0.0,
            "machine_cpu_s": busy}


def client_cpu(npy: Path, folder: Path, rounds: int = 3) -> dict[str, dict[str, float]]:
    """CPU and wall ms per slice of one gene's commits (a task per slab of the default
    layout): to SeaweedFS through s3fs and through obstore, and to local disk."""
    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.identity import fingerprint
    from atlinter_ray.layout import DEFAULT_SLAB, Layout
    from atlinter_ray.objects import FsspecObjects
    from atlinter_ray.store import VolumeStore
    from atlinter_ray.testing.faulty_s3 import S3Server

    task = int(os.environ.get(SLAB_ENV, DEFAULT_SLAB))
    ds = load_dataset(str(npy))
    sections = np.moveaxis(np.load(npy), -1, 1)  # (S, 3, H, W)
    n = REFERENCE[0]
    frames = sections[np.minimum(np.arange(n) // SPACING, len(sections) - 1)]
    times: dict[str, list[tuple[float, float]]] = {"s3fs": [], "obstore": [], "local": []}
    with S3Server(backend="seaweedfs") as s3:
        for r in range(rounds):
            for client in times:
                url = (str(folder / f"client-{r}") if client == "local"
                       else f"s3://atlas-out/client-{client}-{r}")
                store = VolumeStore(url, None if client == "local" else s3.direct)
                if client == "s3fs":
                    store.objects = FsspecObjects(url, s3.direct)
                state = store.prepare_image(ds, "uint8", {"model": "linear"}, fingerprint(ds),
                                            Layout(slab=task))
                wall, cpu = time.perf_counter(), time.process_time()
                for first in range(0, n, task):
                    task_id = f"{ds.id}/{first}-{min(first + task, n) - 1}"
                    objects = store.write_slices(ds, first, frames[first:first + task])
                    store.mark_done(state.identity, task_id, {"objects": objects},
                                    b"\0" * 4096)  # a reduction's worth of bytes
                times[client].append((1e3 * (time.process_time() - cpu) / n,
                                      1e3 * (time.perf_counter() - wall) / n))
    out = {}
    for client, runs in times.items():
        cpus, walls = sorted(c for c, _ in runs), sorted(w for _, w in runs)
        out[client] = {"cpu_ms_per_slice_min": cpus[0],
                       "cpu_ms_per_slice_median": cpus[len(cpus) // 2],
                       "wall_ms_per_slice_min": walls[0],
                       "wall_ms_per_slice_median": walls[len(walls) // 2]}
    return out


def profile(n: int, folder: Path) -> None:
    """Run ``n`` full-size genes in this process under cProfile; print the write path's costs."""
    from atlinter_ray import worker
    from atlinter_ray.pipeline import run

    genes = [make_dataset(folder / "genes", seed, f"g{seed:02d}") for seed in range(n)]
    cfg = config(manifest(folder / "genes.txt", [str(p) for p in genes]),
                 str(folder / "out"), {}, 1)
    cfg.run.serial = True
    threads: list[cProfile.Profile] = []
    commit = worker.commit_task

    def profiled_commit(*a: Any, **kw: Any) -> None:
        """The io thread's commit under its own profiler (cProfile sees one thread)."""
        prof = cProfile.Profile()
        threads.append(prof)
        prof.runcall(commit, *a, **kw)

    worker.commit_task = profiled_commit
    main = cProfile.Profile()
    start = time.perf_counter()
    summary = main.runcall(run, cfg)
    wall = time.perf_counter() - start
    assert summary.ok
    stats = pstats.Stats(main)
    for prof in threads:
        stats.add(prof)
    stats.dump_stats(str(folder / "profile.pstats"))
    print(f"{n} genes, serial, under cProfile: {wall:.1f} s ({wall / n:.2f} s per gene)")
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(
        r"commit_task|write_slices|encode|_put_many|pipe|mark_done|finish_dataset|_pyramid|"
        r"downsample2|quicklook_png|montage_png|update_attrs|_read_slab|create_array|setitem")


def profile_writes(folder: Path, slices: int = 64) -> None:
    """ms per 320 x 456 RGB slice: zstd levels, zarr's write against ours, tiles, shards."""
    import numcodecs
    import zarr

    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.identity import fingerprint
    from atlinter_ray.layout import Layout, array_spec
    from atlinter_ray.store import VolumeStore

    npy = make_dataset(folder / "in", 0, "g")
    ds = load_dataset(str(npy))
    frames = np.ascontiguousarray(np.moveaxis(np.load(npy)[:slices], -1, 1))  # (K, 3, H, W)
    print(f"{slices} slices of {frames.shape[1:]} uint8 ({frames[0].nbytes / 1e3:.0f} kB raw)")
    for level in (1, 3, 5):
        codec = numcodecs.Zstd(level=level)
        start = time.perf_counter()
        size = sum(len(codec.encode(f)) for f in frames)
        print(f"  zstd level {level}: {1e3 * (time.perf_counter() - start) / slices:.2f} ms, "
              f"{size / slices / 1e3:.0f} kB per slice")
    layouts = {"slab 8, 32x32 (default)": Layout(),
               "slab 16, 32x32": Layout(slab=16), "slab 8, 64x64": Layout(chunks=(64, 64)),
               "slab 8, whole plane": Layout(chunks=None)}
    for name, layout in layouts.items():
        store = VolumeStore(str(folder / name.replace(" ", "_")))
        store.prepare_image(ds, "uint8", {"model": "linear"}, fingerprint(ds), layout)
        start = time.perf_counter()
        for k in range(0, slices, layout.slab):
            store.write_slices(ds, k, frames[k : k + layout.slab])
        ours = 1e3 * (time.perf_counter() - start) / slices
        spec = array_spec(ds, layout)
        twin = zarr.create_array(str(folder / f"twin-{name}"), shape=spec.shape,
                                 chunks=spec.chunks, shards=spec.shards, dtype="uint8",
                                 fill_value=0, compressors=zarr.codecs.ZstdCodec(level=1),
                                 config={"write_empty_chunks": True})
        start = time.perf_counter()
        for k in range(0, slices, layout.slab):
            twin[:, k : k + layout.slab] = np.moveaxis(frames[k : k + layout.slab], 0, 1)
        theirs = 1e3 * (time.perf_counter() - start) / slices
        print(f"  {name:24s} write_slices {ours:6.2f} ms, zarr's own write {theirs:6.2f} ms "
              "per slice")


#: Which part of a job a request serves, by its path (first match).
REQUEST_KINDS = {
    "level 0 slices": r"\.ome\.zarr/0/c/", "pyramid": r"\.ome\.zarr/[1-9]\d*/c/",
    "input": r"^/atlas-in/", "markers": r"/_progress/.*\.done",
    "listings": r"\?list-type", "metadata": r"zarr\.json$", "lease": r"/_lease\.json$",
    "pictures, sidecar, summary": r"\.png$|\.provenance\.json$|/run_summary\.json$",
    "deletes": r"\?delete", "": r"",
}


def request_kinds(seen: list[tuple[str, str]]) -> dict[str, int]:
    """``{"<kind> <METHOD>": count}`` of the requests a proxy saw (``""``: everything else)."""
    counts: dict[str, int] = {"total": len(seen)}
    for method, path in seen:
        kind = next(k for k, pattern in REQUEST_KINDS.items() if re.search(pattern, path))
        key = f"{kind or 'other'} {method}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def report(results: dict[str, dict]) -> None:
    """Print the table of every measurement and its ratios."""
    print(f"{'run':<22}{'datasets':>9}{'wall s':>9}{'slices/s':>10}{'s/dataset':>10}"
          f"{'driver PSS MB':>15}{'driver RSS MB':>15}{'load':>7}{'S3 server CPU s':>17}"
          f"{'all CPU s':>11}")
    for name, r in results.items():
        print(f"{name:<22}{r['datasets']:>9}{r['wall_s']:>9.1f}{r['slices_per_s']:>10.1f}"
              f"{r['s_per_dataset']:>10.2f}{r['driver_peak_pss_mb']:>15.0f}"
              f"{r['driver_peak_rss_mb']:>15.0f}{r['load_average_1min_before']:>7.2f}"
              f"{r['s3_server_cpu_s']:>17.1f}{r['machine_cpu_s']:>11.1f}")


def main() -> None:
    """Make the data, run every measurement, print and save the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", default="50,200", help="numbers of small datasets ('': none)")
    parser.add_argument("--s3-genes", type=int, default=2, help="0: no s3 run")
    parser.add_argument("--s3-server", choices=("moto", "seaweedfs"), default="moto",
                        help="the S3 server of the s3 runs (SeaweedFS checks signatures)")
    parser.add_argument("--client-cpu", action=argparse.BooleanOptionalAction, default=None,
                        help="client CPU per slice, s3fs against obstore (default: with "
                             "--s3-genes)")
    parser.add_argument("--genes", type=int, default=12, help="0: no run against the predecessor")
    parser.add_argument("--rounds", type=int, default=1,
                        help="predecessor and genes runs, and local and s3 runs, interleaved "
                             "(each ratio: the median of the rounds')")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks-per-batch", type=int, default=1,
                        help="resources.tasks_per_batch of every job (default: the config's)")
    parser.add_argument("--slab", type=int, default=None,
                        help="output.slab of every job (default: the config's)")
    parser.add_argument("--zstd-level", type=int, default=None,
                        help="output.zstd_level of every job (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5,20 / 1 / 2")
    parser.add_argument("--profile", type=int, default=0, help="profile N genes instead")
    parser.add_argument("--profile-writes", action="store_true",
                        help="time compression levels, zarr's writes and ours, tiles, shards")
    parser.add_argument("--out", default=None, help="folder for scale.json")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    if args.profile or args.profile_writes:
        with tempfile.TemporaryDirectory() as tmp:
            if args.profile_writes:
                profile_writes(Path(tmp))
            else:
                profile(args.profile, Path(tmp))
        return
    if args.quick:
        args.small, args.s3_genes, args.genes = "5,20", 1, 2
    if args.slab is not None:
        os.environ[SLAB_ENV] = str(args.slab)
    if args.zstd_level is not None:
        os.environ[LEVEL_ENV] = str(args.zstd_level)
    from atlinter_ray.testing.faulty_s3 import S3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no request log
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict[str, dict] = {}
    requests: dict[str, int] = {}
    clients: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name, S3Server(backend=args.s3_server) as s3:
        tmp = Path(tmp_name)
        genes = [make_dataset(tmp / "genes", seed, f"g{seed:02d}")
                 for seed in range(max(args.genes, args.s3_genes, int(bool(args.client_cpu))))]
        for r in range(args.rounds if args.genes else 0):  # interleaved: the same load
            tag = "" if r == 0 else f"-{r + 1}"
            results[f"predecessor{tag}"] = measure(
                "predecessor", manifest(tmp / "one.txt", [str(genes[0])]),
                str(tmp / "out-predecessor"), 0, None)
            all_genes = manifest(tmp / "genes.txt", [str(p) for p in genes[: args.genes]])
            results[f"genes{tag}"] = measure("pipeline", all_genes, str(tmp / "out-genes"),
                                             args.workers, None, args.tasks_per_batch)
        for n in (int(v) for v in args.small.split(",") if v):
            results[f"small-{n}"] = measure("pipeline", small_datasets(tmp / f"small{n}", n),
                                            str(tmp / f"out-small{n}"), args.workers, None,
                                            args.tasks_per_batch)
        if args.s3_genes:
            some = manifest(tmp / "local.txt", [str(p) for p in genes[: args.s3_genes]])
            on_s3 = manifest(tmp / "s3.txt", upload(genes[: args.s3_genes], s3.direct,
                                                    "atlas-in/genes"))
            warm_up(s3.direct)
            for r in range(args.rounds):  # interleaved: the same load
                tag = "" if r == 0 else f"-{r + 1}"
                results[f"local{tag}"] = measure("pipeline", some, str(tmp / "out-local"),
                                                 args.workers, None, args.tasks_per_batch)
                results[f"s3{tag}"] = measure("pipeline", on_s3, f"s3://atlas-out/scale{r}",
                                              args.workers, s3.direct, args.tasks_per_batch,
                                              server=s3)
            s3.proxy.seen.clear()  # one gene again, through the proxy, which counts requests
            one = measure("pipeline", manifest(tmp / "s3-one.txt", on_s3.read_text().split()[:1]),
                          "s3://atlas-out/requests", args.workers, s3.options,
                          args.tasks_per_batch)
            requests = request_kinds(s3.proxy.seen)
            requests_per_slice = requests["total"] / one["slices"]
        if args.client_cpu or (args.client_cpu is None and args.s3_genes):
            clients = client_cpu(genes[0], tmp)
    report(results)
    if requests:
        print("S3 requests of one gene:", ", ".join(f"{k} {v}" for k, v in requests.items()))
        print(f"S3 requests per slice: {requests_per_slice:.2f}")
    for client, figures in clients.items():
        print(f"client {client:8s} " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    ratios, targets = {}, {}
    small = [k for k in results if k.startswith("small-")]
    if len(small) > 1:
        first, last = results[small[0]], results[small[-1]]
        for key in ("driver_peak_pss_mb", "driver_peak_rss_mb", "slices_per_s"):
            ratios[f"{key}_{small[-1]}_over_{small[0]}"] = last[key] / first[key]
    if "s3" in results:
        tags = [""] + [f"-{r}" for r in range(2, args.rounds + 1)]
        rounds = sorted(results[f"s3{t}"]["slices_per_s"] / results[f"local{t}"]["slices_per_s"]
                        for t in tags)
        ratios["s3_over_local_slices_per_s"] = statistics.median(rounds)
        if len(rounds) > 1:
            ratios["s3_over_local_slices_per_s_min"] = rounds[0]
            ratios["s3_over_local_slices_per_s_max"] = rounds[-1]
        targets["s3_at_least_80_percent_of_local"] = ratios["s3_over_local_slices_per_s"] >= 0.8
        # the loopback server shares the job's cores: what the job itself spent apart
        # (Ray's start, in the child process, counted in both runs)
        ratios["s3_job_cpu_without_server_over_local_cpu"] = statistics.median(
            (results[f"s3{t}"]["machine_cpu_s"] - results[f"s3{t}"]["s3_server_cpu_s"])
            / results[f"local{t}"]["machine_cpu_s"] for t in tags)
        ratios["s3_server_share_of_machine_cpu"] = statistics.median(
            results[f"s3{t}"]["s3_server_cpu_s"] / results[f"s3{t}"]["machine_cpu_s"]
            for t in tags)
        ratios["s3_requests_per_slice"] = requests_per_slice
        targets["s3_requests_per_slice_at_most_0.5"] = requests_per_slice <= 0.5
    if clients:
        ratios["client_cpu_obstore_over_s3fs"] = (clients["obstore"]["cpu_ms_per_slice_median"]
                                                  / clients["s3fs"]["cpu_ms_per_slice_median"])
    if "genes" in results:
        rounds = sorted(results[f"predecessor{t}"]["s_per_dataset"]
                        / results[f"genes{t}"]["s_per_dataset"]
                        for t in [""] + [f"-{r}" for r in range(2, args.rounds + 1)])
        ratios["predecessor_s_per_gene_over_pipeline"] = statistics.median(rounds)
        if len(rounds) > 1:
            ratios["predecessor_s_per_gene_over_pipeline_min"] = rounds[0]
            ratios["predecessor_s_per_gene_over_pipeline_max"] = rounds[-1]
        targets["genes_at_least_12x_predecessor"] = (
            ratios["predecessor_s_per_gene_over_pipeline"] >= 12)
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(f"targets met: {targets}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "scale" + ("-quick" if args.quick else "") + (
            "" if args.s3_server == "moto" else f"-{args.s3_server}") + (
            "" if args.slab is None else f"-slab{args.slab}") + (
            "" if args.zstd_level is None else f"-zstd{args.zstd_level}")
        (Path(args.out) / f"{name}.json").write_text(
            json.dumps({"date": started, "command": " ".join(sys.argv),
                        "reference": REFERENCE, "spacing": SPACING, "model": "linear",
                        "workers": args.workers, "cpus": os.cpu_count(), "runs": results,
                        "slab": args.slab, "zstd_level": args.zstd_level,
                        "s3_server": args.s3_server, "s3_requests_per_gene": requests,
                        "client_cpu_per_slice": clients, "ratios": ratios,
                        "targets_met": targets}, indent=2) + "\n")


if __name__ == "__main__":
    main()
