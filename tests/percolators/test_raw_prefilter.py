"""The raw-bytes prefilter is a NECESSARY condition: every document the real percolator matches
passes it (checked on the workload generator and with hypothesis), and it does filter."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from percolators.dsl import parse_rule
from percolators.embedded import EmbeddedPercolator
from percolators.mapping import Mapping
from percolators.port import Rule
from percolators.raw_prefilter import FALSE, TRUE, Condition, IntRange, compile_prefilter, rule_condition
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules
from rules_service.schema import USER_MAPPING

MAPPING = Mapping.from_json(USER_MAPPING)


def _condition(query: dict[str, Any]) -> Condition:
    return rule_condition(parse_rule("r", query, MAPPING), MAPPING)


def test_conditions_of_the_query_shapes() -> None:
    assert _condition({"term": {"occupation": "teacher"}}) == (frozenset({b'"teacher"'}),)
    assert _condition({"terms": {"device.os": ["ios", "android"]}}) == (frozenset({b'"ios"', b'"android"'}),)
    assert _condition({"prefix": {"geo.postcode": "SW19 "}}) == (frozenset({b'"SW19 '}),)
    assert _condition({"bool": {"filter": [{"term": {"gender": "male"}}, {"range": {"age": {"gte": 30}}},
                                           {"term": {"device.os": "ios"}}]}}) == (
        frozenset({b'"ios"'}), frozenset({b'"male"'}), frozenset({IntRange("age", 30, None)}))
    assert _condition({"bool": {"should": [{"term": {"gender": "male"}}, {"term": {"occupation": "chef"}}]}}) == (
        frozenset({b'"male"', b'"chef"'}),)
    # integer ranges: inclusive integer bounds on the source key; an empty range matches nothing
    assert _condition({"range": {"age": {"gt": 29.5, "lt": 40}}}) == (frozenset({IntRange("age", 30, 39)}),)
    assert _condition({"range": {"ad_slot.w": {"lte": 300}}}) == (frozenset({IntRange("w", None, 300)}),)
    assert _condition({"range": {"age": {"gt": 30, "lt": 31}}}) == FALSE
    assert _condition({"bool": {"should": [{"term": {"gender": "male"}}, {"range": {"age": {"gte": 3}}}]}}) == (
        frozenset({b'"male"', IntRange("age", 3, None)}),)
    # no condition: dates, geo, exists, must_not only, case_insensitive, a should with a geo distance
    query: dict[str, Any]
    for query in ({"range": {"last_seen": {"gte": "now-30d"}}}, {"exists": {"field": "gender"}},
                  {"bool": {"must_not": [{"term": {"gender": "male"}}]}},
                  {"term": {"gender": {"value": "MALE", "case_insensitive": True}}},
                  {"bool": {"should": [{"term": {"gender": "male"}}, {"geo_distance": {
                      "distance": "5km", "geo.location": {"lat": 51.4, "lon": -0.2}}}]}},
                  {"geo_distance": {"distance": "5km", "geo.location": {"lat": 51.4, "lon": -0.2}}},
                  {"match_all": {}}):
        assert _condition(query) == TRUE, query
    assert _condition({"match_none": {}}) == FALSE
    assert _condition({"bool": {"should": [{"term": {"gender": "male"}}], "minimum_should_match": 2}}) == FALSE
    # values a keyword field may get from a JSON number or boolean: bare patterns, or none
    assert _condition({"term": {"occupation": "12"}}) == (frozenset({b"12"}),)
    assert _condition({"term": {"occupation": "true"}}) == (frozenset({b"true"}),)
    assert _condition({"term": {"occupation": "1.5"}}) == TRUE
    assert _condition({"prefix": {"occupation": "1"}}) == TRUE
    assert _condition({"term": {"occupation": 'say "hi"'}}) == TRUE  # needs escaping


def _check_necessary(rules: list[dict[str, Any]], docs: list[dict[str, Any]], raws: list[bytes]) -> int:
    """Every match of the real percolator passes the prefilter; returns how many documents pass."""
    percolator = EmbeddedPercolator()
    percolator.upsert([Rule(id=r["id"], query=r["query"]) for r in rules])
    results = percolator.percolate(docs, now=WORKLOAD_NOW, on_error="skip")
    passed = 0
    for rule in rules:
        parsed = parse_rule(rule["id"], rule["query"], MAPPING)
        prefilter = compile_prefilter([parsed], MAPPING, sample=raws[:200])
        if prefilter is None:
            continue
        for raw, result in zip(raws, results, strict=True):
            ok = prefilter(raw)
            if isinstance(result, list) and rule["id"] in result:
                assert ok, (rule, raw)
    combined = compile_prefilter([parse_rule(r["id"], r["query"], MAPPING) for r in rules], MAPPING, sample=raws)
    for raw, result in zip(raws, results, strict=True):
        ok = combined is None or combined(raw)
        if isinstance(result, list) and result:
            assert ok, (result, raw)
        passed += ok
    return passed


def test_necessary_on_the_workload_and_selective() -> None:
    rules = generate_rules(300, seed=7)
    docs = generate_documents(2_000, seed=8)
    raws = [orjson.dumps(d) for d in docs]
    _check_necessary(rules, docs, raws)
    # every rule alone with a condition filters: on average far fewer documents pass than all
    with_condition = 0
    passed = 0
    for rule in rules:
        parsed = parse_rule(rule["id"], rule["query"], MAPPING)
        prefilter = compile_prefilter([parsed], MAPPING, sample=raws[:200])
        if prefilter is not None:
            with_condition += 1
            passed += sum(1 for raw in raws if prefilter(raw))
    assert with_condition > 0.8 * len(rules)
    assert passed / (with_condition * len(raws)) < 0.3


def test_documents_with_escapes_or_other_encoders_pass() -> None:
    rules = [{"id": "a", "query": {"bool": {"filter": [{"term": {"occupation": "chef"}},
                                                         {"prefix": {"geo.postcode": "SW19 "}}]}}},
             {"id": "b", "query": {"term": {"language": "fr"}}},
             {"id": "c", "query": {"bool": {"filter": [{"term": {"occupation": "12"}},
                                                        {"term": {"interests": "true"}}]}}}]
    docs: list[dict[str, Any]] = [{"user_id": "x\"y", "occupation": "chef", "geo": {"postcode": "SW19 1AA"}},
            {"user_id": "z", "occupation": "chef", "geo": {"postcode": "SW19 1AA"}, "language": "fr"},
            {"user_id": "e", "occupation": 12, "language": ["de", "fr"], "interests": [True]}]
    raws = [orjson.dumps(docs[0]), json.dumps(docs[1], indent=2).encode(), json.dumps(docs[2]).encode()]
    assert _check_necessary(rules, docs, raws) == 3


def test_integer_range_atom_on_tricky_bytes() -> None:
    atom = IntRange("age", 35, 49)
    assert not atom(b'{"age":30}') and not atom(b'{"age":500}') and not atom(b'{"x":1}')
    assert not atom(b'{"image":40,"age":4}')  # another key ending in the name is not it
    assert atom(b'{"age":35}') and atom(b'{"age" :\n 49 ,"x":1}')
    assert atom(b'{"age":30,"x":{"age":40}}')  # any occurrence may be the field
    assert atom(b'{"a.age":40}')  # a dotted key
    # not a plain integer: the engine may coerce it, so it may match
    for raw in (b'{"age":"30"}', b'{"age":40.0}', b'{"age":4e1}', b'{"age":[1,40]}', b'{"age":null}',
                b'{"age":true}'):
        assert atom(raw), raw


_VALUES = st.sampled_from(["male", "female", "chef", "12", "true", "SW19 1AA", "SW1", "ios", "Ios", "é", "a b"])
_SCALARS = st.one_of(_VALUES, st.integers(-20, 20), st.booleans(), st.none(), st.floats(-3, 3, allow_nan=False))
_FIELDS = st.sampled_from(["gender", "occupation", "geo.postcode", "device.os", "interests"])


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        _put(doc.setdefault(head, {}), rest, value)
    else:
        doc[head] = value


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"user_id": draw(st.sampled_from(["u1", "chef", "u\"2"]))}
    for path in draw(st.lists(_FIELDS, max_size=4, unique=True)):
        _put(doc, path, draw(st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3))))
    if draw(st.booleans()):
        doc["age"] = draw(st.one_of(st.integers(0, 90), st.integers(0, 90).map(str), st.floats(0, 90),
                                    st.lists(st.integers(0, 90), max_size=3), st.none()))
    if draw(st.booleans()):
        _put(doc, draw(st.sampled_from(["ad_slot.w", "ad_slot.h", "device.age"])), draw(st.integers(0, 600)))
    return doc


_LEAVES = st.one_of(
    st.builds(lambda f, v: {"term": {f: v}}, _FIELDS, _VALUES),
    st.builds(lambda f, v: {"terms": {f: v}}, _FIELDS, st.lists(_VALUES, min_size=1, max_size=3)),
    st.builds(lambda f, v: {"prefix": {f: v}}, _FIELDS, st.sampled_from(["S", "SW1", "ch", "1", "t", "é"])),
    st.builds(lambda f, v: {"wildcard": {f: v}}, _FIELDS, st.sampled_from(["SW*", "c?ef", "*x", "1*"])),
    st.builds(lambda f, v: {"term": {f: {"value": v, "case_insensitive": True}}}, _FIELDS, _VALUES),
    st.builds(lambda lo: {"range": {"age": {"gte": lo}}}, st.integers(0, 90)),
    st.builds(lambda f, op, v: {"range": {f: {op: v}}}, st.sampled_from(["age", "ad_slot.w"]),
              st.sampled_from(["gt", "gte", "lt", "lte"]), st.one_of(st.integers(0, 600), st.floats(0, 90))),
    st.builds(lambda lo, width: {"range": {"age": {"gte": lo, "lte": lo + width}}}, st.integers(0, 90),
              st.integers(-1, 30)),
    st.builds(lambda f: {"exists": {"field": f}}, _FIELDS),
)
_QUERIES = st.recursive(_LEAVES, lambda inner: st.builds(
    lambda must, flt, should, must_not, msm: {"bool": {
        "must": must, "filter": flt, "should": should, "must_not": must_not,
        **({"minimum_should_match": msm} if msm is not None else {})}},
    st.lists(inner, max_size=2), st.lists(inner, max_size=2), st.lists(inner, max_size=3),
    st.lists(inner, max_size=1), st.one_of(st.none(), st.integers(0, 3))), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries=st.lists(_QUERIES, min_size=1, max_size=3), docs=st.lists(_documents(), min_size=1, max_size=8),
       pretty=st.booleans())
def test_necessary_hypothesis(queries: list[dict[str, Any]], docs: list[dict[str, Any]], pretty: bool) -> None:
    rules = [{"id": f"r{i}", "query": q} for i, q in enumerate(queries)]
    raws = [json.dumps(d, indent=1, ensure_ascii=False).encode() if pretty else orjson.dumps(d) for d in docs]
    _check_necessary(rules, docs, raws)


def test_many_rules_combined() -> None:
    rules = generate_rules(120, seed=9)
    docs = generate_documents(600, seed=10)
    _check_necessary(rules, docs, [orjson.dumps(d) for d in docs])
