"""Audience counts: size over a window, a batch of sizes for dashboards, and insights
(time series and breakdowns by dimension). Always read from the serving version's rule id."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from rules_service.api.auth import current_advertiser
from rules_service.api.batch_counts import summaries
from rules_service.api.errors import ApiError
from rules_service.api.extensions import services
from rules_service.api.schemas import MAX_BATCH_IDS, InsightsQuerySchema, SizesQuerySchema, WindowQuerySchema
from rules_service.api.validation import query_args, resolve_window
from rules_service.api.views import load_audience, serving_rule, size_of, size_view
from rules_service.domain import rule_id
from rules_service.store import iso

bp = Blueprint("counts", __name__)

#: Hourly series longer than this many buckets are refused (ask for granularity=day).
MAX_HOUR_BUCKETS = 24 * 31


@bp.get("/audiences/<audience_id>/size")
def size(audience_id: str) -> Response:
    doc = load_audience(audience_id)
    start, end = resolve_window(query_args(WindowQuerySchema()))
    return jsonify(size_of(doc, start, end))


@bp.get("/audiences/sizes")
def sizes() -> Response:
    """Sizes of up to 100 audiences in one call (a dashboard). Ids that are missing or belong to
    another advertiser are listed in ``not_found``, indistinguishably."""
    args = query_args(SizesQuerySchema(), list_fields=("ids",))
    ids = list(dict.fromkeys(args["ids"]))
    if not ids or len(ids) > MAX_BATCH_IDS:
        raise ApiError(f"give 1 to {MAX_BATCH_IDS} audience ids", status=400, type="validation_error",
                       fields={"ids": f"1 to {MAX_BATCH_IDS} ids"})
    start, end = resolve_window(args)
    docs = services().store.get_audiences(ids, current_advertiser())
    found = [doc for doc in docs if doc is not None]
    missing = [i for i, doc in zip(ids, docs, strict=True) if doc is None]
    serving = [serving_rule(doc) for doc in found]
    counts = summaries(services().counters, [rid for rid, _ in serving], start, end,
                       exact={rid for rid, exact in serving if exact})
    return jsonify({"sizes": [size_view(doc, users, matched, start, end)
                              for doc, (users, matched) in zip(found, counts, strict=True)],
                    "not_found": missing})


@bp.get("/audiences/<audience_id>/insights")
def insights(audience_id: str) -> Response:
    svc = services()
    doc = load_audience(audience_id)
    args = query_args(InsightsQuerySchema(), list_fields=("dimension",))
    start, end = resolve_window(args)
    granularity = args["granularity"]
    dimensions = list(dict.fromkeys(args["dimension"]))
    unknown = [d for d in dimensions if d not in svc.settings.DIMENSIONS]
    if unknown:
        raise ApiError(f"unknown dimension {unknown[0]!r}", status=400, type="validation_error",
                       fields={"dimension": f"unknown {', '.join(unknown)}; "
                                            f"known: {', '.join(svc.settings.DIMENSIONS)}"})
    if granularity == "hour" and (end - start).total_seconds() > MAX_HOUR_BUCKETS * 3600:
        raise ApiError("hourly series are limited to 31 days; use granularity=day", status=400,
                       type="validation_error", fields={"granularity": "hour allows at most 31 days"})
    rid = rule_id(doc["id"], doc["serving_version"])
    series = svc.counters.series(rid, start, end, granularity)
    breakdowns = svc.counters.breakdown(rid, start, end, dimensions) if dimensions else {}
    return jsonify({
        "audience_id": doc["id"],
        "version": doc["serving_version"],
        "from": iso(start),
        "to": iso(end),
        "granularity": granularity,
        "series": [{"start": iso(p.start), "unique_users": int(p.unique_users), "matches": int(p.matches)}
                   for p in series],
        "breakdowns": {dim: {str(k): int(v) for k, v in (breakdowns.get(dim) or {}).items()} for dim in dimensions},
    })
