"""The embedded cleaner's scheduling: one pass per topic at a time (the cleaner lease), and the
free pages a background pass keeps for the appends to come."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.log.test_embedded import read_everything
from workers.log import embedded
from workers.log.embedded import EmbeddedLog
from workers.log.port import Message, TopicSpec


def _overwrite(producer: embedded.EmbeddedProducer, topic: str, rounds: int, keys: int = 300) -> None:
    for round_ in range(rounds):
        producer.send_batch(topic, [Message(b"%04d" % round_ + b"v" * 996, key=b"user-%05d" % i)
                                    for i in range(keys)])


def _join_cleaners(producer: embedded.EmbeddedProducer) -> None:
    for cleaner in list(producer._cleaners.values()):
        cleaner.join(timeout=120)
        assert not cleaner.is_alive()


def test_a_background_pass_skips_while_another_holds_the_lease(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=0)  # a pass after every batch
    log.create_topic(TopicSpec("users", cleanup_policy="compact", min_cleanable_dirty_ratio=0.01))
    path = log._store.topic_path("users")
    producer = log.producer()
    with embedded._cleaner_lease(path, wait=True) as held:
        assert held
        _overwrite(producer, "users", 3, keys=50)
        _join_cleaners(producer)
        assert len(read_everything(log, "users")) == 150  # nothing cleaned: the lease was taken
    producer.send_batch("users", [Message(b"last", key=b"user-00000")])
    _join_cleaners(producer)
    records = read_everything(log, "users")
    assert len(records) == 50
    assert {r.key: r.value for r in records}[b"user-00000"] == b"last"
    producer.close()


def test_compact_waits_for_the_lease_then_cleans(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=1e9)
    log.create_topic(TopicSpec("users", cleanup_policy="compact"))
    producer = log.producer()
    _overwrite(producer, "users", 2, keys=20)
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with embedded._cleaner_lease(log._store.topic_path("users"), wait=True):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    done = threading.Event()

    def compact() -> None:
        log.compact("users")
        done.set()

    compactor = threading.Thread(target=compact)
    compactor.start()
    assert not done.wait(0.3), "compact() did not wait for the lease"
    release.set()
    holder.join(30)
    compactor.join(60)
    assert done.is_set()
    assert len(read_everything(log, "users")) == 20
    producer.close()


def _pragma(log: EmbeddedLog, topic: str, name: str) -> int:
    handle = log._store.open_topic(topic)
    try:
        return int(handle.conn.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        handle.conn.close()


def _free_pages(log: EmbeddedLog, topic: str) -> int:
    return _pragma(log, topic, "freelist_count")


def _background_pass(log: EmbeddedLog, topic: str) -> int:
    handle = log._store.open_topic(topic)
    try:
        return embedded._maintain(handle, log.tombstone_retention_ms, budget_rows=None, busy_timeout_ms=30_000)
    finally:
        handle.conn.close()


def test_a_background_pass_keeps_free_pages_for_the_next_appends_until_traffic_stops(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=1e9)
    log.create_topic(TopicSpec("users", partitions=2, cleanup_policy="compact"))
    producer = log.producer()
    live = 300 * (1000 + 10)
    _overwrite(producer, "users", 10)
    assert _background_pass(log, "users") == 9 * 300
    reserved = _free_pages(log, "users")
    # the superseded records' pages stay free for the next interval's appends (no page moving)
    assert reserved * embedded._PAGE_SIZE > 4 * live
    pages = _pragma(log, "users", "page_count")  # of the database (the -wal file comes and goes)
    _overwrite(producer, "users", 9)  # steady traffic: the appends reuse the kept pages
    assert _pragma(log, "users", "page_count") < pages * 1.25
    assert _background_pass(log, "users") == 9 * 300
    # no writes since: nothing is coming to reuse the pages, the next pass gives them back
    assert _background_pass(log, "users") == 0
    assert _free_pages(log, "users") == 0
    assert log.topic_size_bytes("users") < 2 * live + 64 * 1024
    records = read_everything(log, "users")
    assert len(records) == 300 and all(r.value and r.value.startswith(b"0008") for r in records)
    producer.close()


def test_compact_gives_every_free_page_back(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log", maintenance_interval_s=1e9)
    log.create_topic(TopicSpec("users", partitions=2, cleanup_policy="compact"))
    producer = log.producer()
    _overwrite(producer, "users", 10)
    log.compact("users")
    assert _free_pages(log, "users") == 0
    assert log.topic_size_bytes("users") < 2 * 300 * 1010 + 64 * 1024
    producer.close()
