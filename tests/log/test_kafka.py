"""What only the Kafka backend does: topic admin on an old broker, version negotiation, the URL
factory against a real broker, clear errors when the broker is unreachable."""

from __future__ import annotations

import time
import uuid

import pytest

from rules_service.config import load_settings
from tests.kafka_broker import KafkaBroker
from workers.log.factory import create_log
from workers.log.kafka import KafkaLog
from workers.log.port import (
    LogUnavailableError,
    Message,
    Record,
    TopicExistsError,
    TopicPartition,
    TopicSpec,
    UnsupportedError,
)

pytestmark = pytest.mark.kafka


def test_create_topic_on_kafka_0_9_explains_how_to_do_it(kafka_broker: KafkaBroker) -> None:
    log = KafkaLog(kafka_broker.bootstrap, api_version=(0, 9))
    name = f"t-{uuid.uuid4().hex[:10]}"
    with pytest.raises(UnsupportedError, match=r"kafka\.admin\.TopicCommand") as err:
        log.create_topic(TopicSpec(name, partitions=3, cleanup_policy="compact"))
    assert "--partitions 3" in str(err.value) and "cleanup.policy=compact" in str(err.value)
    kafka_broker.create_topic(name, 3, {"cleanup.policy": "compact"})
    log.create_topic(TopicSpec(name, partitions=3, cleanup_policy="compact"))  # exists: fine
    with pytest.raises(TopicExistsError):
        log.create_topic(TopicSpec(name, partitions=3), exist_ok=False)
    assert log.describe_topic(name).partitions == 3
    log.close()


def test_version_negotiation_fails_clearly_on_0_9(kafka_broker: KafkaBroker) -> None:
    # kafka-python negotiates with ApiVersions, which 0.9 lacks: the error says what to configure.
    log = KafkaLog(kafka_broker.bootstrap, request_timeout_ms=3000)
    with pytest.raises(LogUnavailableError, match=r"api_version=0\.9"):
        log.broker_version()
    log.close()
    configured = KafkaLog(kafka_broker.bootstrap, api_version=(0, 9))
    assert configured.is_old_broker()
    assert kafka_broker.bootstrap in str(configured.bootstrap_servers)


def test_factory_builds_a_working_kafka_log_from_the_url(kafka_broker: KafkaBroker) -> None:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kafka_broker.create_topic(name, 2)
    log = create_log(load_settings({"LOG_URL": kafka_broker.url}, environ={}))
    assert isinstance(log, KafkaLog) and log.api_version == (0, 9)
    producer = log.producer()
    partition, offset = producer.send(name, b"hello", key=b"user-1")
    consumer = log.consumer("factory-test")
    consumer.assign([TopicPartition(name, partition)])
    deadline = time.monotonic() + 20
    records: list[Record] = []
    while not records and time.monotonic() < deadline:
        records = consumer.poll(timeout_ms=500)
    assert [(r.offset, r.key, r.value) for r in records] == [(offset, b"user-1", b"hello")]
    producer.close()
    consumer.close()
    log.close()


def test_unreachable_broker_is_a_clear_error() -> None:
    log = KafkaLog("127.0.0.1:1", api_version=(0, 9), request_timeout_ms=1500)
    started = time.monotonic()
    with pytest.raises(LogUnavailableError, match=r"127\.0\.0\.1:1"):
        log.producer().send_batch("bids", [Message(b"v")])
    assert time.monotonic() - started < 10
    log.close()
