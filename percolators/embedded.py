"""The embedded percolator: an in-process engine designed like Lucene Monitor, batched.

* ``percolators.dsl`` parses and validates a rule against the mapping;
* ``percolators.rule_index`` stores it with its compiled evaluator (``percolators.matcher``) and
  its anchor in the presearcher (``percolators.presearcher``);
* :meth:`EmbeddedPercolator.percolate` indexes a batch of documents into a bitmask index
  (``percolators.batch``), selects the candidate rules from the batch's keys and evaluates each
  candidate once for the whole batch.

``presearcher="match_all"`` is the reference engine: every rule is checked against every document
with the per-document reference matcher (``percolators.reference``). It is slow on purpose and is
what the equivalence tests and the benchmark compare against.
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from itertools import compress, repeat
from typing import Any

from percolators.batch import BatchIndex
from percolators.errors import InvalidDocumentError, InvalidRuleError
from percolators.fast_index import FastIndexer
from percolators.mapping import Mapping as DocMapping
from percolators.port import Explanation, Percolator, Rule, RuleReport
from percolators.rule_index import RuleIndex, StoredRule
from rules_service.schema import USER_MAPPING

#: Documents percolated together in one batch index (bigger batches amortise per-rule work; the
#: masks grow linearly, so beyond a few thousand the gain flattens).
DEFAULT_MAX_BATCH = 8192


#: Above this many matching documents a rule's matches are scattered with C-level iterators.
DENSE_SCATTER = 96

_BITS_OF_BYTE = [bytes((byte >> bit) & 1 for bit in range(8)) for byte in range(256)]
_append = list.append
_drain: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend


def now_millis(now: datetime | None) -> int:
    """Epoch milliseconds of ``now`` (naive datetimes are UTC); the current time when None."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return int(now.timestamp() * 1000)


class EmbeddedPercolator(Percolator):
    def __init__(
        self,
        mapping: Mapping[str, Any] = USER_MAPPING,
        presearcher: str = "indexed",
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.mapping = DocMapping.from_json(mapping)
        self.field_types = {path: spec.type for path, spec in self.mapping.fields.items()}
        self._geo_fields = frozenset(p for p, t in self.field_types.items() if t == "geo_point")
        self.index = RuleIndex(self.field_types, presearcher)
        self._indexer = FastIndexer(self.mapping)
        self.reference = presearcher == "match_all"
        self.max_batch = max(1, max_batch)

    # ----- rules ----------------------------------------------------------------------------
    def _parse(self, rule: Rule) -> Any:
        from percolators.dsl import parse_rule

        if not isinstance(rule.id, str) or not rule.id:
            raise InvalidRuleError(str(rule.id), "", "rule id must be a non-empty string")
        return parse_rule(rule.id, rule.query, self.mapping, metadata=dict(rule.metadata))

    def validate(self, rule: Rule) -> RuleReport:
        parsed = self._parse(rule)
        warnings = tuple(parsed.warnings)
        if not self.reference:
            from percolators.presearcher import IndexedPresearcher

            probe = IndexedPresearcher(self.field_types)
            warnings = warnings or probe.add(rule.id, parsed.query)
        return RuleReport(rule.id, warnings)

    def upsert(self, rules: Iterable[Rule]) -> list[RuleReport]:
        # Loading allocates millions of long-lived objects: with the cyclic GC running, each full
        # collection walks everything loaded so far and a bulk load turns quadratic.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            prepared: list[StoredRule] = []
            for rule in rules:  # validate and compile everything before storing anything
                prepared.append(self.index.prepare(self._parse(rule)))
            return [RuleReport(stored.parsed.id, self.index.put(stored)) for stored in prepared]
        finally:
            if gc_was_enabled:
                gc.enable()

    def delete(self, rule_ids: Iterable[str]) -> None:
        self.index.remove_many(list(rule_ids))

    def rule_ids(self) -> set[str]:
        return set(self.index.rules)

    def rule_report(self, rule_id: str) -> RuleReport:
        return RuleReport(rule_id, self.index.rules[rule_id].warnings)

    # ----- percolation ----------------------------------------------------------------------
    def percolate(
        self,
        documents: Sequence[Mapping[str, Any]],
        *,
        rule_ids: Collection[str] | None = None,
        now: datetime | None = None,
        on_error: str = "raise",
    ) -> list[list[str] | Exception]:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        # A batch allocates many short-lived objects and no cycles: the cyclic GC would only spend
        # time traversing the (large, long-lived) rule index. Paused for the call, then restored.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._percolate(documents, rule_ids, now_millis(now), on_error)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _percolate(
        self, documents: Sequence[Mapping[str, Any]], rule_ids: Collection[str] | None, now_ms: int, on_error: str
    ) -> list[list[str] | Exception]:
        out: list[list[str] | Exception] = [[] for _ in documents]
        valid: list[int] = []
        indexed: list[Any] = []
        index_document = self._indexer.index
        for slot, document in enumerate(documents):
            try:
                if not isinstance(document, Mapping):
                    raise InvalidDocumentError("", f"a document must be a JSON object, not {type(document).__name__}")
                indexed.append(index_document(document))
            except InvalidDocumentError as exc:
                if on_error == "raise":
                    raise
                out[slot] = exc
                continue
            valid.append(slot)
        if not indexed or not self.index.rules:
            return out
        restrict = None if rule_ids is None else {r for r in rule_ids if r in self.index.rules}
        if restrict is not None and not restrict:
            return out
        if self.reference:
            self._percolate_reference(indexed, valid, out, restrict, now_ms)
            return out
        step = self.max_batch
        for start in range(0, len(indexed), step):
            self._percolate_batch(indexed[start : start + step], valid[start : start + step], out, restrict, now_ms)
        return out

    def _percolate_batch(
        self, docs: list[Any], slots: list[int], out: list[Any], restrict: set[str] | None, now_ms: int
    ) -> None:
        index = self.index
        batch = BatchIndex(docs, now_ms, index.fields, self._geo_fields)
        if restrict is not None and len(restrict) <= 64:
            candidates: Collection[str] = restrict
        else:
            candidates = index.presearcher.candidates(batch, index.rules)
            if restrict is not None:
                candidates = candidates & restrict
        rules = index.rules
        full = batch.all
        matched: list[str] = []
        masks: list[int] = []
        for rule_id in sorted(candidates):  # sorted: each document's list comes out sorted
            mask = rules[rule_id].evaluate(batch, full) & full
            if mask:
                matched.append(rule_id)
                masks.append(mask)
        scatter(matched, masks, [out[slot] for slot in slots])

    def _percolate_reference(
        self, docs: list[Any], slots: list[int], out: list[Any], restrict: set[str] | None, now_ms: int
    ) -> None:
        from percolators.reference import matches

        rules = sorted(
            (rule_id, stored.parsed.query)
            for rule_id, stored in self.index.rules.items()
            if restrict is None or rule_id in restrict
        )
        for slot, doc in zip(slots, docs, strict=True):
            out[slot] = [rule_id for rule_id, node in rules if matches(node, doc, now_ms)]

    # ----- explain --------------------------------------------------------------------------
    def explain(
        self, query: Mapping[str, Any], document: Mapping[str, Any], *, now: datetime | None = None
    ) -> Explanation:
        from percolators.dsl import parse_rule
        from percolators.explain import explain

        parsed = parse_rule("explain", query, self.mapping)
        return explain(parsed, document, self.mapping, now_millis(now))


def scatter(matched: list[str], masks: list[int], lists: list[list[str]]) -> None:
    """For each rule (in order), append its id to the lists of the documents in its mask.

    (Transposing the rules x documents matrix instead was tried: the strided column reads it
    needs are much slower than these appends.)"""
    appenders = [target.append for target in lists]
    selector_bytes = (len(lists) + 7) // 8
    for rule_id, mask in zip(matched, masks, strict=True):
        if mask & (mask - 1) == 0:  # one document
            appenders[mask.bit_length() - 1](rule_id)
        elif mask.bit_count() > DENSE_SCATTER:
            # many documents: one byte per document selects their lists, all in C
            selectors = b"".join(map(_BITS_OF_BYTE.__getitem__, mask.to_bytes(selector_bytes, "little")))
            _drain(map(_append, compress(lists, selectors), repeat(rule_id)))
        else:
            text = bin(mask)  # bit 0 is the last character: string index i is bit (top - i)
            top = len(text) - 1
            find = text.find
            i = find("1", 2)
            while i >= 0:
                appenders[top - i](rule_id)
                i = find("1", i + 1)

