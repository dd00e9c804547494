"""The bytes-to-document C lane (``rules_service._normalize.document_from_json``) against today's path.

Today's path is :func:`normalize.normalise_message` with ``normalize.USE_C_PARSE = False``: orjson.loads, then the
fast lanes, then the careful path. The new lane scans the raw bytes once and builds only what the document reads.
For every input here, one of:

* it returns a document: today's path returns the same one (same orjson bytes, same ``repr``: key order, types);
* it returns None (outside its strict subset of JSON): normalise_message then runs today's path.

So ``normalise_message`` gives the same outcome (document, or BadBidError with the same reason and field) with
the lane on and off, and the lane never accepts bytes that orjson.loads rejects. Inputs: generated bids (valid
and invalid), byte-level mutations, re-rendered JSON (duplicate and reordered keys, whitespace, escapes,
number spellings), hypothesis-made bid-shaped objects, and a leak check. Skipped when the extension is not built
(tests/test_accelerators.py makes that a failure in CI).
"""

from __future__ import annotations

import copy
import json
import random
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules_service import normalize
from tests.leaks import bytes_kept
from tests.normalize.test_normalize_equivalence import JSON, PATHS, VALUES, Outcome, _apply, outcome
from workers.bidgen import BidGenerator

c_module = normalize._normalize
pytestmark = pytest.mark.skipif(c_module is None or not hasattr(c_module, "document_from_json"),
                                reason="rules_service._normalize.document_from_json is not built")

NOW_MS = 1_795_860_000_000  # 2026-11-28T10:00:00Z

def _outcome(raw: Any, log_ms: Any, now_ms: Any, use_c_parse: bool) -> Outcome:
    saved = normalize.USE_C_PARSE
    normalize.USE_C_PARSE = use_c_parse
    try:
        return outcome(normalize.normalise_message, raw, log_ms, now_ms)
    finally:
        normalize.USE_C_PARSE = saved


def _orjson_accepts(raw: Any) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def check(raw: Any, log_ms: Any = None, now_ms: Any = NOW_MS) -> str:
    """The lane agrees with today's path on ``raw``; "fast" when it made the document, else "none"."""
    expected = _outcome(raw, log_ms, now_ms, False)
    doc = c_module.document_from_json(raw, log_ms, now_ms)
    if doc is None:
        kind = "none"
    else:
        assert _orjson_accepts(raw), raw  # never accepts what orjson rejects
        assert expected[0] == "ok", (raw, expected)
        assert (orjson.dumps(doc), repr(doc)) == expected[1:], raw
        kind = "fast"
    assert _outcome(raw, log_ms, now_ms, True) == expected, raw
    return kind


def _messages(count: int, *, seed: int, invalid_rate: float = 0.0) -> list[bytes]:
    generator = BidGenerator(seed=seed, users=2000, days=30, invalid_rate=invalid_rate)
    return [value for _, value in generator.messages(count)]


# --- (a) generated messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_generated_messages_take_the_lane_and_match(seed: int) -> None:
    rng = random.Random(seed)
    kinds = {"fast": 0, "none": 0}
    for raw in _messages(10_000, seed=seed):
        kinds[check(raw, rng.choice((None, NOW_MS - 10)), NOW_MS)] += 1
    assert kinds == {"fast": 10_000, "none": 0}  # every plain generated bid stays on the lane


def test_generated_messages_with_invalid_ones() -> None:
    kinds = {"fast": 0, "none": 0}
    raws = _messages(5000, seed=9, invalid_rate=0.2)
    for raw in raws:
        kinds[check(raw)] += 1
    invalid = sum(1 for raw in raws if raw.startswith((b'{"id": "broken', b"[", b"\xff")) or b"anon-" in raw
                  or b"badyob-" in raw)
    assert 700 < invalid < 1300
    assert kinds["fast"] == len(raws) - invalid and kinds["none"] == invalid, kinds


def test_the_switch_forces_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = normalize._c_document_from_json

    def counting(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(normalize, "_c_document_from_json", counting)
    raw = _messages(1, seed=4)[0]
    normalize.normalise_message(raw, None, NOW_MS)
    assert len(calls) == 1
    monkeypatch.setattr(normalize, "USE_C_PARSE", False)
    assert normalize.normalise_message(raw, None, NOW_MS) == real(raw, None, NOW_MS)
    monkeypatch.setattr(normalize, "USE_C_PARSE", True)
    monkeypatch.setattr(normalize, "USE_C", False)  # the Python lane asked for: no C at all
    normalize.normalise_message(raw, None, NOW_MS)
    assert len(calls) == 1


# --- (b) byte-level mutations ---------------------------------------------------------------------------------

_INTERESTING = (b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"0", b"1", b"9", b"-", b".", b"e", b"E", b"+",
                b" ", b"\n", b"\t", b"\r", b"\x00", b"\x01", b"\x1f", b"\x7f", b"\x80", b"\xbf", b"\xc3", b"\xe2",
                b"\xed", b"\xf0", b"\xf4", b"\xff", b"n", b"t", b"f", b"u", b"/", b"\x0b", b"\x0c")


def _byte_mutation(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        i = rng.randrange(len(data))
        roll = rng.random()
        byte = rng.choice(_INTERESTING) if rng.random() < 0.7 else bytes([rng.randrange(256)])
        if roll < 0.35:
            data[i:i + 1] = byte  # flip
        elif roll < 0.6:
            del data[i:i + rng.choice((1, 1, 2, 5))]
        elif roll < 0.85:
            data[i:i] = byte
        else:
            del data[i:]  # truncation
    return bytes(data)


@pytest.mark.parametrize("seed", [11, 12])
def test_byte_mutations(seed: int) -> None:
    rng = random.Random(seed)
    raws = _messages(6000, seed=seed)
    kinds = {"fast": 0, "none": 0}
    for raw in raws:
        kinds[check(_byte_mutation(rng, raw))] += 1
    assert kinds["fast"] > 1000 and kinds["none"] > 1000, kinds  # both outcomes well represented


# --- re-rendering: duplicate and reordered keys, whitespace, escapes, number spellings -------------------------

_WS = ("", "", "", " ", "\n", "\t", "\r", " \r\n\t ")


def _render_str(rng: random.Random, text: str, wild: float) -> str:
    roll = rng.random()
    if roll >= wild:
        return orjson.dumps(text).decode()
    if roll < wild / 2:
        return json.dumps(text)  # non-ASCII as \u escapes (surrogate pairs above the BMP)
    out = []
    for ch in text:  # some characters as escapes
        r = rng.random()
        if r < 0.15:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else json.dumps(ch)[1:-1])
        elif r < 0.2 and ch == "/":
            out.append("\\/")
        else:
            out.append(json.dumps(ch, ensure_ascii=False)[1:-1])
    return '"' + "".join(out) + '"'


def _render_number(rng: random.Random, value: int | float, wild: float) -> str:
    roll = rng.random()
    if type(value) is int:
        if roll >= wild:
            return str(value)
        return rng.choice((f"{value}.0", f"{value}e0", f"{value}E+00", f"{value}.000", f"{value}e-0"))
    if roll >= wild:
        return orjson.dumps(value).decode()
    return rng.choice((f"{value:.17g}", f"{value:.20f}", f"{value:e}", f"{value:.3f}", f"{value:.25g}",
                       repr(value)))


def render(rng: random.Random, value: Any, wild: float) -> str:
    """JSON text of ``value`` in one of many spellings (some invalid: inf, nan: today's path decides); ``wild``
    is the chance of each unusual choice (whitespace, escapes, number spellings, duplicate keys)."""
    ws = _WS[rng.randrange(len(_WS))] if rng.random() < wild else ""
    if type(value) is dict:
        items = list(value.items())
        if rng.random() < wild:
            rng.shuffle(items)  # reordered keys
        members = []
        for key, item in items:
            if rng.random() < wild / 2:  # a duplicate key before or after: the last one wins
                other = f"{_render_str(rng, key, 0)}:{render(rng, copy.deepcopy(rng.choice(VALUES)), 0)}"
                mine = f"{_render_str(rng, key, wild)}{ws}:{ws}{render(rng, item, wild)}"
                members.extend([other, mine] if rng.random() < 0.5 else [mine, other])
            else:
                members.append(f"{_render_str(rng, key, wild)}{ws}:{ws}{render(rng, item, wild)}")
        return "{" + ws + f"{ws},{ws}".join(members) + ws + "}"
    if type(value) is list:
        return "[" + ws + f"{ws},{ws}".join(render(rng, item, wild) for item in value) + ws + "]"
    if type(value) is str:
        return _render_str(rng, value, wild)
    if value is None or type(value) is bool:
        return orjson.dumps(value).decode()
    return _render_number(rng, value, wild)


def _rendered(rng: random.Random, bid: Any) -> bytes:
    wild = rng.choice((0.0, 0.003, 0.01, 0.03, 0.2))
    text = render(rng, bid, wild)
    if rng.random() < 0.2:
        text = rng.choice(_WS) + text + rng.choice(_WS)
    return text.encode("utf-8", "surrogatepass")


def _plain(value: Any) -> bytes:
    """orjson.dumps's bytes, also for integers past 64 bits."""
    return render(random.Random(0), value, 0.0).encode("utf-8", "surrogatepass")


def _bids(count: int, seed: int) -> Iterator[dict[str, Any]]:
    for bid in BidGenerator(seed=seed, users=1000, days=30).bids(count):
        assert isinstance(bid, dict)
        yield orjson.loads(orjson.dumps(bid))


@pytest.mark.parametrize("seed", [21, 22])
def test_rerendered_bids(seed: int) -> None:
    rng = random.Random(seed)
    kinds = {"fast": 0, "none": 0}
    for bid in _bids(3000, seed):
        kinds[check(_rendered(rng, bid), rng.choice((None, NOW_MS - 5)))] += 1
    assert kinds["fast"] > 100 and kinds["none"] > 500, kinds


@pytest.mark.parametrize("seed", [31, 32])
def test_mutated_values_in_every_field_read(seed: int) -> None:
    """Values of every type (big, negative, float, unicode, empty ...) at every path the document reads."""
    rng = random.Random(seed)
    numbers: tuple[Any, ...] = (0, -0.0, -1, 2**63, -(2**63) - 1, 2**64, 10**18 - 1, 10**18, 10**19, 1e16, 1e-7,
                                5e-324, 1.7976931348623157e308, 0.1, -123.456, 52.48998, 1990, 1990.0, 300, 250,
                                1795860000123, 4102444800000)
    kinds = {"fast": 0, "none": 0}
    for bid in _bids(3000, seed):
        for _ in range(rng.choice((1, 1, 2, 3))):
            value = rng.choice(numbers) if rng.random() < 0.4 else copy.deepcopy(rng.choice(VALUES))
            _apply(bid, rng.choice(PATHS), ... if rng.random() < 0.1 else value)
        raw = _plain(bid) if rng.random() < 0.6 else _rendered(rng, bid)
        kinds[check(raw)] += 1
    assert kinds["fast"] > 300 and kinds["none"] > 300, kinds  # (many mutations are errors: None)


def test_floats_are_read_as_orjson_reads_them() -> None:
    rng = random.Random(5)
    bid = next(_bids(1, 5))
    for i in range(3000):
        any_double = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        lat = any_double if i % 3 == 0 else rng.uniform(-90, 90)  # (in range: the document carries it)
        spellings = {orjson.dumps(lat).decode(), f"{lat:.17g}", f"{lat:.{rng.randint(1, 25)}f}", f"{lat:.12g}"}
        for text in spellings:
            raw = orjson.dumps(bid).replace(b'"lat":', b'"lat":' + text.encode() + b',"x":', 1)
            check(raw)


# --- edge cases -------------------------------------------------------------------------------------------------

_BASE = orjson.dumps(next(_bids(1, 6)))


@pytest.mark.parametrize("raw", [
    b"", b" ", b"{}", b"[]", b"null", b'"x"', b"1", b"{", b"}", b"\xef\xbb\xbf" + _BASE, b"\x00" + _BASE,
    _BASE + b"\x00", _BASE + b" x", _BASE + b"}", b" \t\r\n" + _BASE + b" \t\r\n", b"\x0b" + _BASE, _BASE + b"\x0c",
    _BASE[:-1], _BASE[:-1] + b",}", _BASE[:-1] + b',"k":}', _BASE[:-1] + b',"k":[1,]}', _BASE[:-1] + b',"k":01}',
    _BASE[:-1] + b',"k":-}', _BASE[:-1] + b',"k":1.}', _BASE[:-1] + b',"k":.5}', _BASE[:-1] + b',"k":+1}',
    _BASE[:-1] + b',"k":1e400}', _BASE[:-1] + b',"k":-1e400}', _BASE[:-1] + b',"k":1e5}', _BASE[:-1] + b',"k":NaN}',
    _BASE[:-1] + b',"k":Infinity}', _BASE[:-1] + b',"k":nul}', _BASE[:-1] + b',"k":truee}',
    _BASE[:-1] + b',"k":"\\ud800"}', _BASE[:-1] + b',"k":"\\ud83d\\ude00"}', _BASE[:-1] + b',"k":"\\u00e9"}',
    _BASE[:-1] + b',"k":"\\x41"}', _BASE[:-1] + b',"k":"\\u12"}', _BASE[:-1] + b',"k":"\x01"}',
    _BASE[:-1] + b',"k":"\x7f"}', _BASE[:-1] + b',"k":"\xed\xa0\x80"}', _BASE[:-1] + b',"k":"\xf4\x90\x80\x80"}',
    _BASE[:-1] + b',"k":"\xc0\xaf"}', _BASE[:-1] + b',"k":"\xe0\x80\xaf"}', _BASE[:-1] + b',"k":"\xef\xbf\xbe"}',
    _BASE[:-1] + b',"k":"\xf0\x9f\x98\x80"}', _BASE[:-1] + b',"\xc3\xa9":1}', _BASE[:-1] + b',"k":"\xc3"}',
    _BASE[:-1] + b',"k":' + b"[" * 60 + b"]" * 60 + b"}", _BASE[:-1] + b',"k":' + b"[" * 70 + b"]" * 70 + b"}",
    _BASE[:-1] + b',"k":' + b"[" * 2000 + b"]" * 2000 + b"}", _BASE[:-1] + b',"k":' + b"1" * 100 + b"}",
    _BASE[:-1] + b',"k":123456789012345678901234567890}', _BASE[:-1] + b',"k":0.' + b"1" * 80 + b"}",
    _BASE.replace(b'"user":', b'"user":null,"user":', 1), _BASE.replace(b'"user":', b'"\\u0075ser":', 1),
    _BASE.replace(b'"user":{', b'"user":{"id":"first",', 1), _BASE.replace(b'"yob":', b'"yob":-0,"yob":', 1),
    _BASE.replace(b'"yob":', b'"yob":1990.0,"yob":', 1), _BASE.replace(b'"device":', b'"device":[],"x":', 1),
])
def test_edge_cases(raw: bytes) -> None:
    check(raw)
    check(raw, NOW_MS - 1, NOW_MS)


def test_keys_escapes_and_duplicates_in_kept_objects() -> None:
    bid = json.loads(_BASE)
    bid["user"]["id"] = "caf\u00e9 \U0001f600"
    plain = orjson.dumps(bid)
    assert check(plain) == "fast"  # non-ASCII UTF-8 kept as is
    assert check(json.dumps(bid).encode()) == "none"  # an escape in a kept string: orjson's lane
    duplicated = plain.replace(b'"yob":', b'"yob":1800,"yob":', 1)
    assert check(duplicated) == "fast" and orjson.loads(duplicated)["user"]["yob"] != 1800
    assert check(plain.replace(b'"ua":', b'"ua":"\\u00e9\\n\\"","ua":', 1)) == "fast"  # escapes in skipped strings


def test_only_bytes() -> None:
    assert c_module.document_from_json(_BASE.decode(), None, NOW_MS) is None
    assert c_module.document_from_json(bytearray(_BASE), None, NOW_MS) is None
    assert c_module.document_from_json(memoryview(_BASE), None, NOW_MS) is None
    assert check(_BASE.decode()) == "none" and check(bytearray(_BASE)) == "none"
    with pytest.raises(TypeError):
        c_module.document_from_json(_BASE)


# --- (c) hypothesis ---------------------------------------------------------------------------------------------

_TEXT = st.text(max_size=8) | st.sampled_from(["", "M", "F", "2026-11-22T10:00:00.123Z", "1795860000123", "a, b"])
_BID_KEYS = ("user", "device", "ext", "app", "site", "imp", "id", "at")
BID_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from([path.split(".")[-1].split("[")[0] for path in PATHS] + ["x", "é", ""]), children,
        max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(top=st.dictionaries(st.sampled_from(_BID_KEYS), BID_JSON, max_size=6), seed=st.integers(0, 2**32))
def test_property_bid_shaped_objects(top: dict[str, Any], seed: int) -> None:
    check(_plain(top))
    check(_rendered(random.Random(seed), top))


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 49), changes=st.lists(st.tuples(st.sampled_from(PATHS), JSON), max_size=3),
       seed=st.integers(0, 2**32))
def test_property_generated_bids_with_any_json(index: int, changes: list[tuple[str, Any]], seed: int) -> None:
    bid = copy.deepcopy(_HYPOTHESIS_BASE[index])
    for path, value in changes:
        _apply(bid, path, value)
    check(_plain(bid))
    check(_rendered(random.Random(seed), bid))


_HYPOTHESIS_BASE = list(_bids(50, 8))


# --- (d) leaks --------------------------------------------------------------------------------------------------


def test_no_leaks() -> None:
    rng = random.Random(3)
    raws = _messages(200, seed=3)
    raws += [_byte_mutation(rng, raw) for raw in raws]  # bail-outs mid-scan release what they built
    raws += [raw.replace(b'"ua":', b'"ua":"\\u00e9",' + b"[" * 70 + b"]" * 70 + b',"ua":', 1) for raw in raws[:50]]
    document_from_json = c_module.document_from_json

    def run() -> None:
        for raw in raws:
            document_from_json(raw, None, NOW_MS)

    grown = bytes_kept(run, warmup=3, rounds=40)
    assert grown < 64 * 1024, grown  # 40 x 450 calls: a leak of one object per call would be ~1 MB


# --- (e) safety review: the lanes under hostile inputs ------------------------------------------------------------


def test_fast_document_holds_user_fields_across_later_lookups() -> None:
    """user.keywords stays alive while user.kwarray and user.data are looked up (that lookup may run Python code).

    A key hashing like "kwarray" makes that lookup call its __eq__, which empties user and reallocates the freed
    memory: with keywords borrowed rather than held, C read a freed string (a crash, or other interests).
    """

    def document(fast_document: Any) -> Any:
        kept: list[str] = []

        class EmptiesTheDict:
            armed = True

            def __hash__(self) -> int:
                return hash("kwarray")

            def __eq__(self, other: object) -> bool:
                if EmptiesTheDict.armed:
                    EmptiesTheDict.armed = False
                    user.clear()  # drops the only reference to the keywords string
                    kept.extend("".join(["xxxxx", ", yyy", str(i)]) for i in range(10))  # reuse its memory
                return False

        user: dict[Any, Any] = {"id": "u1", "keywords": "".join(["sport", ", new", "s"])}
        user[EmptiesTheDict()] = 1
        return fast_document({"user": user}, None, NOW_MS)

    expected = document(normalize._fast_document)
    assert expected is not None and expected["interests"] == ["sport", "news"]
    assert document(c_module.fast_document) == expected


# --- (f) the word cache: repeated values are shared str objects, and always the right ones ----------------------


def _bid(user_id: str, city: str, os_name: str = "iOS") -> bytes:
    return orjson.dumps({"user": {"id": user_id}, "device": {"os": os_name, "geo": {"city": city}},
                         "ext": {"exchange": "xandr"}})


def test_repeated_words_are_shared_and_ids_are_not() -> None:
    first = c_module.document_from_json(_bid("u-1", "Leeds"), None, NOW_MS)
    second = c_module.document_from_json(_bid("u-1", "Leeds"), None, NOW_MS)
    assert first == second
    assert first["device"]["os"] is second["device"]["os"]  # from the cache: one object, its hash cached
    assert first["geo"]["city"] is second["geo"]["city"]
    assert first["exchange"] is second["exchange"]
    assert first["user_id"] is not second["user_id"]  # ids are not words: never kept


def test_the_word_cache_gives_the_right_word_under_collisions() -> None:
    """Far more distinct words than slots, interleaved with repeats and words of the longest cached
    length and one byte more: every document carries its own bid's values."""
    rng = random.Random(5)
    cities = [f"city-{i:05d}" for i in range(20_000)] + ["x" * 40, "x" * 41, "y" * 40]
    for _ in range(3):
        for city in rng.sample(cities, len(cities)):
            os_name = rng.choice(["iOS", "Android", "iOS ", "ios"])
            doc = c_module.document_from_json(_bid(f"u{rng.randrange(99)}", city, os_name), None, NOW_MS)
            assert doc["geo"]["city"] == city and doc["device"]["os"] == os_name
