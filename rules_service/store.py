"""Advertisers, audiences and their versions, in Redis.

Key scheme (every key starts with ``prefix``, default ``rs:``):

* ``adv:<id>``              hash: id, name, created_at, revoked ("0"/"1")
* ``advs``                  sorted set of advertiser ids (score 0, lexicographic = creation order)
* ``key:<sha256(api key)>`` string: the advertiser id owning that key (deleted on revoke)
* ``aud:<id>``              string: the audience document as JSON (see :func:`new_audience`)
* ``adv:<id>:auds``         sorted set of that advertiser's audience ids (score 0): the pagination
                            index. Ids start with a fixed-width hex millisecond timestamp, so
                            lexicographic order is creation order and a cursor (the last id seen)
                            stays valid while audiences are added or deleted.

API keys are 256-bit random tokens (``secrets.token_urlsafe(32)``) stored only as their SHA-256.
A slow password hash (bcrypt, scrypt) protects *low-entropy* secrets against guessing; a 256-bit
random key cannot be guessed, so one fast SHA-256 is enough to make a leaked database useless for
authenticating, and it costs microseconds per request instead of the ~100 ms a password hash would.

Audience documents are updated with optimistic concurrency: ``WATCH`` the document, compute the
new version in Python, write it in ``MULTI``/``EXEC``; a concurrent writer makes ``EXEC`` fail and
the update is retried on the fresh document. Every write bumps ``revision`` (the API's ETag).

Versions: an audience has numbered versions, each one percolator rule
(``rules_service.domain.rule_id(audience_id, version)``). ``version`` is the newest,
``serving_version`` the one reads use. A rule change with a lookback creates version N+1 in status
``backfilling`` while N keeps serving; :meth:`AudienceStore.activate_version` switches reads to it
(called when its replay completes) in one atomic write. Every function that changes versions
returns the :class:`~rules_service.domain.RuleChange` messages the caller must publish on
``audiences.rules`` (:func:`publish_rule_changes`), so the workers follow.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis

from rules_service.domain import RULES_TOPIC, RuleChange, rule_id

Doc = dict[str, Any]

BACKFILL_NONE: dict[str, Any] = {"status": "none", "days": 0, "replay_id": None, "progress": None}


class StoreError(Exception):
    """Base class of store errors."""


class ConflictError(StoreError):
    """The document kept changing under us (or the caller's expected revision is stale)."""


class VersionNotFoundError(StoreError):
    """The audience has no such version."""


@dataclass(frozen=True)
class Advertiser:
    id: str
    name: str
    created_at: str
    revoked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at, "revoked": self.revoked}


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with millisecond precision and a ``Z``: ``2026-11-22T08:30:00.123Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _text(value: Any) -> str:
    """Redis replies as str whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


_id_lock = threading.Lock()
_last_ms = 0


def new_id(kind: str) -> str:
    """``<kind>_`` + 12 hex digits of epoch milliseconds + 10 random hex digits: sortable by creation
    (ULID-like). Within one process the millisecond part is strictly increasing, so ids created in
    the same millisecond still sort in creation order; across processes, order is to the millisecond."""
    global _last_ms
    with _id_lock:
        _last_ms = max(int(time.time() * 1000), _last_ms + 1)
        stamp = _last_ms
    return f"{kind}_{stamp:012x}{secrets.token_hex(5)}"


# --- pure document logic -------------------------------------------------------------------------

def new_audience(advertiser_id: str, name: str, rule: dict[str, Any], lookback_days: int,
                 now: datetime | None = None, audience_id: str | None = None) -> Doc:
    """A new audience at version 1. With a lookback it is 'backfilling' (still serving: there is
    nothing older to serve) until its replay completes."""
    stamp = iso(now or utc_now())
    status = "backfilling" if lookback_days > 0 else "active"
    return {
        "id": audience_id or new_id("aud"),
        "advertiser_id": advertiser_id,
        "name": name,
        "lookback_days": lookback_days,
        "version": 1,
        "serving_version": 1,
        "versions": [{"version": 1, "rule": rule, "status": status, "lookback_days": lookback_days,
                      "created_at": stamp}],
        "backfill": dict(BACKFILL_NONE),
        "created_at": stamp,
        "updated_at": stamp,
        "revision": 1,
    }


def version_entry(doc: Doc, version: int) -> dict[str, Any]:
    for entry in doc["versions"]:
        if entry["version"] == version:
            return entry
    raise VersionNotFoundError(f"audience {doc['id']!r} has no version {version}")


def current_rule(doc: Doc) -> dict[str, Any]:
    return version_entry(doc, doc["version"])["rule"]


def status_of(doc: Doc) -> str:
    """The audience's status: that of its newest version."""
    return str(version_entry(doc, doc["version"])["status"])


def rule_change(doc: Doc, version: int) -> RuleChange:
    entry = version_entry(doc, version)
    return RuleChange(audience_id=doc["id"], advertiser_id=doc["advertiser_id"], version=version,
                      query=entry["rule"], status=entry["status"], metadata={"name": doc["name"]})


def revise(doc: Doc, *, name: str | None = None, rule: dict[str, Any] | None = None,
           lookback_days: int | None = None, now: datetime | None = None) -> tuple[Doc, list[int], bool]:
    """Apply a PUT to a document. Returns (new doc, versions whose rule change must be published,
    whether the new version needs a backfill).

    * A rename (or a lookback change) without a rule change keeps the version.
    * A changed rule creates version N+1. With ``lookback_days`` > 0 it is 'backfilling' and the
      serving version stays; a previous version still waiting for its backfill is superseded
      ('inactive'). Without a lookback it is 'active' at once, serves reads, and every older
      version becomes 'inactive' (kept for reads and rollback until its counters expire).
    """
    out = copy.deepcopy(doc)
    changed: list[int] = []
    needs_backfill = False
    if name is not None:
        out["name"] = name
    if lookback_days is not None:
        out["lookback_days"] = lookback_days
    if rule is not None and rule != current_rule(doc):
        stamp = iso(now or utc_now())
        new_version = max(entry["version"] for entry in out["versions"]) + 1
        lookback = out["lookback_days"]
        for entry in out["versions"]:
            # Only the serving version keeps being percolated while the new one backfills.
            keep = lookback > 0 and entry["version"] == out["serving_version"]
            if entry["status"] != "inactive" and not keep:
                entry["status"] = "inactive"
                changed.append(entry["version"])
        out["versions"].append({"version": new_version, "rule": rule,
                                "status": "backfilling" if lookback > 0 else "active",
                                "lookback_days": lookback, "created_at": stamp})
        out["version"] = new_version
        changed.append(new_version)
        if lookback > 0:
            needs_backfill = True
            out["backfill"] = dict(BACKFILL_NONE)
        else:
            out["serving_version"] = new_version
            out["backfill"] = dict(BACKFILL_NONE)
    elif name is not None and name != doc["name"]:
        # The name travels in the rule metadata: republish the live versions.
        changed.extend(e["version"] for e in out["versions"] if e["status"] != "inactive")
    out["updated_at"] = iso(now or utc_now())
    out["revision"] = doc.get("revision", 0) + 1
    return out, changed, needs_backfill


def activate(doc: Doc, version: int, now: datetime | None = None) -> tuple[Doc, list[int]]:
    """Serve ``version``: it becomes 'active' and every other version 'inactive'."""
    out = copy.deepcopy(doc)
    version_entry(out, version)  # raises when missing
    changed = []
    for entry in out["versions"]:
        status = "active" if entry["version"] == version else "inactive"
        if entry["status"] != status:
            entry["status"] = status
            changed.append(entry["version"])
    out["serving_version"] = version
    if out["backfill"].get("status") in ("pending", "running") and out["version"] == version:
        out["backfill"] = {**out["backfill"], "status": "done"}
    out["updated_at"] = iso(now or utc_now())
    out["revision"] = doc.get("revision", 0) + 1
    return out, changed


# --- the store -----------------------------------------------------------------------------------

class AudienceStore:
    """Advertisers and audiences in Redis (see the module docstring for keys and concurrency)."""

    MAX_RETRIES = 50

    def __init__(self, client: redis.Redis, prefix: str = "rs:"):
        self.redis = client
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # advertisers

    def create_advertiser(self, name: str) -> tuple[Advertiser, str]:
        """A new advertiser and its API key (returned once, stored only hashed)."""
        if not name.strip():
            raise StoreError("advertiser name must not be empty")
        adv = Advertiser(id=new_id("adv"), name=name, created_at=iso(utc_now()))
        api_key = "rk_" + secrets.token_urlsafe(32)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("adv", adv.id), mapping={"id": adv.id, "name": name, "created_at": adv.created_at,
                                                       "revoked": "0", "key_hash": hash_key(api_key)})
            pipe.zadd(self._k("advs"), {adv.id: 0})
            pipe.set(self._k("key", hash_key(api_key)), adv.id)
            pipe.execute()
        return adv, api_key

    def queue_advertiser_lookup(self, pipe: Any, key_hash: str) -> None:
        """Queue the lookup of a key by its SHA-256 on a pipeline (the reply is the advertiser id
        or None); lets the API authenticate and rate-limit in one round trip."""
        pipe.get(self._k("key", key_hash))

    def advertiser_id_for_key(self, api_key: str) -> str | None:
        """The advertiser owning an API key, or None (unknown or revoked). One GET."""
        value = self.redis.get(self._k("key", hash_key(api_key)))
        return None if value is None else _text(value)

    def get_advertiser(self, advertiser_id: str) -> Advertiser | None:
        raw = self.redis.hgetall(self._k("adv", advertiser_id))
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        return Advertiser(id=data["id"], name=data["name"], created_at=data["created_at"],
                          revoked=data.get("revoked") == "1")

    def list_advertisers(self) -> list[Advertiser]:
        ids = [_text(i) for i in self.redis.zrangebylex(self._k("advs"), "-", "+")]
        return [adv for adv in (self.get_advertiser(i) for i in ids) if adv is not None]

    def rotate_key(self, advertiser_id: str) -> str | None:
        """A new API key for the advertiser (the old one stops working; a revoked advertiser is
        enabled again). None if unknown."""
        key = self._k("adv", advertiser_id)
        old_hash = self.redis.hget(key, "key_hash")
        if old_hash is None:
            return None
        api_key = "rk_" + secrets.token_urlsafe(32)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("key", _text(old_hash)))
            pipe.hset(key, mapping={"key_hash": hash_key(api_key), "revoked": "0"})
            pipe.set(self._k("key", hash_key(api_key)), advertiser_id)
            pipe.execute()
        return api_key

    def revoke_advertiser(self, advertiser_id: str) -> bool:
        """Disable the advertiser's key. Its audiences stay (counted, not readable). False if unknown."""
        key = self._k("adv", advertiser_id)
        key_hash = self.redis.hget(key, "key_hash")
        if key_hash is None:
            return False
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "revoked", "1")
            pipe.delete(self._k("key", _text(key_hash)))
            pipe.execute()
        return True

    # audiences

    def create_audience(self, doc: Doc) -> Doc:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("aud", doc["id"]), orjson.dumps(doc), nx=True)
            pipe.zadd(self._k("adv", doc["advertiser_id"], "auds"), {doc["id"]: 0})
            created, _ = pipe.execute()
        if not created:
            raise ConflictError(f"audience {doc['id']!r} already exists")
        return doc

    def _load(self, raw: bytes | None, advertiser_id: str | None) -> Doc | None:
        if raw is None:
            return None
        doc: Doc = orjson.loads(raw)
        if advertiser_id is not None and doc.get("advertiser_id") != advertiser_id:
            return None  # another tenant's audience is indistinguishable from a missing one
        return doc

    def get_audience(self, audience_id: str, advertiser_id: str | None = None) -> Doc | None:
        """The document, or None when missing or (given ``advertiser_id``) owned by someone else."""
        return self._load(self.redis.get(self._k("aud", audience_id)), advertiser_id)

    def get_audiences(self, audience_ids: Sequence[str], advertiser_id: str | None = None) -> list[Doc | None]:
        if not audience_ids:
            return []
        raws = self.redis.mget([self._k("aud", i) for i in audience_ids])
        return [self._load(raw, advertiser_id) for raw in raws]

    def list_audiences(self, advertiser_id: str, limit: int = 20,
                       cursor: str | None = None) -> tuple[list[Doc], str | None]:
        """One page in creation order after ``cursor`` (the last id of the previous page), and the
        next cursor (None on the last page)."""
        start = f"({cursor}" if cursor else "-"
        ids = [_text(i) for i in self.redis.zrangebylex(self._k("adv", advertiser_id, "auds"), start, "+",
                                                           start=0, num=limit + 1)]
        page, more = ids[:limit], len(ids) > limit
        docs = [doc for doc in self.get_audiences(page, advertiser_id) if doc is not None]
        return docs, (page[-1] if more and page else None)

    def count_audiences(self, advertiser_id: str) -> int:
        return int(self.redis.zcard(self._k("adv", advertiser_id, "auds")))

    def update_audience(self, audience_id: str, mutate: Callable[[Doc], Doc | None],
                        advertiser_id: str | None = None, expected_revision: int | None = None) -> Doc | None:
        """Optimistic read-modify-write. ``mutate`` gets a copy of the current document and returns
        the new one (or None to write nothing). Returns the stored result, or None when the
        audience is missing/not the advertiser's. Raises ConflictError when ``expected_revision``
        does not match or after too many concurrent retries."""
        key = self._k("aud", audience_id)

        def write(pipe: Any, doc: Doc) -> Doc:
            new = mutate(copy.deepcopy(doc))
            if new is None:
                return doc
            pipe.multi()
            pipe.set(key, orjson.dumps(new))
            pipe.execute()
            return new

        return self._watched_write(audience_id, advertiser_id, expected_revision, write)

    def delete_audience(self, audience_id: str, advertiser_id: str | None = None,
                        expected_revision: int | None = None) -> Doc | None:
        """Remove the document and its index entry atomically; returns what was deleted (None if
        missing or not the advertiser's)."""
        key = self._k("aud", audience_id)

        def write(pipe: Any, doc: Doc) -> Doc:
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(self._k("adv", doc["advertiser_id"], "auds"), audience_id)
            pipe.execute()
            return doc

        return self._watched_write(audience_id, advertiser_id, expected_revision, write)

    def _watched_write(self, audience_id: str, advertiser_id: str | None, expected_revision: int | None,
                       write: Callable[[Any, Doc], Doc]) -> Doc | None:
        """The optimistic loop both writers share: WATCH the audience, load it (None when missing or
        not the advertiser's), check ``expected_revision`` (ConflictError), then ``write(pipe, doc)``
        in MULTI; retried when another writer got in between, ConflictError after MAX_RETRIES."""
        key = self._k("aud", audience_id)
        for _ in range(self.MAX_RETRIES):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    doc = self._load(cast(Any, pipe.get(key)), advertiser_id)
                    if doc is None:
                        return None
                    if expected_revision is not None and doc.get("revision") != expected_revision:
                        raise ConflictError(f"audience {audience_id!r} is at revision {doc.get('revision')}, "
                                            f"not {expected_revision}")
                    return write(pipe, doc)
                except redis.WatchError:
                    continue
        raise ConflictError(f"audience {audience_id!r} changed concurrently {self.MAX_RETRIES} times")

    def set_backfill(self, audience_id: str, backfill: dict[str, Any], version: int | None = None) -> Doc | None:
        """Record the audience's backfill state (only while ``version``, if given, is still the newest)."""
        def mutate(doc: Doc) -> Doc | None:
            if version is not None and doc["version"] != version:
                return None
            doc["backfill"] = backfill
            doc["revision"] = doc.get("revision", 0) + 1
            return doc
        return self.update_audience(audience_id, mutate)

    def activate_version(self, audience_id: str, version: int) -> list[RuleChange]:
        """Switch reads to ``version`` atomically (the replay calls this when the version's backfill
        is complete; a rollback calls it with an older version). Returns the rule changes to
        publish (:func:`publish_rule_changes`). Raises VersionNotFoundError / StoreError when the
        audience is missing."""
        changed: list[int] = []

        def mutate(doc: Doc) -> Doc:
            nonlocal changed
            new, changed = activate(doc, version)
            return new

        doc = self.update_audience(audience_id, mutate)
        if doc is None:
            raise StoreError(f"audience {audience_id!r} does not exist")
        return [rule_change(doc, v) for v in changed]


def publish_rule_changes(producer: Any, changes: Iterable[RuleChange]) -> None:
    """Send rule changes to the compacted rules topic, keyed by rule id (one acknowledged batch)."""
    from workers.log.port import Message

    messages = [Message(value=change.to_json(), key=change.rule_id.encode()) for change in changes]
    if messages:
        producer.send_batch(RULES_TOPIC, messages)


def publish_tombstones(producer: Any, audience_id: str, versions: Iterable[int]) -> None:
    """Remove every version's rule from the workers (tombstones on the compacted rules topic)."""
    from workers.log.port import Message

    messages = [Message(value=None, key=rule_id(audience_id, v).encode()) for v in versions]
    if messages:
        producer.send_batch(RULES_TOPIC, messages)
