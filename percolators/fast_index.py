"""A fast path for indexing documents whose values are already in their plain JSON form.

``percolators.document.index_document`` implements every Elasticsearch coercion and costs ~30 µs
per user document, more than the whole percolation budget at 50,000 documents/s. Most documents
need none of it: keyword fields hold strings, integer fields ints, dates the ISO 8601 UTC text bid
normalisation writes, geo points ``{"lat": .., "lon": ..}``. :class:`FastIndexer` handles exactly
those shapes and hands any document with anything else (a coercion, a text field, a malformed
value, dotted keys, nulls with ``null_value``...) to ``index_document``, so errors and unusual
values always get the full treatment. ``tests/percolators/test_engine.py`` checks that both
produce the same indexed documents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping as AbcMapping
from datetime import UTC, datetime
from typing import Any

from percolators.document import IndexedDoc, index_document
from percolators.geo import quantize
from percolators.mapping import DEFAULT_DATE_FORMAT, INTEGER_TYPES, Mapping

_OBJECT, _KEYWORD, _INTEGER, _DATE, _GEO = range(5)
_ISO_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{3}))?Z")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Slow(Exception):
    """The document needs the full indexer."""


class FastIndexer:
    def __init__(self, mapping: Mapping):
        self.mapping = mapping
        self.plan: dict[str, Any] = {}
        self._days: dict[str, int] = {}
        for path, spec in mapping.fields.items():
            kind: int | None = None
            if len(mapping.by_source.get(spec.source, ())) == 1 and spec.source == path and spec.null_value is None:
                if spec.type == "keyword" and spec.ignore_above is None:
                    kind = _KEYWORD
                elif spec.type in INTEGER_TYPES:
                    kind = _INTEGER
                elif spec.type == "date" and spec.date_format == DEFAULT_DATE_FORMAT and not spec.ignore_malformed:
                    kind = _DATE
                elif spec.type == "geo_point" and not spec.ignore_malformed:
                    kind = _GEO
            self._place(path, kind, spec.type)

    def _place(self, path: str, kind: int | None, ftype: str) -> None:
        parts = path.split(".")
        node = self.plan
        for part in parts[:-1]:
            entry = node.get(part)
            if entry is None or entry[0] != _OBJECT:
                entry = node[part] = (_OBJECT, "", {})
            node = entry[2]
        bounds = INTEGER_TYPES.get(ftype, (0, 0))
        node[parts[-1]] = (kind, path, bounds)

    def index(self, doc: AbcMapping[str, Any]) -> IndexedDoc:
        """Same result (and errors) as ``index_document(doc, mapping)``."""
        if type(doc) is dict:
            values: dict[str, tuple[Any, ...]] = {}
            try:
                self._walk(doc, self.plan, values)
            except _Slow:
                pass
            else:
                return IndexedDoc(values, {}, frozenset(values))
        return index_document(doc, self.mapping)

    def _walk(self, obj: dict[str, Any], plan: dict[str, Any], values: dict[str, tuple[Any, ...]]) -> None:
        for key, value in obj.items():
            entry = plan.get(key)
            if entry is None:
                if "." in key:
                    raise _Slow
                continue  # unmapped: ignored
            kind = entry[0]
            vtype = type(value)
            # the common cases inline: a string in a keyword field, an int in an integer field
            if vtype is str and kind == _KEYWORD:
                values[entry[1]] = (value,)
            elif kind == _OBJECT:
                if vtype is not dict:
                    raise _Slow
                self._walk(value, entry[2], values)
            elif vtype is list:
                if not value:
                    continue
                if kind == _KEYWORD:
                    for item in value:
                        if type(item) is not str:
                            raise _Slow
                    values[entry[1]] = tuple(dict.fromkeys(value)) if len(value) > 1 else (value[0],)
                else:
                    items = [self._scalar(kind, entry, item) for item in value]
                    values[entry[1]] = tuple(dict.fromkeys(items)) if len(items) > 1 else (items[0],)
            elif vtype is int and kind == _INTEGER and entry[2][0] <= value <= entry[2][1]:
                values[entry[1]] = (value,)
            else:
                values[entry[1]] = (self._scalar(kind, entry, value),)

    def _scalar(self, kind: int | None, entry: Any, value: Any) -> Any:
        if kind == _KEYWORD:
            if type(value) is str:
                return value
        elif kind == _INTEGER:
            if type(value) is int:
                low, high = entry[2]
                if low <= value <= high:
                    return value
        elif kind == _DATE:
            if type(value) is str:
                return self._date(value)
        elif kind == _GEO and type(value) is dict and len(value) == 2:
            lat, lon = value.get("lat"), value.get("lon")
            if (
                type(lat) is float
                and type(lon) is float
                and -90.0 <= lat <= 90.0
                and -180.0 <= lon <= 180.0
            ):
                return quantize(lat, lon)
        raise _Slow

    def _date(self, text: str) -> int:
        match = _ISO_UTC.fullmatch(text)
        if match is None:
            raise _Slow
        day = text[:10]
        day_ms = self._days.get(day)
        if day_ms is None:
            try:
                moment = datetime(int(match[1]), int(match[2]), int(match[3]), tzinfo=UTC)
            except ValueError:
                raise _Slow from None
            day_ms = (moment - _EPOCH) // _ONE_MS
            if len(self._days) > 4096:
                self._days.clear()
            self._days[day] = day_ms
        hour, minute, second = int(match[4]), int(match[5]), int(match[6])
        if hour > 23 or minute > 59 or second > 59:
            raise _Slow
        millis = int(match[7]) if match[7] else 0
        return day_ms + ((hour * 60 + minute) * 60 + second) * 1000 + millis


_ONE_MS = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - _EPOCH
