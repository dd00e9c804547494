"""Leak checks of the C accelerators: how much memory a piece of work keeps."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable


def bytes_kept(work: Callable[[], object], *, rounds: int, warmup: int = 3, traced_warmup: int = 0) -> int:
    """Bytes still allocated (tracemalloc) after ``rounds`` calls of ``work``, once ``warmup`` calls
    outside the trace and ``traced_warmup`` inside it have filled whatever caches the work keeps on
    purpose. A leak of one small object per call shows as ~``rounds`` x 50 bytes or more."""
    for _ in range(warmup):
        work()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(traced_warmup):
            work()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
