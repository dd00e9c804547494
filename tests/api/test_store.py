"""The Redis store: hashed keys, optimistic concurrency under contention, versions logic."""

from __future__ import annotations

import threading

import pytest
import redis

from rules_service.store import (
    AudienceStore,
    ConflictError,
    VersionNotFoundError,
    activate,
    hash_key,
    new_audience,
    new_id,
    revise,
)

RULE_A = {"term": {"gender": "male"}}
RULE_B = {"term": {"gender": "female"}}


def test_ids_sort_in_creation_order() -> None:
    ids = [new_id("aud") for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_revise_versions_without_lookback() -> None:
    doc = new_audience("adv", "n", RULE_A, 0)
    renamed, changed, backfill = revise(doc, name="m")
    assert (renamed["version"], renamed["name"], changed, backfill) == (1, "m", [1], False)
    same, changed, _ = revise(doc, rule=RULE_A)
    assert same["version"] == 1 and changed == []
    new, changed, backfill = revise(doc, rule=RULE_B)
    assert (new["version"], new["serving_version"], backfill) == (2, 2, False)
    assert [(v["version"], v["status"]) for v in new["versions"]] == [(1, "inactive"), (2, "active")]
    assert sorted(changed) == [1, 2] and new["revision"] == doc["revision"] + 1


def test_revise_with_lookback_keeps_serving_and_supersedes_pending() -> None:
    doc, _ = activate(new_audience("adv", "n", RULE_A, 30), 1)
    v2, changed, backfill = revise(doc, rule=RULE_B)
    assert (v2["version"], v2["serving_version"], backfill, changed) == (2, 1, True, [2])
    assert [(v["version"], v["status"]) for v in v2["versions"]] == [(1, "active"), (2, "backfilling")]
    v3, changed, _ = revise(v2, rule={"term": {"gender": "other"}})
    assert [(v["version"], v["status"]) for v in v3["versions"]] == [(1, "active"), (2, "inactive"),
                                                                      (3, "backfilling")]
    assert sorted(changed) == [2, 3] and v3["serving_version"] == 1
    done, changed = activate(v3, 3)
    assert done["serving_version"] == 3 and sorted(changed) == [1, 3]
    with pytest.raises(VersionNotFoundError):
        activate(done, 9)


@pytest.mark.redis
def test_keys_are_stored_hashed_and_revocable(redis_url: str) -> None:
    store = AudienceStore(redis.Redis.from_url(redis_url))
    adv, key = store.create_advertiser("acme")
    assert store.advertiser_id_for_key(key) == adv.id
    assert store.advertiser_id_for_key(key + "x") is None
    values = b"".join(store.redis.dump(k) or b"" for k in store.redis.keys("*"))
    assert key.encode() not in values and hash_key(key).encode() in b"".join(store.redis.keys("*"))
    new_key = store.rotate_key(adv.id)
    assert new_key and store.advertiser_id_for_key(key) is None and store.advertiser_id_for_key(new_key) == adv.id
    assert store.revoke_advertiser(adv.id) and store.advertiser_id_for_key(new_key) is None
    assert store.get_advertiser(adv.id).revoked  # type: ignore[union-attr]
    assert not store.revoke_advertiser("adv_missing") and store.rotate_key("adv_missing") is None


@pytest.mark.redis
def test_concurrent_updates_lose_nothing(redis_url: str) -> None:
    store = AudienceStore(redis.Redis.from_url(redis_url))
    doc = store.create_audience(new_audience("adv", "n", RULE_A, 0))

    def add(tag: str) -> None:
        for i in range(20):
            def mutate(current: dict, item: str = f"{tag}-{i}") -> dict:
                current.setdefault("tags", []).append(item)
                current["revision"] += 1
                return current
            store.update_audience(doc["id"], mutate)

    threads = [threading.Thread(target=add, args=(f"t{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = store.get_audience(doc["id"])
    assert final is not None and len(final["tags"]) == 120 and len(set(final["tags"])) == 120
    assert final["revision"] == doc["revision"] + 120
    with pytest.raises(ConflictError):
        store.update_audience(doc["id"], lambda d: d, expected_revision=1)
    assert store.get_audience(doc["id"], advertiser_id="someone-else") is None
    assert store.delete_audience(doc["id"], advertiser_id="someone-else") is None
    assert store.delete_audience(doc["id"], advertiser_id="adv") is not None
    assert store.list_audiences("adv") == ([], None)
