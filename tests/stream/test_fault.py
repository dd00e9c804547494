"""kill -9 the worker at random moments while it streams, restart it, repeat until drained: the
final counters equal those of an uninterrupted run, exactly (matches, breakdowns, offsets; the
HyperLogLogs have identical counts because PFADD of the same set is deterministic and idempotent).

The faulted worker is ``python manage.py worker --drain`` in a subprocess on the embedded log
(shared ``RULES_DATA_DIR``) and a real redis-server; the reference run drains an identical copy of
the log into another Redis database."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from rules_service.config import Settings
from tests.stream.seeding import log_with_rules
from workers.bidgen import BidGenerator
from workers.log.port import Message

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
BIDS = 60_000  # long enough that the (fast) stream cannot drain before the kills below land
SEED = 20261122

RULES: dict[str, dict[str, Any]] = {
    "women": {"term": {"gender": "female"}},
    "ios": {"term": {"device.os": "iOS"}},
    "manchester_30s": {"bool": {"filter": [{"term": {"geo.city": "Manchester"}},
                                           {"range": {"age": {"gte": 30, "lt": 40}}}]}},
    "everyone": {"match_all": {}},
}


def with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def populate(settings: Settings) -> None:
    log, producer = log_with_rules(settings, RULES)
    generator = BidGenerator(seed=SEED, users=3000, days=2, end=END, invalid_rate=0.01)
    batch: list[Message] = []
    for key, value in generator.messages(BIDS):
        batch.append(Message(value=value, key=key))
        if len(batch) == 2000:
            producer.send_batch("bids", batch)
            batch = []
    if batch:
        producer.send_batch("bids", batch)
    log.close()


def snapshot(url: str) -> dict[str, Any]:
    """Every counter and offset in a Redis database, HLLs as their counts."""
    client = redis.Redis.from_url(url)
    out: dict[str, Any] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"hash":
            out[key.decode()] = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        elif kind == b"string" and key.startswith(b"o:"):  # an offset's fence (see counters.keys)
            out[key.decode()] = ("offset", client.get(key))
        elif kind == b"string":
            out[key.decode()] = ("hll", client.pfcount(key))
        else:
            out[key.decode()] = (kind.decode(), None)
    client.close()
    return out


def stored_progress(url: str) -> int:
    """Records the counters have applied (the offsets stored with them, summed over partitions)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(int(v) for v in client.hgetall("o:stream").values())
    finally:
        client.close()


def worker_env(data_dir: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULES_") or k.startswith("RULES_TEST_")}
    env.update({"RULES_DATA_DIR": str(data_dir), "RULES_REDIS_URL": url, "RULES_BIDS_PARTITIONS": "2",
                "RULES_BATCH_SIZE": "100", "PYTHONPATH": str(ROOT),
                # short flush windows: a kill lands between, inside and after many merged writes
                "RULES_STREAM_FLUSH_MS": "50",
                # besides the external kills: die in the narrow windows between producing, applying
                # the counters and committing, which random external kills rarely hit
                "RULES_TEST_SELF_KILL": "after_produce=0.02,after_apply=0.06"})
    return env


def test_kill_9_at_random_moments_equals_an_uninterrupted_run(tmp_path: Path, redis_url: str) -> None:
    from workers.stream_runner import drain

    reference_url, faulted_url = with_db(redis_url, 1), with_db(redis_url, 0)
    redis.Redis.from_url(reference_url).flushdb()
    reference = Settings(DATA_DIR=tmp_path / "reference", REDIS_URL=reference_url, BIDS_PARTITIONS=2, BATCH_SIZE=100)
    faulted = Settings(DATA_DIR=tmp_path / "faulted", REDIS_URL=faulted_url, BIDS_PARTITIONS=2, BATCH_SIZE=100)
    populate(reference)
    populate(faulted)

    summary = drain(reference)
    assert summary["processed"] == BIDS and summary["matched"] > BIDS  # "everyone" alone matches every valid bid

    rng = random.Random(SEED)
    env = worker_env(faulted.DATA_DIR, faulted_url)
    startup_kills = mid_stream_kills = self_kills = 0
    stderr_path = tmp_path / "worker.stderr"
    for _attempt in range(200):
        before = stored_progress(faulted_url)
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "worker", "--drain"], cwd=ROOT,
                                    env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        if mid_stream_kills < 6:
            if rng.random() < 0.25:  # during start-up (rules loading, seeking)
                deadline = time.monotonic() + rng.uniform(0.05, 0.8)
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:  # mid-stream: once this run has applied a batch, at a random moment in the next ~0.1 s
                # (a 100-bid batch takes ~10-20 ms, so this still spans many batches and their stages;
                # a wider window let a fast worker drain the stream before enough kills landed)
                while proc.poll() is None and stored_progress(faulted_url) == before:
                    time.sleep(0.01)
                deadline = time.monotonic() + rng.uniform(0.0, 0.08)
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            if proc.poll() == -signal.SIGKILL:
                self_kills += 1
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if stored_progress(faulted_url) == before:
                    startup_kills += 1
                else:
                    mid_stream_kills += 1
                continue
        proc.wait(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            self_kills += 1
            continue
        assert proc.returncode == 0, stderr_path.read_text()[-3000:]
        break
    else:
        pytest.fail("the worker never finished draining")
    print(f"kills: {startup_kills} during start-up, {mid_stream_kills} mid-stream, {self_kills} self-inflicted")
    assert mid_stream_kills >= 3, f"only {mid_stream_kills} kills hit a worker mid-stream"
    assert self_kills >= 2, f"only {self_kills} self-kills between produce/apply/commit"
    assert stored_progress(faulted_url) == BIDS

    expected, actual = snapshot(reference_url), snapshot(faulted_url)
    assert any(k.startswith("c:") for k in expected)
    assert actual == expected
