"""Errors the query path maps onto gRPC status codes.

Kept free of heavy imports (no torch, no store): the web app imports
:class:`RpcFailure` to read the ingress's answers through a DeploymentHandle.

Both redact their text (vidsearch.redact) where it is built: an error that echoes a
filter value or a stored uri must not hand a client the credentials in it.
"""
from __future__ import annotations

import grpc

from vidsearch.redact import redact


class RequestError(ValueError):
    """A request field is invalid (INVALID_ARGUMENT); ``str(err)`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        field, reason = redact(field), redact(reason)
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RpcFailure(Exception):
    """Ends an RPC with a non-OK status; ``details`` is what the client reads."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        details = redact(details)
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple:
        # Raised through a DeploymentHandle it is pickled; rebuild from both fields.
        return (type(self), (self.code, self.details))
