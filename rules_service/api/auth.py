"""Bearer API keys. Every ``/v1`` request but ``GET /v1/openapi.json`` must carry
``Authorization: Bearer <api key>``; the advertiser it belongs to is ``g.advertiser_id``.

The key lookup and the rate-limit increment (:mod:`rules_service.api.ratelimit`) share one Redis
round trip. A missing or invalid key is a 401 whatever the rate limit says.
"""

from __future__ import annotations

from flask import g, request

from rules_service.api.errors import Unauthorized
from rules_service.api.extensions import services
from rules_service.api.ratelimit import Window
from rules_service.store import hash_key

CHALLENGE = 'Bearer realm="audiences"'


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
    with svc.redis.pipeline(transaction=False) as pipe:
        svc.store.queue_advertiser_lookup(pipe, key_hash)
        window.queue(pipe)
        replies = pipe.execute()
    advertiser_id = replies[0]
    if advertiser_id is None:
        raise Unauthorized("invalid or revoked API key",
                           headers={"WWW-Authenticate": CHALLENGE + ', error="invalid_token"'})
    if len(replies) > 1:
        window.enforce(int(replies[1]))
    g.advertiser_id = advertiser_id.decode() if isinstance(advertiser_id, bytes) else str(advertiser_id)
    return str(g.advertiser_id)


def current_advertiser() -> str:
    return str(g.advertiser_id)
