"""Turning per-rule document masks into per-document lists of rule ids ("scatter").

A batch evaluates each candidate rule to a bitmask of the documents it matches (bit ``i`` =
document ``i``). Callers want the transpose: for each document, the sorted ids of its rules. With
~90 matches per document at 10,000 rules (~900 at 100,000) this is most of the output work.

:func:`scatter_lists` does it with numpy, column by column: the masks become a rules x bytes
matrix, viewed as 16-document words and transposed so that each word column is contiguous; for
each column, the rules with any bit set are unpacked into a documents x rules 0/1 block whose
non-zero entries come out document-major with rules in ascending order, so each document's list
is one slice of an object array of rule ids, already sorted when the rules were given sorted.
:func:`scatter_python` is the pure-Python version (no numpy, used for tiny batches and as the
reference of the tests).

With the C accelerator built (``percolators._eval``, switched like the evaluator by
``percolators.programs._eval``), :func:`scatter` uses its ``scatter`` instead of numpy's: the masks
gathered word-major, each document's list allocated at its exact size and filled 64 documents at
a time (see ``_eval.c``). ``EmbeddedPercolator.percolate`` does not even get here with it: the
evaluation hands the lists over directly (``programs.run_lists``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, repeat
from typing import Any

from percolators import programs

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a core dependency; stay usable without it
    np = None  # type: ignore[assignment]

#: Above this many matching documents a rule's matches are scattered with C-level iterators.
DENSE_SCATTER = 96
#: Below this many (rule, document) matches the pure-Python scatter is as fast as numpy's.
NUMPY_MIN_MATCHES = 2048
#: Bytes per column word (16 documents): a good balance between per-column Python overhead and
#: the zero padding unpacked for rules matching few of a column's documents.
_WORD = 2
#: Rules per block of the transposition (a block of rows stays in the CPU caches).
_TRANSPOSE_BLOCK = 1024
_WORD_TYPES = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}

_BITS_OF_BYTE = [bytes((byte >> bit) & 1 for bit in range(8)) for byte in range(256)]
_append = list.append
_drain: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend


def scatter(matched: Sequence[str], masks: Sequence[int], size: int) -> list[list[str]]:
    """Per document ``0..size-1``, the ids of ``matched`` (in their order) whose mask has its bit.

    Bits at or above ``size`` must not be set."""
    accelerated = programs._eval
    if accelerated is not None:
        lists: list[list[str]] = accelerated.scatter(matched, masks, size)
        return lists
    if np is not None and size >= 64 and len(matched) > 1:
        total = 0
        for mask in masks:
            total += mask.bit_count()
            if total >= NUMPY_MIN_MATCHES:
                return scatter_numpy(matched, masks, size)
    lists = [[] for _ in range(size)]
    scatter_python(matched, masks, lists)
    return lists


def scatter_numpy(matched: Sequence[str], masks: Sequence[int], size: int) -> list[list[str]]:
    word = _WORD
    docs_per_word = 8 * word
    nbytes = -(-size // docs_per_word) * word
    count = len(matched)
    out: list[list[str]] = []
    if not count:
        return [[] for _ in range(size)]
    buffer = bytearray(count * nbytes)  # filled in place: no list of 100,000 bytes objects to join
    offset = 0
    for mask in masks:
        buffer[offset : offset + nbytes] = mask.to_bytes(nbytes, "little")
        offset += nbytes
    packed = np.frombuffer(buffer, dtype=np.uint8)
    # (words, rules): each row is one column of 16 documents over all rules, contiguous
    matrix = packed.reshape(count, nbytes).view(_WORD_TYPES[word])
    columns = np.empty((matrix.shape[1], count), dtype=matrix.dtype)
    for start in range(0, count, _TRANSPOSE_BLOCK):  # blocked: several times faster than at once
        columns[:, start : start + _TRANSPOSE_BLOCK] = matrix[start : start + _TRANSPOSE_BLOCK].T
    del matrix, packed, buffer
    ids = np.empty(count, dtype=object)
    ids[:] = matched
    flatnonzero, unpackbits, count_nonzero = np.flatnonzero, np.unpackbits, np.count_nonzero
    for number, column in enumerate(columns):
        docs = min(size - number * docs_per_word, docs_per_word)
        rules = flatnonzero(column)
        if not rules.size:
            out.extend([] for _ in range(docs))
            continue
        # (docs, rules with any bit in this column): byte b bit k -> document 8b + k
        bits = unpackbits(column[rules].view(np.uint8).reshape(-1, word).T, axis=0, bitorder="little")[:docs]
        bits = bits.view(np.bool_)
        names = ids[rules[flatnonzero(bits) % rules.size]]
        start = 0
        for end in count_nonzero(bits, axis=1).cumsum().tolist():
            out.append(names[start:end].tolist())
            start = end
    return out


def scatter_python(matched: Sequence[str], masks: Sequence[int], lists: list[list[str]]) -> None:
    """For each rule (in order), append its id to the lists of the documents in its mask."""
    appenders = [target.append for target in lists]
    selector_bytes = (len(lists) + 7) // 8
    for rule_id, mask in zip(matched, masks, strict=True):
        if not mask:
            continue
        if mask & (mask - 1) == 0:  # one document
            appenders[mask.bit_length() - 1](rule_id)
        elif mask.bit_count() > DENSE_SCATTER:
            # many documents: one byte per document selects their lists, all in C
            selectors = b"".join(map(_BITS_OF_BYTE.__getitem__, mask.to_bytes(selector_bytes, "little")))
            _drain(map(_append, compress(lists, selectors), repeat(rule_id)))
        else:
            text = bin(mask)  # bit 0 is the last character: string index i is bit (top - i)
            top = len(text) - 1
            find = text.find
            i = find("1", 2)
            while i >= 0:
                appenders[top - i](rule_id)
                i = find("1", i + 1)
