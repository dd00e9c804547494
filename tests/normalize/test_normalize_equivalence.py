"""The optimised normaliser against a frozen copy of the original (tests/normalize/reference_normalize.py).

"Equal" is strict: the same document serialised byte for byte by orjson (so the same key order, which
``users.last_seen`` records carry) and the same Python types (``repr``: 1 is not 1.0, True is not 1), or the
same exception: class name, ``str()``, ``reason`` and ``field``. Inputs: generated bids (workers.bidgen, the
realistic happy path) mutated at random (wrong types, nulls, deletions, empty and unicode strings, huge values,
ISO/millis/string event times, user.geo fallbacks, data segments, kwarray, banner formats), hand-written edge
cases, raw bytes (broken JSON, non-objects) and a hypothesis property over arbitrary JSON values.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules_service import normalize as new
from tests.normalize import reference_normalize as ref
from workers.bidgen import BidGenerator

NOW_MS = 1_795_860_000_000  # 2026-11-28T10:00:00Z

Outcome = tuple[Any, ...]


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    """What a call gave, comparable across lanes: ("error", type, message, reason, field),
    ("none",) (a fast lane's "not sure"), or ("ok", its orjson bytes, its repr: key order, types)."""
    try:
        doc = fn(*args, **kwargs)
    except Exception as exc:  # any exception must match too
        return ("error", type(exc).__name__, str(exc), getattr(exc, "reason", None), getattr(exc, "field", None))
    if doc is None:
        return ("none",)
    return ("ok", _dumps(doc), repr(doc))


def _dumps(doc: Any) -> bytes | None:
    """The users.last_seen bytes; ``repr`` (insertion order, exact types) covers what orjson refuses."""
    try:
        return orjson.dumps(doc)
    except TypeError:  # the original passes integral floats like 1e300 through int(): not 64-bit
        return None


def assert_same(bid: Any, log_ms: int | None = None, now_ms: int | None = NOW_MS) -> Outcome:
    expected = outcome(ref.bid_to_document, bid, log_timestamp_ms=log_ms, now_ms=now_ms)
    got = outcome(new.bid_to_document, bid, log_timestamp_ms=log_ms, now_ms=now_ms)
    assert got == expected, bid
    if type(bid) is dict:  # the fast lane either gives the reference document or steps aside
        fast = new._fast_document(bid, log_ms, now_ms)
        if fast is not None:
            assert ("ok", _dumps(fast), repr(fast)) == expected, bid
    assert outcome(new.event_time_ms, bid, log_timestamp_ms=log_ms, now_ms=now_ms) == outcome(
        ref.event_time_ms, bid, log_timestamp_ms=log_ms, now_ms=now_ms)
    return expected


def assert_same_raw(raw: bytes, log_ms: int | None = None, now_ms: int = NOW_MS) -> None:
    def reference(raw: bytes) -> dict[str, Any]:
        return ref.bid_to_document(ref.parse_bid(raw), log_timestamp_ms=log_ms, now_ms=now_ms)

    expected = outcome(reference, raw)
    assert outcome(new.normalise_message, raw, log_ms, now_ms) == expected, raw
    assert outcome(lambda r: new.bid_to_document(new.parse_bid(r), log_timestamp_ms=log_ms, now_ms=now_ms),
                   raw) == expected, raw
    assert outcome(new.parse_bid, raw)[:3] == outcome(ref.parse_bid, raw)[:3]


# --- mutations ------------------------------------------------------------------------------------------------

PATHS = (
    "user", "user.id", "user.yob", "user.gender", "user.keywords", "user.kwarray", "user.data", "user.data[0]",
    "user.data[0].segment", "user.data[0].segment[0]", "user.data[0].segment[0].name", "user.data[0].segment[1]",
    "user.ext", "user.ext.occupation", "user.geo", "user.geo.lat", "user.geo.lon", "user.geo.city",
    "user.geo.zip", "user.geo.region", "user.geo.country",
    "device", "device.ifa", "device.language", "device.langb", "device.os", "device.osv", "device.make",
    "device.model", "device.carrier", "device.devicetype", "device.geo", "device.geo.lat", "device.geo.lon",
    "device.geo.city", "device.geo.zip", "device.geo.region", "device.geo.country",
    "app", "app.bundle", "app.cat", "site", "site.domain", "site.cat",
    "imp", "imp[0]", "imp[0].banner", "imp[0].banner.w", "imp[0].banner.h", "imp[0].banner.format",
    "imp[0].banner.format[0]", "imp[0].banner.format[0].w", "imp[0].banner.format[0].h",
    "ext", "ext.exchange", "ext.received_at",
)

VALUES: tuple[Any, ...] = (
    None, "", " ", "x", "M", "F", "O", "U", "m", " a , b ,, a ", ",,,", "a,b,a", "Zürich ☃", "\u00a0nbsp\u00a0",
    "\u2003em\u3000", "\t tab \n", "١٢٣", "²", "1795860000123", "0001795860000123", "946684799999",
    "2026-11-22T10:00:00.123Z", "2026-11-22T10:00:00Z", "2026-11-22T10:00:00.123+01:00",
    "2026-11-22T10:00:00.123+00:00", "2026-11-22T10:00:00.123", "2026-11-22 10:00:00.123Z",
    "2026-13-22T10:00:00.123Z", "2026-11-22T24:00:00.000Z", "2026-11-22T10:00:60.000Z", "2026-11-22T10:00:00.12Z",
    "2026-11-22T10:00:00.1234Z", "2026-11-22T10:00:00.12aZ", "2026-11-22T10:00:00.\uff11\uff12\uff13Z",
    "\uff12\uff10\uff12\uff16-11-22T10:00:00.123Z", "2026-W47-1T10:00:00.123Z",
    "1999-12-31T23:59:59.999Z", "2099-12-31T23:59:59.999Z", "2100-01-01T00:00:00.000Z",
    "2026-11-22T10:00:00,123Z", "2026-11-22T10:00:00.123z", "yesterday", "x" * 5000,
    0, 1, -1, 2, 3, 4, 5, 7, 8, 99, 13, 1990, 2016, 2013, 2014, 1906, 1905, 1800, 2030, 2026, 2027,
    1.5, 2.0, 4.0, 1990.0, 90.0, -90.0, 90.0001, 180.0, -180.0, -180.5, 51.5, -0.12, 0.0,
    True, False, 10**30, -(10**30), 2**63, 1e300, -1e300,
    1795860000123, 1795860000123.0, 1795860000123.7, 946684800000, 946684799999, 4102444800000, 4102444799999,
    [], {}, ["a"], ["a", "", "a"], ["a", 1], [" x ", "y", "x"], [""], [None], ["IAB1", "IAB1", ""],
    [{"name": "seg"}], [{"segment": [{"name": " s "}, {"name": ""}, {"name": "s"}]}], [{"segment": None}],
    [{"segment": []}, {"segment": [{"id": 1}]}], [{"w": 300, "h": 250}], [{"w": 300}], [{}], [1],
    {"w": 1}, {"w": 1, "h": None}, {"format": [{"w": 2, "h": 3}]}, {"w": 1.0, "h": 2.0}, {"format": []},
    {"lat": 1.0, "lon": 2.0}, {"city": ""}, {"city": "Lyon", "zip": "69001"}, {"occupation": ""},
    [str(i) for i in range(500)],
)


def _parse_path(path: str) -> list[str | int]:
    return [int(part[1:-1]) if part.startswith("[") else part for part in path.replace("[", ".[").split(".")]


def _apply(bid: dict[str, Any], path: str, value: Any) -> None:
    """Set (or delete, for ``...``) ``path`` in place; silently skipped when the path cannot exist."""
    parts = _parse_path(path)
    target: Any = bid
    for part in parts[:-1]:
        if isinstance(part, int):
            if type(target) is not list or len(target) <= part:
                return
            target = target[part]
        else:
            if type(target) is not dict:
                return
            target = target.setdefault(part, {})
    last = parts[-1]
    if isinstance(last, int):
        if type(target) is list and len(target) > last:
            if value is ...:
                del target[last]
            else:
                target[last] = value
    elif type(target) is dict:
        if value is ...:
            target.pop(last, None)
        else:
            target[last] = value


def _structural(rng: random.Random, bid: dict[str, Any]) -> None:
    """Realistic reshapes that keep the bid valid (mostly): fallbacks the fast lane must handle."""
    kind = rng.randrange(8)
    user, device = bid.get("user"), bid.get("device")
    if kind == 0 and type(device) is dict and type(user) is dict and "geo" in device:  # user.geo fallback
        geo = device.pop("geo")
        if rng.random() < 0.5:
            device["geo"] = {"city": "Lyon"} if rng.random() < 0.5 else {"lat": 95.0, "lon": 1.0, "zip": ""}
        user["geo"] = geo
    elif kind == 1 and type(user) is dict:
        user["kwarray"] = rng.choice([["cars", " news ", ""], [], ["a", "a"], ["football"]])
    elif kind == 2 and type(user) is dict:
        user["data"] = [{"id": "d", "segment": [{"name": rng.choice(["x", " y", "", "football"])}
                                                for _ in range(rng.randrange(4))]} for _ in range(rng.randrange(3))]
    elif kind == 3:
        bid["imp"] = [{"id": "1", "banner": rng.choice([{"format": [{"w": 300, "h": 250}]}, {"w": 320},
                                                        {"h": 50, "format": [{"w": 1, "h": 2}]}, {}])}]
    elif kind == 4:
        bid["site"] = {"domain": "x.example", "cat": rng.choice([["IAB3"], [], ["IAB3", "IAB3", ""]])}
        if type(bid.get("app")) is dict and rng.random() < 0.5:
            bid["app"]["cat"] = rng.choice([[], [""], None, ["IAB1"]])
    elif kind == 5 and type(user) is dict:
        user.pop("id", None)  # device.ifa becomes the user id
    elif kind == 6 and type(bid.get("ext")) is dict:
        bid["ext"]["received_at"] = rng.choice([
            f"2026-11-{rng.randint(1, 30):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
            f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z",
            str(rng.randint(946_684_800_000, 4_102_444_799_999)),
            rng.randint(946_684_800_000, 4_102_444_799_999),
        ])
    elif kind == 7:
        bid.pop("ext", None)


def mutated_bids(seed: int, count: int) -> list[tuple[dict[str, Any], Any]]:
    rng = random.Random(seed)
    generator = BidGenerator(seed=seed, users=500, days=30)
    out = []
    for raw in generator.bids(count):
        assert isinstance(raw, dict)
        bid = orjson.loads(orjson.dumps(raw))  # independent dicts, as from the log
        for _ in range(rng.choice((0, 0, 1, 1, 1, 2, 3))):
            roll = rng.random()
            if roll < 0.25:
                _structural(rng, bid)
            elif roll < 0.4:
                _apply(bid, rng.choice(PATHS), ...)
            else:
                _apply(bid, rng.choice(PATHS), copy.deepcopy(rng.choice(VALUES)))
        log_ms = rng.choice((None, None, NOW_MS - 5000, 1_700_000_000_000, 0, -1, 10**15, NOW_MS + 0.5))
        out.append((bid, log_ms))
    return out


# --- tests ----------------------------------------------------------------------------------------------------


def test_generated_bids_take_the_fast_lane_and_match() -> None:
    generator = BidGenerator(seed=3, users=2000, days=7)
    for raw in generator.bids(3000):
        assert isinstance(raw, dict)
        bid = orjson.loads(orjson.dumps(raw))
        assert new._fast_document(bid, None, NOW_MS) is not None, bid  # the happy path never falls back
        assert assert_same(bid)[0] == "ok"
        assert_same_raw(orjson.dumps(raw), NOW_MS - 1000)


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_mutated_bids(seed: int) -> None:
    kinds = {"ok": 0, "error": 0}
    for bid, log_ms in mutated_bids(seed, 3000):
        kinds[assert_same(bid, log_ms)[0]] += 1
    # both outcomes are well represented, so the comparison means something
    assert kinds["ok"] > 1000 and kinds["error"] > 300, kinds


def test_mutated_raw_messages() -> None:
    rng = random.Random(5)
    for bid, log_ms in mutated_bids(21, 1500):
        try:
            raw = orjson.dumps(bid)
        except TypeError:  # 10**30 and friends are not JSON
            continue
        assert_same_raw(raw, log_ms if log_ms is not None else NOW_MS)
        cut = rng.randrange(len(raw))
        assert_same_raw(raw[:cut])
    for raw in (b"", b"null", b"1", b'"x"', b"[1]", b"[]", b"{}", b"\xff\xfe garbage", b'{"a":1}{', b"  {} ",
                b'{"user": {"id": "u"}}', b'{"user": {"id": "u"}, "ext": {"received_at": 1e400}}',
                b'{"device": {"ifa": "\\ud800"}}', "{\"user\": {\"id\": \"ü\"}}".encode()):
        assert_same_raw(raw)


EDGE_CASES: tuple[Any, ...] = (
    {}, [], "x", None, 1, {"user": None}, {"user": {}}, {"device": {}}, {"device": {"ifa": ""}},
    {"user": {"id": ""}, "device": {"ifa": "i"}}, {"user": {"id": None}, "device": {"ifa": 7}},
    {"user": {"id": 7}, "device": {"ifa": "i"}}, {"user": {"id": "u"}, "device": "d"},
    {"user": {"id": "u"}, "ext": None}, {"user": {"id": "u"}, "ext": {}}, {"user": {"id": "u"}, "ext": []},
    {"user": {"id": "u", "yob": 2026}, "ext": {"received_at": "2026-01-01T00:00:00.000Z"}},
    {"user": {"id": "u", "yob": 2026}, "ext": {"received_at": "2025-12-31T23:59:59.999Z"}},
    {"user": {"id": "u", "yob": 1906}, "ext": {"received_at": "2026-06-01T00:00:00.000Z"}},
    {"user": {"id": "u", "yob": 1905}, "ext": {"received_at": "2026-06-01T00:00:00.000Z"}},
    {"user": {"id": "u"}, "ext": {"received_at": "2026-11-22T10:00:00.123Z", "exchange": ""}},
    {"user": {"id": "u"}, "device": {"language": "", "langb": "en"}},
    {"user": {"id": "u"}, "device": {"language": "", "langb": 1}},
    {"user": {"id": "u"}, "device": {"language": "fr", "langb": 1}},
    {"user": {"id": "u"}, "device": {"devicetype": 4.0}}, {"user": {"id": "u"}, "device": {"devicetype": True}},
    {"user": {"id": "u", "geo": {"lat": 1, "lon": 2}}, "device": {"geo": {"lat": 1, "lon": None}}},
    {"user": {"id": "u", "geo": {"lat": "x"}}, "device": {"geo": {"lat": 1, "lon": 2}}},
    {"user": {"id": "u", "geo": {"city": 5}}, "device": {"geo": {"city": "c"}}},
    {"user": {"id": "u", "geo": {"city": 5}}, "device": {"geo": {"city": ""}}},
    {"user": {"id": "u", "geo": {}}, "device": {"geo": {}}},
    {"user": {"id": "u", "keywords": ""}}, {"user": {"id": "u", "keywords": " , ,"}},
    {"user": {"id": "u", "keywords": "a", "kwarray": ["a", " a "], "data": [{"segment": [{"name": "a "}]}]}},
    {"user": {"id": "u"}, "app": {"cat": []}, "site": {"cat": ["s"]}},
    {"user": {"id": "u"}, "app": {"cat": ["a"]}, "site": {"cat": "bad"}},
    {"user": {"id": "u"}, "app": {"cat": ["a"]}, "site": "bad"},
    {"user": {"id": "u"}, "app": {"bundle": ""}, "site": {"domain": ""}},
    {"user": {"id": "u"}, "imp": [{"banner": {"w": 0, "h": 0}}]},
    {"user": {"id": "u"}, "imp": [{"banner": {"w": 1.0, "h": 2}}]},
    {"user": {"id": "u"}, "imp": [{"banner": {"w": 1.5}}]},
    {"user": {"id": "u"}, "imp": [{"banner": {"format": [{"w": 3}], "h": 4}}]},
    {"user": {"id": "u"}, "imp": [{"banner": None}, {"banner": {"w": 1, "h": 1}}]},
)


@pytest.mark.parametrize("bid", EDGE_CASES, ids=range(len(EDGE_CASES)))
@pytest.mark.parametrize("log_ms", [None, NOW_MS - 1, 1_000, float(NOW_MS - 1)])
def test_edge_cases(bid: Any, log_ms: Any) -> None:
    assert_same(bid, log_ms)


FAST_LANE_VARIANTS: tuple[dict[str, Any], ...] = (
    {"user": {"id": "u", "yob": 1906}, "ext": {"received_at": "2026-06-01T00:00:00.000Z"}},  # age 120
    {"user": {"id": "u", "yob": 2026}, "ext": {"received_at": "2026-06-01T00:00:00.999Z"}},  # age 0
    {"user": {"id": ""}, "device": {"ifa": "i"}, "ext": {"received_at": "1795860000123"}},
    {"user": {"id": "u", "geo": {"lat": 1.0, "lon": 2.0, "city": "c"}}, "device": {"geo": {"city": ""}}},
    {"user": {"id": "u", "kwarray": ["a", "", " b"], "data": [{"segment": [{"name": " c"}, {}]}, {}]}},
    {"user": {"id": "u", "keywords": ",, a ,a"}, "app": {"cat": []}, "site": {"cat": ["s", "s", ""]}},
    {"user": {"id": "u"}, "imp": [{"banner": {"h": 5, "format": [{"w": 1, "h": 2}]}}]},
    {"user": {"id": "u"}, "device": {"language": "", "langb": "en-GB", "devicetype": 99}},
)


@pytest.mark.parametrize("bid", FAST_LANE_VARIANTS, ids=range(len(FAST_LANE_VARIANTS)))
def test_fast_lane_covers_valid_variants(bid: dict[str, Any]) -> None:
    # the careful path would give the same document, but slowly: these common shapes stay on the fast lane
    assert new._fast_document(bid, None, NOW_MS) is not None
    assert assert_same(bid)[0] == "ok"


def test_mappings_and_subclasses_take_the_careful_path() -> None:
    from types import MappingProxyType

    class Str(str):
        pass

    class Dict(dict):
        pass

    base = orjson.loads(orjson.dumps(next(iter(BidGenerator(seed=1, users=10).bids(1)))))
    assert_same(MappingProxyType(base))
    assert_same({**base, "user": MappingProxyType(base["user"])})
    assert_same({**base, "user": Dict(base["user"])})
    assert_same({**base, "user": {**base["user"], "id": Str("u")}})


def test_event_times_and_their_formatting() -> None:
    rng = random.Random(9)
    values = [946_684_800_000, 946_684_799_999, 4_102_444_799_999, 4_102_444_800_000, 0, -1, -3_600_001,
              1_795_823_999_999, 1_795_824_000_000, 1_798_761_599_999, 1_798_761_600_000]
    values += [rng.randint(946_684_800_000, 4_102_444_800_000) for _ in range(3000)]
    values += [rng.randint(-(10**12), 10**14) for _ in range(300)]
    for ms in values:
        assert outcome(new.format_timestamp_ms, ms) == outcome(ref.format_timestamp_ms, ms)
        for received in (ms, str(ms), ref.format_timestamp_ms(ms) if 0 <= ms < 253402300800000 else "x"):
            bid = {"user": {"id": "u", "yob": 1990}, "ext": {"received_at": received}}
            assert_same(bid)
        assert_same({"user": {"id": "u", "yob": 1990}}, ms)


def test_iso_millis_all_values() -> None:
    # every millisecond value through the cached ISO parser (float rounding of the original included)
    for second in ("2026-11-22T10:00:00", "2031-02-28T23:59:59", "2000-01-01T00:00:00", "2099-12-31T23:59:59"):
        for milli in range(1000):
            assert_same({"user": {"id": "u"}, "ext": {"received_at": f"{second}.{milli:03d}Z"}})


def test_iso_every_second_of_an_hour() -> None:
    rng = random.Random(4)
    for hour in ("2026-11-22T10", "2028-02-29T23", "2026-W47-1T10", "2026-11-22T24", "2026-11-22T25"):
        for second in range(3600):
            text = f"{hour}:{second // 60:02d}:{second % 60:02d}.{rng.randrange(1000):03d}Z"
            assert_same({"user": {"id": "u", "yob": 1990}, "ext": {"received_at": text}})


def test_clock_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_795_860_000.4567)
    for bid in ({"user": {"id": "u", "yob": 1990}}, {"user": {"id": "u"}, "ext": {"exchange": "x"}}):
        assert assert_same(bid, None, None)[0] == "ok"


def scribble_over(doc: Any) -> None:
    """Change every dict and list of a document in place: a bid sharing any of them shows it."""
    stack: list[Any] = [doc]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            stack.extend(item.values())
            item["scribble"] = 1
        elif type(item) is list:
            stack.extend(item)
            item.append("scribble")


def test_documents_do_not_alias_the_bid() -> None:
    for bid, log_ms in mutated_bids(31, 300):
        before = copy.deepcopy(bid)
        try:
            doc = new.bid_to_document(bid, log_timestamp_ms=log_ms, now_ms=NOW_MS)
        except Exception:  # only successes can alias
            continue
        scribble_over(doc)
        assert bid == before


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats(allow_nan=False,
                                                                                            allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["", "M", "2026-11-22T10:00:00.123Z", "1795860000123"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "name", "segment", "w", "h", "lat", "lon", "city", "x"]), children, max_size=3),
    max_leaves=8,
)

_BASE = orjson.loads(orjson.dumps([b for b in BidGenerator(seed=8, users=50).bids(50)]))


@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, 49), changes=st.lists(st.tuples(st.sampled_from(PATHS), JSON), max_size=3))
def test_property_any_json_anywhere(index: int, changes: list[tuple[str, Any]]) -> None:
    bid = copy.deepcopy(_BASE[index])
    for path, value in changes:
        _apply(bid, path, value)
    assert_same(bid)
