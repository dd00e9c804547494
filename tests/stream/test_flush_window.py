"""The flush window: several polled batches written in one atomic apply count exactly like one
apply per batch, also when a batch or a write fails in the middle of a window."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from percolators.embedded import EmbeddedPercolator
from percolators.errors import PercolatorUnavailableError
from percolators.workload import generate_rules
from rules_service.config import Settings
from rules_service.counters.aggregate import merge_batches
from rules_service.counters.port import CounterBatch
from rules_service.domain import RULES_TOPIC, RuleChange
from rules_service.schema import USER_MAPPING
from tests.stream.fakes import FakeCounters, FakeLog
from workers.bidgen import BidGenerator
from workers.log.port import Message
from workers.rules_sync import RulesSync
from workers.stream import StreamConsumer
from workers.topics import ensure_topics

SETTINGS = Settings(BIDS_PARTITIONS=2)
DIMS = SETTINGS.DIMENSIONS


class CountingCounters(FakeCounters):
    """Counts apply calls; fails those whose numbers (1-based) are in ``failures``."""

    def __init__(self, failures: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.failures = set(failures)
        self.calls = 0
        self.records_per_apply: list[int] = []

    def apply(self, batch: Any, consumer: str, offsets: Mapping[tuple[str, int], int],
              start_offsets: Mapping[tuple[str, int], int] | None = None) -> bool:
        self.calls += 1
        if self.calls in self.failures:
            raise ConnectionError("redis went away")
        if start_offsets:
            self.records_per_apply.append(sum(offsets[k] - start_offsets[k] for k in start_offsets))
        return super().apply(batch, consumer, offsets, start_offsets)


class FlakyPercolator(EmbeddedPercolator):
    """Unavailable on the ``percolate_masks`` calls whose numbers are in ``failures``."""

    def __init__(self, failures: set[int]) -> None:
        super().__init__(dict(USER_MAPPING))
        self.failures = failures
        self.calls = 0

    def percolate_masks(self, documents: Sequence[Mapping[str, Any]], **kw: Any) -> Any:
        self.calls += 1
        if self.calls in self.failures:
            raise PercolatorUnavailableError("percolator went away")
        return super().percolate_masks(documents, **kw)


def drain(*, interval_ms: int, max_records: int = 20_000, apply_failures: set[int] = frozenset(),  # type: ignore[assignment]
          percolate_failures: set[int] = frozenset(), overlap: bool = False  # type: ignore[assignment]
          ) -> tuple[CountingCounters, dict[str, Any]]:
    log = FakeLog()
    ensure_topics(log, SETTINGS)
    changes = []
    for rule in generate_rules(40, seed=4):
        audience, version = rule["id"].rsplit("@v", 1)
        rc = RuleChange(audience_id=audience, advertiser_id="adv", version=int(version), query=rule["query"])
        changes.append(Message(value=rc.to_json(), key=rc.rule_id.encode()))
    for audience, query in (("all", {"match_all": {}}), ("women", {"term": {"gender": "female"}})):
        rc = RuleChange(audience_id=audience, advertiser_id="adv", version=1, query=query)
        changes.append(Message(value=rc.to_json(), key=rc.rule_id.encode()))
    log.producer().send_batch(RULES_TOPIC, changes)
    gen = BidGenerator(seed=8, users=200, days=0.3, end=datetime(2026, 11, 22, 12, tzinfo=UTC))
    log.producer().send_batch("bids", [Message(value=v, key=k) for k, v in gen.messages(900)])
    percolator = FlakyPercolator(set(percolate_failures))
    rules = RulesSync(log, percolator, interval_s=0)
    rules.load()
    counters = CountingCounters(set(apply_failures))
    consumer = StreamConsumer(log, percolator, counters, rules=rules, dimensions=DIMS, batch_size=50,
                              flush_interval_ms=interval_ms, max_window_records=max_records,
                              overlap_apply=overlap)
    with consumer:
        stats = consumer.run(threading.Event(), drain=True, max_backoff_s=0.01)
    assert counters.offsets["stream"] == {(tp.topic, tp.partition): len(log.data[tp])
                                          for tp in log.partitions("bids")}
    return counters, {k: stats.summary()[k] for k in ("processed", "matched", "matched_bids", "dlq")}


def same_counts(a: FakeCounters, b: FakeCounters) -> None:
    assert a.match_counts == b.match_counts
    assert a.users == b.users
    assert a.dims == b.dims


def test_a_window_bounded_by_records_is_one_apply_and_counts_the_same() -> None:
    per_batch, figures = drain(interval_ms=0)
    windowed, windowed_figures = drain(interval_ms=3_600_000, max_records=200)
    same_counts(windowed, per_batch)
    assert windowed_figures == figures and figures["matched"] > 1000
    assert per_batch.calls == 900 // 50
    assert windowed.calls < per_batch.calls
    assert all(n >= 200 for n in windowed.records_per_apply[:-1])  # the last one: closed by the drain's end
    assert sum(windowed.records_per_apply) == 900


@pytest.mark.parametrize(("apply_failures", "percolate_failures", "overlap"), [
    ({1}, set(), False), ({2, 3}, set(), True), (set(), {3}, False), (set(), {2, 7}, True), ({2}, {5}, False),
])
def test_a_failure_in_a_window_loses_and_doubles_nothing(apply_failures: set[int], percolate_failures: set[int],
                                                         overlap: bool) -> None:
    per_batch, _ = drain(interval_ms=0)
    windowed, _ = drain(interval_ms=3_600_000, max_records=220, apply_failures=apply_failures,
                        percolate_failures=percolate_failures, overlap=overlap)
    same_counts(windowed, per_batch)


def match_all_consumer(seed: int, **options: Any) -> tuple[FakeLog, CountingCounters, StreamConsumer, list[Message]]:
    """A consumer of one match-all audience on a fresh log, and 40 bids to send it."""
    log = FakeLog()
    ensure_topics(log, SETTINGS)
    rc = RuleChange(audience_id="all", advertiser_id="adv", version=1, query={"match_all": {}})
    log.producer().send_batch(RULES_TOPIC, [Message(value=rc.to_json(), key=rc.rule_id.encode())])
    gen = BidGenerator(seed=seed, users=50, days=0.01, end=datetime(2026, 11, 22, 12, tzinfo=UTC))
    messages = [Message(value=v, key=k) for k, v in gen.messages(40)]
    percolator = EmbeddedPercolator(dict(USER_MAPPING))
    rules = RulesSync(log, percolator, interval_s=0)
    rules.load()
    counters = CountingCounters()
    consumer = StreamConsumer(log, percolator, counters, rules=rules, dimensions=DIMS, **options)
    return log, counters, consumer, messages


def test_a_window_is_written_once_its_interval_has_passed() -> None:
    log, counters, consumer, messages = match_all_consumer(2, batch_size=10, flush_interval_ms=300)
    with consumer:
        log.producer().send_batch("bids", messages[:10])
        assert consumer.run_once() == 10
        assert counters.calls == 0  # the window is open
        assert 0 < consumer.window_wait_ms() <= 300
        log.producer().send_batch("bids", messages[10:20])
        assert consumer.run_once() == 10
        assert counters.calls == 0
        began = time.monotonic()
        assert consumer.run_once(timeout_ms=5_000) == 0  # the poll waits no longer than the window
        assert time.monotonic() - began < 1.0
        time.sleep(0.3)
        log.producer().send_batch("bids", messages[20:30])
        assert consumer.run_once() == 10  # the window is due: written with this batch
        assert counters.calls == 1 and counters.records_per_apply == [30]
        log.producer().send_batch("bids", messages[30:])
        assert consumer.run_once() == 10
        consumer.flush()  # idle, or stopping: the open window is written
        assert counters.calls == 2 and counters.records_per_apply == [30, 10]
    assert sum(counters.match_counts.values()) == 2 * 40  # hour and day buckets


def test_merge_batches_adds_up() -> None:
    a = CounterBatch(users={("r", "hour", 0): {"u1"}}, matches={("r", "hour", 0): 1},
                     dimensions={("r", 0, "gender"): {"male": 1}})
    b = CounterBatch(users={("r", "hour", 0): {"u2"}, ("s", "day", 0): {"u3"}},
                     matches={("r", "hour", 0): 2, ("s", "day", 0): 1},
                     dimensions={("r", 0, "gender"): {"male": 2, "female": 1}, ("s", 0, "os"): {"iOS": 1}})
    assert merge_batches(a, b) is a
    assert a == CounterBatch(users={("r", "hour", 0): {"u1", "u2"}, ("s", "day", 0): {"u3"}},
                             matches={("r", "hour", 0): 3, ("s", "day", 0): 1},
                             dimensions={("r", 0, "gender"): {"male": 3, "female": 1}, ("s", 0, "os"): {"iOS": 1}})


def test_inside_an_open_window_a_poll_gathers_a_bigger_batch_until_the_window_is_due() -> None:
    """Every batch has a fixed cost (each rule's program runs once per batch): inside an open window,
    whose counters wait for its end anyway, a poll that finds a few records waits for more."""
    log, counters, consumer, messages = match_all_consumer(3, batch_size=20, min_batch=10, flush_interval_ms=600)
    send = log.producer().send_batch
    with consumer:
        send("bids", messages[:3])
        assert consumer.run_once() == 3  # no window open yet: processed at once (it opens one)
        send("bids", messages[3:6])
        later = [threading.Timer(0.05, send, ("bids", messages[6:9])),
                 threading.Timer(0.10, send, ("bids", messages[9:13]))]
        for timer in later:
            timer.start()
        began = time.monotonic()
        assert consumer.run_once() == 10  # 3 there, then 3 and 4 more: gathered into one batch
        assert 0.09 <= time.monotonic() - began < 0.5
        assert counters.calls == 0
        send("bids", messages[13:15])
        assert consumer.run_once() == 2  # not enough before the window is due: what there is
        assert counters.calls == 1 and counters.records_per_apply == [15]  # and the window was written
        send("bids", messages[15:40])
        assert consumer.run_once() == 20  # a full batch never waits
        consumer.flush()
    for timer in later:
        timer.join()
    assert counters.records_per_apply == [15, 20]
