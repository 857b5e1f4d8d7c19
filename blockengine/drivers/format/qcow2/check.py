"""Consistency check (QEMU's qcow2_check_refcounts() in qcow2-refcount.c).

Theory of operation: refcounts are recomputed from every structure that references
host clusters (header, L1/L2 tables and data of the active state and of every
snapshot, the snapshot table, the refcount table and blocks, the bitmap directory and
tables) into an in-memory table of 64-bit counters (``_native.refcount_add_range`` on
runs), then compared to the stored refcounts.  A stored refcount above the computed
one is a leak, below it a corruption.  With fix='leaks' (or 'all') leaks are repaired
by lowering the stored refcounts; with 'all' too-low refcounts are raised and wrong
OFLAG_COPIED flags corrected.  Messages go to ``driver.check_messages`` with QEMU's
texts (qemu-img prints them to stderr).
"""
from __future__ import annotations

import struct
from array import array

from .layout import (BITMAP_DIR_ENTRY, CL_COMPRESSED, CL_NORMAL, CL_UNALLOCATED,
                     CL_ZERO_ALLOC, CL_ZERO_PLAIN, L1E_OFFSET_MASK, L1E_RESERVED_MASK,
                     L1E_SIZE, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, QCOW2_DISCARD_ALWAYS,
                     QCOW_L2_BITMAP_ALL_ALLOC, QCOW_MAX_L1_SIZE, QCOW_OFLAG_COPIED,
                     QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
                     REFTABLE_ENTRY_SIZE)
from .native import N

CHECK_FRAG_INFO = 2
ORDER64 = 6


class _Refs:
    """The in-memory refcount table (64-bit big-endian counters)."""

    def __init__(self, n: int):
        self.buf = bytearray(8 * max(n, 1))
        self.n = max(n, 1)

    def grow(self, n: int) -> None:
        if n > self.n:
            self.buf += bytes(8 * (n - self.n))
            self.n = n

    def add(self, first: int, count: int) -> None:
        self.grow(first + count)
        N.refcount_add_range(self.buf, ORDER64, first, count, 1)

    def get(self, i: int) -> int:
        return N.refcount_get(self.buf, ORDER64, i) if i < self.n else 0


class Checker:
    def __init__(self, s, fix: str | None):
        self.s = s
        self.fix_leaks = fix in ("leaks", "all")
        self.fix_errors = fix in ("errors", "all")
        self.res = {"check-errors": 0, "corruptions": 0, "leaks": 0,
                    "corruptions-fixed": 0, "leaks-fixed": 0,
                    "allocated-clusters": 0, "total-clusters": 0,
                    "fragmented-clusters": 0, "compressed-clusters": 0}
        self.msgs = s.check_messages = []

    def msg(self, text: str) -> None:
        self.msgs.append(text)

    # ---- computing ---------------------------------------------------------------------
    def inc(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt()."""
        if size <= 0:
            return
        cb = self.s.cluster_bits
        first = offset >> cb
        last = (offset + size - 1) >> cb
        self.refs.add(first, last - first + 1)
        if self.s.refcount_order < 6:
            vals = N.refcount_get_range(self.refs.buf, ORDER64, first, last - first + 1)
            if max(vals) > self.s.refcount_max:
                for k, v in enumerate(vals):
                    if v > self.s.refcount_max:
                        N.refcount_set_range(self.refs.buf, ORDER64, first + k, 1,
                                             self.s.refcount_max)
                        self.msg("ERROR: overflow cluster offset=0x%x" % ((first + k) << cb))
                        self.msg("Use qemu-img amend to increase the refcount entry width or "
                                 "qemu-img convert to create a clean copy if the image cannot "
                                 "be opened for writing")
                        self.res["corruptions"] += 1

    def check_l1(self, l1_offset: int, l1_size: int, flags: int, active: bool) -> None:
        s = self.s
        cs = s.cluster_size
        self.inc(l1_offset, l1_size * L1E_SIZE)
        if not l1_size:
            return
        if active:
            l1 = s.l1_table
        else:
            l1 = struct.unpack(">%dQ" % l1_size, s.file.pread(l1_offset, l1_size * L1E_SIZE))
        for i, e in enumerate(l1):
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.msg("ERROR found L1 entry with reserved bits set: %x" % e)
                self.res["corruptions"] += 1
            l2_offset = e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            self.inc(l2_offset, cs)
            if l2_offset & (cs - 1):
                self.msg("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted"
                         % l2_offset)
                self.res["corruptions"] += 1
                continue
            self.check_l2(l2_offset, flags)

    def check_l2(self, l2_offset: int, flags: int) -> None:
        s = self.s
        cs, cb = s.cluster_size, s.cluster_bits
        table = s.file.pread(l2_offset, cs)
        next_contig = 0
        frag = flags & CHECK_FRAG_INFO
        for first, n, t, host, copied, bad in s._scan(table, 0, s.l2_size):
            if bad:
                e = s.l2_entry(table, first)
                bm = s.l2_bitmap(table, first)
                if t != CL_COMPRESSED and e & L2E_STD_RESERVED_MASK:
                    self.msg("ERROR found L2 entry with reserved bits set: %x" % e)
                    self.res["corruptions"] += 1
            if t == CL_COMPRESSED:
                e = s.l2_entry(table, first)
                if e & QCOW_OFLAG_COPIED:
                    self.msg("ERROR: coffset=0x%x: copied flag must never be set for "
                             "compressed clusters" % (e & s.cluster_offset_mask))
                    e &= ~QCOW_OFLAG_COPIED
                    self.res["corruptions"] += 1
                if s.has_data_file:
                    self.msg("ERROR compressed cluster %d with data file, entry=0x%x"
                             % (first, e))
                    self.res["corruptions"] += 1
                    continue
                if s.l2_bitmap(table, first):
                    self.msg("ERROR compressed cluster %d with non-zero subcluster "
                             "allocation bitmap, entry=0x%x" % (first, e))
                    self.res["corruptions"] += 1
                    continue
                if frag:
                    self.res["allocated-clusters"] += 1
                    self.res["compressed-clusters"] += 1
                    self.res["fragmented-clusters"] += 1
                coffset, csize = s.parse_compressed_l2_entry(e)
                self.inc(coffset, csize)
            elif t in (CL_NORMAL, CL_ZERO_ALLOC):
                if s.extended:
                    for i in range(first, first + n):
                        bm = s.l2_bitmap(table, i)
                        if (bm >> 32) & bm:
                            self.res["corruptions"] += 1
                            self.msg("ERROR offset=%x: Allocated cluster has corrupted "
                                     "subcluster allocation bitmap" % (host + ((i - first) << cb)))
                if host & (cs - 1):
                    self.res["corruptions"] += 1
                    e = s.l2_entry(table, first)
                    contains = (s.l2_bitmap(table, first) & QCOW_L2_BITMAP_ALL_ALLOC) \
                        if s.extended else not e & QCOW_OFLAG_ZERO
                    if not contains:
                        self.msg("ERROR offset=%x: Preallocated cluster is not properly "
                                 "aligned; L2 entry corrupted." % host)
                    else:
                        self.msg("ERROR offset=%x: Data cluster is not properly aligned; L2 "
                                 "entry corrupted." % host)
                if frag:
                    self.res["allocated-clusters"] += n
                    if next_contig and host != next_contig:
                        self.res["fragmented-clusters"] += 1
                    next_contig = host + (n << cb)
                if not s.has_data_file:
                    self.inc(host & ~(cs - 1), n << cb)
            elif t == CL_UNALLOCATED and s.extended:
                for i in range(first, first + n):
                    if s.l2_bitmap(table, i) & QCOW_L2_BITMAP_ALL_ALLOC:
                        self.res["corruptions"] += 1
                        self.msg("ERROR: Unallocated cluster has non-zero subcluster "
                                 "allocation map")

    def check_bitmaps(self) -> None:
        s = self.s
        if not s.bitmaps_ext:
            return
        nb, dir_size, dir_offset = s.bitmaps_ext
        self.inc(dir_offset, dir_size)
        data = s.file.pread(dir_offset, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + BITMAP_DIR_ENTRY.size > len(data):
                break
            (tbl_off, tbl_size, flags, btype, gran, name_size,
             extra) = BITMAP_DIR_ENTRY.unpack_from(data, pos)
            pos += (BITMAP_DIR_ENTRY.size + extra + name_size + 7) & ~7
            self.inc(tbl_off, tbl_size * 8)
            if tbl_size and tbl_size * 8 <= (64 << 20):
                entries = struct.unpack(">%dQ" % tbl_size, s.file.pread(tbl_off, tbl_size * 8))
                for e in entries:
                    off = e & 0x00FFFFFFFFFFFE00
                    if off:
                        self.inc(off, s.cluster_size)

    def check_refblocks(self) -> None:
        s = self.s
        cs, cb = s.cluster_size, s.cluster_bits
        for i in range(s.refcount_table_size):
            e = s.refcount_table[i]
            off = e & REFT_OFFSET_MASK
            cluster = off >> cb
            if e & REFT_RESERVED_MASK:
                self.msg("ERROR refcount table entry %d has reserved bits set" % i)
                self.res["corruptions"] += 1
                continue
            if off & (cs - 1):
                self.msg("ERROR refcount block %d is not cluster aligned; refcount table "
                         "entry corrupted" % i)
                self.res["corruptions"] += 1
                continue
            if not off:
                continue
            if cluster >= self.nb_clusters:
                self.msg("ERROR refcount block %d is outside image" % i)
                self.res["corruptions"] += 1
                continue
            self.inc(off, cs)
            if self.refs.get(cluster) != 1:
                self.msg("ERROR refcount block %d refcount=%d" % (i, self.refs.get(cluster)))
                self.res["corruptions"] += 1

    # ---- comparing ---------------------------------------------------------------------
    def _refblock(self, ti: int) -> int:
        s = self.s
        if ti >= s.refcount_table_size:
            return 0
        e = s.refcount_table[ti]
        off = e & REFT_OFFSET_MASK
        if e & REFT_RESERVED_MASK or off & (s.cluster_size - 1) or \
                (off >> s.cluster_bits) >= self.nb_clusters:
            return 0
        return off

    def compare(self) -> int:
        s = self.s
        rbs = s.refcount_block_size
        n = self.refs.n
        highest = -1
        i = 0
        while i < n:
            k = min(rbs - (i & (rbs - 1)), n - i)
            computed = N.refcount_get_range(self.refs.buf, ORDER64, i, k)
            off = self._refblock(i >> s.refcount_block_bits)
            if off:
                block = s.refcount_cache.get(off)
                stored = N.refcount_get_range(block, s.refcount_order, i & (rbs - 1), k)
                diffs = N.refcount_compare(computed, block, s.refcount_order, i & (rbs - 1))
            else:
                stored = array("Q", bytes(8 * k))
                diffs = [(i & (rbs - 1)) + j for j, v in enumerate(computed) if v] \
                    if any(computed) else []
            last = max(len(computed.tobytes().rstrip(b"\0")), len(stored.tobytes().rstrip(b"\0")))
            if last:
                highest = i + (last - 1) // 8
            for d in diffs:
                j = d - (i & (rbs - 1))
                idx = i + j
                r1, r2 = stored[j], computed[j]
                fixed = None
                if r1 == 0:
                    self.rebuild = True
                    if self.fix_errors:
                        # QEMU rebuilds the refcount structures here; raising the refcount
                        # is equivalent as long as new refcount blocks land beyond every
                        # referenced cluster (free_cluster_index was moved there)
                        fixed = "corruptions-fixed"
                elif r1 > r2 and self.fix_leaks:
                    fixed = "leaks-fixed"
                elif r1 < r2 and self.fix_errors:
                    fixed = "corruptions-fixed"
                self.msg("%s cluster %d refcount=%d reference=%d" % (
                    "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked"), idx, r1, r2))
                if fixed:
                    try:
                        s.update_refcount(idx << s.cluster_bits, 1, abs(r1 - r2), r1 > r2,
                                          QCOW2_DISCARD_ALWAYS)
                        self.res[fixed] += 1
                        continue
                    except Exception:
                        pass
                if r1 < r2:
                    self.res["corruptions"] += 1
                else:
                    self.res["leaks"] += 1
            i += k
        return highest

    def check_oflag_copied(self) -> None:
        s = self.s
        cb = s.cluster_bits
        for i, e in enumerate(s.l1_table):
            l2_offset = e & L1E_OFFSET_MASK
            if not l2_offset or l2_offset & (s.cluster_size - 1):
                continue
            rc = s.get_refcount(l2_offset >> cb)
            if (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                self.msg("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d"
                         % ("Repairing" if self.fix_errors else "ERROR", i, e, rc))
                if self.fix_errors:
                    s.l1_table[i] = (e | QCOW_OFLAG_COPIED) if rc == 1 else \
                        (e & ~QCOW_OFLAG_COPIED)
                    s.write_l1_entry(i)
                    self.res["corruptions-fixed"] += 1
                else:
                    self.res["corruptions"] += 1
            table = s.file.pread(l2_offset, s.cluster_size)
            dirty = False
            for first, n, t, host, copied, bad in s._scan(table, 0, s.l2_size):
                if t not in (CL_NORMAL, CL_ZERO_ALLOC):
                    continue
                if s.has_data_file:
                    vals = array("Q", [1]) * n
                else:
                    if host & (s.cluster_size - 1):
                        continue
                    vals = s.get_refcount_range(host >> cb, n)
                bad_count = (n - vals.count(1)) if copied else vals.count(1)
                if not bad_count:
                    continue
                for j in range(n):
                    rc = vals[j]
                    if (rc == 1) == copied:
                        continue
                    le = s.l2_entry(table, first + j)
                    self.msg("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d"
                             % ("Repairing" if self.fix_errors else "ERROR", le, rc))
                    if self.fix_errors:
                        le = (le | QCOW_OFLAG_COPIED) if rc == 1 else (le & ~QCOW_OFLAG_COPIED)
                        table = bytearray(table) if not isinstance(table, bytearray) else table
                        s.set_l2_entry(table, first + j, le)
                        dirty = True
                        self.res["corruptions-fixed"] += 1
                    else:
                        self.res["corruptions"] += 1
            if dirty:
                s.l2_cache.clear()
                s.file.pwrite(l2_offset, table)

    # ---- driver ------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        cs = s.cluster_size
        file_size = s.file.total_size
        self.nb_clusters = -(-file_size // cs)
        self.refs = _Refs(self.nb_clusters)
        self.rebuild = False
        self.res["total-clusters"] = -(-s.get_length() // cs)
        s.flush_caches()

        # calculate_refcounts()
        self.inc(0, cs)
        self.check_l1(s.l1_table_offset, s.l1_size, CHECK_FRAG_INFO, True)
        for i, sn in enumerate(s.snapshots):
            if sn.l1_size > QCOW_MAX_L1_SIZE // L1E_SIZE or sn.l1_table_offset & (cs - 1):
                self.msg("ERROR snapshot %s (%s) l1_offset=%#x: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted"
                         % (sn.id_str, sn.name, sn.l1_table_offset))
                self.res["corruptions"] += 1
                continue
            self.check_l1(sn.l1_table_offset, sn.l1_size, 0, False)
        self.inc(s.snapshots_offset, s.snapshots_size)
        self.inc(s.refcount_table_offset, s.refcount_table_size * REFTABLE_ENTRY_SIZE)
        self.check_bitmaps()
        self.check_refblocks()

        if self.fix_errors:
            s.free_cluster_index = max(s.free_cluster_index, self.refs.n)
        highest = self.compare()
        if self.fix_leaks or self.fix_errors:
            s.flush_caches()
        self.check_oflag_copied()
        if self.fix_leaks or self.fix_errors:
            s.flush_caches()
        self.res["image-end-offset"] = (highest + 1) * cs
        return self.res
