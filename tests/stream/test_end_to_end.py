"""Bids in, counters out: the real log, normaliser, percolator and Redis counters, checked against
numbers computed independently from the generated bids (plain Python predicates per audience,
evaluated on the OpenRTB JSON itself, not on user documents or through the percolator)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from rules_service.config import Settings
from rules_service.domain import LAST_SEEN_TOPIC, RULES_TOPIC, RuleChange, dlq_topic
from workers.bidgen import BidGenerator
from workers.log.port import Message

pytestmark = pytest.mark.redis

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
DAYS = 3
BIDS = 6000
USERS = 900
LONDON = ["Wimbledon", "Clapham", "Camden", "Islington"]


def event_ms(bid: dict[str, Any]) -> int:
    received = bid["ext"]["received_at"]
    if isinstance(received, int):
        return received
    return int(datetime.fromisoformat(received.replace("Z", "+00:00")).timestamp() * 1000)


def facts(bid: dict[str, Any]) -> dict[str, Any]:
    """What the audiences below look at, read straight from the BidRequest."""
    user, device = bid.get("user", {}), bid["device"]
    at = datetime.fromtimestamp(event_ms(bid) / 1000, UTC)
    yob = user.get("yob")
    age = None if yob is None else at.year - yob
    band = None
    if age is not None:
        for low, high, label in ((13, 17, "13-17"), (18, 24, "18-24"), (25, 34, "25-34"), (35, 44, "35-44"),
                                 (45, 54, "45-54"), (55, 64, "55-64"), (65, 200, "65+")):
            if low <= age <= high:
                band = label
    return {
        "user_id": user.get("id") or device["ifa"],
        "at": at,
        "age": age,
        "age_band": band,
        "gender": {"M": "male", "F": "female", "O": "other"}.get(user.get("gender", "")),
        "occupation": (user.get("ext") or {}).get("occupation"),
        "keywords": set((user.get("keywords") or "").split(",")) - {""},
        "device.os": device["os"],
        "device.carrier": device["carrier"],
        "geo.city": device["geo"]["city"],
        "exchange": bid["ext"]["exchange"],
    }


AUDIENCES: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = {
    "london_women": (
        {"bool": {"filter": [{"term": {"gender": "female"}}, {"terms": {"geo.city": LONDON}}]}},
        lambda f: f["gender"] == "female" and f["geo.city"] in LONDON,
    ),
    "ios_on_ee": (
        {"bool": {"must": [{"term": {"device.os": "iOS"}}, {"term": {"device.carrier": "EE"}}]}},
        lambda f: f["device.os"] == "iOS" and f["device.carrier"] == "EE",
    ),
    "young_carers": (
        {"bool": {"filter": [{"range": {"age": {"gte": 25, "lte": 34}}},
                             {"terms": {"occupation": ["teacher", "nurse", "engineer"]}}]}},
        lambda f: f["age"] is not None and 25 <= f["age"] <= 34 and f["occupation"] in ("teacher", "nurse", "engineer"),
    ),
    "football_not_android": (
        {"bool": {"must": [{"term": {"interests": "football"}}], "must_not": [{"term": {"device.os": "Android"}}]}},
        lambda f: "football" in f["keywords"] and f["device.os"] != "Android",
    ),
}
DIMENSIONS = ("gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange")


def rule_message(audience: str, query: dict[str, Any], status: str = "active") -> Message:
    change = RuleChange(audience_id=audience, advertiser_id="adv-1", version=1, query=query,
                        status=status)  # type: ignore[arg-type]
    return Message(value=change.to_json(), key=change.rule_id.encode())


def test_bids_in_counters_out(tmp_path: Path, redis_url: str) -> None:
    from rules_service.counters.factory import create_counters
    from workers.log.factory import create_log
    from workers.stream import DLQ_COUNTER_ID, DLQ_DIMENSION
    from workers.stream_runner import drain
    from workers.topics import ensure_topics

    settings = Settings(DATA_DIR=tmp_path, REDIS_URL=redis_url, BIDS_PARTITIONS=3, BATCH_SIZE=500)
    log = create_log(settings)
    ensure_topics(log, settings)
    producer = log.producer()
    producer.send_batch(RULES_TOPIC, [rule_message(name, query) for name, (query, _) in AUDIENCES.items()] + [
        rule_message("paused", {"match_all": {}}, status="inactive"),
        rule_message("deleted", {"match_all": {}}),
        Message(value=None, key=b"deleted@v1"),
        rule_message("broken", {"term": {"no_such_field": "x"}}),
    ])

    generator = BidGenerator(seed=42, users=USERS, days=DAYS, end=END, invalid_rate=0.02)
    messages = list(generator.messages(BIDS))
    for i in range(0, len(messages), 1000):
        producer.send_batch("bids", [Message(value=v, key=k) for k, v in messages[i:i + 1000]])

    summary = drain(settings, processes=1)

    # Independent expectations from the generated bids.
    valid = [orjson.loads(v) for k, v in messages if k is not None]
    invalid = len(messages) - len(valid)
    assert invalid > 0
    expected_matches: Counter[str] = Counter()
    expected_users: dict[str, set[str]] = defaultdict(set)
    expected_days: dict[str, Counter[datetime]] = defaultdict(Counter)
    expected_dims: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for bid in valid:
        f = facts(bid)
        for name, (_, predicate) in AUDIENCES.items():
            if predicate(f):
                expected_matches[name] += 1
                expected_users[name].add(f["user_id"])
                expected_days[name][f["at"].replace(hour=0, minute=0, second=0, microsecond=0)] += 1
                for dim in DIMENSIONS:
                    if f[dim] is not None:
                        expected_dims[name][dim][f[dim]] += 1

    assert summary["processed"] == BIDS
    assert summary["dlq"] == invalid
    assert summary["matched"] == sum(expected_matches.values())

    counters = create_counters(settings)
    start, end = END - timedelta(days=DAYS + 1), END + timedelta(hours=1)
    for name in AUDIENCES:
        rid = f"{name}@v1"
        assert expected_matches[name] > 20, f"{name}: the generated data should exercise this audience"
        assert counters.matches(rid, start, end) == expected_matches[name], name
        exact = len(expected_users[name])
        estimate = counters.unique_users(rid, start, end)
        assert abs(estimate - exact) <= max(2, 0.03 * exact), (name, estimate, exact)
        series = {p.start: p.matches for p in counters.series(rid, start, end, "day") if p.matches}
        assert series == dict(expected_days[name]), name
        breakdown = counters.breakdown(rid, start, end, list(DIMENSIONS))
        assert {d: dict(v) for d, v in breakdown.items() if v} == {d: dict(v) for d, v in expected_dims[name].items()}
    for silent in ("paused@v1", "deleted@v1", "broken@v1"):
        assert counters.matches(silent, start, end) == 0, silent

    # Dead letters: every invalid message, with its reason, counted once per category.
    dead = [orjson.loads(r.value or b"") for batch in log.scan_compacted(dlq_topic("bids")) for r in batch]
    assert len(dead) == invalid
    assert all(d["reason"] and d["source"]["topic"] == "bids" for d in dead)
    dlq_counts = counters.breakdown(DLQ_COUNTER_ID, start, end, [DLQ_DIMENSION])[DLQ_DIMENSION]
    assert sum(dlq_counts.values()) == invalid
    assert dlq_counts == dict(Counter(d["category"] for d in dead))

    # users.last_seen: one live record per user, carrying the user's last bid.
    last_bid: dict[str, dict[str, Any]] = {}
    for bid in valid:
        last_bid[facts(bid)["user_id"]] = bid
    latest: dict[bytes, dict[str, Any]] = {}
    for batch in log.scan_compacted(LAST_SEEN_TOPIC):
        for record in batch:
            if record.key is not None and record.value is not None:
                latest[record.key] = orjson.loads(record.value)
    assert {k.decode() for k in latest} == set(last_bid)
    for user_id, bid in last_bid.items():
        seen = datetime.fromisoformat(latest[user_id.encode()]["last_seen"].replace("Z", "+00:00"))
        assert int(seen.timestamp() * 1000) == event_ms(bid)
    log.close()
