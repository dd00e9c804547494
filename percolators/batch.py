"""The batch index: a tiny in-memory inverted index over one batch of documents.

Lucene Monitor turns each document into a one-document in-memory index; we do the same for a whole
*batch*, with Python ints as bitmaps of document positions (bit ``i`` = the ``i``-th document of
the batch). A compiled rule (``percolators.matcher``) then evaluates to a bitmask for the whole
batch with a handful of AND/OR/ANDNOT operations on ints, instead of a Python loop per document:
that is what makes tens of thousands of documents per second reachable in pure Python.

Only the fields some stored rule mentions are indexed (``fields``); everything that only a few
rules need (sorted values for ranges, lower-cased values, presence, geo grids) is built lazily on
first use and memoised for the batch, so a range used by thousands of rules is computed once.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Sequence
from itertools import chain
from typing import Any

from percolators.analysis import ascii_lower
from percolators.query import ResolvedRange

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a core dependency
    np = None  # type: ignore[assignment]

try:
    from percolators import _walk  # type: ignore[attr-defined, unused-ignore]
except ImportError:  # not built: the Python loops below do the same, slower
    _walk = None

#: The C twin of :func:`mask_of` and of ``BatchIndex.__init__``'s mask building (``percolators._walk``);
#: None: the Python code. Tests and benchmarks set it to None to run the Python twin.
accelerator: Any = _walk

#: Grid sizes (degrees) of the geo cells used by the presearcher (coarse: few probes per point)
#: and by the geo evaluator (fine: most cells of a circle lie wholly inside or outside it).
GEO_LEVELS: tuple[float, ...] = (0.05, 0.2, 1.0, 5.0)
EVAL_GEO_LEVELS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Metres per degree of latitude (on the sphere Elasticsearch uses), for bounding boxes.
METRES_PER_DEGREE = 6_371_008.7714 * math.pi / 180.0


def mask_of(positions: list[int]) -> int:
    """The bitmask with the given bits set (duplicates allowed)."""
    if accelerator is not None and type(positions) is list:
        return accelerator.mask_of(positions)  # type: ignore[no-any-return, unused-ignore]
    if len(positions) < 12:
        mask = 0
        for pos in positions:
            mask |= 1 << pos
        return mask
    if len(positions) >= 256 and np is not None:
        bits = np.zeros(max(positions) + 1, dtype=np.bool_)
        bits[positions] = True
        return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")
    buf = bytearray((max(positions) >> 3) + 1)
    for pos in positions:
        buf[pos >> 3] |= 1 << (pos & 7)
    return int.from_bytes(buf, "little")


def geo_cell(level: float, lat: float, lon: float) -> tuple[int, int]:
    return (math.floor(lat / level), math.floor(lon / level))


def geo_bbox(lat: float, lon: float, distance_m: float) -> tuple[float, float, float, float] | None:
    """A generous (lat_min, lat_max, lon_min, lon_max) box around a circle; None when it wraps the
    date line or reaches a pole (then every point is a candidate). Generous on purpose: it only
    pre-filters, the exact distance decides."""
    dlat = distance_m / METRES_PER_DEGREE * 1.05 + 1e-6
    lat_min, lat_max = lat - dlat, lat + dlat
    if lat_min <= -89.0 or lat_max >= 89.0:
        return None
    cos_edge = math.cos(math.radians(max(abs(lat_min), abs(lat_max))))
    dlon = dlat / cos_edge * 1.05 + 1e-6
    lon_min, lon_max = lon - dlon, lon + dlon
    if lon_min < -180.0 or lon_max > 180.0 or dlon >= 90.0:
        return None
    return lat_min, lat_max, lon_min, lon_max


class BatchIndex:
    """Bitmask postings of one batch of indexed documents (see the module docstring).

    ``docs`` are ``percolators.document.IndexedDoc`` objects (``.values``: leaf path -> tuple of
    indexed values; ``.present``: the leaf paths that exist). ``fields``: the fields to index
    (None: all); ``geo_fields``: which of them are geo_point fields (kept as points, not terms).
    """

    __slots__ = (
        "_by_field",
        "_cache",
        "_field_masks",
        "_geo",
        "_geo_grid",
        "_geo_pos",
        "_geo_sorted",
        "_lower",
        "_pairs",
        "_present",
        "_resolved",
        "all",
        "docs",
        "now_ms",
        "size",
        "terms",
    )

    def __init__(
        self,
        docs: Sequence[Any],
        now_ms: int,
        fields: Collection[str] | None = None,
        geo_fields: Collection[str] = (),
        *,
        postings: dict[str, dict[Any, list[int]]] | None = None,
        geo: dict[str, list[tuple[int, float, float]]] | None = None,
    ) -> None:
        """Index ``docs``; or, when ``postings`` (field -> value -> document positions) and
        ``geo`` (field -> (position, lat, lon) points) were already built from them (see
        ``percolators.fast_index.FastIndexer.index_batch``), use those."""
        self.docs = docs
        self.size = len(docs)
        self.all = (1 << self.size) - 1
        self.now_ms = now_ms
        if postings is None or geo is None:
            postings, geo = collect_postings(docs, fields, geo_fields)
        terms: dict[tuple[str, Any], int]
        field_masks: dict[str, dict[Any, int]]
        if accelerator is not None:
            terms, field_masks = accelerator.masks(postings)
        else:
            terms, field_masks = {}, {}
            for name, by_value in postings.items():
                masks_of: dict[Any, int] = {}
                for value, positions in by_value.items():
                    mask = (1 << positions[0]) if len(positions) == 1 else mask_of(positions)
                    masks_of[value] = mask
                    terms[(name, value)] = mask
                if masks_of:
                    field_masks[name] = masks_of
        self.terms = terms
        self._field_masks = field_masks
        self._geo = geo
        self._geo_grid: dict[tuple[str, float], dict[tuple[int, int], int]] = {}
        self._by_field: dict[str, tuple[list[Any], list[int]]] = {}
        self._lower: dict[str, dict[str, int]] = {}
        self._present: dict[str, int] | None = None
        self._cache: dict[Any, int] = {}
        self._pairs: dict[Any, tuple[int, int]] = {}
        self._geo_pos: dict[str, list[list[tuple[float, float]]]] = {}
        self._geo_sorted: dict[str, tuple[Any, Any, Any]] = {}
        self._resolved: dict[Any, ResolvedRange] = {}

    # ----- per-field views, built on first use ---------------------------------------------
    def field_values(self, name: str) -> tuple[list[Any], list[int]]:
        """The field's distinct values in the batch, sorted, and the mask of each."""
        got = self._by_field.get(name)
        if got is None:
            pairs = list(self._field_masks.get(name, {}).items())
            try:
                pairs.sort(key=_first)
            except TypeError:  # mixed types cannot happen with a typed mapping; stay safe
                pairs.sort(key=lambda pair: repr(pair[0]))
            got = self._by_field[name] = ([p[0] for p in pairs], [p[1] for p in pairs])
        return got

    def lower_terms(self, name: str) -> dict[str, int]:
        """Lower-cased string value -> mask, for case-insensitive term/prefix/wildcard."""
        got = self._lower.get(name)
        if got is None:
            got = {}
            values, masks = self.field_values(name)
            for value, mask in zip(values, masks, strict=True):
                if isinstance(value, str):
                    low = ascii_lower(value)
                    got[low] = got.get(low, 0) | mask
            self._lower[name] = got
        return got

    def present_mask(self, name: str) -> int:
        if self._present is None:
            acc: dict[str, list[int]] = {}
            for pos, doc in enumerate(self.docs):
                for path in doc.present:
                    acc.setdefault(path, []).append(pos)
            self._present = {path: mask_of(positions) for path, positions in acc.items()}
        return self._present.get(name, 0)

    def geo_points(self, name: str) -> list[tuple[int, float, float]]:
        return self._geo.get(name, [])

    def geo_cell_masks(self, name: str, level: float) -> dict[tuple[int, int], int]:
        """Grid cell -> mask of the documents with a point in it."""
        key = (name, level)
        grid = self._geo_grid.get(key)
        if grid is None:
            acc: dict[tuple[int, int], list[int]] = {}
            for pos, lat, lon in self._geo.get(name, ()):
                acc.setdefault(geo_cell(level, lat, lon), []).append(pos)
            grid = self._geo_grid[key] = {cell: mask_of(positions) for cell, positions in acc.items()}
        return grid

    def geo_by_position(self, name: str) -> list[list[tuple[float, float]]]:
        """Each document's points in the geo field (empty list: none), by batch position."""
        got = self._geo_pos.get(name)
        if got is None:
            got = [[] for _ in range(self.size)]
            for pos, lat, lon in self._geo.get(name, ()):
                got[pos].append((lat, lon))
            self._geo_pos[name] = got
        return got

    def geo_sorted(self, name: str) -> tuple[Any, Any, Any]:
        """The geo field's points as numpy arrays (lat, lon, batch position), sorted by lat."""
        got = self._geo_sorted.get(name)
        if got is None:
            points = self._geo.get(name, ())
            # one pass over the (position, lat, lon) tuples in C, not three generators (a Python step
            # per point each; np.array of tuples is slower still); a batch position is far below
            # 2**53, so it is exact as a float
            flat = np.fromiter(chain.from_iterable(points), dtype=np.float64, count=3 * len(points))
            table = flat.reshape(len(points), 3)
            lats, lons = table[:, 1].copy(), table[:, 2].copy()
            positions = table[:, 0].astype(np.int64)
            order = np.argsort(lats, kind="stable")
            got = self._geo_sorted[name] = (lats[order], lons[order], positions[order])
        return got

    def mask_of_positions(self, positions: Any) -> int:
        """The mask of a numpy array of batch positions (duplicates allowed)."""
        if len(positions) < 24:
            mask = 0
            for pos in positions.tolist():
                mask |= 1 << pos
            return mask
        bits = np.zeros(self.size, dtype=np.bool_)
        bits[positions] = True
        return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")

    def geo_mask(self, name: str) -> int:
        """Documents with at least one point in the geo field."""
        return self.memo(("geo", name), lambda: mask_of([pos for pos, _, _ in self._geo.get(name, ())]))

    # ----- memoised masks --------------------------------------------------------------------
    def resolved(self, node: Any) -> ResolvedRange:
        """A range's bounds at this batch's ``now`` (date math resolved once per batch)."""
        key = (node.field, node.low, node.low_inclusive, node.high, node.high_inclusive)
        got = self._resolved.get(key)
        if got is None:
            got = self._resolved[key] = node.resolve(self.now_ms)
        return got

    def range_mask(self, name: str, low: Any, low_inc: bool, high: Any, high_inc: bool) -> int:
        key = ("r", name, low, low_inc, high, high_inc)
        got = self._cache.get(key)
        if got is not None:
            return got
        values, masks = self.field_values(name)
        mask = 0
        if values:
            try:
                start, stop = 0, len(values)
                if low is not None:
                    start = bisect_left(values, low) if low_inc else bisect_right(values, low)
                if high is not None:
                    stop = bisect_right(values, high) if high_inc else bisect_left(values, high)
                for part in masks[start:stop]:
                    mask |= part
            except TypeError:  # bound of another type than the values: compare one by one
                check = ResolvedRange(low, low_inc, high, high_inc)
                for value, part in zip(values, masks, strict=True):
                    try:
                        if check.contains(value):
                            mask |= part
                    except TypeError:
                        continue
        self._cache[key] = mask
        return mask

    def prefix_mask(self, name: str, prefix: str, case_insensitive: bool) -> int:
        key = ("p", name, prefix, case_insensitive)
        got = self._cache.get(key)
        if got is not None:
            return got
        mask = 0
        if case_insensitive:  # ``prefix`` is already lower-cased by the parser
            for value, part in self.lower_terms(name).items():
                if value.startswith(prefix):
                    mask |= part
        else:
            values, masks = self.field_values(name)
            # the values starting with ``prefix`` are a contiguous run of the sorted values
            try:
                i = bisect_left(values, prefix)
            except TypeError:
                i = len(values)
            n = len(values)
            while i < n:
                value = values[i]
                if not (isinstance(value, str) and value.startswith(prefix)):
                    break
                mask |= masks[i]
                i += 1
        self._cache[key] = mask
        return mask

    def predicate_mask(self, key: Any, name: str, predicate: Callable[[Any], bool], prefix: str = "") -> int:
        """OR of the masks of the field's distinct string values (those starting with ``prefix``)
        satisfying ``predicate``, memoised by ``key``."""
        got = self._cache.get(key)
        if got is not None:
            return got
        mask = 0
        values, masks = self.field_values(name)
        try:
            i = bisect_left(values, prefix) if prefix else 0
        except TypeError:
            i = len(values)
        n = len(values)
        while i < n:
            value = values[i]
            if isinstance(value, str):
                if not value.startswith(prefix):
                    break
                if predicate(value):
                    mask |= masks[i]
            i += 1
        self._cache[key] = mask
        return mask

    def memo_get(self, key: Any) -> int | None:
        return self._cache.get(key)

    def memo_set(self, key: Any, mask: int) -> None:
        self._cache[key] = mask

    def memo_pair(self, key: Any, compute: Callable[[BatchIndex], tuple[int, int]]) -> tuple[int, int]:
        got = self._pairs.get(key)
        if got is None:
            got = self._pairs[key] = compute(self)
        return got

    def memo_pair_set(self, key: Any, value: tuple[int, int]) -> None:
        self._pairs[key] = value

    def memo(self, key: Any, compute: Callable[[], int]) -> int:
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = compute()
        return got


def collect_postings(
    docs: Sequence[Any], fields: Collection[str] | None, geo_fields: Collection[str]
) -> tuple[dict[str, dict[Any, list[int]]], dict[str, list[tuple[int, float, float]]]]:
    """Field -> value -> positions, and geo field -> points, of indexed documents."""
    postings: dict[str, dict[Any, list[int]]] = {}
    geo: dict[str, list[tuple[int, float, float]]] = {}
    geo_fields = frozenset(geo_fields)
    for pos, doc in enumerate(docs):
        add_postings(pos, doc, fields, geo_fields, postings, geo)
    return postings, geo


def add_postings(
    pos: int,
    doc: Any,
    fields: Collection[str] | None,
    geo_fields: Collection[str],
    postings: dict[str, dict[Any, list[int]]],
    geo: dict[str, list[tuple[int, float, float]]],
) -> None:
    """Add one indexed document (at batch position ``pos``) to ``postings`` and ``geo``."""
    for name, values in doc.values.items():
        if fields is not None and name not in fields:
            continue
        if name in geo_fields:
            points = geo.setdefault(name, [])
            for lat, lon in values:
                points.append((pos, lat, lon))
            continue
        by_value = postings.get(name)
        if by_value is None:
            by_value = postings[name] = {}
        for value in values:
            got = by_value.get(value)
            if got is None:
                by_value[value] = [pos]
            else:
                got.append(pos)


def _first(pair: tuple[Any, int]) -> Any:
    return pair[0]


def iter_bits(mask: int) -> list[int]:
    """Positions of the set bits of ``mask``, ascending."""
    out = []
    text = bin(mask)
    top = len(text) - 1
    i = text.find("1", 2)
    while i >= 0:
        out.append(top - i)
        i = text.find("1", i + 1)
    out.reverse()
    return out
