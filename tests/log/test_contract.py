"""The log port's contract, run against every implementation (see conftest.py's ``backend``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.log.conftest import Backend
from workers.log.port import (
    Consumer,
    LogError,
    Message,
    Record,
    TopicNotFoundError,
    TopicPartition,
    UnsupportedError,
    partition_for,
)


def drain(consumer: Consumer, count: int, timeout: float = 20.0) -> list[Record]:
    """Poll until ``count`` records arrived (fails on timeout or on extra records)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        out.extend(consumer.poll(max_records=1000, timeout_ms=200))
    assert len(out) >= count, f"got {len(out)} of {count} records before the deadline"
    out.extend(consumer.poll(max_records=1000, timeout_ms=300))
    assert len(out) == count, f"expected {count} records, got {len(out)}"
    return out


def read_all(backend: Backend, topic: str) -> list[Record]:
    """Everything from the log start to the current end of every partition."""
    consumer = backend.log.consumer(None)
    try:
        parts = backend.log.partitions(topic)
        consumer.assign(parts)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(parts)
        out: list[Record] = []
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            assert time.monotonic() < deadline, "could not read up to the end offsets"
            batch = consumer.poll(max_records=1000, timeout_ms=200)
            out.extend(r for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)])
        return out
    finally:
        consumer.close()


def latest_by_key(records: list[Record]) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert r.key is not None
        if r.value is None:
            state.pop(r.key, None)
        else:
            state[r.key] = r.value
    return state


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               tick: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if tick is not None:
            tick()
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- topics ----------------------------------------------------------------------------------
def test_topics_are_listed_and_described(backend: Backend) -> None:
    topic = backend.make_topic(partitions=3)
    assert topic in backend.log.list_topics()
    assert backend.log.describe_topic(topic).partitions == 3
    assert backend.log.partitions(topic) == [TopicPartition(topic, p) for p in range(3)]
    with pytest.raises(TopicNotFoundError):
        backend.log.describe_topic("no-such-topic-" + topic)


def test_missing_topic_is_an_error_for_producers_and_consumers(backend: Backend) -> None:
    producer = backend.log.producer()
    with pytest.raises(TopicNotFoundError):
        producer.send_batch("missing-topic-xyz", [Message(b"v")])
    consumer = backend.log.consumer(None)
    with pytest.raises(TopicNotFoundError):
        consumer.assign([TopicPartition("missing-topic-xyz", 0)])
    producer.close()
    consumer.close()


# -- producing and reading ---------------------------------------------------------------------
def test_batch_is_acknowledged_with_contiguous_offsets_and_read_back_in_order(backend: Backend) -> None:
    topic = backend.make_topic(partitions=1)
    producer = backend.log.producer()
    acks = producer.send_batch(topic, [Message(f"v{i}".encode(), key=b"k") for i in range(50)])
    assert acks == [(0, i) for i in range(50)]
    assert producer.send(topic, b"last", key=b"k") == (0, 50)
    consumer = backend.log.consumer(None)
    consumer.assign([TopicPartition(topic, 0)])
    records = drain(consumer, 51)
    assert [r.offset for r in records] == list(range(51))
    assert [r.value for r in records] == [f"v{i}".encode() for i in range(50)] + [b"last"]
    assert {(r.topic, r.partition, r.key) for r in records} == {(topic, 0, b"k")}
    assert consumer.position(TopicPartition(topic, 0)) == 51
    producer.close()
    consumer.close()


def test_keys_are_placed_by_partition_for_and_kept_in_order(backend: Backend) -> None:
    topic = backend.make_topic(partitions=4)
    producer = backend.log.producer()
    messages = [Message(f"{k}:{i}".encode(), key=f"user-{k}".encode()) for i in range(5) for k in range(20)]
    acks = producer.send_batch(topic, messages)
    for m, (partition, _offset) in zip(messages, acks, strict=True):
        assert m.key is not None
        assert partition == partition_for(m.key, 4)
    consumer = backend.log.consumer(None)
    consumer.assign(backend.log.partitions(topic))
    records = drain(consumer, len(messages))
    by_key: dict[bytes, list[bytes]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert r.key is not None and r.value is not None
        assert r.partition == partition_for(r.key, 4)
        by_key.setdefault(r.key, []).append(r.value)
    for k in range(20):
        assert by_key[f"user-{k}".encode()] == [f"{k}:{i}".encode() for i in range(5)]
    producer.close()
    consumer.close()


def test_explicit_partition_and_round_robin_without_key(backend: Backend) -> None:
    topic = backend.make_topic(partitions=3)
    producer = backend.log.producer()
    assert producer.send_batch(topic, [Message(b"x", key=b"any", partition=2)])[0][0] == 2
    acks = producer.send_batch(topic, [Message(f"n{i}".encode()) for i in range(6)])
    assert sorted(p for p, _ in acks) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(LogError):
        producer.send_batch(topic, [Message(b"x", partition=7)])
    producer.close()


def test_tombstones_and_timestamps_round_trip(backend: Backend) -> None:
    topic = backend.make_topic()
    producer = backend.log.producer()
    producer.send_batch(topic, [Message(b"v", key=b"a", timestamp_ms=1_600_000_000_000), Message(None, key=b"a")])
    consumer = backend.log.consumer(None)
    consumer.assign([TopicPartition(topic, 0)])
    first, second = drain(consumer, 2)
    assert (first.value, second.value, second.key) == (b"v", None, b"a")
    if backend.supports_timestamps:
        assert first.timestamp_ms == 1_600_000_000_000
        assert abs(second.timestamp_ms - time.time() * 1000) < 60_000  # defaults to the send time
    else:  # Kafka 0.9 stores no timestamps: documented as -1
        assert first.timestamp_ms == second.timestamp_ms == -1
    producer.close()
    consumer.close()


def test_send_rows_is_send_batch_without_message_objects(backend: Backend) -> None:
    topic = backend.make_topic(partitions=4)
    producer = backend.log.producer()
    assert producer.send_rows(topic, []) == []
    rows: list[tuple[bytes | None, bytes | None, int | None]] = [
        (f"user-{k}".encode(), f"{k}:{i}".encode(), 1_600_000_000_000 + i) for i in range(3) for k in range(10)]
    rows += [(b"user-0", None, None), (None, b"no key", None), (None, b"no key either", None)]
    acks = producer.send_rows(topic, rows)
    assert len(acks) == len(rows)
    for (key, _value, _ts), (partition, _offset) in zip(rows[:-2], acks[:-2], strict=True):
        assert key is not None and partition == partition_for(key, 4)
    assert acks[-2][0] != acks[-1][0]  # round-robin without a key
    consumer = backend.log.consumer(None)
    consumer.assign(backend.log.partitions(topic))
    records = drain(consumer, len(rows))
    got = {(r.partition, r.offset): r for r in records}
    assert set(got) == set(acks)  # each row acknowledged at the position it was read from
    for (key, value, ts), at in zip(rows, acks, strict=True):
        record = got[at]
        assert (record.key, record.value) == (key, value)
        if backend.supports_timestamps:
            if ts is None:  # defaults to the send time, as in send_batch
                assert abs(record.timestamp_ms - time.time() * 1000) < 60_000
            else:
                assert record.timestamp_ms == ts
    by_key: dict[bytes, list[bytes | None]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        if r.key is not None:
            by_key.setdefault(r.key, []).append(r.value)
    assert by_key[b"user-0"] == [b"0:0", b"0:1", b"0:2", None]  # in order within the key's partition
    producer.close()
    consumer.close()


# -- offsets, seeking, lag ----------------------------------------------------------------------
def test_offsets_seek_and_clamping(backend: Backend) -> None:
    topic = backend.make_topic()
    tp = TopicPartition(topic, 0)
    producer = backend.log.producer()
    producer.send_batch(topic, [Message(str(i).encode()) for i in range(10)])
    consumer = backend.log.consumer(None)
    consumer.assign([tp])
    assert consumer.assignment() == {tp}
    assert consumer.beginning_offsets([tp]) == {tp: 0}
    assert consumer.end_offsets([tp]) == {tp: 10}
    consumer.seek(tp, 7)
    assert [r.offset for r in drain(consumer, 3)] == [7, 8, 9]
    consumer.seek_to_beginning()
    assert consumer.position(tp) == 0
    consumer.seek_to_end()
    assert consumer.position(tp) == 10
    assert consumer.poll(timeout_ms=200) == []
    consumer.seek(tp, 1_000)  # clamped to the end
    assert consumer.position(tp) == 10
    consumer.seek(tp, -5)  # clamped to the start
    assert consumer.position(tp) == 0
    producer.send(topic, b"new")
    consumer.seek_to_end()
    assert consumer.position(tp) == 11
    producer.close()
    consumer.close()


def test_seek_to_time(backend: Backend) -> None:
    topic = backend.make_topic()
    tp = TopicPartition(topic, 0)
    producer = backend.log.producer()
    base = 1_700_000_000_000
    producer.send_batch(topic, [Message(str(i).encode(), timestamp_ms=base + i * 1000) for i in range(5)])
    producer.send_batch(topic, [Message(str(i).encode(), timestamp_ms=base + i * 1000) for i in range(5, 10)])
    consumer = backend.log.consumer(None)
    consumer.assign([tp])
    if not backend.supports_timestamps:
        with pytest.raises(UnsupportedError):
            consumer.seek_to_time(base)
        return
    consumer.seek_to_time(base + 6500)
    assert consumer.position(tp) == 7
    consumer.seek_to_time(base + 3000)
    assert consumer.position(tp) == 3
    consumer.seek_to_time(0)
    assert consumer.position(tp) == 0
    consumer.seek_to_time(base + 10**9)
    assert consumer.position(tp) == 10
    producer.close()
    consumer.close()


def test_consumer_group_resumes_from_committed_offsets(backend: Backend) -> None:
    topic = backend.make_topic(partitions=2)
    parts = backend.log.partitions(topic)
    producer = backend.log.producer()
    producer.send_batch(topic, [Message(str(i).encode(), partition=i % 2) for i in range(20)])
    group = f"g-{topic}"
    first = backend.log.consumer(group)
    first.assign(parts)
    assert all(first.committed(tp) is None for tp in parts)
    assert first.lag() == {parts[0]: 10, parts[1]: 10}
    records = drain(first, 20)
    assert len(records) == 20
    # Commit less than was read: a crash before the work is durable means re-reading.
    first.commit({parts[0]: 4, parts[1]: 10})
    assert first.committed(parts[0]) == 4
    assert first.lag() == {parts[0]: 6, parts[1]: 0}
    first.close()

    second = backend.log.consumer(group)
    second.assign(parts)
    again = drain(second, 6)
    assert sorted((r.partition, r.offset) for r in again) == [(0, o) for o in range(4, 10)]
    second.commit()  # default: the current positions
    assert second.committed(parts[0]) == 10 and second.committed(parts[1]) == 10
    assert second.lag() == {parts[0]: 0, parts[1]: 0}
    second.close()

    other = backend.log.consumer(f"other-{group}")  # another group: its own offsets, earliest
    other.assign(parts)
    assert len(drain(other, 20)) == 20
    other.close()

    late = backend.log.consumer(f"late-{group}", auto_offset_reset="latest")
    late.assign(parts)
    assert late.poll(timeout_ms=300) == []
    producer.send(topic, b"fresh", key=b"k")
    fresh = drain(late, 1)
    assert fresh[0].value == b"fresh"
    late.close()
    producer.close()


def test_commit_without_group_is_an_error(backend: Backend) -> None:
    topic = backend.make_topic()
    consumer = backend.log.consumer(None)
    consumer.assign([TopicPartition(topic, 0)])
    assert consumer.committed(TopicPartition(topic, 0)) is None
    with pytest.raises(LogError):
        consumer.commit({TopicPartition(topic, 0): 0})
    consumer.close()


# -- compaction --------------------------------------------------------------------------------
def test_compacted_topic_keeps_the_latest_value_per_key_and_tombstones_delete(backend: Backend) -> None:
    topic = backend.make_topic(partitions=2, cleanup_policy="compact")
    producer = backend.log.producer()
    producer.send_batch(topic, [Message(f"old-{i}".encode(), key=f"k{i}".encode()) for i in range(30)])
    producer.send_batch(topic, [Message(f"new-{i}".encode(), key=f"k{i}".encode()) for i in range(0, 30, 2)])
    producer.send_batch(topic, [Message(None, key=f"k{i}".encode()) for i in range(0, 30, 3)])
    expected = {f"k{i}".encode(): (f"new-{i}" if i % 2 == 0 else f"old-{i}").encode()
                for i in range(30) if i % 3 != 0}
    # Reading from the beginning to the end gives the latest values, compacted or not.
    assert latest_by_key(read_all(backend, topic)) == expected

    def compacted() -> bool:
        records = [r for r in read_all(backend, topic) if r.key != b"filler"]
        superseded = [r for r in records if r.value is not None and r.value.startswith(b"old-")
                      and int(r.key[1:]) % 2 == 0]  # type: ignore[index]
        return not superseded and latest_by_key(records) == expected

    def roll_segment() -> None:  # Kafka never cleans the active segment: append to roll it
        backend.log.compact(topic)
        producer.send_batch(topic, [Message(b"f", key=b"filler", partition=p) for p in range(2)])

    # The cleaner really removes superseded records (Kafka: within its backoff, with the tiny
    # segment.ms/min.cleanable.dirty.ratio the harness gives compacted topics).
    wait_until(compacted, timeout=60, what="compaction", tick=roll_segment)
    batches = list(backend.log.scan_compacted(topic))
    scanned = [r for batch in batches for r in batch if r.key != b"filler"]
    assert latest_by_key(scanned) == expected
    producer.close()


def test_scan_compacted_stops_at_the_end_offsets_of_the_call(backend: Backend) -> None:
    topic = backend.make_topic(partitions=3, cleanup_policy="compact")
    producer = backend.log.producer()
    producer.send_batch(topic, [Message(f"v{i}".encode(), key=f"user-{i}".encode()) for i in range(300)])
    scan = backend.log.scan_compacted(topic, batch_size=50)
    first = next(scan)
    assert 0 < len(first) <= 50
    producer.send_batch(topic, [Message(b"later", key=f"late-{i}".encode()) for i in range(30)])
    records = first + [r for batch in scan for r in batch]
    assert latest_by_key(records) == {f"user-{i}".encode(): f"v{i}".encode() for i in range(300)}
    producer.close()


def _versions(keys: int) -> tuple[list[list[Message]], dict[bytes, bytes], set[bytes]]:
    """Rounds of writes: every key v1, even keys v2, keys divisible by 5 deleted, keys divisible by
    3 v3 (which brings k0, k15, ... back). Returns (rounds, latest live value per key, deleted keys)."""
    rounds = [
        [Message(f"v1-{i}".encode(), key=f"k{i}".encode()) for i in range(keys)],
        [Message(f"v2-{i}".encode(), key=f"k{i}".encode()) for i in range(0, keys, 2)],
        [Message(None, key=f"k{i}".encode()) for i in range(0, keys, 5)],
        [Message(f"v3-{i}".encode(), key=f"k{i}".encode()) for i in range(0, keys, 3)],
    ]
    state: dict[bytes, bytes | None] = {}
    for messages in rounds:
        for m in messages:
            assert m.key is not None
            state[m.key] = m.value
    live = {k: v for k, v in state.items() if v is not None}
    return rounds, live, {k for k, v in state.items() if v is None}


def check_latest_only(batches: list[list[Record]], live: dict[bytes, bytes], deleted: set[bytes]) -> None:
    """The scan_compacted contract: each key at most once, live keys with their latest value,
    deleted keys at most once as their tombstone, partition after partition, offset order."""
    records = [r for batch in batches for r in batch]
    assert all(batches), "no empty batch"
    assert [(r.partition, r.offset) for r in records] == sorted((r.partition, r.offset) for r in records)
    keys = [r.key for r in records if r.key is not None]
    assert len(keys) == len(set(keys)), "a key appeared twice"
    assert {r.key: r.value for r in records if r.value is not None} == live
    assert {r.key for r in records if r.value is None} <= deleted


def test_scan_compacted_yields_each_keys_latest_record_once_before_any_cleaning(backend: Backend) -> None:
    topic = backend.make_topic(partitions=3, cleanup_policy="compact")
    producer = backend.log.producer()
    rounds, live, deleted = _versions(90)
    for messages in rounds:
        producer.send_batch(topic, messages)
    producer.close()
    # Whatever the batch size (a key's versions fall in one batch or in different ones).
    for batch_size in (1, 7, 10_000):
        check_latest_only(list(backend.log.scan_compacted(topic, batch_size=batch_size)), live, deleted)
    assert len(live) == 90 - len(deleted) and deleted  # some keys deleted, some brought back


def test_scan_compacted_with_start_and_end_offsets(backend: Backend) -> None:
    # A delete topic: nothing is ever cleaned, so what was superseded after the end stays
    # readable (on a compacted topic the cleaner may remove it: the race the contract allows).
    topic = backend.make_topic(partitions=2)
    producer = backend.log.producer()
    rounds, _, _ = _versions(40)
    for messages in rounds[:2]:
        producer.send_batch(topic, messages)
    consumer = backend.log.consumer(None)
    ends = {tp.partition: o for tp, o in consumer.end_offsets(backend.log.partitions(topic)).items()}
    consumer.close()
    for messages in rounds[2:]:
        producer.send_batch(topic, messages)
    unkeyed = producer.send_batch(topic, [Message(b"no key"), Message(b"no key"), Message(b"no key")])
    producer.close()
    # As of the captured ends: the state after round 2, later writes ignored.
    as_of = {f"k{i}".encode(): (f"v2-{i}" if i % 2 == 0 else f"v1-{i}").encode() for i in range(40)}
    check_latest_only(list(backend.log.scan_compacted(topic, batch_size=5, end_offsets=ends)), as_of, set())
    # From a start: only the keys whose latest record (below the end) is at or after it.
    starts = {p: end // 2 for p, end in ends.items()}
    got = [r for b in backend.log.scan_compacted(topic, batch_size=5, start_offsets=starts, end_offsets=ends)
           for r in b]
    full = [r for b in backend.log.scan_compacted(topic, end_offsets=ends) for r in b]
    assert got == [r for r in full if r.offset >= starts[r.partition]] and got
    # Unkeyed records (delete topics) are all yielded; keyed ones once each.
    everything = [r for b in backend.log.scan_compacted(topic) for r in b]
    assert sorted((r.partition, r.offset) for r in everything if r.key is None) == sorted(unkeyed)
    assert len([r for r in everything if r.key is not None]) == 40
