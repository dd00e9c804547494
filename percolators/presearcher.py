"""Presearchers: which stored rules can possibly match a batch (Lucene Monitor's design).

For each rule the indexed presearcher extracts an *anchor*: a set of keys at least one of which
every matching document must produce. A batch produces its keys (its terms, plus derived keys for
prefixes, integer buckets and geo cells); the candidate rules are the union of the postings of
those keys, plus the rules without an anchor ("always candidates"). Candidates are then verified
exactly by the matcher, so the presearcher may over-select but never miss.

Anchor keys:

* ``(field, value)``: a term (the batch's term keys are used as they are);
* ``(CI, field, lowercased)``: a case-insensitive term;
* ``(PREFIX, field, prefix)`` / ``(PREFIX_CI, field, lowercased prefix)``: prefix and the literal
  prefix of a wildcard; the batch probes each distinct value at each registered prefix length;
* ``(BUCKET, field, width, value // width)``: a bounded integer range, as at most ~16 buckets;
* ``(GEO, field, level, cell)``: a geo_distance circle as the grid cells covering its box.

Like Monitor's TermWeightor, a conjunction is anchored on its most selective conjunct, judged by
a per-key weight (an estimate of how many documents produce the key). ``should`` clauses required
by ``minimum_should_match`` anchor on the union of their anchors. ``must_not``, ``exists``,
unbounded or date ranges and leading wildcards cannot anchor; a rule with no anchor at all is an
always-candidate and gets a warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from percolators.batch import GEO_LEVELS, BatchIndex, geo_bbox, geo_cell
from percolators.query import (
    Bool,
    GeoDistance,
    MatchNone,
    Node,
    Phrase,
    Prefix,
    Range,
    Term,
    Terms,
    Wildcard,
)

CI = "\x00ci"
PREFIX = "\x00p"
PREFIX_CI = "\x00pci"
BUCKET = "\x00b"
GEO = "\x00g"

INTEGER_TYPES = frozenset({"integer", "long", "short", "byte"})
#: Ranges spanning more buckets than this at the widest width do not anchor.
MAX_BUCKETS = 16

#: How many documents (a fraction) are expected to produce a term of these fields: low-cardinality
#: fields make poor anchors. Anything else is assumed selective.
DEFAULT_FIELD_WEIGHTS: dict[str, float] = {
    "gender": 0.5,
    "age_band": 0.2,
    "device.os": 0.45,
    "device.type": 0.4,
    "device.make": 0.2,
    "device.carrier": 0.2,
    "language": 0.3,
    "geo.country": 0.6,
    "geo.region": 0.2,
    "geo.city": 0.15,
    "exchange": 0.3,
    "ad_slot.w": 0.3,
    "ad_slot.h": 0.3,
}
DEFAULT_TERM_WEIGHT = 0.05
NO_ANCHOR = "no-anchor"

Anchor = frozenset  # frozenset of keys; None = cannot anchor


class TermWeightor:
    """Estimated share of documents producing an anchor key (lower = more selective)."""

    def __init__(self, field_weights: Mapping[str, float] | None = None, default: float = DEFAULT_TERM_WEIGHT):
        self.field_weights = dict(DEFAULT_FIELD_WEIGHTS if field_weights is None else field_weights)
        self.default = default

    def key_weight(self, key: tuple[Any, ...]) -> float:
        if len(key) == 2:
            return self.field_weights.get(key[0], self.default)
        kind, name = key[0], key[1]
        base = self.field_weights.get(name, self.default)
        if kind == CI:
            return base * 1.5
        if kind in (PREFIX, PREFIX_CI):
            return min(1.0, base * 8 / max(1, len(key[2])))
        if kind == BUCKET:
            return 0.1
        if kind == GEO:
            return 0.05 * (1 + GEO_LEVELS.index(key[2]))
        return base

    def weight(self, anchor: frozenset[Any]) -> float:
        field_weights, default = self.field_weights, self.default
        total = 0.0
        for key in anchor:
            total += field_weights.get(key[0], default) if len(key) == 2 else self.key_weight(key)
        return total


def extract_anchor(node: Node, field_types: Mapping[str, str], weightor: TermWeightor) -> frozenset[Any] | None:
    """The anchor of ``node`` (see the module docstring), or None when it cannot have one."""
    if isinstance(node, Term):
        if node.case_insensitive and isinstance(node.value, str):
            return frozenset({(CI, node.field, node.value)})  # lower-cased by the parser
        return frozenset({(node.field, node.value)})
    if isinstance(node, Terms):
        return frozenset((node.field, value) for value in node.values)
    if isinstance(node, Bool):
        return _bool_anchor(node, field_types, weightor)
    if isinstance(node, MatchNone):
        return frozenset()
    if isinstance(node, Prefix):
        if not node.prefix:
            return None
        if node.case_insensitive:
            return frozenset({(PREFIX_CI, node.field, node.prefix)})  # lower-cased by the parser
        return frozenset({(PREFIX, node.field, node.prefix)})
    if isinstance(node, Wildcard):
        literal = node.literal_prefix
        if not literal or node.case_insensitive:
            # a case-insensitive regex folds case in ways str.lower() does not always mirror
            return None
        return frozenset({(PREFIX, node.field, literal)})
    if isinstance(node, Range):
        return _range_anchor(node, field_types)
    if isinstance(node, GeoDistance):
        return _geo_anchor(node)
    if isinstance(node, Phrase):
        if not node.tokens:
            return None
        return frozenset({(node.field, node.tokens[0])})
    return None  # match_all, exists, unknown


def _bool_anchor(node: Bool, field_types: Mapping[str, str], weightor: TermWeightor) -> frozenset[Any] | None:
    msm = node.minimum_should_match
    if msm > len(node.should):
        return frozenset()  # matches nothing
    options: list[frozenset[Any]] = []
    for child in (*node.must, *node.filter):
        anchor = extract_anchor(child, field_types, weightor)
        if anchor is not None:
            if not anchor:
                return anchor
            options.append(anchor)
    if msm >= 1 and node.should:
        union: set[Any] = set()
        for child in node.should:
            anchor = extract_anchor(child, field_types, weightor)
            if anchor is None:
                union = set()
                break
            union |= anchor
        else:
            options.append(frozenset(union))
    if not options:
        return None
    return min(options, key=weightor.weight)


def _range_anchor(node: Range, field_types: Mapping[str, str]) -> frozenset[Any] | None:
    if node.uses_now or field_types.get(node.field) not in INTEGER_TYPES:
        return None
    low, high = node.low, node.high
    if low is None or high is None or isinstance(low, bool) or isinstance(high, bool):
        return None
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        return None
    lo, hi = math.floor(low), math.floor(high)  # a superset of the integers in the range
    if hi < lo:
        return frozenset()
    span = hi - lo + 1
    width = 1
    while span / width > MAX_BUCKETS:
        width *= 4
        if width > 1 << 20:
            return None
    return frozenset((BUCKET, node.field, width, b) for b in range(lo // width, hi // width + 1))


def _geo_anchor(node: GeoDistance) -> frozenset[Any] | None:
    box = geo_bbox(node.lat, node.lon, node.distance_m)
    if box is None:
        return None
    lat_min, lat_max, lon_min, lon_max = box
    for level in GEO_LEVELS:
        i0, i1 = math.floor(lat_min / level), math.floor(lat_max / level)
        j0, j1 = math.floor(lon_min / level), math.floor(lon_max / level)
        if (i1 - i0 + 1) * (j1 - j0 + 1) <= 16:
            return frozenset((GEO, node.field, level, (i, j)) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1))
    return None


class MatchAllPresearcher:
    """Every rule is a candidate: the reference presearcher."""

    name = "match_all"

    def add(self, rule_id: str, node: Node) -> tuple[str, ...]:
        return ()

    def remove(self, rule_id: str) -> None:
        return None

    def candidates(self, batch: BatchIndex, all_ids: Iterable[str]) -> set[str]:
        return set(all_ids)


class IndexedPresearcher:
    """Postings of anchor keys -> rule ids, updated incrementally on add/remove."""

    name = "indexed"

    def __init__(self, field_types: Mapping[str, str], weightor: TermWeightor | None = None):
        self.field_types = dict(field_types)
        self.weightor = weightor or TermWeightor()
        self.postings: dict[Any, set[str]] = {}
        self.always: set[str] = set()
        self._anchors: dict[str, frozenset[Any] | None] = {}
        # what the batch must derive: (kind, field) -> {prefix length | bucket width | geo level: refcount}
        self._probes: dict[tuple[str, str], dict[Any, int]] = {}

    def add(self, rule_id: str, node: Node) -> tuple[str, ...]:
        """Index a rule (replacing any previous one with this id); returns warnings."""
        self.remove(rule_id)
        anchor = extract_anchor(node, self.field_types, self.weightor)
        self._anchors[rule_id] = anchor
        if anchor is None:
            self.always.add(rule_id)
            return (
                f"{NO_ANCHOR}: candidate selection cannot narrow this rule (no required term, prefix, bounded "
                "integer range or geo distance); it is checked against every document",
            )
        for key in anchor:
            self.postings.setdefault(key, set()).add(rule_id)
            probe = _probe_of(key)
            if probe is not None:
                counts = self._probes.setdefault(probe[0], {})
                counts[probe[1]] = counts.get(probe[1], 0) + 1
        return ()

    def remove(self, rule_id: str) -> None:
        anchor = self._anchors.pop(rule_id, None)
        self.always.discard(rule_id)
        if not anchor:
            return
        for key in anchor:
            ids = self.postings.get(key)
            if ids is not None:
                ids.discard(rule_id)
                if not ids:
                    del self.postings[key]
            probe = _probe_of(key)
            if probe is not None:
                counts = self._probes[probe[0]]
                counts[probe[1]] -= 1
                if not counts[probe[1]]:
                    del counts[probe[1]]
                    if not counts:
                        del self._probes[probe[0]]

    def anchor_of(self, rule_id: str) -> frozenset[Any] | None:
        return self._anchors.get(rule_id)

    def batch_keys(self, batch: BatchIndex) -> Iterable[Any]:
        """Every anchor key the batch produces (terms first, then the derived keys)."""
        yield from batch.terms
        for (kind, name), params in self._probes.items():
            if kind == GEO:
                points = batch.geo_points(name)
                for level in params:
                    seen = set()
                    for _pos, lat, lon in points:
                        seen.add(geo_cell(level, lat, lon))
                    for cell in seen:
                        yield (GEO, name, level, cell)
                continue
            if kind == CI:
                for low in batch.lower_terms(name):
                    yield (CI, name, low)
                continue
            if kind == BUCKET:
                values = batch.field_values(name)[0]
                for width in params:
                    seen_b = set()
                    for value in values:
                        if isinstance(value, int | float) and not isinstance(value, bool):
                            seen_b.add(math.floor(value) // width)
                    for bucket in seen_b:
                        yield (BUCKET, name, width, bucket)
                continue
            # prefixes
            source = batch.lower_terms(name) if kind == PREFIX_CI else batch.field_values(name)[0]
            lengths = sorted(params)
            seen_p: set[str] = set()
            for value in source:
                if not isinstance(value, str):
                    continue
                for length in lengths:
                    if len(value) < length:
                        break
                    seen_p.add(value[:length])
            for prefix in seen_p:
                yield (kind, name, prefix)

    def candidates(self, batch: BatchIndex, all_ids: Iterable[str]) -> set[str]:
        out = set(self.always)
        postings = self.postings
        for key in self.batch_keys(batch):
            ids = postings.get(key)
            if ids:
                out |= ids
        return out


def _probe_of(key: tuple[Any, ...]) -> tuple[tuple[str, str], Any] | None:
    """What a batch must derive to produce ``key``: ((kind, field), parameter)."""
    if len(key) == 2:
        return None
    kind = key[0]
    if kind == CI:
        return (CI, key[1]), True
    if kind in (PREFIX, PREFIX_CI):
        return (kind, key[1]), len(key[2])
    if kind in (BUCKET, GEO):
        return (kind, key[1]), key[2]
    return None
