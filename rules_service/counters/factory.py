"""Build the counter store from settings: ``RULES_REDIS_URL`` or the embedded redis-server."""

from __future__ import annotations

from typing import Any

import redis

from rules_service.counters.redis_store import RedisCounters
from rules_service.redis_conn import connect_redis


def create_counters(settings: Any, client: redis.Redis | None = None) -> RedisCounters:
    """A :class:`RedisCounters` on ``client`` (default: :func:`connect_redis`) with the settings'
    retention."""
    return RedisCounters.from_settings(client if client is not None else connect_redis(settings), settings)
