"""Dates as Elasticsearch reads them: formats, date math and range rounding.

Sources mirrored (Elasticsearch 8.x):

* ``JavaDateMathParser``: an expression is ``now`` or ``<date>||`` followed by operations
  ``+N<unit>``, ``-N<unit>`` (N defaults to 1) and roundings ``/<unit>``, units y M w d h H m s.
  The anchor date before ``||`` is parsed rounding *down*; a rounding going *up* moves to the last
  millisecond of the unit (``plus 1 unit, minus 1 ms``).
* ``DateFieldMapper.DateFieldType.rangeQuery``: ``gt`` parses with round-up then adds 1 ms,
  ``gte`` parses rounding down, ``lt`` parses rounding down then subtracts 1 ms, ``lte`` parses
  with round-up. So ``gt: now/d`` excludes the whole of today and ``lte: now/d`` includes it.
* Round-up parsing also fills *missing date components* with their maximum
  (``DateFormatters`` round-up parser: month 1, day 1, hour 23, minute 59, second 59,
  fraction .999): ``lte: "2026-01-01"`` includes the whole day. Documented in "Missing date
  components" of the range query reference.
* Date field values and range bounds given as JSON numbers are read as their text through the
  format chain, so with the default ``strict_date_optional_time||epoch_millis`` a number with
  4 digits or fewer is a *year* (an Elasticsearch quirk we keep) and longer ones are epoch millis.

Supported formats: the named formats listed in ``NAMED_FORMATS`` and custom java-time patterns
made of ``yyyy uuuu yy MM M dd d HH H mm m ss s S... X XX XXX Z ZZ 'literal'`` and punctuation,
joined with ``||``. Anything else is rejected with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from percolators.query import DateMath, Range, ResolvedRange

DEFAULT_FORMAT = "strict_date_optional_time||epoch_millis"
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MS_PER_DAY = 86_400_000
UNITS = "yMwdhHms"

# ---------------------------------------------------------------------------------------------
# Formats


@dataclass(frozen=True, slots=True)
class _Fields:
    year: int
    month: int | None = None
    day: int | None = None
    hour: int | None = None
    minute: int | None = None
    second: int | None = None
    nanos: int | None = None
    offset_minutes: int | None = None


_OFFSET = r"(?P<z>Z|[+-]\d{2}(?::?\d{2})?)"
_ISO_STRICT = re.compile(
    r"(?P<y>\d{4})(?:-(?P<M>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2})(?::(?P<m>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<f>\d{1,9}))?)?)?" + _OFFSET + r"?)?)?)?"
)
_ISO_LENIENT = re.compile(
    r"(?P<y>[+-]?\d{1,9})(?:-(?P<M>\d{1,2})(?:-(?P<d>\d{1,2})"
    r"(?:T(?P<H>\d{1,2})(?::(?P<m>\d{1,2})(?::(?P<s>\d{1,2})(?:[.,](?P<f>\d{1,9}))?)?)?" + _OFFSET + r"?)?)?)?"
)
_EPOCH = re.compile(r"(?P<sign>-)?(?P<int>\d+)(?:\.(?P<frac>\d+))?")

# Named formats we support, as custom patterns or the special parsers above.
NAMED_FORMATS: dict[str, str] = {
    "strict_date_optional_time": "@iso_strict",
    "date_optional_time": "@iso_lenient",
    "strict_date_optional_time_nanos": "@iso_strict",
    "epoch_millis": "@epoch_millis",
    "epoch_second": "@epoch_second",
    "strict_date": "yyyy-MM-dd",
    "date": "yyyy-MM-dd",
    "strict_year_month_day": "yyyy-MM-dd",
    "year_month_day": "yyyy-MM-dd",
    "strict_year_month": "yyyy-MM",
    "year_month": "yyyy-MM",
    "strict_year": "yyyy",
    "year": "yyyy",
    "basic_date": "yyyyMMdd",
    "strict_date_time": "yyyy-MM-dd'T'HH:mm:ss.SSSXXX",
    "date_time": "yyyy-MM-dd'T'HH:mm:ss.SSSXXX",
    "strict_date_time_no_millis": "yyyy-MM-dd'T'HH:mm:ssXXX",
    "date_time_no_millis": "yyyy-MM-dd'T'HH:mm:ssXXX",
    "strict_date_hour_minute_second": "yyyy-MM-dd'T'HH:mm:ss",
    "date_hour_minute_second": "yyyy-MM-dd'T'HH:mm:ss",
    "strict_date_hour_minute_second_millis": "yyyy-MM-dd'T'HH:mm:ss.SSS",
    "date_hour_minute_second_millis": "yyyy-MM-dd'T'HH:mm:ss.SSS",
    "strict_date_hour_minute": "yyyy-MM-dd'T'HH:mm",
    "date_hour_minute": "yyyy-MM-dd'T'HH:mm",
    "strict_date_hour": "yyyy-MM-dd'T'HH",
    "date_hour": "yyyy-MM-dd'T'HH",
    "basic_date_time": "yyyyMMdd'T'HHmmss.SSSX",
    "basic_date_time_no_millis": "yyyyMMdd'T'HHmmssX",
}

_PATTERN_LETTERS = {
    "y": "y",
    "u": "y",
    "M": "M",
    "d": "d",
    "H": "H",
    "m": "m",
    "s": "s",
    "S": "f",
    "X": "z",
    "x": "z",
    "Z": "z",
}


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """A java-time pattern (subset) -> a regex with the same group names as the ISO parser."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise ValueError(f"unterminated quote in date format [{pattern}]")
            out.append(re.escape(pattern[i + 1 : end]) if end > i + 1 else "'")
            i = end + 1
            continue
        if ch.isalpha():
            j = i
            while j < len(pattern) and pattern[j] == ch:
                j += 1
            count = j - i
            group = _PATTERN_LETTERS.get(ch)
            if group is None or (ch in "Md" and count > 2):
                raise ValueError(f"unsupported date format [{pattern}]: pattern letter '{ch * count}'")
            if group in seen:
                raise ValueError(f"date format [{pattern}] repeats '{ch}'")
            seen.add(group)
            if group == "y":
                regex = r"\d{2}" if count == 2 else (r"\d{4}" if count == 4 else rf"[+-]?\d{{{count},9}}")
            elif group == "f":
                regex = rf"\d{{{count}}}"
            elif group == "z":
                regex = r"Z|[+-]\d{2}(?::?\d{2})?"
            else:
                regex = r"\d{2}" if count == 2 else r"\d{1,2}"
            out.append(f"(?P<{group}>{regex})" if group != "y" or count != 2 else f"(?P<yy>{regex})")
            i = j
            continue
        out.append(re.escape(ch))
        i += 1
    if "y" not in seen:
        raise ValueError(f"unsupported date format [{pattern}]: a year (yyyy) is required")
    return re.compile("".join(out))


Parser = Callable[[str], "_Fields | int | None"]


def _regex_parser(regex: re.Pattern[str]) -> Parser:
    def parse(text: str) -> _Fields | None:
        m = regex.fullmatch(text)
        if m is None:
            return None
        g = m.groupdict()
        year = 2000 + int(g["yy"]) if g.get("yy") is not None else int(g["y"])
        frac = g.get("f")
        z = g.get("z")
        offset = None
        if z is not None:
            if z == "Z":
                offset = 0
            else:
                digits = z[1:].replace(":", "")
                offset = int(digits[:2]) * 60 + (int(digits[2:4]) if len(digits) >= 4 else 0)
                if z[0] == "-":
                    offset = -offset
        return _Fields(
            year,
            _opt_int(g.get("M")),
            _opt_int(g.get("d")),
            _opt_int(g.get("H")),
            _opt_int(g.get("m")),
            _opt_int(g.get("s")),
            int(frac.ljust(9, "0")) if frac else None,
            offset,
        )

    return parse


def _opt_int(text: str | None) -> int | None:
    return int(text) if text is not None else None


def _epoch_parser(scale: int) -> Parser:
    def parse(text: str) -> int | None:
        m = _EPOCH.fullmatch(text)
        if m is None:
            return None
        whole = int(m["int"]) * scale
        frac = m["frac"]
        if frac:
            whole += int((frac + "000")[:3]) if scale == 1000 else 0
        return -whole if m["sign"] else whole

    return parse


@lru_cache(maxsize=256)
def _parsers(fmt: str) -> tuple[Parser, ...]:
    parsers: list[Parser] = []
    for part in fmt.split("||"):
        part = part.strip()
        spec = NAMED_FORMATS.get(part, part)
        if spec == "@iso_strict":
            parsers.append(_regex_parser(_ISO_STRICT))
        elif spec == "@iso_lenient":
            parsers.append(_regex_parser(_ISO_LENIENT))
        elif spec == "@epoch_millis":
            parsers.append(_epoch_parser(1))
        elif spec == "@epoch_second":
            parsers.append(_epoch_parser(1000))
        elif not part:
            raise ValueError(f"empty date format in [{fmt}]")
        else:
            try:
                parsers.append(_regex_parser(_compile_pattern(spec)))
            except ValueError:
                if re.fullmatch(r"[a-z_]+", part):
                    raise ValueError(f"unknown or unsupported date format [{part}]") from None
                raise
    return tuple(parsers)


def validate_format(fmt: str) -> None:
    """Raise ValueError if ``fmt`` is not a supported date format (chain)."""
    if not isinstance(fmt, str) or not fmt:
        raise ValueError("date format must be a non-empty string")
    _parsers(fmt)


@lru_cache(maxsize=128)
def parse_time_zone(name: str) -> tzinfo:
    """``Z``, ``UTC``, ``+01:00``/``-0530``/``+01`` offsets or an IANA zone id."""
    if name in ("Z", "UTC", "utc", "GMT"):
        return UTC
    m = re.fullmatch(r"(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?", name)
    if m:
        minutes = int(m[2]) * 60 + int(m[3] or 0)
        if minutes > 18 * 60:
            raise ValueError(f"time zone offset out of range [{name}]")
        return timezone(timedelta(minutes=-minutes if m[1] == "-" else minutes))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone [{name}]") from None


def _fields_to_millis(f: _Fields, round_up: bool, tz: tzinfo | None) -> int:
    month = f.month if f.month is not None else 1
    day = f.day if f.day is not None else 1
    if round_up:
        hour = f.hour if f.hour is not None else 23
        minute = f.minute if f.minute is not None else 59
        second = f.second if f.second is not None else 59
        nanos = f.nanos if f.nanos is not None else 999_999_999
    else:
        hour = f.hour or 0
        minute = f.minute or 0
        second = f.second or 0
        nanos = f.nanos or 0
    if not (0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 59):
        raise ValueError("time out of range")
    days = date(f.year, month, day).toordinal() - _EPOCH_ORDINAL  # validates month/day
    local = ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + nanos // 1_000_000
    if f.offset_minutes is not None:
        return local - f.offset_minutes * 60_000
    if tz is None or tz is UTC:
        return local
    naive = datetime(f.year, month, day, hour, minute, second)
    offset = naive.replace(tzinfo=tz).utcoffset() or timedelta(0)
    return local - int(offset.total_seconds() * 1000)


def parse_date(text: str, fmt: str = DEFAULT_FORMAT, *, round_up: bool = False, tz: tzinfo | None = None) -> int:
    """Epoch millis of ``text`` under the format chain ``fmt``. Raises ValueError."""
    for parser in _parsers(fmt):
        result = parser(text)
        if result is None:
            continue
        if isinstance(result, int):
            return result
        try:
            return _fields_to_millis(result, round_up, tz)
        except ValueError as exc:
            raise ValueError(f"failed to parse date field [{text}] with format [{fmt}]: {exc}") from None
    raise ValueError(f"failed to parse date field [{text}] with format [{fmt}]")


def date_text(value: object) -> str:
    """The text Elasticsearch parses for a JSON date value (numbers are read as their text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError(f"cannot parse a boolean [{str(value).lower()}] as a date")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    raise ValueError(f"cannot parse [{value!r}] as a date")


# ---------------------------------------------------------------------------------------------
# Date math

_MATH_TOKEN = re.compile(r"([+\-/])(\d*)([yMwdhHms])")


def parse_math(expr: str) -> tuple[tuple[str, int, str], ...]:
    """``+1M/d-2h`` -> ops; rounding steps are ``("/", 1, unit)``. Raises ValueError like
    JavaDateMathParser (unknown operator, truncated math, multi-unit rounding, unknown unit)."""
    ops: list[tuple[str, int, str]] = []
    i = 0
    while i < len(expr):
        op = expr[i]
        if op not in "+-/":
            raise ValueError(f"operator not supported for date math [{expr}]")
        m = _MATH_TOKEN.match(expr, i)
        if m is None:
            if i + 1 >= len(expr):
                raise ValueError(f"truncated date math [{expr}]")
            raise ValueError(f"unit not supported for date math [{expr}]")
        amount = int(m[2]) if m[2] else 1
        if op == "/" and m[2] and amount != 1:
            raise ValueError(f"rounding `/` can only be used on single unit types [{expr}]")
        ops.append((op, amount, m[3]))
        i = m.end()
    return tuple(ops)


def make_date_math(text: str, time_zone: str | None = None) -> DateMath:
    """A ``now``-anchored expression as a :class:`DateMath` node (raises ValueError)."""
    if not text.startswith("now"):
        raise ValueError(f"not a now expression [{text}]")
    ops = parse_math(text[3:])
    if time_zone is not None:
        parse_time_zone(time_zone)
    rounding = ops[-1][2] if ops and ops[-1][0] == "/" else None
    return DateMath(ops=ops, rounding=rounding, text=text, time_zone=time_zone)


def _apply(ms: int, ops: tuple[tuple[str, int, str], ...], round_up: bool, tz: tzinfo) -> int:
    for op, amount, unit in ops:
        ms = _round(ms, unit, round_up, tz) if op == "/" else _add(ms, amount if op == "+" else -amount, unit, tz)
    return ms


def _add(ms: int, amount: int, unit: str, tz: tzinfo) -> int:
    if unit in "hH":
        return ms + amount * 3_600_000
    if unit == "m":
        return ms + amount * 60_000
    if unit == "s":
        return ms + amount * 1000
    local = _to_local(ms, tz)
    if unit == "d":
        local += timedelta(days=amount)
    elif unit == "w":
        local += timedelta(weeks=amount)
    else:
        months = amount * (12 if unit == "y" else 1)
        total = local.year * 12 + (local.month - 1) + months
        year, month = divmod(total, 12)
        month += 1
        day = min(local.day, _days_in_month(year, month))
        local = local.replace(year=year, month=month, day=day)
    return _from_local(local, tz, ms % 1000)


def _round(ms: int, unit: str, round_up: bool, tz: tzinfo) -> int:
    local = _to_local(ms, tz)
    if unit == "y":
        start = local.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = start.replace(year=start.year + 1)
    elif unit == "M":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    elif unit == "w":
        start = (local - timedelta(days=local.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = start + timedelta(weeks=1)
    elif unit == "d":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = start + timedelta(days=1)
    else:
        # h/m/s: truncate on the instant (offsets are whole minutes in practice)
        size = {"h": 3_600_000, "H": 3_600_000, "m": 60_000, "s": 1000}[unit]
        offset = _offset_ms(ms, tz)
        start_ms = (ms + offset) // size * size - offset
        return start_ms + size - 1 if round_up else start_ms
    start_ms = _from_local(start, tz, 0)
    return _from_local(nxt, tz, 0) - 1 if round_up else start_ms


def _days_in_month(year: int, month: int) -> int:
    if month == 12:
        return 31
    return (date(year, month + 1, 1) - date(year, month, 1)).days


def _offset_ms(ms: int, tz: tzinfo) -> int:
    if tz is UTC:
        return 0
    off = datetime.fromtimestamp(ms / 1000, tz).utcoffset() or timedelta(0)
    return int(off.total_seconds() * 1000)


def _to_local(ms: int, tz: tzinfo) -> datetime:
    """Wall-clock time at ``ms`` in ``tz`` (naive, second precision; millis handled by callers)."""
    secs, _ = divmod(ms, 1000)
    utc = datetime(1970, 1, 1) + timedelta(seconds=secs)
    if tz is UTC:
        return utc
    return (utc.replace(tzinfo=UTC).astimezone(tz)).replace(tzinfo=None)


def _from_local(local: datetime, tz: tzinfo, millis: int) -> int:
    aware = local.replace(tzinfo=tz)
    off = aware.utcoffset() or timedelta(0)
    naive_ms = (local - datetime(1970, 1, 1)) // timedelta(milliseconds=1)
    return naive_ms - int(off.total_seconds() * 1000) + millis


def evaluate(text: str, now_ms: int, *, round_up: bool, fmt: str = DEFAULT_FORMAT, time_zone: str | None = None) -> int:
    """Epoch millis of a date or date-math expression, as ``JavaDateMathParser.parse``."""
    tz = parse_time_zone(time_zone) if time_zone else UTC
    if text.startswith("now"):
        return _apply(now_ms, parse_math(text[3:]), round_up, tz)
    index = text.find("||")
    if index < 0:
        return parse_date(text, fmt, round_up=round_up, tz=tz)
    anchor = parse_date(text[:index], fmt, round_up=False, tz=tz)
    return _apply(anchor, parse_math(text[index + 2 :]), round_up, tz)


def bound_millis(text: str, now_ms: int, *, side: str, fmt: str, time_zone: str | None) -> int:
    """An inclusive millisecond bound for ``side`` in gt/gte/lt/lte (see module docstring)."""
    if side == "gt":
        return evaluate(text, now_ms, round_up=True, fmt=fmt, time_zone=time_zone) + 1
    if side == "gte":
        return evaluate(text, now_ms, round_up=False, fmt=fmt, time_zone=time_zone)
    if side == "lt":
        return evaluate(text, now_ms, round_up=False, fmt=fmt, time_zone=time_zone) - 1
    if side == "lte":
        return evaluate(text, now_ms, round_up=True, fmt=fmt, time_zone=time_zone)
    raise ValueError(f"unknown range side {side!r}")


def _resolve_bound(bound: DateMath, now_ms: int, low: bool, inclusive: bool) -> int:
    side = ("gte" if inclusive else "gt") if low else ("lte" if inclusive else "lt")
    return bound_millis(bound.text, now_ms, side=side, fmt=DEFAULT_FORMAT, time_zone=bound.time_zone)


def resolve_range(node: Range, now_ms: int) -> ResolvedRange:
    """Concrete bounds of ``node`` at ``now_ms``. A ``DateMath`` bound becomes an inclusive
    millisecond bound (gt/lt adjusted by one millisecond as Elasticsearch does)."""
    low, low_inc, high, high_inc = node.low, node.low_inclusive, node.high, node.high_inclusive
    if isinstance(low, DateMath):
        low = _resolve_bound(low, now_ms, True, low_inc)
        low_inc = True
    if isinstance(high, DateMath):
        high = _resolve_bound(high, now_ms, False, high_inc)
        high_inc = True
    return ResolvedRange(low, low_inc, high, high_inc)
