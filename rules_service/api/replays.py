"""Replays and rollback.

* ``POST /v1/audiences/<id>/replays {"days": N}``: backfill the audience's newest version over the
  last N days (1..DAY_RETENTION_DAYS) -> 202 with the replay. A worker runs it (the replay watcher
  in every Celery worker picks it up within seconds); ``manage.py replay`` runs one in-process.
* ``GET /v1/replays/<id>``: status and progress (scanned, total, matched, rate, eta_seconds).
* ``DELETE /v1/replays/<id>``: cancel (202; a running scan stops at its next batch).
* ``POST /v1/audiences/<id>/rollback``: serve the previous version again while its counters exist
  (409 when there is none or they expired).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from marshmallow import RAISE, Schema, fields

from rules_service.api.auth import current_advertiser
from rules_service.api.errors import ApiError, not_found
from rules_service.api.extensions import services
from rules_service.api.validation import json_body
from rules_service.api.views import audience_view, load_audience

bp = Blueprint("replays", __name__)

PROGRESS_FIELDS = ("scanned", "total", "matched", "rate", "eta_seconds", "records", "elapsed_seconds")


class ReplayCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    days = fields.Integer(required=True, strict=True)


def replay_view(record: dict[str, Any], cancel_requested: bool = False) -> dict[str, Any]:
    progress = record.get("progress") or {}
    status = record.get("status", "pending")
    return {
        "id": record.get("id") or record.get("replay_id"),
        "audience_id": record.get("audience_id"),
        "version": record.get("version"),
        "days": record.get("days"),
        "status": status,
        "cancel_requested": bool(cancel_requested) and status not in ("done", "failed", "cancelled"),
        "progress": {name: progress.get(name, 0 if name in ("scanned", "total", "matched") else None)
                     for name in PROGRESS_FIELDS},
        "requested_at": record.get("requested_at"),
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "error": record.get("error"),
    }


def _state() -> Any:
    from workers.replay_state import ReplayState

    svc = services()
    return ReplayState(svc.redis, getattr(svc.store, "prefix", "rs:"))


def _own_replay(replay_id: str) -> dict[str, Any]:
    record = services().backfills.get(replay_id)
    if record is None or record.get("advertiser_id") != current_advertiser():
        raise not_found("replay")
    return record


@bp.post("/audiences/<audience_id>/replays")
def start_replay(audience_id: str) -> Response:
    svc = services()
    data = json_body(ReplayCreateSchema())
    days = data["days"]
    limit = svc.settings.DAY_RETENTION_DAYS
    if not 1 <= days <= limit:
        raise ApiError(f"days must be between 1 and {limit} (the day counters' retention)", status=400,
                       type="validation_error", fields={"days": f"between 1 and {limit}"})
    doc = load_audience(audience_id)
    version = doc["version"]
    try:
        replay_id = svc.backfills.start(doc, version, days)
    except Exception as exc:
        raise ApiError(f"the replay could not be requested ({type(exc).__name__}); retry the request",
                       status=503) from None
    svc.store.set_backfill(audience_id, {"status": "pending", "days": days, "replay_id": replay_id,
                                         "progress": None}, version=version)
    record = svc.backfills.get(replay_id) or {"id": replay_id, "status": "pending"}
    response = jsonify(replay_view(record))
    response.status_code = 202
    response.headers["Location"] = f"{request.script_root}/v1/replays/{replay_id}"
    return response


@bp.get("/replays/<replay_id>")
def get_replay(replay_id: str) -> Response:
    record = _own_replay(replay_id)
    return jsonify(replay_view(record, bool(_state().cancel_requested([replay_id]))))


@bp.delete("/replays/<replay_id>")
def cancel_replay(replay_id: str) -> Response:
    record = _own_replay(replay_id)
    state = _state()
    if record.get("status") in ("done", "failed", "cancelled"):
        raise ApiError(f"replay {replay_id!r} is already {record.get('status')}", status=409)
    state.request_cancel(replay_id)
    if record.get("status") == "pending":
        # Not started: cancelled at once (a coordinator claiming it meanwhile sees the flag).
        record = state.update(replay_id, status="cancelled") or record
    response = jsonify(replay_view(record, True))
    response.status_code = 202
    return response


@bp.post("/audiences/<audience_id>/rollback")
def rollback_audience(audience_id: str) -> Response:
    from workers.replay_versions import RollbackError, rollback

    svc = services()
    load_audience(audience_id)  # 404 for another advertiser's audience
    try:
        outcome = rollback(svc.store, svc.producer, svc.backfills, svc.settings, audience_id, current_advertiser())
    except LookupError:
        raise not_found() from None
    except RollbackError as exc:
        raise ApiError(str(exc), status=409) from None
    doc = load_audience(audience_id)
    body = audience_view(doc)
    body["rollback"] = {"version": outcome.version, "previous": outcome.previous,
                        "gap_replay_id": outcome.gap_replay_id, "gap_days": outcome.gap_days}
    return jsonify(body)
