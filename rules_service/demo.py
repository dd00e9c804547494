"""``python manage.py demo``: the whole system, embedded, in about a minute.

1. a fresh data directory (``<RULES_DATA_DIR>/demo``, i.e. ``./data/demo`` by default, or
   ``--data-dir``), with the embedded log, the embedded redis-server and the embedded percolator
   (``RULES_*_URL`` settings are ignored: the demo never touches a real deployment);
2. an advertiser, and example audiences registered through the real HTTP app (Flask test client);
3. a seeded, realistic OpenRTB bid stream over ``--days`` days (``workers.bidgen``) produced to
   ``bids`` and streamed by the worker's consumer (the ``worker --drain`` code path);
4. a new audience created afterwards with a 30-day lookback, backfilled by a replay of
   ``users.last_seen`` (the coordinator the Celery task runs, here in process);
5. audience sizes and insights as plain-text tables, read through the API;
6. the API served with waitress (URL, API key and a curl example printed) until Ctrl-C, or exit
   with ``--no-serve``. The embedded redis-server is stopped on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from rules_service.cli import CliError
from rules_service.config import ConfigError, Settings, load_settings

MARKER = ".rules-demo"
WIMBLEDON = {"lat": 51.4214, "lon": -0.2064}
CENTRAL_LONDON = {"lat": 51.5072, "lon": -0.1276}

#: (name, rule) registered before the stream.
AUDIENCES: list[tuple[str, dict[str, Any]]] = [
    ("Male teachers 26-35 within 5 km of Wimbledon on iOS", {"bool": {"filter": [
        {"term": {"gender": "male"}}, {"term": {"occupation": "teacher"}},
        {"range": {"age": {"gte": 26, "lte": 35}}},
        {"geo_distance": {"distance": "5km", "geo.location": WIMBLEDON}},
        {"term": {"device.os": "iOS"}}]}}),
    ("London runners and cyclists on Android", {"bool": {"filter": [
        {"geo_distance": {"distance": "20km", "geo.location": CENTRAL_LONDON}},
        {"terms": {"interests": ["running", "cycling"]}}, {"term": {"device.os": "Android"}}]}}),
    ("Football fans in Manchester or Leeds", {"bool": {"filter": [
        {"terms": {"geo.city": ["Manchester", "Leeds"]}}, {"term": {"interests": "football"}}]}}),
    ("Students in Scotland on EE or O2", {"bool": {"filter": [
        {"term": {"occupation": "student"}}, {"term": {"geo.region": "GB-SCT"}},
        {"terms": {"device.carrier": ["EE", "O2"]}}]}}),
]
#: Created after the stream, with a 30-day lookback: filled by a replay.
NEW_AUDIENCE = ("Nurses and doctors aged 25-45 in Birmingham (new, 30-day lookback)", {"bool": {"filter": [
    {"terms": {"occupation": ["nurse", "doctor"]}}, {"range": {"age": {"gte": 25, "lte": 45}}},
    {"term": {"geo.city": "Birmingham"}}]}})


def say(text: str) -> None:
    click.echo(text, err=True)


def bar(label: str, done: int, total: int, extra: str = "") -> None:
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r  {label:<10} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} {extra}   ")
    sys.stderr.flush()


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: left-aligned text, right-aligned numbers."""
    cells = [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], int) for r in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def prepare_data_dir(path: Path) -> None:
    """A fresh demo directory; refuses to delete a directory the demo did not create."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise CliError(f"{path} exists and was not created by the demo; choose another --data-dir")
        from rules_service.redis_conn import stop_embedded_redis

        stop_embedded_redis(Settings(DATA_DIR=path))
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("created by `manage.py demo`; deleted by the next run\n")


def _check(response: Any, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise CliError(f"{response.request.method} {response.request.path}: {response.status_code} "
                       f"{response.get_data(as_text=True)[:500]}")
    return response.get_json()


def produce_bids(settings: Settings, log: Any, *, users: int, bids: int, days: float, seed: int,
                 end: datetime) -> None:
    from workers.bidgen import BidGenerator
    from workers.log.port import Message

    generator = BidGenerator(seed=seed, users=users, days=days, end=end)
    producer = log.producer()
    pending: list[Message] = []
    sent = 0
    try:
        for key, value in generator.messages(bids):
            pending.append(Message(value=value, key=key))
            if len(pending) >= 5000:
                producer.send_batch(settings.BIDS_TOPIC, pending)
                sent += len(pending)
                pending = []
                bar("produce", sent, bids)
        if pending:
            producer.send_batch(settings.BIDS_TOPIC, pending)
            sent += len(pending)
        bar("produce", sent, bids)
        sys.stderr.write("\n")
    finally:
        producer.close()


def stream_bids(settings: Settings) -> dict[str, Any]:
    """The worker's drain path (``StreamConsumer`` built as ``worker --drain`` builds it), with a
    progress bar."""
    from workers.stream_runner import build_consumer

    with build_consumer(settings) as consumer:
        targets = consumer.end_offsets()
        total = sum(targets.values())
        consumer.stats.started_at = time.monotonic()
        while True:
            positions = consumer.positions()
            done = sum(min(positions[tp], end) for tp, end in targets.items())
            rate = consumer.stats.processed / max(time.monotonic() - consumer.stats.started_at, 1e-9)
            bar("stream", done, total, f"{rate:,.0f} bids/s")
            if all(positions[tp] >= end for tp, end in targets.items()):
                break
            consumer.run_once()
        consumer.flush()  # the last flush window: its bids are counted in the stats once written
        sys.stderr.write("\n")
        return consumer.stats.summary()


def run_replays(settings: Settings, replay_id: str) -> dict[str, Any]:
    from workers.replay_cli import follow
    from workers.replay_coordinator import ReplayCoordinator

    coordinator = ReplayCoordinator(settings)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            coordinator.run_pending(wait_for_lock_s=10)
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=work, daemon=True)
    runner.start()
    try:
        sys.stderr.write("  ")
        record = follow(coordinator.state, replay_id, runner, errors)
        runner.join()
        return record
    finally:
        coordinator.close()


def print_tables(client: Any, headers: dict[str, str], audiences: list[dict[str, Any]]) -> None:
    rows = []
    for doc in audiences:
        sizes = [_check(client.get(f"/v1/audiences/{doc['id']}/size?days={d}", headers=headers), 200)
                 for d in (7, 30, 90)]
        rows.append([doc["name"], sizes[0]["unique_users"], sizes[1]["unique_users"], sizes[2]["unique_users"],
                     sizes[2]["matches"], f"v{sizes[2]['version']}"])
    click.echo("\nAudience sizes (unique users; matched bids over 90 days)\n")
    click.echo(table(["audience", "7 days", "30 days", "90 days", "bids 90d", "version"], rows))
    dims = ["gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange"]
    query = "&".join(f"dimension={d}" for d in dims)
    for doc in (audiences[0], audiences[-1]):
        days = 30 if doc is audiences[-1] else 90
        data = _check(client.get(f"/v1/audiences/{doc['id']}/insights?days={days}&{query}", headers=headers), 200)
        rows = []
        for dim in dims:
            values = sorted(data["breakdowns"].get(dim, {}).items(), key=lambda kv: -kv[1])[:4]
            total = sum(data["breakdowns"].get(dim, {}).values()) or 1
            rows.append([dim, ", ".join(f"{v} {100 * n / total:.0f}%" for v, n in values) or "-"])
        click.echo(f"\nInsights: {doc['name']} (last {days} days, share of matched bids)\n")
        click.echo(table(["dimension", "top values"], rows))
        series = [p for p in data["series"] if p["unique_users"]][-7:]
        if series:
            click.echo("\n" + table(["day", "unique users", "matches"],
                                    [[p["start"][:10], int(p["unique_users"]), int(p["matches"])] for p in series]))


@click.command("demo")
@click.option("--serve/--no-serve", default=True, show_default=True, help="Leave the API serving at the end.")
@click.option("--users", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--bids", type=click.IntRange(1), default=200_000, show_default=True)
@click.option("--days", type=click.IntRange(1, 400), default=90, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fresh directory for the demo's data (default <RULES_DATA_DIR>/demo, i.e. ./data/demo).")
def demo_command(serve: bool, users: int, bids: int, days: int, seed: int, port: int, data_dir: Path | None) -> None:
    """Run the whole system embedded: bids in, audiences counted, a replay, tables out, API up."""
    try:
        base = load_settings()
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    path = (data_dir or base.DATA_DIR / "demo").expanduser().resolve()
    began = time.monotonic()
    say(f"== demo data in {path} (fresh)")
    prepare_data_dir(path)
    settings = base.with_overrides(DATA_DIR=path, REDIS_URL="", LOG_URL="embedded:", PERCOLATOR_URL="embedded:",
                                   CELERY_BROKER_URL="", RATE_LIMIT_PER_MINUTE=100_000)
    from rules_service.redis_conn import stop_embedded_redis

    # `kill`, `timeout` and service managers send SIGTERM, which ends Python without running
    # `finally`: the embedded redis-server (a daemon, so the API and workers can share it) was left
    # running. As SystemExit it unwinds like Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _run(settings, serve=serve, users=users, bids=bids, days=days, seed=seed, port=port, began=began)
    finally:
        stop_embedded_redis(settings)
        say("== embedded redis-server stopped")
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run(settings: Settings, *, serve: bool, users: int, bids: int, days: int, seed: int, port: int,
         began: float) -> None:
    from rules_service.api import create_app
    from rules_service.redis_conn import connect_redis
    from workers.log.factory import create_log
    from workers.topics import ensure_topics

    say("== starting the embedded redis-server and log")
    connect_redis(settings).ping()
    log = create_log(settings)
    ensure_topics(log, settings)
    app = create_app({"SETTINGS": settings})
    client = app.test_client()
    store = app.extensions["rules_service"].store
    advertiser, api_key = store.create_advertiser("Demo Advertiser")
    headers = {"Authorization": f"Bearer {api_key}"}

    say(f"== registering {len(AUDIENCES)} audiences through the API (POST /v1/audiences)")
    audiences = [_check(client.post("/v1/audiences", json={"name": name, "rule": rule}, headers=headers), 201)
                 for name, rule in AUDIENCES]

    end = datetime.now(UTC) - timedelta(minutes=1)
    say(f"== generating {bids:,} OpenRTB bids from {users:,} UK users over {days} days")
    produce_bids(settings, log, users=users, bids=bids, days=days, seed=seed, end=end)
    say("== streaming the bids: percolate every bid, count unique users, matches and dimensions")
    summary = stream_bids(settings)
    say(f"   {summary['processed']:,} bids, {summary['matched']:,} matches, {summary['dlq']} dead letters, "
        f"{summary['bids_per_s']:,.0f} bids/s")

    name, rule = NEW_AUDIENCE
    say("== creating a new audience with a 30-day lookback; replaying users.last_seen to backfill it")
    new = _check(client.post("/v1/audiences", json={"name": name, "rule": rule, "lookback_days": 30},
                             headers=headers), 201)
    replay_id = new["backfill"]["replay_id"]
    if not replay_id:
        raise CliError(f"the replay was not requested: {new['backfill']}")
    record = run_replays(settings, replay_id)
    if record.get("status") != "done":
        raise CliError(f"replay {replay_id} ended {record.get('status')}: {record.get('error')}")
    progress = record.get("progress") or {}
    say(f"   replay {replay_id}: {progress.get('records', 0):,} users scanned, {progress.get('matched', 0):,} matched "
        f"in {progress.get('elapsed_seconds', 0)} s")
    audiences.append(_check(client.get(f"/v1/audiences/{new['id']}", headers=headers), 200))

    print_tables(client, headers, audiences)
    say(f"\n== done in {time.monotonic() - began:.0f} s")
    log.close()
    if not serve:
        return
    url = f"http://127.0.0.1:{port}"
    click.echo(f"\nAPI serving at {url}  (Ctrl-C to stop)\nAPI key of '{advertiser.name}': {api_key}\n"
               f"Try:\n  curl -H 'Authorization: Bearer {api_key}' "
               f"'{url}/v1/audiences/{audiences[0]['id']}/size?days=30'"
               f"\n  curl -H 'Authorization: Bearer {api_key}' '{url}/v1/audiences'\n")
    import waitress

    with contextlib.suppress(KeyboardInterrupt):
        waitress.serve(app, host="127.0.0.1", port=port, threads=4)


def register(cli: click.Group) -> None:
    cli.add_command(demo_command)
