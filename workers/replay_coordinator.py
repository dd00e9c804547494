"""The replay coordinator: turns replay requests into shared scans, runs them, finishes them.

One coordinator runs at a time (a Redis lock with a lease, refreshed every batch). A run:

1. *discovers* requests: reads the ``replays`` topic (consumer group ``replay-coordinator``) up to
   its end and adds the replay ids to ``replays:unfinished`` before committing, so none is lost;
2. *resumes* interrupted scans (listed in ``rscans:running``: with the lock held, a running scan
   has no live owner, its process crashed or stopped) from the checkpoint the counters stored;
3. *claims every pending request at once* and runs them in ONE new scan (requests that arrive
   while a scan runs are picked up by the next loop iteration, in another shared scan); a big scan
   is split by partition over ``scan_workers`` processes (default ``RULES_REPLAY_WORKERS``, 0: one per CPU; see
   ``workers.replay._run_parallel``), each checkpointing its own partitions;
4. finishes each replay: ``done`` (and, for a version that was backfilling, reads switch to it:
   :func:`workers.replay_versions.complete_version`), ``cancelled`` or ``failed``;

and loops until nothing is left. Errors that a retry may cure (log, Redis, percolator
unavailable, or anything unexpected) leave the scan 'running' for the next run to resume;
after :data:`MAX_ATTEMPTS` failed runs a scan's replays are marked failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from percolators.errors import InvalidRuleError
from percolators.port import Percolator
from rules_service.config import Settings
from rules_service.domain import LAST_SEEN_TOPIC, REPLAYS_TOPIC
from rules_service.store import AudienceStore, iso, utc_now
from workers.log.port import Log, TopicPartition
from workers.replay import (
    DAY_MS,
    DEFAULT_BATCH_SIZE,
    LIVE_GRACE_MS,
    PARALLEL_MIN_OFFSETS,
    ReplayCancelled,
    ReplayRequest,
    ReplayScan,
    ScanPlan,
    ScanProgress,
    plan_scan,
)
from workers.replay_state import TERMINAL, ReplayState
from workers.replay_versions import complete_version

logger = logging.getLogger(__name__)

COORDINATOR_GROUP = "replay-coordinator"
MAX_ATTEMPTS = 5
PROGRESS_EVERY_S = 0.5


class LockLostError(RuntimeError):
    """Another coordinator took the lock (our lease ran out): stop without finishing anything."""


def _parse_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass
class RunResult:
    busy: bool = False  # another coordinator holds the lock
    scans: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)  # replay id -> final status


class ReplayCoordinator:
    """See the module docstring. Services are built from ``settings`` unless given (tests)."""

    def __init__(self, settings: Settings, *, redis: Any = None, log: Log | None = None, counters: Any = None,
                 percolator_factory: Callable[[], Percolator] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 on_batch: Callable[[ScanProgress], None] | None = None, scan_workers: int | None = None,
                 parallel_min_offsets: int = PARALLEL_MIN_OFFSETS) -> None:
        self.settings = settings
        # worker processes per scan (split by partition); they build their services from ``settings``
        if scan_workers is None:
            scan_workers = settings.REPLAY_WORKERS or _usable_cpus()
        self.scan_workers = scan_workers
        self.parallel_min_offsets = parallel_min_offsets
        if redis is None:
            from rules_service.redis_conn import connect_redis

            redis = connect_redis(settings)
        self.redis = redis
        if log is None:
            from workers.log.factory import create_log

            log = create_log(settings)
        self.log = log
        if counters is None:
            from rules_service.counters.factory import create_counters

            counters = create_counters(settings, redis)
        self.counters = counters
        if percolator_factory is None:
            from percolators.factory import create_percolator

            def percolator_factory() -> Percolator:
                return create_percolator(settings)
        self.percolator_factory = percolator_factory
        self.batch_size = batch_size
        self.on_batch = on_batch
        self.store = AudienceStore(redis)
        self.state = ReplayState(redis)
        self._producer: Any = None
        self._token: str | None = None

    @property
    def producer(self) -> Any:
        if self._producer is None:
            self._producer = self.log.producer()
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    # -- the run --------------------------------------------------------------------------------
    def run_pending(self, *, wait_for_lock_s: float = 0.0) -> RunResult:
        """Run every pending and interrupted replay (see the module docstring)."""
        from workers.topics import ensure_topics

        ensure_topics(self.log, self.settings, [REPLAYS_TOPIC, LAST_SEEN_TOPIC])
        deadline = time.monotonic() + wait_for_lock_s
        token = self.state.acquire_lock()
        while token is None and time.monotonic() < deadline:
            time.sleep(0.2)
            token = self.state.acquire_lock()
        if token is None:
            return RunResult(busy=True)
        self._token = token
        result = RunResult()
        try:
            while True:
                self.discover()
                scans = self.state.running_scans()
                if scans:
                    self._run_scan(scans[0], result)
                    continue
                claimed = self._claim_pending(result)
                if not claimed:
                    break
                plan = plan_scan(self.log, LAST_SEEN_TOPIC)
                scan_id = self.state.new_scan(claimed, plan.to_dict())
                for replay_id in claimed:
                    self.state.update(replay_id, status="running", scan_id=scan_id, started_at=iso(utc_now()))
                    self._set_audience_backfill(replay_id, "running")
                logger.info("scan %s: %d replay(s) share it: %s", scan_id, len(claimed), claimed)
                self._run_scan(scan_id, result)
        finally:
            self.state.release_lock(token)
            self._token = None
        return result

    def discover(self) -> int:
        """Add the replay ids produced to the ``replays`` topic since the last run to the unfinished
        set (committing only afterwards: a crash re-reads, never loses). Returns how many."""
        consumer = self.log.consumer(COORDINATOR_GROUP, auto_offset_reset="earliest")
        found: list[str] = []
        try:
            parts = self.log.partitions(REPLAYS_TOPIC)
            consumer.assign(parts)
            ends = consumer.end_offsets(parts)
            quiet = 0
            while any(consumer.position(tp) < end for tp, end in ends.items()) and quiet < 5:
                records = consumer.poll(5000, timeout_ms=100)
                quiet = 0 if records else quiet + 1
                for record in records:
                    if record.key is not None:
                        found.append(record.key.decode("utf-8", "replace"))
            self.state.add_unfinished(found)
            consumer.commit({TopicPartition(tp.topic, tp.partition): consumer.position(tp) for tp in parts})
        finally:
            consumer.close()
        return len(found)

    def _claim_pending(self, result: RunResult) -> list[str]:
        ids = self.state.unfinished()
        records = self.state.get_many(ids)
        cancelled = self.state.cancel_requested(ids)
        running = set(self.state.running_scans())
        claimed = []
        for replay_id, record in zip(ids, records, strict=True):
            if record is None:
                self.state.redis.srem(self.state._k("replays", "unfinished"), replay_id)
                continue
            status = record.get("status")
            if status in TERMINAL:
                self.state.redis.srem(self.state._k("replays", "unfinished"), replay_id)
            elif replay_id in cancelled:
                self._finish(replay_id, "cancelled", result)
            elif status == "pending" or (status == "running" and record.get("scan_id") not in running):
                claimed.append(replay_id)
        return claimed

    # -- one scan -------------------------------------------------------------------------------
    def _request(self, replay_id: str, record: dict[str, Any]) -> ReplayRequest:
        doc = self.store.get_audience(record["audience_id"])
        if doc is None:
            raise LookupError(f"audience {record['audience_id']!r} no longer exists")
        entry = next((e for e in doc["versions"] if e["version"] == record["version"]), None)
        if entry is None:
            raise LookupError(f"audience {record['audience_id']!r} has no version {record['version']}")
        window = self.state.window(replay_id)
        if window is not None:
            since_ms, live_since_ms = int(window["since_ms"]), int(window["live_since_ms"])
        else:
            since_ms = _parse_ms(record["requested_at"]) - int(record["days"]) * DAY_MS
            live_since_ms = _parse_ms(entry["created_at"]) + LIVE_GRACE_MS
        return ReplayRequest(replay_id=replay_id, rule_id=record["rule_id"], query=entry["rule"],
                             since_ms=since_ms, live_since_ms=live_since_ms)

    def _run_scan(self, scan_id: str, result: RunResult) -> None:
        scan = self.state.get_scan(scan_id)
        if scan is None:
            self.state.end_scan(scan_id, "failed")
            return
        attempts = int(scan.get("attempts", 0)) + 1
        scan["attempts"] = attempts
        self.state.redis.set(self.state._k("rscan", scan_id), orjson.dumps(scan))
        replay_ids = list(scan["replay_ids"])
        records = dict(zip(replay_ids, self.state.get_many(replay_ids), strict=True))
        requests: list[ReplayRequest] = []
        for replay_id in replay_ids:
            record = records[replay_id]
            if record is None or record.get("status") in TERMINAL:
                continue
            try:
                requests.append(self._request(replay_id, record))
            except (LookupError, KeyError, ValueError) as exc:
                self._finish(replay_id, "failed", result, error=str(exc))
        if not requests:
            self._end_scan(scan_id, "done", result)
            return
        if attempts > MAX_ATTEMPTS:
            for request in requests:
                self._finish(request.replay_id, "failed", result,
                             error=f"the scan failed {MAX_ATTEMPTS} times; see the worker logs")
            self._end_scan(scan_id, "failed", result)
            return

        percolator = self.percolator_factory()
        try:
            valid: list[ReplayRequest] = []
            for request in requests:
                try:
                    percolator.validate(_rule(request))
                    valid.append(request)
                except InvalidRuleError as exc:
                    self._finish(request.replay_id, "failed", result, error=f"invalid rule: {exc}")
            if not valid:
                self._end_scan(scan_id, "failed", result)
                return
            plan = ScanPlan.from_dict(scan["plan"])
            consumer = f"replay:{scan_id}"
            last_write = [0.0]
            ids = [r.replay_id for r in valid]

            def on_batch(progress: ScanProgress) -> None:
                if self._token is not None and not self.state.refresh_lock(self._token):
                    raise LockLostError(f"scan {scan_id}: the coordinator lock was lost")
                now = time.monotonic()
                if now - last_write[0] >= PROGRESS_EVERY_S:
                    last_write[0] = now
                    self.state.update_progress({i: {**progress.view(i), "status": "running"} for i in ids})
                if self.on_batch is not None:
                    self.on_batch(progress)

            runner = ReplayScan(self.log, percolator, self.counters, valid, scan_id=scan_id, plan=plan,
                                dimensions=self.settings.DIMENSIONS, batch_size=self.batch_size,
                                resume_offsets=self.counters.stored_offsets(consumer), on_batch=on_batch,
                                cancelled=lambda: self.state.cancel_requested(ids),
                                workers=self.scan_workers, worker_settings=self.settings,
                                parallel_min_offsets=self.parallel_min_offsets)
            runner.load_rules()
            try:
                progress = runner.run()
            except ReplayCancelled:
                for request in valid:
                    view = runner.progress.view(request.replay_id)
                    self._finish(request.replay_id, "cancelled", result, progress=view)
                self._end_scan(scan_id, "cancelled", result)
                return
            cancelled = self.state.cancel_requested(ids)
            for request in valid:
                view = {**progress.view(request.replay_id), "eta_seconds": 0.0}
                if request.replay_id in cancelled:
                    self._finish(request.replay_id, "cancelled", result, progress=view)
                else:
                    self._finish(request.replay_id, "done", result, progress=view)
            self._end_scan(scan_id, "done", result)
        except Exception as exc:
            # Leave the scan 'running': the next run resumes it from the stored checkpoint.
            for request in requests:
                self.state.update(request.replay_id, last_error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if hasattr(percolator, "close"):
                percolator.close()

    def _end_scan(self, scan_id: str, status: str, result: RunResult) -> None:
        self.state.end_scan(scan_id, status)
        delete = getattr(self.counters, "delete_offsets", None)
        if callable(delete):
            delete(f"replay:{scan_id}")
        result.scans.append(scan_id)

    def _finish(self, replay_id: str, status: str, result: RunResult, error: str | None = None,
                **fields: Any) -> None:
        self.state.finish(replay_id, status, error, **fields)
        result.finished[replay_id] = status
        record = self.state.get(replay_id) or {}
        activated = False
        if status == "done" and record.get("audience_id"):
            try:
                activated = complete_version(self.store, self.producer, self.settings, record["audience_id"],
                                             int(record["version"])).activated
            except Exception:
                logger.exception("switching %s to version %s failed", record.get("audience_id"),
                                 record.get("version"))
                raise
        # after a switch too: the audience keeps the replay's final progress
        self._set_audience_backfill(replay_id, status, record=record if not activated else None, error=error)

    def _set_audience_backfill(self, replay_id: str, status: str, record: dict[str, Any] | None = None,
                               error: str | None = None) -> None:
        record = record or self.state.get(replay_id) or {}
        audience_id = record.get("audience_id")
        if not audience_id:
            return
        doc = self.store.get_audience(audience_id)
        if doc is None or (doc.get("backfill") or {}).get("replay_id") != replay_id:
            return  # another replay is the audience's current backfill (or none): leave it
        backfill = {"status": status, "days": record.get("days", 0), "replay_id": replay_id,
                    "progress": record.get("progress")}
        if error:
            backfill["error"] = error
        self.store.set_backfill(audience_id, backfill, version=int(record["version"]))


def _usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _rule(request: ReplayRequest) -> Any:
    from percolators.port import Rule

    return Rule(id=request.rule_id, query=request.query)
