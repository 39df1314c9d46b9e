"""The first hour of a new user: our --help and --version, strict overrides with
suggestions, resources that can never run refused at once, messages naming the cause."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atlinter_ray import __version__, cli
from atlinter_ray.config import DataConfig, ResourcesConfig
from atlinter_ray.errors import ConfigError, DatasetNotFoundError
from atlinter_ray.execution import local_capacity, refuse_unplaceable
from atlinter_ray.inputs import dataset_urls
from atlinter_ray.overrides import is_schema, schema_keys
from atlinter_ray.storage_hints import store_fix

REPO = Path(__file__).resolve().parents[1]
MAINS = {"config": cli.main, "evaluate": cli.evaluate_main, "download": cli.download_main,
         "align": cli.align_main}


def _run(monkeypatch, capsys, name: str, *args: str) -> tuple[int, str, str]:
    """Run a job's entry point in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        MAINS[name]()
        status = 0
    except SystemExit as exc:
        status = int(exc.code or 0)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("name", list(MAINS))
def test_help_is_ours_and_generated_from_the_schema(monkeypatch, capsys, name: str) -> None:
    status, out, err = _run(monkeypatch, capsys, name, "--help")
    job = cli.job_help(name)
    assert status == 0 and not err
    assert out.startswith(f"{job.command}: {job.summary}")
    assert "Hydra" not in out and "${" not in out
    examples = out.split("examples:\n")[1].split("\n\n")[0].splitlines()[::2]
    assert len(examples) == 3 and all(e.strip().startswith(job.command) for e in examples)
    for key, kind in schema_keys(job.schema):  # every key, generated: none forgotten
        if is_schema(kind) and "." in key:
            continue  # a nested section: its keys are listed in full
        assert re.search(rf"^ +{re.escape(key)}(:| = )", out, re.M), key
    assert "exit status:" in out and "130" in out and "143" in out
    assert "docs/" in out and "README.md" in out
    assert f"atlinter_ray {__version__}" in out and "torch" in out and "ray" in out
    groups, chosen = cli.job_groups(cli.conf_dir(), name)
    for group, options in groups.items():  # every option of every group the job uses
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {group}: "))
        assert f"{chosen[group]} (default)" in line
        assert all(option in line for option in options)
    if name == "config":
        assert set(groups) == {"model", "storage", "resources", "data"}
        assert "rife_v4" in groups["model"]
        assert re.search(r"interpolation\.placement = exact +exact \| atlinter", out)
        assert re.search(r"resources\.start_timeout_s = 900\.0 ", out)
    if name == "download":  # only the groups and keys the job uses
        assert groups == {} and "model" not in out.split("keys (")[1].split("exit status")[0]
    if name == "align":
        assert "pip install 'atlinter_ray[align]'" in out


def test_version_and_verbose_version(monkeypatch, capsys) -> None:
    assert _run(monkeypatch, capsys, "config", "--version") == (0, f"atlinter_ray {__version__}\n", "")
    status, out, _ = _run(monkeypatch, capsys, "download", "--version", "-v")
    assert status == 0 and out.splitlines()[0] == f"atlinter_ray {__version__}"
    names = {line.split()[0] for line in out.splitlines()[1:]}
    assert {"python", "torch", "ray", "zarr"} <= names


@pytest.mark.slow
def test_every_entry_point_answers_help_and_version(tmp_path: Path) -> None:
    """The real commands, from a folder with no conf/: the package's configs are used."""
    for argv, first in (
        ([sys.executable, "-m", "atlinter_ray", "--help"], "atlinter-ray: "),
        ([sys.executable, str(REPO / "jobs" / "align.py"), "--help"], "atlinter-ray-align: "),
        ([sys.executable, "-m", "atlinter_ray.allen", "--version"], f"atlinter_ray {__version__}"),
    ):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(first) and "Hydra" not in done.stdout + done.stderr


@pytest.mark.parametrize(("name", "override", "expected"), [
    ("config", "+output.rot=x", "did you mean output.root"),
    ("config", "output.rot=x", "did you mean output.root"),
    ("config", "model=rife4", "did you mean rife_v4"),
    ("config", "+resources.max_worker=3", "did you mean resources.max_workers"),
    ("config", "output.root.sub=x", "'output.root' is a value, not a section"),
    ("config", "run.debug=maybe", "Value 'maybe' is not a valid bool"),
    ("evaluate", "data=alen", "did you mean allen"),
    ("download", "model=dis", "unknown key 'model'"),
    ("download", "+gene=[Vip]", "did you mean genes"),
    ("align", "registration.transfrom=affine", "did you mean registration.transform"),
    ("config", "--verbos", "unknown option --verbos"),
])
def test_unknown_keys_and_options_are_refused_with_suggestions(
    monkeypatch, capsys, name: str, override: str, expected: str
) -> None:
    status, out, err = _run(monkeypatch, capsys, name, override, "--cfg", "job")
    assert status == 2 and not out
    assert expected in err and err.count("\n") == 1, err
    assert "HYDRA_FULL_ERROR" not in err and "Traceback" not in err


def test_free_form_maps_take_new_keys_with_plus(monkeypatch, capsys) -> None:
    status, out, err = _run(
        monkeypatch, capsys, "config", "storage=s3", "model=rife_v4", "model.params.scale=0.5",
        "+output.storage_options.endpoint_url=http://127.0.0.1:9000", "+model.params.extra=1",
        "--cfg", "job",
    )
    assert status == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["output"]["storage_options"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert cfg["model"]["params"]["extra"] == 1 and cfg["model"]["params"]["scale"] == 0.5


def test_workers_no_local_node_can_place_are_refused() -> None:
    gpu = ResourcesConfig(gpus_per_worker=1, cpus_per_worker=4)
    with pytest.raises(ConfigError) as info:
        refuse_unplaceable(gpu, {"CPU": 16.0, "GPU": 0.0})
    message = str(info.value)
    assert "resources.gpus_per_worker=1" in message and "0 GPUs" in message
    assert "resources=laptop" in message and "RAY_ADDRESS" in message
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_worker=4: .* has 2 CPUs"):
        refuse_unplaceable(gpu, {"CPU": 2.0, "GPU": 1.0})
    refuse_unplaceable(gpu, {"CPU": 4.0, "GPU": 1.0})  # fits: accepted


def test_only_a_cluster_the_job_starts_itself_is_judged(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    capacity = local_capacity(ResourcesConfig(local_cpus=3, local_gpus=0))
    assert capacity == {"CPU": 3.0, "GPU": 0.0}
    assert local_capacity(ResourcesConfig(address="ray://head:10001")) is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # may autoscale: the wait stays
    assert local_capacity(ResourcesConfig()) is None


@pytest.mark.slow
def test_gpu_cluster_on_a_gpu_less_local_cluster_exits_2_before_any_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "atlinter_ray", "resources=gpu_cluster", "resources.local_gpus=0",
         f"output.root={tmp_path / 'vol'}"],
        cwd=tmp_path, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "resources.gpus_per_worker=1" in done.stderr and "resources=laptop" in done.stderr
    assert not (tmp_path / "vol").exists() and "Traceback" not in done.stderr


def test_start_timeout_in_the_docs_is_the_shipped_one() -> None:
    """The waits the docs state are the ones the shipped configs set."""
    default = ResourcesConfig().start_timeout_s
    gpu = yaml.safe_load((REPO / "conf" / "resources" / "gpu_cluster.yaml").read_text())
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    stated = [(path.name, line) for path in docs if path.is_file()
              for line in path.read_text().splitlines() if "start_timeout_s" in line]
    assert stated, "the docs no longer mention resources.start_timeout_s"
    for name, line in stated:
        for number in re.findall(r"default (\d+) s", line):
            assert float(number) == default, (name, line)
        for number in re.findall(r"gpu_cluster[^|]*?(\d+) s", line):
            assert float(number) == gpu["start_timeout_s"], (name, line)


def test_a_missing_data_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"data\.root=.*nope: no such folder"):
        dataset_urls(DataConfig(root=str(tmp_path / "nope"), genes=["a", "b"]))
    (tmp_path / "there").mkdir()
    assert dataset_urls(DataConfig(root=str(tmp_path / "there"), genes=["a"])) == [
        f"{tmp_path / 'there'}/a"]


def test_store_fixes_name_the_cause() -> None:
    read_only = store_fix("/data/out", PermissionError(errno.EACCES, "Permission denied"),
                          "output.root", "output.storage_options")
    assert "may not write there" in read_only and "credential" not in read_only.lower()
    full = store_fix("/data/out", OSError(errno.ENOSPC, "No space left"), "output.root", "o")
    assert "disk is full" in full and "credential" not in full.lower()
    from botocore.exceptions import NoCredentialsError

    missing = store_fix("s3://b/x", NoCredentialsError(), "output.root", "output.storage_options")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        assert name in missing
    refused = store_fix("s3://b/x", PermissionError("AccessDenied"), "output.root", "o")
    assert "refused these credentials" in refused
    assert "bucket does not exist" in store_fix("s3://b/x", FileNotFoundError("NoSuchBucket"),
                                                "output.root", "o")


def test_s3_without_credentials_names_the_environment_variables(s3_server, tmp_path, monkeypatch) -> None:
    from atlinter_ray import pipeline
    from atlinter_ray.config import Config
    from atlinter_ray.errors import OutputRootError

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = Config()
    from atlinter_ray.sample import sample_dataset_path

    cfg.data.root = str(Path(sample_dataset_path()).parent)
    cfg.data.genes = ["mni152_t1"]
    cfg.output.root = "s3://atlas-out/no-credentials"
    cfg.output.storage_options = {"endpoint_url": s3_server["endpoint_url"]}
    cfg.run.serial, cfg.run.progress = True, False
    with pytest.raises(OutputRootError) as info:
        pipeline.run(cfg)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        assert name in str(info.value)


@pytest.mark.parametrize("name", list(MAINS))
def test_the_traceback_switch_a_failure_names_is_a_key_of_the_job(capsys, name: str) -> None:
    from atlinter_ray.overrides import check_overrides

    def boom(config: object) -> int:
        raise RuntimeError("disk on fire")

    cfg = cli.compose_config(cli.conf_dir(), name, [])
    with pytest.raises(SystemExit) as info:
        cli.guarded(boom)(cfg)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "disk on fire" in err and "Traceback" not in err
    switch = re.search(r"rerun with (\S+)=true for the traceback", err).group(1)
    job = cli.job_help(name)
    check_overrides([f"{switch}=true"], job.schema, cli.job_groups(cli.conf_dir(), name)[0],
                    job.command)  # accepted, not "unknown key"
    with pytest.raises(SystemExit):
        cli.guarded(boom)(cli.compose_config(cli.conf_dir(), name, [f"{switch}=true"]))
    assert "Traceback" in capsys.readouterr().err
