"""Per-API-key rate limit: a fixed one-minute window counted in Redis.

``INCR rl:<advertiser>:<minute>`` and ``EXPIRE`` in one pipeline (one round trip); over
``Settings.RATE_LIMIT_PER_MINUTE`` the request is answered 429 with ``Retry-After`` (seconds to
the next window). A fixed window may let through up to twice the limit across a window boundary;
that is accepted for one round trip per request (a sliding log would cost a sorted set per key).
Counting in Redis makes the limit hold across every API process and thread. Limit 0 disables it.
"""

from __future__ import annotations

import time

from flask import g

from rules_service.api.errors import ApiError
from rules_service.api.extensions import services

WINDOW_S = 60


def check_rate_limit(advertiser_id: str) -> None:
    svc = services()
    limit = svc.settings.RATE_LIMIT_PER_MINUTE
    if limit <= 0:
        return
    now = time.time()
    window = int(now // WINDOW_S)
    key = f"{svc.store.prefix}rl:{advertiser_id}:{window}"
    with svc.redis.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, WINDOW_S + 5)
        count, _ = pipe.execute()
    remaining = max(0, limit - int(count))
    reset = int((window + 1) * WINDOW_S - now) + 1
    g.rate_limit_headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
                            "X-RateLimit-Reset": str(reset)}
    if int(count) > limit:
        raise ApiError(f"rate limit of {limit} requests per minute exceeded; retry in {reset} s",
                       status=429, headers={"Retry-After": str(reset), **g.rate_limit_headers})
