"""The counter store goes back in time while a worker streams (Redis restored from an older
snapshot, or a failover to a replica that lagged): counts and offsets went back together, so the
worker must rewind to the stored offsets and count the records in between again. The final
counters equal those of an uninterrupted run, exactly."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from rules_service.config import Settings
from tests.stream.seeding import log_with_rules
from workers.bidgen import BidGenerator
from workers.log.port import Message

pytestmark = pytest.mark.redis

END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
RULES: dict[str, dict[str, Any]] = {
    "women": {"term": {"gender": "female"}},
    "ios": {"term": {"device.os": "iOS"}},
    "everyone": {"match_all": {}},
}


def with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def counters_of(client: redis.Redis) -> dict[bytes, Any]:
    """Every counter (not the offsets), HLLs as their counts."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match="c:*", count=1000):
        out[key] = client.hgetall(key) if client.type(key) == b"hash" else client.pfcount(key)
    return out


def test_a_store_restored_to_an_older_snapshot_is_recounted_from_there(tmp_path: Path, redis_url: str) -> None:
    from workers.stream_runner import build_consumer

    faulted_url, reference_url = with_db(redis_url, 5), with_db(redis_url, 6)
    faulted, reference = redis.Redis.from_url(faulted_url), redis.Redis.from_url(reference_url)
    faulted.flushdb()
    reference.flushdb()
    settings = Settings(DATA_DIR=tmp_path, REDIS_URL=faulted_url, BIDS_PARTITIONS=2, BATCH_SIZE=200,
                        STREAM_FLUSH_MS=0)
    log, producer = log_with_rules(settings, RULES)
    generator = BidGenerator(seed=7, users=500, days=1, end=END)
    producer.send_batch("bids", [Message(value=v, key=k) for k, v in generator.messages(4000)])
    log.close()

    with build_consumer(settings) as consumer:
        for _ in range(6):
            assert consumer.run_once(timeout_ms=1000)
        consumer.flush()
        # the snapshot Redis will go back to: every key with its value, as DUMP gives it
        snapshot = {key: faulted.dump(key) for key in faulted.scan_iter(count=1000)}
        offsets_then = faulted.hgetall("o:stream")
        for _ in range(6):
            assert consumer.run_once(timeout_ms=1000)
        consumer.flush()
        assert faulted.hgetall("o:stream") != offsets_then
        faulted.flushdb()
        for key, value in snapshot.items():
            faulted.restore(key, 0, value)
        stats = consumer.run(threading.Event(), drain=True, max_backoff_s=0.01)
        assert stats.retries >= 1  # the write after the restore found the offsets behind, and rewound

    with build_consumer(dataclasses.replace(settings, REDIS_URL=reference_url), group="reference") as consumer:
        consumer.run(threading.Event(), drain=True)

    expected = counters_of(reference)
    assert expected
    assert counters_of(faulted) == expected
    assert sum(int(v) for v in faulted.hgetall("o:stream").values()) == 4000
