"""The copier shared by backup and the copy-before-write filter (QEMU's block-copy.c).

``BlockCopy`` owns a *copy bitmap* (clusters still to copy from source to target).
Both the backup job (in order) and the copy-before-write hook (for a guest write about
to overwrite a cluster) call ``copy_range``; every copy claims its clusters (clears
their bits) and does read+write while holding the source node's lock, so a cluster is
copied exactly once and always with the data it held when the copy started: the
point-in-time semantics of backup.
"""
from __future__ import annotations

from ..bitmaps import BlockDirtyBitmap
from ..drivers.base import BLOCK_ALLOCATED, BLOCK_ZERO

MAX_CHUNK = 1 << 20


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
        self.progress = None      # callable(nbytes) for copied bytes
        self.on_skipped = None    # callable(nbytes) for clusters found unallocated

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
        while pos < end:
            st = src.block_status_above(pos, end - pos, self.base)
            n = max(1, min(st.length, end - pos))
            if self.skip_unallocated and not st.flags & BLOCK_ALLOCATED:
                pos += n
                continue
            if st.flags & BLOCK_ZERO:
                self._io(lambda: tgt.pwrite_zeroes(pos, n), False)
            else:
                buf = bytearray(n)
                self._io(lambda: src.preadv(pos, memoryview(buf)), True)
                self._io(lambda: tgt.pwrite(pos, buf), False)
            pos += n

    @staticmethod
    def _io(fn, is_read: bool) -> None:
        """Run one request; a failure is re-raised tagged with ``is_read`` (the bits of
        the run were restored by copy_range, so a retry copies it again)."""
        try:
            fn()
        except Exception as e:   # noqa: BLE001
            e.is_read = is_read
            raise
