"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader, installed into a temp dir from
npm) against the running service: Search with a filter, GetVideo, the typed summary
fields, and bad inputs with their status codes. Also runs the README's Node snippet.
Skipped where node or npm is missing (a CI machine has both)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from query_support import query_data, query_service  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("@grpc/grpc-js@1.14.7", "@grpc/proto-loader@0.7.15")
# grpc status codes
INVALID_ARGUMENT, NOT_FOUND = 3, 5

pytestmark = pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="node and npm are needed")


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("node-client")
    result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(where),
                             *PACKAGES], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return where / "node_modules"


def run_node(script: Path, node_modules: Path, service) -> dict:
    env = {**os.environ, "NODE_PATH": str(node_modules), "PROTO_DIR": str(ROOT / "protos"),
           "VIDSEARCH_ADDRESS": service.address, "VIDSEARCH_APP": service.settings.serve.app_name}
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_node_client_search_get_video_and_bad_inputs(node_modules, query_service):
    out = run_node(ROOT / "tests" / "node" / "search_client.js", node_modules, query_service)
    data = query_service.data
    sports = {v for v, m in data.metadata.items() if m["category"] == "sports"}
    assert isinstance(out["search"], list), out
    found = {r["video_id"] for r in out["search"]}
    assert found and found <= sports  # the filter was applied, not dropped
    for result in out["search"]:
        meta = data.metadata[result["video_id"]]
        assert result["title"] == meta["title"] and result["tags"] == meta["tags"]
        assert result["duration_s"] == pytest.approx(data.durations[result["video_id"]])
        assert result["notice"] == ""
    first = out["search"][0]["video_id"]
    assert out["get_video"]["video_id"] == first and out["get_video"]["title"] == data.metadata[first]["title"]
    assert out["get_video"]["uri"].startswith("file:///")
    bad = out["bad"]
    assert bad["top_k"]["code"] == INVALID_ARGUMENT and bad["top_k"]["details"].startswith("top_k")
    assert bad["unknown_field"]["code"] == INVALID_ARGUMENT and "unknown filter field" in bad["unknown_field"]["details"]
    assert bad["empty_value"]["code"] == INVALID_ARGUMENT and "filters[0].equals" in bad["empty_value"]["details"]
    assert "stringValue" in bad["empty_value"]["details"]
    assert bad["missing_video"]["code"] == NOT_FOUND


def test_readme_node_snippet_runs(node_modules, query_service, tmp_path):
    (snippet,) = re.findall(r"```js\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    script = tmp_path / "readme.js"
    script.write_text(snippet)
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    # The snippet is written for the default address and app; point it at this service.
    text = snippet.replace('"127.0.0.1:50051"', json.dumps(query_service.address)) \
                  .replace('"protos"', json.dumps(str(ROOT / "protos"))) \
                  .replace('"vidsearch")', json.dumps(query_service.settings.serve.app_name) + ")")
    script.write_text(text)
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines and all(line.split("\t")[0] in query_service.data.metadata for line in lines)
