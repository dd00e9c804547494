"""What only the embedded log promises: several processes at once, acknowledged writes survive
kill -9, compaction reclaims space without blocking readers, retention, persistence."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workers.log.embedded import EmbeddedLog
from workers.log.port import (
    LogError,
    Message,
    Record,
    TopicExistsError,
    TopicPartition,
    TopicSpec,
)

REPO = Path(__file__).resolve().parents[2]


def child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "tests.log.embedded_child", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_everything(log: EmbeddedLog, topic: str) -> list[Record]:
    consumer = log.consumer(None)
    consumer.assign(log.partitions(topic))
    out: list[Record] = []
    while batch := consumer.poll(max_records=5000):
        out.extend(batch)
    consumer.close()
    return out


def test_several_processes_produce_and_consume_at_once(tmp_path: Path) -> None:
    root = tmp_path / "log"
    log = EmbeddedLog(root)
    log.create_topic(TopicSpec("bids", partitions=2))
    writers = [child("produce", str(root), "bids", f"w{n}", "1500", "30") for n in range(3)]
    # Read concurrently with the writers, committing as we go, like a stream worker.
    consumer = log.consumer("workers")
    consumer.assign(log.partitions("bids"))
    seen: list[Record] = []
    deadline = time.monotonic() + 60
    while len(seen) < 4500 and time.monotonic() < deadline:
        batch = consumer.poll(max_records=700, timeout_ms=100)
        seen.extend(batch)
        if batch:
            consumer.commit()
    acked: set[tuple[int, int, str, str]] = set()
    for proc in writers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        for line in out.splitlines():
            p, o, key, value = line.split()
            acked.add((int(p), int(o), key, value))
    assert len(acked) == 4500
    got = {(r.partition, r.offset, r.key.decode(), r.value.decode().rstrip(".")) for r in seen}  # type: ignore[union-attr]
    assert got == acked  # every acknowledged message read once, at the offset it was acknowledged with
    assert len(seen) == 4500
    for p in (0, 1):  # offsets are dense and unique per partition despite three writers
        offsets = sorted(r.offset for r in seen if r.partition == p)
        assert offsets == list(range(len(offsets)))
    by_key: dict[str, list[int]] = {}
    for r in sorted(seen, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(r.key.decode(), []).append(int(r.value.decode().split(":")[1].rstrip(".")))  # type: ignore[union-attr]
    assert all(values == sorted(values) for values in by_key.values())  # per-key order kept
    assert consumer.lag() == {TopicPartition("bids", 0): 0, TopicPartition("bids", 1): 0}
    consumer.close()


def test_acknowledged_batches_survive_kill_9(tmp_path: Path) -> None:
    root = tmp_path / "log"
    log = EmbeddedLog(root)
    log.create_topic(TopicSpec("bids", partitions=3))
    proc = child("produce-forever", str(root), "bids", "w", "400")
    acked: list[tuple[int, int, str, str]] = []
    assert proc.stdout is not None
    while len(acked) < 20_000:
        line = proc.stdout.readline()
        assert line, f"producer died: {proc.stderr.read() if proc.stderr else ''}"
        p, o, key, value = line.split()
        acked.append((int(p), int(o), key, value))
    proc.send_signal(signal.SIGKILL)  # most likely in the middle of a transaction
    proc.wait(timeout=10)
    for line in proc.stdout:  # acknowledged between our last read and the kill
        p, o, key, value = line.split()
        acked.append((int(p), int(o), key, value))

    reopened = EmbeddedLog(root)
    records = read_everything(reopened, "bids")
    stored = {(r.partition, r.offset): (r.key.decode(), r.value.decode().rstrip(".")) for r in records}  # type: ignore[union-attr]
    missing = [a for a in acked if stored.get((a[0], a[1])) != (a[2], a[3])]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    # A batch is atomic: what was not acknowledged is all there or all absent, and the log goes on.
    producer = reopened.producer()
    p, o = producer.send_batch("bids", [Message(b"after", partition=0)])[0]
    assert o == max(off for (part, off) in stored if part == 0) + 1
    producer.close()


def test_compaction_reclaims_space_while_a_reader_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tombstones stay readable for the default 24 h: a reader that saw a big value before the
    # cleaner ran must still meet the tombstone that deletes it.
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=3600)
    log.create_topic(TopicSpec("users", partitions=1, cleanup_policy="compact"))
    producer = log.producer()
    big = b"x" * 2000
    for start in range(0, 6000, 500):
        producer.send_batch("users", [Message(big, key=f"u{i}".encode()) for i in range(start, start + 500)])
    log.compact("users")
    full = log.topic_size_bytes("users")
    # Most users go away (tombstones), the rest shrink to small values.
    producer.send_batch("users", [Message(None, key=f"u{i}".encode()) for i in range(5000)])
    producer.send_batch("users", [Message(b"small", key=f"u{i}".encode()) for i in range(5000, 6000)])

    stop = threading.Event()
    reads: list[int] = []
    slowest = [0.0]
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                consumer = log.consumer(None)
                consumer.assign([TopicPartition("users", 0)])
                state: dict[bytes, bytes | None] = {}
                while True:
                    started = time.monotonic()
                    batch = consumer.poll(max_records=100)
                    slowest[0] = max(slowest[0], time.monotonic() - started)
                    if not batch:
                        break
                    for r in batch:
                        assert r.key is not None
                        state[r.key] = r.value
                consumer.close()
                live = {k for k, v in state.items() if v is not None}
                assert live == {f"u{i}".encode() for i in range(5000, 6000)}
                assert all(state[k] == b"small" for k in live)
                reads.append(len(state))
        except BaseException as exc:
            errors.append(exc)

    # Deterministic on a loaded machine: the cleaner is held inside its first write transaction
    # (BEGIN IMMEDIATE, at its first DELETE) until the reader has finished two more full reads,
    # so at least one whole read happens while compaction holds the write lock. A reader that
    # waited for the cleaner would never get there and the deadline would fail the test.
    import workers.log.embedded as embedded_module

    real_clean = embedded_module._clean_compacted
    held: list[int] = []

    def clean_holding_the_write_lock(conn: object, *args: object) -> int:
        assert isinstance(conn, sqlite3.Connection)

        def on_statement(sql: str) -> None:
            if held or not sql.lstrip().upper().startswith("DELETE FROM P0 "):
                return
            before = len(reads)
            deadline = time.monotonic() + 120
            while len(reads) < before + 2 and not errors and time.monotonic() < deadline:
                time.sleep(0.005)
            held.append(len(reads) - before)
            assert conn.in_transaction  # the reads above happened under the cleaner's write lock

        conn.set_trace_callback(on_statement)
        try:
            return real_clean(conn, *args)  # type: ignore[arg-type]
        finally:
            conn.set_trace_callback(None)

    monkeypatch.setattr(embedded_module, "_clean_compacted", clean_holding_the_write_lock)
    thread = threading.Thread(target=reader)
    thread.start()
    log.compact("users")
    after_compaction = len(reads)
    deadline = time.monotonic() + 120
    while len(reads) < after_compaction + 1 and not errors and time.monotonic() < deadline:
        time.sleep(0.005)  # one more full read of the compacted result
    stop.set()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert not errors, errors[0]
    assert held and held[0] >= 2, f"the reader made no progress while compaction held the write lock: {held}"
    assert len(reads) > after_compaction, "no full read after compaction"
    # generous: a loaded CI machine can deschedule a thread for a while, but never for this long
    assert slowest[0] < 20.0, f"a poll waited {slowest[0]:.2f}s during compaction"
    after = log.topic_size_bytes("users")
    assert after < full * 0.25, f"compaction left {after} of {full} bytes"
    values = [r.value for r in read_everything(log, "users")]
    assert values == [None] * 5000 + [b"small"] * 1000  # superseded big values gone, tombstones kept


def test_old_tombstones_are_cleaned(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", tombstone_retention_ms=0)
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    producer = log.producer()
    producer.send_batch("users", [Message(b"v", key=b"a"), Message(b"v", key=b"b"), Message(None, key=b"a")])
    log.compact("users")
    assert [(r.offset, r.key, r.value) for r in read_everything(log, "users")] == [(1, b"b", b"v")]
    producer.close()


def test_a_consumer_at_the_head_sees_every_message_of_a_compacted_topic(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=0)  # a cleaner pass after every batch
    log.create_topic(TopicSpec("rules", cleanup_policy="compact", min_cleanable_dirty_ratio=0.01))
    producer = log.producer()
    consumer = log.consumer("worker")
    consumer.assign([TopicPartition("rules", 0)])
    seen: list[bytes | None] = []
    for version in range(20):
        producer.send_batch("rules", [Message(b"%d" % version, key=b"rule-1")])
        seen.extend(r.value for r in consumer.poll())
    assert seen == [b"%d" % v for v in range(20)]
    for cleaner in list(producer._cleaners.values()):  # let the last background pass finish
        cleaner.join(timeout=120)
        assert not cleaner.is_alive()
    log.compact("rules")
    assert [r.value for r in read_everything(log, "rules")] == [b"19"]
    producer.close()
    consumer.close()
    producer.close()


def test_overwritten_keys_keep_the_file_near_the_live_data(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    log.create_topic(TopicSpec("users", partitions=2, cleanup_policy="compact"))
    producer = log.producer()
    for round_ in range(25):
        producer.send_batch("users", [Message(b"%04d" % round_ + b"v" * 996, key=b"user-%05d" % i)
                                      for i in range(400)])
    log.compact("users")
    live = 400 * (1000 + 10)
    assert log.topic_size_bytes("users") < 2 * live + 64 * 1024
    records = read_everything(log, "users")
    assert len(records) == 400 and all(r.value and r.value.startswith(b"0024") for r in records)
    producer.close()


def test_retention_drops_old_records_and_offsets_are_never_reused(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    log.create_topic(TopicSpec("bids", partitions=1, retention_ms=60_000))
    producer = log.producer()
    old = int(time.time() * 1000) - 600_000
    producer.send_batch("bids", [Message(b"old", timestamp_ms=old) for _ in range(100)])
    producer.send_batch("bids", [Message(b"new") for _ in range(10)])
    log.compact("bids")
    consumer = log.consumer(None)
    tp = TopicPartition("bids", 0)
    consumer.assign([tp])
    assert consumer.beginning_offsets([tp]) == {tp: 100}
    assert [(r.offset, r.value) for r in consumer.poll(max_records=1000)] == [(100 + i, b"new") for i in range(10)]
    consumer.close()

    log.create_topic(TopicSpec("short", partitions=1, retention_ms=1))
    producer.send_batch("short", [Message(b"x", timestamp_ms=old) for _ in range(5)])
    log.compact("short")
    assert read_everything(log, "short") == []
    assert producer.send("short", b"y") == (0, 5)  # the emptied partition does not restart at 0
    producer.close()


def test_data_and_group_offsets_persist_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "log"
    first = EmbeddedLog(root)
    first.create_topic(TopicSpec("rules", partitions=1, cleanup_policy="compact"))
    producer = first.producer()
    producer.send_batch("rules", [Message(b"r1", key=b"a"), Message(b"r2", key=b"b")])
    consumer = first.consumer("api")
    consumer.assign([TopicPartition("rules", 0)])
    consumer.commit({TopicPartition("rules", 0): 1})
    producer.close()
    consumer.close()
    first.close()

    second = EmbeddedLog(root)
    assert second.list_topics() == ["rules"]
    assert second.describe_topic("rules") == TopicSpec("rules", partitions=1, cleanup_policy="compact")
    consumer = second.consumer("api")
    consumer.assign([TopicPartition("rules", 0)])
    assert consumer.committed(TopicPartition("rules", 0)) == 1
    assert [r.value for r in consumer.poll()] == [b"r2"]
    consumer.close()


def test_admin_errors(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    with pytest.raises(TopicExistsError):
        log.create_topic(TopicSpec("users"), exist_ok=False)
    log.create_topic(TopicSpec("users"))  # exist_ok: no-op
    with pytest.raises(LogError, match="invalid topic name"):
        log.create_topic(TopicSpec("../escape"))
    with pytest.raises(LogError, match="partitions"):
        log.create_topic(TopicSpec("none", partitions=0))
    producer = log.producer()
    with pytest.raises(LogError, match="no key"):
        producer.send_batch("users", [Message(b"v")])
    producer.close()


def test_seek_to_time_with_out_of_order_timestamps(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    log.create_topic(TopicSpec("bids"))
    producer = log.producer()
    producer.send_batch("bids", [Message(b"a", timestamp_ms=1000), Message(b"b", timestamp_ms=5000),
                                 Message(b"c", timestamp_ms=2000)])
    producer.send_batch("bids", [Message(b"d", timestamp_ms=3000), Message(b"e", timestamp_ms=9000)])
    consumer = log.consumer(None)
    tp = TopicPartition("bids", 0)
    consumer.assign([tp])
    for target, expected in [(0, 0), (1500, 1), (5000, 1), (6000, 4), (9001, 5)]:
        consumer.seek_to_time(target)
        assert consumer.position(tp) == expected, target
    consumer.close()


def test_cleaner_runs_while_other_processes_append(tmp_path: Path) -> None:
    root = tmp_path / "log"
    log = EmbeddedLog(root)
    log.create_topic(TopicSpec("users", partitions=2, cleanup_policy="compact", min_cleanable_dirty_ratio=0.01))
    writers = [child("produce", str(root), "users", f"w{n}", "3000", "20") for n in range(2)]
    # Drain the children's pipes while compacting: a child blocked on a full stdout pipe would
    # never exit and the loop below would spin until the test times out.
    outputs: dict[int, tuple[str, str]] = {}
    drainers = [threading.Thread(target=lambda proc=proc: outputs.__setitem__(proc.pid, proc.communicate(timeout=120)))
                for proc in writers]
    for drainer in drainers:
        drainer.start()
    passes = 0
    while any(drainer.is_alive() for drainer in drainers):
        log.compact("users")  # cleaning concurrently with the appends
        passes += 1
    latest: dict[str, tuple[int, int, str]] = {}
    for proc in writers:
        out, err = outputs[proc.pid]
        assert proc.returncode == 0, err
        for line in out.splitlines():
            p, o, key, value = line.split()
            if key not in latest or int(o) > latest[key][1]:
                latest[key] = (int(p), int(o), value)
    log.compact("users")
    records = read_everything(log, "users")
    got = {r.key.decode(): (r.partition, r.offset, r.value.decode().rstrip(".")) for r in records}  # type: ignore[union-attr]
    assert len(records) == len(got) == 14  # one record per key, nothing superseded left
    assert got == latest
    assert passes >= 1


def test_tombstones_expire_by_write_time_not_by_their_message_timestamp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Kafka's delete.retention.ms counts from when the tombstone was written: one replayed with a
    # two-day-old timestamp must stay readable for lagging consumers for the whole retention.
    import workers.log.embedded as embedded_module

    clock = [int(time.time() * 1000)]
    monkeypatch.setattr(embedded_module, "_now_ms", lambda: clock[0])
    log = EmbeddedLog(tmp_path / "log", tombstone_retention_ms=3_600_000)
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    producer = log.producer()
    two_days_ago = clock[0] - 2 * 24 * 3_600_000
    producer.send_batch("users", [Message(b"v", key=b"a", timestamp_ms=two_days_ago),
                                  Message(b"v", key=b"b", timestamp_ms=two_days_ago)])
    producer.send_batch("users", [Message(None, key=b"a", timestamp_ms=two_days_ago)])
    log.compact("users")
    assert [(r.offset, r.key, r.value) for r in read_everything(log, "users")] == [(1, b"b", b"v"), (2, b"a", None)]
    clock[0] += 3_600_000 - 1  # written just under the retention ago: still kept
    log.compact("users")
    assert [(r.offset, r.key, r.value) for r in read_everything(log, "users")] == [(1, b"b", b"v"), (2, b"a", None)]
    clock[0] += 1  # written the retention ago: gone
    log.compact("users")
    assert [(r.offset, r.key, r.value) for r in read_everything(log, "users")] == [(1, b"b", b"v")]
    producer.close()


def test_files_without_append_times_fall_back_to_the_message_timestamp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.log.embedded as embedded_module

    root = tmp_path / "log"
    log = EmbeddedLog(root, tombstone_retention_ms=3_600_000)
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    producer = log.producer()
    old = int(time.time() * 1000) - 2 * 24 * 3_600_000
    producer.send_batch("users", [Message(None, key=b"a", timestamp_ms=old), Message(b"v", key=b"b")])
    producer.close()
    # A file written before time_index had an append time: the column does not exist.
    conn = sqlite3.connect(str(root / "topics" / "users.db"))
    conn.execute("ALTER TABLE time_index DROP COLUMN append_ms")
    conn.commit()
    conn.close()

    reopened = EmbeddedLog(root, tombstone_retention_ms=3_600_000)
    producer = reopened.producer()  # opening the file adds the column back (NULL: unknown)
    producer.send_batch("users", [Message(None, key=b"c", timestamp_ms=old)])
    producer.close()
    reopened.compact("users")
    # the legacy tombstone is judged by its timestamp; the new one, written now, is kept
    assert [(r.offset, r.key, r.value) for r in read_everything(reopened, "users")] == [(1, b"b", b"v"),
                                                                                       (2, b"c", None)]
    monkeypatch.setattr(embedded_module, "_now_ms", lambda: int(time.time() * 1000) + 2 * 3_600_000)
    reopened.compact("users")
    assert [(r.offset, r.key, r.value) for r in read_everything(reopened, "users")] == [(1, b"b", b"v")]


def test_compaction_prunes_the_time_index_and_seek_to_time_stays_exact(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", tombstone_retention_ms=0)
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    producer = log.producer()
    # 40 single-record batches over 4 keys, timestamps out of order (a replay mixes them).
    stamps = [(i * 7919) % 1000 + 1000 for i in range(40)]
    for i, ts in enumerate(stamps):
        producer.send_batch("users", [Message(b"%d" % i, key=b"k%d" % (i % 4), timestamp_ms=ts)])
    producer.send_batch("users", [Message(None, key=b"k0", timestamp_ms=500)])  # deletes k0
    log.compact("users")
    live = read_everything(log, "users")
    assert [r.offset for r in live] == [37, 38, 39]
    conn = sqlite3.connect(str(tmp_path / "log" / "topics" / "users.db"))
    rows = conn.execute("SELECT first_offset FROM time_index ORDER BY first_offset").fetchall()
    conn.close()
    assert [r[0] for r in rows] == [37, 38, 39]  # one row per batch with a live record
    consumer = log.consumer(None)
    tp = TopicPartition("users", 0)
    consumer.assign([tp])
    for target in range(900, 2100, 13):
        consumer.seek_to_time(target)
        expected = next((r.offset for r in live if r.timestamp_ms >= target), 41)
        assert consumer.position(tp) == expected, target
    consumer.close()
    producer.close()


@pytest.mark.parametrize("tail_in", ["dict", "sql"])
def test_scan_compacted_after_a_cleaner_pass_and_more_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             tail_in: str) -> None:
    from tests.log.test_contract import check_latest_only
    from workers.log import embedded

    if tail_in == "sql":  # a tail too big for the dict: the temporary-table probe
        monkeypatch.setattr(embedded, "SCAN_TAIL_DICT_MAX_KEYS", 0)
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=1e9)
    log.create_topic(TopicSpec("users", partitions=2, cleanup_policy="compact"))
    producer = log.producer()
    keys = [f"k{i}".encode() for i in range(200)]
    producer.send_batch("users", [Message(b"v1", key=k) for k in keys])
    producer.send_batch("users", [Message(b"v2", key=k) for k in keys[::2]])
    log.compact("users")  # cleaned up to here: below the mark every key is unique
    stored = read_everything(log, "users")
    assert [r for b in log.scan_compacted("users", batch_size=30) for r in b] == \
        sorted(stored, key=lambda r: (r.partition, r.offset))  # no dirty tail: read as stored
    # The dirty tail: new versions, deletions, a key deleted then written again, new keys.
    producer.send_batch("users", [Message(b"v3", key=k) for k in keys[::3]])
    producer.send_batch("users", [Message(None, key=k) for k in keys[::5]])
    producer.send_batch("users", [Message(b"v4", key=k) for k in keys[::25]] + [Message(b"new", key=b"fresh")])
    state: dict[bytes, bytes | None] = {}
    for r in sorted(read_everything(log, "users"), key=lambda r: (r.partition, r.offset)):
        assert r.key is not None
        state[r.key] = r.value
    live = {k: v for k, v in state.items() if v is not None}
    deleted = {k for k, v in state.items() if v is None}
    for batch_size in (1, 13, 10_000):
        batches = list(log.scan_compacted("users", batch_size=batch_size))
        check_latest_only(batches, live, deleted)
        # tombstones not yet cleaned (retention 24 h) appear once each
        assert {r.key for b in batches for r in b if r.value is None} == deleted
    # A resumed scan from a start inside the clean part, and one inside the tail.
    full = [r for b in log.scan_compacted("users") for r in b]
    consumer = log.consumer(None)
    ends = {tp.partition: o for tp, o in consumer.end_offsets(log.partitions("users")).items()}
    consumer.close()
    for share in (0.3, 0.9):
        starts = {p: int(e * share) for p, e in ends.items()}
        got = [r for b in log.scan_compacted("users", batch_size=7, start_offsets=starts) for r in b]
        assert got == [r for r in full if r.offset >= starts[r.partition]]
    producer.close()
    log.close()


def test_scan_compacted_while_the_cleaner_runs(tmp_path: Path) -> None:
    from tests.log.test_contract import check_latest_only

    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=1e9, tombstone_retention_ms=0)
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    producer = log.producer()
    keys = [f"k{i}".encode() for i in range(300)]
    producer.send_batch("users", [Message(b"v1", key=k) for k in keys])
    producer.send_batch("users", [Message(b"v2", key=k) for k in keys[::2]])
    producer.send_batch("users", [Message(None, key=k) for k in keys[::7]])
    live = {k: b"v2" if i % 2 == 0 else b"v1" for i, k in enumerate(keys) if i % 7}
    deleted = {k for i, k in enumerate(keys) if i % 7 == 0}
    scan = log.scan_compacted("users", batch_size=20)
    batches = [next(scan)]
    log.compact("users")  # deletes superseded rows and the tombstones, moves the mark, mid-scan
    batches.extend(scan)
    check_latest_only(batches, live, deleted)

    # A key written again AFTER the call, then cleaned mid-scan: it may go missing (its new record
    # is beyond the end), never twice nor with an older value.
    producer.send_batch("users", [Message(b"v3", key=k) for k in keys[1::2]])
    scan = log.scan_compacted("users", batch_size=20)
    batches = [next(scan)]
    producer.send_batch("users", [Message(b"v4", key=k) for k in keys[1::2]])
    log.compact("users")
    batches.extend(scan)
    records = [r for b in batches for r in b]
    assert len({r.key for r in records}) == len(records)
    as_of_call = {**live, **{k: b"v3" for k in keys[1::2]}}
    assert all(r.value == as_of_call[r.key] for r in records if r.key is not None)
    assert {r.key for r in records} >= set(keys[::2]) - deleted  # keys not rewritten are all there
    producer.close()
    log.close()
