"""The contract suite's backends: every test taking ``backend`` runs against the embedded log and
against a real Kafka 0.9.0.1 broker (``kafka_broker`` fixture, tests/kafka_broker.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from workers.log.embedded import EmbeddedLog
from workers.log.kafka import KafkaLog
from workers.log.port import Log, TopicSpec


@dataclass
class Backend:
    """A log under test plus the few things the contract cannot do the same way everywhere."""

    name: str
    log: Log
    broker: Any = None  # tests.kafka_broker.KafkaBroker for Kafka
    supports_timestamps: bool = True
    made: list[str] = field(default_factory=list)

    def make_topic(self, partitions: int = 1, cleanup_policy: str = "delete", **options: Any) -> str:
        """A fresh, uniquely named topic. On Kafka 0.9 it is created the way an operator would,
        with kafka.admin.TopicCommand (the protocol cannot create topics)."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        spec = TopicSpec(name=name, partitions=partitions, cleanup_policy=cleanup_policy,  # type: ignore[arg-type]
                         **options)
        if self.broker is None:
            self.log.create_topic(spec)
        else:
            config = {"cleanup.policy": cleanup_policy}
            if cleanup_policy == "compact":  # let the broker's cleaner run within a test
                config.update({"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01",
                               "delete.retention.ms": "100"})
            if spec.retention_ms is not None:
                config["retention.ms"] = str(spec.retention_ms)
            self.broker.create_topic(name, partitions, config)
        self.made.append(name)
        return name


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        log: Log = EmbeddedLog(tmp_path / "log", tombstone_retention_ms=0)
        yield Backend("embedded", log)
    else:
        broker = request.getfixturevalue("kafka_broker")
        log = KafkaLog(broker.bootstrap, api_version=broker.api_version, request_timeout_ms=20_000)
        yield Backend("kafka", log, broker=broker, supports_timestamps=False)
    log.close()
