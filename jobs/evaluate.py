"""Evaluate models on held-out sections: the entry point for ``ray job submit``.

Example::

    python jobs/evaluate.py models=[linear,dis,deepflow] k=[2,3,4]
    python jobs/evaluate.py data=allen data.root=/data data.genes=[Gad1] holdout=leave_one_out
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from atlinter_ray.cli import run_app
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
    run_app("evaluate", run)


if __name__ == "__main__":
    main()
