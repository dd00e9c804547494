"""Benchmark ``manage.py percolate`` end to end (JSON reading and writing included).

Generates RULES.jsonl and DOCS.jsonl from the audience workload in a temporary directory, then runs
the command as a subprocess pinned to one core (``taskset -c CPU`` when available). A second run
with an empty DOCS file measures start-up and rule loading, so the throughput figure is
``documents / (full run - empty run)``; the raw end-to-end rate is printed too.
Target: >= 20,000 documents/s at 10,000 rules.

    python bench/bench_percolate_cli.py --rules 10000 --docs 100000
    python bench/bench_percolate_cli.py --rules 500 --docs 5000          # quick
    python bench/bench_percolate_cli.py --no-accel   # the percolator's Python twins, not its C accelerators
    python bench/bench_percolate_cli.py --compare    # both, back to back in the same run window
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from percolators.workload import WORKLOAD_NOW, generate_documents, generate_rules  # noqa: E402
from rules_service.schema import USER_MAPPING  # noqa: E402


def run(command: list[str], out_path: Path) -> tuple[float, float]:
    """(wall seconds, cpu seconds of the child: user + system) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with out_path.open("wb") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, cwd=ROOT, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"percolate failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# manage.py with the percolator's C accelerators switched off: document walk and masks
# (percolators._walk), rule evaluation (percolators._eval)
_PYTHON_WALK = ("import runpy, sys; from percolators import batch, fast_index, programs; "
                "fast_index.accelerator = batch.accelerator = programs._eval = None; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def measure(args: argparse.Namespace, workdir: Path, pin: list[str], accel: bool) -> None:
    mapping, rules, docs, empty, out = (workdir / name for name in ("mapping.json", "rules.jsonl", "docs.jsonl",
                                                                     "empty.jsonl", "out.jsonl"))
    python = [sys.executable] if accel else [sys.executable, "-c", _PYTHON_WALK]
    base = [*pin, *python, str(ROOT / "manage.py"), "percolate", "--mapping", str(mapping), "--rules",
            str(rules), "--now", WORKLOAD_NOW.isoformat(), "--batch-size", str(args.batch_size), "--docs"]
    startup, startup_cpu = run([*base, str(empty)], out)
    total, total_cpu = run([*base, str(docs)], out)
    lines = out.read_bytes().count(b"\n")
    assert lines == args.docs, f"expected {args.docs} output lines, got {lines}"
    print(f"{args.rules} rules, {args.docs} documents, pinned: {bool(pin)}, percolator: "
          f"{'C accelerators (if built)' if accel else 'Python twins'}")
    print(f"start-up + loading rules: {startup:.2f} s ({startup_cpu:.2f} s cpu); "
          f"full run {total:.2f} s ({total_cpu:.2f} s cpu)")
    print(f"end to end: {args.docs / total:,.0f} docs/s ({args.docs / total_cpu:,.0f} cpu); "
          f"percolation incl. JSON in/out: {args.docs / max(1e-9, total - startup):,.0f} docs/s wall, "
          f"{args.docs / max(1e-9, total_cpu - startup_cpu):,.0f} docs/s cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--cpu", type=int, default=0, help="pin with taskset to this CPU (-1: do not pin)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and print where")
    parser.add_argument("--no-accel", action="store_true",
                        help="run the percolator's Python twins (document walk, masks, rule evaluation), not C")
    parser.add_argument("--compare", action="store_true", help="run with the C accelerators, then without")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-percolate-"))
    try:
        (workdir / "mapping.json").write_bytes(orjson.dumps(USER_MAPPING))
        (workdir / "rules.jsonl").write_bytes(
            b"".join(orjson.dumps(r) + b"\n" for r in generate_rules(args.rules, seed=1)))
        (workdir / "docs.jsonl").write_bytes(
            b"".join(orjson.dumps(d) + b"\n" for d in generate_documents(args.docs, seed=2)))
        (workdir / "empty.jsonl").write_bytes(b"")
        pin = ["taskset", "-c", str(args.cpu)] if args.cpu >= 0 and shutil.which("taskset") else []
        for accel in ((True, False) if args.compare else (not args.no_accel,)):
            measure(args, workdir, pin, accel)
        if args.keep:
            print(f"files kept in {workdir}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
