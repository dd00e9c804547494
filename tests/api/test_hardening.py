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
