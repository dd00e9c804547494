"""Benchmark the embedded percolator on the realistic audience workload (percolators.workload).

Prints, on one core (pinned with sched_setaffinity unless --cpu -1):
* documents/s against --rules rules (target >= 50,000 docs/s at 10,000 rules);
* documents/s against --large-rules rules (target >= 10,000 docs/s at 100,000), their load time
  (target < 10 s) and memory (target < 500 MB);
* the match-everything reference (every rule checked against every document) on a small sample,
  the speed ratio (target >= 100x) and whether both gave identical results.

    python bench/bench_percolator.py                       # full run (10k and 100k rules)
    python bench/bench_percolator.py --rules 2000 --docs 4000 --large-rules 0 --ref-docs 20   # quick
    python bench/bench_percolator.py --masks     # also percolate_masks (no per-document lists)
    python bench/bench_percolator.py --no-accel  # document indexing in Python, not percolators._walk,
                                                 # and rule evaluation by the Python closures, not percolators._eval
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from percolators import batch, fast_index, programs
from percolators.embedded import EmbeddedPercolator
from percolators.port import Rule
from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(count: int, seed: int, trace: bool) -> tuple[EmbeddedPercolator, float, float, float, float | None]:
    rules = [Rule(r["id"], r["query"]) for r in generate_rules(count, seed=seed)]
    gc.collect()
    before = rss_mb()
    if trace:
        tracemalloc.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    engine = EmbeddedPercolator()
    engine.upsert(rules)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    traced = None
    if trace:
        traced = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
    del rules
    gc.collect()
    return engine, elapsed, cpu, rss_mb() - before, traced


def throughput(engine: EmbeddedPercolator, docs: list[dict], batch: int, rounds: int) -> tuple[float, float, float]:
    """(wall docs/s, cpu docs/s, matches per document) over ``rounds`` passes, best pass."""
    best_wall = best_cpu = float("inf")
    matches = 0
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        matches = 0
        for start in range(0, len(docs), batch):
            for result in engine.percolate(docs[start : start + batch], now=WORKLOAD_NOW):
                assert isinstance(result, list)
                matches += len(result)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return len(docs) / best_wall, len(docs) / best_cpu, matches / len(docs)


def throughput_masks(engine: EmbeddedPercolator, docs: list[dict], batch: int, rounds: int) -> tuple[float, float]:
    """(wall docs/s, cpu docs/s) of ``percolate_masks`` (per-rule masks, no per-document lists)."""
    best_wall = best_cpu = float("inf")
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(docs), batch):
            result = engine.percolate_masks(docs[start : start + batch], now=WORKLOAD_NOW)
            assert not result.errors
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return len(docs) / best_wall, len(docs) / best_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--large-rules", type=int, default=100_000, help="0 to skip")
    parser.add_argument("--docs", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=8192, help="documents per percolate() call")
    parser.add_argument("--ref-docs", type=int, default=40, help="documents for the match-everything reference")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace allocations while loading (slow)")
    parser.add_argument("--masks", action="store_true",
                        help="also measure percolate_masks (per-rule document masks instead of per-document lists)")
    parser.add_argument("--no-accel", action="store_true",
                        help="index documents with the Python walk instead of the C one (percolators._walk) and "
                             "evaluate rules with the Python closures instead of percolators._eval")
    args = parser.parse_args()
    if args.no_accel:
        fast_index.accelerator = None
        batch.accelerator = None
        programs._eval = None
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    docs = generate_documents(args.docs, seed=2)
    print(f"workload: {args.docs} documents, batches of {args.batch}, pinned to cpu {args.cpu}, "
          f"document walk: {'C' if fast_index.accelerator is not None else 'Python'}, "
          f"rule evaluation: {'C' if programs.available() else 'Python'}")

    engine, seconds, cpu_s, mb, traced = load(args.rules, 1, args.tracemalloc)
    print(f"{args.rules} rules: loaded in {seconds:.2f} s ({cpu_s:.2f} s cpu), +{mb:.0f} MB RSS"
          + (f", {traced:.0f} MB traced" if traced is not None else ""))
    wall, cpu, per_doc = throughput(engine, docs, args.batch, args.rounds)
    print(f"{args.rules} rules: {wall:,.0f} docs/s wall, {cpu:,.0f} docs/s cpu, {per_doc:.1f} matches/doc")
    if args.masks:
        wall_m, cpu_m = throughput_masks(engine, docs, args.batch, args.rounds)
        print(f"{args.rules} rules, percolate_masks: {wall_m:,.0f} docs/s wall, {cpu_m:,.0f} docs/s cpu")

    sample = docs[: args.ref_docs]
    reference = EmbeddedPercolator(presearcher="match_all")
    reference.upsert(Rule(r["id"], r["query"]) for r in generate_rules(args.rules, seed=1))
    started = time.perf_counter()
    expected = reference.percolate(sample, now=WORKLOAD_NOW)
    ref_rate = len(sample) / (time.perf_counter() - started)
    identical = expected == engine.percolate(sample, now=WORKLOAD_NOW)
    print(f"{args.rules} rules: match-everything reference {ref_rate:,.1f} docs/s; speed-up {wall / ref_rate:,.0f}x; "
          f"identical results on {len(sample)} documents: {identical}")
    del engine, reference
    gc.collect()

    if args.large_rules:
        engine, seconds, cpu_s, mb, traced = load(args.large_rules, 3, args.tracemalloc)
        print(f"{args.large_rules} rules: loaded in {seconds:.2f} s ({cpu_s:.2f} s cpu), +{mb:.0f} MB RSS"
              + (f", {traced:.0f} MB traced" if traced is not None else ""))
        wall, cpu, per_doc = throughput(engine, docs, args.batch, args.rounds)
        print(f"{args.large_rules} rules: {wall:,.0f} docs/s wall, {cpu:,.0f} docs/s cpu, {per_doc:.1f} matches/doc")
        if args.masks:
            wall_m, cpu_m = throughput_masks(engine, docs, args.batch, args.rounds)
            print(f"{args.large_rules} rules, percolate_masks: {wall_m:,.0f} docs/s wall, {cpu_m:,.0f} docs/s cpu")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
