"""The cluster configs in infra/ are checked with the tools that will read them.

- Cloud launcher YAML (AWS, GCP): Ray's own schema and preparation
  (``validate_config``, ``prepare_config``), then Ray's autoscaler v2 scheduler decides
  what it would launch for queued GPU actors, so "GPU workers from 0, spot first,
  on-demand beyond spot's maximum or once spot is marked unavailable" is Ray's
  behaviour on our file, not our reading of it.
- KubeRay manifests: the v1.7.0 CRD schemas (tests/data/kuberay, descriptions
  stripped) with Kubernetes' strict field validation (unknown fields are errors, as
  ``kubectl apply`` reports them), a subset of the operator's own Go validation, and
  Ray's RayCluster -> autoscaler translation.
- Dockerfile: static checks (Ray pin equals pyproject.toml's, torch inside its range,
  the build context holds what the image needs) and the entry point run from a copy
  of exactly the files the build context would hold.
- Hydra overrides written in rayjob.yaml, docs/cluster.md and README.md's "Run on a cluster"
  compose against conf/.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY_VERSION = "v1.7.0"
KUBERAY_SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"
CLOUD_CONFIGS = {"aws": INFRA / "aws" / "cluster.yaml", "gcp": INFRA / "gcp" / "cluster.yaml"}


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pinned_ray_version() -> str:
    for dep in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml has no exact ray==X pin")


# --- cloud launcher -----------------------------------------------------------------


def cloud_config_problems(config: dict) -> list[str]:
    """What is wrong with a launcher config for our workload (empty list: nothing)."""
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    head_type = types.get(head, {})
    if head_type.get("resources", {}).get("GPU") != 0:
        problems.append(f"head type {head!r} must declare resources GPU: 0")
    if head_type.get("node_config", {}).get("guestAccelerators"):
        problems.append(f"head type {head!r} has guestAccelerators")
    if re.match(r"(g|p)\d", head_type.get("node_config", {}).get("InstanceType", "")):
        problems.append(f"head type {head!r} is a GPU instance type")
    workers = {name: t for name, t in types.items() if name != head}
    gpu_workers = {n: t for n, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    if not gpu_workers:
        problems.append("no worker type declares resources GPU >= 1")
    for name, t in gpu_workers.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"GPU worker type {name!r} must have min_workers 0")
        if t.get("max_workers", 0) < 1:
            problems.append(f"GPU worker type {name!r} needs max_workers >= 1")
    spot = [n for n, t in gpu_workers.items() if is_spot(t["node_config"])]
    on_demand = [n for n, t in gpu_workers.items() if not is_spot(t["node_config"])]
    if len(spot) != 1 or len(on_demand) != 1:
        problems.append(f"want one spot and one on-demand GPU type, got {spot} / {on_demand}")
    else:
        s, o = gpu_workers[spot[0]], gpu_workers[on_demand[0]]
        if s["resources"] != o["resources"]:
            problems.append("spot and on-demand GPU types must have the same resources")
        if s.get("priority", 0) <= o.get("priority", 0):
            problems.append("the spot type needs a higher priority than the on-demand type")
    if not config.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be set and > 0")
    if not config.get("docker", {}).get("image"):
        problems.append("docker.image must name our image")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(config.get(key, []))
        if "RAY_AUTH_MODE=token" not in text:
            problems.append(f"{key} must export RAY_AUTH_MODE=token")
        token_dir = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/([\w.-]+)/auth_token", text)
        if not token_dir or f"~/{token_dir.group(1)}" not in config.get("file_mounts", {}):
            problems.append(f"{key}: RAY_AUTH_TOKEN_PATH must point into a file mount")
    return problems


def is_spot(node_config: dict) -> bool:
    aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    gcp = isinstance(scheduling, dict) and scheduling.get("provisioningModel") == "SPOT"
    return aws or gcp


@functools.cache
def gpu_actor() -> dict[str, float]:
    """The resources one worker actor asks for under ``resources=gpu_cluster``."""
    resources = compose_overrides(["resources=gpu_cluster"]).resources
    return {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}


def plan_launches(config: dict, count: int, shape=None, availability=None) -> dict:
    """Node types Ray's autoscaler (v2) would launch for ``count`` queued ``shape``s.

    ``shape`` defaults to the job's GPU actor (:func:`gpu_actor`): the node types must
    be able to host what the job really asks for.

    ``availability`` maps node types to the recoverable availability score the
    autoscaler (Ray 2.60) sets to 0 after an allocation timeout and lets recover.
    """
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    autoscaling = AutoscalingConfig(config, skip_content_hash=True)
    request = SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=autoscaling.get_node_type_configs(),
        max_num_nodes=autoscaling.get_max_num_nodes(),
        idle_timeout_s=autoscaling.get_idle_timeout_s(),
        resource_requests=[
            ResourceRequestByCount(
                request=ResourceRequestUtil.make(shape or gpu_actor()), count=count
            )
        ],
        recoverable_resource_availabilities=availability or {},
    )
    reply = ResourceDemandScheduler().schedule(request)
    launches: dict[str, int] = {}
    for launch in reply.to_launch:
        launches[launch.instance_type] = launches.get(launch.instance_type, 0) + launch.count
    return launches


@pytest.fixture(params=sorted(CLOUD_CONFIGS))
def cloud(request):
    """(name, raw config, config prepared by Ray as `ray up` does)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(CLOUD_CONFIGS[request.param])
    validate_config(raw)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return request.param, raw, prepared


def test_cloud_config_passes_ray_validation_and_our_rules(cloud):
    name, raw, prepared = cloud
    assert raw["provider"]["type"] == name
    assert cloud_config_problems(raw) == []
    assert cloud_config_problems(prepared) == []


def test_cloud_rules_catch_broken_configs(cloud):
    _, raw, _ = cloud
    head = raw["head_node_type"]
    gpu_type = next(n for n, t in raw["available_node_types"].items() if is_spot(t["node_config"]))
    breakages = {
        "head GPU": lambda c: c["available_node_types"][head]["resources"].update(GPU=1),
        "min 1": lambda c: c["available_node_types"][gpu_type].update(min_workers=1),
        "no idle": lambda c: c.pop("idle_timeout_minutes"),
        "priority": lambda c: c["available_node_types"][gpu_type].update(priority=-1),
        "no auth": lambda c: c.update(worker_start_ray_commands=["ray start --address=x"]),
    }
    for label, breaks in breakages.items():
        broken = copy.deepcopy(raw)
        breaks(broken)
        assert cloud_config_problems(broken), label


def test_ray_schema_rejects_unknown_fields(cloud):
    from ray.autoscaler._private.util import validate_config

    _, raw, _ = cloud
    broken = copy.deepcopy(raw)
    broken["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_autoscaler_starts_gpu_workers_from_zero_spot_first(cloud):
    _, _, prepared = cloud
    types = prepared["available_node_types"]
    spot = next(n for n, t in types.items() if is_spot(t["node_config"]))
    on_demand = next(
        n for n, t in types.items()
        if n != prepared["head_node_type"] and not is_spot(t["node_config"])
    )
    # Nothing queued: nothing launched (min_workers 0 everywhere).
    assert plan_launches(prepared, 0) == {}
    # CPU-only work never starts a GPU node. (The request lists no running nodes, so
    # the scheduler places it on a fresh head-type node.)
    assert not set(plan_launches(prepared, 2, shape={"CPU": 1})) & {spot, on_demand}
    # Queued GPU actors: one spot node each.
    assert plan_launches(prepared, 3) == {spot: 3}
    # Spot marked unavailable (an allocation timed out): on-demand takes over.
    assert plan_launches(prepared, 3, availability={spot: 0.0}) == {on_demand: 3}
    # More actors than spot's maximum: the rest on demand, capped by max_workers.
    spot_max, od_max = types[spot]["max_workers"], types[on_demand]["max_workers"]
    assert plan_launches(prepared, spot_max + od_max + 5) == {spot: spot_max, on_demand: od_max}


# --- KubeRay ------------------------------------------------------------------------


def crd_schema(kind: str) -> dict:
    path = KUBERAY_SCHEMAS / f"{kind}.{KUBERAY_VERSION}.json.gz"
    return json.loads(gzip.decompress(path.read_bytes()))


def strict_jsonschema(node):
    """A Kubernetes structural schema as JSON Schema with strict field validation.

    Objects with ``properties`` reject unknown fields (what ``kubectl apply`` does
    with ``--validate=strict``, its default); ``nullable`` admits null;
    int-or-string already comes as ``anyOf``. CEL rules are not evaluated.
    """
    if isinstance(node, list):
        return [strict_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_jsonschema(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def manifest_errors(manifest: dict, kind: str) -> list[str]:
    """Schema errors of a manifest against a KubeRay CRD (empty list: valid)."""
    crd = crd_schema(kind)
    errors = []
    if manifest.get("apiVersion") != f"{crd['group']}/{crd['version']}":
        errors.append(f"apiVersion {manifest.get('apiVersion')!r}")
    if manifest.get("kind") != crd["kind"]:
        errors.append(f"kind {manifest.get('kind')!r}")
    validator = jsonschema.Draft4Validator(strict_jsonschema(crd["openAPIV3Schema"]))
    for error in validator.iter_errors(manifest):
        errors.append(f"{'.'.join(map(str, error.absolute_path))}: {error.message}")
    return errors


def raycluster_spec_problems(spec: dict) -> list[str]:
    """KubeRay's own validation (ValidateRayClusterSpec, v1.7.0) we can hit, plus ours."""
    problems = []
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        pod = group["template"]["spec"]
        if not pod.get("containers"):
            problems.append(f"{name}: no container")
        params = group.get("rayStartParams", {})
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            problems.append(f"{name}: resources in both rayStartParams and resources")
        if spec.get("autoscalerOptions", {}).get("version") == "v2":
            if pod.get("restartPolicy", "Never") != "Never":
                problems.append(f"{name}: restartPolicy must be Never/unset with autoscaler v2")
    for g in spec.get("workerGroupSpecs", []):
        if not 0 <= g["minReplicas"] <= g["maxReplicas"]:
            problems.append(f"{g['groupName']}: need 0 <= minReplicas <= maxReplicas")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(p) for p in spec.get("rayVersion", "0").split("."))
        if version < (2, 52, 0):
            problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    # Ours: autoscaling on, GPU workers from 0, images pinned to our Ray.
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if spec.get("rayVersion") != pinned_ray_version():
        problems.append(f"rayVersion {spec.get('rayVersion')} != pyproject's ray")
    gpu_groups = [
        g for g in spec.get("workerGroupSpecs", [])
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]
    if not gpu_groups:
        problems.append("no worker group has an nvidia.com/gpu limit")
    for g in gpu_groups:
        if g["minReplicas"] != 0:
            problems.append(f"GPU group {g['groupName']} must have minReplicas 0")
    return problems


def autoscaler_view(spec: dict, name: str) -> dict:
    """The autoscaling config Ray's KubeRay integration derives from a cluster spec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_yaml(INFRA / "k8s" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(INFRA / "k8s" / "rayjob.yaml")


def test_raycluster_matches_the_kuberay_crd(raycluster):
    assert manifest_errors(raycluster, "rayclusters") == []
    assert raycluster_spec_problems(raycluster["spec"]) == []
    assert len(raycluster["metadata"]["name"]) <= 53  # KubeRay's MaxRayClusterNameLength


def test_rayjob_matches_the_kuberay_crd(rayjob, raycluster):
    assert manifest_errors(rayjob, "rayjobs") == []
    spec = rayjob["spec"]
    assert raycluster_spec_problems(spec["rayClusterSpec"]) == []
    assert len(rayjob["metadata"]["name"]) <= 47  # KubeRay's MaxRayJobNameLength
    assert spec["shutdownAfterJobFinishes"] is True
    # One cluster shape, written twice: keep them identical.
    assert spec["rayClusterSpec"] == raycluster["spec"]


def test_crd_validation_catches_broken_manifests(raycluster):
    typo = copy.deepcopy(raycluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    wrong_type = copy.deepcopy(raycluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    missing = copy.deepcopy(raycluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    bad_enum = copy.deepcopy(raycluster)
    bad_enum["spec"]["autoscalerOptions"]["version"] = "v3"
    for broken in (typo, wrong_type, missing, bad_enum):
        assert manifest_errors(broken, "rayclusters")
    no_gpu = copy.deepcopy(raycluster["spec"])
    container = no_gpu["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for part in ("limits", "requests"):
        container["resources"][part].pop("nvidia.com/gpu")
    assert raycluster_spec_problems(no_gpu)
    always = copy.deepcopy(raycluster["spec"])
    always["headGroupSpec"]["template"]["spec"]["restartPolicy"] = "Always"
    assert raycluster_spec_problems(always)


def test_ray_reads_the_raycluster_as_gpu_workers_from_zero(raycluster):
    view = autoscaler_view(raycluster["spec"], raycluster["metadata"]["name"])
    types = view["available_node_types"]
    assert types["headgroup"]["resources"].get("GPU", 0) == 0
    assert types["gpu"]["resources"]["GPU"] == 1
    assert types["gpu"]["min_workers"] == 0 and types["gpu"]["max_workers"] >= 1
    assert view["idle_timeout_minutes"] == raycluster["spec"]["autoscalerOptions"][
        "idleTimeoutSeconds"
    ] / 60
    assert plan_launches(view, 0) == {}
    assert plan_launches(view, 2) == {"gpu": 2}


def test_rayjob_entrypoint_and_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/interpolate.py"]
    overrides = argv[2:]
    assert "resources=gpu_cluster" in overrides and "storage=s3" in overrides
    compose_overrides(overrides)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # Ray's field names (RuntimeEnv(...) itself would also check that working_dir
    # exists, which only holds inside the image).
    assert set(runtime_env) <= RuntimeEnv.known_fields, set(runtime_env) - RuntimeEnv.known_fields
    assert all(isinstance(p, str) for p in runtime_env.get("excludes", []))
    # The image's checkout is the job's working directory: jobs/ and conf/ resolve.
    assert Path(runtime_env["working_dir"]) == Path(dockerfile_env()["APP_DIR"])


# --- Hydra overrides written in infra/, the manual and the README ----------------------


def _cluster_section() -> str:
    """The manual's cluster page, then README.md's "## Run on a cluster" section."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Run on a cluster")
    end = text.find("\n## ", start + 1)
    return (REPO / "docs" / "cluster.md").read_text() + "\n" + text[start : end if end > 0 else None]


def compose_overrides(overrides: list[str]):
    """Compose conf/ with ``overrides`` as the job would; raise on any bad override."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from atlinter_ray.cli import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def documented_job_commands() -> list[list[str]]:
    """The Hydra overrides of every `python jobs/interpolate.py` on the cluster pages."""
    text = _cluster_section()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            if "python jobs/interpolate.py" not in line:
                continue
            tail = line.split("python jobs/interpolate.py", 1)[1]
            commands.append([t for t in shlex.split(tail) if t != "..."])
    return commands


def test_documented_commands_compose():
    commands = documented_job_commands()
    assert len(commands) >= 2, commands
    for overrides in commands:
        compose_overrides(overrides)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_overrides(["resources.max_worker=3"])
    # storage_options is an open mapping: a new key needs `+` (as the docs write it).
    with pytest.raises(ConfigCompositionException):
        compose_overrides(["storage=s3", "output.storage_options.endpoint_url=http://x"])


def test_documented_paths_exist():
    text = _cluster_section()
    paths = set(re.findall(r"infra/[\w./-]+\.yaml", text))
    assert paths >= {str(p.relative_to(REPO)) for p in CLOUD_CONFIGS.values()}
    for path in paths:
        assert (REPO / path).is_file(), path


# --- container image ----------------------------------------------------------------

DOCKERFILE = INFRA / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, flags=re.M)
    ]


def dockerfile_args() -> dict[str, str]:
    return dict(
        arg.split("=", 1) for ins, arg in dockerfile_instructions() if ins == "ARG" and "=" in arg
    )


def dockerfile_env() -> dict[str, str]:
    env = {}
    for ins, arg in dockerfile_instructions():
        if ins == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    return env


def test_dockerfile_pins_the_same_ray_and_python():
    args = dockerfile_args()
    assert args["RAY_VERSION"] == pinned_ray_version()
    base = next(arg for ins, arg in dockerfile_instructions() if ins == "FROM")
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu"
    python = tuple(int(d) for d in re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"]).groups())
    minimum = re.fullmatch(r">=3\.(\d+)", pyproject()["project"]["requires-python"])
    assert python >= (int(minimum.group(1)),)


def test_dockerfile_torch_is_inside_pyproject_range():
    from packaging.requirements import Requirement

    torch = next(
        Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch")
    )
    assert dockerfile_args()["TORCH_VERSION"] in torch.specifier


def test_dockerfile_installs_the_package_after_copying_it():
    steps = dockerfile_instructions()
    copies = [i for i, (ins, _) in enumerate(steps) if ins == "COPY"]
    install = next(
        i for i, (ins, arg) in enumerate(steps)
        if ins == "RUN" and re.search(r'pip install (--no-cache-dir )?"?\.(\[[a-z,]+\])?"?(\s|$)', arg)
    )
    assert copies and max(copies) < install
    assert {"pyproject.toml", "README.md", "atlinter_ray", "jobs", "conf"} <= copy_sources()


def copy_sources() -> set[str]:
    """The source paths of every COPY instruction (options dropped)."""
    return {
        src
        for ins, arg in dockerfile_instructions() if ins == "COPY"
        for src in arg.split()[:-1] if not src.startswith("--")
    }


def dockerignore_keeps(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        # A pattern also matches everything below a matched directory.
        if re.fullmatch(regex + "(/.*)?", relpath):
            keep = negate
    return keep


def build_context(dest: Path) -> list[str]:
    """Copy the files the Docker build context would hold to ``dest``."""
    ignore = INFRA / "docker" / "Dockerfile.dockerignore"
    patterns = [
        ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split()
    kept = [p for p in tracked if (REPO / p).is_file() and dockerignore_keeps(p, patterns)]
    for rel in kept:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return kept


def test_build_context_holds_what_the_image_needs(tmp_path):
    kept = build_context(tmp_path)
    for src in copy_sources():
        assert (tmp_path / src).exists(), f"COPY {src}: not in the build context"
    assert not [p for p in kept if p.startswith(("tests/", ".git", "infra/", ".cache/"))]
    # The image's entry point runs from exactly these files (the editable install
    # puts the checkout on sys.path; PYTHONPATH does the same here).
    result = subprocess.run(
        [sys.executable, "jobs/interpolate.py", "--help"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resources: " in result.stdout


def test_image_name_is_the_same_everywhere():
    import atlinter_ray

    version = atlinter_ray.__version__  # pyproject.toml reads it from there
    images = {
        str(CLOUD_CONFIGS[c].relative_to(REPO)): load_yaml(CLOUD_CONFIGS[c])["docker"]["image"]
        for c in CLOUD_CONFIGS
    }
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (INFRA / "k8s" / name).read_text()
        for image in re.findall(r"^\s*image:\s*(\S+)", text, flags=re.M):
            images[f"infra/k8s/{name}"] = image
    assert len(set(images.values())) == 1, images
    image = images.popitem()[1]
    assert image.endswith(f":{version}"), image
    assert image.split(":")[0] in (INFRA / "docker" / "README.md").read_text()
    assert fnmatch.fnmatch(image, "*/*:*")
