"""Run stream consumers from settings: in this process, in child processes, or under Celery.

* :func:`build_consumer` composes a :class:`~workers.stream.StreamConsumer` from the settings:
  the log (``create_log``), the percolator (``create_percolator``) loaded from ``audiences.rules``
  (:class:`~workers.rules_sync.RulesSync`), and the Redis counters (``create_counters``).
* :func:`drain` processes every partition up to the end offsets seen at start, using one process
  per share of partitions (``processes``), and returns the summed summary.
* :class:`StreamSupervisor` keeps ``processes`` consumer processes streaming (restarting one that
  dies) until stopped; the Celery worker's bootstep uses it.

Why processes: percolation is CPU-bound Python, so threads would share one core. Partitions are
dealt out to the processes statically (:func:`~workers.stream.split_partitions`); several
machines split them with ``--partitions``. Children die with their parent (``PR_SET_PDEATHSIG``),
so a ``kill -9`` of the worker leaves no orphan consuming the same partitions (even then
counting stays exactly-once: :meth:`Counters.apply` skips a batch already applied).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rules_service.config import Settings
from workers.stream import DEFAULT_GROUP, LatencyHistogram, StreamConsumer, StreamStats, split_partitions

logger = logging.getLogger(__name__)

#: The stream consumers' flush window is ``RULES_STREAM_FLUSH_MS`` (``StreamConsumer(flush_interval_ms=...)``):
#: polled batches are merged and written to Redis in one atomic apply at most this often (plus one
#: batch's time), which cuts Redis's CPU per bid (a rule's keys are written once per window) at the
#: cost of this much latency; the default 200 ms keeps "bid in the log -> counters readable" well
#: under a second.
#: A window is also written once it holds this many records.
MAX_WINDOW_RECORDS = 20_000

#: The cyclic GC's thresholds in a stream consumer process (see build_consumer).
GC_THRESHOLDS = (100_000, 50, 1_000)

#: glibc malloc settings of a stream consumer process (see keep_freed_heap): (mallopt parameter,
#: value) for M_TRIM_THRESHOLD, M_TOP_PAD and M_MMAP_THRESHOLD.
MALLOC_OPTIONS = ((-1, 512 << 20), (-2, 64 << 20), (-3, 32 << 20))


def keep_freed_heap() -> bool:
    """Make glibc keep the memory a batch frees for the next batch (True when set; False off glibc).

    Why: each batch allocates and frees tens of MB (documents, the window's counter updates, the
    multi-MB Redis write). With glibc's defaults, a free at the top of the heap gave memory back to
    the kernel (trim, past 128 KB) and blocks over the dynamic mmap threshold were mapped and
    unmapped per use, so the next batch page-faulted the same memory in again (the kernel's
    page-clearing showed in profiles), and small allocations paid for it: orjson.dumps of a user
    document took 3.6-4.1 us in a consumer against 2.4 with these settings (bench figures in the
    README). Process-wide and not undone: the settings suit any process that runs a consumer; the
    cost is that the heap stays at its high-water mark."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in MALLOC_OPTIONS)


@contextlib.contextmanager
def build_consumer(settings: Settings, *, partitions: Sequence[int] | None = None, batch_size: int | None = None,
                   group: str = DEFAULT_GROUP) -> Iterator[StreamConsumer]:
    """A started consumer composed from the settings; everything is closed on exit."""
    from percolators.factory import create_percolator
    from rules_service.counters.factory import create_counters
    from workers.log.factory import create_log
    from workers.rules_sync import RulesSync
    from workers.topics import ensure_topics

    log = create_log(settings)
    percolator = create_percolator(settings)
    rules: RulesSync | None = None
    consumer: StreamConsumer | None = None
    thresholds = gc.get_threshold()
    try:
        ensure_topics(log, settings)
        counters = create_counters(settings)
        rules = RulesSync(log, percolator)
        loaded = rules.load()
        logger.info("loaded %d rules (%d skipped as invalid)", loaded, len(rules.invalid))
        # the counters' per-rule keys of this hour, built now rather than by the first windows
        counters.prepare(percolator.rule_ids())
        # The rule index is millions of long-lived objects: move them out of the cyclic GC's reach,
        # or every full collection (triggered by the many short-lived objects of each batch)
        # walks them all (measured: ~10-25% of the batch time, and pauses).
        gc.collect()
        gc.freeze()
        # Nothing on the hot path makes reference cycles (refcounting frees every batch), yet each
        # batch allocates ~30 containers per bid, which at the default threshold (700) ran a young
        # collection every ~25 bids that walked the batch's live documents again and again
        # (measured: ~6 us of consumer CPU per bid of ~60). A rare collection still reclaims the
        # odd cycle (an exception's traceback).
        gc.set_threshold(*GC_THRESHOLDS)
        keep_freed_heap()
        consumer = StreamConsumer(
            log, percolator, counters, topic=settings.BIDS_TOPIC, group=group, partitions=partitions,
            batch_size=batch_size or settings.BATCH_SIZE, rules=rules, dimensions=settings.DIMENSIONS,
            fault_hook=self_kill_hook(os.environ.get(SELF_KILL_ENV, "")),
            overlap_apply=settings.STREAM_OVERLAP_APPLY,
            flush_interval_ms=settings.STREAM_FLUSH_MS, max_window_records=MAX_WINDOW_RECORDS,
            seen_records=settings.STREAM_SEEN_RECORDS,
        )
        consumer.start()
        yield consumer
    finally:
        gc.set_threshold(*thresholds)
        if consumer is not None:
            consumer.close()
        if rules is not None:
            rules.close()
        percolator.close()
        log.close()


#: Fault injection for the kill -9 test: ``after_produce=0.05,after_apply=0.05`` makes the process
#: SIGKILL itself at that point of a batch with that probability (the windows a random external
#: kill rarely hits). A ``RULES_TEST_*`` variable: never set in production.
SELF_KILL_ENV = "RULES_TEST_SELF_KILL"


def self_kill_hook(spec: str) -> Callable[[str], None] | None:
    if not spec:
        return None
    odds: dict[str, float] = {}
    for part in spec.split(","):
        point, _, probability = part.partition("=")
        odds[point.strip()] = float(probability)
    rng = random.Random(os.getpid() ^ time.time_ns())

    def hook(point: str) -> None:
        if rng.random() < odds.get(point, 0.0):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` from /proc (``ru_maxrss`` would not
    do: Linux carries it over ``execve``, so a spawned child would report its parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _stats_to_dict(stats: StreamStats) -> dict[str, Any]:
    out = stats.summary()
    out["rss_mb"] = peak_rss_mb()
    out["e2e_hist"] = stats.end_to_end_ms.counts
    out["batch_hist"] = stats.batch_ms.counts
    out["busy_seconds"] = stats.busy_seconds
    return out


def merge_summaries(parts: Sequence[dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
    """Sum per-process summaries into one (percentiles from the merged histograms)."""
    total: dict[str, Any] = {"processed": 0, "matched": 0, "matched_bids": 0, "dlq": 0, "batches": 0, "writes": 0,
                             "skipped_batches": 0, "lag": 0}
    reasons: dict[str, int] = {}
    e2e, batch = LatencyHistogram(), LatencyHistogram()
    for part in parts:
        for key in total:
            total[key] += int(part.get(key, 0))
        for reason, n in part.get("dlq_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
        for bucket, n in part.get("e2e_hist", {}).items():
            e2e.add(int(bucket), n)
        for bucket, n in part.get("batch_hist", {}).items():
            batch.add(int(bucket), n)
    total["dlq_reasons"] = dict(sorted(reasons.items()))
    stages: dict[str, float] = {}
    for part in parts:  # per-process microseconds per bid, weighted by the bids each processed
        for stage, us in part.get("stage_us_per_bid", {}).items():
            stages[stage] = stages.get(stage, 0.0) + us * int(part.get("processed", 0))
    total["stage_us_per_bid"] = {k: round(v / max(1, total["processed"]), 1) for k, v in stages.items()}
    cpu_stages: dict[str, float] = {}
    for part in parts:
        for stage, us in part.get("stage_cpu_us_per_bid", {}).items():
            cpu_stages[stage] = cpu_stages.get(stage, 0.0) + us * int(part.get("processed", 0))
    total["stage_cpu_us_per_bid"] = {k: round(v / max(1, total["processed"]), 1) for k, v in cpu_stages.items()}
    total["cpu_us_per_bid"] = round(sum(float(p.get("cpu_us_per_bid", 0)) * int(p.get("processed", 0)) for p in parts)
                                    / max(1, total["processed"]), 1)  # consumer CPU, weighted like the stages
    total["rss_mb"] = [part.get("rss_mb") for part in parts]  # peak RSS per consumer process
    total["processes"] = len(parts)
    total["elapsed_s"] = round(elapsed_s, 3)
    total["bids_per_s"] = round(total["processed"] / max(elapsed_s, 1e-9), 1)  # wall clock, with start-up
    # after start-up (loading the rules): the sum of each process's own rate
    total["streaming_bids_per_s"] = round(sum(int(p.get("processed", 0)) / max(float(p.get("elapsed_s", 0)), 1e-9)
                                              for p in parts), 1)
    total["batch_ms_p50"], total["batch_ms_p99"] = batch.percentile(50), batch.percentile(99)
    total["e2e_ms_p50"], total["e2e_ms_p99"] = e2e.percentile(50), e2e.percentile(99)
    return total


def _install_stop_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, handler)


def drain_in_process(settings: Settings, *, partitions: Sequence[int] | None = None, batch_size: int | None = None,
                     group: str = DEFAULT_GROUP, stop: threading.Event | None = None) -> dict[str, Any]:
    """Drain the given partitions (default: all) in this process; return the summary."""
    stop = stop or threading.Event()
    with build_consumer(settings, partitions=partitions, batch_size=batch_size, group=group) as consumer:
        consumer.stats.started_at = time.monotonic()
        stats = consumer.run(stop, drain=True)
        return _stats_to_dict(stats)


def _drain_child(settings: Settings, partitions: list[int], batch_size: int | None, group: str,
                 results: Any) -> None:
    die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    stop = threading.Event()
    _install_stop_signals(stop)
    results.put(drain_in_process(settings, partitions=partitions, batch_size=batch_size, group=group, stop=stop))


def _all_partitions(settings: Settings) -> list[int]:
    from workers.log.factory import create_log
    from workers.topics import ensure_topics

    log = create_log(settings)
    try:
        ensure_topics(log, settings)
        return [tp.partition for tp in log.partitions(settings.BIDS_TOPIC)]
    finally:
        log.close()


def drain(settings: Settings, *, processes: int = 1, partitions: Sequence[int] | None = None,
          batch_size: int | None = None, group: str = DEFAULT_GROUP, handle_signals: bool = False) -> dict[str, Any]:
    """Drain ``bids`` up to the end offsets seen at start with ``processes`` processes.
    ``handle_signals``: SIGTERM/SIGINT stop after the current batch (for the command line)."""
    began = time.monotonic()
    chosen = list(partitions) if partitions is not None else _all_partitions(settings)
    shares = split_partitions(chosen, processes)
    if len(shares) <= 1:
        stop = threading.Event()
        if handle_signals:
            _install_stop_signals(stop)
        summary = drain_in_process(settings, partitions=chosen, batch_size=batch_size, group=group, stop=stop)
        return merge_summaries([summary], time.monotonic() - began)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    children = [ctx.Process(target=_drain_child, args=(settings, share, batch_size, group, results),
                            name=f"stream-drain-{'-'.join(map(str, share))}") for share in shares]
    for child in children:
        child.start()
    if handle_signals:  # forward SIGTERM/SIGINT: each child stops after its batch and reports
        def forward(signum: int, frame: object) -> None:
            for child in children:
                if child.is_alive():
                    child.terminate()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
    parts: list[dict[str, Any]] = []
    try:
        while len(parts) < len(children):
            try:
                parts.append(results.get(timeout=0.5))
            except Exception:  # queue.Empty: check that nobody died without a result
                dead = [c for c in children if c.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"drain process {dead[0].name} exited with {dead[0].exitcode}") from None
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
    return merge_summaries(parts, time.monotonic() - began)


def _stream_child(settings: Settings, partitions: list[int], batch_size: int | None, group: str,
                  stop: multiprocessing.synchronize.Event) -> None:
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s stream[{partitions}] %(message)s")
    local_stop = threading.Event()
    _install_stop_signals(local_stop)

    def watch() -> None:
        stop.wait()
        local_stop.set()

    threading.Thread(target=watch, daemon=True, name="stop-watch").start()
    with build_consumer(settings, partitions=partitions, batch_size=batch_size, group=group) as consumer:
        consumer.run(local_stop)
        logger.info("stream consumer on %s stopped: %s", partitions, consumer.stats.summary())


class StreamSupervisor:
    """Keeps one consumer process per share of partitions running until :meth:`stop`."""

    def __init__(self, settings: Settings, *, processes: int = 1, partitions: Sequence[int] | None = None,
                 batch_size: int | None = None, group: str = DEFAULT_GROUP, restart_delay_s: float = 1.0) -> None:
        self.settings = settings
        self.processes = max(1, processes)
        self.partitions = list(partitions) if partitions is not None else None
        self.batch_size = batch_size
        self.group = group
        self.restart_delay_s = restart_delay_s
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()
        self._children: dict[int, Any] = {}
        self._shares: list[list[int]] = []
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        chosen = self.partitions if self.partitions is not None else _all_partitions(self.settings)
        self._shares = split_partitions(chosen, self.processes)
        for index in range(len(self._shares)):
            self._spawn(index)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stream-supervisor")
        self._thread.start()
        logger.info("stream supervisor: %d consumer process(es) on partitions %s", len(self._shares), self._shares)

    def _spawn(self, index: int) -> None:
        share = self._shares[index]
        child = self._ctx.Process(target=_stream_child, args=(self.settings, share, self.batch_size, self.group,
                                                              self._stop),
                                  name=f"stream-{'-'.join(map(str, share))}", daemon=False)
        child.start()
        self._children[index] = child

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for index, child in list(self._children.items()):
                if not child.is_alive() and not self._stop.is_set():
                    logger.error("stream process %s exited with %s: restarting", child.name, child.exitcode)
                    self.restarts += 1
                    time.sleep(self.restart_delay_s)
                    self._spawn(index)

    def alive(self) -> int:
        return sum(1 for child in self._children.values() if child.is_alive())

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for child in self._children.values():
            child.join(timeout=max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                logger.warning("stream process %s did not stop in time: terminating", child.name)
                child.terminate()
                child.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=2)
