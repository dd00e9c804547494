"""The API against a real redis-server (store, rate limits, backfill records, RedisCounters), the
real embedded percolator, and an in-memory log whose messages the tests inspect."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from percolators.port import Percolator
from rules_service.api import create_app
from rules_service.config import Settings, load_settings
from rules_service.store import AudienceStore
from tests.api.fakes import FakeLog


def make_percolator() -> Percolator:
    """The real embedded percolator (validation and dry runs must be the production ones)."""
    from percolators.embedded import EmbeddedPercolator

    return EmbeddedPercolator()


@dataclass
class ApiEnv:
    app: Any
    client: Any
    redis: redis.Redis
    store: AudienceStore
    log: FakeLog
    counters: Any
    settings: Settings

    def advertiser(self, name: str = "acme") -> dict[str, str]:
        """A new advertiser; returns the Authorization header of its key."""
        _, key = self.store.create_advertiser(name)
        return {"Authorization": f"Bearer {key}"}

    def create(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        body.setdefault("name", "Men")
        body.setdefault("rule", {"term": {"gender": "male"}})
        response = self.client.post("/v1/audiences", json=body, headers=headers)
        assert response.status_code == 201, response.get_json()
        return response.get_json()


def build_env(redis_url: str, **overrides: Any) -> ApiEnv:
    from rules_service.counters.factory import create_counters

    settings = load_settings({"REDIS_URL": redis_url, "RATE_LIMIT_PER_MINUTE": 10_000, **overrides}, environ={})
    client = redis.Redis.from_url(redis_url)
    log = FakeLog()
    counters = create_counters(settings, client)
    app = create_app({"SETTINGS": settings, "REDIS": client, "LOG": log, "COUNTERS": counters,
                      "PERCOLATOR": make_percolator(), "TEST_PERCOLATOR": make_percolator, "TESTING": True})
    store = app.extensions["rules_service"].store
    return ApiEnv(app, app.test_client(), client, store, log, counters, settings)


@pytest.fixture
def api(redis_url: str) -> Iterator[ApiEnv]:
    env = build_env(redis_url)
    yield env
    env.redis.close()
