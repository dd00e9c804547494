"""A hostile key for the C accelerators' safety tests: Python code run in the middle of C code."""

from __future__ import annotations

from collections.abc import Callable


class Meddler(str):
    """A str whose hash runs ``Meddler.action`` once (then clears it): a user id or rule id that
    changes what the C code is reading (empties a list, drops a set) while it reads it."""

    action: Callable[[], object] | None = None

    def __hash__(self) -> int:
        action, type(self).action = type(self).action, None
        if action is not None:
            action()
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)
