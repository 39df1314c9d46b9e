"""The predecessor's MaskFlowNet (MXNet) as an oracle: a script for the isolated venv.

Runs ONLY inside the test-only venv built by :mod:`tests.mxnet_env` (Python 3.11,
mxnet 1.9.1, numpy 1.23.5); it never imports atlinter_ray. Arrays travel through
``.npy``/``.npz`` files. Modules that atlinter imports but the MaskFlowNet path never
calls (torch, scipy, cv2, flow_vis, moviepy, yaml, and atlinter's torch-only RAFT
module) are replaced by stubs at run time when absent; the cached sdist is never edited.

Commands::

    python mxnet_oracle.py SRC save-arrays OUT_DIR
    python mxnet_oracle.py SRC make-params OUT --seed 0 [--flow-gain 0.1]
    python mxnet_oracle.py SRC predict PARAMS CASES.npz OUT.npz
    python mxnet_oracle.py SRC bench PARAMS CASES.npz --repeat 5

``CASES.npz`` holds image pairs ``a_<case>``/``b_<case>`` as atlinter takes them:
``(H, W)`` or ``(H, W, 3)``, uint8 or float; ``OUT.npz`` gets ``<case>``, the
``(2, H, W)`` flow atlinter returns.

``SRC`` is the ``src`` folder of the unpacked atlinter 0.2.3 sdist.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

# atlinter's own config for MaskFlowNet (atlinter/optical_flow.py, MaskFlowNet.__init__).
ATLINTER_CONFIG = {
    "network": {"class": "MaskFlownet"},
    "optimizer": {
        "learning_rate": [
            [300000, 0.0001],
            [500000, 5e-05],
            [600000, 2.5e-05],
            [700000, 1.25e-05],
            [800000, 6.25e-06],
        ],
        "wd": 0.0004,
    },
}
STUBS = {
    "torch": [],
    "scipy": ["ndimage", "interpolate"],
    "cv2": [],
    "flow_vis": [],
    "yaml": [],
    "moviepy": ["editor", "audio", "audio.AudioClip"],
}
# Torch-only modules that atlinter.optical_flow imports for RAFT (class body); stubbed
# whenever torch is absent.
TORCH_ONLY = ["atlinter.vendor.RAFT.raft"]


def _stub_getattr(module_name: str) -> Any:
    """Module ``__getattr__``: any public name is a callable that fails loudly."""

    def getattr_(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def fail(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{module_name}.{attr} is a stub in the mxnet oracle venv")

        return fail

    return getattr_


def install_stubs() -> list[str]:
    """Put stand-ins for absent, unused imports into ``sys.modules``; return their names."""
    installed = []
    for top, subs in STUBS.items():
        if importlib.util.find_spec(top) is not None:
            continue
        for name in [top] + [f"{top}.{s}" for s in subs]:
            module = types.ModuleType(name)
            module.__getattr__ = _stub_getattr(name)  # type: ignore[method-assign]
            module.__path__ = []  # a package, so its submodule stubs import
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
            installed.append(name)
    if "torch" in installed:
        for name in TORCH_ONLY:
            module = types.ModuleType(name)
            module.__getattr__ = _stub_getattr(name)  # type: ignore[method-assign]
            sys.modules[name] = module
            installed.append(name)
    return installed


def predecessor_class(src: str) -> Any:
    """``atlinter.optical_flow.MaskFlowNet`` from the unpacked sdist."""
    install_stubs()
    sys.path.insert(0, src)
    from atlinter.optical_flow import MaskFlowNet

    return MaskFlowNet


def save_arrays(out_dir: str) -> None:
    """Write NDArray list files with real mxnet, and the expected arrays as ``.npz``."""
    import mxnet as mx

    out = Path(out_dir)
    rng = np.random.default_rng(0)
    ref = {
        "f32": rng.standard_normal((3, 4, 2)).astype(np.float32),
        "f64": rng.standard_normal((2, 2)),
        "f16": rng.standard_normal(7).astype(np.float16),
        "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "i32": np.array([-1, 2**31 - 1], dtype=np.int32),
        "i8": np.array([-3, 2], dtype=np.int8),
        "i64": np.array([-(2**40), 5], dtype=np.int64),
        "bool": np.array([True, False, True]),
        "conv": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
    }
    mx.nd.save(str(out / "dict.params"), {k: mx.nd.array(v, dtype=v.dtype) for k, v in ref.items()})
    np.savez(out / "dict.npz", **ref)
    float32 = {"f32": ref["f32"], "conv": ref["conv"]}
    mx.nd.save(str(out / "float32.params"), {k: mx.nd.array(v) for k, v in float32.items()})
    np.savez(out / "float32.npz", **float32)
    mx.nd.save(str(out / "list.params"), [mx.nd.array(ref["f32"]), mx.nd.array(ref["conv"])])
    mx.util.set_np_shape(True)
    try:  # NumPy-shape semantics write V3 records; ndim 0 is then a scalar
        scalar = {"scalar": np.array(3.5, dtype=np.float32), "empty": np.zeros((0, 3), np.float32)}
        mx.nd.save(str(out / "npshape.params"), {k: mx.nd.array(v) for k, v in scalar.items()})
    finally:
        mx.util.set_np_shape(False)
    np.savez(out / "npshape.npz", **scalar)


def make_params(src: str, out: str, seed: int, flow_gain: float) -> None:
    """Random-weight ``maskflownet.params`` in the original layout (legacy Gluon names).

    The network is built by atlinter's own pipeline (MSRAPrelu initialisation), biases
    get random values too, and the flow heads are scaled by ``flow_gain`` so that the
    random flows stay a few pixels large (deformable offsets then land inside the image).
    """
    import mxnet as mx

    predecessor_class(src)
    from atlinter.vendor.MaskFlowNet import network

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    config = network.config.Reader(ATLINTER_CONFIG)
    pipe = network.get_pipeline("MaskFlownet", ctx=[mx.cpu()], config=config)
    net = pipe.network
    zeros = mx.nd.zeros((1, 3, 64, 64))
    net(zeros, zeros)  # completes Gluon's deferred shape inference
    for name, param in net.collect_params().items():
        data = param.data().asnumpy()
        if name.endswith("bias"):
            data = rng.normal(0.0, 0.05, data.shape)
        head = ("pred_flow", "dc_conv7")
        if any(h in name for h in head):
            data = data * flow_gain
        param.set_data(mx.nd.array(data.astype(np.float32)))
    # The original's layout: ParameterDict.save with the top-level prefix stripped.
    net.collect_params().save(out, strip_prefix=net.prefix)


def _cases(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image pairs by case name from a ``.npz`` with ``a_<case>`` and ``b_<case>``."""
    data = np.load(path)
    names = sorted(k[2:] for k in data.files if k.startswith("a_"))
    return {n: (data[f"a_{n}"], data[f"b_{n}"]) for n in names}


def predict(src: str, params: str, cases: str, out: str) -> None:
    """atlinter's ``MaskFlowNet.predict_flow(*preprocess_images(a, b))`` for every case."""
    model = predecessor_class(src)(params)
    flows = {
        name: model.predict_flow(*model.preprocess_images(a, b)).astype(np.float32)
        for name, (a, b) in _cases(cases).items()
    }
    np.savez(out, **flows)


def bench(src: str, params: str, cases: str, repeat: int) -> None:
    """Wall and CPU seconds per ``predict_flow`` of each case after one warm-up (JSON)."""
    model = predecessor_class(src)(params)
    result = {}
    for name, (a, b) in _cases(cases).items():
        x, y = model.preprocess_images(a, b)
        model.predict_flow(x, y)
        wall, cpu = [], []
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            model.predict_flow(x, y)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        result[name] = {"wall": wall, "cpu": cpu}
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("save-arrays")
    p.add_argument("out_dir")
    p = sub.add_parser("make-params")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flow-gain", type=float, default=0.1)
    for name in ("predict", "bench"):
        p = sub.add_parser(name)
        p.add_argument("params")
        p.add_argument("cases")
        if name == "predict":
            p.add_argument("out")
        else:
            p.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.cmd == "save-arrays":
        save_arrays(args.out_dir)
    elif args.cmd == "make-params":
        make_params(args.src, args.out, args.seed, args.flow_gain)
    elif args.cmd == "predict":
        predict(args.src, args.params, args.cases, args.out)
    else:
        bench(args.src, args.params, args.cases, args.repeat)


if __name__ == "__main__":
    main()
