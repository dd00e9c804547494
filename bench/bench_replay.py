"""Replay throughput: scan a compacted ``users.last_seen`` topic of N users and backfill new audiences.

    python bench/bench_replay.py --users 1000000            # build the topic, then both scenarios
    python bench/bench_replay.py --users 10000000 --keep DIR  # the target size (builds once into DIR)

Builds (or reuses with ``--keep``) an embedded log whose ``users.last_seen`` holds one document per
user, shaped exactly like the stream writes them (``orjson`` of the normalised document, ``last_seen``
last, spread over 120 days), then runs the replay engine (``workers.replay.ReplayScan``: scan,
last_seen filter, percolate with ``rule_ids``, aggregate, exactly-once apply into a real
redis-server) for:

1. one new audience over 90 days (target: 10M users in < 60 s, >= 170,000 users/s);
2. 100 new audiences at once, one shared scan (target: 10M users in < 2 min).

``--workers N`` (default: the CPU count) splits each scan by partition over N worker processes, as
the replay coordinator does; ``--workers 1`` scans in this process.

Prints users/s (records scanned per second), elapsed and extrapolations to 10M. The machine is
shared: figures are noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from percolators.embedded import EmbeddedPercolator
from percolators.workload import generate_rules
from rules_service.config import Settings, load_settings
from rules_service.counters.redis_store import RedisCounters
from rules_service.domain import LAST_SEEN_TOPIC
from rules_service.normalize import bid_to_document, format_timestamp_ms
from workers.bidgen import BidGenerator
from workers.log.embedded import EmbeddedLog
from workers.log.port import Message
from workers.replay import DEFAULT_BATCH_SIZE, ReplayRequest, ReplayScan, plan_scan
from workers.topics import ensure_topic

DAY_MS = 86_400_000


def build_topic(log: EmbeddedLog, users: int, partitions: int, now_ms: int) -> float:
    settings = load_settings({"BIDS_PARTITIONS": partitions}, environ={})
    ensure_topic(log, LAST_SEEN_TOPIC, settings)
    generator = BidGenerator(seed=11, users=20_000, days=1)
    profiles = []
    for bid in generator.bids(20_000):
        assert isinstance(bid, dict)
        doc = bid_to_document(bid)
        doc.pop("user_id")
        doc.pop("last_seen")
        profiles.append(doc)
    rng = random.Random(5)
    producer = log.producer()
    began = time.perf_counter()
    batch: list[Message] = []
    dumps = orjson.dumps
    for i in range(users):
        uid = f"bench-{i:09d}"
        seen = format_timestamp_ms(now_ms - int(rng.random() * 120 * DAY_MS))
        doc = {"user_id": uid, **profiles[i % len(profiles)], "last_seen": seen}
        batch.append(Message(value=dumps(doc), key=uid.encode()))
        if len(batch) >= 20_000:
            producer.send_batch(LAST_SEEN_TOPIC, batch)
            batch = []
            if (i + 1) % 1_000_000 == 0:
                print(f"  built {i + 1:,} users", file=sys.stderr)
    if batch:
        producer.send_batch(LAST_SEEN_TOPIC, batch)
    producer.close()
    return time.perf_counter() - began


def run(log: EmbeddedLog, counters: RedisCounters, rules: list[dict], days: int, now: datetime,
        batch_size: int, label: str, prefilter: bool = True, workers: int = 1,
        worker_settings: Settings | None = None) -> dict[str, float]:
    now_ms = int(now.timestamp() * 1000)
    requests = [ReplayRequest(replay_id=f"{label}-{i}", rule_id=r["id"], query=r["query"],
                              since_ms=now_ms - days * DAY_MS, live_since_ms=now_ms) for i, r in enumerate(rules)]
    percolator = EmbeddedPercolator()
    scan = ReplayScan(log, percolator, counters, requests, scan_id=f"bench-{label}-{time.time_ns()}",
                      plan=plan_scan(log), dimensions=load_settings(environ={}).DIMENSIONS, batch_size=batch_size,
                      prefilter=prefilter, workers=workers, worker_settings=worker_settings)
    scan.load_rules()
    began = time.perf_counter()
    cpu_began = _cpu_seconds()
    progress = scan.run()
    elapsed = time.perf_counter() - began
    cpu = _cpu_seconds() - cpu_began
    matched = sum(progress.matched.values())
    rate = progress.records / elapsed
    print(f"{label}: {progress.records:,} users scanned, {progress.in_window:,} in window, {progress.kept:,} "
          f"decoded+percolated (survived the raw prefilter {scan.prefilter_info or 'off'}), {matched:,} matches, "
          f"{elapsed:.1f} s, {rate:,.0f} users/s; 10M users -> {10_000_000 / rate:.0f} s; "
          f"{workers} worker(s), CPU {cpu:.1f} s = {progress.records / max(cpu, 1e-9):,.0f} users per CPU-second "
          "(without redis-server)", flush=True)
    return {"elapsed_s": elapsed, "users_per_s": rate, "cpu_s": cpu}


def _cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (the scan's worker processes)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--audiences", type=int, default=100, help="audiences of the shared-scan scenario")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--scenarios", default="one,workload-one,many,worst",
                        help="comma list of: one (the bench rule), workload-one (a generate_rules rule), many "
                             "(--audiences generate_rules rules), worst (a rule without any keyword term)")
    parser.add_argument("--no-prefilter", action="store_true", help="decode every in-window document (before)")
    parser.add_argument("--keep", type=Path, default=None, help="build into / reuse this directory")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes of a scan, split by partition (1: in this process)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-replay-"))
    now = datetime.now(UTC) - timedelta(minutes=1)
    log = EmbeddedLog(root / "log")
    if LAST_SEEN_TOPIC not in log.list_topics():
        print(f"building users.last_seen with {args.users:,} users in {root}", file=sys.stderr)
        took = build_topic(log, args.users, args.partitions, int(now.timestamp() * 1000))
        print(f"built in {took:.1f} s ({args.users / took:,.0f} users/s)", file=sys.stderr)
    port = 6400 + random.randint(0, 500)
    redis_dir = Path(tempfile.mkdtemp(prefix="bench-replay-redis-"))
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(redis_dir)], stdout=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        counters = RedisCounters(client)
        # what the scan's worker processes build their log and counters from
        worker_settings = load_settings({"DATA_DIR": str(root), "REDIS_URL": f"redis://127.0.0.1:{port}"},
                                        environ={})
        rules = generate_rules(args.audiences, seed=3, prefix="bench")
        one = [{"id": "bench-one@v1", "query": {"bool": {"filter": [
            {"term": {"gender": "male"}}, {"range": {"age": {"gte": 26, "lte": 45}}},
            {"terms": {"device.os": ["iOS"]}}]}}}]
        worst = [{"id": "bench-worst@v1", "query": {"bool": {"filter": [
            {"range": {"age": {"gte": 26, "lte": 45}}},
            {"geo_distance": {"distance": "50km", "geo.location": {"lat": 51.4214, "lon": -0.2064}}}]}}}]
        scenarios = {"one": (one, "1 audience (bench rule)"),
                     "workload-one": (generate_rules(1, seed=3, prefix="bench-w"), "1 audience (workload rule)"),
                     "many": (rules, f"{args.audiences} audiences"),
                     "worst": (worst, "1 audience, age range + geo distance (no keyword term)")}
        for name in args.scenarios.split(","):
            chosen, label = scenarios[name]
            run(log, counters, chosen, args.days, now, args.batch_size, label, prefilter=not args.no_prefilter,
                workers=args.workers, worker_settings=worker_settings)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(redis_dir, ignore_errors=True)
        log.close()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
