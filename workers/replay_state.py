"""Replay bookkeeping in Redis: replay records, scans, cancellation, the coordinator lock.

Keys (prefix ``rs:``, shared with :mod:`rules_service.store` and :mod:`rules_service.backfills`):

=================================  ==========  ===================================================
key                                type        content
=================================  ==========  ===================================================
``replay:<id>``                    string      the replay record (JSON, created by
                                               ``RedisBackfills.start``): status, progress...
``replay:<id>:cancel``             string      set by ``DELETE /v1/replays/<id>``; checked between
                                               batches
``replay:<id>:window``             string      optional JSON ``{since_ms, live_since_ms}``
                                               overriding the window (rollback gap replays)
``replays:unfinished``             set         replay ids known to the coordinator and not finished
``replays:scans``                  string      number of scans ever started (one per shared scan)
``rscan:<scan id>``                string      a scan: its replay ids, plan (end offsets), status
``rscans:running``                 set         scans started and not finished (resumed after a crash)
``replays:lock``                   string      the coordinator lock (token, with a lease)
=================================  ==========  ===================================================

The checkpoint of a scan is not here: it is the ``o:replay:<scan id>`` offsets hash the counters
store atomically with every batch (:meth:`Counters.apply`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import orjson
import redis

from rules_service.store import iso, new_id, utc_now

TERMINAL = ("done", "failed", "cancelled")
LOCK_LEASE_MS = 60_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ReplayState:
    def __init__(self, client: redis.Redis, prefix: str = "rs:") -> None:
        self.redis = client
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- replay records ------------------------------------------------------------------------
    def get(self, replay_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._k("replay", replay_id))
        return None if raw is None else orjson.loads(raw)

    def get_many(self, replay_ids: list[str]) -> list[dict[str, Any] | None]:
        if not replay_ids:
            return []
        raws = self.redis.mget([self._k("replay", i) for i in replay_ids])
        return [None if raw is None else orjson.loads(raw) for raw in raws]

    def update(self, replay_id: str, **fields: Any) -> dict[str, Any] | None:
        """Merge ``fields`` into the record (the coordinator is its only writer once claimed)."""
        record = self.get(replay_id)
        if record is None:
            return None
        record.update(fields)
        self.redis.set(self._k("replay", replay_id), orjson.dumps(record))
        return record

    def update_progress(self, updates: dict[str, dict[str, Any]]) -> None:
        """Set ``progress`` of several records in one round trip (read, merge, write)."""
        ids = list(updates)
        records = self.get_many(ids)
        pipe = self.redis.pipeline(transaction=False)
        for replay_id, record in zip(ids, records, strict=True):
            if record is not None:
                record["progress"] = updates[replay_id]
                pipe.set(self._k("replay", replay_id), orjson.dumps(record))
        pipe.execute()

    def finish(self, replay_id: str, status: str, error: str | None = None, **fields: Any) -> None:
        extra: dict[str, Any] = {"status": status, "finished_at": iso(utc_now()), **fields}
        if error is not None:
            extra["error"] = error
        self.update(replay_id, **extra)
        self.redis.srem(self._k("replays", "unfinished"), replay_id)

    # -- cancellation -------------------------------------------------------------------------
    def request_cancel(self, replay_id: str) -> None:
        self.redis.set(self._k("replay", replay_id, "cancel"), "1", ex=30 * 86400)

    def cancel_requested(self, replay_ids: Iterable[str]) -> set[str]:
        ids = list(replay_ids)
        if not ids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for replay_id in ids:
            pipe.exists(self._k("replay", replay_id, "cancel"))
        return {i for i, hit in zip(ids, pipe.execute(), strict=True) if hit}

    # -- windows ------------------------------------------------------------------------------
    def set_window(self, replay_id: str, since_ms: int, live_since_ms: int) -> None:
        self.redis.set(self._k("replay", replay_id, "window"),
                       orjson.dumps({"since_ms": since_ms, "live_since_ms": live_since_ms}), ex=30 * 86400)

    def window(self, replay_id: str) -> dict[str, int] | None:
        raw = self.redis.get(self._k("replay", replay_id, "window"))
        return None if raw is None else orjson.loads(raw)

    # -- discovery ----------------------------------------------------------------------------
    def add_unfinished(self, replay_ids: Iterable[str]) -> None:
        ids = list(replay_ids)
        if ids:
            self.redis.sadd(self._k("replays", "unfinished"), *ids)

    def unfinished(self) -> list[str]:
        return sorted(_text(i) for i in self.redis.smembers(self._k("replays", "unfinished")))

    # -- scans --------------------------------------------------------------------------------
    def new_scan(self, replay_ids: list[str], plan: dict[str, Any]) -> str:
        scan_id = new_id("scan")
        scan = {"id": scan_id, "replay_ids": replay_ids, "plan": plan, "status": "running",
                "started_at": iso(utc_now())}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._k("rscan", scan_id), orjson.dumps(scan))
        pipe.sadd(self._k("rscans", "running"), scan_id)
        pipe.incr(self._k("replays", "scans"))
        pipe.execute()
        return scan_id

    def get_scan(self, scan_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._k("rscan", scan_id))
        return None if raw is None else orjson.loads(raw)

    def running_scans(self) -> list[str]:
        return sorted(_text(i) for i in self.redis.smembers(self._k("rscans", "running")))

    def end_scan(self, scan_id: str, status: str) -> None:
        scan = self.get_scan(scan_id) or {"id": scan_id}
        scan.update(status=status, finished_at=iso(utc_now()))
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._k("rscan", scan_id), orjson.dumps(scan), ex=30 * 86400)
        pipe.srem(self._k("rscans", "running"), scan_id)
        pipe.execute()

    def scans_started(self) -> int:
        return int(self.redis.get(self._k("replays", "scans")) or 0)

    # -- the coordinator lock -----------------------------------------------------------------
    def acquire_lock(self, lease_ms: int = LOCK_LEASE_MS) -> str | None:
        token = secrets.token_hex(8)
        return token if self.redis.set(self._k("replays", "lock"), token, nx=True, px=lease_ms) else None

    def refresh_lock(self, token: str, lease_ms: int = LOCK_LEASE_MS) -> bool:
        """Extend our lease; False when we lost the lock (another coordinator took over)."""
        script = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
        return bool(self.redis.eval(script, 1, self._k("replays", "lock"), token, lease_ms))

    def release_lock(self, token: str) -> None:
        script = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('DEL', KEYS[1]) else return 0 end")
        self.redis.eval(script, 1, self._k("replays", "lock"), token)

    def lock_held(self) -> bool:
        return bool(self.redis.exists(self._k("replays", "lock")))
