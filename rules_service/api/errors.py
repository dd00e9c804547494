"""One JSON error envelope for every error: ``{"error": {"type", "message", "fields"}}``.

Handlers cover :class:`ApiError` (raised by our code), every Werkzeug ``HTTPException`` (404 from
routing, 405 with its ``Allow`` header, 413 from ``MAX_CONTENT_LENGTH``, 400 from bad JSON...) and
any other exception (logged with its traceback, answered with a bare 500: never a traceback or an
HTML page on the wire).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

#: The ``type`` of each status when nothing more specific is given.
TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_rule",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 fields: dict[str, str] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.type = type or TYPES.get(self.status, "error")
        self.fields = fields or {}
        self.headers = headers or {}


class NotFound(ApiError):
    status = 404


class Unauthorized(ApiError):
    status = 401


class Unprocessable(ApiError):
    status = 422


def error_response(status: int, type_: str, message: str, fields: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"type": type_, "message": message, "fields": fields or {}}
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def not_found(kind: str = "audience") -> NotFound:
    return NotFound(f"{kind} not found")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.type, exc.message, exc.fields, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {}
        if status == 405:
            allow = dict(exc.get_response().headers).get("Allow")
            if allow:
                headers["Allow"] = allow
        message = exc.description or exc.name
        if status == 404:
            message = "no such resource"
        elif status == 413:
            message = f"request body is larger than {current_app.config.get('MAX_CONTENT_LENGTH')} bytes"
        return error_response(status, TYPES.get(status, "http_error"), message, None, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        current_app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
