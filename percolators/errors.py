"""Exceptions raised by percolators. Every message names its culprit (rule id, clause path, field)."""

from __future__ import annotations


class PercolatorError(Exception):
    """Base class of every percolator error."""


class InvalidRuleError(PercolatorError):
    """A rule cannot be accepted: unmapped field, script, unknown query type, malformed clause.

    ``path`` is the clause path inside the rule's query, e.g. ``bool.must[1].range.age``;
    ``fields`` maps such paths to messages when several problems were found (for a 422 response).
    """

    def __init__(self, rule_id: str, path: str, message: str, fields: dict[str, str] | None = None):
        self.rule_id = rule_id
        self.path = path
        self.message = message
        self.fields = fields if fields is not None else {path: message}
        where = f" at {path}" if path else ""
        super().__init__(f"rule {rule_id!r}{where}: {message}")


class InvalidDocumentError(PercolatorError):
    """A document cannot be indexed against the mapping (Elasticsearch would reject it too).

    ``field`` is the dotted field path, e.g. ``geo.location``.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"field {field!r}: {message}")


class PercolatorUnavailableError(PercolatorError):
    """The backend cannot be reached (after retries). Nothing was applied."""
