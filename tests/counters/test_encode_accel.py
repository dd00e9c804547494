"""The C encoder (rules_service/counters/_encode.c) against encode_batch's Python reference: the same
EncodedBatch byte for byte on seeded random batches and tricky edges, the same errors, no leaks.

Each comparison runs two clients side by side (same clock, same history): one with the C path,
one forced onto the Python path (``redis_store.USE_C = False``), and after each batch both
remember the deadlines as ``apply_encoded`` does once a write succeeded."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules_service.counters import redis_store
from rules_service.counters.aggregate import aggregate, aggregate_masks
from rules_service.counters.keys import DAY, HOUR
from rules_service.counters.port import CounterBatch
from rules_service.counters.redis_store import DEADLINES_MEMORY_S, EncodedBatch, RedisCounters
from tests.counters.test_aggregate_masks import DIMS, masks_of, random_case
from tests.leaks import bytes_kept
from tests.meddler import Meddler

_c = redis_store._encode
pytestmark = pytest.mark.skipif(_c is None, reason="rules_service.counters._encode is not built")

NOW = 1_772_000_000.25  # 2026-02-25, a float clock as time.time gives
WINDOW_NOW = 1_795_400_000.5  # 2026-11-23
OFFSETS = {("bids", 0): 10, ("bids", 1): 7}
STARTS = {("bids", 0): 0}


class Spy:
    """Stands in for the _encode module: records whether the C code handled each batch."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.handled: list[bool] = []

    def encode(self, *args: Any) -> Any:
        out = self.real.encode(*args)
        self.handled.append(out is not None)
        return out


class Pair:
    """A C-path client and a Python-path client fed the same batches at the same times."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> None:
        self.now = NOW
        self.fast = RedisCounters(None, clock=lambda: self.now, **kwargs)  # type: ignore[arg-type]
        self.slow = RedisCounters(None, clock=lambda: self.now, **kwargs)  # type: ignore[arg-type]
        self.spy = Spy(_c)
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(redis_store, "_encode", self.spy)

    def encode(self, batch: CounterBatch, remember: bool = True) -> tuple[EncodedBatch, EncodedBatch]:
        self.monkeypatch.setattr(redis_store, "USE_C", True)
        fast = self.fast.encode_batch(batch, OFFSETS, STARTS)
        self.monkeypatch.setattr(redis_store, "USE_C", False)
        slow = self.slow.encode_batch(batch, OFFSETS, STARTS)
        self.monkeypatch.setattr(redis_store, "USE_C", True)
        if remember:  # as apply_encoded does once the write succeeded
            for counters, encoded in ((self.fast, fast), (self.slow, slow)):
                counters._deadlines_set.update(encoded.sketch_deadlines)
                counters._deadlines_set.update(encoded.hash_deadlines)
        return fast, slow

    def check(self, batch: CounterBatch, remember: bool = True) -> EncodedBatch:
        fast, slow = self.encode(batch, remember)
        assert fast.pfadds == slow.pfadds
        assert fast.sketch_expires == slow.sketch_expires
        assert fast.body == slow.body
        assert fast == slow
        assert list(fast.sketch_deadlines.items()) == list(slow.sketch_deadlines.items())
        assert list(fast.hash_deadlines.items()) == list(slow.hash_deadlines.items())
        return fast


# ----- random batches -----------------------------------------------------------------------------

VALUES = ["male", "female", "Zürich", "東京", "a=b", "=", "", "x y", "1", "émoji 🎉", "k=v=w"]
SMALL_COUNTS = [0, 1, 2, 3, 7, 4095, 4096, 4097, 123_456_789, 10**15]


def _count(rng: random.Random) -> int:
    return rng.choice(SMALL_COUNTS) if rng.random() < 0.3 else rng.randrange(1, 20)


def random_batch(rng: random.Random, now: float, *, rules: int = 30, spread_days: int = 20,
                 unaligned: bool = False) -> CounterBatch:
    """Buckets over ``spread_days`` back (the hour retention is 14 days: some expired) and a few
    far in the past (beyond the day retention too); unicode and '=' values, zero and big counts."""
    batch = CounterBatch()
    today = int(now) - int(now) % DAY
    rids = [f"aud-{i}@v{rng.randrange(1, 3)}" for i in range(rules)] + ["ünï@v1", "r:{x}@v1"]
    for rid in rids:
        for _ in range(rng.randrange(1, 6)):
            hour = today - rng.randrange(0, spread_days * 24) * HOUR + (rng.choice([0, 0, 0, 17]) if unaligned else 0)
            day = hour - hour % DAY
            if rng.random() < 0.05:
                day -= 500 * DAY  # past the day retention
            members = {f"u{rng.randrange(400)}" for _ in range(rng.randrange(0, 40))}
            if rng.random() < 0.2:
                members |= {"ü-" + str(rng.randrange(50)), "用户"}
            batch.users[(rid, "hour", hour)] = members
            batch.users.setdefault((rid, "day", day), set()).update(members)
            batch.matches[(rid, "hour", hour)] = _count(rng)
            batch.matches[(rid, "day", day)] = batch.matches.get((rid, "day", day), 0) + _count(rng)
            for dimension in rng.sample(DIMS, rng.randrange(0, len(DIMS))):
                values = batch.dimensions.setdefault((rid, day, dimension), {})
                for value in rng.sample(VALUES, rng.randrange(0, 5)):
                    values[value] = values.get(value, 0) + _count(rng)
    return batch


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_encode_the_same(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    pair = Pair(monkeypatch)
    for step in range(6):  # warm caches and known deadlines from the second batch on
        encoded = pair.check(random_batch(rng, pair.now, rules=rng.randrange(1, 40)))
        pair.now += rng.choice([1, 30, 600, 3600])  # sometimes past DEADLINES_MEMORY_S: memory forgotten
        assert encoded.pfadds or step  # not all empty
    assert pair.spy.handled == [True] * 6


def test_the_stream_window_shape_encodes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches as the stream builds them (aggregate_masks over per-rule masks), repeated."""
    for seed in (1, 2, 3):
        pair = Pair(monkeypatch)
        documents, lists = random_case(seed, 400, 30, 3)
        ids, masks = masks_of(lists)
        batch = aggregate_masks(documents, ids, masks, DIMS)
        assert batch == aggregate(documents, lists, DIMS)
        pair.now = WINDOW_NOW  # the documents are of 2026-11-22..23
        first = pair.check(batch)
        again = pair.check(batch)  # deadlines now known: no EXPIREAT
        assert first.n_sketch_expires and not again.n_sketch_expires and again.n_body < first.n_body
        assert pair.spy.handled == [True, True]


def test_deadline_memory_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    pair = Pair(monkeypatch)
    batch = random_batch(rng, pair.now, rules=10, spread_days=3)
    first = pair.check(batch)
    known = pair.check(batch)
    pair.now += DEADLINES_MEMORY_S  # forgotten: every EXPIREAT again
    forgotten = pair.check(batch)
    assert not known.n_sketch_expires and known.sketch_expires == b""
    assert forgotten.sketch_expires == first.sketch_expires and forgotten.body == first.body


def test_unaligned_buckets_and_floored_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hour buckets not on the hour merge into one field (the C code adds them); dimension days not
    at midnight are floored and merged by the Python path (the C code hands them over)."""
    pair = Pair(monkeypatch)
    today = int(NOW) - int(NOW) % DAY
    hour = today - 5 * HOUR
    batch = CounterBatch(
        users={("r@v1", "hour", hour): {"a"}, ("r@v1", "hour", hour + 5): {"b", "a"}},
        matches={("r@v1", "hour", hour): 2, ("r@v1", "hour", hour + 5): 3, ("r@v1", "day", today): 1,
                 ("r@v1", "day", today + 60): 4},
        dimensions={("r@v1", today, "gender"): {"male": 1}},
    )
    encoded = pair.check(batch)
    assert encoded.body.count(b"HINCRBY") == 3 and encoded.body.count(b"\r\n$1\r\n5\r\n") == 2  # 2+3, 1+4
    assert len(encoded.pfadds) == 2 and encoded.n_sketch_expires == 1
    batch.dimensions[("r@v1", today + 3600, "gender")] = {"male": 2, "female": 0}
    pair.check(batch)
    assert pair.spy.handled == [True, False]


def test_colliding_fields_merge_as_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two dimension entries naming the same field ('a=b' + 'c' and 'a' + 'b=c'), or two values
    formatting alike (1 and '1'): the later count replaces the earlier one, as dict.update does."""
    pair = Pair(monkeypatch)
    day = int(NOW) - int(NOW) % DAY
    batch = CounterBatch(dimensions={
        ("r@v1", day, "a=b"): {"c": 5, "d": 1},
        ("r@v1", day, "a"): {"b=c": 7, 1: 2, "1": 3},  # type: ignore[dict-item]
        ("r@v1", day, "z"): {"q": 0},
    })
    encoded = pair.check(batch)
    assert encoded.body.count(b"HINCRBY") == 3 and b"a=b=c\r\n$1\r\n7\r\n" in encoded.body
    assert pair.spy.handled == [True]


def test_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(monkeypatch)
    today = int(NOW) - int(NOW) % DAY
    empty = pair.check(CounterBatch())
    assert empty.pfadds == [] and empty.body == b"" and empty.n_body == 0
    # empty sets, zero counts only, an all-zero dimension (its hash has no field: nothing sent)
    nothing = pair.check(CounterBatch(users={("r@v1", "hour", today): set()}, matches={("r@v1", "hour", today): 0},
                                      dimensions={("r@v1", today, "gender"): {"male": 0}}))
    assert nothing.pfadds == [] and nothing.body == b""
    # counts beyond 64 bits and bools: the Python path handles them
    pair.check(CounterBatch(matches={("r@v1", "hour", today): 2**70}))
    pair.check(CounterBatch(matches={("r@v1", "hour", today): True}))
    pair.check(CounterBatch(dimensions={("r@v1", today, "gender"): {"male": 2**64 + 1}}))
    # sums of merged fields leaving 64 bits
    pair.check(CounterBatch(matches={("r@v1", "hour", today): 2**62, ("r@v1", "hour", today + 1): 2**62,
                                     ("r@v1", "hour", today + 2): 2**62}))
    assert pair.spy.handled == [True, True, False, False, False, False]
    # a list of members, a frozenset, a tuple batch key spelled with an equal int
    pair.check(CounterBatch(users={("r@v1", "hour", today): ["b", "a", "b"],  # type: ignore[dict-item]
                                   ("r@v1", "day", today): frozenset({"a"})}))  # type: ignore[dict-item]


@pytest.mark.parametrize("now", [NOW, int(NOW), float("nan"), float("inf"), -float("inf"), 1e30])
def test_clocks(now: float, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(monkeypatch)
    pair.now = now
    pair.check(random_batch(random.Random(3), NOW, rules=5))


def test_big_batch_grows_every_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """More members, hashes and fields than the tables' first sizes (8192 members, 2048 fields)."""
    pair = Pair(monkeypatch)
    today = int(NOW) - int(NOW) % DAY
    batch = CounterBatch()
    for r in range(300):
        batch.users[(f"r{r}@v1", "hour", today)] = {f"user-{r}-{i}" for i in range(60)}
        batch.matches[(f"r{r}@v1", "hour", today)] = r + 1
        batch.dimensions[(f"r{r}@v1", today, "geo.city")] = {f"city-{i}": i + 1 for i in range(40)}
    encoded = pair.check(batch)
    assert encoded.n_body == 300 + 300 * 40 + 600 and len(encoded.pfadds) == 300
    assert pair.spy.handled == [True]


def test_head_caches_cleared_while_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head cache filling up is cleared in the middle of a batch (the C code holds what it uses)."""
    monkeypatch.setattr(redis_store._Heads, "LIMIT", 3)
    pair = Pair(monkeypatch)
    rng = random.Random(9)
    for _ in range(3):
        pair.check(random_batch(rng, pair.now, rules=20))
    assert all(pair.spy.handled)


# ----- errors --------------------------------------------------------------------------------------

def _both_raise(pair: Pair, batch: CounterBatch) -> tuple[BaseException, BaseException]:
    errors = []
    for use_c, counters in ((True, pair.fast), (False, pair.slow)):
        pair.monkeypatch.setattr(redis_store, "USE_C", use_c)
        with pytest.raises(Exception) as info:
            counters.encode_batch(batch, OFFSETS)
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    return errors[0], errors[1]


def test_errors_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair(monkeypatch)
    today = int(NOW) - int(NOW) % DAY
    error, _ = _both_raise(pair, CounterBatch(users={("r@v1", "week", today): {"a"}}))
    assert isinstance(error, ValueError) and "granularity" in str(error)
    _both_raise(pair, CounterBatch(matches={("r@v1", "month", today): 1}))
    error, _ = _both_raise(pair, CounterBatch(matches={("r@v1", "hour", today): -1}))
    assert "negative" in str(error)
    _both_raise(pair, CounterBatch(dimensions={("r@v1", today, "gender"): {"male": -2}}))
    _both_raise(pair, CounterBatch(users={("r@v1", "hour", today): {5}}))  # type: ignore[arg-type]
    _both_raise(pair, CounterBatch(matches={("r@v1", "hour", today): 1.5}))  # type: ignore[dict-item]
    # a negative count in a bucket past its retention is never looked at: no error on either path
    old = today - 900 * DAY
    pair.check(CounterBatch(matches={("r@v1", "hour", old): -1}, dimensions={("r@v1", old, "g"): {"m": -1}}))


def test_the_module_checks_its_arguments() -> None:
    counters = RedisCounters(None)  # type: ignore[arg-type]
    good = [{}, {}, {}, 0, {}, {}, print, {}, print, {}, print, counters._sketch_members, {}, print]
    assert _c.encode(*good) == ([], b"", {}, b"", 0, {})
    with pytest.raises(TypeError):
        _c.encode(*good[:-1])
    with pytest.raises(OverflowError):
        _c.encode(*good[:3], 2**70, *good[4:])
    # batch mappings that are not plain dicts: handed back to the Python path
    assert _c.encode(redis_store._Heads(), *good[1:]) is None
    # a head of the wrong shape: handed back too
    today = int(NOW) - int(NOW) % DAY
    users = {("r", "hour", today): {"a"}}
    assert _c.encode(users, *good[1:5], {("r", "hour", today): ("x",)}, *good[6:]) is None
    # a sketch member cache answering something else than bytes
    with pytest.raises(TypeError, match="not bytes"):
        _c.encode(users, *good[1:5], {("r", "hour", today): (b"k", b"e", 2**40)}, print, *good[7:11],
                  {"a": "text"}, *good[12:])


def test_python_code_changing_the_batch_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    counters = RedisCounters(None, clock=lambda: NOW)  # type: ignore[arg-type]
    today = int(NOW) - int(NOW) % DAY
    members = {f"u{i}" for i in range(50)}
    batch = CounterBatch(users={("r@v1", "hour", today): members, ("r@v1", "day", today): {"x"}})
    meddler = Meddler("m")
    members.add(meddler)

    def meddle() -> None:
        members.clear()
        members.update(f"v{i}" for i in range(500))
        batch.users.clear()

    Meddler.action = meddle
    with contextlib.suppress(RuntimeError):  # "changed size during iteration" is fine; a crash is not
        counters.encode_batch(batch, OFFSETS)
    assert Meddler.action is None  # it ran


def _resp_args(command: bytes) -> list[bytes]:
    """The arguments of one RESP command, checking that its header counts exactly what it carries."""
    assert command[:1] == b"*"
    end = command.index(b"\r\n")
    n, at, args = int(command[1:end]), end + 2, []
    while at < len(command):
        assert command[at:at + 1] == b"$"
        end = command.index(b"\r\n", at)
        size = int(command[at + 1:end])
        args.append(command[end + 2:end + 2 + size])
        assert command[end + 2 + size:end + 4 + size] == b"\r\n"
        at = end + 4 + size
    assert len(args) == n, f"the header says {n} arguments, the command carries {len(args)}"
    return args


class _SwappingMembers(redis_store._SketchMembers):
    """A member cache whose miss (Python code) changes the set being encoded, keeping its size:
    it drops a member the walk has passed and adds one further on (ints: slot = value & mask)."""

    def __init__(self, members: set[int], trigger: int, drop: int, add: int) -> None:
        super().__init__()
        self.members, self.trigger, self.drop, self.add = members, trigger, drop, add

    def __missing__(self, member: Any) -> bytes:
        if member == self.trigger:
            self.members.discard(self.drop)
            self.members.add(self.add)
        return super().__missing__(str(member))


def _encode_users(users: dict[Any, Any], members_cache: dict[Any, bytes]) -> Any:
    today = int(NOW) - int(NOW) % DAY
    heads = {key: (b"$1\r\nk\r\n", b"$2\r\n99\r\n", today + 30 * DAY) for key in users}
    return _c.encode(users, {}, {}, int(NOW), {}, heads, print, {}, print, {}, print, members_cache, {}, print)


@pytest.mark.parametrize("size", [10, 1024])  # 1024: exactly the scratch list's first capacity
def test_a_cache_swapping_set_members_neither_overflows_nor_miscounts(size: int) -> None:
    """Old code: the walk met size + 1 active slots after reserving size, writing past its scratch
    list (1024; AddressSanitizer: heap-buffer-overflow) or sending a PFADD whose header counted
    size members while carrying size + 1 (10)."""
    today = int(NOW) - int(NOW) % DAY
    members = set(range(1, size + 1))
    cache = _SwappingMembers(members, trigger=3, drop=1, add=size + 5)
    try:
        out = _encode_users({("r", "hour", today): members}, cache)
    except RuntimeError:  # the set changed during iteration: fine; a corrupt command is not
        return
    for command in out[0]:
        _resp_args(command)


class _ListChangingMembers(redis_store._SketchMembers):
    """A member cache whose misses grow or shrink the list of members being encoded."""

    def __init__(self, members: list[Any], grow: bool) -> None:
        super().__init__()
        self.members, self.grow = members, grow

    def __missing__(self, member: Any) -> bytes:
        if self.grow and len(self.members) < 12:
            self.members.append(f"extra-{len(self.members)}")
        elif not self.grow and len(self.members) > 4:
            del self.members[-3:]
        return super().__missing__(str(member))


@pytest.mark.parametrize("grow", [True, False])
def test_a_cache_changing_a_list_of_members_still_gives_a_well_formed_pfadd(grow: bool) -> None:
    """Old code: the PFADD header counted len(members) taken before the walk (3 or 10) while the
    command carried the members the list iterator gave (12 or 4): a corrupt RESP stream."""
    today = int(NOW) - int(NOW) % DAY
    members = ["a", "b", "c"] if grow else [f"m{i}" for i in range(10)]
    out = _encode_users({("r", "hour", today): members}, _ListChangingMembers(members, grow))
    (command,) = out[0]
    args = _resp_args(command)
    assert args[:2] == [b"PFADD", b"k"] and len(args) - 2 == (12 if grow else 4)


@pytest.mark.parametrize("part", ["users", "matches", "dimensions"])
def test_a_head_miss_resizing_the_batch_raises_as_in_python(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head computed by Python code that adds an entry to the batch dict being encoded: the Python
    path's dict iterator raises. Old C code: carried on (PyDict_Next) and returned an encoding."""
    pair = Pair(monkeypatch)
    today = int(NOW) - int(NOW) % DAY
    head_of = {"users": "_sketch_head", "matches": "_match_head", "dimensions": "_dimension_head"}[part]
    new_key, new_value = {"users": (("other@v1", "hour", today), {"b"}), "matches": (("other@v1", "hour", today), 1),
                          "dimensions": (("other@v1", today, "g"), {"v": 1})}[part]
    errors = []
    for use_c, counters in ((True, pair.fast), (False, pair.slow)):
        batch = CounterBatch(users={("r@v1", "hour", today): {"a"}, ("r@v1", "day", today): {"a"}},
                             matches={("r@v1", "hour", today): 1, ("r@v1", "day", today): 1},
                             dimensions={("r@v1", today, "g"): {"m": 1}, ("r@v1", today, "h"): {"n": 1}})
        target: dict[Any, Any] = getattr(batch, part)
        real = getattr(counters, head_of)

        def growing(*key: Any, real: Any = real, target: dict[Any, Any] = target) -> Any:
            target[new_key] = new_value
            return real(*key)

        monkeypatch.setattr(counters, head_of, growing)
        monkeypatch.setattr(redis_store, "USE_C", use_c)
        with pytest.raises(RuntimeError) as info:
            counters.encode_batch(batch, OFFSETS)
        errors.append(str(info.value))
    assert errors[0] == errors[1] == "dictionary changed size during iteration"
    assert pair.spy.handled == []  # the C code raised rather than answering


# ----- property --------------------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from("ab=é東 1"), max_size=4)


@st.composite
def batches(draw: Any) -> CounterBatch:
    today = int(NOW) - int(NOW) % DAY
    rids = draw(st.lists(_text, min_size=1, max_size=4, unique=True))
    buckets = st.tuples(st.sampled_from(rids), st.sampled_from(["hour", "day"]),
                        st.integers(-30, 2).map(lambda h: today + h * HOUR) | st.integers(-20, 0).map(
                            lambda d: today + d * DAY))
    counts = st.integers(0, 5) | st.sampled_from([4095, 4096, 2**63 - 1, 2**63])
    return CounterBatch(
        users=draw(st.dictionaries(buckets, st.sets(_text, max_size=6), max_size=8)),
        matches=draw(st.dictionaries(buckets, counts, max_size=8)),
        dimensions=draw(st.dictionaries(
            st.tuples(st.sampled_from(rids), st.integers(-20, 0).map(lambda d: today + d * DAY), _text),
            st.dictionaries(_text, counts, max_size=4), max_size=6)),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(batches(), min_size=1, max_size=3))
def test_property_both_paths_agree(sequence: list[CounterBatch]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        pair = Pair(monkeypatch)
        for batch in sequence:
            pair.check(batch)


# ----- leaks -------------------------------------------------------------------------------------------

def _work(counters: RedisCounters, batches_: list[CounterBatch]) -> Iterator[None]:
    for batch in batches_:
        encoded = counters.encode_batch(batch, OFFSETS)
        counters._deadlines_set.update(encoded.hash_deadlines)
        yield


def test_no_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "USE_C", True)
    rng = random.Random(11)
    counters = RedisCounters(None, clock=lambda: NOW)  # type: ignore[arg-type]
    today = int(NOW) - int(NOW) % DAY
    batches_ = [random_batch(rng, NOW, rules=15) for _ in range(3)]
    batches_.append(CounterBatch(matches={("r@v1", "hour", today): 2**70}))  # handed to Python
    bad = CounterBatch(users={("r@v1", "hour", today): {"a"}, ("r@v1", "week", today): {"b"}})

    def round_() -> None:
        for _ in _work(counters, batches_):
            pass
        with pytest.raises(ValueError):
            counters.encode_batch(bad, OFFSETS)

    grown = bytes_kept(round_, warmup=5, rounds=40)
    assert grown < 64_000, f"{grown} bytes left after 40 rounds"
