"""The C accelerators of the counters (rules_service/counters/_aggregate.c) against their Python
twins: pack_members vs b"".join(map(...)), encode_batch on both paths, and no leaks."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from rules_service.counters import aggregate as aggregate_module
from rules_service.counters import redis_store
from rules_service.counters.aggregate import aggregate, aggregate_masks
from rules_service.counters.redis_store import RedisCounters
from tests.counters.test_aggregate_masks import DIMS, masks_of, random_case

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

    for _ in range(20):
        work()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(60):
            work()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64_000, f"{grown} bytes left after 60 calls"
