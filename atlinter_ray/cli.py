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
Errors go to stderr as one message (naming what failed and the fix; the traceback only
with ``run.debug=true``), and no exception reaches Hydra (which would print every
override). Everything the process prints is scrubbed of secret values
(:mod:`atlinter_ray.secrets`).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from atlinter_ray.config import Config
from atlinter_ray.errors import AtlinterRayError, ConfigError
from atlinter_ray.quiet import quiet_failures
from atlinter_ray.secrets import override_secrets, redacted_output, secret_values

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


def fail(message: str, status: int) -> NoReturn:
    """Print ``message`` to stderr (scrubbed, as all output: :func:`run_app`) and exit."""
    print(f"atlinter_ray: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(
    job: Callable[[Any], int], secrets: set[str] | None = None
) -> Callable[[DictConfig], None]:
    """Hydra task running ``job(config object)``: exit status from its result or error.

    ``job`` returns 0 or :data:`EXIT_FAILED`. Our errors exit with their
    ``exit_status``; any other exception is a runtime failure reported in one line,
    with the traceback only when ``run.debug=true``. No exception reaches Hydra (it
    would print every override). The configuration's secret values join ``secrets``.
    """

    known = set() if secrets is None else secrets

    def task(cfg: DictConfig) -> None:
        known.update(secret_values(OmegaConf.to_container(cfg, resolve=False)))
        debug = bool(OmegaConf.select(cfg, "run.debug", default=False))
        quiet_failures(debug)
        try:
            config = OmegaConf.to_object(cfg)
        except Exception as exc:  # noqa: BLE001 - a value the schema rejects
            fail(f"the configuration is invalid: {exc}", ConfigError.exit_status)
        try:
            status = job(config)
        except AtlinterRayError as exc:
            if debug:
                traceback.print_exc()
            fail(str(exc), exc.exit_status)
        except Exception as exc:  # noqa: BLE001 - every failure ends in our own message
            if debug:
                traceback.print_exc()
            fail(f"the run failed: {type(exc).__name__}: {exc}. Work already done is kept: "
                 "rerun the same command to finish. If it fails again the same way, rerun "
                 "with run.debug=true for the traceback and report it.", EXIT_FAILED)
        if status:
            sys.exit(status)

    return task


def run_app(config_name: str, job: Callable[[Any], int]) -> None:
    """Compose ``conf/<config_name>.yaml`` with command-line overrides and run ``job``.

    Everything the process prints goes through :func:`~atlinter_ray.secrets.scrub`,
    with the secret values of the overrides (known before Hydra parses them, so its
    own error messages are covered), of the environment and of the composed config.
    Overrides that Hydra refuses exit with status 2, like any bad configuration.
    """
    with redacted_output(override_secrets(sys.argv[1:])) as secrets:
        try:
            folder = conf_dir()
        except ConfigError as exc:
            fail(str(exc), exc.exit_status)
        register_configs()
        ran: list[bool] = []

        def task(cfg: DictConfig) -> None:
            ran.append(True)
            guarded(job, secrets)(cfg)

        try:
            hydra.main(config_path=str(folder), config_name=config_name,
                       version_base="1.3")(task)()
        except SystemExit as exc:
            if not ran and exc.code not in (0, None):
                sys.exit(ConfigError.exit_status)  # Hydra refused an override
            raise


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
