"""deploy/serve_config.yaml is what `serve run`, `serve deploy` and a KubeRay RayService
read: it must pass Ray Serve's own schema, and every path in it must import and build."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vidsearch.config import ServeSettings

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"


@pytest.fixture(scope="module")
def config():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


def test_config_passes_serves_schema(config):
    defaults = ServeSettings()
    apps = {app.name: app for app in config.applications}
    # The ingress finds the reranker, the page finds the ingress, and clients find both, by these names.
    assert set(apps) == {defaults.app_name, defaults.reranker_app_name, defaults.web_app_name}
    assert apps[defaults.reranker_app_name].route_prefix is None  # internal only
    assert apps[defaults.web_app_name].route_prefix == "/"
    assert config.grpc_options.port == defaults.grpc_port
    assert config.http_options.host == "127.0.0.1"
    assert config.http_options.port == defaults.http_port
    for app in apps.values():
        (deployment,) = app.deployments
        assert deployment.autoscaling_config["min_replicas"] >= 1
        assert deployment.autoscaling_config["max_replicas"] > deployment.autoscaling_config["min_replicas"]


def test_grpc_servicer_function_imports(config):
    from ray._common.utils import import_attr

    from vidsearch.services.query.app import GRPC_SERVICER_FUNCTION

    assert config.grpc_options.grpc_servicer_functions == [GRPC_SERVICER_FUNCTION]
    assert callable(import_attr(GRPC_SERVICER_FUNCTION))


def test_import_paths_import_and_build_the_named_deployments(config, monkeypatch, tmp_path):
    """What the Serve controller does with each application: import the builder, call it
    with ``args``, build the application; the config's deployment names must exist in it."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    monkeypatch.chdir(tmp_path)  # builders resolve relative store / registry paths
    for app in config.applications:
        builder = import_attr(app.import_path)
        application = call_user_app_builder_with_args_if_necessary(builder, app.args)
        built = build_app(application, name=app.name)
        names = {d.name for d in built.deployments}
        assert {d.name for d in app.deployments} <= names, (app.name, names)
        assert built.ingress_deployment_name in names


def test_builders_read_a_settings_file_from_args(tmp_path, monkeypatch):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from vidsearch.services.query.app import build_query_app

    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text("store:\n  path: ./elsewhere\nserve:\n  beta: 0.25\n")
    monkeypatch.chdir(tmp_path)
    application = call_user_app_builder_with_args_if_necessary(build_query_app, {"config": str(settings_file)})
    (deployment,) = build_app(application, name="vidsearch").deployments
    (settings,) = deployment.init_args
    assert settings.serve.beta == 0.25
    assert settings.store.path == str((tmp_path / "elsewhere").resolve())  # absolute for the replicas
