"""The replay engine: backfill audience versions from the compacted ``users.last_seen`` topic.

Kappa style: no batch system. A replay re-reads the topic the stream keeps (the latest user
document of every user, key = user id, value = the JSON document the stream percolated) and runs
the *same* percolator and counters code as the live stream over it:

1. scan every partition from its log start to the end offsets observed when the scan began
   (``Log.scan_compacted``; a resumed partition is read with a consumer from its checkpoint);
2. keep the users whose ``last_seen`` lies in a replayed request's window (see below); the
   timestamp is read from the tail of the raw JSON (the stream writes ``last_seen`` last), so the
   users outside every window are skipped without decoding their document;
3. drop the kept documents that cannot match any replayed rule, on their raw bytes
   (:mod:`percolators.raw_prefilter`: a necessary condition such as "contains ``"teacher"``"),
   decode the survivors and percolate them against ONLY the replayed rule ids (``rule_ids=...``);
4. aggregate with :func:`rules_service.counters.aggregate.aggregate` (bucket = the user's
   ``last_seen``, so one match and the user's latest dimension values are added per user);
5. ``Counters.apply`` the batch with consumer ``replay:<scan id>`` and the scanned offsets as the
   checkpoint: exactly once, and a scan interrupted by a crash resumes from the stored offsets;
6. report progress and check for cancellation between batches.

Several requests share ONE scan (each has its own rule and window).

The window of a request
-----------------------
``since_ms`` (the request time minus its ``days``) <= last_seen < ``live_since_ms``. The upper
bound is where the live stream takes over: a new version is percolated by the stream from the
moment the workers load it (status ``backfilling`` is percolated live), so a user whose latest
visit is after the version's creation was already counted live, with that very visit, in that
very bucket. ``live_since_ms`` is the version's creation time plus a grace period
(:data:`LIVE_GRACE_MS`) covering the time the workers take to load a new rule and small clock
differences between exchanges and us: inside the grace both may count a user. That is harmless
for unique users (the same user id PFADDed twice into the same HyperLogLog is counted once) and
adds at most one extra match per such user. Users re-seen *during* the scan are in the same
situation: their new visit is counted live (and the compacted topic moves them past the scan's
end offsets).

What a replay can rebuild is described in the README ("Replays and versions").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from percolators.dsl import parse_rule
from percolators.errors import InvalidRuleError
from percolators.mapping import Mapping as DocMapping
from percolators.port import Percolator
from percolators.raw_prefilter import compile_prefilter
from rules_service.counters.aggregate import aggregate, aggregate_masks
from rules_service.counters.port import CounterBatch, Counters
from rules_service.domain import LAST_SEEN_TOPIC
from rules_service.normalize import format_timestamp_ms
from workers.log.port import Log, Record, TopicPartition

__all__ = [
    "LIVE_GRACE_MS",
    "ReplayCancelled",
    "ReplayRequest",
    "ReplayScan",
    "ScanPlan",
    "ScanProgress",
    "last_seen_bytes",
    "plan_scan",
]

#: Users last seen up to this long after a version's creation are replayed too (see module doc).
LIVE_GRACE_MS = 60_000
DAY_MS = 86_400_000
DEFAULT_BATCH_SIZE = 20_000
#: A raw prefilter passing more than this share of a sample is not used (its cost buys nothing).
PREFILTER_MAX_PASS_RATE = 0.6

_TAIL = b'"last_seen":"'  # the stream writes the user document with last_seen as its last field
_TAIL_LEN = len(_TAIL) + 24 + 2  # "last_seen":"2026-11-22T10:00:00.000Z"}


class ReplayCancelled(Exception):
    """Every request of the scan was cancelled."""


@dataclass(frozen=True)
class ReplayRequest:
    """One audience version to backfill: users last seen in [since_ms, live_since_ms)."""

    replay_id: str
    rule_id: str
    query: Mapping[str, Any]
    since_ms: int
    live_since_ms: int

    @property
    def since(self) -> bytes:
        return format_timestamp_ms(self.since_ms).encode()

    @property
    def until(self) -> bytes:
        return format_timestamp_ms(self.live_since_ms).encode()


@dataclass(frozen=True)
class ScanPlan:
    """Where a scan starts and stops, per partition of the topic (fixed when the scan begins, so a
    resumed scan stops at the same offsets)."""

    topic: str
    begins: dict[int, int]
    ends: dict[int, int]

    @property
    def total(self) -> int:
        """Offsets to cover (a compacted topic has gaps: records read <= offsets covered)."""
        return sum(max(0, self.ends[p] - self.begins[p]) for p in self.ends)

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "begins": {str(p): o for p, o in self.begins.items()},
                "ends": {str(p): o for p, o in self.ends.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ScanPlan:
        return cls(topic=str(raw["topic"]), begins={int(p): int(o) for p, o in raw["begins"].items()},
                   ends={int(p): int(o) for p, o in raw["ends"].items()})


def plan_scan(log: Log, topic: str = LAST_SEEN_TOPIC) -> ScanPlan:
    """The begin and end offsets of every partition of ``topic`` now."""
    parts = log.partitions(topic)
    consumer = log.consumer(None, auto_offset_reset="earliest")
    try:
        begins = consumer.beginning_offsets(parts)
        ends = consumer.end_offsets(parts)
    finally:
        consumer.close()
    return ScanPlan(topic, {tp.partition: begins[tp] for tp in parts}, {tp.partition: ends[tp] for tp in parts})


@dataclass
class ScanProgress:
    """Progress of one scan. ``scanned``/``total`` are offsets (exact after a resume, since the
    checkpoint is an offset); ``records`` are the records actually read in this run."""

    total: int
    scanned: int = 0
    records: int = 0
    in_window: int = 0  # records inside some window
    kept: int = 0  # of which passed the raw prefilter (decoded and percolated)
    matched: dict[str, int] = field(default_factory=dict)  # replay id -> users matched
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    scanned_at_start: int = 0

    @property
    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        """Offsets scanned per second in this run."""
        return (self.scanned - self.scanned_at_start) / self.elapsed_s

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if rate <= 0:
            return None
        return max(0.0, (self.total - self.scanned) / rate)

    def view(self, replay_id: str | None = None) -> dict[str, Any]:
        eta = self.eta_seconds
        return {
            "scanned": self.scanned,
            "total": self.total,
            "records": self.records,
            "matched": self.matched.get(replay_id, 0) if replay_id else sum(self.matched.values()),
            "rate": round(self.rate, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "elapsed_seconds": round(self.elapsed_s, 2),
        }


def last_seen_bytes(value: bytes) -> bytes | None:
    """The ``last_seen`` of a raw user document as canonical ``YYYY-MM-DDTHH:MM:SS.mmmZ`` bytes
    (ordered like the times), or None when it has none or it cannot be read.

    Fast path: the stream writes the document with ``last_seen`` as its last field, so it is the
    24 bytes before the closing ``"}``. Anything else is decoded and parsed."""
    if value[-_TAIL_LEN:-26] == _TAIL and value[-2:] == b'"}':
        return value[-26:-2]
    try:
        doc = orjson.loads(value)
        raw = doc.get("last_seen") if isinstance(doc, dict) else None
        if not isinstance(raw, str):
            return None
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return format_timestamp_ms(int(moment.timestamp() * 1000)).encode()
    except (orjson.JSONDecodeError, ValueError, OverflowError):
        return None


def _partition_batches(log: Log, topic: str, partition: int, start: int, begin: int, end: int,
                       batch_size: int) -> Iterator[list[Record]]:
    """Records of one partition in [start, end), in batches. From the log start the backend's
    fast ``scan_compacted`` is used; a resumed partition is read with a consumer from ``start``."""
    if start >= end:
        return
    if start <= begin:
        for batch in log.scan_compacted(topic, [partition], batch_size=batch_size):
            if batch and batch[-1].offset >= end:
                batch = [r for r in batch if r.offset < end]
                if batch:
                    yield batch
                return
            if batch:
                yield batch
        return
    tp = TopicPartition(topic, partition)
    consumer = log.consumer(None, auto_offset_reset="earliest")
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        quiet_until: float | None = None
        while consumer.position(tp) < end:
            batch = [r for r in consumer.poll(max_records=batch_size, timeout_ms=200) if r.offset < end]
            if batch:
                quiet_until = None
                yield batch
                continue
            # the tail may have been compacted away: stop after a quiet spell
            quiet_until = quiet_until or time.monotonic() + 5.0
            if time.monotonic() > quiet_until:
                return
    finally:
        consumer.close()


def _percolator_mapping(percolator: Percolator) -> DocMapping | None:
    """The document mapping the percolator validates rules against, when it exposes one (the raw
    prefilter needs the field types; without them every kept document is decoded)."""
    mapping = getattr(percolator, "mapping", None)
    if isinstance(mapping, DocMapping):
        return mapping
    if isinstance(mapping, dict) and "properties" in mapping:  # the Elasticsearch adapter keeps the JSON
        try:
            return DocMapping.from_json(mapping)
        except ValueError:
            return None
    return None


#: ``on_batch(progress)`` after each applied batch; may raise (a test's simulated crash).
BatchHook = Callable[[ScanProgress], None]
#: ``cancelled()`` -> the replay ids cancelled so far (checked between batches).
CancelCheck = Callable[[], set[str]]


class ReplayScan:
    """One shared scan of ``users.last_seen`` for several :class:`ReplayRequest`.

    ``resume_offsets`` are the checkpoint of an interrupted run (``Counters.stored_offsets`` of
    ``consumer``); partitions are read from there. ``percolator`` must hold every requested rule
    (see :meth:`load_rules`)."""

    def __init__(self, log: Log, percolator: Percolator, counters: Counters, requests: Sequence[ReplayRequest], *,
                 scan_id: str, plan: ScanPlan, dimensions: Sequence[str] = (),
                 batch_size: int = DEFAULT_BATCH_SIZE, resume_offsets: Mapping[tuple[str, int], int] | None = None,
                 on_batch: BatchHook | None = None, cancelled: CancelCheck | None = None,
                 now: datetime | None = None, mapping: DocMapping | None = None,
                 prefilter: bool = True) -> None:
        if not requests:
            raise ValueError("a scan needs at least one replay request")
        self.log = log
        self.percolator = percolator
        self.counters = counters
        self.requests = list(requests)
        self.scan_id = scan_id
        self.consumer = f"replay:{scan_id}"
        self.plan = plan
        self.dimensions = tuple(dimensions)
        self.batch_size = batch_size
        self.resume = {p: o for (t, p), o in (resume_offsets or {}).items() if t == plan.topic}
        self.on_batch = on_batch
        self.cancelled = cancelled
        self.now = now or datetime.now(UTC)
        self.use_prefilter = prefilter
        self._positions = {p: min(max(self.resume.get(p, b), b), plan.ends.get(p, b))
                           for p, b in plan.begins.items()}
        done = self._scanned()
        self.progress = ScanProgress(total=plan.total, scanned=done, scanned_at_start=done)
        self.progress.matched = {r.replay_id: 0 for r in self.requests}
        self.mapping = mapping if mapping is not None else _percolator_mapping(percolator)
        self._prefilters: dict[tuple[str, ...], Callable[[bytes], bool] | None] = {}
        self.prefilter_info: dict[str, Any] = {}

    def load_rules(self) -> None:
        """Store the requested rules in the percolator (an upsert: idempotent)."""
        from percolators.port import Rule

        self.percolator.upsert([Rule(id=r.rule_id, query=r.query) for r in self.requests])

    def _scanned(self) -> int:
        return sum(pos - self.plan.begins.get(p, 0) for p, pos in self._positions.items())

    def run(self) -> ScanProgress:
        """Scan to the end of the plan. Raises ReplayCancelled when every request is cancelled;
        the requests cancelled midway are dropped from the following batches."""
        active = list(self.requests)
        progress = self.progress
        for partition in sorted(self.plan.ends):
            begin, end = self.plan.begins.get(partition, 0), self.plan.ends[partition]
            start = self._positions.get(partition, begin)
            for records in _partition_batches(self.log, self.plan.topic, partition, start, begin, end,
                                              self.batch_size):
                if self.cancelled is not None:
                    gone = self.cancelled()
                    if gone:
                        active = [r for r in active if r.replay_id not in gone]
                        if not active:
                            raise ReplayCancelled(f"scan {self.scan_id}: every replay was cancelled")
                self._process(records, active, partition)
                self._positions[partition] = min(records[-1].offset + 1, end)
                progress.scanned = self._scanned()
                progress.batches += 1
                if self.on_batch is not None:
                    self.on_batch(progress)
            # a partition whose tail was compacted away still counts as fully scanned
            self._positions[partition] = end
            progress.scanned = self._scanned()
        return progress

    def _process(self, records: Sequence[Record], active: Sequence[ReplayRequest], partition: int) -> None:
        progress = self.progress
        progress.records += len(records)
        if len({r.key for r in records}) < len(records):
            # a lazily compacted backend (Kafka before its cleaner ran): the latest record of a key wins
            latest: dict[Any, Record] = {}
            for r in records:
                latest[r.key] = r
            records_iter: Sequence[Record] = sorted(latest.values(), key=lambda r: r.offset)
        else:
            records_iter = records
        docs: list[dict[str, Any]] = []
        stamps: list[bytes] = []
        if active:
            lo = min(r.since for r in active)
            hi = max(r.until for r in active)
            prefilter = self._prefilter(active, records_iter)
            tail, tail_len = _TAIL, _TAIL_LEN
            in_window = 0
            window: list[tuple[bytes, bytes]] = []
            for record in records_iter:
                value = record.value
                if value is None:
                    continue  # tombstone: the user was deleted
                if value[-tail_len:-26] == tail and value[-2:] == b'"}':  # last_seen_bytes' fast path, inlined
                    stamp = value[-26:-2]
                else:
                    maybe = last_seen_bytes(value)
                    if maybe is None:
                        continue
                    stamp = maybe
                if stamp < lo or stamp >= hi:
                    continue
                in_window += 1
                if prefilter is not None and not prefilter(value):
                    continue  # cannot match any replayed rule: never decoded
                window.append((value, stamp))
            progress.in_window += in_window
            loads = orjson.loads
            for value, stamp in window:
                try:
                    doc = loads(value)
                except orjson.JSONDecodeError:
                    continue  # the stream only writes valid JSON; never let one record stop a replay
                if type(doc) is not dict or type(doc.get("user_id")) is not str:
                    continue
                seen = doc.get("last_seen")
                if type(seen) is not str or seen[-1:] != "Z":
                    doc["last_seen"] = stamp.decode()  # the canonical form the aggregation reads
                docs.append(doc)
                stamps.append(stamp)
        batch = CounterBatch()
        if docs:
            progress.kept += len(docs)
            percolate_masks = getattr(self.percolator, "percolate_masks", None)
            if callable(percolate_masks):
                # the embedded engine: per-rule document masks, aggregated per rule (no per-document
                # lists), as the live stream does
                rule_ids, masks = self._percolate_masks(percolate_masks, docs, stamps, active)
                if rule_ids:
                    aggregate_masks(docs, rule_ids, masks, self.dimensions, batch=batch, count_matches=True)
            else:
                matched = self._percolate(docs, stamps, active)
                # only matched users reach the aggregation (it reads every document's dimensions)
                hits = [i for i, m in enumerate(matched) if m]
                if hits:
                    aggregate([docs[i] for i in hits], [matched[i] for i in hits], self.dimensions, batch=batch,
                              count_matches=True)
        key = (self.plan.topic, partition)
        self.counters.apply(batch, self.consumer, {key: records[-1].offset + 1}, {key: records[0].offset})

    def _prefilter(self, active: Sequence[ReplayRequest], records: Sequence[Record]) -> Callable[[bytes], bool] | None:
        """The raw prefilter of the active rules (compiled once per set of rules, its clauses
        ordered by selectivity on this first batch), or None: disabled, unknown mapping, a rule
        without a condition, or one letting most documents through (then it only costs time)."""
        if not self.use_prefilter or self.mapping is None:
            return None
        key = tuple(sorted(r.rule_id for r in active))
        if key in self._prefilters:
            return self._prefilters[key]
        sample = [r.value for r in records[:: max(1, len(records) // 2000)] if r.value is not None]
        compiled: Callable[[bytes], bool] | None
        try:
            parsed = [parse_rule(r.rule_id, r.query, self.mapping) for r in active]
        except InvalidRuleError:
            compiled = None
        else:
            compiled = compile_prefilter(parsed, self.mapping, sample=sample)
            with_condition = sum(compile_prefilter([p], self.mapping) is not None for p in parsed)
            self.prefilter_info = {"rules": len(parsed), "with_condition": with_condition}
        if compiled is not None and sample:
            rate = sum(1 for v in sample if compiled(v)) / len(sample)
            self.prefilter_info["sample_pass_rate"] = round(rate, 4)
            if rate > PREFILTER_MAX_PASS_RATE:
                compiled = None
        self.prefilter_info["active"] = compiled is not None
        self._prefilters[key] = compiled
        return compiled

    def _percolate_masks(self, percolate_masks: Callable[..., Any], docs: list[dict[str, Any]],
                         stamps: list[bytes], active: Sequence[ReplayRequest]) -> tuple[list[str], list[int]]:
        """Rule ids and document masks of the replayed rules, each mask limited to the documents in
        its request's window (requests may ask for different lookbacks), counting matches."""
        result = percolate_masks(docs, rule_ids=[r.rule_id for r in active], now=self.now)
        windows = {r.rule_id: (r.since, r.until) for r in active}
        by_rule = {r.rule_id: r.replay_id for r in active}
        window_masks: dict[tuple[bytes, bytes], int] = {}
        counts = self.progress.matched
        rule_ids: list[str] = []
        masks: list[int] = []
        for rid, mask in zip(result.rule_ids, result.masks, strict=True):
            window = windows.get(rid)
            if window is None:
                continue
            in_window = window_masks.get(window)
            if in_window is None:
                since, until = window
                in_window = _bits([since <= stamp < until for stamp in stamps])
                window_masks[window] = in_window
            mask &= in_window
            if mask:
                rule_ids.append(rid)
                masks.append(mask)
                replay_id = by_rule.get(rid)
                if replay_id is not None:
                    counts[replay_id] = counts.get(replay_id, 0) + mask.bit_count()
        return rule_ids, masks

    def _percolate(self, docs: list[dict[str, Any]], stamps: list[bytes],
                   active: Sequence[ReplayRequest]) -> list[list[str]]:
        ids = [r.rule_id for r in active]
        results = self.percolator.percolate(docs, rule_ids=ids, now=self.now, on_error="skip")
        windows = {r.rule_id: (r.since, r.until) for r in active}
        same_window = len(set(windows.values())) == 1
        by_rule = {r.rule_id: r.replay_id for r in active}
        matched: list[list[str]] = []
        counts = self.progress.matched
        for stamp, result in zip(stamps, results, strict=True):
            if isinstance(result, Exception) or not result:
                matched.append([])
                continue
            if not same_window:
                result = [rid for rid in result if windows[rid][0] <= stamp < windows[rid][1]]
            for rid in result:
                replay_id = by_rule.get(rid)
                if replay_id is not None:
                    counts[replay_id] = counts.get(replay_id, 0) + 1
            matched.append(result)
        return matched


def _bits(flags: Sequence[bool]) -> int:
    """An int whose bit ``i`` is ``flags[i]`` (numpy packs them: no per-bit Python loop)."""
    import numpy as np

    packed = np.packbits(np.asarray(flags, dtype=bool), bitorder="little")
    return int.from_bytes(packed.tobytes(), "little")

