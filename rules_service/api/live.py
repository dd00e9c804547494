"""Live counts as Server-Sent Events.

Each stream polls the counters once per ``interval`` (default 1 s) and sends a ``counts`` event
when the serving version's unique users or matches changed, so changes are coalesced to at most
one event per interval; the first event is sent at once. Polling (a few Redis reads per stream per
second) was chosen over a pub/sub channel fed by the workers: it needs nothing from the workers,
cannot miss an update, and costs little next to the stream's own writes. A ``: keep-alive``
comment goes out every 10 s of silence so proxies keep the connection and a vanished client is
noticed (the server learns of a disconnect when a write fails: measured ~20 s under waitress).

Each open stream holds one server thread (waitress ``--threads``), so streams are capped: at most
``LIVE_STREAMS_PER_KEY`` (app config, default 4) per API key and ``LIVE_STREAMS_MAX`` (default 16;
set it to about half of ``--threads``) in the process; past either the answer is a 429 with
``Retry-After`` and the JSON error envelope. The slots are counted in process (:class:`LiveSlots`),
not in Redis: the limit protects this process's threads, and an in-process counter cannot leak
slots when a process dies. A slot is released when the stream ends for any reason (its generator
finishes or is closed, or the response is closed on a client disconnect), exactly once.

Every poll also re-reads the API key (one GET of its hash, the same lookup as authentication): a
revoked key ends the stream with ``event: error`` (type ``unauthorized``) within one interval.

``max_events`` and ``timeout`` end a stream early (tests, scripted clients). The stream sends
``event: deleted`` and ends if the audience is deleted, and ``event: error`` if Redis fails
mid-stream (the client reconnects after ``retry``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g

from rules_service.api.auth import current_advertiser
from rules_service.api.batch_counts import summary
from rules_service.api.errors import ApiError
from rules_service.api.extensions import Services, services
from rules_service.api.schemas import LiveQuerySchema
from rules_service.api.validation import DEFAULT_DAYS, query_args, resolve_window
from rules_service.api.views import load_audience, serving_rule, size_view

bp = Blueprint("live", __name__)
logger = logging.getLogger(__name__)

KEEPALIVE_S = 10.0
LIVE_STREAMS_PER_KEY = 4
LIVE_STREAMS_MAX = 16
#: Seconds a client over the stream limits is asked to wait.
RETRY_AFTER_S = 5
_EXTENSION = "rules_service.live_slots"
_slots_lock = threading.Lock()


class LiveSlots:
    """Open live streams of one app, per key hash and in all; thread-safe."""

    def __init__(self, per_key: int, total: int):
        self.per_key, self.total = per_key, total
        self.by_key: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return sum(self.by_key.values())

    def acquire(self, key: str) -> Any:
        """Take a slot for ``key``; returns its (idempotent) release function, or raises 429."""
        with self._lock:
            held = self.by_key.get(key, 0)
            if held >= self.per_key:
                reason = f"this API key already has {held} live streams open (the limit is {self.per_key})"
            elif self.open >= self.total:
                reason = f"the server has {self.total} live streams open, its limit"
            else:
                self.by_key[key] = held + 1
                reason = ""
        if reason:
            raise ApiError(f"too many live streams: {reason}; close one or retry in {RETRY_AFTER_S} s",
                           status=429, type="rate_limited", headers={"Retry-After": str(RETRY_AFTER_S)})
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self.by_key.get(key, 0) - 1
                if left > 0:
                    self.by_key[key] = left
                else:
                    self.by_key.pop(key, None)
        return release


def live_slots() -> LiveSlots:
    """The app's :class:`LiveSlots`, sized by ``LIVE_STREAMS_PER_KEY`` and ``LIVE_STREAMS_MAX``."""
    app = current_app
    with _slots_lock:
        slots = app.extensions.get(_EXTENSION)
        if slots is None:
            slots = LiveSlots(int(app.config.get("LIVE_STREAMS_PER_KEY", LIVE_STREAMS_PER_KEY)),
                              int(app.config.get("LIVE_STREAMS_MAX", LIVE_STREAMS_MAX)))
            app.extensions[_EXTENSION] = slots
    return slots


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
    redis, key_name = app_services.redis, str(g.key_lookup)

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
                owner = redis.get(key_name)  # the key may have been revoked since the stream began
                if owner is None or (owner.decode() if isinstance(owner, bytes) else str(owner)) != advertiser:
                    error = {"type": "unauthorized", "message": "the API key was revoked"}
                    yield f"event: error\ndata: {orjson.dumps(error).decode()}\n\n"
                    return
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

    def guarded() -> Iterator[str]:
        try:
            yield from events()
        finally:
            release()

    release = live_slots().acquire(key_name)  # last: a 400 or 404 above takes no slot
    response = Response(guarded(), mimetype="text/event-stream")
    response.call_on_close(release)  # a stream closed before it started still frees its slot
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _counts(svc: Services, doc: dict[str, Any], start: datetime, end: datetime) -> dict[str, Any]:
    rid, exact = serving_rule(doc)
    users, matched = summary(svc.counters, rid, start, end, exact=exact)
    return size_view(doc, users, matched, start, end)

