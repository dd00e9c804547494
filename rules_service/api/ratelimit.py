"""Per-API-key rate limit: a fixed one-minute window counted in Redis.

``INCR rl:<sha256(key)[:32]>:<minute>`` and ``EXPIRE`` run in the same Lua script as the key lookup
(:func:`rules_service.api.auth.authenticate`), and only when the key is valid, so authentication
plus rate limiting cost one round trip and an invalid key writes nothing.
Over ``Settings.RATE_LIMIT_PER_MINUTE`` the request is answered 429 with
``Retry-After`` (seconds to the next window). A fixed window may let through up to twice the limit
across a window boundary; that is accepted for one round trip per request (a sliding log would
cost a sorted set per key). Counting in Redis makes the limit hold across every API process and
thread. A limit of 0 disables it.
"""

from __future__ import annotations

import time
from typing import Any

from flask import g

from rules_service.api.errors import ApiError

WINDOW_S = 60


class Window:
    """The current window of one key, queued on a pipeline."""

    def __init__(self, prefix: str, key_hash: str, limit: int, now: float | None = None):
        self.limit = limit
        self.now = time.time() if now is None else now
        self.window = int(self.now // WINDOW_S)
        self.key = f"{prefix}rl:{key_hash[:32]}:{self.window}"
        self.ttl = WINDOW_S + 5

    def queue(self, pipe: Any) -> int:
        """Queue the increment; returns how many replies it adds."""
        if self.limit <= 0:
            return 0
        pipe.incr(self.key)
        pipe.expire(self.key, self.ttl)
        return 2

    def enforce(self, count: int) -> None:
        """Record the headers; raise 429 past the limit."""
        if self.limit <= 0:
            return
        remaining = max(0, self.limit - count)
        reset = int((self.window + 1) * WINDOW_S - self.now) + 1
        g.rate_limit_headers = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(remaining),
                                "X-RateLimit-Reset": str(reset)}
        if count > self.limit:
            raise ApiError(f"rate limit of {self.limit} requests per minute exceeded; retry in {reset} s",
                           status=429, headers={"Retry-After": str(reset), **g.rate_limit_headers})
