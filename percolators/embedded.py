"""The embedded percolator: an in-process engine designed like Lucene Monitor, batched.

* ``percolators.dsl`` parses and validates a rule against the mapping;
* ``percolators.rule_index`` stores it with its compiled evaluator (``percolators.matcher``) and
  its anchor in the presearcher (``percolators.presearcher``);
* :meth:`EmbeddedPercolator.percolate` indexes a batch of documents straight into the postings of
  a bitmask index (``percolators.fast_index.FastIndexer.index_batch``, ``percolators.batch``),
  selects the candidate rules from the batch's keys, evaluates each candidate once for the whole
  batch and turns the per-rule masks into per-document lists. With the C evaluator
  (``percolators.programs``, ``accel``) both happen in one C call over the rules' compiled
  programs; without it, each rule's closures (``percolators.matcher``) give its mask and
  ``percolators.scatter`` transposes the masks;
* :meth:`EmbeddedPercolator.percolate_masks` stops before that last step: per-rule document masks
  for consumers that aggregate per rule (counts are ``mask.bit_count()``).

``presearcher="match_all"`` is the reference engine: every rule is checked against every document
with the per-document reference matcher (``percolators.reference``). It is slow on purpose and is
what the equivalence tests and the benchmark compare against.
"""

from __future__ import annotations

import gc
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from percolators import programs
from percolators.batch import BatchIndex
from percolators.document import IndexedDoc
from percolators.errors import InvalidDocumentError, InvalidRuleError
from percolators.fast_index import BatchBuild, FastIndexer
from percolators.mapping import Mapping as DocMapping
from percolators.port import Explanation, Percolator, Rule, RuleReport
from percolators.rule_index import RuleIndex, StoredRule
from percolators.scatter import scatter as scatter_lists
from percolators.scatter import scatter_python
from rules_service.schema import USER_MAPPING

#: With the C evaluator, batches of at least this many documents skip candidate selection and
#: evaluate every rule: a rule whose anchor the batch lacks costs the C loop well under a
#: microsecond, and at 16 documents already about half the rules of the audience workload are
#: candidates, so selecting them costs more than it saves (measured at 10,000 and 100,000 rules;
#: the matcher is exact either way, so results cannot change).
PRESEARCH_BELOW = 16

#: Documents percolated together in one batch index (bigger batches amortise per-rule work; the
#: masks grow linearly, so beyond a few thousand the gain flattens).
DEFAULT_MAX_BATCH = 8192


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
        accel: bool | None = None,
    ) -> None:
        """``accel``: None evaluates with the C evaluator when it is built (``percolators._eval``),
        False always with the Python closures (the reference twin; also what tests compare)."""
        self.mapping = DocMapping.from_json(mapping)
        self.field_types = {path: spec.type for path, spec in self.mapping.fields.items()}
        self._geo_fields = frozenset(p for p, t in self.field_types.items() if t == "geo_point")
        self.index = RuleIndex(self.field_types, presearcher)
        self._indexer = FastIndexer(self.mapping)
        self.reference = presearcher == "match_all"
        self.max_batch = max(1, max_batch)
        self.accel = accel

    def _accelerated(self) -> bool:
        return self.accel is not False and programs.available()

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
        if self.reference:
            return self._percolate_reference(documents, rule_ids, now_ms, on_error)
        out: list[list[str] | Exception] = [[] for _ in documents]
        restrict = None if rule_ids is None else {r for r in rule_ids if r in self.index.rules}
        idle = not self.index.rules or (restrict is not None and not restrict)
        fields, index_batch, step = self.index.fields, self._indexer.index_batch, self.max_batch
        for start in range(0, len(documents), step):
            # documents are indexed straight into the batch postings (errors: see index_batch)
            build = index_batch(documents[start : start + step], fields, self._geo_fields, on_error)
            for slot, exc in build.errors.items():
                out[start + slot] = exc
            if idle or not build.docs:
                continue
            if self._accelerated():  # evaluation and scatter in one C call
                lists = self._evaluate_batch_lists(build.docs, restrict, now_ms, build)
            else:
                matched, masks = self._evaluate_batch(build.docs, restrict, now_ms, build)
                lists = scatter_lists(matched, masks, len(build.docs))
            for slot, ids in zip(build.slots, lists, strict=True):
                out[start + slot] = ids
        return out

    def _batch_and_candidates(
        self, docs: list[Any], restrict: set[str] | None, now_ms: int, build: BatchBuild | None
    ) -> tuple[BatchIndex, Collection[str] | None]:
        """The batch index of ``docs`` and the rules to evaluate (None: every rule)."""
        index = self.index
        if build is None:
            batch = BatchIndex(docs, now_ms, index.fields, self._geo_fields)
        else:
            batch = BatchIndex(docs, now_ms, index.fields, self._geo_fields, postings=build.postings, geo=build.geo)
        if restrict is not None and len(restrict) <= 64:
            candidates: Collection[str] | None = restrict
        elif batch.size >= PRESEARCH_BELOW and self._accelerated():
            candidates = restrict  # see PRESEARCH_BELOW
        else:
            candidates = index.presearcher.candidates(batch, index.rules)
            if restrict is not None:
                candidates = candidates & restrict
        return batch, candidates

    def _evaluate_batch_lists(
        self, docs: list[Any], restrict: set[str] | None, now_ms: int, build: BatchBuild | None = None
    ) -> list[list[str]]:
        """Per document of ``docs``, the sorted ids of the rules it matches (C evaluator only)."""
        batch, candidates = self._batch_and_candidates(docs, restrict, now_ms, build)
        packed, keep_ids = self._programs_of(candidates)
        return programs.run_lists(packed, keep_ids, self.index.leaves, batch)

    def _evaluate_batch(
        self, docs: list[Any], restrict: set[str] | None, now_ms: int, build: BatchBuild | None = None
    ) -> tuple[list[str], list[int]]:
        """The rules (sorted ids) matching at least one of ``docs`` and their document masks
        (``build``: the batch postings of ``docs`` when already collected)."""
        index = self.index
        batch, selection = self._batch_and_candidates(docs, restrict, now_ms, build)
        if self._accelerated():
            packed, keep_ids = self._programs_of(selection)
            return programs.run(packed, keep_ids, index.leaves, batch)
        candidates = index.rules.keys() if selection is None else selection
        full = batch.all
        matched: list[str] = []
        masks: list[int] = []
        # in rule id order, so that each document's list comes out sorted
        if len(candidates) * 4 >= len(index.rules):  # most rules: filter the cached sorted list
            ids, evaluators = index.sorted_evaluators()
            if len(candidates) == len(ids):
                selected: Iterable[tuple[str, Any]] = zip(ids, evaluators, strict=True)
            else:
                keep = candidates.__contains__
                selected = ((rule_id, f) for rule_id, f in zip(ids, evaluators, strict=True) if keep(rule_id))
        else:
            selected = ((rule_id, index.evaluator(rule_id)) for rule_id in sorted(candidates))
        for rule_id, evaluate in selected:
            mask = evaluate(batch, full) & full
            if mask:
                matched.append(rule_id)
                masks.append(mask)
        return matched, masks

    def _programs_of(self, candidates: Collection[str] | None) -> tuple[programs.Packed, set[str] | None]:
        """The programs to run (in rule id order) for the candidates (None: every rule), and the
        ids to keep among them (None: all)."""
        index = self.index
        if candidates is None:
            return index.sorted_programs(), None
        if len(candidates) * 4 >= len(index.rules):  # most rules: the cached packed programs, filtered in C
            packed = index.sorted_programs()
            return packed, None if len(candidates) == len(packed) else set(candidates)
        ids = sorted(candidates)
        return programs.Packed(ids, [index.program(rule_id) for rule_id in ids]), None

    # ----- percolation to masks -------------------------------------------------------------
    def percolate_masks(
        self,
        documents: Sequence[Mapping[str, Any]],
        *,
        rule_ids: Collection[str] | None = None,
        now: datetime | None = None,
    ) -> BatchMatches:
        """Like :meth:`percolate` with ``on_error="skip"``, but without building per-document
        lists: for each rule matching at least one document, a Python int whose bit ``i`` is set
        when ``documents[i]`` matches it. For consumers that aggregate per rule (counting matches
        is ``mask.bit_count()``), this skips the per-document output work entirely."""
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._percolate_masks(documents, rule_ids, now_millis(now))
        finally:
            if gc_was_enabled:
                gc.enable()

    def _percolate_masks(
        self, documents: Sequence[Mapping[str, Any]], rule_ids: Collection[str] | None, now_ms: int
    ) -> BatchMatches:
        size = len(documents)
        if self.reference:
            return BatchMatches.from_lists(self._percolate(documents, rule_ids, now_ms, "skip"))
        errors: dict[int, Exception] = {}
        restrict = None if rule_ids is None else {r for r in rule_ids if r in self.index.rules}
        idle = not self.index.rules or (restrict is not None and not restrict)
        parts: list[tuple[int, list[str], list[int]]] = []
        fields, index_batch, step = self.index.fields, self._indexer.index_batch, self.max_batch
        for start in range(0, size, step):
            chunk = documents[start : start + step]
            build = index_batch(chunk, fields, self._geo_fields, "skip")
            for slot, exc in build.errors.items():
                errors[start + slot] = exc
            if idle or not build.docs:
                continue
            if not build.errors:
                matched, masks = self._evaluate_batch(build.docs, restrict, now_ms, build)
            else:  # keep input positions: a stand-in at each error, its bits cleared afterwards
                docs: list[Any] = [_NO_DOCUMENT] * len(chunk)
                valid = 0
                for doc, slot in zip(build.docs, build.slots, strict=True):
                    docs[slot] = doc
                    valid |= 1 << slot
                matched, masks = [], []
                for rule_id, mask in zip(*self._evaluate_batch(docs, restrict, now_ms), strict=True):
                    if mask & valid:
                        matched.append(rule_id)
                        masks.append(mask & valid)
            parts.append((start, matched, masks))
        if not parts:
            return BatchMatches(size, [], [], errors)
        if len(parts) == 1:
            return BatchMatches(size, parts[0][1], parts[0][2], errors)
        merged: dict[str, int] = {}
        for start, part_ids, part_masks in parts:
            for rule_id, mask in zip(part_ids, part_masks, strict=True):
                merged[rule_id] = merged.get(rule_id, 0) | (mask << start)
        ordered = sorted(merged)
        return BatchMatches(size, ordered, [merged[rule_id] for rule_id in ordered], errors)

    def _percolate_reference(
        self, documents: Sequence[Mapping[str, Any]], rule_ids: Collection[str] | None, now_ms: int, on_error: str
    ) -> list[list[str] | Exception]:
        from percolators.reference import matches

        out: list[list[str] | Exception] = [[] for _ in documents]
        indexed: list[tuple[int, Any]] = []
        index_document = self._indexer.index
        for slot, document in enumerate(documents):
            try:
                if not isinstance(document, Mapping):
                    raise InvalidDocumentError("", f"a document must be a JSON object, not {type(document).__name__}")
                indexed.append((slot, index_document(document)))
            except InvalidDocumentError as exc:
                if on_error == "raise":
                    raise
                out[slot] = exc
        rules = sorted(
            (rule_id, stored.parsed.query)
            for rule_id, stored in self.index.rules.items()
            if rule_ids is None or rule_id in rule_ids
        )
        for slot, doc in indexed:
            out[slot] = [rule_id for rule_id, node in rules if matches(node, doc, now_ms)]
        return out

    # ----- explain --------------------------------------------------------------------------
    def explain(
        self, query: Mapping[str, Any], document: Mapping[str, Any], *, now: datetime | None = None
    ) -> Explanation:
        from percolators.dsl import parse_rule
        from percolators.explain import explain

        parsed = parse_rule("explain", query, self.mapping)
        return explain(parsed, document, self.mapping, now_millis(now))


#: Stands in for a document that could not be indexed (percolate_masks keeps positions).
_NO_DOCUMENT = IndexedDoc({}, {}, frozenset())


@dataclass(frozen=True)
class BatchMatches:
    """What :meth:`EmbeddedPercolator.percolate_masks` returns.

    * ``size``: how many documents were given;
    * ``rule_ids``: the ids (sorted) of the rules matching at least one document;
    * ``masks``: for each of ``rule_ids``, bit ``i`` set when document ``i`` matches it;
    * ``errors``: document position -> the error of a document that could not be indexed (its
      bit is clear in every mask).
    """

    size: int
    rule_ids: list[str]
    masks: list[int]
    errors: dict[int, Exception]

    def counts(self) -> dict[str, int]:
        """Rule id -> number of matching documents."""
        return {rule_id: mask.bit_count() for rule_id, mask in zip(self.rule_ids, self.masks, strict=True)}

    def to_lists(self) -> list[list[str] | Exception]:
        """The same as ``percolate(..., on_error="skip")`` would return."""
        out: list[list[str] | Exception] = list(scatter_lists(self.rule_ids, self.masks, self.size))
        for slot, exc in self.errors.items():
            out[slot] = exc
        return out

    @classmethod
    def from_lists(cls, results: Sequence[list[str] | Exception]) -> BatchMatches:
        errors: dict[int, Exception] = {}
        masks: dict[str, int] = {}
        for slot, result in enumerate(results):
            if isinstance(result, Exception):
                errors[slot] = result
                continue
            for rule_id in result:
                masks[rule_id] = masks.get(rule_id, 0) | (1 << slot)
        ordered = sorted(masks)
        return cls(len(results), ordered, [masks[r] for r in ordered], errors)


def scatter(matched: list[str], masks: list[int], lists: list[list[str]]) -> None:
    """For each rule (in order), append its id to the lists of the documents in its mask (the
    pure-Python scatter, in place; ``percolators.scatter`` has the numpy one)."""
    scatter_python(matched, masks, lists)
