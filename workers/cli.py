"""``manage.py worker``, ``manage.py produce`` and ``manage.py generate-bids``.

Thin entry points: they decode flags and call ``workers.stream_runner``, ``workers.celery_app``
and ``workers.bidgen``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import IO

import click
import orjson

from rules_service.cli import CliError
from rules_service.cli_redis import cli_errors
from rules_service.config import ConfigError, Settings, load_settings

PRODUCE_BATCH = 1000


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _parse_partitions(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise CliError(f"--partitions {text!r}: expected comma-separated partition numbers, e.g. 0,2") from None


@click.command("worker")
@click.option("--drain", is_flag=True, help="Process `bids` up to its current end, print a summary, exit.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Stream consumer processes (the partitions of `bids` are split between them).")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=None,
              help="Records per batch (default RULES_BATCH_SIZE).")
@click.option("--partitions", default=None, help="Consume only these partitions of `bids` (e.g. 0,1).")
@click.option("--loglevel", default="INFO", show_default=True)
@cli_errors
def worker_command(drain: bool, concurrency: int, batch_size: int | None, partitions: str | None,
                   loglevel: str) -> None:
    """Run a Celery worker whose stream consumers turn `bids` into audience counters.

    Without --drain: a Celery worker (broker: the counters' Redis or RULES_CELERY_BROKER_URL) that
    runs replay tasks and, through its bootstep, CONCURRENCY stream consumer processes; SIGTERM
    stops it after the current batch. With --drain: the same consumers run until every partition
    reaches the end offset seen at start, then a JSON summary is printed."""
    import logging

    settings = _settings()
    chosen = _parse_partitions(partitions)
    if drain:
        from workers.stream_runner import drain as run_drain

        logging.basicConfig(level=getattr(logging, loglevel.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            summary = run_drain(settings, processes=concurrency, partitions=chosen, batch_size=batch_size,
                                handle_signals=True)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        click.echo(json.dumps(summary))
        return

    from workers.celery_app import create_celery

    app = create_celery(settings, stream={"enabled": True, "processes": concurrency, "partitions": chosen,
                                          "batch_size": batch_size})
    # The task pool (replays) gets one process: the stream consumers are the CPU-heavy part.
    app.worker_main(argv=["worker", f"--loglevel={loglevel}", "--concurrency=1", "--without-gossip",
                          "--without-mingle"])


def _lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(handle, start=1):
        stripped = line.strip()
        if stripped:
            yield number, stripped


def _key_for(topic: str, value: object) -> bytes | None:
    from rules_service.domain import RULES_TOPIC
    from workers.bidgen import user_key

    if topic == RULES_TOPIC and isinstance(value, dict):
        try:
            from rules_service.domain import rule_id

            return rule_id(str(value["audience_id"]), int(value["version"])).encode()
        except (KeyError, TypeError, ValueError):
            return None
    if isinstance(value, dict) and isinstance(value.get("user_id"), str) and value["user_id"]:
        return str(value["user_id"]).encode()  # a user document (users.last_seen)
    return user_key(value)


@click.command("produce")
@click.argument("topic")
@click.argument("file", type=click.File("rb"), default="-")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=PRODUCE_BATCH, show_default=True)
@click.option("--create", is_flag=True,
              help="Create TOPIC if it does not exist (standard topics are always created).")
@cli_errors
def produce_command(topic: str, file: IO[bytes], batch_size: int, create: bool) -> None:
    """Append JSON lines from FILE (default stdin) to TOPIC.

    A standard topic (bids, its .dlq, users.last_seen, audiences.rules, replays) is created with
    its standard spec if needed; any other topic must exist unless --create is given, so a typo
    in the name is an error rather than a new topic that nothing reads.

    Keys: a bid's user id (user.id, else device.ifa), so a user's bids stay in order in one
    partition; a rule change's rule id. A line that is not JSON is reported with its line number;
    every valid line is still produced, and the exit status is 1."""
    from workers.log.factory import create_log
    from workers.log.port import LogError, Message
    from workers.topics import ensure_topic, standard_topics

    settings = _settings()
    log = create_log(settings)
    bad = produced = 0
    try:
        if not create and topic not in standard_topics(settings):
            existing = sorted(log.list_topics())
            if topic not in existing:
                raise CliError(f"topic {topic!r} does not exist (existing: {', '.join(existing) or 'none'}); "
                               "check the name, or pass --create to create it")
        ensure_topic(log, topic, settings)
        producer = log.producer()
        pending: list[Message] = []
        for number, line in _lines(file):
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                bad += 1
                click.echo(f"line {number}: not JSON ({exc}); skipped", err=True)
                continue
            pending.append(Message(value=line, key=_key_for(topic, value)))
            if len(pending) >= batch_size:
                producer.send_batch(topic, pending)
                produced += len(pending)
                pending = []
        if pending:
            producer.send_batch(topic, pending)
            produced += len(pending)
        producer.close()
    except LogError as exc:
        raise CliError(f"{topic}: {exc} ({produced} messages were produced before the error)") from None
    finally:
        log.close()
    click.echo(json.dumps({"topic": topic, "produced": produced, "bad_lines": bad}), err=True)
    if bad:
        sys.exit(1)


@click.command("generate-bids")
@click.option("--users", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--bids", "count", type=click.IntRange(0), default=100_000, show_default=True)
@click.option("--days", type=click.FloatRange(0, min_open=True), default=7.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--end", default=None, help="ISO 8601 end of the time span (default 2026-11-22T12:00Z).")
@click.option("--invalid-rate", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Fraction of broken messages (for dead-letter paths).")
def generate_bids_command(users: int, count: int, days: float, seed: int, end: str | None,
                          invalid_rate: float) -> None:
    """Write a realistic, seeded OpenRTB 2.5 bid stream as JSON lines to stdout."""
    from workers.bidgen import BidGenerator, parse_end

    try:
        end_at = parse_end(end)
    except ValueError:
        raise CliError(f"--end {end!r}: expected an ISO 8601 time such as 2026-11-22T12:00:00Z") from None
    generator = BidGenerator(seed=seed, users=users, days=days, end=end_at, invalid_rate=invalid_rate)
    out = sys.stdout.buffer
    chunk: list[bytes] = []
    for _key, value in generator.messages(count):
        chunk.append(value.replace(b"\n", b" "))
        if len(chunk) >= 5000:
            out.write(b"\n".join(chunk) + b"\n")
            chunk = []
    if chunk:
        out.write(b"\n".join(chunk) + b"\n")
    out.flush()


def register(cli: click.Group) -> None:
    cli.add_command(worker_command)
    cli.add_command(produce_command)
    cli.add_command(generate_bids_command)
