"""The document mapping: an Elasticsearch ``{"properties": ...}`` object flattened to leaf fields.

Supported field types: keyword, text, integer, long, short, byte, float, double, boolean, date,
geo_point, and object (explicit ``"type": "object"`` or just ``"properties"``). Dotted names in the
mapping (``"geo.city"``) are expanded into objects, as Elasticsearch does. Multi-fields
(``"fields": {"keyword": {"type": "keyword"}}``) become their own leaves (``name.keyword``) fed
from the parent's value.

Parameters honoured: ``ignore_above`` (keyword), ``null_value``, ``coerce`` (numbers),
``ignore_malformed``, ``format`` (date), ``analyzer``/``search_analyzer`` (``standard`` only),
``index``/``doc_values``/``store`` etc. are accepted and have no effect on matching semantics here.
Documents are indexed as with ``"dynamic": false``: unmapped fields are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from typing import Any

INTEGER_TYPES: dict[str, tuple[int, int]] = {
    "byte": (-(2**7), 2**7 - 1),
    "short": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "long": (-(2**63), 2**63 - 1),
}
FLOAT_TYPES = frozenset({"float", "double"})
NUMERIC_TYPES = frozenset(INTEGER_TYPES) | FLOAT_TYPES
LEAF_TYPES = frozenset({"keyword", "text", "boolean", "date", "geo_point"}) | NUMERIC_TYPES

# Mapping parameters that do not change what a query matches in this engine; accepted silently.
_INERT_PARAMS = frozenset(
    {
        "index",
        "doc_values",
        "store",
        "norms",
        "boost",
        "similarity",
        "index_options",
        "eager_global_ordinals",
        "term_vector",
        "copy_to",
        "meta",
        "position_increment_gap",
        "fielddata",
        "split_queries_on_whitespace",
        "ignore_z_value",
        "locale",
        "time_series_dimension",
        "time_series_metric",
    }
)
_ALLOWED_PARAMS: dict[str, frozenset[str]] = {
    "keyword": frozenset({"ignore_above", "null_value", "fields"}),
    "text": frozenset({"analyzer", "search_analyzer", "search_quote_analyzer", "fields"}),
    "boolean": frozenset({"null_value", "fields"}),
    "date": frozenset({"format", "null_value", "ignore_malformed", "fields"}),
    "geo_point": frozenset({"null_value", "ignore_malformed"}),
}
for _t in NUMERIC_TYPES:
    _ALLOWED_PARAMS[_t] = frozenset({"null_value", "coerce", "ignore_malformed", "fields"})

DEFAULT_DATE_FORMAT = "strict_date_optional_time||epoch_millis"


class MappingError(ValueError):
    """The mapping itself is invalid or uses a type this engine does not support."""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One leaf field. ``source`` is the dotted path its value is read from (differs from
    ``path`` for multi-fields)."""

    path: str
    type: str
    source: str
    ignore_above: int | None = None
    null_value: Any = None
    coerce: bool = True
    ignore_malformed: bool = False
    date_format: str = DEFAULT_DATE_FORMAT


@dataclass(frozen=True, eq=False)
class Mapping:
    """Leaf field path -> :class:`FieldSpec`, plus the set of object paths."""

    fields: dict[str, FieldSpec]
    objects: frozenset[str]
    # source path -> the leaf specs fed from it (a field and its multi-fields)
    by_source: dict[str, tuple[FieldSpec, ...]] = field(default_factory=dict)
    # derived structures built lazily by other modules (e.g. the document indexing plan)
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, mapping: AbcMapping[str, Any]) -> Mapping:
        if not isinstance(mapping, AbcMapping):
            raise MappingError("mapping must be an object with a 'properties' key")
        if "mappings" in mapping and "properties" not in mapping:
            mapping = mapping["mappings"]
        props = mapping.get("properties")
        if not isinstance(props, AbcMapping):
            raise MappingError("mapping must be an object with a 'properties' object")
        fields: dict[str, FieldSpec] = {}
        objects: set[str] = set()
        _walk(props, "", fields, objects)
        by_source: dict[str, list[FieldSpec]] = {}
        for spec in fields.values():
            by_source.setdefault(spec.source, []).append(spec)
        return cls(fields, frozenset(objects), {k: tuple(v) for k, v in by_source.items()})

    def type_of(self, path: str) -> str | None:
        spec = self.fields.get(path)
        return spec.type if spec is not None else None

    def is_object(self, path: str) -> bool:
        return path in self.objects

    def leaves_under(self, path: str) -> tuple[str, ...]:
        """The leaf fields at or under ``path`` (a leaf gives itself; an object all its leaves)."""
        if path in self.fields:
            return (path,)
        prefix = path + "."
        return tuple(sorted(p for p in self.fields if p.startswith(prefix)))


def _walk(props: AbcMapping[str, Any], prefix: str, fields: dict[str, FieldSpec], objects: set[str]) -> None:
    for raw_name, definition in props.items():
        if not isinstance(definition, AbcMapping):
            raise MappingError(f"mapping for field '{prefix}{raw_name}' must be an object")
        parts = raw_name.split(".")
        if any(not p for p in parts):
            raise MappingError(f"invalid field name '{prefix}{raw_name}'")
        # "a.b": {...} is shorthand for a: {properties: {b: {...}}}
        for i in range(1, len(parts)):
            objects.add(prefix + ".".join(parts[:i]))
        path = prefix + raw_name
        ftype = definition.get("type")
        if ftype is None or ftype == "object":
            sub = definition.get("properties", {})
            if not isinstance(sub, AbcMapping):
                raise MappingError(f"'properties' of object field '{path}' must be an object")
            if definition.get("enabled", True) is False:
                continue  # not indexed: behaves as unmapped
            objects.add(path)
            _walk(sub, path + ".", fields, objects)
            continue
        if ftype == "nested":
            raise MappingError(f"field '{path}': type 'nested' is not supported (use 'object')")
        if ftype not in LEAF_TYPES:
            raise MappingError(
                f"field '{path}': unsupported field type '{ftype}' (supported: "
                + ", ".join(sorted(LEAF_TYPES | {"object"}))
                + ")"
            )
        if path in fields or path in objects:
            raise MappingError(f"field '{path}' is mapped twice")
        fields[path] = _spec(path, path, ftype, definition)
        multi = definition.get("fields")
        if multi is not None:
            if not isinstance(multi, AbcMapping):
                raise MappingError(f"'fields' of '{path}' must be an object")
            for sub_name, sub_def in multi.items():
                sub_path = f"{path}.{sub_name}"
                if not isinstance(sub_def, AbcMapping) or sub_def.get("type") not in LEAF_TYPES:
                    raise MappingError(f"multi-field '{sub_path}' needs a supported 'type'")
                if sub_def.get("fields"):
                    raise MappingError(f"multi-field '{sub_path}' cannot have its own 'fields'")
                fields[sub_path] = _spec(sub_path, path, sub_def["type"], sub_def)


def _spec(path: str, source: str, ftype: str, definition: AbcMapping[str, Any]) -> FieldSpec:
    allowed = _ALLOWED_PARAMS[ftype] | _INERT_PARAMS | {"type"}
    unknown = sorted(set(definition) - allowed)
    if unknown:
        raise MappingError(f"field '{path}' of type '{ftype}': unsupported parameter(s) {', '.join(unknown)}")
    for key in ("analyzer", "search_analyzer", "search_quote_analyzer"):
        if key in definition and definition[key] != "standard":
            raise MappingError(f"field '{path}': only the 'standard' analyzer is supported, not {definition[key]!r}")
    ignore_above = definition.get("ignore_above")
    if ignore_above is not None and (not isinstance(ignore_above, int) or isinstance(ignore_above, bool)):
        raise MappingError(f"field '{path}': 'ignore_above' must be an integer")
    date_format = definition.get("format", DEFAULT_DATE_FORMAT)
    if ftype == "date":
        from percolators.datemath import validate_format

        try:
            validate_format(date_format)
        except ValueError as exc:
            raise MappingError(f"field '{path}': {exc}") from None
    return FieldSpec(
        path=path,
        type=ftype,
        source=source,
        ignore_above=ignore_above,
        null_value=definition.get("null_value"),
        coerce=bool(definition.get("coerce", True)),
        ignore_malformed=bool(definition.get("ignore_malformed", False)),
        date_format=date_format,
    )
