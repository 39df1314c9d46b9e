"""Checkpoints are data, never code: safe loading, hashing and strict matching.

Every learned model reads its weights through :func:`read_checkpoint` (a local path
or any fsspec URL, ``torch.load(..., weights_only=True)``, never an unsafe fallback)
and applies them with :func:`load_strict`, which names the missing, unexpected and
mis-shaped keys instead of loading a partial model silently.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections.abc import Mapping
from typing import Any

import fsspec
import torch

from atlinter_ray.errors import CheckpointError


def fetch_bytes(
    url: str, storage_options: Mapping[str, Any] | None = None, what: str = "weights file"
) -> tuple[bytes, str]:
    """Read a checkpoint file whole from a path or fsspec URL; return it and its sha256."""
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"checkpoint {url}: file not found; set model.checkpoint to the path or "
            f"URL of the original {what}"
        ) from exc
    return data, hashlib.sha256(data).hexdigest()


#: torch.save's zip format starts as every zip file does.
_ZIP_MAGIC = b"PK\x03\x04"
#: Its legacy format starts by pickling this number (opcode LONG1 and its 10 bytes).
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """Load a torch checkpoint from ``url`` on the CPU; return it and its sha256.

    Only tensors and plain containers load (``weights_only=True``); every failure is a
    :class:`CheckpointError` that says what the file is (not a torch checkpoint, one that
    holds code, or a corrupt one) and never repeats torch's advice to load unsafely.
    """
    data, digest = fetch_bytes(url, storage_options)
    if not (data.startswith(_ZIP_MAGIC) or _LEGACY_MAGIC in data[:32]):
        raise CheckpointError(
            f"checkpoint {url}: not a torch checkpoint (neither torch.save's zip format nor "
            "its legacy format): the file is corrupt or of another kind (maskflownet takes "
            "the MXNet .params file). Fix: download the original file again and check "
            "model.name and model.checkpoint"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _BLOCKED_GLOBAL.search(str(exc))
        if blocked is None:
            raise CheckpointError(
                f"checkpoint {url}: unreadable or truncated: a corrupt torch checkpoint. "
                "Fix: download the original file again"
            ) from exc
        raise CheckpointError(
            f"checkpoint {url}: refused to load: besides tensors the file holds "
            f"{blocked.group(1)}, which loading would call, so it could run code. Fix: use "
            "the original weights file from the model's authors"
        ) from exc
    except Exception as exc:  # zip, EOF, struct, key errors: all mean a corrupt file
        reason = str(exc).split(". ")[0].strip()
        if not reason or "weights_only" in reason:
            reason = type(exc).__name__
        raise CheckpointError(
            f"checkpoint {url}: unreadable or truncated: a corrupt torch checkpoint "
            f"({reason}). Fix: download the original file again"
        ) from exc
    return obj, digest


def unwrap_state_dict(obj: Any, url: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Return the flat state dict inside ``obj``, without DataParallel ``module.``."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {url}: expected a state dict (a mapping of names to tensors), "
            f"found {type(obj).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def describe_mismatch(**groups: list[str]) -> str:
    """``"2 missing keys: a, b; 1 unexpected keys: c"`` for the non-empty groups (10 shown)."""
    parts = []
    for label, keys in groups.items():
        if keys:
            shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
            parts.append(f"{len(keys)} {label.replace('_', ' ')}: {shown}")
    return "; ".join(parts)


def load_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], url: str
) -> None:
    """Load ``state_dict`` into ``module``; raise naming every mismatched key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        listing = describe_mismatch(
            missing_keys=missing, unexpected_keys=unexpected, shape_mismatches=misshaped
        )
        raise CheckpointError(
            f"checkpoint {url} does not match the {type(module).__name__} "
            f"architecture: {listing}. Check that model.name matches the "
            "file (for example rife_hd for the predecessor's RIFE folder)."
        )
    module.load_state_dict(state_dict, strict=True)
