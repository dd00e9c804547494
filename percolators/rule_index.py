"""The rule index: stored rules by id, each with its parsed tree, compiled program and anchor.

A rule is evaluated either by the C evaluator, from its program (``percolators.programs``), or by
the Python closures of ``percolators.matcher``, the twin. Only the one in use is compiled: the
program when the rule is stored if the C evaluator is available, the closures (or a missing
program) on first use. Compiling both for every rule would cost 100,000-rule loads a third more
time and memory.

Adding, replacing and removing a rule touch only that rule's postings (no rebuild). The index also
keeps a reference count of the fields rules mention, so a batch indexes only those fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from percolators import programs
from percolators.matcher import Evaluator, compile_node
from percolators.presearcher import IndexedPresearcher, MatchAllPresearcher
from percolators.programs import LeafTable, Packed, compile_program
from percolators.query import (
    Bool,
    Exists,
    GeoDistance,
    Node,
    ParsedRule,
    Phrase,
    Prefix,
    Range,
    Term,
    Terms,
    Wildcard,
)


@dataclass(frozen=True, slots=True)
class StoredRule:
    parsed: ParsedRule
    fields: frozenset[str]
    warnings: tuple[str, ...]
    #: the rule for the C evaluator (``percolators.programs``), compiled when stored (b"": not yet,
    #: see :meth:`RuleIndex.program`); its leaf ids belong to the index's leaf table
    program: bytes = b""


def fields_of(node: Node) -> set[str]:
    """Every leaf field a query tree reads."""
    out: set[str] = set()
    stack: list[Node] = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, Bool):
            stack.extend((*current.must, *current.filter, *current.should, *current.must_not))
        elif isinstance(current, Exists):
            out.update(current.leaves or (current.field,))
        elif isinstance(current, Term | Terms | Range | Prefix | Wildcard | Phrase | GeoDistance):
            out.add(current.field)
    return out


class RuleIndex:
    def __init__(self, field_types: Mapping[str, str], presearcher: str = "indexed"):
        if presearcher == "indexed":
            self.presearcher: IndexedPresearcher | MatchAllPresearcher = IndexedPresearcher(field_types)
        elif presearcher == "match_all":
            self.presearcher = MatchAllPresearcher()
        else:
            raise ValueError(f"unknown presearcher {presearcher!r} (expected 'indexed' or 'match_all')")
        self.field_types = dict(field_types)
        self.rules: dict[str, StoredRule] = {}
        self._field_refs: dict[str, int] = {}
        self._fields: frozenset[str] | None = frozenset()
        self._field_sets: dict[frozenset[str], frozenset[str]] = {}
        self._sorted: tuple[list[str], list[Any]] | None = None
        self._sorted_programs: Packed | None = None
        self._evaluators: dict[str, Evaluator] = {}
        self.leaves = LeafTable()

    def evaluator(self, rule_id: str) -> Evaluator:
        """The rule's Python closures (``percolators.matcher``), compiled on first use."""
        got = self._evaluators.get(rule_id)
        if got is None:
            got = self._evaluators[rule_id] = compile_node(self.rules[rule_id].parsed.query)
        return got

    def program(self, rule_id: str) -> bytes:
        """The rule's program for the C evaluator (compiled now if it was stored without one)."""
        stored = self.rules[rule_id]
        if not stored.program:
            stored = self.rules[rule_id] = replace(stored, program=compile_program(stored.parsed.query, self.leaves))
        return stored.program

    def sorted_evaluators(self) -> tuple[list[str], list[Any]]:
        """Every stored rule id, sorted, and its evaluator (cached until the rules change)."""
        if self._sorted is None:
            ids = sorted(self.rules)
            self._sorted = (ids, [self.evaluator(rule_id) for rule_id in ids])
        return self._sorted

    def sorted_programs(self) -> Packed:
        """Every stored rule's program, by sorted rule id (cached until the rules change)."""
        if self._sorted_programs is None:
            ids = sorted(self.rules)
            self._sorted_programs = Packed(ids, [self.program(rule_id) for rule_id in ids])
        return self._sorted_programs

    def __len__(self) -> int:
        return len(self.rules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self.rules

    def __iter__(self) -> Iterator[str]:
        return iter(self.rules)

    def prepare(self, parsed: ParsedRule) -> StoredRule:
        """Prepare a parsed rule (no side effect): done before storing so a batch upsert is atomic.

        The stored copy drops the DSL source (a third of a rule's memory; nothing reads it back)
        and shares equal field sets between rules."""
        fields = frozenset(fields_of(parsed.query))
        fields = self._field_sets.setdefault(fields, fields)
        slim = replace(parsed, source={}) if parsed.source else parsed
        return StoredRule(slim, fields, parsed.warnings)

    def put(self, stored: StoredRule) -> tuple[str, ...]:
        """Store (or replace) a compiled rule; returns its warnings (parser's and presearcher's)."""
        rule_id = stored.parsed.id
        self.remove(rule_id)
        extra = self.presearcher.add(rule_id, stored.parsed.query)
        # the parser already explains rules that cannot be narrowed; ours only adds what it missed
        warnings = stored.warnings or extra
        program = compile_program(stored.parsed.query, self.leaves) if programs.available() else b""
        stored = StoredRule(stored.parsed, stored.fields, warnings, program)
        self.rules[rule_id] = stored
        self._sorted = self._sorted_programs = None
        for name in stored.fields:
            self._field_refs[name] = self._field_refs.get(name, 0) + 1
        self._fields = None
        return warnings

    def remove(self, rule_id: str) -> None:
        stored = self.rules.pop(rule_id, None)
        if stored is None:
            return
        self.presearcher.remove(rule_id)
        self.leaves.release_program(stored.program)
        self._evaluators.pop(rule_id, None)
        self._sorted = self._sorted_programs = None
        for name in stored.fields:
            left = self._field_refs[name] - 1
            if left:
                self._field_refs[name] = left
            else:
                del self._field_refs[name]
        self._fields = None

    def remove_many(self, rule_ids: Iterable[str]) -> None:
        for rule_id in rule_ids:
            self.remove(rule_id)

    @property
    def fields(self) -> frozenset[str]:
        """The fields at least one stored rule reads."""
        if self._fields is None:
            self._fields = frozenset(self._field_refs)
        return self._fields
