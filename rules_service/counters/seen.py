"""Which users a stream process already added to which audience sketches this hour.

Adding a user to a HyperLogLog that holds it changes nothing, yet it was most of the stream's Redis
work: every matched bid sent its user to the hour and the day sketch of each of its ~60 audiences,
and a user's bids repeat within an hour. A :class:`SeenUsers` remembers the (user, rule, hour)
triples this process has added, so ``aggregate_masks`` leaves out the users the sketches hold
already (counts are never filtered: every matched bid is counted). The sketches end up the same as
without it, register for register.

Rules (the C twin ``rules_service.counters._aggregate.SeenUsers`` follows them exactly, and the
tests compare the two):

* Per user, one entry: an hour and the rule ids recorded for it. A document of a later hour moves
  the entry on to that hour (the earlier hour's records are no use to later documents); a document
  of an earlier hour than the entry's (a late bid) adds its user and records nothing.
* A batch first resolves each counted document's entry, in document order; then each (document,
  rule) pair whose entry is at the document's hour and has the rule recorded adds no user, and the
  others add theirs and are recorded.
* Only plain ``str`` user ids and rule ids are recorded.
* Memory is bounded: a batch that starts with more than ``max_records`` records clears them first.

Correctness rests on the records describing what Redis holds, so the owner must :meth:`clear` it
whenever written counters may be lost or not written: a failed or abandoned window, a counter store
that went back in time. Records are made when a batch is aggregated, before its window is written:
a window that fails is abandoned, and clearing then drops them. Deleted counters need nothing:
only a deleted audience's are deleted, and its rule ids never match again (audience ids are
generated, versions only grow; a paused audience keeps its counters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Default bound (records): about 24 bytes each in C (a 4-byte slot of a half-full table, plus the
#: user's entry and index), so ~100 MB per stream process at the bound. (A user's table holds its
#: current hour's rules: one grown past 1 KB for a busy hour is freed when the user moves on, so it is not
#: kept through later quiet hours.)
DEFAULT_MAX_RECORDS = 4_000_000


class SeenUsers:
    """The Python reference of the (user, rule, hour) records (see the module)."""

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise ValueError("SeenUsers: max_records must be at least 1")
        self.max_records = max_records
        self.records = 0
        self._users: dict[str, list[Any]] = {}  # user id -> [hour, set of rule ids]

    @property
    def users(self) -> int:
        return len(self._users)

    def clear(self) -> None:
        """Forget every record (the sketches may have lost them)."""
        self._users.clear()
        self.records = 0

    def entries(self, user_ids: Sequence[Any], hours: Sequence[int | None]) -> list[list[Any] | None]:
        """Start a batch: each document's entry (None: its users are added and not recorded).
        ``hours[i]`` is document ``i``'s event hour, None when it is not counted."""
        if self.records > self.max_records:
            self.clear()
        out: list[list[Any] | None] = []
        for uid, hour in zip(user_ids, hours, strict=True):
            if hour is None or type(uid) is not str:
                out.append(None)
                continue
            entry = self._users.get(uid)
            if entry is None:
                entry = self._users[uid] = [hour, set()]
            elif entry[0] > hour:  # a late document
                out.append(None)
                continue
            elif entry[0] < hour:
                self.records -= len(entry[1])
                entry[0], entry[1] = hour, set()
            out.append(entry)
        return out

    def unseen(self, entry: list[Any] | None, rule_id: Any, hour: int) -> bool:
        """True when the pair must add its user (and it is now recorded, where it can be)."""
        if entry is None or entry[0] != hour or type(rule_id) is not str:
            return True
        rules: set[str] = entry[1]
        if rule_id in rules:
            return False
        rules.add(rule_id)
        self.records += 1
        return True


def new_seen_users(max_records: int = DEFAULT_MAX_RECORDS) -> Any:
    """The SeenUsers that ``aggregate_masks`` takes on this machine: the C one when the C steps are
    built and on (``aggregate.USE_C``), else the Python one."""
    from rules_service.counters import aggregate

    if aggregate.USE_C and aggregate._aggregate is not None:
        return aggregate._aggregate.SeenUsers(max_records)
    return SeenUsers(max_records)
