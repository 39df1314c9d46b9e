"""Run identity: what a done marker and a finished image are bound to.

A marker says "these slices of this image are written". It may only be believed for
the image it was written into and for the exact inputs it was computed from::

    image generation   a fresh random id each time an image is created; stored last,
                       in the image's own metadata, so an image deleted and remade (by
                       hand, a lifecycle rule, a recreated bucket) has a new one
    input fingerprint  section numbers, shape, dtype (with its byte order) and the
                       sha256 of the dataset's .npy and .json, read once per run

Markers live under their generation and carry both ids; a marker of another
generation or fingerprint never counts. The content hash is streamed in blocks
(:func:`atlinter_ray.files.file_sha256`), so hashing holds no array in memory; datasets are hashed in
parallel (:mod:`atlinter_ray.inputs`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from atlinter_ray.dataset import Dataset
from atlinter_ray.files import file_sha256


@dataclass(frozen=True, slots=True)
class InputFingerprint:
    """Everything about a dataset's input that changes the output's bytes."""

    section_numbers: tuple[int, ...]
    #: Shape of the stored images array, from the ``.npy`` header.
    shape: tuple[int, ...]
    #: ``dtype.str`` of the stored images (``|u1``, ``<u2``, ``>f8``: byte order kept).
    dtype: str
    images_sha256: str
    metadata_sha256: str

    @property
    def digest(self) -> str:
        """One hex id for the whole fingerprint."""
        text = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (stored in the image's metadata)."""
        return asdict(self) | {"section_numbers": list(self.section_numbers),
                               "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> InputFingerprint:
        """Inverse of :meth:`to_json`."""
        return cls(**{**obj, "section_numbers": tuple(obj["section_numbers"]),
                      "shape": tuple(obj["shape"])})

    def differences(self, other: InputFingerprint) -> list[str]:
        """Human-readable list of what differs between two fingerprints."""
        out = []
        if self.section_numbers != other.section_numbers:
            gone = sorted(set(self.section_numbers) - set(other.section_numbers))
            new = sorted(set(other.section_numbers) - set(self.section_numbers))
            out.append(f"section numbers (removed {gone}, added {new})")
        if self.shape != other.shape:
            out.append(f"images shape {list(self.shape)} -> {list(other.shape)}")
        if self.dtype != other.dtype:
            out.append(f"dtype {self.dtype} -> {other.dtype}")
        if self.images_sha256 != other.images_sha256 and not out:
            out.append("the content of the .npy images")
        if self.metadata_sha256 != other.metadata_sha256 and not out:
            out.append("the content of the .json metadata")
        return out


@dataclass(frozen=True, slots=True)
class ImageIdentity:
    """The image generation and input fingerprint a task's marker is written for."""

    generation: str
    fingerprint: str


def new_generation() -> str:
    """A fresh image generation id."""
    return uuid.uuid4().hex


def fingerprint(ds: Dataset) -> InputFingerprint:
    """Hash the dataset's two files (streamed); shape and dtype come from its header."""
    return InputFingerprint(
        section_numbers=tuple(ds.section_numbers),
        shape=tuple(ds.layout.shape),
        dtype=ds.layout.stored,
        images_sha256=file_sha256(ds.images_url, ds.storage_options),
        metadata_sha256=file_sha256(ds.metadata_url, ds.storage_options),
    )
