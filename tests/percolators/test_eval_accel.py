"""The C rule evaluator (``percolators._eval`` via ``percolators.programs``) against its Python twin
(the closures of ``percolators.matcher``) and the reference engine: programs, their short-circuits
and ``pre`` semantics, minimum_should_match, must_not-only bools, empty and large batches,
restriction to rule ids, rules replaced and deleted at run time, the scatter, and leaks.

Skipped (not failed) when the extension is not built; tests/test_accelerators.py fails CI then."""

from __future__ import annotations

import gc
import random
import sys
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from percolators import programs
from percolators.batch import BatchIndex
from percolators.document import index_document
from percolators.embedded import EmbeddedPercolator
from percolators.mapping import Mapping
from percolators.matcher import at_least, compile_node
from percolators.port import Rule
from percolators.programs import (
    KIND_PRE,
    KIND_RANGE,
    KIND_TERM,
    OP_BOOL,
    OP_LEAF,
    OP_NONE,
    LeafTable,
    Packed,
    compile_program,
    leaf_ids,
)
from percolators.query import Bool, MatchAll, MatchNone, Node, Phrase, Range, Term
from percolators.scatter import scatter_python
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules
from rules_service.schema import USER_MAPPING
from tests.leaks import bytes_kept

_eval = programs._eval
needs_c = pytest.mark.skipif(_eval is None, reason="percolators._eval not built (pip install -e . compiles it)")


class TinyBatch:
    """What the C evaluator reads of a batch: ``terms`` (key -> mask) and ``size``."""

    def __init__(self, size: int, terms: dict[Any, int]):
        self.size = size
        self.all = (1 << size) - 1
        self.terms = terms


def _engines(rules: list[Rule], **kwargs: Any) -> tuple[EmbeddedPercolator, EmbeddedPercolator]:
    fast = EmbeddedPercolator(accel=None, **kwargs)
    slow = EmbeddedPercolator(accel=False, **kwargs)
    fast.upsert(rules)
    slow.upsert(rules)
    return fast, slow


def _same(fast: EmbeddedPercolator, slow: EmbeddedPercolator, docs: list[Any], **kwargs: Any) -> list[Any]:
    got = fast.percolate(docs, on_error="skip", now=WORKLOAD_NOW, **kwargs)
    assert [str(r) if isinstance(r, Exception) else r for r in got] == [
        str(r) if isinstance(r, Exception) else r for r in slow.percolate(docs, on_error="skip", now=WORKLOAD_NOW,
                                                                          **kwargs)
    ]
    assert fast.percolate_masks(docs, now=WORKLOAD_NOW, **kwargs) == slow.percolate_masks(docs, now=WORKLOAD_NOW,
                                                                                          **kwargs)
    return got


# ----- programs ---------------------------------------------------------------------------------
def test_programs_share_leaves_and_free_them_with_their_last_rule():
    table = LeafTable()
    girls = Bool(must=(Term("gender", "f"), Term("age_band", "18-24")), must_not=(Term("device.os", "ios"),))
    boys = Bool(must=(Term("gender", "m"), Term("age_band", "18-24")))
    first, second = compile_program(girls, table), compile_program(boys, table)
    assert len(table) == 4  # the age band term is shared
    assert set(leaf_ids(first)) & set(leaf_ids(second))
    code = list(memoryview(first).cast("i"))
    assert code[0] == OP_BOOL and code[1] == len(code) and code[3:6] == [2, 0, 1]
    assert code[6] == OP_LEAF and table.kinds[code[7]] == KIND_TERM
    table.release_program(first)
    assert len(table) == 2
    table.release_program(second)
    assert len(table) == 0 and set(table.kinds) == {0} and set(table.payloads) == {None}
    again = compile_program(boys, table)  # freed slots are reused
    assert max(leaf_ids(again)) < 4


def test_impossible_minimum_should_match_compiles_to_match_none():
    table = LeafTable()
    program = compile_program(Bool(should=(Term("gender", "f"),), minimum_should_match=2), table)
    assert list(memoryview(program).cast("i")) == [OP_NONE] and len(table) == 0


@needs_c
def test_short_circuit_skips_pre_dependent_leaves_and_passes_them_pre():
    table = LeafTable()
    calls: list[int] = []

    def phrase_like(batch: Any, pre: int) -> int:
        calls.append(pre)
        return pre & 0b0110

    phrase = Phrase("bio", ("a", "b"))
    missing = Bool(must=(Term("gender", "x"), phrase))
    present = Bool(must=(Term("gender", "f"), phrase))
    ids = ["a", "b"]
    codes = [compile_program(missing, table), compile_program(present, table)]
    for leaf_id in leaf_ids(codes[0]) + leaf_ids(codes[1]):  # the phrase leaves: our recording stand-in
        if table.kinds[leaf_id] == KIND_PRE:
            table.payloads[leaf_id] = phrase_like
    batch = TinyBatch(4, {("gender", "f"): 0b1100})
    assert programs.run(Packed(ids, codes), None, table, batch) == (["b"], [0b0100])
    assert calls == [0b1100]  # never called for the rule whose first conjunct is empty


@needs_c
@pytest.mark.parametrize("seed", range(6))
def test_at_least_k_of_should_equals_the_bit_sliced_counter(seed):
    rng = random.Random(seed)
    size = rng.choice([5, 64, 65, 200])
    values = [f"v{i}" for i in range(rng.randint(2, 7))]
    terms = {("tags", v): rng.getrandbits(size) for v in values}
    if rng.random() < 0.5:
        del terms[("tags", values[0])]  # a should clause no document has
    table = LeafTable()
    ids, codes, expected = [], [], []
    for k in range(1, len(values) + 1):
        node = Bool(should=tuple(Term("tags", v) for v in values), minimum_should_match=k)
        ids.append(f"k{k}")
        codes.append(compile_program(node, table))
        expected.append(at_least(k, [terms.get(("tags", v), 0) for v in values]) & ((1 << size) - 1))
    matched, masks = programs.run(Packed(ids, codes), None, table, TinyBatch(size, terms))
    assert dict(zip(matched, masks, strict=True)) == {i: m for i, m in zip(ids, expected, strict=True) if m}


@needs_c
def test_match_all_none_and_must_not_only_bools():
    table = LeafTable()
    nodes: dict[str, Node] = {
        "all": MatchAll(),
        "none": MatchNone(),
        "not_f": Bool(must_not=(Term("gender", "f"),)),
        "not_anything": Bool(must_not=(MatchAll(),)),
        "empty_bool": Bool(),
        "not_missing": Bool(must_not=(Term("gender", "zz"),)),
    }
    ids = sorted(nodes)
    codes = [compile_program(nodes[i], table) for i in ids]
    matched, masks = programs.run(Packed(ids, codes), None, table, TinyBatch(70, {("gender", "f"): 1 << 69 | 1}))
    full = (1 << 70) - 1
    assert dict(zip(matched, masks, strict=True)) == {
        "all": full,
        "empty_bool": full,
        "not_f": full & ~(1 << 69 | 1),
        "not_missing": full,
    }


@needs_c
def test_empty_batch_and_no_rules():
    table = LeafTable()
    code = compile_program(MatchAll(), table)
    assert programs.run(Packed(["r"], [code]), None, table, TinyBatch(0, {})) == ([], [])
    assert programs.run_lists(Packed(["r"], [code]), None, table, TinyBatch(0, {})) == []
    assert programs.run(Packed([], []), None, table, TinyBatch(3, {})) == ([], [])
    assert programs.run_lists(Packed([], []), None, table, TinyBatch(3, {})) == [[], [], []]
    engine = EmbeddedPercolator()
    assert engine.percolate([]) == [] and engine.percolate([{"gender": "f"}]) == [[]]
    engine.upsert([Rule("r", {"match_all": {}})])
    assert engine.percolate([]) == [] and engine.percolate_masks([]).rule_ids == []


@needs_c
def test_leaf_errors_propagate():
    table = LeafTable()

    def broken(batch: Any, pre: int) -> int:
        raise ValueError("leaf exploded")

    code = compile_program(Bool(must=(MatchAll(), Phrase("bio", ("x",)))), table)
    table.payloads[leaf_ids(code)[0]] = broken
    with pytest.raises(ValueError, match="leaf exploded"):
        programs.run(Packed(["r"], [code]), None, table, TinyBatch(3, {}))
    table.payloads[leaf_ids(code)[0]] = lambda batch, pre: "not a mask"
    with pytest.raises(TypeError, match="not an int"):
        programs.run_lists(Packed(["r"], [code]), None, table, TinyBatch(3, {}))
    with pytest.raises(ValueError, match="malformed"):
        programs.run(Packed(["r"], [b"\x03\x00\x00\x00"]), None, table, TinyBatch(3, {}))


# ----- the engine: C against the Python closures and the reference ------------------------------
@needs_c
@pytest.mark.parametrize("count,max_batch", [(1, 8192), (63, 8192), (64, 8192), (65, 8192), (250, 100),
                                             (8192 + 70, 8192)])
def test_batches_of_every_size_and_across_batch_boundaries(count, max_batch):
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(300, seed=21)]
    fast, slow = _engines(rules, max_batch=max_batch)
    docs = generate_documents(count, seed=22)
    got = _same(fast, slow, docs)
    if count >= 64:
        assert sum(map(len, got)) > count
    if count == 250:
        reference = EmbeddedPercolator(presearcher="match_all")
        reference.upsert(rules)
        assert got == reference.percolate(docs, now=WORKLOAD_NOW)


@needs_c
def test_restrict_to_rule_ids_small_and_large_and_unknown():
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(400, seed=31)]
    fast, slow = _engines(rules)
    docs = generate_documents(300, seed=32)
    for some in ([rules[5].id], [r.id for r in rules[::7]], [r.id for r in rules[:300]] + ["nope"], []):
        got = _same(fast, slow, docs, rule_ids=some)
        assert all(set(ids) <= set(some) for ids in got)


@needs_c
def test_rules_replaced_and_deleted_at_run_time_free_their_leaves():
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(300, seed=41)]
    fast, slow = _engines(rules)
    docs = generate_documents(200, seed=42)
    _same(fast, slow, docs)
    replaced = [Rule(r.id, rules[-1 - i].query) for i, r in enumerate(rules[:60:2])]
    gone = [r.id for r in rules[1:90:3]]
    for engine in (fast, slow):
        engine.upsert(replaced)
        engine.delete(gone)
    _same(fast, slow, docs)
    reference = EmbeddedPercolator(presearcher="match_all")
    reference.upsert(rules)
    reference.upsert(replaced)
    reference.delete(gone)
    assert fast.percolate(docs, now=WORKLOAD_NOW - timedelta(days=3)) == reference.percolate(
        docs, now=WORKLOAD_NOW - timedelta(days=3))
    fast.delete(list(fast.rule_ids()))
    assert len(fast.index.leaves) == 0
    assert fast.percolate(docs) == [[] for _ in docs]


@needs_c
def test_small_batches_use_the_presearcher_and_agree():
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(500, seed=51)]
    fast, slow = _engines(rules, max_batch=3)
    _same(fast, slow, generate_documents(40, seed=52))


# ----- scatter -----------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("size", [1, 63, 64, 65, 300, 8192 + 5])
def test_c_scatter_equals_python_scatter(size):
    rng = random.Random(size)
    count = 700  # more than one chunk of gathered rules
    matched = [f"r{i:04d}" for i in range(count)]
    masks = []
    for i in range(count):
        kind = i % 4
        mask = 0 if kind == 0 else 1 << rng.randrange(size) if kind == 1 else rng.getrandbits(size)
        masks.append(mask)
    expected: list[list[str]] = [[] for _ in range(size)]
    scatter_python(matched, masks, expected)
    assert _eval.scatter(matched, masks, size) == expected
    assert _eval.scatter((), (), size) == [[] for _ in range(size)]
    with pytest.raises(ValueError):
        _eval.scatter(matched, masks[:-1], size)


# ----- leaks -------------------------------------------------------------------------------------
@needs_c
def test_repeated_calls_do_not_leak():
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(200, seed=61)]
    engine = EmbeddedPercolator()
    engine.upsert(rules)
    docs = generate_documents(300, seed=62)
    probe = sorted(engine.rule_ids())[0]

    def once() -> None:
        engine.percolate(docs, now=WORKLOAD_NOW)
        result = engine.percolate_masks(docs, now=WORKLOAD_NOW)
        result.to_lists()
        table = LeafTable()
        code = compile_program(Bool(must=(MatchAll(), Phrase("bio", ("x",)))), table)
        table.payloads[leaf_ids(code)[0]] = _raise
        with pytest.raises(KeyError):
            programs.run_lists(Packed(["r"], [code]), None, table, TinyBatch(100, {}))

    for _ in range(5):
        once()
    gc.collect()
    refs = sys.getrefcount(probe)  # (after the warm-up filled the engine's caches)
    grown = bytes_kept(once, warmup=0, rounds=40)
    assert grown < 200_000, f"{grown} bytes kept after 40 rounds"
    assert sys.getrefcount(probe) == refs


def _raise(batch: Any, pre: int) -> int:
    raise KeyError("boom")


@needs_c
def test_rules_stored_without_the_c_evaluator_get_programs_when_it_is_back(monkeypatch):
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(200, seed=71)]
    docs = generate_documents(150, seed=72)
    monkeypatch.setattr(programs, "_eval", None)
    engine = EmbeddedPercolator()
    engine.upsert(rules)
    assert not any(stored.program for stored in engine.index.rules.values())  # only what is used is compiled
    python = engine.percolate(docs, now=WORKLOAD_NOW)
    monkeypatch.setattr(programs, "_eval", _eval)
    assert engine.percolate(docs, now=WORKLOAD_NOW) == python
    assert all(stored.program for stored in engine.index.rules.values())
    engine.delete([r.id for r in rules])
    assert len(engine.index.leaves) == 0 and not engine.index._evaluators


class MixedValuesBatch(BatchIndex):
    """A batch whose field holds values of two types (a typed mapping never does): bisecting them
    raises TypeError, and the C range leaf must hand over to the Python evaluator."""

    def field_values(self, name: str) -> tuple[list[Any], list[int]]:
        return [1, 5, "a"], [0b001, 0b010, 0b100]


@needs_c
def test_range_leaves_bisect_like_batch_range_mask_and_fall_back_on_mixed_types():
    docs = [index_document({"age": age}, Mapping.from_json(USER_MAPPING)) for age in (17, 30, 45, 30, 64)] * 30
    nodes: dict[str, Node] = {
        "teen": Range("age", 13, True, 19, True),
        "open_low": Range("age", None, True, 30, False),
        "open_high": Range("age", 30, False, None, True),
        "float_bounds": Range("age", 29.5, True, 45.0, True),
        "empty": Range("age", 50, True, 40, True),
        "all": Range("age", None, True, None, True),
    }
    ids = sorted(nodes)
    for batch in (BatchIndex(docs, 0, None, ()), MixedValuesBatch(docs[:3], 0, None, ())):
        table = LeafTable()
        matched, masks = programs.run(Packed(ids, [compile_program(nodes[i], table) for i in ids]), None, table, batch)
        got = dict(zip(matched, masks, strict=True))
        expected = {i: compile_node(nodes[i])(batch, batch.all) & batch.all for i in ids}
        assert {i: got.get(i, 0) for i in ids} == expected
    assert expected["all"] == 0b111 and expected["open_low"] == 0b011  # the mixed batch: compared one by one


# ----- safety: Python code run by the evaluator (leaves, a batch's methods, an int's __mod__) ----------

class _MeddlingInt(int):
    """A (negative) mask whose conversion, the public ``%`` path, runs code first."""

    action: Any = None

    def __mod__(self, other: Any) -> Any:
        action, type(self).action = type(self).action, None
        return int.__mod__(self, other) if action is None else action(self, other)


def _cleared(target: Any) -> Any:
    def act(value: int, other: int) -> int:
        target.clear()
        return int.__mod__(value, other)
    return act


@needs_c
def test_scatter_survives_a_mask_that_empties_the_lists():
    masks: list[Any] = [_MeddlingInt(-1), 0b10]
    _MeddlingInt.action = _cleared(masks)  # scatter read masks[1] from the emptied list: segfault
    assert _eval.scatter(["a", "b"], masks, 3) == [["a"], ["a", "b"], ["a"]]


@needs_c
def test_a_mask_whose_modulo_is_not_an_int_is_a_type_error():
    _MeddlingInt.action = lambda value, other: "not an int"  # was read as the digits of an int
    with pytest.raises(TypeError, match="not an int"):
        _eval.scatter(["a"], [_MeddlingInt(-1)], 3)


@needs_c
def test_a_term_mask_dropped_by_its_own_conversion():
    terms: dict[Any, int] = {("gender", "f"): _MeddlingInt(-1)}
    _MeddlingInt.action = _cleared(terms)  # the cache took its reference after: use after free
    table = LeafTable()
    code = compile_program(Term("gender", "f"), table)
    assert programs.run(Packed(["r"], [code]), None, table, TinyBatch(3, terms)) == (["r"], [0b111])


@needs_c
def test_a_leaf_that_rebinds_batch_terms():
    table = LeafTable()
    codes = [compile_program(Phrase("bio", ("x",)), table), compile_program(Term("gender", "f"), table)]
    batch = TinyBatch(3, {("gender", "f"): 0b001})
    reused: list[Any] = []

    def rebind(batch_: Any, pre: int) -> int:
        batch_.terms = {("gender", "f"): 0b010}  # the old dict's last reference was the batch's
        reused.extend({("gender", "f"): 0b100} for _ in range(3))  # its memory, reused
        return pre

    table.payloads[leaf_ids(codes[0])[0]] = rebind
    # terms are read once per call: the dict the call started with
    assert programs.run(Packed(["a", "b"], codes), None, table, batch) == (["a", "b"], [0b111, 0b001])


class _RangeBatch(TinyBatch):
    def __init__(self, size: int, on_values: Any):
        super().__init__(size, {})
        self.on_values = on_values

    def field_values(self, name: str) -> tuple[list[Any], list[int]]:
        self.on_values()
        return [10**20 + 1, 10**20 + 5, 10**20 + 9], [0b001, 0b010, 0b100]


@needs_c
def test_a_range_leaf_whose_payload_is_replaced_by_the_batch():
    table = LeafTable()
    code = compile_program(Range("n", 10**20 + 2, True, 10**20 + 9, False), table)
    leaf = leaf_ids(code)[0]
    assert table.kinds[leaf] == KIND_RANGE

    spec = table.payloads[leaf]  # a private copy: the spec tuple holds the only references to its bounds
    table.payloads[leaf] = (spec[0], int(str(10**20 + 2)), True, int(str(10**20 + 9)), False, None, spec[6])
    del spec

    reused: list[int] = []

    def replace() -> None:  # frees the spec tuple and its bounds while the leaf reads them
        table.payloads[leaf] = None
        reused.extend(int(str(10**20 + 99 + i)) for i in range(4))  # the bounds' memory, reused

    batch = _RangeBatch(3, replace)
    assert programs.run(Packed(["r"], [code]), None, table, batch) == (["r"], [0b010])


@needs_c
def test_a_range_bound_that_empties_the_values_while_compared():
    values = [1, 2, 3, 4, 5, 6, 7, 8]

    class Bound(int):
        def __lt__(self, other: Any) -> bool:
            values.clear()  # bisect then read the emptied list
            return int.__lt__(self, other)

        def __gt__(self, other: Any) -> bool:
            values.clear()
            return int.__gt__(self, other)

    class Batch(TinyBatch):
        def field_values(self, name: str) -> tuple[list[Any], list[int]]:
            return values, [1 << i for i in range(8)]

    table = LeafTable()
    code = compile_program(Range("n", Bound(3), True, None, False), table)
    with pytest.raises(RuntimeError, match="changed"):
        programs.run(Packed(["r"], [code]), None, table, Batch(8, {}))


# ----- property tests: adversarial masks, C against Python --------------------------------------------

@needs_c
@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(min_value=0, max_value=200))
def test_property_scatter_equals_python(data, size):
    masks = data.draw(st.lists(st.integers(min_value=0, max_value=(1 << size) - 1), max_size=12))
    ids = [f"r{i}" for i in range(len(masks))]
    expected: list[list[str]] = [[] for _ in range(size)]
    scatter_python(ids, masks, expected)
    assert _eval.scatter(ids, masks, size) == expected


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.lists(st.integers(min_value=-(2**400), max_value=2**400),
                                                          min_size=2, max_size=2))
def test_property_term_masks_of_any_int(size, values):
    # negative, zero, and bits beyond the batch: the closures' ``mask & pre`` semantics
    table = LeafTable()
    a_term, b_term = Term("g", "a"), Term("g", "b")
    rules: list[Node] = [a_term, Bool(must=(a_term,), must_not=(b_term,)),
                         Bool(should=(a_term, b_term), minimum_should_match=1),
                         Bool(should=(a_term, b_term, MatchAll()), minimum_should_match=2)]
    codes = [compile_program(rule, table) for rule in rules]
    batch = TinyBatch(size, {table.term_key("g", "a"): values[0], table.term_key("g", "b"): values[1]})
    full = batch.all
    a, b = values[0] & full, values[1] & full
    want = [a, a & ~b, a | b, a | b]
    ids = [f"r{i}" for i in range(len(rules))]
    expected = [(rid, mask) for rid, mask in zip(ids, want, strict=True) if mask]
    got = programs.run(Packed(ids, codes), None, table, batch)
    assert list(zip(*got, strict=True)) == expected


@needs_c
def test_scatter_over_an_empty_batch_ignores_every_bit():
    # size 0 still has one word, and its bits were not masked: written into a list of no documents
    assert _eval.scatter(["a", "b"], [1, 1 << 63], 0) == []
    assert _eval.scatter(["a"], [1 << 64 | 1], 1) == [["a"]]
