"""``Counters.prepare``: a writer builds its per-rule key bulks of the current hour and day before
its first write, and writes exactly the same bytes as one that did not."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules_service.counters.aggregate import aggregate
from rules_service.counters.port import CounterBatch
from rules_service.counters.redis_store import RedisCounters
from tests.counters.test_aggregate_masks import DIMS, random_case

NOW = 1_795_345_200.0  # 2026-11-22T11:00:00Z


def counters() -> RedisCounters:
    return RedisCounters(None, clock=lambda: NOW)  # type: ignore[arg-type]  # encoding needs no server


def todays_batch() -> CounterBatch:
    documents, lists = random_case(21, 300, 40, 1)
    for document in documents:
        document["last_seen"] = "2026-11-22T11:30:00.000Z"
    return aggregate(documents, lists, DIMS)


def test_prepare_builds_five_entries_per_rule_once() -> None:
    writer = counters()
    rules = [f"aud-{k}@v1" for k in range(40)]
    assert writer.prepare(rules) == 5 * 40  # hour and day sketches, hour and day counts, dimensions
    assert writer.prepare(rules) == 0
    assert writer.prepare(rules, at=NOW + 3600) == 2 * 40  # the next hour: same day, same month


def test_a_prepared_writer_writes_the_same_bytes() -> None:
    batch = todays_batch()
    rules = sorted({key[0] for key in batch.users} | {key[0] for key in batch.dimensions})
    prepared = counters()
    assert prepared.prepare(rules) > 0
    offsets = {("bids", 0): 300}
    assert prepared.encode_batch(batch, offsets, {("bids", 0): 0}) == counters().encode_batch(
        batch, offsets, {("bids", 0): 0})


class _Recording(RedisCounters):
    prepared: list[set[str]] = []

    def prepare(self, rule_ids, at=None):  # type: ignore[no-untyped-def]
        type(self).prepared.append(set(rule_ids))
        return super().prepare(rule_ids, at)


@pytest.mark.redis
def test_the_stream_prepares_its_counters_with_the_loaded_rules(tmp_path: Path, redis_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from rules_service.config import Settings
    from rules_service.counters import factory
    from tests.stream.seeding import log_with_rules
    from workers.stream_runner import build_consumer

    settings = Settings(DATA_DIR=tmp_path, REDIS_URL=redis_url)
    log, _ = log_with_rules(settings, {"women": {"term": {"gender": "female"}}, "all": {"match_all": {}}})
    log.close()
    monkeypatch.setattr(factory, "RedisCounters", _Recording)
    with build_consumer(settings):
        pass
    assert _Recording.prepared == [{"women@v1", "all@v1"}]
