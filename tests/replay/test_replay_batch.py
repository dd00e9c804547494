"""The replay's batch helpers: renumbering per-rule masks over the matched documents."""

from __future__ import annotations

import random

import pytest

from workers.replay import _matched_only


@pytest.mark.parametrize("seed", range(8))
def test_matched_only_keeps_each_rules_documents(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([1, 7, 64, 65, 1000, 4097])
    docs = [{"i": i} for i in range(size)]
    density = rng.choice([0.001, 0.05, 0.3])
    masks = [sum(1 << i for i in range(size) if rng.random() < density) for _ in range(rng.randint(1, 40))]
    masks[0] |= 1 << (size - 1)  # the last document, at the edge of the last byte
    kept, renumbered = _matched_only(docs, masks)
    assert len(renumbered) == len(masks)
    union = 0
    for mask in masks:
        union |= mask
    if union.bit_count() * 10 >= size * 9:
        assert kept is docs and renumbered is masks
        return
    assert [d["i"] for d in kept] == [i for i in range(size) if union >> i & 1]
    for old, new in zip(masks, renumbered, strict=True):
        assert new >> len(kept) == 0
        assert {kept[j]["i"] for j in range(len(kept)) if new >> j & 1} == {i for i in range(size) if old >> i & 1}


def test_matched_only_with_everything_matched_is_the_identity() -> None:
    docs = [{"i": i} for i in range(10)]
    masks = [(1 << 10) - 1, 0b101]
    assert _matched_only(docs, masks) == (docs, masks)
