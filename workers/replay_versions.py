"""Audience versions around replays: switch reads when a backfill completes, expire the counters
of retired versions, and roll back to the previous version while its counters exist.

Retention (decision): when reads switch from version N to N+1, every counter key of N gets an
expiry of at most ``VERSION_RETENTION_DAYS`` from now (keys expiring sooner keep their own
deadline), and the retirement is recorded in ``rs:versions:<audience>`` (hash: version -> JSON
``{"retired_at_ms", "expires_at_ms", "replaced_by"}``). So no periodic task is needed: Redis
expires the keys itself, and the record tells a rollback whether the counters still exist.

Rollback to N (``POST /v1/audiences/<id>/rollback``): allowed while N's retirement has not
expired. Reads switch back to N at once (``AudienceStore.activate_version``; the rule changes are
published so the workers percolate N again), N's keys get back their normal per-bucket deadlines
(recomputed from the key names, see ``rules_service.counters.keys``), the version being left is
retired in turn, and a *gap replay* of N is requested over the time N was not percolated
(users last seen between its retirement and the rollback).
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson

from rules_service.counters.keys import DAY, HOUR, month_end, rule_scan_pattern
from rules_service.domain import rule_id
from rules_service.store import AudienceStore, publish_rule_changes

__all__ = ["RollbackError", "complete_version", "restore_deadlines", "retire_version", "rollback"]


class RollbackError(Exception):
    """The audience cannot roll back (no previous version, or its counters expired)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse_ms(text: str) -> int:
    from datetime import UTC, datetime

    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)


def _key(prefix: str, audience_id: str) -> str:
    return f"{prefix}versions:{audience_id}"


def _rule_keys(client: Any, rid: str) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=rule_scan_pattern(rid),
                                                                               count=1000)]


def retirements(client: Any, audience_id: str, prefix: str = "rs:") -> dict[int, dict[str, int]]:
    raw = client.hgetall(_key(prefix, audience_id))
    out = {}
    for version, value in raw.items():
        out[int(version)] = orjson.loads(value)
    return out


def retire_version(client: Any, audience_id: str, version: int, retention_days: int, *, replaced_by: int,
                   prefix: str = "rs:") -> int:
    """Expire version ``version``'s counters within ``retention_days`` and record it; returns the
    expiry (epoch ms)."""
    now = _now_ms()
    expires_at_ms = now + retention_days * DAY * 1000
    keys = _rule_keys(client, rule_id(audience_id, version))
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.pttl(key)
        ttls = pipe.execute()
        pipe = client.pipeline(transaction=False)
        for key, ttl in zip(chunk, ttls, strict=True):
            if ttl is None or ttl < 0 or now + ttl > expires_at_ms:  # -1: no expiry
                pipe.pexpireat(key, expires_at_ms)
        pipe.execute()
    client.hset(_key(prefix, audience_id), str(version),
                orjson.dumps({"retired_at_ms": now, "expires_at_ms": expires_at_ms, "replaced_by": replaced_by}))
    return expires_at_ms


def _deadline(key: str, hour_retention_s: int, day_retention_s: int) -> int | None:
    """The normal EXPIREAT of a counter key, from its name (see ``rules_service.counters.keys``)."""
    parts = key.rsplit(":", 3)
    try:
        if len(parts) == 4 and parts[1] == "u":
            kind, stamp = parts[2], parts[3]
            if kind == "h":
                start = calendar.timegm((int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8]), int(stamp[8:10]), 0, 0))
                return start + HOUR + hour_retention_s
            start = calendar.timegm((int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8]), 0, 0, 0))
            return start + DAY + day_retention_s
        if len(parts) == 4 and parts[1] == "m":
            kind, stamp = parts[2], parts[3]
            if kind == "h":
                start = calendar.timegm((int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8]), 0, 0, 0))
                return start + DAY + hour_retention_s
            start = calendar.timegm((int(stamp[:4]), int(stamp[4:6]), 1, 0, 0, 0))
            return month_end(start) + day_retention_s
        tail = key.rsplit(":", 2)
        if len(tail) == 3 and tail[1] == "dim":
            stamp = tail[2]
            start = calendar.timegm((int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8]), 0, 0, 0))
            return start + DAY + day_retention_s
    except (ValueError, IndexError):
        return None
    return None


def restore_deadlines(client: Any, rid: str, *, hour_retention_days: int, day_retention_days: int) -> int:
    """Give every counter key of ``rid`` back its normal per-bucket deadline; returns keys touched."""
    keys = _rule_keys(client, rid)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        deadline = _deadline(key, hour_retention_days * DAY, day_retention_days * DAY)
        if deadline is not None:
            pipe.expireat(key, deadline)
    pipe.execute()
    return len(keys)


@dataclass
class Completion:
    activated: bool
    retired: int | None = None


def complete_version(store: AudienceStore, producer: Any, settings: Any, audience_id: str,
                     version: int) -> Completion:
    """A replay of ``version`` finished: if it is the audience's newest version and still
    'backfilling', switch reads to it atomically and retire the version that served until now."""
    doc = store.get_audience(audience_id)
    if doc is None:
        return Completion(False)
    entry = next((e for e in doc["versions"] if e["version"] == version), None)
    if entry is None or doc["version"] != version or entry["status"] != "backfilling":
        return Completion(False)
    previous = doc["serving_version"]
    changes = store.activate_version(audience_id, version)
    publish_rule_changes(producer, changes)
    retired = None
    if previous != version:
        retire_version(store.redis, audience_id, previous, settings.VERSION_RETENTION_DAYS, replaced_by=version,
                       prefix=store.prefix)
        retired = previous
    return Completion(True, retired)


@dataclass
class RollbackResult:
    version: int
    previous: int
    gap_replay_id: str | None
    gap_days: int


def rollback(store: AudienceStore, producer: Any, backfills: Any, settings: Any, audience_id: str,
             advertiser_id: str | None = None) -> RollbackResult:
    """Serve the previously serving version again (see the module docstring). Raises
    RollbackError (no previous version, or its counters expired), LookupError (no audience)."""
    from workers.replay_state import ReplayState

    doc = store.get_audience(audience_id, advertiser_id)
    if doc is None:
        raise LookupError(audience_id)
    serving = doc["serving_version"]
    retired = {v: r for v, r in retirements(store.redis, audience_id, store.prefix).items() if v != serving}
    known = {e["version"]: e for e in doc["versions"]}
    candidates = sorted(((r["retired_at_ms"], v) for v, r in retired.items() if v in known), reverse=True)
    if not candidates:
        # A version replaced without a backfill (no lookback) was retired by the API, not by a
        # replay: it stopped serving when its successor was created.
        older = [v for v in known if v < serving]
        if older:
            target = max(older)
            successor = min(v for v in known if v > target)
            stopped = _parse_ms(known[successor]["created_at"])
            retired[target] = {"retired_at_ms": stopped,
                               "expires_at_ms": stopped + settings.VERSION_RETENTION_DAYS * DAY * 1000}
            candidates = [(stopped, target)]
    if not candidates:
        raise RollbackError(f"audience {audience_id!r} has no previous version to roll back to "
                            f"(serving version {serving})")
    retired_at_ms, target = candidates[0]
    record = retired[target]
    now = _now_ms()
    if record["expires_at_ms"] <= now:
        raise RollbackError(
            f"the counters of version {target} expired on "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record['expires_at_ms'] / 1000))} "
            f"(versions are kept {settings.VERSION_RETENTION_DAYS} days after they stop serving): "
            "roll back is no longer possible; change the rule instead")
    changes = store.activate_version(audience_id, target)
    publish_rule_changes(producer, changes)
    restore_deadlines(store.redis, rule_id(audience_id, target), hour_retention_days=settings.HOUR_RETENTION_DAYS,
                      day_retention_days=settings.DAY_RETENTION_DAYS)
    store.redis.hdel(_key(store.prefix, audience_id), str(target))
    retire_version(store.redis, audience_id, serving, settings.VERSION_RETENTION_DAYS, replaced_by=target,
                   prefix=store.prefix)
    # Fill the time the target was not percolated: users last seen since its retirement.
    gap_days = max(1, math.ceil((now - retired_at_ms) / (DAY * 1000)))
    fresh = store.get_audience(audience_id) or doc
    replay_id = backfills.start(fresh, target, gap_days)
    ReplayState(store.redis, store.prefix).set_window(replay_id, since_ms=retired_at_ms,
                                                      live_since_ms=now + 60_000)
    return RollbackResult(version=target, previous=serving, gap_replay_id=replay_id, gap_days=gap_days)
