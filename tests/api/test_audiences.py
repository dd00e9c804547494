"""Audiences through HTTP: CRUD, validation (422 naming the clause), versions, backfill requests,
rule distribution to the workers, tenant isolation and the dry-run test."""

from __future__ import annotations

import orjson
import pytest

from rules_service.domain import REPLAYS_TOPIC, RULES_TOPIC, RuleChange
from tests.api.conftest import ApiEnv

pytestmark = pytest.mark.redis

RULE = {"bool": {"must": [{"term": {"gender": "male"}}, {"range": {"age": {"gte": 26, "lte": 35}}}]}}


def rule_messages(api: ApiEnv) -> dict[str, RuleChange | None]:
    return {key.decode(): (None if value is None else RuleChange.from_json(value))
            for key, value in api.log.latest(RULES_TOPIC).items() if key is not None}


def test_create_read_list_and_publish(api: ApiEnv) -> None:
    headers = api.advertiser()
    response = api.client.post("/v1/audiences", json={"name": "Young men", "rule": RULE}, headers=headers)
    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"/v1/audiences/{body['id']}"
    assert body["name"] == "Young men" and body["rule"] == RULE
    assert (body["version"], body["serving_version"], body["status"], body["lookback_days"]) == (1, 1, "active", 0)
    assert body["backfill"]["status"] == "none"
    assert body["created_at"].endswith("Z") and body["created_at"] == body["updated_at"]
    assert api.client.get(f"/v1/audiences/{body['id']}", headers=headers).get_json() == body
    listed = api.client.get("/v1/audiences", headers=headers).get_json()
    assert [a["id"] for a in listed["data"]] == [body["id"]] and listed["next_cursor"] is None
    change = rule_messages(api)[f"{body['id']}@v1"]
    assert change is not None and change.query == RULE and change.status == "active"
    assert change.advertiser_id == api.store.advertiser_id_for_key(headers["Authorization"][7:])


def test_pagination_is_stable_and_complete(api: ApiEnv) -> None:
    headers = api.advertiser()
    ids = [api.create(headers, name=f"a{i}")["id"] for i in range(7)]
    seen, url = [], "/v1/audiences?limit=3"
    while url:
        page = api.client.get(url, headers=headers)
        body = page.get_json()
        assert len(body["data"]) <= 3
        seen += [a["id"] for a in body["data"]]
        url = body["links"]["next"]
        if url:
            assert page.headers["Link"].startswith(f"<{url}>")
    assert seen == ids  # creation order, nothing lost or repeated
    bad = api.client.get("/v1/audiences?limit=0", headers=headers)
    assert bad.status_code == 400 and "limit" in bad.get_json()["error"]["fields"]


@pytest.mark.parametrize(("body", "field"), [
    ({"rule": {"term": {"gender": "male"}}}, "name"),
    ({"name": "", "rule": {"term": {"gender": "male"}}}, "name"),
    ({"name": "x" * 201, "rule": {"term": {"gender": "male"}}}, "name"),
    ({"name": "n"}, "rule"),
    ({"name": "n", "rule": "gender:male"}, "rule"),
    ({"name": "n", "rule": {"match_all": {}}, "lookback_days": 45}, "lookback_days"),
    ({"name": "n", "rule": {"match_all": {}}, "lookback_days": "30"}, "lookback_days"),
    ({"name": "n", "rule": {"match_all": {}}, "colour": "red"}, "colour"),
])
def test_envelope_validation_is_400_with_fields(api: ApiEnv, body: dict, field: str) -> None:
    response = api.client.post("/v1/audiences", json=body, headers=api.advertiser())
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "validation_error" and field in error["fields"]


def test_invalid_rule_is_422_naming_the_clause(api: ApiEnv) -> None:
    headers = api.advertiser()
    bad = {"bool": {"must": [{"term": {"gender": "male"}}, {"range": {"shoe_size": {"gte": 40}}}]}}
    response = api.client.post("/v1/audiences", json={"name": "n", "rule": bad}, headers=headers)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "invalid_rule"
    assert any(path.startswith("rule.bool.must[1].range") for path in error["fields"]), error
    assert "shoe_size" in error["message"] + " ".join(error["fields"].values())
    unknown = api.client.post("/v1/audiences", json={"name": "n", "rule": {"fuzzy_thing": {}}}, headers=headers)
    assert unknown.status_code == 422 and "rule.fuzzy_thing" in unknown.get_json()["error"]["fields"]
    assert api.client.get("/v1/audiences", headers=headers).get_json()["data"] == []
    assert rule_messages(api) == {}


def test_scripts_size_and_depth_are_rejected_before_the_percolator(api: ApiEnv) -> None:
    headers = api.advertiser()
    script = {"bool": {"filter": [{"script": {"script": {"source": "doc['age'].value > 30"}}}]}}
    response = api.client.post("/v1/audiences", json={"name": "n", "rule": script}, headers=headers)
    assert response.status_code == 422
    assert response.get_json()["error"]["fields"] == {"rule.bool.filter[0].script": "scripts are forbidden in rules",
                                                      "rule.bool.filter[0].script.script":
                                                          "scripts are forbidden in rules"}
    deep: dict = {"term": {"gender": "male"}}
    for _ in range(api.settings.MAX_RULE_DEPTH):
        deep = {"bool": {"must": [deep]}}
    response = api.client.post("/v1/audiences", json={"name": "n", "rule": deep}, headers=headers)
    assert response.status_code == 422 and response.get_json()["error"]["type"] == "rule_too_deep"
    big = {"terms": {"interests": [f"interest-{i}" for i in range(api.settings.MAX_RULE_BYTES // 10)]}}
    response = api.client.post("/v1/audiences", json={"name": "n", "rule": big}, headers=headers)
    assert response.status_code == 422 and response.get_json()["error"]["type"] == "rule_too_large"


def test_rename_keeps_version_rule_change_creates_one(api: ApiEnv) -> None:
    headers = api.advertiser()
    created = api.create(headers)
    url = f"/v1/audiences/{created['id']}"
    renamed = api.client.put(url, json={"name": "Males"}, headers=headers).get_json()
    assert (renamed["name"], renamed["version"], renamed["serving_version"]) == ("Males", 1, 1)
    assert renamed["updated_at"] >= created["updated_at"]
    changed = api.client.put(url, json={"rule": RULE}, headers=headers)
    assert changed.status_code == 200
    body = changed.get_json()
    assert (body["version"], body["serving_version"], body["status"], body["rule"]) == (2, 2, "active", RULE)
    assert [(v["version"], v["status"]) for v in body["versions"]] == [(1, "inactive"), (2, "active")]
    messages = rule_messages(api)
    assert messages[f"{created['id']}@v1"].status == "inactive"  # type: ignore[union-attr]
    assert messages[f"{created['id']}@v2"].query == RULE  # type: ignore[union-attr]
    same = api.client.put(url, json={"rule": RULE}, headers=headers).get_json()
    assert same["version"] == 2  # an identical rule is not a change
    assert api.client.put(url, json={}, headers=headers).status_code == 400
    bad = api.client.put(url, json={"rule": {"term": {"nope": 1}}}, headers=headers)
    assert bad.status_code == 422
    assert api.client.get(url, headers=headers).get_json()["version"] == 2


def test_lookback_requests_a_backfill_and_keeps_the_old_version_serving(api: ApiEnv) -> None:
    headers = api.advertiser()
    created = api.create(headers, lookback_days=30)
    assert created["status"] == "backfilling" and created["serving_version"] == 1
    backfill = created["backfill"]
    assert backfill["status"] == "pending" and backfill["days"] == 30 and backfill["replay_id"].startswith("rpl_")
    request = orjson.loads(api.log.messages[REPLAYS_TOPIC][-1].value)  # type: ignore[arg-type]
    assert (request["audience_id"], request["version"], request["days"]) == (created["id"], 1, 30)
    assert request["rule_id"] == f"{created['id']}@v1" and request["query"] == {"term": {"gender": "male"}}

    # the replay finished: version 1 active; then a rule change backfills v2 while v1 serves
    api.store.activate_version(created["id"], 1)
    url = f"/v1/audiences/{created['id']}"
    body = api.client.put(url, json={"rule": RULE}, headers=headers).get_json()
    assert (body["version"], body["serving_version"], body["status"]) == (2, 1, "backfilling")
    assert body["backfill"]["status"] == "pending" and body["backfill"]["replay_id"] != backfill["replay_id"]
    messages = rule_messages(api)
    assert messages[f"{created['id']}@v1"].status == "active"  # type: ignore[union-attr]
    assert messages[f"{created['id']}@v2"].status == "backfilling"  # type: ignore[union-attr]
    # the replay worker reports progress through the replay record
    replay_key = f"rs:replay:{body['backfill']['replay_id']}"
    record = orjson.loads(api.redis.get(replay_key))  # type: ignore[arg-type]
    api.redis.set(replay_key, orjson.dumps({**record, "status": "running", "progress": {"scanned": 5, "total": 10}}))
    running = api.client.get(url, headers=headers).get_json()["backfill"]
    assert running["status"] == "running" and running["progress"] == {"scanned": 5, "total": 10}
    changes = api.store.activate_version(created["id"], 2)
    assert {(c.version, c.status) for c in changes} == {(1, "inactive"), (2, "active")}
    done = api.client.get(url, headers=headers).get_json()
    assert (done["serving_version"], done["status"], done["backfill"]["status"]) == (2, "active", "done")


def test_backfill_failure_is_reported_not_fatal(api: ApiEnv) -> None:
    headers = api.advertiser()
    api.app.extensions["rules_service"]._provided["BACKFILLS"] = _FailingBackfills()
    created = api.create(headers, lookback_days=60)
    assert created["backfill"]["status"] == "failed" and "replay" in created["backfill"]["error"]


class _FailingBackfills:
    def start(self, audience: dict, version: int, days: int) -> str:
        raise ConnectionError("log down")

    def get(self, replay_id: str) -> None:
        return None


def test_log_down_means_503_and_nothing_created(api: ApiEnv) -> None:
    headers = api.advertiser()
    api.app.extensions["rules_service"].producer  # noqa: B018 - build it while the log is up
    api.log.down = True
    response = api.client.post("/v1/audiences", json={"name": "n", "rule": RULE}, headers=headers)
    assert response.status_code == 503 and response.get_json()["error"]["type"] == "service_unavailable"
    assert api.client.get("/v1/audiences", headers=headers).get_json()["data"] == []


def test_delete_tombstones_every_version_and_drops_counters(api: ApiEnv) -> None:
    from datetime import UTC, datetime

    from tests.api.fakes import batch_for

    headers = api.advertiser()
    created = api.create(headers)
    api.client.put(f"/v1/audiences/{created['id']}", json={"rule": RULE}, headers=headers)
    now = datetime.now(UTC)
    for version in (1, 2):
        api.counters.apply(batch_for(f"{created['id']}@v{version}", [(now, "u1", {})]), "t", {("bids", 0): version})
    assert api.counters.matches(f"{created['id']}@v2", now.replace(year=now.year - 1), now.replace(year=now.year + 1))
    response = api.client.delete(f"/v1/audiences/{created['id']}", headers=headers)
    assert response.status_code == 204 and response.data == b""
    messages = rule_messages(api)
    assert messages[f"{created['id']}@v1"] is None and messages[f"{created['id']}@v2"] is None
    for version in (1, 2):
        assert api.counters.matches(f"{created['id']}@v{version}", now.replace(year=now.year - 1),
                                    now.replace(year=now.year + 1)) == 0
    assert api.client.get(f"/v1/audiences/{created['id']}", headers=headers).status_code == 404
    assert api.client.delete(f"/v1/audiences/{created['id']}", headers=headers).status_code == 404
    assert api.client.get("/v1/audiences", headers=headers).get_json()["data"] == []


def test_etag_and_if_match(api: ApiEnv) -> None:
    headers = api.advertiser()
    created = api.create(headers)
    url = f"/v1/audiences/{created['id']}"
    etag = api.client.get(url, headers=headers).headers["ETag"]
    ok = api.client.put(url, json={"name": "b"}, headers={**headers, "If-Match": etag})
    assert ok.status_code == 200 and ok.headers["ETag"] != etag
    stale = api.client.put(url, json={"name": "c"}, headers={**headers, "If-Match": etag})
    assert stale.status_code == 412 and stale.get_json()["error"]["type"] == "precondition_failed"
    assert api.client.delete(url, headers={**headers, "If-Match": etag}).status_code == 412
    assert api.client.put(url, json={"name": "c"}, headers={**headers, "If-Match": "nope"}).status_code == 400


def test_tenant_isolation_on_every_audience_endpoint(api: ApiEnv) -> None:
    owner, intruder = api.advertiser("owner"), api.advertiser("intruder")
    audience = api.create(owner)
    url = f"/v1/audiences/{audience['id']}"
    missing = f"/v1/audiences/aud_{'0' * 22}"
    calls = [("get", ""), ("put", ""), ("delete", ""), ("get", "/size"), ("get", "/insights"),
             ("get", "/live?max_events=1")]
    for method, suffix in calls:
        kwargs = {"json": {"name": "stolen"}} if method == "put" else {}
        theirs = getattr(api.client, method)(url + suffix, headers=intruder, **kwargs)
        nothing = getattr(api.client, method)(missing + suffix, headers=intruder, **kwargs)
        assert theirs.status_code == nothing.status_code == 404, (method, suffix)
        assert theirs.get_json() == nothing.get_json()
    assert api.client.get("/v1/audiences", headers=intruder).get_json()["data"] == []
    batch = api.client.get(f"/v1/audiences/sizes?ids={audience['id']}", headers=intruder).get_json()
    assert batch == {"sizes": [], "not_found": [audience["id"]]}
    # untouched for its owner
    mine = api.client.get(url, headers=owner).get_json()
    assert mine["name"] == "Men" and mine["version"] == 1


def test_every_v1_endpoint_needs_a_valid_key(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    base = f"/v1/audiences/{audience['id']}"
    endpoints = [("get", "/v1/audiences"), ("post", "/v1/audiences"), ("get", base), ("put", base),
                 ("delete", base), ("get", base + "/size"), ("get", base + "/insights"), ("get", base + "/live"),
                 ("get", "/v1/audiences/sizes?ids=x"), ("post", "/v1/audiences/test"), ("get", "/v1/schema")]
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method, url in endpoints:
            response = getattr(api.client, method)(url, headers=auth, json={})
            assert response.status_code == 401, (method, url, auth)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.get_json()["error"]["type"] == "unauthorized"
    adv_id = api.store.advertiser_id_for_key(headers["Authorization"][7:])
    assert adv_id is not None and api.store.revoke_advertiser(adv_id)
    assert api.client.get("/v1/audiences", headers=headers).status_code == 401


def test_dry_run_explains_and_stores_nothing(api: ApiEnv) -> None:
    headers = api.advertiser()
    docs = [{"gender": "male", "age": 30}, {"gender": "female", "age": 30}, {"gender": "male", "age": 50}]
    response = api.client.post("/v1/audiences/test", json={"rule": RULE, "documents": docs}, headers=headers)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert [r["matched"] for r in results] == [True, False, False]
    assert [r["index"] for r in results] == [0, 1, 2]
    second = results[1]["explanation"]
    assert second["matched"] is False and second["path"] == "bool"
    assert any(c["path"] == "bool.must[0].term" and not c["matched"] for c in second["children"])
    assert api.client.get("/v1/audiences", headers=headers).get_json()["data"] == []
    assert rule_messages(api) == {}
    shared = api.app.extensions["rules_service"].percolator
    assert "test" not in shared.rule_ids()
    invalid = api.client.post("/v1/audiences/test", json={"rule": {"term": {"nope": 1}}, "documents": [{}]},
                              headers=headers)
    assert invalid.status_code == 422 and "rule.term.nope" in invalid.get_json()["error"]["fields"]
    too_many = api.client.post("/v1/audiences/test", json={"rule": RULE, "documents": [{}] * 101}, headers=headers)
    assert too_many.status_code == 400 and "documents" in too_many.get_json()["error"]["fields"]
    bad_doc = api.client.post("/v1/audiences/test", json={"rule": RULE, "documents": [{"age": "old"}]},
                              headers=headers).get_json()["results"][0]
    assert bad_doc["matched"] is False and "age" in bad_doc["error"]


def test_percolator_down_is_503_and_nothing_created(api: ApiEnv) -> None:
    from tests.api.fakes import BrokenPercolator

    headers = api.advertiser()
    api.app.extensions["rules_service"]._provided["PERCOLATOR"] = BrokenPercolator()
    response = api.client.post("/v1/audiences", json={"name": "n", "rule": RULE}, headers=headers)
    assert response.status_code == 503 and "percolator" in response.get_json()["error"]["message"]
    assert api.client.get("/v1/audiences", headers=headers).get_json()["data"] == []


def test_delete_sweeps_counters_again_after_late_writes(api: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that has not yet seen the tombstone may write one more window after the first
    sweep (re-creating keys without their expiry): the second sweep removes it."""
    import time
    from datetime import UTC, datetime

    from rules_service.api import audiences
    from tests.api.fakes import batch_for

    monkeypatch.setattr(audiences, "LATE_WRITE_GRACE_S", 0.2)
    headers = api.advertiser()
    created = api.create(headers)
    rid = f"{created['id']}@v1"
    assert api.client.delete(f"/v1/audiences/{created['id']}", headers=headers).status_code == 204
    now = datetime.now(UTC)
    api.counters.apply(batch_for(rid, [(now, "late", {})]), "t", {("bids", 0): 1})  # the late write
    wide = (now.replace(year=now.year - 1), now.replace(year=now.year + 1))
    assert api.counters.matches(rid, *wide) == 1
    deadline = time.monotonic() + 5
    while api.counters.matches(rid, *wide) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.counters.matches(rid, *wide) == 0
