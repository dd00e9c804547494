"""Bid request -> user document: every field, every fallback, every error path."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from rules_service.normalize import (
    BadBidError,
    bid_to_document,
    event_time_ms,
    format_timestamp_ms,
    normalise_message,
    parse_bid,
)
from rules_service.schema import USER_MAPPING

NOW_MS = int(datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC).timestamp() * 1000)

#: An OpenRTB 2.5 in-app request with every field we read.
BID_25: dict[str, Any] = {
    "id": "req-1",
    "imp": [{"id": "1", "banner": {"w": 320, "h": 50}}, {"id": "2", "banner": {"w": 728, "h": 90}}],
    "app": {"id": "a1", "bundle": "com.example.news", "cat": ["IAB12", "IAB1"]},
    "device": {
        "ifa": "ifa-123", "os": "Android", "osv": "14", "make": "Samsung", "model": "SM-S911B",
        "carrier": "Orange", "language": "fr", "devicetype": 4,
        "geo": {"lat": 48.8566, "lon": 2.3522, "city": "Paris", "zip": "75001", "region": "IDF", "country": "FRA"},
    },
    "user": {
        "id": "user-42", "yob": 1990, "gender": "F", "keywords": " sports,music , travel,,sports",
        "data": [{"id": "dmp", "segment": [{"id": "s1", "name": "auto-intender"}, {"id": "s2", "name": "music"}]}],
        "ext": {"occupation": "engineer"},
    },
    "ext": {"exchange": "adx", "received_at": 1795339800123},  # 2026-11-22T09:30:00.123Z
}

#: An OpenRTB 2.6 site request: kwarray, langb, banner.format, ISO received_at, user.geo only.
BID_26: dict[str, Any] = {
    "id": "req-2",
    "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}, {"w": 320, "h": 50}]}}],
    "site": {"domain": "news.example", "cat": ["IAB12"]},
    "device": {"ua": "Mozilla/5.0", "langb": "en-GB", "devicetype": 2, "os": "Windows"},
    "user": {"id": "user-7", "yob": 1958, "gender": "M", "kwarray": ["cars", " news "],
             "geo": {"lat": 51.5, "lon": -0.12, "city": "London", "country": "GBR"}},
    "ext": {"exchange": "openx", "received_at": "2026-11-22T23:59:59.999Z"},
}


def test_openrtb_25_every_field() -> None:
    doc = bid_to_document(BID_25, now_ms=NOW_MS)
    assert doc == {
        "user_id": "user-42",
        "age": 36,
        "age_band": "35-44",
        "gender": "female",
        "occupation": "engineer",
        "interests": ["sports", "music", "travel", "auto-intender"],
        "language": "fr",
        "geo": {"location": {"lat": 48.8566, "lon": 2.3522}, "city": "Paris", "postcode": "75001",
                "region": "IDF", "country": "FRA"},
        "device": {"os": "Android", "os_version": "14", "make": "Samsung", "model": "SM-S911B",
                   "carrier": "Orange", "type": "phone"},
        "publisher": {"bundle": "com.example.news", "category": ["IAB12", "IAB1"]},
        "exchange": "adx",
        "ad_slot": {"w": 320, "h": 50},
        "last_seen": "2026-11-22T09:30:00.123Z",
    }


def test_openrtb_26_fallbacks() -> None:
    doc = bid_to_document(BID_26, now_ms=NOW_MS)
    assert doc == {
        "user_id": "user-7",
        "age": 68,
        "age_band": "65+",
        "gender": "male",
        "interests": ["cars", "news"],
        "language": "en-GB",
        "geo": {"location": {"lat": 51.5, "lon": -0.12}, "city": "London", "country": "GBR"},
        "device": {"os": "Windows", "type": "desktop"},
        "publisher": {"domain": "news.example", "category": ["IAB12"]},
        "exchange": "openx",
        "ad_slot": {"w": 300, "h": 250},
        "last_seen": "2026-11-22T23:59:59.999Z",
    }


def test_every_document_field_is_in_the_mapping() -> None:
    def paths(mapping: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for name, spec in mapping["properties"].items():
            if "properties" in spec:
                out |= paths(spec, prefix + name + ".")
            else:
                out.add(prefix + name)
        return out

    def doc_paths(doc: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for name, value in doc.items():
            if isinstance(value, dict) and name != "location":
                out |= doc_paths(value, prefix + name + ".")
            else:
                out.add(prefix + name)
        return out

    mapped = paths(USER_MAPPING)
    for bid in (BID_25, BID_26):
        assert doc_paths(bid_to_document(bid, now_ms=NOW_MS)) <= mapped
    # and the two samples together exercise every mapped field
    both = doc_paths(bid_to_document(BID_25, now_ms=NOW_MS)) | doc_paths(bid_to_document(BID_26, now_ms=NOW_MS))
    assert both == mapped


def _with(bid: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``bid`` with ``path`` (dotted, ``[i]`` for list items) set; ``...`` deletes."""
    out = copy.deepcopy(bid)
    parts = path.replace("[", ".[").split(".")
    target: Any = out
    for part in parts[:-1]:
        target = target[int(part[1:-1])] if part.startswith("[") else target.setdefault(part, {})
    last = parts[-1]
    if value is ...:
        target.pop(last, None)
    elif last.startswith("["):
        target[int(last[1:-1])] = value
    else:
        target[last] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "field", "expected"),
    [
        # user id: user.id, else device.ifa
        ("user.id", ..., "user_id", "ifa-123"),
        ("user.id", "", "user_id", "ifa-123"),
        # gender: unknown codes are omitted
        ("user.gender", "O", "gender", "other"),
        ("user.gender", "U", "gender", None),
        ("user.gender", ..., "gender", None),
        # yob absent: no age and no band; very young: age without a band
        ("user.yob", ..., "age", None),
        ("user.yob", 2016, "age_band", None),
        ("user.yob", 2016, "age", 10),
        ("user.yob", 2008, "age_band", "18-24"),
        # geo: device.geo per field, else user.geo
        ("device.geo", ..., "geo", None),
        ("device.geo.lat", 95.0, "geo", {"city": "Paris", "postcode": "75001", "region": "IDF", "country": "FRA"}),
        ("device.geo.lon", ..., "geo", {"city": "Paris", "postcode": "75001", "region": "IDF", "country": "FRA"}),
        ("device.devicetype", 99, "device", {"os": "Android", "os_version": "14", "make": "Samsung",
                                             "model": "SM-S911B", "carrier": "Orange"}),
        ("device.devicetype", 3, "device", {"os": "Android", "os_version": "14", "make": "Samsung",
                                            "model": "SM-S911B", "carrier": "Orange", "type": "connected_tv"}),
        ("device.language", ..., "language", None),
        # publisher: app.cat, else site.cat
        ("app", ..., "publisher", None),
        ("app.cat", ..., "publisher", {"bundle": "com.example.news"}),
        ("imp", [], "ad_slot", None),
        ("imp", ..., "ad_slot", None),
        ("imp[0].banner", {"w": 300, "format": [{"w": 1, "h": 600}]}, "ad_slot", {"w": 300, "h": 600}),
        ("imp[0].banner", {"format": []}, "ad_slot", None),
        ("imp[0]", {"id": "1", "video": {}}, "ad_slot", None),
        ("ext.exchange", ..., "exchange", None),
        ("user.ext", ..., "occupation", None),
        ("user.keywords", ["a", " b"], "interests", ["a", "b", "auto-intender", "music"]),
        ("user.data", ..., "interests", ["sports", "music", "travel"]),
        ("user.keywords", "", "interests", ["auto-intender", "music"]),
    ],
)
def test_fields_and_fallbacks(path: str, value: Any, field: str, expected: Any) -> None:
    doc = bid_to_document(_with(BID_25, path, value), now_ms=NOW_MS)
    assert doc.get(field) == expected


def test_user_geo_fills_missing_device_geo_fields() -> None:
    bid = _with(BID_25, "device.geo", {"city": "Lyon"})
    bid["user"]["geo"] = {"lat": 45.76, "lon": 4.83, "city": "Nowhere", "zip": "69001", "country": "FRA"}
    assert bid_to_document(bid, now_ms=NOW_MS)["geo"] == {
        "location": {"lat": 45.76, "lon": 4.83}, "city": "Lyon", "postcode": "69001", "country": "FRA"
    }


def test_site_category_when_app_has_none() -> None:
    bid = _with(BID_25, "app.cat", ...)
    bid["site"] = {"domain": "x.example", "cat": ["IAB3"]}
    assert bid_to_document(bid, now_ms=NOW_MS)["publisher"] == {
        "bundle": "com.example.news", "domain": "x.example", "category": ["IAB3"]
    }


def test_minimal_bid_only_needs_a_user_id() -> None:
    assert bid_to_document({"device": {"ifa": "i"}}, now_ms=NOW_MS) == {
        "user_id": "i", "last_seen": "2026-11-22T10:00:00.000Z"
    }


@pytest.mark.parametrize(
    ("received_at", "log_ms", "expected"),
    [
        (1795860000123, None, "2026-11-28T10:00:00.123Z"),
        ("1795860000123", None, "2026-11-28T10:00:00.123Z"),
        (1795860000123.0, None, "2026-11-28T10:00:00.123Z"),
        ("2026-11-22T23:59:59.999Z", None, "2026-11-22T23:59:59.999Z"),
        ("2026-11-23T01:00:00+02:00", None, "2026-11-22T23:00:00.000Z"),
        ("2026-11-22T08:00:00", None, "2026-11-22T08:00:00.000Z"),  # naive: UTC
        (None, NOW_MS - 5000, "2026-11-22T09:59:55.000Z"),  # the log timestamp
        (None, None, "2026-11-22T10:00:00.000Z"),  # now
    ],
)
def test_event_time(received_at: Any, log_ms: int | None, expected: str) -> None:
    bid = _with(BID_25, "ext.received_at", ... if received_at is None else received_at)
    doc = bid_to_document(bid, log_timestamp_ms=log_ms, now_ms=NOW_MS)
    assert doc["last_seen"] == expected
    assert format_timestamp_ms(event_time_ms(bid, log_timestamp_ms=log_ms, now_ms=NOW_MS)) == expected


def test_age_uses_the_year_of_the_event() -> None:
    bid = _with(BID_25, "ext.received_at", "2027-01-01T00:00:00Z")
    assert bid_to_document(bid, now_ms=NOW_MS)["age"] == 37
    bid = _with(BID_25, "ext.received_at", "2026-12-31T23:59:59.999Z")
    assert bid_to_document(bid, now_ms=NOW_MS)["age"] == 36


def test_now_defaults_to_the_clock() -> None:
    bid = _with(BID_25, "ext.received_at", ...)
    doc = bid_to_document(bid)
    assert doc["last_seen"].startswith(datetime.now(UTC).strftime("%Y-%m-%d"))


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("user", "bob", "user"),
        ("user", ["x"], "user"),
        ("device", 3, "device"),
        ("user.id", 42, "user.id"),
        ("user.yob", "1990", "user.yob"),
        ("user.yob", True, "user.yob"),
        ("user.yob", 1990.0, "user.yob"),
        ("user.yob", 1800, "user.yob"),
        ("user.yob", 2030, "user.yob"),
        ("user.gender", 1, "user.gender"),
        ("user.ext", "x", "user.ext"),
        ("user.ext.occupation", 5, "user.ext.occupation"),
        ("user.keywords", 5, "user.keywords"),
        ("user.keywords", ["a", 1], "user.keywords[1]"),
        ("user.kwarray", "a,b", "user.kwarray"),
        ("user.data", {}, "user.data"),
        ("user.data[0]", "x", "user.data[0]"),
        ("user.data[0].segment", {}, "user.data[0].segment"),
        ("user.data[0].segment[1]", 3, "user.data[0].segment[1]"),
        ("user.data[0].segment[1].name", 3, "user.data[0].segment[1].name"),
        ("user.geo", "x", "user.geo"),
        ("device.geo", [], "device.geo"),
        ("device.geo.lat", "abc", "device.geo.lat"),
        ("device.geo.lon", True, "device.geo.lon"),
        ("device.geo.city", 75, "device.geo.city"),
        ("device.geo.zip", 75001, "device.geo.zip"),
        ("device.os", 1, "device.os"),
        ("device.osv", 14, "device.osv"),
        ("device.make", [], "device.make"),
        ("device.model", {}, "device.model"),
        ("device.carrier", 1, "device.carrier"),
        ("device.language", 1, "device.language"),
        ("device.devicetype", "phone", "device.devicetype"),
        ("device.devicetype", 4.5, "device.devicetype"),
        ("app", "x", "app"),
        ("app.bundle", 1, "app.bundle"),
        ("app.cat", "IAB1", "app.cat"),
        ("app.cat", ["IAB1", 2], "app.cat[1]"),
        ("site", 1, "site"),
        ("imp", {}, "imp"),
        ("imp[0]", "x", "imp[0]"),
        ("imp[0].banner", 1, "imp[0].banner"),
        ("imp[0].banner.w", "320", "imp[0].banner.w"),
        ("imp[0].banner", {"format": {}}, "imp[0].banner.format"),
        ("imp[0].banner", {"format": [1]}, "imp[0].banner.format[0]"),
        ("imp[0].banner", {"format": [{"w": "1", "h": 2}]}, "imp[0].banner.format[0].w"),
        # sizes beyond an integer field (a 1e300 would later break the last-seen record's encoding)
        ("imp[0].banner.w", 1e300, "imp[0].banner.w"),
        ("imp[0].banner.h", 2**31, "imp[0].banner.h"),
        ("imp[0].banner.w", -1, "imp[0].banner.w"),
        ("imp[0].banner", {"format": [{"w": 300, "h": 2**40}]}, "imp[0].banner.format[0].h"),
        ("ext", "x", "ext"),
        ("ext.exchange", 1, "ext.exchange"),
        ("ext.received_at", [], "ext.received_at"),
        ("ext.received_at", "yesterday", "ext.received_at"),
        ("ext.received_at", 1_700_000_000, "ext.received_at"),  # seconds, not millis
    ],
)
def test_wrong_types_name_the_culprit(path: str, value: Any, field: str) -> None:
    bid = _with(BID_25, path, value)
    with pytest.raises(BadBidError) as fast_lane:  # the stream's entry point, fast lane first
        normalise_message(orjson.dumps(bid), now_ms=NOW_MS)
    assert fast_lane.value.field == field
    with pytest.raises(BadBidError) as info:
        bid_to_document(bid, now_ms=NOW_MS)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")
    assert info.value.to_dict() == {"reason": info.value.reason, "field": field}


def test_ifa_is_checked_when_it_is_the_user_id() -> None:
    bid = _with(_with(BID_25, "user.id", ...), "device.ifa", 7)
    with pytest.raises(BadBidError) as info:
        bid_to_document(bid, now_ms=NOW_MS)
    assert info.value.field == "device.ifa"


def test_no_user_id() -> None:
    bid = _with(_with(BID_25, "user.id", ...), "device.ifa", ...)
    with pytest.raises(BadBidError) as info:
        bid_to_document(bid, now_ms=NOW_MS)
    assert info.value.reason == "no user id (user.id or device.ifa)"
    with pytest.raises(BadBidError, match="no user id"):
        bid_to_document({}, now_ms=NOW_MS)


def test_not_an_object() -> None:
    with pytest.raises(BadBidError):
        bid_to_document([1, 2], now_ms=NOW_MS)  # type: ignore[arg-type]


def test_parse_bid() -> None:
    assert parse_bid(orjson.dumps(BID_25)) == BID_25
    with pytest.raises(BadBidError, match="not JSON") as info:
        parse_bid(b"{nope")
    assert info.value.field is None
    with pytest.raises(BadBidError, match="must be a JSON object, got array"):
        parse_bid(b"[1]")
    with pytest.raises(BadBidError, match="got string"):
        parse_bid('"x"')


def test_input_is_not_modified() -> None:
    before = copy.deepcopy(BID_25)
    bid_to_document(BID_25, now_ms=NOW_MS)
    assert BID_25 == before
