"""What the chart's objects do to each other once they are in a cluster, checked on the
render: every selector (Service, PodDisruptionBudget, NetworkPolicy, ServiceMonitor)
selects a pod the release creates, with the labels KubeRay itself puts on Ray pods;
every Secret, ConfigMap and claim a pod names exists (rendered, or named by the user);
and a values change that should roll out changes the pod templates that must restart.

KubeRay's labels (ray-operator/controllers/ray/common/pod.go, labelPod, and the serve
Service of a RayService): ray.io/cluster=<RayCluster name>, ray.io/node-type=head|worker,
ray.io/group=headgroup|<groupName>, ray.io/is-ray-node=yes, ray.io/identifier, and on a
RayService's pods ray.io/serve=true once their Serve proxy is healthy (false on the head
with excludeHeadPodFromServeSvc). A RayService's serve Service gets the selector
{ray.io/cluster: <active cluster>, ray.io/serve: "true"} from KubeRay, whatever the
chart writes.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from test_helm_chart import (FULLNAME, NAMESPACE, VALUE_SETS, chart, documents, embedded_rayjobs, find,  # noqa: F401
                             pod_specs, ray_pod_templates, render, rendered)

# KubeRay names a RayService's cluster <name>-<random suffix>, a RayJob's cluster after the
# job; any fixed suffix stands in for the random one.
CLUSTER_SUFFIX = "-k7x2p"


@dataclass
class Pod:
    where: str
    labels: dict[str, str]
    spec: dict[str, Any]
    annotations: dict[str, str] = field(default_factory=dict)
    claim_templates: tuple[str, ...] = ()

    def ports(self) -> set[str]:
        return {p["name"] for c in self.spec["containers"] for p in c.get("ports", []) if "name" in p}


def _kuberay_labels(cluster: str, node_type: str, group: str, serving: bool | None) -> dict[str, str]:
    labels = {"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group,
              "ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}"}
    if serving is not None:
        labels["ray.io/serve"] = "true" if serving else "false"
    return labels


def ray_cluster_name(doc: dict[str, Any]) -> str:
    name = doc["metadata"].get("name") or doc["metadata"]["generateName"].rstrip("-")
    return name + CLUSTER_SUFFIX if doc["kind"] in ("RayService", "RayJob") else name


def pods(docs: list[dict[str, Any]]) -> list[Pod]:
    """Every pod the release's objects create, labelled as they will be in the cluster."""
    out = []
    for doc in docs + embedded_rayjobs(docs):
        kind, meta = doc["kind"], doc["metadata"]
        name = meta.get("name") or meta.get("generateName")
        template = None
        if kind in ("Deployment", "StatefulSet", "Job"):
            template = doc["spec"]["template"]
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        if template is not None:
            claims = tuple(t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", []))
            out.append(Pod(f"{kind}/{name}", dict(template["metadata"].get("labels", {})), template["spec"],
                           dict(template["metadata"].get("annotations", {})), claims))
        if doc.get("apiVersion") != "ray.io/v1":
            continue
        cluster = ray_cluster_name(doc)
        exclude_head = doc["kind"] == "RayService" and doc["spec"].get("excludeHeadPodFromServeSvc", False)
        for group, template in ray_pod_templates(doc):
            labels = dict(template["metadata"].get("labels", {}))
            if group != "submitter":
                serving = None if kind != "RayService" else not (group == "head" and exclude_head)
                labels.update(_kuberay_labels(cluster, "head" if group == "head" else "worker",
                                              "headgroup" if group == "head" else group, serving))
            out.append(Pod(f"{kind}/{name}/{group}", labels, template["spec"],
                           dict(template["metadata"].get("annotations", {}))))
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}  # a Service's plain map
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def services(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, selector, spec) of every Service, the RayService's with KubeRay's selector."""
    out = [(d["metadata"]["name"], d["spec"].get("selector"), d["spec"]) for d in find(docs, "Service")]
    for service in find(docs, "RayService"):
        serve = service["spec"].get("serveService")
        if serve is None:  # the incremental upgrade: the chart renders the Service itself
            continue
        selector = {"ray.io/cluster": ray_cluster_name(service), "ray.io/serve": "true"}
        out.append((serve["metadata"]["name"], selector, serve["spec"]))
    return out


def selector_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every selector that selects no pod (or Service) of the release, in words."""
    release_pods = pods(docs)
    problems = []
    for name, selector, spec in services(docs):
        if selector is None:
            problems.append(f"Service/{name} has no selector")
            continue
        chosen = [p for p in release_pods if selects(selector, p.labels)]
        if not chosen:
            problems.append(f"Service/{name} selects no pod: {selector}")
        for port in spec.get("ports", []):
            target = port.get("targetPort")
            for pod in chosen:
                if isinstance(target, str) and target not in pod.ports():
                    problems.append(f"Service/{name} port {port['name']}: {pod.where} has no port {target}")
    for doc in find(docs, "PodDisruptionBudget"):
        if not any(selects(doc["spec"]["selector"], p.labels) for p in release_pods):
            problems.append(f"PodDisruptionBudget/{doc['metadata']['name']} selects no pod")
    for doc in find(docs, "NetworkPolicy"):
        if not any(selects(doc["spec"]["podSelector"], p.labels) for p in release_pods):
            problems.append(f"NetworkPolicy/{doc['metadata']['name']} selects no pod")
    by_labels = [(name, d["metadata"].get("labels", {}), d["spec"]) for d in find(docs, "Service")
                 for name in [d["metadata"]["name"]]]
    for monitor in find(docs, "ServiceMonitor"):
        chosen = [(n, spec) for n, labels, spec in by_labels if selects(monitor["spec"]["selector"], labels)]
        if not chosen:
            problems.append(f"ServiceMonitor/{monitor['metadata']['name']} selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for n, spec in chosen:
                if endpoint["port"] not in {p["name"] for p in spec["ports"]}:
                    problems.append(f"ServiceMonitor/{monitor['metadata']['name']}: Service/{n} has no port "
                                    f"{endpoint['port']}")
    return problems


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_selector_selects_a_pod_of_the_release(rendered, name):
    assert selector_problems(rendered[name]) == []


def test_the_selector_check_catches_a_misspelt_label(rendered):
    """The bug of issue 26, item 11: a misspelt PDB label used to leave every test green."""
    docs = copy.deepcopy(rendered["gpu-values"])
    (budget,) = [d for d in find(docs, "PodDisruptionBudget") if d["metadata"]["name"] == f"{FULLNAME}-serve"]
    budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "serving"
    (policy,) = [d for d in find(docs, "NetworkPolicy") if d["metadata"]["name"] == f"{FULLNAME}-grpc-clients"]
    policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] = "other"
    (metrics,) = [d for d in find(docs, "Service") if d["metadata"]["name"] == f"{FULLNAME}-ray-metrics"]
    metrics["spec"]["ports"][0]["targetPort"] = "metric"
    problems = selector_problems(docs)
    assert f"PodDisruptionBudget/{FULLNAME}-serve selects no pod" in problems
    assert f"NetworkPolicy/{FULLNAME}-grpc-clients selects no pod" in problems
    assert any(p.startswith(f"Service/{FULLNAME}-ray-metrics port metrics:") for p in problems), problems


def test_kuberay_labels_reach_every_ray_pod_and_only_the_serving_workers_serve(rendered):
    release_pods = pods(rendered["default"])
    (service,) = find(rendered["default"], "RayService")
    serve_selector = {"ray.io/cluster": ray_cluster_name(service), "ray.io/serve": "true"}
    serving = {p.where for p in release_pods if selects(serve_selector, p.labels)}
    assert serving == {f"RayService/{FULLNAME}/{group}" for group, _ in ray_pod_templates(service) if group != "head"}
    ray_metrics = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/instance": "vs"}
    ray_pods = {p.where for p in release_pods if selects(ray_metrics, p.labels)}
    assert {f"RayCluster/{FULLNAME}-ingest/head", f"RayService/{FULLNAME}/head"} <= ray_pods


# --- every name a pod refers to exists -------------------------------------------------

def _user_strings(values: Any) -> set[str]:
    if isinstance(values, dict):
        return set().union(*(_user_strings(v) for v in values.values())) if values else set()
    if isinstance(values, list):
        return set().union(*(_user_strings(v) for v in values)) if values else set()
    return {values} if isinstance(values, str) else set()


def reference_problems(docs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """Each Secret, ConfigMap or claim a pod names must be rendered (with the key it reads)
    or be a name the user gave in the values (an existing object the user provides)."""
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs if "name" in d.get("metadata", {})}
    user = _user_strings(values)
    problems = []

    def check(where: str, kind: str, name: str, keys: list[str]) -> None:
        doc = objects.get((kind, name))
        if doc is None:
            if name not in user:
                problems.append(f"{where}: {kind}/{name} is neither rendered nor named in the values")
            return
        data = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
        problems.extend(f"{where}: {kind}/{name} has no key {key}" for key in keys if key not in data)

    for pod in pods(docs):
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                check(pod.where, "ConfigMap", volume["configMap"]["name"],
                      [i["key"] for i in volume["configMap"].get("items", [])])
            if "secret" in volume:
                check(pod.where, "Secret", volume["secret"]["secretName"],
                      [i["key"] for i in volume["secret"].get("items", [])])
            if "persistentVolumeClaim" in volume:
                check(pod.where, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], [])
        for container in pod.spec.get("initContainers", []) + pod.spec["containers"]:
            what = f"{pod.where}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in pod.claim_templates:
                    problems.append(f"{what} mounts {mount['name']}, which the pod does not have")
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    check(what, "Secret", source["secretKeyRef"]["name"], [source["secretKeyRef"]["key"]])
                if "configMapKeyRef" in source:
                    check(what, "ConfigMap", source["configMapKeyRef"]["name"], [source["configMapKeyRef"]["key"]])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    check(what, "Secret", source["secretRef"]["name"], [])
                if "configMapRef" in source:
                    check(what, "ConfigMap", source["configMapRef"]["name"], [])
    return problems


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_secret_configmap_claim_and_volume_a_pod_names_exists(rendered, name):
    assert reference_problems(rendered[name], VALUE_SETS[name]) == []


def test_the_reference_check_catches_a_missing_key_and_volume(rendered):
    docs = copy.deepcopy(rendered["default"])
    (secret,) = find(docs, "Secret", f"{FULLNAME}-keys")
    del secret["data"]["qdrant-api-key"]
    (deployment,) = find(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["volumes"] = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] != "settings"]
    problems = reference_problems(docs, {})
    assert any(p.endswith(f"Secret/{FULLNAME}-keys has no key qdrant-api-key") for p in problems), problems
    assert any("mounts settings, which the pod does not have" in p for p in problems), problems


# --- what a values change rolls out ------------------------------------------------------

def template_hashes(docs: list[dict[str, Any]]) -> dict[str, str]:
    """A digest of each pod template: a controller (Deployment, StatefulSet, KubeRay's
    RayService and RayCluster with upgradeStrategy) replaces pods when it changes."""
    digests = {}
    for pod in pods(docs):
        body = {"labels": pod.labels, "annotations": pod.annotations, "spec": pod.spec}
        digests[pod.where] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return digests


def changed_templates(chart, base: dict[str, Any], change: dict[str, Any]) -> set[str]:
    from test_helm_chart import _deep_merge

    before = template_hashes(documents(render(chart, base)))
    after = template_hashes(documents(render(chart, _deep_merge(base, change))))
    return {where for where in before if before[where] != after.get(where)}


def vidsearch_templates(docs: list[dict[str, Any]]) -> set[str]:
    return {p.where for p in pods(docs) if any(c["image"].startswith(("vidsearch", "registry.example.com/vidsearch"))
                                                for c in p.spec["containers"])}


def test_a_new_image_tag_rolls_every_vidsearch_pod(chart):
    base = VALUE_SETS["embedded-values"]
    changed = changed_templates(chart, base, {"image": {"tag": "0.2.0"}})
    expected = vidsearch_templates(documents(render(chart, base)))
    assert {f"Deployment/{FULLNAME}-ingest-worker", f"RayService/{FULLNAME}/head",
            f"RayCluster/{FULLNAME}-ingest/head"} <= expected
    assert changed == expected


def settings_readers(docs: list[dict[str, Any]]) -> set[str]:
    """Running pods whose vidsearch processes read the settings file at start (a Job's pod,
    the helm test's, reads the file as it is when it is created)."""
    return {p.where for p in pods(docs) if not p.where.startswith("Job/")
            and any(e.get("name") == "VIDSEARCH_CONFIG" for c in p.spec.get("initContainers", []) + p.spec["containers"]
                   for e in c.get("env", []))}


@pytest.mark.parametrize("change", [
    {"settings": {"decode": {"max_duration_s": 900}}},
    {"serve": {"reranker": {"numGpus": 0.25}}},  # the top-level README's own upgrade line
    {"ingest": {"encoderActors": 3}},
])
def test_a_settings_change_rolls_every_pod_that_reads_settings(chart, change):
    """Issue 26, item 3: Ray pods read the settings file at start too; without a checksum
    in their templates, KubeRay saw no change and the running Serve kept the old ones."""
    base = VALUE_SETS["embedded-values"]
    docs = documents(render(chart, base))
    readers = settings_readers(docs)
    assert {f"RayService/{FULLNAME}/head", f"RayCluster/{FULLNAME}-ingest/head",
            f"Deployment/{FULLNAME}-ingest-worker"} <= readers
    assert changed_templates(chart, base, change) == readers


def test_the_ingest_ray_cluster_replaces_its_pods_on_a_change(rendered):
    """KubeRay recreates a RayCluster's pods on a template change only with
    upgradeStrategy Recreate (a KubeRay 1.6 field); a RayService makes a new cluster."""
    import re

    import yaml

    from test_helm_chart import CHART

    for docs in rendered.values():
        (cluster,) = find(docs, "RayCluster")
        assert cluster["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    requires = yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"]["vidsearch.io/requires"]
    floor = tuple(int(n) for n in re.search(r"kuberay-operator>=(\d+)\.(\d+)", requires).groups())
    assert floor >= (1, 6)
    readme = (CHART / "README.md").read_text()
    assert re.findall(r"KubeRay operator\]\([^)]*\)\s+\((\d+\.\d+) or newer", readme) == [f"{floor[0]}.{floor[1]}"]


# --- placement ---------------------------------------------------------------------------

def requests_gpus(pod: Pod) -> bool:
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod.spec["containers"])


def test_gpu_placement_only_on_the_pods_that_request_gpus(rendered):
    """Issue 26, item 6: the GPU node selector and toleration used to reach the heads and
    the CPU-only ingest workers, which then waited for (and took) GPU nodes."""
    gpu_values = VALUE_SETS["gpu-values"]["placement"]
    vidsearch = vidsearch_templates(rendered["gpu-values"])
    release_pods = [p for p in pods(rendered["gpu-values"]) if p.where in vidsearch]
    gpu_pods = {p.where for p in release_pods if requests_gpus(p)}
    assert {f"RayService/{FULLNAME}/gpu", f"RayCluster/{FULLNAME}-ingest/gpu"} <= gpu_pods
    for pod in release_pods:
        if "submitter" in pod.where or pod.where.endswith("test-search"):
            continue  # short-lived clients: no placement
        expected = gpu_values["gpu"] if pod.where in gpu_pods else {"tolerations": [], **gpu_values["cpu"]}
        assert pod.spec.get("nodeSelector") == expected["nodeSelector"], pod.where
        assert pod.spec.get("tolerations", []) == expected["tolerations"], pod.where
    ingest_worker = next(p for p in release_pods if p.where == f"Deployment/{FULLNAME}-ingest-worker")
    assert ingest_worker.spec["nodeSelector"] == {"node-role/cpu": "true"}


def test_an_explicit_empty_list_or_map_clears_the_inherited_placement(chart):
    """sprig's `default` takes [] for unset: a group's tolerations: [] used to inherit."""
    taint = {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    values = {"placement": {"cpu": {"tolerations": [taint], "nodeSelector": {"pool": "cpu"}}},
              "serve": {"head": {"tolerations": [], "nodeSelector": {}}}}
    (service,) = find(documents(render(chart, values)), "RayService")
    templates = dict(ray_pod_templates(service))
    assert "tolerations" not in templates["head"]["spec"] and "nodeSelector" not in templates["head"]["spec"]
    assert templates["cpu"]["spec"]["tolerations"] == [taint]  # unset (null): inherited
    assert templates["cpu"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    own = {"serve": {"workers": {"tolerations": [taint]}}}
    (service,) = find(documents(render(chart, own)), "RayService")
    assert dict(ray_pod_templates(service))["cpu"]["spec"]["tolerations"] == [taint]
    assert "tolerations" not in dict(ray_pod_templates(service))["head"]["spec"]


# --- Serve's replicas fit the serving workers ----------------------------------------------

def ray_cpus(resources: dict[str, Any]) -> int:
    """KubeRay's `ray start --num-cpus`: the CPU limit (else the request), rounded up."""
    import math

    quantity = str((resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu") or 0)
    return math.ceil(float(quantity[:-1]) / 1000) if quantity.endswith("m") else math.ceil(float(quantity))


@pytest.fixture(scope="module")
def builder_actor_options() -> dict[str, dict[str, Any]]:
    """What each application builder asks per replica, from the builders themselves."""
    from vidsearch.config import Settings
    from vidsearch.services.query.app import query_app
    from vidsearch.services.reranker.app import reranker_app
    from vidsearch.services.web.app import web_app

    apps = [build(Settings()) for build in (query_app, reranker_app, web_app)]
    return {app._bound_deployment.name: app._bound_deployment.ray_actor_options for app in apps}


def serve_demand(docs: list[dict[str, Any]], builders: dict[str, dict[str, Any]]) -> tuple[float, float]:
    import yaml

    (service,) = find(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu_workers = "nvidia.com/gpu" in workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{FULLNAME}-settings")[0]["data"]["settings.yaml"])
    cpus = gpus = 0.0
    for app in config["applications"]:
        for deployment in app["deployments"]:
            replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
            options = deployment.get("ray_actor_options") or builders[deployment["name"]]
            cpus += replicas * options.get("num_cpus", 1)
            if deployment["name"] == "Reranker" and gpu_workers:  # the builder adds its GPU share
                gpus += replicas * settings["serve"]["reranker_num_gpus"]
    return cpus, gpus


def serve_capacity(docs: list[dict[str, Any]]) -> tuple[int, int]:
    (service,) = find(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    pods = workers["maxReplicas"] if cluster["enableInTreeAutoscaling"] else workers["replicas"]
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    return pods * ray_cpus(resources), pods * int(resources["limits"].get("nvidia.com/gpu", 0))


def test_the_chart_knows_what_each_builder_asks(builder_actor_options):
    # Resources only: the capacity check counts CPUs and GPUs (the reranker's builder also sets
    # a runtime_env, its CPU niceness, which schedules nothing).
    resources = {name: {k: v for k, v in options.items() if k in ("num_cpus", "num_gpus", "resources")}
                 for name, options in builder_actor_options.items()}
    assert resources == {"SearchIngress": {"num_cpus": 1}, "Reranker": {"num_cpus": 1}, "SearchWeb": {"num_cpus": 0.5}}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_serve_replicas_at_their_max_fit_the_serving_workers(rendered, name, builder_actor_options):
    """Issue 26, item 7: one 4-CPU worker gave Ray 4 CPUs while the ingress could scale
    to 8 and the reranker to 4 replicas of 1 CPU: the rest stayed pending, silently."""
    cpus, gpus = serve_demand(rendered[name], builder_actor_options)
    capacity_cpus, capacity_gpus = serve_capacity(rendered[name])
    assert cpus <= capacity_cpus and gpus <= capacity_gpus, (cpus, capacity_cpus, gpus, capacity_gpus)


@pytest.mark.parametrize("values, message", [
    ({"serve": {"workers": {"replicas": 1, "minReplicas": 1}}},
     "serve: at max_replicas Serve needs 8 CPUs (Reranker 4 x 1 CPU, SearchIngress 4 x 1 CPU) but serve.workers gives "
     "Ray 5 (1 pods x 5 CPUs, from the CPU limit): raise serve.workers.replicas"),
    ({"serve": {"workers": {"resources": {"requests": {"cpu": "500m", "memory": "8Gi"},
                                          "limits": {"cpu": "1500m", "memory": "8Gi"}}}}},
     "gives Ray 4 (2 pods x 2 CPUs"),
    ({"serve": {"rayAutoscaling": True, "workers": {"maxReplicas": 2}, "query": {"autoscaling": {"max_replicas": 16}}}},
     "needs 20 CPUs (Reranker 4 x 1 CPU, SearchIngress 16 x 1 CPU) but serve.workers gives Ray 10 (2 pods x 5 CPUs, "
     "from the CPU limit): raise serve.workers.maxReplicas"),
    ({"serve": {"workers": {"gpus": 1}, "reranker": {"numGpus": 1}}},
     "serve: at max_replicas the Reranker needs 4 GPUs (serve.reranker.numGpus 1 each) but serve.workers gives Ray 2 "
     "(2 pods x 1 GPUs)"),
])
def test_serve_replicas_that_cannot_fit_fail_the_render_with_the_numbers(chart, values, message):
    import helm_python

    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, values)
    text = str(excinfo.value)
    assert message in text and "\n" not in text.split("execution error", 1)[-1].strip(), text


def test_serve_replicas_that_just_fit_render(chart, builder_actor_options):
    values = {"serve": {"rayAutoscaling": True, "workers": {"maxReplicas": 4}, "query": {"autoscaling": {"max_replicas": 16}}}}
    docs = documents(render(chart, values))
    assert serve_demand(docs, builder_actor_options)[0] == 20 <= serve_capacity(docs)[0]


# ---- embedded Qdrant: a slow start is not killed in a loop (issue 26, item 8) ----------
@pytest.mark.parametrize("startup_s", [None, 1200, 15])
def test_embedded_qdrant_gets_its_whole_start_before_liveness_counts(chart, startup_s):
    values = {} if startup_s is None else {"qdrant": {"embedded": {"startupSeconds": startup_s}}}
    docs = documents(render(chart, values))
    (qdrant,) = [d for d in find(docs, "StatefulSet") if d["metadata"]["name"] == f"{FULLNAME}-qdrant"]
    (container,) = qdrant["spec"]["template"]["spec"]["containers"]
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    # Kubernetes runs no liveness probe until the startup probe has passed once: the start
    # window is failureThreshold x periodSeconds of a probe that only passes when Qdrant is ready.
    assert startup["httpGet"]["path"] == "/readyz"
    window = startup["failureThreshold"] * startup["periodSeconds"]
    want = 600 if startup_s is None else startup_s
    assert want <= window < want + startup["periodSeconds"]
    # Once started, one slow answer is not a restart: several misses in a row, each with a timeout.
    assert liveness["failureThreshold"] >= 3 and liveness.get("timeoutSeconds", 1) >= 2


def test_a_start_window_under_one_probe_period_is_refused(chart):
    with pytest.raises(Exception, match="startupSeconds"):
        render(chart, {"qdrant": {"embedded": {"startupSeconds": 5}}})


def test_the_embedded_qdrant_key_can_come_from_a_named_secret(chart):
    """With qdrant.embedded.apiKeySecret the release generates no Qdrant key (helm template and
    GitOps tools, which cannot lookup, would make a new one every sync), and the server and every
    client read the same named key."""
    named = {"name": "my-qdrant", "key": "token"}
    docs = documents(render(chart, {"qdrant": {"embedded": {"apiKeySecret": named}}}))
    assert all("qdrant-api-key" not in (d.get("data") or {}) for d in find(docs, "Secret"))
    refs = []
    for _, spec, _ in pod_specs(docs):
        for container in spec.get("containers", []):
            for env in container.get("env", []):
                if env["name"] in ("QDRANT_API_KEY", "QDRANT__SERVICE__API_KEY"):
                    refs.append((env["name"], env["valueFrom"]["secretKeyRef"]))
    assert {name for name, _ in refs} == {"QDRANT_API_KEY", "QDRANT__SERVICE__API_KEY"}
    assert all(ref == named for _, ref in refs), refs
    default = documents(render(chart, {}))
    assert any("qdrant-api-key" in (d.get("data") or {}) for d in find(default, "Secret"))


@pytest.mark.parametrize("on_storage", [None, False])
def test_embedded_qdrant_snapshots_survive_a_restart_by_default(chart, on_storage):
    values = {} if on_storage is None else {"qdrant": {"embedded": {"snapshotsOnStorage": on_storage}}}
    docs = documents(render(chart, values))
    (qdrant,) = [d for d in find(docs, "StatefulSet") if d["metadata"]["name"] == f"{FULLNAME}-qdrant"]
    spec = qdrant["spec"]["template"]["spec"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/qdrant/snapshots"]
    claims = {c["metadata"]["name"] for c in qdrant["spec"]["volumeClaimTemplates"]}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if on_storage is None:  # on a claim of the StatefulSet, which outlives the pod
        assert mount["name"] in claims and mount["name"] not in volumes and mount.get("subPath") == "snapshots"
    else:
        assert "emptyDir" in volumes[mount["name"]]


# --- Kafka from Strimzi (issue 26, item 5) ---------------------------------------------------

def strimzi_objects(user: str, cluster: str) -> list[dict[str, Any]]:
    """The Secrets Strimzi writes: a SCRAM KafkaUser's (named after the user, with only the
    password and a JAAS line) and the cluster CA's; vidsearch's pods must find what they read there."""
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": user},
             "data": {"password": "c2VjcmV0", "sasl.jaas.config": "amFhcw=="}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{cluster}-cluster-ca-cert"},
             "data": {"ca.crt": "Y2E=", "ca.p12": "cDEy", "ca.password": "cHc="}}]


def test_strimzi_values_need_only_what_a_kafka_user_secret_has(rendered, chart):
    """The old chart read the username from a key of the Secret; Strimzi's has none, and the
    pods stayed in CreateContainerConfigError."""
    values = VALUE_SETS["strimzi-values"]
    docs = rendered["strimzi-values"]
    assert reference_problems(docs + strimzi_objects("vidsearch", "events"), values) == []
    kafka_refs = [(e["name"], e["valueFrom"]["secretKeyRef"]) for p in pods(docs)
                  for c in p.spec.get("initContainers", []) + p.spec["containers"] for e in c.get("env", [])
                  if "secretKeyRef" in e.get("valueFrom", {}) and e["name"].startswith("VIDSEARCH_BROKER__")]
    assert kafka_refs and {ref["name"] for _, ref in kafka_refs} == {"vidsearch"}
    # The same values with the username from the Secret's usernameKey: the check sees it.
    keyed = copy.deepcopy(values)
    del keyed["kafka"]["external"]["sasl"]["username"]
    problems = reference_problems(documents(render(chart, keyed, base={})) + strimzi_objects("vidsearch", "events"),
                                  keyed)
    assert problems and all(p.endswith("Secret/vidsearch has no key username") for p in problems), problems


def _worker_settings(docs: list[dict[str, Any]], tmp_path) -> Any:
    from vidsearch.config import load_settings

    from test_helm_chart import pod_env

    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(find(docs, "ConfigMap", f"{FULLNAME}-settings")[0]["data"]["settings.yaml"])
    (worker,) = [p for p in pods(docs) if p.where == f"Deployment/{FULLNAME}-ingest-worker"]
    env = pod_env(worker.spec["containers"][0])
    env["VIDSEARCH_CONFIG"] = str(settings_file)
    return load_settings(env=env)


def test_strimzi_workers_use_the_literal_username_and_create_no_topics(rendered, tmp_path):
    settings = _worker_settings(rendered["strimzi-values"], tmp_path)
    assert settings.broker.sasl_username == "vidsearch" and settings.broker.create_topics is False
    assert settings.broker.partitions == 6 and settings.broker.ssl_cafile.endswith("/ca.crt")
    assert _worker_settings(rendered["external-values"], tmp_path).broker.create_topics is True
    # Without a literal username, the one from the Secret (a placeholder here).
    assert _worker_settings(rendered["external-values"], tmp_path).broker.sasl_username == "secret-from-kubernetes"


def test_turning_topic_creation_off_rolls_every_pod_that_reads_settings(chart):
    base = VALUE_SETS["external-values"]
    readers = settings_readers(documents(render(chart, base)))
    assert changed_templates(chart, base, {"kafka": {"createTopics": False}}) == readers


# --- the trainer's runs (issue 26, item 9) ------------------------------------------------------

def submit_script() -> Any:
    import importlib.util

    from test_helm_chart import CHART

    spec = importlib.util.spec_from_file_location("train_submit", CHART / "files" / "train-submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_rayjobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(docs, "RayJob") + embedded_rayjobs(docs)


def test_the_cron_job_lives_as_long_as_its_rayjob(rendered):
    """The old CronJob's Job ran `kubectl create` and ended at once, so Forbid never saw a
    run in progress and runs overlapped. Now its pod runs files/train-submit.py, which
    waits for the RayJob; its selector finds every trainer RayJob of the release."""
    from test_helm_chart import CHART

    docs = rendered["embedded-values"]
    (cron,) = find(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    args = submit_script().build_parser().parse_args(container["command"][2:])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/etc/vidsearch-train-submit"]]
    (config,) = find(docs, "ConfigMap", volume["configMap"]["name"])
    files = {item["path"]: config["data"][item["key"]] for item in volume["configMap"]["items"]}
    assert files[container["command"][1].rsplit("/", 1)[1]] == (CHART / "files" / "train-submit.py").read_text()
    manifest = yaml_load(files[args.manifest.rsplit("/", 1)[1]])
    assert manifest["kind"] == "RayJob" and manifest["metadata"]["generateName"]
    selector = dict(part.split("=", 1) for part in args.selector.split(","))
    rayjobs = trainer_rayjobs(docs)
    assert len(rayjobs) == 2 and all(selects(selector, r["metadata"]["labels"]) for r in rayjobs)
    # The wait outlasts the run, and the Job's own deadline outlasts the wait.
    deadline = manifest["spec"]["activeDeadlineSeconds"]
    assert deadline < args.timeout < job["activeDeadlineSeconds"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    (role,) = find(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]


def yaml_load(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _rayjob(name: str, deployment: str | None, job_status: str = "", submitted_by: str | None = None,
            **status: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/component": "trainer"}
    if submitted_by:
        labels["vidsearch.io/submitted-by"] = submitted_by
    body = {"metadata": {"name": name, "labels": labels}}
    if deployment is not None:
        body["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job_status, **status}
    return body


def test_the_submitter_starts_no_run_while_one_is_in_progress():
    script = submit_script()
    finished = [_rayjob("old-1", "Complete", "SUCCEEDED"), _rayjob("old-2", "Failed", reason="DeadlineExceeded")]
    assert script.decide([], "cron-1") == ("create", None)
    assert script.decide(finished, "cron-1") == ("create", None)
    # Just created (no status yet), initializing or running: a run in progress, whoever made it.
    for state in (None, "Initializing", "Running", "Retrying", "Suspended"):
        assert script.decide(finished + [_rayjob("hook", state)], "cron-2") == ("skip", "hook"), state
    # A retried pod of the Job that created it waits for its own run.
    own = _rayjob("mine", "Running", submitted_by="cron-3")
    assert script.decide([_rayjob("other", "Running"), own], "cron-3") == ("wait", "mine")
    manifest = {"metadata": {"generateName": "t-", "labels": {"app.kubernetes.io/component": "trainer"}}}
    labelled = script.with_submitter(manifest, "cron-4")
    assert labelled["metadata"]["labels"] == {"app.kubernetes.io/component": "trainer",
                                              "vidsearch.io/submitted-by": "cron-4"}
    assert "vidsearch.io/submitted-by" not in manifest["metadata"]["labels"]  # the mounted one is left alone


def test_the_submitter_exits_with_the_runs_outcome():
    script = submit_script()
    assert script.outcome(_rayjob("r", "Running", "RUNNING"), "r") is None
    assert script.outcome(_rayjob("r", None), "r") is None
    assert script.outcome(_rayjob("r", "Complete", "SUCCEEDED"), "r") == (0, "RayJob r succeeded")
    code, line = script.outcome(_rayjob("r", "Complete", "FAILED", reason="AppFailed"), "r")
    assert code == 1 and "AppFailed" in line
    code, line = script.outcome(_rayjob("r", "Failed", "RUNNING", reason="DeadlineExceeded",
                                        message="deadline\nmore"), "r")
    assert code == 1 and "DeadlineExceeded" in line and "(deadline)" in line and "\n" not in line
    assert script.outcome(None, "r") == (1, "RayJob r was deleted before it finished")


def deletion_rules(rayjob: dict[str, Any]) -> dict[tuple[str, str], int]:
    """(condition, policy) -> ttlSeconds of a RayJob's deletionRules."""
    rules = {}
    for rule in rayjob["spec"]["deletionStrategy"]["deletionRules"]:
        condition = dict(rule["condition"])
        ttl = condition.pop("ttlSeconds")
        ((field_name, value),) = condition.items()  # KubeRay: exactly one of jobStatus, jobDeploymentStatus
        key = (f"{field_name}={value}", rule["policy"])
        assert key not in rules, f"KubeRay refuses a duplicate rule {key}"
        rules[key] = ttl
    return rules


@pytest.mark.parametrize("change", [{}, {"trainer": {"ttlSecondsAfterFinished": 60, "keepFinishedSeconds": 86400}}])
def test_every_trainer_rayjob_deletes_its_cluster_and_then_itself(chart, change):
    """The old RayJobs deleted their clusters but stayed themselves, one per run, owned by
    nothing. KubeRay's deletionRules (which exclude shutdownAfterJobFinishes) remove both."""
    from test_helm_chart import _deep_merge

    values = _deep_merge(copy.deepcopy(VALUE_SETS["embedded-values"]), change)
    trainer = {"ttlSecondsAfterFinished": 3600, "keepFinishedSeconds": 604800, **change.get("trainer", {})}
    rayjobs = trainer_rayjobs(documents(render(chart, values, base={})))
    assert len(rayjobs) == 2
    for rayjob in rayjobs:
        spec = rayjob["spec"]
        assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
        expected = {}
        for condition in ("jobStatus=SUCCEEDED", "jobStatus=FAILED", "jobDeploymentStatus=Failed"):
            expected[(condition, "DeleteCluster")] = trainer["ttlSecondsAfterFinished"]
            expected[(condition, "DeleteSelf")] = trainer["keepFinishedSeconds"]
        assert deletion_rules(rayjob) == expected


def test_a_rayjob_kept_for_less_than_its_cluster_is_refused(chart):
    import helm_python

    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, {"trainer": {"keepFinishedSeconds": 60}}, base=VALUE_SETS["embedded-values"])
    assert "trainer.keepFinishedSeconds (60) must be >= trainer.ttlSecondsAfterFinished (3600)" in str(excinfo.value)


def test_the_install_hook_and_the_shipped_model_are_what_their_comments_say(rendered):
    """Two comments named hooks the templates do not have: the shipped model is installed by
    an init container of the ingest workers, not a hook Job; the trainer's install RayJob is
    a post-install hook only (no upgrade runs it)."""
    import yaml

    from test_helm_chart import CHART

    docs = rendered["embedded-values"]
    hooks = {(d["kind"], d["metadata"]["name"]): d["metadata"]["annotations"]["helm.sh/hook"]
             for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})}
    assert hooks == {("RayJob", f"{FULLNAME}-train-initial"): "post-install", ("Job", f"{FULLNAME}-test-search"): "test"}
    (worker,) = [p for p in pods(docs) if p.where == f"Deployment/{FULLNAME}-ingest-worker"]
    assert [c["command"] for c in worker.spec["initContainers"]] == [["vidsearch", "models", "install-shipped"]]
    values_text = (CHART / "values.yaml").read_text()
    comment = values_text.split("installShipped:", 1)[0].rsplit("# --", 1)[1]
    assert "init container" in comment and "hook" not in comment
    tpl = (CHART / "templates" / "_trainer.tpl").read_text()
    assert "a later upgrade replaces" not in tpl and "an upgrade runs no post-install" in tpl
    assert yaml.safe_load(values_text)["registry"]["installShipped"] is True


# --- serving availability (issue 26, item 4) ---------------------------------------------------

def serve_pods(docs: list[dict[str, Any]]) -> dict[str, Pod]:
    return {p.where.rsplit("/", 1)[1]: p for p in pods(docs) if p.where.startswith("RayService/")}


def budget_for(docs: list[dict[str, Any]], pod: Pod) -> list[dict[str, Any]]:
    return [d for d in find(docs, "PodDisruptionBudget") if selects(d["spec"]["selector"], pod.labels)]


@pytest.mark.parametrize("gcs, expected", [(False, 0), (True, 1)])
def test_the_serving_head_has_a_disruption_budget(chart, gcs, expected):
    """The old chart's budgets selected Ray workers only: a drain evicted the serving head,
    and without GCS fault tolerance that restarts every serving pod."""
    values = {"serve": {"gcsFaultTolerance": {"enabled": gcs, "redisAddress": "redis.data:6379"}}}
    docs = documents(render(chart, values))
    serving = serve_pods(docs)
    (head_budget,) = budget_for(docs, serving["head"])
    assert head_budget["spec"]["maxUnavailable"] == expected
    (worker_budget,) = budget_for(docs, serving["cpu"])
    assert worker_budget["spec"]["maxUnavailable"] == 1 and worker_budget is not head_budget
    explicit = documents(render(chart, _merge(values, {"serve": {"head": {"maxUnavailable": 1}}})))
    assert budget_for(explicit, serve_pods(explicit)["head"])[0]["spec"]["maxUnavailable"] == 1


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    from test_helm_chart import _deep_merge

    return _deep_merge(copy.deepcopy(base), copy.deepcopy(top))


def min_replicas(docs: list[dict[str, Any]]) -> dict[str, int]:
    from test_helm_chart import serve_config

    out = {}
    for app in serve_config(docs)["applications"]:
        for deployment in app["deployments"]:
            scaling = deployment.get("autoscaling_config")
            out[deployment["name"]] = scaling["min_replicas"] if scaling else deployment.get("num_replicas", 1)
    return out


def test_every_serve_deployment_keeps_two_replicas_on_two_workers(chart, rendered):
    """One worker's loss (a drain, a node) leaves a replica of each deployment on the other."""
    docs = rendered["default"]
    assert min_replicas(docs) == {"Reranker": 2, "SearchIngress": 2}
    assert min(min_replicas(documents(render(chart, {"serve": {"web": {"enabled": True}}}))).values()) >= 2
    (service,) = find(docs, "RayService")
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] >= 2 and group["minReplicas"] >= 2
    # The workers prefer different nodes; the spread counts the serving workers of one cluster.
    serving = serve_pods(docs)
    (spread,) = serving["cpu"].spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["matchLabelKeys"] == ["ray.io/cluster"]
    counted = [p.where for p in pods(docs) if selects(spread["labelSelector"], p.labels)]
    assert counted == [serving["cpu"].where]
    assert "topologySpreadConstraints" not in serving["head"].spec
    off = serve_pods(documents(render(chart, {"serve": {"workers": {"spreadAcrossNodes": False}}})))
    assert "topologySpreadConstraints" not in off["cpu"].spec


def test_gcs_fault_tolerance_keeps_the_clusters_state_in_redis(chart):
    from kuberay_support import check_kuberay

    values = {"serve": {"gcsFaultTolerance": {"enabled": True, "redisAddress": "redis-master.data:6379",
                                              "redisPasswordSecret": {"name": "vidsearch-redis", "key": "redis-password"}}}}
    docs = documents(render(chart, values))
    (service,) = find(docs, "RayService")
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "redis-master.data:6379",
                       "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "vidsearch-redis",
                                                                        "key": "redis-password"}}}}
    assert check_kuberay(service).errors == []
    # KubeRay refuses a RayService that sets Redis in the head's environment as well.
    head = serve_pods(docs)["head"].spec["containers"][0]
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & {e["name"] for e in head.get("env", [])}
    without_password = documents(render(chart, {"serve": {"gcsFaultTolerance": {"enabled": True,
                                                                               "redisAddress": "r:6379"}}}))
    assert find(without_password, "RayService")[0]["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "r:6379"}
    assert "gcsFaultToleranceOptions" not in find(documents(render(chart, {})), "RayService")[0]["spec"]["rayClusterConfig"]
    # Turning it on is a change of the cluster spec: KubeRay makes a new serving cluster for it.
    assert changed_cluster_spec(chart, {}, values)


def changed_cluster_spec(chart, base: dict[str, Any], change: dict[str, Any]) -> bool:
    before = find(documents(render(chart, base)), "RayService")[0]["spec"]["rayClusterConfig"]
    after = find(documents(render(chart, _merge(base, change))), "RayService")[0]["spec"]["rayClusterConfig"]
    return before != after


INCREMENTAL = {"serve": {"rayAutoscaling": True, "web": {"enabled": True},
                         "upgrade": {"strategy": "NewClusterWithIncrementalUpgrade", "gatewayClassName": "istio",
                                     "maxSurgePercent": 50, "stepSizePercent": 25, "intervalSeconds": 30}}}


def test_the_incremental_upgrade_is_an_option_kuberay_accepts(chart):
    from kuberay_support import check_kuberay

    default = find(documents(render(chart, {})), "RayService")[0]
    assert default["spec"]["upgradeStrategy"] == {"type": "NewCluster"} and "serveService" in default["spec"]
    docs = documents(render(chart, INCREMENTAL))
    (service,) = find(docs, "RayService")
    spec = service["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
        "gatewayClassName": "istio", "maxSurgePercent": 50, "stepSizePercent": 25, "intervalSeconds": 30}}
    assert check_kuberay(service).errors == []
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True  # KubeRay requires it for this strategy
    # KubeRay ignores serveService here and routes its Gateway to the head's port named "serve".
    assert "serveService" not in spec
    head = serve_pods(docs)["head"]
    assert {"name": "serve", "containerPort": 8000} in head.spec["containers"][0]["ports"]


def test_with_the_incremental_upgrade_the_grpc_service_spans_old_and_new_clusters(chart):
    """KubeRay's Gateway carries HTTP only and its serve Services are per cluster: the chart's
    own gRPC Service selects the serving workers of both clusters while traffic moves."""
    docs = documents(render(chart, INCREMENTAL))
    (grpc,) = find(docs, "Service", f"{FULLNAME}-grpc")
    (service,) = find(docs, "RayService")
    old = pods(docs)
    new_cluster = [Pod(p.where + "-new", {**p.labels, "ray.io/cluster": ray_cluster_name(service) + "-next"}, p.spec)
                   for p in old if p.where.startswith("RayService/")]
    chosen = [p.where for p in old + new_cluster if selects(grpc["spec"]["selector"], p.labels)]
    assert chosen == [f"RayService/{FULLNAME}/cpu", f"RayService/{FULLNAME}/cpu-new"]
    assert selector_problems(docs) == []  # the targetPorts (grpc, serve) exist on those pods
    assert [p["targetPort"] for p in grpc["spec"]["ports"]] == ["grpc", "serve"]


@pytest.mark.parametrize("change, message", [
    ({"serve": {"rayAutoscaling": False}}, "needs serve.rayAutoscaling=true"),
    ({"serve": {"upgrade": {"gatewayClassName": ""}}}, "needs serve.upgrade.gatewayClassName"),
    ({"serve": {"upgrade": {"stepSizePercent": 60}}}, "serve.upgrade.stepSizePercent (60) must not exceed"),
    ({"serve": {"gcsFaultTolerance": {"enabled": True}}}, "serve.gcsFaultTolerance.enabled needs a Redis: set serve.gcsFaultTolerance.redisAddress"),
])
def test_availability_options_kuberay_would_refuse_fail_the_render(chart, change, message):
    import helm_python

    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, _merge(INCREMENTAL, change))
    assert message in str(excinfo.value)


# --- the embedded GCS Redis (issue 26, item 4: "GCS fault tolerance as an option with its Redis") ---

from test_helm_chart import REQUIRED  # noqa: E402

REDIS = f"{FULLNAME}-redis"
EMBEDDED_REDIS = {"serve": {"gcsFaultTolerance": {"enabled": True, "embeddedRedis": {"enabled": True}}}}


def redis_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (statefulset,) = find(docs, "StatefulSet", REDIS)
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def gcs_options(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = find(docs, "RayService")
    return service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]


def env_ref(container: dict[str, Any], name: str) -> dict[str, str]:
    (env,) = [e for e in container.get("env", []) if e["name"] == name]
    return env["valueFrom"]["secretKeyRef"]


def test_the_gcs_redis_address_is_the_embedded_redis_service(chart):
    docs = documents(render(chart, EMBEDDED_REDIS))
    (service,) = find(docs, "Service", REDIS)
    assert service["spec"]["type"] == "ClusterIP"
    chosen = [p for p in pods(docs) if selects(service["spec"]["selector"], p.labels)]
    assert [p.where for p in chosen] == [f"StatefulSet/{REDIS}"]
    (port,) = service["spec"]["ports"]
    (target,) = [p for c in chosen[0].spec["containers"] for p in c["ports"] if p["name"] == port["targetPort"]]
    assert target["containerPort"] == 6379  # redis-server's default port: the args set no other
    assert "--port" not in redis_container(docs)["args"]
    # KubeRay hands redisAddress to the head (RAY_REDIS_ADDRESS): <service>[.<namespace>[.svc...]]:<port>.
    host, _, service_port = gcs_options(docs)["redisAddress"].rpartition(":")
    name, *domain = host.split(".")
    assert name == REDIS and int(service_port) == port["port"]
    assert domain[:1] in ([], [NAMESPACE]) and (not domain[1:] or domain[1] == "svc")
    assert selector_problems(docs) == []
    # Without GCS fault tolerance the switch renders no Redis at all.
    off = documents(render(chart, {"serve": {"gcsFaultTolerance": {"embeddedRedis": {"enabled": True}}}}))
    assert not [d for d in off if d["metadata"].get("name") == REDIS]
    assert "gcsFaultToleranceOptions" not in find(off, "RayService")[0]["spec"]["rayClusterConfig"]


def test_the_embedded_redis_and_the_head_share_one_generated_password(chart):
    docs = documents(render(chart, EMBEDDED_REDIS))
    container = redis_container(docs)
    ref = env_ref(container, "REDIS_PASSWORD")
    assert gcs_options(docs)["redisPassword"] == {"valueFrom": {"secretKeyRef": ref}}
    (secret,) = find(docs, "Secret", ref["name"])
    assert ref["key"] in secret["data"]
    # The server requires it, through the kubelet's expansion of the env var.
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    # The probes ping with redis-cli and take the password from the environment (REDISCLI_AUTH).
    assert env_ref(container, "REDISCLI_AUTH") == ref
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli" in command and "ping" in command
        assert " -a " not in command and "--pass" not in command and "PASSWORD" not in command
    assert reference_problems(docs, _merge(REQUIRED, EMBEDDED_REDIS)) == []


def test_an_existing_secret_gives_the_embedded_redis_its_password(chart):
    values = _merge(EMBEDDED_REDIS, {"serve": {"gcsFaultTolerance": {
        "redisPasswordSecret": {"name": "gcs-redis", "key": "pw"}}}})
    docs = documents(render(chart, values))
    ref = env_ref(redis_container(docs), "REDIS_PASSWORD")
    assert ref == {"name": "gcs-redis", "key": "pw"}
    assert gcs_options(docs)["redisPassword"] == {"valueFrom": {"secretKeyRef": ref}}
    assert all("redis-password" not in (s.get("data") or {}) for s in find(docs, "Secret"))
    assert reference_problems(docs, _merge(REQUIRED, values)) == []


def test_the_embedded_redis_keeps_its_appendonly_file_on_a_claim(chart):
    values = _merge(EMBEDDED_REDIS, {"serve": {"gcsFaultTolerance": {"embeddedRedis": {
        "persistence": {"size": "2Gi", "storageClass": "fast"}}}}})
    docs = documents(render(chart, values))
    (statefulset,) = find(docs, "StatefulSet", REDIS)
    container = redis_container(docs)
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    (claim,) = [t for t in statefulset["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == mount["name"]]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert mount["name"] not in {v["name"] for v in statefulset["spec"]["template"]["spec"].get("volumes", [])}


def admitted(docs: list[dict[str, Any]], target: Pod, source: Pod, port: int) -> bool:
    """Whether the release's NetworkPolicies let ``source`` (a pod of the release's
    namespace) open ``port`` on ``target``: no policy selecting the target admits all,
    else any of their rules must (policies add up)."""
    own_namespace = {"kubernetes.io/metadata.name": NAMESPACE}
    policies = [d["spec"] for d in find(docs, "NetworkPolicy") if selects(d["spec"]["podSelector"], target.labels)]
    if not policies:
        return True
    for spec in policies:
        for rule in spec.get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], own_namespace):
                    continue
                if selects(peer.get("podSelector", {}), source.labels):
                    return True
    return False


def test_only_the_serving_heads_reach_the_embedded_redis(chart):
    # Everything embedded (Kafka, Qdrant, the trainer's pods) beside the Redis.
    values = _merge(EMBEDDED_REDIS, {"networkPolicy": {"enabled": True}})
    docs = documents(render(chart, values, base=VALUE_SETS["embedded-values"]))
    release_pods = {p.where: p for p in pods(docs)}
    redis = release_pods[f"StatefulSet/{REDIS}"]
    head = release_pods[f"RayService/{FULLNAME}/head"]
    # KubeRay's Redis cleanup Job (when it deletes a fault-tolerant cluster) is the head's pod
    # template with ray.io/node-type=redis-cleanup.
    cleanup = Pod("Job/redis-cleanup", {**head.labels, "ray.io/node-type": "redis-cleanup"}, head.spec)
    reaching = {p.where for p in [*release_pods.values(), cleanup] if admitted(docs, redis, p, 6379)}
    assert reaching == {head.where, cleanup.where}
    # The rest of the release still reaches each other (Ray's ports, Qdrant, Kafka).
    worker = release_pods[f"RayService/{FULLNAME}/cpu"]
    qdrant = release_pods[f"StatefulSet/{FULLNAME}-qdrant"]
    assert admitted(docs, head, worker, 6379) and admitted(docs, qdrant, worker, 6333)
    assert admitted(docs, release_pods[f"StatefulSet/{FULLNAME}-kafka"], head, 9092)
    assert selector_problems(docs) == []
    # Without the embedded Redis the internal policy is what it was: every release pod.
    plain = documents(render(chart, {"networkPolicy": {"enabled": True}}))
    (internal,) = find(plain, "NetworkPolicy", f"{FULLNAME}-internal")
    assert "matchExpressions" not in internal["spec"]["podSelector"]
    assert not find(plain, "NetworkPolicy", REDIS)


@pytest.mark.parametrize("change, message", [
    ({"serve": {"gcsFaultTolerance": {"redisAddress": "redis.data:6379"}}},
     "set either serve.gcsFaultTolerance.redisAddress or serve.gcsFaultTolerance.embeddedRedis.enabled=true, not both"),
    ({"serve": {"gcsFaultTolerance": {"embeddedRedis": {"enabled": False}}}},
     "serve.gcsFaultTolerance.enabled needs a Redis: set serve.gcsFaultTolerance.redisAddress"),
])
def test_gcs_fault_tolerance_needs_exactly_one_redis(chart, change, message):
    import helm_python

    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, _merge(EMBEDDED_REDIS, change))
    text = str(excinfo.value)
    assert message in text and "schema" not in text.lower()
