"""The embedded log: file-backed topics under ``RULES_DATA_DIR/log``, no server.

Design note: why SQLite in WAL mode (and not our own segment files)
------------------------------------------------------------------
* Several processes (the API, workers, a replay) share the files. SQLite already gives us
  cross-process locking (one writer at a time per file, waiting up to ``busy_timeout``) and in
  WAL mode readers never block the writer nor each other: a consumer or a replay scan keeps
  reading a consistent snapshot while producers append and the cleaner deletes. Segment files
  would need our own fcntl locking, index files and crash recovery.
* Durability: a batch is one transaction. In WAL mode with ``synchronous=NORMAL`` a commit has
  written its frames into the ``-wal`` file (``write(2)``, i.e. the OS page cache) before
  ``send_batch`` returns, so it survives ``kill -9`` of any process: the kernel still owns those
  pages and the next opener replays the WAL. It does *not* survive a power loss or kernel crash;
  pass ``fsync=True`` (``synchronous=FULL``: fsync of the WAL at every commit) for that.
* Layout: one database file per topic (``topics/<name>.db``), so topics do not contend for the
  write lock, and inside it one rowid table per partition whose rowid *is* the offset: appends go
  to the right edge of the B-tree and reading from an offset is a range scan on the primary key,
  the two fastest things SQLite does. ``partitions`` holds each partition's next offset (offsets
  are never reused, even when retention empties a partition) and the running max timestamp;
  ``time_index`` holds one row per produced batch (first/last offset, running max timestamp), a
  sparse Kafka-like time index for ``seek_to_time``, plus the batch's append (wall-clock) time
  ``append_ms``: the write time the cleaner judges tombstones by (NULL in rows written before
  the column existed: those fall back to the message timestamp). Consumer-group offsets live in
  ``groups.db`` (one transaction per commit, so a multi-topic commit is atomic).
* Compaction works like Kafka's log cleaner, lazily: producers only append (a compacted topic
  is written as fast as any other; a unique key index, i.e. compacting at write time, measured
  3-6x slower with random user ids because every write dirties a random index page). Once the
  records written since the last pass reach ``min_cleanable_dirty_ratio`` of a partition
  (default 0.25), the cleaner collects the dirty tail's keys and last offsets in a temporary
  table and deletes every record a later one of the same key supersedes, range by range. So a
  consumer that keeps up sees every message, and reading from the beginning to the end yields
  the latest value of every key (superseded ones may still appear in the not yet cleaned tail,
  in offset order). Freed pages are reused by later appends; the file stays near its live data.
* Cleaning: :meth:`EmbeddedLog.compact` forces a pass; producers start one in a background thread
  every ``maintenance_interval_s`` (it only works when the dirty ratio is reached; it skips when
  another thread or process holds the topic's cleaner lease, a ``flock``). A pass also
  removes tombstones *written* more than ``tombstone_retention_ms`` ago (Kafka's
  ``delete.retention.ms``, default 24 h, judged like Kafka by write time, not by the message
  timestamp: a tombstone produced with an old timestamp, e.g. a replay of captured traffic,
  still stays readable that long for lagging consumers), drops the compacted topic's time index
  rows whose batches have no live record left (they would otherwise grow by one per batch
  forever), applies ``retention_ms`` to ``delete`` topics, and gives free pages back to the
  file system with ``incremental_vacuum`` when more than a quarter of the file is free (a
  background pass on a compacted topic keeps as many free pages as the writes since the last
  pass took, for the next interval's appends: see :func:`_refill_reserve`). Every
  step is a short transaction over a bounded chunk: producers wait at most one chunk and
  readers never wait.
* Offsets are contiguous until compaction/retention removes records; then they have gaps, like
  Kafka's.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import logging
import operator
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal
from zlib import crc32

from workers.log.port import (
    Consumer,
    Log,
    LogError,
    LogUnavailableError,
    Message,
    Producer,
    Record,
    TopicExistsError,
    TopicNotFoundError,
    TopicPartition,
    TopicSpec,
)

__all__ = ["EmbeddedConsumer", "EmbeddedLog", "EmbeddedProducer"]

_logger = logging.getLogger(__name__)
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_PAGE_SIZE = 16384  # measured slightly faster than 8 KB for ~500-byte records, both ways
_CHUNK = 20_000  # rows per cleaner transaction
DEFAULT_TOMBSTONE_RETENTION_MS = 24 * 3600 * 1000
# Clean a compacted partition once a quarter of it was written since the last pass (Kafka: 0.5);
# lower keeps the file nearer its live data, at the price of more frequent passes.
DEFAULT_MIN_CLEANABLE_DIRTY_RATIO = 0.25


def _now_ms() -> int:
    return int(time.time() * 1000)


def _connect(path: Path, busy_timeout_ms: int, fsync: bool) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False because a
    # Log may be shared by threads (every use is under the owner's lock).
    conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise LogUnavailableError(f"{path}: cannot switch to WAL mode (got {mode}); is it on a network file system?")
    conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MB: keeps the key index of big compacted topics hot
    conn.execute("PRAGMA wal_autocheckpoint=1000")  # pages; bounds the -wal file at ~8 MB
    conn.execute("PRAGMA journal_size_limit=16777216")
    return conn


class _Topic:
    """Open handle on one topic's database (per owner: producer, consumer or log)."""

    __slots__ = ("conn", "path", "spec")

    def __init__(self, spec: TopicSpec, conn: sqlite3.Connection, path: Path) -> None:
        self.spec = spec
        self.conn = conn
        self.path = path


class _Store:
    """Shared plumbing: paths, connection settings, topic catalogue."""

    def __init__(self, root: Path, busy_timeout_ms: int, fsync: bool) -> None:
        self.root = Path(root)
        self.topics_dir = self.root / "topics"
        self.busy_timeout_ms = busy_timeout_ms
        self.fsync = fsync
        try:
            self.topics_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogUnavailableError(f"cannot create the log directory {self.topics_dir}: {exc}") from exc

    def topic_path(self, name: str) -> Path:
        if not _TOPIC_NAME.match(name) or name in (".", ".."):
            raise LogError(f"invalid topic name {name!r}: use 1-200 characters among A-Z a-z 0-9 . _ -")
        return self.topics_dir / f"{name}.db"

    def open_topic(self, name: str) -> _Topic:
        path = self.topic_path(name)
        if not path.exists():
            raise TopicNotFoundError(f"topic {name!r} does not exist (in {self.topics_dir})")
        try:
            conn = _connect(path, self.busy_timeout_ms, self.fsync)
            _upgrade(conn)
            spec = _read_spec(conn, name)
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"cannot open topic {name!r} at {path}: {exc}") from exc
        return _Topic(spec, conn, path)

    def connect_groups(self) -> sqlite3.Connection:
        try:
            conn = _connect(self.root / "groups.db", self.busy_timeout_ms, self.fsync)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS offsets (group_id TEXT NOT NULL, topic TEXT NOT NULL,"
                " partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL,"
                " PRIMARY KEY (group_id, topic, partition)) WITHOUT ROWID"
            )
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"cannot open {self.root / 'groups.db'}: {exc}") from exc
        return conn


def _has_append_ms(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "append_ms" for row in conn.execute("PRAGMA table_info(time_index)"))


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: ``BEGIN IMMEDIATE`` takes the write lock now (so ``busy_timeout``
    governs the wait, rather than a lock upgrade failing half-way), ``COMMIT`` on success, and
    ``ROLLBACK`` on any exception, which is then re-raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a topic file created by an older version up to the current schema: add
    ``time_index.append_ms`` (NULL in the existing rows, meaning "append time unknown: judge by
    the message timestamp"). Checked again under the write lock: several processes may open the
    file at once."""
    if _has_append_ms(conn):
        return
    with _write_transaction(conn):
        if not _has_append_ms(conn):
            conn.execute("ALTER TABLE time_index ADD COLUMN append_ms INTEGER")


def _read_spec(conn: sqlite3.Connection, name: str) -> TopicSpec:
    row = conn.execute(
        "SELECT partitions, cleanup_policy, retention_ms, segment_ms, min_cleanable_dirty_ratio FROM spec"
    ).fetchone()
    return TopicSpec(name=name, partitions=int(row[0]), cleanup_policy=row[1], retention_ms=row[2],
                     segment_ms=row[3], min_cleanable_dirty_ratio=row[4])


_new = object.__new__
_ts_of = operator.itemgetter(3)
_set = object.__setattr__


def _read(conn: sqlite3.Connection, sql: str, params: tuple[int, ...], topic: str, partition: int) -> list[Record]:
    """Run a ``SELECT offset, key, value, ts`` and build Records: the hot path of consumers and
    replay scans.

    ``Record`` is a frozen dataclass whose ``__init__`` costs about 1 us; filling the instance
    dict directly builds the very same object (same class, fields, equality and hash) in under
    half that. The cyclic GC is paused while the batch is built: these allocations form no
    cycles, and otherwise a collection runs every 700 of them."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        rows = conn.execute(sql, params).fetchall()
        out: list[Record] = []
        append = out.append
        for o, k, v, t in rows:
            r = _new(Record)
            _set(r, "__dict__", {"topic": topic, "partition": partition, "offset": o, "key": k, "value": v,
                                 "timestamp_ms": t})
            append(r)
        return out
    finally:
        if paused:
            gc.enable()


def _table(partition: int) -> str:
    return f"p{int(partition)}"


def _begin_offset(conn: sqlite3.Connection, partition: int) -> int:
    row = conn.execute(f"SELECT min(offset) FROM {_table(partition)}").fetchone()
    if row[0] is not None:
        return int(row[0])
    return _end_offset(conn, partition)


def _end_offset(conn: sqlite3.Connection, partition: int) -> int:
    return int(conn.execute("SELECT next_offset FROM partitions WHERE partition=?", (partition,)).fetchone()[0])


class EmbeddedLog(Log):
    """The file-backed log rooted at ``root`` (usually ``RULES_DATA_DIR/log``).

    ``fsync``: fsync every batch (survives power loss, slower); default survives process kills.
    ``tombstone_retention_ms``: how long a tombstone stays readable in a compacted topic.
    ``maintenance_interval_s``: how often a producer runs the cleaner on the topics it writes.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False, busy_timeout_ms: int = 30_000,
                 tombstone_retention_ms: int = DEFAULT_TOMBSTONE_RETENTION_MS,
                 maintenance_interval_s: float = 30.0) -> None:
        self._store = _Store(Path(root), busy_timeout_ms, fsync)
        self.root = self._store.root
        self.tombstone_retention_ms = tombstone_retention_ms
        self.maintenance_interval_s = maintenance_interval_s
        self._specs: dict[str, TopicSpec] = {}
        self._lock = threading.Lock()

    # -- admin -------------------------------------------------------------------------------
    def create_topic(self, spec: TopicSpec, exist_ok: bool = True) -> None:
        if spec.partitions < 1:
            raise LogError(f"topic {spec.name!r}: partitions must be at least 1, got {spec.partitions}")
        if spec.cleanup_policy not in ("delete", "compact"):
            raise LogError(f"topic {spec.name!r}: cleanup_policy must be 'delete' or 'compact'")
        path = self._store.topic_path(spec.name)
        if path.exists():
            if exist_ok:
                return
            raise TopicExistsError(f"topic {spec.name!r} already exists")
        # Build the whole file under a temporary name, then link it into place: other processes
        # see either no topic or a complete one, and link() fails if someone else won the race.
        tmp = path.with_name(f".{spec.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                conn.execute("BEGIN")
                conn.execute("CREATE TABLE spec (partitions INTEGER NOT NULL, cleanup_policy TEXT NOT NULL,"
                             " retention_ms INTEGER, segment_ms INTEGER, min_cleanable_dirty_ratio REAL)")
                conn.execute("INSERT INTO spec VALUES (?, ?, ?, ?, ?)",
                             (spec.partitions, spec.cleanup_policy, spec.retention_ms, spec.segment_ms,
                              spec.min_cleanable_dirty_ratio))
                conn.execute("CREATE TABLE partitions (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL,"
                             " max_ts INTEGER NOT NULL, cleaned_upto INTEGER NOT NULL DEFAULT 0,"
                             " clean_rows INTEGER NOT NULL DEFAULT 0)")
                conn.execute("CREATE TABLE time_index (partition INTEGER NOT NULL, first_offset INTEGER NOT NULL,"
                             " last_offset INTEGER NOT NULL, max_ts INTEGER NOT NULL, append_ms INTEGER,"
                             " PRIMARY KEY (partition, first_offset)) WITHOUT ROWID")
                conn.execute("CREATE INDEX time_index_ts ON time_index (partition, max_ts)")
                for p in range(spec.partitions):
                    conn.execute(f"CREATE TABLE {_table(p)} (offset INTEGER PRIMARY KEY, key BLOB, value BLOB,"
                                 " ts INTEGER NOT NULL)")
                    conn.execute("INSERT INTO partitions (partition, next_offset, max_ts) VALUES (?, 0, ?)",
                                 (p, -(2**62)))
                conn.execute("COMMIT")
            finally:
                conn.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                if not exist_ok:
                    raise TopicExistsError(f"topic {spec.name!r} already exists") from None
            dir_fd = os.open(self._store.topics_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (OSError, sqlite3.Error) as exc:
            raise LogUnavailableError(f"cannot create topic {spec.name!r} in {self._store.topics_dir}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def describe_topic(self, name: str) -> TopicSpec:
        spec = self._specs.get(name)
        if spec is None:
            topic = self._store.open_topic(name)
            topic.conn.close()
            spec = self._specs[name] = topic.spec
        return spec

    def list_topics(self) -> list[str]:
        return sorted(p.stem for p in self._store.topics_dir.glob("*.db") if not p.name.startswith("."))

    def producer(self) -> EmbeddedProducer:
        return EmbeddedProducer(self)

    def consumer(self, group_id: str | None,
                 auto_offset_reset: Literal["earliest", "latest"] = "earliest") -> EmbeddedConsumer:
        if auto_offset_reset not in ("earliest", "latest"):
            raise LogError(f"auto_offset_reset must be 'earliest' or 'latest', got {auto_offset_reset!r}")
        return EmbeddedConsumer(self, group_id, auto_offset_reset)

    # -- cleaner -----------------------------------------------------------------------------
    def compact(self, topic: str) -> None:
        """Run the cleaner on ``topic`` now: retention (delete topics), tombstone cleaning
        (compact topics), then give free pages back to the file system."""
        handle = self._store.open_topic(topic)
        try:
            with _cleaner_lease(handle.path, wait=True):
                _maintain(handle, self.tombstone_retention_ms, budget_rows=None,
                          busy_timeout_ms=self._store.busy_timeout_ms, force=True)
        except (sqlite3.Error, OSError) as exc:
            raise LogUnavailableError(f"cleaning topic {topic!r} failed: {exc}") from exc
        finally:
            handle.conn.close()

    def topic_size_bytes(self, topic: str) -> int:
        """Bytes on disk of a topic (database plus WAL), for monitoring and the benchmarks."""
        path = self._store.topic_path(topic)
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(str(path) + suffix)
        return total

    def scan_compacted(self, topic: str, partitions: Iterable[int] | None = None,
                       batch_size: int = 10_000, *, start_offsets: Mapping[int, int] | None = None,
                       end_offsets: Mapping[int, int] | None = None) -> Iterator[list[Record]]:
        """The latest record of every key below the end offsets (see the port's contract), in
        batches, partition after partition (offset order inside a partition).

        The cleaner's checkpoint does most of the work: below a partition's ``cleaned_upto`` the
        records are unique per key (a pass removed every superseded one, and nothing is ever
        added below the mark), so only keys written again in the dirty tail
        ``[cleaned_upto, end)`` can have superseded records. A partition without a dirty tail is
        read exactly as stored (no extra cost per record). Otherwise the tail's keys and last
        offsets go into a temporary table (the cleaner's own first step) and each row is probed
        against it: a row is skipped when a later row of its key exists below the end. See
        :func:`_scan_partition` for the cost and the concurrency argument."""
        handle = self._store.open_topic(topic)
        try:
            parts = range(handle.spec.partitions) if partitions is None else list(partitions)
            marks = {}
            for p in parts:
                # One snapshot for the partition's end and cleaner mark.
                row = handle.conn.execute("SELECT next_offset, cleaned_upto FROM partitions WHERE partition=?",
                                          (p,)).fetchone()
                if row is None:
                    raise LogError(f"topic {topic!r} has no partition {p}")
                end = int(row[0]) if end_offsets is None else min(int(row[0]), int(end_offsets.get(p, row[0])))
                start = 0 if start_offsets is None else max(0, int(start_offsets.get(p, 0)))
                marks[p] = (start, end, int(row[1]))
            for p in parts:
                yield from _scan_partition(handle.conn, topic, p, *marks[p], batch_size)
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"scanning topic {topic!r} failed: {exc}") from exc
        finally:
            handle.conn.close()


#: Dirty-tail keys a scan holds in a Python dict (~140 bytes each: ~30 MB at the cap); a bigger
#: tail goes into a temporary SQLite table (bounded memory, spills to disk) probed per row. Both
#: cost about the same per row on a big tail (cache misses either way); the dict wins on small ones.
SCAN_TAIL_DICT_MAX_KEYS = 200_000


def _scan_partition(conn: sqlite3.Connection, topic: str, p: int, start: int, end: int, cleaned_upto: int,
                    batch_size: int) -> Iterator[list[Record]]:
    """One partition of :meth:`EmbeddedLog.scan_compacted`: rows in [start, end) that are the
    last of their key below ``end``.

    A row at offset ``o`` is superseded by a later row ``o' > o`` of its key below ``end``. Rows
    below ``cleaned_upto`` are unique among themselves, so ``o'`` lies in the dirty tail
    ``[max(start, cleaned_upto), end)`` (and ``o' > o >= start``): the tail's ``key -> last
    offset`` decides every row, and with no tail the partition is read as stored. With a tail,
    its keys and last offsets are read first (one pass over the tail, later rows overwriting
    earlier ones in a dict), then every row read is looked up in the dict. A tail of more than
    :data:`SCAN_TAIL_DICT_MAX_KEYS` keys goes into a temporary table instead (the cleaner's own
    first step: ``key -> max(offset)``) and rows are filtered by a NOT EXISTS probe in SQL.
    Measured on 1M keys of ~500 bytes (CPU time, busy shared machine): no tail ~1.25 us per
    record (as before); a 1% tail ~1.65 us (dict); a 25% tail ~3.3 us per record kept (either
    way: the per-row lookup misses the CPU caches). Unkeyed rows (delete topics) are never filtered.

    Concurrency: producers append at or beyond ``end`` (ignored). The cleaner only deletes rows a
    later row of their key supersedes: a deleted row superseded below ``end`` is one we skip
    anyway; one superseded by a row written after the call was its key's latest below ``end``, so
    that key goes missing (the race the port's contract allows). The cleaner moving its mark
    meanwhile changes nothing: the tail was read from the mark taken with ``end``."""
    tail_from = max(start, cleaned_upto)
    table = _table(p)
    sql = f"SELECT offset, key, value, ts FROM {table} WHERE offset >= ? AND offset < ? ORDER BY offset LIMIT ?"
    tail: dict[bytes, int] | None = None
    if tail_from < end:
        tail = _tail_last_offsets(conn, table, tail_from, end)
        if tail is None:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS scan_tail (key BLOB PRIMARY KEY, last INTEGER NOT NULL)"
                         " WITHOUT ROWID")
            conn.execute("DELETE FROM temp.scan_tail")
            conn.execute(f"INSERT INTO temp.scan_tail SELECT key, max(offset) FROM {table} "
                         "WHERE offset >= ? AND offset < ? AND key IS NOT NULL GROUP BY key", (tail_from, end))
            sql = (f"SELECT offset, key, value, ts FROM {table} AS t WHERE offset >= ? AND offset < ? AND NOT EXISTS "
                   "(SELECT 1 FROM temp.scan_tail AS d WHERE d.key = t.key AND d.last > t.offset) "
                   "ORDER BY offset LIMIT ?")
    position = start
    while position < end:
        records, last_read = _read_latest(conn, sql, (position, end, batch_size), topic, p, tail)
        if last_read is None:
            break
        position = last_read + 1  # the last row read, kept or not: filtered rows are never re-read
        if records:
            yield records


def _tail_last_offsets(conn: sqlite3.Connection, table: str, lo: int, hi: int) -> dict[bytes, int] | None:
    """``key -> last offset`` of the keyed rows in [lo, hi), or None past the dict's key cap."""
    last: dict[bytes, int] = {}
    cap = SCAN_TAIL_DICT_MAX_KEYS
    position = lo
    while position < hi:
        rows = conn.execute(f"SELECT offset, key FROM {table} WHERE offset >= ? AND offset < ? ORDER BY offset "
                            "LIMIT 100000", (position, hi)).fetchall()
        if not rows:
            break
        for o, k in rows:
            if k is not None:
                last[k] = o  # offset order: the last write wins
        if len(last) > cap:
            return None
        position = rows[-1][0] + 1
    return last


def _read_latest(conn: sqlite3.Connection, sql: str, params: tuple[int, ...], topic: str, partition: int,
                 tail: dict[bytes, int] | None) -> tuple[list[Record], int | None]:
    """``_read``, keeping only the rows ``tail`` does not supersede (all of them when None);
    also returns the offset of the last row read (None when there was none)."""
    if tail is None:
        records = _read(conn, sql, params, topic, partition)
        return records, (records[-1].offset if records else None)
    paused = gc.isenabled()  # see _read
    if paused:
        gc.disable()
    try:
        rows = conn.execute(sql, params).fetchall()
        if not rows:
            return [], None
        out: list[Record] = []
        append = out.append
        get = tail.get
        for o, k, v, t in rows:
            if k is not None and get(k, o) > o:
                continue  # a later record of this key lies below the end
            r = _new(Record)
            _set(r, "__dict__", {"topic": topic, "partition": partition, "offset": o, "key": k, "value": v,
                                 "timestamp_ms": t})
            append(r)
        return out, rows[-1][0]
    finally:
        if paused:
            gc.enable()


def _expired_prefix(rows: list[tuple[int, int]], cutoff: int) -> list[tuple[int, int]]:
    """The leading (offset, ts) rows older than ``cutoff``."""
    out = []
    for row in rows:
        if row[1] >= cutoff:
            break
        out.append(row)
    return out


def _clean_compacted(conn: sqlite3.Connection, p: int, tombstone_cutoff: int, min_dirty_ratio: float) -> int:
    """Kafka's log cleaner on one partition: when the records written since the last pass (the
    dirty tail) are at least ``min_dirty_ratio`` of the partition, delete every record that a
    later record of the same key supersedes, then tombstones older than ``tombstone_cutoff``.

    The dirty tail's keys and their last offsets go into a temporary table (a read: producers go
    on appending); deletes then run over the partition in offset ranges, one short write
    transaction each, so producers wait at most one chunk and readers never wait."""
    table = _table(p)
    next_offset, cleaned_upto, clean_rows = conn.execute(
        "SELECT next_offset, cleaned_upto, clean_rows FROM partitions WHERE partition=?", (p,)).fetchone()
    end = int(next_offset)
    dirty = end - cleaned_upto
    removed = 0
    if dirty > 0 and dirty >= min_dirty_ratio * (clean_rows + dirty):
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS dirty_keys (key BLOB PRIMARY KEY, last INTEGER NOT NULL)"
                     " WITHOUT ROWID")
        conn.execute("DELETE FROM temp.dirty_keys")
        conn.execute(f"INSERT INTO temp.dirty_keys SELECT key, max(offset) FROM {table} "
                     "WHERE offset >= ? AND offset < ? GROUP BY key", (cleaned_upto, end))
        position = _begin_offset(conn, p)
        while position < end:
            upper = min(end, position + 4 * _CHUNK)
            with _write_transaction(conn):
                cur = conn.execute(
                    f"DELETE FROM {table} WHERE offset >= ? AND offset < ? AND EXISTS (SELECT 1 FROM "
                    f"temp.dirty_keys AS d WHERE d.key = {table}.key AND d.last > {table}.offset)", (position, upper))
                removed += max(cur.rowcount, 0)
            position = upper
        conn.execute("DELETE FROM temp.dirty_keys")
        # Two processes may clean at once (deletes are idempotent); never move the mark back.
        conn.execute("UPDATE partitions SET cleaned_upto=max(cleaned_upto, ?), clean_rows=max(0, ? - ?) "
                     "WHERE partition=?", (end, clean_rows + dirty, removed, p))
    # Tombstones in the cleaned range are the latest of their key there: drop the old ones, judged
    # like Kafka by when they were written (the append time of the batch holding the offset: the
    # time_index row with the greatest first_offset at or before it), not by the message timestamp,
    # which a producer may set to any past time. Rows without an append time (files written before
    # the column existed) fall back to the message timestamp.
    cleaned = conn.execute("SELECT cleaned_upto FROM partitions WHERE partition=?", (p,)).fetchone()[0]
    while True:
        with _write_transaction(conn):
            cur = conn.execute(f"DELETE FROM {table} WHERE offset IN (SELECT t.offset FROM {table} AS t "
                               "WHERE t.offset < ? AND t.value IS NULL AND coalesce((SELECT i.append_ms FROM "
                               "time_index AS i WHERE i.partition = ? AND i.first_offset <= t.offset "
                               "ORDER BY i.first_offset DESC LIMIT 1), t.ts) <= ? LIMIT ?)",
                               (cleaned, p, tombstone_cutoff, _CHUNK))
            count = max(cur.rowcount, 0)
            conn.execute("UPDATE partitions SET clean_rows=max(0, clean_rows - ?) WHERE partition=?", (count, p))
        removed += count
        if count < _CHUNK:
            break
    if removed:
        _prune_time_index(conn, p)
    return removed


def _prune_time_index(conn: sqlite3.Connection, p: int) -> None:
    """Drop the time index rows of batches that have no live record left (a compacted topic
    writes one row per batch and would otherwise keep them all).

    ``seek_to_time`` stays exact: it takes the first row (in offset order) whose running max
    timestamp reaches the target and scans the partition from its first offset. Every row kept
    still covers a live record, and a dropped row only covered deleted offsets, so the first kept
    row reaching the target starts at or before the first *live* record with ts >= target (all
    earlier live records sit in kept rows whose running max is below the target). A live record's
    own batch row is never dropped, so its append time stays known for tombstone retention. Each
    transaction checks at most ``_CHUNK`` rows, one primary-key probe each."""
    table = _table(p)
    position = -1
    while True:
        row = conn.execute("SELECT first_offset FROM time_index WHERE partition=? AND first_offset > ? "
                           "ORDER BY first_offset LIMIT 1 OFFSET ?", (p, position, _CHUNK)).fetchone()
        upper = None if row is None else int(row[0])
        with _write_transaction(conn):
            conn.execute(f"DELETE FROM time_index WHERE partition = ? AND first_offset > ? AND first_offset < ? "
                         f"AND NOT EXISTS (SELECT 1 FROM {table} WHERE offset >= time_index.first_offset "
                         "AND offset <= time_index.last_offset)", (p, position, 2**63 - 1 if upper is None else upper))
        if upper is None:
            return
        position = upper - 1


@contextlib.contextmanager
def _cleaner_lease(path: Path, wait: bool) -> Iterator[bool]:
    """The topic's cleaner lease, an exclusive ``flock`` on a file beside the database: yields
    whether it is held (``wait``: block until it is). Every producer starts a background pass per
    interval, and the consumers of a group start theirs at about the same time; without the lease
    a second pass overlapping the first redoes its dirty-key table and delete scans (deletes are
    idempotent, so it was only wasted CPU). A pass that finds the lease taken skips: the holder is
    cleaning. The kernel drops the lock with its holder, so a killed cleaner never blocks the next."""
    fd = os.open(path.with_name(f".{path.name}.cleaner-lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _maintain(handle: _Topic, tombstone_retention_ms: int, budget_rows: int | None,
              busy_timeout_ms: int, force: bool = False) -> int:
    """One cleaner pass; returns the number of records removed. Chunked: each transaction removes
    at most ``_CHUNK`` rows. ``budget_rows`` bounds retention work (None: until done); ``force``
    cleans compacted partitions whatever their dirty ratio."""
    conn, spec = handle.conn, handle.spec
    removed = 0
    now = _now_ms()
    reserve = 0 if force else _refill_reserve(conn, spec)
    for p in range(spec.partitions):
        table = _table(p)
        if spec.cleanup_policy == "delete" and spec.retention_ms is not None:
            cutoff = now - spec.retention_ms
            # Kafka-like prefix deletion: drop the oldest records while they are past retention.
            while budget_rows is None or removed < budget_rows:
                rows = conn.execute(f"SELECT offset, ts FROM {table} ORDER BY offset LIMIT ?", (_CHUNK,)).fetchall()
                expired = _expired_prefix(rows, cutoff)
                if not expired:
                    break
                with _write_transaction(conn):
                    conn.execute(f"DELETE FROM {table} WHERE offset <= ?", (expired[-1][0],))
                    conn.execute("DELETE FROM time_index WHERE partition = ? AND last_offset <= ?",
                                 (p, expired[-1][0]))
                removed += len(expired)
                if len(expired) < len(rows):
                    break
        elif spec.cleanup_policy == "compact":
            ratio = DEFAULT_MIN_CLEANABLE_DIRTY_RATIO if spec.min_cleanable_dirty_ratio is None \
                else spec.min_cleanable_dirty_ratio
            removed += _clean_compacted(conn, p, now - tombstone_retention_ms, 0.0 if force else ratio)
    page_count = conn.execute("PRAGMA page_count").fetchone()[0]
    excess = conn.execute("PRAGMA freelist_count").fetchone()[0] - reserve
    if excess > 64 and excess * 4 > page_count:
        while excess > 0:
            # short steps: producers get the lock in between (never 0: that would mean "all")
            conn.execute(f"PRAGMA incremental_vacuum({min(2000, excess)})")
            excess = conn.execute("PRAGMA freelist_count").fetchone()[0] - reserve
    _checkpoint(conn, busy_timeout_ms)
    return removed


def _refill_reserve(conn: sqlite3.Connection, spec: TopicSpec) -> int:
    """Free pages a background pass keeps for the appends to come: about as many as the records
    written since the last pass (the dirty tails) fill. ``incremental_vacuum`` gives pages back by
    moving live pages from the end of the file into free ones, and under steady traffic the next
    interval's appends would grow the file by as much again: measured ~2 us per produced record
    (~40% of the cleaner's CPU) for no lasting gain. When traffic drops, the next pass sees no
    dirty tail and gives everything back; :meth:`EmbeddedLog.compact` always does."""
    if spec.cleanup_policy != "compact":
        return 0
    dirty = total = 0
    for next_offset, cleaned_upto, clean_rows in conn.execute(
            "SELECT next_offset, cleaned_upto, clean_rows FROM partitions").fetchall():
        tail = max(0, int(next_offset) - int(cleaned_upto))
        dirty += tail
        total += int(clean_rows) + tail
    if not dirty:
        return 0
    used = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(used * dirty / total)


def _checkpoint(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Copy the WAL into the database file (which truncates it after a vacuum) and shrink the WAL.

    TRUNCATE waits for readers on older snapshots while holding the write lock, so it gets a
    short busy timeout: readers (one short transaction per poll) are never blocked, producers at
    most ~100 ms, and if a reader keeps an old snapshot the next pass finishes the job."""
    conn.execute("PRAGMA busy_timeout=100")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.OperationalError:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


_Row = tuple[int, bytes | None, bytes | None, int]  # offset, key, value, ts: a partition table's row


def _place_messages(spec: TopicSpec, messages: Sequence[Message], next_offsets: list[int],
                    rr: Iterator[int]) -> tuple[list[list[_Row]], list[tuple[int, int]]]:
    """Partition and number ``messages`` (advancing ``next_offsets``): each partition's rows and
    the (partition, offset) of every message. Raises LogError on a bad partition or a missing key."""
    n = spec.partitions
    compact = spec.cleanup_policy == "compact"
    now = _now_ms()
    by_partition: list[list[_Row]] = [[] for _ in range(n)]
    acks: list[tuple[int, int]] = []
    ack = acks.append
    for i, m in enumerate(messages):
        p = m.partition
        key = m.key
        if p is None:
            p = crc32(key) % n if key is not None else next(rr) % n  # == partition_for(key, n)
        elif not 0 <= p < n:
            raise LogError(f"topic {spec.name!r} has {n} partitions; message {i} asks for partition {p}")
        if key is None and compact:
            raise LogError(f"topic {spec.name!r} is compacted: message {i} has no key")
        offset = next_offsets[p]
        next_offsets[p] = offset + 1
        ts = m.timestamp_ms
        by_partition[p].append((offset, key, m.value, now if ts is None else ts))
        ack((p, offset))
    return by_partition, acks


def _place_rows(spec: TopicSpec, rows: Sequence[tuple[bytes | None, bytes | None, int | None]],
                next_offsets: list[int], rr: Iterator[int]) -> tuple[list[list[_Row]], list[tuple[int, int]]]:
    """:func:`_place_messages` for ``(key, value, timestamp_ms)`` rows (placed by key): the
    stream's path, with no attribute lookups nor partition checks per row."""
    n = spec.partitions
    now = _now_ms()
    if spec.cleanup_policy == "compact":
        for i, row in enumerate(rows):
            if row[0] is None:
                raise LogError(f"topic {spec.name!r} is compacted: message {i} has no key")
    by_partition: list[list[_Row]] = [[] for _ in range(n)]
    appenders = [part.append for part in by_partition]
    acks: list[tuple[int, int]] = []
    ack = acks.append
    for key, value, ts in rows:
        p = crc32(key) % n if key is not None else next(rr) % n  # == partition_for(key, n)
        offset = next_offsets[p]
        next_offsets[p] = offset + 1
        appenders[p]((offset, key, value, now if ts is None else ts))
        ack((p, offset))
    return by_partition, acks


class EmbeddedProducer(Producer):
    """Appends batches; one transaction per (topic, batch). Thread-safe."""

    def __init__(self, log: EmbeddedLog) -> None:
        self._log = log
        self._topics: dict[str, _Topic] = {}
        self._round_robin: dict[str, itertools.count] = {}
        self._last_maintenance: dict[str, float] = {}
        self._cleaners: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _topic(self, name: str) -> _Topic:
        handle = self._topics.get(name)
        if handle is None:
            handle = self._topics[name] = self._log._store.open_topic(name)
            self._last_maintenance[name] = time.monotonic()
        return handle

    def send_batch(self, topic: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
        if not messages:
            return []
        return self._send(topic, messages, None)

    def send_rows(self, topic: str, rows: Sequence[tuple[bytes | None, bytes | None, int | None]]
                  ) -> list[tuple[int, int]]:
        if not rows:
            return []
        return self._send(topic, None, rows)

    def _send(self, topic: str, messages: Sequence[Message] | None,
              rows: Sequence[tuple[bytes | None, bytes | None, int | None]] | None) -> list[tuple[int, int]]:
        with self._lock:
            if self._closed:
                raise LogError("producer is closed")
            handle = self._topic(topic)
            paused = gc.isenabled()  # see _read: no cycles here, and it saves a collection per 700 rows
            if paused:
                gc.disable()
            try:
                result = self._append(handle, topic, messages, rows)
            finally:
                if paused:
                    gc.enable()
            if time.monotonic() - self._last_maintenance[topic] >= self._log.maintenance_interval_s:
                self._last_maintenance[topic] = time.monotonic()
                self._start_cleaner(topic)
            return result

    def _start_cleaner(self, topic: str) -> None:
        """Run the cleaner on its own connection in a background thread: a pass over a big
        partition takes seconds, which must not stall ``send_batch`` (sqlite3 releases the GIL
        while SQLite works). Best effort: the batches are acknowledged already."""
        running = self._cleaners.get(topic)
        if running is not None and running.is_alive():
            return
        log = self._log

        def clean() -> None:
            try:
                handle = log._store.open_topic(topic)
            except LogError:
                return
            try:
                with _cleaner_lease(handle.path, wait=False) as leased:
                    if leased:
                        _maintain(handle, log.tombstone_retention_ms, budget_rows=None,
                                  busy_timeout_ms=log._store.busy_timeout_ms)
            except (sqlite3.Error, OSError) as exc:
                _logger.warning("cleaning topic %r failed (will retry): %s", topic, exc)
            finally:
                handle.conn.close()

        thread = threading.Thread(target=clean, name=f"log-cleaner-{topic}", daemon=True)
        self._cleaners[topic] = thread
        thread.start()

    def _append(self, handle: _Topic, topic: str, messages: Sequence[Message] | None,
                rows: Sequence[tuple[bytes | None, bytes | None, int | None]] | None) -> list[tuple[int, int]]:
        # Hot path (150k+ msgs/s): one pass over the messages inside the write transaction,
        # placing, numbering and building rows at once; then one executemany per partition.
        n = handle.spec.partitions
        rr = self._round_robin.get(topic)
        if rr is None:
            rr = self._round_robin[topic] = itertools.count()
        conn = handle.conn
        count = len(rows) if rows is not None else len(messages or ())
        try:
            with _write_transaction(conn):
                appended = _now_ms()  # write time, once we hold the lock: what tombstone retention judges by
                next_offsets = [0] * n
                for p, next_offset in conn.execute("SELECT partition, next_offset FROM partitions").fetchall():
                    next_offsets[p] = next_offset
                if rows is None:
                    assert messages is not None
                    by_partition, acks = _place_messages(handle.spec, messages, next_offsets, rr)
                else:
                    by_partition, acks = _place_rows(handle.spec, rows, next_offsets, rr)
                for p, part_rows in enumerate(by_partition):
                    if not part_rows:
                        continue
                    conn.executemany(f"INSERT INTO {_table(p)} (offset, key, value, ts) VALUES (?, ?, ?, ?)",
                                     part_rows)
                    first, last = part_rows[0][0], part_rows[-1][0]
                    batch_max = max(map(_ts_of, part_rows))
                    conn.execute("UPDATE partitions SET next_offset=?, max_ts=max(max_ts, ?) WHERE partition=?",
                                 (last + 1, batch_max, p))
                    conn.execute("INSERT INTO time_index (partition, first_offset, last_offset, max_ts, append_ms) "
                                 "SELECT ?, ?, ?, max_ts, ? FROM partitions WHERE partition=?",
                                 (p, first, last, appended, p))
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"writing {count} messages to {topic!r} failed: {exc}") from exc
        return acks

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for handle in self._topics.values():
                handle.conn.close()
            self._topics.clear()


class EmbeddedConsumer(Consumer):
    """Reads assigned partitions straight from the topic files. One thread per consumer."""

    def __init__(self, log: EmbeddedLog, group_id: str | None, auto_offset_reset: str) -> None:
        self._log = log
        self._group_id = group_id
        self._reset = auto_offset_reset
        self._topics: dict[str, _Topic] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._order: list[TopicPartition] = []
        self._next = 0  # round-robin start among assigned partitions
        self._groups: sqlite3.Connection | None = None

    # -- plumbing ----------------------------------------------------------------------------
    def _topic(self, name: str) -> _Topic:
        handle = self._topics.get(name)
        if handle is None:
            handle = self._topics[name] = self._log._store.open_topic(name)
        return handle

    def _check(self, tp: TopicPartition) -> _Topic:
        handle = self._topic(tp.topic)
        if not 0 <= tp.partition < handle.spec.partitions:
            raise LogError(f"topic {tp.topic!r} has no partition {tp.partition}")
        return handle

    def _groups_conn(self) -> sqlite3.Connection:
        if self._groups is None:
            self._groups = self._log._store.connect_groups()
        return self._groups

    def _require_assigned(self, tp: TopicPartition) -> None:
        if tp not in self._positions:
            raise LogError(f"{tp} is not assigned to this consumer")

    def _targets(self, partitions: Iterable[TopicPartition] | None) -> list[TopicPartition]:
        targets = list(self._order) if partitions is None else [TopicPartition(*tp) for tp in partitions]
        for tp in targets:
            self._require_assigned(tp)
        return targets

    # -- assignment --------------------------------------------------------------------------
    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        wanted = list(dict.fromkeys(TopicPartition(*tp) for tp in partitions))
        for tp in wanted:
            self._check(tp)
        try:
            positions: dict[TopicPartition, int] = {}
            for tp in wanted:
                if tp in self._positions:
                    positions[tp] = self._positions[tp]
                    continue
                committed = self.committed(tp) if self._group_id is not None else None
                conn = self._topic(tp.topic).conn
                if committed is not None:
                    positions[tp] = committed
                elif self._reset == "earliest":
                    positions[tp] = _begin_offset(conn, tp.partition)
                else:
                    positions[tp] = _end_offset(conn, tp.partition)
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"assigning {wanted} failed: {exc}") from exc
        self._positions = positions
        self._order = wanted
        self._next = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self._order)

    # -- reading -----------------------------------------------------------------------------
    def poll(self, max_records: int = 500, timeout_ms: int = 0) -> list[Record]:
        deadline = time.monotonic() + timeout_ms / 1000
        delay = 0.002
        while True:
            records = self._poll_once(max_records)
            if records or not self._order:
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return records
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def _poll_once(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        count = len(self._order)
        try:
            for i in range(count):
                if len(out) >= max_records:
                    break
                tp = self._order[(self._next + i) % count]
                conn = self._topic(tp.topic).conn
                records = _read(conn, f"SELECT offset, key, value, ts FROM {_table(tp.partition)} WHERE offset >= ? "
                                "ORDER BY offset LIMIT ?", (self._positions[tp], max_records - len(out)), *tp)
                if records:
                    out.extend(records)
                    self._positions[tp] = records[-1].offset + 1
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"reading failed: {exc}") from exc
        if count:
            self._next = (self._next + 1) % count  # fairness: next poll starts at another partition
        return out

    # -- positions ---------------------------------------------------------------------------
    def seek(self, tp: TopicPartition, offset: int) -> None:
        tp = TopicPartition(*tp)
        self._require_assigned(tp)
        begin = self.beginning_offsets([tp])[tp]
        end = self.end_offsets([tp])[tp]
        self._positions[tp] = min(max(int(offset), begin), end)

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        targets = self._targets(partitions)
        self._positions.update(self.beginning_offsets(targets))

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        targets = self._targets(partitions)
        self._positions.update(self.end_offsets(targets))

    def seek_to_time(self, timestamp_ms: int, partitions: Iterable[TopicPartition] | None = None) -> None:
        for tp in self._targets(partitions):
            self._positions[tp] = self._offset_for_time(tp, int(timestamp_ms))

    def _offset_for_time(self, tp: TopicPartition, timestamp_ms: int) -> int:
        conn = self._topic(tp.topic).conn
        table = _table(tp.partition)
        try:
            # The time index's max_ts is a running maximum, so the first batch whose max_ts reaches
            # the target contains the first record (in offset order) with ts >= target.
            row = conn.execute("SELECT first_offset FROM time_index WHERE partition=? AND max_ts >= ? "
                               "ORDER BY max_ts, first_offset LIMIT 1", (tp.partition, timestamp_ms)).fetchone()
            if row is None:
                return _end_offset(conn, tp.partition)
            found = conn.execute(f"SELECT offset FROM {table} WHERE offset >= ? AND ts >= ? ORDER BY offset LIMIT 1",
                                 (row[0], timestamp_ms)).fetchone()
            return _end_offset(conn, tp.partition) if found is None else int(found[0])
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"seek_to_time on {tp} failed: {exc}") from exc

    def position(self, tp: TopicPartition) -> int:
        tp = TopicPartition(*tp)
        self._require_assigned(tp)
        return self._positions[tp]

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        try:
            return {TopicPartition(*tp): _begin_offset(self._check(TopicPartition(*tp)).conn, tp[1])
                    for tp in partitions}
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"reading offsets failed: {exc}") from exc

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        try:
            return {TopicPartition(*tp): _end_offset(self._check(TopicPartition(*tp)).conn, tp[1])
                    for tp in partitions}
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"reading offsets failed: {exc}") from exc

    # -- group offsets -----------------------------------------------------------------------
    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self._group_id is None:
            raise LogError("commit needs a consumer with a group_id")
        items = dict(self._positions) if offsets is None else {TopicPartition(*tp): int(o) for tp, o in offsets.items()}
        if not items:
            return
        for tp in items:
            self._check(tp)
        conn = self._groups_conn()
        now = _now_ms()
        try:
            with _write_transaction(conn):
                conn.executemany(
                    "INSERT INTO offsets VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id, topic, partition) "
                    "DO UPDATE SET next_offset=excluded.next_offset, updated_ms=excluded.updated_ms",
                    [(self._group_id, tp.topic, tp.partition, o, now) for tp, o in items.items()])
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"committing offsets of group {self._group_id!r} failed: {exc}") from exc

    def committed(self, tp: TopicPartition) -> int | None:
        if self._group_id is None:
            return None
        tp = TopicPartition(*tp)
        try:
            row = self._groups_conn().execute(
                "SELECT next_offset FROM offsets WHERE group_id=? AND topic=? AND partition=?",
                (self._group_id, tp.topic, tp.partition)).fetchone()
        except sqlite3.Error as exc:
            raise LogUnavailableError(f"reading committed offsets failed: {exc}") from exc
        return None if row is None else int(row[0])

    def close(self) -> None:
        for handle in self._topics.values():
            handle.conn.close()
        self._topics.clear()
        if self._groups is not None:
            self._groups.close()
            self._groups = None

