"""The standard topics and their specs, in one place.

Every process that touches the log (workers, ``manage.py produce``, the API, replays) creates the
topics it needs with :func:`ensure_topics` or :func:`topic_spec`, so a topic always gets the same
partitions and cleanup policy whoever creates it first:

================== ============================ =========================================================
topic              spec                         why
================== ============================ =========================================================
bids               BIDS_PARTITIONS, delete 7 d  the input stream; partitions are the unit of parallelism
users.last_seen    BIDS_PARTITIONS, compact     latest user document per user id (replays scan it)
audiences.rules    1 partition, compact         rule changes keyed by rule id; one partition keeps order
replays            1 partition, delete 7 d      replay commands
<topic>.dlq        1 partition, delete 30 d     dead letters with the reason, kept long enough to inspect
================== ============================ =========================================================
"""

from __future__ import annotations

from rules_service.config import Settings
from rules_service.domain import BIDS_TOPIC, LAST_SEEN_TOPIC, REPLAYS_TOPIC, RULES_TOPIC, dlq_topic
from workers.log.port import Log, TopicSpec

DAY_MS = 24 * 3600 * 1000
BIDS_RETENTION_MS = 7 * DAY_MS
DLQ_RETENTION_MS = 30 * DAY_MS


def topic_spec(name: str, settings: Settings) -> TopicSpec:
    """The standard spec of a topic by name; an unknown name gets one partition, delete policy."""
    bids = settings.BIDS_TOPIC or BIDS_TOPIC
    if name in (bids, BIDS_TOPIC):
        return TopicSpec(name, partitions=settings.BIDS_PARTITIONS, cleanup_policy="delete",
                         retention_ms=BIDS_RETENTION_MS)
    if name == LAST_SEEN_TOPIC:
        # A compacted topic only needs the latest record per user: small segments and a low dirty
        # ratio let the cleaner reclaim the many superseded records a busy user leaves behind.
        return TopicSpec(name, partitions=settings.BIDS_PARTITIONS, cleanup_policy="compact",
                         segment_ms=3600 * 1000, min_cleanable_dirty_ratio=0.5)
    if name == RULES_TOPIC:
        return TopicSpec(name, partitions=1, cleanup_policy="compact")
    if name == REPLAYS_TOPIC:
        return TopicSpec(name, partitions=1, cleanup_policy="delete", retention_ms=BIDS_RETENTION_MS)
    if name.endswith(".dlq"):
        return TopicSpec(name, partitions=1, cleanup_policy="delete", retention_ms=DLQ_RETENTION_MS)
    return TopicSpec(name, partitions=1, cleanup_policy="delete")


def standard_topics(settings: Settings) -> list[str]:
    bids = settings.BIDS_TOPIC or BIDS_TOPIC
    return [bids, dlq_topic(bids), LAST_SEEN_TOPIC, RULES_TOPIC, REPLAYS_TOPIC]


def ensure_topic(log: Log, name: str, settings: Settings) -> TopicSpec:
    """Create ``name`` with its standard spec unless it exists; return its spec."""
    spec = topic_spec(name, settings)
    log.create_topic(spec, exist_ok=True)
    return spec


def ensure_topics(log: Log, settings: Settings, names: list[str] | None = None) -> None:
    """Create every standard topic (or ``names``) that does not exist yet."""
    existing = set(log.list_topics())
    for name in names if names is not None else standard_topics(settings):
        if name not in existing:
            ensure_topic(log, name, settings)
