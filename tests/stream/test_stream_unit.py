"""The stream consumer loop and rule synchronisation against in-memory fakes of every port."""

from __future__ import annotations

import base64
import threading
import time

import orjson
import pytest

from rules_service.config import Settings
from rules_service.domain import LAST_SEEN_TOPIC, RULES_TOPIC, RuleChange
from tests.stream.fakes import FakeCounters, FakeLog, FakePercolator, fake_aggregate, fake_normalise
from workers.log.port import Message, TopicPartition
from workers.rules_sync import RulesSync
from workers.stream import DLQ_COUNTER_ID, StreamConsumer, split_partitions
from workers.topics import ensure_topics, topic_spec

SETTINGS = Settings(BIDS_PARTITIONS=2)
T0 = 1_780_000_000_000  # a fixed epoch-ms event time


def bid(user: str, yob: int = 1990, gender: str = "F", at: int = T0) -> bytes:
    return orjson.dumps({"id": f"b-{user}-{at}", "user": {"id": user, "yob": yob, "gender": gender},
                         "ext": {"received_at": at}})


def change(audience: str, query: dict, version: int = 1, status: str = "active") -> Message:
    rc = RuleChange(audience_id=audience, advertiser_id="adv", version=version, query=query, status=status)  # type: ignore[arg-type]
    return Message(value=rc.to_json(), key=rc.rule_id.encode())


@pytest.fixture
def log() -> FakeLog:
    log = FakeLog()
    ensure_topics(log, SETTINGS)
    return log


def make(log: FakeLog, percolator: FakePercolator, counters: FakeCounters, **kw) -> StreamConsumer:
    rules = RulesSync(log, percolator, interval_s=0)
    rules.load()
    return StreamConsumer(log, percolator, counters, rules=rules, normalise=fake_normalise,
                          aggregate=fake_aggregate, batch_size=kw.pop("batch_size", 3), **kw)


def user_key(value: bytes) -> bytes | None:
    try:
        return str(orjson.loads(value)["user"]["id"]).encode()
    except (orjson.JSONDecodeError, KeyError):
        return None


def produce_bids(log: FakeLog, values: list[bytes]) -> None:
    log.producer().send_batch("bids", [Message(value=v, key=user_key(v)) for v in values])


def drain(consumer: StreamConsumer) -> None:
    consumer.run(threading.Event(), drain=True)


def test_topic_specs() -> None:
    assert topic_spec("bids", SETTINGS).partitions == 2
    assert topic_spec("users.last_seen", SETTINGS).cleanup_policy == "compact"
    assert topic_spec("audiences.rules", SETTINGS).cleanup_policy == "compact"
    assert topic_spec("anything.dlq", SETTINGS).cleanup_policy == "delete"
    assert split_partitions([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert split_partitions([0], 3) == [[0]]


def test_batches_count_matches_produce_last_seen_and_commit(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("women", {"term": {"gender": "female"}}),
                                            change("young", {"range": {"age": {"lt": 30}}})])
    produce_bids(log, [bid("u1", 2000, "F"), bid("u2", 1970, "M"), bid("u1", 2000, "F"),
                       bid("u3", 2001, "M"), bid("u4", 1980, "F")])
    counters, percolator = FakeCounters(), FakePercolator()
    with make(log, percolator, counters) as consumer:
        drain(consumer)
    hour = T0 // 3_600_000 * 3600
    assert counters.match_counts == {("women@v1", "hour", hour): 3, ("young@v1", "hour", hour): 3}
    assert counters.users[("young@v1", "hour", hour)] == {"u1", "u3"}
    assert counters.users[("women@v1", "hour", hour)] == {"u1", "u4"}
    assert consumer.stats.processed == 5 and consumer.stats.matched == 6 and consumer.stats.dlq == 0
    last_seen = log.records(LAST_SEEN_TOPIC)
    assert sorted(r.key or b"" for r in last_seen) == [b"u1", b"u1", b"u2", b"u3", b"u4"]
    assert all(orjson.loads(r.value or b"")["user_id"] == (r.key or b"").decode() for r in last_seen)
    ends = {tp: len(log.data[tp]) for tp in log.partitions("bids")}
    assert counters.stored_offsets("stream") == {(tp.topic, tp.partition): end for tp, end in ends.items()}
    assert {tp: log.committed_offsets[("stream", tp)] for tp in ends} == ends


def test_bad_messages_go_to_the_dlq_and_are_counted(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid("u1"), b"{not json", orjson.dumps({"user": {}}), bid("u2", yob="old")])  # type: ignore[arg-type]
    log.producer().send_batch("bids", [Message(value=b"\xff\xfe", partition=0), Message(value=None, partition=1)])
    counters = FakeCounters()
    with make(log, FakePercolator(), counters) as consumer:
        drain(consumer)
    dead = log.values("bids.dlq")
    categories = sorted(d["category"] for d in dead)
    # "old" yob passes the fake normaliser but the percolator rejects the document (age not an integer)
    assert categories == ["empty_message", "invalid_document:age", "no_user_id", "not_json", "not_json"]
    by_category = {d["category"]: d for d in dead}
    assert by_category["no_user_id"]["field"] == "user.id"
    assert by_category["no_user_id"]["reason"] == "no user id (user.id or device.ifa)"
    assert by_category["invalid_document:age"]["field"] == "age"
    bad_bytes = [d for d in dead if "value_base64" in d]
    assert len(bad_bytes) == 1 and bad_bytes[0]["value_base64"] == "//4="
    for d in dead:  # each dead letter carries the original bytes and points at its source record
        src = d["source"]
        original = log.data[TopicPartition(src["topic"], src["partition"])][src["offset"]]
        carried = base64.b64decode(d["value_base64"]) if "value_base64" in d else (
            None if d["value"] is None else d["value"].encode())
        assert carried == original.value
    assert counters.breakdown(DLQ_COUNTER_ID, None, None, ["category"]) == {  # type: ignore[arg-type]
        "category": {"empty_message": 1, "invalid_document:age": 1, "no_user_id": 1, "not_json": 2}}
    assert consumer.stats.dlq == 5 and consumer.stats.processed == 6 and consumer.stats.matched == 1
    assert sum(counters.match_counts.values()) == 1


def test_restart_resumes_from_counter_offsets_not_the_log_commit(log: FakeLog) -> None:
    """Crash after counters were applied but before the log commit: counters' offsets win."""
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid(f"u{i}") for i in range(10)])
    counters = FakeCounters()
    with make(log, FakePercolator(), counters, batch_size=4) as consumer:
        consumer.run_once()
    log.committed_offsets.clear()  # as if the commit never happened
    with make(log, FakePercolator(), counters, batch_size=4) as consumer:
        drain(consumer)
    assert sum(counters.match_counts.values()) == 10


def test_crash_before_apply_loses_nothing_and_counts_once(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid(f"u{i}") for i in range(10)])
    counters = FakeCounters()
    consumer = make(log, FakePercolator(), counters, batch_size=4)
    consumer.start()
    counters.fail_next_apply = True
    with pytest.raises(ConnectionError):
        consumer.run_once()
    consumer.close()
    assert sum(counters.match_counts.values()) == 0
    assert len(log.records(LAST_SEEN_TOPIC)) == 4  # produced before the counters: nothing to lose
    with make(log, FakePercolator(), counters, batch_size=4) as consumer:
        drain(consumer)
    assert sum(counters.match_counts.values()) == 10
    assert len({r.key for r in log.records(LAST_SEEN_TOPIC)}) == 10


def test_an_already_applied_batch_is_skipped(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid(f"u{i}") for i in range(6)])
    counters = FakeCounters()
    with make(log, FakePercolator(), counters, batch_size=100) as consumer:
        drain(consumer)
    # A second consumer that wrongly starts from the log's beginning (e.g. stale positions)
    with make(log, FakePercolator(), counters, batch_size=100) as other:
        for tp in other.assigned:
            other._consumer.seek(tp, 0)  # type: ignore[union-attr]
        other.run_once()
    assert sum(counters.match_counts.values()) == 6
    assert other.stats.skipped_batches >= 1


def test_drain_stops_at_the_end_seen_at_start_and_partitions_split(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid(f"u{i}") for i in range(20)])
    counters = FakeCounters()
    sizes = {tp.partition: len(log.data[tp]) for tp in log.partitions("bids")}
    with make(log, FakePercolator(), counters, partitions=[1]) as one:
        drain(one)
    assert one.stats.processed == sizes[1]
    assert counters.stored_offsets("stream") == {("bids", 1): sizes[1]}
    with make(log, FakePercolator(), counters, partitions=[0]) as zero:
        drain(zero)
    assert sum(counters.match_counts.values()) == 20
    with pytest.raises(ValueError, match="no partition"):
        make(log, FakePercolator(), counters, partitions=[7]).start()


def test_rules_sync_loads_latest_skips_invalid_and_inactive_and_tails(log: FakeLog) -> None:
    producer = log.producer()
    producer.send_batch(RULES_TOPIC, [
        change("a", {"term": {"gender": "male"}}),
        change("a", {"term": {"gender": "female"}}),  # same key: the latest wins
        change("b", {"match_all": {}}),
        change("bad", {"script": {"source": "1"}}),
        change("sleepy", {"match_all": {}}, status="inactive"),
        Message(value=b"not json", key=b"garbled@v1"),
        change("gone", {"match_all": {}}),
        Message(value=None, key=b"gone@v1"),
    ])
    percolator = FakePercolator()
    sync = RulesSync(log, percolator, interval_s=0)
    assert sync.load() == 2
    assert percolator.rule_ids() == {"a@v1", "b@v1"}
    assert percolator.rules["a@v1"].query == {"term": {"gender": "female"}}
    assert percolator.rules["a@v1"].metadata["advertiser_id"] == "adv"
    assert set(sync.invalid) == {"bad@v1", "garbled@v1"}
    assert sync.poll() == 0
    producer.send_batch(RULES_TOPIC, [change("c", {"match_all": {}}), Message(value=None, key=b"b@v1"),
                                      change("a", {"match_all": {}}, status="inactive"),
                                      change("bad2", {"nonsense": {}})])
    assert sync.poll() == 3
    assert percolator.rule_ids() == {"c@v1"}


def test_rule_changes_reach_a_running_consumer_between_batches(log: FakeLog) -> None:
    produce_bids(log, [bid("u1")])
    counters, percolator = FakeCounters(), FakePercolator()
    with make(log, percolator, counters) as consumer:
        drain(consumer)
        assert counters.match_counts == {}
        log.producer().send_batch(RULES_TOPIC, [change("new", {"match_all": {}})])
        produce_bids(log, [bid("u2")])
        drain(consumer)
    assert sum(counters.match_counts.values()) == 1
    assert consumer.stats.matched == 1


def test_dead_letter_categories_are_few_and_name_the_field() -> None:
    from percolators.errors import InvalidDocumentError
    from rules_service.normalize import BadBidError, bid_to_document, parse_bid
    from workers.stream import dead_letter_category

    def category(raw: bytes) -> str:
        try:
            bid_to_document(parse_bid(raw), log_timestamp_ms=T0, now_ms=T0)
        except BadBidError as exc:
            return dead_letter_category(exc)[0]
        raise AssertionError(f"{raw!r} was accepted")

    assert category(b"{nope") == "not_json"
    assert category(b"[1, 2]") == "not_an_object"
    assert category(b'{"device": {"os": "iOS"}}') == "no_user_id"
    assert category(b'{"user": {"id": "u", "yob": "1990"}}') == "invalid:user.yob"
    assert category(b'{"user": {"id": "u", "yob": 1950}, "imp": [{"banner": {"w": "wide"}}]}').startswith("invalid:imp")
    assert dead_letter_category(InvalidDocumentError("geo.location", "bad lat"))[0] == "invalid_document:geo.location"
    reason_a = dead_letter_category(BadBidError("year of birth 1800 gives an age of 226", "user.yob"))
    reason_b = dead_letter_category(BadBidError("year of birth 1700 gives an age of 326", "user.yob"))
    assert reason_a[0] == reason_b[0] and reason_a[1] != reason_b[1]  # counted together, reported apart


def test_run_retries_a_batch_when_a_backend_is_down_and_counts_it_once(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid(f"u{i}") for i in range(10)])
    counters = FakeCounters()
    counters.fail_next_apply = True  # Redis "goes away" for the first batch
    log.fail_sends_to.add("users.last_seen")
    consumer = make(log, FakePercolator(), counters, batch_size=4)
    consumer.start()
    stop = threading.Event()
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(consumer.run(stop, drain=True, max_backoff_s=0.05)))
    worker.start()
    time.sleep(0.3)
    assert sum(counters.match_counts.values()) == 0 and consumer.stats.retries >= 2
    log.fail_sends_to.clear()  # the log is back; the apply then fails once more, then Redis is back too
    worker.join(timeout=10)
    consumer.close()
    assert outcome and sum(counters.match_counts.values()) == 10
    assert counters.stored_offsets("stream") == {(tp.topic, tp.partition): len(log.data[tp])
                                                  for tp in log.partitions("bids")}


def test_drain_does_not_stop_before_a_failed_last_batch_is_redone(log: FakeLog) -> None:
    log.producer().send_batch(RULES_TOPIC, [change("all", {"match_all": {}})])
    produce_bids(log, [bid(f"u{i}") for i in range(6)])
    counters = FakeCounters()
    counters.fail_next_apply = True
    with make(log, FakePercolator(), counters, batch_size=100) as consumer:  # one batch holds everything
        consumer.run(threading.Event(), drain=True, max_backoff_s=0.01)
    assert sum(counters.match_counts.values()) == 6 and consumer.stats.retries == 1
