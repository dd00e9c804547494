"""Which users a stream process already added to which audience sketches this hour and this day.

Adding a user to a HyperLogLog that holds it changes nothing, yet it was most of the stream's Redis
work: every matched bid sent its user to the hour and the day sketch of each of its ~60 audiences,
and a user's bids repeat within an hour, and within a day. A :class:`SeenUsers` remembers the
(user, rule) pairs this process has added to the sketches of the user's current hour and day, so
``aggregate_masks`` leaves out the users the sketches hold already (counts are never filtered:
every matched bid is counted). The sketches end up the same as without it, register for register.

Rules (the C twin ``rules_service.counters._aggregate.SeenUsers`` follows them exactly, and the
tests compare the two):

* Per user, one entry: an hour, its UTC day, the rule ids recorded for the day and, among them, those
  recorded for the hour. A document of a later hour moves the entry on to that hour: the hour
  records go (they are no use to later documents), the day records stay if the day is the same. A
  document of an earlier hour than the entry's (a late bid) adds its user and records nothing.
* A batch first resolves each counted document's entry, in document order; then each (document,
  rule) pair whose entry is at the document's hour adds its user to the hour sketch unless the
  rule is recorded for the hour, and to the day sketch unless it is recorded for the day, and
  records what it added. Other pairs add their user to both and record nothing.
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

from rules_service.counters.keys import DAY

#: Default bound (records: (user, rule) pairs of the users' current days): about 24 bytes each in C
#: (a 4-byte slot of a half-full table, plus the user's entry and index), so ~100 MB per stream
#: process at the bound. (A user's table holds its current day's rules: one grown past 1 KB for a
#: busy day is freed when the user moves on to a later day, so it is not kept through quiet days.)
DEFAULT_MAX_RECORDS = 4_000_000


class SeenUsers:
    """The Python reference of the (user, rule) records of each user's hour and day (see the module)."""

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise ValueError("SeenUsers: max_records must be at least 1")
        self.max_records = max_records
        self.records = 0
        # user id -> [hour, day, rule ids recorded for the hour, rule ids recorded for the day]
        self._users: dict[str, list[Any]] = {}

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
            day = hour - hour % DAY
            entry = self._users.get(uid)
            if entry is None:
                entry = self._users[uid] = [hour, day, set(), set()]
            elif entry[0] > hour:  # a late document
                out.append(None)
                continue
            elif entry[0] < hour and entry[1] == day:  # a later hour of the same day
                entry[0], entry[2] = hour, set()
            elif entry[0] < hour:
                self.records -= len(entry[3])
                entry[:] = [hour, day, set(), set()]
            out.append(entry)
        return out

    def unseen(self, entry: list[Any] | None, rule_id: Any, hour: int) -> tuple[bool, bool]:
        """Whether the pair must add its user to the hour sketch and to the day sketch (what it adds
        is now recorded, where it can be)."""
        if entry is None or entry[0] != hour or type(rule_id) is not str:
            return True, True
        hour_rules: set[str] = entry[2]
        if rule_id in hour_rules:
            return False, False
        hour_rules.add(rule_id)
        day_rules: set[str] = entry[3]
        if rule_id in day_rules:
            return True, False
        day_rules.add(rule_id)
        self.records += 1
        return True, True


def new_seen_users(max_records: int = DEFAULT_MAX_RECORDS) -> Any:
    """The SeenUsers that ``aggregate_masks`` takes on this machine: the C one when the C steps are
    built and on (``aggregate.USE_C``), else the Python one."""
    from rules_service.counters import aggregate

    if aggregate.USE_C and aggregate._aggregate is not None:
        return aggregate._aggregate.SeenUsers(max_records)
    return SeenUsers(max_records)
