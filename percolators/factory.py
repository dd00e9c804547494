"""Choose the percolator implementation from the settings' ``PERCOLATOR_URL``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from percolators.port import Percolator
from rules_service.config import Settings
from rules_service.schema import USER_MAPPING


def create_percolator(settings: Settings, mapping: Mapping[str, Any] = USER_MAPPING) -> Percolator:
    """``embedded:`` (or unset) -> the in-process engine; ``http(s)://...`` -> Elasticsearch.

    The Elasticsearch backend is imported only when chosen, so the embedded path needs nothing more.
    """
    if settings.percolator_backend == "embedded":
        from percolators.embedded import EmbeddedPercolator

        return EmbeddedPercolator(dict(mapping))
    from percolators.elasticsearch import ElasticsearchPercolator

    return ElasticsearchPercolator(settings.PERCOLATOR_URL, dict(mapping))
