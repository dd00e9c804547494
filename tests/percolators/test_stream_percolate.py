"""The stream's percolate stage (``EmbeddedPercolator.percolate_masks``) with the C walk and
evaluator against the Python twins, on what its speed-ups touch: terms leaves whose keys many
rules share (their masks memoised by key object), geo_distance circles decided by bounds on the
haversine (points on, just inside and just outside the edge, both distance types), integer bounds
of the walk, the batch's sorted geo points, and leaks.

The C paths are skipped (not failed) when the extensions are not built."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from percolators import fast_index, programs
from percolators.batch import BatchIndex
from percolators.embedded import BatchMatches, EmbeddedPercolator
from percolators.port import Rule
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules
from tests.leaks import bytes_kept

needs_c = pytest.mark.skipif(
    programs._eval is None or fast_index._walk is None, reason="percolators._eval/_walk not built"
)

EARTH_M = 6_371_008.7714


def _python_masks(rules: list[Rule], docs: list[Any], monkeypatch: pytest.MonkeyPatch) -> BatchMatches:
    with monkeypatch.context() as patch:
        patch.setattr(fast_index, "accelerator", None)
        slow = EmbeddedPercolator(accel=False)
        slow.upsert(rules)
        return slow.percolate_masks(docs, now=WORKLOAD_NOW)


def _c_masks(rules: list[Rule], docs: list[Any]) -> BatchMatches:
    fast = EmbeddedPercolator(accel=None)
    fast.upsert(rules)
    return fast.percolate_masks(docs, now=WORKLOAD_NOW)


def _assert_same(rules: list[Rule], docs: list[Any], monkeypatch: pytest.MonkeyPatch) -> BatchMatches:
    want = _python_masks(rules, docs, monkeypatch)
    got = _c_masks(rules, docs)
    assert got.rule_ids == want.rule_ids
    assert got.masks == want.masks
    assert sorted(got.errors) == sorted(want.errors)
    return got


def _rules(raw: list[dict[str, Any]]) -> list[Rule]:
    return [Rule(id=r["id"], query=r["query"]) for r in raw]


@needs_c
@pytest.mark.parametrize("seed", [1, 5])
def test_the_audience_workload_percolates_identically(seed, monkeypatch):
    rules = _rules(generate_rules(400, seed=seed))
    docs = generate_documents(300, seed=seed + 10)
    got = _assert_same(rules, docs, monkeypatch)
    assert got.rule_ids  # the workload matches something: the comparison is not vacuous


@needs_c
def test_terms_keys_shared_by_many_rules_percolate_identically(monkeypatch):
    rng = random.Random(3)
    values = ["sports", "travel", "news", "music", "absent-1", "absent-2"]
    rules = []
    for i in range(120):  # many rules over few keys: each key's mask is memoised and reused
        picked = rng.sample(values, rng.randint(1, 4))
        query: dict[str, Any] = {"bool": {"filter": [{"terms": {"interests": picked}}]}}
        if i % 3 == 0:
            query["bool"]["must_not"] = [{"terms": {"interests": rng.sample(values, 2)}}]
        if i % 4 == 0:
            query["bool"]["filter"].append({"term": {"gender": rng.choice(["male", "female", "nobody"])}})
        rules.append(Rule(id=f"r{i:03d}", query=query))
    docs = [
        {"user_id": f"u{i}", "gender": rng.choice(["male", "female", "other"]),
         "interests": rng.sample(values[:4], rng.randint(0, 3))}
        for i in range(200)
    ]
    got = _assert_same(rules, docs, monkeypatch)
    assert len(got.rule_ids) > 50


def _point_at(lat: float, lon: float, metres: float, bearing: float) -> dict[str, float]:
    """The point ``metres`` from (lat, lon) along ``bearing`` (radians) on the sphere."""
    phi, lam, delta = math.radians(lat), math.radians(lon), metres / EARTH_M
    phi2 = math.asin(math.sin(phi) * math.cos(delta) + math.cos(phi) * math.sin(delta) * math.cos(bearing))
    lam2 = lam + math.atan2(math.sin(bearing) * math.sin(delta) * math.cos(phi),
                            math.cos(delta) - math.sin(phi) * math.sin(phi2))
    return {"lat": math.degrees(phi2), "lon": math.degrees(lam2)}


@needs_c
@pytest.mark.parametrize("distance_type", ["arc", "plane"])
def test_points_around_a_circles_edge_percolate_identically(distance_type, monkeypatch):
    rng = random.Random(11)
    centres = [(51.5074, -0.1278), (53.4808, -2.2426), (0.0, 0.0), (-33.86, 151.2), (60.0, 179.9)]
    radii = [1.0, 50.0, 1000.0, 25_000.0, 300_000.0]
    rules: list[Rule] = []
    docs: list[dict[str, Any]] = []
    for c, (lat, lon) in enumerate(centres):
        for r, radius in enumerate(radii):
            rules.append(Rule(id=f"geo-{c}-{r}", query={"geo_distance": {
                "distance": f"{radius}m", "distance_type": distance_type, "geo.location": {"lat": lat, "lon": lon}}}))
            # on the edge, a hair inside and outside (within and beyond the tolerance), well in and out
            for factor in (0.0, 0.2, 0.999, 0.9999999, 1.0, 1.0000001, 1.001, 1.5, 3.0):
                point = _point_at(lat, lon, radius * factor, rng.uniform(0, 2 * math.pi))
                docs.append({"user_id": f"u{len(docs)}", "geo": {"location": point}})
    docs.append({"user_id": "nowhere"})
    got = _assert_same(rules, docs, monkeypatch)
    assert len(got.rule_ids) == len(rules)  # every circle holds at least its centre


@needs_c
def test_integers_at_and_beyond_their_bounds_percolate_identically(monkeypatch):
    values = [0, 1, -1, 17, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
              10**30, -(10**30)]
    rules = [Rule(id="adult", query={"range": {"age": {"gte": 18}}}),
             Rule(id="wide", query={"range": {"ad_slot.w": {"gte": -(2**31), "lte": 2**31 - 1}}}),
             Rule(id="exact", query={"term": {"age": 2**31 - 1}})]
    docs = [{"user_id": f"u{i}", "age": v, "ad_slot": {"w": v, "h": 50}} for i, v in enumerate(values)]
    got = _assert_same(rules, docs, monkeypatch)
    assert got.errors  # out-of-range integers are errors on both paths, not silently indexed


def test_geo_sorted_gives_the_points_by_latitude():
    points = [(0, 51.5, -0.1), (1, 50.1, 1.0), (2, 51.5, -3.5), (3, 49.0, 2.0)]
    batch = BatchIndex([None] * 4, 0, (), ("geo.location",), postings={}, geo={"geo.location": points})
    lats, lons, positions = batch.geo_sorted("geo.location")
    assert lats.tolist() == [49.0, 50.1, 51.5, 51.5]
    assert lons.tolist() == [2.0, 1.0, -0.1, -3.5]  # stable: equal latitudes keep their order
    assert positions.tolist() == [3, 1, 0, 2]
    assert str(positions.dtype) == "int64"
    empty = BatchIndex([], 0, (), ("geo.location",), postings={}, geo={}).geo_sorted("geo.location")
    assert [len(a) for a in empty] == [0, 0, 0]


@needs_c
def test_percolate_masks_does_not_leak():
    fast = EmbeddedPercolator(accel=None)
    fast.upsert(_rules(generate_rules(200, seed=2)))
    docs = generate_documents(200, seed=4)

    def run(times: int) -> None:
        for _ in range(times):
            fast.percolate_masks(docs, now=WORKLOAD_NOW)

    grown = bytes_kept(lambda: run(1), warmup=5, traced_warmup=20, rounds=100)
    assert grown < 100_000, f"{grown} bytes kept by 100 batches"
