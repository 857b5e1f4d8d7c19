"""Block nodes and the generic I/O layer above every driver (QEMU's block.c + io.c).

Theory of operation: a ``BlockNode`` owns one driver instance and edges to children
(``BdrvChild``).  Every request enters through a node method, which checks bounds,
aligns it to the driver's request alignment (read-modify-write under the node lock),
splits it at max_transfer, runs write notifiers (write threshold, dirty bitmaps,
copy-before-write filters) and only then calls the driver.  All driver calls for one
node are serialised by ``node.lock``; the file driver is the exception that reads and
writes without it (pread/pwrite are thread-safe and release the GIL).
"""
from __future__ import annotations

import itertools
import threading

from ..drivers.base import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BLOCK_OFFSET_VALID,
                            BLOCK_RAW, BLOCK_RECURSE, BLOCK_ZERO, DriverKind,
                            PreallocMode, Status)
from ..errors import BlockError, InvalidArgument, NotSupported
from ..io.request import (MAX_REQUEST_BYTES, align_down, align_up, check_request,
                          check_truncate, chunks, is_aligned)
from .child import BdrvChild, ChildRole
from .perms import Perm

SECTOR_SIZE = 512
_auto_name_counter = itertools.count()


def id_wellformed(name: str) -> bool:
    """QEMU's id_wellformed() (node names, job and object IDs): an ASCII letter, then
    ASCII letters, digits, '-', '.' and '_'."""
    return (name[:1].isascii() and name[:1].isalpha()
            and all(c.isascii() and (c.isalnum() or c in "-._") for c in name))


def validate_node_name(name: str) -> None:
    """bdrv_assign_node_name()'s checks, with QEMU's messages."""
    if not id_wellformed(name):
        raise InvalidArgument("Invalid node-name: '%s'" % name)
    if len(name) > 31:
        raise InvalidArgument("Node name too long")


def auto_node_name() -> str:
    return "#block%03d" % next(_auto_name_counter)


_PRIMARY = int(ChildRole.PRIMARY)
_COW = int(ChildRole.COW)
_FILTERED_OR_COW = int(ChildRole.FILTERED | ChildRole.COW)


class BlockNode:
    """A node of the block graph (QEMU's BlockDriverState)."""

    def __init__(self, graph, driver_cls, node_name: str | None, options: dict,
                 read_only: bool):
        self.graph = graph
        self.node_name = node_name or auto_node_name()
        self.monitor_owned = True    # cleared for children opened inline by a parent
        self.options = options
        self.read_only = read_only
        self.force_share = bool(options.get("force-share", False))
        # BDRV_O_NO_IO: opened for metadata only (qemu-img info), takes no read permission
        self.no_io = bool(options.get("x-no-io", False))
        self.children: list[BdrvChild] = []
        self.parents: list[BdrvChild] = []   # newest first, as QEMU's QLIST_INSERT_HEAD
        self.lock = threading.RLock()
        self.write_threshold = 0
        self.wr_highest_offset = 0
        # bdrv's write_gen/flushed_gen: a protocol flush with nothing written since the
        # last one skips the (costly, pointless) disk flush, as bdrv_co_flush() does
        self.write_gen = self.flushed_gen = 0
        # reasons operations on this node are refused (bdrv_op_block), e.g. a running job
        self.op_blockers: list[str] = []
        self.dirty_bitmaps: list = []
        # callables (node, offset, length) run before a write/zero/discard reaches the driver
        self.before_write_notifiers: list = []
        cache = options.get("cache", {}) or {}
        self.cache_direct = bool(cache.get("direct", False))
        self.cache_no_flush = bool(cache.get("no-flush", False))
        self.detect_zeroes = options.get("detect-zeroes", "off")
        self.discard_unmap = options.get("discard", "ignore") == "unmap"
        self.drv = driver_cls(self)

    # ---- identity ---------------------------------------------------------------
    @property
    def driver_name(self) -> str:
        return self.drv.info.name

    @property
    def is_format(self) -> bool:
        return self.drv.info.kind is DriverKind.FORMAT

    @property
    def is_filter(self) -> bool:
        return self.drv.info.kind is DriverKind.FILTER

    def check_op_blockers(self) -> None:
        """bdrv_op_is_blocked(): refuse with the newest blocker's reason, QEMU's wording."""
        if self.op_blockers:
            raise BlockError("Node '%s' is busy: %s" % (self.node_name, self.op_blockers[-1]))

    def parent_desc(self) -> str:
        return "node '%s'" % self.node_name

    def __repr__(self) -> str:
        return f"<BlockNode {self.node_name} {self.driver_name}>"

    # ---- children -----------------------------------------------------------------
    def child(self, name: str) -> BdrvChild | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    def file_child_node(self):
        c = self.child("file")
        return c.node if c else None

    @property
    def backing(self) -> "BlockNode | None":
        c = self.child("backing")
        return c.node if c else None

    # The role tests are on int(role): `&` of two IntFlags builds a new enum member,
    # five times slower, and block status asks these for every run of a huge image.
    def primary_child(self) -> BdrvChild | None:
        for c in self.children:
            if int(c.role) & _PRIMARY:
                return c
        return None

    def filtered_child(self) -> BdrvChild | None:
        """The child whose data this node shows unchanged (filters, and raw w/o offset)."""
        for c in self.children:
            if int(c.role) & _FILTERED_OR_COW:
                return c
        return None

    def cow_child(self) -> BdrvChild | None:
        for c in self.children:
            if int(c.role) & _COW:
                return c
        return None

    # ---- geometry -----------------------------------------------------------------
    @property
    def total_size(self) -> int:
        """bdrv_getlength(): the driver's length rounded up to whole 512-byte sectors."""
        return align_up(self.drv.get_length(), SECTOR_SIZE)

    def getlength(self) -> int:
        return self.total_size

    @property
    def request_alignment(self) -> int:
        return self.drv.request_alignment()

    def _bound(self) -> int | None:
        """Protocol nodes grow on writes past EOF (format metadata relies on it)."""
        if self.drv.info.kind is DriverKind.PROTOCOL:
            return None
        return self.total_size

    # ---- permissions (cumulative over parents) -----------------------------------
    def cumulative_perms(self, planned: dict | None = None) -> tuple[Perm, Perm]:
        perm, shared = Perm(0), Perm.all()
        for c in self.parents:
            p, s = planned.get(c, (c.perm, c.shared)) if planned else (c.perm, c.shared)
            perm |= p
            shared &= s
        return perm, shared

    # ---- I/O: reads -----------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytearray:
        """The data at offset as a new bytearray (not copied again into bytes: for large
        reads the second copy would cost as much as the read itself)."""
        buf = bytearray(length)
        self.preadv(offset, memoryview(buf))
        return buf

    def preadv(self, offset: int, buf) -> None:
        """Read len(buf) bytes at offset into buf (any writable buffer).  Never short."""
        buf = memoryview(buf).cast("B")
        length = len(buf)
        drv = self.drv
        # check_request() with the node's bound, inlined: this runs for every read
        if offset < 0 or length < 0 or offset > MAX_REQUEST_BYTES - length or (
                drv.info.kind is not DriverKind.PROTOCOL
                and offset + length > align_up(drv.get_length(), SECTOR_SIZE)):
            check_request(offset, length, self._bound())
        if length == 0:
            return
        align = drv.request_alignment()
        if align == 1 or is_aligned(offset, length, align):
            if length <= drv.max_transfer():     # _aligned_read() of one request
                if drv.thread_safe:
                    drv.preadv(offset, buf)
                else:
                    with self.lock:
                        drv.preadv(offset, buf)
            else:
                self._aligned_read(offset, buf)
            return
        start, end = align_down(offset, align), align_up(offset + length, align)
        bounce = bytearray(end - start)
        self._aligned_read(start, memoryview(bounce))
        buf[:] = bounce[offset - start:offset - start + length]

    def _aligned_read(self, offset: int, buf: memoryview) -> None:
        drv = self.drv
        maxt = drv.max_transfer()
        if len(buf) <= maxt:
            self._locked(drv.preadv, offset, buf)
            return
        pos = 0
        for off, n in chunks(offset, len(buf), maxt):
            self._locked(drv.preadv, off, buf[pos:pos + n])
            pos += n

    def _locked(self, fn, *args):
        if self.drv.thread_safe:
            return fn(*args)
        with self.lock:
            return fn(*args)

    # ---- I/O: writes ----------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise BlockError("Block node is read-only", errno=1)

    def _before_write(self, offset: int, length: int) -> None:
        for notify in list(self.before_write_notifiers):
            notify(self, offset, length)
        if self.write_threshold and offset + length > self.write_threshold:
            threshold, self.write_threshold = self.write_threshold, 0
            self.graph.events.emit("BLOCK_WRITE_THRESHOLD", {
                "node-name": self.node_name,
                "amount-exceeded": offset + length - threshold,
                "write-threshold": threshold})

    def _after_write(self, offset: int, length: int) -> None:
        self.write_gen += 1
        self.wr_highest_offset = max(self.wr_highest_offset, offset + length)
        for bitmap in self.dirty_bitmaps:
            bitmap.set_range(offset, length)

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        """Write all of data at offset (read-modify-write for unaligned edges)."""
        data = memoryview(data).cast("B")
        length = len(data)
        self._check_writable()
        check_request(offset, length, self._bound())
        if length == 0:
            return
        with self.lock:
            self._before_write(offset, length)
            if self.detect_zeroes != "off" and _is_zero(data):
                self._zero_aligned_middle(offset, length,
                                          self.detect_zeroes == "unmap" and self.discard_unmap)
                self._after_write(offset, length)
                return
            align = self.request_alignment
            if is_aligned(offset, length, align):
                self._aligned_write(offset, data, fua)
            else:
                start, end = align_down(offset, align), align_up(offset + length, align)
                bounce = bytearray(end - start)
                self._aligned_read(start, memoryview(bounce))
                bounce[offset - start:offset - start + length] = data
                self._aligned_write(start, memoryview(bounce), fua)
            self._after_write(offset, length)

    def _aligned_write(self, offset: int, data: memoryview, fua: bool) -> None:
        pos = 0
        for off, n in chunks(offset, len(data), self.drv.max_transfer()):
            self.drv.pwritev(off, data[pos:pos + n], fua)
            pos += n

    def pwrite_compressed(self, offset: int, data) -> None:
        """A write the format stores compressed (BDRV_REQ_WRITE_COMPRESSED): whole
        clusters, the last one may end at the end of the image; the driver checks that.
        ENOTSUP where the driver cannot compress."""
        data = memoryview(data).cast("B")
        length = len(data)
        self._check_writable()
        check_request(offset, length, self._bound())
        write = getattr(self.drv, "pwritev_compressed", None)
        if write is None:
            raise NotSupported()
        with self.lock:
            self._before_write(offset, length)
            write(offset, data)
            self._after_write(offset, length)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeroes; falls back to writing zero buffers (ENOTSUP)."""
        self._check_writable()
        check_request(offset, length, self._bound())
        if length == 0:
            return
        with self.lock:
            self._before_write(offset, length)
            self._zero_aligned_middle(offset, length, may_unmap)
            self._after_write(offset, length)

    def _zero_aligned_middle(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zero the aligned middle with the driver, unaligned edges with data writes."""
        align = self.request_alignment
        head_end = min(align_up(offset, align), offset + length)
        tail_start = max(align_down(offset + length, align), head_end)
        if head_end > offset:
            self._zero_by_write(offset, head_end - offset)
        if tail_start > head_end:
            try:
                self.drv.pwrite_zeroes(head_end, tail_start - head_end, may_unmap)
            except NotSupported:
                self._zero_by_write(head_end, tail_start - head_end)
        if offset + length > tail_start:
            self._zero_by_write(tail_start, offset + length - tail_start)

    def _zero_by_write(self, offset: int, length: int) -> None:
        """Zero a range with data writes (unaligned edges go through RMW)."""
        zero = bytes(min(length, 1 << 20))
        align = self.request_alignment
        for off, n in chunks(offset, length, len(zero)):
            if is_aligned(off, n, align):
                self._aligned_write(off, memoryview(zero)[:n], False)
            else:
                start, end = align_down(off, align), align_up(off + n, align)
                bounce = bytearray(end - start)
                self._aligned_read(start, memoryview(bounce))
                bounce[off - start:off - start + n] = bytes(n)
                self._aligned_write(start, memoryview(bounce), False)

    def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; silently ignored where unsupported."""
        self._check_writable()
        check_request(offset, length, self._bound())
        align = self.request_alignment
        start, end = align_up(offset, align), align_down(offset + length, align)
        if end <= start:
            return
        with self.lock:
            self._before_write(start, end - start)
            try:
                self.drv.discard(start, end - start)
            except NotSupported:
                pass
            self._after_write(start, end - start)

    def flush(self) -> None:
        with self.lock:
            gen = self.write_gen
            if gen != self.flushed_gen or self.drv.info.kind is not DriverKind.PROTOCOL:
                self.drv.flush()
                self.flushed_gen = gen
        for c in self.children:
            c.node.flush()

    def truncate(self, size: int, *, exact: bool = False,
                 prealloc: PreallocMode = PreallocMode.OFF) -> None:
        self._check_writable()
        if size < 0:
            raise InvalidArgument("Image size cannot be negative")
        check_truncate(size)
        with self.lock:
            self.write_gen += 1
            self.drv.truncate(size, exact, prealloc)
            for bitmap in self.dirty_bitmaps:      # as bdrv_co_truncate() does
                bitmap.truncate(self.total_size)

    # ---- block status -----------------------------------------------------------------
    def block_status(self, offset: int, length: int, want_zero: bool = True) -> Status:
        """bdrv_co_block_status(): status of this node only (backing not consulted).

        Returns the status of the first ``length`` bytes of the range, where the returned
        length is > 0 unless offset is at the end of the node.
        """
        size = self.total_size
        if offset >= size >= 0 <= length:
            return Status(BLOCK_EOF, 0)       # before any range check, as in QEMU
        length = min(length, size - offset)
        check_request(offset, length)
        if length == 0:
            return Status(0, 0)
        with self.lock:
            st = self.drv.block_status(offset, length, want_zero)
        return self._finish_status(st, offset, length, size, want_zero)[0]

    def block_status_runs(self, offset: int, length: int,
                          want_zero: bool = True) -> list[Status]:
        """Bulk block_status(): statuses of consecutive extents from ``offset``.

        The result is never empty, its first element is what ``block_status`` answers
        and each further one what ``block_status`` would answer at its start (asked for
        the rest of the range); together they cover at most ``length`` bytes.
        """
        size = self.total_size
        if offset >= size >= 0 <= length:
            return [Status(BLOCK_EOF, 0)]
        length = min(length, size - offset)
        check_request(offset, length)
        if length == 0:
            return [Status(0, 0)]
        with self.lock:
            runs = self.drv.block_status_runs(offset, length, want_zero)
        if len(runs) == 1 and runs[0].flags & BLOCK_RAW:
            return self._raw_runs(runs[0], length, want_zero)
        out = []
        finish = self._finish_status
        # a driver repeats one Status object for a stretch of equal runs (the slices of
        # unallocated L2 tables): away from the end, and on the same side of a backing
        # file's end (past it unallocated reads as zeroes), each gets the same answer
        # as the one before
        cow = self.cow_child()
        cow_end = cow.node.total_size if cow is not None else -1
        prev = res = whole = None
        prev_past_cow = False
        for st in runs:
            if (st is prev and whole and offset + st.length < size
                    and (offset >= cow_end) == prev_past_cow):
                out.append(res)
                offset += st.length
                length -= st.length
                if length <= 0:
                    break
                continue
            prev, prev_past_cow = st, offset >= cow_end
            try:
                res, whole = finish(st, offset, length, size, want_zero)
            except BlockError:
                if out:     # asked at this run, the error comes again
                    break
                raise
            out.append(res)
            n = res.length
            offset += n
            length -= n
            # a status shortened by post-processing (recursion into the file) ends the
            # batch: the driver's next run would not start where this one ends
            if not whole or length <= 0:
                break
        return out

    @staticmethod
    def _raw_runs(st: Status, length: int, want_zero: bool) -> list[Status]:
        """A driver that maps the range 1:1 onto its child (BLOCK_RAW): the child's
        runs, as block_status() recurses for one."""
        left = max(1, min(st.length, length))
        out = []
        for inner in st.host_node.block_status_runs(st.host_offset, left, want_zero):
            inner = inner._replace(length=min(inner.length, left) or left)
            out.append(inner)
            left -= inner.length
            if left <= 0:
                break
        return out

    def _finish_status(self, st: Status, offset: int, length: int, size: int,
                       want_zero: bool) -> tuple[Status, bool]:
        """The generic part of bdrv_co_block_status() for the driver's answer ``st`` at
        ``offset`` (0 < length <= size - offset): RAW recursion, ALLOCATED, zero beyond
        backing, RECURSE into the file, EOF.  Returns (status, whether it covers the
        driver's whole answer)."""
        flags, n = st.flags, max(1, min(st.length, length))
        whole = n == st.length
        host_offset, host_node = st.host_offset, st.host_node
        if flags & BLOCK_RAW:
            inner = host_node.block_status(host_offset, n, want_zero)
            res = inner._replace(length=min(inner.length, n) or n)
            return res, whole and res.length == n
        if flags & (BLOCK_DATA | BLOCK_ZERO):
            flags |= BLOCK_ALLOCATED
        elif self.drv.info.supports_backing:
            cow = self.cow_child()
            if cow is None:
                flags |= BLOCK_ZERO
            elif want_zero and offset >= cow.node.total_size:
                flags |= BLOCK_ZERO
        if (want_zero and flags & BLOCK_RECURSE and host_node is not None
                and host_node is not self and flags & BLOCK_DATA
                and not flags & BLOCK_ZERO and flags & BLOCK_OFFSET_VALID):
            inner = host_node.block_status(host_offset, n, want_zero)
            if inner.flags & BLOCK_EOF and (not inner.length or inner.flags & BLOCK_ZERO):
                flags |= BLOCK_ZERO
            elif inner.length:
                if inner.length < n:
                    n = inner.length
                    whole = False
                flags |= inner.flags & BLOCK_ZERO
        if offset + n >= size:
            flags |= BLOCK_EOF
        return Status(flags & ~BLOCK_RECURSE, n, host_offset, host_node), whole

    def block_status_above(self, offset: int, length: int, base=None,
                           want_zero: bool = True) -> Status:
        """bdrv_block_status_above(): status through filters and backing files above base.

        Unallocated ranges are resolved in lower layers; a range beyond the end of a
        shorter backing file reads as allocated zeroes.
        """
        return self._status_above(self.block_status(offset, length, want_zero), offset,
                                  base, want_zero)

    def _status_above(self, st: Status, offset: int, base, want_zero: bool) -> Status:
        """block_status_above() given this node's own status ``st`` at offset."""
        if st.length == 0 or st.flags & BLOCK_ALLOCATED or self is base:
            return st
        eof = offset + st.length if st.flags & BLOCK_EOF else None
        length = st.length
        lower = self.filtered_child()
        while lower is not None and lower.node is not base:
            node = lower.node
            st = node.block_status(offset, length, want_zero)
            if st.length == 0:
                st = Status(BLOCK_ZERO | BLOCK_ALLOCATED, length, 0, node)
                break
            if st.flags & BLOCK_ALLOCATED:
                st = st._replace(flags=st.flags & ~BLOCK_EOF)
                break
            length = st.length
            lower = node.filtered_child()
        if eof is not None and offset + st.length == eof:
            st = st._replace(flags=st.flags | BLOCK_EOF)
        return st

    def block_status_above_runs(self, offset: int, length: int, base=None,
                                want_zero: bool = True) -> list[Status]:
        """Bulk block_status_above(): like block_status_runs, each element what
        ``block_status_above`` answers at its start for the rest of the range.

        The runs come from one bulk query of this node; an unallocated one is resolved
        through the chain as ``block_status_above`` does (and ends the batch when the
        lower layers answer for less of it).  An error resolving a run other than the
        first ends the batch instead: asked at that run, the error comes again.
        """
        runs = self.block_status_runs(offset, length, want_zero)
        if self is base:
            return runs
        out: list[Status] = []
        i = 0
        while i < len(runs):
            st = runs[i]
            n = st.length
            count = 1
            while i + count < len(runs) and runs[i + count] is st:
                count += 1
            try:
                answers = (self._repeats_above(st, offset, count, base, want_zero)
                           if count > 1 else [self._status_above(st, offset, base, want_zero)])
            except BlockError:
                if out:
                    break
                raise
            out += answers
            if len(answers) < count or answers[-1].length != n:
                break
            offset += n * count
            i += count
        return out

    def _repeats_above(self, st: Status, offset: int, count: int, base,
                       want_zero: bool) -> list[Status]:
        """_status_above() of ``count`` repetitions of one answer of this node from
        offset (block_status_runs repeats one object for the slices of unallocated L2
        tables; it carries no EOF), with one bulk query of the layer below instead of
        one per repetition: an answer there that starts where a repetition does is
        that repetition's, cut to its length; any other repetition is resolved alone.
        Stops after a shorter answer, or before a failing resolution but the first."""
        n = st.length
        lower = self.filtered_child()
        if st.flags & BLOCK_ALLOCATED or lower is None or lower.node is base:
            return [st] * count             # nothing below to ask: each is its own answer
        below = {}
        try:
            pos = offset
            for answer in lower.node.block_status_above_runs(offset, n * count, base,
                                                             want_zero):
                if not answer.length or answer.flags & BLOCK_EOF:
                    break           # (the ends of lower layers: asked one by one)
                below[pos] = answer
                pos += answer.length
        except BlockError:
            pass                    # each repetition fails, or not, when asked alone
        out: list[Status] = []
        for k in range(count):
            pos = offset + k * n
            answer = below.get(pos)
            if answer is None:
                try:
                    answer = self._status_above(st, pos, base, want_zero)
                except BlockError:
                    if out:
                        return out
                    raise
            elif answer.length > n:
                answer = answer._replace(length=n)
            out.append(answer)
            if answer.length != n:
                break
        return out

    def is_allocated_above(self, offset: int, length: int, base=None) -> tuple[bool, int]:
        """Whether [offset, offset+n) is allocated in this chain above ``base``."""
        st = self.block_status_above(offset, length, base, want_zero=False)
        return bool(st.flags & BLOCK_ALLOCATED), st.length

    # ---- chain helpers ----------------------------------------------------------------
    def backing_chain(self) -> list["BlockNode"]:
        chain, node = [], self
        while node is not None:
            chain.append(node)
            node = node.backing
        return chain

    def skip_filters(self) -> "BlockNode":
        node = self
        while node.is_filter and node.filtered_child() is not None:
            node = node.filtered_child().node
        return node

    def filename(self) -> str:
        """QEMU's bs->filename: the file name, or a json: description of the options."""
        exact = self.drv.refresh_filename()
        if exact is not None:
            return exact
        c = self.primary_child()
        if c is not None and (self.is_format or self.is_filter) and self.drv.info.name in (
                "raw",) + tuple(getattr(self.drv, "FILENAME_FROM_FILE", ())) \
                or c is not None and self.is_format:
            # a format shows its file's plain name only when that file is a protocol
            # node with one (bdrv_refresh_filename())
            fname = c.node.filename()
            if c.node.drv.info.kind is DriverKind.PROTOCOL and not fname.startswith("json:"):
                return fname
        return "json:" + _json_options(self)


def _is_zero(data: memoryview) -> bool:
    from .. import _native
    return _native.buffer_is_zero(data, 0, len(data))


# BlockdevOptionsBase members: never among a driver's strong runtime options, so
# bdrv_refresh_filename() leaves them out of a json: name
_WEAK_BASE_OPTIONS = ("node-name", "driver", "read-only", "auto-read-only", "force-share",
                      "cache", "discard", "detect-zeroes")


def _json_options(node) -> str:
    import json
    from ..qmp.protocol import to_json        # QDict member order, as QEMU prints it
    opts = {"driver": node.driver_name}
    for k, v in node.options.items():
        # x-* are our internal open flags (probed, no-io, check), not user options
        if k not in _WEAK_BASE_OPTIONS and k != "backing" and not k.startswith("x-"):
            opts[k] = v
    # bdrv_backing_overridden(): a backing file other than the header's (given in the
    # options, or suppressed while the header names one) is part of the name, except
    # without I/O (qemu-img info), where it changes nothing
    ref = node.options.get("backing", "header")
    overridden = not node.no_io and (ref is None and bool(getattr(node.drv, "backing_file",
                                                                    None))
                                     or ref not in (None, "header"))
    for c in node.children:
        if c.name != "backing" or overridden:
            opts[c.name] = json.loads(_json_options(c.node))
    if overridden and node.backing is None:
        opts["backing"] = None
    return to_json(opts)
