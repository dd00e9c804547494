"""A replay sees each user's LATEST profile only, before the cleaner ran or after, whatever the
batch size: no extra match per older record, no old profile counted, no deleted user."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from rules_service.domain import LAST_SEEN_TOPIC
from rules_service.normalize import format_timestamp_ms
from tests.replay.conftest import RULE, Env
from workers.log.port import Message

pytestmark = pytest.mark.redis

DAY_MS = 86_400_000


def _doc(user: str, matching: bool, seen_ms: int) -> bytes:
    """A users.last_seen document as the stream writes it (``last_seen`` last). ``matching``
    decides whether RULE (male on iOS) matches it."""
    return orjson.dumps({"user_id": user, "age": 30, "gender": "male" if matching else "female",
                         "device": {"os": "iOS" if matching else "android"}, "geo": {"city": "London"},
                         "last_seen": format_timestamp_ms(seen_ms)})


def _write_versions(env: Env) -> int:
    """Several versions per user, written in rounds (so a user's versions are thousands of offsets
    apart, in different scan batches), no cleaner pass. Returns the users whose latest profile
    matches RULE."""
    now = int(time.time() * 1000)
    rng = random.Random(11)
    # kind -> matching flag of each version, oldest first (None: a tombstone)
    kinds: dict[str, list[bool | None]] = {
        "flipped_away": [True, False],  # an OLD profile matched: must not count
        "flipped_in": [False, True],
        "stable_match": [True, True, True],  # three versions: one match, not three
        "deleted": [True, None],  # the latest is a tombstone: not at all
        "stable_miss": [False, False],
    }
    users = [(f"{kind}-{i}", versions) for kind, versions in kinds.items() for i in range(60)]
    rng.shuffle(users)
    producer = env.log.producer()
    for round_ in range(3):
        messages = []
        for user, versions in users:
            if round_ < len(versions):
                matching = versions[round_]
                seen = now - (20 - 5 * round_) * DAY_MS - rng.randrange(DAY_MS)  # later rounds: seen later
                value = None if matching is None else _doc(user, matching, seen)
                messages.append(Message(value=value, key=user.encode()))
        producer.send_batch(LAST_SEEN_TOPIC, messages)
    producer.close()
    return sum(1 for _, versions in users if versions[-1] is True)


def _replay(env: Env, batch_size: int, name: str) -> tuple[int, int]:
    """Create an audience of RULE with a 30-day lookback, replay it with ``batch_size``: returns
    (matches the replay counted, unique users the audience reports)."""
    audience = env.create(RULE, lookback=30, name=name)
    replay_id = audience["backfill"]["replay_id"]
    result = env.coordinator(batch_size=batch_size).run_pending()
    assert result.finished == {replay_id: "done"}
    body = env.client.get(f"/v1/replays/{replay_id}", headers=env.headers).get_json()
    return body["progress"]["matched"], env.size(audience["id"], 30)["unique_users"]


def test_replay_counts_each_users_latest_profile_once_whatever_the_batch_size(env: Env) -> None:
    expected = _write_versions(env)
    assert expected == 120  # flipped_in + stable_match
    # Before any cleaner pass: the topic still holds every superseded version and the tombstones.
    records = sum(1 for batch in env.log.scan_compacted(LAST_SEEN_TOPIC) for _ in batch)
    assert records == 300  # one per user (the deleted ones as their tombstone)
    for batch_size in (7, 100, 300):
        matched, unique = _replay(env, batch_size, f"b{batch_size}")
        assert matched == expected, batch_size
        assert abs(unique - expected) <= 2, (batch_size, unique)
    # After the cleaner: the very same answer.
    env.log.compact(LAST_SEEN_TOPIC)
    matched, unique = _replay(env, 100, "compacted")
    assert matched == expected
    assert abs(unique - expected) <= 2


def test_an_old_matching_profile_is_not_counted(env: Env) -> None:
    now = int(time.time() * 1000)
    producer = env.log.producer()
    producer.send_batch(LAST_SEEN_TOPIC, [Message(_doc("alice", True, now - 10 * DAY_MS), key=b"alice"),
                                          Message(_doc("bob", True, now - 10 * DAY_MS), key=b"bob")])
    producer.send_batch(LAST_SEEN_TOPIC, [Message(_doc(f"filler-{i}", False, now - DAY_MS), key=f"f{i}".encode())
                                          for i in range(50)])
    # alice changes: her latest profile no longer matches; bob is deleted
    producer.send_batch(LAST_SEEN_TOPIC, [Message(_doc("alice", False, now - 2 * DAY_MS), key=b"alice"),
                                          Message(None, key=b"bob")])
    producer.close()
    for batch_size in (1, 10, 1000):
        matched, unique = _replay(env, batch_size, f"b{batch_size}")
        assert (matched, unique) == (0, 0), batch_size
