#!/usr/bin/env python
"""API latency and throughput with many audiences and 90 days of counters.

Starts its own redis-server, creates ``--audiences`` audiences for one advertiser and writes
``--days`` days of counters for each through RedisCounters.apply (day sketches and matches, hour
sketches and matches for the hour-retention window, day dimensions), then measures:

1. in-process (Flask test client, no network): p50/p99 of ``GET /v1/audiences/<id>/size?days=90``
   and of the 100-audience dashboard read ``GET /v1/audiences/sizes?ids=...&days=90``;
2. over loopback through waitress (``manage.py serve`` in its own process): the same two
   latencies from one client, then the sustained requests/s of ``size?days=90`` with
   ``--clients`` concurrent keep-alive clients (threads of the bench process).

Size reads use the closed-days cache (``rules_service.api.batch_counts``): the first read of a
rule in a minute builds it, later ones hit it; the dashboard is also timed with a cold cache.

Every request includes authentication and the rate-limit counter (the limit is set high).
Targets: size p99 < 10 ms, dashboard p99 < 50 ms. The machine is shared: figures are noisy.

    python bench/bench_api.py                       # 1,000 audiences x 90 days
    python bench/bench_api.py --audiences 50 --days 10 --requests 200 --seconds 3   # quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from rules_service.config import load_settings
from rules_service.counters.port import CounterBatch
from rules_service.domain import rule_id
from rules_service.store import AudienceStore, new_audience

ROOT = Path(__file__).resolve().parents[1]

HOUR, DAY = 3600, 86400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    from rules_service.redis_conn import redis_server_binary

    binary = shutil.which("redis-server") or redis_server_binary()
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def fill(counters, store: AudienceStore, advertiser_id: str, audiences: int, days: int, users_per_day: int,
         hour_days: int) -> list[str]:
    """Audiences and their counters: each day has ``users_per_day`` users from a pool of 3x that."""
    rng = random.Random(7)
    now = int(time.time())
    today = now - now % DAY
    ids = []
    for n in range(audiences):
        doc = new_audience(advertiser_id, f"audience {n}", {"term": {"gender": "male"}}, 0)
        store.create_audience(doc)
        ids.append(doc["id"])
        rid = rule_id(doc["id"], 1)
        pool = [f"u{n}-{i}" for i in range(users_per_day * 3)]
        batch = CounterBatch()
        for d in range(days):
            day = today - d * DAY
            users = set(rng.sample(pool, users_per_day))
            batch.users[(rid, "day", day)] = users
            batch.matches[(rid, "day", day)] = users_per_day * 2
            batch.dimensions[(rid, day, "gender")] = {"male": users_per_day * 2}
            if d < hour_days:
                hour_users = list(users)
                for h in range(24):
                    batch.users[(rid, "hour", day + h * HOUR)] = set(hour_users[h::24])
                    batch.matches[(rid, "hour", day + h * HOUR)] = max(1, users_per_day * 2 // 24)
        counters.apply(batch, "bench", {("bids", 0): n + 1})
    return ids


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1000  # noqa: E731
    return f"p50 {p(0.50):.2f} ms  p90 {p(0.90):.2f} ms  p99 {p(0.99):.2f} ms  max {samples[-1] * 1000:.2f} ms " \
           f"(n={len(samples)}, mean {statistics.mean(samples) * 1000:.2f} ms)"


def time_calls(call, n: int) -> list[float]:
    for _ in range(min(20, n)):
        call()  # warm up
    out = []
    for _ in range(n):
        began = time.perf_counter()
        call()
        out.append(time.perf_counter() - began)
    return out


def http_get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> bytes:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {body[:300]!r}")
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audiences", type=int, default=1000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users-per-day", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per latency measurement")
    parser.add_argument("--dashboard", type=int, default=100, help="audiences per dashboard read")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput run")
    parser.add_argument("--threads", type=int, default=8, help="waitress threads")
    parser.add_argument("--seconds", type=float, default=10, help="duration of the throughput run")
    args = parser.parse_args()

    from rules_service.api import create_app
    from rules_service.counters.factory import create_counters

    workdir = Path(tempfile.mkdtemp(prefix="bench_api_"))
    redis_proc, url = start_redis(workdir)
    try:
        settings = load_settings({"REDIS_URL": url, "RATE_LIMIT_PER_MINUTE": 1_000_000_000,
                                  "DATA_DIR": str(workdir)}, environ={})
        client = redis.Redis.from_url(url)
        store = AudienceStore(client)
        counters = create_counters(settings, client)
        advertiser, key = store.create_advertiser("bench")
        began = time.perf_counter()
        ids = fill(counters, store, advertiser.id, args.audiences, args.days, args.users_per_day,
                   min(args.days, settings.HOUR_RETENTION_DAYS))
        info = client.info("memory")
        print(f"filled {args.audiences} audiences x {args.days} days ({args.users_per_day} users/day) in "
              f"{time.perf_counter() - began:.1f} s; redis used_memory {info['used_memory_human']}")
        headers = {"Authorization": f"Bearer {key}"}
        rng = random.Random(1)
        dash_ids = ids[: args.dashboard]
        dash_path = f"/v1/audiences/sizes?ids={','.join(dash_ids)}&days=90"

        app = create_app({"SETTINGS": settings, "REDIS": client, "COUNTERS": counters})
        test_client = app.test_client()
        probe = test_client.get(f"/v1/audiences/{ids[0]}/size?days=90", headers=headers).get_json()
        print(f"sample size: {json.dumps(probe)}")

        def in_process_size() -> None:
            response = test_client.get(f"/v1/audiences/{rng.choice(ids)}/size?days=90", headers=headers)
            assert response.status_code == 200, response.data

        def in_process_dashboard() -> None:
            response = test_client.get(dash_path, headers=headers)
            assert response.status_code == 200 and len(response.get_json()["sizes"]) == len(dash_ids)

        print(f"in-process size?days=90      : {percentiles(time_calls(in_process_size, args.requests))}")
        print(f"in-process dashboard ({len(dash_ids)} ids): "
              f"{percentiles(time_calls(in_process_dashboard, max(50, args.requests // 10)))}")

        def flush_cache() -> None:
            for cache_key in client.scan_iter(match="c:*:cache:*", count=1000):
                client.delete(cache_key)

        def cold(call):
            def run() -> None:
                flush_cache()
                began = time.perf_counter()
                call()
                cold_samples.append(time.perf_counter() - began)
            return run

        cold_samples: list[float] = []
        for _ in range(max(20, args.requests // 40)):
            cold(in_process_dashboard)()
        print(f"in-process dashboard, cold cache: {percentiles(cold_samples)}")

        port = free_port()
        # The production entry point in its own process, so the clients here do not share its GIL.
        env = {**os.environ, "RULES_REDIS_URL": url, "RULES_RATE_LIMIT_PER_MINUTE": "1000000000",
               "RULES_DATA_DIR": str(workdir)}
        server = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port),
                                   "--threads", str(args.threads)], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            conn = http.client.HTTPConnection("127.0.0.1", port)
            size_http = time_calls(lambda: http_get(conn, f"/v1/audiences/{rng.choice(ids)}/size?days=90", headers),
                                   args.requests)
            print(f"waitress size?days=90        : {percentiles(size_http)}")
            dash_http = time_calls(lambda: http_get(conn, dash_path, headers), max(50, args.requests // 10))
            print(f"waitress dashboard ({len(dash_ids)} ids)  : {percentiles(dash_http)}")
            conn.close()

            done = [0] * args.clients
            latencies: list[list[float]] = [[] for _ in range(args.clients)]
            stop = time.monotonic() + args.seconds

            def client_loop(n: int) -> None:
                own = http.client.HTTPConnection("127.0.0.1", port)
                local = random.Random(n)
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    http_get(own, f"/v1/audiences/{local.choice(ids)}/size?days=90", headers)
                    latencies[n].append(time.perf_counter() - t0)
                    done[n] += 1
                own.close()

            workers = [threading.Thread(target=client_loop, args=(n,)) for n in range(args.clients)]
            t0 = time.monotonic()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.monotonic() - t0
            print(f"sustained size?days=90 through waitress ({args.threads} threads; {args.clients} keep-alive "
                  f"clients in the bench process): {sum(done) / elapsed:.0f} requests/s; "
                  f"{percentiles([x for lat in latencies for x in lat])}")
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
