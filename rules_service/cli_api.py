"""``manage.py serve`` and ``manage.py advertisers create|list|rotate-key|revoke``.

``serve`` runs the API under waitress, a production WSGI server (pure Python, no C build, runs on
every platform). Server-Sent Events (``/v1/audiences/<id>/live``) hold one worker thread per open
stream for as long as the client listens, so ``--threads`` bounds the number of concurrent live
dashboards plus in-flight requests: size it above the expected number of open streams.
"""

from __future__ import annotations

import json

import click

from rules_service.cli import CliError
from rules_service.cli_redis import cli_errors
from rules_service.config import ConfigError, Settings, load_settings
from rules_service.store import AudienceStore


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _store(settings: Settings) -> AudienceStore:
    from rules_service.redis_conn import connect_redis

    try:
        client = connect_redis(settings)
        client.ping()
    except Exception as exc:
        raise CliError(f"cannot reach Redis ({settings.REDIS_URL or 'embedded'}) (RULES_REDIS_URL): {exc}") from None
    return AudienceStore(client)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Worker threads; each open SSE stream holds one.")
@cli_errors
def serve_command(host: str, port: int, threads: int) -> None:
    """Serve the REST API (waitress). Redis must answer at start-up."""
    import waitress

    from rules_service.api import create_app

    settings = _settings()
    _store(settings)  # fail fast with a clean error rather than serve 5xx on every request
    app = create_app({"SETTINGS": settings})
    click.echo(f"serving the API on http://{host}:{port} ({threads} threads); OpenAPI at /v1/openapi.json",
               err=True)
    waitress.serve(app, host=host, port=port, threads=threads, ident="audience-rules",
                   # connection_limit above threads: idle keep-alive connections do not hold threads
                   connection_limit=max(100, threads * 4), channel_timeout=120)


@click.group("advertisers")
def advertisers() -> None:
    """Manage advertisers (tenants) and their API keys."""


@advertisers.command("create")
@click.argument("name")
@cli_errors
def create_advertiser(name: str) -> None:
    """Create an advertiser; prints {"id", "name", "api_key"} (the key is shown only once)."""
    if not name.strip() or len(name) > 200:
        raise CliError("NAME must be 1-200 characters")
    advertiser, api_key = _store(_settings()).create_advertiser(name)
    click.echo(json.dumps({"id": advertiser.id, "name": advertiser.name, "api_key": api_key}))


@advertisers.command("list")
@cli_errors
def list_advertisers() -> None:
    """List advertisers as JSON lines (never their keys)."""
    for advertiser in _store(_settings()).list_advertisers():
        click.echo(json.dumps(advertiser.to_dict()))


@advertisers.command("rotate-key")
@click.argument("advertiser_id")
@cli_errors
def rotate_key(advertiser_id: str) -> None:
    """Issue a new API key (the old one stops working; re-enables a revoked advertiser)."""
    api_key = _store(_settings()).rotate_key(advertiser_id)
    if api_key is None:
        raise CliError(f"no advertiser {advertiser_id!r}")
    click.echo(json.dumps({"id": advertiser_id, "api_key": api_key}))


@advertisers.command("revoke")
@click.argument("advertiser_id")
@cli_errors
def revoke_advertiser(advertiser_id: str) -> None:
    """Revoke an advertiser's API key (its audiences stay; ``rotate-key`` issues a new one)."""
    if not _store(_settings()).revoke_advertiser(advertiser_id):
        raise CliError(f"no advertiser {advertiser_id!r}")
    click.echo(json.dumps({"id": advertiser_id, "revoked": True}))


def register(cli: click.Group) -> None:
    cli.add_command(serve_command)
    cli.add_command(advertisers)
