"""Errors the query path maps onto gRPC status codes.

Kept free of heavy imports (no torch, no store): the web app imports
:class:`RpcFailure` to read the ingress's answers through a DeploymentHandle.
"""
from __future__ import annotations

import grpc


class RequestError(ValueError):
    """A request field is invalid (INVALID_ARGUMENT); ``str(err)`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RpcFailure(Exception):
    """Ends an RPC with a non-OK status; ``details`` is what the client reads."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple:
        # Raised through a DeploymentHandle it is pickled; rebuild from both fields.
        return (type(self), (self.code, self.details))
