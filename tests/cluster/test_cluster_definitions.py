"""Static checks of the cluster side: launcher YAMLs, KubeRay manifests, runtime envs, the image.

Nothing here starts a process or touches the network; the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
IMAGE = "pixellm:0.1.0"  # the tag platform/image/Dockerfile documents and every manifest uses

# Repository paths that definitions may point at: entrypoints and platform files.
REPO_PATH = re.compile(
    r"(?<![\w/.-])(?:/home/ray/pixellm/)?"
    r"((?:jobs/[\w-]+\.py)|(?:platform/(?:recipes|runtime|serve|deepspeed|image)/[\w.-]+\.(?:yaml|json)))"
)


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY_DIR.glob("*.yaml")) for d in _yaml_docs(p)]


def _referenced_paths(text: str) -> set[str]:
    return set(REPO_PATH.findall(text))


# --------------------------------------------------------------------------- launcher YAMLs


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_there_are_launcher_yamls_for_aws_and_gcp():
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path, ray_schema):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema)
    # Ray's own check after filling provider defaults (what `ray up` runs before launching).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_has_cpu_head_autoscaling_gpu_workers_and_shared_storage(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node must be CPU-only"
    gpu_groups = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_groups, f"{path.name}: no GPU worker group"
    for name, group in gpu_groups.items():
        assert group["resources"]["GPU"] == 8, f"{name}: expected 8-GPU nodes"
        assert group["min_workers"] == 0 and group["max_workers"] >= 1, name
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())
    # Shared storage reaches the container, and the head runs MLflow on PostgreSQL.
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    init = " ".join(config["initialization_commands"])
    assert "mount" in init and "/mnt/shared" in init
    head_start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "$PIXELLM_MLFLOW_BACKEND_URI" in head_start
    assert "--artifacts-destination /mnt/shared/mlflow-artifacts" in head_start
    for cmds in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "MLFLOW_TRACKING_URI=" in " ".join(config[cmds]), cmds


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_file_mounts_and_env_variables_exist(path):
    config = yaml.safe_load(path.read_text())
    for target, source in config["file_mounts"].items():
        if source.startswith("~"):
            continue  # the user's own Ray auth token (`ray get-auth-token --generate`)
        assert (ROOT / source).exists(), f"{path.name}: file_mounts[{target}] -> missing {source}"
    documented = set(
        re.findall(r"^(PIXELLM_\w+)=", (ROOT / "cluster" / "cluster.env.example").read_text(), re.M)
    )
    used = set(re.findall(r"\$\{?(PIXELLM_\w+)", path.read_text()))
    assert used <= documented, (
        f"{path.name}: {sorted(used - documented)} not in cluster/cluster.env.example"
    )


# --------------------------------------------------------------------------- KubeRay


def _spec_requirements(kind: str, spec: dict) -> list[str]:
    """Names of required fields that `spec` of a KubeRay `kind` lacks."""
    missing: list[str] = []

    def need(obj: dict, key: str, where: str) -> None:
        if key not in obj or obj[key] in (None, ""):
            missing.append(f"{where}.{key}")

    def cluster(c: dict, where: str) -> None:
        need(c, "headGroupSpec", where)
        need(c, "workerGroupSpecs", where)
        for key in ("rayStartParams", "template"):
            need(c.get("headGroupSpec", {}), key, f"{where}.headGroupSpec")
        for i, group in enumerate(c.get("workerGroupSpecs") or []):
            for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
                if key not in group:
                    missing.append(f"{where}.workerGroupSpecs[{i}].{key}")

    if kind == "RayCluster":
        cluster(spec, "spec")
    elif kind == "RayJob":
        need(spec, "entrypoint", "spec")
        need(spec, "rayClusterSpec", "spec")
        cluster(spec.get("rayClusterSpec", {}), "spec.rayClusterSpec")
    elif kind == "RayService":
        need(spec, "serveConfigV2", "spec")
        need(spec, "rayClusterConfig", "spec")
        cluster(spec.get("rayClusterConfig", {}), "spec.rayClusterConfig")
    return missing


def _ray_cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_has_the_three_ray_kinds_and_mlflow():
    kinds = {d["kind"] for _, d in _kuberay_docs()}
    assert RAY_KINDS <= kinds
    assert {"Deployment", "Service", "StatefulSet", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("path", sorted(KUBERAY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifest_has_the_fields_its_kind_requires(path):
    for doc in _yaml_docs(path):
        assert doc.get("kind"), f"{path.name}: a document without kind"
        if doc["kind"] == "Kustomization":
            for resource in doc["resources"]:
                assert (KUBERAY_DIR / resource).is_file(), f"{path.name}: missing {resource}"
            continue
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), path.name
        if doc["kind"] not in RAY_KINDS:
            continue
        assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['apiVersion']}"
        assert _spec_requirements(doc["kind"], doc["spec"]) == [], path.name
        spec = _ray_cluster_spec(doc)
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == 8, (
                f"{path.name}: {group['groupName']} GPU limit"
            )
        assert spec["enableInTreeAutoscaling"] is True, path.name
        for container in _containers(spec):
            assert container["image"] == IMAGE, f"{path.name}: {container['name']} image"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/mnt/shared" in mounts, f"{path.name}: {container['name']} lacks /mnt/shared"


def test_raycluster_autoscales_a_gpu_group_from_zero():
    (doc,) = _yaml_docs(KUBERAY_DIR / "raycluster.yaml")
    (gpu,) = doc["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1


def test_rayjob_trains_the_7b_recipe_and_cleans_up():
    (doc,) = _yaml_docs(KUBERAY_DIR / "rayjob-train-7b.yaml")
    spec = doc["spec"]
    assert spec["entrypoint"].startswith(
        "python jobs/train.py --recipe platform/recipes/pixellm-7b.yaml"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://pixellm-mlflow:5000"


def test_rayservice_serves_the_registered_model_through_build_app():
    (doc,) = _yaml_docs(KUBERAY_DIR / "rayservice.yaml")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pixellm.serve.app:build_app"
    assert app["args"]["model"] == "models:/pixellm-7b/latest"
    module, attr = app["import_path"].split(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"import_path {app['import_path']}: missing {source.relative_to(ROOT)}"
    assert re.search(rf"^def {attr}\(", source.read_text(), re.M), (
        f"{source.name} defines no {attr}()"
    )


def test_kuberay_volumes_and_services_resolve():
    docs = _kuberay_docs()
    claims = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    services = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Service"}
    assert (
        "pixellm-mlflow" in services
        and services["pixellm-mlflow"]["spec"]["ports"][0]["port"] == 5000
    )
    for path, doc in docs:
        text = yaml.safe_dump(doc)
        for claim in re.findall(r"claimName: ([\w-]+)", text):
            assert claim in claims, f"{path.name}: claim {claim} is not defined in cluster/kuberay"
    (mlflow,) = [
        d
        for _, d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "pixellm-mlflow"
    ]
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "postgresql://" in args and "/mnt/shared/mlflow-artifacts" in args


# --------------------------------------------------------------------------- referenced files

REFERENCING_FILES = sorted(
    [
        *LAUNCHER_YAMLS,
        *KUBERAY_DIR.glob("*.yaml"),
        *(ROOT / "platform" / "runtime").glob("*.yaml"),
        ROOT / "platform" / "image" / "Dockerfile",
        ROOT / "docs" / "cluster.md",
        ROOT / "cluster" / "local.sh",
    ]
)


@pytest.mark.parametrize("path", REFERENCING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_referenced_entrypoint_and_config_exists(path):
    """A manifest, env or doc that names jobs/*.py or platform/... must name a real file.

    Embedded YAML (runtimeEnvYAML, serveConfigV2) is part of the text, so it is covered too.
    """
    missing = sorted(p for p in _referenced_paths(path.read_text()) if not (ROOT / p).is_file())
    assert missing == [], f"{path.relative_to(ROOT)} references missing files: {missing}"


def test_the_path_check_sees_kuberay_entrypoints():
    refs = set().union(*(_referenced_paths(p.read_text()) for p in KUBERAY_DIR.glob("*.yaml")))
    assert {"jobs/train.py", "platform/recipes/pixellm-7b.yaml"} <= refs


# --------------------------------------------------------------------------- platform/ stays data-only


def test_platform_is_never_importable():
    assert not (ROOT / "platform" / "__init__.py").exists()
    python_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "platform").rglob("*.py"))
    assert python_files == [], f"platform/ holds YAML/JSON/Dockerfile only, found {python_files}"


def test_no_top_level_entry_shadows_a_stdlib_module():
    """Ray puts the working dir (the repo root) first on sys.path in every worker."""
    ignored = {".venv", ".git", "runs"}
    names = {p.name.split(".")[0] for p in ROOT.iterdir() if p.name not in ignored}
    package_like = {
        p.name.split(".")[0]
        for p in ROOT.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    }
    assert package_like & set(sys.stdlib_module_names) == set()
    # platform/ (a stdlib name) is a plain directory: a namespace package loses to the stdlib module.
    assert names & set(sys.stdlib_module_names) <= {"platform"}


# --------------------------------------------------------------------------- runtime envs + image


def _pyproject_requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line}: pin exact versions"
        pins[req.name.lower()] = spec.version
    return pins


def test_local_runtime_env_keeps_jobs_on_loopback_cpu_and_offline():
    env = yaml.safe_load((ROOT / "platform" / "runtime" / "local.yaml").read_text())
    assert env["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == env["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert "pip" not in env and "conda" not in env  # the cluster runs from the project venv


def test_gpu_pip_pins_cover_pyproject_and_sit_in_its_ranges():
    env = yaml.safe_load((ROOT / "platform" / "runtime" / "gpu-pip.yaml").read_text())
    pins = _pins(env["pip"]["packages"])
    required = _pyproject_requirements()
    assert set(required) - {"ray"} == set(pins), "gpu-pip.yaml must pin every dependency but ray"
    for name, version in pins.items():
        assert required[name].specifier.contains(version), (
            f"{name}=={version} outside {required[name]}"
        )
    assert "DS_ACCELERATOR" not in env["env_vars"], "GPU jobs let DeepSpeed detect CUDA"


def test_dockerfile_builds_from_ray_with_the_same_pins():
    text = (ROOT / "platform" / "image" / "Dockerfile").read_text()
    instructions = [
        ln.strip()
        for ln in text.replace("\\\n", " ").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert instructions[0].startswith("FROM ")
    ray_version = re.match(
        r"FROM rayproject/ray:(\d+\.\d+\.\d+)-py\d+-(gpu|cu\d+)", instructions[0]
    )
    assert ray_version, instructions[0]
    assert _pyproject_requirements()["ray"].specifier.contains(ray_version.group(1))
    docker_pins = _pins(re.findall(r"\b([A-Za-z][\w.-]*==[\w.]+)", text))
    env = yaml.safe_load((ROOT / "platform" / "runtime" / "gpu-pip.yaml").read_text())
    pip_pins = _pins(env["pip"]["packages"])
    assert {k: v for k, v in docker_pins.items() if k in pip_pins} == pip_pins
    assert "psycopg2-binary" in docker_pins  # MLflow's PostgreSQL backend store
    assert "DS_ACCELERATOR" not in text.split("#")[0] and not re.search(
        r"^ENV .*DS_ACCELERATOR", text, re.M
    )
    assert "pip install --no-deps ." in text
    for line in instructions:
        if line.startswith("COPY"):
            sources = [a for a in line.split()[1:-1] if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile: COPY source {src} is missing"


def test_gpu_image_env_uses_the_image_the_manifests_use():
    env = yaml.safe_load((ROOT / "platform" / "runtime" / "gpu-image.yaml").read_text())
    assert env["image_uri"] == IMAGE


# --------------------------------------------------------------------------- local.sh


def test_local_sh_is_executable_bash_with_a_usage_line():
    script = ROOT / "cluster" / "local.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: cluster/local.sh up|down|status" in result.stderr
    text = script.read_text()
    assert re.search(r"^\s*ray stop\b", text, re.M) is None, (
        "a bare `ray stop` kills every Ray on the machine"
    )
    assert "--node-ip-address 127.0.0.1" in text and "--host 127.0.0.1" in text
