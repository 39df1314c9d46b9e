"""Every job's command line: Hydra composes ``conf/`` with the user's overrides.

One console script per job (``atlinter-ray``, ``atlinter-ray-evaluate``,
``atlinter-ray-download``, ``atlinter-ray-align``), the same apps as ``python -m
atlinter_ray`` / ``-m atlinter_ray.evaluation`` / ``-m atlinter_ray.allen`` /
``-m atlinter_ray.align`` and the thin ``jobs/*.py``
handed to ``ray job submit``. The configuration folder is ``./conf`` when the working
directory has one (a checkout, or the folder ``ray job submit --working-dir`` uploads,
so users' edits win), else the copy shipped inside the package (``atlinter_ray.conf``).

Exit status, the same for every job: 0 success; 2 bad configuration or input (nothing
was written); 1 the run failed while running (rerun the same command to finish).
Errors go to stderr as one message; secret-looking values of the configuration never
appear in it, and no exception reaches Hydra (which would print every override).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from atlinter_ray.config import Config, secret_values
from atlinter_ray.errors import AtlinterRayError, ConfigError

log = logging.getLogger("atlinter_ray")

#: Exit status of a run that failed while running (tasks, downloads).
EXIT_FAILED = 1


def conf_dir() -> Path:
    """``./conf`` when it holds the job configs, else the configs shipped in the package.

    An editable install has no ``atlinter_ray.conf`` package: its checkout's ``conf/``
    is used instead.
    """
    package = Path(__file__).resolve().parent
    candidates = [Path.cwd() / "conf", package / "conf", package.parent / "conf"]
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(
        f"no job configuration found in {' or '.join(map(str, candidates))}; reinstall "
        "atlinter_ray (pip install atlinter_ray) or run from a checkout's root"
    )


def _sample_file(name: str) -> str:
    from atlinter_ray import sample

    return str(Path(sample.sample_dataset_path()).parent / name)


def register_configs() -> None:
    """Register every job's schema and the resolvers the YAML files use."""
    from atlinter_ray.align.config import AlignConfig
    from atlinter_ray.allen.config import DownloadConfig
    from atlinter_ray.evaluation.config import EvaluateConfig

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="download_schema", node=DownloadConfig)
    store.store(name="align_schema", node=AlignConfig)
    OmegaConf.register_new_resolver("sample_dir", lambda: _sample_file(""), replace=True)
    OmegaConf.register_new_resolver(
        "sample_truth", lambda: _sample_file("mni152_t1_truth.npz"), replace=True
    )


def redacted(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def fail(message: str, status: int, secrets: Iterable[str] = ()) -> None:
    """Print ``message`` (secrets removed) to stderr and exit with ``status``."""
    print(f"atlinter_ray: error: {redacted(message, secrets)}", file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(job: Callable[[Any], int]) -> Callable[[DictConfig], None]:
    """Hydra task running ``job(config object)``: exit status from its result or error.

    ``job`` returns 0 or :data:`EXIT_FAILED`. Our errors exit with their
    ``exit_status``; any other exception is a runtime failure reported in one line, with
    the traceback only at log level DEBUG.
    """

    def task(cfg: DictConfig) -> None:
        secrets = secret_values(OmegaConf.to_container(cfg, resolve=False))
        try:
            status = job(OmegaConf.to_object(cfg))
        except AtlinterRayError as exc:
            fail(str(exc), exc.exit_status, secrets)
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED, secrets)
        if status:
            sys.exit(status)

    return task


def run_app(config_name: str, job: Callable[[Any], int]) -> None:
    """Compose ``conf/<config_name>.yaml`` with command-line overrides and run ``job``."""
    try:
        folder = conf_dir()
    except ConfigError as exc:
        fail(str(exc), exc.exit_status)
    register_configs()
    hydra.main(config_path=str(folder), config_name=config_name, version_base="1.3")(
        guarded(job)
    )()


def interpolate(config: Config) -> int:
    """The interpolation job: run the pipeline, print the summary."""
    from atlinter_ray import pipeline

    logging.getLogger("atlinter_ray").setLevel(config.run.log_level)
    summary = pipeline.run(config)
    print(summary.to_text(), flush=True)
    return 0 if summary.ok else EXIT_FAILED


def evaluate(config: Any) -> int:
    """The evaluation job: score every model on held-out sections, print the table."""
    from atlinter_ray.evaluation.job import evaluate as run_evaluation
    from atlinter_ray.evaluation.report import format_table

    logging.getLogger("atlinter_ray").setLevel(config.log_level)
    report = run_evaluation(config)
    print(format_table(report), flush=True)
    for name, url in report["outputs"].items():
        print(f"output {name}: {url}")
    return EXIT_FAILED if report["failures"] else 0


def download(config: Any) -> int:
    """The download job: Allen experiments into the npy+json layout, print the summary."""
    import json

    from atlinter_ray.allen.job import run_download, summary_dict

    logging.getLogger("atlinter_ray").setLevel(logging.INFO)
    summary = run_download(config)
    print(summary.describe())
    print(json.dumps({"summary": summary_dict(summary)}))
    return 0


def align(config: Any) -> int:
    """The align job: register every section to its Nissl slice, print the summary."""
    from atlinter_ray.align.job import run_align

    logging.getLogger("atlinter_ray").setLevel(config.run.log_level)
    summary = run_align(config)
    print(summary.to_text(), flush=True)
    return 0 if summary.ok else EXIT_FAILED


def main() -> None:
    """``atlinter-ray``: the interpolation job."""
    run_app("config", interpolate)


def evaluate_main() -> None:
    """``atlinter-ray-evaluate``: the evaluation job."""
    run_app("evaluate", evaluate)


def download_main() -> None:
    """``atlinter-ray-download``: the Allen download job."""
    run_app("download", download)


def align_main() -> None:
    """``atlinter-ray-align``: the align job (sections registered to the Nissl)."""
    run_app("align", align)
