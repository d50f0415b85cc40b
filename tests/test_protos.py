"""The generated gRPC code must match the .proto files it was built from."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _codegen():
    spec = importlib.util.spec_from_file_location("codegen", REPO / "protos" / "codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    codegen = _codegen()
    fresh = codegen.generate(out_dir=tmp_path)
    assert fresh, "no .proto files found"
    for path in fresh:
        installed = codegen.PROTO_ROOT / path.relative_to(tmp_path)
        assert installed.exists(), f"{installed} missing: run `make install` to generate the gRPC code"
        assert installed.read_bytes() == path.read_bytes(), (
            f"{installed.name} is stale relative to its .proto: run `make install`")


def test_generated_module_matches_api() -> None:
    from vidsearch.v1 import search_pb2, search_pb2_grpc

    service = search_pb2.DESCRIPTOR.services_by_name["SearchService"]
    assert {m.name for m in service.methods} == {"Search", "GetVideo"}
    assert hasattr(search_pb2_grpc, "add_SearchServiceServicer_to_server")
    request = search_pb2.SearchRequest(query="a red ball", top_k=5)
    assert search_pb2.SearchRequest.FromString(request.SerializeToString()).top_k == 5


def test_staleness_is_detected(tmp_path: Path) -> None:
    """Editing a .proto without regenerating must make the comparison fail."""
    codegen = _codegen()
    root = tmp_path / "protos"
    (root / "vidsearch" / "v1").mkdir(parents=True)
    proto = (codegen.PROTO_ROOT / "vidsearch" / "v1" / "search.proto").read_text()
    (root / "vidsearch" / "v1" / "search.proto").write_text(
        proto.replace("message GetVideoRequest {", "message Extra { string x = 1; }\nmessage GetVideoRequest {"))
    out = tmp_path / "out"
    out.mkdir()
    edited = codegen.generate(out_dir=out, root=root)
    installed = codegen.PROTO_ROOT / "vidsearch" / "v1" / "search_pb2.py"
    changed = next(p for p in edited if p.name == "search_pb2.py")
    assert changed.read_bytes() != installed.read_bytes()


def test_broken_proto_fails_the_build(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "bad.proto").write_text('syntax = "proto3"; message {')
    with pytest.raises(RuntimeError, match="protoc failed"):
        _codegen().generate(out_dir=tmp_path, root=root)
