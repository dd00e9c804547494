"""A fast path for indexing documents whose values are already in their plain JSON form.

``percolators.document.index_document`` implements every Elasticsearch coercion and costs ~30 µs
per user document, more than the whole percolation budget at 50,000 documents/s. Most documents
need none of it: keyword fields hold strings, integer fields ints, dates the ISO 8601 UTC text bid
normalisation writes, geo points ``{"lat": .., "lon": ..}``. :class:`FastIndexer` handles exactly
those shapes and hands any document with anything else (a coercion, a text field, a malformed
value, dotted keys, nulls with ``null_value``...) to ``index_document``, so errors and unusual
values always get the full treatment. ``tests/percolators/test_engine.py`` checks that both
produce the same indexed documents.

:meth:`FastIndexer.index_batch` runs its fast path in C when ``percolators._walk`` is built
(``percolators/_walk.c``: it only posts, each document's values are built on first read); the
Python walk here stays the reference, and
``tests/percolators/test_walk_accel.py`` checks that both give identical results. Set the module
attribute ``accelerator`` to None (or pass ``accelerate=False``) to force the Python walk.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from collections.abc import Mapping as AbcMapping
from datetime import UTC, datetime
from typing import Any

from percolators.batch import add_postings
from percolators.document import IndexedDoc, index_document
from percolators.errors import InvalidDocumentError
from percolators.geo import quantize
from percolators.mapping import DEFAULT_DATE_FORMAT, INTEGER_TYPES, Mapping

try:
    from percolators import _walk  # type: ignore[attr-defined, unused-ignore]
except ImportError:  # not built: the Python walk does the same, slower
    _walk = None

#: The C walk used by :meth:`FastIndexer.index_batch` (None: the Python walk). Tests and
#: benchmarks set it to None to run the Python twin.
accelerator: Any = _walk

_OBJECT, _KEYWORD, _INTEGER, _DATE, _GEO = range(5)
_OTHER = 5  # the C plan's code for a leaf the fast path never takes (kind None here)
_ISO_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{3}))?Z")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Slow(Exception):
    """The document needs the full indexer."""


class FastIndexer:
    def __init__(self, mapping: Mapping, *, accelerate: bool = True):
        self.mapping = mapping
        self.accelerate = accelerate
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
        #: the plan with no postings: what :meth:`index` walks (one document, nothing posted)
        self._unposted_plan = self._batch_plan(self.plan, {})

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
                self._walk_post(doc, self._unposted_plan, values, 0)  # the batch walk, posting nothing
            except _Slow:
                pass
            else:
                return IndexedDoc(values, {}, frozenset(values))
        return index_document(doc, self.mapping)

    # ----- a whole batch, straight into postings -----------------------------------------------
    def index_batch(
        self,
        documents: Sequence[Any],
        fields: Collection[str],
        geo_fields: Collection[str],
        on_error: str,
    ) -> BatchBuild:
        """Index ``documents`` and, in the same walk, collect the batch postings of ``fields``
        (what ``percolators.batch.collect_postings`` would collect from the indexed documents).

        A document that is not a mapping, or that ``index_document`` rejects, is an error: raised
        when ``on_error`` is "raise", else recorded by its position in ``documents`` and left out
        of the batch (batch positions count the indexed documents only)."""
        geo_fields = frozenset(geo_fields)
        postings: dict[str, dict[Any, list[int]]] = {}
        geo: dict[str, list[tuple[int, float, float]]] = {}
        posts: dict[str, Any] = {}
        for name in fields:
            if name in geo_fields:
                posts[name] = geo[name] = []
            else:
                posts[name] = postings[name] = {}
        build = BatchBuild(postings, geo)
        walk = accelerator if self.accelerate else None
        if walk is not None:
            if type(documents) is not list and type(documents) is not tuple:
                documents = list(documents)
            cplan = self._c_plan(self.plan, posts)
            docs, slots, size, slot = build.docs, build.slots, len(documents), 0
            while True:
                slot = walk.walk(documents, slot, cplan, docs, slots, self.index, self._date_or_none)
                if slot >= size:
                    return build
                self._index_full(build, slot, documents[slot], fields, geo_fields, on_error)
                slot += 1
        plan = self._batch_plan(self.plan, posts)
        docs, slots = build.docs, build.slots
        walk_post = self._walk_post
        for slot, document in enumerate(documents):
            pos = len(docs)
            if type(document) is dict:
                values: dict[str, tuple[Any, ...]] = {}
                try:
                    walk_post(document, plan, values, pos)
                except _Slow:
                    _undo(values, posts, pos)
                else:
                    docs.append(IndexedDoc(values, {}, frozenset(values)))
                    slots.append(slot)
                    continue
            self._index_full(build, slot, document, fields, geo_fields, on_error)
        return build

    def _index_full(
        self, build: BatchBuild, slot: int, document: Any, fields: Collection[str], geo_fields: Collection[str],
        on_error: str,
    ) -> None:
        """Index one document of the batch with ``index_document`` (errors: see index_batch)."""
        try:
            if not isinstance(document, AbcMapping):
                raise InvalidDocumentError("", f"a document must be a JSON object, not {type(document).__name__}")
            indexed = index_document(document, self.mapping)
        except InvalidDocumentError as exc:
            if on_error == "raise":
                raise
            build.errors[slot] = exc
            return
        add_postings(len(build.docs), indexed, fields, geo_fields, build.postings, build.geo)
        build.docs.append(indexed)
        build.slots.append(slot)

    def _c_plan(self, plan: dict[str, Any], posts: dict[str, Any]) -> dict[str, Any]:
        """The plan in the shape ``percolators._walk.walk`` reads (see ``_walk.c``)."""
        out: dict[str, Any] = {}
        for key, entry in plan.items():
            if entry[0] == _OBJECT:
                out[key] = (_OBJECT, self._c_plan(entry[2], posts))
            else:
                kind = _OTHER if entry[0] is None else entry[0]
                out[key] = (kind, entry[1], entry[2][0], entry[2][1], posts.get(entry[1]))
        return out

    def _date_or_none(self, text: str) -> int | None:
        """``_date`` for the C walk (which hands it non-ASCII text only): None for _Slow."""
        try:
            return self._date(text)
        except _Slow:
            return None

    def _batch_plan(self, plan: dict[str, Any], posts: dict[str, Any]) -> dict[str, Any]:
        """The plan with each leaf's postings (None: not indexed in this batch)."""
        out: dict[str, Any] = {}
        for key, entry in plan.items():
            if entry[0] == _OBJECT:
                out[key] = (_OBJECT, "", self._batch_plan(entry[2], posts), None)
            else:
                out[key] = (*entry, posts.get(entry[1]))
        return out

    def _walk_post(
        self, obj: dict[str, Any], plan: dict[str, Any], values: dict[str, tuple[Any, ...]], pos: int
    ) -> None:
        """Walk ``obj`` with ``plan`` into ``values`` (leaf path -> indexed values), appending ``pos``
        to the postings of each value it indexes (for a geo field, the point; leaves whose posting
        is None are not posted). On ``_Slow``, ``values`` holds exactly what was posted."""
        for key, value in obj.items():
            entry = plan.get(key)
            if entry is None:
                if "." in key:
                    raise _Slow
                continue  # unmapped: ignored
            kind, path, extra, post = entry
            vtype = type(value)
            if vtype is str and kind == _KEYWORD:
                values[path] = (value,)
                if post is not None:
                    got = post.get(value)
                    if got is None:
                        post[value] = [pos]
                    else:
                        got.append(pos)
                continue
            if kind == _OBJECT:
                if vtype is not dict:
                    raise _Slow
                self._walk_post(value, extra, values, pos)
                continue
            if vtype is list:
                if not value:
                    continue
                if kind == _KEYWORD:
                    for item in value:
                        if type(item) is not str:
                            raise _Slow
                    items = tuple(dict.fromkeys(value)) if len(value) > 1 else (value[0],)
                else:
                    scalars = [self._scalar(kind, entry, item) for item in value]
                    items = tuple(dict.fromkeys(scalars)) if len(scalars) > 1 else (scalars[0],)
            elif vtype is int and kind == _INTEGER and extra[0] <= value <= extra[1]:
                items = (value,)
            elif vtype is str and kind == _DATE:
                items = (self._date(value),)
            else:
                items = (self._scalar(kind, entry, value),)
            values[path] = items
            if post is None:
                continue
            if kind == _GEO:
                for lat, lon in items:
                    post.append((pos, lat, lon))
                continue
            for item in items:
                got = post.get(item)
                if got is None:
                    post[item] = [pos]
                else:
                    got.append(pos)

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


class BatchBuild:
    """What :meth:`FastIndexer.index_batch` returns: the indexed documents (``docs``), the
    position in the input of each (``slots``), the input positions that failed (``errors``), and
    the batch postings (``postings``: field -> value -> batch positions; ``geo``: geo field ->
    (batch position, lat, lon) points) for ``percolators.batch.BatchIndex``.

    The C walk's documents are ``percolators._walk.LazyDoc`` objects: IndexedDoc's attributes,
    built from the source document on first read (the batch evaluation rarely reads them), so
    the source documents must not change while the build is in use."""

    __slots__ = ("docs", "errors", "geo", "postings", "slots")

    def __init__(self, postings: dict[str, dict[Any, list[int]]], geo: dict[str, list[tuple[int, float, float]]]):
        self.docs: list[IndexedDoc] = []  # or LazyDoc (same attributes), see above
        self.slots: list[int] = []
        self.errors: dict[int, InvalidDocumentError] = {}
        self.postings = postings
        self.geo = geo


def _undo(values: dict[str, tuple[Any, ...]], posts: dict[str, Any], pos: int) -> None:
    """Take back what ``_walk_post`` posted for the document at ``pos`` before it gave up."""
    for name, items in values.items():
        post = posts.get(name)
        if post is None:
            continue
        if isinstance(post, list):  # geo points
            while post and post[-1][0] == pos:
                post.pop()
            continue
        for item in items:
            got = post[item]
            got.pop()
            if not got:
                del post[item]


_ONE_MS = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - _EPOCH
