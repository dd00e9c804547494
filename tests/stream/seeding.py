"""Set-up shared by the stream tests that run on a real log: a log with its topics and a set of
audiences published as version 1 of each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rules_service.config import Settings
from rules_service.domain import RULES_TOPIC, RuleChange
from workers.log.port import Log, Message, Producer


def log_with_rules(settings: Settings, rules: Mapping[str, dict[str, Any]]) -> tuple[Log, Producer]:
    """The settings' log, its topics made, and ``rules`` (audience id -> query) published on the rules
    topic as ``<audience>@v1`` of advertiser ``adv``; with a producer for the caller's bids."""
    from workers.log.factory import create_log
    from workers.topics import ensure_topics

    log = create_log(settings)
    ensure_topics(log, settings)
    producer = log.producer()
    producer.send_batch(RULES_TOPIC, [
        Message(value=RuleChange(audience_id=name, advertiser_id="adv", version=1, query=query).to_json(),
                key=f"{name}@v1".encode()) for name, query in rules.items()])
    return log, producer
