"""Backfills: how the API asks for an audience version to be replayed over its lookback window.

The API only *requests* replays: :meth:`Backfills.start` records a 'pending' replay and returns
its id; the replay worker (issue 6) runs it, updating the same record. Keeping this a small port
lets the API tests use a fake and lets the replay engineer change how replays run.

:class:`RedisBackfills` (the real one) stores each replay as JSON under ``<prefix>replay:<id>``
and produces a message on the ``replays`` topic (``rules_service.domain.REPLAYS_TOPIC``), keyed by
replay id, value :func:`replay_request` JSON::

    {"replay_id", "audience_id", "advertiser_id", "version", "rule_id", "query", "days",
     "requested_at"}

The replay worker consumes that topic, sets ``status`` to 'running' / 'done' / 'failed' and fills
``progress`` (``{"scanned", "total", "matched", ...}``) in the record, and calls
``AudienceStore.activate_version`` when done. The API reads the record to show progress.
"""

from __future__ import annotations

import abc
from typing import Any

import orjson
import redis

from rules_service.domain import REPLAYS_TOPIC, rule_id
from rules_service.store import iso, new_id, utc_now

REPLAY_STATUSES = ("pending", "running", "done", "failed", "cancelled")


def replay_request(replay_id: str, audience: dict[str, Any], version: int, days: int) -> dict[str, Any]:
    entry = next(e for e in audience["versions"] if e["version"] == version)
    return {
        "replay_id": replay_id,
        "audience_id": audience["id"],
        "advertiser_id": audience["advertiser_id"],
        "version": version,
        "rule_id": rule_id(audience["id"], version),
        "query": entry["rule"],
        "days": days,
        "requested_at": iso(utc_now()),
    }


class Backfills(abc.ABC):
    """Requests and reads replays.

    * :meth:`start` is durable on return: the request is recorded and on the ``replays`` topic.
      It raises the log's ``LogUnavailableError`` when the topic cannot be written (the caller
      reports the audience's backfill as 'failed' and may retry).
    * :meth:`get` returns the replay record (``id``, ``status`` one of :data:`REPLAY_STATUSES`,
      ``progress``...) or None for an unknown id.
    """

    @abc.abstractmethod
    def start(self, audience: dict[str, Any], version: int, days: int) -> str:
        """Request a replay of ``audience`` version ``version`` over the last ``days`` days."""

    @abc.abstractmethod
    def get(self, replay_id: str) -> dict[str, Any] | None:
        """The replay record, or None."""


class RedisBackfills(Backfills):
    def __init__(self, client: redis.Redis, producer: Any, prefix: str = "rs:"):
        self.redis = client
        self.producer = producer
        self.prefix = prefix

    def _key(self, replay_id: str) -> str:
        return f"{self.prefix}replay:{replay_id}"

    def start(self, audience: dict[str, Any], version: int, days: int) -> str:
        from rules_service.api.batch_counts import invalidate
        from workers.log.port import Message

        replay_id = new_id("rpl")
        request = replay_request(replay_id, audience, version, days)
        # The replay writes into past days: cached closed-days sizes of this rule are dropped.
        invalidate(self.redis, request["rule_id"])
        record = {**request, "id": replay_id, "status": "pending", "progress": None, "query": None}
        # Record first, then publish: a worker that sees the message always finds the record.
        self.redis.set(self._key(replay_id), orjson.dumps(record))
        self.producer.send_batch(REPLAYS_TOPIC, [Message(value=orjson.dumps(request), key=replay_id.encode())])
        return replay_id

    def get(self, replay_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._key(replay_id))
        return None if raw is None else orjson.loads(raw)
