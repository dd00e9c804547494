"""SeenUsers (rules_service.counters.seen and its C twin): users a process already added to a
sketch this hour are not sent again, the sketches end up with the same users, counts are untouched,
and the C and Python twins make the same decisions batch after batch."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from rules_service.counters import aggregate as aggregate_module
from rules_service.counters.aggregate import aggregate_masks
from rules_service.counters.port import CounterBatch
from rules_service.counters.seen import SeenUsers, new_seen_users
from tests.counters.test_aggregate_masks import DIMS, masks_of, random_doc
from tests.leaks import bytes_kept

_c = aggregate_module._aggregate
DAY0 = 1795305600  # 2026-11-22T00:00:00Z
needs_c = pytest.mark.skipif(_c is None, reason="rules_service.counters._aggregate is not built")


class OddRuleId(str):
    """A rule id that is a str subclass: both twins add its users without recording them."""


def stamp(hour: int) -> str:
    return f"2026-11-{22 + hour // 24:02d}T{hour % 24:02d}:30:00.000Z"


def batches(seed: int, count: int = 12, docs: int = 150, users: int = 60, rules: int = 25
            ) -> list[tuple[list[dict[str, Any]], list[str], list[int]]]:
    """A stream of batches whose users repeat, with the hour moving on every few batches and some
    late documents (an hour earlier)."""
    rnd = random.Random(seed)
    ids: list[str] = [f"aud-{k}@v1" for k in range(rules)]
    ids[3] = OddRuleId(ids[3])
    weights = [rnd.random() ** 2 for _ in ids]
    out = []
    for b in range(count):
        hour = 5 + b // 4
        documents = []
        for _ in range(docs):
            doc = random_doc(rnd, users, 1)
            late = rnd.random() < 0.1
            doc["last_seen"] = stamp(hour - 1 if late else hour)
            documents.append(doc)
        lists = [sorted(set(rnd.choices(ids, weights=weights, k=rnd.randrange(0, 8)))) for _ in documents]
        rule_ids, masks = masks_of(lists)
        rule_ids = [next(i for i in ids if i == r) for r in rule_ids]  # keep the subclass object
        out.append((documents, rule_ids, masks))
    return out


def run(stream: list[tuple[list[dict[str, Any]], list[str], list[int]]], seen: Any) -> Iterator[CounterBatch]:
    for documents, rule_ids, masks in stream:
        yield aggregate_masks(documents, rule_ids, masks, DIMS, seen=seen)


def union(outputs: list[CounterBatch]) -> dict[tuple[str, str, int], set[str]]:
    users: dict[tuple[str, str, int], set[str]] = {}
    for batch in outputs:
        for key, members in batch.users.items():
            users.setdefault(key, set()).update(members)
    return users


@pytest.fixture(params=["python", "c"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c" and _c is None:
        pytest.skip("rules_service.counters._aggregate is not built")
    monkeypatch.setattr(aggregate_module, "USE_C", request.param == "c")
    return str(request.param)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("max_records", [4_000_000, 1200])
def test_the_sketches_get_the_same_users_and_the_counts_are_untouched(path: str, seed: int,
                                                                      max_records: int) -> None:
    stream = batches(seed)
    plain = list(run(stream, None))
    seen = new_seen_users(max_records)
    filtered = []
    for batch in run(stream, seen):
        filtered.append(batch)
        assert seen.records <= max_records + sum(len(m) for m in batch.users.values())  # bounded
    assert union(filtered) == union(plain)
    for with_seen, without in zip(filtered, plain, strict=True):
        assert with_seen.matches == without.matches
        assert with_seen.dimensions == without.dimensions
        assert all(with_seen.users.values())  # no empty sets: no PFADD without members
    sent = sum(len(m) for b in filtered for m in b.users.values())
    sent_without = sum(len(m) for b in plain for m in b.users.values())
    if max_records > 1000:
        assert sent < sent_without * 0.7  # the users repeat: most are not sent again
        assert seen.records > 0
    else:
        assert sent_without * 0.7 < sent < sent_without  # cleared every few batches: fewer saved


@needs_c
@pytest.mark.parametrize("seed", [4, 5, 6, 7])
@pytest.mark.parametrize("max_records", [4_000_000, 100, 1])
def test_the_c_and_python_twins_decide_the_same(seed: int, max_records: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stream = batches(seed, count=16, docs=90, users=40)
    monkeypatch.setattr(aggregate_module, "USE_C", True)
    c_seen = new_seen_users(max_records)
    assert isinstance(c_seen, _c.SeenUsers)
    c_out, c_state = [], []
    for batch in run(stream, c_seen):
        c_out.append(batch)
        c_state.append((c_seen.records, c_seen.users))
    monkeypatch.setattr(aggregate_module, "USE_C", False)
    py_seen = new_seen_users(max_records)
    assert isinstance(py_seen, SeenUsers)
    for k, batch in enumerate(run(stream, py_seen)):
        assert batch == c_out[k], f"batch {k}"
        assert (py_seen.records, py_seen.users) == c_state[k], f"batch {k}"


def test_late_documents_and_later_hours(path: str) -> None:
    seen = new_seen_users()

    def users_of(hours: list[int], rule: str = "r@v1") -> dict[tuple[str, str, int], set[str]]:
        documents = [{"user_id": "u", "last_seen": stamp(h)} for h in hours]
        return aggregate_masks(documents, [rule], [(1 << len(documents)) - 1], seen=seen).users

    hour = lambda h: DAY0 + 3600 * h  # noqa: E731
    day = DAY0
    assert users_of([11]) == {("r@v1", "hour", hour(11)): {"u"}, ("r@v1", "day", day): {"u"}}
    assert users_of([11, 11]) == {}  # in the sketches already
    assert seen.records == 1
    # a late document (hour 10, the entry is at 11): added, not recorded, the entry stays at 11
    assert users_of([10]) == {("r@v1", "hour", hour(10)): {"u"}, ("r@v1", "day", day): {"u"}}
    assert users_of([10]) == {("r@v1", "hour", hour(10)): {"u"}, ("r@v1", "day", day): {"u"}}
    assert users_of([11]) == {}
    # a later hour moves the entry on; the document of hour 11 in the same batch is then late
    assert users_of([11, 12]) == {("r@v1", "hour", hour(11)): {"u"}, ("r@v1", "hour", hour(12)): {"u"},
                                  ("r@v1", "day", day): {"u"}}
    assert seen.records == 1 and seen.users == 1
    assert users_of([12]) == {}
    assert users_of([12], rule="other@v1") != {}  # per rule
    seen.clear()
    assert seen.records == 0 and seen.users == 0
    assert users_of([12]) != {}  # forgotten: sent again


def test_a_seen_of_the_other_path_is_refused(path: str) -> None:
    documents = [{"user_id": "u", "last_seen": stamp(1)}]
    wrong = SeenUsers() if path == "c" else (_c.SeenUsers(10) if _c is not None else None)
    if wrong is None:
        pytest.skip("no C twin to mismatch with")
    with pytest.raises(TypeError, match="SeenUsers"):
        aggregate_masks(documents, ["r"], [1], seen=wrong)


def test_max_records_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SeenUsers(0)
    if _c is not None:
        with pytest.raises(ValueError):
            _c.SeenUsers(0)


@needs_c
def test_c_seen_cannot_be_cleared_or_shared_during_an_emit() -> None:
    seen = _c.SeenUsers(100)

    class Total(int):
        """A caller's running total whose ``+`` runs Python code in the middle of emit."""

        def __add__(self, other: object) -> int:
            seen.clear()
            return int(self) + int(other)  # type: ignore[call-overload]

    batch = CounterBatch()
    batch.matches[("r", "hour", DAY0 + 3600)] = Total(5)
    documents = [{"user_id": "u", "last_seen": stamp(1)}]
    with pytest.raises(RuntimeError, match="during an emit"):
        aggregate_masks(documents, ["r"], [1], batch=batch, seen=seen)
    seen.clear()  # usable again once the emit is over
    assert aggregate_masks(documents, ["r"], [1], seen=seen).users


@needs_c
def test_c_seen_does_not_leak() -> None:
    stream = batches(9, count=4, docs=80)

    def work() -> None:
        seen = _c.SeenUsers(50)
        for _ in run(stream, seen):
            pass
        assert seen.nbytes > 0
        seen.clear()

    grown = bytes_kept(work, warmup=5, rounds=30)
    assert grown < 64_000, f"{grown} bytes left after 30 rounds"


Stream = list[tuple[str, Any]]  # ("clear", None) or ("batch", (documents, rule_ids, masks, keep_window))


def wandering_stream(seed: int, count: int = 90, users: int = 12, rules: int = 10) -> Stream:
    """Batches of a few users who move on through the hours (across a day boundary), fall back to
    earlier hours (late bids), vanish and come back hours later or earlier, and match rule ids that
    repeat across batches (some twice in one batch, one a str subclass); with empty batches,
    batches that match nothing, windows kept over several batches, and clears (abandoned windows)."""
    rnd = random.Random(seed)
    ids: list[str] = [f"aud-{k}@v1" for k in range(rules)] + [OddRuleId("odd@v1")]
    hour_of = {f"w{k}": rnd.randrange(4) for k in range(users)}
    events: Stream = []
    for _ in range(count):
        if rnd.random() < 0.06:
            events.append(("clear", None))
        kind = rnd.random()
        if kind < 0.08:
            events.append(("batch", ([], [], [], rnd.random() < 0.5)))
            continue
        documents, lists = [], []
        for _ in range(rnd.randrange(1, 25)):
            uid = rnd.choice(list(hour_of))
            r = rnd.random()
            if r < 0.2:
                hour_of[uid] += rnd.randrange(1, 4)  # moves on
            elif r < 0.25:
                hour_of[uid] += rnd.randrange(5, 12)  # comes back much later
            hour = hour_of[uid]
            if rnd.random() < 0.2:
                hour = max(0, hour - rnd.randrange(1, 6))  # a late bid
            documents.append({"user_id": uid, "last_seen": stamp(hour)})
            lists.append([] if kind < 0.14 else sorted(set(rnd.choices(ids, k=rnd.randrange(0, 5)))))
        rule_ids, masks = masks_of(lists)
        rule_ids = [next(i for i in ids if i == r) for r in rule_ids]  # keep the subclass object
        if rule_ids and rnd.random() < 0.15:  # one rule id twice, with other documents
            k = rnd.randrange(len(rule_ids))
            rule_ids.append(rule_ids[k])
            masks.append(rnd.getrandbits(len(documents)))
        events.append(("batch", (documents, rule_ids, masks, rnd.random() < 0.3)))
    return events


def play(events: Stream, seen: Any) -> list[tuple[CounterBatch, int, int]]:
    """Each batch's output (a copy: a kept window goes on growing) and the records and users after it."""
    out: list[tuple[CounterBatch, int, int]] = []
    window: CounterBatch | None = None
    for kind, event in events:
        if kind == "clear":
            if seen is not None:
                seen.clear()
            window = None
            continue
        documents, rule_ids, masks, keep_window = event
        batch = aggregate_masks(documents, rule_ids, masks, DIMS, batch=window if keep_window else None, seen=seen)
        window = batch
        snapshot = CounterBatch({k: set(v) for k, v in batch.users.items()}, dict(batch.matches),
                                {k: dict(v) for k, v in batch.dimensions.items()})
        out.append((snapshot, 0 if seen is None else seen.records, 0 if seen is None else seen.users))
    return out


@needs_c
@pytest.mark.parametrize("seed", range(10, 16))
@pytest.mark.parametrize("max_records", [1, 2, 7, 4_000_000])
def test_wandering_users_the_twins_agree_batch_by_batch(seed: int, max_records: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    events = wandering_stream(seed)
    monkeypatch.setattr(aggregate_module, "USE_C", True)
    c_seen = new_seen_users(max_records)
    c_run = play(events, c_seen)
    plain = play(events, None)
    monkeypatch.setattr(aggregate_module, "USE_C", False)
    py_seen = new_seen_users(max_records)
    py_run = play(events, py_seen)
    assert len(c_run) == len(py_run) == len(plain)
    for k, (c_step, py_step, plain_step) in enumerate(zip(c_run, py_run, plain, strict=True)):
        assert c_step == py_step, f"batch {k}"
        assert c_step[0].matches == plain_step[0].matches and c_step[0].dimensions == plain_step[0].dimensions
        for key, members in c_step[0].users.items():  # never a user the batch would not send
            assert members and members <= plain_step[0].users[key], f"batch {k}, {key}"
    assert union([s[0] for s in c_run]) == union([s[0] for s in plain])  # the sketches end up the same


def rule_table_steps(monkeypatch: pytest.MonkeyPatch, use_c: bool) -> list[tuple[dict[Any, set[str]], int, int]]:
    monkeypatch.setattr(aggregate_module, "USE_C", use_c)
    seen = new_seen_users(1_000_000)
    rnd = random.Random(5)
    ids = [f"aud-{k}@v1" for k in range(7500)]
    many = ids[:5000]
    rnd.shuffle(many)
    steps = []

    def step(user_hours: list[tuple[str, int]], rule_ids: list[str], masks: list[int]) -> None:
        documents = [{"user_id": u, "last_seen": stamp(h)} for u, h in user_hours]
        users = aggregate_masks(documents, rule_ids, masks, seen=seen).users
        steps.append((users, seen.records, seen.users))

    step([("u", 1)], many, [1] * 5000)  # one document, 5,000 rules: the user's table grows 8 -> 16,384
    step([("u", 1), ("v", 1)], [*many[:3], "x-0", "x-1", "x-2"], [3, 3, 3, 3, 3, 3])
    step([("u", 1)], ids[2500:7500], [1] * 5000)  # half of them recorded already
    step([("u", 0)], ids[:5000], [1] * 5000)  # late: all added, nothing recorded
    step([("u", 2)], ids[:10], [1] * 10)  # moves on to a later hour: its day records stay
    step([("u", 2)], ids[::-1], [1] * 7500)
    step([("u", 25)], ids[:10], [1] * 10)  # moves on to the next day: its 7,503 records go
    return steps


@needs_c
def test_thousands_of_rules_for_one_user_grow_its_table(monkeypatch: pytest.MonkeyPatch) -> None:
    c_steps = rule_table_steps(monkeypatch, True)
    py_steps = rule_table_steps(monkeypatch, False)
    assert c_steps == py_steps
    hour = lambda h: DAY0 + 3600 * h  # noqa: E731
    first, again, half, late, moved, back, next_day = c_steps
    assert len(first[0]) == 10_000 and first[1:] == (5000, 1)
    buckets = (("hour", hour(1)), ("day", DAY0))
    assert len(again[0]) == 12 and all(again[0][(f"x-{k}", g, b)] == {"u", "v"} for k in range(3) for g, b in buckets)
    assert sum(users == {"v"} for users in again[0].values()) == 6  # u has the other three already
    assert again[1:] == (5009, 2)
    assert {key[0] for key in half[0]} == {f"aud-{k}@v1" for k in range(5000, 7500)} and half[1] == 7509
    assert len(late[0]) == 10_000 and late[1] == 7509
    assert set(moved[0]) == {(f"aud-{k}@v1", "hour", hour(2)) for k in range(10)} and moved[1] == 7509
    assert len(back[0]) == 7490 and all(key[1] == "hour" for key in back[0]) and back[1] == 7509
    assert len(next_day[0]) == 20 and next_day[1] == 16  # v's 6 stay (at hour 1 of day 0)
    monkeypatch.setattr(aggregate_module, "USE_C", True)
    seen = _c.SeenUsers(10)
    aggregate_masks([{"user_id": "u", "last_seen": stamp(1)}], [f"r{k}" for k in range(5000)], [1] * 5000, seen=seen)
    assert 16_384 * 4 <= seen.nbytes < 2 * 16_384 * 4  # a power of two at most half full: 16,384 slots of 4 bytes


@needs_c
def test_c_seen_refuses_python_code_run_inside_its_emit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule id whose ``__hash__`` (run by emit's dict lookups) clears the SeenUsers or starts
    another batch with it is refused each time, and the emit around it goes on undisturbed."""
    monkeypatch.setattr(aggregate_module, "USE_C", True)
    seen = _c.SeenUsers(1000)
    refused: list[str] = []
    nested: list[CounterBatch] = []
    documents = [{"user_id": f"u{k}", "last_seen": stamp(1)} for k in range(3)]

    class Meddling(str):
        def __hash__(self) -> int:
            for attempt in ("clear", "emit"):
                try:
                    if attempt == "clear":
                        seen.clear()
                    else:
                        aggregate_masks(documents, ["a"], [1], seen=seen)
                except RuntimeError:
                    refused.append(attempt)
            if len(nested) < 3:  # another SeenUsers is free to use
                nested.append(aggregate_masks(documents, ["a"], [7], seen=_c.SeenUsers(5)))
            return str.__hash__(self)

    rule_ids = ["a", Meddling("b"), "c"]
    out = aggregate_masks(documents, rule_ids, [7, 7, 5], seen=seen)
    assert refused and set(refused) == {"clear", "emit"} and len(refused) % 2 == 0
    assert nested and all(b.users[("a", "hour", DAY0 + 3600)] == {"u0", "u1", "u2"} for b in nested)
    assert out.users[("b", "hour", DAY0 + 3600)] == {"u0", "u1", "u2"}
    assert seen.records == 5 and seen.users == 3  # a and c recorded; b is not a plain str
    assert aggregate_masks(documents, rule_ids[::2], [7, 5], seen=seen).users == {}


@needs_c
def test_c_seen_gives_back_a_big_rule_table_when_its_user_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory follows the records: a table grown for one busy day (hundreds of rules) is not kept
    for the user's later days of a rule or two, which would leave it unbounded under max_records."""
    monkeypatch.setattr(aggregate_module, "USE_C", True)
    seen = _c.SeenUsers(10_000)
    idle = seen.nbytes
    ids = [f"aud-{k}@v1" for k in range(600)]
    for wave in range(20):  # each wave: 5 new users with 600 rules in hour 1, then one rule the next day
        documents = [{"user_id": f"w{wave}-{k}", "last_seen": stamp(1)} for k in range(5)]
        aggregate_masks(documents, ids, [31] * len(ids), seen=seen)
        assert seen.nbytes >= idle + 5 * 2048 * 4  # 600 rules: 2,048 slots each
        for document in documents:
            document["last_seen"] = stamp(25)
        aggregate_masks(documents, ids[:1], [31], seen=seen)
    assert seen.records == 100 and seen.users == 100
    assert seen.nbytes < idle + 100 * 256 * 4, seen.nbytes  # was 20 x 5 x 8 KB kept for 100 records


def test_a_later_hour_of_the_same_day_sends_the_user_to_that_hour_only(path: str) -> None:
    seen = new_seen_users()

    def sent(hour: int) -> dict[tuple[str, str, int], set[str]]:
        documents = [{"user_id": "u", "last_seen": stamp(hour)}, {"user_id": "v", "last_seen": stamp(1)}]
        return aggregate_masks(documents, ["r@v1"], [1], seen=seen).users

    assert sent(1) == {("r@v1", "hour", DAY0 + 3600): {"u"}, ("r@v1", "day", DAY0): {"u"}}
    assert sent(2) == {("r@v1", "hour", DAY0 + 7200): {"u"}}  # the day sketch has u already
    assert sent(2) == {} and seen.records == 1
    assert sent(23) == {("r@v1", "hour", DAY0 + 23 * 3600): {"u"}}
    assert sent(25) == {("r@v1", "hour", DAY0 + 25 * 3600): {"u"}, ("r@v1", "day", DAY0 + 86400): {"u"}}
    assert seen.records == 1  # the first day's record went with it
