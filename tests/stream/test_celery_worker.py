"""``manage.py worker`` runs a real Celery worker whose bootstep streams ``bids`` into the
counters; rule changes reach it without a restart; SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from rules_service.config import Settings
from rules_service.domain import RULES_TOPIC, RuleChange
from workers.bidgen import BidGenerator
from workers.log.port import Message

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes],
             log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} while waiting for {what}:\n"
                        f"{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log_path.read_text()[-3000:]}")


def test_celery_worker_streams_picks_up_rule_changes_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    from rules_service.counters.factory import create_counters
    from workers.log.factory import create_log
    from workers.topics import ensure_topics

    settings = Settings(DATA_DIR=tmp_path, REDIS_URL=redis_url, BIDS_PARTITIONS=2, BATCH_SIZE=200)
    log = create_log(settings)
    ensure_topics(log, settings)
    producer = log.producer()
    rule = RuleChange(audience_id="everyone", advertiser_id="adv", version=1, query={"match_all": {}})
    producer.send_batch(RULES_TOPIC, [Message(value=rule.to_json(), key=rule.rule_id.encode())])
    end = datetime.now(UTC)
    generator = BidGenerator(seed=5, users=200, days=0.5, end=end)
    first = list(generator.messages(1000))
    producer.send_batch("bids", [Message(value=v, key=k) for k, v in first])

    env = {k: v for k, v in os.environ.items() if not k.startswith("RULES_") or k.startswith("RULES_TEST_")}
    env.update({"RULES_DATA_DIR": str(tmp_path), "RULES_REDIS_URL": redis_url, "RULES_BIDS_PARTITIONS": "2",
                "RULES_BATCH_SIZE": "200", "PYTHONPATH": str(ROOT)})
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "worker", "--concurrency", "2"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    counters = create_counters(settings)
    client = redis.Redis.from_url(redis_url)
    window = (end - timedelta(days=1), end + timedelta(hours=1))
    try:
        def offsets_total() -> int:
            return sum(int(v) for v in client.hgetall("o:stream").values())

        wait_for(lambda: offsets_total() == 1000, 90, "the first 1000 bids", proc, log_path)
        assert counters.matches("everyone@v1", *window) == 1000

        # A new audience reaches the running worker without a restart.
        women = RuleChange(audience_id="women", advertiser_id="adv", version=1,
                           query={"term": {"gender": "female"}})
        producer.send_batch(RULES_TOPIC, [Message(value=women.to_json(), key=women.rule_id.encode())])
        time.sleep(1.5)
        second = list(generator.messages(500, start_index=1000))
        producer.send_batch("bids", [Message(value=v, key=k) for k, v in second])
        wait_for(lambda: offsets_total() == 1500, 60, "the next 500 bids", proc, log_path)
        expected_women = sum(1 for k, v in second if b'"gender":"F"' in v)
        assert expected_women > 0
        assert counters.matches("women@v1", *window) == expected_women
        assert counters.matches("everyone@v1", *window) == 1500
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        client.close()
        log.close()
    assert code == 0, log_path.read_text()[-3000:]
