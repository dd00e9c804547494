"""Live counts as Server-Sent Events.

Each stream polls the counters once per ``interval`` (default 1 s) and sends a ``counts`` event
when the serving version's unique users or matches changed, so changes are coalesced to at most
one event per interval; the first event is sent at once. Polling (two Redis reads per stream per
second) was chosen over a pub/sub channel fed by the workers: it needs nothing from the workers,
cannot miss an update, and costs little next to the stream's own writes. A ``: keep-alive``
comment goes out every 10 s of silence so proxies keep the connection and a vanished client is
noticed (the server learns of a disconnect when a write fails, so within 10 s).

Each open stream holds one server thread (waitress ``--threads``). ``max_events`` and ``timeout``
end a stream early (tests, scripted clients). The stream sends ``event: deleted`` and ends if the
audience is deleted, and ``event: error`` if Redis fails mid-stream (the client reconnects after
``retry``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from flask import Blueprint, Response

from rules_service.api.auth import current_advertiser
from rules_service.api.batch_counts import summary
from rules_service.api.extensions import Services, services
from rules_service.api.schemas import LiveQuerySchema
from rules_service.api.validation import DEFAULT_DAYS, query_args, resolve_window
from rules_service.api.views import load_audience, serving_rule, size_view

bp = Blueprint("live", __name__)
logger = logging.getLogger(__name__)

KEEPALIVE_S = 10.0


@bp.get("/audiences/<audience_id>/live")
def live(audience_id: str) -> Response:
    load_audience(audience_id)  # 404 before the stream starts
    args = query_args(LiveQuerySchema())
    start, end = resolve_window(args)  # validates the window parameters
    fixed = args.get("from_") is not None or args.get("to") is not None
    days = args.get("days") or DEFAULT_DAYS
    app_services = services()
    store, advertiser = app_services.store, current_advertiser()
    max_events, timeout, interval = args["max_events"], args["timeout"], args["interval"]

    def window() -> tuple[datetime, datetime]:
        if fixed:
            return start, end
        now = datetime.now(UTC).replace(microsecond=0)
        return now - timedelta(days=days), now

    def events() -> Iterator[str]:
        # The generator runs after the request context is gone: it uses the objects captured above.
        began = last_write = time.monotonic()
        last: tuple[int, int, int] | None = None
        sent = 0
        yield "retry: 2000\n\n"
        while True:
            try:
                doc = store.get_audience(audience_id, advertiser)
                payload = None if doc is None else _counts(app_services, doc, *window())
            except Exception as exc:  # the response has started: say why the stream ends
                logger.exception("live stream of %s failed", audience_id)
                error = {"type": "service_unavailable", "message": f"counts unavailable ({type(exc).__name__})"}
                yield f"event: error\ndata: {orjson.dumps(error).decode()}\n\n"
                return
            if doc is None or payload is None:
                yield "event: deleted\ndata: {}\n\n"
                return
            key = (payload["unique_users"], payload["matches"], payload["version"])
            now = time.monotonic()
            if key != last:
                sent += 1
                last, last_write = key, now
                yield f"event: counts\nid: {sent}\ndata: {orjson.dumps(payload).decode()}\n\n"
                if max_events is not None and sent >= max_events:
                    return
            elif now - last_write >= KEEPALIVE_S:
                last_write = now
                yield ": keep-alive\n\n"
            if timeout is not None and now - began >= timeout:
                return
            time.sleep(interval if timeout is None else max(0.0, min(interval, timeout - (now - began))))

    response = Response(events(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _counts(svc: Services, doc: dict[str, Any], start: datetime, end: datetime) -> dict[str, Any]:
    rid, exact = serving_rule(doc)
    users, matched = summary(svc.counters, rid, start, end, exact=exact)
    return size_view(doc, users, matched, start, end)

