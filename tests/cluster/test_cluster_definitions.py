"""Static checks of the cluster side: launcher YAMLs, KubeRay manifests, runtime envs, the image.

Nothing here starts a process or touches the network; the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

from tests.cluster.doc_commands import (
    CRDS_DIR,
    crd_errors,
    kuberay_docs,
    kubernetes_names,
    kustomize,
)

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

KUBERAY_FILES = sorted(KUBERAY_DIR.rglob("*.yaml"))
KUSTOMIZATIONS = sorted(p.parent for p in KUBERAY_DIR.rglob("kustomization.yaml"))
# Node types the pod requests are sized for (docs/cluster.md), with their allocatable capacity after
# kubelet/system reservations: (vCPU, memory in GiB) of the smaller of the GKE and EKS type named.
NODE_TYPES = {
    "head": ("n2-standard-16 / m6i.4xlarge", 15.5, 57.0),
    "gpu-8x": ("a2-highgpu-8g / p4d.24xlarge", 95.0, 610.0),
    "gpu-1x": ("a2-highgpu-1g / g6e.4xlarge", 11.5, 76.0),
}


def _quantity_gib(q: str) -> float:
    units = {
        "Ki": 2**-20,
        "Mi": 2**-10,
        "Gi": 1.0,
        "Ti": 1024.0,
        "G": 1e9 / 2**30,
        "M": 1e6 / 2**30,
    }
    m = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 2**-30)


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return kuberay_docs()


def _ray_cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def _groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    return [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]
    ]


def _ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _kuberay_docs() if d.get("kind") in RAY_KINDS]


def test_kuberay_has_the_three_ray_kinds_mlflow_and_the_volume_init():
    kinds = {d["kind"] for _, d in _kuberay_docs()}
    assert RAY_KINDS <= kinds
    assert {"Deployment", "Service", "StatefulSet", "PersistentVolumeClaim", "Job", "Pod"} <= kinds


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: str(p.relative_to(KUBERAY_DIR)))
def test_kuberay_ray_manifests_validate_against_the_kuberay_crd_schemas(path):
    """Strict validation (unknown fields fail) against the vendored CRDs of the documented release."""
    release = re.search(
        r"\| KubeRay release \| (v[\d.]+) \|", (ROOT / "docs" / "cluster.md").read_text()
    )
    assert release and (CRDS_DIR / f"crds-{release.group(1)}.json").is_file(), "vendor the CRDs"
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['apiVersion']}"
            assert crd_errors(doc) == [], f"{path.name}: {crd_errors(doc)[:5]}"


def test_every_ray_manifest_autoscales_mounts_the_volume_and_requires_a_token():
    for path, doc in _ray_docs():
        spec = _ray_cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True, path.name
        assert spec["authOptions"] == {"mode": "token", "secretName": "pixellm-ray-token"}, (
            path.name
        )
        assert spec["rayVersion"] == ray.__version__, f"{path.name}: rayVersion vs the venv's Ray"
        for name, group in _groups(spec):
            for container in group["template"]["spec"]["containers"]:
                assert container["image"] == IMAGE, f"{path.name}: {container['name']} image"
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/mnt/shared" in mounts, f"{path.name}: {name} lacks /mnt/shared"


def test_kuberay_requests_fit_the_node_types_they_name():
    for path, doc in _ray_docs():
        for name, group in _groups(_ray_cluster_spec(doc)):
            node, cpus, gib = NODE_TYPES[name]
            for c in group["template"]["spec"]["containers"]:
                req, lim = c["resources"]["requests"], c["resources"]["limits"]
                assert float(req["cpu"]) <= cpus and float(lim["cpu"]) <= cpus, (path.name, name)
                assert _quantity_gib(lim["memory"]) <= gib, (
                    f"{path.name}: {name} asks {lim['memory']}, {node} has ~{gib} GiB allocatable"
                )
            gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get(
                "nvidia.com/gpu", 0
            ))  # fmt: skip
            assert gpus == {"head": 0, "gpu-8x": 8, "gpu-1x": 1}[name], (path.name, name)


def test_kuberay_names_and_head_services_are_distinct():
    names = [d["metadata"]["name"] for _, d in _ray_docs()]
    assert len(names) == len(set(names)), names
    services = kubernetes_names()["service"]
    # A RayCluster's and a RayService's head service is <name>-head-svc (a RayJob's cluster gets a
    # generated suffix): two equal names would make the RayService rewrite the other's Service.
    heads = [f"{d['metadata']['name']}-head-svc" for _, d in _ray_docs() if d["kind"] != "RayJob"]
    assert len(set(heads)) == len(heads) and set(heads) <= services


def test_raycluster_autoscales_a_gpu_group_from_zero():
    (doc,) = yaml.safe_load_all((KUBERAY_DIR / "raycluster.yaml").read_text())
    (gpu,) = doc["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1


def test_rayjob_trains_the_7b_recipe_from_shared_weights_and_cleans_up():
    (doc,) = yaml.safe_load_all((KUBERAY_DIR / "train-7b" / "rayjob-train-7b.yaml").read_text())
    spec = doc["spec"]
    assert spec["entrypoint"].startswith(
        "python jobs/train.py --recipe platform/recipes/pixellm-7b.yaml"
    )
    assert "--set model.weights_path=/mnt/shared/models/llava-1.5-7b-hf" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://pixellm-mlflow:5000"
    assert (
        "delete -k cluster/kuberay/train-7b && kubectl apply -k"
        in (KUBERAY_DIR / "train-7b" / "rayjob-train-7b.yaml").read_text()
    )


def test_rayservice_follows_the_recipe_serve_section_and_reads_its_token_from_a_secret():
    (doc,) = yaml.safe_load_all((KUBERAY_DIR / "serve-7b" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pixellm.serve.app:build_app"
    assert app["args"]["model"] == "models:/pixellm-7b/latest"
    assert "bearer_token" not in json.dumps(serve_config), "the token never goes in the config"
    module, attr = app["import_path"].split(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert re.search(rf"^def {attr}\(", source.read_text(), re.M), f"{source.name}: no {attr}()"
    recipe = yaml.safe_load((ROOT / "platform" / "recipes" / "pixellm-7b.yaml").read_text())
    assert app["args"]["recipe"].endswith("platform/recipes/pixellm-7b.yaml")
    assert recipe["serve"]["num_gpus"] == 1
    (gpu,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    # One replica per 1-GPU pod: the pod bound is the recipe's replica bound.
    assert int(limits["nvidia.com/gpu"]) == recipe["serve"]["num_gpus"]
    assert gpu["minReplicas"] == recipe["serve"]["min_replicas"]
    assert gpu["maxReplicas"] == recipe["serve"]["max_replicas"]
    for _, group in _groups(doc["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        token = env["PIXELLM_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "pixellm-serve-token", "key": "token"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_kustomization_sets_the_image_of_every_container(directory, tmp_path):
    """Kustomize (kubectl kustomize) reaches every container: a registry edit lands everywhere."""
    if (directory / "kustomization.yaml").read_text().count("kind: Component"):
        pytest.skip("the image component itself")
    rendered = kustomize(directory)
    if rendered is None:
        pytest.skip("neither kubectl nor kustomize installed")
    # Point the component at a registry in a copy of the tree, render, and look at every image.
    copy = tmp_path / "kuberay"
    shutil.copytree(KUBERAY_DIR, copy)
    component = copy / "image" / "kustomization.yaml"
    component.write_text(
        component.read_text().replace("newName: pixellm", "newName: registry.example/pixellm")
    )
    rendered = kustomize(copy / directory.relative_to(KUBERAY_DIR))
    images = set(re.findall(r"'image': '([^']+)'", str(rendered)))
    assert images, "no container images rendered"
    ours = {i for i in images if "pixellm" in i}
    assert ours == {"registry.example/pixellm:0.1.0"}, images


def test_kuberay_mlflow_is_cluster_internal():
    docs = _kuberay_docs()
    for _, d in docs:
        if d.get("kind") == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
        assert d.get("kind") not in ("Ingress", "Gateway"), d["metadata"]["name"]
    claims = {d["metadata"]["name"] for _, d in docs if d.get("kind") == "PersistentVolumeClaim"}
    for path, doc in docs:
        for claim in re.findall(r"'claimName': '([\w-]+)'", str(doc)):
            assert claim in claims, f"{path.name}: claim {claim} is not defined in cluster/kuberay"
    (mlflow,) = [
        d
        for _, d in docs
        if d.get("kind") == "Deployment" and d["metadata"]["name"] == "pixellm-mlflow"
    ]
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "postgresql://" in args and "/mnt/shared/mlflow-artifacts" in args


def test_the_shared_volume_is_made_writable_for_the_pod_user():
    (job,) = yaml.safe_load_all((KUBERAY_DIR / "shared-init.yaml").read_text())
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["runAsUser"] == 0
    script = " ".join(c["args"])
    assert "chown 1000:100" in script
    for d in ("/mnt/shared/pixellm/shards", "/mnt/shared/models", "/mnt/shared/mlflow-artifacts"):
        assert d in script, d


# --------------------------------------------------------------------------- referenced files

REFERENCING_FILES = sorted(
    [
        *LAUNCHER_YAMLS,
        *KUBERAY_DIR.rglob("*.yaml"),
        ROOT / "README.md",
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
    refs = set().union(*(_referenced_paths(p.read_text()) for p in KUBERAY_DIR.rglob("*.yaml")))
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


def test_local_sh_guards_its_private_ray_patches():
    """The two patched Ray internals exist in this Ray, and local.sh refuses loudly when they move."""
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    assert hasattr(services, "resolve_ip_for_localhost")
    text = (ROOT / "cluster" / "local.sh").read_text()
    assert "hasattr(module, name)" in text and "ray.__version__" in text
    assert 'n.node_ip != "127.0.0.1"' in text  # every registered node checked for loopback
    # The Ray range pyproject admits is the one the patches were checked on.
    spec = _pyproject_requirements()["ray"].specifier
    assert (
        spec.contains(ray.__version__)
        and not spec.contains("2.61.0")
        and not spec.contains("2.59.0")
    )


# --------------------------------------------------------------------------- one CUDA story

DOC_TEXT = (ROOT / "docs" / "cluster.md").read_text()
_STORY = DOC_TEXT[
    DOC_TEXT.index("<!-- cuda-story:begin -->") : DOC_TEXT.index("<!-- cuda-story:end -->")
]
STORY = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", _STORY, re.M))
CUDA_FILES = [
    ROOT / "platform" / "image" / "Dockerfile",
    *sorted((ROOT / "platform" / "runtime").glob("*.yaml")),
    *LAUNCHER_YAMLS,
    *sorted(KUBERAY_DIR.rglob("*.yaml")),
    ROOT / "docs" / "cluster.md",
]
_DIGEST = r"(?:@sha256:[0-9a-f]{64})?"


def _untagged(image: str) -> str:
    return re.sub(r"@sha256:[0-9a-f]{64}$", "", image)


def test_the_cuda_story_is_stated_once_with_every_value():
    assert {
        "CUDA",
        "NVIDIA driver (minimum)",
        "torch",
        "Ray image",
        "GCP host image family",
    } <= set(STORY)
    assert DOC_TEXT.count("<!-- cuda-story:begin -->") == 1
    major, minor = STORY["CUDA"].split(".")
    assert STORY["Ray image"].endswith(f"-cu{major}{minor}")
    assert f"cu{major}{minor}" in STORY["GCP host image family"]
    assert STORY["GCP host image family"].endswith(f"nvidia-{STORY['NVIDIA driver (minimum)']}")


@pytest.mark.parametrize("path", CUDA_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_tells_the_same_cuda_story(path):
    text = path.read_text()
    major = STORY["CUDA"].split(".")[0]
    for found in re.findall(r"CUDA (\d+)(?:\.\d+)?", text):
        assert found == major, f"{path.relative_to(ROOT)} says CUDA {found}, the story is {major}"
    for tag in re.findall(r"\bcu(\d{3})\b", text):
        assert tag == STORY["CUDA"].replace(".", ""), f"{path.relative_to(ROOT)}: cu{tag}"
    for driver in re.findall(r"nvidia-(\d{3})\b", text):
        assert int(driver) >= int(STORY["NVIDIA driver (minimum)"]), f"{path.relative_to(ROOT)}"
    for pin in re.findall(r"torch==([\w.]+)", text):
        assert pin == STORY["torch"], f"{path.relative_to(ROOT)}: torch=={pin}"
    for image in re.findall(r"rayproject/ray:[\w.-]+" + _DIGEST, text):
        assert _untagged(image) == STORY["Ray image"], f"{path.relative_to(ROOT)}: {image}"
    assert not re.search(r"rayproject/ray:[\w.]+-py\d+-gpu\b", text), (
        "`-gpu` is an alias: name the CUDA"
    )


def test_the_image_launchers_and_runtime_envs_use_the_story():
    dockerfile = (ROOT / "platform" / "image" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert _untagged(base) == STORY["Ray image"]
    for path in LAUNCHER_YAMLS:
        config = yaml.safe_load(path.read_text())
        assert _untagged(config["docker"]["image"]) == STORY["Ray image"], path.name
        init = " ".join(config["initialization_commands"])
        assert "driver_version" in init and f"-ge {STORY['NVIDIA driver (minimum)']}" in init, (
            path.name
        )
    gcp = yaml.safe_load((ROOT / "cluster" / "gcp.yaml").read_text())
    for name, node in gcp["available_node_types"].items():
        source = node["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        assert source.endswith(f"/family/{STORY['GCP host image family']}"), name
    env = yaml.safe_load((ROOT / "platform" / "runtime" / "gpu-pip.yaml").read_text())
    assert f"torch=={STORY['torch']}" in env["pip"]["packages"]
    assert f"torch=={STORY['torch']}" in dockerfile
    assert (ROOT / "Makefile").read_text().count(f"torch=={STORY['torch']}") == 1


@pytest.mark.parametrize(
    "path", sorted((ROOT / "platform" / "runtime").glob("*.yaml")), ids=lambda p: p.name
)
def test_runtime_envs_are_valid_for_ray(path):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(path.read_text())
    RuntimeEnv(**env)
    if "image_uri" not in env:  # submitted with --working-dir
        RuntimeEnv(**env, working_dir=".")


def test_dockerignore_keeps_the_venv_and_runs_out_of_the_build_context():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in lines, (
        "allow-list: ignore everything, then re-include what the Dockerfile copies"
    )
    copied = re.findall(
        r"^COPY \S+ (.+) \./", (ROOT / "platform" / "image" / "Dockerfile").read_text(), re.M
    )
    for sources in copied:
        for src in sources.split():
            assert f"!{src}" in lines or f"!{src}/" in lines, f".dockerignore drops {src}"
    assert not any(ln.startswith("!") and (".venv" in ln or "runs" in ln) for ln in lines)


# --------------------------------------------------------------------------- exposure


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_services_bind_loopback_or_the_private_address(path):
    config = yaml.safe_load(path.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in head, f"{path.name}: a head service binds every interface"
    assert "--dashboard-host=127.0.0.1" in head
    assert re.search(r"mlflow server .*--host \"\$\(hostname -I \| awk '\{print \$1\}'\)\"", head)
