"""``GET /v1/schema``: the user document mapping rules are written against, with one line per field
saying where it comes from in the bid request (read from the table in ``rules_service.schema``'s
docstring, the single source of truth)."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from flask import Blueprint, Response, jsonify

from rules_service import schema as user_schema

bp = Blueprint("user_schema", __name__)

_ROW = re.compile(r"^([^\s,]+(?:, [^\s,]+)*)\s+(\S+)\s+(.+)$")


def _sources() -> dict[str, tuple[str, str]]:
    """field -> (documented type, source), from the reStructuredText table of the schema docstring."""
    out: dict[str, tuple[str, str]] = {}
    for line in (user_schema.__doc__ or "").splitlines():
        match = _ROW.match(line.strip())
        if not match or line.startswith("=") or match.group(1) == "field":
            continue
        names, type_, source = match.groups()
        for name in names.split(", "):
            out[name] = (type_, source.strip())
    return out


def _flatten(properties: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, spec in properties.items():
        path = f"{prefix}{name}"
        if "properties" in spec:
            out.extend(_flatten(spec["properties"], path + "."))
        else:
            out.append((path, spec.get("type", "object")))
    return out


@cache
def schema_document() -> dict[str, Any]:
    sources = _sources()
    fields = [{"name": name, "type": sources.get(name, (type_, ""))[0], "source": sources.get(name, ("", None))[1]}
              for name, type_ in _flatten(user_schema.USER_MAPPING["properties"])]
    return {"mapping": user_schema.USER_MAPPING, "fields": fields}


@bp.get("/schema")
def get_schema() -> Response:
    return jsonify(schema_document())
