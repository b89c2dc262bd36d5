"""Hypothesis strategies for the instances a committed JSON Schema file (`schemas/json/`) accepts.

Covers the subset pydantic writes for ragbus's events: objects with properties and `$defs`
references, `anyOf`, `enum`, strings with lengths, patterns and the formats used, numbers with
bounds, arrays, and maps with bounded keys. Strings are kept short (what matters to the tests is
the shape; the hostile tests add over-long values on purpose).
"""

from __future__ import annotations

import base64
from datetime import UTC
from typing import Any

from hypothesis import strategies as st

#: Longest string or array drawn for a schema that allows more.
SHORT = 24


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of `schema` (a whole document, with its `$defs`)."""
    return _node(schema, schema.get("$defs", {}))


def _node(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: _node(defs[name], defs))
    if "anyOf" in node:
        return st.one_of(*(_node(n, defs) for n in node["anyOf"]))
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        return _object(node, defs)
    if kind == "array":
        items = _node(node.get("items", {}), defs)
        return st.lists(items, min_size=node.get("minItems", 0), max_size=min(node.get("maxItems", SHORT), 4))
    if kind == "string":
        return _string(node)
    if kind == "integer":
        low = node.get("minimum", node.get("exclusiveMinimum", -(2**31) - 1) + 1)
        return st.integers(low, node.get("maximum", 2**31))
    if kind == "number":
        return st.floats(
            min_value=node.get("minimum", node.get("exclusiveMinimum")),
            max_value=node.get("maximum"),
            exclude_min="exclusiveMinimum" in node,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none()


def _string(node: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = node.get("minLength", 0), min(node.get("maxLength", SHORT), SHORT)
    fmt = node.get("format")
    if fmt == "date-time":
        return st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
    if fmt == "ipvanyaddress":
        return st.ip_addresses().map(str)
    if node.get("contentEncoding") == "base64":
        return st.binary(max_size=SHORT).map(lambda b: base64.b64encode(b).decode())
    if "pattern" in node:
        limit = node.get("maxLength", SHORT)
        return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: low <= len(s) <= limit)
    return st.text(min_size=low, max_size=max(low, high))


def _object(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props: dict[str, Any] = node.get("properties", {})
    if not props and isinstance(node.get("additionalProperties"), dict):
        keys = _string({"maxLength": node.get("propertyNames", {}).get("maxLength", SHORT)})
        return st.dictionaries(keys, _node(node["additionalProperties"], defs), max_size=3)
    required = set(node.get("required", []))
    fields = {
        name: _node(sub, defs) if name in required else st.one_of(st.just(_ABSENT), _node(sub, defs))
        for name, sub in props.items()
    }
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not _ABSENT})


_ABSENT = object()
