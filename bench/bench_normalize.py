#!/usr/bin/env python
"""Bid -> user document: µs per bid for parse + normalise, the original normaliser against today's, same run.

Generated bids (workers.bidgen, realistic: 10% ISO ``received_at``, user.id or device.ifa, apps and sites) are
serialised once; each variant then turns every message into a document, in rounds that alternate the variants
(so machine noise hits them alike). Figures are CPU time (``time.process_time``) per bid: the median and the best
round, printed as JSON lines.

Variants:
    reference       tests/normalize/reference_normalize.py (the frozen original): bid_to_document(parse_bid(raw))
    current         rules_service.normalize: bid_to_document(parse_bid(raw)) (what workers/stream.py calls today)
    message         rules_service.normalize.normalise_message(raw, ...): parse + normalise in one call
    loads_only      orjson.loads alone: the floor no pure-Python normaliser can beat
Also the stream's "produce" input per bid (orjson.dumps of the document for users.last_seen, plus its key).

Examples:
    python bench/bench_normalize.py                  # 50k bids, 7 rounds
    python bench/bench_normalize.py --bids 100000 --days 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from rules_service import normalize  # noqa: E402
from tests.normalize import reference_normalize  # noqa: E402
from workers.bidgen import BidGenerator  # noqa: E402

NOW_MS = 1_795_860_000_000


def variants() -> dict[str, Callable[[list[bytes]], Any]]:
    ref_parse, ref_doc = reference_normalize.parse_bid, reference_normalize.bid_to_document
    parse, to_doc, message = normalize.parse_bid, normalize.bid_to_document, normalize.normalise_message
    loads = orjson.loads

    def reference(raws: list[bytes]) -> None:
        for i, raw in enumerate(raws):
            ref_doc(ref_parse(raw), log_timestamp_ms=NOW_MS - i, now_ms=NOW_MS)

    def current(raws: list[bytes]) -> None:
        for i, raw in enumerate(raws):
            to_doc(parse(raw), log_timestamp_ms=NOW_MS - i, now_ms=NOW_MS)

    def message_(raws: list[bytes]) -> None:
        for i, raw in enumerate(raws):
            message(raw, NOW_MS - i, NOW_MS)

    def loads_only(raws: list[bytes]) -> None:
        for _i, raw in enumerate(raws):  # same loop shape as the others
            loads(raw)

    return {"reference": reference, "current": current, "message": message_, "loads_only": loads_only}


def produce_input(documents: list[dict[str, Any]]) -> None:
    dumps = orjson.dumps
    for document in documents:  # as workers/stream.py builds each users.last_seen record
        dumps(document)
        str(document["user_id"]).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bids", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=7.0, help="event times spread over this many days")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    generator = BidGenerator(seed=args.seed, users=args.users, days=args.days)
    raws = [orjson.dumps(bid) for bid in generator.bids(args.bids)]
    documents = [normalize.normalise_message(raw, None, NOW_MS) for raw in raws]
    reference_docs = [reference_normalize.bid_to_document(reference_normalize.parse_bid(raw), now_ms=NOW_MS)
                      for raw in raws]
    if [orjson.dumps(d) for d in documents] != [orjson.dumps(d) for d in reference_docs]:
        raise SystemExit("documents differ from the reference: run tests/normalize first")
    fast = sum(normalize._fast_document(orjson.loads(raw), None, NOW_MS) is not None for raw in raws)

    runs = variants()
    runs["produce_input"] = lambda _raws: produce_input(documents)
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            began = time.process_time()
            run(raws)
            timings[name].append((time.process_time() - began) / len(raws) * 1e6)
    print(json.dumps({"bids": len(raws), "mean_bytes": round(sum(map(len, raws)) / len(raws)),
                      "fast_lane_share": round(fast / len(raws), 4), "rounds": args.rounds}), flush=True)
    for name, values in timings.items():
        print(json.dumps({"variant": name, "us_per_bid_median": round(statistics.median(values), 3),
                          "us_per_bid_best": round(min(values), 3)}), flush=True)
    ref_median = statistics.median(timings["reference"])
    for name in ("current", "message"):
        print(json.dumps({"speedup_vs_reference": name,
                          "x": round(ref_median / statistics.median(timings[name]), 2)}), flush=True)


if __name__ == "__main__":
    main()
