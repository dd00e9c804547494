"""The embedded producer's row path (send_rows) checks what send_batch checks, before writing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.log.test_embedded import read_everything
from workers.log.embedded import EmbeddedLog
from workers.log.port import LogError, Message, TopicSpec, partition_for


def test_send_rows_refuses_a_keyless_row_on_a_compacted_topic_and_writes_nothing(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    log.create_topic(TopicSpec("users", partitions=2, cleanup_policy="compact"))
    producer = log.producer()
    with pytest.raises(LogError, match="message 1 has no key"):
        producer.send_rows("users", [(b"a", b"1", None), (None, b"2", None)])
    assert read_everything(log, "users") == []
    # the refused batch took no offsets
    assert producer.send_rows("users", [(b"a", b"1", 5)]) == [(partition_for(b"a", 2), 0)]
    producer.close()


def test_send_rows_and_send_batch_interleave_on_one_numbering(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    log.create_topic(TopicSpec("bids", partitions=3))
    producer = log.producer()
    a = producer.send_rows("bids", [(b"k%d" % i, b"r", 7) for i in range(30)])
    b = producer.send_batch("bids", [Message(b"m", key=b"k%d" % i, timestamp_ms=7) for i in range(30)])
    assert [p for p, _ in a] == [p for p, _ in b]
    counts: dict[int, int] = {}
    for p, _ in a:
        counts[p] = counts.get(p, 0) + 1
    for (p, first), (_, second) in zip(a, b, strict=True):
        assert second == first + counts[p]
    records = read_everything(log, "bids")
    assert len(records) == 60 and {r.timestamp_ms for r in records} == {7}
    producer.close()
