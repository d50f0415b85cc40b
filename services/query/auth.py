"""API-key check on the gRPC `authorization` metadata."""
from __future__ import annotations

import hmac
from typing import Iterable

BEARER = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry, if any.

    gRPC lower-cases metadata keys on the wire; the scheme word is matched
    case-insensitively as HTTP does.
    """
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value[: len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip()
        return None
    return None


def is_authorized(metadata: Iterable[tuple[str, str | bytes]], api_key: str | None) -> bool:
    """True when no key is configured, or the request carries exactly that key.

    compare_digest keeps the comparison time independent of where the first
    differing byte is, so the key cannot be guessed byte by byte from latencies.
    """
    if not api_key:
        return True
    token = bearer_token(metadata)
    if token is None:
        return False
    return hmac.compare_digest(token.encode("utf-8"), api_key.encode("utf-8"))
