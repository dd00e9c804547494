"""The counters contract: what the stream, replays and the API need from the counter store.

Counters are kept per *rule id* (one audience version, see ``rules_service.domain.rule_id``) in
UTC event-time buckets. The Redis implementation (``rules_service.counters.redis_store``) documents
its key scheme in ``rules_service.counters.keys``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Granularity = Literal["hour", "day"]


@dataclass
class CounterBatch:
    """Counter updates aggregated in memory for one batch of events, written in one round trip.

    ``users[(rule_id, granularity, bucket_start_epoch_s)]`` -> user ids to PFADD;
    ``matches[(rule_id, granularity, bucket_start_epoch_s)]`` -> matched events to add;
    ``dimensions[(rule_id, day_start_epoch_s, dimension)]`` -> {value: matched events}.
    """

    users: dict[tuple[str, str, int], set[str]] = field(default_factory=dict)
    matches: dict[tuple[str, str, int], int] = field(default_factory=dict)
    dimensions: dict[tuple[str, int, str], dict[str, int]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.users or self.matches or self.dimensions)


@dataclass(frozen=True)
class SeriesPoint:
    start: datetime
    unique_users: int
    matches: int


class CountersRolledBackError(Exception):
    """The stored offsets of a partition are behind what this writer stored there last: the store
    lost writes it had acknowledged (restored from a backup or an older snapshot, a failover to a
    replica that lagged, the last second of an append-only file after a crash), or someone reset
    them. Counts and offsets went back together, so nothing is wrong with what is stored; but the
    records between the stored offsets and the writer's position are not counted any more. The
    writer must drop what it holds, rewind to :meth:`Counters.stored_offsets` and read them again
    (the stream consumer does). Nothing of the batch was written."""

    def __init__(self, consumer: str, behind: dict[str, tuple[int | None, int]]) -> None:
        self.consumer = consumer
        self.behind = behind  # offsets field -> (stored now, stored by this writer last)
        shown = ", ".join(f"{name}: {stored} < {last}" for name, (stored, last) in sorted(behind.items()))
        super().__init__(f"the stored offsets of {consumer!r} went back ({shown}): the counter store lost "
                         "acknowledged writes or was reset; rewind to the stored offsets and read again")


class Counters(abc.ABC):
    """Counter store.

    Exactly-once contract: :meth:`apply` writes a batch *and* the consumer offsets it covers in
    one atomic step, and skips the whole batch when the stored offsets show it was already
    applied (a worker that crashed after writing and before committing to the log re-reads the
    same records and must not count them twice). The offsets stored here are the source of truth
    for where a stream consumer resumes. A store that lost acknowledged writes (offsets behind
    what the same writer stored) makes :meth:`apply` raise :class:`CountersRolledBackError`.
    """

    @abc.abstractmethod
    def apply(self, batch: CounterBatch, consumer: str, offsets: Mapping[tuple[str, int], int],
              start_offsets: Mapping[tuple[str, int], int] | None = None) -> bool:
        """Atomically add ``batch`` and store ``offsets`` (next offset per (topic, partition)) for
        ``consumer``. ``start_offsets`` are the first offsets the batch covers: if the stored
        offset of any partition is beyond its start offset, the batch was already applied and
        nothing is written. Returns True when written. Raises :class:`CountersRolledBackError`,
        writing nothing, when a partition's stored offset is behind the one this object stored
        there last."""

    def prepare(self, rule_ids: Iterable[str], at: float | None = None) -> int:
        """A hint before the first writes: build whatever per-rule state the writes of ``rule_ids``
        in the hour and day of ``at`` (epoch seconds, default now) will need, so the first write
        does not pay for it. Writes nothing; returns how many entries it built (0: nothing to do,
        the default)."""
        return 0

    @abc.abstractmethod
    def stored_offsets(self, consumer: str) -> dict[tuple[str, int], int]:
        """The offsets stored by :meth:`apply` for ``consumer``."""

    @abc.abstractmethod
    def unique_users(self, rule_id: str, start: datetime, end: datetime) -> int:
        """Estimated distinct users matched in [start, end), merging the day and hour sketches
        that cover it (hour precision at the edges)."""

    @abc.abstractmethod
    def matches(self, rule_id: str, start: datetime, end: datetime) -> int:
        """Matched events in [start, end) at hour precision."""

    @abc.abstractmethod
    def series(self, rule_id: str, start: datetime, end: datetime, granularity: Granularity) -> list[SeriesPoint]:
        """One point per bucket in [start, end)."""

    @abc.abstractmethod
    def breakdown(
        self, rule_id: str, start: datetime, end: datetime, dimensions: Sequence[str]
    ) -> dict[str, dict[str, int]]:
        """Matched events per value of each dimension over the days covering [start, end)."""

    @abc.abstractmethod
    def delete_rule(self, rule_id: str) -> None:
        """Drop every counter of a rule id."""
