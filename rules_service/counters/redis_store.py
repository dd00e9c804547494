"""The counter store in Redis (key scheme: :mod:`rules_service.counters.keys`).

Writes
------
:meth:`RedisCounters.apply` uses native commands only (no Lua: the script's ARGV table, tonumber,
string.format and unpack were ~1/3 of its Redis CPU), in two round trips:

1. a native multi-element ``PFADD`` per HyperLogLog key (idempotent, so outside the exactly-once
   check: a batch sent again after a crash adds the same users again, which changes nothing),
   ``EXPIREAT`` for the new sketches, then ``WATCH`` of the batch's partitions' fence keys
   (``o:<consumer>|<topic>:<partition>``, see ``keys``) and ``HMGET`` of their offsets in the
   consumer's offsets hash (field ``<topic>:<partition>`` -> next offset). If any stored offset is
   beyond its start offset (compared exactly, as integers) the batch was already applied:
   ``UNWATCH``, nothing is counted, ``apply`` returns False. If one is behind the offset this object
   stored there last, the store lost acknowledged writes (a restore, a lagging replica, the AOF's
   last second): nothing is written and :class:`CountersRolledBackError` says so (the stream
   rewinds to the stored offsets and counts those records again).
2. ``MULTI``, one ``HINCRBY`` per hash field (``encode_batch`` merges buckets naming the same
   field), ``EXPIREAT`` of the new hashes (after their HINCRBYs: EXPIREAT on a missing key does
   nothing), ``HSET`` of the new offsets and ``MSET`` of their fences, ``EXEC``. ``EXEC`` answers
   nil when a fence changed since the WATCH: another writer of the same partition came in between,
   so the check is run again and the transaction re-sent (``retries`` counts them;
   :data:`MAX_ATTEMPTS` in a row raise WatchError). Writers of other partitions of the same
   consumer (the stream's processes) touch other fences and do not interfere.

A batch without start offsets is not checked: everything goes in one round trip. MULTI/EXEC is
atomic on the server and written to the AOF as one block (a truncated block is dropped on load),
and a connection dropped before EXEC discards the queued commands: counts and offsets never
disagree, so a worker killed at any moment resumes from the stored offsets and counts every bid
exactly once (its users may have been added already: harmless). Not Redis Cluster safe (one
transaction over many rules' hash tags and the offsets hash), as the script was not. A command
failing inside EXEC (WRONGTYPE: a foreign value under a counter's key) does not roll the others
back: the offsets and the other counts are committed, and ``apply`` raises
:class:`PartiallyAppliedError` naming the keys whose counts were lost (the script stopped at the
error with earlier hashes written and no offsets, so a retry counted those hashes twice).

Deadlines are fixed by the bucket (see ``keys``), so setting one again is harmless; but an
``EXPIREAT`` per key per batch cost as much Redis CPU as the increments. So each client remembers
the keys it has given their deadline (after the reply confirmed it) and sends ``EXPIREAT`` only for
keys it has not seen, forgetting them every :data:`DEADLINES_MEMORY_S` seconds (a key deleted and
re-created meanwhile, e.g. by ``delete_rule``, gets its deadline back at its next write after
that). A restarted worker starts with an empty memory, so a sketch PFADDed just before a crash
gets its deadline from the re-sent batch even when its counts are skipped.

Replies of known shape (``:0``/``:1`` of PFADD and EXPIREAT, ``+QUEUED`` of each queued command)
are read from the socket in one piece and compared as bytes (through redis-py's parser they cost
~0.6 us each, ~50 per bid); anything unexpected is handed back to the parser, which raises it.

Sketch members are not the user ids themselves but the 8-byte BLAKE2b digest of each id: the
sketch only needs a stable identity per user (PFADD hashes it again), and 8 bytes instead of a
36-character id cut the bytes sent, parsed and hashed per (user, rule) pair by ~3x. Collisions are
negligible (~n^2 / 2^65). Every sketch is written through this class, so all of them agree.

Encoding: the commands are packed here as RESP (no per-argument work in redis-py); a member's
bulk string is cached per client, so a user matched by 50 rules is encoded once, and a bucket's
key, deadline and field bulks are computed once per client. The per-entry loops run in C when
``rules_service.counters._encode`` is built (``_encode.c``: members found by object identity,
every HINCRBY written into one body; ~2.5x less CPU on a stream window), reading and filling the
same caches; the Python code stays the reference (``USE_C = False`` forces it) and takes over any
batch outside the C code's shape (non-int or negative counts, dimension days not at midnight...).

Reads
-----
Every read is one pipeline round trip. Ranges are widened to whole hours (``start`` floored,
``end`` ceiled). Whole days inside the range use the day buckets, the partial days at its edges
use hour buckets, except days older than the hour retention, whose hour buckets have expired:
those use the whole day (the range is rounded outward to days there).
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any, NamedTuple, TypeVar

import redis

from rules_service.counters import keys
from rules_service.counters.aggregate import _aggregate as _aggregate_module
from rules_service.counters.keys import DAY, HOUR
from rules_service.counters.port import CounterBatch, Counters, CountersRolledBackError, Granularity, SeriesPoint

__all__ = ["EncodedBatch", "PartiallyAppliedError", "RedisCounters"]

_K = TypeVar("_K")
_V = TypeVar("_V")



#: The C loop packing sketch members (rules_service/counters/_aggregate.c), None when not built.
_pack_members: Any = getattr(_aggregate_module, "pack_members", None)


def _load_encode() -> Any:
    """The C twin of encode_batch's loops (rules_service/counters/_encode.c), if built."""
    try:
        from rules_service.counters import _encode as module  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # pragma: no cover - not built
        return None
    return module


#: The C encoder, None when not built (tests set it to None to run the pack_members path).
_encode: Any = _load_encode()

#: Encode in C when it is built (tests set this to False for the Python reference).
USE_C = True

def _bulk(value: str | bytes) -> bytes:
    """One RESP bulk string."""
    raw = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


class _SketchMembers(dict[str, bytes]):
    """user id -> the RESP bulk string of its sketch member: the 8-byte BLAKE2b digest of the id
    (see the module docstring), computed on first use."""

    def __missing__(self, user_id: str) -> bytes:
        if len(self) >= 500_000:
            self.clear()
        bulk = self[user_id] = b"$8\r\n" + blake2b(user_id.encode(), digest_size=8).digest() + b"\r\n"
        return bulk


class _FieldBulks(dict[str, bytes]):
    """value -> the RESP bulk string of the dimensions-hash field ``<dimension>=<value>``."""

    def __init__(self, dimension: str) -> None:
        super().__init__()
        self.dimension = dimension

    def __missing__(self, value: str) -> bytes:
        if len(self) >= 100_000:
            self.clear()
        bulk = self[value] = _bulk(keys.dimension_field(self.dimension, value))
        return bulk


class _Heads(dict[_K, _V]):
    """A bounded cache (cleared when full: buckets move on with time)."""

    LIMIT = 200_000

    def add(self, key: _K, value: _V) -> _V:
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = value
        return value


#: RESP bulk strings of small counts (a batch's increments are mostly small).
_COUNT_BULKS = [_bulk(str(n)) for n in range(4096)]

_HINCRBY = b"*4\r\n$7\r\nHINCRBY\r\n"
_EXPIREAT = b"*3\r\n$8\r\nEXPIREAT\r\n"
_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
_UNWATCH = b"*1\r\n$7\r\nUNWATCH\r\n"
_QUEUED = b"+QUEUED\r\n"

#: Attempts of one apply whose transaction is aborted by a concurrent write of the offsets hash
#: (another process of the same consumer name writing its partitions) before giving up.
MAX_ATTEMPTS = 50

#: Seconds after which the deadlines known to be set are forgotten (see ``RedisCounters``).
DEADLINES_MEMORY_S = 300.0


class PartiallyAppliedError(redis.exceptions.ResponseError):
    """EXEC ran but some of its commands failed (e.g. WRONGTYPE: a key of a counter's name holds
    another type). A transaction is not rolled back: the batch's offsets and its other counts are
    committed (each counted once; a retry of the batch returns False), the failed commands' counts
    are lost. Raised rather than returned so the loss is never silent; ``failures`` lists
    (key, error message) of each failed command."""

    def __init__(self, consumer: str, failures: list[tuple[str, str]]) -> None:
        self.failures = failures
        shown = "; ".join(f"{key}: {message}" for key, message in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(
            f"batch of {consumer!r} committed with {len(failures)} failed command(s), their counts lost "
            f"(offsets stored: do not expect a retry to write them): {shown}{more}")


def _command_keys(packed: bytes) -> list[str]:
    """The key (first argument) of each RESP command in ``packed`` (only read on the error path)."""
    out: list[str] = []
    pos = 0
    while pos < len(packed):
        end = packed.index(b"\r\n", pos)
        n_args = int(packed[pos + 1:end])
        pos = end + 2
        args: list[bytes] = []
        for _ in range(n_args):
            end = packed.index(b"\r\n", pos)
            size = int(packed[pos + 1:end])
            args.append(packed[end + 2:end + 2 + size])
            pos = end + 2 + size + 2
        out.append(args[1].decode(errors="replace") if len(args) > 1 else "")
    return out


def _count_bulk(count: int) -> bytes:
    if count < 0:
        raise ValueError(f"negative count {count}")
    return _COUNT_BULKS[count] if count < 4096 else _bulk(str(count))


def _cutoff(now: float) -> int | None:
    """The integer ``c`` with ``deadline <= now`` <=> ``deadline <= c`` for every int deadline (C's
    comparison), or None when ``now`` is not a finite number in 62 bits."""
    if type(now) is int:
        cutoff = now
    elif type(now) is float and math.isfinite(now):
        cutoff = math.floor(now)
    else:
        return None
    return cutoff if -(2**62) < cutoff < 2**62 else None


def _floor_dimension_days(
    dimensions: Mapping[tuple[str, int, str], Mapping[str, int]],
) -> dict[tuple[str, int, str], dict[str, int]]:
    """``CounterBatch.dimensions`` with every day floored to its UTC midnight (merging counts)."""
    out: dict[tuple[str, int, str], dict[str, int]] = {}
    for (rid, day, dimension), values in dimensions.items():
        target = out.setdefault((rid, day - day % DAY, dimension), {})
        for value, count in values.items():
            target[value] = target.get(value, 0) + count
    return out


class EncodedOffset(NamedTuple):
    """One partition's offsets in a write: its offsets-hash field (``<topic>:<partition>``) and the
    next offset, as text and as RESP bulks, and the batch's start offset (None: not checked)."""

    field: str
    field_bulk: bytes
    start: int | None
    next_offset: int
    next_bulk: bytes


@dataclass
class EncodedBatch:
    """One batch as packed RESP commands (see the module docstring).

    ``pfadds``: one PFADD per sketch; ``sketch_expires``: ``EXPIREAT key deadline`` for the
    ``n_sketch_expires`` sketches whose deadline this client has not seen set; ``body``: the
    transaction's ``n_body`` commands (one HINCRBY per field, EXPIREAT per hash not known to
    have its deadline); ``offsets``: one :class:`EncodedOffset` per partition;
    ``deadlines``: key bulk -> deadline of every EXPIREAT sent, remembered once it succeeded.
    """

    pfadds: list[bytes]
    sketch_expires: bytes
    n_sketch_expires: int
    body: bytes
    n_body: int
    offsets: list[EncodedOffset]
    sketch_deadlines: dict[bytes, int]
    hash_deadlines: dict[bytes, int]

    def __len__(self) -> int:
        return sum(map(len, self.pfadds)) + len(self.sketch_expires) + len(self.body)


def _epoch(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


def _hour_range(start: datetime, end: datetime) -> tuple[int, int]:
    """[start, end) widened to whole hours, as epoch seconds."""
    s, e = _epoch(start), _epoch(end)
    if end.microsecond:
        e += 1  # ceil sub-second ends
    s -= s % HOUR
    e = e if e % HOUR == 0 else e - e % HOUR + HOUR
    return s, max(s, e)


def _utc(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _int(raw: Any) -> int:
    return int(raw) if raw is not None else 0


def _beyond(stored: int, start: int) -> bool:
    """A stored offset beyond a batch's start offset: the batch was applied already."""
    return stored > start


def _raw_reader(conn: Any) -> Any:
    """The hiredis reader of a redis-py connection when its socket can be read directly (nothing
    buffered), else None: replies of known bytes are then skipped in bulk instead of parsed one
    by one (~0.6 us each through ``read_response``, 50 per bid)."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    sock = getattr(conn, "_sock", None)
    if reader is None or not isinstance(sock, socket.socket) or not hasattr(reader, "has_data"):
        return None
    return None if reader.has_data() else reader


@contextlib.contextmanager
def _socket_errors() -> Iterator[None]:
    """Socket errors of a raw read raised as redis-py's own read raises them (callers catch redis'
    TimeoutError and ConnectionError); a closed connection too."""
    try:
        yield
    except TimeoutError as exc:  # socket.timeout
        raise redis.exceptions.TimeoutError("timeout reading from the socket") from exc
    except OSError as exc:
        raise redis.exceptions.ConnectionError(f"error reading from the socket: {exc}") from exc


def _closed() -> redis.exceptions.ConnectionError:
    return redis.exceptions.ConnectionError("connection closed by the server")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes (replies split across recv calls are joined)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    with _socket_errors():
        while got < size:
            n = sock.recv_into(view[got:])
            if not n:
                raise _closed()
            got += n
    return bytes(buf)


def _skim(conn: Any, size: int, matches: Callable[[bytes], bool]) -> bool:
    """Read the next ``size`` bytes of replies raw if they are what ``matches`` expects (True);
    otherwise (or when the socket cannot be read directly) leave them to the parser (False). The
    expected replies are the shortest possible, so an unexpected (error) reply never makes the
    read wait for bytes that are not coming."""
    reader = _raw_reader(conn)
    if reader is None or size == 0:
        return size == 0
    raw = _recv_exactly(conn._sock, size)
    if matches(raw):
        return True
    reader.feed(raw)  # hand everything back, in order, to the parser
    return False


def _read_integers(conn: Any, count: int) -> Exception | None:
    """Read ``count`` replies that should be :0 or :1 (PFADD, EXPIREAT); the first error, if any."""
    if _skim(conn, 4 * count, lambda raw: raw.replace(b":1\r\n", b":0\r\n") == b":0\r\n" * count):
        return None
    first_error: Exception | None = None
    for _ in range(count):
        try:
            conn.read_response()
        except redis.exceptions.ResponseError as exc:
            first_error = first_error or exc
    return first_error


def _read_queued(conn: Any, count: int) -> None:
    """Read the replies of MULTI and of ``count`` queued commands (a queueing error makes EXEC
    fail, which raises there)."""
    expected = b"+OK\r\n" + _QUEUED * count
    if _skim(conn, len(expected), expected.__eq__):
        return
    for _ in range(count + 1):
        with contextlib.suppress(redis.exceptions.ResponseError):  # EXEC answers EXECABORT, naming the cause
            conn.read_response()


def _read_exec(conn: Any, count: int) -> Any:
    """EXEC's reply to ``count`` queued commands that each answer one line (an integer, or an
    error): True when it is ``count`` integers, checked raw (through the parser, a list of ~50,000
    ints cost ~1 us per bid); else the parsed reply (None: the WATCH fired; a list holding the
    errors). Nothing may follow EXEC in the pipeline: the raw read takes whatever arrives."""
    reader = _raw_reader(conn)
    if reader is None:
        return conn.read_response()
    sock = conn._sock
    raw = bytearray()
    lines = -1  # the header line "*<count>" is read first, then one line per reply
    while True:
        part = _recv_some(sock)
        raw += part
        if lines < 0:
            end = raw.find(b"\n")
            if end < 0:
                continue
            if raw[: end + 1] != b"*%d\r\n" % count:  # nil (WATCH), EXECABORT, anything unexpected
                break
            lines = raw.count(b"\n", end + 1)
        else:
            lines += part.count(b"\n")  # integers and error lines hold no \n but their own
        if lines >= count:
            break
    if lines == count and raw.find(b"\n-") < 0:
        return True
    reader.feed(bytes(raw))  # errors or surprises: the parser reads them, in order
    return conn.read_response()


def _recv_some(sock: socket.socket) -> bytes:
    """The next bytes on the socket (at least one)."""
    with _socket_errors():
        data = sock.recv(1 << 20)
    if not data:
        raise _closed()
    return data


class RedisCounters(Counters):
    """:class:`~rules_service.counters.port.Counters` on one Redis server (see the module docstring).

    ``client`` may decode responses or not. ``clock`` (epoch seconds) decides which hour buckets
    are past their retention; tests inject it.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        hour_retention_days: int = 14,
        day_retention_days: int = 400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.hour_retention_s = hour_retention_days * DAY
        self.day_retention_s = day_retention_days * DAY
        self.clock = clock
        self._sketch_members = _SketchMembers()
        self._dimension_fields: dict[str, _FieldBulks] = {}
        # the RESP bulks of a bucket's key and deadline, computed once per bucket: the same rules'
        # buckets come back batch after batch (f-strings, encode and format per key were ~1/3 of
        # encode_batch)
        self._sketch_heads: _Heads[tuple[str, str, int], tuple[bytes, bytes, int]] = _Heads()
        self._match_heads: _Heads[tuple[str, str, int], tuple[bytes, bytes, bytes, int]] = _Heads()
        self._dimension_heads: _Heads[tuple[str, int], tuple[bytes, bytes, int]] = _Heads()
        # key bulk -> deadline of the keys this client has seen get their EXPIREAT (see the module
        # docstring: forgotten every DEADLINES_MEMORY_S, so a key deleted and re-created gets its
        # deadline again)
        self._deadlines_set: _Heads[bytes, int] = _Heads()
        self._deadlines_since = clock()
        #: transactions retried because another writer changed the offsets hash (WATCH)
        self.retries = 0
        # (consumer, offsets field bulk) -> the next offset this object stored there last: stored
        # offsets behind it mean the store lost acknowledged writes (CountersRolledBackError)
        self._last_stored: dict[tuple[str, str], int] = {}

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Any) -> RedisCounters:
        return cls(
            client,
            hour_retention_days=settings.HOUR_RETENTION_DAYS,
            day_retention_days=settings.DAY_RETENTION_DAYS,
        )

    # ------------------------------------------------------------------ writes

    def encode_batch(
        self,
        batch: CounterBatch,
        offsets: Mapping[tuple[str, int], int],
        start_offsets: Mapping[tuple[str, int], int] | None = None,
    ) -> EncodedBatch:
        """The commands of ``batch``'s write (exposed for the benchmark and tests)."""
        encoded_offsets: list[EncodedOffset] = []
        for (topic, partition), next_offset in offsets.items():
            start = None if start_offsets is None else start_offsets.get((topic, partition))
            if next_offset < 0 or (start is not None and start < 0):
                raise ValueError(f"negative offset for {topic}:{partition}")
            field = keys.offset_field(topic, partition)
            encoded_offsets.append(EncodedOffset(field, _bulk(field), None if start is None else int(start),
                                                 int(next_offset), _bulk(str(int(next_offset)))))
        if start_offsets:
            for topic, partition in start_offsets:
                if (topic, partition) not in offsets:
                    raise ValueError(f"start offset for {topic}:{partition} without a next offset")

        now = self.clock()
        known = self._deadlines_set
        if now - self._deadlines_since >= DEADLINES_MEMORY_S:
            known.clear()
            self._deadlines_since = now
        if USE_C and _encode is not None:
            fast = self._encode_in_c(batch, now)
            if fast is not None:
                pfadds, sketch_expires, sketch_deadlines, body, n_body, hash_deadlines = fast
                return EncodedBatch(pfadds, sketch_expires, len(sketch_deadlines), body, n_body, encoded_offsets,
                                    sketch_deadlines, hash_deadlines)
        return self._encode_in_python(batch, now, encoded_offsets)

    def _encode_in_c(self, batch: CounterBatch, now: float) -> tuple[Any, ...] | None:
        """encode_batch's loops in C (``_encode.c``), on the same caches; None when the batch is
        not of the shape the C code handles (then the Python path encodes it)."""
        cutoff = _cutoff(now)
        if cutoff is None:
            return None
        result: tuple[Any, ...] | None = _encode.encode(
            batch.users, batch.matches, batch.dimensions, cutoff, self._deadlines_set,
            self._sketch_heads, self._sketch_head_miss, self._match_heads, self._match_head_miss,
            self._dimension_heads, self._dimension_head_miss, self._sketch_members, self._dimension_fields,
            self._field_cache)
        return result

    def _sketch_head_miss(self, bucket_key: tuple[str, str, int]) -> tuple[bytes, bytes, int]:
        return self._sketch_heads.add(bucket_key, self._sketch_head(*bucket_key))

    def _match_head_miss(self, bucket_key: tuple[str, str, int]) -> tuple[bytes, bytes, bytes, int]:
        return self._match_heads.add(bucket_key, self._match_head(*bucket_key))

    def _dimension_head_miss(self, rid_day: tuple[str, int]) -> tuple[bytes, bytes, int]:
        return self._dimension_heads.add(rid_day, self._dimension_head(*rid_day))

    def _encode_in_python(self, batch: CounterBatch, now: float,
                          encoded_offsets: list[EncodedOffset]) -> EncodedBatch:
        """The reference of encode_batch's loops (the C path must give the same bytes)."""
        known = self._deadlines_set
        # C path: a batch-local cache in front of the client's, so the batch's few thousand users
        # stay in the CPU caches while each is looked up ~100 times (measured: ~4x faster)
        shared = self._sketch_members
        cache: dict[str, bytes] = {}

        def miss(user_id: str) -> bytes:
            bulk = cache[user_id] = shared[user_id]
            return bulk

        sketch_member = shared.__getitem__
        join = b"".join
        pack = _pack_members if USE_C else None
        pfadds: list[bytes] = []
        expires: list[bytes] = []
        sketch_deadlines: dict[bytes, int] = {}
        heads = self._sketch_heads
        for bucket_key, members in batch.users.items():
            if not members:
                continue
            head = heads.get(bucket_key)
            if head is None:
                head = heads.add(bucket_key, self._sketch_head(*bucket_key))
            key_bulk, expire_bulk, deadline = head
            if deadline <= now:  # past its retention (a replay's old hours): Redis would drop it at once
                continue
            body = pack(members, cache, miss) if pack is not None else join(map(sketch_member, members))
            pfadds.append(b"*%d\r\n$5\r\nPFADD\r\n%s%s" % (len(members) + 2, key_bulk, body))
            if key_bulk not in known and key_bulk not in sketch_deadlines:
                sketch_deadlines[key_bulk] = deadline
                expires += (_EXPIREAT, key_bulk, expire_bulk)

        # per hash key bulk: (expireat bulk, deadline, {field bulk: increment}); fields unique
        # within a hash, so one HINCRBY each
        hashes: dict[bytes, tuple[bytes, int, dict[bytes, int]]] = {}
        match_heads, dimension_heads = self._match_heads, self._dimension_heads
        for bucket_key, count in batch.matches.items():
            if not count:
                continue
            match_head = match_heads.get(bucket_key)
            if match_head is None:
                match_head = match_heads.add(bucket_key, self._match_head(*bucket_key))
            key_bulk, expire_bulk, field_bulk, deadline = match_head
            if deadline <= now:
                continue
            entry = hashes.get(key_bulk)
            if entry is None:
                entry = hashes[key_bulk] = (expire_bulk, deadline, {})
            fields = entry[2]
            fields[field_bulk] = fields.get(field_bulk, 0) + count
        dimensions = batch.dimensions
        if any(day % DAY for (_, day, _) in dimensions):  # two buckets of one day would repeat fields
            dimensions = _floor_dimension_days(dimensions)
        for (rid, day, dimension), values in dimensions.items():
            dimension_head = dimension_heads.get((rid, day))
            if dimension_head is None:
                dimension_head = dimension_heads.add((rid, day), self._dimension_head(rid, day))
            if dimension_head[2] <= now:
                continue
            entry = hashes.get(dimension_head[0])
            if entry is None:
                entry = hashes[dimension_head[0]] = (dimension_head[1], dimension_head[2], {})
            # (rid, day, dimension) is unique once days are floored, so its fields are new here; map
            # and zip keep the per-field loop in C
            counts = values.values()
            if 0 in counts:
                values = {value: count for value, count in values.items() if count}
                counts = values.values()
            entry[2].update(zip(map(self._field_bulks(dimension), values), counts, strict=True))

        commands: list[bytes] = []
        n_body = 0
        hash_deadlines: dict[bytes, int] = {}
        count_bulk, small_counts = _count_bulk, _COUNT_BULKS.__getitem__
        for key_bulk, (expire_bulk, deadline, fields) in hashes.items():
            if not fields:
                continue
            # HINCRBY key f1 n1 HINCRBY key f2 n2 ...: the separator joins each field's bulks to the
            # next command's head, all in C
            hincrby = _HINCRBY + key_bulk
            field_counts = fields.values()
            small = 0 <= min(field_counts) and max(field_counts) < len(_COUNT_BULKS)
            commands += (hincrby, hincrby.join(map(bytes.__add__, fields, map(small_counts if small else count_bulk,
                                                                      field_counts))))
            n_body += len(fields)
            if key_bulk not in known:  # after the HINCRBYs: EXPIREAT on a missing key does nothing
                hash_deadlines[key_bulk] = deadline
                commands += (_EXPIREAT, key_bulk, expire_bulk)
                n_body += 1
        return EncodedBatch(pfadds, b"".join(expires), len(sketch_deadlines), b"".join(commands), n_body,
                            encoded_offsets, sketch_deadlines, hash_deadlines)

    def _sketch_head(self, rid: str, granularity: str, bucket: int) -> tuple[bytes, bytes, int]:
        """(key, EXPIREAT bulks, deadline) of a sketch."""
        if granularity == "hour":
            key, deadline = keys.hour_users(rid, bucket), bucket + HOUR + self.hour_retention_s
        elif granularity == "day":
            key, deadline = keys.day_users(rid, bucket), bucket + DAY + self.day_retention_s
        else:
            raise ValueError(f"unknown granularity {granularity!r}")
        return _bulk(key), _bulk(str(deadline)), deadline

    def _match_head(self, rid: str, granularity: str, bucket: int) -> tuple[bytes, bytes, bytes, int]:
        """(hash key, EXPIREAT, field bulks, deadline) of a matched-bids count."""
        if granularity == "hour":
            key, fld = keys.hour_matches(rid, bucket)
            expire = bucket - bucket % DAY + DAY + self.hour_retention_s
        elif granularity == "day":
            key, fld = keys.day_matches(rid, bucket)
            expire = keys.month_end(bucket) + self.day_retention_s
        else:
            raise ValueError(f"unknown granularity {granularity!r}")
        return _bulk(key), _bulk(str(expire)), _bulk(fld), expire

    def _dimension_head(self, rid: str, day: int) -> tuple[bytes, bytes, int]:
        """(hash key, EXPIREAT bulk, deadline) of a day's dimensions hash."""
        deadline = day - day % DAY + DAY + self.day_retention_s
        return _bulk(keys.dimensions(rid, day)), _bulk(str(deadline)), deadline

    def _field_cache(self, dimension: str) -> _FieldBulks:
        found = self._dimension_fields.get(dimension)
        if found is None:
            found = self._dimension_fields[dimension] = _FieldBulks(dimension)
        return found

    def _field_bulks(self, dimension: str) -> Callable[[str], bytes]:
        return self._field_cache(dimension).__getitem__

    def apply(
        self,
        batch: CounterBatch,
        consumer: str,
        offsets: Mapping[tuple[str, int], int],
        start_offsets: Mapping[tuple[str, int], int] | None = None,
    ) -> bool:
        """Write ``batch`` and ``offsets`` exactly once (see the module docstring): idempotent
        PFADDs, then the counts and offsets in one MULTI/EXEC guarded by WATCH on the offsets."""
        return self.apply_encoded(self.encode_batch(batch, offsets, start_offsets), consumer)

    def apply_encoded(self, encoded: EncodedBatch, consumer: str) -> bool:
        """Write an :class:`EncodedBatch`: True when written, False when the stored offsets show
        it was already applied; :class:`CountersRolledBackError` when they went back."""
        okey = _bulk(keys.offsets(consumer))
        checks = [(offset, offset.start) for offset in encoded.offsets if offset.start is not None]
        fences = {offset.field: _bulk(keys.offset_fence(consumer, offset.field)) for offset in encoded.offsets}
        transaction = [_MULTI, encoded.body]
        queued = encoded.n_body
        if encoded.offsets:
            transaction.append(b"*%d\r\n$4\r\nHSET\r\n%s" % (2 + 2 * len(encoded.offsets), okey))
            transaction += [offset.field_bulk + offset.next_bulk for offset in encoded.offsets]
            transaction.append(b"*%d\r\n$4\r\nMSET\r\n" % (1 + 2 * len(encoded.offsets)))
            transaction += [fences[offset.field] + offset.next_bulk for offset in encoded.offsets]
            queued += 2
        transaction.append(_EXEC)
        check = b""
        if checks:
            check = b"*%d\r\n$5\r\nWATCH\r\n%s*%d\r\n$5\r\nHMGET\r\n%s%s" % (
                1 + len(checks), b"".join(fences[offset.field] for offset, _ in checks),
                2 + len(checks), okey, b"".join(offset.field_bulk for offset, _ in checks))
        last = self._last_stored
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            # round trip 1: the idempotent sketch writes, and the check (WATCH, then the offsets)
            first = [*encoded.pfadds, encoded.sketch_expires]
            if not checks:
                first += transaction  # nothing to check: one round trip
            conn.send_packed_command([b"".join(first) + check])
            first_error = _read_integers(conn, len(encoded.pfadds) + encoded.n_sketch_expires)
            if first_error is not None:
                raise first_error
            self._deadlines_set.update(encoded.sketch_deadlines)
            for attempt in range(MAX_ATTEMPTS):
                if not checks and attempt:
                    raise redis.exceptions.WatchError("EXEC failed without a WATCH")
                if checks:
                    if attempt:
                        conn.send_packed_command([check])
                    conn.read_response()  # WATCH: OK
                    stored = [None if value is None else int(value) for value in conn.read_response()]
                    behind = {offset.field: (value, last[consumer, offset.field])
                              for value, (offset, _) in zip(stored, checks, strict=True)
                              if (consumer, offset.field) in last
                              and (value is None or value < last[consumer, offset.field])}
                    if behind:
                        conn.send_packed_command([_UNWATCH])
                        conn.read_response()
                        for field in behind:  # the rewound writer starts from what is stored
                            del last[consumer, field]
                        raise CountersRolledBackError(consumer, behind)
                    if any(value is not None and _beyond(value, start)
                           for value, (_, start) in zip(stored, checks, strict=True)):
                        conn.send_packed_command([_UNWATCH])
                        conn.read_response()
                        for value, (offset, _) in zip(stored, checks, strict=True):
                            if value is not None:
                                last[consumer, offset.field] = value
                        return False
                    # round trip 2: the counts and offsets, applied only if the offsets did not change
                    conn.send_packed_command([b"".join(transaction)])
                _read_queued(conn, queued)
                reply = _read_exec(conn, queued)
                if reply is not None:
                    for offset in encoded.offsets:  # committed, even with the errors below
                        last[consumer, offset.field] = offset.next_offset
                    if reply is not True and any(isinstance(item, Exception) for item in reply):
                        # committed anyway (no rollback in MULTI): say so, naming the keys
                        names = [*_command_keys(encoded.body), keys.offsets(consumer), "offset fences"]
                        raise PartiallyAppliedError(consumer, [
                            (names[i] if i < len(names) else f"#{i}", str(item))
                            for i, item in enumerate(reply) if isinstance(item, Exception)])
                    self._deadlines_set.update(encoded.hash_deadlines)
                    return True
                self.retries += 1  # another writer of these partitions' offsets came in between
            raise redis.exceptions.WatchError(
                f"offsets of {consumer!r} changed under {MAX_ATTEMPTS} attempts in a row (another writer?)")
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def prepare(self, rule_ids: Iterable[str], at: float | None = None) -> int:
        """The key, field and deadline bulks of every rule's sketches and counts of the hour and
        day of ``at``: a fresh writer's first windows built ~50,000 of them at 10,000 rules (~7 us
        each, ~300 ms of its first write), which was most of why a freshly started stream lagged
        for a few seconds."""
        hour = int(self.clock() if at is None else at) // HOUR * HOUR
        day = hour - hour % DAY
        built = 0
        for rid in rule_ids:
            for heads, miss, key in ((self._sketch_heads, self._sketch_head_miss, (rid, "hour", hour)),
                                     (self._sketch_heads, self._sketch_head_miss, (rid, "day", day)),
                                     (self._match_heads, self._match_head_miss, (rid, "hour", hour)),
                                     (self._match_heads, self._match_head_miss, (rid, "day", day))):
                if key not in heads:
                    miss(key)
                    built += 1
            if (rid, day) not in self._dimension_heads:
                self._dimension_head_miss((rid, day))
                built += 1
        return built

    def stored_offsets(self, consumer: str) -> dict[tuple[str, int], int]:
        raw = self.client.hgetall(keys.offsets(consumer))
        out: dict[tuple[str, int], int] = {}
        for fld, value in raw.items():
            name = fld.decode() if isinstance(fld, bytes) else str(fld)
            out[keys.split_offset_field(name)] = int(value)
        return out

    def delete_offsets(self, consumer: str) -> None:
        """Forget a consumer's offsets (a finished or cancelled replay), and their fences."""
        okey = keys.offsets(consumer)
        fields = [f.decode() if isinstance(f, bytes) else str(f) for f in self.client.hkeys(okey)]
        self.client.delete(okey, *(keys.offset_fence(consumer, f) for f in fields))
        for key in [key for key in self._last_stored if key[0] == consumer]:
            del self._last_stored[key]

    # ------------------------------------------------------------------ reads

    def _plan(self, start_s: int, end_s: int) -> tuple[list[int], list[int]]:
        """Split the hour range [start_s, end_s) into whole days and partial-day hours (see module)."""
        days: list[int] = []
        hours: list[int] = []
        hour_cutoff = self.clock() - self.hour_retention_s  # hour buckets ending before this are gone
        t = start_s
        while t < end_s:
            day = t - t % DAY
            day_end = day + DAY
            if t == day and day_end <= end_s:
                days.append(day)
                t = day_end
                continue
            stop = min(day_end, end_s)
            if day_end <= hour_cutoff:
                days.append(day)  # hour buckets expired: day precision
            else:
                hours.extend(range(t, stop, HOUR))
            t = stop
        return days, hours

    def _users_keys(self, rule_id: str, days: Sequence[int], hours: Sequence[int]) -> list[str]:
        return [keys.day_users(rule_id, d) for d in days] + [keys.hour_users(rule_id, h) for h in hours]

    def _queue_matches(self, pipe: Any, rule_id: str, days: Sequence[int], hours: Sequence[int]) -> int:
        """Queue HMGETs covering the buckets; returns how many replies to sum."""
        fields: dict[str, list[str]] = {}
        for d in days:
            key, fld = keys.day_matches(rule_id, d)
            fields.setdefault(key, []).append(fld)
        for h in hours:
            key, fld = keys.hour_matches(rule_id, h)
            fields.setdefault(key, []).append(fld)
        for key, flds in fields.items():
            pipe.hmget(key, flds)
        return len(fields)

    def summary(self, rule_id: str, start: datetime, end: datetime) -> tuple[int, int]:
        """(unique users, matched bids) over [start, end) in one round trip (the API's audience size)."""
        days, hours = self._plan(*_hour_range(start, end))
        if not days and not hours:
            return 0, 0
        pipe = self.client.pipeline(transaction=False)
        pipe.pfcount(*self._users_keys(rule_id, days, hours))
        self._queue_matches(pipe, rule_id, days, hours)
        replies = pipe.execute()
        return int(replies[0]), sum(_int(v) for reply in replies[1:] for v in reply)

    def unique_users(self, rule_id: str, start: datetime, end: datetime) -> int:
        days, hours = self._plan(*_hour_range(start, end))
        if not days and not hours:
            return 0
        return int(self.client.pfcount(*self._users_keys(rule_id, days, hours)))

    def matches(self, rule_id: str, start: datetime, end: datetime) -> int:
        days, hours = self._plan(*_hour_range(start, end))
        if not days and not hours:
            return 0
        pipe = self.client.pipeline(transaction=False)
        self._queue_matches(pipe, rule_id, days, hours)
        return sum(_int(v) for reply in pipe.execute() for v in reply)

    def series(self, rule_id: str, start: datetime, end: datetime, granularity: Granularity) -> list[SeriesPoint]:
        start_s, end_s = _hour_range(start, end)
        if granularity == "hour":
            buckets = list(range(start_s, end_s, HOUR))
            user_key: Callable[[str, int], str] = keys.hour_users
            match_key: Callable[[str, int], tuple[str, str]] = keys.hour_matches
        elif granularity == "day":
            first = start_s - start_s % DAY
            buckets = list(range(first, end_s, DAY))
            user_key, match_key = keys.day_users, keys.day_matches
        else:
            raise ValueError(f"granularity must be 'hour' or 'day', not {granularity!r}")
        if not buckets:
            return []
        pipe = self.client.pipeline(transaction=False)
        for b in buckets:
            pipe.pfcount(user_key(rule_id, b))
        by_key: dict[str, list[str]] = {}
        slots: list[tuple[str, int]] = []
        for b in buckets:
            key, fld = match_key(rule_id, b)
            flds = by_key.setdefault(key, [])
            slots.append((key, len(flds)))
            flds.append(fld)
        for key, flds in by_key.items():
            pipe.hmget(key, flds)
        replies = pipe.execute()
        users = replies[: len(buckets)]
        hm = dict(zip(by_key, replies[len(buckets):], strict=True))
        return [
            SeriesPoint(start=_utc(b), unique_users=int(u), matches=_int(hm[key][pos]))
            for b, u, (key, pos) in zip(buckets, users, slots, strict=True)
        ]

    def breakdown(
        self, rule_id: str, start: datetime, end: datetime, dimensions: Sequence[str]
    ) -> dict[str, dict[str, int]]:
        start_s, end_s = _hour_range(start, end)
        wanted: dict[str, dict[str, int]] = {d: {} for d in dimensions}
        days = list(range(start_s - start_s % DAY, end_s, DAY))
        if not days or not wanted:
            return wanted
        # HGETALL in a pipeline, summed here: summing in a Lua script measured ~28 ms of blocked
        # server per 90-day read with 200 cities; this costs the reader, not the writers.
        pipe = self.client.pipeline(transaction=False)
        for d in days:
            pipe.hgetall(keys.dimensions(rule_id, d))
        totals: dict[Any, int] = {}
        for reply in pipe.execute():
            for fld, count in reply.items():
                totals[fld] = totals.get(fld, 0) + int(count)
        for fld, count in totals.items():
            name = fld.decode() if isinstance(fld, bytes) else fld
            dimension, value = keys.split_dimension_field(name)
            target = wanted.get(dimension)
            if target is not None:
                target[value] = count
        return wanted

    # ------------------------------------------------------------------ admin

    def rule_keys(self, rule_id: str) -> Iterator[str]:
        """Every counter key of a rule (SCAN: O(keys in the database), for ops and deletes)."""
        for key in self.client.scan_iter(match=keys.rule_scan_pattern(rule_id), count=1000):
            yield key.decode() if isinstance(key, bytes) else key

    def delete_rule(self, rule_id: str) -> None:
        chunk: list[str] = []
        for key in self.rule_keys(rule_id):
            chunk.append(key)
            if len(chunk) >= 500:
                self.client.unlink(*chunk)
                chunk = []
        if chunk:
            self.client.unlink(*chunk)
