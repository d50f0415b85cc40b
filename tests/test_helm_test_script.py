"""The chart's `helm test` script (helm/vidsearch/files/helm-test.py) against a real Ray
Serve running the query and reranker applications over a real ingested index
(tests/query_support.py): it passes when Serve serves, searches only when the live index
has points, and fails with one line otherwise."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from query_support import free_port, query_data, query_service  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "helm" / "vidsearch" / "files" / "helm-test.py"


@pytest.fixture(scope="module")
def helm_test():
    spec = importlib.util.spec_from_file_location("helm_test_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_serving_release_with_videos_passes_with_a_real_search(helm_test, query_service):
    line = helm_test.check(query_service.settings, query_service.address, "a red circle moves left", 30)
    assert "found 3 of" in line and query_service.settings.store.alias not in line.split("found")[0], line


def test_a_fresh_install_without_an_index_passes_on_serves_health(helm_test, query_service):
    """Before the first ingest the alias names no collection: the search (which would
    answer FAILED_PRECONDITION) is not sent, so `helm test` passes on a fresh install."""
    settings = query_service.settings
    fresh = settings.model_copy(update={"store": settings.store.model_copy(update={"alias": "never-ingested"})})
    assert helm_test.live_points(fresh) == 0
    line = helm_test.check(fresh, query_service.address, "a red circle moves left", 30)
    assert "has no videos yet, so no search was sent" in line
    assert settings.serve.app_name in line


def test_a_missing_application_or_no_serve_fails_with_one_line(helm_test, query_service):
    settings = query_service.settings
    other = settings.model_copy(update={"serve": settings.serve.model_copy(update={"app_name": "not-deployed"})})
    with pytest.raises(RuntimeError, match=r"routes .*, not 'not-deployed'"):
        helm_test.check(other, query_service.address, "a red circle moves left", 30)
    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=rf"Serve's gRPC health check at {nowhere} failed: UNAVAILABLE") as excinfo:
        helm_test.check(settings, nowhere, "a red circle moves left", 5)
    assert "\n" not in str(excinfo.value)
