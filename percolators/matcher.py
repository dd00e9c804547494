"""Compiled evaluators: a rule's query tree turned, once at upsert, into closures over a batch.

An evaluator is ``f(batch, pre) -> mask``: the bitmask of the batch's documents that match the
node, where only documents in ``pre`` matter (bits outside ``pre`` may be set or not; callers AND
with ``pre``). ``pre`` lets expensive clauses (geo distance, wildcard, phrase) look only at the
documents that survived the cheap conjuncts of their ``bool``.

Semantics are Elasticsearch's as implemented by the reference matcher (``percolators.reference``);
the equivalence tests run both on random workloads.

These closures are the Python twin of the C evaluator (``percolators.programs``, ``_eval.c``),
which reuses their leaves and mirrors their interior nodes; the tests run both. Clauses whose exact semantics live in a
per-document check (phrase positions, geo distance) call the reference matcher for the few
documents that reach them, so the two can never disagree there.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

from percolators.batch import EVAL_GEO_LEVELS, METRES_PER_DEGREE, BatchIndex, geo_bbox, iter_bits, np
from percolators.query import (
    Bool,
    Exists,
    GeoDistance,
    MatchAll,
    MatchNone,
    Node,
    Phrase,
    Prefix,
    Range,
    Term,
    Terms,
    Wildcard,
)

Evaluator = Callable[[BatchIndex, int], int]

# Relative cost of evaluating a clause over a batch: cheap conjuncts run first and shrink ``pre``.
_COST_TERM = 1
_COST_TERMS = 2
_COST_RANGE = 3
_COST_PREFIX = 4
_COST_EXISTS = 4
_COST_BOOL = 5
_COST_WILDCARD = 6
_COST_GEO = 8
_COST_PHRASE = 9


def compile_node(node: Node) -> Evaluator:
    return _compile(node)[0]


#: Identical leaves of different rules (the same gender term, the same age range...) share one
#: evaluator: at 100,000 rules this saves a good part of the index's memory. Weak values: an
#: evaluator no stored rule uses any more goes away with it.
_SHARED_LEAVES: weakref.WeakValueDictionary[tuple[Any, ...], Evaluator] = weakref.WeakValueDictionary()


def _leaf_key(node: Node) -> tuple[Any, ...] | None:
    """What makes two leaves evaluate identically: everything but their clause path. (A field has
    one value type, so values that compare equal across types, 1 and 1.0, mean the same here.)"""
    if isinstance(node, Term):
        return ("t", node.field, node.value, node.case_insensitive)
    if isinstance(node, Terms):
        return ("T", node.field, node.values)
    if isinstance(node, Range):
        return ("r", node.field, node.low, node.low_inclusive, node.high, node.high_inclusive)
    if isinstance(node, Prefix):
        return ("p", node.field, node.prefix, node.case_insensitive)
    if isinstance(node, Wildcard):
        return ("w", node.field, node.regex.pattern, node.regex.flags)
    if isinstance(node, GeoDistance):
        return ("g", node.field, node.lat, node.lon, node.distance_m, node.distance_type)
    if isinstance(node, Exists):
        return ("e", node.leaves)
    return None


def leaf_key(node: Node) -> tuple[Any, ...] | None:
    """What makes two leaves evaluate identically (None: never shared), as the matcher shares them."""
    return _leaf_key(node)


def _compile(node: Node) -> tuple[Evaluator, int]:
    if isinstance(node, Bool):
        return _bool(node)
    key = _leaf_key(node)
    if key is None:
        return _compile_leaf(node)
    shared = _SHARED_LEAVES.get(key)
    if shared is not None:
        return shared, LEAF_COSTS.get(type(node), 10)
    evaluator, cost = _compile_leaf(node)
    _SHARED_LEAVES[key] = evaluator
    return evaluator, cost


def leaf_evaluator(node: Node) -> tuple[Evaluator, int, tuple[Any, ...] | None]:
    """(evaluator, cost, sharing key) of a leaf node: the evaluator shared by identical leaves of
    every rule (``percolators.programs`` reuses them; the key is None for leaves never shared)."""
    key = _leaf_key(node)
    evaluator, cost = _compile(node)
    return evaluator, cost, key


def _compile_leaf(node: Node) -> tuple[Evaluator, int]:
    if isinstance(node, Term):
        return _term(node), _COST_TERM
    if isinstance(node, Terms):
        return _terms(node), _COST_TERMS
    if isinstance(node, Bool):
        return _bool(node)
    if isinstance(node, Range):
        return _range(node), _COST_RANGE
    if isinstance(node, MatchAll):
        return _match_all, 0
    if isinstance(node, MatchNone):
        return _match_none, 0
    if isinstance(node, Exists):
        return _exists(node), _COST_EXISTS
    if isinstance(node, Prefix):
        return _prefix(node), _COST_PREFIX
    if isinstance(node, Wildcard):
        return _wildcard(node), _COST_WILDCARD
    if isinstance(node, GeoDistance):
        return _geo(node), _COST_GEO
    if isinstance(node, Phrase):
        return _phrase(node), _COST_PHRASE
    return _per_document(node), 10


LEAF_COSTS: dict[type, int] = {
    Term: _COST_TERM,
    Terms: _COST_TERMS,
    Range: _COST_RANGE,
    Exists: _COST_EXISTS,
    Prefix: _COST_PREFIX,
    Wildcard: _COST_WILDCARD,
    GeoDistance: _COST_GEO,
    Phrase: _COST_PHRASE,
}


def _match_all(batch: BatchIndex, pre: int) -> int:
    return pre


def _match_none(batch: BatchIndex, pre: int) -> int:
    return 0


def _term(node: Term) -> Evaluator:
    name = node.field
    if node.case_insensitive and isinstance(node.value, str):
        low = node.value  # the parser lower-cased it; documents' values are lower-cased per batch

        def term_ci(batch: BatchIndex, pre: int) -> int:
            return batch.lower_terms(name).get(low, 0)

        return term_ci
    key = (name, node.value)

    def term(batch: BatchIndex, pre: int) -> int:
        return batch.terms.get(key, 0)

    return term


def _terms(node: Terms) -> Evaluator:
    keys = tuple((node.field, value) for value in node.values)
    token = object()  # memo key: hashed by identity, unlike a tuple

    def terms(batch: BatchIndex, pre: int) -> int:
        got = batch.memo_get(token)
        if got is not None:
            return got
        get = batch.terms.get
        mask = 0
        for key in keys:
            mask |= get(key, 0)
        batch.memo_set(token, mask)
        return mask

    return terms


def _range(node: Range) -> Evaluator:
    name = node.field
    if node.uses_now:

        def range_now(batch: BatchIndex, pre: int) -> int:
            bounds = batch.resolved(node)
            return batch.range_mask(name, bounds.low, bounds.low_inclusive, bounds.high, bounds.high_inclusive)

        return range_now
    low, low_inc, high, high_inc = node.low, node.low_inclusive, node.high, node.high_inclusive

    def range_fixed(batch: BatchIndex, pre: int) -> int:
        return batch.range_mask(name, low, low_inc, high, high_inc)

    return range_fixed


def _exists(node: Exists) -> Evaluator:
    leaves = node.leaves

    def exists(batch: BatchIndex, pre: int) -> int:
        mask = 0
        for leaf in leaves:
            mask |= batch.present_mask(leaf)
        return mask

    return exists


def _prefix(node: Prefix) -> Evaluator:
    name, prefix, ci = node.field, node.prefix, node.case_insensitive

    def prefix_eval(batch: BatchIndex, pre: int) -> int:
        return batch.prefix_mask(name, prefix, ci)

    return prefix_eval


def _wildcard(node: Wildcard) -> Evaluator:
    name = node.field
    fullmatch = node.regex.fullmatch  # case_insensitive is in the regex's flags
    key = ("w", name, node.regex.pattern, node.regex.flags)
    # only values starting with the literal prefix can match (not so under case folding)
    prefix = "" if node.case_insensitive else node.literal_prefix

    def predicate(value: str) -> bool:
        return fullmatch(value) is not None

    def wildcard(batch: BatchIndex, pre: int) -> int:
        return batch.predicate_mask(key, name, predicate, prefix)

    return wildcard


def geo_band(node: GeoDistance) -> float | None:
    """Relative error bound of the flat-earth distance :func:`_geo` uses to skip the exact
    computation, or None when it should not be trusted (big circles, high latitudes, plane)."""
    if node.distance_type != "arc" or node.distance_m > 100_000 or abs(node.lat) > 70:
        return None
    dlat = node.distance_m / METRES_PER_DEGREE * 1.1
    # using the centre's cos(lat) for the whole circle errs by about dlat * tan(lat); keep 3x that
    # plus 2% for the curvature terms, and send everything within the band to the exact formula
    return 0.02 + 3 * math.radians(dlat) * math.tan(math.radians(abs(node.lat) + dlat))


def _geo(node: GeoDistance) -> Evaluator:
    """Documents in the grid cells (fine level) covering a generous box around the circle, then a
    per-point check: a flat-earth distance settles the points clearly inside or outside, and the
    reference's exact distance decides the ones near the edge (so results are the reference's)."""
    from percolators.reference import distance

    name, limit = node.field, node.distance_m
    box = geo_bbox(node.lat, node.lon, node.distance_m)
    band = geo_band(node)
    clat, clon = node.lat, node.lon
    cos_c = math.cos(math.radians(clat))
    limit_deg = limit / METRES_PER_DEGREE
    inner2 = (limit_deg * (1 - band)) ** 2 if band is not None and band < 0.5 else -1.0
    outer2 = (limit_deg * (1 + band)) ** 2 if band is not None and band < 0.5 else math.inf
    level, inside, edge = _geo_cells(box, clat, clon, cos_c, inner2)
    key = ("geo", name, clat, clon, limit, node.distance_type)
    exact_key = (*key, "exact")
    if np is not None:
        return _geo_numpy(node, key, box, inner2, outer2, cos_c)

    def cover(batch: BatchIndex) -> tuple[int, int]:
        if box is None:
            return 0, batch.geo_mask(name)
        get = batch.geo_cell_masks(name, level).get
        inside_mask = edge_mask = 0
        for cell in inside:
            inside_mask |= get(cell, 0)
        for cell in edge:
            edge_mask |= get(cell, 0)
        return inside_mask, edge_mask & ~inside_mask

    def check(batch: BatchIndex, todo: int) -> int:
        points = batch.geo_by_position(name)
        mask = 0
        for pos in iter_bits(todo):
            for lat, lon in points[pos]:
                dy = lat - clat
                dx = (lon - clon) * cos_c
                d2 = dx * dx + dy * dy
                if d2 < inner2 or (d2 <= outer2 and distance(node, lat, lon) <= limit):
                    mask |= 1 << pos
                    break
        return mask

    def geo(batch: BatchIndex, pre: int) -> int:
        inside_mask, edge_mask = batch.memo_pair(key, cover)
        todo = edge_mask & pre
        if not todo:
            return inside_mask
        # Rules sharing this circle share the exact checks: each document is checked at most once
        # per batch, and only when some rule needs it.
        checked, found = batch.memo_pair(exact_key, _nothing_checked)
        todo &= ~checked
        if todo:
            found |= check(batch, todo)
            batch.memo_pair_set(exact_key, (checked | todo, found))
        return inside_mask | found

    return geo


def _geo_numpy(
    node: GeoDistance,
    key: tuple[Any, ...],
    box: tuple[float, float, float, float] | None,
    inner2: float,
    outer2: float,
    cos_c: float,
) -> Evaluator:
    """The circle for the whole batch at once, once per batch for all the rules using it: the
    batch's points sorted by latitude, the box's band by binary search, its longitudes filtered,
    then the reference's distance formula vectorised. numpy's trigonometry may differ from the C
    library's in the last bits, so a point whose distance is within a hair (1e-7 relative) of the
    limit is decided by the reference's own scalar computation."""
    from percolators.geo import EARTH_MEAN_RADIUS_M
    from percolators.reference import distance

    name, limit, clat, clon = node.field, node.distance_m, node.lat, node.lon
    tolerance = limit * 1e-7 + 1e-6
    plane = node.distance_type == "plane"
    rlat1 = math.radians(clat)
    cos1 = math.cos(rlat1)

    def distances(lats: Any, lons: Any) -> Any:
        if plane:
            x = np.radians(lons - clon) * np.cos(np.radians((lats + clat) / 2.0))
            y = np.radians(lats - clat)
            return np.sqrt(x * x + y * y) * EARTH_MEAN_RADIUS_M
        rlat2 = np.radians(lats)
        h = np.sin((rlat2 - rlat1) / 2) ** 2 + cos1 * np.cos(rlat2) * np.sin(np.radians(lons - clon) / 2) ** 2
        return 2 * EARTH_MEAN_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))

    def circle(batch: BatchIndex) -> int:
        lats, lons, positions = batch.geo_sorted(name)
        if box is not None:
            lat_min, lat_max, lon_min, lon_max = box
            start, stop = lats.searchsorted(lat_min, "left"), lats.searchsorted(lat_max, "right")
            lats, lons, positions = lats[start:stop], lons[start:stop], positions[start:stop]
            keep = (lons >= lon_min) & (lons <= lon_max)
            lats, lons, positions = lats[keep], lons[keep], positions[keep]
        if not len(positions):
            return 0
        gap = distances(lats, lons) - limit
        found = positions[gap < -tolerance]
        maybe = np.flatnonzero(~(np.abs(gap) > tolerance))  # (a NaN would go to the scalar formula)
        if len(maybe):
            close = [
                pos
                for lat, lon, pos in zip(lats[maybe].tolist(), lons[maybe].tolist(), positions[maybe].tolist(),
                                         strict=True)
                if distance(node, lat, lon) <= limit
            ]
            if close:
                found = np.concatenate((found, np.array(close, dtype=np.int64)))
        return batch.mask_of_positions(found)

    def geo(batch: BatchIndex, pre: int) -> int:
        return batch.memo(key, lambda: circle(batch))

    return geo


def geo_circle_spec(node: GeoDistance) -> tuple[Any, ...]:
    """What the C evaluator (``percolators._eval``) needs to compute :func:`_geo_numpy`'s circle
    itself: (field, box or None, centre lat, centre lon, limit in metres, tolerance, plane?,
    exact(lat, lon) -> bool). Points within the tolerance of the limit are decided by ``exact``,
    the reference's own scalar distance, as in :func:`_geo_numpy`."""
    from percolators.reference import distance

    limit = node.distance_m

    def exact(lat: float, lon: float) -> bool:
        return distance(node, lat, lon) <= limit

    box = geo_bbox(node.lat, node.lon, node.distance_m)
    return (node.field, box, float(node.lat), float(node.lon), float(limit), limit * 1e-7 + 1e-6,
            node.distance_type == "plane", exact)


def _nothing_checked(batch: BatchIndex) -> tuple[int, int]:
    return 0, 0


@functools.lru_cache(maxsize=4096)
def _geo_cells(
    box: tuple[float, float, float, float] | None, clat: float, clon: float, cos_c: float, inner2: float
) -> tuple[float, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """(level, cells wholly inside the circle, other cells of the box) on the finest grid that
    keeps the box within 256 cells. The flat distance is a convex function, so its maximum over
    a cell is at a corner: four corners clearly inside (``< inner2``) put the whole cell inside."""
    if box is None:
        return EVAL_GEO_LEVELS[-1], (), ()
    lat_min, lat_max, lon_min, lon_max = box
    for level in EVAL_GEO_LEVELS:
        i0, i1 = math.floor(lat_min / level), math.floor(lat_max / level)
        j0, j1 = math.floor(lon_min / level), math.floor(lon_max / level)
        if (i1 - i0 + 1) * (j1 - j0 + 1) <= 256 or level == EVAL_GEO_LEVELS[-1]:
            break
    inside: list[tuple[int, int]] = []
    edge: list[tuple[int, int]] = []
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            corners_in = True
            for lat in (i * level, (i + 1) * level):
                for lon in (j * level, (j + 1) * level):
                    dy = lat - clat
                    dx = (lon - clon) * cos_c
                    if dx * dx + dy * dy >= inner2:
                        corners_in = False
            (inside if corners_in else edge).append((i, j))
    return level, tuple(inside), tuple(edge)


def _phrase(node: Phrase) -> Evaluator:
    """Documents holding every token (cheap, from the term masks), then the reference's exact
    position check."""
    from percolators.reference import matches

    keys = tuple((node.field, token) for token in node.tokens)

    def phrase(batch: BatchIndex, pre: int) -> int:
        todo = pre
        get = batch.terms.get
        for key in keys:
            todo &= get(key, 0)
            if not todo:
                return 0
        docs, now_ms = batch.docs, batch.now_ms
        mask = 0
        for pos in iter_bits(todo):
            if matches(node, docs[pos], now_ms):
                mask |= 1 << pos
        return mask

    return phrase


def _per_document(node: Any) -> Evaluator:
    """Fallback for a node type this module does not know: the reference, document by document."""
    from percolators.reference import matches

    def per_document(batch: BatchIndex, pre: int) -> int:
        docs, now_ms = batch.docs, batch.now_ms
        mask = 0
        for pos in iter_bits(pre):
            if matches(node, docs[pos], now_ms):
                mask |= 1 << pos
        return mask

    return per_document


def _bool(node: Bool) -> tuple[Evaluator, int]:
    msm = node.minimum_should_match
    if msm > len(node.should):
        return _match_none, 0
    required = sorted((_compile(child) for child in (*node.must, *node.filter)), key=_cost)
    excluded = sorted((_compile(child) for child in node.must_not), key=_cost)
    optional = sorted((_compile(child) for child in node.should), key=_cost) if msm > 0 else []
    cost = _COST_BOOL + sum(c for _, c in required) + sum(c for _, c in excluded) + sum(c for _, c in optional)
    req = tuple(f for f, _ in required)
    nots = tuple(f for f, _ in excluded)
    opt = tuple(f for f, _ in optional)

    # The common audience shape: a conjunction of plain term lookups, possibly with exclusions.
    if (
        not opt
        and node.must + node.filter
        and all(isinstance(c, Term) and not c.case_insensitive for c in (*node.must, *node.filter))
    ):
        terms = [c for c in (*node.must, *node.filter) if isinstance(c, Term)]
        keys = tuple((c.field, c.value) for c in sorted(terms, key=_term_order))

        def and_terms(batch: BatchIndex, pre: int) -> int:
            get = batch.terms.get
            mask = pre
            for key in keys:
                mask &= get(key, 0)
                if not mask:
                    return 0
            for f in nots:
                mask ^= mask & f(batch, mask)  # mask & ~x, without the (slow) negative int
                if not mask:
                    return 0
            return mask

        return and_terms, cost

    if msm <= 1:

        def bool_eval(batch: BatchIndex, pre: int) -> int:
            mask = pre
            for f in req:
                mask &= f(batch, mask)
                if not mask:
                    return 0
            if opt:
                any_mask = 0
                for f in opt:
                    any_mask |= f(batch, mask ^ (mask & any_mask))
                mask &= any_mask
                if not mask:
                    return 0
            for f in nots:
                mask ^= mask & f(batch, mask)  # mask & ~x, without the (slow) negative int
                if not mask:
                    return 0
            return mask

        return bool_eval, cost

    def bool_msm(batch: BatchIndex, pre: int) -> int:
        mask = pre
        for f in req:
            mask &= f(batch, mask)
            if not mask:
                return 0
        mask &= at_least(msm, [f(batch, mask) & mask for f in opt])
        if not mask:
            return 0
        for f in nots:
            mask ^= mask & f(batch, mask)  # mask & ~x, without the (slow) negative int
            if not mask:
                return 0
        return mask

    return bool_msm, cost


def _cost(pair: tuple[Evaluator, int]) -> int:
    return pair[1]


def _term_order(node: Term) -> int:
    # Evaluate the rarer-looking lookups first so the AND empties early (a guess; the result is the same).
    return 0 if not isinstance(node.value, bool) else 1


def at_least(k: int, masks: list[int]) -> int:
    """Bits set in at least ``k`` of ``masks``: a bit-sliced counter (one int per binary digit of
    the count) and a comparison circuit, so the work is per mask, not per document."""
    if k <= 0:
        return -1
    if k > len(masks):
        return 0
    if k == 1:
        out = 0
        for m in masks:
            out |= m
        return out
    if k == len(masks):
        out = masks[0]
        for m in masks[1:]:
            out &= m
        return out
    planes: list[int] = []
    for m in masks:
        carry = m
        i = 0
        while carry:
            if i == len(planes):
                planes.append(carry)
                break
            planes[i], carry = planes[i] ^ carry, planes[i] & carry
            i += 1
    union = 0
    for m in masks:
        union |= m
    nbits = max(len(planes), k.bit_length())
    planes.extend([0] * (nbits - len(planes)))
    greater = 0
    equal = union
    for i in range(nbits - 1, -1, -1):
        if (k >> i) & 1:
            equal &= planes[i]
        else:
            greater |= equal & planes[i]
            equal ^= equal & planes[i]
    return greater | equal
