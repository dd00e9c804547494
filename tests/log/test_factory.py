"""RULES_LOG_URL -> the log backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules_service.config import ConfigError, load_settings
from workers.log.embedded import EmbeddedLog
from workers.log.factory import create_log, kafka_options_from_url
from workers.log.kafka import KafkaLog
from workers.log.port import TopicSpec


def test_default_is_the_embedded_log_under_the_data_dir(tmp_path: Path) -> None:
    log = create_log(load_settings({"DATA_DIR": str(tmp_path)}, environ={}))
    assert isinstance(log, EmbeddedLog)
    log.create_topic(TopicSpec("bids"))
    assert log.producer().send("bids", b"v") == (0, 0)
    assert (tmp_path / "log" / "topics" / "bids.db").exists()


def test_kafka_url_options() -> None:
    assert kafka_options_from_url("kafka://a:9092,b:9093?api_version=0.9&client_id=x&replication_factor=3") == {
        "bootstrap_servers": ["a:9092", "b:9093"], "api_version": (0, 9), "client_id": "x", "replication_factor": 3}
    assert kafka_options_from_url("kafka://a:9092") == {"bootstrap_servers": ["a:9092"]}
    log = create_log(load_settings({"LOG_URL": "kafka://127.0.0.1:9092?api_version=2.8.1"}, environ={}))
    assert isinstance(log, KafkaLog) and log.api_version == (2, 8, 1)  # nothing connects yet


@pytest.mark.parametrize("url, culprit", [
    ("kafka://a:9092?api_version=new", "api_version"),
    ("kafka://a:9092?colour=blue", "colour"),
    ("kafka://a", "needs a port"),
    ("kafka://a:9092?replication_factor=x", "replication_factor"),
])
def test_bad_kafka_urls_name_the_culprit(url: str, culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit):
        kafka_options_from_url(url)


