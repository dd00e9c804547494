"""FROZEN reference: rules_service/normalize.py as of commit d113fc8, before the fast lane.

Do not edit or "fix" this module: tests/normalize/test_normalize_equivalence.py checks that the
optimised normaliser gives byte-for-byte the same documents and the same errors (type, reason,
field) as this one. One deliberate change since: ad slot sizes outside 0..2^31-1 are rejected
(``_size``), in both modules. The original module docstring follows.

From an OpenRTB 2.5/2.6 BidRequest to the user document of :mod:`rules_service.schema`.

:func:`bid_to_document` is on the hot path (every bid, 20k+ per second along with percolation and
counting), so it is plain dict access with inline type checks: no validation library, no
intermediate objects. :func:`parse_bid` turns the raw bytes of a log message into the dict.

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
from datetime import UTC, datetime
from typing import Any

import orjson

from rules_service.schema import DEVICE_TYPES, GENDERS, age_band

__all__ = ["BadBidError", "bid_to_document", "event_time_ms", "format_timestamp_ms", "parse_bid"]

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
    seconds, millis = divmod(ms, 1000)
    return f"{_second_prefix(seconds)[0]}.{millis:03d}Z"


def bid_to_document(
    bid: Mapping[str, Any], *, log_timestamp_ms: int | None = None, now_ms: int | None = None
) -> dict[str, Any]:
    """The user document of one BidRequest (see the module docstring). Raises BadBidError."""
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
