"""(unique users, matches) of one or many rule ids over a window: the size and dashboard reads.

Through the counters port a size costs two round trips and a 100-audience dashboard 200. For
``RedisCounters`` every read of a batch goes into one pipeline; key names come from
``rules_service.counters.keys`` and the day/hour split from ``RedisCounters._plan``, so the key
scheme stays defined in one place. A counters object offering ``summaries(rule_ids, start, end)``
itself is used as is; any other implementation of the port gets per-rule calls.

Closed-days cache (why): unique users over 90 days is a ``PFCOUNT`` merging ~90 day sketches,
~4 µs per sparse sketch and far more per dense one: ~0.4 ms of Redis time per audience, 40 ms for a
dashboard, before any client overhead; and the matches are HMGETs of ~90 fields. Days before
yesterday no longer receive live traffic, so for a window their part is kept, per rule, as one
merged sketch (``PFMERGE``) and one sum next to the rule's counters
(``c:{r:<rule>}:u:cache:<first>-<last>x<n>``, ``...:m:cache:...``, listed in
``c:{r:<rule>}:cache:index``; same hash tag, so ``delete_rule`` removes them too) for
``CACHE_TTL_S``. A read sends only those two keys plus the recent day and hour keys to a Lua
script (one round trip per batch); rules whose cache is missing are built in a second round trip.

Who else writes into closed days, and why the cache stays exact for them:

* replays: ``RedisBackfills.start`` drops the rule's cache (:func:`invalidate`) and the API reads
  a serving version under replay *exactly* (``exact=``) until the replay is done, so progress is
  visible at once and nothing stale is cached meanwhile. A new version is backfilled before it
  serves, so its cache is built after its replay.
* a stream worker more than a day behind (an outage backlog) writes into closed days: those
  counts appear after at most ``CACHE_TTL_S``. Live traffic (today, yesterday, hours) is always
  read fresh.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

CACHE_TTL_S = 900
#: Cache only when at least this many closed days are read.
MIN_CACHED_DAYS = 8
DAY = 86400
_RID = "\x00rule\x00"  # placeholder replaced by each rule id in precomputed key templates

# Shared by both scripts: the sum of the hash fields listed in ARGV from position ``a`` on (per
# hash: its field count, then the fields) for KEYS[first], KEYS[first + 1], ... to the last key.
_SUM_FIELDS = """
local function sum_fields(first, a)
  local total = 0
  for k = first, #KEYS do
    local count = tonumber(ARGV[a]); a = a + 1
    local fields = {}
    for f = 1, count do fields[f] = ARGV[a]; a = a + 1 end
    for _, v in ipairs(redis.call('HMGET', KEYS[k], unpack(fields))) do
      if v then total = total + tonumber(v) end
    end
  end
  return total
end
"""

# KEYS: ucache, mcache, user sketches..., match hashes...   ARGV: n_sketches, then per match hash
# "count" followed by its fields. Returns {-1, 0} when a cache is missing.
_READ = _SUM_FIELDS + """
local n = tonumber(ARGV[1])
local matched = 0
if KEYS[1] ~= '' then
  local cached = redis.call('GET', KEYS[2])
  if not cached or redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
  matched = tonumber(cached)
end
local sketches = {}
if KEYS[1] ~= '' then sketches[1] = KEYS[1] end
for i = 3, n + 2 do sketches[#sketches + 1] = KEYS[i] end
local users = 0
if #sketches > 0 then users = redis.call('PFCOUNT', unpack(sketches)) end
matched = matched + sum_fields(n + 3, 2)
return {users, matched}
"""

# KEYS: ucache, mcache, index, closed day sketches..., closed month hashes...  ARGV: ttl,
# n_sketches, then per hash "count" and its fields. Builds both caches and lists them in the index.
_BUILD = _SUM_FIELDS + """
local n = tonumber(ARGV[2])
local sources = {}
for i = 4, n + 3 do sources[#sources + 1] = KEYS[i] end
redis.call('DEL', KEYS[1])
redis.call('PFMERGE', KEYS[1], unpack(sources))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
local matched = sum_fields(n + 4, 3)
redis.call('SET', KEYS[2], matched, 'EX', tonumber(ARGV[1]))
return matched
"""


def summary(counters: Any, rule_id: str, start: datetime, end: datetime, exact: bool = False) -> tuple[int, int]:
    """(unique users, matches) of one rule in one round trip where possible."""
    return summaries(counters, [rule_id], start, end, exact={rule_id} if exact else ())[0]


def summaries(counters: Any, rule_ids: Sequence[str], start: datetime, end: datetime,
              exact: Collection[str] = ()) -> list[tuple[int, int]]:
    """Counts per rule id; ids in ``exact`` bypass the closed-days cache (a replay writes there)."""
    native = getattr(counters, "summaries", None)
    if callable(native):
        return [(int(u), int(m)) for u, m in native(rule_ids, start, end)]
    from rules_service.counters.redis_store import RedisCounters

    if not isinstance(counters, RedisCounters):
        return [(int(counters.unique_users(r, start, end)), int(counters.matches(r, start, end))) for r in rule_ids]
    return _redis_summaries(counters, rule_ids, start, end, exact)


def index_key(rule_id: str) -> str:
    from rules_service.counters import keys

    return f"{keys.rule_prefix(rule_id)}cache:index"


def invalidate(client: Any, rule_id: str) -> None:
    """Drop every cached closed-days sketch and sum of a rule (before a replay writes into them)."""
    index = index_key(rule_id)
    members = client.smembers(index)
    client.delete(index, *members)


def _match_spec(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """[(hash key, field)] -> (hash keys, ARGV "count field..." per key)."""
    grouped: dict[str, list[str]] = {}
    for key, field in pairs:
        grouped.setdefault(key, []).append(field)
    args: list[str] = []
    for fields in grouped.values():
        args.append(str(len(fields)))
        args.extend(fields)
    return list(grouped), args


class _Plan:
    """Key templates of one window, built once per request and instantiated per rule."""

    def __init__(self, counters: Any, start: datetime, end: datetime):
        from rules_service.counters import keys
        from rules_service.counters.redis_store import _hour_range

        days, hours = counters._plan(*_hour_range(start, end))
        self.empty = not days and not hours
        now = int(counters.clock())
        cutoff = now - now % DAY - DAY  # the start of yesterday: older days get no live traffic
        closed = [d for d in days if d < cutoff]
        if len(closed) < MIN_CACHED_DAYS:
            closed = []
        recent = [d for d in days if d >= cutoff or not closed]
        self.cached = bool(closed)
        tag = f"{keys.day_stamp(closed[0])}-{keys.day_stamp(closed[-1])}x{len(closed)}" if closed else ""
        self.ucache = f"{keys.rule_prefix(_RID)}u:cache:{tag}" if closed else ""
        self.mcache = f"{keys.rule_prefix(_RID)}m:cache:{tag}" if closed else ""
        self.sketches = [keys.day_users(_RID, d) for d in recent] + [keys.hour_users(_RID, h) for h in hours]
        self.hashes, self.hash_args = _match_spec([keys.day_matches(_RID, d) for d in recent]
                                                  + [keys.hour_matches(_RID, h) for h in hours])
        self.closed_sketches = [keys.day_users(_RID, d) for d in closed]
        self.closed_hashes, self.closed_args = _match_spec([keys.day_matches(_RID, d) for d in closed])
        self.index = index_key(_RID)
        self.all_sketches = [keys.day_users(_RID, d) for d in days] + [keys.hour_users(_RID, h) for h in hours]
        self.all_hashes, self.all_args = _match_spec([keys.day_matches(_RID, d) for d in days]
                                                     + [keys.hour_matches(_RID, h) for h in hours])

    def read_call(self, rid: str) -> tuple[list[str], list[Any]]:
        names = [self.ucache, self.mcache, *self.sketches, *self.hashes]
        return [k.replace(_RID, rid) for k in names], [len(self.sketches), *self.hash_args]

    def exact_call(self, rid: str) -> tuple[list[str], list[Any]]:
        """Every sketch and hash of the window, no cache (an empty first key tells the script)."""
        names = ["", "", *self.all_sketches, *self.all_hashes]
        return [k.replace(_RID, rid) for k in names], [len(self.all_sketches), *self.all_args]

    def build_call(self, rid: str) -> tuple[list[str], list[Any]]:
        names = [self.ucache, self.mcache, self.index, *self.closed_sketches, *self.closed_hashes]
        return [k.replace(_RID, rid) for k in names], [CACHE_TTL_S, len(self.closed_sketches), *self.closed_args]


def _redis_summaries(counters: Any, rule_ids: Sequence[str], start: datetime, end: datetime,
                     exact: Collection[str]) -> list[tuple[int, int]]:
    if not rule_ids:
        return []
    plan = _Plan(counters, start, end)
    if plan.empty:
        return [(0, 0) for _ in rule_ids]
    client = counters.client
    read, build = _READ, _BUILD
    out = _run(client, read, [plan.exact_call(rid) if rid in exact or not plan.cached else plan.read_call(rid)
                              for rid in rule_ids])
    missing = [i for i, (users, _) in enumerate(out) if users < 0]
    if missing:  # build and re-read in one pipeline: Redis runs them in order
        calls = [(script, call) for i in missing
                 for script, call in ((build, plan.build_call(rule_ids[i])), (read, plan.read_call(rule_ids[i])))]
        replies = _run_mixed(client, calls)
        for n, i in enumerate(missing):
            out[i] = replies[2 * n + 1]
    return [(max(0, u), m) for u, m in out]


@functools.cache
def _sha(script: str) -> str:
    """The SHA-1 of a script's text: what SCRIPT LOAD returns and EVALSHA takes."""
    return hashlib.sha1(script.encode()).hexdigest()


def _run(client: Any, script: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    return _run_mixed(client, [(script, call) for call in calls])


def _run_mixed(client: Any, calls: list[tuple[str, tuple[list[str], list[Any]]]]) -> list[Any]:
    """EVALSHA every call in one pipeline (no SCRIPT EXISTS round trip); load the scripts and retry
    once if the server does not know them (a restart or SCRIPT FLUSH)."""
    import redis

    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for script, (keys, args) in calls:
            pipe.evalsha(_sha(script), len(keys), *keys, *args)
        try:
            replies = pipe.execute()
            break
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            for script in {script for script, _ in calls}:
                client.script_load(script)
    return [tuple(int(v) for v in r) if isinstance(r, list) else int(r) for r in replies]

