"""Domain types shared by the API, the workers and replays.

An *audience* belongs to one advertiser and has numbered *versions*; each version is one
percolator rule whose id is ``rule_id(audience_id, version)``. Counters are kept per rule id, so a
changed rule (version N+1) is backfilled into fresh counters while version N keeps serving reads.

Rule changes travel to the workers as messages on the compacted topic ``RULES_TOPIC``, keyed by
rule id, value :meth:`RuleChange.to_json` (a tombstone, value None, removes the rule). A worker
reads that topic from the beginning at start-up and then tails it, so every worker converges on
the same rule set without a restart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

BIDS_TOPIC = "bids"
LAST_SEEN_TOPIC = "users.last_seen"
RULES_TOPIC = "audiences.rules"
REPLAYS_TOPIC = "replays"


def dlq_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return f"{topic}.dlq"


def rule_id(audience_id: str, version: int) -> str:
    """The percolator rule id of one version of an audience: ``<audience_id>@v<version>``."""
    return f"{audience_id}@v{version}"


def parse_rule_id(value: str) -> tuple[str, int]:
    """Inverse of :func:`rule_id`. Raises ValueError naming the bad id."""
    audience_id, sep, version = value.rpartition("@v")
    if not sep or not audience_id or not version.isdigit():
        raise ValueError(f"not an audience rule id: {value!r} (expected '<audience>@v<version>')")
    return audience_id, int(version)


AudienceStatus = Literal["active", "backfilling", "inactive"]


@dataclass(frozen=True)
class RuleChange:
    """One audience version as the workers need it. ``status`` 'active' and 'backfilling' are both
    percolated by the live stream (a new version counts live traffic from the moment it exists,
    while its replay fills the past); 'inactive' is kept for reads but not percolated."""

    audience_id: str
    advertiser_id: str
    version: int
    query: dict[str, Any]
    status: AudienceStatus = "active"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rule_id(self) -> str:
        return rule_id(self.audience_id, self.version)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> RuleChange:
        raw = orjson.loads(data)
        return cls(
            audience_id=raw["audience_id"],
            advertiser_id=raw["advertiser_id"],
            version=int(raw["version"]),
            query=raw["query"],
            status=raw.get("status", "active"),
            metadata=dict(raw.get("metadata") or {}),
        )
