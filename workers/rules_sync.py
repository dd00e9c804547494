"""Keep a worker's percolator in step with the compacted ``audiences.rules`` topic.

The API writes one :class:`~rules_service.domain.RuleChange` per audience version, keyed by rule
id; a tombstone (value None) deletes the rule. At start-up :meth:`RulesSync.load` reads the topic
from the beginning to its end, keeps the latest value per key (what compaction would keep) and
loads the result in one bulk upsert. Then :meth:`RulesSync.poll`, called by the stream consumer
between batches (at most every ``interval_s``), applies new changes, so an audience created,
changed or deleted through the API reaches running workers within a second.

A rule whose status is ``inactive`` is removed from the percolator (its counters stay readable).
A message that cannot be decoded or a rule the percolator rejects is logged and skipped: one bad
rule never stops the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from percolators.errors import InvalidRuleError
from percolators.port import Percolator, Rule
from rules_service.domain import RULES_TOPIC, RuleChange
from workers.log.port import Consumer, Log, Record

logger = logging.getLogger(__name__)


def rule_from_change(change: RuleChange) -> Rule:
    metadata = {
        "advertiser_id": change.advertiser_id,
        "audience_id": change.audience_id,
        "version": str(change.version),
        "status": change.status,
        **change.metadata,
    }
    return Rule(id=change.rule_id, query=change.query, metadata=metadata)


class RulesSync:
    """Reads ``audiences.rules`` into a percolator. One thread drives it (the stream consumer's)."""

    def __init__(self, log: Log, percolator: Percolator, *, topic: str = RULES_TOPIC,
                 interval_s: float = 0.2) -> None:
        self.log = log
        self.percolator = percolator
        self.topic = topic
        self.interval_s = interval_s
        self.invalid: dict[str, str] = {}  # rule id -> why it was skipped
        self.applied = 0
        self._consumer: Consumer | None = None
        self._next_poll = 0.0

    def load(self) -> int:
        """Read the topic from the beginning to its current end; return the number of live rules."""
        consumer = self.log.consumer(None, auto_offset_reset="earliest")
        partitions = self.log.partitions(self.topic)
        consumer.assign(partitions)
        consumer.seek_to_beginning(partitions)
        ends = consumer.end_offsets(partitions)
        latest: dict[str, Record] = {}
        quiet = 0
        # Stop at the end offsets, or after a quiet spell: compaction may have removed the tail.
        while any(consumer.position(tp) < end for tp, end in ends.items()) and quiet < 10:
            records = consumer.poll(5000, timeout_ms=100)
            quiet = 0 if records else quiet + 1
            for record in records:
                if record.key is not None:
                    latest[record.key.decode("utf-8", "replace")] = record
                else:
                    logger.warning("%s offset %d has no key (expected a rule id): skipped", self.topic, record.offset)
        self._consumer = consumer
        self._apply(latest, bulk=True)
        self._next_poll = time.monotonic() + self.interval_s
        return len(self.percolator.rule_ids())

    def poll(self) -> int:
        """Apply changes that arrived since the last call (rate-limited to ``interval_s``); return
        how many were applied."""
        if self._consumer is None:
            raise RuntimeError("RulesSync.load() must run first")
        now = time.monotonic()
        if now < self._next_poll:
            return 0
        self._next_poll = now + self.interval_s
        latest: dict[str, Record] = {}
        while True:
            records = self._consumer.poll(5000, timeout_ms=0)
            if not records:
                break
            for record in records:
                if record.key is not None:
                    latest[record.key.decode("utf-8", "replace")] = record
        return self._apply(latest, bulk=False) if latest else 0

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _apply(self, latest: Mapping[str, Record], *, bulk: bool) -> int:
        upserts: list[Rule] = []
        deletes: list[str] = []
        for key, record in latest.items():
            if record.value is None:
                deletes.append(key)
                continue
            try:
                change = RuleChange.from_json(record.value)
            except Exception as exc:  # a malformed message must not stop the worker
                self._skip(key, f"cannot decode rule change at {self.topic}/{record.partition}@{record.offset}: {exc}")
                deletes.append(key)
                continue
            if change.rule_id != key:
                logger.warning("%s: key %r carries rule %r; using the key", self.topic, key, change.rule_id)
            if change.status == "inactive":
                deletes.append(key)
                continue
            rule = rule_from_change(change)
            upserts.append(Rule(id=key, query=rule.query, metadata=rule.metadata))
        if deletes:
            self.percolator.delete(deletes)
        applied = len(deletes)
        if upserts:
            applied += self._upsert(upserts, bulk=bulk)
        self.applied += applied
        return applied

    def _upsert(self, rules: list[Rule], *, bulk: bool) -> int:
        if bulk or len(rules) > 1:
            try:
                self.percolator.upsert(rules)
                for rule in rules:
                    self.invalid.pop(rule.id, None)
                return len(rules)
            except InvalidRuleError:
                pass  # one bad rule rejects the whole call: retry one by one to skip only it
        done = 0
        for rule in rules:
            try:
                self.percolator.upsert([rule])
            except InvalidRuleError as exc:
                self._skip(rule.id, str(exc))
                self.percolator.delete([rule.id])  # an older valid version must not linger
                continue
            self.invalid.pop(rule.id, None)
            done += 1
        return done

    def _skip(self, rule_id: str, why: str) -> None:
        self.invalid[rule_id] = why
        logger.error("rule %s skipped: %s", rule_id, why)
