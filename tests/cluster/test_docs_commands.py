"""The documented cluster path, run as written: every block of docs/cluster.md and the README tagged
``<!-- docs-test: runs locally -->`` runs against one cluster/local.sh cluster for the module.

The commands are read from the docs (tests/cluster/doc_commands.py), never copied here: the only
changes are the substitutions table of docs/cluster.md (paths, recipe, sizes). Blocks run in document
order in one emulated shell (exported variables carry over, as in a terminal); the block that stops
the cluster (``cluster/local.sh down``) runs last. After each block, the outputs of the jobs it
submitted are checked (shards per mixture corpus, the registered model, the scoring report).
A failure names the documented block (file:line), the command run and the tail of its output.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.doc_commands import (
    DOC,
    README,
    ROOT,
    Block,
    _job_parser,
    blocks,
    commands,
    substitute,
    substitutions,
)

pytestmark = pytest.mark.integration

VENV_BIN = ROOT / ".venv" / "bin"
TINY = ROOT / "platform" / "recipes" / "tiny.yaml"
BLOCK_TIMEOUT = 600  # seconds per documented block


def _is_teardown(block: Block) -> bool:
    return ["cluster/local.sh", "down"] in commands(block.text)


_RUN = [b for b in blocks(DOC) + blocks(README) if b.mode == "run"]
RUN_BLOCKS = [b for b in _RUN if not _is_teardown(b)]
TEARDOWN = [b for b in _RUN if _is_teardown(b)]
_state: dict[str, str] = {}  # where the first failing block is, so later blocks skip


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


@pytest.fixture(scope="module")
def shell() -> Iterator[dict]:
    """Free ports, a generated corpus + sources file, the test recipe, and the shell's environment."""
    if not (VENV_BIN / "ray").exists():
        pytest.skip("no .venv with ray (run `make env`)")
    from pixellm.data.corpus import generate_corpus

    tmp = Path(tempfile.mkdtemp(prefix="pxdoc-", dir="/tmp"))  # short: Ray's socket paths
    cluster_dir = tmp / "lc"
    gcs, dashboard, client, head_agent, worker_agent, mlflow, serve_port = _free_ports(7)
    model = f"pixellm-doc-{os.getpid()}-{int(time.time())}"
    generate_corpus(tmp / "corpus", seed=0, images=10, image_size=64)
    recipe = yaml.safe_load(TINY.read_text())
    recipe["name"] = model
    recipe["data"]["shards_root"] = str(tmp / "pixellm" / "shards")
    recipe["train"].update(
        steps_per_epoch=2,
        warmup_steps=1,
        checkpoint_every=1,
        storage_path=str(tmp / "pixellm" / "ray_results"),
        run_name=model,
    )
    recipe["mlflow"].update(experiment=model, registered_model_name=model)
    recipe["serve"].update(port=serve_port, max_new_tokens=8, num_cpus=1, max_replicas=1)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    corpus = tmp / "corpus"
    sources = {
        "sem_seg": {"format": "coco", "input": str(corpus / "coco" / "instances.json")},
        "refer_seg": {"format": "refer", "input": str(corpus / "refer")},
        "vqa": {"format": "llava", "input": str(corpus / "llava" / "llava_instruct.json")},
        "muse": {"format": "muse", "input": str(corpus / "muse")},
    }
    (tmp / "sources.yaml").write_text(yaml.safe_dump({"corpora": sources}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        PIXELLM_CLUSTER_DIR=str(cluster_dir),
        PIXELLM_RAY_PORT=str(gcs),
        PIXELLM_RAY_DASHBOARD_PORT=str(dashboard),
        PIXELLM_RAY_CLIENT_PORT=str(client),
        PIXELLM_RAY_HEAD_AGENT_PORT=str(head_agent),
        PIXELLM_RAY_WORKER_AGENT_PORT=str(worker_agent),
        PIXELLM_MLFLOW_PORT=str(mlflow),
        PIXELLM_HEAD_CPUS="1",
        PIXELLM_WORKER_CPUS="2",
    )
    values = {
        "tmp": str(tmp),
        "recipe": str(tmp / "recipe.yaml"),
        "model": model,
        "sources": str(tmp / "sources.yaml"),
        "cluster_dir": str(cluster_dir),
        "serve_port": str(serve_port),
    }
    state = tmp / "shell-state.sh"
    state.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    try:
        yield {"tmp": tmp, "values": values, "state": state, "env": env}
    finally:
        down = subprocess.run(
            ["bash", str(ROOT / "cluster" / "local.sh"), "down"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        shutil.rmtree(tmp, ignore_errors=True)
        assert down.returncode == 0, down.stderr


def _run_block(shell: dict, block: Block) -> str:
    """Run the substituted block in the emulated shell; return its output (asserts success)."""
    text = substitute(block.text, substitutions(), shell["values"])
    state = shell["state"]
    script = (
        f"set -eo pipefail\nsource {shlex.quote(str(state))}\ncd {shlex.quote(str(ROOT))}\n"
        f"{text}\nexport -p > {shlex.quote(str(state))}.new\n"
    )
    try:
        out = subprocess.run(
            ["bash", "-c", script],
            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
        output, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() + (err.stderr or b"").decode()
        rc = f"timeout after {BLOCK_TIMEOUT}s"
    if rc != 0:
        _state.setdefault("failed", block.where)
        raise AssertionError(
            f"documented block {block.where} failed (rc {rc}).\ncommands run:\n{text}\n"
            f"--- output tail ---\n{_tail(output)}{_job_logs(shell, text)}"
        )
    Path(f"{state}.new").replace(state)
    return output


def _job_logs(shell: dict, text: str) -> str:
    """Logs of the jobs a failed block submitted with --submission-id (their tails)."""
    logs = ""
    for words in commands(text):
        if words[:3] == ["ray", "job", "submit"] and "--submission-id" in words:
            job = words[words.index("--submission-id") + 1]
            out = subprocess.run(
                ["bash", "-c", f"source {shlex.quote(str(shell['state']))}; ray job logs {job}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            logs += f"\n--- ray job logs {job} (tail) ---\n{_tail(out.stdout + out.stderr, 3000)}"
    return logs


# --------------------------------------------------------------------------- job outcomes


def _overrides(args) -> list[str]:
    """The ``--set`` values of a job's parsed arguments (``set`` or ``overrides``)."""
    return list(getattr(args, "set", None) or getattr(args, "overrides", None) or [])


def _expect_shards(args, where: str) -> None:
    from pixellm.config import load_recipe
    from pixellm.data.shards import read_manifest

    if not getattr(args, "sources", None):
        return
    recipe = load_recipe(args.recipe, _overrides(args))
    root = args.out or recipe.data.shards_root
    for corpus in recipe.data.mixture:
        manifest = read_manifest(f"{root}/{corpus}")
        assert manifest, f"{where}: no shards for mixture corpus {corpus} under {root}"
        assert sum(s["rows"] for s in manifest["splits"].values()) > 0, f"{where}: {corpus} empty"


def _expect_trained(args, where: str) -> None:
    from mlflow import MlflowClient

    from pixellm.config import load_recipe

    name = load_recipe(args.recipe, _overrides(args)).mlflow.registered_model_name
    client = MlflowClient(os.environ["_PIXELLM_DOC_MLFLOW"])
    versions = client.search_model_versions(f"name='{name}'")
    assert versions, f"{where}: the training job registered no model {name}"
    assert client.get_run(versions[0].run_id).data.metrics, f"{where}: the run logged no metrics"


def _expect_report(args, where: str) -> None:
    report = json.loads((Path(args.out) / "report.json").read_text())
    assert args.split in report["splits"], f"{where}: {report['splits']}"
    scoring = report["extra"]["scoring"]
    assert scoring["errors"] == 0 and scoring["scored_now"] + scoring.get("skipped", 0) > 0, scoring


EXPECT = {
    "jobs/prepare_shards.py": _expect_shards,
    "jobs/train.py": _expect_trained,
    "jobs/score.py": _expect_report,
}


def _check_outcomes(shell: dict, block: Block) -> None:
    text = substitute(block.text, substitutions(), shell["values"])
    for line in shell["state"].read_text().splitlines():
        if "MLFLOW_TRACKING_URI=" in line:
            value = line.split("MLFLOW_TRACKING_URI=", 1)[1].strip().strip('"')
            os.environ["_PIXELLM_DOC_MLFLOW"] = value
    for words in commands(text):
        if words[:3] != ["ray", "job", "submit"] or "--" not in words or "--no-wait" in words:
            continue
        entry = words[words.index("--") + 1 :]
        if entry[:1] == ["python"] and entry[1] in EXPECT:
            args = _job_parser(entry[1], entry[2:]).parse_args(entry[2:])
            EXPECT[entry[1]](args, f"{block.where}: {shlex.join(entry)}")


# --------------------------------------------------------------------------- the documented blocks


@pytest.mark.timeout(BLOCK_TIMEOUT + 120)
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.where)
def test_documented_block_runs_on_the_local_cluster(shell, block: Block):
    if "failed" in _state:
        pytest.skip(f"an earlier documented block failed: {_state['failed']}")
    _run_block(shell, block)
    _check_outcomes(shell, block)


@pytest.mark.timeout(300)
def test_a_job_on_the_documented_cluster_does_not_shadow_the_stdlib(shell):
    """Ray puts the working dir (the repo root) first on sys.path: `platform` must stay the stdlib's."""
    if "failed" in _state:
        pytest.skip(f"an earlier documented block failed: {_state['failed']}")
    job = (
        "import json, platform, sys; print('PIXELLM-JOB ' + json.dumps({'platform': "
        "platform.__file__, 'sys_path': sys.path, 'executable': sys.executable}))"
    )
    cmd = (
        f"source {shlex.quote(str(shell['state']))}; cd {shlex.quote(str(ROOT))}; "
        f"ray job submit --working-dir . --runtime-env platform/runtime/local.yaml "
        f"-- python -c {shlex.quote(job)}"
    )
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, _tail(out.stdout + out.stderr)
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("PIXELLM-JOB ")]
    report = json.loads(line[len("PIXELLM-JOB ") :])
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(report["platform"]).resolve().parent == stdlib, report["platform"]
    assert Path(report["executable"]).parent.resolve() == VENV_BIN.resolve()
    working_dirs = [
        Path(p) for p in report["sys_path"] if p and (Path(p) / "cluster" / "local.sh").exists()
    ]
    assert working_dirs, f"working dir not on sys.path: {report['sys_path']}"
    for wd in working_dirs:
        importable = {
            p.name.removesuffix(".py")
            for p in wd.iterdir()
            if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
        }
        assert importable & set(sys.stdlib_module_names) == set(), importable


@pytest.mark.timeout(180)
@pytest.mark.parametrize("block", TEARDOWN, ids=lambda b: b.where)
def test_documented_teardown_stops_the_cluster(shell, block: Block):
    _run_block(shell, block)
    status = subprocess.run(
        ["bash", str(ROOT / "cluster" / "local.sh"), "status"],
        cwd=ROOT,
        env=shell["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 3 and "ray:          down" in status.stdout, status.stdout
