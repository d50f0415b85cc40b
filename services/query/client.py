"""A small gRPC client of the search service: what `vidsearch search` and `vidsearch demo` use.

Only grpc and the generated code are imported here (no torch, no Ray), so the
command starts in well under a second. Filters are written on the command line as
``FIELD=VALUE`` (equality), ``FIELD=V1,V2`` (any-of) or ``FIELD>=N`` / ``>`` / ``<=`` /
``<`` (range; repeat the option for both ends).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import grpc
from google.protobuf import json_format, struct_pb2

from vidsearch.v1 import search_pb2, search_pb2_grpc

from .deadline import DEADLINE_METADATA

_FILTER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<|=)(.*)$")
_RANGE_OPS = {">=": "gte", ">": "gt", "<=": "lte", "<": "lt"}
TITLE_WIDTH = 48


class ClientError(ValueError):
    """A bad command-line filter or a failed call; the message is one line."""


def parse_value(text: str) -> Any:
    """A command-line value as the JSON type it spells (number, true/false), else a string.

    Quotes force a string: ``tags='"123"'`` matches the keyword "123", not a number.
    """
    text = text.strip()
    try:
        # NaN/Infinity stay strings: they are never a useful filter value.
        value = json.loads(text, parse_constant=str)
    except ValueError:
        return text
    if isinstance(value, (str, bool, int, float)):
        return value
    return text  # null, lists and objects are not filter values: keep the literal text


def _value(python: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(python, out)
    return out


def parse_filter(text: str) -> search_pb2.FieldFilter:
    """``FIELD=VALUE``, ``FIELD=V1,V2`` or ``FIELD<op>VALUE`` -> a FieldFilter."""
    match = _FILTER_RE.match(text)
    if match is None:
        raise ClientError(f"--filter {text!r}: expected FIELD=VALUE, FIELD=V1,V2 or FIELD>=N (also >, <=, <)")
    field, op, raw = match.groups()
    if not raw.strip():
        raise ClientError(f"--filter {text!r}: missing value after {op!r}")
    if op in _RANGE_OPS:
        return search_pb2.FieldFilter(field=field, range=search_pb2.Range(**{_RANGE_OPS[op]: _value(parse_value(raw))}))
    parts = raw.split(",")
    if len(parts) > 1:
        if any(not p.strip() for p in parts):
            raise ClientError(f"--filter {text!r}: empty value in the any-of list")
        return search_pb2.FieldFilter(field=field, any_of=search_pb2.AnyOf(values=[_value(parse_value(p)) for p in parts]))
    return search_pb2.FieldFilter(field=field, equals=_value(parse_value(raw)))


def build_request(query: str, *, top_k: int = 0, recall_k: int = 0, rerank: bool | None = None,
                  beta: float | None = None, filters: Sequence[str] = ()) -> search_pb2.SearchRequest:
    request = search_pb2.SearchRequest(query=query, top_k=top_k, recall_k=recall_k,
                                       filters=[parse_filter(f) for f in filters])
    if rerank is not None:
        request.rerank = rerank
    if beta is not None:
        request.beta = beta
    return request


@dataclass
class SearchClient:
    """One channel to the gRPC proxy; ``app`` is the Serve application (``serve.app_name``)."""

    address: str
    app: str
    api_key: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self._channel = grpc.insecure_channel(self.address)
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)

    def metadata(self) -> list[tuple[str, str]]:
        # The deadline travels as metadata too: the Serve proxy drops the gRPC one.
        pairs = [("application", self.app), (DEADLINE_METADATA, str(int(self.timeout_s * 1000)))]
        if self.api_key:
            pairs.append(("authorization", f"Bearer {self.api_key}"))
        return pairs

    def search(self, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        try:
            return self._stub.Search(request, metadata=self.metadata(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(describe_rpc_error(exc, self.address)) from None

    def get_video(self, video_id: str) -> search_pb2.GetVideoResponse:
        try:
            return self._stub.GetVideo(search_pb2.GetVideoRequest(video_id=video_id), metadata=self.metadata(),
                                       timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(describe_rpc_error(exc, self.address)) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_rpc_error(exc: grpc.RpcError, address: str) -> str:
    """One line: what failed, with the server's own message (which names the field)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    details = details.strip().splitlines()[0] if details.strip() else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the search service at {address}: {details or 'unavailable'}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {address} within the deadline ({details or 'deadline exceeded'})"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details or 'no details'}"


def _title(payload: dict[str, Any]) -> str:
    metadata = payload.get("metadata") or {}
    title = metadata.get("title") if isinstance(metadata, dict) else None
    title = str(title) if title is not None else ""
    return title if len(title) <= TITLE_WIDTH else title[:TITLE_WIDTH - 1] + "…"


def format_response(response: search_pb2.SearchResponse, query: str | None = None,
                    mark: str | None = None) -> str:
    """A readable table; ``mark`` flags one video id (the demo marks the caption's source)."""
    head = f"{len(response.results)} result(s)"
    if query is not None:
        head = f"{query!r}: {head}"
    state = "re-ranked" if response.reranked else "recall only (not re-ranked)"
    t = response.timings
    lines = [f"{head}, {state}; model {response.model_version}, index {response.index}",
             f"timings: encode {t.encode_ms:.1f} ms, recall {t.recall_ms:.1f} ms, "
             f"rerank {t.rerank_ms:.1f} ms, total {t.total_ms:.1f} ms"]
    if not response.results:
        lines.append("(no results)")
        return "\n".join(lines)
    rows = [("rank", "video id", "score", "recall", "rerank", "moment", "title")]
    for rank, r in enumerate(response.results, 1):
        payload = json_format.MessageToDict(r.payload)
        flag = " *" if mark is not None and r.video_id == mark else ""
        rows.append((str(rank), r.video_id + flag, f"{r.score:.3f}", f"{r.recall_score:.4f}",
                     f"{r.rerank_score:.4f}" if response.reranked else "-", f"{r.best_moment_seconds:.2f}s",
                     _title(payload)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 2, 3, 4, 5}
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
