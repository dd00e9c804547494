"""The presearcher's anchors and candidates, the batch index and the bit-counting helper, on node
trees built by hand (no DSL parsing involved)."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from percolators.batch import BatchIndex, iter_bits, mask_of
from percolators.document import index_document
from percolators.mapping import Mapping
from percolators.matcher import at_least, compile_node
from percolators.presearcher import (
    BUCKET,
    GEO,
    PREFIX,
    IndexedPresearcher,
    MatchAllPresearcher,
    TermWeightor,
    extract_anchor,
)
from percolators.query import (
    Bool,
    Exists,
    GeoDistance,
    MatchAll,
    MatchNone,
    Prefix,
    Range,
    Term,
    Terms,
    Wildcard,
)
from rules_service.schema import USER_MAPPING

MAPPING = Mapping.from_json(USER_MAPPING)
TYPES = {path: spec.type for path, spec in MAPPING.fields.items()}
W = TermWeightor()


def anchor(node):
    return extract_anchor(node, TYPES, W)


def batch_of(*docs, now_ms=0):
    return BatchIndex([index_document(d, MAPPING) for d in docs], now_ms, None, {"geo.location"})


def test_term_and_terms_anchor_on_their_values():
    assert anchor(Term("gender", "female")) == {("gender", "female")}
    assert anchor(Terms("interests", frozenset({"golf", "yoga"}))) == {("interests", "golf"), ("interests", "yoga")}


def test_conjunction_anchors_on_most_selective_conjunct():
    node = Bool(filter=(Term("gender", "female"), Term("occupation", "nurse"), Range("age", 18, True, None, True)))
    assert anchor(node) == {("occupation", "nurse")}


def test_should_with_msm_anchors_on_union_and_must_not_never_anchors():
    node = Bool(should=(Term("interests", "golf"), Prefix("geo.postcode", "SW")), minimum_should_match=1)
    assert anchor(node) == {("interests", "golf"), (PREFIX, "geo.postcode", "SW")}
    assert anchor(Bool(must_not=(Term("gender", "male"),))) is None
    # should without msm (there is a filter) is optional: it cannot anchor
    assert anchor(Bool(filter=(Exists("age", ("age",)),), should=(Term("gender", "male"),))) is None


def test_unanchorable_clauses():
    assert anchor(MatchAll()) is None
    assert anchor(Exists("age", ("age",))) is None
    assert anchor(Range("age", 18, True, None, True)) is None  # unbounded
    assert anchor(Range("last_seen", 0, True, 10**12, True)) is None  # date
    wildcard = Wildcard("device.model", "*Pixel*", re.compile(".*Pixel.*"))
    assert anchor(wildcard) is None
    assert anchor(MatchNone()) == frozenset()
    assert anchor(Bool(should=(Term("gender", "male"),), minimum_should_match=2)) == frozenset()


def test_integer_range_anchors_on_buckets_and_geo_on_cells():
    keys = anchor(Range("age", 25, True, 34, True))
    assert keys and all(k[0] == BUCKET for k in keys) and len(keys) <= 16
    cells = anchor(GeoDistance("geo.location", 51.5, -0.1, 5000.0))
    assert cells and all(k[0] == GEO for k in cells)


def _indexed_with(rules):
    pre = IndexedPresearcher(TYPES)
    for rule_id, node in rules.items():
        pre.add(rule_id, node)
    return pre


def test_candidates_follow_batch_terms_and_incremental_updates():
    rules = {
        "nurse": Bool(filter=(Term("occupation", "nurse"), Term("gender", "female"))),
        "young": Range("age", 18, True, 24, True),
        "sw": Prefix("geo.postcode", "SW1"),
        "near": GeoDistance("geo.location", 51.5, -0.1, 2000.0),
        "anyone": MatchAll(),
    }
    pre = _indexed_with(rules)
    batch = batch_of({"occupation": "nurse", "age": 40, "geo": {"postcode": "SW19 1AB"}})
    assert pre.candidates(batch, rules) == {"nurse", "sw", "anyone"}
    batch2 = batch_of({"age": 20, "geo": {"location": {"lat": 51.501, "lon": -0.1}}})
    assert pre.candidates(batch2, rules) == {"young", "near", "anyone"}
    pre.remove("young")
    pre.add("sw", Term("occupation", "chef"))  # replace
    assert pre.candidates(batch2, rules) == {"near", "anyone"}
    assert pre.candidates(batch, rules) == {"nurse", "anyone"}
    assert not pre._probes.get((PREFIX, "geo.postcode"))  # the prefix probe went with the rule
    assert MatchAllPresearcher().candidates(batch, rules) == set(rules)


def test_warning_for_rules_without_anchor():
    pre = IndexedPresearcher(TYPES)
    assert pre.add("r", Bool(must_not=(Term("gender", "male"),)))
    assert pre.add("t", Term("gender", "male")) == ()


def test_batch_masks_for_ranges_prefixes_and_presence():
    batch = batch_of(
        {"age": 20, "geo": {"postcode": "SW1A 1AA"}},
        {"age": 30, "geo": {"postcode": "sw1a 2bb"}},
        {"age": [25, 50]},
        {},
    )
    assert batch.range_mask("age", 20, True, 25, True) == 0b101
    assert batch.range_mask("age", 20, False, 30, False) == 0b100
    assert batch.range_mask("age", None, True, None, True) == 0b111
    assert batch.prefix_mask("geo.postcode", "SW1A", False) == 0b001
    assert batch.prefix_mask("geo.postcode", "sw1a", True) == 0b011  # the parser lower-cases it
    assert batch.present_mask("age") == 0b111
    assert batch.present_mask("geo.postcode") == 0b011
    evaluate = compile_node(Bool(must_not=(Exists("age", ("age",)),)))
    assert evaluate(batch, batch.all) & batch.all == 0b1000


HAND_BUILT = {
    "nurse": Bool(filter=(Term("occupation", "nurse"), Term("gender", "female"))),
    "young": Range("age", 18, True, 24, True),
    "sw": Prefix("geo.postcode", "SW1"),
    "sw_ci": Prefix("geo.postcode", "sw1a", case_insensitive=True),
    "near": GeoDistance("geo.location", 51.5, -0.1, 2000.0),
    "anyone": MatchAll(),
    "no_one": MatchNone(),
    "ageless": Bool(must_not=(Exists("age", ("age",)),)),
    "two_of": Bool(should=(Term("gender", "female"), Range("age", 25, True, None, True),
                           Wildcard("geo.postcode", "S*", re.compile("S.*", re.DOTALL))), minimum_should_match=2),
    "either": Bool(should=(Terms("occupation", frozenset({"nurse", "chef"})), Term("gender", "male"))),
    "nested": Bool(must=(Bool(should=(Term("gender", "female"), MatchAll()), must_not=(Term("age", 30),)),),
                   must_not=(Bool(must_not=(Exists("geo.postcode", ("geo.postcode",)),)),)),
}


@pytest.mark.parametrize("evaluator", ["c-evaluator", "python-evaluator"])
def test_hand_built_trees_evaluate_alike_with_both_evaluators(evaluator):
    from percolators import programs

    docs = [
        {"occupation": "nurse", "gender": "female", "age": 20, "geo": {"postcode": "SW1A 1AA"}},
        {"occupation": "chef", "age": 30, "geo": {"postcode": "sw1a 2bb", "location": {"lat": 51.501, "lon": -0.1}}},
        {"gender": "male", "age": [25, 50], "geo": {"location": {"lat": 51.6, "lon": -0.1}}},
        {},
    ] * 20  # 80 documents: two mask words
    batch = batch_of(*docs)
    ids = sorted(HAND_BUILT)
    # what each rule should match, document by document, by the reference matcher
    from percolators.reference import matches

    indexed = [index_document(d, MAPPING) for d in docs]
    expected = {rule_id: sum(1 << i for i, doc in enumerate(indexed) if matches(HAND_BUILT[rule_id], doc, 0))
                for rule_id in ids}
    if evaluator == "python-evaluator":
        got = {rule_id: compile_node(HAND_BUILT[rule_id])(batch, batch.all) & batch.all for rule_id in ids}
    else:
        if programs._eval is None:
            pytest.skip("percolators._eval not built")
        table = programs.LeafTable()
        packed = programs.Packed(ids, [programs.compile_program(HAND_BUILT[i], table) for i in ids])
        matched, masks = programs.run(packed, None, table, batch)
        got = {rule_id: dict(zip(matched, masks, strict=True)).get(rule_id, 0) for rule_id in ids}
    assert got == expected
    assert all(expected[i] for i in ("nurse", "young", "sw", "near", "anyone", "ageless", "two_of", "either"))


def test_at_least_matches_a_per_bit_count():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 6)
        masks = [rng.getrandbits(40) for _ in range(n)]
        k = rng.randint(1, n + 1)
        expected = 0
        for bit in range(40):
            if sum((m >> bit) & 1 for m in masks) >= k:
                expected |= 1 << bit
        assert at_least(k, masks) == expected, (k, masks)


@pytest.mark.parametrize("positions", [[0], [3, 3, 9], list(range(0, 200, 7)), [130, 2, 64],
                                       [*range(4999, 0, -3), 7, 7, 4999], list(range(300))])
def test_mask_helpers_round_trip(positions):
    mask = mask_of(positions)
    assert iter_bits(mask) == sorted(set(positions))
    assert list(itertools.compress(range(5000), (mask >> i & 1 for i in range(5000)))) == sorted(set(positions))


def test_scatter_appends_each_rule_to_its_documents_in_order():
    from percolators.embedded import scatter

    rng = random.Random(8)
    size = 300
    matched = [f"r{i:03d}" for i in range(60)]
    masks = []
    for i in range(60):  # empty-ish, single-document, sparse and dense masks
        density = (0.0, 0.003, 0.05, 0.6)[i % 4]
        masks.append(sum(1 << d for d in range(size) if rng.random() < density) or 1 << (i % size))
    lists: list[list[str]] = [[] for _ in range(size)]
    scatter(matched, masks, lists)
    assert lists == [[r for r, m in zip(matched, masks, strict=True) if m >> d & 1] for d in range(size)]
