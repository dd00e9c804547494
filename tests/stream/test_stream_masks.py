"""The stream's per-rule mask path (embedded percolator) counts exactly like the per-document path."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from functools import partial
from typing import Any

from percolators.embedded import EmbeddedPercolator
from percolators.workload import generate_rules
from rules_service.config import Settings
from rules_service.counters.aggregate import aggregate
from rules_service.domain import LAST_SEEN_TOPIC, RULES_TOPIC, RuleChange
from rules_service.schema import USER_MAPPING
from tests.stream.fakes import FakeCounters, FakeLog
from workers.bidgen import BidGenerator
from workers.log.port import Message
from workers.rules_sync import RulesSync
from workers.stream import StreamConsumer, default_normaliser
from workers.topics import ensure_topics

SETTINGS = Settings(BIDS_PARTITIONS=2)
DIMS = SETTINGS.DIMENSIONS


def normalise_with_faults(raw: bytes, log_ms: int, now_ms: int) -> dict[str, Any]:
    """The real normaliser; every 7th user gets a document the percolator rejects."""
    doc = default_normaliser()(raw, log_ms, now_ms)
    if hash(doc["user_id"]) % 7 == 0:
        doc["age"] = "not a number"
    return doc


def run(masks: bool) -> tuple[FakeCounters, list[Any], list[Any], dict[str, Any]]:
    log = FakeLog()
    ensure_topics(log, SETTINGS)
    changes = []
    for rule in generate_rules(60, seed=3):
        audience, version = rule["id"].rsplit("@v", 1)
        rc = RuleChange(audience_id=audience, advertiser_id="adv", version=int(version), query=rule["query"])
        changes.append(Message(value=rc.to_json(), key=rc.rule_id.encode()))
    log.producer().send_batch(RULES_TOPIC, changes)
    gen = BidGenerator(seed=5, users=300, days=0.2, end=datetime(2026, 11, 22, 12, tzinfo=UTC))
    log.producer().send_batch("bids", [Message(value=v, key=k) for k, v in gen.messages(1500)])
    percolator = EmbeddedPercolator(dict(USER_MAPPING))
    rules = RulesSync(log, percolator, interval_s=0)
    rules.load()
    counters = FakeCounters()
    extra: dict[str, Any] = {} if masks else {"aggregate": partial(aggregate, dimensions=DIMS)}
    consumer = StreamConsumer(log, percolator, counters, rules=rules, normalise=normalise_with_faults,
                              dimensions=DIMS, batch_size=400, **extra)
    assert (consumer._percolate_masks is not None) == masks
    with consumer:
        stats = consumer.run(threading.Event(), drain=True)
    summary = stats.summary()
    figures = {k: summary[k] for k in ("processed", "matched", "matched_bids", "dlq", "dlq_reasons")}
    return counters, log.values(LAST_SEEN_TOPIC), log.values("bids.dlq"), figures


def test_mask_path_equals_list_path() -> None:
    by_masks, last_seen_m, dlq_m, figures_m = run(masks=True)
    by_lists, last_seen_l, dlq_l, figures_l = run(masks=False)
    assert figures_m == figures_l
    assert figures_m["matched"] > 300 and figures_m["dlq_reasons"].get("invalid_document:age", 0) > 0
    assert by_masks.users == by_lists.users
    assert by_masks.match_counts == by_lists.match_counts
    assert by_masks.dims == by_lists.dims
    assert by_masks.offsets == by_lists.offsets
    assert last_seen_m == last_seen_l
    for letter in dlq_m + dlq_l:  # the fake log stamps records with the wall clock
        del letter["source"]["timestamp_ms"]
    assert dlq_m == dlq_l


class FailingCounters(FakeCounters):
    """Fails the apply calls whose numbers (1-based) are in ``failures``."""

    def __init__(self, failures: set[int]) -> None:
        super().__init__()
        self.failures = failures
        self.calls = 0

    def apply(self, batch: Any, consumer: str, offsets: Any, start_offsets: Any = None) -> bool:
        self.calls += 1
        if self.calls in self.failures:
            raise ConnectionError("redis went away")
        return super().apply(batch, consumer, offsets, start_offsets)


def test_overlapped_writes_count_like_synchronous_ones_even_when_a_write_fails() -> None:
    def drain(overlap: bool, failures: set[int]) -> tuple[FakeCounters, dict[str, Any]]:
        log = FakeLog()
        ensure_topics(log, SETTINGS)
        rc = RuleChange(audience_id="all", advertiser_id="adv", version=1, query={"match_all": {}})
        log.producer().send_batch(RULES_TOPIC, [Message(value=rc.to_json(), key=rc.rule_id.encode())])
        gen = BidGenerator(seed=9, users=100, days=0.1, end=datetime(2026, 11, 22, 12, tzinfo=UTC))
        log.producer().send_batch("bids", [Message(value=v, key=k) for k, v in gen.messages(500)])
        percolator = EmbeddedPercolator(dict(USER_MAPPING))
        rules = RulesSync(log, percolator, interval_s=0)
        rules.load()
        counters = FailingCounters(failures)
        consumer = StreamConsumer(log, percolator, counters, rules=rules, dimensions=DIMS, batch_size=60,
                                  overlap_apply=overlap)
        with consumer:
            stats = consumer.run(threading.Event(), drain=True, max_backoff_s=0.01)
        assert counters.offsets["stream"] == {(tp.topic, tp.partition): len(log.data[tp])
                                              for tp in log.partitions("bids")}
        return counters, {k: stats.summary()[k] for k in ("matched", "matched_bids", "dlq")}

    sync, sync_figures = drain(False, set())
    for failures in (set(), {1}, {3, 4}, {9}):
        overlapped, figures = drain(True, failures)
        assert overlapped.match_counts == sync.match_counts and overlapped.users == sync.users
        assert overlapped.dims == sync.dims
        if not failures:
            assert figures == sync_figures
