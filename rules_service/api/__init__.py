"""The REST API: ``create_app(config=None)`` builds a Flask app.

``config`` is a dict of Flask settings plus, optionally, ``SETTINGS`` (a
:class:`~rules_service.config.Settings`), ``RULES`` (a dict of setting overrides, as for
``load_settings``) and service objects (see :mod:`rules_service.api.extensions`). Nothing connects
to anything until a request needs it.

Resources live in blueprints: ``audiences`` (CRUD and the dry-run test), ``counts`` (size, sizes,
insights), ``live`` (SSE), ``replays`` (issue 6), ``user_schema`` and ``meta`` (health, readiness,
metrics, OpenAPI). Every ``/v1`` route but ``/v1/openapi.json`` is authenticated and rate limited
per API key.

Quick start (``RULES_REDIS_URL`` unset: the embedded redis-server under ``RULES_DATA_DIR``)::

    python manage.py advertisers create "Acme"     # {"id": "adv_...", "name": "Acme", "api_key": "rk_..."}
    python manage.py serve --port 8000 --threads 32 &
    KEY=rk_...
    curl -s -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
         -d '{"name": "iOS men 26-35", "lookback_days": 30, "rule": {"bool": {"filter": [
               {"term": {"gender": "male"}}, {"term": {"device.os": "ios"}},
               {"range": {"age": {"gte": 26, "lte": 35}}}]}}}' http://127.0.0.1:8000/v1/audiences
    curl -s -H "Authorization: Bearer $KEY" "http://127.0.0.1:8000/v1/audiences/<id>/size?days=30"
    curl -s -H "Authorization: Bearer $KEY" \
         "http://127.0.0.1:8000/v1/audiences/<id>/insights?days=7&granularity=day&dimension=gender,device.os"
    curl -sN -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/v1/audiences/<id>/live   # SSE
    curl -s http://127.0.0.1:8000/v1/openapi.json    # every endpoint, parameter and error

Errors are always ``{"error": {"type", "message", "fields"}}``; an invalid rule is a 422 whose
``fields`` name the clause, e.g. ``{"rule.bool.filter[2].range.age": "..."}``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask

from rules_service.config import Settings, load_settings

API_PREFIX = "/v1"
_SERVICE_KEYS = ("REDIS", "STORE", "PERCOLATOR", "COUNTERS", "LOG", "PRODUCER", "BACKFILLS", "TEST_PERCOLATOR")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    from rules_service.api import audiences, counts, live, meta, replays, user_schema
    from rules_service.api.auth import authenticate
    from rules_service.api.errors import register_error_handlers
    from rules_service.api.extensions import init_app

    config = dict(config or {})
    settings: Settings = config.pop("SETTINGS", None) or load_settings(config.pop("RULES", None))
    provided = {key: config.pop(key, None) for key in _SERVICE_KEYS}

    app = Flask("rules_service.api", static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.MAX_REQUEST_BYTES,
        JSON_SORT_KEYS=False,
        SECRET_KEY=settings.SECRET_KEY or None,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False
    app.config.update(config)

    init_app(app, settings, provided)
    register_error_handlers(app)
    meta.init_metrics(app)

    v1 = Blueprint("v1", __name__, url_prefix=API_PREFIX)

    @v1.before_request
    def _authenticate() -> None:
        authenticate()  # and count the request against the key's rate limit

    # The sizes batch route must be registered before /audiences/<id> routes; Werkzeug prefers
    # static segments anyway, but the order keeps it obvious.
    v1.register_blueprint(counts.bp)
    v1.register_blueprint(audiences.bp)
    v1.register_blueprint(live.bp)
    v1.register_blueprint(replays.bp)
    v1.register_blueprint(user_schema.bp)
    app.register_blueprint(v1)
    app.register_blueprint(meta.bp)
    return app
