"""Reviewer findings: deep JSON bodies, DELETE ordering, rate-limit keys for invalid API keys, and
live stream revocation and limits."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import ApiEnv

pytestmark = pytest.mark.redis

JSON = {"Content-Type": "application/json"}


def nested_bools(levels: int) -> str:
    """A rule of ``levels`` nested bool/must clauses around a term, as raw JSON."""
    return '{"bool": {"must": [' * levels + '{"term": {"gender": "male"}}' + "]}}" * levels


def deep_document(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


def assert_too_deep(response: Any) -> None:
    assert response.status_code == 400, response.data[:300]
    error = response.get_json()["error"]
    assert error["type"] == "body_too_deep" and "nests deeper" in error["message"]
    assert set(error["fields"]) == {"body"}


def test_deeply_nested_bodies_are_400_not_500(api: ApiEnv) -> None:
    headers = {**api.advertiser(), **JSON}
    rule = nested_bools(3000)
    assert_too_deep(api.client.post("/v1/audiences", data=f'{{"name": "x", "rule": {rule}}}', headers=headers))
    audience = api.create(headers)
    assert_too_deep(api.client.put(f"/v1/audiences/{audience['id']}", data=f'{{"rule": {rule}}}', headers=headers))
    body = f'{{"rule": {{"term": {{"gender": "male"}}}}, "documents": [{deep_document(5000)}]}}'
    assert_too_deep(api.client.post("/v1/audiences/test", data=body, headers=headers))
    # between orjson's read limit (1024) and what can be stored (254): still the same answer
    assert_too_deep(api.client.post("/v1/audiences", data=f'{{"name": "x", "rule": {nested_bools(300)}}}',
                                    headers=headers))
    # a moderately deep rule is the rule-depth 422, as before
    moderate = api.client.post("/v1/audiences", data=f'{{"name": "x", "rule": {nested_bools(20)}}}', headers=headers)
    assert moderate.status_code == 422 and moderate.get_json()["error"]["type"] == "rule_too_deep"


def test_body_parsing_stays_strict(api: ApiEnv) -> None:
    headers = {**api.advertiser(), **JSON}
    bad = api.client.post("/v1/audiences", data='{"name": "x", ', headers=headers)
    assert bad.status_code == 400 and bad.get_json()["error"]["fields"] == {"body": "invalid JSON"}
    nan = api.client.post("/v1/audiences", data='{"name": NaN}', headers=headers)
    assert nan.status_code == 400
    # integers past 64 bits are rejected, not rounded to a float
    huge = '{"name": "x", "rule": {"term": {"age": 123456789012345678901234567890}}}'
    response = api.client.post("/v1/audiences", data=huge, headers=headers)
    assert response.status_code == 400 and "64 bits" in response.get_json()["error"]["message"]
    # a 20-digit string is fine
    ok = api.client.post("/v1/audiences", headers=headers,
                         data='{"name": "12345678901234567890123", "rule": {"term": {"gender": "male"}}}')
    assert ok.status_code == 201 and ok.get_json()["name"] == "12345678901234567890123"


# --- DELETE: the document first, then the tombstones ------------------------------------------


def tombstones(api: ApiEnv) -> list[bytes]:
    from rules_service.domain import RULES_TOPIC

    return [m.key for m in api.log.messages[RULES_TOPIC] if m.value is None and m.key is not None]


def install_store(api: ApiEnv, store: Any) -> None:
    api.app.extensions["rules_service"]._provided["STORE"] = store


def test_delete_losing_a_race_to_a_put_is_412_and_publishes_nothing(api: ApiEnv) -> None:
    from rules_service.store import AudienceStore

    class PutLandsFirst(AudienceStore):
        """A PUT from another client commits between the request's read and its delete."""

        def delete_audience(self, audience_id: str, advertiser_id: str | None = None,
                            expected_revision: int | None = None) -> Any:
            def rename(doc: dict[str, Any]) -> dict[str, Any]:
                return {**doc, "name": "renamed", "revision": doc["revision"] + 1}

            self.update_audience(audience_id, rename)
            return super().delete_audience(audience_id, advertiser_id, expected_revision)

    headers = api.advertiser()
    audience = api.create(headers)
    url = f"/v1/audiences/{audience['id']}"
    etag = api.client.get(url, headers=headers).headers["ETag"]
    install_store(api, PutLandsFirst(api.redis, api.store.prefix))
    response = api.client.delete(url, headers={**headers, "If-Match": etag})
    assert response.status_code == 412 and response.get_json()["error"]["type"] == "precondition_failed"
    assert tombstones(api) == []  # the workers keep counting the audience that still exists
    assert api.store.get_audience(audience["id"]) is not None


def test_delete_failing_in_redis_publishes_nothing(api: ApiEnv) -> None:
    from rules_service.store import AudienceStore

    class RedisDown(AudienceStore):
        def delete_audience(self, audience_id: str, advertiser_id: str | None = None,
                            expected_revision: int | None = None) -> Any:
            raise ConnectionError("redis went away")

    headers = api.advertiser()
    audience = api.create(headers)
    install_store(api, RedisDown(api.redis, api.store.prefix))
    response = api.client.delete(f"/v1/audiences/{audience['id']}", headers=headers)
    assert response.status_code == 500
    assert tombstones(api) == []


def test_delete_whose_tombstones_fail_is_finished_by_a_retry(api: ApiEnv) -> None:
    headers, other = api.advertiser(), api.advertiser("other")
    audience = api.create(headers)
    rid = f"{audience['id']}@v1".encode()
    url = f"/v1/audiences/{audience['id']}"
    api.log.down = True
    failed = api.client.delete(url, headers=headers)
    assert failed.status_code == 503 and "retry the DELETE" in failed.get_json()["error"]["message"]
    assert api.client.get(url, headers=headers).status_code == 404  # the document is gone
    api.log.down = False
    assert api.client.delete(url, headers=other).status_code == 404  # not another advertiser's to finish
    assert tombstones(api) == []
    assert api.client.delete(url, headers=headers).status_code == 204  # publishes the pending tombstones
    assert tombstones(api) == [rid]
    assert api.client.delete(url, headers=headers).status_code == 404


# --- rate limiting counts valid keys only -----------------------------------------------------


def test_invalid_keys_create_no_rate_limit_keys(api: ApiEnv) -> None:
    import secrets

    for _ in range(20):
        response = api.client.get("/v1/audiences", headers={"Authorization": f"Bearer rk_{secrets.token_hex(16)}"})
        assert response.status_code == 401
    assert api.redis.keys(f"{api.store.prefix}rl:*") == []
    headers = api.advertiser()
    assert api.client.get("/v1/audiences", headers=headers).status_code == 200
    (key,) = api.redis.keys(f"{api.store.prefix}rl:*")
    assert api.redis.get(key) == b"1" and 0 < api.redis.ttl(key) <= 65


# --- live streams: revocation and limits ------------------------------------------------------


def _live(api: ApiEnv, audience_id: str, headers: dict[str, str], query: str = "timeout=30") -> Any:
    return api.client.get(f"/v1/audiences/{audience_id}/live?{query}", headers=headers, buffered=False)


def test_live_stream_ends_when_the_key_is_revoked(api: ApiEnv) -> None:
    import orjson

    headers = api.advertiser()
    audience = api.create(headers)
    response = _live(api, audience["id"], headers)
    chunks = iter(response.response)
    assert next(chunks).startswith(b"retry:")
    assert b"event: counts" in next(chunks)
    doc = api.store.get_audience(audience["id"])
    assert doc is not None and api.store.revoke_advertiser(doc["advertiser_id"])
    rest = b"".join(chunks)  # ends at the next poll, not at the 30 s timeout
    assert rest.startswith(b"event: error\n")
    assert orjson.loads(rest.split(b"data: ", 1)[1])["type"] == "unauthorized"
    response.close()


def test_live_streams_are_capped_per_key_and_in_all(api: ApiEnv) -> None:
    from rules_service.api.live import live_slots

    api.app.config.update(LIVE_STREAMS_PER_KEY=2, LIVE_STREAMS_MAX=3)
    one, two = api.advertiser("one"), api.advertiser("two")
    first, second = api.create(one), api.create(two)
    open_one = [_live(api, first["id"], one) for _ in range(2)]
    assert all(r.status_code == 200 for r in open_one)
    over = _live(api, first["id"], one)
    assert over.status_code == 429 and over.headers["Retry-After"] == "5"
    error = over.get_json()["error"]
    assert error["type"] == "rate_limited" and "live streams" in error["message"]
    third = _live(api, second["id"], two)  # another key still has room
    assert third.status_code == 200
    full = _live(api, second["id"], two)  # ... until the process limit
    assert full.status_code == 429 and "server" in full.get_json()["error"]["message"]
    # a closed stream (client gone) frees its slot, even one never read
    open_one[0].close()
    with api.app.app_context():
        assert live_slots().open == 2
    again = _live(api, first["id"], one)
    assert again.status_code == 200
    for response in (open_one[1], third, again):
        response.close()
    with api.app.app_context():
        assert live_slots().by_key == {}


def test_a_finished_stream_frees_its_slot(api: ApiEnv) -> None:
    from rules_service.api.live import live_slots

    api.app.config.update(LIVE_STREAMS_PER_KEY=1)
    headers = api.advertiser()
    audience = api.create(headers)
    for _ in range(2):  # max_events=1 ends the stream after its first event
        response = _live(api, audience["id"], headers, "max_events=1")
        assert b"event: counts" in b"".join(response.response)
    with api.app.app_context():
        assert live_slots().open == 0
    assert _live(api, "aud_missing", headers).status_code == 404  # no slot taken for a 404
    with api.app.app_context():
        assert live_slots().open == 0
