"""The reference matcher: evaluates a parsed rule against one indexed document, clause by clause.

This is the correctness baseline the fast engine is tested against, so it favours clarity. It
follows Elasticsearch semantics as normalised by ``percolators.dsl``: a leaf clause matches when
*any* indexed value of its field matches; ``bool`` counts should clauses against its resolved
``minimum_should_match``.
"""

from __future__ import annotations

from percolators.analysis import ascii_lower
from percolators.document import IndexedDoc
from percolators.geo import arc_distance, plane_distance
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


def phrase_in(sequence: tuple[str, ...], tokens: tuple[str, ...], slop: int) -> bool:
    """Lucene phrase semantics within one value's token sequence.

    slop 0: the tokens appear consecutively. slop > 0 (``SloppyPhraseMatcher``): some choice of
    distinct positions ``p[j]`` for the tokens has ``max(p[j] - j) - min(p[j] - j) <= slop``, so
    two swapped terms need slop 2, as in Lucene.
    """
    n = len(tokens)
    if n == 0:
        return False
    if slop == 0:
        first = tokens[0]
        return any(sequence[i] == first and sequence[i : i + n] == tokens for i in range(len(sequence) - n + 1))
    positions: list[list[int]] = []
    for tok in tokens:
        found = [i for i, t in enumerate(sequence) if t == tok]
        if not found:
            return False
        positions.append(found)

    def search(j: int, lo: int, hi: int, used: frozenset[int]) -> bool:
        if j == n:
            return True
        for p in positions[j]:
            if p in used:
                continue
            off = p - j
            new_lo, new_hi = min(lo, off), max(hi, off)
            if new_hi - new_lo <= slop and search(j + 1, new_lo, new_hi, used | {p}):
                return True
        return False

    return any(search(1, p, p, frozenset({p})) for p in positions[0])


def distance(node: GeoDistance, lat: float, lon: float) -> float:
    if node.distance_type == "plane":
        return plane_distance(node.lat, node.lon, lat, lon)
    return arc_distance(node.lat, node.lon, lat, lon)


def leaf_matches(node: Node, doc: IndexedDoc, now_ms: int) -> bool:
    """Verdict of a non-bool node."""
    if isinstance(node, Term):
        values = doc.values.get(node.field, ())
        if not values:
            return False
        if node.case_insensitive:
            return any(isinstance(v, str) and ascii_lower(v) == node.value for v in values)
        return node.value in values
    if isinstance(node, Terms):
        values = doc.values.get(node.field, ())
        return bool(values) and any(v in node.values for v in values)
    if isinstance(node, Range):
        values = doc.values.get(node.field, ())
        if not values:
            return False
        resolved = node.resolve(now_ms)
        return any(resolved.contains(v) for v in values)
    if isinstance(node, Exists):
        return any(leaf in doc.present for leaf in node.leaves)
    if isinstance(node, Prefix):
        values = doc.values.get(node.field, ())
        if not values:
            return False
        if node.case_insensitive:
            return any(ascii_lower(v).startswith(node.prefix) for v in values)
        return any(v.startswith(node.prefix) for v in values)
    if isinstance(node, Wildcard):
        values = doc.values.get(node.field, ())
        return bool(values) and any(node.regex.fullmatch(v) is not None for v in values)
    if isinstance(node, Phrase):
        sequences = doc.phrases.get(node.field, ())
        return any(phrase_in(seq, node.tokens, node.slop) for seq in sequences)
    if isinstance(node, GeoDistance):
        values = doc.values.get(node.field, ())
        return bool(values) and any(distance(node, lat, lon) <= node.distance_m for lat, lon in values)
    if isinstance(node, MatchAll):
        return True
    if isinstance(node, MatchNone):
        return False
    raise TypeError(f"not a leaf query node: {node!r}")


def matches(node: Node, doc: IndexedDoc, now_ms: int) -> bool:
    """Does ``doc`` match ``node`` at time ``now_ms`` (epoch millis, for date math)?"""
    if isinstance(node, Bool):
        if node.minimum_should_match > len(node.should):
            return False
        for clause in node.must:
            if not matches(clause, doc, now_ms):
                return False
        for clause in node.filter:
            if not matches(clause, doc, now_ms):
                return False
        for clause in node.must_not:
            if matches(clause, doc, now_ms):
                return False
        if node.minimum_should_match:
            needed = node.minimum_should_match
            for clause in node.should:
                if matches(clause, doc, now_ms):
                    needed -= 1
                    if needed == 0:
                        break
            return needed <= 0
        return True
    return leaf_matches(node, doc, now_ms)
