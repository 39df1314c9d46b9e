"""Build the bundled sample dataset from the MNI152 2009a T1 template.

The template ships inside nilearn's wheel on PyPI
(``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, a
skull-stripped 1 mm volume of 197 x 233 x 189 uint8 voxels in RAS+ orientation).
nilearn is only downloaded (``pip download --no-deps``, cached by ``atlinter_ray/testing/pypi.py``),
never installed or imported, and the NIfTI-1 file is read with numpy alone.

Steps, each a small pure function below::

    .nii.gz ──> voxels + affine ──> reorient to CCF-like (AP, DV, LR) ──> 2x block mean
            ──> crop empty margins ──> rescale to uint8 ──> known "coronal" sections
                every SPACING slices along axis 0 ──> atlinter_ray/sample/

Outputs (the predecessor's layout plus our ``reference_shape`` and ``voxel_size_um``):

- ``mni152_t1.npy``: the known sections, ``(n, D1, D2)`` uint8;
- ``mni152_t1.json``: ``{"section_numbers": [...], "axis": "coronal",
  "reference_shape": [D0, D1, D2]}``;
- ``mni152_t1_truth.npz``: the full volume (key ``volume``) for held-out scoring;
- ``LICENSE_MNI152.txt``: the template's licence and attribution.

Run from the repository root: ``python scripts/make_sample.py`` (``--nii PATH`` to
read a local copy of the template instead of downloading the wheel).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "atlinter_ray" / "sample"
NAME = "mni152_t1"

NILEARN_SPEC = "nilearn==0.12.0"
MEMBER = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MEMBER_SHA256 = "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"

DOWNSAMPLE = 2  # 1 mm -> 2 mm voxels
SPACING = 4  # one known section every 4 slices along axis 0
FOREGROUND = 8  # intensity (0..255 scale) above which a voxel counts as brain
# Voxels of background kept around the brain when cropping, per axis (AP, DV, LR):
# none along AP, so the first and last slices hold brain and the edge slices that
# the edge policy fills are not trivially empty.
MARGIN = (0, 2, 2)

# NIfTI-1 datatype codes -> numpy dtypes (the ones a template can use).
_NIFTI_DTYPES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    64: np.float64,
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
}

LICENSE_TEXT = """\
MNI ICBM 152 non-linear symmetric template, 2009 release a (ICBM 2009a Nonlinear
Symmetric), T1-weighted average.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.

Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that
the above copyright notice appear in all copies. The authors and McGill
University make no representations about the suitability of this software for
any purpose. It is provided "as is" without express or implied warranty. The
authors are not responsible for any data loss, equipment damage, property loss,
or injury to subjects or patients resulting from the use or misuse of this
software package.

Source of the licence text: the MNI NeuroImaging & Surgical Technologies lab's
page for the ICBM 152 non-linear 2009 atlases
(http://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/), which distributes
the 2009a/b/c templates under this notice; the same text accompanies other
redistributions of these templates (e.g. TemplateFlow's tpl-MNI152NLin2009cAsym).
nilearn's description file (nilearn/datasets/description/icbm152_2009.rst) names
the original download URL,
https://www.bic.mni.mcgill.ca/~vfonov/icbm/2009/mni_icbm152_nlin_sym_09a_nifti.zip,
but lists its licence as "unknown".

Source of the data: {member} in the nilearn {version} wheel on PyPI
(sha256 of that file: {sha256}), itself the
mni_icbm152_t1_tal_nlin_sym_09a template as converted by nilearn.

Modifications made by atlinter_ray's scripts/make_sample.py: reoriented to
(anterior-posterior, dorsal-ventral, left-right), downsampled {down}x by block
mean, cropped to the brain (margins of {margin} voxels along AP/DV/LR),
rescaled to uint8, and split into known sections every {spacing} slices along
the first axis plus the full volume for evaluation.

References:
- VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG.
  Unbiased average age-appropriate atlases for pediatric studies. NeuroImage
  54(1), 2011. doi:10.1016/j.neuroimage.2010.07.033
- VS Fonov, AC Evans, RC McKinstry, CR Almli and DL Collins. Unbiased nonlinear
  average age-appropriate brain templates from birth to adulthood. NeuroImage
  47 Suppl. 1, S102, 2009. doi:10.1016/S1053-8119(09)70884-5
- DL Collins, AP Zijdenbos, WFC Baare and AC Evans. ANIMAL+INSECT: Improved
  cortical structure segmentation. IPMI 1999, LNCS 1613, 210-223.
"""


def read_nifti1(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse an uncompressed single-file NIfTI-1 image; return (voxels, 4x4 affine)."""
    if len(raw) < 352:
        raise ValueError(f"NIfTI-1 file is {len(raw)} bytes, shorter than its header")
    endian = "<" if int(np.frombuffer(raw[0:4], "<i4")[0]) == 348 else ">"
    if int(np.frombuffer(raw[0:4], endian + "i4")[0]) != 348:
        raise ValueError("not a NIfTI-1 file: sizeof_hdr is not 348 in either byte order")
    if raw[344:348] not in (b"n+1\x00", b"ni1\x00"):
        raise ValueError(f"not a NIfTI-1 file: magic is {raw[344:348]!r}")
    dim = np.frombuffer(raw[40:56], endian + "i2")
    if dim[0] != 3:
        raise ValueError(f"expected a 3-D volume, the header says {dim[0]} dimensions")
    shape = tuple(int(n) for n in dim[1:4])
    code = int(np.frombuffer(raw[70:72], endian + "i2")[0])
    if code not in _NIFTI_DTYPES:
        raise ValueError(f"unsupported NIfTI datatype code {code}")
    dtype = np.dtype(_NIFTI_DTYPES[code]).newbyteorder(endian)
    vox_offset = int(np.frombuffer(raw[108:112], endian + "f4")[0])
    slope, inter = (float(x) for x in np.frombuffer(raw[112:120], endian + "f4"))
    count = int(np.prod(shape))
    data = np.frombuffer(raw, dtype, count=count, offset=vox_offset)
    volume = data.reshape(shape, order="F")  # NIfTI stores x fastest
    if slope not in (0.0, 1.0) or inter != 0.0:
        volume = volume * slope + inter
    sform_code = int(np.frombuffer(raw[254:256], endian + "i2")[0])
    if sform_code <= 0:
        raise ValueError("the header has no sform affine (sform_code 0); not supported")
    affine = np.eye(4)
    affine[:3] = np.frombuffer(raw[280:328], endian + "f4").reshape(3, 4)
    return np.ascontiguousarray(volume), affine


def to_ap_dv_lr(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient a RAS+-world volume to (anterior->posterior, dorsal->ventral, left->right).

    That is the CCF's orientation: axis 0 grows toward posterior, axis 1 toward
    inferior (top to bottom), axis 2 toward the right.
    """
    linear = affine[:3, :3]
    world_of_axis = [int(np.argmax(np.abs(linear[:, i]))) for i in range(3)]
    if sorted(world_of_axis) != [0, 1, 2]:
        raise ValueError(f"oblique affine, cannot reorient by axis swaps:\n{affine}")
    # world axes in RAS+: 0 = x (toward Right), 1 = y (toward Anterior), 2 = z (Superior)
    # target axis -> (world axis, sign of the direction the target index grows)
    target = [(1, -1.0), (2, -1.0), (0, +1.0)]
    order = [world_of_axis.index(w) for w, _ in target]
    out = np.transpose(volume, order)
    for new_axis, (world, sign) in enumerate(target):
        if np.sign(linear[world, order[new_axis]]) != sign:
            out = np.flip(out, axis=new_axis)
    return np.ascontiguousarray(out)


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by ``factor`` along every axis with a block mean (float64)."""
    trimmed = volume[tuple(slice(0, (n // factor) * factor) for n in volume.shape)]
    shape = []
    for n in trimmed.shape:
        shape += [n // factor, factor]
    return trimmed.astype(np.float64).reshape(shape).mean(axis=(1, 3, 5))


def crop_to_foreground(
    volume: np.ndarray, threshold: float, margin: tuple[int, int, int]
) -> np.ndarray:
    """Crop to the bounding box of voxels above ``threshold``, plus ``margin`` per axis."""
    mask = volume > threshold
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.nonzero(mask.any(axis=other))[0]
        lo = max(int(hits[0]) - margin[axis], 0)
        hi = min(int(hits[-1]) + 1 + margin[axis], volume.shape[axis])
        box.append(slice(lo, hi))
    return volume[tuple(box)]


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """Rescale so the maximum becomes 255, rounding to uint8."""
    peak = float(volume.max())
    return np.clip(np.rint(volume * (255.0 / peak)), 0, 255).astype(np.uint8)


def known_sections(depth: int, spacing: int) -> list[int]:
    """Every ``spacing``-th slice, centred so both ends keep the same edge margin."""
    span = ((depth - 1) // spacing) * spacing
    start = (depth - 1 - span) // 2
    return list(range(start, depth, spacing))


def load_template(nii: Path | None) -> bytes:
    """Return the decompressed template: from ``nii`` or from the nilearn wheel."""
    if nii is not None:
        compressed = nii.read_bytes()
    else:
        from atlinter_ray.testing import pypi  # the project's cached PyPI fetcher

        wheel = pypi.download(NILEARN_SPEC)
        with zipfile.ZipFile(wheel) as zf:
            compressed = zf.read(MEMBER)
    digest = hashlib.sha256(compressed).hexdigest()
    if digest != MEMBER_SHA256:
        raise ValueError(
            f"template sha256 {digest} differs from the expected {MEMBER_SHA256}; "
            f"use {MEMBER} from {NILEARN_SPEC}"
        )
    return gzip.decompress(compressed)


def main(argv: list[str] | None = None) -> None:
    """Build the sample files into ``atlinter_ray/sample/``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nii", type=Path, default=None, help="local template .nii.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)

    volume, affine = read_nifti1(load_template(args.nii))
    volume = to_ap_dv_lr(volume, affine)
    volume = block_mean(volume, DOWNSAMPLE)
    volume = crop_to_foreground(volume, FOREGROUND, MARGIN)
    volume = to_uint8(volume)
    sections = known_sections(volume.shape[0], SPACING)

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / f"{NAME}.npy", volume[sections])
    meta = {
        "section_numbers": sections,
        "axis": "coronal",
        "reference_shape": list(volume.shape),
        "voxel_size_um": 1000.0 * DOWNSAMPLE,
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    np.savez_compressed(args.out / f"{NAME}_truth.npz", volume=volume)
    version = NILEARN_SPEC.split("==")[1]
    (args.out / "LICENSE_MNI152.txt").write_text(
        LICENSE_TEXT.format(
            member=MEMBER,
            version=version,
            sha256=MEMBER_SHA256,
            down=DOWNSAMPLE,
            margin="/".join(str(m) for m in MARGIN),
            spacing=SPACING,
        )
    )
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    print(f"volume {volume.shape} uint8, {len(sections)} known sections: {sections}")
    print(f"files in {args.out}: {sizes} (total {sum(sizes.values())} bytes)")


if __name__ == "__main__":
    main()
