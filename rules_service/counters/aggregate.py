"""Turn a batch of percolated user documents into the counter updates of one round trip.

Pure functions, no I/O: the stream worker and replays call :func:`aggregate` with the user
documents of a batch, the sorted rule ids each one matched, and the insight dimensions, then hand
the :class:`~rules_service.counters.port.CounterBatch` to ``Counters.apply``.

What one matched document adds, for each rule it matched, in the UTC hour and day of its
``last_seen`` (the event time):

* its ``user_id`` to the rule's hour and day HyperLogLogs;
* 1 to the rule's hour and day matched-bid counts (unless ``count_matches=False``: a replay of the
  compacted ``users.last_seen`` topic sees each user once, which says nothing about how many bids
  matched, so replays add users only);
* 1 to the rule's day count of each dimension value the document has (``device.os`` is a dotted
  path into the nested document; a missing field counts nothing; an array counts each value;
  numbers and booleans are counted by their JSON text).

Speed: this runs for every (bid, matched rule) pair, so the work is inverted to per rule: one
pass builds rule -> document indices, then each rule's users and dimension values are picked with
``operator.itemgetter`` and counted with ``set``/``Counter`` (C loops, not Python ones).
"""

from __future__ import annotations

import calendar
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

from rules_service.counters.keys import DAY
from rules_service.counters.port import CounterBatch

__all__ = ["aggregate", "dimension_value", "hour_of_last_seen"]

_HOUR_CACHE: dict[str, int] = {}


def hour_of_last_seen(last_seen: str) -> int:
    """Epoch seconds of the UTC hour of an ISO 8601 UTC ``last_seen`` (``2026-11-22T10:..Z``)."""
    if last_seen[-1:] != "Z" and not last_seen.endswith("+00:00"):
        raise ValueError(f"last_seen is not an ISO 8601 UTC time: {last_seen!r}")
    prefix = last_seen[:13]
    hour = _HOUR_CACHE.get(prefix)
    if hour is None:
        try:
            if prefix[4] != "-" or prefix[7] != "-" or prefix[10] != "T":
                raise ValueError
            year, month, day, hh = int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]), int(prefix[11:13])
            hour = calendar.timegm((year, month, day, hh, 0, 0, 0, 0, 0))
        except (ValueError, IndexError):
            raise ValueError(f"last_seen is not an ISO 8601 UTC time: {last_seen!r}") from None
        if len(_HOUR_CACHE) > 100_000:
            _HOUR_CACHE.clear()
        _HOUR_CACHE[prefix] = hour
    return hour


def dimension_value(doc: Mapping[str, Any], dimension: str) -> Any:
    """The value at a dotted path of a nested document (None when absent)."""
    value: Any = doc
    for part in dimension.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
        if value is None:
            return None
    return value


def _field_text(value: Any) -> str | None:
    if type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return str(value)
    return None  # objects (geo.location) are not dimension values


def _pick(values: Sequence[Any], indices: Sequence[int]) -> tuple[Any, ...]:
    if len(indices) == 1:
        return (values[indices[0]],)
    return itemgetter(*indices)(values)


def aggregate(
    docs: Sequence[Mapping[str, Any]],
    matched: Sequence[Iterable[str]],
    dimensions: Sequence[str] = (),
    *,
    batch: CounterBatch | None = None,
    count_matches: bool = True,
) -> CounterBatch:
    """Add the counter updates of ``docs`` (``matched[i]``: rule ids matched by ``docs[i]``) to
    ``batch`` (a new one by default) and return it. Raises ValueError for a document without a
    usable ``user_id`` or ``last_seen``."""
    if len(docs) != len(matched):
        raise ValueError(f"{len(docs)} documents but {len(matched)} match lists")
    out = CounterBatch() if batch is None else batch
    by_rule: dict[str, list[int]] = {}
    for i, rules in enumerate(matched):
        for rid in rules:
            indices = by_rule.get(rid)
            if indices is None:
                by_rule[rid] = [i]
            else:
                indices.append(i)
    if not by_rule:
        return out

    user_ids: list[str] = []
    hours: list[int] = []
    for doc in docs:
        uid = doc.get("user_id")
        if type(uid) is not str or not uid:
            raise ValueError(f"document without a user_id: {doc!r:.200}")
        user_ids.append(uid)
        last_seen = doc.get("last_seen")
        if type(last_seen) is not str:
            raise ValueError(f"document of user {uid!r} without a last_seen time")
        hours.append(hour_of_last_seen(last_seen))
    single_hour = hours[0] if len(set(hours)) == 1 else None

    # per document, its (dimension, value) pairs, computed once and shared by every rule it matched
    doc_pairs = [_dimension_pairs(doc, dimensions) for doc in docs] if count_matches and dimensions else None

    users, matches, dims = out.users, out.matches, out.dimensions
    for rid, indices in by_rule.items():
        if single_hour is not None:
            groups: Iterable[tuple[int, Sequence[int]]] = ((single_hour, indices),)
        else:
            by_hour: dict[int, list[int]] = {}
            for i in indices:
                by_hour.setdefault(hours[i], []).append(i)
            groups = by_hour.items()
        for hour, idx in groups:
            day = hour - hour % DAY
            picked = _pick(user_ids, idx)
            _add_users(users, (rid, "hour", hour), picked)
            _add_users(users, (rid, "day", day), picked)
            if not count_matches:
                continue
            n = len(idx)
            key = (rid, "hour", hour)
            matches[key] = matches.get(key, 0) + n
            key = (rid, "day", day)
            matches[key] = matches.get(key, 0) + n
            if doc_pairs is None:
                continue
            if n == 1:
                counts: Mapping[tuple[str, str], int] = dict.fromkeys(doc_pairs[idx[0]], 1)
            else:
                counts = Counter(chain.from_iterable(_pick(doc_pairs, idx)))
            for (dimension, value), count in counts.items():
                dkey = (rid, day, dimension)
                target = dims.get(dkey)
                if target is None:
                    dims[dkey] = {value: count}
                else:
                    target[value] = target.get(value, 0) + count
    return out


def _dimension_pairs(doc: Mapping[str, Any], dimensions: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for dimension in dimensions:
        value = dimension_value(doc, dimension)
        if value is None:
            continue
        if type(value) is list:
            for text in dict.fromkeys(_field_text(item) for item in value):  # once per document
                if text is not None:
                    pairs.append((dimension, text))
        else:
            text = _field_text(value)
            if text is not None:
                pairs.append((dimension, text))
    return tuple(pairs)


def _add_users(users: dict[tuple[str, str, int], set[str]], key: tuple[str, str, int], picked: Iterable[str]) -> None:
    found = users.get(key)
    if found is None:
        users[key] = set(picked)
    else:
        found.update(picked)
