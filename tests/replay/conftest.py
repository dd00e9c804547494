"""A real little deployment per test: embedded log in a tmp dir, the session's redis-server, the
real API app, bids from the seeded generator streamed by the real consumer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from rules_service.api import create_app
from rules_service.config import Settings, load_settings
from rules_service.domain import rule_id
from workers.bidgen import BidGenerator
from workers.log.factory import create_log
from workers.log.port import Log, Message
from workers.replay_coordinator import ReplayCoordinator
from workers.replay_state import ReplayState
from workers.stream_runner import drain_in_process
from workers.topics import ensure_topics

RULE = {"bool": {"filter": [{"term": {"gender": "male"}}, {"terms": {"device.os": ["iOS"]}}]}}
RULE_B = {"bool": {"filter": [{"term": {"gender": "female"}}, {"range": {"age": {"gte": 30}}}]}}


@dataclass
class Env:
    settings: Settings
    log: Log
    redis: redis.Redis
    app: Any
    client: Any
    headers: dict[str, str]
    state: ReplayState

    def create(self, rule: dict[str, Any], lookback: int = 0, name: str = "aud") -> dict[str, Any]:
        body = {"name": name, "rule": rule, "lookback_days": lookback}
        response = self.client.post("/v1/audiences", json=body, headers=self.headers)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def stream(self, bids: int, users: int, days: float = 60, seed: int = 3) -> None:
        end = datetime.now(UTC) - timedelta(minutes=2)
        producer = self.log.producer()
        messages = [Message(value=v, key=k) for k, v in
                    BidGenerator(seed=seed, users=users, days=days, end=end).messages(bids)]
        for i in range(0, len(messages), 5000):
            producer.send_batch(self.settings.BIDS_TOPIC, messages[i:i + 5000])
        producer.close()
        drain_in_process(self.settings)

    def coordinator(self, **kwargs: Any) -> ReplayCoordinator:
        return ReplayCoordinator(self.settings, redis=self.redis, log=self.log, **kwargs)

    def size(self, audience_id: str, days: int = 30, end: datetime | None = None) -> dict[str, Any]:
        """The size response over the last ``days`` days up to now, or up to ``end`` if given."""
        stamp = "%Y-%m-%dT%H:%M:%S.%fZ"
        window = f"days={days}" if end is None else (
            f"from={(end - timedelta(days=days)).strftime(stamp)}&to={end.strftime(stamp)}")
        response = self.client.get(f"/v1/audiences/{audience_id}/size?{window}", headers=self.headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def assert_same_counters(self, first: str, second: str) -> None:
        """Version 1 of audiences ``first`` and ``second`` have the same sizes over 7 and 30 days
        and the same non-empty 30-day breakdown."""
        end = datetime.now(UTC)  # one window for both reads: "now" can tick over a second between them
        for days in (7, 30):
            assert self.size(first, days, end) | {"audience_id": 0} == self.size(second, days, end) | {"audience_id": 0}
        counters = self.app.extensions["rules_service"].counters
        start = end - timedelta(days=30)
        dims = list(self.settings.DIMENSIONS)
        got = counters.breakdown(rule_id(first, 1), start, end, dims)
        assert got == counters.breakdown(rule_id(second, 1), start, end, dims)
        assert any(got.values())


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[Env]:
    settings = load_settings({"REDIS_URL": redis_url, "DATA_DIR": str(tmp_path), "RATE_LIMIT_PER_MINUTE": 100_000,
                              "BIDS_PARTITIONS": 2}, environ={})
    log = create_log(settings)
    ensure_topics(log, settings)
    client = redis.Redis.from_url(redis_url)
    app = create_app({"SETTINGS": settings, "TESTING": True})
    store = app.extensions["rules_service"].store
    _, key = store.create_advertiser("tests")
    yield Env(settings, log, client, app, app.test_client(), {"Authorization": f"Bearer {key}"}, ReplayState(client))
    app.extensions["rules_service"].close()
    log.close()
    client.close()
