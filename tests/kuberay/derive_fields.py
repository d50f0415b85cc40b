"""Derive tests/kuberay/ray.io-v1-fields.json from KubeRay's CRD definitions.

The CRDs (ray-project/kuberay, ray-operator/config/crd/bases/ray.io_*.yaml) are about
1 MB each because they inline Kubernetes' PodTemplateSpec and Service schemas. The
chart's tests validate those embedded core objects with kubernetes-validate (strict,
against the Kubernetes schema); what they need from KubeRay is only its own fields.
So this walks each CRD's ray.io/v1 schema and records every field path with its type
(and enum), stopping at an embedded core object, which is recorded by its kind.

Run it again when KubeRay's API changes:
    python tests/kuberay/derive_fields.py KUBERAY_VERSION CRD_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("ray.io-v1-fields.json")
KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
         "RayService": "ray.io_rayservices.yaml"}


def core_kind(schema: dict[str, Any]) -> str | None:
    """The Kubernetes core type an embedded schema is, recognised by its shape."""
    props = schema.get("properties", {})
    spec = props.get("spec", {}).get("properties", {})
    if set(props) >= {"metadata", "spec"} and "containers" in spec:
        return "PodTemplateSpec"
    if set(props) >= {"metadata", "spec"} and "ports" in spec and "sessionAffinity" in spec:
        return "Service"
    return None


def walk(schema: dict[str, Any], path: str, out: dict[str, Any]) -> None:
    kind = core_kind(schema) if path.count(".") > 0 else None
    if kind:
        out[path] = {"core": kind}
        return
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        out[path] = {"type": "any"}
        return
    entry: dict[str, Any] = {"type": "int-or-string" if schema.get("x-kubernetes-int-or-string")
                             else schema.get("type", "any")}
    if "enum" in schema:
        entry["enum"] = schema["enum"]
    out[path] = entry
    for name, sub in sorted(schema.get("properties", {}).items()):
        walk(sub, f"{path}.{name}" if path else name, out)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        walk(extra, f"{path}.*", out)
    if isinstance(schema.get("items"), dict):
        walk(schema["items"], f"{path}[]", out)


# RayJob.spec.rayClusterSpec and RayService.spec.rayClusterConfig embed RayCluster's
# spec; each is stored once, as a reference, when its schema is indeed the same.
CLUSTER_SPEC_AT = {"RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}


# Enums the operator checks in Go (ray-operator/apis/ray/v1/*_types.go, its validation)
# but the CRD schema leaves as plain strings.
OPERATOR_ENUMS = {
    ("RayJob", "spec.submissionMode"): ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"],
    ("RayService", "spec.upgradeStrategy.type"): ["NewClusterWithIncrementalUpgrade", "NewCluster", "None"],
}


def derive(crd_dir: Path) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for kind, filename in KINDS.items():
        crd = yaml.safe_load((crd_dir / filename).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        paths: dict[str, Any] = {}
        walk(spec, "spec", paths)
        kinds[kind] = paths
    for (kind, path), values in OPERATOR_ENUMS.items():
        kinds[kind][path].setdefault("enum", values)
    cluster = kinds["RayCluster"]
    for kind, at in CLUSTER_SPEC_AT.items():
        paths = kinds[kind]
        inner = {"spec" + key[len(at):]: value for key, value in paths.items()
                 if key == at or key.startswith(at + ".")}
        if inner == cluster:
            kinds[kind] = {key: value for key, value in paths.items() if "spec" + key[len(at):] not in inner
                           or not (key == at or key.startswith(at + "."))}
            kinds[kind][at] = {"ref": "RayCluster"}
    return kinds


def main(argv: list[str]) -> int:
    kuberay_version, crd_dir = argv
    document = {"source": "github.com/ray-project/kuberay ray-operator/config/crd/bases",
                "kuberay_version": kuberay_version, "kinds": derive(Path(crd_dir))}
    OUT.write_text(json.dumps(document, indent=0, sort_keys=True, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
