"""The embedded percolator through its port: storing rules, percolating batches, errors, explain."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from percolators.document import index_document
from percolators.embedded import EmbeddedPercolator
from percolators.errors import InvalidDocumentError, InvalidRuleError
from percolators.factory import create_percolator
from percolators.fast_index import FastIndexer
from percolators.mapping import Mapping
from percolators.port import Rule
from percolators.workload import WORKLOAD_NOW, generate_documents
from rules_service.config import load_settings
from rules_service.schema import USER_MAPPING

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

RULES = [
    Rule("young-women", {"bool": {"filter": [{"term": {"gender": "female"}},
                                             {"range": {"age": {"gte": 18, "lte": 24}}}]}}),
    Rule("golfers", {"terms": {"interests": ["golf", "golf_news"]}}),
    Rule("sw-not-ios", {"bool": {"must": [{"prefix": {"geo.postcode": "SW"}}],
                                 "must_not": [{"term": {"device.os": "ios"}}]}}),
    Rule("near-camden", {"geo_distance": {"distance": "2km", "geo.location": {"lat": 51.539, "lon": -0.1426}}}),
    Rule("recent", {"range": {"last_seen": {"gte": "now-7d/d"}}}),
    Rule("two-of", {"bool": {"should": [{"term": {"interests": "golf"}}, {"term": {"interests": "yoga"}},
                                         {"term": {"occupation": "nurse"}}], "minimum_should_match": 2}}),
]

DOCS = [
    {"gender": "female", "age": 22, "interests": ["yoga", "golf"], "last_seen": "2026-01-14T10:00:00Z"},
    {"gender": "male", "age": 40, "occupation": "nurse", "interests": "golf", "geo": {"postcode": "SW19 2AB"},
     "device": {"os": "android"}},
    {"geo": {"postcode": "SW4 1AA", "location": {"lat": 51.54, "lon": -0.143}}, "device": {"os": "ios"},
     "last_seen": "2025-12-01T00:00:00Z"},
    {},
]
EXPECTED = [["golfers", "recent", "two-of", "young-women"], ["golfers", "sw-not-ios", "two-of"], ["near-camden"], []]


@pytest.fixture
def engine():
    percolator = EmbeddedPercolator()
    percolator.upsert(RULES)
    return percolator


@pytest.mark.parametrize("presearcher", ["indexed", "match_all"])
def test_percolate_returns_sorted_matches_per_document(presearcher):
    percolator = EmbeddedPercolator(presearcher=presearcher)
    percolator.upsert(RULES)
    assert percolator.percolate(DOCS, now=NOW) == EXPECTED


def test_small_batches_give_the_same_answer(engine):
    small = EmbeddedPercolator(max_batch=1)
    small.upsert(RULES)
    assert small.percolate(DOCS, now=NOW) == engine.percolate(DOCS, now=NOW)


def test_now_pins_date_math(engine):
    later = datetime(2026, 3, 1, tzinfo=UTC)
    assert "recent" not in engine.percolate(DOCS[:1], now=later)[0]
    assert "recent" in engine.percolate(DOCS[:1], now=NOW)[0]


def test_upsert_replaces_and_delete_removes(engine):
    engine.upsert([Rule("golfers", {"term": {"gender": "male"}})])
    assert engine.percolate(DOCS, now=NOW)[1] == ["golfers", "sw-not-ios", "two-of"]
    assert "golfers" not in engine.percolate(DOCS, now=NOW)[0]
    engine.delete(["golfers", "unknown"])
    assert engine.rule_ids() == {r.id for r in RULES} - {"golfers"}
    assert engine.percolate(DOCS, now=NOW)[1] == ["sw-not-ios", "two-of"]


def test_rule_ids_restrict_matching(engine):
    assert engine.percolate(DOCS, rule_ids=["golfers", "nope"], now=NOW) == [["golfers"], ["golfers"], [], []]
    assert engine.percolate(DOCS, rule_ids=[], now=NOW) == [[], [], [], []]


def test_invalid_rule_names_rule_and_path_and_stores_nothing(engine):
    with pytest.raises(InvalidRuleError) as info:
        engine.upsert([Rule("ok", {"term": {"gender": "male"}}),
                       Rule("bad", {"bool": {"filter": [{"term": {"nope": 1}}]}})])
    assert info.value.rule_id == "bad"
    assert "bool.filter[0]" in info.value.path
    assert "ok" not in engine.rule_ids()
    with pytest.raises(InvalidRuleError):
        engine.validate(Rule("script", {"script": {"script": "true"}}))


def test_unselective_rules_are_accepted_with_a_warning(engine):
    reports = engine.upsert([Rule("everyone", {"match_all": {}}),
                             Rule("not-men", {"bool": {"must_not": [{"term": {"gender": "male"}}]}}),
                             Rule("adults", {"range": {"age": {"gte": 18}}}),
                             Rule("men", {"term": {"gender": "male"}})])
    warnings = {report.rule_id: report.warnings for report in reports}
    assert warnings["everyone"] and warnings["not-men"] and warnings["adults"]
    assert warnings["men"] == ()
    assert engine.validate(Rule("x", {"wildcard": {"device.model": "*Pixel"}})).warnings
    assert engine.percolate([{}], now=NOW) == [["everyone", "not-men"]]


def test_invalid_documents_raise_or_fill_their_slot(engine):
    docs = [{"age": "old"}, DOCS[0], ["not", "an", "object"]]
    with pytest.raises(InvalidDocumentError) as info:
        engine.percolate(docs, now=NOW)
    assert info.value.field == "age"
    results = engine.percolate(docs, now=NOW, on_error="skip")
    assert isinstance(results[0], InvalidDocumentError)
    assert results[1] == EXPECTED[0]
    assert isinstance(results[2], InvalidDocumentError)


def test_coercions_go_through_the_full_indexer(engine):
    doc = {"gender": ["female"], "age": "22", "geo.postcode": "SW1A 1AA", "interests": None}
    assert engine.percolate([doc], now=NOW) == [["sw-not-ios", "young-women"]]


def test_explain_says_why(engine):
    explanation = engine.explain(RULES[0].query, DOCS[1], now=NOW)
    assert explanation.matched is False
    assert any(not child.matched for child in explanation.children)
    assert engine.explain(RULES[0].query, DOCS[0], now=NOW).matched is True


def test_factory_picks_embedded_by_default():
    assert isinstance(create_percolator(load_settings(environ={})), EmbeddedPercolator)


def _edge_documents():
    return [
        {"age": 30.0}, {"age": True}, {"age": 2**40}, {"gender": 7}, {"gender": ["a", None, "b", "a"]},
        {"geo": {"location": [-0.1, 51.5]}}, {"geo": {"location": {"lat": 51, "lon": 0}}},
        {"geo": {"location": {"lat": 91.0, "lon": 0.0}}}, {"geo": "London"}, {"geo": None},
        {"last_seen": "2026-02-30T00:00:00Z"}, {"last_seen": 1768478400000}, {"last_seen": "2026-01-15"},
        {"last_seen": "2026-01-15T25:00:00Z"}, {"interests": []}, {"interests": [["nested"]]},
        {"device": {"os": {"name": "x"}}}, {"unmapped": {"deep": 1}}, {"user_id": ""},
    ]


def test_fast_indexer_agrees_with_the_full_indexer():
    mapping = Mapping.from_json(USER_MAPPING)
    fast = FastIndexer(mapping)
    for doc in generate_documents(300, seed=9, now=WORKLOAD_NOW) + _edge_documents():
        try:
            expected = index_document(doc, mapping)
        except InvalidDocumentError as exc:
            with pytest.raises(InvalidDocumentError) as info:
                fast.index(doc)
            assert str(info.value) == str(exc)
            continue
        got = fast.index(doc)
        assert (got.values, got.present, got.phrases) == (expected.values, expected.present, expected.phrases), doc


def _partly_plain_documents() -> list:
    # plain values first, then something the fast walk gives up on: what it posted must be undone
    return [
        {"gender": "female", "interests": ["golf", "yoga"], "geo": {"location": {"lat": 51.5, "lon": -0.1},
                                                                     "city": None}},
        {"age": 30, "interests": ["golf", 3], "device": {"os": "ios"}},
        {"gender": "male", "geo": {"location": [{"lat": 51.5, "lon": -0.12}, {"lat": 51.6, "lon": -0.1}],
                                   "postcode": "SW1 1AA", "country": 826}},
        {"age": "41", "gender": "male", "last_seen": "2026-01-10T00:00:00+01:00"},
        {"age": 2**40, "gender": "other"},
        {"interests": ["golf"], "geo.city": "London"},
    ]


@pytest.mark.parametrize("fields", ["all", "some"])
def test_index_batch_indexes_and_posts_like_the_full_indexer(fields):
    from percolators.batch import collect_postings

    mapping = Mapping.from_json(USER_MAPPING)
    fast = FastIndexer(mapping)
    geo_fields = {"geo.location"}
    wanted = set(mapping.fields) if fields == "all" else {"gender", "interests", "geo.location", "age", "last_seen"}
    docs: list = []
    for plain, odd in zip(generate_documents(200, seed=4, now=WORKLOAD_NOW), _edge_documents() * 6, strict=False):
        docs += [plain, odd]
    docs += [*_partly_plain_documents(), "not a document", 7, None, *generate_documents(20, seed=5)]
    build = fast.index_batch(docs, wanted, geo_fields, "skip")
    expected_docs, expected_slots, expected_errors = [], [], {}
    for slot, doc in enumerate(docs):
        try:
            if not isinstance(doc, dict):
                raise InvalidDocumentError("", f"a document must be a JSON object, not {type(doc).__name__}")
            expected_docs.append(index_document(doc, mapping))
            expected_slots.append(slot)
        except InvalidDocumentError as exc:
            expected_errors[slot] = str(exc)
    assert {slot: str(exc) for slot, exc in build.errors.items()} == expected_errors
    assert build.slots == expected_slots
    assert [(d.values, d.present, d.phrases) for d in build.docs] == [
        (d.values, d.present, d.phrases) for d in expected_docs]
    postings, geo = collect_postings(expected_docs, wanted, geo_fields)
    assert {k: v for k, v in build.postings.items() if v} == postings
    assert {k: v for k, v in build.geo.items() if v} == geo
    with pytest.raises(InvalidDocumentError):
        fast.index_batch(docs, wanted, geo_fields, "raise")


def test_rules_changed_between_batches_are_seen():
    # the engine caches the sorted rules between batches: every change must show in the next one
    engine = EmbeddedPercolator()
    engine.upsert([Rule(f"all-{i}", {"match_all": {}}) for i in range(5)])
    docs = [{"gender": "female"}, {"gender": "male"}]
    assert engine.percolate(docs) == [[f"all-{i}" for i in range(5)]] * 2
    engine.upsert([Rule("all-0", {"term": {"gender": "male"}}), Rule("b-new", {"match_all": {}})])
    assert engine.percolate(docs) == [["all-1", "all-2", "all-3", "all-4", "b-new"],
                                      ["all-0", "all-1", "all-2", "all-3", "all-4", "b-new"]]
    engine.delete(["all-1", "b-new"])
    assert engine.percolate(docs) == [["all-2", "all-3", "all-4"], ["all-0", "all-2", "all-3", "all-4"]]
    assert engine.percolate_masks(docs).counts() == {"all-0": 1, "all-2": 2, "all-3": 2, "all-4": 2}
