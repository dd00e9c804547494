"""The fast engine (indexed presearcher + batch matcher) returns exactly what the reference engine
(every rule checked against every document by ``percolators.reference``) returns.

Two sources of workloads: the realistic generator (``percolators.workload``) and hypothesis, which
draws rules and documents over a small mapping with every field type, arrays, nulls, missing
fields, must_not, should/minimum_should_match, ranges with ``now``, geo, prefix/wildcard, exists.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from percolators import programs
from percolators.embedded import EmbeddedPercolator
from percolators.errors import InvalidRuleError
from percolators.matcher import geo_band
from percolators.port import Rule
from percolators.query import GeoDistance
from percolators.reference import distance
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules


@pytest.fixture(autouse=True, scope="module", params=["c-evaluator", "python-evaluator"])
def evaluator(request: pytest.FixtureRequest):
    """Every test here runs with the C rule evaluator (``percolators._eval``) and with the Python
    closures (``percolators.matcher``) it accelerates; the C run is skipped when it is not built."""
    if request.param == "c-evaluator":
        if programs._eval is None:
            pytest.skip("percolators._eval not built")
        yield request.param
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "_eval", None)
        yield request.param


NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)

MAPPING: dict[str, Any] = {
    "properties": {
        "kw": {"type": "keyword"},
        "tags": {"type": "keyword"},
        "txt": {"type": "text"},
        "n": {"type": "integer"},
        "f": {"type": "float"},
        "b": {"type": "boolean"},
        "d": {"type": "date"},
        "loc": {"type": "geo_point"},
        "obj": {"properties": {"a": {"type": "keyword"}, "x": {"type": "integer"}}},
    }
}


def _compare_engines(fast, reference, rules, docs, now):
    accepted = []
    for rule in rules:
        try:
            reference.validate(rule)
        except InvalidRuleError:
            continue
        accepted.append(rule)
    fast.upsert(accepted)
    reference.upsert(accepted)
    got = fast.percolate(docs, now=now, on_error="skip")
    expected = reference.percolate(docs, now=now, on_error="skip")
    assert [_plain(r) for r in got] == [_plain(r) for r in expected]
    return got


def _plain(result: Any) -> Any:
    return ("error", str(result)) if isinstance(result, Exception) else result


# ----- the realistic workload -----------------------------------------------------------------
def test_workload_rules_match_like_the_reference():
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(1500, seed=11)]
    docs = generate_documents(300, seed=12)
    fast = EmbeddedPercolator()
    reference = EmbeddedPercolator(presearcher="match_all")
    got = _compare_engines(fast, reference, rules, docs, WORKLOAD_NOW)
    assert sum(len(r) for r in got) > 300  # the workload does match things
    # restricted to a few rules (a replay of one audience) and at another time
    some = [r.id for r in rules[::50]]
    restricted = fast.percolate(docs, rule_ids=some, now=WORKLOAD_NOW - timedelta(days=20))
    assert restricted == reference.percolate(docs, rule_ids=some, now=WORKLOAD_NOW - timedelta(days=20))
    # after removing and replacing rules at run time
    fast.delete(some)
    reference.delete(some)
    replaced = [Rule(r.id, rules[-1 - i].query) for i, r in enumerate(rules[1:40:3])]
    fast.upsert(replaced)
    reference.upsert(replaced)
    assert fast.percolate(docs, now=WORKLOAD_NOW) == reference.percolate(docs, now=WORKLOAD_NOW)


# ----- hypothesis -------------------------------------------------------------------------------
KEYWORDS = ["a", "b", "ab", "abc", "B", "Ab", "x y", "", "ä", "a*b"]
WORDS = ["quick brown", "brown fox", "the quick brown fox", "Fox", "fox brown quick", ""]
CENTRE = (51.5, -0.1)

keyword = st.sampled_from(KEYWORDS)
integer = st.integers(-3, 30)
date_value = st.one_of(
    st.integers(-40 * 86400, 5 * 86400).map(lambda s: NOW_MS - s * 1000),
    st.integers(-40, 5).map(lambda days: (NOW - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")),
)
lat = st.floats(CENTRE[0] - 0.2, CENTRE[0] + 0.2)
lon = st.floats(CENTRE[1] - 0.3, CENTRE[1] + 0.3)
point = st.one_of(
    st.builds(lambda a, o: {"lat": a, "lon": o}, lat, lon),
    st.builds(lambda a, o: [o, a], lat, lon),
    st.builds(lambda a, o: f"{a},{o}", lat, lon),
)


def _field_value(scalar: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(scalar, st.lists(scalar, max_size=3), st.none())


document = st.fixed_dictionaries(
    {},
    optional={
        "kw": _field_value(keyword),
        "tags": _field_value(keyword),
        "txt": _field_value(st.sampled_from(WORDS)),
        "n": _field_value(st.one_of(integer, integer.map(str))),
        "f": _field_value(st.sampled_from([0.5, 1.0, 2.25, -1.5, 3])),
        "b": _field_value(st.booleans()),
        "d": _field_value(date_value),
        "loc": st.one_of(point, st.lists(point, max_size=2), st.none()),
        "obj": st.one_of(
            st.fixed_dictionaries({}, optional={"a": _field_value(keyword), "x": _field_value(integer)}),
            st.none(),
        ),
    },
)

bound_n = st.one_of(integer, st.sampled_from([2.5, 10.5, -0.5]))
date_bound = st.one_of(
    st.sampled_from(["now-10d/d", "now-1h", "now/d", "now-30d", "now+1d/d", "now-3d/M"]),
    st.integers(-40, 5).map(lambda days: NOW_MS - days * 86400000),
)


def _range(field: str, bound: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), bound, min_size=1, max_size=2).map(
        lambda spec: {"range": {field: spec}}
    )


leaf_query = st.one_of(
    st.builds(lambda f, v: {"term": {f: v}}, st.sampled_from(["kw", "tags", "obj.a"]), keyword),
    st.builds(lambda f, v: {"term": {f: {"value": v, "case_insensitive": True}}}, st.sampled_from(["kw", "tags"]),
              keyword),
    st.builds(lambda v: {"term": {"n": v}}, integer),
    st.builds(lambda v: {"term": {"b": v}}, st.booleans()),
    st.builds(lambda v: {"term": {"f": v}}, st.sampled_from([0.5, 1.0, 3])),
    st.builds(lambda f, vs: {"terms": {f: vs}}, st.sampled_from(["kw", "tags"]), st.lists(keyword, min_size=1,
                                                                                         max_size=3)),
    st.builds(lambda vs: {"terms": {"obj.x": vs}}, st.lists(integer, min_size=1, max_size=3)),
    _range("n", bound_n),
    _range("obj.x", bound_n),
    _range("f", st.sampled_from([0.0, 1.0, 2.25])),
    _range("kw", keyword),
    _range("d", date_bound),
    st.builds(lambda f: {"exists": {"field": f}}, st.sampled_from(["kw", "txt", "n", "loc", "obj", "obj.a", "d"])),
    st.builds(lambda f, p: {"prefix": {f: p}}, st.sampled_from(["kw", "tags"]), st.sampled_from(["a", "A", "ab", ""])),
    st.builds(lambda p: {"prefix": {"kw": {"value": p, "case_insensitive": True}}}, st.sampled_from(["a", "AB"])),
    st.builds(lambda p, ci: {"wildcard": {"kw": {"value": p, "case_insensitive": ci}}},
              st.sampled_from(["a*", "*b", "?b*", "A*", "a\\*b", "*"]), st.booleans()),
    st.builds(lambda q, op: {"match": {"txt": {"query": q, "operator": op}}}, st.sampled_from(WORDS[:5]),
              st.sampled_from(["or", "and"])),
    st.builds(lambda q: {"match_phrase": {"txt": q}}, st.sampled_from(["quick brown", "brown fox", "fox"])),
    st.builds(lambda q: {"match": {"kw": q}}, keyword),
    st.builds(
        lambda d, a, o, kind: {"geo_distance": {"distance": d, "loc": {"lat": a, "lon": o}, "distance_type": kind}},
        st.sampled_from(["500m", "2km", "5km", "10km", "3mi", 7000]), lat, lon, st.sampled_from(["arc", "plane"]),
    ),
    st.just({"match_all": {}}),
    st.just({"match_none": {}}),
)

msm = st.one_of(st.none(), st.sampled_from([0, 1, 2, 3, "50%", "-1", "75%", "-25%", "2<-1"]))


def _bool(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    clauses = st.lists(children, max_size=3)

    def build(must, filt, should, must_not, minimum):
        body: dict[str, Any] = {}
        for key, value in (("must", must), ("filter", filt), ("should", should), ("must_not", must_not)):
            if value:
                body[key] = value
        if minimum is not None:
            body["minimum_should_match"] = minimum
        return {"bool": body}

    return st.builds(build, clauses, clauses, clauses, clauses, msm)


query = st.recursive(leaf_query, lambda children: st.one_of(
    _bool(children), children.map(lambda q: {"constant_score": {"filter": q}})), max_leaves=8)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(queries=st.lists(query, min_size=1, max_size=12), docs=st.lists(document, min_size=1, max_size=12),
       max_batch=st.sampled_from([1, 3, 4096]))
def test_random_rules_and_documents_match_like_the_reference(queries, docs, max_batch):
    rules = [Rule(f"r{i:02d}", q) for i, q in enumerate(queries)]
    fast = EmbeddedPercolator(MAPPING, max_batch=max_batch)
    _compare_engines(fast, EmbeddedPercolator(MAPPING, presearcher="match_all"), rules, docs, NOW)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(lat, lon), min_size=1, max_size=40), lat, lon,
       st.sampled_from([300.0, 1000.0, 2500.0, 8000.0, 15000.0, 40000.0]), st.sampled_from(["arc", "plane"]))
def test_geo_circle_edges_match_exactly(points, centre_lat, centre_lon, metres, kind):
    # many points straddling the circle's edge: no shortcut (flat earth, vectorised trigonometry)
    # may ever decide differently from the reference's distance
    docs = [{"loc": {"lat": a, "lon": o}} for a, o in points]
    rules = [Rule("g", {"geo_distance": {"distance": f"{metres}m", "loc": [centre_lon, centre_lat],
                                         "distance_type": kind}})]
    _compare_engines(EmbeddedPercolator(MAPPING), EmbeddedPercolator(MAPPING, presearcher="match_all"), rules,
                     docs, NOW)


def test_flat_earth_band_bounds_the_error():
    import random

    rng = random.Random(3)
    for _ in range(3000):
        c_lat, c_lon = rng.uniform(-69, 69), rng.uniform(-179, 179)
        metres = rng.choice([200.0, 1000.0, 5000.0, 20000.0, 60000.0, 100000.0])
        node = GeoDistance("loc", c_lat, c_lon, metres)
        band = geo_band(node)
        assert band is not None
        reach = metres / 111_195.0 * 1.2
        p_lat = c_lat + rng.uniform(-reach, reach)
        p_lon = c_lon + rng.uniform(-reach, reach) / max(0.05, math.cos(math.radians(p_lat)))
        if not -90 < p_lat < 90 or not -180 <= p_lon <= 180:
            continue
        flat = math.hypot(p_lat - c_lat, (p_lon - c_lon) * math.cos(math.radians(c_lat))) * 111_195.0799
        exact = distance(node, p_lat, p_lon)
        if exact <= metres * 1.5:
            assert abs(flat - exact) <= band * metres * 0.5 + 1e-6, (c_lat, metres, flat, exact, band)


# ----- fast output paths: numpy scatter and percolate_masks ------------------------------------
@settings(max_examples=150, deadline=None)
@given(size=st.integers(min_value=1, max_value=200), seed=st.integers(min_value=0, max_value=10**6),
       rules=st.integers(min_value=0, max_value=40))
def test_numpy_scatter_equals_python_scatter(size, seed, rules):
    import random

    from percolators.scatter import scatter, scatter_numpy, scatter_python

    rng = random.Random(seed)
    matched = sorted(f"r{rng.randrange(10**6):06d}-{i}" for i in range(rules))
    masks = []
    for i in range(rules):  # empty, single-document, sparse, dense and full masks
        density = (0.0, 0.01, 0.1, 0.7, 1.0)[i % 5]
        masks.append(sum(1 << d for d in range(size) if rng.random() < density) or (1 << rng.randrange(size)))
    expected: list[list[str]] = [[] for _ in range(size)]
    scatter_python(matched, masks, expected)
    assert expected == [[r for r, m in zip(matched, masks, strict=True) if m >> d & 1] for d in range(size)]
    assert scatter_numpy(matched, masks, size) == expected
    assert scatter(matched, masks, size) == expected


def _many_matches_workload(count: int) -> tuple[list[Rule], list[Any]]:
    """Rules matching a large share of the documents (like 100,000 rules: ~900 matches per
    document), plus documents that cannot be indexed."""
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(count, seed=21)]
    broad: list[dict[str, Any]] = [
        {"match_all": {}},
        {"bool": {"must_not": [{"term": {"gender": "f"}}]}},
        {"exists": {"field": "age"}},
        {"range": {"age": {"gte": 18}}},
        {"bool": {"should": [{"term": {"gender": "m"}}, {"term": {"gender": "f"}}]}},
    ]
    rules += [Rule(f"broad-{i:03d}", broad[i % len(broad)]) for i in range(60)]
    docs: list[Any] = list(generate_documents(700, seed=22))
    docs[5] = "not an object"
    docs[300] = {"age": "not a number"}
    docs[699] = ["still", "not"]
    return rules, docs


def test_many_matches_and_errors_match_like_the_reference():
    rules, docs = _many_matches_workload(600)
    fast = EmbeddedPercolator(max_batch=256)
    got = _compare_engines(fast, EmbeddedPercolator(presearcher="match_all"), rules, docs, WORKLOAD_NOW)
    assert sum(len(r) for r in got if isinstance(r, list)) > 30 * len(docs)  # the numpy scatter ran
    assert isinstance(got[5], Exception) and isinstance(got[300], Exception)


def test_percolate_masks_equals_percolate():
    from percolators.embedded import BatchMatches

    rules, docs = _many_matches_workload(400)
    restrict = {rule.id for rule in rules[::3]} | {"no-such-rule"}
    for max_batch in (4096, 200, 7):
        engine = EmbeddedPercolator(max_batch=max_batch)
        engine.upsert(rules)
        for rule_ids in (None, restrict, {"broad-001"}, set()):
            expected = engine.percolate(docs, now=WORKLOAD_NOW, on_error="skip", rule_ids=rule_ids)
            got = engine.percolate_masks(docs, now=WORKLOAD_NOW, rule_ids=rule_ids)
            assert isinstance(got, BatchMatches) and got.size == len(docs)
            assert got.rule_ids == sorted(got.rule_ids) and all(got.masks)
            assert sorted(got.errors) == [i for i, r in enumerate(expected) if isinstance(r, Exception)]
            assert [_plain(r) for r in got.to_lists()] == [_plain(r) for r in expected]
            counts: dict[str, int] = {}
            for result in expected:
                for rule_id in result if isinstance(result, list) else ():
                    counts[rule_id] = counts.get(rule_id, 0) + 1
            assert got.counts() == counts
    reference = EmbeddedPercolator(presearcher="match_all")
    reference.upsert(rules[:50])
    sample = docs[:40]
    sample[3] = 42
    masks_got = reference.percolate_masks(sample, now=WORKLOAD_NOW)
    wanted = BatchMatches.from_lists(reference.percolate(sample, now=WORKLOAD_NOW, on_error="skip"))
    assert (masks_got.size, masks_got.rule_ids, masks_got.masks) == (wanted.size, wanted.rule_ids, wanted.masks)
    assert {k: str(v) for k, v in masks_got.errors.items()} == {k: str(v) for k, v in wanted.errors.items()} != {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(queries=st.lists(query, min_size=1, max_size=8), docs=st.lists(document, min_size=1, max_size=10),
       max_batch=st.sampled_from([1, 3, 4096]))
def test_random_percolate_masks_equal_percolate(queries, docs, max_batch):
    fast = EmbeddedPercolator(MAPPING, max_batch=max_batch)
    accepted = []
    for i, q in enumerate(queries):
        rule = Rule(f"r{i:02d}", q)
        try:
            fast.validate(rule)
        except InvalidRuleError:
            continue
        accepted.append(rule)
    fast.upsert(accepted)
    expected = fast.percolate(docs, now=NOW, on_error="skip")
    assert [_plain(r) for r in fast.percolate_masks(docs, now=NOW).to_lists()] == [_plain(r) for r in expected]


def test_geo_circles_across_the_date_line_and_near_the_poles():
    docs = [{"loc": {"lat": a, "lon": o}} for a, o in (
        (10.0, 179.995), (10.0, -179.995), (10.0, -179.9), (10.001, 180.0), (89.5, 10.0), (89.5, -170.0),
        (-89.9, 0.0), (-89.9, 179.0), (0.0, 0.0))]
    rules = [
        Rule("east", {"geo_distance": {"distance": "3km", "loc": {"lat": 10.0, "lon": 179.99}}}),
        Rule("west", {"geo_distance": {"distance": "3km", "loc": {"lat": 10.0, "lon": -179.99}}}),
        Rule("north", {"geo_distance": {"distance": "200km", "loc": {"lat": 89.6, "lon": 100.0}}}),
        Rule("south", {"geo_distance": {"distance": "50km", "loc": {"lat": -89.95, "lon": 0.0}}}),
    ]
    got = _compare_engines(EmbeddedPercolator(MAPPING), EmbeddedPercolator(MAPPING, presearcher="match_all"),
                           rules, docs, NOW)
    assert got[1] == ["east", "west"] and got[0] == ["east", "west"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(lat, lon), min_size=2, max_size=30), st.sampled_from(["arc", "plane"]))
def test_geo_points_exactly_on_the_circle_match_like_the_reference(points, kind):
    # the radius is the reference's own distance to one of the points
    from percolators.geo import quantize

    centre, edge = points[0], quantize(*points[1])
    node = GeoDistance("loc", centre[0], centre[1], 1.0, kind)
    metres = distance(node, *edge)
    docs = [{"loc": {"lat": a, "lon": o}} for a, o in points[1:]]
    rules = [Rule("g", {"geo_distance": {"distance": f"{metres!r}m", "loc": {"lat": centre[0], "lon": centre[1]},
                                         "distance_type": kind}})]
    # (the parsed rule's radius and centre may differ from these in the last bits: the point is
    # on the edge or a hair away, on either side; both engines must agree all the same)
    _compare_engines(EmbeddedPercolator(MAPPING), EmbeddedPercolator(MAPPING, presearcher="match_all"), rules,
                     docs, NOW)


def test_numpy_scatter_with_thousands_of_rules():
    # more rules than one transposition block, documents not a multiple of a column word
    import random

    from percolators.scatter import _TRANSPOSE_BLOCK, scatter_numpy, scatter_python

    rng = random.Random(5)
    size, count = 1000, 2 * _TRANSPOSE_BLOCK + 37
    matched = [f"r{i:05d}" for i in range(count)]
    masks = [rng.getrandbits(size) & rng.getrandbits(size) & rng.getrandbits(size) or 1 for _ in range(count)]
    expected: list[list[str]] = [[] for _ in range(size)]
    scatter_python(matched, masks, expected)
    assert scatter_numpy(matched, masks, size) == expected
