"""aggregate_masks' per-document step in C (``_aggregate.prepare``) against its Python twin
(``aggregate._prepare``): the same user ids, hour codes, distinct hours and (dimension, value) codes,
numbering included; None (the Python loop decides) for anything unusual; and whole batches equal on
both paths, with the same errors. Skipped when the C module is not built."""

from __future__ import annotations

import calendar
import random
from collections import OrderedDict, UserDict
from collections.abc import Sequence
from typing import Any

import pytest

from rules_service.counters import aggregate as aggregate_module
from rules_service.counters.aggregate import _prepare, _prepared_for_c, aggregate_masks, hour_of_last_seen
from rules_service.counters.port import CounterBatch
from tests.counters.test_aggregate_masks import DIMS, masks_of, random_case
from tests.leaks import bytes_kept

_c = aggregate_module._aggregate
pytestmark = pytest.mark.skipif(_c is None, reason="rules_service.counters._aggregate is not built")

DEFAULT_DIMS = ("gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange")
ODD_DIMS = ["gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange", "interests", "a.b.c"]


def c_prepare(docs: Sequence[Any], union: int, dims: Sequence[str], want_dims: bool) -> Any:
    n_words = (len(docs) + 63) // 64
    return _c.prepare(docs, union.to_bytes(n_words * 8, "little"), list(dims), [tuple(d.split(".")) for d in dims],
                      want_dims)


def py_prepare(docs: Sequence[Any], union: int, dims: Sequence[str], want_dims: bool) -> Any:
    return _prepared_for_c(*_prepare(docs, union, dims, want_dims))


def both_paths(docs: Sequence[Any], ids: list[str], masks: list[int], dims: Sequence[str], *,
               count_matches: bool = True, batch: tuple[CounterBatch, CounterBatch] | None = None
               ) -> tuple[CounterBatch, CounterBatch]:
    saved = aggregate_module.USE_C
    try:
        aggregate_module.USE_C = True
        fast = aggregate_masks(docs, ids, masks, dims, count_matches=count_matches,
                               batch=None if batch is None else batch[0])
        aggregate_module.USE_C = False
        slow = aggregate_masks(docs, ids, masks, dims, count_matches=count_matches,
                               batch=None if batch is None else batch[1])
    finally:
        aggregate_module.USE_C = saved
    return fast, slow


def same_error(docs: Sequence[Any], ids: list[str], masks: list[int], dims: Sequence[str]) -> str:
    """Both paths raise ValueError with the same message; returns it."""
    messages = []
    saved = aggregate_module.USE_C
    try:
        for use_c in (True, False):
            aggregate_module.USE_C = use_c
            with pytest.raises(ValueError) as raised:
                aggregate_masks(docs, ids, masks, dims)
            messages.append(str(raised.value))
    finally:
        aggregate_module.USE_C = saved
    assert messages[0] == messages[1]
    return messages[0]


def odd_docs(seed: int, count: int) -> list[dict[str, Any]]:
    """Plain JSON-shaped documents with every odd value shape: still the C fast path."""
    rnd = random.Random(seed)
    values: list[Any] = ["x", "", 1, 2.5, -0.0, 10**20, True, False, None, ["p", "q", "p", 3, None, {"z": 1}, True,
                                                                            "true", 1.0, "1"],
                         {"k": "v"}, [], "é", "東京", "\U0001f600", "a\x00b", (1, 2)]
    docs = []
    for i in range(count):
        hour = rnd.choice([0, 0, 0, 5, 30, 200])
        doc: dict[str, Any] = {
            "user_id": rnd.choice([f"u{i % 50}", "ü-ser", "用户"]),
            "last_seen": f"2026-11-{1 + hour // 24:02d}T{hour % 24:02d}:{rnd.randrange(60):02d}:00.000Z",
            "gender": rnd.choice(values), "age_band": rnd.choice(values), "exchange": rnd.choice(values),
            "interests": rnd.choice(values),
            "device": rnd.choice([None, "str", 7, [{"os": "x"}], {"os": rnd.choice(values),
                                                                  "carrier": rnd.choice(values)}]),
            "geo": rnd.choice([{"city": rnd.choice(values)}, {}, 5]),
            "a": rnd.choice([{"b": {"c": rnd.choice(values)}}, {"b": rnd.choice(values)}, None]),
        }
        docs.append({k: v for k, v in doc.items() if k in ("user_id", "last_seen") or rnd.random() > 0.1})
    return docs


# ----- prepare against _prepare --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("want_dims", [True, False])
def test_prepare_equals_the_python_twin_on_random_batches(seed: int, want_dims: bool) -> None:
    documents, _ = random_case(seed, 300, 10, 1 + seed * 10)
    rnd = random.Random(seed)
    for union in (rnd.getrandbits(len(documents)), (1 << len(documents)) - 1, 1):
        got = c_prepare(documents, union, DIMS, want_dims)
        assert got is not None
        assert got == py_prepare(documents, union, DIMS, want_dims)


@pytest.mark.parametrize("seed", [1, 2])
def test_prepare_equals_the_python_twin_on_odd_values(seed: int) -> None:
    docs = odd_docs(seed, 1500)
    union = random.Random(seed).getrandbits(len(docs))
    got = c_prepare(docs, union, ODD_DIMS, True)
    assert got is not None  # JSON shapes, however odd, stay on the C path
    expected = py_prepare(docs, union, ODD_DIMS, True)
    assert got == expected
    assert got[4] > 6 and len(got[5]) > 30  # lists widen the rows; many codes


def test_prepare_equals_the_python_twin_on_normalised_bids() -> None:
    import orjson

    from rules_service.normalize import normalise_message
    from workers.bidgen import BidGenerator

    docs = [normalise_message(orjson.dumps(bid)) for bid in BidGenerator(seed=3, users=300, days=3).bids(800)]
    union = random.Random(5).getrandbits(len(docs))
    got = c_prepare(docs, union, DEFAULT_DIMS, True)
    assert got is not None
    assert got == py_prepare(docs, union, DEFAULT_DIMS, True)
    assert len(got[2]) > 24  # three days of hours


@pytest.mark.parametrize("text", [
    "2026-11-22T10:15:00.000Z", "2026-11-22T10Z", "2026-11-22T10:00:00+00:00", "2026-02-29T23:59:59Z",
    "2024-02-29T00:00Z", "2026-12-31T23:00Z", "2026-01-01T00:00Z", "1970-01-01T00:00Z", "1969-12-31T23:00Z",
    "0001-01-01T00:00Z", "9999-12-31T23:00Z", "2026-11-00T00:00Z", "2026-11-45T99:00Z", "1900-03-01T05Z",
    "2000-02-29T12:00:00.123456+00:00",
])
def test_prepare_reads_last_seen_as_hour_of_last_seen(text: str) -> None:
    got = c_prepare([{"user_id": "u", "last_seen": text}], 1, [], False)
    assert got is not None
    assert got[2] == [hour_of_last_seen(text)] and got[1] == b"\x00" * 4


@pytest.mark.parametrize("text", [
    "2026-+1-22T10:00Z", "2026- 1-22T10:00Z", "\uff12\uff10\uff12\uff16-11-22T10:00Z",  # int() reads these
    "2026-11-22T1_:00Z", "2026-13-01T10:00Z", "0000-01-01T00:00Z", "2026-11-22T10:00", "2026-11-22 10:00Z",
    "2026-11-22T1Z", "Z", "", "2026-11-22T10:00+01:00",  # Python raises for these
])
def test_prepare_leaves_other_spellings_to_python(text: str) -> None:
    docs = [{"user_id": "u1", "last_seen": text}]
    assert c_prepare(docs, 1, [], False) is None
    assert c_prepare(docs, 0, [], False) is None  # Python reads (or refuses) unmatched documents too
    try:
        hour_of_last_seen(text)
    except ValueError:
        assert "last_seen" in same_error(docs, ["r"], [1], DEFAULT_DIMS)
        return
    fast, slow = both_paths(docs, ["r"], [1], DEFAULT_DIMS)
    assert fast == slow and fast.matches


def test_calendar_arithmetic_agrees_with_timegm_over_many_dates() -> None:
    rnd = random.Random(9)
    docs = []
    for _ in range(3000):
        y, m, d, h = rnd.randrange(1, 10000), rnd.randrange(1, 13), rnd.randrange(0, 100), rnd.randrange(0, 100)
        docs.append({"user_id": "u", "last_seen": f"{y:04d}-{m:02d}-{d:02d}T{h:02d}Z"})
    got = c_prepare(docs, (1 << len(docs)) - 1, [], False)
    assert got is not None
    expected = sorted({calendar.timegm((int(t[:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]), 0, 0, 0, 0, 0))
                       for t in (doc["last_seen"] for doc in docs)})
    assert got[2] == expected


def test_unmatched_documents_need_no_user() -> None:
    good = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z", "gender": "male"}
    docs: list[Any] = [None, {"oops": 1}, good, {"user_id": "", "last_seen": 5}, {"user_id": 3}]
    got = c_prepare(docs, 0b00100, DIMS, True)
    assert got is not None and got == py_prepare(docs, 0b00100, DIMS, True)
    assert got[0] == ["", "", "u1", "", ""] and list(memoryview(got[1]).cast("i")) == [-1, -1, 0, -1, -1]


@pytest.mark.parametrize("doc", [
    {"last_seen": "2026-11-22T10:00Z"}, {"user_id": "", "last_seen": "2026-11-22T10:00Z"},
    {"user_id": 5, "last_seen": "2026-11-22T10:00Z"}, {"user_id": "u7"}, {"user_id": "u7", "last_seen": 1700000000},
    None, "text", OrderedDict(user_id="u7", last_seen="2026-11-22T10:00Z"),
])
def test_matched_documents_without_user_or_time_are_left_to_python(doc: Any) -> None:
    assert c_prepare([doc], 1, DIMS, True) is None


def test_other_mappings_are_left_to_python_even_when_unmatched() -> None:
    # the Python loop reads any Mapping, matched or not: its hour joins the distinct hours, and a
    # bad time raises
    good = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z"}
    other = OrderedDict(user_id="u2", last_seen="2026-11-23T10:00:00.000Z")
    assert c_prepare([good, other], 0b01, DIMS, True) is None
    assert py_prepare([good, other], 0b01, DIMS, True)[2] == [hour_of_last_seen(good["last_seen"]),
                                                              hour_of_last_seen(other["last_seen"])]
    assert "last_seen" in same_error([good, UserDict(user_id="u2", last_seen="soon")], ["r"], [0b01], ())


def test_errors_name_the_user_on_both_paths() -> None:
    good = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z"}
    assert "u7" in same_error([good, {"user_id": "u7"}], ["r"], [0b11], DEFAULT_DIMS)
    assert "u8" in same_error([good, {"user_id": "u8", "last_seen": None}], ["r"], [0b11], DEFAULT_DIMS)
    assert "user_id" in same_error([good, {"last_seen": "2026-11-22T10:00Z", "x": "y"}], ["r"], [0b11], DEFAULT_DIMS)
    assert "user_id" in same_error([good, {"user_id": "", "last_seen": "2026-11-22T10:00Z"}], ["r"], [0b11], ())
    # a bad time is refused even on a document no rule matched, as the Python loop does
    assert "last_seen" in same_error([good, {"user_id": "u2", "last_seen": "yesterday"}], ["r"], [0b01], ())


def test_unusual_shapes_on_a_path_are_left_to_python_and_give_the_same_counts() -> None:
    base = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z", "gender": "male"}
    for device in (UserDict(os="iOS"), OrderedDict(os="Android"), frozenset({"os"}), b"os"):
        doc = {**base, "device": device}
        assert c_prepare([doc], 1, DEFAULT_DIMS, True) is None  # not a JSON shape: Python's isinstance decides
        fast, slow = both_paths([doc, base], ["r", "s"], [0b11, 0b01], DEFAULT_DIMS)
        assert fast == slow
    # but a Mapping that is not a dict only matters where a dimension looks
    assert c_prepare([{**base, "other": UserDict(a=1)}], 1, DEFAULT_DIMS, True) is not None
    # no dimensions wanted (a replay): nothing is walked
    assert c_prepare([{**base, "device": UserDict(os="iOS")}], 1, DEFAULT_DIMS, False) is not None


def test_a_value_str_cannot_spell_is_left_to_python_which_raises() -> None:
    doc = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z", "gender": 10**5000}
    assert c_prepare([doc], 1, DEFAULT_DIMS, True) is None
    saved = aggregate_module.USE_C
    try:
        for use_c in (True, False):
            aggregate_module.USE_C = use_c
            with pytest.raises(ValueError, match="digits"):
                aggregate_masks([doc], ["r"], [1], DEFAULT_DIMS)
    finally:
        aggregate_module.USE_C = saved


def test_other_sequences_of_documents_are_left_to_python() -> None:
    class Docs(Sequence[Any]):
        def __init__(self, items: list[Any]) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: Any) -> Any:
            return self.items[i]

    docs = [{"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z", "gender": "male"}]
    assert c_prepare(Docs(docs), 1, DEFAULT_DIMS, True) is None
    assert c_prepare(tuple(docs), 1, DEFAULT_DIMS, True) == py_prepare(docs, 1, DEFAULT_DIMS, True)
    fast, slow = both_paths(Docs(docs), ["r"], [1], DEFAULT_DIMS)
    assert fast == slow and fast.dimensions


def test_prepare_checks_its_inputs() -> None:
    doc = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z"}
    with pytest.raises(ValueError, match="inconsistent"):
        _c.prepare([doc], b"\x01", [], [], True)
    with pytest.raises(ValueError, match="inconsistent"):
        _c.prepare([doc], b"\x01" + b"\x00" * 7, ["gender"], [], True)
    with pytest.raises(TypeError, match="path"):
        _c.prepare([doc], b"\x01" + b"\x00" * 7, ["gender"], [["gender"]], True)
    with pytest.raises(TypeError, match="path"):
        _c.prepare([doc], b"\x01" + b"\x00" * 7, ["gender"], [()], True)
    assert _c.prepare([], b"", ["gender"], [("gender",)], True) == ([], b"", [], b"", 0, [], [])


# ----- whole batches on both paths --------------------------------------------------------------------------

@pytest.mark.parametrize("count_matches", [True, False])
def test_odd_batches_count_the_same_on_both_paths(count_matches: bool) -> None:
    for seed in (1, 2, 3):
        docs = odd_docs(seed, 400)
        rnd = random.Random(seed)
        ids = [f"aud-{k}@v1" for k in range(25)]
        masks = [rnd.getrandbits(len(docs)) & rnd.getrandbits(len(docs)) for _ in ids]
        fast, slow = both_paths(docs, ids, masks, ODD_DIMS, count_matches=count_matches)
        assert fast == slow and fast.users


def test_a_flush_window_of_percolated_bids_counts_the_same_on_both_paths() -> None:
    """The stream's shape: bids normalised, percolated into masks, several batches into one window."""
    import orjson

    from percolators.embedded import EmbeddedPercolator
    from percolators.port import Rule
    from percolators.workload import generate_rules
    from rules_service.normalize import normalise_message
    from workers.bidgen import BidGenerator

    percolator = EmbeddedPercolator()
    percolator.upsert([Rule(rule["id"], rule["query"]) for rule in generate_rules(400, seed=1)])
    bids = BidGenerator(seed=11, users=2000, days=0.2).bids(1500)
    docs = [normalise_message(orjson.dumps(bid)) for bid in bids]
    windows = (CounterBatch(), CounterBatch())
    replay = (CounterBatch(), CounterBatch())
    pairs = 0
    for first in range(0, len(docs), 500):
        batch = docs[first:first + 500]
        found = percolator.percolate_masks(batch)
        pairs += sum(mask.bit_count() for mask in found.masks)
        both_paths(batch, list(found.rule_ids), list(found.masks), DEFAULT_DIMS, batch=windows)
        both_paths(batch, list(found.rule_ids), list(found.masks), DEFAULT_DIMS, batch=replay, count_matches=False)
    assert pairs > 3000
    assert windows[0] == windows[1] and replay[0] == replay[1]
    assert len({key[2] for key in windows[0].users}) > 2  # several hours
    assert windows[0].dimensions and not replay[0].dimensions and not replay[0].matches


def test_prepare_does_not_leak() -> None:
    docs = odd_docs(4, 300)
    union = (1 << len(docs)) - 1
    odd = [{"user_id": "u1", "last_seen": "2026-11-22T10:00Z", "device": UserDict(os="iOS")}]
    documents, lists = random_case(5, 200, 20, 3)
    ids, masks = masks_of(lists)

    def work() -> None:
        c_prepare(docs, union, ODD_DIMS, True)
        c_prepare(odd, 1, DEFAULT_DIMS, True)
        c_prepare([{"user_id": "u", "last_seen": "x"}], 1, (), False)
        c_prepare([{"user_id": "u1", "last_seen": "2026-11-22T10:00Z", "gender": 10**5000}], 1, DEFAULT_DIMS, True)
        with pytest.raises(ValueError):
            _c.prepare(docs, b"", [], [], True)
        aggregate_masks(documents, ids, masks, DIMS)

    grown = bytes_kept(work, warmup=10, rounds=40)
    assert grown < 64_000, f"{grown} bytes left after 40 calls"
