"""HTTP errors of the search page and its JSON API.

Every failure is one JSON body, ``{"error": {"status", "code", "field", "parameter",
"message"}}``, where ``message`` is the gRPC service's own text (it starts with the
field, as gRPC's INVALID_ARGUMENT details do) and ``parameter`` names the HTTP query
parameter that carried the field (``query`` arrives as ``q``, ``filters[i]`` as the
i-th ``filter``).
"""
from __future__ import annotations

import re
from typing import Any

import grpc

from vidsearch.services.query.errors import RequestError, RpcFailure

# gRPC status -> HTTP status. No live index is 503 (a state the operator fixes by
# ingesting), not 4xx: the request itself was fine.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_FIELD_RE = re.compile(r"^([A-Za-z_][\w.\[\]-]*):")
_PARAMETER_OF = {"query": "q", "filters": "filter"}


class HttpError(Exception):
    """Ends a request with ``status``; ``code`` is the matching gRPC status name."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field if field is not None else field_of(message) if status == 400 else None
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
            error["parameter"] = parameter_of(self.field)
        return {"error": error}


def field_of(message: str) -> str | None:
    """``"top_k: must be ..."`` -> ``"top_k"``."""
    match = _FIELD_RE.match(message)
    return match.group(1) if match else None


def parameter_of(field: str) -> str:
    """The HTTP query parameter that carries a gRPC request field."""
    root = re.split(r"[.\[]", field, maxsplit=1)[0]
    return _PARAMETER_OF.get(root, root)


def bad_request(error: RequestError) -> HttpError:
    return HttpError(400, "INVALID_ARGUMENT", str(error), field=error.field)


def from_rpc_failure(failure: RpcFailure) -> HttpError:
    status = HTTP_STATUS.get(failure.code, 500)
    headers = {"Retry-After": "5"} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="vidsearch"'}
    return HttpError(status, failure.code.name, failure.details, headers=headers)


def unauthorized() -> HttpError:
    return HttpError(401, "UNAUTHENTICATED",
                     "authorization: missing or invalid API key (send 'Authorization: Bearer <key>', or enter "
                     "the key on the search page)", headers={"WWW-Authenticate": 'Bearer realm="vidsearch"'})
