"""Replays end to end on the real log, counters, percolator and API (real redis-server)."""

from __future__ import annotations

import pytest

from rules_service.domain import rule_id
from tests.replay.conftest import RULE, RULE_B, Env
from workers.replay import ScanProgress, last_seen_bytes

pytestmark = pytest.mark.redis


class Crash(Exception):
    pass


def test_last_seen_is_read_from_the_tail_or_decoded() -> None:
    fast = b'{"user_id":"u1","age":30,"last_seen":"2026-11-20T10:00:00.123Z"}'
    assert last_seen_bytes(fast) == b"2026-11-20T10:00:00.123Z"
    slow = b'{"last_seen":"2026-11-20T10:00:00+00:00","user_id":"u1"}'
    assert last_seen_bytes(slow) == b"2026-11-20T10:00:00.000Z"
    assert last_seen_bytes(b'{"user_id":"u1"}') is None
    assert last_seen_bytes(b"not json") is None


def test_kappa_replayed_audience_counts_the_same_users_as_a_live_one(env: Env) -> None:
    live = env.create(RULE, name="live")
    env.stream(bids=12_000, users=2_500)
    backfilled = env.create(RULE, lookback=30, name="backfilled")
    assert backfilled["backfill"]["status"] == "pending"
    result = env.coordinator().run_pending()
    assert result.finished == {backfilled["backfill"]["replay_id"]: "done"}
    for days in (7, 30):
        expected = env.size(live["id"], days)["unique_users"]
        got = env.size(backfilled["id"], days)["unique_users"]
        assert expected > 50
        assert abs(got - expected) <= max(2, 0.02 * expected), (days, expected, got)
    # outside the lookback window nothing was replayed
    assert env.size(backfilled["id"], 60)["unique_users"] == env.size(backfilled["id"], 30)["unique_users"]
    assert env.size(live["id"], 60)["unique_users"] > env.size(live["id"], 30)["unique_users"]


def test_progress_and_shared_scan_through_the_api(env: Env) -> None:
    env.stream(bids=6_000, users=2_000)
    first, second = env.create(RULE, lookback=30, name="a"), env.create(RULE_B, lookback=60, name="b")
    ids = [first["backfill"]["replay_id"], second["backfill"]["replay_id"]]
    pending = env.client.get(f"/v1/replays/{ids[0]}", headers=env.headers).get_json()
    assert pending["status"] == "pending" and pending["progress"]["scanned"] == 0
    scans_before = env.state.scans_started()
    result = env.coordinator(batch_size=500).run_pending()
    assert env.state.scans_started() == scans_before + 1  # requested together: ONE scan
    assert len(result.scans) == 1 and set(result.finished) == set(ids)
    for replay_id in ids:
        body = env.client.get(f"/v1/replays/{replay_id}", headers=env.headers).get_json()
        progress = body["progress"]
        assert body["status"] == "done", body
        assert progress["scanned"] == progress["total"] > 0
        assert progress["matched"] > 0 and progress["rate"] > 0 and progress["eta_seconds"] == 0
    audience = env.client.get(f"/v1/audiences/{first['id']}", headers=env.headers).get_json()
    assert audience["backfill"]["status"] == "done" and audience["status"] == "active"


def test_crash_mid_scan_resumes_and_counts_like_a_clean_run(env: Env) -> None:
    env.stream(bids=6_000, users=2_000)
    crashed = env.create(RULE, lookback=30, name="crashed")
    batches = []

    def crash_after_three(progress: ScanProgress) -> None:
        batches.append(progress.scanned)
        if len(batches) == 3:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        env.coordinator(batch_size=300, on_batch=crash_after_three).run_pending()
    record = env.state.get(crashed["backfill"]["replay_id"])
    assert record is not None and record["status"] == "running"
    assert env.state.running_scans()
    resumed_progress: list[int] = []
    env.coordinator(batch_size=300, on_batch=lambda p: resumed_progress.append(p.scanned)).run_pending()
    assert (env.state.get(crashed["backfill"]["replay_id"]) or {}).get("status") == "done"
    assert resumed_progress[0] > batches[-1] - 300  # resumed from the checkpoint, not from the start

    clean = env.create(RULE, lookback=30, name="clean")
    env.coordinator(batch_size=300).run_pending()
    env.assert_same_counters(crashed["id"], clean["id"])


def test_cancel_running_and_pending_replays(env: Env) -> None:
    env.stream(bids=4_000, users=1_500)
    running = env.create(RULE, lookback=30, name="running")
    replay_id = running["backfill"]["replay_id"]

    def cancel_after_first(progress: ScanProgress) -> None:
        if progress.batches == 1:
            response = env.client.delete(f"/v1/replays/{replay_id}", headers=env.headers)
            assert response.status_code == 202 and response.get_json()["cancel_requested"]

    result = env.coordinator(batch_size=200, on_batch=cancel_after_first).run_pending()
    assert result.finished == {replay_id: "cancelled"}
    body = env.client.get(f"/v1/replays/{replay_id}", headers=env.headers).get_json()
    assert body["status"] == "cancelled" and body["progress"]["scanned"] < body["progress"]["total"]
    assert env.client.delete(f"/v1/replays/{replay_id}", headers=env.headers).status_code == 409

    pending = env.client.post(f"/v1/audiences/{running['id']}/replays", json={"days": 7}, headers=env.headers)
    assert pending.status_code == 202
    pending_id = pending.get_json()["id"]
    assert env.client.delete(f"/v1/replays/{pending_id}", headers=env.headers).get_json()["status"] == "cancelled"
    assert env.coordinator().run_pending().scans == []


def test_replay_api_validation_and_ownership(env: Env) -> None:
    audience = env.create(RULE, name="mine")
    bad = env.client.post(f"/v1/audiences/{audience['id']}/replays", json={"days": 0}, headers=env.headers)
    assert bad.status_code == 400 and "days" in bad.get_json()["error"]["fields"]
    ok = env.client.post(f"/v1/audiences/{audience['id']}/replays", json={"days": 30}, headers=env.headers)
    assert ok.status_code == 202
    store = env.app.extensions["rules_service"].store
    _, other_key = store.create_advertiser("other")
    other = {"Authorization": f"Bearer {other_key}"}
    assert env.client.get(f"/v1/replays/{ok.get_json()['id']}", headers=other).status_code == 404
    assert env.client.post(f"/v1/audiences/{audience['id']}/replays", json={"days": 30},
                           headers=other).status_code == 404


def test_versions_switch_on_completion_and_roll_back(env: Env) -> None:
    audience = env.create(RULE, name="versions")
    env.stream(bids=4_000, users=1_500)
    no_previous = env.client.post(f"/v1/audiences/{audience['id']}/rollback", headers=env.headers)
    assert no_previous.status_code == 409 and "no previous version" in no_previous.get_json()["error"]["message"]

    changed = env.client.put(f"/v1/audiences/{audience['id']}", json={"rule": RULE_B, "lookback_days": 30},
                             headers=env.headers).get_json()
    assert changed["version"] == 2 and changed["serving_version"] == 1  # v1 serves while v2 backfills
    env.coordinator().run_pending()
    switched = env.client.get(f"/v1/audiences/{audience['id']}", headers=env.headers).get_json()
    assert switched["serving_version"] == 2 and switched["status"] == "active"
    # the retired version's counters now expire within the retention
    keys = list(env.redis.scan_iter(match=f"c:{{r:{rule_id(audience['id'], 1)}}}:*"))
    assert keys
    limit = env.settings.VERSION_RETENTION_DAYS * 86400
    assert all(0 < env.redis.ttl(k) <= limit for k in keys)

    rolled = env.client.post(f"/v1/audiences/{audience['id']}/rollback", headers=env.headers)
    assert rolled.status_code == 200, rolled.get_json()
    body = rolled.get_json()
    assert body["serving_version"] == 1 and body["rollback"]["gap_replay_id"]
    assert all(env.redis.ttl(k) > limit for k in keys if env.redis.exists(k) and b":u:d:" in k)
    assert env.size(audience["id"])["version"] == 1

    # once the previous version's counters have expired, rollback is refused with a clear error
    env.redis.hset(f"rs:versions:{audience['id']}", "2",
                   b'{"retired_at_ms": 1, "expires_at_ms": 2, "replaced_by": 1}')
    expired = env.client.post(f"/v1/audiences/{audience['id']}/rollback", headers=env.headers)
    assert expired.status_code == 409 and "expired" in expired.get_json()["error"]["message"]
