"""The replay's batch helpers: renumbering per-rule masks over the matched documents."""

from __future__ import annotations

import random

import pytest

from workers.replay import _matched_only


@pytest.mark.parametrize("seed", range(8))
def test_matched_only_keeps_each_rules_documents(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([1, 7, 64, 65, 1000, 4097])
    docs = [{"i": i} for i in range(size)]
    density = rng.choice([0.001, 0.05, 0.3])
    masks = [sum(1 << i for i in range(size) if rng.random() < density) for _ in range(rng.randint(1, 40))]
    masks[0] |= 1 << (size - 1)  # the last document, at the edge of the last byte
    kept, renumbered = _matched_only(docs, masks)
    assert len(renumbered) == len(masks)
    union = 0
    for mask in masks:
        union |= mask
    if union.bit_count() * 10 >= size * 9:
        assert kept is docs and renumbered is masks
        return
    assert [d["i"] for d in kept] == [i for i in range(size) if union >> i & 1]
    for old, new in zip(masks, renumbered, strict=True):
        assert new >> len(kept) == 0
        assert {kept[j]["i"] for j in range(len(kept)) if new >> j & 1} == {i for i in range(size) if old >> i & 1}


def test_matched_only_with_everything_matched_is_the_identity() -> None:
    docs = [{"i": i} for i in range(10)]
    masks = [(1 << 10) - 1, 0b101]
    assert _matched_only(docs, masks) == (docs, masks)


def test_worker_inbox_reads_cancellations_without_blocking_and_sees_the_parent_go() -> None:
    import os

    from workers.replay import _Inbox

    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b'{"job": 1}\n{"cancel": ["a"]}\n{"can')
        inbox = _Inbox(read_fd)
        assert inbox.job() == {"job": 1}
        assert inbox.poll() == {"a"}  # a partial line waits for its end
        os.write(write_fd, b'cel": ["b"]}\n')
        assert inbox.poll() == {"a", "b"} and not inbox.closed
        os.close(write_fd)
        write_fd = -1
        inbox.poll()
        assert inbox.closed  # EOF: the parent is gone, the worker stops after its batch
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_worker_settings_round_trip() -> None:
    from pathlib import Path

    from rules_service.config import load_settings
    from workers.replay import _settings_overrides

    settings = load_settings({"DATA_DIR": "/tmp/x y", "REDIS_URL": "redis://h:1/2", "DIMENSIONS": "gender,geo.city",
                              "STREAM_OVERLAP_APPLY": True}, environ={})
    again = load_settings(_settings_overrides(settings), environ={})
    assert again == settings and again.DATA_DIR == Path("/tmp/x y")
