"""The stream with and without SeenUsers (RULES_STREAM_SEEN_RECORDS) on a real Redis: the same
counters, key for key, while the users a worker already added this hour are not sent again."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from rules_service.config import Settings
from tests.stream.seeding import log_with_rules
from tests.stream.test_rollback import RULES, counters_of, with_db
from workers.bidgen import BidGenerator
from workers.log.port import Message

pytestmark = pytest.mark.redis

# bids over 3 hours, so users move on to later hours
END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)


def drain(tmp_path: Path, url: str, seen_records: int) -> int:
    """Stream the same bids into the database of ``url``; the bytes Redis received."""
    from workers.stream_runner import build_consumer

    client = redis.Redis.from_url(url)
    client.flushdb()
    settings = Settings(DATA_DIR=tmp_path / str(seen_records), REDIS_URL=url, BIDS_PARTITIONS=2, BATCH_SIZE=300,
                        STREAM_FLUSH_MS=0, STREAM_SEEN_RECORDS=seen_records)
    log, producer = log_with_rules(settings, RULES)
    generator = BidGenerator(seed=11, users=400, days=3 / 24, end=END)
    producer.send_batch("bids", [Message(value=v, key=k) for k, v in generator.messages(6000)])
    log.close()
    before = client.info("stats")["total_net_input_bytes"]
    with build_consumer(settings) as consumer:
        assert consumer.run_once(timeout_ms=1000)
        if seen_records:
            assert consumer.seen is not None
        else:
            assert consumer.seen is None
        stats = consumer.run(threading.Event(), drain=True)
        assert stats.processed + 300 >= 6000
        if seen_records:
            assert consumer.seen.records > 0
    return int(client.info("stats")["total_net_input_bytes"] - before)


def test_the_counters_are_the_same_and_fewer_users_are_sent(tmp_path: Path, redis_url: str) -> None:
    plain_url, seen_url = with_db(redis_url, 7), with_db(redis_url, 8)
    sent_plain = drain(tmp_path, plain_url, 0)
    sent_seen = drain(tmp_path, seen_url, 1_000_000)
    plain, seen = counters_of(redis.Redis.from_url(plain_url)), counters_of(redis.Redis.from_url(seen_url))
    assert plain and seen == plain  # every hash field and every sketch's count
    assert sum(isinstance(value, int) for value in plain.values()) >= 3 * len(RULES)  # sketches of 2+ hours, a day
    # (the bytes are mostly matched counts and dimensions here: 3 rules, a write per batch of 300)
    assert sent_seen < 0.85 * sent_plain, (sent_seen, sent_plain)
