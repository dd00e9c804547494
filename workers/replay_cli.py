"""``manage.py replay AUDIENCE_ID --days N [--no-wait]`` and ``manage.py replay --pending``.

Requests a replay of the audience's newest version exactly as the API does (a record plus a
message on ``replays``), then runs the coordinator in this process with a progress line on stderr
and prints a JSON summary. If a worker's coordinator already holds the lock, it shows the progress
of that worker's run instead. ``--no-wait`` only requests it (a worker runs it).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import click

from rules_service.cli import CliError
from rules_service.cli_redis import cli_errors
from rules_service.config import ConfigError, Settings, load_settings

TERMINAL = ("done", "failed", "cancelled")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def progress_line(record: dict[str, Any]) -> str:
    progress = record.get("progress") or {}
    total = int(progress.get("total") or 0)
    scanned = int(progress.get("scanned") or 0)
    width = 30
    filled = int(width * scanned / total) if total else (width if record.get("status") == "done" else 0)
    eta = progress.get("eta_seconds")
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {scanned:,}/{total:,} scanned, "
            f"{int(progress.get('matched') or 0):,} matched, {float(progress.get('rate') or 0):,.0f}/s, "
            f"eta {'-' if eta is None else f'{eta:.0f}s'}  {record.get('status', '')}   ")


def follow(state: Any, replay_id: str, runner: threading.Thread | None, errors: list[BaseException],
           stream: Any = None) -> dict[str, Any]:
    """Redraw the progress line until the replay is finished (or the in-process runner failed)."""
    stream = stream or sys.stderr
    while True:
        record = state.get(replay_id) or {}
        stream.write(progress_line(record))
        stream.flush()
        if record.get("status") in TERMINAL:
            stream.write("\n")
            return record
        if errors:
            stream.write("\n")
            raise CliError(f"replay {replay_id}: {type(errors[0]).__name__}: {errors[0]} "
                           "(it resumes from its checkpoint on the next run)")
        if runner is not None and not runner.is_alive():
            runner = None  # another coordinator has it: keep following its progress
        time.sleep(0.2)


def run_in_process(settings: Settings, replay_id: str | None) -> dict[str, Any]:
    from workers.replay_coordinator import ReplayCoordinator

    coordinator = ReplayCoordinator(settings)
    errors: list[BaseException] = []
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            result = coordinator.run_pending()
            outcome.update(busy=result.busy, scans=result.scans, finished=result.finished)
        except BaseException as exc:  # reported by follow()
            errors.append(exc)

    runner = threading.Thread(target=work, name="replay", daemon=True)
    runner.start()
    try:
        if replay_id is None:
            runner.join()
            if errors:
                raise CliError(f"{type(errors[0]).__name__}: {errors[0]}")
            return outcome
        record = follow(coordinator.state, replay_id, runner, errors)
        runner.join()
        return record
    finally:
        coordinator.close()


@click.command("replay")
@click.argument("audience_id", required=False)
@click.option("--days", type=click.IntRange(min=1), default=None,
              help="Look back this many days (at most RULES_DAY_RETENTION_DAYS, as in the API).")
@click.option("--no-wait", is_flag=True, help="Only request the replay; a worker runs it.")
@click.option("--pending", is_flag=True, help="Run every pending or interrupted replay in this process.")
@cli_errors
def replay_command(audience_id: str | None, days: int | None, no_wait: bool, pending: bool) -> None:
    """Backfill AUDIENCE_ID's newest version over the last --days days from users.last_seen."""
    settings = _settings()
    if pending:
        click.echo(json.dumps(run_in_process(settings, None)))
        return
    if not audience_id or days is None:
        raise CliError("give AUDIENCE_ID and --days N (or --pending)")
    if days > settings.DAY_RETENTION_DAYS:
        raise CliError(f"--days {days}: at most {settings.DAY_RETENTION_DAYS} (RULES_DAY_RETENTION_DAYS)")
    from rules_service.backfills import RedisBackfills
    from rules_service.domain import REPLAYS_TOPIC, RULES_TOPIC
    from rules_service.redis_conn import connect_redis
    from rules_service.store import AudienceStore
    from workers.log.factory import create_log
    from workers.topics import ensure_topics

    redis = connect_redis(settings)
    store = AudienceStore(redis)
    doc = store.get_audience(audience_id)
    if doc is None:
        raise CliError(f"audience {audience_id!r} does not exist")
    log = create_log(settings)
    try:
        ensure_topics(log, settings, [REPLAYS_TOPIC, RULES_TOPIC])
        producer = log.producer()
        try:
            replay_id = RedisBackfills(redis, producer).start(doc, doc["version"], days)
        finally:
            producer.close()
    finally:
        log.close()
    store.set_backfill(audience_id, {"status": "pending", "days": days, "replay_id": replay_id, "progress": None},
                       version=doc["version"])
    click.echo(f"replay {replay_id}: audience {audience_id} version {doc['version']}, last {days} days", err=True)
    if no_wait:
        click.echo(json.dumps({"replay_id": replay_id, "status": "pending"}))
        return
    record = run_in_process(settings, replay_id)
    summary = {"replay_id": replay_id, "audience_id": audience_id, "version": doc["version"], "days": days,
               "status": record.get("status"), "error": record.get("error"), **(record.get("progress") or {})}
    click.echo(json.dumps(summary))
    if record.get("status") != "done":
        sys.exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(replay_command)
