"""Evaluate models on held-out sections: the entry point for ``ray job submit``.

Example::

    python jobs/evaluate.py models=[linear,dis,deepflow] k=[2,3,4]
    python jobs/evaluate.py data=allen data.root=/data data.genes=[Gad1] holdout=leave_one_out
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from atlinter_ray.cli import CONF_DIR, register_configs
from atlinter_ray.errors import AtlinterRayError
from atlinter_ray.evaluate import EvaluateConfig, evaluate, format_table

log = logging.getLogger("atlinter_ray")


def run(cfg: DictConfig) -> None:
    """Run the evaluation on a composed config; exit 2 on bad input, 1 on failed tasks."""
    config: EvaluateConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    logging.getLogger("atlinter_ray").setLevel(config.log_level)
    try:
        report = evaluate(config)
    except AtlinterRayError as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(format_table(report), flush=True)
    for name, url in report["outputs"].items():
        print(f"output {name}: {url}")
    if report["failures"]:
        sys.exit(1)


def main() -> None:
    """Compose ``conf/evaluate.yaml`` with command-line overrides and run it."""
    if not (CONF_DIR / "evaluate.yaml").is_file():
        sys.exit(
            f"atlinter_ray: {CONF_DIR / 'evaluate.yaml'} not found; run from the root of "
            "a checkout of the repository (where conf/ is), or pip install -e ."
        )
    register_configs()
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
