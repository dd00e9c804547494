"""Parse an Elasticsearch query DSL object into the ``percolators.query`` node tree.

``parse_rule`` validates the rule against the mapping the way an Elasticsearch percolator field
does when the rule is indexed (``allow_unmapped_fields: false``), and normalises every value to
its indexed form. Behaviours mirrored from Elasticsearch 8 (sources in comments):

* ``term`` on integer fields: a value with a decimal part or outside the field type's range
  matches nothing (``NumberFieldMapper.NumberType.termQuery``); ``terms`` drops decimal values.
  A string that is not a number is an invalid rule. Range bounds round *inward* (``gte: 25.5`` is
  ``>= 26``, ``lt: 35.5`` is ``<= 35``) per ``NumberType.INTEGER.rangeQuery``.
* ``term``/``match`` on a date field is a range from the value rounded down to the value rounded
  up (``DateFieldType.termQuery``), so ``"2026-01-01"`` matches the whole day.
* ``term`` on a text field is *not* analysed: it compares with the analysed tokens.
* ``bool``: ``minimum_should_match`` per ``Queries.calculateMinShouldMatch``; without it, should
  clauses are required (at least one) only when there is no must/filter; an empty bool matches
  everything, a must_not-only bool matches everything else (``adjust_pure_negative``).
* An unbounded ``range`` is an ``exists`` on that field.
* ``geo_distance`` always uses the arc (haversine) test: since 6.x Elasticsearch builds
  ``LatLonPoint.newDistanceQuery`` whatever ``distance_type`` says (it only affects sorting and
  aggregations), so ``distance_type: plane`` is accepted and parsed to ``arc``.

Every error is collected with its clause path (``bool.must[1].term.age2``) and raised together as
one :class:`~percolators.errors.InvalidRuleError`.
"""

from __future__ import annotations

import fnmatch
import math
import re
import struct
from collections.abc import Mapping as AbcMapping
from typing import Any

from percolators.analysis import analyze, ascii_lower
from percolators.datemath import (
    bound_millis,
    date_text,
    make_date_math,
    parse_time_zone,
    validate_format,
)
from percolators.document import coerce_boolean, coerce_float, coerce_integer, keyword_text
from percolators.errors import InvalidRuleError
from percolators.geo import GeoError, normalize_point, parse_distance, parse_point
from percolators.mapping import FLOAT_TYPES, INTEGER_TYPES, FieldSpec, Mapping
from percolators.query import (
    Bool,
    DateMath,
    Exists,
    GeoDistance,
    MatchAll,
    MatchNone,
    Node,
    ParsedRule,
    Phrase,
    Prefix,
    Range,
    Scalar,
    Term,
    Terms,
    Wildcard,
)

SUPPORTED_QUERIES = (
    "bool",
    "constant_score",
    "exists",
    "geo_distance",
    "match",
    "match_all",
    "match_none",
    "match_phrase",
    "prefix",
    "range",
    "term",
    "terms",
    "wildcard",
)
_SCRIPT_QUERIES = frozenset({"script", "script_score", "function_score"})
_COMMON = frozenset({"boost", "_name"})
MAX_PHRASE_SLOP = 100  # position_increment_gap: a larger slop could span array values


class _Invalid(Exception):
    """Internal: one clause error (collected by the parser)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message


# ---------------------------------------------------------------------------------------------
# minimum_should_match


_F32 = struct.Struct("f")


def _f32(value: float) -> float:
    return float(_F32.unpack(_F32.pack(value))[0])


_ONE_HUNDREDTH_F32 = _f32(1 / 100)
_JAVA_INT = re.compile(r"[+-]?\d+")


def _java_int(text: str) -> int:
    if not _JAVA_INT.fullmatch(text):
        raise ValueError(f'For input string: "{text}"')
    return int(text)


def calculate_min_should_match(optional_clause_count: int, spec: str) -> int:
    """Lucene/Elasticsearch ``Queries.calculateMinShouldMatch``, including its float32
    percentage arithmetic: integers (negative = all but N), percentages (floored; negative =
    all but the floored share), and conditional specs ``"3<90%"``, ``"2<-25% 9<-3"`` (each
    ``N<spec`` applies when there are more than N optional clauses). Raises ValueError."""
    result = optional_clause_count
    spec = spec.strip()
    if "<" in spec:
        spec = re.sub(r"\s*<\s*", "<", spec)
        for part in spec.split():
            pieces = part.split("<")
            if len(pieces) != 2:
                raise ValueError(f"invalid minimum_should_match [{spec}]")
            upper_bound = _java_int(pieces[0])
            if optional_clause_count <= upper_bound:
                return result
            result = calculate_min_should_match(optional_clause_count, pieces[1])
        return result
    if "%" in spec:
        percent = _java_int(spec[:-1])
        calc = _f32(_f32(float(result * percent)) * _ONE_HUNDREDTH_F32)
        result = result + int(calc) if calc < 0 else int(calc)
    else:
        calc_int = _java_int(spec)
        result = result + calc_int if calc_int < 0 else calc_int
    return max(result, 0)


def resolve_minimum_should_match(spec: Any, should: int, has_required: bool) -> int:
    """The required count of should clauses for a bool (see module docstring)."""
    if spec is None:
        return 1 if should and not has_required else 0
    msm = calculate_min_should_match(should, str(spec))
    if should and not has_required:
        # Lucene: a BooleanQuery without required clauses needs at least one should clause
        msm = max(msm, 1)
    return msm


# ---------------------------------------------------------------------------------------------


def wildcard_regex(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    """Lucene ``WildcardQuery``: ``*`` any run, ``?`` one code point, ``\\`` escapes."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
        i += 1
    # re.ASCII limits IGNORECASE to the ASCII letters, as Elasticsearch's case_insensitive (see
    # percolators.analysis.ascii_lower); the pattern has no \\w-style classes for it to affect.
    flags = re.DOTALL | (re.IGNORECASE | re.ASCII if case_insensitive else 0)
    return re.compile("".join(out), flags)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Parser:
    def __init__(self, rule_id: str, mapping: Mapping):
        self.rule_id = rule_id
        self.mapping = mapping
        self.errors: dict[str, str] = {}
        self.warnings: list[str] = []

    # -- helpers ------------------------------------------------------------------------------

    def fail(self, path: str, message: str) -> _Invalid:
        return _Invalid(path, message)

    def field(self, path: str, name: Any, query_type: str) -> FieldSpec:
        if not isinstance(name, str) or not name:
            raise self.fail(path, f"[{query_type}] field name must be a non-empty string")
        spec = self.mapping.fields.get(name)
        if spec is None:
            if name in self.mapping.objects:
                raise self.fail(_join(path, name), f"field '{name}' is an object; [{query_type}] needs a leaf field")
            raise self.fail(_join(path, name), f"field '{name}' is not mapped")
        return spec

    def single_field(
        self, body: Any, path: str, query_type: str, extra: frozenset[str] = frozenset()
    ) -> tuple[str, Any]:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, f"[{query_type}] query malformed, expected an object, got {_type_name(body)}")
        names = [k for k in body if k not in _COMMON and k not in extra]
        if not names:
            raise self.fail(path, f"[{query_type}] query has no field")
        if len(names) > 1:
            raise self.fail(
                path, f"[{query_type}] query doesn't support multiple fields, found [{names[0]}] and [{names[1]}]"
            )
        return names[0], body[names[0]]

    def check_keys(self, body: AbcMapping[str, Any], allowed: frozenset[str], path: str, query_type: str) -> None:
        for key in body:
            if key not in allowed and key not in _COMMON:
                raise self.fail(_join(path, key), f"[{query_type}] query does not support [{key}]")

    # -- dispatch -----------------------------------------------------------------------------

    def parse(self, query: Any, where: str) -> Node:
        """Parse one query object found at clause path ``where`` (empty at the root)."""
        try:
            if not isinstance(query, AbcMapping):
                raise self.fail(where, f"a query must be an object, got {_type_name(query)}")
            if not query:
                raise self.fail(where, "query malformed, empty clause found")
            if len(query) > 1:
                keys = list(query)
                raise self.fail(
                    where, f"query malformed: one query type per object expected, found [{keys[0]}] and [{keys[1]}]"
                )
            ((qtype, body),) = query.items()
            path = _join(where, qtype)
            if qtype in _SCRIPT_QUERIES:
                raise self.fail(path, f"unknown or unsupported query type '{qtype}': scripts are not allowed in rules")
            method = getattr(self, f"q_{qtype}", None) if qtype in SUPPORTED_QUERIES else None
            if method is None:
                raise self.fail(
                    path, f"unknown or unsupported query type '{qtype}' (supported: {', '.join(SUPPORTED_QUERIES)})"
                )
            node: Node = method(body, path)
            return node
        except _Invalid as exc:
            self.errors.setdefault(exc.path, exc.message)
            return MatchNone(path=where)

    # -- leaf queries -------------------------------------------------------------------------

    def q_match_all(self, body: Any, path: str) -> Node:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, "[match_all] query malformed, expected an object")
        self.check_keys(body, frozenset(), path, "match_all")
        return MatchAll(path=path)

    def q_match_none(self, body: Any, path: str) -> Node:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, "[match_none] query malformed, expected an object")
        self.check_keys(body, frozenset(), path, "match_none")
        return MatchNone(path=path)

    def case_insensitive_option(self, spec_body: AbcMapping[str, Any], fpath: str) -> bool:
        """The ``case_insensitive`` flag of term/prefix/wildcard (default false); must be a boolean."""
        ci = spec_body.get("case_insensitive", False)
        if not isinstance(ci, bool):
            raise self.fail(_join(fpath, "case_insensitive"), "[case_insensitive] must be true or false")
        return ci

    def q_term(self, body: Any, path: str) -> Node:
        name, spec_body = self.single_field(body, path, "term")
        fpath = _join(path, name)
        case_insensitive = False
        if isinstance(spec_body, AbcMapping):
            self.check_keys(spec_body, frozenset({"value", "case_insensitive"}), fpath, "term")
            if "value" not in spec_body:
                raise self.fail(fpath, "[term] query requires a 'value'")
            value = spec_body["value"]
            case_insensitive = self.case_insensitive_option(spec_body, fpath)
        else:
            value = spec_body
        spec = self.field(path, name, "term")
        self.check_scalar(value, fpath, "term")
        return self.exact(spec, value, fpath, path, case_insensitive=case_insensitive, query_type="term")

    def check_scalar(self, value: Any, fpath: str, query_type: str) -> None:
        if value is None:
            raise self.fail(fpath, f"[{query_type}] value cannot be null")
        if not isinstance(value, str | int | float | bool):
            raise self.fail(fpath, f"[{query_type}] value must be a string, number or boolean, got {_type_name(value)}")

    def exact(
        self, spec: FieldSpec, value: Any, fpath: str, path: str, *, case_insensitive: bool, query_type: str
    ) -> Node:
        """Term semantics of ``value`` on ``spec`` (term, match on non-text, match_phrase...)."""
        ftype = spec.type
        if case_insensitive and ftype not in ("keyword", "text"):
            raise self.fail(
                fpath,
                f"[{query_type}] case_insensitive is only supported on keyword and text fields,"
                f" '{spec.path}' is {ftype}",
            )
        if ftype == "geo_point":
            raise self.fail(
                fpath,
                f"field '{spec.path}' is a geo_point: geometry fields do not support exact searching, use geo_distance",
            )
        if ftype == "date":
            # DateFieldType.termQuery is rangeQuery(value, value, true, true): a whole day for
            # "2026-01-01"; a JSON number is read as epoch millis (see date_range)
            text = self.date_value(value, fpath)
            fmt = "epoch_millis" if _is_number(value) else spec.date_format
            low = self.date_bound(text, "gte", fpath, fmt, None)
            high = self.date_bound(text, "lte", fpath, fmt, None)
            return Range(spec.path, low, True, high, True, path=path)
        indexed = self.indexed_value(spec, value, fpath)
        if indexed is None:
            return MatchNone(path=path)
        if case_insensitive and isinstance(indexed, str):
            indexed = ascii_lower(indexed)
        return Term(spec.path, indexed, case_insensitive, path=path)

    def indexed_value(self, spec: FieldSpec, value: Any, fpath: str, *, for_terms: bool = False) -> Scalar | None:
        """A query value in indexed form, or None when it can match nothing (ES MatchNoDocs)."""
        ftype = spec.type
        try:
            if ftype in ("keyword", "text"):
                return keyword_text(value)
            if ftype == "boolean":
                if isinstance(value, bool):
                    return value
                # BooleanFieldType.indexedValueForSearch accepts only "true"/"false"
                if value in ("true", "false"):
                    return coerce_boolean(value)
                raise ValueError(f"Can't parse boolean value [{value}], expected [true] or [false]")
            if ftype in INTEGER_TYPES:
                number = self.number(value)
                if not number.is_integer():
                    return None  # "Value [..] has a decimal part" -> MatchNoDocsQuery
                lo, hi = INTEGER_TYPES[ftype]
                wide_lo, wide_hi = INTEGER_TYPES["long" if ftype == "long" else "integer"]
                exact = int(value) if isinstance(value, int) else int(number)
                if isinstance(value, str) and _JAVA_INT.fullmatch(value.strip()):
                    exact = int(value)
                if exact < lo or exact > hi:
                    if for_terms and (exact < wide_lo or exact > wide_hi):
                        raise ValueError(
                            f"Value [{value}] is out of range for {'a long' if ftype == 'long' else 'an integer'}"
                        )
                    return None  # termQuery: "Value [..] is out of range" -> MatchNoDocsQuery
                return exact
            if ftype in FLOAT_TYPES:
                return coerce_float(value, ftype)
        except ValueError as exc:
            raise self.fail(fpath, f"invalid value [{value}] for field '{spec.path}' of type {ftype}: {exc}") from None
        raise self.fail(fpath, f"field '{spec.path}' of type {ftype} is not supported by this query")

    def number(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f'For input string: "{str(value).lower()}"')
        if isinstance(value, int):
            return float(value) if abs(value) < 2**63 else math.inf
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"invalid number [{value}]")
            return value
        if isinstance(value, str):
            from percolators.geo import java_double

            number = java_double(value)
            if not math.isfinite(number):
                raise ValueError(f"invalid number [{value}]")
            return number
        raise ValueError(f"expected a number, got {_type_name(value)}")

    def date_value(self, value: Any, fpath: str) -> str:
        try:
            return date_text(value)
        except ValueError as exc:
            raise self.fail(fpath, str(exc)) from None

    def date_bound(self, text: str, side: str, fpath: str, fmt: str, time_zone: str | None) -> int | DateMath:
        try:
            if text.startswith("now"):
                dm = make_date_math(text, time_zone)
                if dm.ops and any(op == "/" for op, _, _ in dm.ops):
                    pass
                return dm
            return bound_millis(text, 0, side=side, fmt=fmt, time_zone=time_zone)
        except ValueError as exc:
            raise self.fail(fpath, f"failed to parse date [{text}]: {exc}") from None

    def q_terms(self, body: Any, path: str) -> Node:
        name, values = self.single_field(body, path, "terms")
        fpath = _join(path, name)
        if isinstance(values, AbcMapping):
            raise self.fail(fpath, "terms lookup (index/id/path) is not supported in rules; list the values")
        if not isinstance(values, list):
            raise self.fail(fpath, f"[terms] query requires an array of values for '{name}', got {_type_name(values)}")
        spec = self.field(path, name, "terms")
        if spec.type == "geo_point":
            raise self.fail(fpath, f"field '{name}' is a geo_point: geometry fields do not support exact searching")
        if not values:
            return MatchNone(path=path)
        if spec.type == "date":
            parts: list[Node] = []
            for i, value in enumerate(values):
                self.check_scalar(value, f"{fpath}[{i}]", "terms")
                parts.append(
                    self.exact(spec, value, f"{fpath}[{i}]", f"{path}[{i}]", case_insensitive=False, query_type="terms")
                )
            return parts[0] if len(parts) == 1 else Bool(should=tuple(parts), minimum_should_match=1, path=path)
        indexed: list[Scalar] = []
        for i, value in enumerate(values):
            self.check_scalar(value, f"{fpath}[{i}]", "terms")
            item = self.indexed_value(spec, value, f"{fpath}[{i}]", for_terms=True)
            if item is not None:
                indexed.append(item)
        unique = frozenset(indexed)
        if not unique:
            return MatchNone(path=path)
        if len(unique) == 1:
            return Term(spec.path, next(iter(unique)), path=path)
        return Terms(spec.path, unique, path=path)

    def q_range(self, body: Any, path: str) -> Node:
        name, params = self.single_field(body, path, "range")
        fpath = _join(path, name)
        if not isinstance(params, AbcMapping):
            raise self.fail(fpath, f"[range] query malformed, expected an object for '{name}'")
        allowed = frozenset(
            {
                "gt",
                "gte",
                "lt",
                "lte",
                "from",
                "to",
                "include_lower",
                "include_upper",
                "format",
                "time_zone",
                "relation",
            }
        )
        self.check_keys(params, allowed, fpath, "range")
        spec = self.field(path, name, "range")
        low: Any = None
        high: Any = None
        low_inc = high_inc = True
        # later keys override earlier ones, as RangeQueryBuilder.fromXContent reads them in order
        for key, value in params.items():
            if key in ("gt", "gte", "from"):
                low = value
                if key != "from":
                    low_inc = key == "gte"
            elif key in ("lt", "lte", "to"):
                high = value
                if key != "to":
                    high_inc = key == "lte"
            elif key in ("include_lower", "include_upper"):
                if not isinstance(value, bool):
                    raise self.fail(_join(fpath, key), f"[{key}] must be true or false")
                if key == "include_lower":
                    low_inc = value
                else:
                    high_inc = value
        relation = params.get("relation")
        if relation is not None and str(relation).lower() not in ("intersects", "within", "contains"):
            raise self.fail(_join(fpath, "relation"), f"[range] unknown relation [{relation}]")
        for bound in (low, high):
            if (bound is not None and not isinstance(bound, str | int | float)) or (
                isinstance(bound, bool) and spec.type != "boolean"
            ):
                raise self.fail(fpath, f"[range] bound must be a string or a number, got {_type_name(bound)}")
        fmt = params.get("format")
        time_zone = params.get("time_zone")
        ftype = spec.type
        if fmt is not None and ftype != "date":
            raise self.fail(_join(fpath, "format"), f"field '{name}' of type {ftype} does not support custom formats")
        if time_zone is not None and ftype != "date":
            raise self.fail(
                _join(fpath, "time_zone"), f"field '{name}' of type {ftype} does not support custom time zones"
            )
        if ftype == "geo_point":
            raise self.fail(fpath, f"field '{name}' of type geo_point does not support range queries")
        if low is None and high is None:
            return Exists(spec.path, (spec.path,), path=path)
        if ftype == "date":
            return self.date_range(spec, low, low_inc, high, high_inc, fmt, time_zone, fpath, path)
        if ftype in INTEGER_TYPES:
            return self.integer_range(spec, low, low_inc, high, high_inc, fpath, path)
        lo: Scalar | None
        hi: Scalar | None
        try:
            if ftype in FLOAT_TYPES:
                lo = coerce_float(low, ftype) if low is not None else None
                hi = coerce_float(high, ftype) if high is not None else None
            elif ftype == "boolean":
                lo = self.boolean_bound(low)
                hi = self.boolean_bound(high)
            else:  # keyword, text: byte-wise (code point) string order, bounds not analysed
                lo = keyword_text(low) if low is not None else None
                hi = keyword_text(high) if high is not None else None
        except ValueError as exc:
            raise self.fail(fpath, f"invalid range bound for field '{name}' of type {ftype}: {exc}") from None
        return Range(spec.path, lo, low_inc, hi, high_inc, path=path)

    def boolean_bound(self, value: Any) -> bool | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return value == "true"
        raise ValueError(f"Can't parse boolean value [{value}], expected [true] or [false]")

    def integer_range(
        self, spec: FieldSpec, low: Any, low_inc: bool, high: Any, high_inc: bool, fpath: str, path: str
    ) -> Node:
        # NumberType.INTEGER/LONG.rangeQuery: bounds parsed with coercion, decimals rounded inward,
        # exclusive bounds made inclusive; bounds beyond the int (long) range are an error.
        wide = "long" if spec.type == "long" else "integer"
        lo_int: int | None = None
        hi_int: int | None = None
        try:
            if low is not None:
                number = self.number(low)
                if number.is_integer():
                    lo_int = coerce_integer(low, wide) + (0 if low_inc else 1)
                else:
                    coerce_integer(low, wide)  # range check
                    lo_int = math.ceil(number)
            if high is not None:
                number = self.number(high)
                if number.is_integer():
                    hi_int = coerce_integer(high, wide) - (0 if high_inc else 1)
                else:
                    coerce_integer(high, wide)
                    hi_int = math.floor(number)
        except ValueError as exc:
            raise self.fail(fpath, f"invalid range bound for field '{spec.path}' of type {spec.type}: {exc}") from None
        if lo_int is not None and hi_int is not None and lo_int > hi_int:
            return MatchNone(path=path)
        return Range(spec.path, lo_int, True, hi_int, True, path=path)

    def date_range(
        self,
        spec: FieldSpec,
        low: Any,
        low_inc: bool,
        high: Any,
        high_inc: bool,
        fmt: Any,
        time_zone: Any,
        fpath: str,
        path: str,
    ) -> Node:
        if fmt is not None:
            try:
                validate_format(fmt)
            except ValueError as exc:
                raise self.fail(_join(fpath, "format"), str(exc)) from None
        if time_zone is not None:
            if not isinstance(time_zone, str):
                raise self.fail(_join(fpath, "time_zone"), "[time_zone] must be a string")
            try:
                parse_time_zone(time_zone)
            except ValueError as exc:
                raise self.fail(_join(fpath, "time_zone"), str(exc)) from None
        use_fmt = fmt or spec.date_format
        if fmt is None and (_is_number(low) or _is_number(high)):
            # DateFieldType.rangeQuery: "force epoch_millis" when a bound is a JSON number and
            # no format is given (the range query docs: numbers are milliseconds-since-the-epoch)
            use_fmt = "epoch_millis"
        lo: int | DateMath | None = None
        hi: int | DateMath | None = None
        if low is not None:
            text = self.date_value(low, fpath)
            lo = self.date_bound(text, "gte" if low_inc else "gt", fpath, use_fmt, time_zone)
        if high is not None:
            text = self.date_value(high, fpath)
            hi = self.date_bound(text, "lte" if high_inc else "lt", fpath, use_fmt, time_zone)
        # resolved integer bounds are inclusive; DateMath bounds keep the written inclusivity
        lo_inc = True if not isinstance(lo, DateMath) else low_inc
        hi_inc = True if not isinstance(hi, DateMath) else high_inc
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            return MatchNone(path=path)
        node = Range(spec.path, lo, lo_inc, hi, hi_inc, path=path)
        if node.uses_now:
            self.warnings.append(f"{path}: range uses 'now', so candidate selection cannot use it")
        return node

    def q_exists(self, body: Any, path: str) -> Node:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, "[exists] query malformed, expected an object")
        self.check_keys(body, frozenset({"field"}), path, "exists")
        name = body.get("field")
        if not isinstance(name, str) or not name:
            raise self.fail(_join(path, "field"), "[exists] requires a 'field' string")
        if "*" in name:
            leaves = tuple(
                sorted(
                    leaf
                    for pattern_hit in fnmatch.filter(
                        sorted(set(self.mapping.fields) | set(self.mapping.objects)), name
                    )
                    for leaf in self.mapping.leaves_under(pattern_hit)
                )
            )
            leaves = tuple(dict.fromkeys(leaves))
        else:
            leaves = self.mapping.leaves_under(name)
        if not leaves:
            if name in self.mapping.objects:
                raise self.fail(_join(path, name), f"object field '{name}' has no mapped leaf fields")
            raise self.fail(_join(path, name), f"field '{name}' is not mapped")
        return Exists(name, leaves, path=path)

    def string_query(
        self, body: Any, path: str, query_type: str, value_keys: tuple[str, ...]
    ) -> tuple[FieldSpec, str, bool]:
        name, spec_body = self.single_field(body, path, query_type)
        fpath = _join(path, name)
        case_insensitive = False
        if isinstance(spec_body, AbcMapping):
            allowed = frozenset({*value_keys, "case_insensitive", "rewrite"})
            self.check_keys(spec_body, allowed, fpath, query_type)
            present = [k for k in value_keys if k in spec_body]
            if not present:
                raise self.fail(fpath, f"[{query_type}] query requires a '{value_keys[0]}'")
            value = spec_body[present[-1]]
            case_insensitive = self.case_insensitive_option(spec_body, fpath)
        else:
            value = spec_body
        spec = self.field(path, name, query_type)
        if spec.type not in ("keyword", "text"):
            raise self.fail(
                fpath,
                f"can only use {query_type} queries on keyword and text fields"
                f" - not on '{name}' which is of type {spec.type}",
            )
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(fpath, f"[{query_type}] value must be a string, got {_type_name(value)}")
        return spec, keyword_text(value), case_insensitive

    def q_prefix(self, body: Any, path: str) -> Node:
        spec, value, ci = self.string_query(body, path, "prefix", ("value",))
        if value == "":
            return Exists(spec.path, (spec.path,), path=path) if spec.type == "keyword" else MatchAll(path=path)
        return Prefix(spec.path, ascii_lower(value) if ci else value, ci, path=path)

    def q_wildcard(self, body: Any, path: str) -> Node:
        spec, pattern, ci = self.string_query(body, path, "wildcard", ("value", "wildcard"))
        if spec.type == "text":
            # TextFieldType normalises wildcard patterns with the search analyzer's normalizer
            # (lowercase for the standard analyzer)
            pattern = pattern.lower()
        if ci:
            pattern = ascii_lower(pattern)
        node = Wildcard(spec.path, pattern, wildcard_regex(pattern, ci), ci, path=path)
        if pattern[:1] in ("*", "?"):
            self.warnings.append(
                f"{path}: leading wildcard '{pattern}': candidate selection cannot use it and it is slow to check"
            )
        return node

    def q_match(self, body: Any, path: str) -> Node:
        name, spec_body = self.single_field(body, path, "match")
        fpath = _join(path, name)
        options: AbcMapping[str, Any]
        if isinstance(spec_body, AbcMapping):
            allowed = frozenset(
                {
                    "query",
                    "operator",
                    "minimum_should_match",
                    "zero_terms_query",
                    "lenient",
                    "analyzer",
                    "fuzziness",
                    "prefix_length",
                    "max_expansions",
                    "fuzzy_transpositions",
                    "fuzzy_rewrite",
                    "auto_generate_synonyms_phrase_query",
                }
            )
            self.check_keys(spec_body, allowed, fpath, "match")
            if "query" not in spec_body:
                raise self.fail(fpath, "[match] query requires a 'query'")
            options = spec_body
            value = spec_body["query"]
        else:
            options = {}
            value = spec_body
        spec = self.field(path, name, "match")
        self.check_scalar(value, fpath, "match")
        operator = str(options.get("operator", "or")).lower()
        if operator not in ("or", "and"):
            raise self.fail(_join(fpath, "operator"), f"[match] unknown operator [{options.get('operator')}]")
        zero_terms = str(options.get("zero_terms_query", "none")).lower()
        if zero_terms not in ("none", "all"):
            raise self.fail(_join(fpath, "zero_terms_query"), f"[match] unknown zero_terms_query [{zero_terms}]")
        fuzziness = options.get("fuzziness")
        if fuzziness not in (None, 0, "0"):
            raise self.fail(_join(fpath, "fuzziness"), "[match] fuzziness is not supported in rules")
        analyzer = options.get("analyzer", "standard")
        if analyzer not in ("standard", "keyword"):
            raise self.fail(
                _join(fpath, "analyzer"),
                f"[match] only the standard and keyword analyzers are supported, not [{analyzer}]",
            )
        lenient = options.get("lenient", False)
        if spec.type != "text":
            try:
                return self.exact(spec, value, fpath, path, case_insensitive=False, query_type="match")
            except _Invalid:
                if lenient is True and spec.type != "geo_point":
                    return MatchNone(path=path)
                raise
        tokens = (keyword_text(value),) if analyzer == "keyword" else analyze(keyword_text(value))
        if not tokens:
            return MatchAll(path=path) if zero_terms == "all" else MatchNone(path=path)
        if len(tokens) == 1:
            return Term(spec.path, tokens[0], path=path)
        terms = tuple(Term(spec.path, tok, path=f"{fpath}[{i}]") for i, tok in enumerate(tokens))
        if operator == "and":
            return Bool(must=terms, path=path)
        msm_spec = options.get("minimum_should_match")
        try:
            msm = resolve_minimum_should_match(msm_spec, len(terms), has_required=False)
        except ValueError as exc:
            raise self.fail(_join(fpath, "minimum_should_match"), f"invalid minimum_should_match: {exc}") from None
        return Bool(should=terms, minimum_should_match=msm, path=path)

    def q_match_phrase(self, body: Any, path: str) -> Node:
        name, spec_body = self.single_field(body, path, "match_phrase")
        fpath = _join(path, name)
        slop: Any = 0
        zero_terms = "none"
        analyzer = "standard"
        if isinstance(spec_body, AbcMapping):
            self.check_keys(
                spec_body, frozenset({"query", "slop", "analyzer", "zero_terms_query"}), fpath, "match_phrase"
            )
            if "query" not in spec_body:
                raise self.fail(fpath, "[match_phrase] query requires a 'query'")
            value = spec_body["query"]
            slop = spec_body.get("slop", 0)
            zero_terms = str(spec_body.get("zero_terms_query", "none")).lower()
            analyzer = spec_body.get("analyzer", "standard")
        else:
            value = spec_body
        if isinstance(slop, bool) or not isinstance(slop, int) or slop < 0:
            raise self.fail(_join(fpath, "slop"), "[match_phrase] slop must be a non-negative integer")
        if slop >= MAX_PHRASE_SLOP:
            raise self.fail(
                _join(fpath, "slop"), f"[match_phrase] slop {slop} is not supported (must be below {MAX_PHRASE_SLOP})"
            )
        if zero_terms not in ("none", "all"):
            raise self.fail(_join(fpath, "zero_terms_query"), f"unknown zero_terms_query [{zero_terms}]")
        if analyzer not in ("standard", "keyword"):
            raise self.fail(
                _join(fpath, "analyzer"), f"only the standard and keyword analyzers are supported, not [{analyzer}]"
            )
        spec = self.field(path, name, "match_phrase")
        self.check_scalar(value, fpath, "match_phrase")
        if spec.type != "text":
            return self.exact(spec, value, fpath, path, case_insensitive=False, query_type="match_phrase")
        tokens = (keyword_text(value),) if analyzer == "keyword" else analyze(keyword_text(value))
        if not tokens:
            return MatchAll(path=path) if zero_terms == "all" else MatchNone(path=path)
        if len(tokens) == 1:
            return Term(spec.path, tokens[0], path=path)
        return Phrase(spec.path, tokens, slop, path=path)

    def q_geo_distance(self, body: Any, path: str) -> Node:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, "[geo_distance] query malformed, expected an object")
        params = frozenset({"distance", "distance_type", "validation_method", "ignore_unmapped", "unit"})
        fields = [k for k in body if k not in params and k not in _COMMON]
        if not fields:
            raise self.fail(path, "[geo_distance] requires a geo_point field and its centre point")
        if len(fields) > 1:
            raise self.fail(path, f"[geo_distance] supports only one field, found [{fields[0]}] and [{fields[1]}]")
        name = fields[0]
        fpath = _join(path, name)
        if "distance" not in body or body["distance"] is None:
            raise self.fail(_join(path, "distance"), "[geo_distance] requires a 'distance'")
        distance = body["distance"]
        unit = body.get("unit")
        try:
            if unit is not None and isinstance(distance, int | float) and not isinstance(distance, bool):
                distance_m = parse_distance(f"{distance}{unit}")
            else:
                distance_m = parse_distance(distance)
        except GeoError as exc:
            raise self.fail(_join(path, "distance"), str(exc)) from None
        if distance_m <= 0:
            raise self.fail(_join(path, "distance"), "[geo_distance] distance must be greater than zero")
        distance_type = str(body.get("distance_type", "arc")).lower()
        if distance_type not in ("arc", "plane"):
            raise self.fail(
                _join(path, "distance_type"), f"unknown distance_type [{distance_type}], expected arc or plane"
            )
        method = str(body.get("validation_method", "STRICT")).upper()
        if method not in ("STRICT", "IGNORE_MALFORMED", "COERCE"):
            raise self.fail(_join(path, "validation_method"), f"unknown validation_method [{method}]")
        ignore_unmapped = body.get("ignore_unmapped", False) is True
        spec = self.mapping.fields.get(name)
        if spec is None and ignore_unmapped and name not in self.mapping.objects:
            return MatchNone(path=path)
        spec = self.field(path, name, "geo_distance")
        if spec.type != "geo_point":
            raise self.fail(fpath, f"field '{name}' is of type {spec.type}, geo_distance needs a geo_point field")
        try:
            lat, lon = parse_point(body[name], validate=method == "STRICT")
        except GeoError as exc:
            raise self.fail(fpath, f"invalid centre point: {exc}") from None
        if method == "COERCE":
            lat, lon = normalize_point(lat, lon)
        return GeoDistance(spec.path, lat, lon, distance_m, "arc", path=path)

    # -- compound queries ---------------------------------------------------------------------

    def q_constant_score(self, body: Any, path: str) -> Node:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, "[constant_score] query malformed, expected an object")
        self.check_keys(body, frozenset({"filter"}), path, "constant_score")
        if "filter" not in body:
            raise self.fail(path, "[constant_score] requires a 'filter'")
        return self.parse(body["filter"], _join(path, "filter"))

    def q_bool(self, body: Any, path: str) -> Node:
        if not isinstance(body, AbcMapping):
            raise self.fail(path, "[bool] query malformed, expected an object")
        self.check_keys(
            body,
            frozenset({"must", "filter", "should", "must_not", "minimum_should_match", "adjust_pure_negative"}),
            path,
            "bool",
        )
        parts: dict[str, tuple[Node, ...]] = {}
        for occur in ("must", "filter", "should", "must_not"):
            clauses = body.get(occur)
            if clauses is None:
                parts[occur] = ()
            elif isinstance(clauses, AbcMapping):
                parts[occur] = (self.parse(clauses, _join(path, occur)),)
            elif isinstance(clauses, list):
                parts[occur] = tuple(self.parse(c, f"{path}.{occur}[{i}]") for i, c in enumerate(clauses))
            else:
                raise self.fail(_join(path, occur), f"[bool] '{occur}' must be an object or an array of objects")
        msm_spec = body.get("minimum_should_match")
        if msm_spec is not None and (isinstance(msm_spec, bool) or not isinstance(msm_spec, str | int)):
            raise self.fail(
                _join(path, "minimum_should_match"), "[minimum_should_match] must be an integer or a string"
            )
        try:
            msm = resolve_minimum_should_match(msm_spec, len(parts["should"]), bool(parts["must"] or parts["filter"]))
        except ValueError as exc:
            raise self.fail(
                _join(path, "minimum_should_match"), f"invalid minimum_should_match [{msm_spec}]: {exc}"
            ) from None
        if not any(parts.values()):
            # BoolQueryBuilder.doToQuery returns MatchAllDocsQuery for a bool without clauses before it
            # applies minimum_should_match, so {"bool": {"minimum_should_match": 1}} matches everything.
            msm = 0
        adjust = body.get("adjust_pure_negative", True)
        if adjust is False and parts["must_not"] and not (parts["must"] or parts["filter"] or parts["should"]):
            return MatchNone(path=path)  # a pure negative Lucene query matches nothing
        return Bool(parts["must"], parts["filter"], parts["should"], parts["must_not"], msm, path=path)


# ---------------------------------------------------------------------------------------------
# Selectivity: can candidate selection narrow this rule?


def _unselective_reasons(node: Node) -> list[str]:
    """Why ``node`` could match a document that has none of the indexable terms candidate
    selection relies on (empty list: the node is selective)."""
    if isinstance(node, MatchAll):
        return [f"{node.path or 'query'}: match_all matches every document"]
    if isinstance(node, Exists):
        return [f"{node.path}: exists on '{node.field}' only"]
    if isinstance(node, Range) and node.uses_now:
        return [f"{node.path}: range relative to 'now'"]
    if isinstance(node, Wildcard) and not node.literal_prefix:
        return [f"{node.path}: leading wildcard"]
    if isinstance(node, Bool):
        required = node.must + node.filter
        if required:
            reasons: list[str] = []
            for child in required:
                child_reasons = _unselective_reasons(child)
                if not child_reasons:
                    return []
                reasons.extend(child_reasons)
            return reasons
        if node.should and node.minimum_should_match >= 1:
            reasons = []
            for child in node.should:
                reasons.extend(_unselective_reasons(child))
            return reasons
        if node.must_not:
            return [f"{node.path or 'bool'}: only must_not clauses (matches everything else)"]
        return [f"{node.path or 'bool'}: empty bool matches every document"]
    return []


def selectivity_warnings(node: Node) -> list[str]:
    """Warnings for a rule that candidate selection cannot narrow (it is then checked against
    every document): match_all, must_not-only bools, leading wildcards, exists-only, ranges on
    ``now``. Empty when the rule is selective."""
    reasons = _unselective_reasons(node)
    if not reasons:
        return []
    return [
        "rule cannot be narrowed by candidate selection and is checked against every document: " + "; ".join(reasons)
    ]


def parse_rule(
    rule_id: str,
    query: AbcMapping[str, Any],
    mapping: Mapping,
    *,
    metadata: AbcMapping[str, str] | None = None,
) -> ParsedRule:
    """Validate and parse one rule. Raises InvalidRuleError (all clause errors in ``fields``)."""
    parser = _Parser(rule_id, mapping)
    if not isinstance(query, AbcMapping):
        raise InvalidRuleError(rule_id, "", f"a rule query must be a JSON object, got {_type_name(query)}")
    node = parser.parse(query, "")
    if parser.errors:
        first_path, first_message = next(iter(parser.errors.items()))
        raise InvalidRuleError(rule_id, first_path, first_message, fields=dict(parser.errors))
    warnings = list(
        dict.fromkeys([*selectivity_warnings(node), *(w for w in parser.warnings if "leading wildcard" in w)])
    )
    return ParsedRule(
        id=rule_id,
        query=node,
        source=dict(query),
        metadata=dict(metadata or {}),
        warnings=tuple(warnings),
    )
