"""HTTP ``Range: bytes=...`` for ``/media`` (RFC 9110 section 14): browsers seek with it.

One range per request; a header this server may ignore (another unit, several
ranges, bad syntax) means "send the whole file", as the RFC allows. A range that
starts at or past the end cannot be satisfied (416).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class RangeNotSatisfiable(ValueError):
    """416: the range lies outside the file; ``size`` goes into ``Content-Range: bytes */size``."""

    def __init__(self, header: str, size: int) -> None:
        super().__init__(f"range {header.strip()!r} is outside the file ({size} bytes)")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int, *, open_ended_cap: int | None = None) -> ByteRange | None:
    """The one byte range to send, or None for the whole file.

    ``open_ended_cap`` bounds ``bytes=N-`` to that many bytes: a browser opens a
    video with ``bytes=0-`` and asks again for what it needs, so a results page of
    paused players never pulls every file whole.
    """
    if header is None:
        return None
    match = _RANGE_RE.match(header)
    if match is None:
        return None  # other units, several ranges, garbage: ignorable
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header, size)
        return ByteRange(max(size - suffix, 0), size - 1)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # invalid syntax per the RFC: ignore it
    if start >= size:
        raise RangeNotSatisfiable(header, size)
    if last == "":
        end = size - 1 if open_ended_cap is None else min(size - 1, start + open_ended_cap - 1)
    else:
        end = min(int(last), size - 1)
    return ByteRange(start, end)
