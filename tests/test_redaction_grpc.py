"""The gRPC surface of the one redaction: errors the query service returns that echo a
request's filter, video id or metadata never hand the client a credential, and still
name the field and what was wrong. Real Serve apps over videos ingested through the real
broker (tests/query_support.py); the other surfaces are tests/test_redaction_surfaces.py."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from vidsearch.services.query.deadline import DEADLINE_METADATA
from vidsearch.v1 import search_pb2

from query_support import query_data, query_service, rpc_error  # noqa: F401 - fixtures

SECRET = "pwgrpc9f8e7d"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _value(v: object) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(v, out)
    return out


def _search(service, *, filters=(), metadata=None):
    client = service.client()
    return lambda: client.search("a clip", filters=list(filters), metadata=metadata)


# (name, the call, the status code, what the details must still say, the redacted form shown)
CASES = {
    "unknown-filter-field": (
        lambda s: _search(s, filters=[search_pb2.FieldFilter(field=f"api_key={SECRET}", equals=_value("x"))]),
        INVALID, "filters[0].field: unknown filter field", "'api_key=<redacted>'"),
    "datetime-bound-url": (
        lambda s: _search(s, filters=[search_pb2.FieldFilter(field="ingested_at", range=search_pb2.Range(
            gte=_value(f"https://user:{SECRET}@h.example/x?token={SECRET}")))]),
        INVALID, "filters[0].range", "'https://<redacted>@h.example/x?token=<redacted>' is not an RFC3339 datetime"),
    "deadline-bearer": (
        lambda s: _search(s, metadata=[("application", s.settings.serve.app_name),
                                       (DEADLINE_METADATA, f"Bearer {SECRET}")]),
        INVALID, f"{DEADLINE_METADATA}: must be a number of milliseconds", "'Bearer <redacted>'"),
    "get-video-uri": (
        lambda s: (lambda: s.client().get_video(f"/videos/a.mp4?X-Amz-Signature={SECRET}")),
        grpc.StatusCode.NOT_FOUND, "video_id: no video", "'/videos/a.mp4?X-Amz-Signature=<redacted>'"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grpc_errors_never_echo_a_credential(query_service, name):
    make, code, says, shown = CASES[name]
    error = rpc_error(make(query_service))
    details = error.details() or ""
    assert error.code() == code, (error.code(), details)
    assert SECRET not in details, details
    assert says in details and shown in details, details
