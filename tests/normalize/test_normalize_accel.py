"""The C fast lane (rules_service._normalize.fast_document) against the Python one (normalize._fast_document).

Both lanes get the same inputs and must give the same result: the same document (orjson bytes and ``repr``, so
key order and value types too) or None. One widening is allowed and checked: C gives None for an ISO 8601
``ext.received_at`` that is not exactly ``YYYY-MM-DDTHH:MM:SS.mmmZ`` in ASCII digits (the careful path then
produces the document). Through :func:`normalize.bid_to_document` / :func:`normalize.normalise_message` the two
settings of ``normalize.USE_C`` must give identical outcomes, errors included. Skipped when the extension is
not built (tests/test_accelerators.py makes that a failure in CI).
"""

from __future__ import annotations

import copy
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules_service import normalize
from tests.leaks import bytes_kept
from tests.normalize.test_normalize_equivalence import JSON, PATHS, VALUES, _apply, mutated_bids, outcome, scribble_over
from workers.bidgen import BidGenerator

c_module = normalize._normalize
pytestmark = pytest.mark.skipif(c_module is None, reason="rules_service._normalize is not built")

NOW_MS = 1_795_860_000_000  # 2026-11-28T10:00:00Z
_STRICT_ISO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def _lane(fn: Callable[..., Any], bid: Any, log_ms: Any, now_ms: Any) -> tuple[Any, ...]:
    if fn is normalize.bid_to_document:
        return outcome(fn, bid, log_timestamp_ms=log_ms, now_ms=now_ms)
    return outcome(fn, bid, log_ms, now_ms)


def _iso_widening(bid: Any) -> bool:
    """The one case where C may say None while Python gives a document: an ISO time of another shape."""
    ext = bid.get("ext") if type(bid) is dict else None
    received = ext.get("received_at") if type(ext) is dict else None
    return type(received) is str and len(received) == 24 and not _STRICT_ISO.fullmatch(received)


def assert_lanes_agree(bid: dict[str, Any], log_ms: Any = None, now_ms: Any = NOW_MS) -> str:
    """C and Python fast lanes agree on ``bid``; returns "ok", "none" or "widened"."""
    python = _lane(normalize._fast_document, bid, log_ms, now_ms)
    c = _lane(c_module.fast_document, bid, log_ms, now_ms)
    if c != python:
        assert c == ("none",) and python[0] == "ok" and _iso_widening(bid), (bid, python, c)
        kind = "widened"
    else:
        kind = python[0]
    # the public entry point gives the same outcome whichever lane runs
    outcomes = []
    for use_c in (True, False):
        normalize.USE_C = use_c
        try:
            outcomes.append(_lane(normalize.bid_to_document, bid, log_ms, now_ms))
        finally:
            normalize.USE_C = True
    assert outcomes[0] == outcomes[1], bid
    return kind


def _fresh(bid: Any) -> Any:
    return orjson.loads(orjson.dumps(bid))


# --- generated and mutated bids -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_bids_same_documents(seed: int) -> None:
    rng = random.Random(seed)
    for raw in BidGenerator(seed=seed, users=3000, days=30).bids(3000):
        bid = _fresh(raw)
        log_ms = rng.choice((None, NOW_MS - 10))
        c = c_module.fast_document(bid, log_ms, NOW_MS)
        assert c is not None, bid  # the happy path stays in C
        assert orjson.dumps(c) == orjson.dumps(normalize._fast_document(bid, log_ms, NOW_MS))
        assert repr(c) == repr(normalize._fast_document(bid, log_ms, NOW_MS))


def test_normalise_message_same_bytes_both_lanes() -> None:
    raws = [orjson.dumps(b) for b in BidGenerator(seed=7, users=1000, days=7).bids(2000)]
    docs = {}
    for use_c in (True, False):
        normalize.USE_C = use_c
        try:
            docs[use_c] = [orjson.dumps(normalize.normalise_message(raw, NOW_MS - i, NOW_MS))
                           for i, raw in enumerate(raws)]
        finally:
            normalize.USE_C = True
    assert docs[True] == docs[False]


@pytest.mark.parametrize("seed", [41, 42, 43, 44])
def test_mutated_bids(seed: int) -> None:
    kinds = {"ok": 0, "none": 0, "widened": 0, "error": 0}
    for bid, log_ms in mutated_bids(seed, 2500):
        kinds[assert_lanes_agree(bid, log_ms)] += 1
    assert kinds["ok"] > 800 and kinds["none"] > 400, kinds  # both outcomes well represented
    assert kinds["widened"] < 60 and kinds["error"] == 0, kinds


# values the shared mutation table lacks: C integer limits, string kinds, long lists (the set path of dedup)
C_VALUES: tuple[Any, ...] = (
    2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, -(2**31), 1 << 100,
    "0" * 30 + "1795860000123", "0" * 30, "0", "00000000000000", "9" * 13, "9" * 14, "1795860000123 ",
    "\u00e9t\u00e9, \u00e9t\u00e9 ,caf\u00e9", "\U0001f600 , \U0001f600,\u2028x\u2029", "\x1c\x1d\x1e\x1fa\x85",
    "\u0100\u0101, a", "a" * 1000 + "," + "a" * 1000, ",".join(f"k{i % 40}" for i in range(300)),
    [f"s{i % 12}" for i in range(50)], [" a", "a ", "\u00a0a", "a"], ["\U0001f600", "\U0001f600 "],
    [{"segment": [{"name": f"n{i % 15}"} for i in range(40)]}], [{"segment": [{"name": True}]}],
    {"w": True, "h": 1}, {"w": 1, "h": False}, {"w": 2**31 - 1, "h": 0}, {"w": -1, "h": 1},
    {"format": [{"w": 2**31, "h": 1}]}, {"format": [{"w": True}], "h": 1}, {"format": [None]},
    {"lat": 90, "lon": -180}, {"lat": 91, "lon": 0}, {"lat": 2**70, "lon": 0}, {"lat": True, "lon": 1.0},
    {"lat": -0.0, "lon": 180.0}, {"lat": 1e308, "lon": 1.0}, {"lat": float("nan"), "lon": 1.0},
    2000, 2001, 1880, 1881, 0.0, -0.0,
)


def test_mutated_bids_c_specific_values() -> None:
    rng = random.Random(77)
    base = [_fresh(b) for b in BidGenerator(seed=77, users=300, days=30).bids(300)]
    kinds = {"ok": 0, "none": 0, "widened": 0}
    for _ in range(4000):
        bid = copy.deepcopy(rng.choice(base))
        for _ in range(rng.choice((1, 1, 2, 3))):
            pool = C_VALUES if rng.random() < 0.7 else VALUES
            _apply(bid, rng.choice(PATHS), copy.deepcopy(rng.choice(pool)))
        kinds[assert_lanes_agree(bid, rng.choice((None, NOW_MS, 2**63, True, NOW_MS - 1)))] += 1
    assert kinds["ok"] > 600 and kinds["none"] > 1000, kinds


# --- edge cases -------------------------------------------------------------------------------------------------


def _user(**fields: Any) -> dict[str, Any]:
    return {"user": {"id": "u", **fields}}


EDGE_CASES: tuple[dict[str, Any], ...] = (
    {"user": {"id": ""}, "device": {"ifa": "i"}}, {"user": {"id": None}, "device": {"ifa": ""}},
    {"user": {"id": "u"}, "device": None, "ext": None}, {"user": {"id": "u"}, "device": []},
    {"device": {"ifa": "i", "language": "", "langb": "en"}}, {"device": {"ifa": "i", "language": "fr", "langb": 7}},
    {"device": {"ifa": "i", "language": 1}}, {"device": {"ifa": "i", "language": None, "langb": ""}},
    {"device": {"ifa": "i", "os": "", "osv": "1", "devicetype": 0}},
    {"device": {"ifa": "i", "devicetype": 2**64}}, {"device": {"ifa": "i", "devicetype": -1}},
    *({"device": {"ifa": "i", "devicetype": code}} for code in range(-1, 10)),
    *(_user(gender=g) for g in ("M", "F", "O", "U", "", "m", "MM", "\u039c")),
    *(_user(yob=y) for y in (2026, 2027, 1906, 1905, 2013, 2014, 2008, 1961, 1962)),
    _user(keywords="a, b,\ta\n, ,b,c", kwarray=["c", " d", ""], data=[{"segment": [{"name": " a"}, {}]}, {}]),
    _user(keywords="", kwarray=[], data=[]), _user(keywords=",,", data=[{"segment": None}]),
    _user(kwarray=["a", 1]), _user(data=[{"segment": [{"name": 1}]}]), _user(data=[{"segment": {}}]),
    _user(ext={"occupation": ""}), _user(ext={"occupation": 3}), _user(ext=[]), _user(geo=[]),
    _user(geo={"lat": 1, "lon": 2, "city": "c"}),
    {"user": {"id": "u", "geo": {"lat": "x"}}, "device": {"geo": {"lat": 1.0, "lon": 2.0}}},  # not looked at
    {"user": {"id": "u", "geo": {"lat": "x"}}, "device": {"geo": {"lat": 100.0, "lon": 2.0}}},
    {"user": {"id": "u", "geo": {"city": 1}}, "device": {"geo": {"city": "c"}}},
    {"user": {"id": "u", "geo": {"city": 1}}, "device": {"geo": {"city": ""}}},
    {"user": {"id": "u"}, "app": {"cat": ["a"]}, "site": {"cat": 5}},
    {"user": {"id": "u"}, "app": {"cat": ["", ""]}, "site": {"cat": ["s"]}},
    {"user": {"id": "u"}, "app": {"bundle": 1}}, {"user": {"id": "u"}, "app": [], "site": {}},
    {"user": {"id": "u"}, "imp": [{"banner": {"w": 5, "h": 6, "format": "junk"}}]},  # format not looked at
    {"user": {"id": "u"}, "imp": [{"banner": {"w": 5, "format": "junk"}}]},
    {"user": {"id": "u"}, "imp": [{"banner": {"w": 5, "format": [{"w": "x", "h": 7}]}}]},
    {"user": {"id": "u"}, "imp": [{"banner": {"format": [{}]}}]}, {"user": {"id": "u"}, "imp": [{}]},
    {"user": {"id": "u"}, "imp": [None]}, {"user": {"id": "u"}, "imp": {}},
    {"user": {"id": "u"}, "ext": {"exchange": ""}}, {"user": {"id": "u"}, "ext": {"exchange": 1}},
)


@pytest.mark.parametrize("bid", EDGE_CASES, ids=range(len(EDGE_CASES)))
@pytest.mark.parametrize("log_ms", [None, NOW_MS, True, float(NOW_MS), 946_684_799_999, 4_102_444_800_000])
def test_edge_cases(bid: dict[str, Any], log_ms: Any) -> None:
    assert_lanes_agree(copy.deepcopy(bid), log_ms)


def test_event_times() -> None:
    rng = random.Random(3)
    values = [946_684_800_000, 946_684_799_999, 4_102_444_799_999, 4_102_444_800_000, 0, -1, 951_782_399_999,
              951_782_400_000, 1_709_251_199_999, 4_107_542_399_999]
    values += [rng.randint(946_684_800_000, 4_102_444_800_000) for _ in range(2000)]
    for ms in values:
        iso = normalize.format_timestamp_ms(ms) if 0 <= ms < 253_402_300_800_000 else "x"
        for received in (ms, str(ms), iso, "000" + str(ms)):
            kind = assert_lanes_agree({"user": {"id": "u", "yob": 1990}, "ext": {"received_at": received}})
            assert kind != "widened"
        assert_lanes_agree({"user": {"id": "u", "yob": 1990}}, ms)


def test_iso_every_millisecond_and_calendar_edges() -> None:
    for second in ("2026-11-22T10:00:00", "2028-02-29T23:59:59", "2000-01-01T00:00:00", "2099-12-31T23:59:59"):
        for milli in range(1000):
            bid = {"user": {"id": "u"}, "ext": {"received_at": f"{second}.{milli:03d}Z"}}
            assert c_module.fast_document(bid, None, NOW_MS) is not None
            assert assert_lanes_agree(bid) == "ok"
    for text in ("2027-02-29T00:00:00.000Z", "2028-02-30T00:00:00.000Z", "2100-02-29T00:00:00.000Z",
                 "2026-04-31T00:00:00.000Z", "2026-00-10T00:00:00.000Z", "2026-12-00T00:00:00.000Z",
                 "2026-11-22T23:59:60.000Z", "2026-11-22T23:60:00.000Z", "2026-11-22T24:00:00.000Z",
                 "1999-12-31T23:59:59.999Z", "2100-01-01T00:00:00.000Z", "0000-01-01T00:00:00.000Z",
                 "2026-W47-1T10:00:00.123Z", "2026-11-22 10:00:00.123Z", "2026-11-22T10:00:00.123z",
                 "2026-11-22T10:00:00,123Z", "+026-11-22T10:00:00.123Z", "2026-11-22T10:00:00.123\u00dc"):
        assert_lanes_agree({"user": {"id": "u"}, "ext": {"received_at": text}})
        assert c_module.fast_document({"user": {"id": "u"}, "ext": {"received_at": text}}, None, NOW_MS) is None


def test_clock_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_795_860_000.4567)
    bid = {"user": {"id": "u", "yob": 1990}}
    assert c_module.fast_document(bid, None, None)["last_seen"] == "2026-11-28T10:00:00.456Z"
    assert assert_lanes_agree(bid, None, None) == "ok"
    monkeypatch.setattr(time, "time", lambda: 1.0)  # an implausible clock: both step aside
    assert assert_lanes_agree(bid, None, None) == "none"

    def broken() -> float:
        raise OSError("clock")

    monkeypatch.setattr(time, "time", broken)
    with pytest.raises(OSError, match="clock"):
        c_module.fast_document(bid, None, None)


def test_limits_match_the_python_module() -> None:
    assert c_module.MIN_EVENT_MS == normalize._MIN_EVENT_MS
    assert c_module.MAX_EVENT_MS == normalize._MAX_EVENT_MS
    assert c_module.MAX_AGE == normalize.MAX_AGE
    assert c_module.MAX_SLOT_SIZE == normalize.MAX_SLOT_SIZE


def test_exotic_key_errors_propagate() -> None:
    class Key:  # collides with "user" and refuses comparison: dict.get raises, so must C
        def __hash__(self) -> int:
            return hash("user")

        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparing")

    bid: dict[Any, Any] = {Key(): 1}
    with pytest.raises(RuntimeError, match="no comparing"):
        normalize._fast_document(bid, None, NOW_MS)
    with pytest.raises(RuntimeError, match="no comparing"):
        c_module.fast_document(bid, None, NOW_MS)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        c_module.fast_document([], None, NOW_MS)
    with pytest.raises(TypeError):
        c_module.fast_document({})


def test_switch_reaches_both_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    python_lane = normalize._fast_document

    def spy(*args: Any) -> Any:
        calls.append("python")
        return python_lane(*args)

    monkeypatch.setattr(normalize, "_fast_document", spy)
    raw = orjson.dumps(next(iter(BidGenerator(seed=2, users=5).bids(1))))
    normalize.normalise_message(raw, None, NOW_MS)
    assert calls == []  # C by default
    monkeypatch.setattr(normalize, "USE_C", False)
    normalize.normalise_message(raw, None, NOW_MS)
    assert calls == ["python"]


def test_documents_do_not_alias_the_bid() -> None:
    for bid, log_ms in mutated_bids(51, 400):
        before = copy.deepcopy(bid)
        doc = c_module.fast_document(bid, log_ms, NOW_MS)
        if doc is None:
            continue
        scribble_over(doc)
        assert bid == before


# --- references and memory --------------------------------------------------------------------------------------


def test_reference_counts_are_balanced() -> None:
    bid = _fresh(next(iter(BidGenerator(seed=4, users=5).bids(1))))
    bid["user"]["kwarray"] = [f"k{i}" for i in range(20)]
    watched = [bid, bid["user"], bid["user"]["id"], bid["device"], bid["device"]["os"], bid["imp"][0]["banner"]["w"],
               bid["device"]["geo"]["lat"], bid["user"]["kwarray"], bid["user"]["kwarray"][3]]
    before = [sys.getrefcount(obj) for obj in watched]
    for _ in range(100):
        doc = c_module.fast_document(bid, None, NOW_MS)
        assert doc is not None
        del doc
        assert c_module.fast_document({**bid, "imp": [{"banner": {"w": 2**40, "h": 1}}]}, None, NOW_MS) is None
    assert [sys.getrefcount(obj) for obj in watched] == before


def test_no_leak_over_many_calls() -> None:
    bids = [b for b, _ in mutated_bids(61, 300)] + [_fresh(b) for b in BidGenerator(seed=6, users=50).bids(300)]
    bids.append({"user": {"id": "u", "kwarray": [f"k{i % 30}" for i in range(100)]}})

    def run() -> None:
        for bid in bids:
            c_module.fast_document(bid, None, NOW_MS)

    growth = bytes_kept(run, warmup=1, traced_warmup=1, rounds=15)
    assert growth < 50_000, growth  # ~9,000 calls: even 8 bytes a call would show


# --- property ---------------------------------------------------------------------------------------------------

_BASE = [_fresh(b) for b in BidGenerator(seed=9, users=50).bids(50)]


@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, 49), changes=st.lists(st.tuples(st.sampled_from(PATHS), JSON), max_size=3),
       log_ms=st.sampled_from([None, NOW_MS, 0, True]))
def test_property_any_json_anywhere(index: int, changes: list[tuple[str, Any]], log_ms: Any) -> None:
    bid = copy.deepcopy(_BASE[index])
    for path, value in changes:
        _apply(bid, path, value)
    assert_lanes_agree(bid, log_ms)
