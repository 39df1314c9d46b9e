"""The Hydra application behind ``jobs/interpolate.py`` and ``python -m atlinter_ray``.

Configuration lives in ``conf/`` at the repository root (the folder ``ray job submit
--working-dir`` uploads); the schemas are the dataclasses of
:mod:`atlinter_ray.config`, registered here explicitly rather than on import.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from atlinter_ray import pipeline
from atlinter_ray.config import Config
from atlinter_ray.errors import AtlinterRayError
from atlinter_ray.evaluate import EvaluateConfig

log = logging.getLogger("atlinter_ray")

def find_conf_dir() -> Path:
    """``conf/`` of the checkout this package runs from, else of the working directory."""
    for candidate in (Path(__file__).resolve().parent.parent / "conf", Path.cwd() / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return Path.cwd() / "conf"


CONF_DIR = find_conf_dir()


def _sample_file(name: str) -> str:
    from atlinter_ray import sample

    return str(Path(sample.sample_dataset_path()).parent / name)


def register_configs() -> None:
    """Register the config schema and the resolvers the YAML files use."""
    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    OmegaConf.register_new_resolver("sample_dir", lambda: _sample_file(""), replace=True)
    OmegaConf.register_new_resolver(
        "sample_truth", lambda: _sample_file("mni152_t1_truth.npz"), replace=True
    )


def interpolate(cfg: DictConfig) -> None:
    """Run the pipeline on a composed config; exit non-zero on bad input or failures."""
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    logging.getLogger("atlinter_ray").setLevel(config.run.log_level)
    try:
        summary = pipeline.run(config)
    except AtlinterRayError as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(summary.to_text(), flush=True)
    if not summary.ok:
        sys.exit(1)


def run_app(config_name: str, task: Callable[[DictConfig], None]) -> None:
    """Compose ``conf/<config_name>.yaml`` with command-line overrides and run ``task``."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        sys.exit(
            f"atlinter_ray: {CONF_DIR / f'{config_name}.yaml'} not found; run from the "
            "root of a checkout of the repository (where conf/ is), or pip install -e ."
        )
    register_configs()
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()


def main() -> None:
    """Console entry point of the interpolation job."""
    run_app("config", interpolate)
