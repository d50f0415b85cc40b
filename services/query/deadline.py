"""The request deadline, stated by the client in metadata.

Serve's gRPC proxy does not forward the client's gRPC deadline to the replica, so
clients also state it as ``vidsearch-deadline-ms`` (the vidsearch client always
does). Kept free of heavy imports: the command-line client imports it.
"""
from __future__ import annotations

import math
from typing import Iterable

from .errors import RequestError

DEADLINE_METADATA = "vidsearch-deadline-ms"


def deadline_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> float | None:
    """Seconds left for this request from ``vidsearch-deadline-ms``, or None if absent."""
    for key, value in metadata:
        if key.lower() != DEADLINE_METADATA:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        try:
            millis = float(text)
        except ValueError:
            raise RequestError(DEADLINE_METADATA, f"must be a number of milliseconds (got {text!r})") from None
        if not (math.isfinite(millis) and millis > 0):
            raise RequestError(DEADLINE_METADATA, f"must be a positive number of milliseconds (got {text!r})")
        return millis / 1000.0
    return None
