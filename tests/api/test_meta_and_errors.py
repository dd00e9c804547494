"""Health, readiness, metrics, OpenAPI, schema, and the one error envelope for every error."""

from __future__ import annotations

from typing import Any

import pytest

from rules_service.schema import USER_MAPPING
from tests.api.conftest import ApiEnv, build_env
from tests.api.fakes import BrokenPercolator

pytestmark = pytest.mark.redis


def assert_envelope(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"type", "message", "fields"} and error["type"] == type_ and error["message"]
    assert b"Traceback" not in response.data and b"<html" not in response.data.lower()
    return error


def test_healthz_and_readyz(api: ApiEnv) -> None:
    assert api.client.get("/healthz").get_json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json() == {"status": "ready", "checks": {"redis": "ok", "log": "ok", "percolator": "ok"}}
    api.log.down = True
    api.app.extensions["rules_service"]._provided["PERCOLATOR"] = BrokenPercolator()
    down = api.client.get("/readyz")
    assert down.status_code == 503
    checks = down.get_json()["checks"]
    assert checks["redis"] == "ok" and checks["log"].startswith("failed: LogUnavailableError")
    assert checks["percolator"].startswith("failed: PercolatorUnavailableError")


def test_metrics_count_requests_by_endpoint_and_status(api: ApiEnv) -> None:
    headers = api.advertiser()
    api.client.get("/v1/audiences", headers=headers)
    api.client.get("/v1/audiences/aud_x", headers=headers)
    api.client.get("/v1/audiences/aud_y", headers=headers)
    text = api.client.get("/metrics").data.decode()
    assert 'rules_api_requests_total{endpoint="/v1/audiences",method="GET",status="200"} 1.0' in text
    assert 'rules_api_requests_total{endpoint="/v1/audiences/<audience_id>",method="GET",status="404"} 2.0' in text
    assert "rules_api_request_duration_seconds_bucket" in text


def test_schema_endpoint(api: ApiEnv) -> None:
    headers = api.advertiser()
    body = api.client.get("/v1/schema", headers=headers).get_json()
    assert body["mapping"] == USER_MAPPING
    fields = {f["name"]: f for f in body["fields"]}
    assert fields["geo.location"]["type"] == "geo_point" and "lat/lon" in fields["geo.location"]["source"]
    assert fields["interests"]["type"] == "keyword[]" and fields["ad_slot.h"]["source"]


def test_openapi_documents_every_route_and_error(api: ApiEnv) -> None:
    import schemathesis

    doc = api.client.get("/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.0 meta-schema
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer",
                                                                  "description": "Authorization: Bearer <api key>"}
    routes = {rule.rule.replace("<audience_id>", "{audience_id}").replace("<replay_id>", "{replay_id}")
              for rule in api.app.url_map.iter_rules()}
    assert routes == set(doc["paths"])
    for rule in api.app.url_map.iter_rules():
        path = rule.rule.replace("<audience_id>", "{audience_id}").replace("<replay_id>", "{replay_id}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            responses = doc["paths"][path][method.lower()]["responses"]
            assert "default" in responses, (path, method)
            if path.startswith("/v1/") and path != "/v1/openapi.json":
                assert {"401", "429"} <= set(responses), (path, method)
    create = doc["paths"]["/v1/audiences"]["post"]["responses"]
    assert {"201", "400", "413", "415", "422"} <= set(create)
    assert create["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_404_405_and_unknown_routes_are_json(api: ApiEnv) -> None:
    assert_envelope(api.client.get("/nowhere"), 404, "not_found")
    error = api.client.patch("/v1/audiences")
    assert_envelope(error, 405, "method_not_allowed")
    assert "POST" in error.headers["Allow"]


def test_body_errors_400_413_415(api: ApiEnv) -> None:
    headers = api.advertiser()
    assert_envelope(api.client.post("/v1/audiences", data="name=x", headers=headers,
                                    content_type="application/x-www-form-urlencoded"), 415, "unsupported_media_type")
    assert_envelope(api.client.post("/v1/audiences", data="{nope", headers=headers,
                                    content_type="application/json"), 400, "bad_request")
    assert_envelope(api.client.post("/v1/audiences", json=[1, 2], headers=headers), 400, "validation_error")
    huge = b'{"name": "' + b"x" * (api.settings.MAX_REQUEST_BYTES + 10) + b'"}'
    assert_envelope(api.client.post("/v1/audiences", data=huge, headers=headers, content_type="application/json"),
                    413, "payload_too_large")


class _ExplodingCounters:
    def unique_users(self, *args: object) -> int:
        raise RuntimeError("secret internals /etc/passwd")


def test_unexpected_errors_are_a_bare_500(api: ApiEnv) -> None:
    headers = api.advertiser()
    audience = api.create(headers)
    api.app.extensions["rules_service"]._provided["COUNTERS"] = _ExplodingCounters()
    api.app.testing = False  # let the handler answer, as in production
    api.app.config["PROPAGATE_EXCEPTIONS"] = False
    response = api.client.get(f"/v1/audiences/{audience['id']}/size", headers=headers)
    error = assert_envelope(response, 500, "internal_error")
    assert "passwd" not in response.data.decode() and error["message"] == "internal server error"


def test_rate_limit_per_key(redis_url: str) -> None:
    env = build_env(redis_url, RATE_LIMIT_PER_MINUTE=3)
    first, second = env.advertiser("one"), env.advertiser("two")
    for _ in range(3):
        ok = env.client.get("/v1/audiences", headers=first)
        assert ok.status_code == 200 and int(ok.headers["X-RateLimit-Limit"]) == 3
    limited = env.client.get("/v1/audiences", headers=first)
    assert_envelope(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert env.client.get("/v1/audiences", headers=second).status_code == 200  # per key
    assert env.client.get("/healthz").status_code == 200  # ops endpoints are not limited
