"""Request and response schemas (marshmallow 4). The OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

LOOKBACK_CHOICES = (0, 30, 60, 90)
MAX_TEST_DOCUMENTS = 100
MAX_BATCH_IDS = 100


def flatten_errors(messages: Any, prefix: str = "") -> dict[str, str]:
    """marshmallow's nested messages -> {"documents[3]": "Not a valid mapping type."}."""
    out: dict[str, str] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            if isinstance(key, int):
                path = f"{prefix}[{key}]"
            elif key == "_schema":
                path = prefix or "body"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten_errors(value, path))
    elif isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages):
        out[prefix or "body"] = " ".join(messages)
    elif isinstance(messages, list):
        for value in messages:
            out.update(flatten_errors(value, prefix))
    else:
        out[prefix or "body"] = str(messages)
    return out


# --- requests ------------------------------------------------------------------------------------

class AudienceCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=200),
                         metadata={"description": "Display name, 1-200 characters."})
    rule = fields.Dict(required=True, metadata={"description": "An Elasticsearch query DSL object over the "
                                                              "user document (GET /v1/schema). No scripts.",
                                                "minProperties": 1, "maxProperties": 1})
    lookback_days = fields.Integer(strict=True, load_default=0, validate=validate.OneOf(LOOKBACK_CHOICES),
                                   metadata={"description": "Backfill the audience over this many past days."})


class AudienceUpdateSchema(Schema):
    """Fields left out keep their value. A changed ``rule`` creates a new version."""

    name = fields.String(validate=validate.Length(min=1, max=200))
    rule = fields.Dict()
    lookback_days = fields.Integer(strict=True, validate=validate.OneOf(LOOKBACK_CHOICES))

    @validates_schema
    def _not_empty(self, data: dict[str, Any], **_: Any) -> None:
        if not data:
            raise ValidationError("give at least one of name, rule, lookback_days")


class RuleTestSchema(Schema):
    rule = fields.Dict(required=True)
    documents = fields.List(fields.Dict(), required=True,
                            validate=validate.Length(min=1, max=MAX_TEST_DOCUMENTS),
                            metadata={"description": f"1-{MAX_TEST_DOCUMENTS} user documents."})
    now = fields.AwareDateTime(default_timezone=UTC, load_default=None,
                               metadata={"description": "Pins 'now' for date math (default: the current time)."})


class ListQuerySchema(Schema):
    class Meta:
        unknown = RAISE  # a misspelt parameter (dayz=90) must not silently mean the default

    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(load_default=None, validate=validate.Length(min=1, max=100),
                           metadata={"description": "next_cursor of the previous page."})


class WindowQuerySchema(Schema):
    """``from``/``to`` (ISO 8601; naive times are UTC) or ``days`` (ending now); default 30 days."""

    class Meta:
        unknown = RAISE  # a misspelt parameter (dayz=90) must not silently mean the default

    from_ = fields.AwareDateTime(data_key="from", default_timezone=UTC, load_default=None)
    to = fields.AwareDateTime(default_timezone=UTC, load_default=None)
    days = fields.Integer(load_default=None, validate=validate.Range(min=1, max=400))


class InsightsQuerySchema(WindowQuerySchema):
    granularity = fields.String(load_default="day", validate=validate.OneOf(("hour", "day")))
    dimension = fields.List(fields.String(), load_default=list,
                            metadata={"description": "Repeatable, or a comma-separated list."})


class SizesQuerySchema(WindowQuerySchema):
    ids = fields.List(fields.String(), required=True,
                      metadata={"description": f"Audience ids (repeatable or comma-separated), at most "
                                               f"{MAX_BATCH_IDS}."})


class LiveQuerySchema(WindowQuerySchema):
    max_events = fields.Integer(load_default=None, validate=validate.Range(min=1, max=100_000),
                                metadata={"description": "Close the stream after this many count events."})
    timeout = fields.Float(load_default=None, validate=validate.Range(min=0.1, max=86_400),
                           metadata={"description": "Close the stream after this many seconds."})
    interval = fields.Float(load_default=1.0, validate=validate.Range(min=1.0, max=60),
                            metadata={"description": "Seconds between counter polls, hence between events "
                                                     "(at least 1: counts are coalesced to one event a second)."})


# --- responses -----------------------------------------------------------------------------------

class ProgressSchema(Schema):
    scanned = fields.Integer(allow_none=True)
    total = fields.Integer(allow_none=True)
    matched = fields.Integer(allow_none=True)


class BackfillSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(("none", "pending", "running", "done", "failed",
                                                                   "cancelled")))
    days = fields.Integer(required=True)
    replay_id = fields.String(allow_none=True)
    progress = fields.Dict(allow_none=True)
    error = fields.String(allow_none=True)


class VersionSchema(Schema):
    version = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(("active", "backfilling", "inactive")))
    lookback_days = fields.Integer(required=True)
    created_at = fields.String(required=True)


class AudienceSchema(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    rule = fields.Dict(required=True)
    lookback_days = fields.Integer(required=True)
    version = fields.Integer(required=True, metadata={"description": "The newest version."})
    serving_version = fields.Integer(required=True, metadata={"description": "The version reads use."})
    status = fields.String(required=True, validate=validate.OneOf(("active", "backfilling", "inactive")))
    created_at = fields.String(required=True, metadata={"format": "date-time"})
    updated_at = fields.String(required=True, metadata={"format": "date-time"})
    backfill = fields.Nested(BackfillSchema, required=True)
    versions = fields.List(fields.Nested(VersionSchema), required=True)
    warnings = fields.List(fields.String())


class LinksSchema(Schema):
    next = fields.String(allow_none=True)


class AudienceListSchema(Schema):
    data = fields.List(fields.Nested(AudienceSchema), required=True)
    next_cursor = fields.String(allow_none=True, required=True)
    links = fields.Nested(LinksSchema, required=True)


class SizeSchema(Schema):
    audience_id = fields.String(required=True)
    unique_users = fields.Integer(required=True)
    matches = fields.Integer(required=True)
    from_ = fields.String(data_key="from", required=True, metadata={"format": "date-time"})
    to = fields.String(required=True, metadata={"format": "date-time"})
    version = fields.Integer(required=True)


class SizesSchema(Schema):
    sizes = fields.List(fields.Nested(SizeSchema), required=True)
    not_found = fields.List(fields.String(), required=True)


class SeriesPointSchema(Schema):
    start = fields.String(required=True, metadata={"format": "date-time"})
    unique_users = fields.Integer(required=True)
    matches = fields.Integer(required=True)


class InsightsSchema(Schema):
    audience_id = fields.String(required=True)
    version = fields.Integer(required=True)
    from_ = fields.String(data_key="from", required=True, metadata={"format": "date-time"})
    to = fields.String(required=True, metadata={"format": "date-time"})
    granularity = fields.String(required=True)
    series = fields.List(fields.Nested(SeriesPointSchema), required=True)
    breakdowns = fields.Dict(keys=fields.String(), values=fields.Dict(keys=fields.String(), values=fields.Integer()),
                             required=True)


class RuleTestResultSchema(Schema):
    index = fields.Integer(required=True)
    matched = fields.Boolean(required=True)
    explanation = fields.Dict(allow_none=True, required=True)
    error = fields.String(allow_none=True)


class RuleTestResponseSchema(Schema):
    results = fields.List(fields.Nested(RuleTestResultSchema), required=True)
    warnings = fields.List(fields.String(), required=True)


class SchemaFieldSchema(Schema):
    name = fields.String(required=True)
    type = fields.String(required=True)
    source = fields.String(allow_none=True)


class UserSchemaSchema(Schema):
    mapping = fields.Dict(required=True)
    fields_ = fields.List(fields.Nested(SchemaFieldSchema), data_key="fields", required=True)


class ReplayProgressSchema(Schema):
    scanned = fields.Integer(allow_none=True)
    total = fields.Integer(allow_none=True)
    matched = fields.Integer(allow_none=True)
    rate = fields.Float(allow_none=True)
    eta_seconds = fields.Float(allow_none=True)
    records = fields.Integer(allow_none=True)
    elapsed_seconds = fields.Float(allow_none=True)


class ReplaySchema(Schema):
    """A backfill replay (``rules_service.api.replays.replay_view``)."""

    id = fields.String(required=True)
    audience_id = fields.String(allow_none=True)
    version = fields.Integer(allow_none=True)
    days = fields.Integer(allow_none=True)
    status = fields.String(required=True, validate=validate.OneOf(("pending", "running", "done", "failed",
                                                                   "cancelled")))
    cancel_requested = fields.Boolean(required=True)
    progress = fields.Nested(ReplayProgressSchema, required=True)
    requested_at = fields.String(allow_none=True)
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    error = fields.String(allow_none=True)


class ErrorBodySchema(Schema):
    type = fields.String(required=True)
    message = fields.String(required=True)
    fields_ = fields.Dict(data_key="fields", keys=fields.String(), values=fields.String(), required=True)


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String())
