"""The replay engine: backfill audience versions from the compacted ``users.last_seen`` topic.

Kappa style: no batch system. A replay re-reads the topic the stream keeps (the latest user
document of every user, key = user id, value = the JSON document the stream percolated) and runs
the *same* percolator and counters code as the live stream over it:

1. scan every partition from its log start (a resumed partition: from its checkpoint) to the end
   offsets observed when the scan began, reading the latest record of every user as of those
   offsets only (``Log.scan_compacted``: superseded records are never seen, compacted or not, so
   the result does not depend on the cleaner nor on the batch size; a deleted user is skipped);
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

Several requests share ONE scan (each has its own rule and window). A big scan is split by
partition over worker processes, one per core (``workers``; see "one scan over several processes"
below): each runs steps 1-6 on its partitions and checkpoints them, the parent merges progress.

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

import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from percolators.dsl import parse_rule
from percolators.errors import InvalidRuleError
from percolators.mapping import Mapping as DocMapping
from percolators.port import Percolator
from percolators.raw_prefilter import compile_prefilter
from rules_service.config import Settings
from rules_service.counters.aggregate import aggregate, aggregate_masks
from rules_service.counters.port import CounterBatch, Counters
from rules_service.domain import LAST_SEEN_TOPIC
from rules_service.normalize import format_timestamp_ms
from workers.log.port import Log, Record

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
#: Records per batch, and so per checkpoint. A replay's counter writes touch every (rule, day) bucket
#: of its window whatever the batch size, so bigger batches amortise them: 50,000 took ~10% less CPU
#: than 20,000 for 100 audiences over 90 days, at ~360 MB per scanning process.
DEFAULT_BATCH_SIZE = 50_000
#: A raw prefilter passing more than this share of a sample is not used (its cost buys nothing).
PREFILTER_MAX_PASS_RATE = 0.6
#: Scans with fewer offsets left than this run in one process (starting workers costs ~1 s).
PARALLEL_MIN_OFFSETS = 200_000

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
    """The latest record of every key of one partition as of the plan's ``end``, from ``start``
    (the log start, or a resumed partition's checkpoint) on, in batches (``Log.scan_compacted``:
    a key appears once whether or not the cleaner has run, and a resumed scan makes the same
    choices as the run it resumes, since both judge "latest" against the same end)."""
    if start >= end:
        return
    yield from log.scan_compacted(topic, [partition], batch_size=batch_size, start_offsets={partition: start},
                                  end_offsets={partition: end})


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
    (see :meth:`load_rules`). ``worker_settings`` (with ``workers`` > 1) must describe the same
    log and counters as ``log`` and ``counters``: worker processes build theirs from it."""

    def __init__(self, log: Log, percolator: Percolator, counters: Counters, requests: Sequence[ReplayRequest], *,
                 scan_id: str, plan: ScanPlan, dimensions: Sequence[str] = (),
                 batch_size: int = DEFAULT_BATCH_SIZE, resume_offsets: Mapping[tuple[str, int], int] | None = None,
                 on_batch: BatchHook | None = None, cancelled: CancelCheck | None = None,
                 now: datetime | None = None, mapping: DocMapping | None = None,
                 prefilter: bool = True, workers: int = 1, worker_settings: Settings | None = None,
                 parallel_min_offsets: int = PARALLEL_MIN_OFFSETS) -> None:
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
        self.workers = workers
        self.worker_settings = worker_settings
        self.parallel_min_offsets = parallel_min_offsets
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
        the requests cancelled midway are dropped from the following batches.

        With ``workers`` > 1 and ``worker_settings``, a scan of at least ``parallel_min_offsets``
        offsets left is split by partition over that many worker processes (see
        :func:`_run_parallel`); otherwise it runs here."""
        groups = self._worker_groups()
        if len(groups) > 1:
            return _run_parallel(self, groups)
        return self._run_here()

    def _worker_groups(self) -> list[list[int]]:
        """The partitions left to scan, split into balanced groups (one per worker process), or
        ``[]`` when the scan runs in this process."""
        if self.workers <= 1 or self.worker_settings is None:
            return []
        left = {p: self.plan.ends[p] - self._positions.get(p, self.plan.begins.get(p, 0)) for p in self.plan.ends}
        left = {p: n for p, n in left.items() if n > 0}
        if len(left) < 2 or sum(left.values()) < self.parallel_min_offsets:
            return []
        groups: list[list[int]] = [[] for _ in range(min(self.workers, len(left)))]
        loads = [0] * len(groups)
        for p in sorted(left, key=lambda q: (-left[q], q)):  # largest first onto the least loaded
            k = loads.index(min(loads))
            groups[k].append(p)
            loads[k] += left[p]
        return [sorted(g) for g in groups]

    def _run_here(self) -> ScanProgress:
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
                with _gc_paused():
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
        records_iter = records  # one record per user: scan_compacted yields each key's latest only
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
                    matched_docs, masks = _matched_only(docs, masks)
                    aggregate_masks(matched_docs, rule_ids, masks, self.dimensions, batch=batch, count_matches=True)
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
            # the pass rate does not depend on the clauses' order: measure it first, and spend the
            # ordering work (selectivity of every clause on the sample) only on a useful prefilter
            compiled = compile_prefilter(parsed, self.mapping)
            with_condition = sum(compile_prefilter([p], self.mapping) is not None for p in parsed)
            self.prefilter_info = {"rules": len(parsed), "with_condition": with_condition}
        if compiled is not None and sample:
            rate = sum(1 for v in sample if compiled(v)) / len(sample)
            self.prefilter_info["sample_pass_rate"] = round(rate, 4)
            if rate > PREFILTER_MAX_PASS_RATE:
                compiled = None
            else:
                compiled = compile_prefilter(parsed, self.mapping, sample=sample)
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


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a batch is processed (as ``percolate_masks`` does):
    a batch allocates ~10 containers per user, all freed by reference counting when it is done,
    and the collections they would trigger cost ~15% of a scan's CPU. Back on between batches."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _matched_only(docs: list[dict[str, Any]], masks: list[int]) -> tuple[list[dict[str, Any]], list[int]]:
    """The documents matched by some mask, and the masks renumbered over them.

    A replay's batch spans months of ``last_seen`` hours, and most of the decoded users match
    nothing: the aggregation's work grows with the documents it is given (their hours, their
    dimension codes, the width of the mask matrix), so it is given only the matched ones."""
    import numpy as np

    union = 0
    for mask in masks:
        union |= mask
    size = len(docs)
    matched = union.bit_count()
    if matched * 10 >= size * 9:  # (almost) all matched: renumbering would cost more than it saves
        return docs, masks
    width = (size + 7) // 8
    keep = np.flatnonzero(np.unpackbits(np.frombuffer(union.to_bytes(width, "little"), dtype=np.uint8),
                                        bitorder="little")[:size])
    rows = np.frombuffer(b"".join(m.to_bytes(width, "little") for m in masks), dtype=np.uint8)
    bits = np.unpackbits(rows.reshape(len(masks), width), axis=1, bitorder="little")[:, keep]
    packed = np.packbits(bits, axis=1, bitorder="little")
    return [docs[i] for i in keep.tolist()], [int.from_bytes(row.tobytes(), "little") for row in packed]


def _bits(flags: Sequence[bool]) -> int:
    """An int whose bit ``i`` is ``flags[i]`` (numpy packs them: no per-bit Python loop)."""
    import numpy as np

    packed = np.packbits(np.asarray(flags, dtype=bool), bitorder="little")
    return int.from_bytes(packed.tobytes(), "little")



# ------------------------------------------------------------------ one scan over several processes
#
# A scan is CPU bound (decode, percolate, aggregate) and one Python process uses one core. Split by
# partition, it runs in ``workers`` child processes, each a plain ReplayScan over its partitions
# with its own log, percolator and counters built from the settings, writing its batches to the
# counters itself with the scan's consumer and ITS partitions' offsets: each partition has one
# writer, so the per-partition checkpoints stay exact and a crashed scan resumes per partition as
# before; counter increments from two processes are atomic scripts in Redis, so they add up.
#
# The children are started with ``subprocess`` (not ``multiprocessing``: a Celery prefork worker
# is a daemonic process, which may not have multiprocessing children) and talk JSON lines:
#   parent -> child stdin: the job (first line), then {"cancel": [replay ids]} lines;
#   child -> parent stdout: {"progress": {...}} after every batch, {"done"|"cancelled": ...} last.
# The parent relays cancellations, merges progress into ``scan.progress`` and calls ``on_batch``
# for every child batch (lock refresh, progress writes, a test's simulated crash). When anything
# fails (a child exits with an error, on_batch raises) the other children are terminated and the
# error is raised: the scan stays resumable from the checkpoints. A child whose stdin reaches EOF
# (its parent died) stops after its current batch.

_MSG = b"@replay@"  # marks protocol lines on a child's stdout (anything else there is ignored)


def _settings_overrides(settings: Settings) -> dict[str, Any]:
    """``settings`` as ``load_settings`` overrides (JSON-safe)."""
    out: dict[str, Any] = {}
    for f in dataclass_fields(settings):
        value = getattr(settings, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def _progress_message(scan: ReplayScan) -> dict[str, Any]:
    p = scan.progress
    return {"positions": {str(k): v for k, v in scan._positions.items()}, "records": p.records,
            "in_window": p.in_window, "kept": p.kept, "matched": p.matched, "batches": p.batches,
            "prefilter_info": scan.prefilter_info}


class _Child:
    """One worker process of a parallel scan (parent side)."""

    def __init__(self, partitions: list[int], job: dict[str, Any]) -> None:
        import subprocess
        import tempfile

        self.partitions = partitions
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the same code as the parent's
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.replay"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.buffer = b""
        self.last: dict[str, Any] | None = None  # the latest progress
        self.end: str | None = None  # "done" | "cancelled" once the child said so
        self.send(job)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.stdin.write(orjson.dumps(message) + b"\n")
            self.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it exited: its exit status tells why

    def read(self) -> list[dict[str, Any]]:
        """The messages available now (call when the pipe is readable); [] and ``eof`` at the end."""
        chunk = os.read(self.stdout.fileno(), 1 << 16)
        if not chunk:
            self.eof = True
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [orjson.loads(line[len(_MSG):]) for line in lines if line.startswith(_MSG)]

    eof = False

    def error(self) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:].decode("utf-8", "replace").strip()
        last = tail.splitlines()[-1] if tail else "no error output"
        return (f"replay worker for partitions {self.partitions} exited with {self.proc.returncode}: {last}\n"
                f"its error output ends with:\n{tail}")

    def stop(self) -> None:
        if self.end is not None:  # it said its last word: let it close its log and connections
            with contextlib.suppress(Exception):
                self.stdin.close()
                self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        self.stderr.close()


def _run_parallel(scan: ReplayScan, groups: list[list[int]]) -> ScanProgress:
    """Run ``scan`` with one child process per partition group (see the section comment)."""
    import select

    assert scan.worker_settings is not None
    progress = scan.progress
    base = {"records": progress.records, "in_window": progress.in_window, "kept": progress.kept,
            "batches": progress.batches}
    active = {r.replay_id for r in scan.requests}
    job_common = {
        "settings": _settings_overrides(scan.worker_settings), "scan_id": scan.scan_id,
        "requests": [{"replay_id": r.replay_id, "rule_id": r.rule_id, "query": r.query, "since_ms": r.since_ms,
                      "live_since_ms": r.live_since_ms} for r in scan.requests],
        "dimensions": list(scan.dimensions), "batch_size": scan.batch_size,
        "now_us": int(scan.now.timestamp() * 1_000_000), "prefilter": scan.use_prefilter,
    }
    children: list[_Child] = []
    try:
        for group in groups:
            plan = ScanPlan(scan.plan.topic, {p: scan.plan.begins[p] for p in group},
                            {p: scan.plan.ends[p] for p in group})
            job = {**job_common, "plan": plan.to_dict(),
                   "resume": {str(p): scan._positions[p] for p in group}}
            children.append(_Child(group, job))
        while any(c.end is None for c in children):
            waiting = [c for c in children if c.end is None]
            readable, _, _ = select.select([c.stdout for c in waiting], [], [], 1.0)
            for child in waiting:
                if child.stdout not in readable:
                    continue
                for message in child.read():
                    child.last = message["progress"]
                    child.end = message.get("end")
                    _merge_progress(scan, children, base)
                    if child.end is None:
                        if scan.on_batch is not None:
                            scan.on_batch(progress)
                        if scan.cancelled is not None:
                            gone = scan.cancelled() & active
                            if gone:
                                active -= gone
                                for c in children:
                                    c.send({"cancel": sorted(gone)})
                if child.eof and child.end is None:
                    child.proc.wait()
                    raise RuntimeError(child.error())
        if any(c.end == "cancelled" for c in children):
            raise ReplayCancelled(f"scan {scan.scan_id}: every replay was cancelled")
        for p in scan.plan.ends:  # every child scanned its partitions to the end
            scan._positions[p] = scan.plan.ends[p]
        progress.scanned = scan._scanned()
        return progress
    finally:
        for child in children:
            child.stop()


def _merge_progress(scan: ReplayScan, children: Sequence[_Child], base: Mapping[str, int]) -> None:
    """``scan.progress`` = what this run started from + every child's latest totals."""
    progress = scan.progress
    totals = dict(base)
    matched = {r.replay_id: 0 for r in scan.requests}
    for child in children:
        last = child.last
        if last is None:
            continue
        for name in totals:
            totals[name] += int(last[name])
        for replay_id, n in last["matched"].items():
            matched[replay_id] = matched.get(replay_id, 0) + int(n)
        for p, pos in last["positions"].items():
            scan._positions[int(p)] = int(pos)
        if last.get("prefilter_info") and not scan.prefilter_info:
            scan.prefilter_info = dict(last["prefilter_info"])
    progress.records, progress.in_window = totals["records"], totals["in_window"]
    progress.kept, progress.batches = totals["kept"], totals["batches"]
    progress.matched = matched
    progress.scanned = scan._scanned()


class _Inbox:
    """The child's side of its stdin: the job line, then cancellations (read without blocking)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.cancelled: set[str] = set()
        self.closed = False

    def job(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise SystemExit("replay worker: no job on stdin")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return dict(orjson.loads(line))

    def poll(self) -> set[str]:
        """Replay ids cancelled so far; every one of ``all_ids`` once the parent is gone (EOF)."""
        import select

        while not self.closed and select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.cancelled.update(orjson.loads(line).get("cancel", ()))
        return self.cancelled


def _worker_main() -> int:
    """``python -m workers.replay``: one worker process of a parallel scan (see above)."""
    from percolators.factory import create_percolator
    from rules_service.config import load_settings
    from rules_service.counters.factory import create_counters
    from workers.log.factory import create_log

    inbox = _Inbox(sys.stdin.fileno())
    job = inbox.job()
    settings = load_settings(job["settings"], environ={})
    requests = [ReplayRequest(**r) for r in job["requests"]]
    every = {r.replay_id for r in requests}
    out = sys.stdout.buffer

    def send(message: dict[str, Any]) -> None:
        out.write(_MSG + orjson.dumps(message) + b"\n")
        out.flush()

    def cancelled() -> set[str]:
        gone = inbox.poll()
        return set(every) if inbox.closed else gone

    log = create_log(settings)
    try:
        plan = ScanPlan.from_dict(job["plan"])
        scan = ReplayScan(log, create_percolator(settings), create_counters(settings), requests,
                          scan_id=job["scan_id"], plan=plan, dimensions=job["dimensions"],
                          batch_size=int(job["batch_size"]),
                          resume_offsets={(plan.topic, int(p)): int(o) for p, o in job["resume"].items()},
                          on_batch=lambda _: send({"progress": _progress_message(scan)}), cancelled=cancelled,
                          now=datetime.fromtimestamp(job["now_us"] / 1_000_000, UTC), prefilter=job["prefilter"])
        scan.load_rules()
        try:
            scan.run()
        except ReplayCancelled:
            send({"progress": _progress_message(scan), "end": "cancelled"})
            return 0
        send({"progress": _progress_message(scan), "end": "done"})
        return 0
    finally:
        log.close()


if __name__ == "__main__":
    raise SystemExit(_worker_main())
