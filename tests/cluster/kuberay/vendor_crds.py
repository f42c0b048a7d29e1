"""Vendor the openAPI schemas of KubeRay's CRDs (RayCluster, RayJob, RayService) for the suite.

    python tests/cluster/kuberay/vendor_crds.py /path/to/kuberay-checkout v1.6.2

reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml`` at the tag
(``git show``), keeps the ``v1`` ``openAPIV3Schema`` without ``status`` and ``description`` texts,
stores every large subtree that occurs more than once (the pod template, containers, probes) once
under ``$defs``, and writes ``crds-<tag>.json`` beside this file with the source tag and commit.
Run it again for a new KubeRay release and change ``KUBERAY_RELEASE`` in docs/cluster.md.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
MIN_SHARED = 2000  # characters of JSON: smaller repeated subtrees stay inline


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node: Any, counts: Counter, schema: bool = True) -> None:
    """Count schema subtrees (a ``properties`` map is not a schema; its values are)."""
    if isinstance(node, dict):
        if schema and len(_key(node)) >= MIN_SHARED:
            counts[_key(node)] += 1
        for k, v in node.items():
            if schema and k == "properties" and isinstance(v, dict):
                for sub in v.values():
                    _count(sub, counts)
            else:
                _count(v, counts, schema=k not in ("enum", "required", "default"))
    elif isinstance(node, list):
        for v in node:
            _count(v, counts, schema)


def _share(node: Any, counts: Counter, defs: dict[str, Any], top: bool = False) -> Any:
    """``node`` (a schema) with every repeated large schema subtree replaced by a ``$ref``."""
    if isinstance(node, dict):
        key = _key(node)
        if not top and counts.get(key, 0) > 1:
            name = hashlib.sha1(key.encode()).hexdigest()[:12]
            if name not in defs:
                defs[name] = None  # reserve, then fill (its own shared parts become refs too)
                defs[name] = _share(node, counts, defs, top=True)
            return {"$ref": f"#/$defs/{name}"}
        out = {}
        for k, v in node.items():
            if k == "properties" and isinstance(v, dict):
                out[k] = {name: _share(sub, counts, defs) for name, sub in v.items()}
            elif k in ("enum", "required", "default"):
                out[k] = v
            else:
                out[k] = _share(v, counts, defs)
        return out
    if isinstance(node, list):
        return [_share(v, counts, defs) for v in node]
    return node


def main(repo: str, tag: str) -> Path:
    commit = subprocess.check_output(["git", "-C", repo, "rev-list", "-n1", tag], text=True).strip()
    schemas = {}
    for kind, plural in KINDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        crd = yaml.safe_load(subprocess.check_output(["git", "-C", repo, "show", f"{tag}:{path}"]))
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strip(v1["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        schemas[kind] = schema
    counts: Counter = Counter()
    for schema in schemas.values():
        _count(schema, counts)
    defs: dict[str, Any] = {}
    shared = {kind: _share(s, counts, defs, top=True) for kind, s in schemas.items()}
    out = Path(__file__).with_name(f"crds-{tag}.json")
    doc = {
        "source": f"github.com/ray-project/kuberay {tag} ({commit}) ray-operator/config/crd/bases",
        "trimmed": "v1 openAPIV3Schema only; status and descriptions dropped; repeated subtrees in $defs",
        "kinds": shared,
        "$defs": defs,
    }
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return out


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2]))
