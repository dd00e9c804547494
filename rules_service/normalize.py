"""From an OpenRTB 2.5/2.6 BidRequest to the user document of :mod:`rules_service.schema`.

:func:`bid_to_document` is on the hot path (every bid, 20k+ per second along with percolation and
counting), so it is plain dict access with inline type checks: no validation library, no
intermediate objects. :func:`parse_bid` turns the raw bytes of a log message into the dict;
:func:`normalise_message` does both in one call (what the stream worker should call).

Two lanes, one behaviour. :func:`_fast_document` is a single function for the happy path: exact
``type(x) is ...`` checks, one dict display per usual sub-object, no helper call on the usual shapes
(``_fast_*`` helpers for the rarer ones), timestamps from an hour cache. It never raises: on
anything unusual (a wrong type, a float where an int is expected, a Mapping that is not a dict, an
ISO time it does not know, an implausible time) it returns None and :func:`_careful_document`, the
original field-by-field code, produces the document or the error. So errors (their order, reason
and field) are by construction those of the careful path, and
tests/normalize/test_normalize_equivalence.py checks both lanes against a frozen copy of the
original on mutated generated bids (same documents byte for byte, key order included).

:func:`_fast_document` has a C twin, ``rules_service._normalize.fast_document`` (rules_service/_normalize.c),
used when built: the same documents, None in the same cases (plus ISO times of unusual shapes), ~2.5x fewer
instructions. :data:`USE_C` = False forces the Python lane; tests/normalize/test_normalize_accel.py compares
the two lanes.

:func:`normalise_message` first tries ``_normalize.document_from_json``: the document straight from the raw
bytes, without building the ~60 objects of the whole bid (only the values the document reads), and None on
anything outside a strict subset of JSON (escapes in values it keeps, exponents, ...), where orjson.loads and
the lanes above take over. :data:`USE_C_PARSE` = False forces orjson.loads; tests/normalize/test_parse_accel.py
checks that both give the same documents.

The document is an Elasticsearch ``_source``: nested objects (``{"geo": {"city": ...}}``), absent
fields omitted (never ``None``), so ``exists`` queries behave as in Elasticsearch.

Decisions (documented here because rules are written against them):

* ``user_id``: ``user.id``, else ``device.ifa`` (non-empty strings). Neither -> BadBidError.
* ``age``: UTC year of the event minus ``user.yob``. ``yob`` must be an integer (``true`` is not);
  an age outside 0..120 is rejected naming ``user.yob``. ``age_band`` follows :func:`schema.age_band`
  (absent under 13).
* ``gender``: M/F/O -> male/female/other; any other string is omitted (exchanges send "U", "" ...).
* ``interests``: ``user.keywords`` split on commas, each value stripped (case kept: keyword fields
  are case-sensitive and advertisers write rules against the values exchanges send), plus the
  OpenRTB 2.6 ``user.kwarray`` strings, plus ``user.data[].segment[].name``; empty values dropped,
  duplicates removed keeping the first occurrence.
* ``language``: ``device.language``, else the 2.6 ``device.langb``.
* ``geo.*``: each field from ``device.geo``, else from ``user.geo``. ``geo.location`` is
  ``{"lat", "lon"}`` only when both are numbers within range (a pair out of range is omitted; a
  non-number is an error naming it).
* ``device.type``: devicetype code -> :data:`schema.DEVICE_TYPES` name; unknown codes omitted.
* ``publisher.category``: ``app.cat``, else ``site.cat`` (a list of strings).
* ``ad_slot``: the first imp's ``banner.w``/``banner.h``, else its ``banner.format[0]``.
* ``last_seen``: ISO 8601 UTC with millis (``2026-11-22T10:00:00.000Z``) of the event time:
  ``ext.received_at`` (epoch millis, or an ISO 8601 string; naive means UTC), else the log
  message's timestamp, else now. :func:`event_time_ms` exposes the same choice as epoch millis.

Wrong types raise :class:`BadBidError` whose ``field`` is the JSON path of the culprit
(``device.geo.lat``, ``imp[0].banner.w``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from rules_service.schema import DEVICE_TYPES, GENDERS, age_band

try:  # the C twin of _fast_document (setup.py builds it; optional, the Python lane is the reference)
    from rules_service import _normalize  # type: ignore[attr-defined, unused-ignore]
except ImportError:  # pragma: no cover - not built
    _normalize = None

__all__ = ["BadBidError", "bid_to_document", "event_time_ms", "format_timestamp_ms", "normalise_message", "parse_bid"]

#: Oldest and newest plausible event times for ``ext.received_at`` (2000-01-01 .. 2100-01-01).
_MIN_EVENT_MS = 946_684_800_000
_MAX_EVENT_MS = 4_102_444_800_000
MAX_AGE = 120

_GENDERS = GENDERS
_DEVICE_TYPES = DEVICE_TYPES


class BadBidError(ValueError):
    """A message that is not a valid BidRequest. ``reason`` is a sentence, ``field`` the JSON path
    of the culprit (None when the whole message is at fault). ``str()`` gives both."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "field": self.field}


def parse_bid(raw: bytes | str) -> dict[str, Any]:
    """Decode one message. Raises BadBidError when it is not JSON or not a JSON object."""
    try:
        bid = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadBidError(f"not JSON: {exc}") from None
    if not isinstance(bid, dict):
        raise BadBidError(f"a BidRequest must be a JSON object, got {_json_type(bid)}")
    return bid


def _json_type(value: Any) -> str:
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
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _wrong(path: str, expected: str, value: Any) -> BadBidError:
    return BadBidError(f"expected {expected}, got {_json_type(value)}", path)


def _obj(parent: Mapping[str, Any], key: str, path: str) -> dict[str, Any] | None:
    value = parent.get(key)
    if value is None or type(value) is dict:
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise _wrong(path, "an object", value)


def _str(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    """A non-empty string, None when absent/null/empty; anything else is an error."""
    value = parent.get(key)
    if value is None:
        return None
    if type(value) is str:
        return value or None
    raise _wrong(path, "a string", value)


def _int(parent: Mapping[str, Any], key: str, path: str) -> int | None:
    value = parent.get(key)
    if value is None:
        return None
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    raise _wrong(path, "an integer", value)


#: ``ad_slot.w``/``h`` are ``integer`` fields: a size outside 0..2^31-1 is a bad bid (Elasticsearch
#: would reject the document, and the last-seen record could not be encoded).
MAX_SLOT_SIZE = 2**31 - 1


def _size(parent: Mapping[str, Any], key: str, path: str) -> int | None:
    value = _int(parent, key, path)
    if value is not None and not 0 <= value <= MAX_SLOT_SIZE:
        raise BadBidError(f"must be between 0 and {MAX_SLOT_SIZE}, got {value}", path)
    return value


def _num(parent: Mapping[str, Any], key: str, path: str) -> float | None:
    value = parent.get(key)
    if value is None:
        return None
    if type(value) is float or type(value) is int:
        return value
    raise _wrong(path, "a number", value)


def _str_list(parent: Mapping[str, Any], key: str, path: str) -> list[str] | None:
    value = parent.get(key)
    if value is None:
        return None
    if type(value) is not list:
        raise _wrong(path, "an array of strings", value)
    for i, item in enumerate(value):
        if type(item) is not str:
            raise _wrong(f"{path}[{i}]", "a string", item)
    return [item for item in value if item] or None


def _parse_iso_ms(text: str, path: str) -> int:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadBidError(f"not an ISO 8601 time: {text!r}", path) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def event_time_ms(bid: Mapping[str, Any], *, log_timestamp_ms: int | None = None, now_ms: int | None = None) -> int:
    """The event time of a bid in epoch millis: ``ext.received_at``, else the log timestamp, else now."""
    ext = bid.get("ext")
    if ext is not None:
        if not isinstance(ext, Mapping):
            raise _wrong("ext", "an object", ext)
        received = ext.get("received_at")
        if received is not None:
            if type(received) is int or type(received) is float:
                ms = int(received)
            elif type(received) is str:
                ms = int(received) if received.isdigit() else _parse_iso_ms(received, "ext.received_at")
            else:
                raise _wrong("ext.received_at", "epoch millis or an ISO 8601 string", received)
            if not _MIN_EVENT_MS <= ms < _MAX_EVENT_MS:
                raise BadBidError(f"{received!r} is not a plausible time in epoch millis", "ext.received_at")
            return ms
    if log_timestamp_ms is not None:
        return int(log_timestamp_ms)
    return int(time.time() * 1000) if now_ms is None else int(now_ms)


# gmtime is the costly part of formatting; events of a batch share few seconds, so cache them.
_SECOND_CACHE: dict[int, tuple[str, int]] = {}


def _second_prefix(seconds: int) -> tuple[str, int]:
    """``("2026-11-22T10:00:00", year)`` for an epoch second (cached)."""
    hit = _SECOND_CACHE.get(seconds)
    if hit is None:
        if len(_SECOND_CACHE) > 4096:
            _SECOND_CACHE.clear()
        t = time.gmtime(seconds)
        hit = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}",
            t.tm_year,
        )
        _SECOND_CACHE[seconds] = hit
    return hit


def format_timestamp_ms(ms: int) -> str:
    """Epoch millis -> ``2026-11-22T10:00:00.000Z``."""
    if type(ms) is int and _MIN_EVENT_MS <= ms < _MAX_EVENT_MS:
        hour, rest = divmod(ms, 3_600_000)
        hit = _HOUR_CACHE.get(hour) or _hour_prefix(hour)
        second, millis = divmod(rest, 1000)
        return f"{hit[0]}{_MMSS[second]}{_MILLIS[millis]}"
    seconds, millis = divmod(ms, 1000)
    return f"{_second_prefix(seconds)[0]}.{millis:03d}Z"


# The fast lane formats from the hour: "YYYY-MM-DDTHH:" (cached per hour, a few thousand cover 90 days)
# + "MM:SS." (table of the 3600 seconds of an hour) + "mmmZ" (table of the 1000 millis). Only for
# plausible times (2000..2100), where an hour never straddles a year.
_HOUR_CACHE: dict[int, tuple[str, int]] = {}
_MMSS = tuple(f"{m:02d}:{s:02d}." for m in range(60) for s in range(60))
_MILLIS = tuple(f"{i:03d}Z" for i in range(1000))


def _hour_prefix(hour: int) -> tuple[str, int]:
    """``("2026-11-22T10:", 2026)`` for an epoch hour (cached)."""
    if len(_HOUR_CACHE) > 8192:
        _HOUR_CACHE.clear()
    t = time.gmtime(hour * 3600)
    hit = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:", t.tm_year)
    _HOUR_CACHE[hour] = hit
    return hit


# ISO 8601 event times as exchanges send them ("2026-11-22T10:00:00.123Z"): "2026-11-22T10:" -> the epoch
# microseconds of that hour (cached; validated once by datetime.fromisoformat on a whole string of that hour),
# "00:00." -> microseconds into the hour, "123Z" -> microseconds into the second (tables). The result is
# computed as the original does (float seconds * 1000, truncated), so rounding is identical.
_ISO_HOUR_CACHE: dict[str, int] = {}
_ISO_MMSS = {f"{m:02d}:{s:02d}.": (m * 60 + s) * 1_000_000 for m in range(60) for s in range(60)}
_ISO_MILLIS = {f"{i:03d}Z": i * 1000 for i in range(1000)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso_z_ms(text: str) -> int | None:
    """Epoch millis of ``YYYY-MM-DDTHH:MM:SS.mmmZ``; None for any other shape (the careful path decides)."""
    in_hour = _ISO_MMSS.get(text[14:20])
    in_second = _ISO_MILLIS.get(text[20:])
    if in_hour is None or in_second is None or len(text) != 24:
        return None
    prefix = text[:14]
    base_us = _ISO_HOUR_CACHE.get(prefix)
    if base_us is None:
        # hour 24 is refused outright: "24:00:00" may be valid where "24:01:00" is not
        if not (prefix.isascii() and prefix[10] == "T" and prefix[13] == ":" and prefix[11:13] < "24"):
            return None
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        if parsed.tzinfo is not UTC:
            return None
        base_us = (parsed - _EPOCH) // _ONE_US - in_hour - in_second
        if len(_ISO_HOUR_CACHE) > 8192:
            _ISO_HOUR_CACHE.clear()
        _ISO_HOUR_CACHE[prefix] = base_us
    return int((base_us + in_hour + in_second) / 1_000_000 * 1000)


_ONE_US = timedelta(microseconds=1)


def bid_to_document(
    bid: Mapping[str, Any], *, log_timestamp_ms: int | None = None, now_ms: int | None = None
) -> dict[str, Any]:
    """The user document of one BidRequest (see the module docstring). Raises BadBidError."""
    if type(bid) is dict:
        doc = (_c_fast_document if USE_C else _fast_document)(bid, log_timestamp_ms, now_ms)
        if doc is not None:
            return doc
    return _careful_document(bid, log_timestamp_ms, now_ms)


def normalise_message(raw: bytes | str, log_timestamp_ms: int | None = None,
                      now_ms: int | None = None) -> dict[str, Any]:
    """``bid_to_document(parse_bid(raw), ...)`` in one call: the stream worker's normaliser."""
    if USE_C_PARSE and USE_C:  # straight from the bytes when they are plain (None: the usual lanes)
        doc = _c_document_from_json(raw, log_timestamp_ms, now_ms)
        if doc is not None:
            return doc
    try:
        bid = _loads(raw)
    except JSONDecodeError as exc:
        raise BadBidError(f"not JSON: {exc}") from None
    if type(bid) is dict:
        doc = (_c_fast_document if USE_C else _fast_document)(bid, log_timestamp_ms, now_ms)
        if doc is not None:
            return doc
    elif not isinstance(bid, dict):
        raise BadBidError(f"a BidRequest must be a JSON object, got {_json_type(bid)}")
    return _careful_document(bid, log_timestamp_ms, now_ms)


_loads = orjson.loads
JSONDecodeError = orjson.JSONDecodeError
_strip = str.strip
_fromkeys = dict.fromkeys
_AGE_BAND_BY_AGE = tuple(age_band(age) for age in range(MAX_AGE + 1))


def _fast_document(bid: dict[str, Any], log_timestamp_ms: int | None, now_ms: int | None) -> dict[str, Any] | None:
    """The happy path of :func:`_careful_document` in one function; None means "not sure, ask the careful path".

    Never raises. Every value is checked with ``type(x) is ...`` before use; the first surprise returns
    None. The usual shapes (every device field, a complete device.geo, one app or site, a banner with w
    and h, every document field) are built with one dict display each; anything else goes through the
    ``_fast_*`` helpers, which follow the careful path field by field. Keys are inserted in the careful
    path's order, so documents serialise to the same bytes.
    """
    user: Any = bid.get("user")
    device: Any = bid.get("device")
    ext: Any = bid.get("ext")

    # user id: user.id, else device.ifa
    user_id: Any = None
    if user is not None:
        if type(user) is not dict:
            return None
        user_id = user.get("id")
        if type(user_id) is not str and user_id is not None:
            return None
    if device is not None and type(device) is not dict:
        return None
    if not user_id:
        if device is None:
            return None
        user_id = device.get("ifa")
        if type(user_id) is not str or not user_id:
            return None

    # event time: ext.received_at, else the log timestamp, else now (plausible times only); ext.exchange
    ms: Any = None
    exchange: Any = None
    if ext is not None:
        if type(ext) is not dict:
            return None
        received = ext.get("received_at")
        if type(received) is int:
            ms = received
        elif received is not None:
            if type(received) is not str:
                return None
            if len(received) == 24:
                ms = _iso_z_ms(received)
            elif received.isascii() and received.isdigit():
                ms = int(received)
            if ms is None:
                return None
        exchange = ext.get("exchange")
        if type(exchange) is not str:
            if exchange is not None:
                return None
        elif not exchange:
            exchange = None
    if ms is None:
        if log_timestamp_ms is not None:
            ms = log_timestamp_ms
        elif now_ms is not None:
            ms = now_ms
        else:
            ms = int(time.time() * 1000)
        if type(ms) is not int:
            return None
    if not _MIN_EVENT_MS <= ms < _MAX_EVENT_MS:
        return None
    hour = ms // 3_600_000
    hit = _HOUR_CACHE.get(hour) or _hour_prefix(hour)
    rest = ms - hour * 3_600_000  # millis within the hour: one machine word, so // and % are cheap

    age: Any = None
    band: Any = None
    gender: Any = None
    occupation: Any = None
    interests: Any = None
    user_geo: Any = None
    if user is not None:
        age = user.get("yob")
        if age is not None:
            if type(age) is not int:
                return None
            age = hit[1] - age
            if not 0 <= age <= MAX_AGE:
                return None
            band = _AGE_BAND_BY_AGE[age]
        gender = user.get("gender")
        if gender is not None:
            if type(gender) is not str:
                return None
            gender = _GENDERS.get(gender)
        occupation = user.get("ext")
        if occupation is not None:
            if type(occupation) is not dict:
                return None
            occupation = occupation.get("occupation")
            if type(occupation) is not str:
                if occupation is not None:
                    return None
            elif not occupation:
                occupation = None
        keywords = user.get("keywords")
        kwarray = user.get("kwarray")
        data = user.get("data")
        if kwarray is None and data is None and type(keywords) is str:
            if keywords:  # interests: keywords split on commas, stripped, deduplicated, no ""
                interests = list(_fromkeys(map(_strip, keywords.split(","))))
                if "" in interests:
                    interests.remove("")
        elif keywords is not None or kwarray is not None or data is not None:
            interests = _fast_interests(keywords, kwarray, data)
            if interests is None:
                return None
        if not interests:
            interests = None
        user_geo = user.get("geo")
        if user_geo is not None and type(user_geo) is not dict:
            return None

    language: Any = None
    dev: Any = None
    device_geo: Any = None
    if device is not None:
        language = device.get("language")
        if type(language) is not str or not language:
            if language is not None and type(language) is not str:
                return None
            language = device.get("langb")
            if type(language) is not str:
                if language is not None:
                    return None
            elif not language:
                language = None
        os_ = device.get("os")
        osv = device.get("osv")
        make = device.get("make")
        model = device.get("model")
        carrier = device.get("carrier")
        code = device.get("devicetype")
        if (type(os_) is str and type(osv) is str and type(make) is str and type(model) is str
                and type(carrier) is str and type(code) is int and os_ and osv and make and model and carrier):
            type_name = _DEVICE_TYPES.get(code)
            if type_name is not None:
                dev = {"os": os_, "os_version": osv, "make": make, "model": model, "carrier": carrier,
                       "type": type_name}
            else:
                dev = {"os": os_, "os_version": osv, "make": make, "model": model, "carrier": carrier}
        else:
            dev = _fast_device(os_, osv, make, model, carrier, code)
            if dev is None:
                return None
            if not dev:
                dev = None
        device_geo = device.get("geo")
        if device_geo is not None and type(device_geo) is not dict:
            return None

    geo: Any = None
    if device_geo is not None and user_geo is None:
        lat = device_geo.get("lat")
        lon = device_geo.get("lon")
        city = device_geo.get("city")
        postcode = device_geo.get("zip")
        region = device_geo.get("region")
        country = device_geo.get("country")
        if (type(lat) is float and type(lon) is float and type(city) is str and type(postcode) is str
                and type(region) is str and type(country) is str and city and postcode and region and country
                and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            geo = {"location": {"lat": lat, "lon": lon}, "city": city, "postcode": postcode, "region": region,
                   "country": country}
    if geo is None and (device_geo is not None or user_geo is not None):
        geo = _fast_geo(device_geo, user_geo)
        if geo is None:
            return None
        if not geo:
            geo = None

    app: Any = bid.get("app")
    site: Any = bid.get("site")
    publisher: Any = None
    if app is not None or site is not None:
        source = app if site is None else site if app is None else None
        if type(source) is dict:  # one of app or site (the usual case): bundle or domain, and one category
            name = source.get("bundle" if source is app else "domain")
            category = source.get("cat")
            if type(name) is str and name and type(category) is list and len(category) == 1:
                first = category[0]
                if type(first) is str and first:
                    publisher = {"bundle" if source is app else "domain": name, "category": [first]}
        if publisher is None:
            publisher = _fast_publisher(app, site)
            if publisher is None:
                return None
            if not publisher:
                publisher = None

    slot: Any = None
    imps: Any = bid.get("imp")
    if imps is not None:
        if type(imps) is not list:
            return None
        if imps:
            imp = imps[0]
            if type(imp) is not dict:
                return None
            banner = imp.get("banner")
            if banner is not None:
                if type(banner) is not dict:
                    return None
                w = banner.get("w")
                h = banner.get("h")
                if type(w) is int and type(h) is int and 0 <= w <= MAX_SLOT_SIZE and 0 <= h <= MAX_SLOT_SIZE:
                    slot = {"w": w, "h": h}
                else:
                    slot = _fast_slot(banner, w, h)
                    if slot is None:
                        return None
                    if not slot:
                        slot = None

    last_seen = f"{hit[0]}{_MMSS[rest // 1000]}{_MILLIS[rest % 1000]}"
    if (band is not None and gender is not None and occupation is not None and interests is not None
            and language is not None and dev is not None and geo is not None and publisher is not None
            and exchange is not None and slot is not None):  # every field: one presized dict
        return {"user_id": user_id, "age": age, "age_band": band, "gender": gender, "occupation": occupation,
                "interests": interests, "language": language, "device": dev, "geo": geo, "publisher": publisher,
                "exchange": exchange, "ad_slot": slot, "last_seen": last_seen}
    doc: dict[str, Any] = {"user_id": user_id}
    if age is not None:
        doc["age"] = age
        if band is not None:
            doc["age_band"] = band
    if gender is not None:
        doc["gender"] = gender
    if occupation is not None:
        doc["occupation"] = occupation
    if interests is not None:
        doc["interests"] = interests
    if language is not None:
        doc["language"] = language
    if dev is not None:
        doc["device"] = dev
    if geo is not None:
        doc["geo"] = geo
    if publisher is not None:
        doc["publisher"] = publisher
    if exchange is not None:
        doc["exchange"] = exchange
    if slot is not None:
        doc["ad_slot"] = slot
    doc["last_seen"] = last_seen
    return doc


#: The fast lane in C (rules_service/_normalize.c): the same documents as :func:`_fast_document` and None in
#: the same cases, plus ISO 8601 ``ext.received_at`` strings not shaped ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (the
#: careful path decides those). Set False to force the Python lane (tests, benchmarks); False when not built.
USE_C = _normalize is not None
_c_fast_document: Any = _normalize.fast_document if _normalize is not None else _fast_document

#: The bytes-to-document lane in C (``_normalize.document_from_json``): one scan of the message that validates
#: all of it and builds only the values the document reads, then the C fast lane; None (then orjson.loads and
#: the lanes above) for anything outside a strict subset of JSON. Set False to force orjson.loads (tests,
#: benchmarks); False when not built. Used only while :data:`USE_C` is True.
_c_document_from_json: Any = getattr(_normalize, "document_from_json", None)
USE_C_PARSE = _c_document_from_json is not None


# The _fast_* helpers handle the less usual shapes for _fast_document: None = bail out, {} or [] = nothing.


def _fast_interests(keywords: Any, kwarray: Any, data: Any) -> list[str] | None:
    found: list[str] = []
    if keywords is not None:
        if type(keywords) is not str:
            return None  # (a list under the 2.5 name: the careful path)
        if keywords:
            found = list(map(_strip, keywords.split(",")))
    if kwarray is not None:
        if type(kwarray) is not list:
            return None
        for item in kwarray:
            if type(item) is not str:
                return None
        found.extend([item.strip() for item in kwarray if item])
    if data is not None:
        if type(data) is not list:
            return None
        for provider in data:
            if type(provider) is not dict:
                return None
            segments = provider.get("segment")
            if segments is None:
                continue
            if type(segments) is not list:
                return None
            for segment in segments:
                if type(segment) is not dict:
                    return None
                name = segment.get("name")
                if type(name) is str:
                    if name:
                        found.append(name.strip())
                elif name is not None:
                    return None
    interests = list(_fromkeys(found))
    if "" in interests:
        interests.remove("")
    return interests


def _fast_device(os_: Any, osv: Any, make: Any, model: Any, carrier: Any, code: Any) -> dict[str, Any] | None:
    dev: dict[str, Any] = {}
    for target, value in (("os", os_), ("os_version", osv), ("make", make), ("model", model),
                          ("carrier", carrier)):
        if type(value) is str:
            if value:
                dev[target] = value
        elif value is not None:
            return None
    if type(code) is int:
        type_name = _DEVICE_TYPES.get(code)
        if type_name is not None:
            dev["type"] = type_name
    elif code is not None:
        return None
    return dev


def _fast_geo(device_geo: dict[str, Any] | None, user_geo: dict[str, Any] | None) -> dict[str, Any] | None:
    geo: dict[str, Any] = {}
    for source in (device_geo, user_geo):  # device.geo's location, else user.geo's
        if source is None:
            continue
        lat = source.get("lat")
        lon = source.get("lon")
        if (lat is not None and type(lat) is not float and type(lat) is not int) or (
                lon is not None and type(lon) is not float and type(lon) is not int):
            return None
        if lat is not None and lon is not None and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0:
            geo["location"] = {"lat": lat, "lon": lon}
            break
    for source_key, target in _GEO_FIELDS:  # each field from device.geo, else user.geo
        value = device_geo.get(source_key) if device_geo is not None else None
        if type(value) is str and value:
            geo[target] = value
            continue
        if value is not None and type(value) is not str:
            return None
        if user_geo is not None:
            value = user_geo.get(source_key)
            if type(value) is str:
                if value:
                    geo[target] = value
            elif value is not None:
                return None
    return geo


def _fast_str_list(value: Any) -> list[str] | None:
    """A category list without "" nor duplicates; None to bail out (not a list of strings)."""
    if type(value) is not list:
        return None
    for item in value:
        if type(item) is not str:
            return None
    category = list(_fromkeys(value))
    if "" in category:
        category.remove("")
    return category


def _fast_publisher(app: Any, site: Any) -> dict[str, Any] | None:
    publisher: dict[str, Any] = {}
    category: list[str] | None = None
    if app is not None:
        if type(app) is not dict:
            return None
        value = app.get("bundle")
        if type(value) is str:
            if value:
                publisher["bundle"] = value
        elif value is not None:
            return None
        value = app.get("cat")
        if value is not None:
            category = _fast_str_list(value)
            if category is None:
                return None
    if site is not None:
        if type(site) is not dict:
            return None
        value = site.get("domain")
        if type(value) is str:
            if value:
                publisher["domain"] = value
        elif value is not None:
            return None
        if not category:
            value = site.get("cat")
            if value is not None:
                category = _fast_str_list(value)
                if category is None:
                    return None
    if category:
        publisher["category"] = category
    return publisher


def _fast_slot(banner: dict[str, Any], w: Any, h: Any) -> dict[str, Any] | None:
    if (w is not None and type(w) is not int) or (h is not None and type(h) is not int):
        return None
    if w is None or h is None:
        formats = banner.get("format")
        if formats is not None:
            if type(formats) is not list:
                return None
            if formats:
                first = formats[0]
                if type(first) is not dict:
                    return None
                if w is None:
                    w = first.get("w")
                    if w is not None and type(w) is not int:
                        return None
                if h is None:
                    h = first.get("h")
                    if h is not None and type(h) is not int:
                        return None
    if (w is not None and not 0 <= w <= MAX_SLOT_SIZE) or (h is not None and not 0 <= h <= MAX_SLOT_SIZE):
        return None
    if w is not None:
        return {"w": w} if h is None else {"w": w, "h": h}
    return {} if h is None else {"h": h}


def _careful_document(bid: Mapping[str, Any], log_timestamp_ms: int | None, now_ms: int | None) -> dict[str, Any]:
    """The reference normaliser: field by field through small checked helpers; raises BadBidError."""
    if not isinstance(bid, Mapping):
        raise _wrong("", "a BidRequest object", bid)
    user = _obj(bid, "user", "user")
    device = _obj(bid, "device", "device")

    user_id = _str(user, "id", "user.id") if user is not None else None
    if user_id is None:
        user_id = _str(device, "ifa", "device.ifa") if device is not None else None
        if user_id is None:
            raise BadBidError("no user id (user.id or device.ifa)", "user.id")

    ms = event_time_ms(bid, log_timestamp_ms=log_timestamp_ms, now_ms=now_ms)
    seconds, millis = divmod(ms, 1000)
    prefix, year = _second_prefix(seconds)
    doc: dict[str, Any] = {"user_id": user_id}

    user_geo = None
    if user is not None:
        yob = user.get("yob")
        if yob is not None:
            if type(yob) is not int:
                raise _wrong("user.yob", "an integer year", yob)
            age = year - yob
            if not 0 <= age <= MAX_AGE:
                raise BadBidError(f"year of birth {yob} gives an age of {age} in {year} (expected 0..{MAX_AGE})",
                                  "user.yob")
            doc["age"] = age
            band = age_band(age)
            if band is not None:
                doc["age_band"] = band
        gender = user.get("gender")
        if gender is not None:
            if type(gender) is not str:
                raise _wrong("user.gender", "a string (M, F or O)", gender)
            name = _GENDERS.get(gender)
            if name is not None:
                doc["gender"] = name
        user_ext = _obj(user, "ext", "user.ext")
        if user_ext is not None:
            occupation = _str(user_ext, "occupation", "user.ext.occupation")
            if occupation is not None:
                doc["occupation"] = occupation
        interests = _interests(user)
        if interests:
            doc["interests"] = interests
        user_geo = _obj(user, "geo", "user.geo")

    device_geo = None
    if device is not None:
        language = _str(device, "language", "device.language") or _str(device, "langb", "device.langb")
        if language is not None:
            doc["language"] = language
        dev: dict[str, Any] = {}
        for source, target in (("os", "os"), ("osv", "os_version"), ("make", "make"), ("model", "model"),
                               ("carrier", "carrier")):
            value = _str(device, source, "device." + source)
            if value is not None:
                dev[target] = value
        code = _int(device, "devicetype", "device.devicetype")
        if code is not None:
            type_name = _DEVICE_TYPES.get(code)
            if type_name is not None:
                dev["type"] = type_name
        if dev:
            doc["device"] = dev
        device_geo = _obj(device, "geo", "device.geo")

    if device_geo is not None or user_geo is not None:
        geo = _geo(device_geo, user_geo)
        if geo:
            doc["geo"] = geo

    publisher = _publisher(bid)
    if publisher:
        doc["publisher"] = publisher

    ext = bid.get("ext")
    if ext is not None:  # type checked by event_time_ms
        exchange = _str(ext, "exchange", "ext.exchange")
        if exchange is not None:
            doc["exchange"] = exchange

    slot = _ad_slot(bid)
    if slot:
        doc["ad_slot"] = slot

    doc["last_seen"] = f"{prefix}.{millis:03d}Z"
    return doc


def _interests(user: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    keywords = user.get("keywords")
    if keywords is not None:
        if type(keywords) is str:
            if keywords:
                found.extend(part.strip() for part in keywords.split(","))
        elif type(keywords) is list:  # some exchanges send 2.6 kwarray under the 2.5 name
            found.extend(item.strip() for item in _str_list(user, "keywords", "user.keywords") or ())
        else:
            raise _wrong("user.keywords", "a comma-separated string", keywords)
    kwarray = _str_list(user, "kwarray", "user.kwarray")
    if kwarray:
        found.extend(item.strip() for item in kwarray)
    data = user.get("data")
    if data is not None:
        if type(data) is not list:
            raise _wrong("user.data", "an array", data)
        for i, provider in enumerate(data):
            if type(provider) is not dict:
                raise _wrong(f"user.data[{i}]", "an object", provider)
            segments = provider.get("segment")
            if segments is None:
                continue
            if type(segments) is not list:
                raise _wrong(f"user.data[{i}].segment", "an array", segments)
            for j, segment in enumerate(segments):
                if type(segment) is not dict:
                    raise _wrong(f"user.data[{i}].segment[{j}]", "an object", segment)
                name = _str(segment, "name", f"user.data[{i}].segment[{j}].name")
                if name is not None:
                    found.append(name.strip())
    if not found:
        return found
    return [value for value in dict.fromkeys(found) if value]


_GEO_FIELDS = (("city", "city"), ("zip", "postcode"), ("region", "region"), ("country", "country"))


def _geo(device_geo: Mapping[str, Any] | None, user_geo: Mapping[str, Any] | None) -> dict[str, Any]:
    geo: dict[str, Any] = {}
    location = None
    if device_geo is not None:
        location = _location(device_geo, "device.geo")
    if location is None and user_geo is not None:
        location = _location(user_geo, "user.geo")
    if location is not None:
        geo["location"] = location
    for source, target in _GEO_FIELDS:
        value = _str(device_geo, source, "device.geo." + source) if device_geo is not None else None
        if value is None and user_geo is not None:
            value = _str(user_geo, source, "user.geo." + source)
        if value is not None:
            geo[target] = value
    return geo


def _location(geo: Mapping[str, Any], path: str) -> dict[str, float] | None:
    lat = _num(geo, "lat", path + ".lat")
    lon = _num(geo, "lon", path + ".lon")
    if lat is None or lon is None or not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    return {"lat": lat, "lon": lon}


def _publisher(bid: Mapping[str, Any]) -> dict[str, Any]:
    publisher: dict[str, Any] = {}
    app = _obj(bid, "app", "app")
    site = _obj(bid, "site", "site")
    category = None
    if app is not None:
        bundle = _str(app, "bundle", "app.bundle")
        if bundle is not None:
            publisher["bundle"] = bundle
        category = _str_list(app, "cat", "app.cat")
    if site is not None:
        domain = _str(site, "domain", "site.domain")
        if domain is not None:
            publisher["domain"] = domain
        if category is None:
            category = _str_list(site, "cat", "site.cat")
    if category:
        publisher["category"] = list(dict.fromkeys(category))
    return publisher


def _ad_slot(bid: Mapping[str, Any]) -> dict[str, int]:
    imps = bid.get("imp")
    if imps is None:
        return {}
    if type(imps) is not list:
        raise _wrong("imp", "an array", imps)
    if not imps:
        return {}
    imp = imps[0]
    if type(imp) is not dict:
        raise _wrong("imp[0]", "an object", imp)
    banner = _obj(imp, "banner", "imp[0].banner")
    if banner is None:
        return {}
    slot: dict[str, int] = {}
    w = _size(banner, "w", "imp[0].banner.w")
    h = _size(banner, "h", "imp[0].banner.h")
    if w is None or h is None:
        formats = banner.get("format")
        if formats is not None:
            if type(formats) is not list:
                raise _wrong("imp[0].banner.format", "an array", formats)
            if formats:
                first = formats[0]
                if type(first) is not dict:
                    raise _wrong("imp[0].banner.format[0]", "an object", first)
                if w is None:
                    w = _size(first, "w", "imp[0].banner.format[0].w")
                if h is None:
                    h = _size(first, "h", "imp[0].banner.format[0].h")
    if w is not None:
        slot["w"] = w
    if h is not None:
        slot["h"] = h
    return slot
