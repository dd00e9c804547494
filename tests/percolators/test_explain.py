"""explain(): verdicts equal the reference matcher, clause paths and human reasons."""

from __future__ import annotations

import random
from typing import Any

from percolators.document import index_document
from percolators.dsl import parse_rule
from percolators.explain import explain
from percolators.mapping import Mapping
from percolators.reference import matches

MAPPING = Mapping.from_json(
    {
        "properties": {
            "age": {"type": "integer"},
            "gender": {"type": "keyword"},
            "tags": {"type": "keyword"},
            "bio": {"type": "text"},
            "ts": {"type": "date"},
            "geo": {"properties": {"location": {"type": "geo_point"}}},
        }
    }
)
NOW = 1773582330500  # 2026-03-15T13:45:30.500Z


def run(query: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    rule = parse_rule("r", query, MAPPING)
    indexed = index_document(doc, MAPPING)
    result = explain(rule.query, indexed, NOW)
    assert result.matched is matches(rule.query, indexed, NOW)
    return result.to_dict()


def test_range_reason() -> None:
    out = run({"range": {"age": {"gte": 25.5, "lt": 35.5}}}, {"age": 31})
    assert out == {"path": "range", "type": "range", "matched": True, "reason": "age 31 is within [26, 35]"}


def test_geo_reason() -> None:
    query = {"geo_distance": {"distance": "5km", "geo.location": {"lat": 51.42, "lon": -0.21}}}
    out = run(query, {"geo": {"location": {"lat": 51.47, "lon": -0.16}}})
    assert out["matched"] is False
    assert out["reason"] == "geo.location is 6.6 km from (51.42, -0.21), more than 5 km"


def test_bool_reasons_and_paths() -> None:
    query = {
        "bool": {
            "must": [{"term": {"gender": "F"}}],
            "should": [{"term": {"tags": "a"}}, {"term": {"tags": "b"}}],
            "minimum_should_match": 2,
            "must_not": {"exists": {"field": "ts"}},
        }
    }
    out = run(query, {"gender": "F", "tags": ["a"]})
    assert out["matched"] is False
    assert out["reason"] == "should: 1 of 2 matched, minimum_should_match 2"
    paths = [c["path"] for c in out["children"]]
    assert paths == ["bool.must[0].term", "bool.must_not.exists", "bool.should[0].term", "bool.should[1].term"]
    assert out["children"][0]["reason"] == "gender 'F' is 'F'"
    assert out["children"][1]["reason"] == "ts does not exist (no value, null or [])"
    ok = run(query, {"gender": "F", "tags": ["a", "b"]})
    assert ok["matched"] is True
    assert "should: 2 of 2 matched" in ok["reason"]


def test_missing_field_and_now_range() -> None:
    out = run({"range": {"ts": {"gte": "now-1d/d"}}}, {"ts": "2026-03-01"})
    assert out["matched"] is False
    assert "2026-03-14T00:00:00.000Z" in out["reason"] and "now-1d/d" in out["reason"]
    assert run({"term": {"gender": "F"}}, {})["reason"] == "gender has no value"


def test_explain_agrees_with_reference_on_random_rules() -> None:
    rnd = random.Random(3)
    leaves: list[dict[str, Any]] = [
        {"term": {"gender": "F"}},
        {"terms": {"tags": ["a", "b"]}},
        {"range": {"age": {"gte": 20, "lt": 40}}},
        {"exists": {"field": "bio"}},
        {"match": {"bio": "red car"}},
        {"match_phrase": {"bio": "red car"}},
        {"prefix": {"tags": "c"}},
        {"range": {"ts": {"gte": "now-30d/d"}}},
        {"geo_distance": {"distance": "50km", "geo.location": "51.5,-0.1"}},
    ]

    def rule(depth: int) -> dict[str, Any]:
        if depth == 0 or rnd.random() < 0.4:
            return rnd.choice(leaves)
        body: dict[str, Any] = {}
        for occur in ("must", "filter", "should", "must_not"):
            if rnd.random() < 0.5:
                body[occur] = [rule(depth - 1) for _ in range(rnd.randint(1, 3))]
        if "should" in body and rnd.random() < 0.5:
            body["minimum_should_match"] = rnd.choice([1, 2, "50%", "-1"])
        return {"bool": body}

    for _ in range(300):
        doc = {
            "gender": rnd.choice(["F", "M", None]),
            "tags": rnd.sample(["a", "b", "c1", "d"], rnd.randint(0, 3)),
            "age": rnd.choice([None, 18, 25, 39, 40]),
            "bio": rnd.choice(["", "a red car", "car red", None]),
            "ts": rnd.choice(["2026-03-01", "2026-02-01", None]),
            "geo": {"location": rnd.choice([None, [-0.1, 51.5], [2.35, 48.85]])},
        }
        run(rule(3), doc)
