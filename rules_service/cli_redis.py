"""``manage.py redis status|stop``, and :func:`clean_errors` for every CLI entry point.

The embedded redis-server (see :mod:`rules_service.redis_conn`) belongs to ``RULES_DATA_DIR`` and
outlives the processes that started it; ``redis stop`` is how an operator stops it (its AOF is
flushed first). Both commands only concern the embedded server: with ``RULES_REDIS_URL`` set there
is nothing embedded to report or stop.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from rules_service.cli import CliError
from rules_service.config import ConfigError, Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def _setting(name: str, default: str) -> str:
    try:
        value = getattr(load_settings(), name)
    except ConfigError:
        return default
    return str(value) if value else default


def describe(exc: BaseException, settings: Settings | None = None) -> str | None:
    """A one-line message naming the service, its URL and the setting, for a connection or
    configuration error; ``None`` for any other exception."""
    import redis

    from percolators.errors import PercolatorUnavailableError
    from rules_service.redis_conn import EmbeddedRedisError
    from workers.log.port import LogError

    def get(name: str, default: str) -> str:
        if settings is not None:
            value = getattr(settings, name)
            return str(value) if value else default
        return _setting(name, default)

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        url = get("REDIS_URL", "")
        where = url if url else f"embedded redis-server under {get('DATA_DIR', 'data')}"
        return f"cannot reach Redis at {where} (RULES_REDIS_URL): {exc}"
    if isinstance(exc, EmbeddedRedisError):
        return f"embedded Redis (RULES_REDIS_URL unset, RULES_DATA_DIR={get('DATA_DIR', 'data')}): {exc}"
    if isinstance(exc, LogError):
        return f"log {get('LOG_URL', 'embedded:')} (RULES_LOG_URL): {exc}"
    if isinstance(exc, PercolatorUnavailableError):
        return f"percolator {get('PERCOLATOR_URL', 'embedded:')} (RULES_PERCOLATOR_URL or --backend): {exc}"
    return None


@contextmanager
def clean_errors(settings: Settings | None = None) -> Iterator[None]:
    """Turn an unreachable Redis, log or percolator, or a bad setting, into a :class:`CliError`
    (exit 2, one line, no traceback). Other exceptions pass through."""
    try:
        yield
    except CliError:
        raise
    except Exception as exc:
        message = describe(exc, settings)
        if message is None:
            raise
        raise CliError(message) from None


def cli_errors(func: F) -> F:
    """Decorator form of :func:`clean_errors` for click command callbacks."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with clean_errors():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


@click.group("redis")
def redis_group() -> None:
    """The embedded redis-server of RULES_DATA_DIR (used when RULES_REDIS_URL is unset)."""


def _status(settings: Settings) -> dict[str, Any]:
    from rules_service.redis_conn import embedded_redis_status

    return embedded_redis_status(settings)


@redis_group.command("status")
def redis_status() -> None:
    """Print {"running", "pid", "socket", "data_dir"} of the embedded server as JSON."""
    settings = _settings()
    if settings.REDIS_URL:
        click.echo(json.dumps({"embedded": False, "running": None, "pid": None, "socket": None,
                               "redis_url": str(settings.REDIS_URL)}))
        click.echo("RULES_REDIS_URL is set: the service uses that server; nothing embedded runs", err=True)
        return
    click.echo(json.dumps({"embedded": True, **_status(settings)}))


@redis_group.command("stop")
def redis_stop() -> None:
    """Stop the embedded server (AOF flushed first); a no-op when it is not running."""
    from rules_service.redis_conn import EmbeddedRedisError, stop_embedded_redis

    settings = _settings()
    if settings.REDIS_URL:
        click.echo(f"RULES_REDIS_URL is set ({settings.REDIS_URL}): nothing embedded to stop", err=True)
        return
    before = _status(settings)
    try:
        stopped = stop_embedded_redis(settings)
    except EmbeddedRedisError as exc:
        raise CliError(str(exc)) from None
    click.echo(json.dumps({"stopped": stopped, "pid": before["pid"] if stopped else None,
                           "data_dir": before["data_dir"]}))
    if not stopped:
        click.echo("the embedded redis-server was not running", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(redis_group)
