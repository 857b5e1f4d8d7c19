"""Walking mostly-empty metadata tables (L1 tables, the refcount table).

Their sizes are numbers read from the image (an L1 table may claim 4M entries), and
everything past the end of the file reads as zeroes: a walk over every entry in
Python would cost time proportional to such a number, not to the file.  Runs of
zero entries are skipped a chunk at a time at C speed instead.
"""
from __future__ import annotations

from itertools import compress

CHUNK = 4096


def nonzero_indexes(table, n: int | None = None):
    """Indexes of the nonzero entries of ``table[:n]`` (list, tuple or array of ints),
    in order.  The table may be changed while walking (entries already yielded)."""
    n = len(table) if n is None else min(n, len(table))
    for base in range(0, n, CHUNK):
        chunk = table[base:min(n, base + CHUNK)]
        if chunk.count(0) == len(chunk):
            continue
        for i in compress(range(len(chunk)), chunk):
            yield base + i
