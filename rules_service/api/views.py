"""Shared helpers of the resource blueprints: the public view of an audience, loading one for the
current advertiser (404 otherwise), and counts of its serving version."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rules_service.api.auth import current_advertiser
from rules_service.api.batch_counts import summary
from rules_service.api.errors import not_found
from rules_service.api.extensions import services
from rules_service.domain import rule_id
from rules_service.store import Doc, current_rule, iso, status_of


def load_audience(audience_id: str) -> Doc:
    """The current advertiser's audience; another advertiser's is exactly as missing as a missing one."""
    doc = services().store.get_audience(audience_id, current_advertiser())
    if doc is None:
        raise not_found()
    return doc


def backfill_view(doc: Doc) -> dict[str, Any]:
    """The audience's backfill state, refreshed from its replay record while one is under way."""
    backfill = dict(doc.get("backfill") or {})
    if backfill.get("status") in ("pending", "running") and backfill.get("replay_id"):
        try:
            record = services().backfills.get(backfill["replay_id"])
        except Exception:  # progress is best effort: the audience must stay readable
            record = None
        if record:
            backfill["status"] = record.get("status", backfill["status"])
            backfill["progress"] = record.get("progress")
            if record.get("error"):
                backfill["error"] = str(record["error"])
    backfill.setdefault("status", "none")
    backfill.setdefault("days", 0)
    backfill.setdefault("replay_id", None)
    backfill.setdefault("progress", None)
    return backfill


def audience_view(doc: Doc, warnings: list[str] | None = None) -> dict[str, Any]:
    out = {
        "id": doc["id"],
        "name": doc["name"],
        "rule": current_rule(doc),
        "lookback_days": doc["lookback_days"],
        "version": doc["version"],
        "serving_version": doc["serving_version"],
        "status": status_of(doc),
        "created_at": doc["created_at"],
        "updated_at": doc["updated_at"],
        "backfill": backfill_view(doc),
        "versions": [{"version": v["version"], "status": v["status"], "lookback_days": v["lookback_days"],
                      "created_at": v["created_at"]} for v in doc["versions"]],
    }
    if warnings:
        out["warnings"] = warnings
    return out


def serving_rule(doc: Doc) -> tuple[str, bool]:
    """The rule id reads use, and whether it must be read exactly (a replay is writing into the
    serving version's past days: bypass the closed-days cache, see ``batch_counts``)."""
    backfill = doc.get("backfill") or {}
    replaying = backfill.get("status") in ("pending", "running") and doc["version"] == doc["serving_version"]
    return rule_id(doc["id"], doc["serving_version"]), replaying


def size_of(doc: Doc, start: datetime, end: datetime) -> dict[str, Any]:
    rid, exact = serving_rule(doc)
    users, matched = summary(services().counters, rid, start, end, exact=exact)
    return size_view(doc, users, matched, start, end)


def size_view(doc: Doc, users: int, matched: int, start: datetime, end: datetime) -> dict[str, Any]:
    return {"audience_id": doc["id"], "unique_users": users, "matches": matched, "from": iso(start),
            "to": iso(end), "version": doc["serving_version"]}
