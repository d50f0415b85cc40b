"""Proto ``FieldFilter`` -> the store's filter specs (``Match`` / ``MatchAny`` / ``Range``).

The store owns the typing rules (which field is filterable, which condition suits
which field type, what makes a range empty); this module only unpacks protobuf
``Value``s and re-runs the store's own check per filter, so a bad filter is
rejected before any store call with a message that names ``filters[i]...``
instead of surfacing later as a generic store error.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from vidsearch.store_schema import FilterError, FilterSchema, FilterSpec, Match, MatchAny, Range

from .errors import RequestError

RANGE_BOUNDS = ("gte", "gt", "lte", "lt")


def filters_from_proto(filters: Iterable[Any], filter_fields: Mapping[str, str]) -> list[FilterSpec]:
    """Convert and check every ``FieldFilter``; raise RequestError naming the first bad one."""
    schema = FilterSchema(filter_fields)
    specs: list[FilterSpec] = []
    for index, proto in enumerate(filters):
        where = f"filters[{index}]"
        spec = _convert(where, proto, schema)
        try:
            schema.to_qdrant([spec])
        except FilterError as exc:
            condition = proto.WhichOneof("condition")
            raise RequestError(f"{where}.{condition}", f"{exc.reason} (field {spec.field!r})") from None
        specs.append(spec)
    return specs


def _convert(where: str, proto: Any, schema: FilterSchema) -> FilterSpec:
    name = proto.field
    if not name.strip():
        raise RequestError(f"{where}.field", "must name a field")
    kind = schema.field_types.get(name)
    if kind is None:
        known = ", ".join(sorted(schema.field_types)) or "none"
        raise RequestError(f"{where}.field", f"unknown filter field {name!r} (filterable: {known})")
    condition = proto.WhichOneof("condition")
    if condition == "equals":
        return Match(name, _scalar(f"{where}.equals", proto.equals, kind))
    if condition == "any_of":
        values = [_scalar(f"{where}.any_of.values[{i}]", v, kind) for i, v in enumerate(proto.any_of.values)]
        if not values:
            raise RequestError(f"{where}.any_of", "needs at least one value")
        return MatchAny(name, values)
    if condition == "range":
        bounds = {op: _bound(f"{where}.range.{op}", getattr(proto.range, op), kind)
                  for op in RANGE_BOUNDS if proto.range.HasField(op)}
        if not bounds:
            raise RequestError(f"{where}.range", "needs at least one of gte, gt, lte, lt")
        return Range(name, **bounds)
    raise RequestError(where, "needs a condition: one of equals, any_of, range")


def _number(where: str, value: float, kind: str) -> int | float:
    if not math.isfinite(value):
        raise RequestError(where, "must be a finite number")
    # protobuf Values carry every number as a double; integer fields want ints,
    # and 3.0 is the JSON spelling of 3, while 3.5 can never match an integer.
    if kind == "integer":
        if not value.is_integer():
            raise RequestError(where, f"integer field needs a whole number (got {value})")
        return int(value)
    return value


def _scalar(where: str, value: Any, kind: str) -> str | int | float | bool:
    which = value.WhichOneof("kind")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "number_value":
        return _number(where, value.number_value, kind)
    raise RequestError(where, f"must be a string, number or boolean (got {_kind_name(which)})")


def _bound(where: str, value: Any, kind: str) -> int | float | str:
    which = value.WhichOneof("kind")
    if which == "number_value":
        return _number(where, value.number_value, kind)
    if which == "string_value":
        return value.string_value
    raise RequestError(where, f"must be a number or an RFC 3339 datetime string (got {_kind_name(which)})")


# An empty Value is what a client sends when it spelled the field in a way its library
# does not know: protobufjs (@grpc/proto-loader) bundles struct.proto with camelCase
# names, so `string_value` is dropped there even with keepCase. Say so, not just "nothing".
EMPTY_VALUE = ("an empty Value: set one of string_value, number_value, bool_value "
               "(protobufjs and @grpc/proto-loader spell them stringValue, numberValue, boolValue)")


def _kind_name(which: str | None) -> str:
    return {"null_value": "null", "struct_value": "an object", "list_value": "a list",
            "bool_value": "a boolean", None: EMPTY_VALUE}.get(which, which or EMPTY_VALUE)
