"""Every job's command line: our own ``--help``/``--version``, then Hydra's composition.

One console script per job (``atlinter-ray``, ``atlinter-ray-evaluate``,
``atlinter-ray-download``, ``atlinter-ray-align``), the same apps as ``python -m
atlinter_ray`` / ``-m atlinter_ray.evaluation`` / ``-m atlinter_ray.allen`` /
``-m atlinter_ray.align`` and the thin ``jobs/*.py``
handed to ``ray job submit``. The configuration folder is ``./conf`` when the working
directory has one (a checkout, or the folder ``ray job submit --working-dir`` uploads,
so users' edits win), else the copy shipped inside the package (``atlinter_ray.conf``).

The command line is read here, not by ``hydra.main``: ``--help`` and ``--version``
are ours (:mod:`atlinter_ray.cli_help`), every override is checked against the job's
schema and config groups first (:mod:`atlinter_ray.overrides`: unknown keys are
refused even with ``+``, with "did you mean"), then Hydra's compose API builds the
configuration.

Exit status, the same for every job: 0 success; 2 bad configuration or input (nothing
was written); 1 the run failed while running (rerun the same command to finish); 130 /
143 interrupted by SIGINT / SIGTERM (finished work kept: rerun to resume,
:mod:`atlinter_ray.interrupts`). Errors go to stderr as one message (naming what failed
and the fix; the traceback only with ``run.debug=true``). Everything the process
prints is scrubbed of secret values (:mod:`atlinter_ray.secrets`).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from atlinter_ray.cli_help import JobHelp, help_text, version_text
from atlinter_ray.config import Config
from atlinter_ray.errors import AtlinterRayError, ConfigError
from atlinter_ray.interrupts import exit_status, signal_name, stop_on_signals
from atlinter_ray.overrides import check_overrides
from atlinter_ray.quiet import quiet_failures
from atlinter_ray.secrets import override_secrets, redact, redacted_output, secret_values

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


def job_groups(folder: Path, config_name: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The config groups ``conf/<config_name>.yaml`` uses: their options and default choice."""
    groups: dict[str, list[str]] = {}
    chosen: dict[str, str] = {}
    loaded = OmegaConf.to_container(OmegaConf.load(folder / f"{config_name}.yaml"))
    entries = loaded.get("defaults", []) if isinstance(loaded, dict) else []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        for group, option in entry.items():
            group = str(group)
            if group.startswith(("override", "hydra")) or not (folder / group).is_dir():
                continue
            groups[group] = sorted(p.stem for p in (folder / group).glob("*.yaml"))
            chosen[group] = str(option)
    return groups, chosen


def compose_config(folder: Path, config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``; any refusal is a ConfigError."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3",
                                   job_name=config_name):
            return compose(config_name, overrides=list(overrides))
    except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's refusals, as ours
        cause = str(exc.__cause__).splitlines()[0] if exc.__cause__ else ""
        raise ConfigError(
            f"the configuration is invalid: {exc}{': ' + cause if cause else ''}"
        ) from None


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as plain, resolved values (unresolvable interpolations left as written)."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - shown as written rather than not at all
        container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def fail(message: str, status: int) -> NoReturn:
    """Print ``message`` to stderr (scrubbed, as all output: :func:`run_app`) and exit."""
    print(f"atlinter_ray: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(
    job: Callable[[Any], int], secrets: set[str] | None = None
) -> Callable[[DictConfig], None]:
    """The task running ``job(config object)``: exit status from its result or error.

    ``job`` returns 0 or :data:`EXIT_FAILED`. Our errors exit with their
    ``exit_status``; any other exception is a runtime failure reported in one line,
    with the traceback only when ``run.debug=true``. The configuration's secret values
    join ``secrets``.
    """

    known = set() if secrets is None else secrets

    def task(cfg: DictConfig) -> None:
        known.update(secret_values(OmegaConf.to_container(cfg, resolve=False)))
        key = debug_key(cfg)
        debug = bool(OmegaConf.select(cfg, key, default=False))
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
                 f"with {key}=true for the traceback and report it.", EXIT_FAILED)
        if status:
            sys.exit(status)

    return task


def debug_key(cfg: DictConfig) -> str:
    """The job's traceback switch: ``run.debug``, or ``debug`` for jobs without a run section."""
    return "run.debug" if OmegaConf.select(cfg, "run") is not None else "debug"


@dataclass(frozen=True, slots=True)
class Options:
    """The command line split into our options and Hydra overrides."""

    help: bool
    version: bool
    verbose: bool
    cfg: bool
    overrides: list[str]


def parse_args(args: Sequence[str], command: str) -> Options:
    """Our options (``--help``, ``--version [-v]``, ``--cfg job``) apart from the overrides."""
    flags: set[str] = set()
    overrides: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            flags.add("help")
        elif arg in ("-V", "--version"):
            flags.add("version")
        elif arg in ("-v", "--verbose"):
            flags.add("verbose")
        elif arg == "--cfg":
            if not rest or rest.pop(0) != "job":
                raise ConfigError(f"--cfg takes one value, job (`{command} --cfg job model=dis`)")
            flags.add("cfg")
        elif arg.startswith("-"):
            raise ConfigError(
                f"unknown option {arg}: {command} takes --help, --version [-v], --cfg job and "
                f"KEY=VALUE overrides (`{command} --help` lists them)"
            )
        else:
            overrides.append(arg)
    if flags == {"verbose"}:
        flags.add("version")
    return Options("help" in flags, "version" in flags, "verbose" in flags, "cfg" in flags,
                   overrides)


def configure_logging() -> None:
    """Log lines as plain messages on stdout (scrubbed like everything printed)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


def run_app(job_help: JobHelp, job: Callable[[Any], int]) -> None:
    """Read the command line, compose ``conf/<config_name>.yaml`` and run ``job``.

    Everything the process prints goes through :func:`~atlinter_ray.secrets.scrub`,
    with the secret values of the overrides (known before they are parsed, so error
    messages are covered), of the environment and of the composed config. SIGINT and
    SIGTERM end the job with one line and status 130 / 143.
    """
    command = job_help.command
    with redacted_output(override_secrets(sys.argv[1:])) as secrets:
        try:
            with stop_on_signals():
                try:
                    options = parse_args(sys.argv[1:], command)
                    if options.version and not options.help:
                        print(version_text(options.verbose))
                        return
                    folder = conf_dir()
                    groups, chosen = job_groups(folder, job_help.config_name)
                    if options.help:
                        defaults = resolved(compose_config(folder, job_help.config_name, []))
                        print(help_text(job_help, groups, chosen, defaults))
                        return
                    check_overrides(options.overrides, job_help.schema, groups, command)
                    cfg = compose_config(folder, job_help.config_name, options.overrides)
                except ConfigError as exc:
                    fail(str(exc), exc.exit_status)
                if options.cfg:
                    print(OmegaConf.to_yaml(redact(resolved(cfg))), end="")
                    return
                configure_logging()
                guarded(job, secrets)(cfg)
        except KeyboardInterrupt as exc:
            print(f"atlinter_ray: {signal_name(exc)} received, stopped: {job_help.kept}.",
                  file=sys.stderr, flush=True)
            sys.exit(exit_status(exc))


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


def _schemas() -> dict[str, type]:
    """Each job's schema by config name (imported here: the side jobs' modules are heavier)."""
    from atlinter_ray.align.config import AlignConfig
    from atlinter_ray.allen.config import DownloadConfig
    from atlinter_ray.evaluation.config import EvaluateConfig

    return {"config": Config, "evaluate": EvaluateConfig, "download": DownloadConfig,
            "align": AlignConfig}


def job_help(config_name: str) -> JobHelp:
    """What ``--help`` says about the job composed from ``conf/<config_name>.yaml``."""
    schema = _schemas()[config_name]
    if config_name == "config":
        return JobHelp(
            "atlinter-ray", config_name, schema,
            "reconstruct whole 3D gene-expression volumes from sparse ISH sections "
            "(OME-Zarr), on a Ray cluster or this machine.",
            (("atlinter-ray",
              "the bundled sample (MNI152 sections) with model dis into outputs/volumes"),
             ("atlinter-ray model=farneback data=allen data.root=data/allen "
              "data.genes=[100048576] output.root=outputs/volumes",
              "your experiments (<root>/<experiment>.npy + .json) with OpenCV's Farneback"),
             ("atlinter-ray model=rife_v4 model.checkpoint=ckpt/flownet.pkl "
              "resources=gpu_cluster storage=s3 output.root=s3://bucket/volumes",
              "RIFE on a GPU cluster (RAY_ADDRESS), volumes on S3")),
            "every task already finished is kept in output.root (a task is marked done "
            "only after its slices are written); rerun the same command to resume",
        )
    if config_name == "evaluate":
        return JobHelp(
            "atlinter-ray-evaluate", config_name, schema,
            "score models on known sections held out of the input (PSNR, SSIM, MAE per "
            "model, gap and distance; JSON and PNG plots).",
            (("atlinter-ray-evaluate", "models linear and dis on the bundled sample"),
             ("atlinter-ray-evaluate models=[linear,dis,deepflow] k=[2,3,4]",
              "three models, gaps of 2, 3 and 4 sections"),
             ("atlinter-ray-evaluate data=allen data.root=data/allen data.genes=[100048576] "
              "holdout=leave_one_out", "each interior section predicted from its neighbours")),
            "the report is written only at the end; rerun the same command to evaluate again",
        )
    if config_name == "download":
        return JobHelp(
            "atlinter-ray-download", config_name, schema,
            "download Allen Mouse Brain Atlas ISH experiments, aligned to the 25 um "
            "reference space, as <output>/<experiment>.npy + .json.",
            (("atlinter-ray-download genes=[Gad1] planes=[coronal]",
              "Gad1's coronal experiments into data/allen"),
             ("atlinter-ray-download genes=[Gad1,Vip] output=s3://bucket/allen",
              "two genes, both planes, onto S3 (credentials from AWS_* or AWS_PROFILE)"),
             ("atlinter-ray-download genes=[Pvalb] nissl=true",
              "also the Nissl volume the align job needs")),
            "every experiment already complete in output is kept; rerun the same command "
            "to resume",
        )
    return JobHelp(
        "atlinter-ray-align", config_name, schema,
        "register every section of every experiment to its slice of the Nissl volume "
        "(ANTsPy), written in the layout atlinter-ray reads.",
        (("atlinter-ray-align data.root=data/allen data.genes=[100048576] "
          "reference=data/allen/ara_nissl_25.nrrd output.root=data/aligned",
          "the predecessor's SyN registration of one experiment"),
         ("atlinter-ray-align data.root=data/allen data.genes=[100048576] "
          "reference=data/allen/ara_nissl_25.nrrd registration.transform=affine",
          "an affine registration only (faster)"),
         ("atlinter-ray-align data.root=data/allen data.manifest=genes.txt "
          "reference=data/allen/ara_nissl_25.nrrd resources.max_workers=8",
          "many experiments on eight workers")),
        "every experiment already aligned is kept in output.root; rerun the same command "
        "to resume",
        ("needs the align extra (ANTsPy): pip install 'atlinter_ray[align]'",),
    )


def main() -> None:
    """``atlinter-ray``: the interpolation job."""
    run_app(job_help("config"), interpolate)


def evaluate_main() -> None:
    """``atlinter-ray-evaluate``: the evaluation job."""
    run_app(job_help("evaluate"), evaluate)


def download_main() -> None:
    """``atlinter-ray-download``: the Allen download job."""
    run_app(job_help("download"), download)


def align_main() -> None:
    """``atlinter-ray-align``: the align job (sections registered to the Nissl)."""
    run_app(job_help("align"), align)
