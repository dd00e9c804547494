"""The Redis key scheme of the audience counters. Every key the counters use is built here.

All buckets are UTC, in event time. ``<rule>`` is a rule id (``<audience>@v<version>``, see
:func:`rules_service.domain.rule_id`); every key of one rule carries the hash tag ``{r:<rule>}`` so
that all of them live in one Redis Cluster slot (a rule's reads and deletes stay single-slot).

==================================  ======  ===============================  ======================
key                                 type    content                          expires (EXPIREAT)
==================================  ======  ===============================  ======================
``c:{r:<rule>}:u:h:<yyyymmddhh>``   HLL     unique users of one hour         hour end + HOUR_RETENTION
``c:{r:<rule>}:u:d:<yyyymmdd>``     HLL     unique users of one day          day end + DAY_RETENTION
``c:{r:<rule>}:m:h:<yyyymmdd>``     hash    field ``hh`` -> matched bids     day end + HOUR_RETENTION
``c:{r:<rule>}:m:d:<yyyymm>``       hash    field ``dd`` -> matched bids     month end + DAY_RETENTION
``c:{r:<rule>}:dim:<yyyymmdd>``     hash    ``<dimension>=<value>`` -> bids  day end + DAY_RETENTION
``o:<consumer>``                    hash    ``<topic>:<partition>`` -> next  never
                                            offset (see ``RedisCounters``)
``o:<consumer>|<topic>:<partition>``  string  the same next offset: the key   never
                                            a writer WATCHes (its "fence")
==================================  ======  ===============================  ======================

The HyperLogLogs' members are 8-byte BLAKE2b digests of the user ids, not the ids (see
``redis_store``): anything else adding to these sketches must add the same digests.

Why this shape:

* Hour counts of one day share one hash and day counts of one month share one hash, so a 90-day
  read is ~4 ``HMGET`` of month hashes plus at most 2 of hour hashes (the partial days at the edges),
  all in one pipeline; a day series over 90 days is 90 ``PFCOUNT`` + ~4 ``HMGET``.
* Unique users cannot be summed, so they are kept per hour *and* per day: a range is the
  ``PFCOUNT`` (an on-the-fly merge) of the day sketches of the whole days inside it plus the hour
  sketches of the partial days at its edges.
* Retention is per granularity (hours are big: 24x the keys) and set on every write with
  ``EXPIREAT`` of the bucket's end plus the retention, so re-writing an old bucket (a replay) keeps
  the same deadline. Past the hour retention, reads fall back to the day buckets (day precision).
* Each partition's offset is also in a fence key of its own, which is what a writer WATCHes: one
  WATCHed hash made the stream's processes (one consumer, disjoint partitions) abort each other's
  transactions (~5-15% of writes were sent twice). The hash stays the one place to read them.
* The offsets hash is outside the rules' slots: the write script touches it together with every
  rule's keys, which is atomic on one Redis server but not cluster-safe (see ``redis_store``).

Nothing in the key depends on the advertiser: ownership is checked by the API before reading.
"""

from __future__ import annotations

import calendar
import time
from functools import lru_cache

HOUR = 3600
DAY = 86400

#: Prefix of every counter key; the offsets hashes use OFFSETS_PREFIX.
COUNTER_PREFIX = "c:"
OFFSETS_PREFIX = "o:"


def rule_tag(rule_id: str) -> str:
    """The Redis Cluster hash tag of a rule: ``{r:<rule_id>}``."""
    return "{r:" + rule_id + "}"


def rule_prefix(rule_id: str) -> str:
    """The prefix every counter key of ``rule_id`` starts with."""
    return COUNTER_PREFIX + rule_tag(rule_id) + ":"


def rule_scan_pattern(rule_id: str) -> str:
    """A SCAN MATCH pattern for every counter key of ``rule_id`` (glob characters escaped)."""
    escaped = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in rule_prefix(rule_id))
    return escaped + "*"


@lru_cache(maxsize=65536)
def _gm(epoch_s: int) -> time.struct_time:
    return time.gmtime(epoch_s)


@lru_cache(maxsize=65536)
def hour_stamp(epoch_s: int) -> str:
    """``yyyymmddhh`` of the hour containing ``epoch_s``."""
    t = _gm(epoch_s - epoch_s % HOUR)
    return f"{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}"


@lru_cache(maxsize=65536)
def day_stamp(epoch_s: int) -> str:
    """``yyyymmdd`` of the day containing ``epoch_s``."""
    t = _gm(epoch_s - epoch_s % DAY)
    return f"{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}"


def month_stamp(epoch_s: int) -> str:
    """``yyyymm`` of the month containing ``epoch_s``."""
    t = _gm(epoch_s - epoch_s % DAY)
    return f"{t.tm_year:04d}{t.tm_mon:02d}"


@lru_cache(maxsize=4096)
def month_end(epoch_s: int) -> int:
    """Epoch seconds of the first instant of the month after the one containing ``epoch_s``."""
    t = _gm(epoch_s - epoch_s % DAY)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def hour_users(rule_id: str, hour_start: int) -> str:
    return f"c:{{r:{rule_id}}}:u:h:{hour_stamp(hour_start)}"


def day_users(rule_id: str, day_start: int) -> str:
    return f"c:{{r:{rule_id}}}:u:d:{day_stamp(day_start)}"


def hour_matches(rule_id: str, hour_start: int) -> tuple[str, str]:
    """(hash key of the hour's day, field ``hh``)."""
    stamp = hour_stamp(hour_start)
    return f"c:{{r:{rule_id}}}:m:h:{stamp[:8]}", stamp[8:]


def day_matches(rule_id: str, day_start: int) -> tuple[str, str]:
    """(hash key of the day's month, field ``dd``)."""
    stamp = day_stamp(day_start)
    return f"c:{{r:{rule_id}}}:m:d:{stamp[:6]}", stamp[6:]


def dimensions(rule_id: str, day_start: int) -> str:
    return f"c:{{r:{rule_id}}}:dim:{day_stamp(day_start)}"


def dimension_field(dimension: str, value: str) -> str:
    """Field of a dimensions hash. Dimension names contain no ``=``; values may."""
    return f"{dimension}={value}"


def split_dimension_field(field: str) -> tuple[str, str]:
    dimension, _, value = field.partition("=")
    return dimension, value


def offsets(consumer: str) -> str:
    """The hash of the next offsets of ``consumer`` (a stream consumer group, ``replay:<id>``...)."""
    return OFFSETS_PREFIX + consumer


def offset_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def offset_fence(consumer: str, field: str) -> str:
    """The fence key of one offsets-hash ``field`` (``<topic>:<partition>``) of ``consumer``."""
    return f"{OFFSETS_PREFIX}{consumer}|{field}"


def split_offset_field(field: str) -> tuple[str, int]:
    topic, _, partition = field.rpartition(":")
    return topic, int(partition)
