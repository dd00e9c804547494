"""The raw prefilter in the replay hot loop changes nothing but the work done: the same counters
with and without it, on workload rules and documents."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from percolators.embedded import EmbeddedPercolator
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules
from rules_service.config import load_settings
from rules_service.domain import LAST_SEEN_TOPIC
from tests.stream.fakes import FakeCounters
from workers import replay
from workers.log.embedded import EmbeddedLog
from workers.log.port import Message
from workers.replay import DAY_MS, ReplayRequest, ReplayScan, plan_scan
from workers.topics import ensure_topic


class ListsOnlyPercolator(EmbeddedPercolator):
    """The embedded engine without ``percolate_masks``: the per-document-list path a replay takes
    with other backends (Elasticsearch)."""

    percolate_masks = None  # type: ignore[assignment]


def _scan(log: EmbeddedLog, rules: list[dict], prefilter: bool,
          percolator: EmbeddedPercolator | None = None) -> tuple[FakeCounters, ReplayScan]:
    now_ms = int(WORKLOAD_NOW.timestamp() * 1000)
    requests = [ReplayRequest(replay_id=f"rp-{i}", rule_id=r["id"], query=r["query"],
                              since_ms=now_ms - (30 + 30 * (i % 3)) * DAY_MS, live_since_ms=now_ms)
                for i, r in enumerate(rules)]
    counters = FakeCounters()
    scan = ReplayScan(log, percolator or EmbeddedPercolator(), counters, requests, scan_id=f"t-{prefilter}",
                      plan=plan_scan(log),
                      dimensions=("gender", "geo.city"), batch_size=500, now=WORKLOAD_NOW, prefilter=prefilter)
    scan.load_rules()
    scan.run()
    return counters, scan


def _last_seen_topic(tmp_path: Path) -> EmbeddedLog:
    log = EmbeddedLog(tmp_path / "log")
    ensure_topic(log, LAST_SEEN_TOPIC, load_settings({"BIDS_PARTITIONS": 2}, environ={}))
    producer = log.producer()
    messages = []
    for i, doc in enumerate(generate_documents(3_000, seed=4)):
        doc["user_id"] = f"user-{i}"
        seen = doc.pop("last_seen", None)
        if seen is not None:
            doc["last_seen"] = seen  # the stream writes last_seen last
        messages.append(Message(value=orjson.dumps(doc), key=doc["user_id"].encode()))
    producer.send_batch(LAST_SEEN_TOPIC, messages)
    producer.close()
    return log


def test_prefilter_keeps_the_counts_and_skips_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "PREFILTER_MAX_PASS_RATE", 1.0)  # use it even when it filters little
    log = _last_seen_topic(tmp_path)
    try:
        for rules in (generate_rules(1, seed=5), generate_rules(30, seed=6)):
            with_filter, scan = _scan(log, rules, prefilter=True)
            without, plain = _scan(log, rules, prefilter=False)
            assert with_filter.users == without.users
            assert with_filter.match_counts == without.match_counts
            assert with_filter.dims == without.dims
            assert scan.progress.matched == plain.progress.matched
            assert sum(plain.progress.matched.values()) > 0
            assert plain.progress.kept == plain.progress.in_window > 0
            assert scan.prefilter_info["active"]
            assert scan.progress.kept < scan.progress.in_window
    finally:
        log.close()


def test_mask_path_counts_like_the_per_document_path(tmp_path: Path) -> None:
    """Requests with 30, 60 and 90-day lookbacks share the scan: each rule's mask is cut to its own
    window, and the counters equal those of the per-document path."""
    log = _last_seen_topic(tmp_path)
    try:
        rules = generate_rules(30, seed=6)
        masks, scan = _scan(log, rules, prefilter=False)
        lists, plain = _scan(log, rules, prefilter=False, percolator=ListsOnlyPercolator())
        assert masks.users == lists.users
        assert masks.match_counts == lists.match_counts
        assert masks.dims == lists.dims
        assert scan.progress.matched == plain.progress.matched
        assert sum(plain.progress.matched.values()) > 0
    finally:
        log.close()

