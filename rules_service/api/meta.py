"""Operational endpoints: ``/healthz`` (the process answers), ``/readyz`` (Redis, the log and the
percolator answer), ``/metrics`` (Prometheus text) and ``/v1/openapi.json``."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from percolators.port import Rule
from rules_service.api.extensions import services

bp = Blueprint("meta", __name__)
METRICS = "rules_service.metrics"


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


def _check(name: str, probe: Any, checks: dict[str, str]) -> None:
    try:
        probe()
        checks[name] = "ok"
    except Exception as exc:  # a readiness probe reports, it does not raise
        checks[name] = f"failed: {type(exc).__name__}: {exc}"[:300]


@bp.get("/readyz")
def readyz() -> Response:
    svc = services()
    checks: dict[str, str] = {}
    _check("redis", lambda: svc.redis.ping(), checks)
    _check("log", lambda: svc.log.list_topics(), checks)
    _check("percolator", lambda: svc.percolator.validate(Rule(id="readyz", query={"match_all": {}})), checks)
    ready = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


@bp.get("/metrics")
def metrics() -> Response:
    registry: CollectorRegistry = current_app.extensions[METRICS]["registry"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


@bp.get("/v1/openapi.json")
def openapi() -> Response:
    from rules_service.api.openapi import openapi_document

    return jsonify(openapi_document(current_app))


def init_metrics(app: Flask) -> None:
    """Request counts and latency by endpoint (the URL rule, not the raw path: bounded labels)."""
    registry = CollectorRegistry()
    requests = Counter("rules_api_requests", "HTTP requests answered", ["endpoint", "method", "status"],
                       registry=registry)
    latency = Histogram("rules_api_request_duration_seconds", "Time to produce the response (SSE: to its start)",
                        ["endpoint", "method"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
    app.extensions[METRICS] = {"registry": registry}

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        requests.labels(endpoint, request.method, str(response.status_code)).inc()
        started = g.get("started")
        if started is not None:
            latency.labels(endpoint, request.method).observe(time.perf_counter() - started)
        for name, value in (g.get("rate_limit_headers") or {}).items():
            response.headers.setdefault(name, value)
        return response
