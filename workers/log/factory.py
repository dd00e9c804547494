"""Choose the log backend from the settings (``RULES_LOG_URL``).

* unset / ``embedded:`` -> :class:`~workers.log.embedded.EmbeddedLog` under ``RULES_DATA_DIR/log``.
* ``kafka://host:9092[,host2:9092][?options]`` -> :class:`~workers.log.kafka.KafkaLog`. Options:
  ``api_version=0.9`` (or ``2.8.0``...; default: negotiated with the broker),
  ``client_id=...``, ``replication_factor=N`` (for topics created through the admin client,
  default 1), ``request_timeout_ms=N``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from rules_service.config import ConfigError, Settings
from workers.log.port import Log

_KAFKA_OPTIONS = {"api_version", "client_id", "replication_factor", "request_timeout_ms"}


def parse_api_version(text: str) -> tuple[int, ...]:
    """``"0.9"`` -> ``(0, 9)``; ``"2.8.1"`` -> ``(2, 8, 1)``."""
    try:
        parts = tuple(int(p) for p in text.strip().split("."))
    except ValueError:
        parts = ()
    if not 2 <= len(parts) <= 3:
        raise ConfigError(f"RULES_LOG_URL: api_version={text!r}: expected something like 0.9 or 2.8.1")
    return parts


def kafka_options_from_url(url: str) -> dict[str, Any]:
    """Keyword arguments of :class:`~workers.log.kafka.KafkaLog` from a ``kafka://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ConfigError(f"RULES_LOG_URL={url!r}: expected kafka://host:port[,host:port][?api_version=0.9]")
    hosts = [h.strip() for h in parts.netloc.split(",") if h.strip()]
    if not hosts:
        raise ConfigError(f"RULES_LOG_URL={url!r}: no broker address")
    for host in hosts:
        if ":" not in host:
            raise ConfigError(f"RULES_LOG_URL={url!r}: broker {host!r} needs a port (host:9092)")
    options: dict[str, Any] = {"bootstrap_servers": hosts}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _KAFKA_OPTIONS:
            known = ", ".join(sorted(_KAFKA_OPTIONS))
            raise ConfigError(f"RULES_LOG_URL={url!r}: unknown option {key!r} (known: {known})")
        if key == "api_version":
            options[key] = parse_api_version(value)
        elif key in ("replication_factor", "request_timeout_ms"):
            try:
                options[key] = int(value)
            except ValueError:
                raise ConfigError(f"RULES_LOG_URL={url!r}: {key} must be an integer, got {value!r}") from None
        else:
            options[key] = value
    return options


def create_log(settings: Settings) -> Log:
    """The log the settings ask for. No connection is made until the log is used."""
    if settings.log_backend == "embedded":
        from workers.log.embedded import EmbeddedLog

        return EmbeddedLog(settings.DATA_DIR / "log")
    from workers.log.kafka import KafkaLog

    return KafkaLog(**kafka_options_from_url(settings.LOG_URL))
