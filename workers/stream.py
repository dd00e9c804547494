"""The stream consumer: bids in, audience counters out, exactly once.

One :class:`StreamConsumer` owns a set of partitions of the ``bids`` topic (static assignment: the
log port has no group rebalancing, so processes split partitions explicitly, see
:func:`split_partitions`). For each batch it:

1. parses and normalises every record into a user document (``rules_service.normalize``); a bad
   record goes to ``bids.dlq`` with the reason, its original bytes and where it came from;
2. percolates the batch (``on_error="skip"``: a document the percolator rejects is a dead letter
   too);
3. aggregates the counter updates in memory (``rules_service.counters.aggregate``: from per-rule
   document masks with ``aggregate_masks`` when the percolator offers ``percolate_masks``, the
   embedded engine; from per-document match lists otherwise, e.g. Elasticsearch);
4. produces each good bid's user document to the compacted ``users.last_seen`` topic (key user id)
   and the dead letters to ``bids.dlq``: *before* the counters, so a crash can lose neither; a
   re-read after a crash produces them again, which is harmless (compaction keeps the latest per
   user, dead letters carry their source offset);
5. applies the counters *and* the consumed offsets in one atomic Redis step
   (:meth:`Counters.apply`): the offsets stored there are the source of truth, so a batch is
   never counted twice and never lost;
6. commits the offsets to the log (only informational once Redis has them).

Flush window (``flush_interval_ms``): steps 1-4 run for every polled batch, but steps 5-6 may
cover several of them: their counter updates are merged in memory and written in ONE atomic apply
(counts and the offsets of all of them together, so exactly-once holds as for one batch) once the
window is ``flush_interval_ms`` old (wall clock, from its first batch) or holds
``max_window_records`` records, when a poll finds nothing new, and before stopping. Why: a rule's
counter keys are written once per window instead of once per batch, and the per-key work (hash
fields, deadlines, script calls) dominates Redis's CPU; the interval bounds the added latency.
Inside an open window a poll that finds fewer than ``min_batch`` records waits for more (until the
window is due): a batch has a fixed cost, and waiting within the window adds no latency.
A batch that fails discards the whole window (its counts were merged in); the caller rewinds to
the stored offsets and reads it again (``abandon``).

On start each partition is positioned at the offset stored with the counters, else the log's
committed offset, else the beginning. If the counter store goes back in time while the consumer
runs (restored from an older snapshot, a failover to a lagging replica), the next write finds the
stored offsets behind what it stored (``CountersRolledBackError``): the consumer drops its window
and rewinds to the stored offsets, so the records in between are counted again, once.

Dead letters are counted per reason in the same atomic step, as a day-bucketed breakdown of the
pseudo rule id :data:`DLQ_COUNTER_ID` (dimension ``category``, see :func:`dead_letter_category`),
so they too are counted exactly once: ``counters.breakdown(DLQ_COUNTER_ID, start, end, ["category"])``.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from percolators.port import Percolator
from rules_service.counters.aggregate import merge_batches
from rules_service.counters.port import CounterBatch, Counters
from rules_service.counters.seen import DEFAULT_MAX_RECORDS as DEFAULT_SEEN_RECORDS
from rules_service.counters.seen import new_seen_users
from rules_service.domain import LAST_SEEN_TOPIC, dlq_topic
from workers.log.port import Consumer, Log, Message, Producer, Record, TopicPartition

logger = logging.getLogger(__name__)


def _transient_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from percolators.errors import PercolatorUnavailableError
    from rules_service.counters.port import CountersRolledBackError
    from workers.log.port import LogUnavailableError

    return (RedisConnectionError, RedisTimeoutError, PercolatorUnavailableError, LogUnavailableError,
            ConnectionError, TimeoutError, CountersRolledBackError)


#: Errors after which a batch is retried (a backend is down for a while; the counter store went
#: back to older offsets, e.g. restored from a snapshot: the rewind reads from there), not fatal.
TRANSIENT_ERRORS = _transient_errors()

#: Pseudo rule id under which dead letters are counted (day buckets, dimension ``category``).
DLQ_COUNTER_ID = "_dlq"
DLQ_DIMENSION = "category"
DEFAULT_GROUP = "stream"

#: ``normalise(raw_value, log_timestamp_ms, now_ms) -> user document``; raises an exception with
#: ``reason`` (a sentence) and ``field`` attributes for a bad message (``BadBidError``).
Normaliser = Callable[[bytes, int, int], dict[str, Any]]
#: ``aggregate(documents, matches) -> CounterBatch``.
Aggregator = Callable[[Sequence[Mapping[str, Any]], Sequence[Sequence[str]]], CounterBatch]


class MaskAggregator(Protocol):
    """``aggregate_masks(documents, rule_ids, masks, batch=None, seen=None) -> CounterBatch`` (bit
    ``i`` of ``masks[k]``: ``documents[i]`` matched ``rule_ids[k]``; documents in no mask are
    ignored). Given a ``batch``, the updates are added to it and it is returned (an open flush
    window's batch); given ``seen`` (``rules_service.counters.seen``), users it records as already
    in a sketch are left out."""

    def __call__(self, documents: Sequence[Mapping[str, Any]], rule_ids: Sequence[str], masks: Sequence[int],
                 batch: CounterBatch | None = None, seen: Any = None) -> CounterBatch: ...


class RuleSource(Protocol):
    """What the consumer needs from rule synchronisation (``workers.rules_sync.RulesSync``)."""

    def poll(self) -> int: ...


def default_normaliser() -> Normaliser:
    from rules_service.normalize import normalise_message

    return normalise_message


def default_aggregator(dimensions: Sequence[str]) -> Aggregator:
    from rules_service.counters.aggregate import aggregate

    def run(documents: Sequence[Mapping[str, Any]], matches: Sequence[Sequence[str]]) -> CounterBatch:
        return aggregate(documents, matches, dimensions=dimensions)

    return run


def default_mask_aggregator(dimensions: Sequence[str]) -> MaskAggregator:
    from rules_service.counters.aggregate import aggregate_masks

    def run(documents: Sequence[Mapping[str, Any]], rule_ids: Sequence[str], masks: Sequence[int],
            batch: CounterBatch | None = None, seen: Any = None) -> CounterBatch:
        return aggregate_masks(documents, rule_ids, masks, dimensions=dimensions, batch=batch, seen=seen)

    return run


def split_partitions(partitions: Sequence[int], workers: int) -> list[list[int]]:
    """Deal partitions out to ``workers`` processes (round-robin), dropping empty shares."""
    shares = [list(partitions[i::workers]) for i in range(max(1, workers))]
    return [share for share in shares if share]


class LatencyHistogram:
    """Record-weighted latencies in 1 ms buckets up to 10 minutes (beyond that: the last bucket)."""

    LIMIT_MS = 600_000

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, latency_ms: int, count: int = 1) -> None:
        bucket = min(max(0, latency_ms), self.LIMIT_MS)
        self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += count

    def merge(self, other: LatencyHistogram) -> None:
        for bucket, count in other.counts.items():
            self.add(bucket, count)

    def percentile(self, q: float) -> int | None:
        if not self.total:
            return None
        rank = q / 100.0 * self.total
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return bucket
        return max(self.counts)


@dataclass
class StreamStats:
    """Running figures of one consumer (also what ``worker --drain`` prints)."""

    processed: int = 0  # records consumed (good and bad)
    matched: int = 0  # (bid, rule) matches counted
    matched_bids: int = 0  # bids that matched at least one rule
    dlq: int = 0
    batches: int = 0  # polled batches
    writes: int = 0  # atomic counter writes (one per flush window, see StreamConsumer)
    skipped_batches: int = 0  # batches the counters had already applied (a re-read after a crash)
    retries: int = 0  # batches retried after a backend was unavailable
    lag: int = 0
    last_batch_seconds: float = 0.0
    busy_seconds: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    cpu_started_at: float = field(default_factory=time.process_time)  # this process's CPU seconds
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    # wall-clock seconds per step of a batch (normalise, percolate, aggregate, produce, apply, commit)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # this process's CPU seconds per step (on a shared machine wall clock mostly measures waiting)
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)
    # bid entering the log (record timestamp) -> its counters readable (apply returned)
    end_to_end_ms: LatencyHistogram = field(default_factory=LatencyHistogram)
    batch_ms: LatencyHistogram = field(default_factory=LatencyHistogram)

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "processed": self.processed,
            "matched": self.matched,
            "matched_bids": self.matched_bids,
            "dlq": self.dlq,
            "dlq_reasons": dict(sorted(self.dlq_reasons.items())),
            "batches": self.batches,
            "writes": self.writes,
            "skipped_batches": self.skipped_batches,
            "retries": self.retries,
            "lag": self.lag,
            "elapsed_s": round(elapsed, 3),
            "bids_per_s": round(self.processed / elapsed, 1),
            "cpu_us_per_bid": round((time.process_time() - self.cpu_started_at) / max(1, self.processed) * 1e6, 1),
            "batch_ms_p50": self.batch_ms.percentile(50),
            "batch_ms_p99": self.batch_ms.percentile(99),
            "e2e_ms_p50": self.end_to_end_ms.percentile(50),
            "e2e_ms_p99": self.end_to_end_ms.percentile(99),
            "stage_us_per_bid": {stage: round(seconds / max(1, self.processed) * 1e6, 1)
                                 for stage, seconds in self.stage_seconds.items()},
            "stage_cpu_us_per_bid": {stage: round(seconds / max(1, self.processed) * 1e6, 1)
                                     for stage, seconds in self.stage_cpu_seconds.items()},
        }


@dataclass
class _PendingBatch:
    """A batch between its counters being aggregated and being written (see ``overlap_apply``)."""

    batch: CounterBatch
    start_offsets: dict[tuple[str, int], int]
    next_offsets: dict[tuple[str, int], int]
    size: int
    timestamps: list[int]
    matched_pairs: int
    matched_bids: int
    dead: list[str]
    busy: float  # seconds of this batch before its write
    batches: int = 1  # polled batches in this write
    applied: bool = False
    readable_ms: int = 0
    apply_seconds: float = 0.0
    apply_cpu_seconds: float = 0.0  # encoding the batch, mostly

    def merge(self, later: _PendingBatch) -> None:
        """Add the batch polled after this one (a flush window): one apply covers both."""
        if later.batch is not self.batch:  # not aggregated into this one already
            merge_batches(self.batch, later.batch)
        for key, offset in later.start_offsets.items():
            self.start_offsets.setdefault(key, offset)
        self.next_offsets.update(later.next_offsets)
        self.size += later.size
        self.batches += later.batches
        self.timestamps += later.timestamps
        self.matched_pairs += later.matched_pairs
        self.matched_bids += later.matched_bids
        self.dead += later.dead
        self.busy += later.busy


@dataclass
class DeadLetter:
    record: Record
    category: str  # counted by this, see dead_letter_category
    reason: str  # the sentence naming the fault
    field: str | None

    def to_message(self) -> Message:
        body: dict[str, Any] = {
            "category": self.category,
            "reason": self.reason,
            "field": self.field,
            "source": {
                "topic": self.record.topic,
                "partition": self.record.partition,
                "offset": self.record.offset,
                "timestamp_ms": self.record.timestamp_ms,
                "key": self.record.key.decode("utf-8", "replace") if self.record.key is not None else None,
            },
        }
        value = self.record.value
        if value is None:
            body["value"] = None
        else:
            try:
                body["value"] = value.decode("utf-8")
            except UnicodeDecodeError:
                body["value_base64"] = base64.b64encode(value).decode("ascii")
        return Message(value=orjson.dumps(body), key=self.record.key, timestamp_ms=self.record.timestamp_ms)


def dead_letter_category(exc: BaseException) -> tuple[str, str, str | None]:
    """(category, reason sentence, field) of a rejected message.

    The *category* is what dead letters are counted by, so it must take few values: the reason
    sentences of ``BadBidError`` carry the offending values, the category only the kind of fault
    and the field path (array indices dropped): ``not_json``, ``not_an_object``, ``no_user_id``,
    ``invalid:user.yob``, ``invalid_document:geo.location`` (rejected by the percolator)."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str) or not reason:
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    field_name = getattr(exc, "field", None)
    field_name = field_name if isinstance(field_name, str) and field_name else None
    if field_name is not None:
        field_name_key = _INDEX.sub("[]", field_name)
        if not hasattr(exc, "reason"):  # the percolator's InvalidDocumentError
            return f"invalid_document:{field_name_key}", reason, field_name
        if reason.startswith("no user id"):
            return "no_user_id", reason, field_name
        return f"invalid:{field_name_key}", reason, field_name
    if reason.startswith("not JSON"):
        return "not_json", reason, None
    if reason.startswith("a BidRequest must be a JSON object"):
        return "not_an_object", reason, None
    return "invalid", reason, None


_INDEX = re.compile(r"\[\d+\]")

#: The steps of a batch timed in StreamStats, in order (then "merge" and "apply" per window).
_STAGES = ("normalise", "percolate", "aggregate", "produce")


class StreamConsumer:
    """Consumes ``bids`` partitions into the counters. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        log: Log,
        percolator: Percolator,
        counters: Counters,
        *,
        topic: str = "bids",
        group: str = DEFAULT_GROUP,
        partitions: Iterable[int] | None = None,
        batch_size: int = 2000,
        rules: RuleSource | None = None,
        normalise: Normaliser | None = None,
        aggregate: Aggregator | None = None,
        aggregate_masks: MaskAggregator | None = None,
        dimensions: Sequence[str] = (),
        poll_timeout_ms: int = 100,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        fault_hook: Callable[[str], None] | None = None,
        overlap_apply: bool = False,
        flush_interval_ms: int = 0,
        max_window_records: int = 20_000,
        min_batch: int | None = None,
        seen_records: int = DEFAULT_SEEN_RECORDS,
    ) -> None:
        self.log = log
        self.percolator = percolator
        self.counters = counters
        self.topic = topic
        self.group = group
        self.batch_size = batch_size
        self.rules = rules
        self.normalise = normalise or default_normaliser()
        self.aggregate = aggregate or default_aggregator(dimensions)
        # Per-rule masks when the percolator offers them (the embedded engine) and the aggregation
        # is not a custom per-document one: no per-document match lists are built at all.
        percolate_masks = getattr(percolator, "percolate_masks", None)
        self._percolate_masks = percolate_masks if callable(percolate_masks) and (
            aggregate is None or aggregate_masks is not None) else None
        self.aggregate_masks = aggregate_masks or default_mask_aggregator(dimensions)
        # the users already added to the sketches of their current hour and day, so a user's next
        # bids do not send them again: most of Redis's work and of the write's bytes used to be
        # those repeats (rules_service.counters.seen). Only the mask path (aggregate_masks) uses it.
        self.seen = (new_seen_users(seen_records) if seen_records > 0 and self._percolate_masks is not None
                     else None)
        self.poll_timeout_ms = poll_timeout_ms
        self.clock_ms = clock_ms
        # Called at "after_produce" and "after_apply": the fault test kills the process there.
        self.fault_hook = fault_hook
        self.stats = StreamStats()
        # overlap_apply: write a batch's counters (a Redis round trip, mostly waiting) in a thread
        # while the next batch is read, normalised and percolated; flush() waits for it.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="counters") if overlap_apply else None
        self._inflight: tuple[_PendingBatch, Future[None]] | None = None
        # flush window (module docstring): 0 applies every polled batch on its own
        self.flush_interval_s = max(0, flush_interval_ms) / 1000.0
        self.max_window_records = max(1, max_window_records)
        # inside an open window, polls gather at least this many records (see _poll)
        self.min_batch = max(1, min(batch_size, batch_size // 2 if min_batch is None else min_batch))
        #: Recent wall time of steps 1-4 per record (a moving average): how long a gathered batch
        #: will take, so gathering stops in time (see _poll).
        self._seconds_per_record = 0.0
        self._window: _PendingBatch | None = None
        self._window_began = 0.0
        self._wanted = None if partitions is None else sorted(set(partitions))
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self.assigned: list[TopicPartition] = []

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Assign the partitions and seek each to where the counters say it was left."""
        every = self.log.partitions(self.topic)
        if self._wanted is None:
            self.assigned = every
        else:
            known = {tp.partition for tp in every}
            missing = [p for p in self._wanted if p not in known]
            if missing:
                raise ValueError(f"topic {self.topic!r} has no partition(s) {missing} (it has {len(every)})")
            self.assigned = [TopicPartition(self.topic, p) for p in self._wanted]
        consumer = self.log.consumer(self.group, auto_offset_reset="earliest")
        consumer.assign(self.assigned)
        self._consumer = consumer
        self.rewind()
        self._producer = self.log.producer()
        logger.info("stream consumer %s on %s: starting at %s", self.group,
                    [tp.partition for tp in self.assigned],
                    {tp.partition: consumer.position(tp) for tp in self.assigned})

    def rewind(self) -> None:
        """Seek every assigned partition to the offset stored with the counters, else the log's
        committed offset, else the beginning (after a failed batch: its records are read again)."""
        assert self._consumer is not None, "start() first"
        consumer = self._consumer
        stored = self.counters.stored_offsets(self.group)
        for tp in self.assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                offset = consumer.committed(tp)
            if offset is None:
                consumer.seek_to_beginning([tp])
            else:
                consumer.seek(tp, offset)

    def close(self) -> None:
        if self._consumer is not None:
            self.abandon()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> StreamConsumer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------

    def end_offsets(self) -> dict[TopicPartition, int]:
        assert self._consumer is not None, "start() first"
        return self._consumer.end_offsets(self.assigned)

    def positions(self) -> dict[TopicPartition, int]:
        assert self._consumer is not None, "start() first"
        return {tp: self._consumer.position(tp) for tp in self.assigned}

    def run_once(self, timeout_ms: int | None = None) -> int:
        """Poll and process one batch; return the number of records processed (0: nothing there)."""
        assert self._consumer is not None, "start() first"
        if self.rules is not None:
            self.rules.poll()
        wait_ms = self.poll_timeout_ms if timeout_ms is None else timeout_ms
        if self._window is not None:
            wait_ms = min(wait_ms, self.window_wait_ms())
        records = self._poll(wait_ms)
        if not records:
            return 0
        self.process(records)
        return len(records)

    def _poll(self, wait_ms: int) -> list[Record]:
        """One batch: what the log has, up to ``batch_size``; but inside an open flush window that
        is not due, keep polling until ``min_batch`` records or until processing them would take the
        window past its due time (at the recent processing time per record). Why: a batch has
        a fixed cost (every rule's program runs once per batch, one log transaction, per-rule
        aggregation: ~1 ms at 10,000 rules), and at 10,000 bids/s a poll finds a few hundred
        records; the window's counters are written when it closes anyway, so waiting for more
        within it adds no latency."""
        assert self._consumer is not None, "start() first"
        records = self._consumer.poll(self.batch_size, wait_ms)
        if not records or self._window is None or len(records) >= self.min_batch:
            return records
        records = list(records)
        due = self._window_began + self.flush_interval_s
        while len(records) < self.min_batch:
            # stop early enough to process what was gathered before the window is due: gathering
            # up to the due time itself made each window close one batch's processing late (at
            # 20,000 bids/s: windows of ~340 ms instead of 200, and p50 ~500 ms instead of ~400)
            left = due - time.perf_counter() - self._seconds_per_record * len(records)
            if left <= 0:
                break
            records += self._consumer.poll(self.batch_size - len(records), min(int(left * 1000), 10))
            time.sleep(min(max(0.0, due - time.perf_counter()), 0.005))  # a trickle gathers between polls
        return records

    def process(self, records: Sequence[Record]) -> None:
        """Steps 1-6 of the module docstring for one polled batch."""
        assert self._consumer is not None and self._producer is not None, "start() first"
        began = time.perf_counter()
        cpu = time.process_time
        cpu_began = cpu()
        now_ms = self.clock_ms()
        start_offsets: dict[tuple[str, int], int] = {}
        next_offsets: dict[tuple[str, int], int] = {}
        documents: list[dict[str, Any]] = []
        sources: list[Record] = []
        dead: list[DeadLetter] = []
        normalise = self.normalise
        for record in records:
            key = (record.topic, record.partition)
            if key not in start_offsets:
                start_offsets[key] = record.offset
            next_offsets[key] = record.offset + 1
            if record.value is None:
                dead.append(DeadLetter(record, "empty_message", "the message has no value", None))
                continue
            try:
                documents.append(normalise(record.value, record.timestamp_ms, now_ms))
            except Exception as exc:  # any bad message is a dead letter: the stream goes on
                dead.append(DeadLetter(record, *dead_letter_category(exc)))
                continue
            sources.append(record)

        clock = time.perf_counter
        t_normalised, c_normalised = clock(), cpu()
        kept: list[dict[str, Any]] = []
        kept_records: list[Record] = []
        matched_pairs = matched_bids = 0
        if documents and self._percolate_masks is not None:
            found = self._percolate_masks(documents)
            if found.errors:
                for slot in sorted(found.errors):
                    dead.append(DeadLetter(sources[slot], *dead_letter_category(found.errors[slot])))
                kept = [d for i, d in enumerate(documents) if i not in found.errors]
                kept_records = [r for i, r in enumerate(sources) if i not in found.errors]
            else:
                kept, kept_records = documents, sources
            t_percolated, c_percolated = clock(), cpu()
            union = 0
            for mask in found.masks:
                union |= mask
                matched_pairs += mask.bit_count()
            matched_bids = union.bit_count()
            window = self._window
            if union:
                # straight into the open window's batch, if any (no merge: measured ~10 us per bid);
                # if anything below fails, the whole window is dropped and read again (abandon)
                batch = self.aggregate_masks(documents, found.rule_ids, found.masks,
                                             batch=None if window is None else window.batch, seen=self.seen)
            else:
                batch = CounterBatch()
        else:
            matches: list[list[str]] = []
            if documents:
                results = self.percolator.percolate(documents, on_error="skip")
                for document, record, result in zip(documents, sources, results, strict=True):
                    if isinstance(result, Exception):
                        dead.append(DeadLetter(record, *dead_letter_category(result)))
                    else:
                        kept.append(document)
                        kept_records.append(record)
                        matches.append(result)
            t_percolated, c_percolated = clock(), cpu()
            matched_pairs = sum(len(m) for m in matches)
            matched_bids = sum(1 for m in matches if m)
            batch = self.aggregate(kept, matches) if kept else CounterBatch()
        if dead:
            self._count_dead_letters(batch, dead)

        t_aggregated, c_aggregated = clock(), cpu()
        # Produce before applying counters: a crash from here on re-reads and re-produces.
        if kept:
            dumps = orjson.dumps
            self._producer.send_rows(LAST_SEEN_TOPIC, [  # (key, value, timestamp): no Message per bid
                (str(document["user_id"]).encode(), dumps(document), record.timestamp_ms)
                for document, record in zip(kept, kept_records, strict=True)
            ])
        if dead:
            self._producer.send_batch(dlq_topic(self.topic), [letter.to_message() for letter in dead])

        if self.fault_hook is not None:
            self.fault_hook("after_produce")
        t_produced, c_produced = clock(), cpu()
        stages = self.stats.stage_seconds
        cpu_stages = self.stats.stage_cpu_seconds
        for totals, marks in ((stages, (began, t_normalised, t_percolated, t_aggregated, t_produced)),
                              (cpu_stages, (cpu_began, c_normalised, c_percolated, c_aggregated, c_produced))):
            for stage, start, end in zip(_STAGES, marks[:-1], marks[1:], strict=True):  # from the mark before
                totals[stage] = totals.get(stage, 0.0) + (end - start)
        if len(records) >= 100:  # small batches are mostly their fixed cost: they would skew it
            per_record = (t_produced - began) / len(records)
            self._seconds_per_record = per_record if not self._seconds_per_record else (
                0.8 * self._seconds_per_record + 0.2 * per_record)
        pending = _PendingBatch(
            batch=batch, start_offsets=start_offsets, next_offsets=next_offsets, size=len(records),
            timestamps=[record.timestamp_ms for record in records], matched_pairs=matched_pairs,
            matched_bids=matched_bids, dead=[letter.category for letter in dead], busy=t_produced - began)
        window = self._window
        if window is None:
            self._window, self._window_began = pending, began
        else:
            t_merge, c_merge = clock(), cpu()
            window.merge(pending)
            stages["merge"] = stages.get("merge", 0.0) + (clock() - t_merge)
            cpu_stages["merge"] = cpu_stages.get("merge", 0.0) + (cpu() - c_merge)
        if self._window_due():
            self._close_window()

    def _window_due(self) -> bool:
        window = self._window
        return window is not None and (
            self.flush_interval_s <= 0 or window.size >= self.max_window_records
            or time.perf_counter() - self._window_began >= self.flush_interval_s)

    def window_wait_ms(self) -> int:
        """Milliseconds until the open window is due (0: none open or due now): the longest a poll
        may wait without delaying the window's write."""
        if self._window is None:
            return 0
        left = self._window_began + self.flush_interval_s - time.perf_counter()
        return max(0, int(left * 1000))

    def _close_window(self) -> None:
        """Write the open window's counters and offsets (steps 5-6)."""
        pending, self._window = self._window, None
        if pending is None:
            return
        if self._executor is None:
            self._apply(pending)
            self._finish(pending)
            return
        # Overlap: this window's round trip runs while the next batch is read and percolated. The
        # previous one is finished first, so windows reach Redis in order, one at a time.
        self._wait_inflight()
        self._inflight = (pending, self._executor.submit(self._apply, pending))

    def _apply(self, pending: _PendingBatch) -> None:
        began, cpu_began = time.perf_counter(), time.thread_time()  # this thread: also with overlap_apply
        pending.applied = self.counters.apply(pending.batch, self.group, pending.next_offsets, pending.start_offsets)
        pending.readable_ms = self.clock_ms()
        pending.apply_seconds = time.perf_counter() - began
        pending.apply_cpu_seconds = time.thread_time() - cpu_began

    def flush(self) -> None:
        """Write everything processed so far: the open window, and wait for the one being written
        (``overlap_apply``); their errors are raised here."""
        self._close_window()
        self._wait_inflight()

    def _wait_inflight(self) -> None:
        """Wait for the window whose counters are being written (``overlap_apply``) and finish it."""
        if self._inflight is None:
            return
        pending, future = self._inflight
        self._inflight = None
        began = time.perf_counter()
        try:
            future.result()
        finally:
            waited = time.perf_counter() - began
            stages = self.stats.stage_seconds
            stages["apply_wait"] = stages.get("apply_wait", 0.0) + waited
            self.stats.busy_seconds += waited
        self._finish(pending)

    def _finish(self, pending: _PendingBatch) -> None:
        """After the counters were written: the fault hook, the log commit and the statistics."""
        assert self._consumer is not None, "start() first"
        if self.fault_hook is not None:
            self.fault_hook("after_apply")
        began = time.perf_counter()
        self._consumer.commit({TopicPartition(t, p): o for (t, p), o in pending.next_offsets.items()})
        stats = self.stats
        stats.batches += pending.batches
        stats.writes += 1
        stats.processed += pending.size
        if not pending.applied:
            stats.skipped_batches += pending.batches
            logger.warning("batch %s was already applied (a re-read after a crash): skipped", pending.start_offsets)
        else:
            stats.matched += pending.matched_pairs
            stats.matched_bids += pending.matched_bids
            stats.dlq += len(pending.dead)
            for category in pending.dead:
                stats.dlq_reasons[category] = stats.dlq_reasons.get(category, 0) + 1
        histogram, readable_ms = stats.end_to_end_ms, pending.readable_ms
        # one add per distinct latency (ms), not per record: Counter counts them in C
        for latency_ms, count in Counter(map(readable_ms.__sub__, pending.timestamps)).items():
            histogram.add(latency_ms, count)
        stages = stats.stage_seconds
        commit = time.perf_counter() - began
        stages["apply"] = stages.get("apply", 0.0) + pending.apply_seconds
        cpu_stages = stats.stage_cpu_seconds
        cpu_stages["apply"] = cpu_stages.get("apply", 0.0) + pending.apply_cpu_seconds
        stages["commit"] = stages.get("commit", 0.0) + commit
        elapsed = pending.busy + pending.apply_seconds + commit
        stats.last_batch_seconds = elapsed
        stats.busy_seconds += pending.busy + commit + (0.0 if self._executor is not None else pending.apply_seconds)
        stats.batch_ms.add(int(elapsed * 1000))

    def abandon(self) -> None:
        """After a failed batch: drop the open window (the failed batch may have added to it; the
        caller rewinds to the stored offsets, so its records are read again), wait for the write in
        flight and finish it if it went through, forget it otherwise. The users recorded as in the
        sketches are forgotten too: the dropped window's were not written, and after a rollback
        the sketches may have lost earlier ones."""
        self._window = None
        if self.seen is not None:
            self.seen.clear()
        try:
            self._wait_inflight()
        except Exception as exc:  # reported by the caller's retry
            logger.warning("stream %s: the batch being written failed too (%s)", self.group, exc)

    def _count_dead_letters(self, batch: CounterBatch, dead: Sequence[DeadLetter]) -> None:
        for letter in dead:
            day = letter.record.timestamp_ms // 86_400_000 * 86_400
            values = batch.dimensions.setdefault((DLQ_COUNTER_ID, day, DLQ_DIMENSION), {})
            values[letter.category] = values.get(letter.category, 0) + 1

    def update_lag(self) -> int:
        assert self._consumer is not None, "start() first"
        ends = self._consumer.end_offsets(self.assigned)
        self.stats.lag = sum(max(0, ends[tp] - self._consumer.position(tp)) for tp in self.assigned)
        return self.stats.lag

    def run(self, stop: threading.Event, *, drain: bool = False, report_every_s: float = 30.0,
            max_backoff_s: float = 10.0) -> StreamStats:
        """Process batches until ``stop`` is set, or (``drain``) until every partition reaches the
        end offset observed when this call began.

        A batch that fails because a backend is unavailable (Redis, the log, the percolator) is
        retried with exponential backoff: the consumer rewinds to the stored offsets, so the
        batch is read again and counted once. Any other error propagates (the process restarts)."""
        assert self._consumer is not None, "start() first"
        targets = self.end_offsets() if drain else None
        last_report = time.monotonic()
        backoff = 0.0
        while not stop.is_set():
            try:
                if backoff:  # the failed batch's records must be read again before anything else
                    self.rewind()
                if targets is not None:
                    positions = self.positions()
                    if all(positions[tp] >= end for tp, end in targets.items()):
                        self.flush()
                        break
                if not self.run_once():
                    self.flush()  # idle: nothing to overlap the write with
                backoff = 0.0
            except TRANSIENT_ERRORS as exc:
                self.abandon()
                backoff = min(max_backoff_s, backoff * 2 or 0.5)
                self.stats.retries += 1
                logger.error("stream %s: batch failed (%s: %s); retrying in %.1f s", self.group,
                             type(exc).__name__, exc, backoff)
                stop.wait(backoff)
                continue
            if time.monotonic() - last_report >= report_every_s:
                last_report = time.monotonic()
                self.update_lag()
                logger.info("stream %s: %s", self.group, self.stats.summary())
        self.flush()
        self.update_lag()
        return self.stats

