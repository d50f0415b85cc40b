"""The ``SearchWeb`` Serve deployment: the search page, its JSON API, media and thumbnails.

A third Serve application rather than HTTP routes on the query ingress:

* it runs the *same* search path as gRPC by calling ``SearchIngress.Search``
  through a DeploymentHandle (validation, text encoding, recall, re-ranking and
  fusion all happen there, once), so there is no second copy to drift;
* streaming files and decoding thumbnails (PyAV, CPU-bound) stay off the
  replicas that answer gRPC searches, and scale on their own;
* it is optional: a gRPC-only deployment simply leaves it out.

``/media`` and ``/thumb`` read the video's record straight from the live
collection (the stored uri, unredacted), then judge that uri against the decode
allowlist as configured now.

No ``from __future__ import annotations`` here: FastAPI must see the real
``Request`` annotations of the route methods (Serve's class-based ingress hides
the module globals that string annotations would be resolved in).
"""
import asyncio
import html
import logging
from importlib import resources
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from ray import serve

from vidsearch.config import Settings
from vidsearch.services.query.auth import is_authorized
from vidsearch.services.query.errors import RequestError, RpcFailure
from vidsearch.telemetry import log_event
from vidsearch.uris import VideoError

from .http_errors import HttpError, bad_request, from_rpc_failure, unauthorized
from .media import (Source, check_uri, content_type, find_source, open_media, read_chunks)
from .params import check_known, search_request
from .ranges import RangeNotSatisfiable, parse_range
from .thumbs import ThumbCache, jpeg_frame, parse_time

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "SearchWeb"
INGRESS_DEPLOYMENT = "SearchIngress"  # vidsearch.services.query.ingress.DEPLOYMENT_NAME (not imported: torch)
# The cookie the page sets when the user enters an API key: <img> and <video>
# cannot send an Authorization header.
KEY_COOKIE = "vidsearch_key"
# A `bytes=N-` request gets at most this much; the browser asks again for more.
OPEN_RANGE_CAP = 2 * 1024 * 1024
# Extra seconds the page waits for the ingress past the search deadline itself.
HANDLE_SLACK_S = 5.0
ASSETS = {"style.css": "text/css; charset=utf-8", "search.js": "text/javascript; charset=utf-8"}
# Nothing on the page may load from anywhere but this server.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "media-src 'self'; connect-src 'self'; base-uri 'self'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

app = FastAPI(title="vidsearch search page", docs_url=None, redoc_url=None, openapi_url=None)


def _static(name: str) -> str:
    return resources.files("vidsearch.services.web").joinpath("static", name).read_text(encoding="utf-8")


def _error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status,
                        headers={**error.headers, "Cache-Control": "no-store"})


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
@serve.ingress(app)
class SearchWeb:
    def __init__(self, settings: Settings) -> None:
        from vidsearch.store import open_store

        self._settings = settings
        key = settings.serve.api_key
        self._api_key = key.get_secret_value() if key is not None else None
        self._store = open_store(settings)
        self._thumbs = ThumbCache(settings.serve.thumb_cache_entries)
        self._page = _static("index.html")
        self._assets = {name: _static(name) for name in ASSETS}
        self._ingress: Any = None
        self._timeout_s = settings.serve.default_deadline_s + HANDLE_SLACK_S

    # ------------------------------------------------------------------ page
    @app.get("/")
    async def page(self, request: Request) -> Response:
        # Serve mounts the app under its route prefix (root_path); a <base> makes
        # every link on the page relative to it, wherever it is mounted.
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        body = self._page.replace("{{base}}", html.escape(base, quote=True))
        return Response(body, media_type="text/html; charset=utf-8",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @app.get("/static/{name}")
    async def asset(self, name: str) -> Response:
        if name not in ASSETS:
            return _error_response(HttpError(404, "NOT_FOUND", f"no asset {name!r}"))
        return Response(self._assets[name], media_type=ASSETS[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ API
    @app.get("/api/search")
    async def search(self, request: Request) -> Response:
        try:
            self._authorize(request)
            proto = search_request(request.query_params.multi_items())
            response = await self._call_search(proto)
        except RequestError as exc:
            return _error_response(bad_request(exc))
        except HttpError as exc:
            return _error_response(exc)
        body = json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.api_route("/media/{video_id:path}", methods=["GET", "HEAD"])
    async def media(self, request: Request, video_id: str) -> Response:
        try:
            self._authorize(request)
            check_known(request.query_params.keys(), ())
            source = await asyncio.to_thread(find_source, self._store, self._settings.store.alias, video_id)
            decode = self._settings.decode
            resolved = check_uri(source, decode)
            reader = await asyncio.to_thread(open_media, resolved, source, decode)
        except RequestError as exc:
            return _error_response(bad_request(exc))
        except HttpError as exc:
            return _error_response(exc)
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, no-cache",
                   "X-Content-Type-Options": "nosniff"}
        media_type = content_type(source.uri)
        size = reader.size
        if size is None:
            # Size unknown (a streamed remote object): no ranges, the whole body.
            headers.pop("Accept-Ranges")
            return self._body(request, reader, 0, None, 200, headers, media_type, source)
        try:
            wanted = parse_range(request.headers.get("range"), size, open_ended_cap=OPEN_RANGE_CAP)
        except RangeNotSatisfiable as exc:
            reader.close()
            error = HttpError(416, "OUT_OF_RANGE", f"range: {exc}", field="range",
                              headers={"Content-Range": f"bytes */{exc.size}"})
            return _error_response(error)
        if wanted is None:
            headers["Content-Length"] = str(size)
            return self._body(request, reader, 0, size, 200, headers, media_type, source)
        headers.update({"Content-Range": wanted.content_range(size), "Content-Length": str(wanted.length)})
        return self._body(request, reader, wanted.start, wanted.length, 206, headers, media_type, source)

    @app.get("/thumb/{video_id:path}")
    async def thumb(self, request: Request, video_id: str) -> Response:
        try:
            self._authorize(request)
            check_known(request.query_params.keys(), ("t",))
            at_s = parse_time(request.query_params.get("t"))
            source = await asyncio.to_thread(find_source, self._store, self._settings.store.alias, video_id)
            check_uri(source, self._settings.decode)
            data = await self._thumbnail(source, at_s)
        except RequestError as exc:
            return _error_response(bad_request(exc))
        except HttpError as exc:
            return _error_response(exc)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------ helpers
    def stats(self) -> dict[str, int]:
        """Thumbnail cache counters (tests, dashboards)."""
        return {"thumb_hits": self._thumbs.hits, "thumb_misses": self._thumbs.misses,
                "thumb_entries": len(self._thumbs)}

    async def _call_search(self, proto: Any) -> Any:
        """``SearchIngress.Search`` through its DeploymentHandle: the gRPC method itself.

        Without a gRPC context the ingress raises its RpcFailure instead of setting
        a status; the handle re-raises it here (as a subclass of it).
        """
        try:
            return await asyncio.wait_for(self._ingress_handle().Search.remote(proto), timeout=self._timeout_s)
        except RpcFailure as exc:
            raise from_rpc_failure(exc) from None
        except asyncio.TimeoutError:
            raise HttpError(504, "DEADLINE_EXCEEDED", "the search service did not answer in time") from None
        except Exception as exc:  # noqa: BLE001 - the ingress app is missing, restarting, ...
            log_event(log, "search call failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}"[:300])
            raise HttpError(503, "UNAVAILABLE", f"the search service is unavailable: {type(exc).__name__}",
                            headers={"Retry-After": "5"}) from None

    def _ingress_handle(self) -> Any:
        # By name and lazily: the ingress is its own application, deployed alongside.
        if self._ingress is None:
            self._ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=self._settings.serve.app_name)
        return self._ingress

    async def _thumbnail(self, source: Source, at_s: float) -> bytes:
        if source.duration_s is not None:
            at_s = min(at_s, source.duration_s)
        key = ThumbCache.key(source.collection, source.video_id, source.uri, at_s)
        data = self._thumbs.get(key)
        if data is None:
            try:
                data = await asyncio.to_thread(jpeg_frame, source.uri, self._settings.decode, at_s)
            except VideoError as exc:
                status = 404 if exc.error_class == "not_found" else 403 if exc.error_class in (
                    "not_allowed", "unsupported_uri", "too_large") else 422
                log_event(log, "thumbnail failed", logging.WARNING, video_id=source.video_id,
                          error_class=exc.error_class, reason=exc.reason)
                raise HttpError(status, "NOT_FOUND" if status == 404 else "FAILED_PRECONDITION",
                                f"video_id: no thumbnail for video {source.video_id!r} ({exc.error_class})") from None
            except OSError as exc:
                raise HttpError(503, "UNAVAILABLE", f"the source of video {source.video_id!r} cannot be read now: "
                                f"{exc}", headers={"Retry-After": "5"}) from None
            self._thumbs.put(key, data)
        return data

    def _body(self, request: Request, reader: Any, start: int, length: int | None, status: int,
              headers: dict[str, str], media_type: str, source: Source) -> Response:
        if request.method == "HEAD":
            reader.close()
            return Response(status_code=status, headers=headers, media_type=media_type)
        # A sync iterator: Starlette runs each read in its thread pool.
        return StreamingResponse(read_chunks(reader, start, length, source.video_id), status_code=status,
                                 headers=headers, media_type=media_type)

    def _authorize(self, request: Request) -> None:
        """The gRPC API key, from ``Authorization: Bearer`` or the page's cookie."""
        if not self._api_key:
            return
        header = request.headers.get("authorization")
        if header is None:
            cookie = request.cookies.get(KEY_COOKIE)
            header = f"Bearer {unquote(cookie)}" if cookie else None
        if header is None or not is_authorized([("authorization", header)], self._api_key):
            raise unauthorized()
