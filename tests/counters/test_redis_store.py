"""RedisCounters against a real redis-server (and fakeredis+lupa as a quick variant)."""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis

from rules_service.counters import keys
from rules_service.counters.aggregate import aggregate
from rules_service.counters.port import CounterBatch
from rules_service.counters.redis_store import RedisCounters

T0 = datetime(2026, 11, 22, tzinfo=UTC)  # a Sunday, 00:00 UTC
NOW = (T0 + timedelta(days=3)).timestamp()  # "now" for retention decisions
DIMS = ("gender", "exchange")


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def doc(uid: str, t: datetime, gender: str = "male", exchange: str = "adx") -> dict[str, str]:
    return {"user_id": uid, "last_seen": iso(t), "gender": gender, "exchange": exchange}


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "fakeredis"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        c = redis.Redis.from_url(url)
    else:
        pytest.importorskip("lupa")
        import fakeredis

        c = fakeredis.FakeRedis()
    yield c
    c.close()


@pytest.fixture
def counters(client: redis.Redis) -> RedisCounters:
    return RedisCounters(client, hour_retention_days=14, day_retention_days=400, clock=lambda: NOW)


def write(counters: RedisCounters, docs: list[dict[str, str]], rules: list[str], consumer: str = "w") -> bool:
    batch = aggregate(docs, [rules] * len(docs), DIMS)
    return counters.apply(batch, consumer, {})


def test_exact_counts_and_ranges(counters: RedisCounters) -> None:
    docs = [
        doc("u1", T0 + timedelta(hours=1)),
        doc("u1", T0 + timedelta(hours=1, minutes=5)),
        doc("u2", T0 + timedelta(hours=5), gender="female"),
        doc("u3", T0 + timedelta(days=1, hours=2), exchange="openx"),
        doc("u1", T0 + timedelta(days=2, hours=23, minutes=59, seconds=59, milliseconds=999)),
    ]
    assert write(counters, docs, ["a@v1", "b@v1"])
    day = timedelta(days=1)
    r = "a@v1"
    assert counters.matches(r, T0, T0 + 3 * day) == 5
    assert counters.unique_users(r, T0, T0 + 3 * day) == 3
    assert counters.matches(r, T0, T0 + day) == 3
    assert counters.unique_users(r, T0, T0 + day) == 2
    # a range starting mid-day uses the hour buckets of the partial day
    assert counters.matches(r, T0 + timedelta(hours=2), T0 + 2 * day) == 2
    assert counters.unique_users(r, T0 + timedelta(hours=2), T0 + 2 * day) == 2
    assert counters.unique_users(r, T0 + timedelta(hours=2), T0 + timedelta(hours=6)) == 1
    # hour precision: a sub-hour range covers its whole hour
    assert counters.matches(r, T0 + timedelta(hours=1, minutes=30), T0 + timedelta(hours=1, minutes=31)) == 2
    # the last millisecond of a day is in that day, midnight starts the next
    last = T0 + 2 * day + timedelta(hours=23)
    assert counters.matches(r, last, last + timedelta(hours=1)) == 1
    assert counters.matches(r, T0 + 3 * day, T0 + 4 * day) == 0
    assert counters.matches(r, T0 + 2 * day, T0 + 3 * day) == 1
    # empty and inverted ranges
    assert counters.matches(r, T0, T0) == 0
    assert counters.unique_users(r, T0 + day, T0) == 0
    assert counters.matches("unknown@v1", T0, T0 + 3 * day) == 0
    assert counters.unique_users("unknown@v1", T0, T0 + 3 * day) == 0
    assert counters.summary(r, T0, T0 + 3 * day) == (3, 5)
    # naive datetimes are UTC
    assert counters.matches(r, T0.replace(tzinfo=None), (T0 + day).replace(tzinfo=None)) == 3


def test_series(counters: RedisCounters) -> None:
    docs = [doc("u1", T0 + timedelta(hours=1)), doc("u2", T0 + timedelta(hours=1)), doc("u1", T0 + timedelta(hours=3)),
            doc("u4", T0 + timedelta(days=1, hours=3))]
    write(counters, docs, ["a@v1"])
    hourly = counters.series("a@v1", T0, T0 + timedelta(hours=4), "hour")
    assert [(p.start.hour, p.unique_users, p.matches) for p in hourly] == [(0, 0, 0), (1, 2, 2), (2, 0, 0), (3, 1, 1)]
    assert hourly[0].start == T0
    daily = counters.series("a@v1", T0 + timedelta(hours=5), T0 + timedelta(days=3), "day")
    assert [(p.start, p.unique_users, p.matches) for p in daily] == [
        (T0, 2, 3), (T0 + timedelta(days=1), 1, 1), (T0 + timedelta(days=2), 0, 0)
    ]
    with pytest.raises(ValueError, match="granularity"):
        counters.series("a@v1", T0, T0 + timedelta(days=1), "week")  # type: ignore[arg-type]


def test_breakdown(counters: RedisCounters) -> None:
    docs = [doc("u1", T0 + timedelta(hours=1)), doc("u2", T0 + timedelta(hours=2), gender="female"),
            doc("u3", T0 + timedelta(days=1), exchange="a=b")]
    write(counters, docs, ["a@v1"])
    assert counters.breakdown("a@v1", T0, T0 + timedelta(days=2), ["gender", "exchange", "device.os"]) == {
        "gender": {"male": 2, "female": 1},
        "exchange": {"adx": 2, "a=b": 1},
        "device.os": {},
    }
    assert counters.breakdown("a@v1", T0 + timedelta(days=1), T0 + timedelta(days=2), ["gender"]) == {
        "gender": {"male": 1}
    }
    assert counters.breakdown("a@v1", T0, T0 + timedelta(days=2), []) == {}


def test_retention_ttls(counters: RedisCounters, client: redis.Redis) -> None:
    event = T0 + timedelta(hours=10)
    write(counters, [doc("u1", event)], ["a@v1"])
    write(counters, [doc("u1", event)], ["a@v1"])  # existing keys and fields: deadlines kept
    day_end = calendar.timegm((2026, 11, 23, 0, 0, 0, 0, 0, 0))
    month_end = calendar.timegm((2026, 12, 1, 0, 0, 0, 0, 0, 0))
    hour_end = int((event + timedelta(hours=1)).timestamp())
    d14, d400 = 14 * 86400, 400 * 86400
    expected = {
        "c:{r:a@v1}:u:h:2026112210": hour_end + d14,
        "c:{r:a@v1}:u:d:20261122": day_end + d400,
        "c:{r:a@v1}:m:h:20261122": day_end + d14,
        "c:{r:a@v1}:m:d:202611": month_end + d400,
        "c:{r:a@v1}:dim:20261122": day_end + d400,
    }
    assert sorted(counters.rule_keys("a@v1")) == sorted(expected)
    for key, expire_at in expected.items():
        ttl = client.ttl(key)
        assert abs(ttl - (expire_at - int(datetime.now(UTC).timestamp()))) <= 5, key


def test_exactly_once(counters: RedisCounters) -> None:
    b1 = aggregate([doc("u1", T0), doc("u2", T0)], [["a@v1"], ["a@v1"]], DIMS)
    tp0, tp1 = ("bids", 0), ("bids", 1)
    assert counters.apply(b1, "stream", {tp0: 2, tp1: 10}, {tp0: 0, tp1: 10})
    assert counters.stored_offsets("stream") == {tp0: 2, tp1: 10}
    # a worker that crashed before committing re-reads and re-applies the same records: skipped
    assert not counters.apply(b1, "stream", {tp0: 2, tp1: 10}, {tp0: 0, tp1: 10})
    # even when only one partition shows it was applied
    assert not counters.apply(b1, "stream", {tp0: 2, tp1: 12}, {tp0: 1, tp1: 10})
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 2
    assert counters.stored_offsets("stream") == {tp0: 2, tp1: 10}
    # the next batch applies
    b2 = aggregate([doc("u3", T0)], [["a@v1"]], DIMS)
    assert counters.apply(b2, "stream", {tp0: 3}, {tp0: 2})
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 3
    assert counters.stored_offsets("stream") == {tp0: 3, tp1: 10}
    # another consumer (a replay) has its own offsets
    assert counters.apply(b2, "replay:42", {("users.last_seen", 0): 7}, {("users.last_seen", 0): 0})
    assert counters.stored_offsets("replay:42") == {("users.last_seen", 0): 7}
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 4
    counters.delete_offsets("replay:42")
    assert counters.stored_offsets("replay:42") == {}
    # an empty batch still moves the offsets (bad messages only, or nothing matched)
    assert counters.apply(CounterBatch(), "stream", {tp0: 9}, {tp0: 3})
    assert counters.stored_offsets("stream")[tp0] == 9
    # without start offsets there is no check
    assert counters.apply(b2, "stream", {tp0: 10})
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 5
    with pytest.raises(ValueError, match="without a next offset"):
        counters.apply(b2, "stream", {tp0: 11}, {tp1: 10})


def test_big_offsets_and_members_round_trip(counters: RedisCounters) -> None:
    big = 2**53 + 1  # beyond a Lua double's exact integers
    members = [f"user-{i}" for i in range(9000)]  # more than one PFADD chunk
    batch = CounterBatch(users={("a@v1", "day", int(T0.timestamp())): set(members)})
    assert counters.apply(batch, "s", {("bids", 0): big}, {("bids", 0): 0})
    assert counters.stored_offsets("s") == {("bids", 0): big}
    assert not counters.apply(batch, "s", {("bids", 0): big + 5}, {("bids", 0): big - 1})
    assert counters.apply(batch, "s", {("bids", 0): big + 5}, {("bids", 0): big})
    count = counters.unique_users("a@v1", T0, T0 + timedelta(days=1))
    assert abs(count - 9000) <= 9000 * 0.02


def test_unique_users_hll_error(counters: RedisCounters) -> None:
    times = [T0 + timedelta(hours=i % 48, minutes=i % 60) for i in range(10_000)]
    docs = [doc(f"user-{i}", t) for i, t in enumerate(times)]
    write(counters, docs, ["a@v1"])
    for start, end in [
        (T0, T0 + timedelta(days=2)),
        (T0, T0 + timedelta(days=1)),
        (T0 + timedelta(hours=12), T0 + timedelta(hours=36)),
        (T0 + timedelta(hours=5), T0 + timedelta(hours=6)),
    ]:
        expected = sum(1 for t in times if start <= t < end)  # one user per event
        got = counters.unique_users("a@v1", start, end)
        assert abs(got - expected) <= expected * 0.03, (start, end, got)
        assert counters.matches("a@v1", start, end) == expected


def test_hour_buckets_past_retention_fall_back_to_days(client: redis.Redis) -> None:
    now = (T0 + timedelta(days=30)).timestamp()
    counters = RedisCounters(client, hour_retention_days=14, day_retention_days=400, clock=lambda: now)
    write(counters, [doc("u1", T0 + timedelta(hours=1)), doc("u2", T0 + timedelta(hours=20))], ["a@v1"])
    client.delete(keys.hour_users("a@v1", int(T0.timestamp()) + 3600))  # as if it had expired
    # the partial first day is older than the hour retention: counted as the whole day
    assert counters.matches("a@v1", T0 + timedelta(hours=12), T0 + timedelta(days=2)) == 2
    assert counters.unique_users("a@v1", T0 + timedelta(hours=12), T0 + timedelta(days=2)) == 2


def test_delete_rule_only_drops_that_rule(counters: RedisCounters) -> None:
    write(counters, [doc("u1", T0)], ["a@v1", "a@v10", "a*@v1"])
    counters.delete_rule("a*@v1")
    assert list(counters.rule_keys("a*@v1")) == []
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 1
    counters.delete_rule("a@v1")
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 0
    assert counters.matches("a@v10", T0, T0 + timedelta(days=1)) == 1
    counters.delete_rule("never@v1")  # no error


def test_script_reloaded_after_flush(counters: RedisCounters, client: redis.Redis) -> None:
    write(counters, [doc("u1", T0)], ["a@v1"])
    client.script_flush()
    write(counters, [doc("u2", T0)], ["a@v1"])
    assert counters.matches("a@v1", T0, T0 + timedelta(days=1)) == 2


@pytest.mark.redis
def test_decoded_client(redis_url: str) -> None:
    decoded = redis.Redis.from_url(redis_url, decode_responses=True)
    counters = RedisCounters(decoded, clock=lambda: NOW)
    write(counters, [doc("u1", T0)], ["a@v1"], consumer="c")
    counters.apply(CounterBatch(), "c", {("bids", 3): 4})
    assert counters.stored_offsets("c") == {("bids", 3): 4}
    assert counters.breakdown("a@v1", T0, T0 + timedelta(days=1), ["gender"]) == {"gender": {"male": 1}}
    assert counters.summary("a@v1", T0, T0 + timedelta(days=1)) == (1, 1)
    assert list(counters.rule_keys("a@v1"))
    decoded.close()


def test_buckets_past_their_retention_are_not_written(client: redis.Redis) -> None:
    """A replay over 90 days produces hour buckets older than the hour retention: Redis would drop
    them at once (their deadline is past), so they are not sent at all; the day buckets are."""
    now = datetime.now(UTC).replace(microsecond=0)  # the server expires by its own clock
    counters = RedisCounters(client, hour_retention_days=14, day_retention_days=400, clock=now.timestamp)
    old = int((now - timedelta(days=20)).timestamp())
    old_hour, old_day = old - old % 3600, old - old % 86400
    recent = int((now - timedelta(days=2)).timestamp())
    recent_hour = recent - recent % 3600
    batch = CounterBatch(
        users={("r@v1", "hour", old_hour): {"u1"}, ("r@v1", "day", old_day): {"u1"},
               ("r@v1", "hour", recent_hour): {"u2"}},
        matches={("r@v1", "hour", old_hour): 1, ("r@v1", "day", old_day): 1, ("r@v1", "hour", recent_hour): 1},
        dimensions={("r@v1", old_day, "gender"): {"male": 1}},
    )
    encoded = counters.encode_batch(batch, {("bids", 0): 1})
    sent = b"".join(encoded.pfadds)
    assert keys.hour_users("r@v1", old_hour).encode() not in sent
    assert keys.day_users("r@v1", old_day).encode() in sent
    assert counters.apply(batch, "w", {("bids", 0): 1})
    assert not client.exists(keys.hour_users("r@v1", old_hour))
    assert client.exists(keys.day_users("r@v1", old_day), keys.hour_users("r@v1", recent_hour)) == 2
    assert client.exists(keys.dimensions("r@v1", old_day))
    day_start = datetime.fromtimestamp(old_day, UTC)
    assert counters.matches("r@v1", day_start, day_start + timedelta(days=1)) == 1  # from the day count
