"""The OpenAPI 3 document, generated with apispec from the marshmallow schemas.

Every operation lists its error responses with the one error envelope (``ErrorSchema``) and a
``default`` response with the same schema, because every error this API can produce (including
Werkzeug's 404/405/413) has that shape.
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask

from rules_service.api import schemas as s
from rules_service.api.extensions import services

ERRORS = {
    400: "Invalid parameters or body (``fields`` names each culprit).",
    401: "Missing, invalid or revoked API key.",
    404: "No such audience for this advertiser.",
    409: "The audience changed concurrently; retry.",
    412: "If-Match does not match the audience's current ETag.",
    413: "Request body larger than the limit.",
    415: "The body is not JSON.",
    422: "The rule is invalid: ``fields`` maps clause paths (rule.bool.must[1].range.age) to messages.",
    429: "Rate limit exceeded; see Retry-After.",
    503: "A backend (Redis, the log, the percolator) is unavailable.",
}

REPLAY_ID = {"in": "path", "name": "replay_id", "required": True, "schema": {"type": "string"},
             "description": "Replay id (rpl_...)."}
AUDIENCE_ID = {"in": "path", "name": "audience_id", "required": True, "schema": {"type": "string"},
               "description": "Audience id (aud_...)."}


def _responses(ok: dict[str, Any], *errors: int) -> dict[Any, Any]:
    out: dict[Any, Any] = dict(ok)
    for code in (401, 429, *errors):
        out[str(code)] = {"description": ERRORS[code], "content": {"application/json": {"schema": "Error"}}}
    if "429" in out:
        out["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                  "description": "Seconds until the next window."}}
    out["default"] = {"description": "Any other error (405, 500...), same envelope.",
                      "content": {"application/json": {"schema": "Error"}}}
    return out


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _public(op: dict[str, Any]) -> dict[str, Any]:
    op["responses"].pop("401", None)
    op["responses"].pop("429", None)
    return {**op, "security": []}


def build_spec(dimensions: tuple[str, ...]) -> APISpec:
    spec = APISpec(title="Audience rules API", version="1.0.0", openapi_version="3.0.3",
                   plugins=[MarshmallowPlugin()],
                   info={"description": "Advertisers register audiences (Elasticsearch query DSL rules over the "
                                        "user document, GET /v1/schema) and read their live counts. Times are "
                                        "ISO 8601 UTC. Every error is {\"error\": {\"type\", \"message\", "
                                        "\"fields\"}}."})
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer",
                                                   "description": "Authorization: Bearer <api key>"})
    for schema in (s.ErrorSchema, s.AudienceSchema, s.AudienceListSchema, s.AudienceCreateSchema,
                   s.AudienceUpdateSchema, s.RuleTestSchema, s.RuleTestResponseSchema, s.SizeSchema,
                   s.SizesSchema, s.InsightsSchema, s.UserSchemaSchema, s.HealthSchema, s.ReplaySchema):
        spec.components.schema(schema.__name__.removesuffix("Schema"), schema=schema)

    window = {"in": "query", "schema": s.WindowQuerySchema}
    insights_params = [{"in": "query", "schema": s.InsightsQuerySchema}]
    spec.path(path="/v1/audiences", operations={
        "get": {"summary": "List the advertiser's audiences (oldest first, cursor pagination)",
                "parameters": [{"in": "query", "schema": s.ListQuerySchema}],
                "responses": _responses({"200": _json("AudienceList", "A page of audiences.")}, 400)},
        "post": {"summary": "Create an audience (validated against the user schema)",
                 "requestBody": _body("AudienceCreate"),
                 "responses": _responses({"201": {**_json("Audience", "The audience."),
                                                  "headers": {"Location": {"schema": {"type": "string"}}}}},
                                         400, 413, 415, 422, 503)},
    })
    spec.path(path="/v1/audiences/{audience_id}", parameters=[AUDIENCE_ID], operations={
        "get": {"summary": "Read an audience",
                "responses": _responses({"200": _json("Audience", "The audience.")}, 404)},
        "put": {"summary": "Rename and/or change the rule (a changed rule creates a new version)",
                "parameters": [{"in": "header", "name": "If-Match", "required": False,
                                "schema": {"type": "string"}}],
                "requestBody": _body("AudienceUpdate"),
                "responses": _responses({"200": _json("Audience", "The audience.")},
                                        400, 404, 409, 412, 413, 415, 422, 503)},
        "delete": {"summary": "Delete an audience, its rules and its counters",
                   "parameters": [{"in": "header", "name": "If-Match", "required": False,
                                   "schema": {"type": "string"}}],
                   "responses": _responses({"204": {"description": "Deleted."}}, 400, 404, 412, 503)},
    })
    spec.path(path="/v1/audiences/{audience_id}/size", parameters=[AUDIENCE_ID], operations={
        "get": {"summary": "Unique users and matches of the serving version over a window",
                "parameters": [window],
                "responses": _responses({"200": _json("Size", "Counts.")}, 400, 404)},
    })
    spec.path(path="/v1/audiences/sizes", operations={
        "get": {"summary": "Sizes of up to 100 audiences at once (dashboards)",
                "parameters": [{"in": "query", "schema": s.SizesQuerySchema}],
                "responses": _responses({"200": _json("Sizes", "Counts per audience.")}, 400)},
    })
    spec.path(path="/v1/audiences/{audience_id}/insights", parameters=[AUDIENCE_ID], operations={
        "get": {"summary": "Time series and breakdowns by dimension",
                "description": "dimension is one of: " + ", ".join(dimensions),
                "parameters": insights_params,
                "responses": _responses({"200": _json("Insights", "Series and breakdowns.")}, 400, 404)},
    })
    spec.path(path="/v1/audiences/{audience_id}/live", parameters=[AUDIENCE_ID], operations={
        "get": {"summary": "Server-Sent Events with the audience's counts as they change (at most 1/s)",
                "parameters": [{"in": "query", "schema": s.LiveQuerySchema}],
                "description": "At most LIVE_STREAMS_PER_KEY (4) open streams per API key and LIVE_STREAMS_MAX "
                               "(16) per server process: past that, 429 with Retry-After. A stream ends with "
                               "`event: error` (type unauthorized) once its API key is revoked.",
                "responses": _responses({"200": {"description": "An event stream: `event: counts` with a "
                                                                "SizeSchema JSON in `data`.",
                                                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
                                        400, 404)},
    })
    spec.path(path="/v1/audiences/test", operations={
        "post": {"summary": "Dry run: which documents match the rule and why, clause by clause",
                 "requestBody": _body("RuleTest"),
                 "responses": _responses({"200": _json("RuleTestResponse", "One result per document.")},
                                         400, 413, 415, 422)},
    })
    _replay_paths(spec)
    spec.path(path="/v1/schema", operations={
        "get": {"summary": "The user document schema rules are written against",
                "responses": _responses({"200": _json("UserSchema", "Mapping and field docs.")})},
    })
    spec.path(path="/v1/openapi.json", operations={
        "get": _public({"summary": "This document",
                        "responses": _responses({"200": {"description": "OpenAPI 3 document.",
                                                         "content": {"application/json": {
                                                             "schema": {"type": "object"}}}}})}),
    })
    spec.path(path="/healthz", operations={
        "get": _public({"summary": "The process is up",
                        "responses": _responses({"200": _json("Health", "Up.")})}),
    })
    spec.path(path="/readyz", operations={
        "get": _public({"summary": "Redis, the log and the percolator answer",
                        "responses": _responses({"200": _json("Health", "Ready."),
                                                 "503": _json("Health", "A check failed (named).")})}),
    })
    spec.path(path="/metrics", operations={
        "get": _public({"summary": "Prometheus metrics",
                        "responses": _responses({"200": {"description": "Prometheus text format.",
                                                         "content": {"text/plain": {"schema": {"type": "string"}}}}})}),
    })
    return spec


def _replay_paths(spec: APISpec) -> None:
    """The replay and rollback routes (``rules_service.api.replays``)."""
    from rules_service.api.replays import ReplayCreateSchema

    spec.components.schema("ReplayCreate", schema=ReplayCreateSchema)
    spec.path(path="/v1/audiences/{audience_id}/replays", parameters=[AUDIENCE_ID], operations={
        "post": {"summary": "Backfill the audience's newest version over the last N days",
                 "requestBody": _body("ReplayCreate"),
                 "responses": _responses({"202": {**_json("Replay", "The replay, pending."),
                                                  "headers": {"Location": {"schema": {"type": "string"}}}}},
                                         400, 404, 413, 415, 503)},
    })
    spec.path(path="/v1/audiences/{audience_id}/rollback", parameters=[AUDIENCE_ID], operations={
        "post": {"summary": "Serve the previous version again while its counters exist",
                 "responses": _responses({"200": _json("Audience", "The audience, with a `rollback` object.")},
                                         404, 409, 503)},
    })
    spec.path(path="/v1/replays/{replay_id}", parameters=[REPLAY_ID], operations={
        "get": {"summary": "A replay's status and progress",
                "responses": _responses({"200": _json("Replay", "The replay.")}, 404)},
        "delete": {"summary": "Cancel a replay",
                   "responses": _responses({"202": _json("Replay", "Cancellation requested.")}, 404, 409)},
    })


def openapi_document(app: Flask) -> dict[str, Any]:
    cached = app.extensions.get("rules_service.openapi")
    if cached is None:
        doc = build_spec(services().settings.DIMENSIONS).to_dict()
        doc["security"] = [{"bearerAuth": []}]
        cached = app.extensions["rules_service.openapi"] = doc
    return cached
