"""Bearer API keys. Every ``/v1`` request but ``GET /v1/openapi.json`` must carry
``Authorization: Bearer <api key>``; the advertiser it belongs to is ``g.advertiser_id``.

The key lookup and the rate-limit increment (:mod:`rules_service.api.ratelimit`) share one Redis
round trip (a Lua script, ``EVALSHA``), and only a valid key is counted: a missing or invalid key is
a 401 whatever the rate limit says, and writes nothing to Redis.
"""

from __future__ import annotations

from flask import g, request

from rules_service.api.errors import Unauthorized
from rules_service.api.extensions import services
from rules_service.api.ratelimit import Window
from rules_service.store import hash_key

CHALLENGE = 'Bearer realm="audiences"'

#: GET the key's advertiser; only when there is one, INCR and EXPIRE the key's rate-limit window.
#: An invalid key therefore creates no Redis key (random keys cannot fill Redis with counters).
_LOOKUP_AND_COUNT = """
local advertiser = redis.call('GET', KEYS[1])
if not advertiser then return nil end
local count = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {advertiser, count}
"""


class _KeyName:
    """Records the name the store looks a key up under (``queue_advertiser_lookup`` queues a GET)."""

    name = ""

    def get(self, name: str) -> None:
        self.name = name


def authenticate() -> str:
    """Resolve the request's API key to an advertiser id and count it against its rate limit;
    raise 401 or 429."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer API key: send 'Authorization: Bearer <api key>'",
                           headers={"WWW-Authenticate": CHALLENGE})
    svc = services()
    key_hash = hash_key(token)
    window = Window(svc.store.prefix, key_hash, svc.settings.RATE_LIMIT_PER_MINUTE)
    lookup = _KeyName()
    svc.store.queue_advertiser_lookup(lookup, key_hash)
    if window.limit > 0:
        # One round trip: the script counts the request only if the key is valid.
        reply = svc.redis.register_script(_LOOKUP_AND_COUNT)(keys=[lookup.name, window.key],
                                                             args=[window.ttl])
        advertiser_id, count = (None, 0) if reply is None else reply
    else:
        advertiser_id, count = svc.redis.get(lookup.name), 0
    if advertiser_id is None:
        raise Unauthorized("invalid or revoked API key",
                           headers={"WWW-Authenticate": CHALLENGE + ', error="invalid_token"'})
    window.enforce(int(count))
    g.key_lookup = lookup.name  # live streams re-check the key under this name on every poll
    g.advertiser_id = advertiser_id.decode() if isinstance(advertiser_id, bytes) else str(advertiser_id)
    return str(g.advertiser_id)


def current_advertiser() -> str:
    return str(g.advertiser_id)
