"""Parsing and validation: errors name the rule and clause path; normal forms; building blocks
(minimum_should_match, analyzer, date math, geo, mapping, document coercion)."""

from __future__ import annotations

from typing import Any

import pytest

from percolators.analysis import analyze
from percolators.datemath import bound_millis, evaluate, parse_date
from percolators.document import index_document
from percolators.dsl import calculate_min_should_match, parse_rule, selectivity_warnings
from percolators.errors import InvalidDocumentError, InvalidRuleError
from percolators.geo import arc_distance, cells_covering, geohash_encode, parse_distance, parse_point
from percolators.mapping import Mapping, MappingError
from percolators.query import Bool, DateMath, Exists, MatchAll, MatchNone, Phrase, Range, Term, Terms

MAPPING = Mapping.from_json(
    {
        "properties": {
            "age": {"type": "integer"},
            "small": {"type": "byte"},
            "gender": {"type": "keyword"},
            "bio": {"type": "text"},
            "ok": {"type": "boolean"},
            "ts": {"type": "date"},
            "geo": {"properties": {"city": {"type": "keyword"}, "location": {"type": "geo_point"}}},
        }
    }
)


def invalid(query: Any) -> InvalidRuleError:
    with pytest.raises(InvalidRuleError) as info:
        parse_rule("rule-7", query, MAPPING)
    assert "rule-7" in str(info.value)
    assert info.value.rule_id == "rule-7"
    return info.value


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query,path,fragment",
    [
        (
            {"bool": {"must": [{"term": {"age": 1}}, {"term": {"age2": 3}}]}},
            "bool.must[1].term.age2",
            "field 'age2' is not mapped",
        ),
        ({"script": {"script": "doc['age'].value > 3"}}, "script", "scripts are not allowed"),
        ({"bool": {"filter": {"script_score": {}}}}, "bool.filter.script_score", "scripts are not allowed"),
        ({"fuzzy": {"gender": "x"}}, "fuzzy", "unknown or unsupported query type 'fuzzy'"),
        ({"term": {"age": 1, "gender": "F"}}, "term", "doesn't support multiple fields"),
        ({"range": {"age": {"gte": 1, "foo": 2}}}, "range.age.foo", "does not support [foo]"),
        ({"range": {"age": {"gte": "abc"}}}, "range.age", "invalid range bound"),
        ({"range": {"age": {"gte": 1e12}}}, "range.age", "out of range"),
        ({"term": {"age": "abc"}}, "term.age", "invalid value [abc]"),
        (
            {"term": {"gender": {"value": "F", "case_insensitive": "yes"}}},
            "term.gender.case_insensitive",
            "must be true or false",
        ),
        (
            {"prefix": {"gender": {"value": "F", "case_insensitive": 1}}},
            "prefix.gender.case_insensitive",
            "must be true or false",
        ),
        ({"match": {"age": "abc"}}, "match.age", "invalid value [abc]"),
        ({"term": {"geo.location": "x"}}, "term.geo.location", "geo_point"),
        ({"match": {"geo.location": "x"}}, "match.geo.location", "geo_point"),
        ({"geo_distance": {"geo.location": {"lat": 1, "lon": 2}}}, "geo_distance.distance", "requires a 'distance'"),
        (
            {"geo_distance": {"distance": "5km", "geo.location": {"lat": 95, "lon": 2}}},
            "geo_distance.geo.location",
            "illegal latitude",
        ),
        (
            {"geo_distance": {"distance": "5parsecs", "geo.location": "1,2"}},
            "geo_distance.distance",
            "invalid distance",
        ),
        ({"geo_distance": {"distance": "5km", "age": "1,2"}}, "geo_distance.age", "needs a geo_point"),
        ({"exists": {"field": "nothing"}}, "exists.nothing", "not mapped"),
        ({"exists": {}}, "exists.field", "requires a 'field'"),
        ({"terms": {"gender": {"index": "users", "id": "1", "path": "g"}}}, "terms.gender", "terms lookup"),
        ({"terms": {"gender": "F"}}, "terms.gender", "array"),
        ({"term": {"gender": None}}, "term.gender", "cannot be null"),
        ({"term": {"gender": ["a"]}}, "term.gender", "string, number or boolean"),
        ({"bool": {"must": "x"}}, "bool.must", "object or an array"),
        (
            {"bool": {"should": [{"term": {"gender": "F"}}], "minimum_should_match": "x%"}},
            "bool.minimum_should_match",
            "invalid",
        ),
        ({"bool": {"must": [{}]}}, "bool.must[0]", "empty clause"),
        ({"term": {"gender": "F"}, "match_all": {}}, "", "one query type per object"),
        ({"prefix": {"age": "1"}}, "prefix.age", "keyword and text"),
        ({"range": {"geo.location": {"gte": 1}}}, "range.geo.location", "does not support range"),
        ({"range": {"age": {"gte": 1, "format": "yyyy"}}}, "range.age.format", "custom formats"),
        (
            {"range": {"ts": {"gte": "2020", "format": "no_such_format"}}},
            "range.ts.format",
            "unknown or unsupported date format",
        ),
        ({"range": {"ts": {"gte": "now-1x"}}}, "range.ts", "failed to parse date"),
        ({"range": {"ts": {"gte": "now", "time_zone": "Mars/Base"}}}, "range.ts.time_zone", "unknown time zone"),
        ({"term": {"geo": "x"}}, "term.geo", "is an object"),
        ({"match_phrase": {"bio": {"query": "a b", "slop": 500}}}, "match_phrase.bio.slop", "not supported"),
        ({"term": {"age": {"value": 3, "case_insensitive": True}}}, "term.age", "case_insensitive"),
        ({"term": {"ok": "yes"}}, "term.ok", "true] or [false"),
        ({"constant_score": {"query": {}}}, "constant_score.query", "does not support [query]"),
    ],
)
def test_invalid_rules_name_rule_and_path(query: Any, path: str, fragment: str) -> None:
    error = invalid(query)
    assert error.path == path, error.fields
    assert fragment in error.message, error.message
    assert path in str(error)


def test_multiple_errors_are_collected() -> None:
    error = invalid(
        {"bool": {"must": [{"term": {"nope": 1}}, {"script": {}}], "filter": {"range": {"age": {"gte": "x"}}}}}
    )
    assert set(error.fields) == {"bool.must[0].term.nope", "bool.must[1].script", "bool.filter.range.age"}


def test_query_must_be_object() -> None:
    with pytest.raises(InvalidRuleError):
        parse_rule("r", "term", MAPPING)  # type: ignore[arg-type]


# --- normal forms ------------------------------------------------------------------------------


def parse(query: Any) -> Any:
    return parse_rule("r", query, MAPPING).query


def test_paths_on_every_node() -> None:
    node = parse({"bool": {"must": [{"term": {"gender": "F"}}], "should": {"match": {"bio": "a b"}}}})
    assert isinstance(node, Bool) and node.path == "bool"
    assert node.must[0].path == "bool.must[0].term"
    assert node.should[0].path == "bool.should.match"
    assert isinstance(node.should[0], Bool)
    assert [c.path for c in node.should[0].should] == ["bool.should.match.bio[0]", "bool.should.match.bio[1]"]


def test_integer_range_rounds_inward_and_becomes_inclusive() -> None:
    assert parse({"range": {"age": {"gt": 25.5, "lt": 35.5}}}) == Range("age", 26, True, 35, True, path="range")
    assert parse({"range": {"age": {"gt": 25, "lt": 35}}}) == Range("age", 26, True, 34, True, path="range")
    assert isinstance(parse({"range": {"age": {"gt": 5, "lt": 6}}}), MatchNone)


def test_terms_single_value_becomes_term_and_byte_out_of_range_is_dropped() -> None:
    assert parse({"terms": {"gender": ["F"]}}) == Term("gender", "F", path="terms")
    assert parse({"terms": {"small": [1, 300, 2]}}) == Terms("small", frozenset({1, 2}), path="terms")
    assert isinstance(parse({"term": {"small": 300}}), MatchNone)


def test_match_forms() -> None:
    assert parse({"match": {"bio": "Hello"}}) == Term("bio", "hello", path="match")
    node = parse({"match": {"bio": {"query": "a b c", "operator": "and"}}})
    assert isinstance(node, Bool) and len(node.must) == 3
    node = parse({"match": {"bio": {"query": "a b c d", "minimum_should_match": "75%"}}})
    assert isinstance(node, Bool) and node.minimum_should_match == 3
    assert parse({"match_phrase": {"bio": {"query": "New York", "slop": 1}}}) == Phrase(
        "bio", ("new", "york"), 1, path="match_phrase"
    )


def test_date_now_stays_symbolic_and_explicit_dates_resolve() -> None:
    node = parse({"range": {"ts": {"gte": "now-30d/d", "lt": "2026-01-01"}}})
    assert isinstance(node, Range) and isinstance(node.low, DateMath)
    assert node.low.ops == (("-", 30, "d"), ("/", 1, "d")) and node.low.rounding == "d"
    assert node.high == parse_date("2026-01-01") - 1 and node.high_inclusive


def test_unbounded_range_is_exists_and_empty_bool_and_prefix() -> None:
    assert parse({"range": {"age": {"gte": None}}}) == Exists("age", ("age",), path="range")
    assert parse({"bool": {}}) == Bool(path="bool")
    assert parse({"exists": {"field": "geo"}}) == Exists("geo", ("geo.city", "geo.location"), path="exists")
    assert isinstance(parse({"match": {"bio": {"query": "...", "zero_terms_query": "all"}}}), MatchAll)


def test_geo_distance_parses_every_centre_format() -> None:
    for centre in ({"lat": 51.5, "lon": -0.1}, [-0.1, 51.5], "51.5,-0.1", "POINT (-0.1 51.5)"):
        node = parse({"geo_distance": {"distance": "1km", "geo.location": centre, "_name": "x", "boost": 2}})
        assert (node.lat, node.lon, node.distance_m) == (51.5, -0.1, 1000.0)


# --- warnings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query,warned",
    [
        ({"match_all": {}}, True),
        ({"bool": {"must_not": {"term": {"gender": "M"}}}}, True),
        ({"exists": {"field": "age"}}, True),
        ({"range": {"ts": {"gte": "now-1d"}}}, True),
        ({"wildcard": {"gender": "*male"}}, True),
        ({"bool": {"should": [{"term": {"gender": "F"}}, {"match_all": {}}]}}, True),
        ({"term": {"gender": "F"}}, False),
        ({"bool": {"must": [{"term": {"gender": "F"}}, {"exists": {"field": "age"}}]}}, False),
        ({"bool": {"must": {"range": {"age": {"gte": 3}}}, "must_not": {"term": {"gender": "M"}}}}, False),
        ({"wildcard": {"gender": "fe*"}}, False),
    ],
)
def test_selectivity_warnings(query: Any, warned: bool) -> None:
    rule = parse_rule("r", query, MAPPING)
    assert bool(rule.warnings) is warned, rule.warnings
    assert bool(selectivity_warnings(rule.query)) is warned


def test_leading_wildcard_warning_names_the_clause() -> None:
    rule = parse_rule("r", {"bool": {"must": [{"term": {"gender": "F"}}, {"wildcard": {"geo.city": "*don"}}]}}, MAPPING)
    assert any("bool.must[1].wildcard" in w and "leading wildcard" in w for w in rule.warnings)


# --- minimum_should_match (Queries.calculateMinShouldMatch) --------------------------------------


@pytest.mark.parametrize(
    "count,spec,expected",
    [
        (3, "2", 2),
        (3, "-1", 2),
        (3, "5", 5),
        (3, "-5", 0),
        (3, "75%", 2),
        (4, "75%", 3),
        (3, "-25%", 3),
        (4, "-25%", 3),
        (10, "-25%", 8),
        (3, "100%", 3),
        (3, "3<90%", 3),
        (4, "3<90%", 3),
        (10, "3<90%", 9),
        (2, "2<-25% 9<-3", 2),
        (5, "2<-25% 9<-3", 4),
        (12, "2<-25% 9<-3", 9),
        (12, "2 < -25%  9 < -3", 9),
        (7, "29%", 2),
        (100, "29%", 29),
        (0, "1", 1),
    ],
)
def test_calculate_min_should_match(count: int, spec: str, expected: int) -> None:
    assert calculate_min_should_match(count, spec) == expected


# --- analyzer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,tokens",
    [
        ("The QUICK brown-fox", ("the", "quick", "brown", "fox")),
        ("don't stop", ("don't", "stop")),
        ("O'Reilly's book", ("o'reilly's", "book")),
        ("pi is 3.14, 1,000 people", ("pi", "is", "3.14", "1,000", "people")),
        ("snake_case and e.g. x.y", ("snake_case", "and", "e.g", "x.y")),
        ("end. Next", ("end", "next")),
        ("email me@example.com", ("email", "me", "example.com")),
        ("中文分词", ("中", "文", "分", "词")),
        ("Café Über", ("café", "über")),
        ("ΟΔΟΣ", ("οδοσ",)),
        ("a" * 300, ("a" * 255, "a" * 45)),
        ("", ()),
        ("  !!  ", ()),
        ("v1.2.3 wi-fi", ("v1.2.3", "wi", "fi")),
    ],
)
def test_standard_analyzer(text: str, tokens: tuple[str, ...]) -> None:
    assert analyze(text) == tokens


# --- dates ---------------------------------------------------------------------------------------


def test_date_formats_and_rounding() -> None:
    jan1 = 1767225600000  # 2026-01-01T00:00:00Z
    assert parse_date("2026-01-01") == jan1
    assert parse_date("2026-01-01T10:00:00Z") == jan1 + 10 * 3_600_000
    assert parse_date("2026-01-01T10:00:00.123+01:00") == jan1 + 9 * 3_600_000 + 123
    assert parse_date("2026-01-01T10:00:00,5Z") == jan1 + 10 * 3_600_000 + 500
    assert parse_date(str(jan1)) == jan1
    assert parse_date("2026") == jan1  # strict_date_optional_time takes a bare year
    assert parse_date("2026-01-01", round_up=True) == jan1 + 86_400_000 - 1
    with pytest.raises(ValueError):
        parse_date("2026-13-01")
    with pytest.raises(ValueError):
        parse_date("01/01/2026")
    assert parse_date("01/01/2026", "dd/MM/yyyy") == jan1
    assert (
        bound_millis("2026-01-01||/M", 0, side="gt", fmt="strict_date_optional_time", time_zone=None)
        == jan1 + 31 * 86_400_000
    )
    now = jan1 + 5 * 86_400_000 + 123
    assert evaluate("now-1M", now, round_up=False) == now - 31 * 86_400_000
    assert evaluate("now+1y/y", now, round_up=True) == parse_date("2027-12-31T23:59:59.999Z")
    assert evaluate("now/h", now, round_up=False, time_zone="+05:30") == jan1 + 5 * 86_400_000 - 30 * 60_000
    assert evaluate("2026-01-31||+1M", 0, round_up=False) == parse_date("2026-02-28")  # clamps to month end


# --- geo -----------------------------------------------------------------------------------------


def test_distances_and_points() -> None:
    assert parse_distance("5km") == 5000 == parse_distance("5 km") == parse_distance(5000)
    assert parse_distance("1mi") == 1609.344
    assert parse_distance("2NM") == 3704
    assert parse_distance("12in") == pytest.approx(0.3048)
    with pytest.raises(ValueError):
        parse_distance("5KM")
    assert parse_point({"lat": 1, "lon": 2}) == (1, 2) == parse_point([2, 1]) == parse_point("1,2")
    assert parse_point("POINT (2 1)") == (1, 2)
    assert parse_point({"type": "Point", "coordinates": [2, 1]}) == (1, 2)
    lat, lon = parse_point("u4pruydqqvj")
    assert abs(lat - 57.64911) < 1e-4 and abs(lon - 10.40744) < 1e-4
    with pytest.raises(ValueError):
        parse_point({"lat": 91, "lon": 0})
    with pytest.raises(ValueError):
        parse_point([181, 0])
    # one degree of latitude on ES's mean-radius sphere
    assert arc_distance(0, 0, 1, 0) == pytest.approx(111195.08, abs=0.01)


def test_cells_covering_contains_every_point_in_the_circle() -> None:
    import math
    import random

    rnd = random.Random(7)
    for lat, lon, dist in ((51.5, -0.1, 5000), (0.0, 179.99, 20000), (-33.9, 151.2, 800)):
        cells = cells_covering(lat, lon, dist, 5)
        for _ in range(300):
            bearing = rnd.uniform(0, 2 * math.pi)
            d = rnd.uniform(0, dist) / 6371008.7714
            la1, lo1 = math.radians(lat), math.radians(lon)
            la2 = math.asin(math.sin(la1) * math.cos(d) + math.cos(la1) * math.sin(d) * math.cos(bearing))
            lo2 = lo1 + math.atan2(
                math.sin(bearing) * math.sin(d) * math.cos(la1), math.cos(d) - math.sin(la1) * math.sin(la2)
            )
            plat, plon = math.degrees(la2), (math.degrees(lo2) + 540) % 360 - 180
            assert geohash_encode(plat, plon, 5) in cells, (lat, lon, plat, plon)


# --- mapping and documents -----------------------------------------------------------------------


def test_mapping_rejects_unknown_types_and_lists_leaves() -> None:
    with pytest.raises(MappingError, match="unsupported field type 'ip'"):
        Mapping.from_json({"properties": {"addr": {"type": "ip"}}})
    with pytest.raises(MappingError, match="nested"):
        Mapping.from_json({"properties": {"n": {"type": "nested", "properties": {}}}})
    m = Mapping.from_json({"properties": {"a.b": {"type": "keyword"}, "a": {"properties": {"c": {"type": "long"}}}}})
    assert m.leaves_under("a") == ("a.b", "a.c") and m.is_object("a")


@pytest.mark.parametrize(
    "doc,field",
    [
        ({"age": "abc"}, "age"),
        ({"age": 3e10}, "age"),
        ({"small": 300}, "small"),
        ({"age": True}, "age"),
        ({"ok": "yes"}, "ok"),
        ({"ts": "yesterday"}, "ts"),
        ({"geo": {"location": {"lat": 91, "lon": 0}}}, "geo.location"),
        ({"geo": {"location": "not a point!"}}, "geo.location"),
        ({"geo": "London"}, "geo"),
        ({"gender": {"a": 1}}, "gender"),
    ],
)
def test_document_errors_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidDocumentError) as info:
        index_document(doc, MAPPING)
    assert info.value.field == field
    assert field in str(info.value)


def test_document_values() -> None:
    doc = index_document(
        {
            "age": "35",
            "gender": 7,
            "ok": "false",
            "geo.city": "Paris",
            "geo": {"location": [2.35, 48.85]},
            "bio": ["a b", "b c"],
        },
        MAPPING,
    )
    assert doc.values["age"] == (35,)
    assert doc.values["gender"] == ("7",)
    assert doc.values["ok"] == (False,)
    assert doc.values["geo.city"] == ("Paris",)
    assert doc.values["bio"] == ("a", "b", "c")
    assert doc.phrases["bio"] == (("a", "b"), ("b", "c"))
    assert doc.present == frozenset({"age", "gender", "ok", "geo.city", "geo.location", "bio"})
