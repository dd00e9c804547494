"""aggregate(): counter updates from percolated documents, checked against a naive reference."""

from __future__ import annotations

import calendar
import random
from collections import Counter
from typing import Any

import pytest

from rules_service.counters.aggregate import aggregate, dimension_value, hour_of_last_seen
from rules_service.counters.port import CounterBatch

H10 = calendar.timegm((2026, 11, 22, 10, 0, 0, 0, 0, 0))
DAY22 = calendar.timegm((2026, 11, 22, 0, 0, 0, 0, 0, 0))


def doc(uid: str, last_seen: str = "2026-11-22T10:15:00.000Z", **fields: Any) -> dict[str, Any]:
    return {"user_id": uid, "last_seen": last_seen, **fields}


def test_hour_of_last_seen() -> None:
    assert hour_of_last_seen("2026-11-22T10:59:59.999Z") == H10
    assert hour_of_last_seen("2026-11-22T10:00:00.000Z") == H10
    assert hour_of_last_seen("2026-11-22T23:59:59.999Z") == DAY22 + 23 * 3600
    assert hour_of_last_seen("2026-11-23T00:00:00.000Z") == DAY22 + 86400
    for bad in ("yesterday", "2026-11-22 10:00:00", "2026-11-22T10:00:00+02:00"):
        with pytest.raises(ValueError, match="ISO 8601"):
            hour_of_last_seen(bad)


def test_dimension_value() -> None:
    d = {"device": {"os": "iOS"}, "gender": "male", "geo": {"location": {"lat": 1, "lon": 2}}}
    assert dimension_value(d, "device.os") == "iOS"
    assert dimension_value(d, "gender") == "male"
    assert dimension_value(d, "device.carrier") is None
    assert dimension_value(d, "gender.x") is None


def test_one_batch_exact() -> None:
    docs = [
        doc("u1", gender="male", device={"os": "iOS"}),
        doc("u1", gender="male", device={"os": "iOS"}),
        doc("u2", gender="female"),
        doc("u3", last_seen="2026-11-22T11:00:00.000Z", gender="female", age=30, interests=["a", "b", "a"]),
    ]
    matched = [["r1", "r2"], ["r1"], ["r2"], ["r1"]]
    batch = aggregate(docs, matched, ["gender", "device.os", "age", "interests"])
    assert batch.users == {
        ("r1", "hour", H10): {"u1"},
        ("r1", "hour", H10 + 3600): {"u3"},
        ("r1", "day", DAY22): {"u1", "u3"},
        ("r2", "hour", H10): {"u1", "u2"},
        ("r2", "day", DAY22): {"u1", "u2"},
    }
    assert batch.matches == {
        ("r1", "hour", H10): 2,
        ("r1", "hour", H10 + 3600): 1,
        ("r1", "day", DAY22): 3,
        ("r2", "hour", H10): 2,
        ("r2", "day", DAY22): 2,
    }
    assert batch.dimensions == {
        ("r1", DAY22, "gender"): {"male": 2, "female": 1},
        ("r1", DAY22, "device.os"): {"iOS": 2},
        ("r1", DAY22, "age"): {"30": 1},
        ("r1", DAY22, "interests"): {"a": 1, "b": 1},  # a value counts once per document
        ("r2", DAY22, "gender"): {"male": 1, "female": 1},
        ("r2", DAY22, "device.os"): {"iOS": 1},
    }


def test_users_only_for_replays_and_accumulation() -> None:
    batch = aggregate([doc("u1", gender="male")], [["r1"]], ["gender"], count_matches=False)
    assert batch.users == {("r1", "hour", H10): {"u1"}, ("r1", "day", DAY22): {"u1"}}
    assert batch.matches == {} and batch.dimensions == {}
    same = aggregate([doc("u2")], [["r1"]], batch=batch, count_matches=False)
    assert same is batch
    assert batch.users[("r1", "day", DAY22)] == {"u1", "u2"}


def test_no_matches_is_empty() -> None:
    assert aggregate([doc("u1")], [[]], ["gender"]).is_empty()
    assert aggregate([], [], ["gender"]).is_empty()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="match lists"):
        aggregate([doc("u1")], [], [])
    with pytest.raises(ValueError, match="user_id"):
        aggregate([{"last_seen": "2026-11-22T10:00:00.000Z"}], [["r"]], [])
    with pytest.raises(ValueError, match="last_seen"):
        aggregate([{"user_id": "u"}], [["r"]], [])


def reference(docs: list[dict[str, Any]], matched: list[list[str]], dims: list[str]) -> CounterBatch:
    """The obvious per-pair loop, to check the inverted, C-loop version against."""
    out = CounterBatch()
    for d, rules in zip(docs, matched, strict=True):
        hour = hour_of_last_seen(d["last_seen"])
        day = hour - hour % 86400
        for r in rules:
            for key in ((r, "hour", hour), (r, "day", day)):
                out.users.setdefault(key, set()).add(d["user_id"])
                out.matches[key] = out.matches.get(key, 0) + 1
            for dim in dims:
                value = dimension_value(d, dim)
                if value is not None:
                    counts = out.dimensions.setdefault((r, day, dim), {})
                    counts[str(value)] = counts.get(str(value), 0) + 1
    return out


@pytest.mark.parametrize("hours", [1, 30])
def test_matches_the_reference_on_random_data(hours: int) -> None:
    rng = random.Random(hours)
    docs, matched = [], []
    for _ in range(2000):
        minute = rng.randrange(hours * 60)
        docs.append(doc(
            f"u{rng.randrange(500)}",
            last_seen=f"2026-11-{22 + minute // 1440:02d}T{minute // 60 % 24:02d}:{minute % 60:02d}:00.000Z",
            gender=rng.choice(["male", "female", None]),
            device={"os": rng.choice(["iOS", "Android"])},
        ))
        matched.append(sorted(rng.sample([f"r{i}" for i in range(40)], rng.randrange(6))))
    dims = ["gender", "device.os", "device.carrier"]
    for d in docs:
        if d["gender"] is None:
            del d["gender"]
    got, want = aggregate(docs, matched, dims), reference(docs, matched, dims)
    assert got.users == want.users
    assert got.matches == want.matches
    assert got.dimensions == want.dimensions
    assert sum(got.matches[k] for k in got.matches if k[1] == "day") == sum(len(m) for m in matched)
    assert Counter(k[1] for k in got.users)["hour"] >= hours  # every hour is present for some rule
