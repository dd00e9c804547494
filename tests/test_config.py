from pathlib import Path

import pytest

from rules_service.config import ConfigError, load_settings


def test_defaults_are_embedded():
    settings = load_settings(environ={})
    assert settings.percolator_backend == "embedded"
    assert settings.log_backend == "embedded"
    assert settings.REDIS_URL == ""


def test_environment_overrides_defaults_and_is_typed():
    settings = load_settings(environ={
        "RULES_DATA_DIR": "/tmp/x", "RULES_BATCH_SIZE": "50", "RULES_LOG_URL": "kafka://127.0.0.1:9092",
        "RULES_DIMENSIONS": "gender, geo.city", "RULES_TEST_ELASTICSEARCH_URL": "ignored",
    })
    assert settings.DATA_DIR == Path("/tmp/x")
    assert settings.BATCH_SIZE == 50
    assert settings.log_backend == "kafka"
    assert settings.DIMENSIONS == ("gender", "geo.city")


@pytest.mark.parametrize(("env", "culprit"), [
    ({"RULES_BATCH_SIZE": "many"}, "RULES_BATCH_SIZE"),
    ({"RULES_PERCOLATOR_URL": "ftp://x"}, "RULES_PERCOLATOR_URL"),
    ({"RULES_LOG_URL": "http://x"}, "RULES_LOG_URL"),
    ({"RULES_REDIS_URL": "http://x"}, "RULES_REDIS_URL"),
    ({"RULES_BATCH_SIZE": "0"}, "RULES_BATCH_SIZE"),
    ({"RULES_STREAM_FLUSH_MS": "-1"}, "RULES_STREAM_FLUSH_MS"),
    ({"RULES_REPLAY_WORKERS": "-2"}, "RULES_REPLAY_WORKERS"),
    ({"RULES_STREAM_FLUSH_MS": "60000"}, "RULES_STREAM_FLUSH_MS"),
    ({"RULES_PERCOLATR_URL": "embedded:"}, "RULES_PERCOLATR_URL"),
])
def test_bad_settings_name_the_variable(env, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_settings(environ=env)


def test_boolean_settings_parse_and_reject_garbage():
    assert load_settings(environ={"RULES_STREAM_OVERLAP_APPLY": "1"}).STREAM_OVERLAP_APPLY is True
    assert load_settings(environ={}).STREAM_OVERLAP_APPLY is False
    with pytest.raises(ConfigError, match="RULES_STREAM_OVERLAP_APPLY"):
        load_settings(environ={"RULES_STREAM_OVERLAP_APPLY": "maybe"})


def test_flush_window_setting():
    assert load_settings(environ={}).STREAM_FLUSH_MS == 200
    assert load_settings(environ={"RULES_STREAM_FLUSH_MS": "0"}).STREAM_FLUSH_MS == 0
