"""Small in-memory fakes implementing the ports the stream worker composes (never MagicMock).

* :class:`FakeLog` - the log port (topics, partitions by key, consumer groups, seeks);
* :class:`FakePercolator` - a tiny evaluator of term/terms/range/exists/bool rules;
* :class:`FakeCounters` - exact counters with the exactly-once offsets contract;
* :func:`fake_normalise`, :func:`fake_aggregate` - minimal stand-ins for normalisation and
  aggregation so the loop's own behaviour (DLQ, ordering, offsets) is tested in isolation.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import orjson

from percolators.errors import InvalidDocumentError, InvalidRuleError
from percolators.port import Explanation, Percolator, Rule, RuleReport
from rules_service.counters.port import CounterBatch, Counters, Granularity, SeriesPoint
from workers.log.port import (
    Consumer,
    Log,
    LogUnavailableError,
    Message,
    Producer,
    Record,
    TopicNotFoundError,
    TopicPartition,
    TopicSpec,
    partition_for,
)


class FakeLog(Log):
    def __init__(self) -> None:
        self.specs: dict[str, TopicSpec] = {}
        self.data: dict[TopicPartition, list[Record]] = {}
        self.committed_offsets: dict[tuple[str, TopicPartition], int] = {}
        self._rr = 0
        self.fail_sends_to: set[str] = set()

    def create_topic(self, spec: TopicSpec, exist_ok: bool = True) -> None:
        if spec.name in self.specs:
            return
        self.specs[spec.name] = spec
        for p in range(spec.partitions):
            self.data[TopicPartition(spec.name, p)] = []

    def describe_topic(self, name: str) -> TopicSpec:
        if name not in self.specs:
            raise TopicNotFoundError(name)
        return self.specs[name]

    def list_topics(self) -> list[str]:
        return sorted(self.specs)

    def producer(self) -> Producer:
        return _FakeProducer(self)

    def consumer(self, group_id: str | None,
                 auto_offset_reset: Literal["earliest", "latest"] = "earliest") -> Consumer:
        return _FakeConsumer(self, group_id, auto_offset_reset)

    def records(self, topic: str) -> list[Record]:
        return [r for tp, rs in sorted(self.data.items()) if tp.topic == topic for r in rs]

    def values(self, topic: str) -> list[Any]:
        return [None if r.value is None else orjson.loads(r.value) for r in self.records(topic)]


class _FakeProducer(Producer):
    def __init__(self, log: FakeLog) -> None:
        self.log = log

    def send_batch(self, topic: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
        spec = self.log.describe_topic(topic)
        if topic in self.log.fail_sends_to:
            raise LogUnavailableError(f"{topic} is down")
        out = []
        for m in messages:
            if m.partition is not None:
                p = m.partition
            elif m.key is not None:
                p = partition_for(m.key, spec.partitions)
            else:
                p = self.log._rr % spec.partitions
                self.log._rr += 1
            records = self.log.data[TopicPartition(topic, p)]
            offset = len(records)
            ts = m.timestamp_ms if m.timestamp_ms is not None else int(time.time() * 1000)
            records.append(Record(topic, p, offset, m.key, m.value, ts))
            out.append((p, offset))
        return out


class _FakeConsumer(Consumer):
    def __init__(self, log: FakeLog, group: str | None, reset: str) -> None:
        self.log, self.group, self.reset = log, group, reset
        self.positions: dict[TopicPartition, int] = {}

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self.positions = {}
        for tp in partitions:
            committed = self.committed(tp)
            if committed is None:
                committed = 0 if self.reset == "earliest" else len(self.log.data[tp])
            self.positions[tp] = committed

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def poll(self, max_records: int = 500, timeout_ms: int = 0) -> list[Record]:
        out: list[Record] = []
        for tp in sorted(self.positions):
            records = self.log.data[tp]
            pos = self.positions[tp]
            take = records[pos:pos + max_records - len(out)]
            out.extend(take)
            self.positions[tp] = pos + len(take)
            if len(out) >= max_records:
                break
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = max(0, min(offset, len(self.log.data[tp])))

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        for tp in list(partitions if partitions is not None else self.positions):
            self.positions[tp] = 0

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        for tp in list(partitions if partitions is not None else self.positions):
            self.positions[tp] = len(self.log.data[tp])

    def seek_to_time(self, timestamp_ms: int, partitions: Iterable[TopicPartition] | None = None) -> None:
        for tp in list(partitions if partitions is not None else self.positions):
            records = self.log.data[tp]
            self.positions[tp] = next((r.offset for r in records if r.timestamp_ms >= timestamp_ms), len(records))

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in partitions}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.log.data[tp]) for tp in partitions}

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        assert self.group is not None, "commit without a group"
        for tp, offset in (offsets if offsets is not None else self.positions).items():
            self.log.committed_offsets[(self.group, tp)] = offset

    def committed(self, tp: TopicPartition) -> int | None:
        if self.group is None:
            return None
        return self.log.committed_offsets.get((self.group, tp))


def _get(doc: Mapping[str, Any], path: str) -> list[Any]:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return []
        value = value[part]
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class FakePercolator(Percolator):
    """Evaluates match_all, term, terms, range, exists and bool (must/filter/should/must_not)."""

    KNOWN = {"match_all", "term", "terms", "range", "exists", "bool"}

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}
        self.percolate_calls = 0

    def _check(self, rule_id: str, query: Mapping[str, Any], path: str = "") -> None:
        if not isinstance(query, Mapping) or len(query) != 1:
            raise InvalidRuleError(rule_id, path, "expected one query type")
        (kind, body), = query.items()
        if kind not in self.KNOWN:
            raise InvalidRuleError(rule_id, f"{path}{kind}", f"unknown query type {kind!r}")
        if kind == "bool":
            for occur in ("must", "filter", "should", "must_not"):
                for i, sub in enumerate(body.get(occur, [])):
                    self._check(rule_id, sub, f"{path}bool.{occur}[{i}].")

    def validate(self, rule: Rule) -> RuleReport:
        self._check(rule.id, rule.query)
        return RuleReport(rule.id)

    def upsert(self, rules: Iterable[Rule]) -> list[RuleReport]:
        rules = list(rules)
        reports = [self.validate(rule) for rule in rules]
        for rule in rules:
            self.rules[rule.id] = rule
        return reports

    def delete(self, rule_ids: Iterable[str]) -> None:
        for rule_id in rule_ids:
            self.rules.pop(rule_id, None)

    def rule_ids(self) -> set[str]:
        return set(self.rules)

    def _match(self, query: Mapping[str, Any], doc: Mapping[str, Any]) -> bool:
        (kind, body), = query.items()
        if kind == "match_all":
            return True
        if kind == "term":
            (f, v), = body.items()
            v = v["value"] if isinstance(v, Mapping) else v
            return v in _get(doc, f)
        if kind == "terms":
            (f, vs), = body.items()
            return any(v in vs for v in _get(doc, f))
        if kind == "exists":
            return bool(_get(doc, body["field"]))
        if kind == "range":
            (f, bounds), = body.items()
            ops = {"gte": lambda a, b: a >= b, "gt": lambda a, b: a > b,
                   "lte": lambda a, b: a <= b, "lt": lambda a, b: a < b}
            return any(all(ops[op](v, b) for op, b in bounds.items()) for v in _get(doc, f))
        must = all(self._match(q, doc) for q in body.get("must", []) + body.get("filter", []))
        not_ = not any(self._match(q, doc) for q in body.get("must_not", []))
        should = body.get("should", [])
        need_should = bool(should) and not (body.get("must") or body.get("filter"))
        return must and not_ and (not need_should or any(self._match(q, doc) for q in should))

    def percolate(self, documents: Sequence[Mapping[str, Any]], *, rule_ids: Collection[str] | None = None,
                  now: datetime | None = None, on_error: str = "raise") -> list[list[str] | Exception]:
        self.percolate_calls += 1
        out: list[list[str] | Exception] = []
        for doc in documents:
            if not isinstance(doc.get("age", 0), int):
                err = InvalidDocumentError("age", "not an integer")
                if on_error == "skip":
                    out.append(err)
                    continue
                raise err
            out.append(sorted(rid for rid, rule in self.rules.items()
                              if (rule_ids is None or rid in rule_ids) and self._match(rule.query, doc)))
        return out

    def explain(self, query: Mapping[str, Any], document: Mapping[str, Any], *,
                now: datetime | None = None) -> Explanation:
        return Explanation("", "query", self._match(query, document), "fake")


class FakeCounters(Counters):
    """Exact counters (sets, not sketches) honouring the apply/offsets contract."""

    def __init__(self) -> None:
        self.users: dict[tuple[str, str, int], set[str]] = {}
        self.match_counts: dict[tuple[str, str, int], int] = {}
        self.dims: dict[tuple[str, int, str], dict[str, int]] = {}
        self.offsets: dict[str, dict[tuple[str, int], int]] = {}
        self.applied_batches = 0
        self.fail_next_apply = False

    def apply(self, batch: CounterBatch, consumer: str, offsets: Mapping[tuple[str, int], int],
              start_offsets: Mapping[tuple[str, int], int] | None = None) -> bool:
        if self.fail_next_apply:
            self.fail_next_apply = False
            raise ConnectionError("redis went away")
        stored = self.offsets.setdefault(consumer, {})
        for key, start in (start_offsets or {}).items():
            if stored.get(key, -1) > start:
                return False
        for k, users in batch.users.items():
            self.users.setdefault(k, set()).update(users)
        for k, n in batch.matches.items():
            self.match_counts[k] = self.match_counts.get(k, 0) + n
        for dk, values in batch.dimensions.items():
            target = self.dims.setdefault(dk, {})
            for value, n in values.items():
                target[value] = target.get(value, 0) + n
        stored.update(offsets)
        self.applied_batches += 1
        return True

    def stored_offsets(self, consumer: str) -> dict[tuple[str, int], int]:
        return dict(self.offsets.get(consumer, {}))

    def unique_users(self, rule_id: str, start: datetime, end: datetime) -> int:
        s, e = start.timestamp(), end.timestamp()
        return len(set().union(*[u for (r, g, b), u in self.users.items() if r == rule_id and g == "hour"
                                 and s <= b < e]))

    def matches(self, rule_id: str, start: datetime, end: datetime) -> int:
        s, e = start.timestamp(), end.timestamp()
        return sum(n for (r, g, b), n in self.match_counts.items() if r == rule_id and g == "hour" and s <= b < e)

    def series(self, rule_id: str, start: datetime, end: datetime, granularity: Granularity) -> list[SeriesPoint]:
        raise NotImplementedError("not needed by the stream tests")

    def breakdown(self, rule_id: str, start: datetime, end: datetime,
                  dimensions: Sequence[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {d: {} for d in dimensions}
        for (r, _day, dim), values in self.dims.items():
            if r == rule_id and dim in out:
                for v, n in values.items():
                    out[dim][v] = out[dim].get(v, 0) + n
        return out

    def delete_rule(self, rule_id: str) -> None:
        self.users = {k: v for k, v in self.users.items() if k[0] != rule_id}


class FakeBadBid(ValueError):
    """Shaped like rules_service.normalize.BadBidError: ``reason`` a sentence, ``field`` a path."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason, self.field = reason, field


def fake_normalise(raw: bytes, log_timestamp_ms: int, now_ms: int) -> dict[str, Any]:
    try:
        bid = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FakeBadBid(f"not JSON: {raw[:10]!r}") from None
    user_id = (bid.get("user") or {}).get("id")
    if not user_id:
        raise FakeBadBid("no user id (user.id or device.ifa)", "user.id")
    doc: dict[str, Any] = {"user_id": user_id, "last_seen": bid.get("ext", {}).get("received_at", log_timestamp_ms)}
    if "yob" in bid["user"]:
        doc["age"] = 2026 - bid["user"]["yob"] if isinstance(bid["user"]["yob"], int) else bid["user"]["yob"]
    if "gender" in bid["user"]:
        doc["gender"] = {"M": "male", "F": "female"}.get(bid["user"]["gender"], "other")
    return doc


def fake_aggregate(documents: Sequence[Mapping[str, Any]], matches: Sequence[Sequence[str]]) -> CounterBatch:
    batch = CounterBatch()
    for doc, rule_ids in zip(documents, matches, strict=True):
        hour = int(doc["last_seen"]) // 3_600_000 * 3600
        for rid in rule_ids:
            batch.users.setdefault((rid, "hour", hour), set()).add(doc["user_id"])
            batch.matches[(rid, "hour", hour)] = batch.matches.get((rid, "hour", hour), 0) + 1
            if "gender" in doc:
                values = batch.dimensions.setdefault((rid, hour // 86400 * 86400, "gender"), {})
                values[doc["gender"]] = values.get(doc["gender"], 0) + 1
    return batch
