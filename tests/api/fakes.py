"""Fakes implementing the ports the API composes (no MagicMock): a small percolator, in-memory
counters and an in-memory log. Each is honest about the part of the contract it implements."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from percolators.errors import InvalidDocumentError, InvalidRuleError
from percolators.port import Explanation, Percolator, Rule, RuleReport
from rules_service.counters.port import CounterBatch, Counters, Granularity, SeriesPoint
from rules_service.schema import USER_MAPPING
from workers.log.port import Consumer, Log, LogUnavailableError, Message, Producer, TopicSpec


def _fields(properties: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for name, spec in properties.items():
        if "properties" in spec:
            out.update(_fields(spec["properties"], f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = spec["type"]
    return out


def _get(doc: Mapping[str, Any], field: str) -> list[Any]:
    value: Any = doc
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return []
        value = value[part]
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class FakePercolator(Percolator):
    """term, terms, range (numbers), exists, match_all, match_none, bool on the user mapping."""

    TYPES = ("term", "terms", "range", "exists", "match_all", "match_none", "bool")

    def __init__(self, mapping: Mapping[str, Any] = USER_MAPPING):
        self.fields = _fields(mapping["properties"])
        self.rules: dict[str, Rule] = {}
        self.closed = False

    def _check(self, rule_id: str, query: Any, path: str) -> None:
        if not isinstance(query, Mapping) or len(query) != 1:
            raise InvalidRuleError(rule_id, path, "a clause is an object with exactly one query type")
        (qtype, body), = query.items()
        here = f"{path}.{qtype}" if path else qtype
        if qtype not in self.TYPES:
            raise InvalidRuleError(rule_id, here, f"unknown query type [{qtype}]")
        if qtype == "bool":
            for occur in ("must", "filter", "should", "must_not"):
                clauses = body.get(occur, [])
                clauses = clauses if isinstance(clauses, list) else [clauses]
                for index, clause in enumerate(clauses):
                    self._check(rule_id, clause, f"{here}.{occur}[{index}]")
            return
        if qtype in ("match_all", "match_none"):
            return
        if qtype == "exists":
            field = body.get("field")
            if field not in self.fields:
                raise InvalidRuleError(rule_id, here, f"no mapping for field [{field}]")
            return
        (field, value), = body.items()
        if field not in self.fields:
            raise InvalidRuleError(rule_id, f"{here}.{field}", f"no mapping for field [{field}]")
        if qtype == "range":
            for op, bound in value.items():
                if op not in ("gt", "gte", "lt", "lte"):
                    raise InvalidRuleError(rule_id, f"{here}.{field}", f"unknown range parameter [{op}]")
                if self.fields[field] == "integer" and not isinstance(bound, int | float):
                    raise InvalidRuleError(rule_id, f"{here}.{field}", f"[{bound}] is not a number")

    def validate(self, rule: Rule) -> RuleReport:
        self._check(rule.id, rule.query, "")
        return RuleReport(rule.id, ("fake percolator",) if "match_all" in rule.query else ())

    def upsert(self, rules: Iterable[Rule]) -> list[RuleReport]:
        rules = list(rules)
        reports = [self.validate(rule) for rule in rules]
        self.rules.update({rule.id: rule for rule in rules})
        return reports

    def delete(self, rule_ids: Iterable[str]) -> None:
        for rid in rule_ids:
            self.rules.pop(rid, None)

    def rule_ids(self) -> set[str]:
        return set(self.rules)

    def _explain(self, query: Mapping[str, Any], doc: Mapping[str, Any], path: str) -> Explanation:
        (qtype, body), = query.items()
        here = f"{path}.{qtype}" if path else qtype
        if qtype == "match_all":
            return Explanation(here, qtype, True, "matches every document")
        if qtype == "match_none":
            return Explanation(here, qtype, False, "matches no document")
        if qtype == "bool":
            children = []
            verdict = True
            for occur in ("must", "filter", "should", "must_not"):
                clauses = body.get(occur, [])
                clauses = clauses if isinstance(clauses, list) else [clauses]
                kids = [self._explain(c, doc, f"{here}.{occur}[{i}]") for i, c in enumerate(clauses)]
                children.extend(kids)
                if occur in ("must", "filter"):
                    verdict = verdict and all(k.matched for k in kids)
                elif occur == "must_not":
                    verdict = verdict and not any(k.matched for k in kids)
                elif kids and not (body.get("must") or body.get("filter")):
                    verdict = verdict and any(k.matched for k in kids)
            return Explanation(here, qtype, verdict, "all required clauses hold" if verdict else "a clause failed",
                               children)
        if qtype == "exists":
            ok = bool(_get(doc, body["field"]))
            return Explanation(here, qtype, ok, f"{body['field']} {'exists' if ok else 'is missing'}")
        (field, value), = body.items()
        values = _get(doc, field)
        if qtype == "term":
            target = value["value"] if isinstance(value, Mapping) else value
            ok = target in values
        elif qtype == "terms":
            ok = any(v in value for v in values)
        else:
            def within(v: Any) -> bool:
                return (("gt" not in value or v > value["gt"]) and ("gte" not in value or v >= value["gte"])
                        and ("lt" not in value or v < value["lt"]) and ("lte" not in value or v <= value["lte"]))
            ok = any(isinstance(v, int | float) and within(v) for v in values)
        return Explanation(here, qtype, ok, f"{field} {values!r} {'matches' if ok else 'does not match'} {value!r}")

    def percolate(self, documents: Sequence[Mapping[str, Any]], *, rule_ids: Collection[str] | None = None,
                  now: datetime | None = None, on_error: str = "raise") -> list[list[str] | Exception]:
        out: list[list[str] | Exception] = []
        for doc in documents:
            age = doc.get("age")
            if age is not None and not isinstance(age, int):
                error = InvalidDocumentError("age", f"[{age}] is not an integer")
                if on_error == "skip":
                    out.append(error)
                    continue
                raise error
            out.append(sorted(rid for rid, rule in self.rules.items()
                              if (rule_ids is None or rid in rule_ids) and self._explain(rule.query, doc, "").matched))
        return out

    def explain(self, query: Mapping[str, Any], document: Mapping[str, Any], *,
                now: datetime | None = None) -> Explanation:
        return self._explain(query, document, "")

    def close(self) -> None:
        self.closed = True


class BrokenPercolator(FakePercolator):
    """A percolator whose backend is down (for /readyz)."""

    def validate(self, rule: Rule) -> RuleReport:
        from percolators.errors import PercolatorUnavailableError

        raise PercolatorUnavailableError("connection refused")


class FakeProducer(Producer):
    def __init__(self, log: FakeLog):
        self.log = log

    def send_batch(self, topic: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
        if self.log.down:
            raise LogUnavailableError("broker down")
        out = []
        for message in messages:
            self.log.messages[topic].append(message)
            out.append((0, len(self.log.messages[topic]) - 1))
        return out


class FakeLog(Log):
    """Topics in memory; ``down = True`` makes every call fail like an unreachable broker."""

    def __init__(self) -> None:
        self.topics: dict[str, TopicSpec] = {}
        self.messages: dict[str, list[Message]] = defaultdict(list)
        self.down = False

    def create_topic(self, spec: TopicSpec, exist_ok: bool = True) -> None:
        self.topics.setdefault(spec.name, spec)

    def describe_topic(self, name: str) -> TopicSpec:
        return self.topics[name]

    def list_topics(self) -> list[str]:
        if self.down:
            raise LogUnavailableError("broker down")
        return sorted(self.topics)

    def producer(self) -> Producer:
        return FakeProducer(self)

    def consumer(self, group_id: str | None,
                 auto_offset_reset: Literal["earliest", "latest"] = "earliest") -> Consumer:
        raise NotImplementedError("the API never consumes")

    def latest(self, topic: str) -> dict[bytes | None, bytes | None]:
        """The compacted view of a topic: latest value per key."""
        return {m.key: m.value for m in self.messages[topic]}


def batch_for(rule_id: str, events: Iterable[tuple[datetime, str, Mapping[str, str]]]) -> CounterBatch:
    """A CounterBatch as the stream worker builds it: hour and day users and matches, day dimensions."""
    batch = CounterBatch()
    for when, user, dims in events:
        epoch = int(when.timestamp())
        hour, day = epoch - epoch % 3600, epoch - epoch % 86400
        for gran, bucket in (("hour", hour), ("day", day)):
            batch.users.setdefault((rule_id, gran, bucket), set()).add(user)
            batch.matches[(rule_id, gran, bucket)] = batch.matches.get((rule_id, gran, bucket), 0) + 1
        for dim, value in dims.items():
            values = batch.dimensions.setdefault((rule_id, day, dim), {})
            values[value] = values.get(value, 0) + 1
    return batch


class FakeCounters(Counters):
    """Exact in-memory counters (sets instead of sketches)."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[datetime, str, dict[str, str]]]] = defaultdict(list)
        self.deleted: list[str] = []

    def add(self, rule_id: str, when: datetime, user: str, **dims: str) -> None:
        self.events[rule_id].append((when, user, dims))

    def apply(self, batch: CounterBatch, consumer: str, offsets: Mapping[tuple[str, int], int],
              start_offsets: Mapping[tuple[str, int], int] | None = None) -> bool:
        raise NotImplementedError("the API never writes counters")

    def stored_offsets(self, consumer: str) -> dict[tuple[str, int], int]:
        return {}

    def _in(self, rule_id: str, start: datetime, end: datetime) -> list[tuple[datetime, str, dict[str, str]]]:
        return [e for e in self.events.get(rule_id, []) if start <= e[0] < end]

    def unique_users(self, rule_id: str, start: datetime, end: datetime) -> int:
        return len({user for _, user, _ in self._in(rule_id, start, end)})

    def matches(self, rule_id: str, start: datetime, end: datetime) -> int:
        return len(self._in(rule_id, start, end))

    def series(self, rule_id: str, start: datetime, end: datetime, granularity: Granularity) -> list[SeriesPoint]:
        step = timedelta(hours=1) if granularity == "hour" else timedelta(days=1)
        cursor = start.replace(minute=0, second=0, microsecond=0)
        if granularity == "day":
            cursor = cursor.replace(hour=0)
        out = []
        while cursor < end:
            events = self._in(rule_id, cursor, cursor + step)
            out.append(SeriesPoint(cursor.astimezone(UTC), len({u for _, u, _ in events}), len(events)))
            cursor += step
        return out

    def breakdown(self, rule_id: str, start: datetime, end: datetime,
                  dimensions: Sequence[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {d: {} for d in dimensions}
        for _, _, dims in self._in(rule_id, start, end):
            for d in dimensions:
                if d in dims:
                    out[d][dims[d]] = out[d].get(dims[d], 0) + 1
        return out

    def delete_rule(self, rule_id: str) -> None:
        self.deleted.append(rule_id)
        self.events.pop(rule_id, None)
