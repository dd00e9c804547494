"""The C accelerators of the counters (rules_service/counters/_aggregate.c) against their Python
twins: pack_members vs b"".join(map(...)), encode_batch on both paths, and no leaks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules_service.counters import aggregate as aggregate_module
from rules_service.counters import redis_store
from rules_service.counters.aggregate import aggregate, aggregate_masks, hour_of_last_seen
from rules_service.counters.port import CounterBatch
from rules_service.counters.redis_store import RedisCounters
from tests.counters.test_aggregate_masks import DIMS, masks_of, random_case
from tests.leaks import bytes_kept
from tests.meddler import Meddler

_c = aggregate_module._aggregate
pytestmark = pytest.mark.skipif(_c is None, reason="rules_service.counters._aggregate is not built")


class Members(dict[str, bytes]):
    def __init__(self) -> None:
        super().__init__()
        self.misses = 0

    def __missing__(self, key: str) -> bytes:
        self.misses += 1
        value = self[key] = b"<" + key.encode() + b">"
        return value


def test_pack_members_equals_the_python_join() -> None:
    rnd = random.Random(3)
    cache = Members()
    for _ in range(60):
        members = {f"u{rnd.randrange(300)}" for _ in range(rnd.randrange(0, 40))}
        expected = b"".join(Members().__getitem__(m) for m in members)  # fresh: same order, no cache
        assert _c.pack_members(members, cache, cache.__missing__) == expected
    assert cache.misses == len(cache) <= 300
    assert _c.pack_members([], cache, cache.__missing__) == b""
    assert _c.pack_members(["u1", "u1"], {"u1": b"ab"}, cache.__missing__) == b"abab"


def test_pack_members_errors() -> None:
    def fail(key: str) -> bytes:
        raise KeyError(key)

    with pytest.raises(KeyError):
        _c.pack_members(["a", "b"], {"a": b"1"}, fail)
    with pytest.raises(TypeError, match="not bytes"):
        _c.pack_members(["a"], {"a": "text"}, fail)
    with pytest.raises(TypeError):
        _c.pack_members(5, {}, fail)
    with pytest.raises(TypeError, match="unhashable"):
        _c.pack_members([["a"]], {}, fail)


def test_emit_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        _c.emit({}, {}, {}, ["r"], b"\x01" * 8, 1, ["u"], b"\x00" * 8, [0], [0], b"", 0, [], [], True)
    with pytest.raises(ValueError, match="hour code"):
        _c.emit({}, {}, {}, ["r"], b"\x01" + b"\x00" * 7, 1, ["u"], b"\x05\x00\x00\x00", [0], [0], b"", 0, [], [],
                True)
    with pytest.raises(ValueError, match="dimension code"):
        _c.emit({}, {}, {}, ["r"], b"\x01" + b"\x00" * 7, 1, ["u"], b"\x00" * 4, [0], [0], b"\x03\x00\x00\x00", 1,
                ["d"], ["v"], True)
    with pytest.raises(ValueError, match="beyond"):
        _c.emit({}, {}, {}, ["r"], b"\x02" + b"\x00" * 7, 1, ["u"], b"\x00" * 4, [0], [0], b"", 0, [], [], True)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_encode_batch_is_the_same_on_both_paths(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    documents, lists = random_case(seed, 400, 30, 3)
    batch = aggregate(documents, lists, DIMS)
    counters = RedisCounters(None)  # type: ignore[arg-type]  # encoding needs no server
    fast = counters.encode_batch(batch, {("bids", 0): 10}, {("bids", 0): 0})
    monkeypatch.setattr(redis_store, "USE_C", False)
    slow = RedisCounters(None).encode_batch(batch, {("bids", 0): 10}, {("bids", 0): 0})  # type: ignore[arg-type]
    assert fast == slow and len(fast.pfadds) > 30


def test_no_leaks() -> None:
    documents, lists = random_case(7, 300, 40, 2)
    ids, masks = masks_of(lists)
    counters = RedisCounters(None)  # type: ignore[arg-type]

    def work() -> None:
        batch = aggregate_masks(documents, ids, masks, DIMS)
        counters.encode_batch(batch, {("bids", 0): 1})
        _c.pack_members(["a", "b"], {"a": b"1"}, lambda key: b"2")
        with pytest.raises(ValueError):
            _c.emit({}, {}, {}, ["r"], b"\x02" + b"\x00" * 7, 1, ["u"], b"\x00" * 4, [0], [0], b"", 0, [], [], True)

    grown = bytes_kept(work, warmup=20, rounds=60)
    assert grown < 64_000, f"{grown} bytes left after 60 calls"


# ----- safety: sizes, and Python code (a key's __hash__) changing what emit reads ----------------------

def test_emit_refuses_sizes_whose_products_overflow() -> None:
    # n_rules * n_words * 8 and n_docs * width * 4 wrapped to 0 and matched empty buffers: the walk
    # then read far outside them
    with pytest.raises(ValueError, match="inconsistent"):
        _c.emit({}, {}, {}, ["a", "b"], b"", 2**62, [], b"", [], [], b"", 0, [], [], True)
    with pytest.raises(ValueError, match="inconsistent"):
        _c.emit({}, {}, {}, ["a"], b"\x01" + b"\x00" * 7, 1, ["u"], b"\x00" * 4, [0], [0], b"", 2**62, ["d"],
                ["v"], True)


def _one_hour_emit(users: dict, uids: list, hour_codes: bytes | bytearray, rules: list[str], mask: int) -> None:
    masks = b"".join(mask.to_bytes(8, "little") for _ in rules)
    _c.emit(users, {}, {}, rules, masks, 1, uids, hour_codes, [7200], [0], b"", 0, [], [], True)


def test_emit_survives_a_hash_that_empties_the_user_list() -> None:
    uids: list = [Meddler("u1"), "u2"]
    Meddler.action = uids.clear  # emit read uids[1] from the emptied list
    users: dict = {}
    _one_hour_emit(users, uids, b"\x00" * 8, ["r"], 0b11)
    assert users == {("r", "hour", 7200): {"u1", "u2"}, ("r", "day", 0): {"u1", "u2"}}


def test_emit_survives_a_hash_that_drops_the_set_it_fills() -> None:
    users: dict = {}
    Meddler.action = users.clear  # the new set's only reference was the dict's (ASan: use after free)
    _one_hour_emit(users, [Meddler("u1")], b"\x00" * 4, ["r"], 0b1)
    assert users == {("r", "day", 0): {"u1"}}


def test_emit_checks_codes_once_and_keeps_them() -> None:
    hour_codes = bytearray(8)

    def corrupt() -> None:  # after the check: a code far past the hours (an out-of-bounds write)
        hour_codes[0:4] = (1 << 30).to_bytes(4, "little")

    Meddler.action = corrupt
    users: dict = {}
    _one_hour_emit(users, [Meddler("u1"), "u2"], hour_codes, ["r", "s"], 0b11)
    assert users[("s", "hour", 7200)] == {"u1", "u2"}


def test_emit_reads_unaligned_buffers() -> None:
    masks = memoryview(b"\x00" + (0b101).to_bytes(8, "little"))[1:]
    hours = memoryview(b"\x00" * 13)[1:]
    users: dict = {}
    _c.emit(users, {}, {}, ["r"], masks, 1, ["a", "b", "c"], hours, [3600], [0], b"", 0, [], [], True)
    assert users[("r", "hour", 3600)] == {"a", "c"}


# ----- property tests: adversarial batches, C against Python ---------------------------------------------

_dim_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3),
                        st.lists(st.one_of(st.text(max_size=2), st.integers(0, 2), st.none()), max_size=4),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
_docs = st.fixed_dictionaries(
    {"user_id": st.text(min_size=1, max_size=4),
     "last_seen": st.builds(lambda day, hour, minute: f"2026-11-{day:02d}T{hour:02d}:{minute:02d}:00.000Z",
                            st.integers(1, 30), st.integers(0, 23), st.integers(0, 59))},
    optional={"gender": _dim_values, "device": st.fixed_dictionaries({}, optional={"os": _dim_values}),
              "interests": _dim_values})


@settings(max_examples=120, deadline=None)
@given(st.data(), st.lists(_docs, min_size=1, max_size=140), st.integers(1, 6), st.booleans())
def test_property_emit_equals_python(data: st.DataObject, docs: list[dict], rules: int,
                                     count_matches: bool) -> None:
    masks = [data.draw(st.integers(0, (1 << len(docs)) - 1)) for _ in range(rules)]
    ids = [f"r{k}" for k in range(rules)]
    dims = ("gender", "device.os", "interests")
    saved = aggregate_module.USE_C
    try:
        aggregate_module.USE_C = True
        fast = aggregate_masks(docs, ids, masks, dims, count_matches=count_matches)
        aggregate_module.USE_C = False
        slow = aggregate_masks(docs, ids, masks, dims, count_matches=count_matches)
    finally:
        aggregate_module.USE_C = saved
    assert fast == slow


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=3), max_size=30), st.dictionaries(st.text(max_size=3), st.binary(max_size=5)))
def test_property_pack_members_equals_join(members: list[str], cached: dict[str, bytes]) -> None:
    def miss(key: str) -> bytes:
        value = cache[key] = key.encode("utf-8", "surrogatepass") * 2
        return value

    cache = dict(cached)
    expected = b"".join(cached.get(m, m.encode("utf-8", "surrogatepass") * 2) for m in members)
    assert _c.pack_members(members, cache, miss) == expected


def test_emit_into_a_batch_of_the_wrong_shape_is_a_type_error() -> None:
    # PySet_Add on a frozenset held only by the dict grew the frozenset (its hash then stale)
    users: dict = {("r", "hour", 7200): frozenset({"old"})}
    with pytest.raises(TypeError, match="not a set"):
        _one_hour_emit(users, ["u1"], b"\x00" * 4, ["r"], 0b1)
    assert users == {("r", "hour", 7200): frozenset({"old"})}
    dims: dict = {("r", 0, "d"): ["not a dict"]}
    with pytest.raises(TypeError, match="not a dict"):
        _c.emit({}, {}, dims, ["r"], b"\x01" + b"\x00" * 7, 1, ["u"], b"\x00" * 4, [7200], [0], b"\x00" * 4, 1,
                ["d"], ["v"], True)


# ----- emit's dimension targets (one lookup per dimension and group) and its int fast path ----------------

def test_emit_counts_values_of_dimensions_given_as_distinct_string_objects() -> None:
    # codes of one dimension usually share one string object; here every code has its own (equal) one,
    # more of them than emit searches for a shared number: every count must still land in the same dict
    n_codes = 100
    code_dims = ["".join(["dim", str(k % 3)]) for k in range(n_codes)]
    code_values = [f"v{k}" for k in range(n_codes)]
    codes = b"".join(k.to_bytes(4, "little", signed=True) for k in range(n_codes))  # one document, every code
    dims: dict = {}
    _c.emit({}, {}, dims, ["r", "s"], (1).to_bytes(8, "little") * 2, 1, ["u"], b"\x00" * 4, [7200], [0], codes,
            n_codes, code_dims, code_values, True)
    expected = {(rid, 0, f"dim{d}"): {f"v{k}": 1 for k in range(d, n_codes, 3)} for rid in "rs" for d in range(3)}
    assert dims == expected


def test_emit_adds_to_totals_of_any_number_type_like_python() -> None:
    big = 2**70
    matches: dict = {("r", "hour", 7200): big, ("r", "day", 0): 2**63 - 1}
    dims: dict = {("r", 0, "d"): {"v": 1.5}}
    _c.emit({}, matches, dims, ["r"], (0b11).to_bytes(8, "little"), 1, ["u", "w"], b"\x00" * 8, [7200], [0],
            b"\x00" * 8, 1, ["d"], ["v"], True)
    assert matches == {("r", "hour", 7200): big + 2, ("r", "day", 0): 2**63 + 1}
    assert dims == {("r", 0, "d"): {"v": 3.5}}
    assert type(dims[("r", 0, "d")]["v"]) is float


# ----- the day's set copied from the hour's set this group created --------------------------------------

@pytest.mark.parametrize("existing", ["none", "day", "hour", "both"])
def test_day_sets_are_right_whichever_sets_the_batch_already_has(existing: str) -> None:
    documents, lists = random_case(21, 300, 12, 3)
    ids, masks = masks_of(lists)
    day = hour_of_last_seen("2026-11-22T00:00:00Z")  # random_case's first day

    def start() -> CounterBatch:
        batch = CounterBatch()
        for rid in ids[:6]:
            for hour in range(0, 3 * 3600, 3600):
                if existing in ("hour", "both"):
                    batch.users[(rid, "hour", day + hour)] = {"old-hour"}
            if existing in ("day", "both"):
                batch.users[(rid, "day", day)] = {"old-day"}
        return batch

    saved = aggregate_module.USE_C
    try:
        aggregate_module.USE_C = True
        fast = aggregate_masks(documents, ids, masks, DIMS, batch=start())
        aggregate_module.USE_C = False
        slow = aggregate_masks(documents, ids, masks, DIMS, batch=start())
    finally:
        aggregate_module.USE_C = saved
    assert fast == slow
    sets = list(fast.users.values())
    assert len({id(s) for s in sets}) == len(sets)  # never one set under two keys
    if existing in ("day", "both"):
        assert "old-day" in fast.users[(ids[0], "day", day)]
    if existing in ("hour", "both"):
        assert "old-hour" in fast.users[(ids[0], "hour", day)]


def test_emit_adds_to_a_total_that_is_the_same_small_int_object() -> None:
    # setdefault hands back the existing 1, which is the very object PyLong_FromSsize_t(1) returns:
    # "inserted" must be told by the dict's size, not by identity
    matches: dict = {("r", "hour", 7200): 1, ("r", "day", 0): 1}
    dims: dict = {("r", 0, "d"): {"v": 1}}
    _c.emit({}, matches, dims, ["r"], (0b1).to_bytes(8, "little"), 1, ["u"], b"\x00" * 4, [7200], [0],
            b"\x00" * 4, 1, ["d"], ["v"], True)
    assert matches == {("r", "hour", 7200): 2, ("r", "day", 0): 2}
    assert dims == {("r", 0, "d"): {"v": 2}}
