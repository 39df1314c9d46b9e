"""The evaluation job's configuration schema (``conf/evaluate.yaml``); no Hydra import."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from atlinter_ray.config import DataConfig, ResourcesConfig
from atlinter_ray.errors import ConfigError
from atlinter_ray.execution import check_resources
from atlinter_ray.planning import Placement, as_choice


class Holdout(StrEnum):
    """How known sections are held out: every k-th kept, or each one alone."""

    every_k = "every_k"
    leave_one_out = "leave_one_out"


@dataclass
class EvaluateConfig:
    """Everything one evaluation run needs (the schema of ``conf/evaluate.yaml``).

    ``models`` are registry names built with
    :func:`~atlinter_ray.engine.build_interpolator`; ``params`` and ``checkpoints``
    are keyed by model name. ``holdout`` is ``every_k`` (keep every ``k``-th known
    section, hold out the rest; ``k`` may be a list, e.g. ``[2, 3, 4]``, to sweep gap
    sizes) or ``leave_one_out`` (each interior section predicted from its two
    neighbours). ``panel_slices`` held-out slices per dataset (from the first ``k``)
    are drawn as truth / prediction / error.
    """

    data: DataConfig = field(default_factory=DataConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    models: list[str] = field(default_factory=lambda: ["linear", "dis"])
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    holdout: Holdout = Holdout.every_k
    k: Any = 2
    placement: Placement = Placement.exact
    panel_slices: int = 3
    output_root: str = "outputs/evaluation"
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    serial: bool = False
    log_level: str = "INFO"
    #: Print the traceback of an unexpected failure (secret values still removed).
    debug: bool = False


def check_config(cfg: EvaluateConfig) -> None:
    """Refuse an evaluation that cannot run, before any data is read or model built."""
    cfg.holdout = as_choice(Holdout, cfg.holdout, "holdout")
    cfg.placement = as_choice(Placement, cfg.placement, "placement")
    if cfg.holdout == "every_k":
        ks(cfg.k)
    if not cfg.models or len(set(cfg.models)) != len(cfg.models):
        raise ConfigError(
            f"models={list(cfg.models)}: name at least one model, each once "
            "(e.g. models=[linear,dis])"
        )
    if cfg.panel_slices < 0:
        raise ConfigError(f"panel_slices={cfg.panel_slices}: must be 0 or more")
    check_resources(cfg.resources)


def ks(k: Any) -> list[int]:
    """The ``k`` setting as a list of integers >= 2 (one int or a list of them)."""
    values = list(k) if isinstance(k, (list, tuple)) else [k]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in values):
        raise ConfigError(
            f"k={k!r}: holdout=every_k keeps every k-th known section and needs an "
            "integer k >= 2 (k=2 holds out every other section), or a list of them"
        )
    return values
