"""Explain, clause by clause, why a document did or did not match a parsed rule.

Verdicts come from ``percolators.reference`` so an explanation never disagrees with matching;
this module only adds the human reasons (``age 31 is within [26, 35]``).
"""

from __future__ import annotations

from collections.abc import Mapping as AbcMapping
from datetime import UTC, datetime
from typing import Any

from percolators.document import IndexedDoc, index_document
from percolators.geo import format_distance
from percolators.mapping import Mapping
from percolators.port import Explanation
from percolators.query import (
    Bool,
    DateMath,
    Exists,
    GeoDistance,
    MatchAll,
    MatchNone,
    Node,
    ParsedRule,
    Phrase,
    Prefix,
    Range,
    Term,
    Terms,
    Wildcard,
)
from percolators.reference import distance, leaf_matches

_MAX_SHOWN = 5


def _show(value: Any, is_date: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if is_date and isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _values(doc: IndexedDoc, field: str, is_date: bool = False) -> str:
    values = doc.values.get(field, ())
    shown = ", ".join(_show(v, is_date) for v in values[:_MAX_SHOWN])
    if len(values) > _MAX_SHOWN:
        shown += f", ... ({len(values)} values)"
    return shown if len(values) == 1 else f"[{shown}]"


def _node_type(node: Node) -> str:
    return {
        MatchAll: "match_all",
        MatchNone: "match_none",
        Term: "term",
        Terms: "terms",
        Range: "range",
        Exists: "exists",
        Prefix: "prefix",
        Wildcard: "wildcard",
        Phrase: "match_phrase",
        GeoDistance: "geo_distance",
        Bool: "bool",
    }[type(node)]


def _interval(low: Any, low_inc: bool, high: Any, high_inc: bool, is_date: bool) -> str:
    left = ("[" if low_inc else "(") + ("-inf" if low is None else _show(low, is_date))
    right = ("+inf" if high is None else _show(high, is_date)) + ("]" if high_inc else ")")
    return f"{left}, {right}"


def _looks_like_date(node: Range) -> bool:
    return node.uses_now or any(
        isinstance(b, int) and not isinstance(b, bool) and abs(b) > 10**11 for b in (node.low, node.high)
    )


def _leaf_reason(node: Node, doc: IndexedDoc, now_ms: int, matched: bool) -> str:
    field = getattr(node, "field", "")
    missing = field and field not in doc.present and not isinstance(node, Exists)
    if missing:
        return f"{field} has no value"
    if isinstance(node, Term):
        how = " (case-insensitive)" if node.case_insensitive else ""
        single = len(doc.values.get(field, ())) == 1
        verb = ("is" if matched else "is not") if single else ("contains" if matched else "does not contain")
        return f"{field} {_values(doc, field)} {verb} {_show(node.value)}{how}"
    if isinstance(node, Terms):
        wanted = ", ".join(sorted(_show(v) for v in node.values)[:_MAX_SHOWN])
        verb = "has one of" if matched else "has none of"
        return f"{field} {_values(doc, field)} {verb} [{wanted}]"
    if isinstance(node, Range):
        resolved = node.resolve(now_ms)
        is_date = _looks_like_date(node)
        interval = _interval(resolved.low, resolved.low_inclusive, resolved.high, resolved.high_inclusive, is_date)
        written = ""
        if node.uses_now:
            texts = [b.text for b in (node.low, node.high) if isinstance(b, DateMath)]
            written = f" ({', '.join(texts)} at now={_show(now_ms, True)})"
        verb = "is within" if matched else "is outside"
        return f"{field} {_values(doc, field, is_date)} {verb} {interval}{written}"
    if isinstance(node, Exists):
        present = [leaf for leaf in node.leaves if leaf in doc.present]
        if matched:
            return f"{node.field} exists ({', '.join(present[:_MAX_SHOWN])} has a value)"
        return f"{node.field} does not exist (no value, null or [])"
    if isinstance(node, Prefix):
        verb = "starts with" if matched else "does not start with"
        return f"{field} {_values(doc, field)} {verb} {_show(node.prefix)}"
    if isinstance(node, Wildcard):
        verb = "matches" if matched else "does not match"
        return f"{field} {_values(doc, field)} {verb} pattern {_show(node.pattern)}"
    if isinstance(node, Phrase):
        slop = f" within slop {node.slop}" if node.slop else ""
        verb = "contains" if matched else "does not contain"
        return f"{field} {verb} the phrase {_show(' '.join(node.tokens))}{slop}"
    if isinstance(node, GeoDistance):
        points = doc.values.get(field, ())
        best = min((distance(node, lat, lon) for lat, lon in points), default=float("inf"))
        centre = f"({node.lat:g}, {node.lon:g})"
        limit = format_distance(node.distance_m)
        if matched:
            return f"{field} is {format_distance(best)} from {centre}, within {limit}"
        return f"{field} is {format_distance(best)} from {centre}, more than {limit}"
    if isinstance(node, MatchAll):
        return "match_all matches every document"
    if isinstance(node, MatchNone):
        return "match_none matches no document"
    raise TypeError(f"unknown node {node!r}")


def explain(
    node: Node | ParsedRule,
    doc: IndexedDoc | AbcMapping[str, Any],
    mapping_or_now: Mapping | int,
    now_ms: int | None = None,
) -> Explanation:
    """An :class:`Explanation` tree mirroring ``node``; verdicts equal ``reference.matches``.

    Two call forms: ``explain(node, indexed_doc, now_ms)`` and
    ``explain(rule_or_node, raw_document, mapping, now_ms)`` (indexes the document first and may
    raise InvalidDocumentError).
    """
    if isinstance(node, ParsedRule):
        node = node.query
    if now_ms is None:
        if not isinstance(mapping_or_now, int) or not isinstance(doc, IndexedDoc):
            raise TypeError("explain(node, indexed_doc, now_ms) or explain(node, document, mapping, now_ms)")
        return _explain(node, doc, mapping_or_now)
    if not isinstance(mapping_or_now, Mapping):
        raise TypeError("explain(node, document, mapping, now_ms): the third argument must be a Mapping")
    indexed = doc if isinstance(doc, IndexedDoc) else index_document(doc, mapping_or_now)
    return _explain(node, indexed, now_ms)


def _explain(node: Node, doc: IndexedDoc, now_ms: int) -> Explanation:
    if not isinstance(node, Bool):
        matched = leaf_matches(node, doc, now_ms)
        return Explanation(node.path, _node_type(node), matched, _leaf_reason(node, doc, now_ms, matched))
    children: list[Explanation] = []
    problems: list[str] = []
    for occur, clauses in (("must", node.must), ("filter", node.filter), ("must_not", node.must_not)):
        for clause in clauses:
            child = _explain(clause, doc, now_ms)
            children.append(child)
            if occur == "must_not" and child.matched:
                problems.append(f"must_not clause {child.path} matched")
            elif occur != "must_not" and not child.matched:
                problems.append(f"{occur} clause {child.path} did not match")
    should_matched = 0
    for clause in node.should:
        child = explain(clause, doc, now_ms)
        children.append(child)
        should_matched += child.matched
    needed = node.minimum_should_match
    should_ok = should_matched >= needed
    if node.should or needed:
        summary = f"should: {should_matched} of {len(node.should)} matched, minimum_should_match {needed}"
        if not should_ok:
            problems.append(summary)
    else:
        summary = ""
    matched = not problems and should_ok
    if matched:
        parts = []
        required = len(node.must) + len(node.filter)
        if required:
            parts.append(f"all {required} must/filter clauses matched")
        if node.must_not:
            parts.append(f"none of {len(node.must_not)} must_not clauses matched")
        if summary:
            parts.append(summary)
        reason = "; ".join(parts) if parts else "empty bool matches every document"
    else:
        reason = "; ".join(problems)
    return Explanation(node.path or "bool", "bool", matched, reason, children)
