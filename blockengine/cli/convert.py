"""The copy engine of `img convert` (qemu-img.c convert_do_copy and helpers).

Library-callable: ``Converter(sources, target, ...).run()`` copies the concatenation
of the source images into the target, which must be at least as large.  It works in
512-byte sectors like QEMU, so the chunks, the write pattern (what stays sparse) and
the progress values are QEMU's:

* block status of each source decides data / zero / (with a target backing file)
  unallocated ranges; status runs are cut to the source's cluster alignment;
* data is read in buffers of ``buf_size`` (2 MiB) and, unless ``min_sparse`` is 0,
  scanned for zero runs: a zero run of at least ``min_sparse`` bytes is not written
  (or written as zeroes when the target does not read as zeroes already), shorter ones
  are written as data, and run ends are aligned to the target alignment;
* with ``min_sparse`` 0 everything, including zero ranges, is written as data;
* with ``compressed`` (-c) the copy goes cluster by cluster (``_run_compressed``): runs
  shorter than a cluster count as data, all-zero clusters are not written, the others
  are written compressed in batches the target compresses in parallel threads.

Writes are sequential (QEMU's -W/-m only change ordering and parallelism, never the
result).  Zero detection uses the native ``zero_runs``.
"""
from __future__ import annotations

import bisect
import os
import queue
import threading

from .. import _native
from ..drivers.base import BLOCK_DATA, BLOCK_ZERO
from ..errors import BlockError
from ..io.buffers import io_buffer
from .imageinfo import StatusCursor, cluster_size

SECTOR = 512
IO_BUF_SIZE = 2 << 20
COMPRESSED_BATCH = 4 << 20                  # -c: bytes of clusters compressed together
MAX_BUF_SECTORS = 32768                     # 16 MiB, the -S upper bound
MAX_REQUEST_SECTORS = (1 << 31) // SECTOR - 8   # BDRV_REQUEST_MAX_SECTORS-ish bound
BLK_ZERO, BLK_DATA, BLK_BACKING_FILE = "zero", "data", "backing"


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def pow2floor(v: int) -> int:
    return 1 << (v.bit_length() - 1) if v > 0 else 0


class CopyError(Exception):
    """A failed read, write or block status query, with qemu-img's message."""

    def __init__(self, what: str, offset: int, exc: BlockError):
        text = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__("error while %s at %s %d: %s" % (
            what, "offset" if what == "reading block status" else "byte", offset, text))
        self.cause = exc


def has_zero_init(node) -> bool:
    """bdrv_has_zero_init(): does a new image on this node read as zeroes?"""
    return node.drv.has_zero_init()


class _ZeroMap:
    """Per-sector zero/non-zero runs of a buffer (from the native zero_runs)."""

    def __init__(self, buf, sectors: int):
        runs = _native.zero_runs(memoryview(buf)[:sectors * SECTOR], SECTOR)
        self.starts = [start // SECTOR for start, _, _ in runs]
        self.ends = [(start + length + SECTOR - 1) // SECTOR for start, length, _ in runs]
        self.zero = [z for _, _, z in runs]

    def run_at(self, sector: int) -> tuple[bool, int]:
        """(is_zero, sectors until the state changes) at buffer sector ``sector``."""
        i = bisect.bisect_right(self.starts, sector) - 1
        return self.zero[i], self.ends[i] - sector


def is_allocated_sectors(zmap: _ZeroMap, idx: int, n: int, sector_num: int,
                         alignment: int) -> tuple[bool, int]:
    """qemu-img's is_allocated_sectors(): (data?, sectors with that state, aligned)."""
    if n <= 0:
        return False, 0
    is_zero, i = zmap.run_at(idx)
    i = min(i, n)
    if i == n:
        return not is_zero, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False          # a short zero head is rewritten by RMW anyway
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not is_zero, i


def is_allocated_sectors_min(zmap: _ZeroMap, n: int, minimum: int, sector_num: int,
                             alignment: int) -> tuple[bool, int]:
    """is_allocated_sectors_min(): starting with data, zero runs shorter than
    ``minimum`` sectors count as data so writes are not broken up."""
    minimum = min(minimum, n)
    data, pnum = is_allocated_sectors(zmap, 0, n, sector_num, alignment)
    if not data:
        return False, pnum
    used = checked = pnum
    idx = pnum
    while idx < n:
        data, pnum = is_allocated_sectors(zmap, idx, n - idx, sector_num + idx, alignment)
        idx += pnum
        checked += pnum
        if data:
            used = checked
        elif pnum >= minimum:
            break
    return True, used


class Converter:
    """One convert run: ``sources`` and ``target`` are opened ``Image`` objects."""

    def __init__(self, sources, target, *, min_sparse: int = 4096, has_zero_init: bool,
                 target_has_backing: bool = False, progress=None,
                 buf_size: int = IO_BUF_SIZE, alignment: int | None = None,
                 compressed: bool = False):
        self.sources = list(sources)
        self.target = target
        self.src_sizes = [s.size for s in self.sources]
        self.src_sectors = [div_round_up(n, SECTOR) for n in self.src_sizes]
        self.total_sectors = sum(self.src_sectors)
        self.min_sparse = min_sparse // SECTOR
        self.buf_sectors = max(buf_size // SECTOR, 1)
        self.has_zero_init = has_zero_init
        self.target_has_backing = target_has_backing
        self.compressed = compressed
        if compressed:
            # convert_do_copy(): only one cluster can be copied at a time
            self.cluster_sectors = div_round_up(cluster_size(target.node), SECTOR)
            self.buf_sectors = self.cluster_sectors
        self.progress = progress
        self.src_alignment = [div_round_up(cluster_size(s.node), SECTOR)
                              for s in self.sources]
        if alignment is None:
            alignment = max(pow2floor(self.min_sparse),
                            div_round_up(target.node.request_alignment, SECTOR))
        self.alignment = alignment
        self._next_status = 0
        self._status = BLK_DATA
        # holes taken whole: they are never written in pieces and the progress counts
        # only data (with -S 0 zeroes too, but in buffer-sized steps either way)
        self._cursors = [StatusCursor(s.node, above=not target_has_backing, merge_holes=True)
                         for s in self.sources]
        self._src_cur = 0
        self._src_cur_offset = 0

    # ---- status ---------------------------------------------------------------------------
    def _select_part(self, sector_num: int) -> None:
        """convert_select_part(): the source holding ``sector_num``."""
        if sector_num - self._src_cur_offset >= self.src_sectors[self._src_cur] or \
                sector_num < self._src_cur_offset:
            self._src_cur, self._src_cur_offset = 0, 0
            while sector_num - self._src_cur_offset >= self.src_sectors[self._src_cur]:
                self._src_cur_offset += self.src_sectors[self._src_cur]
                self._src_cur += 1

    def iteration_sectors(self, sector_num: int) -> int:
        """convert_iteration_sectors(): length of the next chunk; sets its status."""
        self._select_part(sector_num)
        n = min(self.total_sectors - sector_num, MAX_REQUEST_SECTORS)
        if self._next_status <= sector_num:
            offset = (sector_num - self._src_cur_offset) * SECTOR
            count = min(n * SECTOR, self.src_sizes[self._src_cur] - offset)
            try:
                # block_status() if target_has_backing, else block_status_above()
                st = self._cursors[self._src_cur].status(offset, count)
            except BlockError as e:
                raise CopyError("reading block status", offset, e) from e
            n = div_round_up(st.length, SECTOR)
            tail = (sector_num - self._src_cur_offset + n) % self.src_alignment[self._src_cur]
            if n > tail:
                n -= tail
            if st.flags & BLOCK_ZERO:
                self._status = BLK_ZERO
            elif st.flags & BLOCK_DATA:
                self._status = BLK_DATA
            else:
                self._status = BLK_BACKING_FILE if self.target_has_backing else BLK_DATA
            self._next_status = sector_num + n
        n = min(n, self._next_status - sector_num)
        if self._status == BLK_DATA:
            n = min(n, self.buf_sectors)
        if self.compressed:
            # compressed clusters are written whole: a shorter run is a data cluster
            if n < self.cluster_sectors:
                n = min(self.cluster_sectors, self.total_sectors - sector_num)
                self._status = BLK_DATA
            else:
                n -= n % self.cluster_sectors
        return n

    def _counts(self, status: str) -> bool:
        return status == BLK_DATA or (not self.min_sparse and status == BLK_ZERO)

    # ---- copy -----------------------------------------------------------------------------
    def run(self) -> None:
        """Copy everything; a failed read, write or status query raises CopyError.

        Reads (and status queries) run here while a writer thread writes the previous
        buffers in order, so source and target I/O overlap as QEMU's coroutines do."""
        allocated = self._count_allocated()
        if self.compressed:
            self._run_compressed(allocated)
            return
        done = 0
        sector = 0
        with _WriteBehind(self._write, self.buf_sectors * SECTOR) as writer:
            while sector < self.total_sectors:
                n = self.iteration_sectors(sector)
                status = self._status
                if not self.min_sparse and status == BLK_ZERO:
                    n = min(n, self.buf_sectors)
                if self._counts(status):
                    done += n
                    if self.progress is not None:
                        self.progress.print(100.0 * done / allocated, 0)
                if status == BLK_BACKING_FILE or (status == BLK_ZERO and self.min_sparse
                                                  and self.has_zero_init):
                    sector += n     # nothing to write: the writer need not hear of it
                    continue        # (a huge sparse image has one such chunk per L2 slice)
                buf = writer.free_buffer()
                if status == BLK_DATA:
                    try:
                        self._read(sector, n, buf)
                    except BlockError as e:
                        writer.drain()          # an earlier write error comes first
                        raise CopyError("reading", sector * SECTOR, e) from e
                elif not self.min_sparse and status == BLK_ZERO:
                    status = BLK_DATA
                    buf[:n * SECTOR] = bytes(n * SECTOR)
                writer.submit(sector, n, buf, status)
                sector += n

    def _count_allocated(self) -> int:
        """Sectors the progress counts (a first pass over the block status)."""
        allocated = 0
        sector = 0
        while sector < self.total_sectors:
            n = self.iteration_sectors(sector)
            if self._counts(self._status):
                allocated += n
            sector += n
        self._next_status = 0
        self._src_cur = self._src_cur_offset = 0
        return allocated

    # ---- copy with -c ---------------------------------------------------------------------
    def _run_compressed(self, allocated: int) -> None:
        """convert_do_copy() with -c: cluster by cluster; a data cluster is written
        compressed unless it is all zeroes (then, like a zero range, it is not written
        on a target reading as zeroes, else written as zeroes); -S 0 compresses zero
        clusters too.  Runs of consecutive data clusters go to the target as one
        compressed write of up to COMPRESSED_BATCH bytes: the format compresses its
        clusters in parallel threads and allocates them in guest order, the layout
        QEMU's in-order one-cluster writes give.  A last empty compressed write ends
        the stream (vmdk pads its file)."""
        cluster_bytes = self.cluster_sectors * SECTOR
        batch_sectors = max(COMPRESSED_BATCH // cluster_bytes, 1) * self.cluster_sectors
        done = 0
        sector = 0
        with _WriteBehind(self._write_compressed, batch_sectors * SECTOR) as writer:
            buf, start, filled = None, 0, 0      # the batch being filled
            while sector < self.total_sectors:
                n = self.iteration_sectors(sector)
                status = self._status
                if not self.min_sparse and status == BLK_ZERO:
                    n = min(n, self.buf_sectors)        # written as a data cluster
                if self._counts(status):
                    done += n
                    if self.progress is not None:
                        self.progress.print(100.0 * done / allocated, 0)
                if buf is None:
                    buf, start, filled = writer.free_buffer(), sector, 0
                if status == BLK_DATA or (status == BLK_ZERO and not self.min_sparse):
                    view = memoryview(buf)[filled * SECTOR:(filled + n) * SECTOR]
                    if status == BLK_DATA:
                        try:
                            self._read(sector, n, view)
                        except BlockError as e:
                            writer.drain()
                            raise CopyError("reading", sector * SECTOR, e) from e
                    else:
                        view[:] = bytes(n * SECTOR)
                    if not self.min_sparse or not _native.buffer_is_zero(view, 0, len(view)):
                        filled += n
                        sector += n
                        if filled + self.cluster_sectors > batch_sectors:
                            writer.submit(start, filled, buf, BLK_DATA)
                            buf = None
                        continue
                    status = BLK_ZERO
                if filled:
                    writer.submit(start, filled, buf, BLK_DATA)
                    buf = writer.free_buffer()
                writer.submit(sector, n, buf, status)
                buf = None
                sector += n
            if buf is not None:
                writer.submit(start, filled, buf, BLK_DATA)
        try:
            self.target.write_compressed(0, b"")
        except BlockError as e:
            raise CopyError("writing", 0, e) from e

    def _write_compressed(self, sector_num: int, nb: int, buf: memoryview,
                          status: str) -> None:
        """convert_co_write() with -c, for _run_compressed()'s batches."""
        if status == BLK_DATA:
            if nb:
                self.target.write_compressed(sector_num * SECTOR,
                                             memoryview(buf)[:nb * SECTOR])
        elif status == BLK_ZERO and not self.has_zero_init:
            self.target.write_zeroes(sector_num * SECTOR, nb * SECTOR, True)

    def _read(self, sector_num: int, n: int, buf: memoryview) -> None:
        """convert_co_read(): fill buf with n sectors, crossing source boundaries."""
        pos = 0
        while n > 0:
            self._select_part(sector_num)
            src_size = self.src_sizes[self._src_cur]
            cur = min(n, self.src_sectors[self._src_cur] - (sector_num - self._src_cur_offset))
            offset = (sector_num - self._src_cur_offset) * SECTOR
            real = max(0, min(cur * SECTOR, src_size - offset))
            view = memoryview(buf)[pos:pos + cur * SECTOR]
            if real:
                self.sources[self._src_cur].readinto(offset, view[:real])
            if real < cur * SECTOR:
                view[real:] = bytes(cur * SECTOR - real)   # the sector-rounded tail
            pos += cur * SECTOR
            sector_num += cur
            n -= cur

    def _write(self, sector_num: int, nb: int, buf: memoryview, status: str) -> None:
        """convert_co_write(): data, zeroes or nothing, range by range."""
        zmap = _ZeroMap(buf, nb) if status == BLK_DATA and self.min_sparse else None
        idx = 0
        while nb > 0:
            n = nb
            if status == BLK_DATA:
                data = True
                if zmap is not None:
                    data, n = self._scan(zmap, idx, nb, sector_num)
                if data:
                    self.target.write(sector_num * SECTOR,
                                      memoryview(buf)[idx * SECTOR:(idx + n) * SECTOR])
                elif not self.has_zero_init:
                    self.target.write_zeroes(sector_num * SECTOR, n * SECTOR, True)
            elif status == BLK_ZERO and not self.has_zero_init:
                self.target.write_zeroes(sector_num * SECTOR, n * SECTOR, True)
            sector_num += n
            nb -= n
            idx += n

    def _scan(self, zmap: _ZeroMap, idx: int, n: int, sector_num: int) -> tuple[bool, int]:
        """is_allocated_sectors_min() on the part of the buffer starting at ``idx``."""
        shifted = _ShiftedZeroMap(zmap, idx)
        return is_allocated_sectors_min(shifted, n, self.min_sparse, sector_num,
                                        self.alignment)


class _ShiftedZeroMap:
    """A _ZeroMap viewed from buffer sector ``base`` on."""

    def __init__(self, zmap: _ZeroMap, base: int):
        self.zmap, self.base = zmap, base

    def run_at(self, sector: int) -> tuple[bool, int]:
        return self.zmap.run_at(self.base + sector)


class _WriteBehind:
    """A writer thread applying ``write(sector, n, buf, status)`` to submitted buffers
    in submission order, with a small pool of buffers so the caller can fill the next
    one meanwhile.  The first failed write stops it; the caller gets that CopyError
    from its next submit/free_buffer/drain, and on leaving the ``with`` block."""

    BUFFERS = 3

    def __init__(self, write, buf_size: int):
        self._write = write
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(io_buffer(buf_size))
        self._todo: queue.Queue = queue.Queue()
        self._error: CopyError | None = None
        self._thread = threading.Thread(target=self._main, name="convert-writer",
                                        daemon=True)

    def __enter__(self) -> "_WriteBehind":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._todo.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise_error()

    def _main(self) -> None:
        while (item := self._todo.get()) is not None:
            sector, n, buf, status = item
            if self._error is None:
                try:
                    self._write(sector, n, buf, status)
                except BlockError as e:
                    # a batch of compressed clusters names the one that failed
                    self._error = CopyError("writing", getattr(e, "guest_offset",
                                                               sector * SECTOR), e)
                    self._error.__cause__ = e
            self._free.put(buf)
            self._todo.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def free_buffer(self) -> memoryview:
        buf = self._free.get()
        self._raise_error()
        return buf

    def submit(self, sector: int, n: int, buf: memoryview, status: str) -> None:
        self._raise_error()
        self._todo.put((sector, n, buf, status))

    def drain(self) -> None:
        """Wait for every submitted write; raise the first write error."""
        self._todo.join()
        self._raise_error()
