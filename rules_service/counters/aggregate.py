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
import gc
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, compress, repeat
from operator import itemgetter
from typing import Any, Literal

from rules_service.counters.keys import DAY
from rules_service.counters.port import CounterBatch
from rules_service.counters.seen import SeenUsers


def _load_c() -> Any:
    """The C twins of aggregate_masks' per-document and emit steps (rules_service/counters/_aggregate.c),
    if built."""
    try:
        from rules_service.counters import _aggregate as module  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # pragma: no cover - not built
        return None
    return module


_aggregate: Any = _load_c()

#: Use the C steps when they are built (tests set this to False to run the Python reference).
USE_C = True

__all__ = ["aggregate", "aggregate_masks", "dimension_value", "hour_of_last_seen", "merge_batches"]

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


def merge_batches(into: CounterBatch, other: CounterBatch) -> CounterBatch:
    """Add ``other``'s updates to ``into`` (a stream flush window: several polled batches, one
    write) and return ``into``. ``other`` is left as it was but may share sets and dicts with
    ``into`` afterwards: drop it."""
    users = into.users
    for key, members in other.users.items():
        found = users.get(key)
        if found is None:
            users[key] = members
        else:
            found.update(members)
    matches = into.matches
    for key, count in other.matches.items():
        matches[key] = matches.get(key, 0) + count
    dims = into.dimensions
    for dkey, values in other.dimensions.items():
        target = dims.get(dkey)
        if target is None:
            dims[dkey] = values
        else:
            for value, count in values.items():
                target[value] = target.get(value, 0) + count
    return into


# ------------------------------------------------------------------ per-rule masks (the stream)

#: Bits of the rule x document matrix expanded at once (bounds the temporary memory: ~8 bytes each
#: for the word matrix and its nonzero scan).
_WORDS_PER_CHUNK = 1 << 21
#: Cells of the rule x (dimension, value) count matrix per bincount.
_CELLS_PER_CHUNK = 1 << 22


def aggregate_masks(
    docs: Sequence[Mapping[str, Any]],
    rule_ids: Sequence[str],
    masks: Sequence[int],
    dimensions: Sequence[str] = (),
    *,
    batch: CounterBatch | None = None,
    count_matches: bool = True,
    seen: Any = None,
) -> CounterBatch:
    """The same counter updates as :func:`aggregate`, from per-rule document masks (bit ``i`` of
    ``masks[k]`` set when ``docs[i]`` matched ``rule_ids[k]``, as returned by
    ``EmbeddedPercolator.percolate_masks``) instead of per-document lists.

    Documents whose bit is clear in every mask are ignored (they may be stand-ins for documents
    the percolator rejected). Raises ValueError for a matched document without a usable
    ``user_id`` or ``last_seen``.

    How: the masks become a rule x 64-document word matrix (numpy); the nonzero words are
    unpacked into (rule, document) pairs sorted by rule, per event hour. Matches per (rule, hour)
    are run lengths, users per (rule, hour) are slices of the pairs' user ids, and dimension
    counts are one ``bincount`` of rule x (dimension, value) codes per day. Only the output
    (sets and dicts of the CounterBatch) is built in Python.

    With the C module (``USE_C``): ``_aggregate.prepare`` does the per-document step for plain
    dicts (None for anything unusual: then :func:`_prepare`, the reference, does it, or raises) and
    ``_aggregate.emit`` walks each rule's mask into the CounterBatch; same result.

    ``seen`` (a :class:`~rules_service.counters.seen.SeenUsers`, from ``seen.new_seen_users``: the
    C one on the C path, the Python one otherwise): users it records as already in a sketch are
    left out of ``users``, and the others are recorded (see that module). Counts are unchanged."""
    # Millions of short-lived containers per second: the cyclic GC would run every 700 of them and
    # walk the live documents each time (measured: ~40% of the time). Nothing here makes cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _aggregate_masks(docs, rule_ids, masks, dimensions, batch, count_matches, seen)
    finally:
        if gc_was_enabled:
            gc.enable()


def _aggregate_masks(docs: Sequence[Mapping[str, Any]], rule_ids: Sequence[str], masks: Sequence[int],
                     dimensions: Sequence[str], batch: CounterBatch | None, count_matches: bool,
                     seen: Any = None) -> CounterBatch:
    import numpy as np

    if len(rule_ids) != len(masks):
        raise ValueError(f"{len(rule_ids)} rule ids but {len(masks)} masks")
    out = CounterBatch() if batch is None else batch
    size = len(docs)
    live_masks = list(filter(None, masks))  # rules that matched something (most match nothing)
    if not live_masks or not size:
        return out
    live_ids = list(compress(rule_ids, masks)) if len(live_masks) < len(masks) else list(rule_ids)
    union = 0
    for mask in live_masks:
        union |= mask
    if union >> size:
        raise ValueError(f"a mask has bits beyond the {size} documents")

    n_words = (size + 63) // 64
    want_dims = count_matches and bool(dimensions)
    use_c = USE_C and _aggregate is not None
    if seen is not None and not isinstance(seen, _aggregate.SeenUsers if use_c else SeenUsers):
        raise TypeError(f"aggregate_masks: seen is a {type(seen).__name__}, not the SeenUsers of the "
                        f"{'C' if use_c else 'Python'} path (make it with seen.new_seen_users)")
    if use_c:
        paths = [tuple(dimension.split(".")) for dimension in dimensions]
        prepared = _aggregate.prepare(docs, union.to_bytes(n_words * 8, "little"), list(dimensions), paths,
                                      want_dims)
        if prepared is None:  # an unusual batch (see _aggregate.c): the Python twin reads it, or raises
            prepared = _prepared_for_c(*_prepare(docs, union, dimensions, want_dims))
        uids, hour_codes, hours, codes, code_width, code_dims, code_values = prepared
        _emit_c(out, live_ids, live_masks, n_words, uids, hour_codes, hours, codes, code_width, code_dims,
                code_values, count_matches, seen)
        return out
    live = list(zip(live_ids, live_masks, strict=True))

    user_ids, codes_of_hour, distinct_hours, doc_codes, pair_of_code = _prepare(docs, union, dimensions, want_dims)
    entries = None if seen is None else seen.entries(
        user_ids, [None if code < 0 else distinct_hours[code] for code in codes_of_hour.tolist()])
    # the rule x word matrix of the masks (64 documents per little-endian word), in rule chunks
    width = n_words * 8
    uid_array = np.array(user_ids, dtype=object)
    rules_per_chunk = max(1, _WORDS_PER_CHUNK // n_words)
    hour_words = None
    if len(distinct_hours) > 1:
        hour_words = []
        for h in range(len(distinct_hours)):
            bits = np.zeros(n_words * 64, dtype=np.uint8)
            bits[:size] = codes_of_hour == h
            hour_words.append(np.packbits(bits, bitorder="little").view("<u8"))
    for first in range(0, len(live), rules_per_chunk):
        chunk = live[first : first + rules_per_chunk]
        words = np.frombuffer(b"".join(m.to_bytes(width, "little") for _, m in chunk), dtype="<u8")
        words = words.reshape(len(chunk), n_words)
        for h, hour in enumerate(distinct_hours):
            picked = words if hour_words is None else words & hour_words[h]
            rows_, cols = np.nonzero(picked)
            if not len(rows_):
                continue
            bits = np.unpackbits(picked[rows_, cols].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
            k, j = np.nonzero(bits)
            pair_rule = rows_[k]
            pair_doc = cols[k] * 64 + j
            _emit(out, chunk, hour, pair_rule, pair_doc, uid_array, doc_codes, pair_of_code, count_matches,
                  seen, entries)
    return out


def _prepare(docs: Sequence[Any], union: int, dimensions: Sequence[str], want_dims: bool
             ) -> tuple[list[str], Any, list[int], Any, list[tuple[str, str]]]:
    """The per-document step of aggregate_masks (the reference of ``_aggregate.prepare``): each
    document's user id ("" when no rule matched it and it has none), the code of its event hour among
    the sorted distinct hours (-1: not counted), and its (dimension, value) codes as a padded matrix
    (code ``len(pair_of_code)`` = nothing; None when no document has any). Raises ValueError for a
    matched document without a usable ``user_id`` or ``last_seen``."""
    import numpy as np

    user_ids: list[str] = []
    hours: list[int] = []
    for i, doc in enumerate(docs):
        uid = doc.get("user_id") if isinstance(doc, Mapping) else None
        last_seen = doc.get("last_seen") if isinstance(doc, Mapping) else None
        if type(uid) is not str or not uid or type(last_seen) is not str:
            if not (union >> i) & 1:  # not matched by any rule: ignored
                user_ids.append("")
                hours.append(-1)
                continue
            if type(uid) is not str or not uid:
                raise ValueError(f"document without a user_id: {doc!r:.200}")
            raise ValueError(f"document of user {uid!r} without a last_seen time")
        user_ids.append(uid)
        hours.append(hour_of_last_seen(last_seen))
    size = len(user_ids)
    distinct_hours = sorted(set(hours) - {-1})
    hour_code = {h: k for k, h in enumerate(distinct_hours)}
    codes_of_hour = np.fromiter((hour_code.get(h, -1) for h in hours), dtype=np.int64, count=size)

    # per document, its (dimension, value) codes: a padded matrix, code ``n_codes`` = nothing
    pair_of_code: list[tuple[str, str]] = []
    doc_codes = None
    if want_dims:
        rows, pair_of_code = _dimension_codes(docs, hours, dimensions)
        widest = max(map(len, rows), default=0)
        n_codes = len(pair_of_code)
        if n_codes and widest:
            doc_codes = np.full((size, widest), n_codes, dtype=np.int64)
            if all(len(row) == widest for row in rows):  # the usual case: every document has every dimension
                doc_codes[:] = rows
            else:
                for i, row in enumerate(rows):
                    if row:
                        doc_codes[i, : len(row)] = row
    return user_ids, codes_of_hour, distinct_hours, doc_codes, pair_of_code


def _prepared_for_c(user_ids: list[str], codes_of_hour: Any, distinct_hours: list[int], doc_codes: Any,
                    pair_of_code: list[tuple[str, str]]) -> tuple[list[str], bytes, list[int], bytes, int, list[str],
                                                                  list[str]]:
    """:func:`_prepare`'s result in the shape ``_aggregate.prepare`` returns and ``_aggregate.emit``
    reads: int32 bytes, codes padded with -1 (b"" and width 0 without codes), dimensions and values
    of the codes as two lists."""
    import numpy as np

    if doc_codes is None:
        codes, code_width = b"", 0
    else:
        padded = np.where(doc_codes == len(pair_of_code), -1, doc_codes).astype(np.int32)
        codes, code_width = padded.tobytes(), int(padded.shape[1])
    return (user_ids, codes_of_hour.astype(np.int32).tobytes(), distinct_hours, codes, code_width,
            [d for d, _ in pair_of_code], [v for _, v in pair_of_code])


def _emit_c(out: CounterBatch, rule_ids: list[str], masks: list[int], n_words: int, user_ids: list[str],
            hour_codes: bytes, distinct_hours: list[int], codes: bytes, code_width: int, code_dims: list[str],
            code_values: list[str], count_matches: bool, seen: Any = None) -> None:
    """The per-(rule, document) work of aggregate_masks in C (see ``_aggregate.c``); same result as
    the numpy + Python path. ``hour_codes`` and ``codes`` are int32 bytes, codes padded with -1."""
    little: Literal["little"] = "little"
    words = b"".join(map(int.to_bytes, masks, repeat(n_words * 8), repeat(little)))
    assert _aggregate is not None
    _aggregate.emit(
        out.users, out.matches, out.dimensions, rule_ids, words, n_words, user_ids, hour_codes,
        distinct_hours, [h - h % DAY for h in distinct_hours], codes, code_width, code_dims, code_values,
        count_matches, seen)


def _dimension_codes(docs: Sequence[Any], hours: Sequence[int], dimensions: Sequence[str]
                     ) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """Per document (``hours[i] == -1``: skipped), the codes of its (dimension, value) pairs as
    :func:`_dimension_pairs` gives them, and the pair of each code. Plain string values in plain
    dicts, the usual case, take a fast path: a dict lookup or two and one code lookup per
    dimension (this runs for every matched document of the stream and of replays)."""
    split = [tuple(dimension.split(".")) for dimension in dimensions]
    # per dimension: its top-level key, its second-level key or None, the rest of the path
    plan: list[tuple[str, str, str | None, tuple[str, ...], dict[str, int]]] = [
        (dimension, parts[0], parts[1] if len(parts) > 1 else None, parts[2:], {})
        for dimension, parts in zip(dimensions, split, strict=True)
    ]
    pair_of_code: list[tuple[str, str]] = []
    rows: list[list[int]] = []
    append_row = rows.append
    for doc, hour in zip(docs, hours, strict=True):
        row: list[int] = []
        append_row(row)
        if hour == -1:
            continue
        plain = type(doc) is dict
        for dimension, first, second, rest, code_of in plan:
            value: Any = doc.get(first) if plain else (doc.get(first) if isinstance(doc, Mapping) else None)
            if second is not None and value is not None:
                if type(value) is dict:
                    value = value.get(second)
                else:
                    value = value.get(second) if isinstance(value, Mapping) else None
                for part in rest:
                    if value is None:
                        break
                    value = value.get(part) if isinstance(value, Mapping) else None
            if value is None:
                continue
            if type(value) is str:
                code = code_of.get(value)
                if code is None:
                    code = code_of[value] = len(pair_of_code)
                    pair_of_code.append((dimension, value))
                row.append(code)
                continue
            if type(value) is list:
                texts: Iterable[str] = [t for t in dict.fromkeys(_field_text(item) for item in value) if t is not None]
            else:
                text = _field_text(value)
                if text is None:
                    continue
                texts = (text,)
            for text in texts:
                code = code_of.get(text)
                if code is None:
                    code = code_of[text] = len(pair_of_code)
                    pair_of_code.append((dimension, text))
                row.append(code)
    return rows, pair_of_code


def _emit(out: CounterBatch, chunk: Sequence[tuple[str, int]], hour: int, pair_rule: Any, pair_doc: Any,
          uid_array: Any, doc_codes: Any, pair_of_code: Sequence[tuple[str, str]], count_matches: bool,
          seen: Any = None, entries: Sequence[Any] | None = None) -> None:
    """Add the (rule, document) pairs of one hour (sorted by rule, then document) to ``out``; with
    ``seen``, only the users it has not recorded (``entries``: each document's, from ``seen.entries``)."""
    import numpy as np

    n = len(pair_rule)
    starts = np.flatnonzero(np.concatenate(([True], pair_rule[1:] != pair_rule[:-1])))
    ends = np.append(starts[1:], n)
    rule_rows = pair_rule[starts].tolist()
    bounds = list(zip(starts.tolist(), ends.tolist(), strict=True))
    day = hour - hour % DAY
    uids = uid_array[pair_doc].tolist()
    docs_of_pairs = pair_doc.tolist() if seen is not None else None
    users, matches = out.users, out.matches
    for row, (a, b) in zip(rule_rows, bounds, strict=True):
        rid = chunk[row][0]
        if docs_of_pairs is None:
            picked = day_picked = set(uids[a:b])
        else:
            assert entries is not None
            picked, day_picked = set(), set()
            for uid, i in zip(uids[a:b], docs_of_pairs[a:b], strict=True):
                to_hour, to_day = seen.unseen(entries[i], rid, hour)
                if to_hour:
                    picked.add(uid)
                if to_day:
                    day_picked.add(uid)
        # (with seen, all may be in the sketches already: then no key at all)
        if picked:
            _add_users(users, (rid, "hour", hour), picked)
        if day_picked:
            _add_users(users, (rid, "day", day), day_picked)
        if count_matches:
            count = b - a
            key = (rid, "hour", hour)
            matches[key] = matches.get(key, 0) + count
            key = (rid, "day", day)
            matches[key] = matches.get(key, 0) + count
    if not count_matches or doc_codes is None:
        return
    # dimension counts: one bincount of (rule slot, code) per chunk of rules
    width = len(pair_of_code) + 1  # the last code is "no value"
    slot_of_pair = np.repeat(np.arange(len(rule_rows), dtype=np.int64), ends - starts)
    per_chunk = max(1, _CELLS_PER_CHUNK // width)
    dims = out.dimensions
    for lo in range(0, len(rule_rows), per_chunk):
        hi = min(len(rule_rows), lo + per_chunk)
        a, b = int(starts[lo]), int(ends[hi - 1])
        cells = (slot_of_pair[a:b, None] - lo) * width + doc_codes[pair_doc[a:b]]
        counts = np.bincount(cells.ravel(), minlength=(hi - lo) * width).reshape(hi - lo, width)[:, :-1]
        slots, codes = np.nonzero(counts)
        values = counts[slots, codes].tolist()
        for slot, code, count in zip(slots.tolist(), codes.tolist(), values, strict=True):
            dimension, value = pair_of_code[code]
            dkey = (chunk[rule_rows[lo + slot]][0], day, dimension)
            target = dims.get(dkey)
            if target is None:
                dims[dkey] = {value: count}
            else:
                target[value] = target.get(value, 0) + count
