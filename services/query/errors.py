"""Errors the query path maps onto gRPC status codes."""
from __future__ import annotations


class RequestError(ValueError):
    """A request field is invalid (INVALID_ARGUMENT); ``str(err)`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
