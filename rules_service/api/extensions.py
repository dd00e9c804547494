"""The app's services, created from settings on first use (never at import time).

``create_app(config)`` stores a :class:`Services` in ``app.extensions["rules_service"]``. Each
service is built lazily, once, under a lock (waitress serves requests from several threads):

==================== ================================================ ==========================
config key           service                                          default
==================== ================================================ ==========================
``REDIS``            redis client (store, rate limits, backfills)      ``connect_redis(settings)``
``STORE``            :class:`~rules_service.store.AudienceStore`        over ``REDIS``
``PERCOLATOR``       shared :class:`~percolators.port.Percolator`       ``create_percolator``
``COUNTERS``         :class:`~rules_service.counters.port.Counters`     ``RedisCounters(REDIS)``
``LOG``              :class:`~workers.log.port.Log`                     ``create_log(settings)``
``PRODUCER``         log producer for rule changes and replays          ``LOG.producer()``
``BACKFILLS``        :class:`~rules_service.backfills.Backfills`        ``RedisBackfills``
``TEST_PERCOLATOR``  factory of throw-away percolators for /test       ``EmbeddedPercolator``
==================== ================================================ ==========================

Tests pass fakes or real objects under those keys; ``SETTINGS`` (a Settings) or ``RULES`` (a dict
of setting overrides) choose the settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app

from rules_service.config import Settings

EXTENSION = "rules_service"


class Services:
    def __init__(self, settings: Settings, provided: dict[str, Any]):
        self.settings = settings
        self._provided = {k: v for k, v in provided.items() if v is not None}
        self._built: dict[str, Any] = {}
        self._lock = threading.RLock()

    def _get(self, name: str, build: Callable[[], Any]) -> Any:
        if name in self._provided:
            return self._provided[name]
        value = self._built.get(name)
        if value is None:
            with self._lock:
                value = self._built.get(name)
                if value is None:
                    value = build()
                    self._built[name] = value
        return value

    @property
    def redis(self) -> Any:
        def build() -> Any:
            from rules_service.redis_conn import connect_redis

            return connect_redis(self.settings)
        return self._get("REDIS", build)

    @property
    def store(self) -> Any:
        from rules_service.store import AudienceStore

        return self._get("STORE", lambda: AudienceStore(self.redis))

    @property
    def percolator(self) -> Any:
        def build() -> Any:
            from percolators.factory import create_percolator

            return create_percolator(self.settings)
        return self._get("PERCOLATOR", build)

    @property
    def counters(self) -> Any:
        def build() -> Any:
            from rules_service.counters.factory import create_counters

            return create_counters(self.settings, self.redis)
        return self._get("COUNTERS", build)

    @property
    def log(self) -> Any:
        def build() -> Any:
            from workers.log.factory import create_log

            return create_log(self.settings)
        return self._get("LOG", build)

    @property
    def producer(self) -> Any:
        def build() -> Any:
            ensure_rule_topics(self.log, self.settings)
            return self.log.producer()
        return self._get("PRODUCER", build)

    @property
    def backfills(self) -> Any:
        from rules_service.backfills import RedisBackfills

        return self._get("BACKFILLS", lambda: RedisBackfills(self.redis, self.producer))

    def test_percolator(self) -> Any:
        """A new, empty percolator for dry runs: never the shared one."""
        factory = self._provided.get("TEST_PERCOLATOR")
        if factory is not None:
            return factory()
        from percolators.embedded import EmbeddedPercolator
        from rules_service.schema import USER_MAPPING

        return EmbeddedPercolator(USER_MAPPING)

    def close(self) -> None:
        for name in ("PRODUCER", "PERCOLATOR", "LOG"):
            value = self._built.pop(name, None)
            close = getattr(value, "close", None)
            if close is not None:
                close()


def ensure_rule_topics(log: Any, settings: Settings) -> None:
    """Create the topics the API writes to with their standard specs (``workers.topics``)."""
    from rules_service.domain import REPLAYS_TOPIC, RULES_TOPIC
    from workers.topics import ensure_topics

    ensure_topics(log, settings, [RULES_TOPIC, REPLAYS_TOPIC])


def init_app(app: Flask, settings: Settings, provided: dict[str, Any]) -> Services:
    services = Services(settings, provided)
    app.extensions[EXTENSION] = services
    return services


def services() -> Services:
    return current_app.extensions[EXTENSION]
