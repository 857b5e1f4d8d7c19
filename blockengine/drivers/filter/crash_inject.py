"""crash-inject: a test filter that simulates a host crash after the Nth write.

Theory of operation: the filter models the page cache of its 'file' child.  Writes,
zero writes, discards and truncations are queued in order (and visible to reads
through the filter) until a flush makes them durable by applying them to the child.
When the write counter reaches ``crash-after``, the machine "crashes": of the queued
(unflushed) operations, none (``mode=drop``), all (``mode=keep``) or a random
subset chosen with ``seed`` (``mode=random``: the kernel writes dirty pages back in
any order) reach the child; every later request fails with EIO and nothing more is
persisted.  After the test drops the graph, the child file holds exactly what a
crashed host would have on disk.

Options: ``crash-after`` (int, -1 = never), ``mode`` (drop|keep|random), ``seed``.
The ``state`` attribute counts writes (``writes``) and tells whether it crashed.
"""
from __future__ import annotations

import errno
import random

from ...errors import IOFailure
from ..base import DriverInfo, DriverKind
from .common import PassthroughFilter


class CrashInjectDriver(PassthroughFilter):
    # a protocol-like wrapper: the image may grow through it (writes past EOF)
    info = DriverInfo("crash-inject", DriverKind.PROTOCOL)

    def open(self, options: dict) -> None:
        self.crash_after = int(options.get("crash-after", -1))
        self.mode = options.get("mode", "drop")
        if self.mode not in ("drop", "keep", "random"):
            from ...errors import InvalidArgument
            raise InvalidArgument("crash-inject: mode must be drop, keep or random")
        self.rng = random.Random(int(options.get("seed", 0)))
        self.pending: list[tuple] = []
        self.writes = 0
        self.crashed = False
        self._size = None

    # ---- the volatile view ------------------------------------------------------------
    def _dead(self):
        return IOFailure("Input/output error (crashed)", errno=errno.EIO)

    def get_length(self) -> int:
        if self._size is not None:
            return self._size
        return self.child_node.total_size

    def preadv(self, offset, buf):
        if self.crashed:
            raise self._dead()
        buf = memoryview(buf).cast("B")
        n = len(buf)
        size = self.child_node.total_size
        avail = max(0, min(n, size - offset))
        if avail:
            self.child_node.preadv(offset, buf[:avail])
        if avail < n:
            buf[avail:] = bytes(n - avail)
        for op in self.pending:
            kind = op[0]
            if kind == "w":
                _, off, data = op
                lo, hi = max(off, offset), min(off + len(data), offset + n)
                if lo < hi:
                    buf[lo - offset:hi - offset] = data[lo - off:hi - off]
            elif kind == "z":
                _, off, length = op
                lo, hi = max(off, offset), min(off + length, offset + n)
                if lo < hi:
                    buf[lo - offset:hi - offset] = bytes(hi - lo)
            elif kind == "t":
                _, size2 = op
                if size2 < offset + n:
                    lo = max(size2, offset)
                    buf[lo - offset:] = bytes(offset + n - lo)

    def _queue(self, op) -> None:
        if self.crashed:
            raise self._dead()
        self.pending.append(op)
        if op[0] in ("w", "z"):
            self.writes += 1
            if 0 <= self.crash_after <= self.writes:
                self.crash()
                raise self._dead()

    def pwritev(self, offset, data, fua=False):
        data = bytes(data)
        self._queue(("w", offset, data))
        end = offset + len(data)
        if end > self.get_length():
            self._size = end
        if fua:
            self.flush()

    def pwrite_zeroes(self, offset, length, may_unmap):
        self._queue(("z", offset, length))
        if offset + length > self.get_length():
            self._size = offset + length

    def discard(self, offset, length):
        if self.crashed:
            raise self._dead()

    def truncate(self, size, exact, prealloc):
        self._queue(("t", size))
        self._size = size

    def flush(self):
        if self.crashed:
            raise self._dead()
        self._apply(self.pending)
        self.pending = []
        self.child_node.flush()
        self._size = None

    # ---- crashing ---------------------------------------------------------------------
    def _apply(self, ops) -> None:
        child = self.child_node
        for op in ops:
            if op[0] == "w":
                child.pwrite(op[1], op[2])
            elif op[0] == "z":
                child.pwrite_zeroes(op[1], op[2], False)
            elif op[0] == "t":
                child.truncate(op[1])

    def crash(self) -> None:
        """Persist what the crash model lets through, then refuse everything."""
        if self.crashed:
            return
        if self.mode == "keep":
            survivors = self.pending
        elif self.mode == "drop":
            survivors = []
        else:
            survivors = [op for op in self.pending if self.rng.random() < 0.5]
        self._apply(survivors)
        self.pending = []
        self.crashed = True
        self._size = None
