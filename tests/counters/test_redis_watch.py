"""Exactly-once of RedisCounters.apply under WATCH: another writer of the same partitions' offsets
between the check and the transaction makes EXEC fail, and the write is checked again and retried;
writers of other partitions of the same consumer do not (each partition has its own fence key);
offsets found behind what the same writer stored raise CountersRolledBackError (on a real
redis-server, where replies are skimmed raw, and on fakeredis, where they are parsed)."""

from __future__ import annotations

import calendar
from collections.abc import Iterator

import pytest
import redis

from rules_service.counters import keys, redis_store
from rules_service.counters.port import CounterBatch, CountersRolledBackError
from rules_service.counters.redis_store import RedisCounters

H10 = calendar.timegm((2026, 11, 22, 10, 0, 0, 0, 0, 0))
DAY = H10 - H10 % 86400
P0, P1 = ("bids", 0), ("bids", 1)


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "fakeredis"])
def clients(request: pytest.FixtureRequest) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """Two clients (two connections) of one server."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        pair = redis.Redis.from_url(url), redis.Redis.from_url(url)
        pair[0].flushdb()
    else:
        import fakeredis

        server = fakeredis.FakeServer()
        pair = fakeredis.FakeRedis(server=server), fakeredis.FakeRedis(server=server)
    yield pair
    for c in pair:
        c.close()


def batch(n: int, city: str = "Paris") -> CounterBatch:
    return CounterBatch(
        users={("a@v1", "hour", H10): {f"u{i}" for i in range(n)}},
        matches={("a@v1", "hour", H10): n, ("a@v1", "day", DAY): n},
        dimensions={("a@v1", DAY, "geo.city"): {city: n}},
    )


def matched(client: redis.Redis) -> tuple[bytes | None, bytes | None]:
    key, fld = keys.day_matches("a@v1", DAY)
    return client.hget(key, fld), client.hget(keys.dimensions("a@v1", DAY), "geo.city=Paris")


def between_check_and_write(monkeypatch: pytest.MonkeyPatch, action: object, times: int = 1) -> list[int]:
    """Run ``action()`` right after the offsets were read under WATCH (before the transaction is
    sent), on the first ``times`` checks; returns a one-item list counting the checks."""
    real = redis_store._beyond
    seen = [0]

    def meddling(stored: object, start: int) -> bool:
        seen[0] += 1
        if seen[0] <= times:
            action()  # type: ignore[operator]
        return real(stored, start)

    monkeypatch.setattr(redis_store, "_beyond", meddling)
    return seen


def test_another_partitions_writer_in_between_makes_no_retry(
        clients: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch) -> None:
    one, other = RedisCounters(clients[0]), RedisCounters(clients[1])
    assert one.apply(batch(2), "s", {P0: 2}, {P0: 0})
    # the other process of consumer "s" writes its own partition between our check and our EXEC:
    # it touches P1's fence, not P0's, so our transaction goes through at once
    checks = between_check_and_write(monkeypatch, lambda: other.apply(batch(5), "s", {P1: 5}, {P1: 0}))
    assert one.apply(batch(3), "s", {P0: 5}, {P0: 2})
    assert one.retries == 0 and checks[0] == 1
    assert matched(clients[0]) == (b"10", b"10")
    assert one.stored_offsets("s") == {P0: 5, P1: 5}
    assert clients[0].get(keys.offset_fence("s", "bids:0")) == b"5"
    assert clients[0].get(keys.offset_fence("s", "bids:1")) == b"5"


def test_a_write_to_the_same_partitions_offset_in_between_makes_a_retry(
        clients: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch) -> None:
    one, other = RedisCounters(clients[0]), RedisCounters(clients[1])
    assert one.apply(batch(2), "s", {P0: 2}, {P0: 0})
    # someone stores P0's offset again (same value): the fence changed, so the check runs again
    checks = between_check_and_write(monkeypatch, lambda: other.apply(CounterBatch(), "s", {P0: 2}))
    assert one.apply(batch(3), "s", {P0: 5}, {P0: 2})
    assert one.retries == 1 and checks[0] == 2
    assert matched(clients[0]) == (b"5", b"5")


def test_the_same_batch_by_two_writers_is_counted_once(
        clients: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch) -> None:
    one, other = RedisCounters(clients[0]), RedisCounters(clients[1])
    assert one.apply(batch(2), "s", {P0: 2}, {P0: 0})
    # a second worker on the same partition applies the same records first: ours must not count them
    between_check_and_write(monkeypatch, lambda: other.apply(batch(3), "s", {P0: 5}, {P0: 2}))
    assert not one.apply(batch(3), "s", {P0: 5}, {P0: 2})
    assert one.retries == 1
    assert matched(clients[0]) == (b"5", b"5")
    assert one.stored_offsets("s") == {P0: 5}
    # the connection was left unwatched and usable: the next batch applies
    monkeypatch.undo()
    assert one.apply(batch(1), "s", {P0: 6}, {P0: 5})
    assert matched(clients[0]) == (b"6", b"6")


def test_an_already_applied_batch_is_skipped_without_writing(clients: tuple[redis.Redis, redis.Redis]) -> None:
    one = RedisCounters(clients[0])
    assert one.apply(batch(2), "s", {P0: 2, P1: 7}, {P0: 0, P1: 7})
    # a restarted worker re-reads records 0..1 of P0: skipped whole, offsets untouched
    again = RedisCounters(clients[1])
    assert not again.apply(batch(2, city="Lyon"), "s", {P0: 2, P1: 9}, {P0: 0, P1: 7})
    assert matched(clients[0]) == (b"2", b"2")
    assert clients[0].hget(keys.dimensions("a@v1", DAY), "geo.city=Lyon") is None
    assert again.stored_offsets("s") == {P0: 2, P1: 7}
    assert again.retries == 0
    # a start offset equal to the stored one is the next batch, not a replay
    assert again.apply(batch(1), "s", {P0: 3}, {P0: 2})
    assert matched(clients[0]) == (b"3", b"3")


def test_endless_interference_gives_up_with_nothing_written(
        clients: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch) -> None:
    one, other = RedisCounters(clients[0]), RedisCounters(clients[1])
    assert one.apply(batch(2), "s", {P0: 2}, {P0: 0})
    monkeypatch.setattr(redis_store, "MAX_ATTEMPTS", 3)
    between_check_and_write(monkeypatch, lambda: other.apply(CounterBatch(), "s", {P0: 2}), times=99)
    with pytest.raises(redis.exceptions.WatchError, match="3 attempts"):
        one.apply(batch(3), "s", {P0: 5}, {P0: 2})
    assert one.retries == 3
    assert matched(clients[0]) == (b"2", b"2")
    monkeypatch.undo()
    assert one.apply(batch(3), "s", {P0: 5}, {P0: 2})  # the client is still usable
    assert matched(clients[0]) == (b"5", b"5")


def test_deadlines_are_sent_once_per_key_then_again_after_the_memory_lapses(
        clients: tuple[redis.Redis, redis.Redis]) -> None:
    now = [float(H10)]
    one = RedisCounters(clients[0], clock=lambda: now[0])
    first = one.encode_batch(batch(2), {P0: 2}, {P0: 0})
    assert first.n_sketch_expires == 1 and first.body.count(b"EXPIREAT") == 3  # hour, day-month, dimensions
    assert one.apply_encoded(first, "s")
    again = one.encode_batch(batch(2), {P0: 4}, {P0: 2})
    assert again.n_sketch_expires == 0 and b"EXPIREAT" not in again.body
    # a key deleted (and re-created) meanwhile gets its deadline back once the memory lapses
    clients[0].persist(keys.hour_users("a@v1", H10))
    now[0] += redis_store.DEADLINES_MEMORY_S
    assert one.apply(batch(2), "s", {P0: 4}, {P0: 2})
    assert clients[0].ttl(keys.hour_users("a@v1", H10)) > 0


def test_offsets_behind_what_this_writer_stored_raise_and_write_nothing(
        clients: tuple[redis.Redis, redis.Redis]) -> None:
    """Redis restored from an older snapshot (or the last second of its AOF lost): counts and
    offsets went back together; the writer must not write on top (the records in between would
    never be counted) but say so, so that the stream rewinds to the stored offsets."""
    one, admin = RedisCounters(clients[0]), clients[1]
    assert one.apply(batch(2), "s", {P0: 2, P1: 4}, {P0: 0, P1: 0})
    assert one.apply(batch(3), "s", {P0: 5, P1: 6}, {P0: 2, P1: 4})
    # the store goes back to just after the first write
    admin.hset(keys.offsets("s"), "bids:0", 2)
    admin.set(keys.offset_fence("s", "bids:0"), 2)
    dimension, fld = keys.day_matches("a@v1", DAY)
    admin.hset(dimension, fld, 2)
    with pytest.raises(CountersRolledBackError, match=r"'s'.*bids:0: 2 < 5") as info:
        one.apply(batch(4), "s", {P0: 9, P1: 8}, {P0: 5, P1: 6})
    assert info.value.behind == {"bids:0": (2, 5)}
    assert one.stored_offsets("s") == {P0: 2, P1: 6}  # nothing written
    assert admin.hget(dimension, fld) == b"2"
    # rewound to the stored offsets, the writer goes on from there
    assert one.apply(batch(3), "s", {P0: 5, P1: 8}, {P0: 2, P1: 6})
    assert one.stored_offsets("s") == {P0: 5, P1: 8}
    assert admin.hget(dimension, fld) == b"5"


def test_offsets_gone_after_this_writer_stored_them_raise(clients: tuple[redis.Redis, redis.Redis]) -> None:
    one, admin = RedisCounters(clients[0]), clients[1]
    assert one.apply(batch(2), "s", {P0: 2}, {P0: 0})
    admin.flushall()
    with pytest.raises(CountersRolledBackError, match="bids:0: None < 2"):
        one.apply(batch(3), "s", {P0: 5}, {P0: 2})
    assert one.stored_offsets("s") == {}
    # another writer (a restarted process) has no memory: its first write is checked as before
    assert RedisCounters(clients[1]).apply(batch(3), "s", {P0: 5}, {P0: 2})


def test_skipping_an_applied_batch_remembers_the_stored_offset(clients: tuple[redis.Redis, redis.Redis]) -> None:
    one, other = RedisCounters(clients[0]), RedisCounters(clients[1])
    assert one.apply(batch(2), "s", {P0: 2}, {P0: 0})
    assert other.apply(batch(3), "s", {P0: 5}, {P0: 2})  # e.g. a zombie ahead of us
    assert not one.apply(batch(3), "s", {P0: 5}, {P0: 2})
    assert one.apply(batch(1), "s", {P0: 6}, {P0: 5})  # from there on, ours again
    assert matched(clients[0]) == (b"6", b"6")


def test_deleting_offsets_deletes_their_fences(clients: tuple[redis.Redis, redis.Redis]) -> None:
    one = RedisCounters(clients[0])
    assert one.apply(batch(2), "replay:x", {P0: 2, P1: 3}, {P0: 0, P1: 0})
    one.delete_offsets("replay:x")
    assert clients[0].keys("o:*") == []
    assert one.apply(batch(2), "replay:x", {P0: 2}, {P0: 0})  # a new run starts from nothing
