"""GPU-ready workers (issue 14), shown on the CPU: the driver's CPU validation, finite
outputs with an fp32 rerun, the out-of-memory retry, float32 grids under bf16 autocast,
a safe fp16 correlation, CUDA errors that end the worker, and the device path giving
the same bytes as host arithmetic (numpy conversions, OpenCV warps, host bisection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlinter_ray import worker as worker_module
from atlinter_ray.config import Config, ResourcesConfig
from atlinter_ray.dataset import load_dataset
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.engine import build_for_validation
from atlinter_ray.errors import ConfigError, FatalWorkerError, NonFiniteOutputError
from atlinter_ray.layout import Layout
from atlinter_ray.models import base
from atlinter_ray.models.base import build_model
from atlinter_ray.models.flow import warp, warp_tensor
from atlinter_ray.models.maskflownet import correlation
from atlinter_ray.models.maskflownet import warp as mfn_warp
from atlinter_ray.models.raft import RAFTNet
from atlinter_ray.models.rife_arch import backward_warp
from atlinter_ray.models.torch_runtime import (
    TorchFlowEstimator,
    TorchPairInterpolator,
    is_fatal_device_error,
    to_dtype_tensor,
)
from atlinter_ray.pipeline import check_worker_device
from atlinter_ray.planning import bisection_nodes, plan_dataset, plan_slabs
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import prepare_image, real_volume, sections_of, write_dataset
from atlinter_ray.worker import TaskWorker, WorkerSpec

torch.set_num_threads(1)


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


class Blend(TorchPairInterpolator):
    """Blend at t, then a fixed 3x3 blur; NaN under autocast when ``nan_low`` is set."""

    multiple = 8

    def __init__(self, nan_low: bool = False, oom_above: int = 0, **kw):
        torch.manual_seed(0)
        super().__init__(torch.nn.Conv2d(3, 3, 3, padding=1, groups=3), None, **kw)
        self.nan_low, self.oom_above, self.batches = nan_low, oom_above, []

    def forward(self, a, b, t):
        if self.oom_above and len(a) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.batches.append(len(a))
        tt = t[:, None, None, None]
        out = self.module((1 - tt) * a + tt * b)
        return out * float("nan") if self.nan_low and _autocast_on() else out


class Midpoint(Blend):
    """The same network, midpoint only: driven by bisection."""

    arbitrary_t = False


class Shift(TorchFlowEstimator):
    """A smooth flow from the pair's difference (warps land between pixels, off the image)."""

    multiple = 1

    def __init__(self, fail: str = "", **kw):
        super().__init__(torch.nn.Identity(), None, **kw)
        self.fail = fail

    def forward(self, a, b):
        if self.fail:
            raise RuntimeError(self.fail)
        d = (a - b).mean(1, keepdim=True)
        return torch.cat([3.7 * d + 0.3, -2.2 * d - 0.45], 1)


@pytest.fixture(autouse=True)
def _test_models(monkeypatch):
    """This module's models in the registry while its tests run, and only then."""
    for name, cls in (("test_blend", Blend), ("test_midpoint", Midpoint), ("test_shift", Shift)):
        monkeypatch.setitem(base._REGISTRY, name, cls)
        monkeypatch.setattr(cls, "name", name)


def _pair(n=3, c=1, h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, c, h, w)).astype(np.float32),
            rng.integers(0, 256, (n, c, h, w)).astype(np.float32))


# ------------------------------------------------------------------ the driver
def _raft_small_file(tmp_path) -> str:
    """A raft-small.pth in the released layout (DataParallel keys), random weights."""
    torch.manual_seed(0)
    path = tmp_path / "raft-small.pth"
    torch.save({f"module.{k}": v for k, v in RAFTNet(small=True).state_dict().items()}, path)
    return str(path)


def test_driver_without_cuda_accepts_fp16_cuda_for_the_workers(tmp_path):
    assert not torch.cuda.is_available()
    ckpt = _raft_small_file(tmp_path)
    params = {"device": "cuda", "precision": "fp16", "iters": 2}
    with pytest.raises(ConfigError, match="CUDA is not available"):
        build_model("raft_small", checkpoint=ckpt, **params)  # what the old driver did
    model = build_for_validation("raft_small", ckpt, params)
    assert model.estimator.runtime.device.type == "cpu"
    assert model.estimator.runtime.precision == "fp32"
    cfg = Config()
    cfg.model.name, cfg.model.params = "raft_small", params
    cfg.resources = ResourcesConfig(gpus_per_worker=1)
    check_worker_device(cfg)  # workers get a GPU: accepted
    cfg.resources = ResourcesConfig(gpus_per_worker=0)
    with pytest.raises(ConfigError, match="resources.gpus_per_worker is 0"):
        check_worker_device(cfg)
    # settings no device can run are still refused, naming the key
    with pytest.raises(ConfigError, match="model.params.precision=.fp64."):
        build_for_validation("raft_small", ckpt, {"precision": "fp64"})
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        build_for_validation("raft_small", ckpt, {"device": "cpu", "precision": "fp16"})


def test_the_run_records_the_workers_device_and_precision(tmp_path):
    from atlinter_ray.pipeline import run

    ds = _dataset(tmp_path / "in", step=16)
    cfg = Config()
    cfg.data.datasets = [ds.images_url]
    cfg.data.reference_shape = list(real_volume().shape)
    cfg.model.name, cfg.model.checkpoint = "raft_small", _raft_small_file(tmp_path)
    cfg.model.params = {"iters": 2, "precision": "bf16"}
    cfg.output.root, cfg.run.serial, cfg.run.progress = str(tmp_path / "out"), True, False
    summary = run(cfg)
    assert summary.ok and summary.devices == {"cpu bf16": summary.tasks_done}
    attrs = VolumeStore(cfg.output.root).image_attrs(ds.id)["atlinter_ray"]
    # the run's identity: as configured, not the driver's CPU fp32 validation build
    assert (attrs["run"]["device"], attrs["run"]["precision"]) == ("auto", "bf16")
    predicted = [p for p in attrs["provenance"] if p["status"] == "predicted"]
    assert predicted and all((p["device"], p["precision"]) == ("cpu", "bf16") for p in predicted)


# ------------------------------------------------------------------ finite outputs
def test_nan_from_a_low_precision_forward_is_recomputed_in_fp32():
    a, b = _pair()
    t = np.array([0.25, 0.5], np.float32)
    ref = Blend(device="cpu").interpolate(a, b, t, peak=255.0)
    model = Blend(nan_low=True, device="cpu", precision="bf16", batch_size=4)
    out = model.interpolate(a, b, t, peak=255.0)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, ref)  # the rerun is the fp32 computation itself
    assert model.runtime.fp32_reruns == 6


def test_nan_in_fp32_is_an_error_not_a_zero(monkeypatch):
    a, b = _pair()
    model = Blend(device="cpu")
    monkeypatch.setattr(model.module, "forward", lambda x: x * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="NaN or inf in float32"):
        model.interpolate(a, b, np.array([0.5]), peak=255.0)


def test_out_of_memory_halves_the_batch_and_retries():
    a, b = _pair(n=5)
    t = np.array([0.5], np.float32)
    ref = Blend(device="cpu", batch_size=1).interpolate(a, b, t, peak=255.0)
    model = Blend(oom_above=2, device="cpu", batch_size=8)
    out = model.interpolate(a, b, t, peak=255.0)
    assert model.runtime.batch_size == 2  # 8 -> 4 -> 2
    assert model.batches == [2, 2, 1]
    np.testing.assert_allclose(out, ref, atol=1e-4)
    one = Blend(oom_above=0, device="cpu", batch_size=1)
    one.forward = lambda *x: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        one.interpolate(a, b, t, peak=255.0)


# ------------------------------------------------------------------ float32 geometry
def test_bf16_grids_and_coordinates_stay_within_0_05_px_of_fp32():
    h, w = 64, 512
    ramp = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w)  # value = x in px
    image = ramp.to(torch.bfloat16)  # a feature map as autocast hands it over
    torch.manual_seed(0)
    flow = (torch.randn(1, 4, h, w) * 20).to(torch.bfloat16)
    ref = backward_warp(image.float(), flow[:, :2].float())
    yx = flow[:, 2:].float()
    ref_mfn = mfn_warp(image.float(), yx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = backward_warp(image, flow[:, :2])
        got_mfn = mfn_warp(image, flow[:, 2:])
    for out, expected in ((got, ref), (got_mfn, ref_mfn)):
        assert out.dtype == torch.float32
        # the image rises by 1 to 2 per px, so a value error bounds the position error
        assert (out - expected).abs().max().item() <= 0.05


def test_fp16_correlation_is_finite_on_bright_features():
    torch.manual_seed(0)
    f1 = (torch.rand(1, 196, 6, 7) * 40 + 20).half()
    f2 = (torch.rand(1, 196, 6, 7) * 40 + 20).half()
    naive = (f1 * f2).sum(1)  # what an fp16 sum over 196 channels does
    assert not torch.isfinite(naive).all()
    corr = correlation(f1, f2, 2)
    assert torch.isfinite(corr).all() and corr.dtype == torch.float32
    ref = correlation(f1.float(), f2.float(), 2)
    torch.testing.assert_close(corr, ref)


# ------------------------------------------------------------------ fatal CUDA errors
def test_cuda_errors_are_fatal_out_of_memory_is_not():
    assert is_fatal_device_error(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal_device_error(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory."))
    assert not is_fatal_device_error(ValueError("bad input"))


def _dataset(tmp_path, rgb=False, step=8):
    vol = real_volume(rgb=rgb)
    secs = list(range(2, vol.shape[0], step))
    write_dataset(tmp_path, "g", sections_of(vol, secs, "coronal"), secs)
    return load_dataset(str(tmp_path / "g"), vol.shape[:3], {})


def _worker(tmp_path, ds, name, params, dtype="uint8", checkpoint=None, slab=8, scale=1.0):
    store = VolumeStore(str(tmp_path / f"out-{name}"))
    state = prepare_image(store, ds, dtype, {"model": name}, Layout(slab=slab))
    spec = WorkerSpec(name, checkpoint, params, {ds.id: ds}, {ds.id: dtype},
                      str(tmp_path / f"out-{name}"), images={ds.id: state.identity},
                      scales={ds.id: scale})
    return TaskWorker(spec), store


def test_a_cuda_error_ends_the_worker_instead_of_failing_every_task(tmp_path):
    ds = _dataset(tmp_path)
    gaps = plan_dataset(ds.id, ds.section_numbers, ds.n_slices, "exact", "copy")
    tasks = plan_slabs(gaps, ds.n_slices, 2)  # short slabs: the first holds only edge slices
    worker, _ = _worker(tmp_path, ds, "test_shift",
                        {"device": "cpu", "fail": "CUDA error: an illegal memory access"},
                        slab=2)
    with pytest.raises(FatalWorkerError, match="illegal memory access"):
        worker.run(tasks)
    worker, _ = _worker(tmp_path, ds, "test_shift", {"device": "cpu", "fail": "bad pair"},
                        slab=2)
    results = worker.run(tasks)  # an ordinary error: reported per task, worker lives on
    assert any("bad pair" in r.error for r in results)
    assert results[0].done  # the leading edge slab needs no model


# ------------------------------------------------------------------ same bytes
def _host_reference(model, ds, tasks, dtype):
    """The slices as the host path computes them: numpy in, OpenCV warps, numpy bisection."""
    from atlinter_ray.dataset import read_sections

    out = {}
    for task in tasks:
        srcs = dict(zip(task.sources, read_sections(ds, task.sources)))
        frames = {}
        if task.predicted:
            a = srcs[task.left][None].astype(np.float32)
            b = srcs[task.right][None].astype(np.float32)
            ts = [j.t for j in task.predicted]
            if hasattr(model, "estimator"):  # flow: model flows, OpenCV warps, numpy blend
                f_ab = model.estimator.flow(a, b, peak=ds.peak)[0]
                f_ba = model.estimator.flow(b, a, peak=ds.peak)[0]
                for t in ts:
                    t = np.float32(t)
                    frames[t] = (1 - t) * warp(a[0], t * f_ba) + t * warp(b[0], (1 - t) * f_ab)
            elif model.arbitrary_t:
                got = model.interpolate(a, b, np.array(ts, np.float32), ds.peak)[0]
                frames = dict(zip(map(np.float32, ts), got))
            else:
                known = {0.0: a[0], 1.0: b[0]}
                for level in bisection_nodes(ts):
                    for t in level:
                        h = 1.0 / float(t).as_integer_ratio()[1]
                        known[t] = model.interpolate(known[t - h][None], known[t + h][None],
                                                     np.array([0.5], np.float32), ds.peak)[0, 0]
                frames = {np.float32(t): known[t] for t in ts}
        for job in task.jobs:
            x = srcs[job.source] if job.source is not None else frames[np.float32(job.t)]
            out[job.slice] = to_dtype(x, dtype)
    return out


@pytest.mark.parametrize(
    ("name", "rgb", "placement"),
    [("test_blend", False, "exact"), ("test_midpoint", False, "atlinter"),
     ("test_shift", False, "exact"), ("test_shift", True, "exact"), ("dis", False, "exact"),
     ("raft_small", False, "exact")],
)
def test_device_path_gives_the_host_paths_bytes(tmp_path, name, rgb, placement):
    ds = _dataset(tmp_path, rgb=rgb)
    gaps = plan_dataset(ds.id, ds.section_numbers, ds.n_slices, placement, "copy")
    tasks = plan_slabs(gaps, ds.n_slices, 8)
    params = {} if name == "dis" else {"device": "cpu", "batch_size": 1}
    ckpt = None
    if name == "raft_small":  # a real architecture in its released file layout
        params, ckpt = {**params, "iters": 3}, _raft_small_file(tmp_path)
    worker, store = _worker(tmp_path, ds, name, params, checkpoint=ckpt)
    assert all(r.done for r in worker.run(tasks))
    volume = store.read_volume(ds.id)
    expected = _host_reference(worker.model, ds, gaps, "uint8")
    for s, frame in expected.items():
        got = volume[:, s] if rgb else volume[s]
        np.testing.assert_array_equal(got, frame if rgb else frame[0], err_msg=f"slice {s}")


def test_scaled_output_is_the_same_bytes_on_the_device_and_the_host(tmp_path, monkeypatch):
    """output.dtype_scaling: float [0, 1] sections scaled onto uint8 on either path."""
    vol = real_volume().astype(np.float32) / 255
    secs = list(range(2, vol.shape[0], 8))
    write_dataset(tmp_path, "g", sections_of(vol, secs, "coronal"), secs)
    ds = load_dataset(str(tmp_path / "g"), vol.shape, {})
    tasks = plan_slabs(plan_dataset(ds.id, ds.section_numbers, ds.n_slices, "exact", "copy"),
                       ds.n_slices, 8)
    volumes = []
    for path in ("device", "host"):
        if path == "host":
            monkeypatch.setattr(worker_module, "_device_dtype", lambda dtype: False)
        worker, store = _worker(tmp_path / path, ds, "test_blend",
                                {"device": "cpu", "batch_size": 2}, scale=255.0)
        assert all(r.done for r in worker.run(tasks))
        volumes.append(store.read_volume(ds.id))
    np.testing.assert_array_equal(volumes[0], volumes[1])
    np.testing.assert_array_equal(volumes[0][secs], np.rint(vol[secs] * np.float32(255)))
    # predicted slices scaled too, not left in [0, 1]: the float run's values times 255
    worker, store = _worker(tmp_path / "float", ds, "test_blend",
                            {"device": "cpu", "batch_size": 2}, dtype="float32")
    assert all(r.done for r in worker.run(tasks))
    expected = np.clip(np.rint(store.read_volume(ds.id) * np.float32(255)), 0, 255)
    between = [s for s in range(secs[0] + 1, secs[-1]) if s not in secs]
    assert expected[between].max() > 0  # the check below sees scaled predictions
    assert np.abs(volumes[0][between].astype(int) - expected[between]).max() <= 1


def test_slab_tasks_in_one_chunk_predict_a_shared_gap_once(tmp_path):
    """Both slab tasks beside a boundary ask for the gap between; one chunk computes it once."""
    ds = _dataset(tmp_path)  # a section every 8 slices from 2: every gap crosses a slab
    gaps = plan_dataset(ds.id, ds.section_numbers, ds.n_slices, "atlinter", "copy")
    tasks = plan_slabs(gaps, ds.n_slices, 8)
    assert sum(len(t.parts) for t in tasks) > len(gaps)
    worker, store = _worker(tmp_path, ds, "test_midpoint", {"device": "cpu", "batch_size": 64})
    rows = worker.run(tasks)
    assert all(r.done for r in rows)
    once = sum(len(n) for g in gaps if g.predicted for n in bisection_nodes(g.positions))
    assert sum(r.model_calls for r in rows) == once  # no node computed twice
    expected = _host_reference(worker.model, ds, gaps, "uint8")
    volume = store.read_volume(ds.id)
    for s, frame in expected.items():
        np.testing.assert_array_equal(volume[s], frame[0], err_msg=f"slice {s}")


def test_device_warp_equals_opencv_remap():
    rng = np.random.default_rng(3)
    images = (rng.random((2, 3, 41, 57)) * 255).astype(np.float32)
    flow = (rng.normal(0, 4, (2, 2, 41, 57))).astype(np.float32)
    flow[:, :, :4] *= 10  # far outside the image: replicated border
    got = warp_tensor(torch.from_numpy(images), torch.from_numpy(flow)).numpy()
    for i in range(2):
        np.testing.assert_array_equal(got[i], warp(images[i], flow[i]))


def test_device_conversion_rounds_and_clips_as_numpy():
    x = np.array([-3.0, 0.5, 1.5, 2.5, 254.5, 255.5, 70000.0, 3.4999998], np.float32)
    for dtype in ("uint8", "uint16", "float32"):
        np.testing.assert_array_equal(to_dtype_tensor(torch.from_numpy(x), dtype).numpy(),
                                      to_dtype(x, dtype))
