"""Benchmark the embedded log (targets on one core, ~500-byte messages):

* produce >= 150,000 msgs/s in batches (delete topic, 4 partitions, 16-byte keys);
* consume >= 300,000 msgs/s in batches (poll of 2,000 across the 4 partitions);
* full scan of a compacted topic of 10 million keys >= 500,000 records/s (``scan_compacted``);
* file size of the compacted topic within 2x of its live data (keys + values), after
  overwriting a share of the keys (user ids in random order) and one cleaner pass.

    python bench/bench_log.py                        # 1M messages, 1M-key compacted topic
    python bench/bench_log.py --messages 200000 --keys 200000   # quick
    python bench/bench_log.py --keys 10000000 --scan-value-bytes 500   # the full-size scan

Pin to one core with ``taskset -c 1 python bench/bench_log.py`` for the one-core figure. Rates
are printed per wall-clock second and per CPU-second of this process (the latter is the
one-core figure that other load on a shared machine disturbs least). Figures are noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.log.embedded import EmbeddedLog
from workers.log.port import Message, TopicPartition, TopicSpec


def _rate(count: int, wall: float, cpu: float) -> str:
    return f"{count / wall:,.0f}/s wall, {count / cpu:,.0f}/s per CPU-second"


def _value(i: int, size: int) -> bytes:
    head = f'{{"user":"u{i:012d}","ts":{1_700_000_000_000 + i},"pad":"'.encode()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def bench_produce_consume(log: EmbeddedLog, messages: int, value_bytes: int, batch: int) -> None:
    topic = "bench-bids"
    log.create_topic(TopicSpec(topic, partitions=4))
    producer = log.producer()
    values = [_value(i, value_bytes) for i in range(batch)]
    keys = [f"u{i:015d}".encode() for i in range(messages)]
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, messages, batch):
        n = min(batch, messages - start)
        producer.send_batch(topic, [Message(values[j], key=keys[start + j]) for j in range(n)])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"produce: {messages:,} msgs of {value_bytes} B in batches of {batch}: {elapsed:.2f} s = "
          f"{_rate(messages, elapsed, cpu)} (target >= 150,000)")
    producer.close()

    consumer = log.consumer("bench")
    consumer.assign([TopicPartition(topic, p) for p in range(4)])
    got = 0
    started, cpu = time.perf_counter(), time.process_time()
    while got < messages:
        records = consumer.poll(max_records=2000)
        if not records:
            break
        got += len(records)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"consume: {got:,} records in polls of 2,000: {elapsed:.2f} s = {_rate(got, elapsed, cpu)} "
          "(target >= 300,000)")
    consumer.commit()
    consumer.close()
    print(f"  topic file: {log.topic_size_bytes(topic) / 1e6:,.0f} MB "
          f"for {messages * (value_bytes + 16) / 1e6:,.0f} MB of keys+values")


def bench_compacted_scan(log: EmbeddedLog, keys: int, value_bytes: int, overwrite_share: float, batch: int,
                         scan_repeats: int) -> None:
    topic = "bench-last-seen"
    log.create_topic(TopicSpec(topic, partitions=4, cleanup_policy="compact"))
    producer = log.producer()
    values = [_value(i, value_bytes) for i in range(batch)]
    ids = list(range(keys))
    random.Random(42).shuffle(ids)  # user ids arrive in no particular order
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, keys, batch):
        n = min(batch, keys - start)
        producer.send_batch(topic, [Message(values[j], key=f"u{ids[start + j]:015d}".encode()) for j in range(n)])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"compacted build: {keys:,} keys in random order: {elapsed:.1f} s = {_rate(keys, elapsed, cpu)}")
    # Overwrite a share of the keys (scattered) and delete a few: what last_seen sees all day.
    overwrites = int(keys * overwrite_share)
    step = max(1, keys // max(1, overwrites))
    started, cpu = time.perf_counter(), time.process_time()
    chosen = ids[::step][:overwrites]
    for start in range(0, len(chosen), batch):
        part = chosen[start:start + batch]
        producer.send_batch(topic, [Message(values[j % batch], key=f"u{k:015d}".encode()) for j, k in enumerate(part)])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if chosen:
        print(f"overwrite: {len(chosen):,} existing keys: {elapsed:.1f} s = {_rate(len(chosen), elapsed, cpu)}")
    producer.close()
    before = log.topic_size_bytes(topic)
    started, cpu = time.perf_counter(), time.process_time()
    log.compact(topic)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    written = keys + len(chosen)
    print(f"cleaner pass over {written:,} records: {elapsed:.1f} s ({cpu:.1f} CPU-s) = "
          f"{_rate(written, elapsed, cpu)}; file {before / 1e6:,.0f} MB before")

    live = keys * (value_bytes + 16)
    size = log.topic_size_bytes(topic)
    print(f"compacted topic file: {size / 1e6:,.0f} MB for {live / 1e6:,.0f} MB of live keys+values: "
          f"{size / live:.2f}x (target <= 2x)")

    for _ in range(scan_repeats):
        count = 0
        started, cpu = time.perf_counter(), time.process_time()
        for records in log.scan_compacted(topic):
            count += len(records)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"scan_compacted: {count:,} records in {elapsed:.1f} s = {_rate(count, elapsed, cpu)} "
              "(target >= 500,000)")
        assert count == keys, f"scan returned {count} records for {keys} keys"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages to produce and consume")
    parser.add_argument("--value-bytes", type=int, default=500)
    parser.add_argument("--batch", type=int, default=2000, help="messages per send_batch")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the compacted topic (0: skip)")
    parser.add_argument("--scan-value-bytes", type=int, default=500, help="value size in the compacted topic")
    parser.add_argument("--overwrite-share", type=float, default=0.2, help="share of keys written a second time")
    parser.add_argument("--scan-repeats", type=int, default=1, help="full scans to time (figures vary run to run)")
    parser.add_argument("--dir", type=Path, default=None, help="data directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-log-"))
    print(f"data in {root}; pid {os.getpid()}; cpu affinity {sorted(os.sched_getaffinity(0))}")
    try:
        # No background cleaner: the compacted-topic pass is timed on its own below.
        log = EmbeddedLog(root / "log", maintenance_interval_s=1e9)
        if args.messages:
            bench_produce_consume(log, args.messages, args.value_bytes, args.batch)
        if args.keys:
            bench_compacted_scan(log, args.keys, args.scan_value_bytes, args.overwrite_share, args.batch,
                                 args.scan_repeats)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
