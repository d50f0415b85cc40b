"""Check rendered ray.io/v1 objects (RayService, RayCluster, RayJob) against KubeRay's API.

The allowed field paths, types and enums come from KubeRay's CRDs, derived by
tests/kuberay/derive_fields.py into tests/kuberay/ray.io-v1-fields.json. The Kubernetes
objects KubeRay embeds (pod templates, the serve Service) are returned to the caller,
which validates them against the Kubernetes schema itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIELDS_FILE = Path(__file__).resolve().parent / "kuberay" / "ray.io-v1-fields.json"
FIELDS: dict[str, Any] = json.loads(FIELDS_FILE.read_text())
KINDS = set(FIELDS["kinds"])

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "int-or-string": (int, str),
}


class KubeRayCheck:
    def __init__(self) -> None:
        self.errors: list[str] = []
        # (core kind, value, where): embedded Kubernetes objects to validate.
        self.embedded: list[tuple[str, Any, str]] = []

    def walk(self, value: Any, path: str, table: dict[str, Any], shown: str) -> None:
        entry = table.get(path)
        if entry is None:
            self.errors.append(f"{shown}: no such field in the ray.io/v1 API")
            return
        if "ref" in entry:
            self.walk(value, "spec", FIELDS["kinds"][entry["ref"]], shown)
            return
        if "core" in entry:
            self.embedded.append((entry["core"], value, shown))
            return
        kind = entry["type"]
        if kind != "any":
            allowed = _TYPES[kind]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                self.errors.append(f"{shown}: expected {kind}, got {type(value).__name__}")
                return
        if "enum" in entry and value not in entry["enum"]:
            self.errors.append(f"{shown}: {value!r} is not one of {entry['enum']}")
        if isinstance(value, dict) and kind in ("object", "any"):
            for key, item in value.items():
                child = f"{path}.{key}"
                if child not in table and f"{path}.*" in table:
                    child = f"{path}.*"
                if child in table or kind == "object":
                    self.walk(item, child, table, f"{shown}.{key}")
        elif isinstance(value, list) and f"{path}[]" in table:
            for index, item in enumerate(value):
                self.walk(item, f"{path}[]", table, f"{shown}[{index}]")


def check_kuberay(doc: dict[str, Any]) -> KubeRayCheck:
    """Walk ``doc``'s spec against the KubeRay API; see ``.errors`` and ``.embedded``."""
    check = KubeRayCheck()
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in KINDS:
        check.errors.append(f"{doc.get('apiVersion')}/{doc.get('kind')}: not a ray.io/v1 kind this check knows")
        return check
    extra = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    check.errors += [f"{key}: no such top-level field" for key in sorted(extra)]
    meta = doc.get("metadata") or {}
    if not (meta.get("name") or meta.get("generateName")):
        check.errors.append("metadata: needs name or generateName")
    check.walk(doc.get("spec"), "spec", FIELDS["kinds"][doc["kind"]], f"{doc['kind']}.spec")
    return check


def as_core_object(kind: str, value: dict[str, Any]) -> dict[str, Any]:
    """An embedded object as a document kubernetes-validate can check on its own."""
    if kind == "PodTemplateSpec":
        return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"}, "template": value}
    if kind == "Service":
        meta = {"name": "embedded", **(value.get("metadata") or {})}
        return {"apiVersion": "v1", "kind": "Service", **value, "metadata": meta}
    raise ValueError(f"unknown embedded kind {kind}")
