"""Bearer API keys. Every ``/v1`` request (but the public schema and OpenAPI documents) must carry
``Authorization: Bearer <api key>``; the advertiser it belongs to is ``g.advertiser_id``."""

from __future__ import annotations

from flask import g, request

from rules_service.api.errors import Unauthorized
from rules_service.api.extensions import services

CHALLENGE = 'Bearer realm="audiences"'


def authenticate() -> str:
    """Resolve the request's API key to an advertiser id (one Redis GET) or raise 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer API key: send 'Authorization: Bearer <api key>'",
                           headers={"WWW-Authenticate": CHALLENGE})
    advertiser_id = services().store.advertiser_id_for_key(token.strip())
    if advertiser_id is None:
        raise Unauthorized("invalid or revoked API key",
                           headers={"WWW-Authenticate": CHALLENGE + ', error="invalid_token"'})
    g.advertiser_id = advertiser_id
    return str(advertiser_id)


def current_advertiser() -> str:
    return str(g.advertiser_id)
