"""Index one JSON document against a mapping, the way Elasticsearch would (``dynamic: false``).

The result, :class:`IndexedDoc`, holds every leaf field's *indexed values* (the forms listed in
``percolators.query``): keyword ``str``, text tokens ``str``, integers ``int``, float/double
``float`` (``float`` fields rounded to 32 bits as Lucene stores them), boolean ``bool``, date
``int`` epoch millis, geo_point ``(lat, lon)`` quantised like Lucene ``LatLonPoint``.

Rules followed (Elasticsearch 8):

* objects and dotted keys are the same thing: ``{"geo.city": "x"}`` == ``{"geo": {"city": "x"}}``;
* arrays index every element; nested arrays are flattened; arrays of objects are flattened like
  the ``object`` type (no per-element grouping);
* ``null`` and ``[]`` index nothing (unless the mapping sets ``null_value``), so the field does
  not exist;
* unmapped fields are ignored (as with ``"dynamic": false``); a mapped object given a concrete
  value, or a leaf given an object, is a document error;
* coercion: integer fields take ``"35"`` and ``35.7`` (truncated), ``coerce: false`` refuses them;
  float fields take numeric strings; boolean takes ``true``/``false``/``"true"``/``"false"``/``""``
  (false); keyword takes numbers and booleans as their text; dates use the field's format
  (default ``strict_date_optional_time||epoch_millis``); geo points take every format of
  ``percolators.geo.parse_point`` and must be in range (``ignore_malformed`` skips bad values);
* keyword values longer than ``ignore_above`` are not indexed; text values with no tokens give no
  tokens and do not make the field exist (a keyword ``""`` does exist);
* text phrases never span array elements (``position_increment_gap`` 100 exceeds any slop we
  accept... see ``percolators.reference`` for slop handling).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from typing import Any

from percolators.analysis import analyze
from percolators.datemath import date_text, parse_date
from percolators.errors import InvalidDocumentError
from percolators.geo import GeoError, java_double, parse_point, quantize
from percolators.mapping import INTEGER_TYPES, FieldSpec, Mapping

_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")
_PACK_F32 = struct.Struct("f")


class IndexedDoc:
    """The indexed form of one document.

    * ``values``: leaf field path -> tuple of indexed values (text: distinct tokens);
    * ``phrases``: text field path -> one token tuple per source value (for phrase queries);
    * ``present``: the leaf fields with at least one indexed value (what ``exists`` checks).
    """

    __slots__ = ("phrases", "present", "values")

    def __init__(
        self,
        values: dict[str, tuple[Any, ...]],
        phrases: dict[str, tuple[tuple[str, ...], ...]],
        present: frozenset[str],
    ):
        self.values = values
        self.phrases = phrases
        self.present = present

    def __repr__(self) -> str:
        return f"IndexedDoc(values={self.values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexedDoc) and self.values == other.values and self.phrases == other.phrases


def to_float32(value: float) -> float:
    """Round a double to the nearest 32-bit float, as a ``float`` field stores it."""
    return float(_PACK_F32.unpack(_PACK_F32.pack(value))[0])


# ---------------------------------------------------------------------------------------------
# Per-type converters: (spec, raw JSON value) -> indexed value, or raise ValueError.


def coerce_integer(raw: Any, ftype: str, coerce: bool = True) -> int:
    lo, hi = INTEGER_TYPES[ftype]
    if isinstance(raw, bool):
        raise ValueError(f"cannot convert boolean [{str(raw).lower()}] to a number")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError(f"Value [{raw}] is out of range for {_article(ftype)}")
        if not coerce and not raw.is_integer():
            raise ValueError(f"Value [{raw}] has a decimal part")
        if raw < lo or raw > hi:
            raise ValueError(f"Value [{raw}] is out of range for {_article(ftype)}")
        value = int(raw)
    elif isinstance(raw, str):
        if not coerce:
            raise ValueError(f"[coerce] is false, cannot parse string [{raw}]")
        if _INT_TEXT.fullmatch(raw):
            value = int(raw)
        else:
            number = java_double(raw)  # ValueError "For input string"
            if not math.isfinite(number) or number < lo or number > hi:
                raise ValueError(f"Value [{raw}] is out of range for {_article(ftype)}")
            value = int(number)
    else:
        raise ValueError(f"cannot convert [{raw!r}] to {_article(ftype)}")
    if value < lo or value > hi:
        raise ValueError(f"Value [{raw}] is out of range for {_article(ftype)}")
    return value


def _article(ftype: str) -> str:
    return f"an {ftype}" if ftype == "integer" else f"a {ftype}"


def coerce_float(raw: Any, ftype: str, coerce: bool = True) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"cannot convert boolean [{str(raw).lower()}] to a number")
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        if not coerce:
            raise ValueError(f"[coerce] is false, cannot parse string [{raw}]")
        value = java_double(raw)
    else:
        raise ValueError(f"cannot convert [{raw!r}] to a {ftype}")
    if not math.isfinite(value):
        raise ValueError(f"[{ftype}] supports only finite values, but got [{raw}]")
    if ftype == "float":
        value = to_float32(value)
        if not math.isfinite(value):
            raise ValueError(f"[float] supports only finite values, but got [{raw}]")
    return value


def coerce_boolean(raw: Any) -> bool:
    if raw is True or raw is False:
        return raw
    if raw == "true":
        return True
    if raw in ("false", ""):
        return False
    raise ValueError(f"Failed to parse value [{raw}] as only [true] or [false] are allowed.")


def keyword_text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float):
        return repr(raw)
    raise ValueError(f"cannot index [{raw!r}] as a keyword")


def _keyword(spec: FieldSpec, raw: Any) -> Any:
    text = keyword_text(raw)
    if spec.ignore_above is not None and len(text) > spec.ignore_above:
        return None
    return text


def _integer(spec: FieldSpec, raw: Any) -> Any:
    return coerce_integer(raw, spec.type, spec.coerce)


def _float(spec: FieldSpec, raw: Any) -> Any:
    return coerce_float(raw, spec.type, spec.coerce)


def _boolean(spec: FieldSpec, raw: Any) -> Any:
    return coerce_boolean(raw)


def _date(spec: FieldSpec, raw: Any) -> Any:
    return parse_date(date_text(raw), spec.date_format)


def _geo(spec: FieldSpec, raw: Any) -> Any:
    try:
        lat, lon = parse_point(raw)
    except GeoError as exc:
        raise ValueError(str(exc)) from None
    return quantize(lat, lon)


_CONVERTERS: dict[str, Callable[[FieldSpec, Any], Any]] = {
    "keyword": _keyword,
    "boolean": _boolean,
    "date": _date,
    "geo_point": _geo,
    **{t: _integer for t in INTEGER_TYPES},
    "float": _float,
    "double": _float,
}


# ---------------------------------------------------------------------------------------------


_KEYWORD, _TEXT, _OTHER, _KEYWORD_FAST = 0, 1, 2, 3  # FAST: keyword without ignore_above

_Entry = tuple[str, int, FieldSpec, Callable[[FieldSpec, Any], Any] | None]


def _plan(mapping: Mapping) -> dict[str, tuple[_Entry, ...]]:
    """source path -> (leaf path, kind, spec, converter) for the field and its multi-fields."""
    plan = mapping.cache.get("document_plan")
    if plan is None:
        plan = {}
        for source, specs in mapping.by_source.items():
            entries = []
            for spec in specs:
                if spec.type == "keyword":
                    kind = _KEYWORD_FAST if spec.ignore_above is None else _KEYWORD
                elif spec.type == "text":
                    kind = _TEXT
                else:
                    kind = _OTHER
                entries.append((spec.path, kind, spec, _CONVERTERS.get(spec.type)))
            plan[source] = tuple(entries)
        mapping.cache["document_plan"] = plan
    return plan


def _walk(
    obj: AbcMapping[str, Any],
    prefix: str,
    plan: dict[str, tuple[_Entry, ...]],
    objects: frozenset[str],
    values: dict[str, list[Any]],
    phrases: dict[str, list[tuple[str, ...]]],
) -> None:
    for key, value in obj.items():
        path = prefix + key if prefix else key
        entries = plan.get(path)
        if entries is not None:
            if value.__class__ is str and len(entries) == 1 and entries[0][1] == _KEYWORD_FAST:
                bucket = values.get(path)
                if bucket is None:
                    values[path] = [value]
                else:
                    bucket.append(value)
            elif value.__class__ is list:
                _leaf_list(entries, value, values, phrases)
            else:
                _scalar(entries, value, values, phrases)
        elif path in objects:
            _object(path, value, plan, objects, values, phrases)
        # unmapped: ignored (dynamic: false)


def _object(
    path: str,
    value: Any,
    plan: dict[str, tuple[_Entry, ...]],
    objects: frozenset[str],
    values: dict[str, list[Any]],
    phrases: dict[str, list[tuple[str, ...]]],
) -> None:
    if value.__class__ is dict or isinstance(value, AbcMapping):
        _walk(value, path + ".", plan, objects, values, phrases)
    elif value.__class__ is list:
        for item in value:
            _object(path, item, plan, objects, values, phrases)
    elif value is not None:
        raise InvalidDocumentError(
            path, f"object mapping for [{path}] tried to parse field [{path}] as object, but found a concrete value"
        )


def _leaf_list(
    entries: tuple[_Entry, ...],
    value: list[Any],
    values: dict[str, list[Any]],
    phrases: dict[str, list[tuple[str, ...]]],
) -> None:
    if entries[0][2].type == "geo_point" and _is_point_array(value):
        _scalar(entries, value, values, phrases)
        return
    for item in value:
        if item.__class__ is list:
            _leaf_list(entries, item, values, phrases)
        else:
            _scalar(entries, item, values, phrases)


def _scalar(
    entries: tuple[_Entry, ...],
    raw: Any,
    values: dict[str, list[Any]],
    phrases: dict[str, list[tuple[str, ...]]],
) -> None:
    for path, kind, spec, convert in entries:
        value = raw
        if value is None:
            if spec.null_value is None:
                continue
            value = spec.null_value
        if kind == _KEYWORD_FAST and value.__class__ is str:
            bucket = values.get(path)
            if bucket is None:
                values[path] = [value]
            else:
                bucket.append(value)
            continue
        if kind == _TEXT:
            if value.__class__ is not str:
                if isinstance(value, bool):
                    value = "true" if value else "false"
                elif isinstance(value, int | float):
                    value = keyword_text(value)
                else:
                    raise InvalidDocumentError(
                        path, f"failed to parse field [{path}] of type [text]: expected a string"
                    )
            tokens = analyze(value)
            phrases.setdefault(path, []).append(tokens)
            if tokens:
                values.setdefault(path, []).extend(tokens)
            continue
        if isinstance(value, AbcMapping) and spec.type != "geo_point":
            raise InvalidDocumentError(path, f"failed to parse field [{path}] of type [{spec.type}]: found an object")
        assert convert is not None
        try:
            indexed = convert(spec, value)
        except ValueError as exc:
            if spec.ignore_malformed:
                continue
            raise InvalidDocumentError(path, f"failed to parse field [{path}] of type [{spec.type}]: {exc}") from None
        if indexed is not None:
            bucket = values.get(path)
            if bucket is None:
                values[path] = [indexed]
            else:
                bucket.append(indexed)


def _is_point_array(value: list[Any]) -> bool:
    """``[lon, lat]`` (or ``[lon, lat, z]``) is one point, not an array of values."""
    return 2 <= len(value) <= 3 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)


def index_document(doc: AbcMapping[str, Any], mapping: Mapping) -> IndexedDoc:
    """Index ``doc`` against ``mapping``. Raises InvalidDocumentError naming the field."""
    if not isinstance(doc, AbcMapping):
        raise InvalidDocumentError("", "a document must be a JSON object")
    raw_values: dict[str, list[Any]] = {}
    raw_phrases: dict[str, list[tuple[str, ...]]] = {}
    _walk(doc, "", _plan(mapping), mapping.objects, raw_values, raw_phrases)
    # distinct values, first-seen order (text tokens repeat a lot)
    values = {
        path: (items[0],) if len(items) == 1 else tuple(dict.fromkeys(items)) for path, items in raw_values.items()
    }
    phrases = {path: tuple(seqs) for path, seqs in raw_phrases.items()}
    return IndexedDoc(values, phrases, frozenset(values))
