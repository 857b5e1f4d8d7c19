"""quorum (QEMU 7.2 block/quorum.c): N replicas, reads decided by vote.

Writes go to every child and succeed when at least ``vote-threshold`` children
succeed.  With read-pattern 'quorum' a read reads every child and returns the content
that at least ``vote-threshold`` children agree on; children that disagree (or fail)
are reported with QUORUM_REPORT_BAD and, with rewrite-corrupted, rewritten with the
winning data; without a quorum the read fails with EIO and QUORUM_FAILURE.  With
read-pattern 'fifo' a read returns the first child's data that can be read.
Children are named children.N; x-blockdev-change adds and removes them at run time.
"""
from __future__ import annotations

import errno
import hashlib
import os

from ...errors import BlockError, InvalidArgument
from ...graph.child import ChildRole
from ...graph.perms import Perm
from ..base import BlockDriver, DriverInfo, DriverKind

SECTOR = 512
_DEFAULT_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
_DEFAULT_UNCHANGED = Perm.all() & ~_DEFAULT_PASSTHROUGH


class QuorumDriver(BlockDriver):
    info = DriverInfo("quorum", DriverKind.FORMAT)

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        return {}           # children.N are opened by open() from the 'children' list

    # ---- life cycle -----------------------------------------------------------------
    def open(self, options: dict) -> None:
        refs = options.get("children")
        if not isinstance(refs, list):
            raise InvalidArgument("Option children is not a valid array")
        if len(refs) < 1:
            raise InvalidArgument("Number of provided children must be 1 or more")
        self.threshold = options.get("vote-threshold", 0)
        self._valid_threshold(self.threshold, len(refs))
        self.read_pattern = options.get("read-pattern", "quorum")
        if self.read_pattern not in ("quorum", "fifo"):
            raise InvalidArgument("Please set read-pattern as fifo or quorum")
        self.is_blkverify = False
        self.rewrite_corrupted = False
        if self.read_pattern == "quorum":
            self.is_blkverify = bool(options.get("blkverify", False))
            if self.is_blkverify and (len(refs) != 2 or self.threshold != 2):
                raise InvalidArgument("blkverify=on can only be set if there are exactly "
                                      "two files and vote-threshold is 2")
            self.rewrite_corrupted = bool(options.get("rewrite-corrupted", False))
            if self.rewrite_corrupted and self.is_blkverify:
                raise InvalidArgument("rewrite-corrupted=on cannot be used with "
                                      "blkverify=on")
        graph = self.node.graph
        inherit = {"read-only": self.node.read_only, "force-share": self.node.force_share}
        for i, ref in enumerate(refs):
            child = graph.resolve_ref(ref, inherit)
            graph.attach_child(self.node, child, "children.%d" % i, ChildRole.DATA)
        self.next_child_index = len(refs)

    @staticmethod
    def _valid_threshold(threshold: int, num_children: int) -> None:
        if threshold < 1:
            raise InvalidArgument("Parameter 'vote-threshold' expects a value >= 1")
        if threshold > num_children:
            raise InvalidArgument("threshold may not exceed children count")

    @property
    def children(self) -> list:
        return [c for c in self.node.children if c.name.startswith("children.")]

    # ---- x-blockdev-change ------------------------------------------------------------
    def add_child(self, node) -> None:
        """Attach ``node`` as the next children.N (the caller checked it has no parent)."""
        if self.is_blkverify:
            raise BlockError("Cannot add a child to a quorum in blkverify mode")
        name = "children.%d" % self.next_child_index
        self.next_child_index += 1
        try:
            self.node.graph.attach_child(self.node, node, name, ChildRole.DATA)
        except BaseException:
            self.next_child_index -= 1
            raise

    def remove_child(self, child) -> None:
        if len(self.children) <= self.threshold:
            raise BlockError("The number of children cannot be lower than the vote "
                             "threshold %d" % self.threshold)
        if child.name == "children.%d" % (self.next_child_index - 1):
            self.next_child_index -= 1
        self.node.graph.detach_child(child)

    # ---- permissions, geometry ----------------------------------------------------------
    def child_perm(self, child, perm, shared):
        nperm = perm & _DEFAULT_PASSTHROUGH
        if self.rewrite_corrupted:
            nperm |= Perm.WRITE
        nshared = (shared & (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)) | _DEFAULT_UNCHANGED
        return nperm, nshared

    def get_length(self) -> int:
        children = self.children
        length = children[0].node.total_size
        for c in children[1:]:
            if c.node.total_size != length:
                raise BlockError("Input/output error", errno=errno.EIO)
        return length

    def request_alignment(self) -> int:
        return max([c.node.request_alignment for c in self.children] or [1])

    def allocated_file_size(self):
        return None

    # ---- events -----------------------------------------------------------------------
    def _sectors(self, offset: int, length: int) -> dict:
        start = offset // SECTOR
        end = -(-(offset + length) // SECTOR)
        return {"sector-num": start, "sectors-count": end - start}

    def _report_bad(self, kind: str, child, offset: int, length: int,
                    error: BaseException | None = None) -> None:
        data = {"type": kind}
        if error is not None:
            code = getattr(error, "errno", None)
            data["error"] = os.strerror(code) if code else str(error)
        data["node-name"] = child.node.node_name
        data.update(self._sectors(offset, length))
        self.node.graph.events.emit("QUORUM_REPORT_BAD", data)

    def _failure(self, offset: int, length: int) -> BlockError:
        data = {"reference": self.node.node_name}
        data.update(self._sectors(offset, length))
        self.node.graph.events.emit("QUORUM_FAILURE", data)
        return BlockError("Input/output error", errno=errno.EIO)

    # ---- I/O -----------------------------------------------------------------------------
    def preadv(self, offset: int, buf: memoryview) -> None:
        if self.read_pattern == "fifo":
            self._read_fifo(offset, buf)
        else:
            self._read_quorum(offset, buf)

    def _read_fifo(self, offset: int, buf: memoryview) -> None:
        last = None
        for c in self.children:
            try:
                c.node.preadv(offset, buf)
                return
            except BlockError as e:
                self._report_bad("read", c, offset, len(buf), e)
                last = e
        raise last if last is not None else BlockError("Input/output error",
                                                       errno=errno.EIO)

    def _read_quorum(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        results = []            # (child, data | None, error | None)
        for c in self.children:
            try:
                results.append((c, c.node.pread(offset, length), None))
            except BlockError as e:
                results.append((c, None, e))
        ok = [(c, d) for c, d, e in results if e is None]
        for c, d, e in results:
            if e is not None:
                self._report_bad("read", c, offset, length, e)
        if len(ok) < self.threshold:
            raise self._failure(offset, length)
        versions: dict[bytes, list] = {}
        order: list[bytes] = []
        for c, d in ok:
            key = hashlib.sha256(d).digest()
            if key not in versions:
                versions[key] = []
                order.append(key)
            versions[key].append((c, d))
        # the most voted version; the first one seen wins a tie
        winner_key = max(order, key=lambda k: len(versions[k]))
        winner = versions[winner_key]
        if len(winner) < self.threshold:
            raise self._failure(offset, length)
        data = winner[0][1]
        for key in order:
            if key == winner_key:
                continue
            for c, _ in versions[key]:
                self._report_bad("read", c, offset, length)
                if self.rewrite_corrupted:
                    try:
                        c.node.pwrite(offset, data)
                    except BlockError:
                        pass
        buf[:] = data

    def _all(self, kind: str, fn, offset: int, length: int) -> None:
        successes = 0
        for c in self.children:
            try:
                fn(c.node)
                successes += 1
            except BlockError as e:
                self._report_bad(kind, c, offset, length, e)
        if successes < self.threshold:
            raise self._failure(offset, length)

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._all("write", lambda n: n.pwrite(offset, data, fua), offset, len(data))

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._all("write", lambda n: n.pwrite_zeroes(offset, length, may_unmap),
                  offset, length)

    def flush(self) -> None:
        """Nothing of its own: the generic layer flushes every child afterwards."""

    def get_info(self):
        return None
