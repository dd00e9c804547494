#!/usr/bin/env python
"""End-to-end stream bench: bids in the embedded log -> percolation against N audiences -> counters
in a real redis-server (started here), with figures printed as JSON lines.

Phase 1, throughput: produce ``--bids`` generated bids (workers.bidgen), then drain them with
``--processes`` consumer processes (the partitions of ``bids`` split between them): bids/s.
Phase 2, latency: consumers stream while this script produces at ``--rate`` bids/s for
``--seconds``; a poller reads the offsets the counters store (atomically with the counters) every
few ms, so "bid entering the log -> its counters readable" is measured from outside, per produced
batch: p50/p99/max.
Memory: peak RSS of each consumer process, the redis-server's used memory, the log's size on disk.

Examples:
    python bench/bench_stream.py                     # 200k bids, 10k audiences, 2 processes
    python bench/bench_stream.py --bids 20000 --rules 1000 --seconds 5   # quick
    python bench/bench_stream.py --profile --bids 20000                  # cProfile one process
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from rules_service.config import Settings  # noqa: E402
from rules_service.domain import RULES_TOPIC, RuleChange  # noqa: E402
from workers.bidgen import BidGenerator  # noqa: E402
from workers.log.port import Message  # noqa: E402


def emit(**figures: Any) -> None:
    print(json.dumps(figures), flush=True)


def start_redis(workdir: Path, extra: list[str] | None = None, *, tcp: bool = False
                ) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server with the embedded one's settings (rules_service.redis_conn): a unix socket
    and an append-only file, unless ``tcp`` (a TCP port on 127.0.0.1, like a remote server)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if tcp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        listen = ["--port", str(port), "--bind", "127.0.0.1"]
        url = f"redis://127.0.0.1:{port}/0"
    else:
        path = workdir / "redis.sock"  # a short path under /tmp: sun_path holds 108 bytes
        listen = ["--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"]
        url = f"unix://{path}?db=0"
    from rules_service.redis_conn import TUNING

    proc = subprocess.Popen([binary, *listen, "--dir", str(workdir),
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", *TUNING,
                             *(extra or [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    return proc, url


def rule_changes(count: int) -> list[Message]:
    try:
        from percolators.workload import generate_rules
    except ImportError:  # pragma: no cover - the workload generator ships with the percolator
        raise SystemExit("percolators.workload is needed for realistic rules") from None
    out = []
    for rule in generate_rules(count, seed=1):
        audience, version = rule["id"].rsplit("@v", 1)
        change = RuleChange(audience_id=audience, advertiser_id=f"adv-{hash(audience) % 50}", version=int(version),
                            query=rule["query"])
        out.append(Message(value=change.to_json(), key=change.rule_id.encode()))
    return out


def produce(log: Any, topic: str, pairs: list[tuple[bytes | None, bytes]], batch: int = 2000) -> float:
    producer = log.producer()
    began = time.perf_counter()
    for i in range(0, len(pairs), batch):
        producer.send_batch(topic, [Message(value=v, key=k) for k, v in pairs[i:i + batch]])
    producer.close()
    return time.perf_counter() - began


#: The latency phase also reports its p99 per slice of this many seconds of production.
SLICE_S = 2
#: ... and its p99 from this many seconds on (a multiple of SLICE_S).
STEADY_AFTER_S = 6


def latency_phase(settings: Settings, log: Any, generator: BidGenerator, args: argparse.Namespace,
                  url: str) -> dict[str, Any]:
    from workers.stream_runner import StreamSupervisor

    total = int(args.rate * args.seconds)
    pairs = list(generator.messages(total, start_index=10_000_000))
    supervisor = StreamSupervisor(settings, processes=args.processes,
                                  batch_size=args.latency_batch_size or args.batch_size)
    supervisor.start()
    client = redis.Redis.from_url(url)
    # wait until the consumers have caught up with everything produced so far
    parts = log.partitions(settings.BIDS_TOPIC)
    consumer = log.consumer(None)
    consumer.assign(parts)

    def stored() -> dict[int, int]:
        raw = client.hgetall("o:stream")
        return {int(k.decode().rsplit(":", 1)[1]): int(v) for k, v in raw.items()}

    # Warm-up bids: the consumers are ready only once they have applied these (loading 10k rules
    # takes seconds; the throughput phase's offsets alone would say "caught up" too early).
    warm = log.producer()
    warm.send_batch(settings.BIDS_TOPIC, [Message(value=v, key=k)
                                          for k, v in generator.messages(200, start_index=20_000_000)])
    warm.close()
    ends = consumer.end_offsets(parts)
    deadline = time.monotonic() + 300
    while any(stored().get(tp.partition, 0) < end for tp, end in ends.items()):
        if time.monotonic() > deadline:
            raise SystemExit("consumers did not catch up within 300 s")
        time.sleep(0.05)

    rewrites_before = client.info("persistence")["aof_rewrites"]
    delayed_before = client.info("persistence")["aof_delayed_fsync"]
    pending: list[tuple[float, dict[int, int], int]] = []  # (produced at, max offset per partition, count)
    lock = threading.Lock()
    latencies: list[tuple[float, int]] = []
    slices: dict[int, list[tuple[float, int]]] = {}  # the same, per SLICE_S of production: is the tail steady?
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() or pending:
            offsets = stored()
            now = time.monotonic()
            with lock:
                while pending and all(offsets.get(p, 0) > o for p, o in pending[0][1].items()):
                    at, _, n = pending.pop(0)
                    latencies.append((now - at, n))
                    slices.setdefault(int((at - began) // SLICE_S), []).append((now - at, n))
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    producer = log.producer()
    tick = 0.05
    per_tick = max(1, int(args.rate * tick))
    began = time.monotonic()
    sent = 0
    while sent < total:
        chunk = pairs[sent:sent + per_tick]
        placed = producer.send_rows(settings.BIDS_TOPIC, [(k, v, None) for k, v in chunk])  # no Message per bid
        top: dict[int, int] = {}
        for partition, offset in placed:
            if offset > top.get(partition, -1):
                top[partition] = offset
        with lock:
            pending.append((time.monotonic(), top, len(chunk)))
        sent += len(chunk)
        next_at = began + (sent / args.rate)
        time.sleep(max(0.0, next_at - time.monotonic()))
    produced_in = time.monotonic() - began
    done.set()
    poller.join(timeout=120)
    supervisor.stop()

    def pct(q: float, samples: list[tuple[float, int]] = latencies) -> float | None:
        weighted = sorted(samples)
        count = sum(n for _, n in weighted)
        if not count:
            return None
        seen = 0
        for value, n in weighted:
            seen += n
            if seen >= q / 100 * count:
                return round(value * 1000, 1)
        return round(weighted[-1][0] * 1000, 1)

    return {"phase": "latency", "target_rate": args.rate, "achieved_produce_rate": round(sent / produced_in),
            "bids": sent, "unconfirmed": len(pending), "e2e_ms_p50": pct(50), "e2e_ms_p99": pct(99),
            "e2e_ms_max": pct(100), f"e2e_ms_p99_per_{SLICE_S}s": [pct(99, slices[k]) for k in sorted(slices)],
            # without the first seconds, while fresh workers warm up (their SeenUsers records are empty:
            # every user is sent again, as at the top of each hour)
            f"e2e_ms_p99_after_{STEADY_AFTER_S}s": pct(99, [sample for k in sorted(slices)
                                                          if k * SLICE_S >= STEADY_AFTER_S for sample in slices[k]]),
            "restarts": supervisor.restarts,
            # AOF rewrites (a fork dumping the whole dataset) during this phase: CPU the stream competes with
            "aof_rewrites": client.info("persistence")["aof_rewrites"] - rewrites_before,
            # writes Redis held back because the previous fsync of its append-only file was still running
            "aof_delayed_fsync": client.info("persistence")["aof_delayed_fsync"] - delayed_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bids", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=Settings().BATCH_SIZE)
    parser.add_argument("--latency-batch-size", type=int, default=None,
                        help="max records per batch while streaming (default: --batch-size; batches adapt to load)")
    parser.add_argument("--rate", type=float, default=20_000, help="bids/s produced in the latency phase")
    parser.add_argument("--seconds", type=float, default=20, help="length of the latency phase (0: skip)")
    parser.add_argument("--days", type=float, default=None,
                        help="event-time span of the bids (default: live traffic, bids / 20000 seconds)")
    parser.add_argument("--profile", action="store_true", help="drain in this process under cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--flush-ms", type=int, default=None,
                        help="the consumers' flush window (default: RULES_STREAM_FLUSH_MS's default)")
    parser.add_argument("--overlap", action="store_true",
                        help="write each window's counters in a thread while the next is processed")
    parser.add_argument("--tcp", action="store_true",
                        help="use TCP on 127.0.0.1 (default: a unix socket, like the embedded server)")
    parser.add_argument("--redis-arg", action="append", default=[], metavar="ARG",
                        help="extra redis-server argument, repeatable (e.g. --redis-arg=--hll-sparse-max-bytes "
                             "--redis-arg=3000, Redis's default); default: the embedded server's settings")
    args = parser.parse_args()

    from workers.log.factory import create_log
    from workers.stream_runner import drain
    from workers.topics import ensure_topics

    workdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    redis_proc, url = start_redis(workdir, args.redis_arg, tcp=args.tcp)
    try:
        tuning: dict[str, Any] = {} if args.flush_ms is None else {"STREAM_FLUSH_MS": args.flush_ms}
        if args.overlap:
            tuning["STREAM_OVERLAP_APPLY"] = True
        settings = Settings(DATA_DIR=workdir / "data", REDIS_URL=url, BIDS_PARTITIONS=args.partitions,
                            BATCH_SIZE=args.batch_size, **tuning)
        log = create_log(settings)
        ensure_topics(log, settings)
        produce(log, RULES_TOPIC, [(m.key, m.value or b"") for m in rule_changes(args.rules)])
        days = args.days if args.days is not None else args.bids / 20_000 / 86_400
        from datetime import UTC, datetime

        generator = BidGenerator(seed=7, users=args.users, days=days, end=datetime.now(UTC))
        t = time.perf_counter()
        pairs = list(generator.messages(args.bids))
        generated_in = time.perf_counter() - t
        produced_in = produce(log, settings.BIDS_TOPIC, pairs)
        emit(phase="setup", rules=args.rules, bids=args.bids, users=args.users, partitions=args.partitions,
             flush_ms=settings.STREAM_FLUSH_MS,
             generate_bids_per_s=round(args.bids / generated_in), produce_bids_per_s=round(args.bids / produced_in),
             cpus=os.cpu_count())
        del pairs

        if args.profile:
            from workers.stream_runner import drain_in_process

            profiler = cProfile.Profile()
            profiler.enable()
            summary = drain_in_process(settings, batch_size=args.batch_size)
            profiler.disable()
            summary.pop("e2e_hist", None)
            summary.pop("batch_hist", None)
            emit(phase="profile", **summary)
            order = os.environ.get("BENCH_PROFILE_SORT", "cumulative")  # e.g. tottime
            pstats.Stats(profiler, stream=sys.stderr).sort_stats(order).print_stats(35)
            return

        redis_cpu = redis.Redis.from_url(url).info("cpu")
        redis.Redis.from_url(url).config_resetstat()  # (also zeroes total_net_input_bytes)
        summary = drain(settings, processes=args.processes, batch_size=args.batch_size)
        redis_cpu_after = redis.Redis.from_url(url).info("cpu")
        redis_cpu_s = sum(redis_cpu_after[k] - redis_cpu[k] for k in ("used_cpu_sys", "used_cpu_user"))
        # where Redis spends it: microseconds per bid inside each command (EVALSHA includes its calls)
        command_stats = redis.Redis.from_url(url).info("commandstats")
        commands = {name.removeprefix("cmdstat_"): stats["usec"] for name, stats in command_stats.items()
                    if stats["usec"] >= 1000}
        # one EXEC per counters write, plus one per retry (another process of the consumer group
        # wrote its offsets between a write's WATCH and its EXEC): compare with "writes"
        exec_calls = command_stats.get("cmdstat_exec", {}).get("calls", 0)
        per_command = {name: round(usec / max(1, summary["processed"]), 1) for name, usec in
                       sorted(commands.items(), key=lambda item: -item[1])}
        calls_per_bid = {name.removeprefix("cmdstat_"): round(stats["calls"] / max(1, summary["processed"]), 2)
                         for name, stats in command_stats.items() if stats["usec"] >= 1000}
        info = redis.Redis.from_url(url).info("memory")
        emit(phase="throughput", processes=args.processes, batch_size=args.batch_size,
             bids_per_s=summary["bids_per_s"], streaming_bids_per_s=summary["streaming_bids_per_s"],
             elapsed_s=summary["elapsed_s"], processed=summary["processed"],
             matched=summary["matched"], matches_per_bid=round(summary["matched"] / max(1, summary["processed"]), 1),
             dlq=summary["dlq"], batch_ms_p50=summary["batch_ms_p50"], batch_ms_p99=summary["batch_ms_p99"],
             stage_us_per_bid=summary["stage_us_per_bid"], stage_cpu_us_per_bid=summary.get("stage_cpu_us_per_bid"),
             writes=summary.get("writes"), redis_exec_calls=exec_calls, redis_command_us_per_bid=per_command,
             redis_calls_per_bid=calls_per_bid,
             # what the counter writes send (and Redis appends to its AOF, much the same bytes)
             redis_input_bytes_per_bid=round(redis.Redis.from_url(url).info("stats")["total_net_input_bytes"]
                                             / max(1, summary["processed"])),
             consumer_cpu_us_per_bid=summary.get("cpu_us_per_bid"),
             redis_cpu_us_per_bid=round(redis_cpu_s / max(1, summary["processed"]) * 1e6, 1),
             consumer_rss_mb=summary.get("rss_mb"), redis_used_mb=round(info["used_memory"] / 2**20, 1),
             log_dir_mb=round(sum(f.stat().st_size for f in (workdir / "data").rglob("*") if f.is_file()) / 2**20, 1))
        if args.seconds > 0:
            emit(**latency_phase(settings, log, generator, args, url))
        log.close()
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"data kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
