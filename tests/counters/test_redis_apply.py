"""The packed write path of RedisCounters.apply: native PFADDs + the counts script, one round trip."""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator

import pytest
import redis

from rules_service.counters import keys
from rules_service.counters.port import CounterBatch
from rules_service.counters.redis_store import RedisCounters

pytestmark = pytest.mark.redis

H10 = calendar.timegm((2026, 11, 22, 10, 0, 0, 0, 0, 0))
DAY = H10 - H10 % 86400


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    c.flushdb()
    yield c
    c.close()


def batch_of(users: list[str], rule: str = "a@v1") -> CounterBatch:
    return CounterBatch(
        users={(rule, "hour", H10): set(users), (rule, "day", DAY): set(users)},
        matches={(rule, "hour", H10): len(users), (rule, "day", DAY): len(users)},
        dimensions={(rule, DAY, "geo.city"): {"a=b": 2, "Zürich": 1, "": 3}},
    )


def test_members_fields_and_counts_round_trip(client: redis.Redis) -> None:
    counters = RedisCounters(client)
    users = ["u1", "ü-2", "with\r\nnewline", "x" * 300, "$3", "*"]
    assert counters.apply(batch_of(users), "s", {("bids", 0): 6}, {("bids", 0): 0})
    assert client.pfcount(keys.hour_users("a@v1", H10)) == len(users)
    assert client.pfcount(keys.day_users("a@v1", DAY)) == len(users)
    key, fld = keys.hour_matches("a@v1", H10)
    assert client.hget(key, fld) == b"6"
    assert client.hgetall(keys.dimensions("a@v1", DAY)) == {
        b"geo.city=a=b": b"2", "geo.city=Zürich".encode(): b"1", b"geo.city=": b"3"}
    assert counters.stored_offsets("s") == {("bids", 0): 6}


def test_a_resent_batch_adds_users_again_but_counts_once_and_sketches_get_deadlines(client: redis.Redis) -> None:
    counters = RedisCounters(client)
    batch = batch_of(["u1", "u2"])
    assert counters.apply(batch, "s", {("bids", 0): 2}, {("bids", 0): 0})
    # a crash after the PFADDs of a write reached Redis but before their EXPIREATs: a sketch exists
    # without a deadline; the restarted worker's re-sent (already applied) batch still gives it one
    client.persist(keys.hour_users("a@v1", H10))
    assert client.ttl(keys.hour_users("a@v1", H10)) == -1
    assert not RedisCounters(client).apply(batch, "s", {("bids", 0): 2}, {("bids", 0): 0})
    assert client.ttl(keys.hour_users("a@v1", H10)) > 0
    key, fld = keys.hour_matches("a@v1", H10)
    assert client.hget(key, fld) == b"2"
    assert client.pfcount(keys.hour_users("a@v1", H10)) == 2


def test_a_failing_pfadd_raises_and_the_client_stays_usable(client: redis.Redis) -> None:
    counters = RedisCounters(client)
    client.set(keys.hour_users("bad@v1", H10), "not a sketch")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        counters.apply(batch_of(["u1"], rule="bad@v1"), "s", {("bids", 0): 1}, {("bids", 0): 0})
    assert counters.apply(batch_of(["u1"]), "s", {("bids", 0): 2}, {("bids", 0): 1})
    assert client.pfcount(keys.day_users("a@v1", DAY)) == 1


def test_script_flush_between_batches(client: redis.Redis) -> None:
    counters = RedisCounters(client)
    assert counters.apply(batch_of(["u1"]), "s", {("bids", 0): 1}, {("bids", 0): 0})
    client.script_flush()
    assert counters.apply(batch_of(["u2"]), "s", {("bids", 0): 2}, {("bids", 0): 1})
    assert client.pfcount(keys.day_users("a@v1", DAY)) == 2
    key, fld = keys.day_matches("a@v1", DAY)
    assert client.hget(key, fld) == b"2"


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "fakeredis"])
def any_client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "redis":
        c = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        c.flushdb()
    else:
        pytest.importorskip("lupa")
        import fakeredis

        c = fakeredis.FakeRedis()
    yield c
    c.close()


def test_many_fields_of_one_hash_are_summed(any_client: redis.Redis) -> None:
    counters = RedisCounters(any_client)
    values = {f"city-{i}": i + 1 for i in range(30)}
    batch = CounterBatch(dimensions={("a@v1", DAY, "geo.city"): dict(values)})
    assert counters.apply(batch, "s", {("bids", 0): 1}, {("bids", 0): 0})
    assert counters.apply(batch, "s", {("bids", 0): 2}, {("bids", 0): 1})
    stored = any_client.hgetall(keys.dimensions("a@v1", DAY))
    assert stored == {f"geo.city={v}".encode(): str(2 * n).encode() for v, n in values.items()}
    assert any_client.ttl(keys.dimensions("a@v1", DAY)) > 0


def test_buckets_naming_the_same_field_add_up(any_client: redis.Redis) -> None:
    # not aligned to the hour/day: two buckets of one hour are one field of one hash
    counters = RedisCounters(any_client)
    batch = CounterBatch(
        matches={("a@v1", "hour", H10): 2, ("a@v1", "hour", H10 + 60): 3, ("a@v1", "day", DAY + 5): 4,
                 ("a@v1", "day", DAY): 1},
        dimensions={("a@v1", DAY, "gender"): {"male": 1}, ("a@v1", DAY + 7, "gender"): {"male": 2, "other": 1}},
    )
    assert counters.apply(batch, "s", {})
    key, fld = keys.hour_matches("a@v1", H10)
    assert any_client.hget(key, fld) == b"5"
    key, fld = keys.day_matches("a@v1", DAY)
    assert any_client.hget(key, fld) == b"5"
    assert any_client.hgetall(keys.dimensions("a@v1", DAY)) == {b"gender=male": b"3", b"gender=other": b"1"}


def test_big_counts_stay_exact(any_client: redis.Redis) -> None:
    counters = RedisCounters(any_client)
    big = 123_456_789_012_345  # more digits than a Lua number prints
    key, fld = keys.day_matches("a@v1", DAY)
    any_client.hset(key, fld, str(big))
    assert counters.apply(CounterBatch(matches={("a@v1", "day", DAY): 5000}), "s", {})
    assert any_client.hget(key, fld) == str(big + 5000).encode()
    with pytest.raises(ValueError, match="negative"):
        counters.apply(CounterBatch(matches={("a@v1", "day", DAY): -1}), "s", {})


def test_a_command_failing_inside_exec_names_its_key_and_says_the_rest_was_committed(client: redis.Redis) -> None:
    """WRONGTYPE on one hash inside EXEC: MULTI does not roll back, so the offsets and the other
    counts are in; the error must say which key lost its counts, and a retry is a skip."""
    from rules_service.counters.redis_store import PartiallyAppliedError

    counters = RedisCounters(client, clock=lambda: H10)
    poisoned = keys.dimensions("a@v1", DAY)
    client.set(poisoned, "not a hash")
    with pytest.raises(PartiallyAppliedError, match=re.escape(poisoned)) as info:
        counters.apply(batch_of(["u1", "u2"]), "s", {("bids", 0): 2}, {("bids", 0): 0})
    assert {key for key, _ in info.value.failures} == {poisoned}  # one per HINCRBY of its fields
    assert "WRONGTYPE" in info.value.failures[0][1]
    key, fld = keys.hour_matches("a@v1", H10)
    assert client.hget(key, fld) == b"2"  # the other counts went in, once
    assert counters.stored_offsets("s") == {("bids", 0): 2}
    assert not counters.apply(batch_of(["u1", "u2"]), "s", {("bids", 0): 2}, {("bids", 0): 0})
    assert client.hget(key, fld) == b"2"


def test_a_timeout_while_skimming_replies_is_redis_s_timeout_and_the_retry_counts_once(redis_url: str) -> None:
    """The raw reply read raises what redis-py raises (callers catch redis' TimeoutError), drops the
    connection, and the batch sent again is counted once."""
    slow = redis.Redis.from_url(redis_url, socket_timeout=0.2)
    admin = redis.Redis.from_url(redis_url)
    counters = RedisCounters(slow, clock=lambda: H10)
    try:
        assert counters.apply(batch_of(["u0"]), "s", {("bids", 0): 1}, {("bids", 0): 0})  # connected
        admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
        with pytest.raises(redis.exceptions.TimeoutError):
            counters.apply(batch_of(["u1"]), "s", {("bids", 0): 2}, {("bids", 0): 1})
        admin.execute_command("CLIENT", "UNPAUSE")
        assert counters.apply(batch_of(["u1"]), "s", {("bids", 0): 2}, {("bids", 0): 1})
        key, fld = keys.hour_matches("a@v1", H10)
        assert admin.hget(key, fld) == b"2"
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        slow.close()
        admin.close()


def _wide_batch(rules: int) -> CounterBatch:
    """~30 fields per rule, like a stream window: EXEC answers tens of thousands of integers."""
    dimensions = {(f"r{i}@v1", DAY, "geo.city"): {f"city-{j}": i + j + 1 for j in range(28)} for i in range(rules)}
    matches = {(f"r{i}@v1", "hour", H10): i + 1 for i in range(rules)}
    return CounterBatch(matches=matches, dimensions=dimensions)


def test_a_long_exec_reply_is_read_whole_across_many_reads(client: redis.Redis) -> None:
    """EXEC's reply to ~60,000 commands arrives over many socket reads and is checked raw: every
    count lands once, and the connection is left clean for the next write."""
    counters = RedisCounters(client, clock=lambda: H10)
    assert counters.apply(_wide_batch(2000), "s", {("bids", 0): 10}, {("bids", 0): 0})
    assert counters.apply(_wide_batch(2000), "s", {("bids", 0): 20}, {("bids", 0): 10})
    assert client.hget(keys.dimensions("r1999@v1", DAY), "geo.city=city-27") == str(2 * (1999 + 27 + 1)).encode()
    key, fld = keys.hour_matches("r7@v1", H10)
    assert client.hget(key, fld) == b"16"
    assert counters.stored_offsets("s") == {("bids", 0): 20}


def test_an_error_deep_in_a_long_exec_reply_is_found(client: redis.Redis) -> None:
    """One WRONGTYPE among ~60,000 integer replies (in the middle, on no read boundary we chose):
    the raw check hands the reply to the parser, which names the key."""
    from rules_service.counters.redis_store import PartiallyAppliedError

    counters = RedisCounters(client, clock=lambda: H10)
    poisoned = keys.dimensions("r1234@v1", DAY)
    client.set(poisoned, "not a hash")
    with pytest.raises(PartiallyAppliedError, match=re.escape(poisoned)) as info:
        counters.apply(_wide_batch(2000), "s", {("bids", 0): 10}, {("bids", 0): 0})
    assert {key for key, _ in info.value.failures} == {poisoned}
    assert counters.stored_offsets("s") == {("bids", 0): 10}
    assert client.hget(keys.dimensions("r1999@v1", DAY), "geo.city=city-27") == str(1999 + 27 + 1).encode()
    assert client.ping()  # nothing of the reply left unread on the connection
