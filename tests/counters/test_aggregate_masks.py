"""aggregate_masks() (per-rule document masks; its emit step in numpy + Python or in C) equals
aggregate() (per-document lists), on both paths."""

from __future__ import annotations

import random
from typing import Any

import pytest

from rules_service.counters import aggregate as aggregate_module
from rules_service.counters.aggregate import aggregate, aggregate_masks
from rules_service.counters.port import CounterBatch

DIMS = ("gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange", "interests", "ad_slot.w",
        "flag")


@pytest.fixture(autouse=True, params=["python", "c"])
def emit_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on the Python reference and on the C twin (skipped when not built)."""
    if request.param == "c":
        if aggregate_module._aggregate is None:
            pytest.skip("rules_service.counters._aggregate is not built")
        monkeypatch.setattr(aggregate_module, "USE_C", True)
    else:
        monkeypatch.setattr(aggregate_module, "USE_C", False)
    return str(request.param)


def random_doc(rnd: random.Random, users: int, hours: int) -> dict[str, Any]:
    hour = rnd.randrange(hours)
    doc: dict[str, Any] = {
        "user_id": f"u{rnd.randrange(users)}",
        "last_seen": f"2026-11-{22 + hour // 24:02d}T{hour % 24:02d}:{rnd.randrange(60):02d}:00.000Z",
    }
    if rnd.random() < 0.9:
        doc["gender"] = rnd.choice(["male", "female", "other"])
    if rnd.random() < 0.8:
        doc["age_band"] = rnd.choice(["18-24", "25-34", "35-44", "65+"])
    device: dict[str, Any] = {}
    if rnd.random() < 0.9:
        device["os"] = rnd.choice(["iOS", "Android", "Windows"])
    if rnd.random() < 0.5:
        device["carrier"] = f"carrier={rnd.randrange(4)}"  # '=' in a value
    doc["device"] = device
    doc["geo"] = {"city": f"city{rnd.randrange(30)}", "location": {"lat": 1.0, "lon": 2.0}}
    doc["exchange"] = f"x{rnd.randrange(3)}"
    if rnd.random() < 0.6:  # arrays: each value once per document, duplicates and mixed types
        doc["interests"] = [rnd.choice(["a", "b", "c", 1, "1", True]) for _ in range(rnd.randrange(5))]
    if rnd.random() < 0.5:
        doc["ad_slot"] = {"w": rnd.choice([300, 320, 728])}
    if rnd.random() < 0.3:
        doc["flag"] = rnd.choice([True, False, 1.5, {"nested": 1}])
    return doc


def masks_of(lists: list[list[str]]) -> tuple[list[str], list[int]]:
    masks: dict[str, int] = {}
    for i, rules in enumerate(lists):
        for rid in rules:
            masks[rid] = masks.get(rid, 0) | (1 << i)
    ordered = sorted(masks)
    return ordered, [masks[r] for r in ordered]


def random_case(seed: int, docs: int, rules: int, hours: int) -> tuple[list[dict[str, Any]], list[list[str]]]:
    rnd = random.Random(seed)
    documents = [random_doc(rnd, max(1, docs // 3), hours) for _ in range(docs)]
    ids = [f"aud-{k}@v1" for k in range(rules)]
    weights = [rnd.random() ** 3 for _ in ids]
    lists = [sorted(set(rnd.choices(ids, weights=weights, k=rnd.randrange(0, 12)))) for _ in documents]
    return documents, lists


@pytest.mark.parametrize(("seed", "docs", "rules", "hours"), [
    (1, 1, 1, 1), (2, 50, 5, 1), (3, 300, 40, 1), (4, 300, 40, 2), (5, 500, 60, 30), (6, 130, 200, 3),
    (7, 64, 3, 1), (8, 65, 3, 2), (9, 1000, 25, 5),
])
@pytest.mark.parametrize("count_matches", [True, False])
def test_equals_the_per_document_aggregate(seed: int, docs: int, rules: int, hours: int,
                                           count_matches: bool) -> None:
    documents, lists = random_case(seed, docs, rules, hours)
    ids, masks = masks_of(lists)
    expected = aggregate(documents, lists, DIMS, count_matches=count_matches)
    got = aggregate_masks(documents, ids, masks, DIMS, count_matches=count_matches)
    assert got == expected
    assert aggregate_masks(documents, ids, masks, (), count_matches=count_matches) == aggregate(
        documents, lists, (), count_matches=count_matches)


def test_small_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    documents, lists = random_case(11, 700, 90, 4)
    ids, masks = masks_of(lists)
    expected = aggregate(documents, lists, DIMS)
    monkeypatch.setattr(aggregate_module, "_WORDS_PER_CHUNK", 25)  # 2 rules per chunk
    monkeypatch.setattr(aggregate_module, "_CELLS_PER_CHUNK", 50)  # 1 rule per bincount
    assert aggregate_masks(documents, ids, masks, DIMS) == expected


def test_adds_to_a_given_batch_like_aggregate() -> None:
    first, first_lists = random_case(12, 200, 20, 2)
    second, second_lists = random_case(13, 150, 20, 2)
    expected = aggregate(second, second_lists, DIMS, batch=aggregate(first, first_lists, DIMS))
    batch = CounterBatch()
    ids, masks = masks_of(first_lists)
    assert aggregate_masks(first, ids, masks, DIMS, batch=batch) is batch
    ids, masks = masks_of(second_lists)
    aggregate_masks(second, ids, masks, DIMS, batch=batch)
    assert batch == expected


def test_unmatched_documents_are_ignored_and_matched_ones_checked() -> None:
    good = {"user_id": "u1", "last_seen": "2026-11-22T10:00:00.000Z", "gender": "male"}
    docs: list[Any] = [{"oops": 1}, good, None]
    got = aggregate_masks(docs, ["a@v1", "b@v1"], [0b010, 0], DIMS)
    assert got == aggregate([good], [["a@v1"]], DIMS)
    with pytest.raises(ValueError, match="user_id"):
        aggregate_masks(docs, ["a@v1"], [0b011], DIMS)
    with pytest.raises(ValueError, match="last_seen"):
        aggregate_masks([{"user_id": "u"}], ["a@v1"], [1], DIMS)
    with pytest.raises(ValueError, match="beyond"):
        aggregate_masks([good], ["a@v1"], [0b10], DIMS)
    with pytest.raises(ValueError, match="masks"):
        aggregate_masks([good], ["a@v1"], [], DIMS)
    assert aggregate_masks([], [], [], DIMS).is_empty()
    assert aggregate_masks([good], ["a@v1"], [0], DIMS).is_empty()


def test_dimension_codes_agree_with_dimension_pairs_on_odd_documents() -> None:
    """The coded fast path (stream and replays) gives each document the same (dimension, value)
    pairs as the per-document reference, whatever the shapes: non-dicts on the path, lists with
    duplicates and objects, numbers and booleans, empty strings, missing levels."""
    import random

    from rules_service.counters.aggregate import _dimension_codes, _dimension_pairs

    dims = ["gender", "age_band", "device.os", "device.carrier", "geo.city", "exchange", "interests", "a.b.c"]
    rnd = random.Random(1)
    values: list[Any] = ["x", "", 1, 2.5, True, None, ["p", "q", "p", 3, None, {"z": 1}], {"k": "v"}, [], "é"]
    docs = []
    for _ in range(3000):
        doc: dict[str, Any] = {
            "gender": rnd.choice(values), "age_band": rnd.choice(values), "exchange": rnd.choice(values),
            "interests": rnd.choice(values),
            "device": rnd.choice([None, "str", {"os": rnd.choice(values), "carrier": rnd.choice(values)}]),
            "geo": rnd.choice([{"city": rnd.choice(values)}, {}, 5]),
            "a": rnd.choice([{"b": {"c": rnd.choice(values)}}, {"b": rnd.choice(values)}, None]),
        }
        docs.append({k: v for k, v in doc.items() if rnd.random() > 0.1})
    hours = [rnd.choice([0, 0, 0, -1]) for _ in docs]
    rows, pairs = _dimension_codes(docs, hours, dims)
    for doc, hour, row in zip(docs, hours, rows, strict=True):
        want = () if hour == -1 else tuple(_dimension_pairs(doc, dims))
        assert tuple(pairs[code] for code in row) == want, doc
    assert len(set(pairs)) == len(pairs)  # one code per distinct pair
