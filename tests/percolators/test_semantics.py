"""Table-driven Elasticsearch 8 semantics: (document, query) -> matches?, through parse_rule,
index_document and the reference matcher. Each group names the Elasticsearch behaviour it pins."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from percolators import programs
from percolators.document import index_document
from percolators.dsl import parse_rule
from percolators.embedded import EmbeddedPercolator
from percolators.mapping import Mapping
from percolators.port import Rule
from percolators.reference import matches

MAPPING_JSON: dict[str, Any] = {
    "properties": {
        "age": {"type": "integer"},
        "small": {"type": "byte"},
        "big": {"type": "long"},
        "score": {"type": "float"},
        "ratio": {"type": "double"},
        "gender": {"type": "keyword"},
        "tags": {"type": "keyword"},
        "short_kw": {"type": "keyword", "ignore_above": 5},
        "bio": {"type": "text"},
        "title": {"type": "text", "fields": {"raw": {"type": "keyword"}}},
        "ok": {"type": "boolean"},
        "ts": {"type": "date"},
        "day": {"type": "date", "format": "yyyy-MM-dd"},
        "geo": {
            "properties": {
                "city": {"type": "keyword"},
                "zip": {"type": "keyword"},
                "location": {"type": "geo_point"},
            }
        },
        "user": {"properties": {"segments": {"properties": {"id": {"type": "keyword"}}}}},
    }
}
MAPPING = Mapping.from_json(MAPPING_JSON)

# now = 2026-03-15T13:45:30.500Z
NOW = datetime(2026, 3, 15, 13, 45, 30, 500000, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def check(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    rule = parse_rule("r", query, MAPPING)
    indexed = index_document(doc, MAPPING)
    assert matches(rule.query, indexed, NOW_MS) is expected, (doc, query, rule.query)
    check_engine(doc, query, expected)


#: the C rule evaluator when built (else the Python closures twice), and the Python closures
_ENGINE_ACCEL: list[bool | None] = [None if programs._eval is not None else False, False]


def check_engine(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    """The same verdict from the embedded engine with both rule evaluators (C when built, and the
    Python closures), for one document and for a batch of 70 copies (more than one mask word)."""
    for accel in _ENGINE_ACCEL:
        engine = EmbeddedPercolator(MAPPING_JSON, accel=accel)
        engine.upsert([Rule("r", query)])
        want = ["r"] if expected else []
        assert engine.percolate([doc], now=NOW) == [want], (accel, doc, query)
        assert engine.percolate([doc] * 70, now=NOW) == [want] * 70, (accel, doc, query)


def cases(*rows: tuple[Any, ...]) -> Any:
    return pytest.mark.parametrize("doc,query,expected", [pytest.param(*r[1:], id=r[0]) for r in rows])


# --- bool ------------------------------------------------------------------------------------
T = {"term": {"gender": "F"}}
M = {"term": {"gender": "M"}}
A = {"term": {"tags": "a"}}
B = {"term": {"tags": "b"}}
C = {"term": {"tags": "c"}}
D = {"term": {"tags": "d"}}


@cases(
    # An empty bool is MatchAllDocsQuery (BoolQueryBuilder.doToQuery).
    ("empty bool", {"age": 1}, {"bool": {}}, True),
    ("empty bool, empty doc", {}, {"bool": {}}, True),
    # ... even with a minimum_should_match: the clause-less check comes first.
    ("empty bool with msm", {"age": 1}, {"bool": {"minimum_should_match": 1}}, True),
    # Queries.calculateMinShouldMatch returns max(result, 0) without clamping to the should count.
    (
        "filter, no should, msm 1",
        {"age": 1},
        {"bool": {"filter": [{"match_all": {}}], "minimum_should_match": 1}},
        False,
    ),
    # must_not only: adjust_pure_negative adds a match_all.
    ("must_not only, excluded", {"gender": "M"}, {"bool": {"must_not": [M]}}, False),
    ("must_not only, kept", {"gender": "F"}, {"bool": {"must_not": [M]}}, True),
    ("must_not only, missing field kept", {}, {"bool": {"must_not": [M]}}, True),
    # should alone: at least one required.
    ("should only, none", {"tags": "x"}, {"bool": {"should": [A, B]}}, False),
    ("should only, one", {"tags": "b"}, {"bool": {"should": [A, B]}}, True),
    # should with must: optional (ES >= 7: no filter-context msm=1).
    ("should optional with must", {"gender": "F"}, {"bool": {"must": [T], "should": [A]}}, True),
    ("should optional with filter", {"gender": "F"}, {"bool": {"filter": [T], "should": [A]}}, True),
    ("should + must_not still needs one should", {"tags": "x"}, {"bool": {"should": [A], "must_not": [M]}}, False),
    # minimum_should_match forms (Queries.calculateMinShouldMatch)
    ("msm 2 of 3, 1 matched", {"tags": ["a"]}, {"bool": {"should": [A, B, C], "minimum_should_match": 2}}, False),
    ("msm 2 of 3, 2 matched", {"tags": ["a", "c"]}, {"bool": {"should": [A, B, C], "minimum_should_match": 2}}, True),
    ("msm string '2'", {"tags": ["a", "c"]}, {"bool": {"should": [A, B, C], "minimum_should_match": "2"}}, True),
    ("msm -1 of 3 -> 2", {"tags": ["a"]}, {"bool": {"should": [A, B, C], "minimum_should_match": -1}}, False),
    ("msm -1 of 3 -> 2 ok", {"tags": ["a", "b"]}, {"bool": {"should": [A, B, C], "minimum_should_match": -1}}, True),
    (
        "msm 75% of 3 floors to 2",
        {"tags": ["a", "b"]},
        {"bool": {"should": [A, B, C], "minimum_should_match": "75%"}},
        True,
    ),
    ("msm 75% of 3, one", {"tags": ["a"]}, {"bool": {"should": [A, B, C], "minimum_should_match": "75%"}}, False),
    (
        "msm -25% of 4 -> 3",
        {"tags": ["a", "b"]},
        {"bool": {"should": [A, B, C, D], "minimum_should_match": "-25%"}},
        False,
    ),
    (
        "msm -25% of 4 -> 3 ok",
        {"tags": ["a", "b", "d"]},
        {"bool": {"should": [A, B, C, D], "minimum_should_match": "-25%"}},
        True,
    ),
    (
        "msm -25% of 3 -> 3",
        {"tags": ["a", "b"]},
        {"bool": {"should": [A, B, C], "minimum_should_match": "-25%"}},
        False,
    ),
    (
        "msm 3<90%: 3 clauses need all",
        {"tags": ["a", "b"]},
        {"bool": {"should": [A, B, C], "minimum_should_match": "3<90%"}},
        False,
    ),
    (
        "msm 2<90%: 3 clauses -> 90% = 2",
        {"tags": ["a", "b"]},
        {"bool": {"should": [A, B, C], "minimum_should_match": "2<90%"}},
        True,
    ),
    (
        "msm above count matches nothing",
        {"tags": ["a", "b"]},
        {"bool": {"should": [A, B], "minimum_should_match": 3}},
        False,
    ),
    (
        "msm 0 with only should still needs one",
        {"tags": "x"},
        {"bool": {"should": [A, B], "minimum_should_match": 0}},
        False,
    ),
    ("msm 1 with must, no should: nothing", {"gender": "F"}, {"bool": {"must": [T], "minimum_should_match": 1}}, False),
    (
        "msm 1 with must and should",
        {"gender": "F", "tags": "a"},
        {"bool": {"must": [T], "should": [A], "minimum_should_match": 1}},
        True,
    ),
    ("bool clause as object", {"gender": "F"}, {"bool": {"must": T}}, True),
    (
        "nested bool",
        {"gender": "F", "tags": "b"},
        {"bool": {"must": [{"bool": {"should": [A, B]}}], "filter": T}},
        True,
    ),
    ("constant_score", {"gender": "F"}, {"constant_score": {"filter": T, "boost": 2}}, True),
    ("match_all", {}, {"match_all": {}}, True),
    ("match_none", {"gender": "F"}, {"match_none": {}}, False),
)
def test_bool(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    check(doc, query, expected)


# --- numbers ---------------------------------------------------------------------------------


@cases(
    # NumberType.INTEGER.rangeQuery rounds decimal bounds inward
    ("gte 25.5 excludes 25", {"age": 25}, {"range": {"age": {"gte": 25.5}}}, False),
    ("gte 25.5 includes 26", {"age": 26}, {"range": {"age": {"gte": 25.5}}}, True),
    ("gt 25.5 includes 26", {"age": 26}, {"range": {"age": {"gt": 25.5}}}, True),
    ("gt 25 excludes 25", {"age": 25}, {"range": {"age": {"gt": 25}}}, False),
    ("lte 35.5 includes 35", {"age": 35}, {"range": {"age": {"lte": 35.5}}}, True),
    ("lt 35.5 includes 35", {"age": 35}, {"range": {"age": {"lt": 35.5}}}, True),
    ("lt 35.5 excludes 36", {"age": 36}, {"range": {"age": {"lt": 35.5}}}, False),
    ("negative decimal gte -1.5 includes -1", {"age": -1}, {"range": {"age": {"gte": -1.5}}}, True),
    ("negative decimal gte -1.5 excludes -2", {"age": -2}, {"range": {"age": {"gte": -1.5}}}, False),
    ("string bounds coerced", {"age": 30}, {"range": {"age": {"gte": "25", "lte": "35"}}}, True),
    ("legacy from/to inclusive", {"age": 35}, {"range": {"age": {"from": 25, "to": 35}}}, True),
    (
        "legacy include_upper false",
        {"age": 35},
        {"range": {"age": {"from": 25, "to": 35, "include_upper": False}}},
        False,
    ),
    ("unbounded range = exists", {"age": 1}, {"range": {"age": {}}}, True),
    ("unbounded range, missing", {}, {"range": {"age": {}}}, False),
    # document coercion: "35" and 35.7 are 35
    ("doc string '35'", {"age": "35"}, {"term": {"age": 35}}, True),
    ("doc float 35.7 truncated", {"age": 35.7}, {"term": {"age": 35}}, True),
    ("query string '35'", {"age": 35}, {"term": {"age": "35"}}, True),
    ("term with decimal part matches nothing", {"age": 35}, {"term": {"age": 35.5}}, False),
    ("term 35.0 is 35", {"age": 35}, {"term": {"age": 35.0}}, True),
    # BYTE.termQuery: out-of-range value -> MatchNoDocsQuery (no error)
    ("byte term out of range", {"small": 100}, {"term": {"small": 300}}, False),
    ("terms drops decimals", {"age": 3}, {"terms": {"age": [2.5, 3]}}, True),
    ("terms any value", {"age": 7}, {"terms": {"age": [1, 7, 9]}}, True),
    ("terms none", {"age": 8}, {"terms": {"age": [1, 7, 9]}}, False),
    ("terms empty array", {"age": 8}, {"terms": {"age": []}}, False),
    ("long exact", {"big": 9007199254740993}, {"term": {"big": 9007199254740993}}, True),
    ("long neighbour", {"big": 9007199254740993}, {"term": {"big": 9007199254740992}}, False),
    # float fields store 32-bit floats: 0.1 stored == 0.1 queried; gt 0.1 excludes it
    ("float term 0.1", {"score": 0.1}, {"term": {"score": 0.1}}, True),
    ("float gt 0.1 excludes stored 0.1", {"score": 0.1}, {"range": {"score": {"gt": 0.1}}}, False),
    ("float gte '0.1' string", {"score": "0.1"}, {"range": {"score": {"gte": "0.1"}}}, True),
    ("double range", {"ratio": 0.30000000000000004}, {"range": {"ratio": {"gt": 0.3}}}, True),
    ("match on integer is a term", {"age": 35}, {"match": {"age": "35"}}, True),
    ("match lenient on integer with text", {"age": 35}, {"match": {"age": {"query": "abc", "lenient": True}}}, False),
    ("arrays: any element", {"age": [10, 40]}, {"range": {"age": {"gte": 30}}}, True),
    ("arrays: no element", {"age": [10, 20]}, {"range": {"age": {"gte": 30}}}, False),
    ("arrays: range spans elements", {"age": [10, 40]}, {"range": {"age": {"gte": 20, "lte": 30}}}, False),
)
def test_numbers(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    check(doc, query, expected)


# --- keyword / text ----------------------------------------------------------------------------


@cases(
    ("keyword exact", {"gender": "F"}, {"term": {"gender": "F"}}, True),
    ("keyword is case sensitive", {"gender": "F"}, {"term": {"gender": "f"}}, False),
    ("keyword case_insensitive", {"gender": "F"}, {"term": {"gender": {"value": "f", "case_insensitive": True}}}, True),
    ("keyword long form", {"gender": "F"}, {"term": {"gender": {"value": "F", "boost": 2, "_name": "g"}}}, True),
    ("keyword number coerced to text", {"gender": 35}, {"term": {"gender": "35"}}, True),
    ("keyword bool coerced to text", {"gender": True}, {"term": {"gender": "true"}}, True),
    ("keyword query number", {"gender": "35"}, {"term": {"gender": 35}}, True),
    ("keyword array", {"tags": ["a", "b"]}, {"term": {"tags": "b"}}, True),
    ("keyword ignore_above not indexed", {"short_kw": "toolong"}, {"term": {"short_kw": "toolong"}}, False),
    ("keyword ignore_above does not exist", {"short_kw": "toolong"}, {"exists": {"field": "short_kw"}}, False),
    ("keyword range string order", {"gender": "m"}, {"range": {"gender": {"gte": "f", "lt": "n"}}}, True),
    ("keyword range excl", {"gender": "n"}, {"range": {"gender": {"gte": "f", "lt": "n"}}}, False),
    ("prefix keyword", {"geo": {"zip": "SW19 1AA"}}, {"prefix": {"geo.zip": "SW19"}}, True),
    ("prefix keyword case", {"geo": {"zip": "SW19 1AA"}}, {"prefix": {"geo.zip": "sw19"}}, False),
    (
        "prefix ci",
        {"geo": {"zip": "SW19 1AA"}},
        {"prefix": {"geo.zip": {"value": "sw19", "case_insensitive": True}}},
        True,
    ),
    ("wildcard keyword", {"geo": {"zip": "SW19 1AA"}}, {"wildcard": {"geo.zip": {"value": "SW1? *"}}}, True),
    ("wildcard key 'wildcard'", {"geo": {"zip": "SW19 1AA"}}, {"wildcard": {"geo.zip": {"wildcard": "*1AA"}}}, True),
    ("wildcard no match", {"geo": {"zip": "SW19 1AA"}}, {"wildcard": {"geo.zip": "SW2*"}}, False),
    ("wildcard escape", {"gender": "a*b"}, {"wildcard": {"gender": "a\\*b"}}, True),
    ("wildcard escape literal", {"gender": "axb"}, {"wildcard": {"gender": "a\\*b"}}, False),
    # text: term is not analysed, compares against tokens
    ("text term lowercase token", {"bio": "I like Cats"}, {"term": {"bio": "cats"}}, True),
    ("text term capitalised never matches", {"bio": "I like Cats"}, {"term": {"bio": "Cats"}}, False),
    ("text term whole phrase never matches", {"bio": "I like Cats"}, {"term": {"bio": "i like cats"}}, False),
    ("text match analysed", {"bio": "I like Cats"}, {"match": {"bio": "CATS"}}, True),
    ("text match or", {"bio": "I like Cats"}, {"match": {"bio": "dogs cats"}}, True),
    ("text match and", {"bio": "I like Cats"}, {"match": {"bio": {"query": "dogs cats", "operator": "and"}}}, False),
    ("text match and ok", {"bio": "I like Cats"}, {"match": {"bio": {"query": "like cats", "operator": "AND"}}}, True),
    ("text match msm", {"bio": "a b c"}, {"match": {"bio": {"query": "a b x y", "minimum_should_match": "50%"}}}, True),
    (
        "text match msm fail",
        {"bio": "a b c"},
        {"match": {"bio": {"query": "a x y z", "minimum_should_match": "50%"}}},
        False,
    ),
    ("match zero terms none", {"bio": "x"}, {"match": {"bio": "!!!"}}, False),
    ("match zero terms all", {"bio": "x"}, {"match": {"bio": {"query": "!!!", "zero_terms_query": "all"}}}, True),
    ("match on keyword is exact", {"gender": "Female"}, {"match": {"gender": "Female"}}, True),
    ("match on keyword not analysed", {"gender": "Female"}, {"match": {"gender": "female"}}, False),
    ("multi-field keyword", {"title": "Hello World"}, {"term": {"title.raw": "Hello World"}}, True),
    ("multi-field text", {"title": "Hello World"}, {"match": {"title": "world"}}, True),
    ("text prefix on tokens", {"bio": "Football fan"}, {"prefix": {"bio": "foot"}}, True),
    ("text wildcard on tokens", {"bio": "Football fan"}, {"wildcard": {"bio": "f*l"}}, True),
    ("text range on tokens", {"bio": "zebra"}, {"range": {"bio": {"gte": "z"}}}, True),
    # match_phrase
    ("phrase exact", {"bio": "I really like cats"}, {"match_phrase": {"bio": "like cats"}}, True),
    ("phrase order", {"bio": "I really like cats"}, {"match_phrase": {"bio": "cats like"}}, False),
    ("phrase gap", {"bio": "I really like cats"}, {"match_phrase": {"bio": "really cats"}}, False),
    (
        "phrase slop 1",
        {"bio": "I really like cats"},
        {"match_phrase": {"bio": {"query": "really cats", "slop": 1}}},
        True,
    ),
    (
        "phrase swapped needs slop 2",
        {"bio": "like cats"},
        {"match_phrase": {"bio": {"query": "cats like", "slop": 1}}},
        False,
    ),
    ("phrase swapped slop 2", {"bio": "like cats"}, {"match_phrase": {"bio": {"query": "cats like", "slop": 2}}}, True),
    # position_increment_gap: phrases never span array values
    ("phrase never spans array values", {"bio": ["I like", "cats"]}, {"match_phrase": {"bio": "like cats"}}, False),
    ("phrase on keyword is term", {"gender": "a b"}, {"match_phrase": {"gender": "a b"}}, True),
)
def test_strings(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    check(doc, query, expected)


# --- exists / objects / null -----------------------------------------------------------------


@cases(
    ("exists value", {"gender": "F"}, {"exists": {"field": "gender"}}, True),
    ("exists null", {"gender": None}, {"exists": {"field": "gender"}}, False),
    ("exists []", {"gender": []}, {"exists": {"field": "gender"}}, False),
    ("exists [null]", {"gender": [None]}, {"exists": {"field": "gender"}}, False),
    ("exists [null, 'x']", {"gender": [None, "x"]}, {"exists": {"field": "gender"}}, True),
    ("exists missing", {}, {"exists": {"field": "gender"}}, False),
    ("exists keyword empty string", {"gender": ""}, {"exists": {"field": "gender"}}, True),
    ("exists text without tokens", {"bio": "!!"}, {"exists": {"field": "bio"}}, False),
    ("exists object via leaf", {"geo": {"city": "London"}}, {"exists": {"field": "geo"}}, True),
    ("exists object empty", {"geo": {}}, {"exists": {"field": "geo"}}, False),
    ("exists object all null", {"geo": {"city": None}}, {"exists": {"field": "geo"}}, False),
    ("exists deep object", {"user": {"segments": [{"id": "s1"}]}}, {"exists": {"field": "user.segments"}}, True),
    ("exists wildcard", {"geo": {"zip": "x"}}, {"exists": {"field": "geo.*"}}, True),
    ("dotted key == object", {"geo.city": "London"}, {"term": {"geo.city": "London"}}, True),
    ("dotted key partial", {"user.segments": {"id": "s1"}}, {"term": {"user.segments.id": "s1"}}, True),
    (
        "array of objects flattened",
        {"user": {"segments": [{"id": "s1"}, {"id": "s2"}]}},
        {"term": {"user.segments.id": "s2"}},
        True,
    ),
    ("unmapped doc field ignored", {"nope": 1, "gender": "F"}, {"term": {"gender": "F"}}, True),
    ("nested arrays flattened", {"tags": [["a"], ["b", ["c"]]]}, {"term": {"tags": "c"}}, True),
    ("boolean term", {"ok": "true"}, {"term": {"ok": True}}, True),
    ("boolean term string", {"ok": True}, {"term": {"ok": "true"}}, True),
    ("boolean empty string is false", {"ok": ""}, {"term": {"ok": False}}, True),
    ("boolean false", {"ok": False}, {"term": {"ok": True}}, False),
)
def test_exists_and_objects(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    check(doc, query, expected)


# --- dates -------------------------------------------------------------------------------------
# now = 2026-03-15T13:45:30.500Z. Rounding table of the range query docs ("Date math and
# rounding"): gt rounds up, gte rounds down, lt rounds down, lte rounds up.


@cases(
    ("gte now/d includes start of today", {"ts": "2026-03-15T00:00:00Z"}, {"range": {"ts": {"gte": "now/d"}}}, True),
    ("gte now/d excludes yesterday", {"ts": "2026-03-14T23:59:59.999Z"}, {"range": {"ts": {"gte": "now/d"}}}, False),
    ("gt now/d excludes all of today", {"ts": "2026-03-15T23:59:59.999Z"}, {"range": {"ts": {"gt": "now/d"}}}, False),
    ("gt now/d includes tomorrow", {"ts": "2026-03-16T00:00:00Z"}, {"range": {"ts": {"gt": "now/d"}}}, True),
    ("lt now/d excludes today", {"ts": "2026-03-15T00:00:00Z"}, {"range": {"ts": {"lt": "now/d"}}}, False),
    ("lt now/d includes yesterday", {"ts": "2026-03-14T23:59:59.999Z"}, {"range": {"ts": {"lt": "now/d"}}}, True),
    ("lte now/d includes end of today", {"ts": "2026-03-15T23:59:59.999Z"}, {"range": {"ts": {"lte": "now/d"}}}, True),
    ("lte now/d excludes tomorrow", {"ts": "2026-03-16T00:00:00Z"}, {"range": {"ts": {"lte": "now/d"}}}, False),
    ("now-30d/d lower bound", {"ts": "2026-02-13T00:00:00Z"}, {"range": {"ts": {"gte": "now-30d/d"}}}, True),
    ("now-30d/d lower bound excl", {"ts": "2026-02-12T23:59:59Z"}, {"range": {"ts": {"gte": "now-30d/d"}}}, False),
    ("now-1M/M", {"ts": "2026-02-01T00:00:00Z"}, {"range": {"ts": {"gte": "now-1M/M", "lt": "now/M"}}}, True),
    (
        "now-1M/M excl current month",
        {"ts": "2026-03-01T00:00:00Z"},
        {"range": {"ts": {"gte": "now-1M/M", "lt": "now/M"}}},
        False,
    ),
    ("now/w is Monday", {"ts": "2026-03-09T00:00:00Z"}, {"range": {"ts": {"gte": "now/w"}}}, True),
    ("now/w excludes Sunday before", {"ts": "2026-03-08T23:59:59Z"}, {"range": {"ts": {"gte": "now/w"}}}, False),
    ("now/d+8h", {"ts": "2026-03-15T08:00:00Z"}, {"range": {"ts": {"gte": "now/d+8h"}}}, True),
    (
        "now/d in +01:00",
        {"ts": "2026-03-14T23:00:00Z"},
        {"range": {"ts": {"gte": "now/d", "time_zone": "+01:00"}}},
        True,
    ),
    (
        "now/d in Europe/Paris",
        {"ts": "2026-03-14T22:59:59Z"},
        {"range": {"ts": {"gte": "now/d", "time_zone": "Europe/Paris"}}},
        False,
    ),
    ("explicit anchor ||+1M/d", {"ts": "2026-02-01T00:00:00Z"}, {"range": {"ts": {"gte": "2026-01-01||+1M/d"}}}, True),
    (
        "explicit anchor gt ||/M excludes month",
        {"ts": "2026-01-31T12:00:00Z"},
        {"range": {"ts": {"gt": "2026-01-15||/M"}}},
        False,
    ),
    # missing components round up for lte/gt (range query docs, "Missing date components")
    (
        "lte date-only includes the whole day",
        {"ts": "2026-01-01T23:00:00Z"},
        {"range": {"ts": {"lte": "2026-01-01"}}},
        True,
    ),
    (
        "gt date-only excludes the whole day",
        {"ts": "2026-01-01T23:00:00Z"},
        {"range": {"ts": {"gt": "2026-01-01"}}},
        False,
    ),
    ("gte date-only", {"ts": "2026-01-01T00:00:00Z"}, {"range": {"ts": {"gte": "2026-01-01"}}}, True),
    ("lt date-only", {"ts": "2026-01-01T00:00:00Z"}, {"range": {"ts": {"lt": "2026-01-01"}}}, False),
    (
        "doc with offset",
        {"ts": "2026-01-01T10:00:00.123+01:00"},
        {"range": {"ts": {"gte": "2026-01-01T09:00:00.123Z", "lte": "2026-01-01T09:00:00.123Z"}}},
        True,
    ),
    ("doc epoch millis number", {"ts": ms("2026-01-02T00:00:00Z")}, {"range": {"ts": {"gte": "2026-01-02"}}}, True),
    (
        "doc epoch millis string",
        {"ts": str(ms("2026-01-02T00:00:00Z"))},
        {"range": {"ts": {"gte": "2026-01-02"}}},
        True,
    ),
    (
        "query number bound is epoch millis",
        {"ts": "2026-01-02T00:00:00Z"},
        {"range": {"ts": {"gte": ms("2026-01-02T00:00:00Z")}}},
        True,
    ),
    (
        "query number bound excl",
        {"ts": "2026-01-02T00:00:00Z"},
        {"range": {"ts": {"gt": ms("2026-01-02T00:00:00Z")}}},
        False,
    ),
    (
        "range format param",
        {"ts": "2026-01-02T00:00:00Z"},
        {"range": {"ts": {"gte": "02/01/2026", "format": "dd/MM/yyyy"}}},
        True,
    ),
    ("term on date is the whole day", {"ts": "2026-01-02T15:00:00Z"}, {"term": {"ts": "2026-01-02"}}, True),
    ("term on date other day", {"ts": "2026-01-03T00:00:00Z"}, {"term": {"ts": "2026-01-02"}}, False),
    ("field format", {"day": "2026-01-02"}, {"range": {"day": {"gte": "2026-01-02", "lte": "2026-01-02"}}}, True),
    (
        "time_zone applies to bare dates",
        {"ts": "2026-01-01T23:30:00Z"},
        {"range": {"ts": {"gte": "2026-01-02", "time_zone": "+01:00"}}},
        True,
    ),
)
def test_dates(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    check(doc, query, expected)


# --- geo ----------------------------------------------------------------------------------------
WIMBLEDON = {"lat": 51.42, "lon": -0.21}  # ~6.55 km from Battersea (51.47, -0.16)


@cases(
    (
        "object point",
        {"geo": {"location": {"lat": 51.47, "lon": -0.16}}},
        {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "outside",
        {"geo": {"location": {"lat": 51.47, "lon": -0.16}}},
        {"geo_distance": {"distance": "5km", "geo.location": WIMBLEDON}},
        False,
    ),
    (
        "array [lon, lat]",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "string 'lat,lon'",
        {"geo": {"location": "51.47,-0.16"}},
        {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "WKT",
        {"geo": {"location": "POINT (-0.16 51.47)"}},
        {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "geohash",
        {"geo": {"location": "gcpuvpk"}},
        {"geo_distance": {"distance": "12km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "array of points, any",
        {"geo": {"location": [[0.0, 0.0], [-0.16, 51.47]]}},
        {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "string lat/lon object",
        {"geo": {"location": {"lat": "51.47", "lon": "-0.16"}}},
        {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "centre as [lon, lat]",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "7km", "geo.location": [-0.21, 51.42]}},
        True,
    ),
    (
        "centre as string",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "7km", "geo.location": "51.42,-0.21"}},
        True,
    ),
    (
        "miles",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "4.2mi", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "miles too small",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "3.5miles", "geo.location": WIMBLEDON}},
        False,
    ),
    (
        "metres bare number",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": 7000, "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "'6500 m' with space",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "6600 m", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "yards",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "7500yd", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "nautical miles",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "3NM", "geo.location": WIMBLEDON}},
        False,
    ),
    (
        "nmi",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "3.6nmi", "geo.location": WIMBLEDON}},
        True,
    ),
    (
        "ft",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "22000ft", "geo.location": WIMBLEDON}},
        True,
    ),
    ("missing field", {}, {"geo_distance": {"distance": "7km", "geo.location": WIMBLEDON}}, False),
    (
        "plane distance_type accepted",
        {"geo": {"location": [-0.16, 51.47]}},
        {"geo_distance": {"distance": "7km", "distance_type": "plane", "geo.location": WIMBLEDON}},
        True,
    ),
)
def test_geo(doc: dict[str, Any], query: dict[str, Any], expected: bool) -> None:
    check(doc, query, expected)


# --- case_insensitive folds ASCII only --------------------------------------------------------
# AutomatonQueries.toCaseInsensitiveChar adds the other case for code points up to 128 only
# ("For now we only work with ASCII characters"): every other character must match exactly.
def _ci(kind: str, value: str) -> dict[str, Any]:
    return {kind: {"gender": {"value": value, "case_insensitive": True}}}


CASE_INSENSITIVE_CASES = (
    ("ascii letters fold", "teacher", _ci("term", "TEACHER"), True),
    ("accented capital does not fold", "école", _ci("term", "ÉCOLE"), False),
    ("accented exact, ascii folds", "École", _ci("term", "éCOLE"), False),
    ("accented identical, ascii folds", "École", _ci("term", "ÉCOLE"), True),
    ("kelvin sign is not k", "k", _ci("term", "\u212a"), False),
    ("dotted capital I is not i", "i", _ci("term", "\u0130"), False),
    ("greek sigma forms do not fold", "οδος", _ci("term", "ΟΔΟΣ"), False),
    ("prefix folds ascii only", "éxé", _ci("prefix", "É"), False),
    ("prefix ascii", "SW19 1AA", _ci("prefix", "sw19"), True),
    ("wildcard folds ascii only", "Straße", _ci("wildcard", "STRASS*"), False),
    ("wildcard ascii", "Straße", _ci("wildcard", "STRA?E"), True),
)


@cases(*CASE_INSENSITIVE_CASES)
def test_case_insensitive_folds_ascii_only(doc: Any, query: dict[str, Any], expected: bool) -> None:
    check({"gender": doc}, query, expected)


@pytest.mark.parametrize("presearcher", ["indexed", "match_all"])
def test_case_insensitive_engine_agrees(presearcher: str) -> None:
    from percolators.embedded import EmbeddedPercolator
    from percolators.port import Rule

    engine = EmbeddedPercolator(MAPPING_JSON, presearcher=presearcher)
    engine.upsert(Rule(f"r{i}", query) for i, (_, _, query, _) in enumerate(CASE_INSENSITIVE_CASES))
    docs = [{"gender": doc} for _, doc, _, _ in CASE_INSENSITIVE_CASES]
    got = engine.percolate(docs, now=datetime.fromtimestamp(NOW_MS / 1000, UTC))
    for i, (name, _, _, expected) in enumerate(CASE_INSENSITIVE_CASES):
        assert (f"r{i}" in got[i]) is expected, name  # type: ignore[operator]
