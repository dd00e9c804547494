"""Rule programs: a rule's query tree compiled once, at upsert, for the C evaluator (``percolators._eval``).

The closures of ``percolators.matcher`` evaluate a rule with one Python call and one big-int
allocation per clause; at 10,000 rules that is a third of a batch's time. A *program* is the same
tree as a flat int32 array whose interior nodes are AND (``must``/``filter``), OR or at-least-k
(``should`` with ``minimum_should_match``) and AND-NOT (``must_not``), with matcher.py's clause
order, short-circuits and ``pre`` semantics, and whose leaves are ids in a :class:`LeafTable`:

* ``TERM`` leaves are a ``(field, value)`` key the C code looks up in ``batch.terms``, ``TERMS``
  leaves a tuple of such keys whose masks it ORs;
* ``MEMO`` leaves are matcher.py's shared leaf evaluators whose result does not depend on ``pre``
  (prefixes, wildcards, exists, case-insensitive terms): called once per batch with every
  document, the mask memoised by leaf id for every rule using it;
* ``GEO`` leaves are a geo_distance circle the C code computes over the batch's sorted points
  (``BatchIndex.geo_sorted``) as matcher.py's numpy evaluator does, points near the edge decided
  by the reference's scalar distance (``matcher.geo_circle_spec``);
* ``RANGE`` leaves are bisected in the batch's sorted values (``BatchIndex.field_values``) as
  ``BatchIndex.range_mask`` does, the masks in between ORed;
* ``PRE`` leaves (phrase, the per-document fallback, geo without numpy) depend on ``pre`` and are
  called with the current one, as the closures are.

Identical leaves of different rules get one id (reference counted: a leaf no rule uses any more
frees its slot). :func:`run` evaluates many rules' programs (:class:`Packed` in one buffer) over a
batch in one C call, in the order given, and returns the matching rules and their masks;
:func:`run_lists` returns the per-document lists instead (the scatter of ``percolators.scatter``,
fused: no mask ever becomes an int).

Encoding: ``LEAF id`` | ``ALL`` | ``NONE`` | ``BOOL total_len msm nreq nopt nnot <children>``.

The closures stay the reference Python path: :data:`_eval` is None when the extension is not built
and tests set it to None to force the Python path.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Sequence
from itertools import accumulate
from typing import Any

from percolators.matcher import LEAF_COSTS, geo_circle_spec, leaf_evaluator, leaf_key
from percolators.query import Bool, GeoDistance, MatchAll, MatchNone, Node, Phrase, Range, Term, Terms

try:
    from percolators import _eval  # type: ignore[attr-defined, unused-ignore]
except ImportError:  # pragma: no cover - the extension is optional; the closures are the twin
    _eval = None

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a core dependency
    np = None  # type: ignore[assignment]

OP_LEAF, OP_ALL, OP_NONE, OP_BOOL = 0, 1, 2, 3
KIND_FREE, KIND_TERM, KIND_MEMO, KIND_PRE, KIND_TERMS, KIND_GEO, KIND_RANGE = 0, 1, 2, 3, 4, 5, 6
_BOOL_HEADER = 6
_COST_BOOL = 5


def available() -> bool:
    """Whether the C evaluator can be used (built, and not switched off by a test or benchmark)."""
    return _eval is not None


class LeafTable:
    """Leaf id -> (kind, payload), shared by every program of one rule index.

    ``kinds`` (one byte per id) and ``payloads`` are what the C evaluator reads; ids of leaves no
    program uses any more are reused."""

    __slots__ = ("_free", "_ids", "_keys", "_refs", "_term_keys", "kinds", "payloads")

    def __init__(self) -> None:
        self.kinds = bytearray()
        self.payloads: list[Any] = []
        self._ids: dict[Any, int] = {}
        self._keys: list[Any] = []
        self._refs: list[int] = []
        self._free: list[int] = []
        self._term_keys: dict[tuple[str, Any], tuple[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def reuse(self, key: Any) -> int | None:
        """The id of the leaf ``key`` with one more user, or None when it is not registered."""
        leaf_id = self._ids.get(key)
        if leaf_id is not None:
            self._refs[leaf_id] += 1
        return leaf_id

    def term_key(self, name: str, value: Any) -> tuple[str, Any]:
        """One shared ``(field, value)`` tuple per term: at 100,000 rules the terms leaves hold
        ~200,000 keys of ~1,000 distinct terms."""
        key = (name, value)
        return self._term_keys.setdefault(key, key)

    def acquire(self, key: Any, kind: int, payload: Any) -> int:
        """The id of the leaf ``key`` (registered with ``kind``/``payload`` if new), one more user."""
        leaf_id = self._ids.get(key)
        if leaf_id is not None:
            self._refs[leaf_id] += 1
            return leaf_id
        if self._free:
            leaf_id = self._free.pop()
            self.kinds[leaf_id] = kind
            self.payloads[leaf_id] = payload
            self._keys[leaf_id] = key
            self._refs[leaf_id] = 1
        else:
            leaf_id = len(self.payloads)
            self.kinds.append(kind)
            self.payloads.append(payload)
            self._keys.append(key)
            self._refs.append(1)
        self._ids[key] = leaf_id
        return leaf_id

    def release(self, leaf_id: int) -> None:
        """One user less; the slot is freed (and its evaluator dropped) with the last one."""
        self._refs[leaf_id] -= 1
        if self._refs[leaf_id]:
            return
        del self._ids[self._keys[leaf_id]]
        self.kinds[leaf_id] = KIND_FREE
        self.payloads[leaf_id] = None
        self._keys[leaf_id] = None
        self._free.append(leaf_id)

    def release_program(self, program: bytes) -> None:
        for leaf_id in leaf_ids(program):
            self.release(leaf_id)


def compile_program(node: Node, table: LeafTable) -> bytes:
    """The program of a rule's query tree; its leaves are acquired in ``table``."""
    code, _cost = _emit(node, table)
    return array("i", code).tobytes()


def leaf_ids(program: bytes) -> list[int]:
    """The leaf ids a program refers to (with repeats), in order."""
    code = array("i")
    code.frombytes(program)
    out: list[int] = []
    pc, end = 0, len(code)
    while pc < end:  # children follow their bool's header: a linear scan visits every node
        op = code[pc]
        if op == OP_LEAF:
            out.append(code[pc + 1])
            pc += 2
        elif op == OP_BOOL:
            pc += _BOOL_HEADER
        else:
            pc += 1
    return out


def _emit(node: Node, table: LeafTable) -> tuple[list[int], int]:
    """(code, cost) of a node: matcher.py's ``_bool`` clause order (cheapest first)."""
    node_type = type(node)
    if node_type is Bool:
        return _emit_bool(node, table)  # type: ignore[arg-type]
    if node_type is MatchAll:
        return [OP_ALL], 0
    if node_type is MatchNone:
        return [OP_NONE], 0
    key = leaf_key(node)
    leaf_id = None if key is None else table.reuse(key)
    if leaf_id is None:  # a new leaf: only now build what evaluates it
        kind, payload = _leaf(node, table)
        leaf_id = table.acquire(("unique", object()) if key is None else key, kind, payload)
    return [OP_LEAF, leaf_id], LEAF_COSTS.get(node_type, 10)


def _leaf(node: Node, table: LeafTable) -> tuple[int, Any]:
    """(kind, payload) of a leaf (see the module docstring)."""
    if isinstance(node, Term) and not (node.case_insensitive and isinstance(node.value, str)):
        return KIND_TERM, table.term_key(node.field, node.value)
    if isinstance(node, Terms):
        return KIND_TERMS, tuple(table.term_key(node.field, value) for value in node.values)
    if isinstance(node, GeoDistance) and np is not None:
        return KIND_GEO, geo_circle_spec(node)
    evaluator, _cost, key = leaf_evaluator(node)
    if isinstance(node, Range):  # the evaluator decides when a bound's type differs from the values'
        return KIND_RANGE, (node.field, node.low, node.low_inclusive, node.high, node.high_inclusive,
                            node if node.uses_now else None, evaluator)
    if isinstance(node, Phrase) or key is None or isinstance(node, GeoDistance):
        return KIND_PRE, evaluator
    return KIND_MEMO, evaluator


def _emit_bool(node: Bool, table: LeafTable) -> tuple[list[int], int]:
    msm, should = node.minimum_should_match, node.should
    if msm > len(should):
        return [OP_NONE], 0
    required = [_ranked(child, table) for child in node.must]
    if node.filter:
        required += [_ranked(child, table) for child in node.filter]
    excluded = [_ranked(child, table) for child in node.must_not]
    optional = [_ranked(child, table) for child in should] if msm > 0 else []
    body: list[int] = []
    cost = _COST_BOOL
    for group in (required, optional, excluded):  # the order the C code reads them in
        if len(group) > 1:
            group.sort(key=_order)
        for code, child_cost, _rank in group:
            body += code
            cost += child_cost
    return [OP_BOOL, _BOOL_HEADER + len(body), msm, len(required), len(optional), len(excluded), *body], cost


def _ranked(node: Node, table: LeafTable) -> tuple[list[int], int, int]:
    code, cost = _emit(node, table)
    # matcher.py's and_terms looks boolean terms up last (the rarer-looking lookups first)
    rank = 1 if type(node) is Term and isinstance(node.value, bool) else 0
    return code, cost, rank


def _order(item: tuple[list[int], int, int]) -> tuple[int, int]:
    return item[1], item[2]


class Packed:
    """The programs of many rules, in order, in one buffer: the C loop reads them in sequence
    instead of from 100,000 objects spread over the heap."""

    __slots__ = ("code", "ids", "offsets")

    def __init__(self, ids: Sequence[str], codes: Sequence[bytes]):
        self.ids = tuple(ids)
        self.code = b"".join(codes)
        offsets = array("q", [0])
        offsets.extend(accumulate(len(code) // 4 for code in codes))
        self.offsets = offsets.tobytes()

    def __len__(self) -> int:
        return len(self.ids)


def run(
    packed: Packed, candidates: Collection[str] | None, table: LeafTable, batch: Any
) -> tuple[list[str], list[int]]:
    """Evaluate the ``packed`` programs (in their order; only ``candidates`` unless None) over
    ``batch`` (a ``percolators.batch.BatchIndex``): the matching rule ids and their document masks."""
    if _eval is None:
        raise RuntimeError("percolators._eval is not built")
    result: tuple[list[str], list[int]] = _eval.run(
        packed.ids, packed.code, packed.offsets, _as_set(candidates), table.kinds, table.payloads, batch, batch.size
    )
    return result


def run_lists(packed: Packed, candidates: Collection[str] | None, table: LeafTable, batch: Any) -> list[list[str]]:
    """Like :func:`run`, but per document of the batch the ids of the rules it matches (in the
    packed order): evaluation and scatter in one C call, no mask ever an int."""
    if _eval is None:
        raise RuntimeError("percolators._eval is not built")
    lists: list[list[str]] = _eval.run(
        packed.ids, packed.code, packed.offsets, _as_set(candidates), table.kinds, table.payloads, batch, batch.size,
        True,
    )
    return lists


def _as_set(candidates: Collection[str] | None) -> set[str] | frozenset[str] | None:
    if candidates is None or isinstance(candidates, set | frozenset):
        return candidates
    return set(candidates)
