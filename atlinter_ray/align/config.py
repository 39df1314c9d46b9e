"""The align job's configuration schema (``conf/align.yaml``); no Hydra import."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from atlinter_ray.config import DataConfig, ResourcesConfig, RunConfig
from atlinter_ray.errors import ConfigError
from atlinter_ray.execution import check_resources


class Transform(StrEnum):
    """The transform ANTs fits, by its ``type_of_transform`` (see :data:`ANTS_TRANSFORMS`)."""

    #: Affine, then deformable SyN, mutual information: the predecessor's choice.
    syn = "syn"
    #: Rigid, affine, then SyN.
    syn_ra = "syn_ra"
    #: Deformable SyN only, no linear stage first.
    syn_only = "syn_only"
    #: Affine, then SyN driven by cross-correlation (same-contrast images).
    syn_cc = "syn_cc"
    #: Affine, then a finer, more deformable SyN (slower).
    syn_aggro = "syn_aggro"
    affine = "affine"
    similarity = "similarity"
    rigid = "rigid"
    translation = "translation"


#: Our name -> ANTsPy's ``type_of_transform``.
ANTS_TRANSFORMS: dict[Transform, str] = {
    Transform.syn: "SyN",
    Transform.syn_ra: "SyNRA",
    Transform.syn_only: "SyNOnly",
    Transform.syn_cc: "SyNCC",
    Transform.syn_aggro: "SyNAggro",
    Transform.affine: "Affine",
    Transform.similarity: "Similarity",
    Transform.rigid: "Rigid",
    Transform.translation: "Translation",
}

#: ``ants.registration`` keywords ``registration.params`` may set, and their kinds.
ANTS_PARAMS: dict[str, type] = {
    "grad_step": float,
    "flow_sigma": float,
    "total_sigma": float,
    "aff_metric": str,
    "aff_sampling": int,
    "aff_random_sampling_rate": float,
    "syn_metric": str,
    "syn_sampling": int,
    "reg_iterations": tuple,
    "aff_iterations": tuple,
    "aff_shrink_factors": tuple,
    "aff_smoothing_sigmas": tuple,
}


class Fill(StrEnum):
    """What fills the pixels a transform brings in from outside the section."""

    #: The predecessor's: each channel's corner value for RGB, 0 for grayscale.
    atlinter = "atlinter"
    #: Each channel's corner value (the slide's background), RGB and grayscale.
    corner = "corner"
    zero = "zero"


class Contrast(StrEnum):
    """The image ANTs registers to the Nissl, made from the section."""

    #: The predecessor's: ``1 - gray`` for RGB (ISH is dark on a light slide), grayscale as is.
    auto = "auto"
    as_is = "as_is"
    inverted = "inverted"


@dataclass
class RegistrationConfig:
    """How each section is registered to its Nissl slice.

    ``params`` are passed on to ``ants.registration`` (names in :data:`ANTS_PARAMS`,
    e.g. ``reg_iterations: [40, 20, 0]``, ``syn_metric: CC``). ``seed`` fixes ANTs'
    random metric sampling; with one ITK thread per worker a rerun gives the same bytes.
    """

    transform: Transform = Transform.syn
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 1
    fill: Fill = Fill.atlinter
    contrast: Contrast = Contrast.auto


@dataclass
class AlignOutputConfig:
    """Where the aligned datasets, their transforms and pictures go."""

    #: Local folder or fsspec URL: ``<root>/<experiment>.npy`` + ``.json`` (the layout the
    #: interpolation job reads), ``transforms/<experiment>.npy``, ``overlays/<experiment>.png``.
    root: str = "outputs/aligned"
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Redo experiments already aligned here with other settings (else: refused).
    overwrite: bool = False
    #: Sections drawn in each experiment's picture (0: no picture).
    overlay_sections: int = 4


@dataclass
class AlignConfig:
    """Everything one align run needs (the schema of ``conf/align.yaml``).

    ``reference`` is the Nissl volume (``.nrrd`` as Allen ships it, or ``.npy``) in
    reference orientation, of each dataset's ``reference_shape``; local or any fsspec
    URL, read with ``data.storage_options``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    reference: str | None = None
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    output: AlignOutputConfig = field(default_factory=AlignOutputConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)


def ants_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``registration.params`` checked and converted for ``ants.registration``."""
    unknown = sorted(set(params) - set(ANTS_PARAMS))
    if unknown:
        raise ConfigError(
            f"registration.params: unknown {unknown}; choose from {sorted(ANTS_PARAMS)} "
            "(keywords of ants.registration)"
        )
    out: dict[str, Any] = {}
    for name, value in params.items():
        kind = ANTS_PARAMS[name]
        if kind is tuple:
            values = list(value) if isinstance(value, (list, tuple)) else None
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(
                    f"registration.params.{name}={value!r}: give a list of integers, e.g. [40, 20, 0]"
                )
            out[name] = tuple(values)
        elif kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"registration.params.{name}={value!r}: give a name, e.g. mattes")
            out[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"registration.params.{name}={value!r}: give a number")
            out[name] = kind(value)
    return out


def check_config(cfg: AlignConfig) -> None:
    """Refuse an align run that cannot work, before any data is read."""
    if importlib.util.find_spec("ants") is None:
        raise ConfigError(
            "the align job needs ANTsPy, which is not installed: pip install "
            "'atlinter_ray[align]' (or pip install antspyx)"
        )
    if not cfg.reference:
        raise ConfigError(
            "reference is not set: give the Nissl volume (.nrrd as Allen ships it, or .npy), "
            "e.g. reference=data/allen/ara_nissl_25.nrrd (atlinter-ray-download nissl=true "
            "fetches it)"
        )
    if not cfg.reference.endswith((".nrrd", ".npy")):
        raise ConfigError(
            f"reference={cfg.reference}: not a .nrrd or .npy file; give the Nissl volume in one "
            "of these formats"
        )
    ants_params(cfg.registration.params)
    if cfg.output.overlay_sections < 0:
        raise ConfigError(
            f"output.overlay_sections={cfg.output.overlay_sections}: give 0 (no picture) or more"
        )
    check_resources(cfg.resources)
