"""The search page's HTTP API end to end: Ray Serve running the ingress, the reranker
and the web application over the videos of ``query_data`` (ingested through the
real broker by a real worker).

Every endpoint and every bad input: the page and its assets, ``/api/search``
(answers equal to gRPC's for the same request, every invalid parameter a 400 that
names the field), ``/media`` (range requests, path traversal, ids outside the
index, uris outside the allowlist), ``/thumb``, the API key, and 503 without a
live index.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from vidsearch.services.web.deployment import DEPLOYMENT_NAME, KEY_COOKIE, OPEN_RANGE_CAP
from vidsearch.v1 import search_pb2

from query_support import (Client, free_port, query_data, serve_settings, small_options,  # noqa: F401
                           wait_until)
from web_support import Http, deploy_web, web_settings

API_KEY = "web-s3cret"


class WebService:
    def __init__(self, settings, data, http_port: int) -> None:
        self.settings = settings
        self.data = data
        self.http = Http(http_port)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")
        self.grpc = Client(self.channel, settings.serve.app_name)

    def at(self, prefix: str) -> Http:
        return Http(self.http.port, prefix)

    def video_file(self, video_id: str) -> Path:
        return self.data.video_root / f"{video_id}.mp4"


@pytest.fixture(scope="module")
def web(query_data, tmp_path_factory):
    """The main stack (page at /) plus three more web apps deployed together:
    /no-index (its own ingress over an alias that points nowhere), /keyed (its own
    ingress, both with serve.api_key) and /narrow (the main ingress, but a decode
    allowlist that admits none of the indexed files)."""
    from ray import serve

    from vidsearch.services.query.deploy import deploy

    http_port = free_port()
    settings = web_settings(serve_settings(query_data, free_port()))
    deploy(settings, ingress_options=small_options(), reranker_options=small_options(),
           web_options=small_options(), http_port=http_port)
    service = WebService(settings, query_data, http_port)

    port = settings.serve.grpc_port
    empty = web_settings(serve_settings(query_data, port))
    empty = empty.model_copy(update={"store": empty.store.model_copy(update={"alias": "nothing_here"}),
                                     "serve": empty.serve.model_copy(update={"web_app_name": "web-no-index"})})
    keyed = web_settings(serve_settings(query_data, port, api_key=API_KEY), web_app_name="web-keyed")
    elsewhere = tmp_path_factory.mktemp("not-the-videos")
    narrow = settings.model_copy(update={
        "decode": settings.decode.model_copy(update={"allowed_prefixes": [str(elsewhere)]}),
        "serve": settings.serve.model_copy(update={"web_app_name": "web-narrow"})})
    deploy_web((empty, "/no-index", True), (keyed, "/keyed", True), (narrow, "/narrow", False))
    try:
        wait_until(lambda: service.http.search({"q": "warm up", "top_k": 1}).status == 200, 180,
                   "the first HTTP search to answer")
        yield service
    finally:
        service.channel.close()
        serve.shutdown()


def without_timings(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings"}


# --------------------------------------------------------------------------- page

def test_page_is_served_with_its_assets_and_no_outside_urls(web):
    page = web.http.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    assert '<base href="/">' in html and 'id="search-form"' in html and 'id="q"' in html
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # Every reference is relative to this server: no CDN, no absolute URL.
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all("://" not in ref and not ref.startswith("//") for ref in refs), refs
    script = web.http.get("/static/search.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    assert b"://" not in script.body
    style = web.http.get("/static/style.css")
    assert style.status == 200 and style.headers["content-type"].startswith("text/css")
    assert b"url(" not in style.body and b"@import" not in style.body
    assert web.http.get("/static/missing.js").status == 404
    assert web.http.get("/static/../deployment.py").status == 404


def test_page_mounted_under_a_prefix_links_relative_to_it(web):
    page = web.at("/narrow").get("/")
    assert page.status == 200 and '<base href="/narrow/">' in page.body.decode()
    assert web.at("/narrow").get("/static/search.js").status == 200


def test_static_files_are_package_data():
    """A wheel must carry the page: pyproject's package-data names the static files."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["vidsearch.services.web"]
    shipped = {p.name for pattern in patterns for p in (root / "services" / "web").glob(pattern)}
    assert {"index.html", "style.css", "search.js"} <= shipped


# --------------------------------------------------------------------------- /api/search

def test_api_search_answers_exactly_what_grpc_answers(web):
    query = "a red clip with a moving square"
    reply = web.http.search({"q": query, "top_k": 5})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    grpc_body = json_format.MessageToDict(web.grpc.search(query, top_k=5), preserving_proto_field_name=True,
                                          always_print_fields_with_no_presence=True)
    assert without_timings(body) == without_timings(grpc_body)
    assert body["model_version"] == web.data.model_version and body["reranked"] is True
    assert set(body["timings"]) == {"encode_ms", "recall_ms", "rerank_ms", "total_ms"}
    first = body["results"][0]
    assert {"video_id", "score", "recall_score", "rerank_score", "best_moment_seconds", "payload"} <= set(first)
    assert first["payload"]["uri"].startswith("file://")


def test_api_search_options_and_filters_match_grpc(web):
    query = "a green clip"
    cases = [
        ({"rerank": "false", "top_k": 4}, {"rerank": False, "top_k": 4}),
        ({"filter": ["tags=red"]}, {"filters": [search_pb2.FieldFilter(field="tags", equals=_value("red"))]}),
        ({"filter": ["tags=red,blue", "duration_s>=2", "duration_s<=3.5"], "beta": "0.2", "recall_k": 12},
         {"beta": 0.2, "recall_k": 12, "filters": [
             search_pb2.FieldFilter(field="tags", any_of=search_pb2.AnyOf(values=[_value("red"), _value("blue")])),
             search_pb2.FieldFilter(field="duration_s", range=search_pb2.Range(gte=_value(2))),
             search_pb2.FieldFilter(field="duration_s", range=search_pb2.Range(lte=_value(3.5)))]}),
    ]
    for params, fields in cases:
        reply = web.http.search({"q": query, **params})
        assert reply.status == 200, (params, reply.body)
        expected = json_format.MessageToDict(web.grpc.search(query, **fields), preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        assert without_timings(reply.json()) == without_timings(expected), params
    filtered = web.http.search({"q": query, "filter": ["tags=red", "duration_s>=2"]}).json()
    assert filtered["results"]
    for hit in filtered["results"]:
        assert "red" in hit["payload"]["metadata"]["tags"] and hit["payload"]["duration_s"] >= 2


def _value(v):
    from google.protobuf import struct_pb2

    out = struct_pb2.Value()
    json_format.ParseDict(v, out)
    return out


@pytest.mark.parametrize("params, field, parameter", [
    ({}, "query", "q"),
    ({"q": ""}, "query", "q"),
    ({"q": " \t "}, "query", "q"),
    ({"q": "x" * 513}, "query", "q"),
    ({"q": "a", "top_k": "0.5"}, "top_k", "top_k"),
    ({"q": "a", "top_k": "-3"}, "top_k", "top_k"),
    ({"q": "a", "top_k": "101"}, "top_k", "top_k"),
    ({"q": "a", "top_k": "20", "recall_k": "10"}, "recall_k", "recall_k"),
    ({"q": "a", "recall_k": "1001"}, "recall_k", "recall_k"),
    ({"q": "a", "beta": "1.5"}, "beta", "beta"),
    ({"q": "a", "beta": "nan"}, "beta", "beta"),
    ({"q": "a", "rerank": "sometimes"}, "rerank", "rerank"),
    ({"q": "a", "filter": "colour=red"}, "filters[0].field", "filter"),
    ({"q": "a", "filter": ["tags=red", "duration_s=2"]}, "filters[1].equals", "filter"),
    ({"q": "a", "filter": "duration_s>=soon"}, "filters[0].range", "filter"),
    ({"q": "a", "filter": "just words"}, "filters[0]", "filter"),
    ({"q": "a", "colour": "red"}, "colour", "colour"),
    ({"q": ["a", "b"]}, "query", "q"),
])
def test_bad_search_parameters_are_400_naming_the_field(web, params, field, parameter):
    reply = web.http.search(params)
    assert reply.status == 400, reply.body
    error = reply.error
    assert error["code"] == "INVALID_ARGUMENT" and error["field"] == field and error["parameter"] == parameter
    assert error["message"].startswith(f"{field}:"), error


def test_same_limits_as_grpc(web):
    for top_k in (100, 101):
        params = {"q": "a clip", "top_k": top_k, "recall_k": 200}
        http_status = web.http.search(params).status
        try:
            web.grpc.search("a clip", top_k=top_k, recall_k=200)
            grpc_ok = True
        except grpc.RpcError:
            grpc_ok = False
        assert (http_status == 200) == grpc_ok, top_k


# --------------------------------------------------------------------------- no index, keys

def test_without_a_live_index_every_endpoint_is_503_with_the_reason(web):
    http = web.at("/no-index")
    assert http.get("/").status == 200  # the page itself works and explains the 503
    reply = http.search({"q": "a red clip"})
    assert reply.status == 503 and reply.error["code"] == "FAILED_PRECONDITION"
    assert "no live index" in reply.error["message"] and "nothing_here" in reply.error["message"]
    assert reply.headers.get("retry-after")
    for path in ("/media/vid-01", "/thumb/vid-01?t=0.5"):
        reply = http.request(path)
        assert reply.status == 503 and "no live index" in reply.error["message"], path
    # Validation still comes first.
    assert http.search({"q": " "}).status == 400


def test_api_key_guards_search_media_and_thumbnails(web):
    http = web.at("/keyed")
    paths = ["/api/search?q=a+red+clip&top_k=2", "/media/vid-01", "/thumb/vid-01?t=0.5"]
    for path in paths:
        missing = http.request(path)
        assert missing.status == 401 and missing.error["code"] == "UNAUTHENTICATED", path
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.error["message"].startswith("authorization:")
        assert http.request(path, headers={"Authorization": "Bearer wrong"}).status == 401
        assert http.request(path, headers={"Authorization": f"Basic {API_KEY}"}).status == 401
        assert http.request(path, headers={"Cookie": f"{KEY_COOKIE}=wrong"}).status == 401
        assert http.request(path, headers={"Authorization": f"Bearer {API_KEY}"}).status == 200, path
        # The page's cookie (what <img> and <video> carry).
        assert http.request(path, headers={"Cookie": f"{KEY_COOKIE}={API_KEY}"}).status == 200, path
    # Checked before validation: an unauthenticated caller learns nothing about the API.
    assert http.search({"q": " "}).status == 401
    # The page and its assets are public: they hold no data and ask for the key.
    assert http.get("/").status == 200 and http.get("/static/search.js").status == 200
    # The main app has no key.
    assert web.http.search({"q": "a red clip", "top_k": 1}).status == 200


# --------------------------------------------------------------------------- /media

def test_media_streams_the_source_file_with_ranges(web):
    data = web.video_file("vid-03").read_bytes()
    size = len(data)
    whole = web.http.request("/media/vid-03")
    assert whole.status == 200 and whole.body == data
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == size

    part = web.http.request("/media/vid-03", headers={"Range": "bytes=100-199"})
    assert part.status == 206 and part.body == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}" and part.headers["content-length"] == "100"
    tail = web.http.request("/media/vid-03", headers={"Range": "bytes=-64"})
    assert tail.status == 206 and tail.body == data[-64:]
    rest = web.http.request("/media/vid-03", headers={"Range": f"bytes={size - 10}-"})
    assert rest.status == 206 and rest.body == data[-10:]
    assert size < OPEN_RANGE_CAP  # so an open range gets the rest
    head = web.http.request("/media/vid-03", method="HEAD", headers={"Range": "bytes=0-9"})
    assert head.status == 206 and head.body == b"" and head.headers["content-range"] == f"bytes 0-9/{size}"


@pytest.mark.parametrize("header", ["bytes={size}-", "bytes={size}-{end}", "bytes=-0"])
def test_a_range_past_the_end_is_416(web, header):
    size = web.video_file("vid-03").stat().st_size
    reply = web.http.request("/media/vid-03", headers={"Range": header.format(size=size, end=size + 100)})
    assert reply.status == 416, reply.body
    assert reply.headers["content-range"] == f"bytes */{size}"
    assert reply.error["field"] == "range"


def test_media_of_a_video_not_in_the_index_is_404(web):
    reply = web.http.request("/media/vid-99")
    assert reply.status == 404 and reply.error["message"].startswith("video_id:") and "vid-99" in reply.error["message"]


@pytest.mark.parametrize("path", [
    "/media/../../../../etc/passwd",
    "/media/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/media/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/media/vid-01/../../../../etc/passwd",
    "/media/file:%2F%2F%2Fetc%2Fpasswd",
    "/media//etc/passwd",
    "/media/%2Fetc%2Fpasswd",
])
def test_path_traversal_through_media_reads_nothing(web, path):
    reply = web.http.request(path)
    assert reply.status in (400, 404), (path, reply.status)
    assert b"root:" not in reply.body


def test_media_refuses_a_stored_uri_outside_the_decode_allowlist(web):
    narrow = web.at("/narrow")
    for path in ("/media/vid-01", "/thumb/vid-01?t=0.5"):
        reply = narrow.request(path)
        assert reply.status == 403, (path, reply.body)
        assert reply.error["code"] == "PERMISSION_DENIED" and "not_allowed" in reply.error["message"]
        assert str(web.data.video_root) not in reply.error["message"]  # no server paths in answers
    # Search itself is unaffected: it never reads the files.
    assert narrow.search({"q": "a red clip", "top_k": 1}).status == 200


def test_media_rejects_unknown_parameters_and_blank_ids(web):
    assert web.http.request("/media/vid-01?download=1").error["field"] == "download"
    assert web.http.request("/media/%20").status == 400


# --------------------------------------------------------------------------- /thumb

def test_thumbnail_is_the_frame_at_t_and_cached(web):
    from PIL import Image
    from ray import serve

    from vidsearch.video import decode_frame_at

    reply = web.http.request("/thumb/vid-02?t=1.0")
    assert reply.status == 200 and reply.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(reply.body))
    assert image.format == "JPEG" and image.size == (48, 32)
    frame = decode_frame_at(str(web.video_file("vid-02")), web.data.settings.decode, 1.0).frames[0]
    assert np.abs(np.asarray(image, dtype=np.float32) - frame).mean() < 12  # JPEG is lossy

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=web.settings.serve.web_app_name)
    before = handle.stats.remote().result(timeout_s=30)
    again = web.http.request("/thumb/vid-02?t=1.0")
    after = handle.stats.remote().result(timeout_s=30)
    assert again.body == reply.body and after["thumb_hits"] == before["thumb_hits"] + 1
    # Past the end: the last frame, not an error.
    assert web.http.request("/thumb/vid-02?t=999").status == 200
    assert web.http.request("/thumb/vid-02").status == 200  # t defaults to 0


@pytest.mark.parametrize("path, status, field", [
    ("/thumb/vid-02?t=-1", 400, "t"),
    ("/thumb/vid-02?t=nan", 400, "t"),
    ("/thumb/vid-02?t=soon", 400, "t"),
    ("/thumb/vid-02?t=1&size=9", 400, "size"),
    ("/thumb/vid-99?t=1", 404, None),
    ("/thumb/..%2F..%2Fetc%2Fpasswd?t=1", 404, None),
])
def test_bad_thumbnail_requests(web, path, status, field):
    reply = web.http.request(path)
    assert reply.status == status, (path, reply.body)
    if field is not None:
        assert reply.error["field"] == field and reply.error["message"].startswith(f"{field}:")
