"""The parsed form of a rule: a small tree of query nodes, shared by every matcher.

``percolators.dsl.parse_rule`` turns an Elasticsearch query DSL object into this tree, validating it
against a mapping and normalising every value to its *indexed form*, so that matchers never see
the DSL's many spellings:

* keyword -> ``str`` (lowercased when ``case_insensitive``), text -> analysed tokens (``str``),
* integer/long/short/byte -> ``int``, float/double -> ``float``, boolean -> ``bool``,
* date -> ``int`` epoch milliseconds, geo_point -> ``(lat, lon)`` floats.

Sugar is removed at parse time: ``match`` becomes ``Term``/``Bool`` over analysed tokens,
``constant_score`` becomes its filter, ``terms`` with one value becomes ``Term``.

Every node carries ``path``: the clause path in the original rule (``bool.must[0].term``), which
errors and ``explain`` report.

Date math that depends on *now* (``now-30d/d``) stays unresolved in :class:`DateMath` and is
resolved per percolation with :meth:`Range.resolve`, because a rule lives longer than a day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

Scalar: TypeAlias = str | int | float | bool


@dataclass(frozen=True, slots=True)
class DateMath:
    """``now`` followed by operations, e.g. ``now-30d/d``; ``rounding`` is the ``/unit`` (or None).

    ``ops`` are (sign, amount, unit) with unit in y M w d h H m s. Resolution follows
    Elasticsearch: rounding goes down for gte/lt bounds and up (to the last millisecond of the unit)
    for gt/lte bounds. See ``percolators.datemath``.
    """

    ops: tuple[tuple[str, int, str], ...]
    rounding: str | None
    text: str
    # Additive (issue 2): ops may also hold rounding steps ("/", 1, unit) in the order written
    # (``now/d+8h``); ``rounding`` is the final rounding unit. ``time_zone`` (the range query's
    # ``time_zone``) applies to rounding and calendar arithmetic.
    time_zone: str | None = None


Bound: TypeAlias = Scalar | DateMath


@dataclass(frozen=True, slots=True)
class MatchAll:
    path: str = ""


@dataclass(frozen=True, slots=True)
class MatchNone:
    path: str = ""


@dataclass(frozen=True, slots=True)
class Term:
    """The field has this exact indexed value (any element of an array)."""

    field: str
    value: Scalar
    case_insensitive: bool = False  # keyword only; value is then lowercased, compare lowercased
    path: str = ""


@dataclass(frozen=True, slots=True)
class Terms:
    """The field has any of these indexed values."""

    field: str
    values: frozenset[Scalar]
    path: str = ""


@dataclass(frozen=True, slots=True)
class ResolvedRange:
    """A range with concrete bounds; ``None`` means unbounded on that side."""

    low: Scalar | None
    low_inclusive: bool
    high: Scalar | None
    high_inclusive: bool

    def contains(self, value: Scalar) -> bool:
        low, high = self.low, self.high
        if low is not None and (value < low if self.low_inclusive else value <= low):  # type: ignore[operator]
            return False
        return not (high is not None and (value > high if self.high_inclusive else value >= high))  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class Range:
    """gt/gte/lt/lte on a number, keyword or date field. Bounds are already in indexed form
    (integer fields: rounded inward and made inclusive), except date math on ``now``."""

    field: str
    low: Bound | None
    low_inclusive: bool
    high: Bound | None
    high_inclusive: bool
    path: str = ""

    @property
    def uses_now(self) -> bool:
        return isinstance(self.low, DateMath) or isinstance(self.high, DateMath)

    def resolve(self, now_ms: int) -> ResolvedRange:
        """Concrete bounds at ``now_ms`` (epoch millis). Implemented in ``percolators.datemath``."""
        from percolators.datemath import resolve_range

        return resolve_range(self, now_ms)


@dataclass(frozen=True, slots=True)
class Exists:
    """The field (or, for an object, any of its leaf fields in ``leaves``) has a non-null value."""

    field: str
    leaves: tuple[str, ...]
    path: str = ""


@dataclass(frozen=True, slots=True)
class Prefix:
    field: str
    prefix: str
    case_insensitive: bool = False
    path: str = ""


@dataclass(frozen=True, slots=True)
class Wildcard:
    """``*`` any run, ``?`` one character, ``\\`` escapes. ``regex`` is the compiled full-match form."""

    field: str
    pattern: str
    regex: re.Pattern[str]
    case_insensitive: bool = False
    path: str = ""

    @property
    def literal_prefix(self) -> str:
        """The characters before the first wildcard: what candidate selection can use."""
        out = []
        escaped = False
        for ch in self.pattern:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch in "*?":
                break
            else:
                out.append(ch)
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Phrase:
    """The analysed ``tokens`` appear consecutively (``slop`` 0) within one value of a text field.
    On keyword/numeric fields ``match_phrase`` parses to ``Term`` instead."""

    field: str
    tokens: tuple[str, ...]
    slop: int = 0
    path: str = ""


@dataclass(frozen=True, slots=True)
class GeoDistance:
    """The geo_point field has a point within ``distance_m`` metres of (lat, lon).

    ``distance_type`` is ``arc`` (haversine on a sphere of radius 6,371,008.7714 m, as
    Elasticsearch) or ``plane``.
    """

    field: str
    lat: float
    lon: float
    distance_m: float
    distance_type: Literal["arc", "plane"] = "arc"
    path: str = ""


@dataclass(frozen=True, slots=True)
class Bool:
    """Elasticsearch ``bool``. ``minimum_should_match`` is already resolved to a count:
    1 when there are should clauses and no must/filter and none was given, else 0 if not given;
    a count above ``len(should)`` means the bool matches nothing."""

    must: tuple[Node, ...] = ()
    filter: tuple[Node, ...] = ()
    should: tuple[Node, ...] = ()
    must_not: tuple[Node, ...] = ()
    minimum_should_match: int = 0
    path: str = ""


Node: TypeAlias = MatchAll | MatchNone | Term | Terms | Range | Exists | Prefix | Wildcard | Phrase | GeoDistance | Bool


@dataclass(frozen=True, slots=True)
class ParsedRule:
    """A validated rule ready for matching.

    ``warnings`` report costs, e.g. a rule that candidate selection cannot narrow (leading
    wildcard only, must_not only, match_all): it is accepted but checked against every document.
    """

    id: str
    query: Node
    source: dict  # the original DSL object, as given
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
