"""Documented commands as data: the tagged ```bash blocks of docs/cluster.md and the README.

A block is tagged by the HTML comment on the line before its fence:
``<!-- docs-test: runs locally -->`` (executed against cluster/local.sh by test_docs_commands.py) or
``<!-- docs-test: static (why) -->`` (checked here without running: see ``check_static``). The
substitutions a local run applies are the table between ``<!-- docs-test:substitutions:begin -->``
and ``...:end -->`` in docs/cluster.md. Nothing in this module starts a process except
``kubectl kustomize`` (rendering only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cluster.md"
README = ROOT / "README.md"
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
CRDS_DIR = Path(__file__).resolve().parent / "kuberay"

_TAG = re.compile(r"^<!--\s*docs-test:\s*(runs locally|static)\b\s*(.*?)\s*-->\s*$")
_SHELL_WORDS = {"until", "while", "do", "done", "then", "if", "fi", "else", "!"}
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "\n"}


@dataclass(frozen=True)
class Block:
    """One fenced bash block: where it is, its tag (None = untagged) and its text."""

    path: Path
    line: int  # 1-based line of the opening fence
    mode: str | None  # "run", "static" or None
    note: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every ```bash block of a Markdown file with the tag of the line before it."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            tag = _TAG.match(lines[start - 1].strip()) if start > 0 else None
            mode = {"runs locally": "run", "static": "static"}[tag.group(1)] if tag else None
            note = tag.group(2) if tag else ""
            found.append(Block(path, start + 1, mode, note, "\n".join(lines[start + 1 : j])))
            i = j
        i += 1
    return found


def substitutions(path: Path = DOC) -> list[tuple[str, str]]:
    """The ``documented -> run locally as`` table of the doc, in order."""
    text = path.read_text()
    begin, end = "<!-- docs-test:substitutions:begin -->", "<!-- docs-test:substitutions:end -->"
    if begin not in text or end not in text:
        raise AssertionError(f"{path.relative_to(ROOT)}: no substitutions table ({begin})")
    table = text[text.index(begin) + len(begin) : text.index(end)]
    pairs = re.findall(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|\s*$", table, re.M)
    if not pairs:
        raise AssertionError(f"{path.relative_to(ROOT)}: empty substitutions table")
    return pairs


def substitute(text: str, table: list[tuple[str, str]], values: dict[str, str]) -> str:
    """Apply the table (literal replacements, in order), then fill ``{name}`` placeholders."""
    for documented, local in table:
        text = text.replace(documented, local.format(**values))
    return text


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet (words; redirections, separators, comments dropped).

    Quoting as the shell does (``shlex``): a ``$(...)`` inside quotes stays part of its word.
    """
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        words: list[str] = []
        for tok in shlex.split(line, comments=True):
            if tok.endswith(";") and tok != ";":
                words += [tok[:-1], ";"]
            else:
                words.append(tok)
        current: list[str] = []
        skip = False
        for tok in words:
            if skip:
                skip = False
            elif tok in _SEPARATORS:
                if current:
                    out.append(current)
                current = []
            elif re.fullmatch(r"\d*[<>]+&?\d*", tok):
                skip = not tok.endswith(tuple("0123456789"))  # `>` FILE; `2>&1` stands alone
            elif re.match(r"\d*[<>]", tok):
                continue  # `>/dev/null`, `2>/dev/null`
            elif not current and (tok in _SHELL_WORDS or re.fullmatch(r"[A-Za-z_]\w*=.*", tok)):
                continue  # loop keywords, variable assignments
            else:
                current.append(tok)
        if current:
            out.append(current)
    return out


# --------------------------------------------------------------------------- what the files define


def kuberay_docs() -> list[tuple[Path, dict]]:
    """Every YAML document under cluster/kuberay (kustomizations included)."""
    return [
        (p, d)
        for p in sorted(KUBERAY_DIR.rglob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d is not None
    ]


def kubernetes_names() -> dict[str, set[str]]:
    """Services, pods, jobs and secrets (name -> keys as ``name/key``) the manifests define or use."""
    names: dict[str, set[str]] = {
        "service": set(),
        "pod": set(),
        "job": set(),
        "secret_keys": set(),
    }
    for _, doc in kuberay_docs():
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if kind == "Service":
            names["service"].add(name)
        elif kind == "Pod":
            names["pod"].add(name)
        elif kind in ("Job", "RayJob"):
            names["job"].add(name)  # a RayJob's submitter Job has the RayJob's name
        if kind == "RayCluster":
            names["service"].add(f"{name}-head-svc")
        elif kind == "RayService":
            names["service"] |= {f"{name}-head-svc", f"{name}-serve-svc"}
        text = json.dumps(doc)
        for ref in re.findall(r'"secretKeyRef": \{[^}]*\}', text):
            sname = re.search(r'"name": "([^"]+)"', ref).group(1)
            key = re.search(r'"key": "([^"]+)"', ref).group(1)
            names["secret_keys"].add(f"{sname}/{key}")
        for sname in re.findall(r'"authOptions": \{[^}]*"secretName": "([^"]+)"', text):
            names["secret_keys"].add(f"{sname}/auth_token")  # KubeRay reads key auth_token
    return names


@cache
def crd_schemas() -> dict[str, Any]:
    """The vendored KubeRay CRD schemas (one file, ``crds-<release>.json``)."""
    (path,) = sorted(CRDS_DIR.glob("crds-*.json"))
    return json.loads(path.read_text())


def strict(schema: Any) -> Any:
    """Kubernetes' strict field validation: unknown fields fail (no silent pruning)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_errors(doc: dict) -> list[str]:
    """Schema errors of a RayCluster / RayJob / RayService against the vendored CRD (strict)."""
    import jsonschema

    data = crd_schemas()
    schema = strict({**data["kinds"][doc["kind"]], "$defs": data["$defs"]})
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}"
        for e in validator.iter_errors(doc)
    ]


def kustomize(directory: Path) -> list[dict] | None:
    """``kubectl kustomize DIR`` (or ``kustomize build``) rendered; None when neither is installed."""
    if shutil.which("kubectl"):
        args = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        args = ["kustomize", "build", str(directory)]
    else:
        return None
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


# --------------------------------------------------------------------------- static checks


def _click_parse(cli: Any, prog: str, args: list[str]) -> None:
    """Parse ``args`` with a click group the way the CLI would, without invoking the command."""
    import click

    cmd, words, names = cli, list(args), [prog]
    while isinstance(cmd, click.Group):
        if not words:
            raise AssertionError(f"`{prog}` needs a subcommand")
        sub = cmd.get_command(click.Context(cmd), words[0])
        if sub is None:
            raise AssertionError(f"`{' '.join(names)}` has no subcommand {words[0]!r}")
        names.append(words.pop(0))
        cmd = sub
    try:
        cmd.make_context(" ".join(names), words)
    except click.exceptions.Exit:
        pass
    except click.ClickException as err:
        raise AssertionError(f"`{' '.join(names)}`: {err.format_message()}") from None


def _argparse(parser: argparse.ArgumentParser, args: list[str], what: str) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit as err:
        raise AssertionError(f"{what} rejects its arguments {args} (exit {err.code})") from None


def _job_parser(script: str, args: list[str]) -> argparse.ArgumentParser:
    path = ROOT / script
    if not path.is_file():
        raise AssertionError(f"no entrypoint {script}")
    spec = importlib.util.spec_from_file_location(f"_doc_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser(args)


def _check_python(words: list[str]) -> None:
    if len(words) >= 2 and words[1].startswith("jobs/"):
        _argparse(_job_parser(words[1], words[2:]), words[2:], words[1])


def _runtime_env(path: str, working_dir: bool) -> None:
    from ray.runtime_env import RuntimeEnv

    file = ROOT / path
    if not file.is_file():
        raise AssertionError(f"no runtime env {path}")
    env = yaml.safe_load(file.read_text())
    try:
        RuntimeEnv(**env, **({"working_dir": "."} if working_dir else {}))
    except Exception as err:
        with_wd = " with --working-dir" if working_dir else ""
        raise AssertionError(f"runtime env {path}{with_wd} is not valid for Ray: {err}") from None


def _check_ray(words: list[str]) -> None:
    from ray.scripts.scripts import cli

    if "--" in words:
        cut = words.index("--")
        head, entry = words[:cut], words[cut + 1 :]
    else:
        head, entry = words, []
    _click_parse(cli, "ray", words[1:])
    if head[1:3] == ["job", "submit"]:
        if "--runtime-env" in head:
            _runtime_env(head[head.index("--runtime-env") + 1], "--working-dir" in head)
        if entry and entry[0] == "python":
            _check_python(entry)
    if len(head) > 2 and head[1] in ("up", "down", "attach", "exec", "dashboard", "rsync-up"):
        if not (ROOT / head[2]).is_file():
            raise AssertionError(f"no launcher file {head[2]}")
    if head[1] == "rsync-up":
        source, target = head[3], head[4]
        if Path(source).name == Path(target.rstrip("/")).name and not source.endswith("/"):
            raise AssertionError(
                f"`ray rsync-up ... {source} {target}` nests {Path(source).name}/ inside the target:"
                " end the source with '/'"
            )


def _check_kubectl(words: list[str], names: dict[str, set[str]], created: set[str]) -> None:
    verb = words[1]
    if verb in ("apply", "delete") and "-k" in words:
        directory = ROOT / words[words.index("-k") + 1]
        if not (directory / "kustomization.yaml").is_file():
            raise AssertionError(f"no kustomization in {directory.relative_to(ROOT)}")
        rendered = kustomize(directory)
        for doc in rendered or []:
            if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
                errors = crd_errors(doc)
                if errors:
                    raise AssertionError(f"{directory.relative_to(ROOT)}: {errors[:5]}")
    elif verb in ("apply", "delete") and "-f" in words:
        if not (ROOT / words[words.index("-f") + 1]).is_file():
            raise AssertionError(f"no file {words[words.index('-f') + 1]}")
    elif verb == "create" and words[2:4] == ["secret", "generic"]:
        name = words[4]
        for w in words[5:]:
            if w.startswith("--from-literal="):
                created.add(f"{name}/{w[len('--from-literal=') :].split('=', 1)[0]}")
    elif verb == "port-forward":
        kind, name = words[2].split("/", 1)
        if kind in ("svc", "service") and name not in names["service"]:
            raise AssertionError(
                f"no service {name} in cluster/kuberay ({sorted(names['service'])})"
            )
    elif verb in ("wait", "logs", "exec", "get"):
        for w in words[2:]:
            m = re.fullmatch(r"(pod|job)/([\w-]+)", w)
            if m and m.group(2) not in names[m.group(1)]:
                raise AssertionError(f"no {m.group(1)} {m.group(2)} in cluster/kuberay")
        if verb == "exec" and "-i" in words:
            pod = words[words.index("-i") + 1]
            if pod not in names["pod"]:
                raise AssertionError(f"no pod {pod} in cluster/kuberay")
    else:
        raise AssertionError(f"no static check for `kubectl {verb}`: add one in {__file__}")


def _check_helm(words: list[str], release: str) -> None:
    if words[1] == "install":
        if "--version" not in words:
            raise AssertionError("`helm install` without --version: pin the KubeRay release")
        version = words[words.index("--version") + 1]
        if f"v{version.lstrip('v')}" != release:
            raise AssertionError(
                f"helm installs KubeRay {version}, the CRDs vendored are {release}"
            )
    elif words[1] != "repo":
        raise AssertionError(f"no static check for `helm {words[1]}`")


def _check_docker(words: list[str]) -> None:
    if words[1] == "build":
        if "-f" not in words or not (ROOT / words[words.index("-f") + 1]).is_file():
            raise AssertionError("`docker build` must name an existing -f Dockerfile")
        if not (ROOT / ".dockerignore").is_file():
            raise AssertionError("no .dockerignore: the build context would hold .venv")
    elif words[1] not in ("push", "tag"):
        raise AssertionError(f"no static check for `docker {words[1]}`")


def _exists_or_example(path: str) -> None:
    if not ((ROOT / path).exists() or (ROOT / f"{path}.example").exists()):
        raise AssertionError(f"no file {path}")


# Tools whose commands need no check beyond parsing as a shell command.
_FREE = {"tar", "ssh", "curl", "export", "source", "sleep", "openssl", "base64", "make"}


def check_static(block: Block, created_secrets: set[str]) -> None:
    """Check every command of a block without running it; AssertionError names the command."""
    from ray.serve.scripts import cli as serve_cli

    from pixellm.cli import build_parser

    names = kubernetes_names()
    release = next(
        v
        for k, v in re.findall(r"^\| (.+?) \| (.+?) \|$", DOC.read_text(), re.M)
        if k == "KubeRay release"
    )
    for words in commands(block.text):
        tool = words[0]
        try:
            if tool == "ray":
                _check_ray(words)
            elif tool == "serve":
                _click_parse(serve_cli, "serve", words[1:])
            elif tool == "pixellm":
                _argparse(build_parser(), words[1:], "pixellm")
            elif tool == "python":
                _check_python(words)
            elif tool == "kubectl":
                _check_kubectl(words, names, created_secrets)
            elif tool == "helm":
                _check_helm(words, release)
            elif tool == "docker":
                _check_docker(words)
            elif tool == "$EDITOR":
                _exists_or_example(words[1])
            elif tool == "cp":
                _exists_or_example(words[1])
            elif tool == "cluster/local.sh":
                if words[1:] not in (["up"], ["down"], ["status"]):
                    raise AssertionError("cluster/local.sh takes up|down|status")
            elif tool not in _FREE:
                raise AssertionError(f"no static check for `{tool}`: add one in {__file__}")
        except AssertionError as err:
            raise AssertionError(f"{block.where}: `{shlex.join(words)}`: {err}") from None
