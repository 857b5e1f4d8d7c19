"""Reference counting of host clusters (QEMU's qcow2-refcount.c).

Theory of operation: every host cluster of the image file has a refcount of
``refcount_bits`` bits, stored in refcount blocks (one cluster each) that the refcount
table points to.  Allocation scans for free runs from ``free_cluster_index`` exactly as
alloc_clusters_noref() does, so images grow with the same layout as under QEMU.  When
a refcount block must be created, it is placed so that it describes itself
(alloc_refcount_block()); when the refcount table is full, a new table and blocks are
created at the end of the image (qcow2_refcount_area()).  Both signal the caller to
restart its search for free clusters (QEMU's -EAGAIN, here ``_Again``).

The per-entry work runs in ``_native`` (range add, free-run search, counting).
"""
from __future__ import annotations

import errno
import struct
from array import array

from ....errors import BlockError, CorruptImage
from .layout import (QCOW2_DISCARD_NEVER, QCOW2_DISCARD_OTHER, QCOW_MAX_CLUSTER_OFFSET,
                     QCOW_MAX_REFTABLE_SIZE, REFT_OFFSET_MASK, REFTABLE_ENTRY_SIZE,
                     REFTABLE_OFFSET_AND_CLUSTERS, OFS_REFCOUNT_TABLE_OFFSET, BE64,
                     refcount_metadata_size)
from .native import N
from . import overlap as OL

INT64_MAX = (1 << 63) - 1


class _Again(BlockError):
    """QEMU's -EAGAIN from alloc_refcount_block(): restart the free-cluster search.
    (A BlockError, so that a caller not expecting it sees an ordinary failure.)"""

    def __init__(self):
        super().__init__("Resource temporarily unavailable", errno=errno.EAGAIN)


class RefcountMixin:
    """Refcount handling; mixed into Qcow2Driver (QEMU's BDRVQcow2State methods)."""

    # ---- init -------------------------------------------------------------------------
    def refcount_init(self) -> None:
        """qcow2_refcount_init(): load the refcount table."""
        n = self.refcount_table_size
        raw = self.file.pread(self.refcount_table_offset, n * REFTABLE_ENTRY_SIZE) if n else b""
        tbl = array("Q", raw)
        if tbl.itemsize == 8 and struct.pack("=H", 1) == b"\x01\x00":
            tbl.byteswap()
        self.refcount_table = tbl
        self.free_cluster_index = 0
        self.free_byte_offset = 0
        self._free_byte_cluster_freed = False
        self._pending_discards: list[tuple[int, int]] = []
        self.cache_discards = False
        self._update_max_refcount_table_index()

    def _update_max_refcount_table_index(self) -> None:
        i = len(self.refcount_table) - 1
        tbl = self.refcount_table
        while i >= 0 and not (tbl[i] & REFT_OFFSET_MASK):
            i -= 1
        self.max_refcount_table_index = i

    # ---- lookup -------------------------------------------------------------------------
    def _refblock_offset(self, table_index: int) -> int:
        """Offset of the refcount block for table_index, 0 if none (validated)."""
        if table_index >= self.refcount_table_size:
            return 0
        off = self.refcount_table[table_index] & REFT_OFFSET_MASK
        if off & (self.cluster_size - 1):
            self.signal_corruption(True, "Refblock offset %#x unaligned (reftable index: %#x)"
                                   % (off, table_index))
        return off

    def get_refcount(self, cluster_index: int) -> int:
        """qcow2_get_refcount()."""
        off = self._refblock_offset(cluster_index >> self.refcount_block_bits)
        if not off:
            return 0
        block = self.refcount_cache.get(off)
        return N.refcount_get(block, self.refcount_order,
                              cluster_index & (self.refcount_block_size - 1))

    def get_refcount_range(self, first: int, n: int) -> array:
        """Refcounts of clusters [first, first+n) as array('Q')."""
        out = array("Q")
        rbs = self.refcount_block_size
        while n > 0:
            idx = first & (rbs - 1)
            k = min(n, rbs - idx)
            off = self._refblock_offset(first >> self.refcount_block_bits)
            if off:
                out.extend(N.refcount_get_range(self.refcount_cache.get(off),
                                                self.refcount_order, idx, k))
            else:
                out.extend(array("Q", bytes(8 * k)))
            first += k
            n -= k
        return out

    def count_allocated_clusters(self, end_cluster: int) -> int:
        """Number of clusters below end_cluster with a nonzero refcount."""
        total = 0
        rbs = self.refcount_block_size
        for ti in range(min(self.refcount_table_size, -(-end_cluster // rbs))):
            off = self._refblock_offset(ti)
            if not off:
                continue
            block = self.refcount_cache.get(off)
            n = min(rbs, end_cluster - ti * rbs)
            if n == rbs:
                total += N.refcount_count_nonzero(block, self.refcount_order)
            else:
                vals = N.refcount_get_range(block, self.refcount_order, 0, n)
                total += n - vals.count(0)
        return total

    # ---- update -------------------------------------------------------------------------
    def update_refcount(self, offset: int, length: int, addend: int, decrease: bool,
                        dtype: int) -> None:
        """update_refcount(): add/subtract addend for every cluster touching the range."""
        if length < 0:
            raise BlockError("Invalid argument", errno=errno.EINVAL)
        if length == 0:
            return
        cb = self.cluster_bits
        start = offset >> cb
        last = (offset + length - 1) >> cb
        rbs, order = self.refcount_block_size, self.refcount_order
        ci = start
        freed: list[tuple[int, int]] = []
        if decrease:
            # the L2 entries that dropped the references must be on disk first
            self.refcount_cache.set_dependency(self.l2_cache)
        try:
            while ci <= last:
                try:
                    block_off = self.alloc_refcount_block(ci)
                except _Again:
                    if self.free_cluster_index > start:
                        self.free_cluster_index = start
                    raise
                block = self.refcount_cache.get(block_off)
                bidx = ci & (rbs - 1)
                n = min(last + 1 - ci, rbs - bidx)
                rc = N.refcount_add_range(block, order, bidx, n, -addend if decrease else addend)
                if rc != N.OK:
                    # find the exact failing cluster as QEMU would stop there
                    raise BlockError("Invalid argument", errno=errno.EINVAL)
                self.refcount_cache.mark_dirty(block_off, block)
                if decrease:
                    if N.refcount_free_run(block, order, bidx) >= n:
                        freed.append((ci, n))
                    else:
                        vals = N.refcount_get_range(block, order, bidx, n)
                        run = None
                        for i, v in enumerate(vals):
                            if v == 0:
                                if run is not None and run[0] + run[1] == ci + i:
                                    run[1] += 1
                                else:
                                    if run is not None:
                                        freed.append(tuple(run))
                                    run = [ci + i, 1]
                        if run is not None:
                            freed.append(tuple(run))
                ci += n
        except BaseException:
            if ci > start:
                try:
                    self.update_refcount(start << cb, (ci - start) << cb, addend, not decrease,
                                         QCOW2_DISCARD_NEVER)
                except BaseException:
                    pass
            raise
        if freed:
            self._clusters_freed(freed, dtype)

    def _clusters_freed(self, runs: list[tuple[int, int]], dtype: int) -> None:
        cb = self.cluster_bits
        first = runs[0][0]
        if first < self.free_cluster_index:
            self.free_cluster_index = first
        if self.free_byte_offset:
            c = self.free_byte_offset >> cb
            if any(a <= c < a + n for a, n in runs):
                self._free_byte_cluster_freed = True
        for cache in (self.refcount_cache, self.l2_cache):
            if cache.entries:
                for off in list(cache.entries):
                    c = off >> cb
                    for a, n in runs:
                        if a <= c < a + n:
                            cache.discard(off)
                            break
        if self.discard_passthrough.get(dtype, False):
            for a, n in runs:
                self._queue_discard(a << cb, n << cb)
            if not self.cache_discards:
                self.process_discards()

    def _queue_discard(self, offset: int, length: int) -> None:
        d = self._pending_discards
        if d and d[-1][0] + d[-1][1] == offset:
            d[-1] = (d[-1][0], d[-1][1] + length)
        else:
            d.append((offset, length))

    def process_discards(self) -> None:
        """qcow2_process_discards(): pass freed ranges down to the image file."""
        pending, self._pending_discards = self._pending_discards, []
        for off, n in pending:
            try:
                self.file.discard(off, n)
            except BlockError:
                pass

    # ---- refcount block allocation --------------------------------------------------------
    def alloc_refcount_block(self, cluster_index: int) -> int:
        """alloc_refcount_block(): offset of the block covering cluster_index.

        Creates the block (and grows the table) when missing; then raises _Again.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        rti = cluster_index >> self.refcount_block_bits
        if rti < self.refcount_table_size:
            off = self.refcount_table[rti] & REFT_OFFSET_MASK
            if off:
                if off & (cs - 1):
                    self.signal_corruption(True, "Refblock offset %#x unaligned (reftable "
                                           "index: %#x)" % (off, rti))
                return off

        # we write to the refcount table, so we might depend on L2 tables
        self.l2_cache.flush()
        self.file.flush()
        new_block = self.alloc_clusters_noref(cs, INT64_MAX)
        if new_block == 0:
            self.signal_corruption(True, "Preventing invalid allocation of refcount block "
                                   "at offset 0")
        rbb = self.refcount_block_bits
        order = self.refcount_order
        if (new_block >> cb >> rbb) == (cluster_index >> rbb):
            block = self.refcount_cache.get_empty(new_block)
            N.refcount_set_range(block, order, (new_block >> cb) & (self.refcount_block_size - 1),
                                 1, 1)
        else:
            self.update_refcount(new_block, cs, 1, False, QCOW2_DISCARD_NEVER)
            self.flush_cache(self.refcount_cache)
            block = self.refcount_cache.get_empty(new_block)
        self.refcount_cache.mark_dirty(new_block, block)
        self.flush_cache(self.refcount_cache)

        if rti < self.refcount_table_size:
            self.pre_write_overlap_check(OL.REFCOUNT_TABLE, self.refcount_table_offset
                                         + rti * REFTABLE_ENTRY_SIZE, REFTABLE_ENTRY_SIZE)
            self.file.pwrite(self.refcount_table_offset + rti * REFTABLE_ENTRY_SIZE,
                             BE64.pack(new_block))
            self.file.flush()
            self.refcount_table[rti] = new_block
            self.max_refcount_table_index = max(self.max_refcount_table_index, rti)
            raise _Again()

        # grow the refcount table: new structures at the end of the image
        blocks_used = -(-max(cluster_index + 1, (new_block >> cb) + 1)
                        // self.refcount_block_size)
        meta_offset = blocks_used * self.refcount_block_size * cs
        self.refcount_area(meta_offset, 0, False, rti, new_block)
        raise _Again()

    def refcount_area(self, start_offset: int, additional_clusters: int, exact_size: bool,
                      new_refblock_index: int, new_refblock_offset: int) -> int:
        """qcow2_refcount_area(): new refcount table + blocks covering themselves at
        start_offset; returns the end offset of the area."""
        cs = self.cluster_size
        rbs = self.refcount_block_size
        order = self.refcount_order
        _, total_refblock_count = refcount_metadata_size(
            start_offset // cs + additional_clusters, cs, order, not exact_size)
        if total_refblock_count > QCOW_MAX_REFTABLE_SIZE:
            raise BlockError("File too large", errno=errno.EFBIG)
        area_reftable_index = (start_offset // cs) // rbs
        if exact_size:
            table_size = total_refblock_count
        else:
            table_size = total_refblock_count + -(-total_refblock_count // 2)
        per_cluster = cs // REFTABLE_ENTRY_SIZE
        table_size = -(-table_size // per_cluster) * per_cluster
        table_clusters = table_size * REFTABLE_ENTRY_SIZE // cs
        if table_size > QCOW_MAX_REFTABLE_SIZE:
            raise BlockError("File too large", errno=errno.EFBIG)

        new_table = array("Q", bytes(8 * table_size))
        if table_size > self.max_refcount_table_index:
            n = self.max_refcount_table_index + 1
            new_table[:n] = self.refcount_table[:n]
        else:
            new_table[:table_size] = self.refcount_table[:table_size]
        if new_refblock_offset:
            new_table[new_refblock_index] = new_refblock_offset

        additional = sum(1 for i in range(area_reftable_index, total_refblock_count)
                         if not new_table[i])
        table_offset = start_offset + additional * cs
        end_offset = table_offset + table_clusters * cs

        block_offset = start_offset
        for i in range(area_reftable_index, total_refblock_count):
            if new_table[i]:
                boff = new_table[i]
                block = self.refcount_cache.get(boff)
            else:
                boff = block_offset
                block = self.refcount_cache.get_empty(boff)
                self.refcount_cache.mark_dirty(boff, block)
                new_table[i] = block_offset
                block_offset += cs
            first_offset_covered = i * rbs * cs
            if first_offset_covered < end_offset:
                j = (start_offset - first_offset_covered) // cs \
                    if first_offset_covered < start_offset else 0
                end_index = min((end_offset - first_offset_covered) // cs, rbs)
                if end_index > j:
                    N.refcount_set_range(block, order, j, end_index - j, 1)
                self.refcount_cache.mark_dirty(boff, block)
        assert block_offset == table_offset

        self.flush_cache(self.refcount_cache)
        be = array("Q", new_table)
        be.byteswap()
        self.pre_write_overlap_check(0, table_offset, table_size * REFTABLE_ENTRY_SIZE)
        self.file.pwrite(table_offset, be.tobytes())
        self.file.flush()
        self.file.pwrite(OFS_REFCOUNT_TABLE_OFFSET,
                         REFTABLE_OFFSET_AND_CLUSTERS.pack(table_offset, table_clusters))
        self.file.flush()
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters

        old_offset, old_size = self.refcount_table_offset, self.refcount_table_size
        self.refcount_table = new_table
        self.refcount_table_size = table_size
        self.refcount_table_offset = table_offset
        self._update_max_refcount_table_index()
        self.free_clusters(old_offset, old_size * REFTABLE_ENTRY_SIZE, QCOW2_DISCARD_OTHER)
        return end_offset

    # ---- cluster allocation ---------------------------------------------------------------
    def alloc_clusters_noref(self, size: int, max_offset: int) -> int:
        """alloc_clusters_noref(): first free run at/after free_cluster_index."""
        if self.cache_discards and self._pending_discards:
            self.process_discards()
        cs = self.cluster_size
        nb = -(-size // cs)
        i = self.free_cluster_index
        rbb, rbs, order = self.refcount_block_bits, self.refcount_block_size, self.refcount_order
        got = 0
        while got < nb:
            ti = i >> rbb
            off = self._refblock_offset(ti)
            bidx = i & (rbs - 1)
            if not off:
                take = min(nb - got, rbs - bidx)
                got += take
                i += take
                continue
            block = self.refcount_cache.get(off)
            free = N.refcount_free_run(block, order, bidx)
            if free >= nb - got:
                i += nb - got
                got = nb
                break
            if bidx + free == rbs:
                got += free
                i += free
                continue
            # a used cluster at bidx+free: restart after it, at the next free one
            got = 0
            nxt = N.refcount_find_free(block, order, bidx + free, 1)
            i = (ti << rbb) + (nxt if nxt >= 0 else rbs)
        self.free_cluster_index = i
        if i > 0 and i - 1 > (max_offset >> self.cluster_bits):
            raise BlockError("File too large", errno=errno.EFBIG)
        return (i - nb) << self.cluster_bits

    def alloc_clusters(self, size: int) -> int:
        """qcow2_alloc_clusters()."""
        while True:
            offset = self.alloc_clusters_noref(size, QCOW_MAX_CLUSTER_OFFSET)
            try:
                self.update_refcount(offset, size, 1, False, QCOW2_DISCARD_NEVER)
                return offset
            except _Again:
                continue

    def alloc_clusters_at(self, offset: int, nb_clusters: int) -> int:
        """qcow2_alloc_clusters_at(): allocate up to nb_clusters free clusters at offset."""
        if nb_clusters == 0:
            return 0
        while True:
            vals = self.get_refcount_range(offset >> self.cluster_bits, nb_clusters)
            i = 0
            for v in vals:
                if v:
                    break
                i += 1
            try:
                self.update_refcount(offset, i << self.cluster_bits, 1, False,
                                     QCOW2_DISCARD_NEVER)
                return i
            except _Again:
                continue

    def alloc_bytes(self, size: int) -> int:
        """qcow2_alloc_bytes(): host offset of ``size`` bytes (at most a cluster) for a
        compressed cluster, packed right after the previous one (``free_byte_offset``)
        while it fits, continuing into the next host cluster when that one is the next
        free cluster.  Every compressed cluster touching a host cluster holds one
        reference to it, so shared host clusters have refcounts above 1.

        One departure from QEMU 7.2: when the host cluster ``free_byte_offset`` points
        into was freed and then allocated again for something else, QEMU would still
        pack compressed data into it (corrupting that cluster: its refcount goes to 2
        under an OFLAG_COPIED entry); here packing restarts in a new cluster."""
        cs, cb = self.cluster_size, self.cluster_bits
        offset = self.free_byte_offset
        if offset:
            refcount = self.get_refcount(offset >> cb)
            if refcount == self.refcount_max or (self._free_byte_cluster_freed and refcount):
                offset = 0
        free_in_cluster = cs - (offset & (cs - 1))
        max_offset = min(self.cluster_offset_mask, QCOW_MAX_CLUSTER_OFFSET)
        while True:
            if not offset or free_in_cluster < size:
                new_cluster = self.alloc_clusters_noref(cs, max_offset)
                if new_cluster == 0:
                    self.signal_corruption(True, "Preventing invalid allocation of "
                                           "compressed cluster at offset 0")
                if not offset or -(-offset // cs) * cs != new_cluster:
                    offset = new_cluster
                    free_in_cluster = cs
                else:
                    free_in_cluster += cs
            try:
                self.update_refcount(offset, size, 1, False, QCOW2_DISCARD_NEVER)
                break
            except _Again:
                offset = 0
        # the refcounts must be on disk before the L2 entry that uses them
        self.l2_cache.set_dependency(self.refcount_cache)
        self._free_byte_cluster_freed = False
        self.free_byte_offset = offset + size
        if not self.free_byte_offset & (cs - 1):
            self.free_byte_offset = 0
        return offset

    def free_clusters(self, offset: int, size: int, dtype: int) -> None:
        """qcow2_free_clusters() (errors are reported, not raised, as in QEMU)."""
        try:
            self.update_refcount(offset, size, 1, True, dtype)
        except CorruptImage:
            raise
        except BlockError as e:
            import os
            import sys
            print("qcow2_free_clusters failed: %s" % os.strerror(e.errno or errno.EIO),
                  file=sys.stderr)

    def free_any_cluster(self, l2_entry: int, dtype: int) -> None:
        """qcow2_free_any_cluster()."""
        from .layout import CL_COMPRESSED, CL_NORMAL, CL_ZERO_ALLOC, L2E_OFFSET_MASK
        ctype = self.cluster_type(l2_entry)
        if self.has_data_file:
            if self.discard_passthrough.get(dtype) and ctype in (CL_NORMAL, CL_ZERO_ALLOC):
                try:
                    self.data_file.discard(l2_entry & L2E_OFFSET_MASK, self.cluster_size)
                except BlockError:
                    pass
            return
        if ctype == CL_COMPRESSED:
            coffset, csize = self.parse_compressed_l2_entry(l2_entry)
            self.free_clusters(coffset, csize, dtype)
        elif ctype in (CL_NORMAL, CL_ZERO_ALLOC):
            off = l2_entry & L2E_OFFSET_MASK
            if off & (self.cluster_size - 1):
                self.signal_corruption(False, "Cannot free unaligned cluster %#x" % off)
            else:
                self.free_clusters(off, self.cluster_size, dtype)

    # ---- shrinking ----------------------------------------------------------------------
    def get_last_cluster(self, size: int) -> int:
        """qcow2_get_last_cluster(): last cluster below size with a nonzero refcount."""
        cs = self.cluster_size
        n = -(-size // cs)
        rbs = self.refcount_block_size
        i = n - 1
        while i >= 0:
            base = i & ~(rbs - 1)
            off = self._refblock_offset(i >> self.refcount_block_bits)
            if off:
                vals = N.refcount_get_range(self.refcount_cache.get(off), self.refcount_order,
                                            0, i - base + 1)
                b = vals.tobytes().rstrip(b"\0")
                if b:
                    return base + (len(b) - 1) // 8
            i = base - 1
        self.signal_corruption(True, "There are no references in the refcount table.")

    def shrink_reftable(self) -> None:
        """qcow2_shrink_reftable(): drop refcount blocks that only describe themselves."""
        cs, cb = self.cluster_size, self.cluster_bits
        rbs, order = self.refcount_block_size, self.refcount_order
        new = array("Q", self.refcount_table)
        for i in range(self.refcount_table_size):
            off = self.refcount_table[i] & REFT_OFFSET_MASK
            if not off:
                new[i] = 0
                continue
            block = self.refcount_cache.get(off)
            if i == (off >> cb) // rbs:
                bi = (off >> cb) & (rbs - 1)
                rc = N.refcount_get(block, order, bi)
                N.refcount_set_range(block, order, bi, 1, 0)
                unused = N.buffer_is_zero(block, 0, len(block))
                N.refcount_set_range(block, order, bi, 1, rc)
            else:
                unused = N.buffer_is_zero(block, 0, len(block))
            new[i] = 0 if unused else self.refcount_table[i]
        be = array("Q", new)
        be.byteswap()
        self.file.pwrite(self.refcount_table_offset, be.tobytes())
        self.file.flush()
        for i in range(self.refcount_table_size):
            if self.refcount_table[i] and not new[i]:
                off = self.refcount_table[i] & REFT_OFFSET_MASK
                self.refcount_cache.discard(off)
                self.refcount_table[i] = 0
                if i != (off >> cb) // rbs:
                    self.update_refcount(off, cs, 1, True, QCOW2_DISCARD_OTHER)
        self._update_max_refcount_table_index()

    def flush_cache(self, cache) -> None:
        """qcow2_cache_flush(): write back, then flush the image file."""
        cache.flush()
        self.file.flush()
