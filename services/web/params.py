"""``GET /api/search`` query parameters -> a gRPC ``SearchRequest``.

Only the HTTP spelling is handled here: types, repeated and unknown parameters,
and the CLI's filter syntax (``filter=tags=red``, ``filter=duration_s>=2``). The
limits and the filter rules are not: the ingress checks this request with the
same validator as a gRPC one, so the two APIs cannot drift apart.
"""
from __future__ import annotations

from typing import Iterable

from vidsearch.services.query.client import ClientError, parse_filter
from vidsearch.services.query.errors import RequestError
from vidsearch.v1 import search_pb2

SINGLE = ("q", "top_k", "recall_k", "rerank", "beta")
REPEATED = ("filter",)
MAX_FILTERS = 32
_UINT32_MAX = 2**32 - 1
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def search_request(query_params: Iterable[tuple[str, str]]) -> search_pb2.SearchRequest:
    """Build the request, or raise RequestError naming the gRPC field at fault."""
    values: dict[str, list[str]] = {}
    for key, value in query_params:
        values.setdefault(key, []).append(value)
    unknown = sorted(set(values) - set(SINGLE) - set(REPEATED))
    if unknown:
        # A typo (?topk=5) silently ignored would answer a different question.
        raise RequestError(unknown[0], f"unknown parameter (known: {', '.join(SINGLE + REPEATED)})")
    for name in SINGLE:
        if len(values.get(name, ())) > 1:
            raise RequestError("query" if name == "q" else name, f"parameter {name!r} given more than once")
    one = {name: values[name][0] for name in SINGLE if name in values}
    if "q" not in one:
        raise RequestError("query", "missing: pass the sentence as ?q=...")
    request = search_pb2.SearchRequest(query=one["q"], top_k=_count("top_k", one.get("top_k")),
                                       recall_k=_count("recall_k", one.get("recall_k")))
    if "rerank" in one:
        request.rerank = _flag("rerank", one["rerank"])
    if "beta" in one:
        request.beta = _number("beta", one["beta"])
    filters = values.get("filter", [])
    if len(filters) > MAX_FILTERS:
        raise RequestError("filters", f"at most {MAX_FILTERS} filters (got {len(filters)})")
    for index, text in enumerate(filters):
        try:
            request.filters.append(parse_filter(text))
        except ClientError as exc:
            raise RequestError(f"filters[{index}]", str(exc).removeprefix("--filter ")) from None
    return request


def check_known(names: Iterable[str], allowed: tuple[str, ...]) -> None:
    """Refuse a parameter an endpoint does not take (``/media``, ``/thumb``)."""
    for name in names:
        if name not in allowed:
            raise RequestError(name, f"unknown parameter (known: {', '.join(allowed) or 'none'})")


def _count(name: str, raw: str | None) -> int:
    """A uint32 field; 0 (or absent) means the server default, as in gRPC."""
    if raw is None or raw.strip() == "":
        return 0
    try:
        value = int(raw.strip())
    except ValueError:
        raise RequestError(name, f"must be a whole number (got {raw!r})") from None
    if not 0 <= value <= _UINT32_MAX:
        raise RequestError(name, f"must be a positive whole number (got {value})")
    return value


def _flag(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(name, f"must be true or false (got {raw!r})")


def _number(name: str, raw: str) -> float:
    try:
        # NaN and infinities pass through: the validator rejects them with its own range message.
        return float(raw.strip())
    except ValueError:
        raise RequestError(name, f"must be a number (got {raw!r})") from None
