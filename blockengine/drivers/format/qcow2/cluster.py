"""Guest -> host cluster mapping (QEMU's qcow2-cluster.c).

Theory of operation: a guest offset selects an L1 entry (an L2 table) and an L2 entry
(a host cluster, a zero flag, or a compressed cluster descriptor).  L2 tables are read
in slices through ``l2_cache``; runs of similar entries are classified by
``_native.l2_scan`` so that reads, block status and writes handle a whole run at a
time.  Writes follow qcow2_alloc_host_offset(): reuse clusters with refcount 1
(OFLAG_COPIED, handle_copied), otherwise allocate new ones (handle_alloc) whose
untouched parts are copied from the old contents (perform_cow), then link them into
the L2 table (qcow2_alloc_cluster_link_l2) and drop the old clusters' references.
"""
from __future__ import annotations

import errno
import os
import struct

from ...._record import record
from ....errors import BlockError, NotSupported
from .layout import (BDRV_REQUEST_MAX_BYTES, CL_COMPRESSED, CL_NORMAL, CL_UNALLOCATED,
                     CL_ZERO_ALLOC, CL_ZERO_PLAIN, L1E_OFFSET_MASK, L1E_SIZE,
                     L2E_OFFSET_MASK, OFS_L1_SIZE, L1_SIZE_AND_OFFSET, BE64,
                     QCOW2_COMPRESSED_SECTOR_SIZE, QCOW2_DISCARD_NEVER,
                     QCOW2_DISCARD_OTHER, QCOW2_DISCARD_REQUEST, QCOW_L2_BITMAP_ALL_ALLOC,
                     QCOW_L2_BITMAP_ALL_ZEROES, QCOW_MAX_L1_SIZE, QCOW_OFLAG_COMPRESSED,
                     QCOW_OFLAG_COPIED, QCOW_OFLAG_SUB_ALLOC_RANGE, QCOW_OFLAG_SUB_ZERO_RANGE,
                     QCOW_OFLAG_ZERO, L2E_STD_RESERVED_MASK, SC_COMPRESSED, SC_INVALID, SC_NORMAL, SC_UNALLOCATED_ALLOC,
                     SC_UNALLOCATED_PLAIN, SC_ZERO_ALLOC, SC_ZERO_PLAIN)
from .native import N
from . import overlap as OL

# L2 entry bits that need the full classification of l2_scan
_SCAN_BITS = QCOW_OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK

_BE64_AT = struct.Struct(">Q").unpack_from
_BE128_AT = struct.Struct(">QQ").unpack_from
_PACK64_INTO = struct.Struct(">Q").pack_into
_PACK128_INTO = struct.Struct(">QQ").pack_into
INT_MAX = 0x7FFFFFFF
# zeroes to copy from: a memoryview, so that slicing it copies nothing
ZEROES = memoryview(bytes(1 << 20))


def zero_fill(view: memoryview) -> None:
    """Fill view with zero bytes."""
    n = len(view)
    if n <= len(ZEROES):
        view[:] = ZEROES[:n]
        return
    for pos in range(0, n, len(ZEROES)):
        k = min(n - pos, len(ZEROES))
        view[pos:pos + k] = ZEROES[:k]


@record
class CowRegion:
    offset: int      # relative to the start of the first cluster of the allocation
    nb_bytes: int


@record
class L2Meta:
    """QCowL2Meta: a run of newly written clusters to link into the L2 table."""
    offset: int          # guest offset of the first cluster
    alloc_offset: int    # host offset of the first cluster
    nb_clusters: int
    keep_old: bool
    cow_start: CowRegion
    cow_end: CowRegion
    prealloc: bool = False


class ClusterMixin:
    """L1/L2 handling; mixed into Qcow2Driver."""

    # ---- entry helpers ---------------------------------------------------------------
    def l2_entry(self, table, index: int) -> int:
        return _BE64_AT(table, index * self.l2e_size)[0]

    def l2_bitmap(self, table, index: int) -> int:
        return _BE64_AT(table, index * 16 + 8)[0] if self.extended else 0

    def set_l2_entry(self, table, index: int, value: int) -> None:
        _PACK64_INTO(table, index * self.l2e_size, value)

    def set_l2_bitmap(self, table, index: int, value: int) -> None:
        _PACK64_INTO(table, index * 16 + 8, value)

    def cluster_type(self, e: int) -> int:
        """qcow2_get_cluster_type()."""
        if e & QCOW_OFLAG_COMPRESSED:
            return CL_COMPRESSED
        if e & QCOW_OFLAG_ZERO and not self.extended:
            return CL_ZERO_ALLOC if e & L2E_OFFSET_MASK else CL_ZERO_PLAIN
        if not e & L2E_OFFSET_MASK:
            if self.has_data_file and e & QCOW_OFLAG_COPIED:
                return CL_NORMAL
            return CL_UNALLOCATED
        return CL_NORMAL

    def subcluster_type(self, e: int, bitmap: int, sc: int) -> int:
        """qcow2_get_subcluster_type()."""
        t = self.cluster_type(e)
        if self.extended:
            if t == CL_COMPRESSED:
                return SC_COMPRESSED
            if t == CL_NORMAL:
                if (bitmap >> 32) & bitmap:
                    return SC_INVALID
                if bitmap >> (32 + sc) & 1:
                    return SC_ZERO_ALLOC
                if bitmap >> sc & 1:
                    return SC_NORMAL
                return SC_UNALLOCATED_ALLOC
            if bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
                return SC_INVALID
            if bitmap >> (32 + sc) & 1:
                return SC_ZERO_PLAIN
            return SC_UNALLOCATED_PLAIN
        return (SC_UNALLOCATED_PLAIN, SC_ZERO_PLAIN, SC_ZERO_ALLOC, SC_NORMAL,
                SC_COMPRESSED)[t]

    def parse_compressed_l2_entry(self, e: int) -> tuple[int, int]:
        """qcow2_parse_compressed_l2_entry(): (host offset, byte count)."""
        coffset = e & self.cluster_offset_mask
        nb_csectors = ((e >> self.csize_shift) & self.csize_mask) + 1
        csize = nb_csectors * QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & 511)
        return coffset, csize

    def _scan(self, table, index: int, count: int, max_runs: int | None = None) -> list:
        """l2_scan with the entries _native calls invalid reclassified as QEMU does
        (qcow2_get_cluster_type ignores reserved bits); their 6th field is True."""
        runs = N.l2_scan(table, index, count, self.extended, self.cluster_bits,
                         data_file=self.has_data_file, max_runs=max_runs)
        out = []
        for first, n, kind, host, copied in runs:
            if kind == N.L2_INVALID:
                e = self.l2_entry(table, first)
                t = self.cluster_type(e)
                host = e & (self.cluster_offset_mask if t == CL_COMPRESSED else L2E_OFFSET_MASK)
                out.append((first, 1, t, host, bool(e & QCOW_OFLAG_COPIED), True))
            else:
                out.append((first, n, kind, host, copied, False))
        return out

    # ---- L2 slice lookup ------------------------------------------------------------------
    def _l2_location(self, offset: int):
        """(l1_index, slice index within the table, index within the slice)."""
        cb = self.cluster_bits
        l2_index = (offset >> cb) & (self.l2_size - 1)
        return (offset >> (cb + self.l2_bits), l2_index // self.l2_slice_size,
                l2_index % self.l2_slice_size)

    def _l2_offset_for_read(self, l1_index: int) -> int:
        if l1_index >= self.l1_size:
            return 0
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            self.signal_corruption(True, "L2 table offset %#x unaligned (L1 index: %#x)"
                                   % (l2_offset, l1_index))
        return l2_offset

    def get_host_runs(self, offset: int, length: int, max_runs: int | None = None,
                      stop_at_error: bool = False) -> list[tuple[int, int, int]]:
        """Runs (bytes, subcluster type, host offset | L2 entry if compressed) from offset,
        covering at most length bytes and never crossing an L2 slice (as
        qcow2_get_host_offset() but for every run of the slice).  With ``max_runs``
        only the first runs.  With ``stop_at_error`` (bulk block status) a corrupt
        entry ends the list before the run whose own lookup would signal it, so every
        run returned is what a lookup at its start returns; corruption is signalled
        only when that is the first run."""
        cb, cs = self.cluster_bits, self.cluster_size
        in_cluster = offset & (cs - 1)
        l1_index, slice_no, idx = self._l2_location(offset)
        avail = ((self.l2_slice_size - idx) << cb) - in_cluster
        if length > avail:
            length = avail
        l2_offset = self._l2_offset_for_read(l1_index)
        if not l2_offset:
            return [(length, SC_UNALLOCATED_PLAIN, 0)]
        table = self.l2_cache.get(l2_offset + slice_no * self.l2_slice_bytes)
        nclusters = (in_cluster + length + cs - 1) >> cb
        if nclusters == 1 and not self.extended and not self.has_data_file:
            # a small request: decoding its one entry here is cheaper than a bulk scan;
            # anything unusual (compressed, reserved bits, unaligned) takes the scan
            e = _BE64_AT(table, idx * 8)[0]
            host = e & L2E_OFFSET_MASK
            if not e & _SCAN_BITS and not host & (cs - 1):
                if e & QCOW_OFLAG_ZERO:
                    return [(length, SC_ZERO_ALLOC, host + in_cluster) if host
                            else (length, SC_ZERO_PLAIN, 0)]
                if host:
                    return [(length, SC_NORMAL, host + in_cluster)]
                return [(length, SC_UNALLOCATED_PLAIN, 0)]
        out: list[tuple[int, int, int]] = []
        if not self.extended:
            skip = in_cluster
            left = length
            for first, n, t, host, copied, bad in self._scan(table, idx, nclusters, max_runs):
                nbytes = min((n << cb) - skip, left)
                if t == CL_NORMAL or t == CL_ZERO_ALLOC:
                    if bad or self.has_data_file:
                        if stop_at_error and out and self._host_cluster_bad(
                                host, offset + length - left - skip):
                            return out
                        self._check_host_cluster(l2_offset, first, host,
                                                 offset + length - left - skip)
                    out.append((nbytes, SC_NORMAL if t == CL_NORMAL else SC_ZERO_ALLOC,
                                host + skip))
                elif t == CL_COMPRESSED:
                    if self.has_data_file:
                        if stop_at_error and out:
                            return out
                        self.signal_corruption(
                            True, "Compressed cluster entry found in image with external "
                            "data file (L2 offset: %#x, L2 index: %#x)" % (l2_offset, first))
                    out.append((nbytes, SC_COMPRESSED, self.l2_entry(table, first)))
                else:
                    out.append((nbytes, SC_ZERO_PLAIN if t == CL_ZERO_PLAIN
                                else SC_UNALLOCATED_PLAIN, 0))
                left -= nbytes
                skip = 0
            return out
        return self._get_host_runs_extended(table, l2_offset, offset, idx, in_cluster,
                                            length, max_runs, stop_at_error)

    def _host_cluster_bad(self, host: int, guest: int) -> bool:
        """Whether _check_host_cluster() would signal corruption."""
        cs = self.cluster_size
        return bool(host & (cs - 1)) or (self.has_data_file and host != guest & ~(cs - 1))

    def _check_host_cluster(self, l2_offset: int, index: int, host: int, guest: int) -> None:
        if host & (self.cluster_size - 1):
            self.signal_corruption(True, "Cluster allocation offset %#x unaligned (L2 offset: "
                                   "%#x, L2 index: %#x)" % (host, l2_offset, index))
        guest_cluster = guest & ~(self.cluster_size - 1)
        if self.has_data_file and host != guest_cluster:
            self.signal_corruption(True, "External data file host cluster offset %#x does "
                                   "not match guest cluster offset: %#x, L2 index: %#x)"
                                   % (host, guest_cluster, index))

    def _get_host_runs_extended(self, table, l2_offset, offset, idx, in_cluster, length,
                                max_runs=None, stop_at_error=False):
        # with stop_at_error, a lookup that would signal corruption returns the runs
        # before the last one found (that one could still grow, so its own lookup
        # would reach the corrupt entry too)
        cs = self.cluster_size
        scb = self.subcluster_bits
        out: list[list[int]] = []
        pos = 0
        i = idx
        while pos < length:
            e, bitmap = _BE128_AT(table, i * 16)
            t = self.cluster_type(e)
            start_in = in_cluster if pos == 0 else 0
            cluster_guest = offset + pos - start_in
            if t == CL_COMPRESSED:
                if self.has_data_file:
                    if stop_at_error and len(out) > 1:
                        return [tuple(r) for r in out[:-1]]
                    self.signal_corruption(
                        True, "Compressed cluster entry found in image with external data "
                        "file (L2 offset: %#x, L2 index: %#x)" % (l2_offset, i))
                n = min(cs - start_in, length - pos)
                out.append([n, SC_COMPRESSED, e])
                pos += n
                i += 1
                continue
            host = e & L2E_OFFSET_MASK
            if t == CL_NORMAL:
                if (stop_at_error and len(out) > 1
                        and self._host_cluster_bad(host, cluster_guest)):
                    return [tuple(r) for r in out[:-1]]
                self._check_host_cluster(l2_offset, i, host, cluster_guest)
            sc = start_in >> scb
            while sc < 32 and pos < length:
                st = self.subcluster_type(e, bitmap, sc)
                if st == SC_INVALID:
                    if stop_at_error and len(out) > 1:
                        return [tuple(r) for r in out[:-1]]
                    self.signal_corruption(True, "Invalid cluster entry found (L2 offset: %#x, "
                                           "L2 index: %#x)" % (l2_offset, i))
                kind, cnt = N.subcluster_runs(bitmap, sc)
                run_end = (sc + cnt) << scb
                in_c = (offset + pos) - cluster_guest
                n = min(run_end - in_c, length - pos)
                h = host + in_c if st in (SC_NORMAL, SC_ZERO_ALLOC, SC_UNALLOCATED_ALLOC) else 0
                if (out and out[-1][1] == st and st != SC_COMPRESSED
                        and (h == 0 and out[-1][2] == 0 or h and out[-1][2] + out[-1][0] == h)):
                    out[-1][0] += n
                else:
                    out.append([n, st, h])
                    if max_runs is not None and len(out) > max_runs:
                        return [tuple(r) for r in out[:max_runs]]   # the last one is complete
                pos += n
                sc += cnt
            i += 1
        return [tuple(r) for r in out]

    def _plain_l2_entry(self, offset: int) -> int | None:
        """The standard L2 entry of offset's cluster for the one-cluster fast paths
        (qcow2_get_host_offset()'s lookup): 0 when no L2 table covers it, None when the
        general path must decide (extended L2, a data file, encryption, an unaligned
        L2 table offset, which it reports as corruption)."""
        if self.extended or self.has_data_file or self.crypto is not None:
            return None
        cb = self.cluster_bits
        l1_index = offset >> (cb + self.l2_bits)
        if l1_index >= self.l1_size:
            return 0
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            return None
        if not l2_offset:
            return 0
        l2_index = (offset >> cb) & (self.l2_size - 1)
        per_slice = self.l2_slice_size
        table = self.l2_cache.get(l2_offset + l2_index // per_slice * self.l2_slice_bytes)
        return _BE64_AT(table, (l2_index % per_slice) << 3)[0]

    def read_in_cluster(self, offset: int, buf: memoryview) -> bool:
        """The small-read fast path: one L2 lookup then one read.  ``buf`` must not
        cross a cluster boundary.  Handles a plain standard L2 entry (data, zero,
        unallocated) and returns True; returns False having done nothing for anything
        else (compressed, reserved bits, unaligned offsets: the general path classifies
        them and signals corruption)."""
        e = self._plain_l2_entry(offset)
        if e is None:
            return False
        cs = self.cluster_size
        host = e & L2E_OFFSET_MASK
        if e & _SCAN_BITS or host & (cs - 1):
            return False
        if e & QCOW_OFLAG_ZERO:
            zero_fill(buf)
        elif not host:
            self._read_backing(offset, buf)
        else:
            self.data_file_read(host + (offset & (cs - 1)), buf)
        return True

    def write_in_cluster(self, offset: int, data: memoryview) -> bool:
        """The small-write fast path: a write inside one cluster that is allocated,
        not shared (OFLAG_COPIED) and reads as data needs no allocation, COW or L2
        update (handle_copied() keeps it, calculate_l2_meta() finds nothing to do): the
        overlap check and the data write.  Returns False having done nothing for
        anything else, which the general path handles."""
        e = self._plain_l2_entry(offset)
        if not e or not e & QCOW_OFLAG_COPIED or e & (_SCAN_BITS | QCOW_OFLAG_ZERO):
            return False
        cs = self.cluster_size
        host = e & L2E_OFFSET_MASK
        if not host or host & (cs - 1):
            return False
        host += offset & (cs - 1)
        self.pre_write_overlap_check(0, host, len(data), True)
        # through the file node (not its descriptor): it counts writes for flush
        self.data_file.pwrite(host, data)
        return True

    def data_file_read(self, host: int, buf: memoryview) -> None:
        """Read buf at a host offset of the data file: straight from a plain file's
        descriptor when it can (the file node's own checks would be no-ops for such a
        request), else through the data file node (other protocols, O_DIRECT, errors,
        short reads at EOF)."""
        fd = getattr(self.data_file.drv, "plain_fd", None)
        if fd is not None:
            try:
                if os.preadv(fd, (buf,), host) == len(buf):
                    return
            except OSError:
                pass
        self.data_file.preadv(host, buf)

    # ---- L1 table -----------------------------------------------------------------------
    def write_l1_entry(self, l1_index: int) -> None:
        """qcow2_write_l1_entry() (request alignment 1: just the entry, synced)."""
        self.pre_write_overlap_check(OL.ACTIVE_L1, self.l1_table_offset + l1_index * L1E_SIZE,
                                     L1E_SIZE)
        self.file.pwrite(self.l1_table_offset + l1_index * L1E_SIZE,
                         BE64.pack(self.l1_table[l1_index]))
        self.file.flush()

    def grow_l1_table(self, min_size: int, exact_size: bool) -> None:
        """qcow2_grow_l1_table()."""
        if min_size <= self.l1_size:
            return
        if min_size > INT_MAX // L1E_SIZE:
            raise BlockError("File too large", errno=errno.EFBIG)
        if exact_size:
            new_size = min_size
        else:
            new_size = self.l1_size or 1
            while min_size > new_size:
                new_size = -(-(new_size * 3) // 2)
        if new_size > QCOW_MAX_L1_SIZE // L1E_SIZE:
            raise BlockError("File too large", errno=errno.EFBIG)
        new_table = list(self.l1_table) + [0] * (new_size - self.l1_size)
        new_offset = self.alloc_clusters(new_size * L1E_SIZE)
        self.flush_cache(self.refcount_cache)
        self.pre_write_overlap_check(0, new_offset, new_size * L1E_SIZE)
        self.file.pwrite(new_offset, struct.pack(">%dQ" % new_size, *new_table))
        self.file.flush()
        self.file.pwrite(OFS_L1_SIZE, L1_SIZE_AND_OFFSET.pack(new_size, new_offset))
        self.file.flush()
        old_offset, old_size = self.l1_table_offset, self.l1_size
        self.l1_table = new_table
        self.l1_table_offset = new_offset
        self.l1_size = new_size
        self.header.l1_size, self.header.l1_table_offset = new_size, new_offset
        self.free_clusters(old_offset, old_size * L1E_SIZE, QCOW2_DISCARD_OTHER)

    def shrink_l1_table(self, exact_size: int) -> None:
        """qcow2_shrink_l1_table(): zero L1 entries past exact_size, free their tables."""
        if exact_size >= self.l1_size:
            return
        self.file.pwrite(self.l1_table_offset + exact_size * L1E_SIZE,
                         bytes((self.l1_size - exact_size) * L1E_SIZE))
        self.file.flush()
        from .layout import QCOW2_DISCARD_ALWAYS
        for i in range(self.l1_size - 1, exact_size - 1, -1):
            off = self.l1_table[i] & L1E_OFFSET_MASK
            if not off:
                continue
            self.free_clusters(off, self.cluster_size, QCOW2_DISCARD_ALWAYS)
            self.l1_table[i] = 0

    # ---- L2 allocation ------------------------------------------------------------------
    def get_cluster_table(self, offset: int) -> tuple[bytearray, int, int]:
        """get_cluster_table(): the L2 slice for offset, made writable (COW'd if shared).
        Returns (slice, index in slice, slice host offset)."""
        l1_index, slice_no, idx = self._l2_location(offset)
        if l1_index >= self.l1_size:
            self.grow_l1_table(l1_index + 1, False)
        l1e = self.l1_table[l1_index]
        l2_offset = l1e & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            self.signal_corruption(True, "L2 table offset %#x unaligned (L1 index: %#x)"
                                   % (l2_offset, l1_index))
        if not l1e & QCOW_OFLAG_COPIED:
            self.l2_allocate(l1_index)
            if l2_offset:
                self.free_clusters(l2_offset, self.l2_size * self.l2e_size, QCOW2_DISCARD_OTHER)
            l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        slice_off = l2_offset + slice_no * self.l2_slice_bytes
        return self.l2_cache.get(slice_off), idx, slice_off

    def l2_allocate(self, l1_index: int) -> None:
        """l2_allocate(): a new L2 table for l1_index (copy of the old one, if any)."""
        old = self.l1_table[l1_index] & L1E_OFFSET_MASK
        l2_offset = self.alloc_clusters(self.l2_size * self.l2e_size)
        if l2_offset == 0:
            self.signal_corruption(True, "Preventing invalid allocation of L2 table at "
                                   "offset 0")
        self.flush_cache(self.refcount_cache)
        sb = self.l2_slice_bytes
        for s in range(self.cluster_size // sb):
            if old:
                src = bytes(self.l2_cache.get(old + s * sb))
                t = self.l2_cache.get_empty(l2_offset + s * sb)
                t[:] = src
            else:
                t = self.l2_cache.get_empty(l2_offset + s * sb)
            self.l2_cache.mark_dirty(l2_offset + s * sb, t)
        self.flush_cache(self.l2_cache)
        self.l1_table[l1_index] = l2_offset | QCOW_OFLAG_COPIED
        self.write_l1_entry(l1_index)

    # ---- write allocation ---------------------------------------------------------------
    def _needs_new_alloc(self, t: int, copied: bool) -> bool:
        """cluster_needs_new_alloc()."""
        return not ((t == CL_NORMAL or t == CL_ZERO_ALLOC) and copied)

    def handle_copied(self, guest_offset: int, host_offset: int, nbytes: int):
        """handle_copied(): (bytes, host offset, L2Meta|None) of reusable clusters at
        guest_offset, or (0, ...) if the first cluster needs a new allocation."""
        cb, cs = self.cluster_bits, self.cluster_size
        in_cluster = guest_offset & (cs - 1)
        table, idx, _ = self.get_cluster_table(guest_offset)
        nb = min(-(-(in_cluster + nbytes) // cs), self.l2_slice_size - idx,
                 BDRV_REQUEST_MAX_BYTES >> cb)
        runs = self._scan(table, idx, nb)
        first, n, t, host, copied, bad = runs[0]
        if self._needs_new_alloc(t, copied):
            return 0, host_offset, None, False
        if host & (cs - 1):
            e = self.l2_entry(table, idx)
            self.signal_corruption(True, "%s cluster offset %#x unaligned (guest offset: %#x)"
                                   % ("Preallocated zero" if e & QCOW_OFLAG_ZERO else "Data",
                                      host, guest_offset))
        if host_offset != -1 and host != host_offset - in_cluster:
            return 0, host_offset, None, True
        keep = n
        expected = host + (n << cb)
        for first2, n2, t2, host2, copied2, bad2 in runs[1:]:
            if self._needs_new_alloc(t2, copied2) or host2 != expected:
                break
            keep += n2
            expected += n2 << cb
        nbytes = min(nbytes, (keep << cb) - in_cluster)
        meta = self.calculate_l2_meta(host, guest_offset, nbytes, table, idx, True)
        return nbytes, host + in_cluster, meta, True

    def handle_alloc(self, guest_offset: int, host_offset: int, nbytes: int):
        """handle_alloc(): allocate new clusters for the start of the range.
        Returns (bytes, host offset, L2Meta); bytes == 0 if no contiguous space."""
        cb, cs = self.cluster_bits, self.cluster_size
        in_cluster = guest_offset & (cs - 1)
        table, idx, _ = self.get_cluster_table(guest_offset)
        nb = min(-(-(in_cluster + nbytes) // cs), self.l2_slice_size - idx,
                 BDRV_REQUEST_MAX_BYTES >> cb)
        # count_single_write_clusters(new_alloc=True)
        count = 0
        for first, n, t, host, copied, bad in self._scan(table, idx, nb):
            if not self._needs_new_alloc(t, copied):
                break
            count += n
        nb = count
        if self.has_data_file:
            alloc = guest_offset - in_cluster
        elif host_offset == -1:
            alloc = self.alloc_clusters(nb << cb)
        else:
            alloc = host_offset - in_cluster
            nb = self.alloc_clusters_at(alloc, nb)
        if nb == 0:
            return 0, host_offset, None
        # the table may have been evicted/reloaded by the allocation
        table, idx, _ = self.get_cluster_table(guest_offset)
        requested = nbytes + in_cluster
        avail = nb << cb
        nbytes = min(nbytes, min(requested, avail) - in_cluster)
        meta = self.calculate_l2_meta(alloc, guest_offset, nbytes, table, idx, False)
        return nbytes, alloc + in_cluster, meta

    def calculate_l2_meta(self, host_cluster_offset: int, guest_offset: int, nbytes: int,
                          table, idx: int, keep_old: bool):
        """calculate_l2_meta(): the COW regions around a write; None when no metadata
        update is needed (all written subclusters already normal and kept)."""
        cb, cs = self.cluster_bits, self.cluster_size
        scb, scs = self.subcluster_bits, self.subcluster_size
        cow_start_to = guest_offset & (cs - 1)
        cow_end_from = cow_start_to + nbytes
        nb_clusters = -(-cow_end_from // cs)
        skip_cow = keep_old
        for i in range(nb_clusters):
            e = self.l2_entry(table, idx + i)
            bm = self.l2_bitmap(table, idx + i)
            if skip_cow:
                write_from = max(cow_start_to, i << cb)
                write_to = min(cow_end_from, (i + 1) << cb)
                first_sc = (write_from & (cs - 1)) >> scb
                last_sc = ((write_to - 1) & (cs - 1)) >> scb
                st = self.subcluster_type(e, bm, first_sc)
                cnt = self._subcluster_range_count(e, bm, first_sc, st)
                if st != SC_NORMAL or first_sc + cnt <= last_sc:
                    skip_cow = False
            else:
                st = self.subcluster_type(e, bm, 0)
            if st == SC_INVALID:
                l1_index = guest_offset >> (cb + self.l2_bits)
                self.signal_corruption(True, "Invalid cluster entry found (L2 offset: %#x, L2 "
                                       "index: %#x)" % (self.l1_table[l1_index] & L1E_OFFSET_MASK,
                                                        idx + i))
            if not keep_old and nb_clusters > 8 and not self.extended:
                break   # only INVALID matters here and _scan() classified the rest
        if skip_cow:
            return None
        e = self.l2_entry(table, idx)
        bm = self.l2_bitmap(table, idx)
        sc_index = (guest_offset & (cs - 1)) >> scb
        st = self.subcluster_type(e, bm, sc_index)
        if not keep_old:
            if st == SC_COMPRESSED:
                cow_start_from = 0
            elif st in (SC_NORMAL, SC_ZERO_ALLOC, SC_UNALLOCATED_ALLOC):
                if self.extended:
                    alloc_bitmap = bm & QCOW_L2_BITMAP_ALL_ALLOC
                    ctz = (alloc_bitmap & -alloc_bitmap).bit_length() - 1 if alloc_bitmap else 32
                    cow_start_from = min(sc_index, ctz) << scb
                else:
                    cow_start_from = 0
            else:
                cow_start_from = sc_index << scb
        else:
            cow_start_from = cow_start_to if st == SC_NORMAL else sc_index << scb

        li = idx + nb_clusters - 1
        e = self.l2_entry(table, li)
        bm = self.l2_bitmap(table, li)
        sc_index = ((guest_offset + nbytes - 1) & (cs - 1)) >> scb
        st = self.subcluster_type(e, bm, sc_index)
        if not keep_old:
            if st == SC_COMPRESSED:
                cow_end_to = -(-cow_end_from // cs) * cs
            elif st in (SC_NORMAL, SC_ZERO_ALLOC, SC_UNALLOCATED_ALLOC):
                cow_end_to = -(-cow_end_from // cs) * cs
                if self.extended:
                    alloc_bitmap = bm & QCOW_L2_BITMAP_ALL_ALLOC
                    clz = 32 - alloc_bitmap.bit_length()
                    cow_end_to -= min(31 - sc_index, clz) << scb
            else:
                cow_end_to = -(-cow_end_from // scs) * scs
        else:
            cow_end_to = cow_end_from if st == SC_NORMAL else -(-cow_end_from // scs) * scs
        return L2Meta(guest_offset - (guest_offset & (cs - 1)), host_cluster_offset,
                      nb_clusters, keep_old,
                      CowRegion(cow_start_from, cow_start_to - cow_start_from),
                      CowRegion(cow_end_from, cow_end_to - cow_end_from))

    def _subcluster_range_count(self, e: int, bm: int, sc_from: int, st: int) -> int:
        """qcow2_get_subcluster_range_type(): subclusters from sc_from of type st."""
        if not self.extended or st == SC_COMPRESSED:
            return 1
        if st == SC_INVALID:
            return 0
        kind, cnt = N.subcluster_runs(bm, sc_from)
        return cnt

    def alloc_host_offset(self, offset: int, nbytes: int):
        """qcow2_alloc_host_offset(): (bytes handled, host offset, [(guest, host, n, meta)]).

        The host range of the returned bytes is contiguous."""
        start, remaining = offset, nbytes
        cluster_offset = -1
        host_offset = -1
        cur = 0
        segs = []
        while True:
            if host_offset == -1 and cluster_offset != -1:
                host_offset = cluster_offset
            start += cur
            remaining -= cur
            if cluster_offset != -1:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            got, new_host, meta, handled = self.handle_copied(start, cluster_offset, cur)
            if handled and got:
                segs.append((start, new_host, got, meta))
                if cluster_offset == -1:
                    cluster_offset = new_host
                cur = got
                continue
            if handled and got == 0:
                break
            got, new_host, meta = self.handle_alloc(start, cluster_offset, cur)
            if got == 0:
                break
            segs.append((start, new_host, got, meta))
            if cluster_offset == -1:
                cluster_offset = new_host
            cur = got
        return nbytes - remaining, host_offset, segs

    def perform_cow_and_write(self, guest: int, host: int, data, meta: L2Meta | None) -> None:
        """perform_cow() merged with the guest data write (qcow2_co_pwritev_task)."""
        dfile = self.data_file
        crypto = getattr(self, "crypto", None)
        if crypto is not None:
            # qcow2_co_encrypt(): LUKS payload sectors are numbered by host offset, the
            # legacy AES ones by guest offset (host - guest is constant in this write)
            shift = 0 if self.crypt_physical_offset else guest - host
            enc = lambda off, buf: crypto.encrypt((off + shift) >> 9, buf) if len(buf) else buf
        else:
            enc = lambda off, buf: buf
        if meta is None or (meta.cow_start.nb_bytes == 0 and meta.cow_end.nb_bytes == 0):
            if data is not None and len(data):
                self.pre_write_overlap_check(0, host, len(data), True)
                dfile.pwrite(host, enc(host, data))
            return
        start = meta.alloc_offset + meta.cow_start.offset
        end = meta.alloc_offset + max(meta.cow_end.offset + meta.cow_end.nb_bytes,
                                      meta.cow_start.offset + meta.cow_start.nb_bytes)
        if data is not None:
            end = max(end, host + len(data))
        self.pre_write_overlap_check(0, start, end - start, True)
        start_buf = (self._read_guest(meta.offset + meta.cow_start.offset,
                                      meta.cow_start.nb_bytes)
                     if meta.cow_start.nb_bytes else b"")
        end_buf = (self._read_guest(meta.offset + meta.cow_end.offset, meta.cow_end.nb_bytes)
                   if meta.cow_end.nb_bytes else b"")
        if data is not None:
            buf = bytearray(start_buf)
            buf += data
            buf += end_buf
            off = meta.alloc_offset + meta.cow_start.offset
            dfile.pwrite(off, enc(off, buf))
        else:
            if start_buf:
                off = meta.alloc_offset + meta.cow_start.offset
                dfile.pwrite(off, enc(off, start_buf))
            if end_buf:
                off = meta.alloc_offset + meta.cow_end.offset
                dfile.pwrite(off, enc(off, end_buf))

    def _read_guest(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        size = self.get_length()
        n = max(0, min(length, size - offset))
        if n:
            self.preadv_internal(offset, memoryview(buf)[:n])
        return bytes(buf)

    def link_l2(self, m: L2Meta) -> None:
        """qcow2_alloc_cluster_link_l2() (after the data and COW were written)."""
        cb = self.cluster_bits
        if self.use_lazy_refcounts:
            self.mark_dirty()
        table, idx, slice_off = self.get_cluster_table(m.offset)
        if not self.use_lazy_refcounts:
            # the new clusters' refcounts must be on disk before the L2 entries
            self.l2_cache.set_dependency(self.refcount_cache)
        old = []
        for i in range(m.nb_clusters):
            e = self.l2_entry(table, idx + i)
            if e:
                old.append(e)
            self.set_l2_entry(table, idx + i, (m.alloc_offset + (i << cb)) | QCOW_OFLAG_COPIED)
            if self.extended and not m.prealloc:
                bm = self.l2_bitmap(table, idx + i)
                written_from = max(m.cow_start.offset, i << cb)
                written_to = min(m.cow_end.offset + m.cow_end.nb_bytes, (i + 1) << cb)
                first_sc = (written_from & (self.cluster_size - 1)) >> self.subcluster_bits
                last_sc = ((written_to - 1) & (self.cluster_size - 1)) >> self.subcluster_bits
                bm |= QCOW_OFLAG_SUB_ALLOC_RANGE(first_sc, last_sc + 1)
                bm &= ~QCOW_OFLAG_SUB_ZERO_RANGE(first_sc, last_sc + 1)
                self.set_l2_bitmap(table, idx + i, bm)
        self.l2_cache.mark_dirty(slice_off, table)
        if not m.keep_old:
            for e in old:
                self.free_any_cluster(e, QCOW2_DISCARD_NEVER)

    def alloc_compressed_cluster_offset(self, offset: int, compressed_size: int) -> int:
        """qcow2_alloc_compressed_cluster_offset(): link the guest cluster at ``offset``
        to ``compressed_size`` newly allocated bytes; returns their host offset.

        A compressed write never overwrites: EIO when the cluster has a host offset
        (a zero flag alone may be replaced).  Compressed entries never carry
        OFLAG_COPIED (their host cluster may be shared), and with extended L2 entries
        their bitmap is 0."""
        table, idx, slice_off = self.get_cluster_table(offset)
        if self.l2_entry(table, idx) & L2E_OFFSET_MASK:
            raise BlockError("Input/output error", errno=errno.EIO)
        host = self.alloc_bytes(compressed_size)
        nb_csectors = ((host + compressed_size - 1) // QCOW2_COMPRESSED_SECTOR_SIZE
                       - host // QCOW2_COMPRESSED_SECTOR_SIZE)
        assert host & self.cluster_offset_mask == host
        assert nb_csectors & self.csize_mask == nb_csectors
        self.set_l2_entry(table, idx,
                          host | QCOW_OFLAG_COMPRESSED | nb_csectors << self.csize_shift)
        if self.extended:
            self.set_l2_bitmap(table, idx, 0)
        self.l2_cache.mark_dirty(slice_off, table)
        return host

    # ---- zeroes and discard ---------------------------------------------------------------
    def cluster_discard(self, offset: int, nbytes: int, dtype: int, full_discard: bool) -> None:
        """qcow2_cluster_discard(): offset cluster aligned, end aligned or image end."""
        cs, cb = self.cluster_size, self.cluster_bits
        nb = -(-nbytes // cs)
        self.cache_discards = True
        try:
            while nb > 0:
                table, idx, slice_off = self.get_cluster_table(offset)
                n = min(nb, self.l2_slice_size - idx)
                self._discard_in_slice(table, idx, slice_off, n, dtype, full_discard)
                nb -= n
                offset += n << cb
        finally:
            self.cache_discards = False
            self.process_discards()

    def _discard_in_slice(self, table, idx, slice_off, n, dtype, full_discard) -> None:
        has_backing = self.node.backing is not None
        for first, cnt, t, host, copied, bad in self._scan(table, idx, n):
            if not full_discard and not has_backing and t in (CL_UNALLOCATED, CL_ZERO_PLAIN) \
                    and not self.extended:
                continue   # nothing would change (v3: zero stays zero; v2: 0 stays 0)
            for i in range(first, first + cnt):
                old_e = self.l2_entry(table, i)
                old_bm = self.l2_bitmap(table, i)
                new_e, new_bm = old_e, old_bm
                ct = self.cluster_type(old_e)
                if full_discard:
                    new_e = new_bm = 0
                elif has_backing or ct in (CL_NORMAL, CL_ZERO_ALLOC, CL_COMPRESSED):
                    if self.extended:
                        new_e, new_bm = 0, QCOW_L2_BITMAP_ALL_ZEROES
                    else:
                        new_e = QCOW_OFLAG_ZERO if self.version >= 3 else 0
                if old_e == new_e and old_bm == new_bm:
                    continue
                self.set_l2_entry(table, i, new_e)
                if self.extended:
                    self.set_l2_bitmap(table, i, new_bm)
                self.l2_cache.mark_dirty(slice_off, table)
                self.free_any_cluster(old_e, dtype)

    def subcluster_zeroize(self, offset: int, nbytes: int, may_unmap: bool) -> None:
        """qcow2_subcluster_zeroize(): offset subcluster aligned, end aligned or image end."""
        end = offset + nbytes
        size = self.get_length()
        if self.data_file_raw:
            self.data_file.pwrite_zeroes(offset, nbytes, may_unmap)
        if self.version < 3:
            if self.node.backing is None:
                self.cluster_discard(offset, nbytes, QCOW2_DISCARD_REQUEST, False)
                return
            raise NotSupported()
        cs = self.cluster_size
        head = min(end, -(-offset // cs) * cs) - offset
        offset += head
        tail = 0 if end >= size else end - max(offset, end - (end & (cs - 1)))
        end -= tail
        self.cache_discards = True
        try:
            if head:
                self._zero_l2_subclusters(offset - head, -(-head // self.subcluster_size))
            nb = -(-(end - offset) // cs) if end > offset else 0
            while nb > 0:
                table, idx, slice_off = self.get_cluster_table(offset)
                n = min(nb, self.l2_slice_size - idx)
                self._zero_in_slice(table, idx, slice_off, n, may_unmap)
                nb -= n
                offset += n * cs
            if tail:
                self._zero_l2_subclusters(end, -(-tail // self.subcluster_size))
        finally:
            self.cache_discards = False
            self.process_discards()

    def _zero_in_slice(self, table, idx, slice_off, n, may_unmap) -> None:
        for first, cnt, t, host, copied, bad in self._scan(table, idx, n):
            if not self.extended and t == CL_ZERO_PLAIN and not bad:
                continue
            if not self.extended and t == CL_ZERO_ALLOC and not may_unmap and not bad:
                continue
            for i in range(first, first + cnt):
                old_e = self.l2_entry(table, i)
                old_bm = self.l2_bitmap(table, i)
                ct = self.cluster_type(old_e)
                unmap = ct == CL_COMPRESSED or (may_unmap and ct in (CL_NORMAL, CL_ZERO_ALLOC))
                new_e = 0 if unmap else old_e
                new_bm = old_bm
                if self.extended:
                    new_bm = QCOW_L2_BITMAP_ALL_ZEROES
                else:
                    new_e |= QCOW_OFLAG_ZERO
                if old_e == new_e and old_bm == new_bm:
                    continue
                self.set_l2_entry(table, i, new_e)
                if self.extended:
                    self.set_l2_bitmap(table, i, new_bm)
                self.l2_cache.mark_dirty(slice_off, table)
                if unmap:
                    self.free_any_cluster(old_e, QCOW2_DISCARD_REQUEST)

    def _zero_l2_subclusters(self, offset: int, nb_subclusters: int) -> None:
        sc = (offset & (self.cluster_size - 1)) >> self.subcluster_bits
        table, idx, slice_off = self.get_cluster_table(offset)
        ct = self.cluster_type(self.l2_entry(table, idx))
        if ct == CL_COMPRESSED:
            raise NotSupported()
        old = bm = self.l2_bitmap(table, idx)
        bm |= QCOW_OFLAG_SUB_ZERO_RANGE(sc, sc + nb_subclusters)
        bm &= ~QCOW_OFLAG_SUB_ALLOC_RANGE(sc, sc + nb_subclusters)
        if bm != old:
            self.set_l2_bitmap(table, idx, bm)
            self.l2_cache.mark_dirty(slice_off, table)
