"""Audiences: create, list, read, update (versions), delete, and the dry-run rule test.

Writes go to the store first and are then published as RuleChange messages on the compacted
``audiences.rules`` topic. Publishing every version's current state on each write is idempotent
(the topic is keyed by rule id), so a PUT repairs a previous publish that failed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, jsonify, request, url_for

from percolators.errors import InvalidDocumentError, InvalidRuleError, PercolatorError
from percolators.port import Rule
from rules_service.api.auth import current_advertiser
from rules_service.api.errors import ApiError, not_found
from rules_service.api.extensions import services
from rules_service.api.schemas import (
    AudienceCreateSchema,
    AudienceUpdateSchema,
    ListQuerySchema,
    RuleTestSchema,
)
from rules_service.api.validation import check_rule_limits, json_body, query_args, validate_rule
from rules_service.api.views import audience_view, load_audience
from rules_service.domain import rule_id
from rules_service.store import (
    ConflictError,
    Doc,
    new_audience,
    new_id,
    publish_rule_changes,
    publish_tombstones,
    revise,
    rule_change,
)

bp = Blueprint("audiences", __name__)


def _publish(doc: Doc, versions: list[int]) -> None:
    try:
        publish_rule_changes(services().producer, [rule_change(doc, v) for v in versions])
    except Exception as exc:
        current_app.logger.exception("publishing rule changes failed")
        raise ApiError(f"the rule could not be distributed to the workers ({type(exc).__name__}); "
                       "retry the request", status=503) from None


def _start_backfill(doc: Doc) -> Doc:
    """Request a replay of the newest version; record 'pending' (or 'failed') in the audience."""
    svc = services()
    days, version = doc["lookback_days"], doc["version"]
    try:
        replay_id = svc.backfills.start(doc, version, days)
        backfill: dict[str, Any] = {"status": "pending", "days": days, "replay_id": replay_id, "progress": None}
    except Exception as exc:
        current_app.logger.exception("starting a backfill failed")
        backfill = {"status": "failed", "days": days, "replay_id": None, "progress": None,
                    "error": f"could not request the replay: {type(exc).__name__}"}
    return svc.store.set_backfill(doc["id"], backfill, version=version) or doc


def _expected_revision() -> int | None:
    header = request.headers.get("If-Match")
    if not header or header.strip() == "*":
        return None
    try:
        return int(header.strip().strip('W/').strip('"'))
    except ValueError:
        raise ApiError("If-Match must be an ETag returned by this API", status=400, type="bad_request",
                       fields={"If-Match": "not an ETag"}) from None


def _respond(doc: Doc, status: int = 200, warnings: list[str] | None = None) -> Response:
    response = jsonify(audience_view(doc, warnings))
    response.status_code = status
    response.headers["ETag"] = f'"{doc.get("revision", 0)}"'
    return response


@bp.post("/audiences")
def create_audience() -> Response:
    svc = services()
    data = json_body(AudienceCreateSchema())
    audience_id = new_id("aud")
    report = validate_rule(svc.percolator, rule_id(audience_id, 1), data["rule"], svc.settings)
    doc = new_audience(current_advertiser(), data["name"], data["rule"], data["lookback_days"],
                       audience_id=audience_id)
    svc.store.create_audience(doc)
    try:
        _publish(doc, [1])
    except ApiError:
        svc.store.delete_audience(audience_id)  # nothing half-created
        raise
    if doc["lookback_days"] > 0:
        doc = _start_backfill(doc)
    response = _respond(doc, 201, list(report.warnings))
    response.headers["Location"] = url_for(".get_audience", audience_id=audience_id)
    return response


@bp.get("/audiences")
def list_audiences() -> Response:
    args = query_args(ListQuerySchema())
    docs, next_cursor = services().store.list_audiences(current_advertiser(), args["limit"], args["cursor"])
    next_link = (url_for(".list_audiences", limit=args["limit"], cursor=next_cursor)
                 if next_cursor else None)
    response = jsonify({"data": [audience_view(d) for d in docs], "next_cursor": next_cursor,
                        "links": {"next": next_link}})
    if next_link:
        response.headers["Link"] = f'<{next_link}>; rel="next"'
    return response


@bp.get("/audiences/<audience_id>")
def get_audience(audience_id: str) -> Response:
    return _respond(load_audience(audience_id))


@bp.put("/audiences/<audience_id>")
def update_audience(audience_id: str) -> Response:
    svc = services()
    advertiser = current_advertiser()
    data = json_body(AudienceUpdateSchema())
    expected = _expected_revision()
    current = load_audience(audience_id)
    report = None
    if "rule" in data:
        next_version = max(v["version"] for v in current["versions"]) + 1
        report = validate_rule(svc.percolator, rule_id(audience_id, next_version), data["rule"], svc.settings)
    outcome: dict[str, Any] = {}

    def mutate(doc: Doc) -> Doc:
        new, changed, needs_backfill = revise(doc, name=data.get("name"), rule=data.get("rule"),
                                              lookback_days=data.get("lookback_days"))
        outcome.update(changed=changed, backfill=needs_backfill)
        return new

    try:
        doc = svc.store.update_audience(audience_id, mutate, advertiser_id=advertiser, expected_revision=expected)
    except ConflictError as exc:
        raise ApiError(str(exc), status=412 if expected is not None else 409) from None
    if doc is None:
        raise not_found()
    # Publish every version's state: idempotent, and repairs an earlier failed publish.
    _publish(doc, [v["version"] for v in doc["versions"]])
    if outcome.get("backfill"):
        doc = _start_backfill(doc)
    return _respond(doc, 200, list(report.warnings) if report else None)


#: Redis hash (under the store prefix) of deletions whose tombstones could not be published:
#: audience id -> JSON list of versions. A later DELETE of the same id publishes them.
PENDING_TOMBSTONES = "pending_tombstones"


logger = logging.getLogger(__name__)

#: A worker learns of a deletion within about a second (rules sync) and may still write one flush
#: window for the rule; a key it re-creates then would carry no expiry (each writer remembers the
#: keys it already gave their deadline: rules_service.counters.redis_store). So the counters are
#: swept a second time after this grace.
LATE_WRITE_GRACE_S = 15.0


def _sweep_counters_later(counters: Any, rule_ids: list[str], delay_s: float) -> None:
    def sweep() -> None:
        for rid in rule_ids:
            try:
                counters.delete_rule(rid)
            except Exception:  # best effort: the first sweep already ran
                logger.exception("second sweep of the counters of %s failed", rid)

    timer = threading.Timer(delay_s, sweep)
    timer.daemon = True
    timer.start()


@bp.delete("/audiences/<audience_id>")
def delete_audience(audience_id: str) -> Response:
    """The document first (atomically, honouring If-Match), then tombstones for every version (the
    workers stop counting), then the counters.

    Deleting first means a failed delete (412, Redis error) leaves the workers' rules alone: the
    audience still exists and keeps being counted. If publishing then fails (retried once), the
    audience is gone but the workers keep its rules: the versions are recorded in
    ``PENDING_TOMBSTONES`` and the answer is a 503 asking to retry the DELETE, which publishes them
    (and drops the counters) and answers 204. Until then the workers count rules nobody can read:
    wasted work, never a lost live rule. A worker that had not yet read the tombstone may still
    write a few counter keys for the deleted rule ids; they are unreachable and expire with the
    counters' retention TTLs."""
    svc = services()
    expected = _expected_revision()
    advertiser = current_advertiser()
    pending_key = svc.store.prefix + PENDING_TOMBSTONES
    field = f"{advertiser}:{audience_id}"
    pending = svc.redis.hget(pending_key, field)
    if pending is not None:  # a previous DELETE removed the document but could not publish
        versions = [int(v) for v in orjson.loads(pending)]
    else:
        try:
            deleted = svc.store.delete_audience(audience_id, advertiser, expected_revision=expected)
        except ConflictError as exc:
            raise ApiError(str(exc), status=412) from None
        if deleted is None:
            raise not_found()
        versions = [v["version"] for v in deleted["versions"]]
    for attempt in (1, 2):
        try:
            publish_tombstones(svc.producer, audience_id, versions)
            break
        except Exception as exc:
            current_app.logger.exception("publishing tombstones of %s failed (attempt %d)", audience_id, attempt)
            if attempt == 2:
                svc.redis.hset(pending_key, field, orjson.dumps(versions))
                raise ApiError(f"audience {audience_id!r} is deleted but the deletion could not be distributed "
                               f"to the workers ({type(exc).__name__}); retry the DELETE to finish it",
                               status=503) from None
    if pending is not None:
        svc.redis.hdel(pending_key, field)
    rule_ids = [rule_id(audience_id, version) for version in versions]
    for rid in rule_ids:
        svc.counters.delete_rule(rid)
    _sweep_counters_later(svc.counters, rule_ids, LATE_WRITE_GRACE_S)
    return Response(status=204)


@bp.post("/audiences/test")
def test_rule() -> Response:
    """Dry run: percolate the given documents against the rule in a throw-away percolator."""
    svc = services()
    data = json_body(RuleTestSchema())
    rule, documents, now = data["rule"], data["documents"], data["now"]
    check_rule_limits(rule, svc.settings)
    percolator = svc.test_percolator()
    try:
        try:
            report = percolator.validate(Rule(id="test", query=rule))
            percolator.upsert([Rule(id="test", query=rule)])
        except InvalidRuleError as exc:
            fields = {(f"rule.{p}" if p else "rule"): m for p, m in exc.fields.items()}
            raise ApiError(f"invalid rule: {exc.message}", status=422, type="invalid_rule",
                           fields=fields or {"rule": exc.message}) from None
        outcomes = percolator.percolate(documents, now=now, on_error="skip")
        results: list[dict[str, Any]] = []
        for index, (document, outcome) in enumerate(zip(documents, outcomes, strict=True)):
            if isinstance(outcome, Exception):
                results.append({"index": index, "matched": False, "explanation": None, "error": str(outcome)})
                continue
            try:
                explanation: dict[str, Any] | None = percolator.explain(rule, document, now=now).to_dict()
                error = None
            except (InvalidDocumentError, PercolatorError) as exc:
                explanation, error = None, str(exc)
            results.append({"index": index, "matched": "test" in outcome, "explanation": explanation,
                            "error": error})
    finally:
        percolator.close()
    return jsonify({"results": results, "warnings": list(report.warnings)})
