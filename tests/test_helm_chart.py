"""The Helm chart (helm/vidsearch), proven without a cluster: Helm's own Go SDK (the PyPI
helm-python-sdk) lints and renders it; every core object must pass the Kubernetes 1.30
schema (kubernetes-validate, strict), the KubeRay objects KubeRay's ray.io/v1 API
(tests/kuberay_support.py); the values schema, the security defaults and the one source
of the Serve config are checked on what the chart renders.
"""
from __future__ import annotations

import base64
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import helm_python  # the dev extra pins both: a missing one must fail, never skip
import kubernetes_validate
import pytest
import yaml

from kuberay_support import as_core_object, check_kuberay

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "vidsearch"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
# What a user must provide: the chart fails without an image, a ReadWriteMany storage class
# for the registry claim and a video source (test_what_a_user_must_provide_fails_early).
REQUIRED = {"image": {"repository": "registry.example.com/vidsearch"},
            "registry": {"pvc": {"storageClass": "nfs-client"}}, "videos": {"existingClaim": "vidsearch-videos"}}
VALUE_SETS = {"default": REQUIRED, **{path.stem: yaml.safe_load(path.read_text()) for path in CI_VALUES}}
KUBE_VERSION = "1.30"
RELEASE, NAMESPACE = "vs", "search"
FULLNAME = "vs-vidsearch"
# API groups whose kinds are in the Kubernetes schema; anything else is a CRD.
CORE_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1"}
SECRET_ENV = re.compile(r"(API_KEY|PASSWORD|SECRET|TOKEN|USERNAME)$")


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart, values: dict[str, Any], *, base: dict[str, Any] = REQUIRED) -> dict[str, str]:
    """The chart rendered with ``values`` over ``base`` (by default what a user must provide)."""
    return chart.render(_deep_merge(copy.deepcopy(base), copy.deepcopy(values)), name=RELEASE, namespace=NAMESPACE,
                        is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict[str, Any]]]:
    # Each value set alone, as chart-testing lints the ci/*.yaml files.
    return {name: documents(render(chart, values, base={})) for name, values in VALUE_SETS.items()}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]


def embedded_rayjobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The RayJob the CronJob submits, kept in a ConfigMap."""
    return [yaml.safe_load(d["data"]["rayjob.yaml"]) for d in find(docs, "ConfigMap") if "rayjob.yaml" in d["data"]]


def ray_pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = doc["spec"]
    cluster = {"RayService": lambda s: s["rayClusterConfig"], "RayJob": lambda s: s["rayClusterSpec"],
               "RayCluster": lambda s: s}[doc["kind"]](spec)
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(where, pod spec, long-running) for every pod the release can create."""
    for doc in docs + embedded_rayjobs(docs):
        kind, name = doc["kind"], doc["metadata"].get("name") or doc["metadata"].get("generateName")
        if kind in ("Deployment", "StatefulSet"):
            yield f"{kind}/{name}", doc["spec"]["template"]["spec"], True
        elif kind == "Job":
            yield f"{kind}/{name}", doc["spec"]["template"]["spec"], False
        elif kind == "CronJob":
            yield f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"], False
        elif doc["apiVersion"] == "ray.io/v1":
            for group, template in ray_pod_templates(doc):
                yield f"{kind}/{name}/{group}", template["spec"], group != "submitter"


# --- lint and render -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_clean(name):
    report = helm_python.lint(str(CHART), copy.deepcopy(VALUE_SETS[name]), kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_value_sets_cover_the_three_topologies(rendered):
    assert {"external-values", "embedded-values", "gpu-values"} <= set(rendered)
    external, embedded, gpu = rendered["external-values"], rendered["embedded-values"], rendered["gpu-values"]
    assert not find(external, "StatefulSet"), "external Kafka and Qdrant: nothing embedded"
    assert {d["metadata"]["name"] for d in find(embedded, "StatefulSet")} == {f"{FULLNAME}-kafka", f"{FULLNAME}-qdrant",
                                                                         f"{FULLNAME}-redis"}
    assert find(embedded, "CronJob") and find(embedded, "RayJob")
    assert find(gpu, "NetworkPolicy") and len(find(gpu, "ServiceMonitor")) == 2


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_core_object_passes_the_kubernetes_schema(rendered, name):
    docs = rendered[name]
    assert docs
    for doc in docs:
        if doc["apiVersion"] in CORE_GROUPS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    if name == "embedded-values":
        # Objects KubeRay and the CronJob create from the chart's templates.
        assert embedded_rayjobs(docs)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_kuberay_objects_match_the_ray_io_v1_api(rendered, name):
    docs = rendered[name]
    ray_docs = [d for d in docs if d["apiVersion"] == "ray.io/v1"] + embedded_rayjobs(docs)
    assert {d["kind"] for d in ray_docs} >= {"RayService", "RayCluster"}
    for doc in ray_docs:
        check = check_kuberay(doc)
        assert check.errors == [], (doc["kind"], check.errors)
        assert check.embedded, "pod templates are validated as Kubernetes objects"
        for kind, value, where in check.embedded:
            try:
                kubernetes_validate.validate(as_core_object(kind, value), KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message}")


def test_the_kuberay_check_rejects_a_field_the_api_does_not_have(rendered):
    (service,) = find(rendered["default"], "RayService")
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # typo of rayStartParams
    bad["spec"]["serveConfigV3"] = "x"
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    errors = check_kuberay(bad).errors
    assert any("headGroupSpec.rayStartParam:" in e and "no such field" in e for e in errors), errors
    assert any("serveConfigV3" in e for e in errors), errors
    assert any("workerGroupSpecs[0].replicas: expected integer" in e for e in errors), errors
    job = copy.deepcopy(embedded_rayjobs(rendered["embedded-values"])[0])
    job["spec"]["submissionMode"] = "SidecarModeX"
    assert any("submissionMode" in e for e in check_kuberay(job).errors)
    # A bad field inside an embedded pod template is the Kubernetes schema's to catch.
    pod = copy.deepcopy(service)
    pod["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "x"
    (_, template, _), *_ = check_kuberay(pod).embedded
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_core_object("PodTemplateSpec", template), KUBE_VERSION, strict=True)


# --- the Serve config: one source ------------------------------------------------------

def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = find(docs, "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
WEB_APP = "vidsearch-web"  # the name the chart drops (templates/rayservice.yaml)
WEB_ON = {"serve": {"web": {"enabled": True}}}


def file_serve_config(*, web: bool) -> dict[str, Any]:
    """deploy/serve_config.yaml as the chart renders it: without the search page (the
    default), or whole with the HTTP proxy on every interface, so the Service reaches it;
    with the autoscaling fields values.yaml's defaults name (sized to the default workers)."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    if web:
        config["http_options"]["host"] = "0.0.0.0"
    else:
        config["applications"] = [app for app in config["applications"] if app["name"] != WEB_APP]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["serve"]
    overrides = {"SearchIngress": defaults["query"]["autoscaling"], "Reranker": defaults["reranker"]["autoscaling"],
                 "SearchWeb": defaults["web"]["autoscaling"]}
    for app in config["applications"]:
        for deployment in app["deployments"]:
            deployment["autoscaling_config"].update(overrides[deployment["name"]])
    return config


def test_serve_config_is_deploy_serve_config_yaml_without_the_page(rendered):
    from vidsearch.config import ServeSettings

    link = CHART / "files" / "serve_config.yaml"
    assert link.is_symlink() and link.resolve() == SERVE_CONFIG.resolve()
    # The page is in the file under the name the chart drops: leaving it out is no no-op.
    assert WEB_APP == ServeSettings().web_app_name
    assert WEB_APP in {app["name"] for app in yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}
    expected = file_serve_config(web=False)
    assert expected != yaml.safe_load(SERVE_CONFIG.read_text())  # the page, and the default max_replicas
    assert [app["name"] for app in expected["applications"]] == ["vidsearch-reranker", "vidsearch"]
    assert expected["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert serve_config(rendered["default"]) == expected
    assert serve_config(rendered["external-values"]) == expected


def test_serve_web_enabled_renders_the_whole_file_and_exposes_the_page(chart):
    docs = documents(render(chart, {**WEB_ON, "videos": {"existingClaim": "videos"}}))
    assert serve_config(docs) == file_serve_config(web=True)
    (service,) = find(docs, "RayService")
    ports = service["spec"]["serveService"]["spec"]["ports"]
    assert ports[1] == {"name": "http", "port": 8000, "targetPort": "http", "appProtocol": "http"}
    for _, template in ray_pod_templates(service):
        container = template["spec"]["containers"][0]
        assert {"name": "http", "containerPort": 8000} in container["ports"]
        # /media streams and /thumb decodes the source files: the serving pods mount them.
        assert {"name": "videos", "mountPath": "/data/videos", "readOnly": True} in container["volumeMounts"]
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{FULLNAME}-settings")[0]["data"]["settings.yaml"])
    assert settings["serve"]["web_enabled"] is True and settings["serve"]["http_port"] == 8000
    notes = render(chart, WEB_ON)["vidsearch/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}-grpc 8000" in notes and "http://127.0.0.1:8000/" in notes


def test_serve_http_port_moves_the_proxy_the_service_and_the_probe(chart):
    docs = documents(render(chart, {"serve": {"httpPort": 8100, "web": {"enabled": True}}}))
    expected = file_serve_config(web=True)
    expected["http_options"]["port"] = 8100
    assert serve_config(docs) == expected
    (service,) = find(docs, "RayService")
    assert service["spec"]["serveService"]["spec"]["ports"][1]["port"] == 8100
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "http://localhost:8100/-/healthz" in worker["readinessProbe"]["exec"]["command"][-1]
    # Off, the port still moves (Serve's proxy always runs: the probe checks it), the page stays out.
    docs = documents(render(chart, {"serve": {"httpPort": 8100}}))
    assert serve_config(docs)["http_options"] == {"host": "127.0.0.1", "port": 8100}
    assert WEB_APP not in {app["name"] for app in serve_config(docs)["applications"]}


def test_the_page_is_off_and_unexposed_by_default(rendered, chart):
    docs = rendered["default"]
    (service,) = find(docs, "RayService")
    assert [p["name"] for p in service["spec"]["serveService"]["spec"]["ports"]] == ["grpc"]
    for _, template in ray_pod_templates(service):
        assert "http" not in {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{FULLNAME}-settings")[0]["data"]["settings.yaml"])
    assert settings["serve"]["web_enabled"] is False
    assert "search page" not in render(chart, {})["vidsearch/templates/NOTES.txt"]


def test_values_override_only_the_autoscaling_they_name(rendered):
    expected = file_serve_config(web=True)  # gpu-values turns the page on
    gpu_values = VALUE_SETS["gpu-values"]["serve"]
    assert gpu_values["web"]["enabled"] is True
    overrides = {"SearchIngress": gpu_values["query"]["autoscaling"], "Reranker": gpu_values["reranker"]["autoscaling"],
                 "SearchWeb": gpu_values["web"]["autoscaling"]}
    for app in expected["applications"]:
        for deployment in app["deployments"]:
            # Other applications in the file are passed through as they are.
            deployment.get("autoscaling_config", {}).update(overrides.get(deployment["name"], {}))
    assert serve_config(rendered["gpu-values"]) == expected


def test_serve_config_passes_serves_schema(rendered):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config(rendered["gpu-values"]))


def test_grpc_service_and_ports(rendered):
    (service,) = find(rendered["default"], "RayService")
    grpc = service["spec"]["serveService"]
    assert grpc["metadata"]["name"] == f"{FULLNAME}-grpc"
    assert grpc["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "grpc"}]
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert {"name": "grpc", "containerPort": 50051} in worker["ports"]
    assert serve_config(rendered["default"])["grpc_options"]["port"] == 50051


# --- values.schema.json ----------------------------------------------------------------

def with_values(**paths: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for dotted, value in paths.items():
        node = values
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return values


EXTERNAL_QDRANT = {"embedded": {"enabled": False}, "external": {"url": "http://qdrant:6333"}}


@pytest.mark.parametrize("values, message", [
    (with_values(ingest__replicas=-1), "/ingest/replicas"),
    (with_values(serve__workers__replicas=-2), "/serve/workers/replicas"),
    (with_values(ingest__cluster__workers__maxReplicas=-1), "/ingest/cluster/workers/maxReplicas"),
    (with_values(replicaCount=3), "replicaCount"),
    (with_values(serve__bogus=True), "bogus"),
    (with_values(kafka__embedded__persistance={"size": "1Gi"}), "persistance"),
    ({"qdrant": EXTERNAL_QDRANT}, "/qdrant/external/apiKeySecret/name"),
    ({"kafka": {"embedded": {"enabled": False}, "external": {"bootstrap": "k:9093", "securityProtocol": "SASL_SSL"}}},
     "/kafka/external/sasl/existingSecret"),
    (with_values(registry__url="s3://bucket/models"), "/registry/credentialsSecret"),
    ({"kafka": {"embedded": {"enabled": False}}}, "/kafka/external/bootstrap"),
    (with_values(settings__store={"api_key": "plain-text"}), "/settings/store"),
    (with_values(security__runAsUser=0), "/security/runAsUser"),
    (with_values(serve__workers__resources={"limits": None}), "/serve/workers/resources"),  # null drops the default
    (with_values(serve__web__bogus=True), "bogus"),
    (with_values(serve__web__enabled="yes"), "/serve/web/enabled"),
    (with_values(serve__web__autoscaling={"max_replicas": 0}), "/serve/web/autoscaling/max_replicas"),
    (with_values(serve__httpPort=80), "/serve/httpPort"),  # the pods run as non-root
    (with_values(settings__serve={"web_enabled": True}), "/settings/serve"),  # the chart's: serve.web.enabled
    (with_values(settings__serve={"http_port": 9000}), "/settings/serve"),
])
def test_values_schema_rejects_with_a_message_naming_the_value(chart, values, message):
    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, values)
    text = str(excinfo.value)
    assert "schema" in text.lower() and message in text, text


def test_more_ingest_workers_than_partitions_fails_with_a_clear_message(chart):
    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, {"ingest": {"replicas": 5}, "kafka": {"partitions": 4}})
    assert "ingest.replicas (5) must not exceed kafka.partitions (4)" in str(excinfo.value)
    assert find(documents(render(chart, {"ingest": {"replicas": 4}, "kafka": {"partitions": 4}})), "Deployment")


@pytest.mark.parametrize("values, message", [
    ({"kafka": {"external": {"bootstrap": "k:9092"}}}, "not both"),
    ({"kafka": {"createTopics": False}}, "kafka.createTopics=false needs an external Kafka"),
    ({"serve": {"workers": {"replicas": 9, "maxReplicas": 4}}}, "serve.workers: need minReplicas <= replicas"),
    ({"trainer": {"enabled": True}}, "trainer.enabled needs trainer.dataClaim"),
    ({"serve": {"httpPort": 50051}}, "serve.httpPort (50051) is already the port of serve.grpcPort"),
    ({"serve": {"httpPort": 8080, "web": {"enabled": True}}}, "serve.httpPort (8080) is already the port of Ray's metrics"),
])
def test_template_checks_fail_with_a_clear_message(chart, values, message):
    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, values)
    assert message in str(excinfo.value)


def test_every_value_has_a_schema_entry():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            assert key in node.get("properties", {}), f"{path}{key} is not in values.schema.json"
            child = node["properties"][key]
            if isinstance(value, dict) and child.get("additionalProperties") is False:
                walk(value, child, f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


# --- secrets and pod security ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_no_secret_value_in_plain_text(rendered, name):
    docs = rendered[name]
    secrets = [base64.b64decode(v).decode() for d in find(docs, "Secret") for v in (d.get("data") or {}).values()]
    assert all(len(s) >= 32 for s in secrets)
    for doc in docs:
        if doc["kind"] == "Secret":
            assert "stringData" not in doc
            continue
        text = json.dumps(doc)
        assert not [s for s in secrets if s in text], f"{doc['kind']}/{doc['metadata']['name']} holds a secret"
    # A SASL username is no secret when the values give it literally (a Strimzi KafkaUser's name).
    literal_user = VALUE_SETS[name].get("kafka", {}).get("external", {}).get("sasl", {}).get("username")
    for where, spec, _ in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                if literal_user and env == {"name": "VIDSEARCH_BROKER__SASL_USERNAME", "value": literal_user}:
                    continue
                if SECRET_ENV.search(env["name"]) and env["name"] != "QDRANT__TELEMETRY_DISABLED":
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (where, env)
    for doc in find(docs, "ConfigMap"):
        # The helm test's script is code (it reads the key from the environment), not config.
        text = json.dumps({key: value for key, value in doc["data"].items() if not key.endswith(".py")})
        assert not re.search(r"api_key|sasl_password|password", text), doc["metadata"]["name"]


def test_the_api_key_is_generated_unless_a_secret_is_named(rendered):
    (secret,) = find(rendered["default"], "Secret", f"{FULLNAME}-keys")
    assert set(secret["data"]) == {"api-key", "qdrant-api-key"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    external = rendered["external-values"]
    assert not find(external, "Secret")
    env = {e["name"]: e for e in find(external, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VIDSEARCH_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vidsearch-grpc", "key": "token"}
    assert env["QDRANT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "qdrant-api-key", "key": "api-key"}
    assert env["VIDSEARCH_BROKER__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "vidsearch-kafka-user"


def test_notes_say_how_to_read_the_api_key(chart):
    notes = render(chart, {})["vidsearch/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} get secret {FULLNAME}-keys" in notes and "base64 -d" in notes


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_pod_is_non_root_locked_down_and_bounded(rendered, name):
    pods = list(pod_specs(rendered[name]))
    assert len(pods) >= 5
    for where, spec, long_running in pods:
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser", 1) != 0, where
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # Who may call the API is checked in test_only_the_pods_that_call_the_api_get_a_token.
        for container in spec.get("initContainers", []) + spec["containers"]:
            what = f"{where}/{container['name']}"
            security = container["securityContext"]
            assert security["capabilities"] == {"drop": ["ALL"]}, what
            assert security["allowPrivilegeEscalation"] is False and security["runAsNonRoot"] is True, what
            # Kafka's image writes its config at start; every other process runs read-only.
            assert security["readOnlyRootFilesystem"] is (not what.endswith("-kafka/kafka")), what
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (what, bound)
            if long_running and container in spec["containers"]:
                assert "livenessProbe" in container and "readinessProbe" in container, what


def autoscaling_heads(docs: list[dict[str, Any]]) -> set[str]:
    """The head pods KubeRay adds its autoscaler container to."""
    heads = set()
    for doc in docs + embedded_rayjobs(docs):
        if doc["apiVersion"] != "ray.io/v1":
            continue
        cluster = {"RayService": lambda s: s["rayClusterConfig"], "RayJob": lambda s: s["rayClusterSpec"],
                   "RayCluster": lambda s: s}[doc["kind"]](doc["spec"])
        if cluster.get("enableInTreeAutoscaling"):
            heads.add(f"{doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}/head")
    return heads


AUTOSCALING = {"default": {}, "serve": {"serve": {"rayAutoscaling": True}},
               "ingest": {"ingest": {"cluster": {"rayAutoscaling": True}}},
               "both": {"serve": {"rayAutoscaling": True}, "ingest": {"cluster": {"rayAutoscaling": True}}}}


@pytest.mark.parametrize("case", sorted(AUTOSCALING))
def test_only_the_pods_that_call_the_api_get_a_token(chart, case):
    """KubeRay's autoscaler runs in the head pod and reads the ServiceAccount token at
    start (it exits without one, and the head never gets Ready): the heads of autoscaling
    clusters mount it; the trainer's submitter gets it from its own ServiceAccount; no
    other pod has one."""
    values = _deep_merge(VALUE_SETS["embedded-values"], AUTOSCALING[case])
    docs = documents(render(chart, values))
    heads = autoscaling_heads(docs)
    assert len(heads) == {"default": 0, "serve": 1, "ingest": 1, "both": 2}[case]
    accounts = {d["metadata"]["name"]: d for d in find(docs, "ServiceAccount")}
    for where, spec, _ in pod_specs(docs):
        account = accounts.get(spec.get("serviceAccountName", "default"), {})
        mounted = spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True))
        expected = where in heads or spec.get("serviceAccountName", "").endswith("train-submitter")
        assert mounted is expected, where
    for where in heads:  # KubeRay binds its autoscaler Role to the head's ServiceAccount
        (spec,) = [s for w, s, _ in pod_specs(docs) if w == where]
        assert spec["serviceAccountName"] in accounts, where


def test_the_gpu_install_autoscaler_gets_its_token(rendered):
    """Issue 26, item 1: the README's GPU values turn the autoscaler on for both clusters."""
    docs = rendered["gpu-values"]
    assert autoscaling_heads(docs) == {f"RayService/{FULLNAME}/head", f"RayCluster/{FULLNAME}-ingest/head"}
    for where, spec, _ in pod_specs(docs):
        assert spec.get("automountServiceAccountToken") is (where in autoscaling_heads(docs)), where


def test_service_accounts_mount_no_token_unless_needed(rendered):
    for doc in find(rendered["embedded-values"], "ServiceAccount"):
        expected = doc["metadata"]["name"].endswith("train-submitter")
        assert doc["automountServiceAccountToken"] is expected, doc["metadata"]["name"]


def test_disruption_budgets_cover_the_scaled_groups_and_the_serving_head(rendered):
    budgets = {d["metadata"]["name"]: d["spec"] for d in find(rendered["default"], "PodDisruptionBudget")}
    assert set(budgets) == {f"{FULLNAME}-ingest-worker", f"{FULLNAME}-serve", f"{FULLNAME}-ingest",
                            f"{FULLNAME}-serve-head"}
    # Without GCS fault tolerance the head's eviction restarts every serving pod: a drain waits.
    assert budgets.pop(f"{FULLNAME}-serve-head")["maxUnavailable"] == 0
    assert all(spec["maxUnavailable"] == 1 for spec in budgets.values())


# --- the GPU cluster values ------------------------------------------------------------

def test_gpu_values_request_gpus_place_pods_and_autoscale(rendered):
    docs = rendered["gpu-values"]
    (service,) = find(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["replicas"], workers["maxReplicas"]) == (1, 2, 8)
    pod = workers["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and "podAntiAffinity" in pod["affinity"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"node-role/cpu": "true"} and "nvidia.com/gpu" not in json.dumps(head["containers"])
    (ingest,) = find(docs, "RayCluster")
    assert ingest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{FULLNAME}-settings")[0]["data"]["settings.yaml"])
    assert settings["serve"]["reranker_num_gpus"] == 0.5 and settings["ingest"]["encoder_num_gpus"] == 0.5
    job = embedded_rayjobs(docs)[0]
    assert "--gpu" in job["spec"]["entrypoint"] and "--workers 2" in job["spec"]["entrypoint"]


def test_network_policy_admits_grpc_only_from_labelled_clients(rendered, chart):
    policies = {d["metadata"]["name"]: d["spec"] for d in find(rendered["gpu-values"], "NetworkPolicy")}
    grpc = policies[f"{FULLNAME}-grpc-clients"]
    assert grpc["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "serve"
    (rule,) = grpc["ingress"]
    # gpu-values turns the search page on: its HTTP port is admitted from the same clients.
    assert rule["ports"] == [{"protocol": "TCP", "port": 50051}, {"protocol": "TCP", "port": 8000}]
    assert rule["from"][0]["podSelector"]["matchLabels"] == {"vidsearch-client": "true"}
    off = {d["metadata"]["name"]: d["spec"] for d in find(documents(render(chart, {"networkPolicy": {"enabled": True}})),
                                                          "NetworkPolicy")}
    assert off[f"{FULLNAME}-grpc-clients"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 50051}]
    internal = policies[f"{FULLNAME}-internal"]
    assert internal["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    # The helm test pod is a labelled client.
    (test_job,) = [d for d in find(rendered["gpu-values"], "Job") if d["metadata"]["name"].endswith("test-search")]
    assert test_job["spec"]["template"]["metadata"]["labels"]["vidsearch-client"] == "true"


def test_service_monitors_scrape_the_metrics_services(rendered):
    docs = rendered["gpu-values"]
    services = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in find(docs, "Service")
                if d["metadata"]["name"].endswith(("-ingest-metrics", "-ray-metrics"))}
    for monitor in find(docs, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        component = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        target = services[component]
        assert [p["name"] for p in target["spec"]["ports"]] == [e["port"] for e in monitor["spec"]["endpoints"]]
    worker = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9108} in worker["ports"]


# --- what the pods run -----------------------------------------------------------------

def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, a placeholder standing in for each Secret value."""
    env = {}
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "secret-from-kubernetes")
    return env


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_pods_settings_load_with_the_real_settings_code(rendered, name, tmp_path):
    """The mounted settings file plus each pod's environment are valid vidsearch settings,
    and they point every component at the same broker, store and registry."""
    from vidsearch.config import load_settings

    docs = rendered[name]
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(find(docs, "ConfigMap", f"{FULLNAME}-settings")[0]["data"]["settings.yaml"])
    seen = set()
    for where, spec, _ in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            env = pod_env(container)
            if env.get("VIDSEARCH_CONFIG") != "/etc/vidsearch/settings.yaml":
                continue
            env["VIDSEARCH_CONFIG"] = str(settings_file)
            settings = load_settings(env=env)
            seen.add((settings.broker.bootstrap, settings.store.url, settings.model.registry_root,
                      settings.broker.security_protocol))
            assert settings.ingest.metrics_host == "0.0.0.0", where  # probes and Prometheus reach it
    assert len(seen) == 1, seen
    values = VALUE_SETS[name]
    ((bootstrap, url, registry, _),) = seen
    assert registry == values.get("registry", {}).get("url") or registry == "/registry"
    assert url.startswith("http")


def vidsearch_commands(docs: list[dict[str, Any]]) -> list[list[str]]:
    lines = []
    for _, spec, _ in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container.get("command", [None])[0] == "vidsearch":
                lines.append([str(c) for c in container["command"]])
    for job in [d for d in docs if d["kind"] == "RayJob"] + embedded_rayjobs(docs):
        # The entrypoint runs in a shell: substitute the timestamp it computes.
        lines.append(shlex.split(job["spec"]["entrypoint"].replace("$(date -u +%Y%m%dT%H%M%S)", "20260101T000000")))
    return lines


def test_commands_the_chart_runs_exist_in_the_cli(rendered):
    import importlib

    from vidsearch.cli import COMMANDS, build_parser

    lines = vidsearch_commands(rendered["embedded-values"])
    assert {line[1] for line in lines} == {"ingest-worker", "models", "train"}
    for argv in lines:
        parser, sub = build_parser()
        module = importlib.import_module(COMMANDS[argv[1]][0])
        module.configure(sub.choices[argv[1]])
        parser.parse_args(argv[1:])  # SystemExit on an unknown command or option


def test_helm_test_hook_checks_the_release_service(rendered):
    """The hook runs files/helm-test.py (tests/test_helm_test_script.py runs it against a
    real Serve) with the release's settings, endpoints and key."""
    docs = rendered["default"]
    (job,) = [d for d in find(docs, "Job") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["command"]
    assert command[:2] == ["python", "/etc/vidsearch-test/helm-test.py"]
    assert command[command.index("--address") + 1] == f"{FULLNAME}-grpc:50051"
    env = pod_env(container)
    assert env["VIDSEARCH_API_KEY"] == "secret-from-kubernetes" and env["VIDSEARCH_CONFIG"] == "/etc/vidsearch/settings.yaml"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/vidsearch-test"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (script,) = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert script["data"]["helm-test.py"] == (CHART / "files" / "helm-test.py").read_text()
    import importlib.util

    spec = importlib.util.spec_from_file_location("helm_test_script", CHART / "files" / "helm-test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(command[2:])  # SystemExit on an option it lacks
    assert (args.query, args.timeout) == (VALUE_SETS["default"].get("helmTest", {}).get("query", "a red circle moves left"), 60)
    assert job["spec"]["backoffLimit"] == 0


@pytest.mark.parametrize("missing, message", [
    ({"image": {"repository": ""}}, "image.repository is required: no public vidsearch image exists"),
    ({"registry": {"pvc": {"storageClass": ""}}}, "registry.pvc.storageClass is required for the ReadWriteMany registry"),
    ({"videos": {"existingClaim": ""}}, "no video source: set videos.existingClaim"),
])
def test_what_a_user_must_provide_fails_early_with_one_line(chart, missing, message):
    """Issue 26, item 2: a default install rendered, then sat: a public image that does not
    exist, a ReadWriteMany claim the default classes cannot provision, nothing to ingest."""
    with pytest.raises(helm_python.HelmError) as excinfo:
        render(chart, missing)
    text = str(excinfo.value)
    assert message in text and "\n" not in text.strip(), text
    with pytest.raises(helm_python.HelmError):
        render(chart, {}, base={})  # the chart's defaults alone: the first one missing
    for enough in ({"registry": {"pvc": {"storageClass": "", "existingClaim": "models"}}},
                   {"registry": {"pvc": {"storageClass": "", "accessModes": ["ReadWriteOnce"]}}},
                   {"registry": {"pvc": {"storageClass": ""}, "url": "s3://b/m", "credentialsSecret": "s3"}},
                   {"videos": {"existingClaim": "", "allowedSchemes": ["s3"], "allowedPrefixes": ["s3://media/"]}}):
        assert find(documents(render(chart, enough)), "RayService"), enough


def test_trainer_shares_the_registry_and_schedules_the_rayjob(rendered):
    docs = rendered["embedded-values"]
    (cron,) = find(docs, "CronJob")
    assert cron["spec"]["schedule"] == "0 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    submit = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert submit["command"][:2] == ["python", "/etc/vidsearch-train-submit/train-submit.py"]
    (role,) = find(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    (installed,) = find(docs, "RayJob")
    assert installed["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
    (scheduled,) = embedded_rayjobs(docs)
    assert scheduled["metadata"]["generateName"] == f"{FULLNAME}-train-"
    assert "shutdownAfterJobFinishes" not in scheduled["spec"]  # deletionRules instead (tests/test_helm_behaviour.py)
    for group, template in ray_pod_templates(scheduled):
        if group == "submitter":
            continue
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/registry"]["name"] == "registry" and mounts["/runs"]["subPath"] == "runs"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in template["spec"]["volumes"]}
        assert claims["registry"] == f"{FULLNAME}-registry" and claims["train-data"] == "vidsearch-train-data"
    run = yaml.safe_load(find(docs, "ConfigMap", f"{FULLNAME}-train")[0]["data"]["run.yaml"])
    from vidsearch.services.trainer.config import load_run_config

    assert load_run_config(_write(run)).data.kind == "synth"


def _write(run: dict[str, Any]) -> str:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with handle:
        yaml.safe_dump(run, handle)
    return handle.name


def test_ingest_workers_drive_the_ingest_ray_cluster(rendered):
    docs = rendered["default"]
    (deployment,) = find(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    env = pod_env(spec["containers"][0])
    (cluster,) = find(docs, "RayCluster")
    assert env["RAY_ADDRESS"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    assert spec["initContainers"][0]["command"] == ["vidsearch", "models", "install-shipped"]
    assert spec["terminationGracePeriodSeconds"] >= 30


# --- the chart README ------------------------------------------------------------------

def value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Documented value keys: leaves, and maps/lists documented as one value."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("resources", "runConfig", "autoscaling", "clientLabels",
                                                              "producerLabels", "operatorNamespaceLabels",
                                                              "monitoringNamespaceLabels", "affinity",
                                                              "nodeSelector", "requests", "limits"):
            paths += value_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_chart_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [path for path in value_paths(values) if path not in documented]
    assert not missing, f"helm/vidsearch/README.md lacks: {missing}"
    stale = [path for path in documented if not _has_path(values, path)]
    assert not stale, f"helm/vidsearch/README.md documents unknown values: {stale}"


def _has_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# --- the top-level README's "Deploy on Kubernetes" ------------------------------------

def readme_cluster_lines() -> list[str]:
    from test_readme import code_blocks, shell_lines

    text = (ROOT / "README.md").read_text()
    section = text.split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in code_blocks("bash"):
        if block in section:
            lines += [line for line in shell_lines(block) if line.startswith(("helm ", "kubectl "))]
    return lines


def helm_values(argv: list[str], release_values: dict[str, Any]) -> dict[str, Any]:
    """The values a `helm install|upgrade` line installs (-f files, then --set, as Helm merges them)."""
    values = copy.deepcopy(release_values) if "--reuse-values" in argv else {}
    layers = []
    for flag, arg in zip(argv, argv[1:]):
        if flag in ("-f", "--values"):
            layers.append(yaml.safe_load((ROOT / arg).read_text()))
        elif flag == "--set":
            layers.append(helm_python.parse_set_string(arg))
    for layer in layers:
        values = _deep_merge(values, layer)
    return values


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_readme_kubernetes_commands_render_and_name_real_objects(chart):
    """What can run without a cluster runs: each helm install/upgrade line renders with its
    values; each kubectl line names an object the release has; each `vidsearch` command
    run in a pod parses with the real CLI parser."""
    import importlib

    from vidsearch.cli import COMMANDS, build_parser

    lines = readme_cluster_lines()
    assert any(line.startswith("helm install") for line in lines) and any("helm test" in line for line in lines)
    release_values: dict[str, Any] = {}
    docs: list[dict[str, Any]] = []
    for line in lines:
        argv = shlex.split(line.split(" | ")[0])
        namespace = argv[argv.index("-n") + 1]
        if argv[:2] in (["helm", "install"], ["helm", "upgrade"]):
            release, path = argv[2], argv[3]
            assert (ROOT / path).resolve() == CHART
            release_values = helm_values(argv, release_values)
            docs = documents(chart.render(copy.deepcopy(release_values), name=release, namespace=namespace))
            assert find(docs, "RayService"), line
        elif argv[:2] == ["helm", "test"]:
            assert any(d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test" for d in docs)
        elif argv[0] == "kubectl":
            verb, rest = argv[3], argv[4:]
            kinds = {"rayservice": "RayService", "secret": "Secret", "configmap": "ConfigMap", "deploy": "Deployment"}
            if verb == "get":
                target = find(docs, kinds[rest[0]], rest[1])
                assert target, line
                if rest[0] == "secret":
                    key = re.search(r"\{\.data\.([\w-]+)\}", line).group(1)
                    assert key in target[0]["data"], line
                if rest[0] == "configmap":
                    key = re.search(r"\{\.data\.([\w\\.-]+)\}", line).group(1).replace("\\", "")
                    assert key in target[0]["data"], line
            elif verb == "exec":
                kind, name = rest[0].split("/")
                assert find(docs, kinds[kind], name), line
                command = argv[argv.index("--") + 1:]
                assert command[0] == "vidsearch"
                parser, sub = build_parser()
                module = importlib.import_module(COMMANDS[command[1]][0])
                module.configure(sub.choices[command[1]])
                parser.parse_args(command[1:])
            elif verb == "create":
                assert rest == ["-f", "-"]  # the RayJob from the previous command's ConfigMap
            else:
                pytest.fail(f"unchecked kubectl line: {line}")


def test_field_list_derivation_prunes_embedded_core_objects():
    """tests/kuberay/derive_fields.py on a small CRD-shaped schema: KubeRay's own fields are
    listed with types and enums, an embedded pod template becomes one `core` entry."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("derive_fields", ROOT / "tests" / "kuberay" / "derive_fields.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    schema = {"type": "object", "properties": {
        "mode": {"type": "string", "enum": ["A", "B"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "groups": {"type": "array", "items": {"type": "object", "properties": {
            "template": {"type": "object", "properties": {
                "metadata": {"type": "object"},
                "spec": {"type": "object", "properties": {"containers": {"type": "array"}}}}}}}}}}
    paths: dict[str, Any] = {}
    derive.walk(schema, "spec", paths)
    assert paths == {"spec": {"type": "object"}, "spec.mode": {"type": "string", "enum": ["A", "B"]},
                     "spec.labels": {"type": "object"}, "spec.labels.*": {"type": "string"},
                     "spec.groups": {"type": "array"}, "spec.groups[]": {"type": "object"},
                     "spec.groups[].template": {"core": "PodTemplateSpec"}}
    recorded = json.loads((ROOT / "tests" / "kuberay" / "ray.io-v1-fields.json").read_text())
    assert recorded["kuberay_version"] and set(recorded["kinds"]) == {"RayCluster", "RayJob", "RayService"}


def test_packaged_chart_carries_the_serve_config_file(tmp_path):
    """`helm package` follows files/serve_config.yaml's link: a packaged chart holds the file."""
    import tarfile

    archive = helm_python.package(str(CHART), destination=str(tmp_path))
    with tarfile.open(archive) as tar:
        member = tar.getmember("vidsearch/files/serve_config.yaml")
        assert member.isfile()
        assert tar.extractfile(member).read() == (ROOT / "deploy" / "serve_config.yaml").read_bytes()
