"""A stream consumer process runs the cyclic GC rarely (its batches make no cycles; frequent young
collections re-walked every live document of the batch), and gives the process its thresholds
back when the consumer closes (tests and the demo build consumers inside longer-lived processes)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from rules_service.config import Settings

pytestmark = pytest.mark.redis


def test_the_consumer_runs_with_rare_collections_and_restores_the_thresholds(tmp_path: Path, redis_url: str) -> None:
    from workers.stream_runner import GC_THRESHOLDS, build_consumer

    before = gc.get_threshold()
    assert before != GC_THRESHOLDS
    with build_consumer(Settings(DATA_DIR=tmp_path, REDIS_URL=redis_url)):
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 50_000
    assert gc.get_threshold() == before


def test_the_consumer_keeps_its_freed_heap(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import stream_runner

    calls: list[bool] = []
    real = stream_runner.keep_freed_heap
    monkeypatch.setattr(stream_runner, "keep_freed_heap", lambda: calls.append(real()) or calls[-1])
    with stream_runner.build_consumer(Settings(DATA_DIR=tmp_path, REDIS_URL=redis_url)):
        pass
    assert calls == [True]  # glibc accepted every option (this suite runs on Linux with glibc)
