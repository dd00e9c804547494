"""Decoding requests: JSON bodies through marshmallow, query windows, and the rule checks that run
*before* the percolator (size, depth, scripts) so an abusive rule costs nothing to reject."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from flask import request
from marshmallow import Schema, ValidationError

from percolators.errors import InvalidRuleError, PercolatorUnavailableError
from percolators.port import Percolator, Rule, RuleReport
from rules_service.api.errors import ApiError
from rules_service.api.schemas import flatten_errors
from rules_service.config import Settings

DEFAULT_DAYS = 30
MAX_WINDOW = timedelta(days=400)
#: Keys that run code in Elasticsearch (``script`` query, ``script_score``, ``params._script``...).
SCRIPT_KEYS = frozenset({"script", "script_score", "scripted_metric"})


def json_body(schema: Schema) -> dict[str, Any]:
    """The request's JSON body loaded through ``schema``: 415 if not JSON, 400 if malformed, nested
    too deeply or invalid (with per-field messages)."""
    if not request.is_json:
        raise ApiError("request body must be JSON (Content-Type: application/json)", status=415)
    data = parse_json(request.get_data(cache=True))
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", status=400, type="validation_error",
                       fields={"body": "expected an object"})
    try:  # what we store and publish must round-trip through orjson (64-bit integers, valid UTF-8)
        orjson.dumps(data)
    except TypeError as exc:
        if "recursion" in str(exc).lower():
            raise _too_deep() from None
        raise ApiError(f"request body cannot be stored: {exc} (integers must fit in 64 bits; strings must be "
                       "valid Unicode)", status=400, type="validation_error", fields={"body": str(exc)}) from None
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ApiError("invalid request body", status=400, type="validation_error",
                       fields=flatten_errors(exc.messages)) from None


#: Deepest request body accepted: what ``orjson.dumps`` can write back (it stops at 255 levels), so
#: everything we accept can be stored and published. ``orjson.loads`` itself stops at 1024 levels
#: without recursing in Python; the stdlib parser (``request.get_json``) raised RecursionError (a 500).
MAX_BODY_DEPTH = 254
_BIG_INTEGER = re.compile(rb"\d{20}")


def _too_deep() -> ApiError:
    return ApiError(f"request body nests deeper than {MAX_BODY_DEPTH} levels", status=400, type="body_too_deep",
                    fields={"body": f"nested deeper than {MAX_BODY_DEPTH} levels"})


def parse_json(raw: bytes) -> Any:
    """Every request body is parsed here, with orjson: bounded depth (no RecursionError), strict
    (no NaN, valid UTF-8). orjson reads integers past 64 bits as floats; so that such a value is
    rejected (by the round-trip check) rather than silently rounded, a body with a run of 20 digits
    is parsed again exactly with the stdlib, which is safe since orjson bounded its depth."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise _too_deep() from None
        raise ApiError(f"request body is not valid JSON: {exc}", status=400, type="bad_request",
                       fields={"body": "invalid JSON"}) from None
    if _BIG_INTEGER.search(raw):
        try:
            data = json.loads(raw)
        except RecursionError:
            raise _too_deep() from None
    return data


def query_args(schema: Schema, list_fields: Iterable[str] = ()) -> dict[str, Any]:
    """Query parameters through ``schema``; list fields may repeat or be comma-separated."""
    raw: dict[str, Any] = {}
    for key in request.args:
        if key in list_fields:
            raw[key] = [part.strip() for value in request.args.getlist(key) for part in value.split(",")
                        if part.strip()]
        elif len(request.args.getlist(key)) > 1:
            raise ApiError(f"query parameter {key!r} given more than once", status=400, type="validation_error",
                           fields={key: "given more than once"})
        else:
            raw[key] = request.args.get(key)
    try:
        return schema.load(raw)
    except ValidationError as exc:
        raise ApiError("invalid query parameters", status=400, type="validation_error",
                       fields=flatten_errors(exc.messages)) from None


def resolve_window(args: Mapping[str, Any], now: datetime | None = None) -> tuple[datetime, datetime]:
    """[start, end) from ``from``/``to`` or ``days`` (ending now); default the last 30 days."""
    start, end, days = args.get("from_"), args.get("to"), args.get("days")
    if days is not None and (start is not None or end is not None):
        raise ApiError("give either from/to or days, not both", status=400, type="validation_error",
                       fields={"days": "cannot be combined with from/to"})
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    end = end.astimezone(UTC) if end is not None else now
    start = start.astimezone(UTC) if start is not None else end - timedelta(days=days or DEFAULT_DAYS)
    if start >= end:
        raise ApiError("'from' must be before 'to'", status=400, type="validation_error",
                       fields={"from": "must be before to"})
    if end - start > MAX_WINDOW:
        raise ApiError("the window is longer than 400 days", status=400, type="validation_error",
                       fields={"from": "window longer than 400 days"})
    return start, end


def _depth_and_scripts(value: Any, path: str, depth: int, limit: int, found: dict[str, str]) -> int:
    """Nesting depth of ``value``; records every ``script`` key (any level) in ``found``."""
    if depth > limit:
        return depth  # stop descending: already too deep
    if isinstance(value, dict):
        deepest = depth
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else str(key)
            if key in SCRIPT_KEYS or (isinstance(key, str) and key.endswith("_script")):
                found[f"rule.{child_path}"] = "scripts are forbidden in rules"
            deepest = max(deepest, _depth_and_scripts(child, child_path, depth + 1, limit, found))
        return deepest
    if isinstance(value, list):
        deepest = depth
        for index, child in enumerate(value):
            deepest = max(deepest, _depth_and_scripts(child, f"{path}[{index}]", depth + 1, limit, found))
        return deepest
    return depth


def check_rule_limits(rule: Any, settings: Settings) -> None:
    """Size, depth and script checks (422), before any parsing by the percolator."""
    if not isinstance(rule, dict) or not rule:
        raise ApiError("rule must be a non-empty query object", status=422, type="invalid_rule",
                       fields={"rule": "expected a query DSL object such as {\"term\": {...}}"})
    if len(rule) != 1:
        raise ApiError("a query object has exactly one query type", status=422, type="invalid_rule",
                       fields={"rule": f"expected one query type, got {len(rule)}: {', '.join(map(str, rule))}"})
    size = len(orjson.dumps(rule))
    if size > settings.MAX_RULE_BYTES:
        raise ApiError(f"rule is {size} bytes; the limit is {settings.MAX_RULE_BYTES}", status=422,
                       type="rule_too_large", fields={"rule": f"larger than {settings.MAX_RULE_BYTES} bytes"})
    scripts: dict[str, str] = {}
    depth = _depth_and_scripts(rule, "", 1, settings.MAX_RULE_DEPTH, scripts)
    if depth > settings.MAX_RULE_DEPTH:
        raise ApiError(f"rule nests deeper than {settings.MAX_RULE_DEPTH} levels", status=422,
                       type="rule_too_deep", fields={"rule": f"deeper than {settings.MAX_RULE_DEPTH} levels"})
    if scripts:
        raise ApiError("scripts are forbidden in rules", status=422, type="invalid_rule", fields=scripts)


def validate_rule(percolator: Percolator, rule_id: str, rule: dict[str, Any], settings: Settings) -> RuleReport:
    """Every rule check: limits first, then the percolator against the user mapping. 422 naming
    the clause path (``rule.bool.must[1].range.age``) when invalid; 503 when the percolator is down."""
    check_rule_limits(rule, settings)
    try:
        return percolator.validate(Rule(id=rule_id, query=rule))
    except InvalidRuleError as exc:
        fields = {(f"rule.{path}" if path else "rule"): message for path, message in exc.fields.items()}
        raise ApiError(f"invalid rule: {exc.message}" + (f" at {exc.path}" if exc.path else ""), status=422,
                       type="invalid_rule", fields=fields or {"rule": exc.message}) from None
    except PercolatorUnavailableError as exc:
        raise ApiError(f"the percolator is unavailable: {exc}", status=503) from None
