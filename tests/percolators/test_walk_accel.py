"""The C document walk (``percolators._walk``) against its Python twin (``FastIndexer.index_batch``
with ``accelerate=False``): the same indexed documents, slots, errors and batch postings, down to
dict order, on seeded random workloads, on randomly corrupted documents and on edge cases.
"""

from __future__ import annotations

import enum
import math
import random
import sys
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from percolators import fast_index
from percolators.document import index_document
from percolators.fast_index import FastIndexer
from percolators.mapping import Mapping
from percolators.workload import WORKLOAD_NOW, generate_documents
from rules_service.schema import USER_MAPPING
from tests.leaks import bytes_kept

pytestmark = pytest.mark.skipif(fast_index._walk is None, reason="percolators._walk is not built (pip install -e .)")

USER = Mapping.from_json(USER_MAPPING)
GEO = {"geo.location"}

# a mapping with every kind of leaf: the fast ones, and the ones the fast path always leaves
# to the full indexer (text, multi-fields, ignore_above, null_value, other date formats...)
ODD_MAPPING = Mapping.from_json({
    "properties": {
        "k": {"type": "keyword"},
        "short_k": {"type": "keyword", "ignore_above": 4},
        "nulled": {"type": "keyword", "null_value": "NULL"},
        "b": {"type": "byte"},
        "s": {"type": "short"},
        "i": {"type": "integer"},
        "l": {"type": "long"},
        "f": {"type": "float"},
        "d": {"type": "double"},
        "flag": {"type": "boolean"},
        "when": {"type": "date"},
        "day": {"type": "date", "format": "yyyy-MM-dd"},
        "loose_when": {"type": "date", "ignore_malformed": True},
        "where": {"type": "geo_point"},
        "loose_where": {"type": "geo_point", "ignore_malformed": True},
        "title": {"type": "text", "fields": {"raw": {"type": "keyword"}}},
        "obj": {"properties": {"k": {"type": "keyword"}, "i": {"type": "integer"},
                               "deep": {"properties": {"when": {"type": "date"}}}}},
    }
})
ODD_GEO = {"where", "loose_where"}


def _both(mapping: Mapping, docs: list[Any], fields: set[str], geo: set[str], on_error: str = "skip") -> tuple:
    """(C outcome, Python outcome), each the build's full content or the exception raised."""
    outcomes: list[Any] = []
    for accelerate in (True, False):
        indexer = FastIndexer(mapping, accelerate=accelerate)
        try:
            build = indexer.index_batch(docs, fields, geo, on_error)
        except Exception as exc:  # both paths must fail the same way
            outcomes.append(("raised", type(exc), str(exc)))
            continue
        outcomes.append((
            [(list(d.values.items()), d.present, type(d.present), d.phrases) for d in build.docs],
            build.slots,
            {slot: (type(exc), str(exc)) for slot, exc in build.errors.items()},
            {name: list(by_value.items()) for name, by_value in build.postings.items()},
            list(build.postings),
            build.geo,
        ))
    return outcomes[0], outcomes[1]


def _verdicts(mapping: Mapping, docs: list[Any]) -> list[tuple[Any, Any, Any]]:
    """Which documents each walk indexes itself (True), leaves to the full indexer (False) or
    fails on (the exception type): the full indexer gives the same results, so a C walk that
    gave up too often would otherwise go unnoticed."""
    indexer = FastIndexer(mapping)
    c_plan, py_plan = indexer._c_plan(indexer.plan, {}), indexer._batch_plan(indexer.plan, {})
    out = []
    for doc in docs:
        if type(doc) is not dict:
            continue
        c_says: Any
        py_says: Any
        try:
            c_says = fast_index._walk.walk([doc], 0, c_plan, [], [], indexer.index, indexer._date_or_none) == 1
        except Exception as exc:
            c_says = type(exc)
        try:
            indexer._walk_post(doc, py_plan, {}, 0)
            py_says = True
        except fast_index._Slow:
            py_says = False
        except Exception as exc:
            py_says = type(exc)
        out.append((doc, c_says, py_says))
    return out


def _assert_same(mapping: Mapping, docs: list[Any], fields: set[str], geo: set[str], on_error: str = "skip") -> Any:
    assert [verdict for verdict in _verdicts(mapping, docs) if verdict[1] != verdict[2]] == []
    c_out, py_out = _both(mapping, docs, fields, geo, on_error)
    if c_out != py_out and c_out[0] != "raised" and py_out[0] != "raised":
        for i, (got, want) in enumerate(zip(c_out, py_out, strict=True)):
            assert got == want, f"part {i} differs"
    assert c_out == py_out
    return c_out


def test_the_module_attribute_switches_the_walk(monkeypatch):
    calls = []

    class Spy:
        @staticmethod
        def walk(*args):
            calls.append(args[1])
            return fast_index._walk.walk(*args)

    monkeypatch.setattr(fast_index, "accelerator", Spy)
    FastIndexer(USER).index_batch([{"gender": "male"}, 7, {"gender": "female"}], {"gender"}, GEO, "skip")
    assert calls == [0, 2]  # stopped at the non-document, went on after it
    monkeypatch.setattr(fast_index, "accelerator", None)
    FastIndexer(USER).index_batch([{"gender": "male"}], {"gender"}, GEO, "skip")
    assert calls == [0, 2]
    FastIndexer(USER, accelerate=False)
    assert len(calls) == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("fields", ["all", "some", "none"])
def test_random_workloads_index_identically(seed, fields):
    wanted = {"all": set(USER.fields), "some": {"gender", "interests", "geo.location", "age", "last_seen"},
              "none": set()}[fields]
    docs = generate_documents(1500, seed=seed, now=WORKLOAD_NOW)
    c_out = _assert_same(USER, docs, wanted, GEO)
    assert len(c_out[0]) == 1500 and not c_out[2]
    if fields != "none":
        assert c_out[3] or c_out[5]  # the comparison saw postings, not two empty builds


_NASTY: list[Any] = [
    None, True, False, 0, 1, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1,
    2**80, 30.0, 30.5, -0.0, math.nan, math.inf, "", "x", "30", "é", "日本", "\U0001f600", "a.b",
    [], [None], [[]], [["nested"]], [1, 1, 2], [1, True], ["a", "a", "b"], ["a", 3], [{"x": 1}],
    {}, {"x": 1}, {"lat": 51.5, "lon": -0.1}, {"lat": 51, "lon": 0}, [-0.1, 51.5],
    "51.5,-0.1", "2026-01-15T12:00:00Z", "2024-02-29T23:59:59.999Z", "2026-02-30T00:00:00Z",
    ["2026-01-15T12:00:00Z", "2026-01-15T12:00:00.000Z"], [{"lat": 1.5, "lon": 2.5}, {"lat": 1.5, "lon": 2.5}],
    OrderedDict(lat=1.0, lon=2.0), ("a", "b"), b"bytes",
]


def _corrupt(rng: random.Random, doc: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``doc`` with a few values replaced by odd ones (or dotted keys, or unmapped fields)."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        value = rng.choice(_NASTY)
        r = rng.random()
        if r < 0.15:
            doc[path] = value  # dotted when nested: the full indexer's job
        elif r < 0.2:
            doc["unmapped_" + str(rng.randint(0, 3))] = value
        else:
            head, _, tail = path.partition(".")
            if tail and isinstance(doc.get(head), dict):
                doc[head][tail] = value
            elif not tail:
                doc[head] = value
    return doc


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_corrupted_documents_index_identically(seed):
    rng = random.Random(seed)
    paths = sorted(USER.fields)
    docs: list[Any] = []
    for doc in generate_documents(600, seed=seed, now=WORKLOAD_NOW):
        r = rng.random()
        docs.append(_corrupt(rng, doc, paths) if r < 0.5 else doc if r < 0.97 else rng.choice(_NASTY))
    c_out = _assert_same(USER, docs, set(USER.fields) - {"user_id"}, GEO)
    assert c_out[2] and len(c_out[0]) > 300  # some errors, mostly indexed: both paths exercised


_DATES = [
    "2026-01-15T12:00:00Z", "2026-01-15T12:00:00.123Z", "2026-01-15T12:00:00.1Z", "2026-01-15T12:00:00.1234Z",
    "2024-02-29T00:00:00Z", "2023-02-29T00:00:00Z", "1900-02-29T00:00:00Z", "2000-02-29T00:00:00Z",
    "2026-02-30T00:00:00Z", "2026-04-31T00:00:00Z", "2026-12-31T23:59:59.999Z", "2026-13-01T00:00:00Z",
    "2026-00-10T00:00:00Z", "2026-01-00T00:00:00Z", "2026-01-15T24:00:00Z", "2026-01-15T23:60:00Z",
    "2026-01-15T23:59:60Z", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z",
    "1969-12-31T23:59:59.999Z", "1600-03-01T00:00:00Z", "2026-01-15T12:00:00z", "2026-01-15t12:00:00Z",
    "2026-01-15 12:00:00Z", "2026-01-15T12:00:00+00:00", "2026-01-15T12:00:00", "2026-01-15", "",
    "2026-1-15T12:00:00Z", "+2026-01-15T12:00:00Z", "2026-01-15T12:00:00Z ", " 2026-01-15T12:00:00Z",
    # Python's \d takes every Unicode digit (the C walk hands non-ASCII text back to Python)
    "\uff12\uff10\uff12\uff16-01-15T12:00:00Z",
    "\u0662\u0660\u0662\u0666-\u0660\u0661-\u0661\u0665T\u0661\u0662:\u0660\u0660:\u0660\u0660Z",
    "2026-01-15T12:00:00.\u0661\u0662\u0663Z", "2026-01-15T12:00:00Zé",
    "2026-01-15T12:00:00.12aZ", "20260115T120000Z", "1768478400000", "abcd-ef-ghTij:kl:mnZ",
]


def test_dates_index_identically():
    docs: list[Any] = [{"last_seen": text} for text in _DATES]
    docs += [{"last_seen": [text, _DATES[0], text]} for text in _DATES]
    docs += [{"last_seen": value} for value in (1768478400000, 1.5, True, None, [], ["2026-01-15T12:00:00Z"] * 20)]
    c_out = _assert_same(USER, docs, {"last_seen"}, GEO)
    indexed = [values for values, *_ in c_out[0]]
    assert [("last_seen", (1709251199999,))] not in indexed  # sanity: the leap day below is indexed
    assert [("last_seen", (1709164800000,))] in indexed


class _Float(float):
    pass


_POINTS = [
    {"lat": _Float(51.5), "lon": 0.1}, {"lat": 51.5, "lon": _Float(0.1)}, _Float(1.0),
    {"lat": 51.5, "lon": -0.1}, {"lat": 90.0, "lon": 180.0}, {"lat": -90.0, "lon": -180.0},
    {"lat": 90.0000001, "lon": 0.0}, {"lat": 0.0, "lon": 180.0000001}, {"lat": -0.0, "lon": -0.0},
    {"lat": math.nan, "lon": 0.0}, {"lat": 0.0, "lon": math.inf}, {"lat": 51, "lon": 0}, {"lat": 51.5, "lon": 0},
    {"lat": True, "lon": 0.0}, {"lat": "51.5", "lon": "0.1"}, {"lat": 51.5}, {"lon": 0.1, "x": 1.0},
    {"lat": 51.5, "lon": 0.1, "z": 3.0}, {"lat": 51.5, 7: 0.1}, {"lat": 1e-300, "lon": -1e-300},
    {"lat": 45.000000001, "lon": 179.99999999}, OrderedDict(lat=51.5, lon=0.1), [0.1, 51.5], "51.5,0.1", "gcpvj0",
    [{"lat": 1.0, "lon": 2.0}, {"lat": 1.0, "lon": 2.0}, {"lat": 3.0, "lon": 4.0}], [{"lat": 1.0, "lon": 2.0}, 5],
    [], [[]], None,
]


def test_geo_points_index_identically():
    rng = random.Random(5)
    points = list(_POINTS)
    points += [{"lat": rng.uniform(-90, 90), "lon": rng.uniform(-180, 180)} for _ in range(500)]
    points += [[{"lat": rng.uniform(-90, 90), "lon": rng.uniform(-180, 180)} for _ in range(rng.randint(1, 30))]
               for _ in range(30)]
    docs = [{"geo": {"location": point, "city": "x"}} for point in points]
    for fields in ({"geo.location", "geo.city"}, {"geo.city"}):
        c_out = _assert_same(USER, docs, fields, GEO)
    assert c_out[2]


def test_keywords_and_integers_index_identically():
    big = [f"v{i % 7}" for i in range(40)]
    docs: list[Any] = [
        {"gender": "é"}, {"gender": "日本"}, {"gender": "\U0001f600"}, {"gender": ""}, {"gender": "a.b"},
        {"interests": big}, {"interests": ["a"] * 17 + ["b"]}, {"interests": ["x", "y", "x"]},
        {"interests": ["x", None]}, {"interests": [["x"]]}, {"interests": []}, {"interests": [""]},
        {"interests": ["ß", "ss", "SS"]}, {"gender": 7}, {"gender": 7.5}, {"gender": True}, {"gender": None},
        {"gender": {"x": 1}}, {"gender": ["a", {"b": 1}]},
        {"age": True}, {"age": False}, {"age": 2**31 - 1}, {"age": 2**31}, {"age": -(2**31)}, {"age": -(2**31) - 1},
        {"age": 2**64}, {"age": -(2**64)}, {"age": 30.0}, {"age": "30"}, {"age": [30, 30, 31]},
        {"age": [30, True]}, {"age": [30, 2**40]}, {"age": list(range(40)) + list(range(20))}, {"age": None},
        {"age": []}, {"age": [[30]]}, {"age": 0},
        {"ad_slot": {"w": 320, "h": 50}}, {"ad_slot": [{"w": 320}]}, {"ad_slot": None}, {"ad_slot": "320x50"},
        {"ad_slot": {}}, {"ad_slot": []}, {"device": {"os": {"name": "x"}}}, {"geo": "London"}, {"geo": None},
        {"geo": []}, {"geo.city": "London"}, {"device": {"os.name": "x"}}, {"x.y": 1}, {"unmapped": {"deep": 1}},
    ]
    for fields in (set(USER.fields), {"interests", "age"}, set()):
        _assert_same(USER, docs, fields, GEO)


class _Status(enum.IntEnum):  # an int subclass
    OK = 200


class _Text(str):
    pass


def test_subclasses_and_odd_keys_index_identically():
    docs: list[Any] = [
        {"age": _Status.OK}, {"gender": _Text("male")}, {_Text("gender"): "male"}, {_Text("a.b"): 1},
        {"geo": OrderedDict(city="x")}, OrderedDict(gender="male"), {("a.b",): 1}, {(".",): 1},
        {frozenset(): 1}, {"interests": ("a", "b")}, {"age": [_Status.OK]},
    ]
    _assert_same(USER, docs, set(USER.fields), GEO)


@pytest.mark.parametrize("key", [5, b"x", 1.5, None])
def test_keys_python_cannot_test_for_dots_fail_the_same_way(key):
    docs = [{"gender": "male"}, {key: 1}]
    c_out, py_out = _both(USER, docs, {"gender"}, GEO)
    assert c_out == py_out
    assert c_out[0] == "raised" and c_out[1] is TypeError


def test_errors_raise_identically():
    docs = [{"gender": "male"}, {"age": "forty"}, {"gender": "female"}]
    c_out, py_out = _both(USER, docs, {"gender", "age"}, GEO, on_error="raise")
    assert c_out == py_out and c_out[0] == "raised"
    _assert_same(USER, [None, "x", 3, [], {"gender": "x"}], {"gender"}, GEO, on_error="raise")


def test_every_kind_of_mapping_leaf_indexes_identically():
    rng = random.Random(21)
    paths = [*sorted(ODD_MAPPING.fields), "obj", "obj.deep", "title.raw", "nope"]
    plain = {"k": "a", "b": 1, "s": 300, "i": 70000, "l": 2**40, "when": "2026-01-15T00:00:00Z",
             "where": {"lat": 1.0, "lon": 2.0}, "obj": {"k": "z", "i": 3, "deep": {"when": "2026-01-15T00:00:00Z"}}}
    docs: list[Any] = [plain]
    for _ in range(800):
        doc: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in plain.items()}
        for _ in range(rng.randint(0, 3)):
            path = rng.choice(paths)
            value = rng.choice(_NASTY + _DATES[:8] + _POINTS[:8] + [127, 128, -129, 32767, 32768])
            head, _, tail = path.partition(".")
            if tail and isinstance(doc.get(head), dict) and rng.random() < 0.8:
                doc[head][tail] = value
            else:
                doc[path] = value
        docs.append(doc)
    for fields in (set(ODD_MAPPING.fields), {"k", "b", "where", "obj.deep.when"}):
        c_out = _assert_same(ODD_MAPPING, docs, fields, ODD_GEO)
    assert c_out[2] and len(c_out[0]) > 100


def test_the_walk_and_masks_do_not_leak():
    docs: list[Any] = generate_documents(300, seed=3, now=WORKLOAD_NOW)
    docs += [{"age": "x"}, {"age": 2**80}, {"interests": ["a", 1]}, {"geo.city": "x"}, 5,
             {"interests": [f"v{i % 5}" for i in range(30)]},
             {"last_seen": "\u0662\u0660\u0662\u0666-\u0660\u0661-\u0661\u0665T"
                           "\u0661\u0662:\u0660\u0660:\u0660\u0660Z"}]
    indexer = FastIndexer(USER)
    fields = set(USER.fields)

    def run(times: int) -> None:
        for _ in range(times):
            build = indexer.index_batch(docs, fields, GEO, "skip")
            assert len(build.docs) == len(docs) - 3
            assert all(doc.present and doc.values and doc.phrases == {} for doc in build.docs)
            terms, _ = fast_index._walk.masks(build.postings)
            assert terms and fast_index._walk.mask_of(list(range(0, 3000, 3)))
        with pytest.raises(TypeError):
            indexer.index_batch([{"gender": "x"}, {5: 1}], fields, GEO, "skip")

    # warm caches (the date cache, interned strings): 3 runs, and 5 more traced
    grown = bytes_kept(lambda: run(1), warmup=3, traced_warmup=5, rounds=40)
    assert grown < 64 * 1024, f"{grown} bytes kept after 40 batches"


def test_batch_documents_build_their_indexed_form_on_first_read():
    from percolators.document import index_document

    docs = generate_documents(50, seed=1, now=WORKLOAD_NOW)
    build = FastIndexer(USER).index_batch(docs, set(USER.fields), GEO, "skip")
    assert all(type(doc) is fast_index._walk.LazyDoc for doc in build.docs)
    for doc, source in zip(build.docs, docs, strict=True):
        expected = index_document(source, USER)
        assert (doc.values, doc.present, doc.phrases) == (expected.values, expected.present, expected.phrases)
        assert type(doc.present) is frozenset and doc.values is doc.values  # built once
        assert repr(doc) == repr(expected)


def test_a_document_changed_after_the_walk_gets_the_full_indexer():
    from percolators.errors import InvalidDocumentError

    docs: list[Any] = [{"gender": "male", "age": 30}, {"gender": "female"}]
    build = FastIndexer(USER).index_batch(docs, {"gender"}, GEO, "skip")
    docs[0]["geo.city"] = "London"  # dotted: the walk would leave it to index_document
    assert build.docs[0].values == {"gender": ("male",), "age": (30,), "geo.city": ("London",)}
    docs[1]["age"] = "forty"
    with pytest.raises(InvalidDocumentError):
        _ = build.docs[1].values


# ----- BatchIndex masks (percolators._walk.masks / mask_of) ---------------------------------------

def test_masks_equal_the_python_loop(monkeypatch):
    from percolators import batch

    docs: list[Any] = generate_documents(3000, seed=8, now=WORKLOAD_NOW)
    docs += [{"interests": [f"v{i}" for i in range(40)]}, {"age": 2**40}, 5, {"geo.city": "x"}]
    build = FastIndexer(USER).index_batch(docs, set(USER.fields), GEO, "skip")
    built = {}
    for accel in (fast_index._walk, None):
        monkeypatch.setattr(batch, "accelerator", accel)
        index = batch.BatchIndex(build.docs, 0, set(USER.fields), GEO, postings=build.postings, geo=build.geo)
        built[accel is not None] = (list(index.terms.items()),
                                    {name: list(masks.items()) for name, masks in index._field_masks.items()},
                                    list(index._field_masks), index.present_mask("age"), index.geo_mask("geo.location"),
                                    index.geo_cell_masks("geo.location", 0.05))
    assert built[True] == built[False]
    assert len(built[True][0]) > 1000


@pytest.mark.parametrize("positions", [[], [0], [62], [63], [64], [5000], [3, 3, 3], [9, 1, 8, 1, 0],
                                       list(range(0, 9000, 7)), list(range(300, 0, -1)), [1 << 20]])
def test_mask_of_equals_the_python_one(monkeypatch, positions):
    from percolators import batch

    got = fast_index._walk.mask_of(positions)
    monkeypatch.setattr(batch, "accelerator", None)
    assert got == batch.mask_of(positions) == sum(1 << p for p in set(positions))
    assert type(got) is int


def test_masks_refuse_what_is_not_postings():
    with pytest.raises(TypeError):
        fast_index._walk.masks({"f": {"v": (1, 2)}})
    with pytest.raises(TypeError):
        fast_index._walk.masks({"f": [1]})
    with pytest.raises(ValueError):
        fast_index._walk.mask_of([-1])
    with pytest.raises(TypeError):
        fast_index._walk.mask_of(["1"])


# ----- safety: Python code run during a walk (a key's __eq__, the date parser) ---------------------------

def _lazy(mapping: Mapping, doc: dict[str, Any], date_fallback: Any = None) -> Any:
    indexer = FastIndexer(mapping)
    docs: list[Any] = []
    plan = indexer._c_plan(indexer.plan, {})
    assert fast_index._walk.walk([doc], 0, plan, docs, [], indexer.index, date_fallback or indexer._date_or_none) == 1
    return docs[0]


def test_a_geo_key_whose_eq_frees_lat():
    fired: list[Any] = []

    class Lon(str):
        def __hash__(self) -> int:
            return hash("lon")

        def __eq__(self, other: object) -> bool:
            if armed and not fired:
                del point["lat"]  # lat's last reference
                fired.append(float("77.25"))  # its memory, reused
            return str.__eq__("lon", other)

    armed = False
    point: dict[Any, Any] = {"lat": float("12.5"), Lon("lon"): 3.0}
    lazy = _lazy(ODD_MAPPING, {"where": point})
    armed = True
    got = lazy.values["where"]
    assert fired and got == index_document({"where": {"lat": 12.5, "lon": 3.0}}, ODD_MAPPING).values["where"]


def test_a_document_read_while_it_is_being_filled():
    indexer = FastIndexer(ODD_MAPPING)
    seen: list[Any] = []
    entered: list[str] = []

    def date_fallback(text: str) -> Any:
        if armed and not entered:
            entered.append(text)
            seen.append(lazy.values)  # re-enters the fill of the same document
        return indexer._date_or_none(text)

    armed = False
    lazy = _lazy(ODD_MAPPING, {"when": "\uff12\uff10\uff12\uff10-01-02T03:04:05Z", "k": "x"}, date_fallback)
    armed = True
    same = lazy.values is seen[0]
    count = sys.getrefcount(seen[0])  # seen, the document, the argument: no leaked reference
    assert same and count == 3  # one values dict (the outer fill's replaced the inner one, leaking it)


# ----- property tests: adversarial documents and positions, C against Python ---------------------------

_ODD_KEYS = ["k", "short_k", "nulled", "b", "s", "i", "l", "f", "d", "flag", "when", "day", "loose_when", "where",
             "loose_where", "title", "obj", "obj.k", "unknown", "lat", "lon"]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["2020-02-29T23:59:59Z", "2021-02-29T00:00:00Z", "0001-01-01T00:00:00.000Z",
                     "9999-12-31T23:59:59.999Z", "\u0661\u0669\u0667\u0660-01-01T00:00:00Z", "2020-01-01T24:00:00Z"]),
    st.fixed_dictionaries({"lat": st.floats(-91, 91), "lon": st.floats(-181, 181)}),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_ODD_KEYS), inner, max_size=4)), max_leaves=8)
_docs = st.dictionaries(st.sampled_from(_ODD_KEYS), _values, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_docs, min_size=1, max_size=5), st.sets(st.sampled_from(sorted(ODD_MAPPING.fields)), max_size=6))
def test_property_adversarial_documents_index_identically(docs, fields):
    geo = {name for name in fields if name in ODD_GEO}
    _assert_same(ODD_MAPPING, docs, fields, geo)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20_000), max_size=300))
def test_property_mask_of_equals_the_python_one(positions):
    from percolators import batch

    got = fast_index._walk.mask_of(positions)
    saved, batch.accelerator = batch.accelerator, None
    try:
        assert got == batch.mask_of(positions) == sum(1 << p for p in set(positions))
    finally:
        batch.accelerator = saved


def test_a_date_parser_that_empties_the_list_it_parses():
    indexer = FastIndexer(ODD_MAPPING)
    dates = ["\uff12\uff10\uff12\uff10-01-02T03:04:05Z", "2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z"]

    def date_fallback(text: str) -> Any:
        dates.clear()  # the walk read dates[1] from the emptied list
        return indexer._date_or_none(text)

    plan = indexer._c_plan(indexer.plan, {})
    # the document changed under the walk: left to the full indexer, like any document it cannot read
    assert fast_index._walk.walk([{"when": dates}], 0, plan, [], [], indexer.index, date_fallback) == 0
