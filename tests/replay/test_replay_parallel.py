"""A scan split by partition over worker processes counts exactly like one process, resumes from
its per-partition checkpoints after a crash, stops on cancel, and reports a failed worker."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rules_service.config import load_settings
from rules_service.counters.factory import create_counters
from tests.replay.conftest import RULE, Env
from tests.stream.fakes import FakeCounters
from workers.log.embedded import EmbeddedLog
from workers.replay import ReplayRequest, ReplayScan, ScanProgress, plan_scan

pytestmark = pytest.mark.redis

PARALLEL = {"scan_workers": 2, "parallel_min_offsets": 0}


class Crash(Exception):
    pass


def _worker_children() -> list[int]:
    """Our child processes running ``python -m workers.replay`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"workers.replay" in cmdline:
            found.append(int(entry.name))
    return found


def test_two_worker_processes_count_like_one(env: Env) -> None:
    env.stream(bids=6_000, users=2_000)
    parallel = env.create(RULE, lookback=30, name="parallel")
    replay_id = parallel["backfill"]["replay_id"]
    batches: list[ScanProgress] = []
    env.coordinator(batch_size=300, on_batch=lambda p: batches.append(p), **PARALLEL).run_pending()
    body = env.client.get(f"/v1/replays/{replay_id}", headers=env.headers).get_json()
    assert body["status"] == "done", body
    assert body["progress"]["scanned"] == body["progress"]["total"] > 0
    assert body["progress"]["matched"] > 0
    assert len(batches) >= 4  # the parent saw every worker's batches (2 partitions, >= 2 batches each)
    assert batches[-1].records == body["progress"]["records"]

    single = env.create(RULE, lookback=30, name="single")
    env.coordinator(batch_size=300, scan_workers=1).run_pending()
    assert env.client.get(f"/v1/replays/{single['backfill']['replay_id']}",
                          headers=env.headers).get_json()["progress"]["matched"] == body["progress"]["matched"]
    env.assert_same_counters(parallel["id"], single["id"])


def test_parallel_crash_resumes_per_partition_and_counts_like_a_clean_run(env: Env) -> None:
    env.stream(bids=6_000, users=2_000)
    crashed = env.create(RULE, lookback=30, name="crashed")
    seen: list[int] = []

    def crash_after_three(progress: ScanProgress) -> None:
        seen.append(progress.scanned)
        if len(seen) == 3:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        env.coordinator(batch_size=100, on_batch=crash_after_three, **PARALLEL).run_pending()
    if Path("/proc/self").exists():
        assert _worker_children() == []  # the crash took the worker processes down with it
    assert (env.state.get(crashed["backfill"]["replay_id"]) or {}).get("status") == "running"
    resumed: list[int] = []
    env.coordinator(batch_size=100, on_batch=lambda p: resumed.append(p.scanned), **PARALLEL).run_pending()
    assert (env.state.get(crashed["backfill"]["replay_id"]) or {}).get("status") == "done"
    assert resumed[0] > seen[-1] - 200  # resumed from the checkpoints, not from the start

    clean = env.create(RULE, lookback=30, name="clean")
    # the same batch boundaries: the stream's topic is not compacted yet, and a user whose older
    # record sits in another batch is matched once per record
    env.coordinator(batch_size=100, scan_workers=1).run_pending()
    env.assert_same_counters(crashed["id"], clean["id"])


def test_cancel_reaches_the_worker_processes(env: Env) -> None:
    env.stream(bids=4_000, users=1_500)
    running = env.create(RULE, lookback=30, name="running")
    replay_id = running["backfill"]["replay_id"]

    def cancel_after_first(progress: ScanProgress) -> None:
        if progress.batches == 1:
            response = env.client.delete(f"/v1/replays/{replay_id}", headers=env.headers)
            assert response.status_code == 202

    result = env.coordinator(batch_size=10, on_batch=cancel_after_first, **PARALLEL).run_pending()
    assert result.finished == {replay_id: "cancelled"}
    body = env.client.get(f"/v1/replays/{replay_id}", headers=env.headers).get_json()
    assert body["status"] == "cancelled" and body["progress"]["scanned"] < body["progress"]["total"]


def test_a_failing_worker_is_an_error_naming_it(env: Env, tmp_path: Path) -> None:
    env.stream(bids=1_000, users=500)
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    request = ReplayRequest(replay_id="rp-1", rule_id="r-1", query=RULE, since_ms=now_ms - 30 * 86_400_000,
                            live_since_ms=now_ms)
    # the workers' Redis does not answer: their first counters write fails
    unreachable = load_settings({"DATA_DIR": str(env.settings.DATA_DIR), "REDIS_URL": "redis://127.0.0.1:1/0"},
                                environ={})
    from percolators.embedded import EmbeddedPercolator

    scan = ReplayScan(env.log, EmbeddedPercolator(), FakeCounters(), [request], scan_id="s-fail",
                      plan=plan_scan(env.log), batch_size=100, workers=2, worker_settings=unreachable,
                      parallel_min_offsets=0)
    with pytest.raises(RuntimeError, match=r"replay worker for partitions \[\d+\] exited with 1: .*ConnectionError"):
        scan.run()


def test_small_scans_stay_in_process(env: Env) -> None:
    env.stream(bids=500, users=200)
    log = EmbeddedLog(env.settings.DATA_DIR / "log")
    try:
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        request = ReplayRequest(replay_id="rp-1", rule_id="r-1", query=RULE, since_ms=now_ms - 86_400_000 * 30,
                                live_since_ms=now_ms)
        from percolators.embedded import EmbeddedPercolator

        scan = ReplayScan(log, EmbeddedPercolator(), create_counters(env.settings, env.redis), [request],
                          scan_id="s-small", plan=plan_scan(log), workers=2, worker_settings=env.settings)
        assert scan._worker_groups() == []  # below PARALLEL_MIN_OFFSETS
        scan.parallel_min_offsets = 0
        assert sorted(p for g in scan._worker_groups() for p in g) == sorted(scan.plan.ends)
    finally:
        log.close()


def test_scan_workers_come_from_the_setting(env: Env) -> None:
    import dataclasses

    from workers.replay_coordinator import ReplayCoordinator, _usable_cpus

    assert env.coordinator().scan_workers == _usable_cpus()  # RULES_REPLAY_WORKERS=0: one per CPU
    one = dataclasses.replace(env.settings, REPLAY_WORKERS=1)
    assert ReplayCoordinator(one, redis=env.redis, log=env.log).scan_workers == 1
    assert ReplayCoordinator(one, redis=env.redis, log=env.log, scan_workers=3).scan_workers == 3
