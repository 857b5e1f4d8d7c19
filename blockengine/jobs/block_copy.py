"""The copier shared by backup and the copy-before-write filter (QEMU's block-copy.c).

``BlockCopy`` owns a *copy bitmap* (clusters still to copy from source to target).
Both the backup job (in order) and the copy-before-write hook (for a guest write about
to overwrite a cluster) call ``copy_range``; every copy claims its clusters (clears
their bits) and does read+write while holding the source node's lock, so a cluster is
copied exactly once and always with the data it held when the copy started: the
point-in-time semantics of backup.
"""
from __future__ import annotations

import contextlib

from ..bitmaps import BlockDirtyBitmap
from ..drivers.base import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO
from ..io.buffers import io_buffer

MAX_CHUNK = 4 << 20     # per copy: larger chunks, fewer requests (QEMU runs many in parallel)


class CopyBuffer:
    """One bounce buffer a copy loop reuses for every chunk.

    A new multi-MiB bytearray per chunk is fresh memory each time (glibc maps and
    unmaps it): the read faults its pages in and, measured on tmpfs, the write of a
    freshly faulted buffer runs ~4x slower than of a reused one.  Callers must be done
    with the returned view before the next ``read``."""

    def __init__(self, size: int = MAX_CHUNK):
        self.buf = io_buffer(size)          # huge pages where the system allows

    def read(self, node, offset: int, length: int) -> memoryview:
        """The data of ``node`` at [offset, offset+length), in the buffer."""
        if length > len(self.buf):
            self.buf = io_buffer(length)
        view = self.buf[:length]
        node.preadv(offset, view)
        return view


def copy_pieces(node, pieces, write, buffer: CopyBuffer) -> None:
    """The copy loop of mirror, commit and stream: for each ``(offset, length, read)``
    that ``pieces`` yields (the plan, asked for one piece at a time: it may pause or
    raise), read the piece of ``node`` into ``buffer`` when ``read`` says so and call
    ``write(offset, length, data)`` (``data`` None for a piece not read).  A failed
    request raises its error tagged with ``is_read``; every write before it happened,
    none after it.

    Reads and writes alternate in the job's thread.  Reading the next piece ahead in
    a helper thread (as QEMU keeps several requests in flight) was measured on the
    shared 2-core machine, interleaved A/B in-process: no wall-time gain (the writes
    into the page cache dominate) and 3-10 % more CPU."""
    for offset, length, read in pieces:
        data = None
        if read:
            with _tagged(is_read=True):
                data = buffer.read(node, offset, length)
        with _tagged(is_read=False):
            write(offset, length, data)


class DataExtentCache:
    """Block status for a copy loop that walks a node forwards: QEMU's block-status
    cache (bdrv_bsc_*, block/io.c) at the level of the job.

    Each question asks the node about the whole rest of the image, and an answer of
    "data" is remembered: later questions inside that extent are answered without
    asking again (on tmpfs every SEEK_HOLE walks the file up to the hole, so asking per
    chunk makes a copy quadratic).  Only data is remembered, as in QEMU: a write never
    turns data into something else, and a discard or zero write that does only makes
    the copier read zeroes and copy them as data -- a correct copy, if less sparse.
    Zero and unallocated answers are never reused, since a guest write may have
    filled them since.
    """

    def __init__(self, node, base=None):
        self.node, self.base = node, base
        self.start = self.end = 0          # the remembered data extent
        self.flags = 0

    def status(self, offset: int, length: int) -> tuple[int, int]:
        """(flags, n): the status of the first n bytes of [offset, offset+length);
        n > 0 unless offset is at the end of the node."""
        if self.start <= offset < self.end:
            return self.flags, min(self.end - offset, length)
        rest = max(length, self.node.total_size - offset)
        st = self.node.block_status_above(offset, rest, self.base)
        if st.flags & BLOCK_DATA and not st.flags & BLOCK_ZERO:
            self.start, self.end, self.flags = offset, offset + st.length, st.flags
        return st.flags, min(st.length, length)


class BlockCopy:
    def __init__(self, source, target, cluster_size: int = 65536, *,
                 skip_unallocated: bool = False, base=None, chunk: int = MAX_CHUNK):
        self.source = source              # the node whose data is copied
        self.target = target
        self.cluster_size = cluster_size
        self.size = source.total_size
        self.bitmap = BlockDirtyBitmap(source, None, cluster_size, size=self.size)
        self.bitmap.set_all()
        self.skip_unallocated = skip_unallocated
        self.base = base
        self.chunk = max(cluster_size, chunk - chunk % cluster_size)
        self.compress = False     # backup's compress: cluster-sized compressed writes
        self.progress = None      # callable(nbytes) for copied bytes
        self.on_skipped = None    # callable(nbytes) for clusters found unallocated
        self.extents = DataExtentCache(source, base)
        self.buffer = CopyBuffer(self.chunk)

    @property
    def lock(self):
        return self.source.lock

    def dirty_bytes(self) -> int:
        return min(self.bitmap.count(), self.size)

    def reset_unallocated(self, offset: int) -> int:
        """For sync=top: clear clusters at offset not allocated above base; returns
        the number of bytes handled (0 = the cluster run is allocated)."""
        n = min(self.chunk, self.size - offset)
        allocated, length = self.source.is_allocated_above(offset, n, self.base)
        end = min(offset + length, self.size)
        # whole clusters only
        cend = end - end % self.cluster_size if end < self.size else end
        if allocated or cend <= offset:
            return 0
        cleared = self.bitmap.count_range(offset, cend - offset)
        self.bitmap.reset_dirty(offset, cend - offset)
        if cleared and self.on_skipped:
            self.on_skipped(min(cleared, self.size - offset))
        return cend - offset

    def copy_range(self, offset: int, length: int, max_bytes: int | None = None) -> int:
        """Copy the dirty clusters in [offset, offset+length); returns bytes copied."""
        copied = 0
        end = min(offset + length, self.size)
        start = offset - offset % self.cluster_size
        with self.lock:
            pos = start
            while pos < end:
                area = self.bitmap.next_dirty_area(pos, end, self.chunk)
                if area is None:
                    break
                a_off, a_len = area
                a_end = min(a_off + a_len, self.size)
                # extend the area to whole clusters
                a_off -= a_off % self.cluster_size
                if a_end % self.cluster_size and a_end < self.size:
                    a_end += self.cluster_size - a_end % self.cluster_size
                a_end = min(a_end, self.size)
                self.bitmap.reset_dirty(a_off, a_end - a_off)
                try:
                    self._copy(a_off, a_end - a_off)
                except BaseException:
                    self.bitmap.set_dirty(a_off, a_end - a_off)
                    raise
                copied += a_end - a_off
                if self.progress:
                    self.progress(a_end - a_off)
                pos = a_end
                if max_bytes is not None and copied >= max_bytes:
                    break
        return copied

    def _copy(self, offset: int, length: int) -> None:
        src, tgt = self.source, self.target
        pos, end = offset, offset + length
        if self.extents.base is not self.base:      # sync=top set it after creation
            self.extents = DataExtentCache(src, self.base)
        if self.compress:
            self._copy_compressed(offset, length)
            return
        while pos < end:
            flags, n = self.extents.status(pos, end - pos)
            n = max(1, n)
            if not (self.skip_unallocated and not flags & BLOCK_ALLOCATED):
                self._copy_piece(pos, n, flags & BLOCK_ZERO, tgt.pwrite)
            pos += n

    def _copy_piece(self, pos: int, n: int, zero: bool, write) -> None:
        """A zero write, or the source's data read and given to ``write``; a failure
        is tagged as the read's or the write's (the job's on-error policies differ)."""
        if zero:
            with _tagged(is_read=False):
                self.target.pwrite_zeroes(pos, n)
            return
        with _tagged(is_read=True):
            buf = self.buffer.read(self.source, pos, n)
        with _tagged(is_read=False):
            write(pos, buf)

    def _copy_compressed(self, offset: int, length: int) -> None:
        """block-copy's COPY_WRITE_COMPRESSED: cluster by cluster (compressed clusters
        are written whole); a cluster zero all through is a zero write, any other is
        written compressed (block_copy_block_status() counts a cluster with any data
        as data)."""
        tgt = self.target
        pos, end = offset, offset + length
        while pos < end:
            n = min(self.cluster_size, end - pos)
            flags, m = self.extents.status(pos, n)
            whole = m >= n
            if not (self.skip_unallocated and not flags & BLOCK_ALLOCATED and whole):
                self._copy_piece(pos, n, flags & BLOCK_ZERO and whole, tgt.pwrite_compressed)
            pos += n


@contextlib.contextmanager
def _tagged(is_read: bool):
    """A failing request is re-raised tagged with ``is_read`` (the bits of the run
    were restored by copy_range, so a retry copies it again)."""
    try:
        yield
    except Exception as e:   # noqa: BLE001
        e.is_read = is_read
        raise
