"""Consistency check and repair (QEMU 7.2's qcow2_co_check_locked() and
qcow2_check_refcounts() in qcow2-refcount.c).

Theory of operation: refcounts are recomputed from every structure that references
host clusters (header, the active L1/L2 tables and data, every snapshot's L1/L2
tables, the snapshot table, the refcount table and blocks, the bitmap directory and
bitmap tables) into an in-memory refcount table (IMRT) that has the image's own
refcount width, so that a slice of it is a valid refcount block.  Comparing it to the
stored refcounts gives leaks (stored > computed) and corruptions (stored < computed).

Repair follows QEMU step by step: the comparison first runs without fixing; if a
used cluster has a stored refcount of 0, or the refcount table itself is broken, the
refcount structures are rebuilt from the IMRT (rebuild_refcount_structure()) and the
check recomputed; otherwise the comparison is repeated with fixing enabled.  Then
OFLAG_COPIED is verified on the active L1 and L2 entries.

Every message QEMU prints with fprintf(stderr) is written to stderr as it happens
(and kept in ``driver.check_messages``); the few QEMU reports with error_report()
get the program-name prefix.  An internal error raises BlockError with the errno
qemu-img turns into "Check failed: <strerror>".
"""
from __future__ import annotations

import bisect
import errno
import mmap
import operator
import os
import re
import struct
import sys
from itertools import compress

from ....errors import BlockError, CorruptImage
from .layout import (CL_COMPRESSED, CL_NORMAL, CL_UNALLOCATED, CL_ZERO_ALLOC,
                     L1E_OFFSET_MASK, L1E_RESERVED_MASK, L1E_SIZE, L2E_OFFSET_MASK,
                     L2E_STD_RESERVED_MASK, OFS_REFCOUNT_TABLE_OFFSET, QCOW2_DISCARD_ALWAYS,
                     QCOW_L2_BITMAP_ALL_ALLOC, QCOW_L2_BITMAP_ALL_ZEROES, QCOW_MAX_L1_SIZE,
                     QCOW_MAX_SNAPSHOTS, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                     REFT_OFFSET_MASK, REFT_RESERVED_MASK, REFTABLE_ENTRY_SIZE,
                     REFTABLE_OFFSET_AND_CLUSTERS, SNAPSHOT_HEADER, BITMAP_DIR_ENTRY)
from .native import N
from . import overlap as OL
from .sparse import nonzero_indexes

CHECK_FRAG_INFO = 2
_BE64 = struct.Struct(">Q")
_NONZERO = re.compile(rb"[^\x00]")
FIX_LEAKS, FIX_ERRORS = 1, 2
INT64_MAX = (1 << 63) - 1
INT_MAX = 0x7FFFFFFF
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_MAX_TABLE_SIZE = 0x8000000


def _hexalt(v: int) -> str:
    """C's %#x: no 0x prefix for zero."""
    return "%#x" % v if v else "0"


def error_report(msg: str) -> None:
    """QEMU's error_report(): the program name prefix of the running tool."""
    try:
        from ....cli.report import PROG
        name = PROG.name
    except Exception:     # pragma: no cover - library use without the CLI
        name = "qemu-img"
    sys.stderr.write("%s: %s\n" % (name, msg))
    sys.stderr.flush()


class CheckFailed(BlockError):
    """An internal error ended the check (QEMU returns -errno)."""


def _fail(err: int, msg: str | None = None) -> CheckFailed:
    return CheckFailed(msg or os.strerror(err), errno=err)


def _new_res() -> dict:
    return {"check-errors": 0, "corruptions": 0, "leaks": 0, "corruptions-fixed": 0,
            "leaks-fixed": 0, "allocated-clusters": 0, "total-clusters": 0,
            "fragmented-clusters": 0, "compressed-clusters": 0, "image-end-offset": 0}


class IMRT:
    """In-memory refcount table with the image's refcount width; its buffer is kept
    a whole number of clusters long (realloc_refcount_array())."""

    def __init__(self, s, n: int):
        self.s = s
        self.order = s.refcount_order
        self.max = s.refcount_max
        self.n = 0
        self.buf = _zeroed(0)
        self.resize(n)

    def _bytes(self, n: int) -> int:
        cs = self.s.cluster_size
        b = -(-(n << self.order) // 8)
        return -(-b // cs) * cs

    def resize(self, n: int) -> None:
        nb = self._bytes(n)
        self.ensure_bytes(nb)
        self.n = n

    def ensure_bytes(self, nb: int) -> None:
        if nb > len(self.buf):
            buf = _zeroed(nb)
            buf[:len(self.buf)] = self.buf[:]
            self.buf = buf

    def get(self, i: int) -> int:
        return N.refcount_get(self.buf, self.order, i)

    def set(self, i: int, v: int) -> None:
        N.refcount_set_range(self.buf, self.order, i, 1, v)

    def clear(self) -> None:
        self.buf = _zeroed(len(self.buf))

    def next_used(self, i: int, n: int) -> int:
        """The first cluster in [i, n) whose byte holds a nonzero refcount, else n
        (may be a cluster sharing a byte with a used one)."""
        pos = _first_nonzero(self.buf, (i << self.order) // 8,
                             min(len(self.buf), -(-(n << self.order) // 8)))
        return n if pos < 0 else min(n, max(i, (pos * 8) >> self.order))


def _zeroed(nb: int):
    """A zeroed writable buffer whose pages cost nothing until written: the IMRT of a
    huge sparse image (a repair may grow the file to where a refblock pointed) is
    mostly zeroes."""
    return mmap.mmap(-1, nb) if nb else bytearray()


def _first_nonzero(buf, pos: int, stop: int) -> int:
    """Offset of the first nonzero byte of buf[pos:stop], -1 if none (C speed)."""
    step = 1 << 16
    while pos < stop:
        n = min(step, stop - pos)
        if not N.buffer_is_zero(buf, pos, n):
            return _NONZERO.search(buf, pos, pos + n).start()
        pos += n
    return -1


class Checker:
    def __init__(self, s, fix: int):
        self.s = s
        self.fix = fix
        self.res = _new_res()
        self.msgs = s.check_messages = []

    def msg(self, text: str) -> None:
        """fprintf(stderr, ...)."""
        self.msgs.append(text)
        if getattr(self.s, "print_check_messages", True):
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def msg_lines(self, lines: list[str]) -> None:
        """msg() of many lines with one write."""
        if not lines:
            return
        self.msgs.extend(lines)
        if getattr(self.s, "print_check_messages", True):
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    # ---- qcow2_inc_refcounts_imrt ---------------------------------------------------
    def inc(self, res: dict, imrt: IMRT, offset: int, size: int) -> None:
        s = self.s
        if size <= 0:
            return
        cs, cb = s.cluster_size, s.cluster_bits
        file_len = s.file.total_size
        if offset + size - file_len >= cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     "one cluster or more: offset 0x%x size 0x%x" % (offset, size))
            res["corruptions"] += 1
            return
        first = offset >> cb
        last = (offset + size - 1) >> cb
        if last >= imrt.n:
            imrt.resize(last + 1)
        n = last - first + 1
        if N.refcount_add_range(imrt.buf, imrt.order, first, n, 1) == N.OK:
            return
        for k in range(first, last + 1):
            v = imrt.get(k)
            if v == imrt.max:
                self.msg("ERROR: overflow cluster offset=0x%x" % (k << cb))
                self.msg("Use qemu-img amend to increase the refcount entry width or "
                         "qemu-img convert to create a clean copy if the image cannot be "
                         "opened for writing")
                res["corruptions"] += 1
                continue
            imrt.set(k, v + 1)

    # ---- L1 / L2 ----------------------------------------------------------------------
    def _read(self, offset: int, length: int) -> bytes:
        """bdrv_pread() of the image file; zeroes past its end like file-posix."""
        s = self.s
        if offset < 0 or offset + length > INT64_MAX:
            raise _fail(errno.EINVAL)
        end = s.file.total_size
        n = max(0, min(length, end - offset))
        data = s.file.pread(offset, n) if n else b""
        return data + bytes(length - len(data))

    def check_l1(self, res, imrt, l1_offset: int, l1_size: int, flags: int, fix: int,
                 active: bool) -> None:
        s = self.s
        cs = s.cluster_size
        if not l1_size:
            return
        self.inc(res, imrt, l1_offset, l1_size * L1E_SIZE)
        # entries past the end of the file read as zeroes, which mean nothing: only the
        # part inside the file is read and walked (l1_size is a number from the file)
        within = max(0, min(l1_size, -(-(s.file.total_size - l1_offset) // L1E_SIZE)))
        try:
            if l1_offset < 0 or l1_offset + l1_size * L1E_SIZE > INT64_MAX:
                raise _fail(errno.EINVAL)
            raw = self._read(l1_offset, within * L1E_SIZE)
        except BlockError as e:
            self.msg("ERROR: I/O error in check_refcounts_l1")
            res["check-errors"] += 1
            raise _fail(e.errno or errno.EIO) from None
        l1 = struct.unpack(">%dQ" % within, raw)
        for i in nonzero_indexes(l1):
            e = l1[i]
            if e & L1E_RESERVED_MASK:
                self.msg("ERROR found L1 entry with reserved bits set: %x" % e)
                res["corruptions"] += 1
            l2_offset = e & L1E_OFFSET_MASK
            self.inc(res, imrt, l2_offset, cs)
            if l2_offset & (cs - 1):
                self.msg("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry "
                         "corrupted" % l2_offset)
                res["corruptions"] += 1
            self.check_l2(res, imrt, l2_offset, flags, fix, active)

    def check_l2(self, res, imrt, l2_offset: int, flags: int, fix: int, active: bool) -> None:
        s = self.s
        cs = s.cluster_size
        ext = s.extended
        try:
            raw = self._read(l2_offset, s.l2_size * s.l2e_size)
        except BlockError as e:
            self.msg("ERROR: I/O error in check_refcounts_l2")
            res["check-errors"] += 1
            raise _fail(e.errno or errno.EIO) from None
        frag = flags & CHECK_FRAG_INFO
        has_df = s.has_data_file
        if not has_df:
            # a healthy table is counted in bulk; one needing a message is walked below
            counts = N.check_l2(raw, s.l2_size, ext, s.cluster_bits, s.file.total_size,
                                imrt.buf, imrt.order, imrt.n)
            if counts is not None:
                if frag:
                    res["allocated-clusters"] += counts[0]
                    res["fragmented-clusters"] += counts[1]
                return
        words = struct.unpack(">%dQ" % (len(raw) // 8), raw)
        step = 2 if ext else 1
        table = bytearray(raw)
        next_contig = 0
        used = map(operator.or_, words[0::2], words[1::2]) if ext else words
        for i in compress(range(s.l2_size), used):      # entries with any bit set
            e = words[i * step]
            bm = words[i * step + 1] if ext else 0
            t = s.cluster_type(e)
            if t != CL_COMPRESSED and e & L2E_STD_RESERVED_MASK:
                self.msg("ERROR found l2 entry with reserved bits set: %x" % e)
                res["corruptions"] += 1
            if t == CL_COMPRESSED:
                if e & QCOW_OFLAG_COPIED:
                    self.msg("ERROR: coffset=0x%x: copied flag must never be set for "
                             "compressed clusters" % (e & s.cluster_offset_mask))
                    e &= ~QCOW_OFLAG_COPIED
                    res["corruptions"] += 1
                if has_df:
                    self.msg("ERROR compressed cluster %d with data file, entry=0x%x" % (i, e))
                    res["corruptions"] += 1
                    continue
                if bm:
                    self.msg("ERROR compressed cluster %d with non-zero subcluster "
                             "allocation bitmap, entry=0x%x" % (i, e))
                    res["corruptions"] += 1
                    continue
                coffset, csize = s.parse_compressed_l2_entry(e)
                self.inc(res, imrt, coffset, csize)
                if frag:
                    res["allocated-clusters"] += 1
                    res["compressed-clusters"] += 1
                    res["fragmented-clusters"] += 1
            elif t in (CL_NORMAL, CL_ZERO_ALLOC):
                offset = e & L2E_OFFSET_MASK
                if (bm >> 32) & bm:
                    res["corruptions"] += 1
                    self.msg("ERROR offset=%x: Allocated cluster has corrupted subcluster "
                             "allocation bitmap" % offset)
                if offset & (cs - 1):
                    res["corruptions"] += 1
                    contains_data = (bm & QCOW_L2_BITMAP_ALL_ALLOC) if ext \
                        else not e & QCOW_OFLAG_ZERO
                    if not contains_data:
                        self.msg("%s offset=%x: Preallocated cluster is not properly aligned; "
                                 "L2 entry corrupted." % ("Repairing" if fix & FIX_ERRORS
                                                          else "ERROR", offset))
                        if fix & FIX_ERRORS:
                            ok, overlap = self.fix_l2_entry_by_zero(res, l2_offset, table, i,
                                                                    active)
                            if overlap:
                                # something is seriously wrong: the check ends here
                                raise _fail(errno.EIO)
                            if ok:
                                continue
                    else:
                        self.msg("ERROR offset=%x: Data cluster is not properly aligned; L2 "
                                 "entry corrupted." % offset)
                if frag:
                    res["allocated-clusters"] += 1
                    if next_contig and offset != next_contig:
                        res["fragmented-clusters"] += 1
                    next_contig = offset + cs
                if not has_df:
                    self.inc(res, imrt, offset, cs)
            elif t == CL_UNALLOCATED:
                if bm & QCOW_L2_BITMAP_ALL_ALLOC:
                    res["corruptions"] += 1
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation "
                             "map")

    def fix_l2_entry_by_zero(self, res, l2_offset: int, table: bytearray, i: int,
                             active: bool) -> tuple[bool, bool]:
        """fix_l2_entry_by_zero(): (fixed, metadata overlap)."""
        s = self.s
        esz = s.l2e_size
        if s.extended:
            bm = struct.unpack_from(">Q", table, i * 16 + 8)[0]
            bm |= bm << 32
            bm &= QCOW_L2_BITMAP_ALL_ZEROES
            struct.pack_into(">QQ", table, i * 16, 0, bm)
        else:
            struct.pack_into(">Q", table, i * 8, QCOW_OFLAG_ZERO)
        pos = l2_offset + i * esz
        ign = OL.ACTIVE_L2 if active else OL.INACTIVE_L2
        try:
            s.pre_write_overlap_check(ign, pos, esz)
        except BlockError:
            self.msg("ERROR: Overlap check failed")
            res["check-errors"] += 1
            return False, True
        try:
            s.file.pwrite(pos, bytes(table[i * esz:(i + 1) * esz]))
            s.file.flush()
        except BlockError as e:
            self.msg("ERROR: Failed to overwrite L2 table entry: %s"
                     % os.strerror(e.errno or errno.EIO))
            res["check-errors"] += 1
            return False, False
        s.forget_l2_table(l2_offset)
        res["corruptions"] -= 1
        res["corruptions-fixed"] += 1
        return True, False

    # ---- other structures -------------------------------------------------------------
    def check_bitmaps(self, res, imrt) -> None:
        """qcow2_check_bitmaps_refcounts()."""
        s = self.s
        if not s.bitmaps_ext:
            return
        nb, dir_size, dir_offset = s.bitmaps_ext
        self.inc(res, imrt, dir_offset, dir_size)
        try:
            data = self._read(dir_offset, dir_size)
        except BlockError:
            res["corruptions"] += 1
            raise _fail(errno.EINVAL) from None
        pos = 0
        entries = []
        for _ in range(nb):
            if pos + BITMAP_DIR_ENTRY.size > len(data):
                res["corruptions"] += 1
                raise _fail(errno.EINVAL)
            (tbl_off, tbl_size, flags, btype, gran, name_size,
             extra) = BITMAP_DIR_ENTRY.unpack_from(data, pos)
            pos += (BITMAP_DIR_ENTRY.size + extra + name_size + 7) & ~7
            if pos > len(data):
                res["corruptions"] += 1
                raise _fail(errno.EINVAL)
            entries.append((tbl_off, tbl_size))
        for tbl_off, tbl_size in entries:
            self.inc(res, imrt, tbl_off, tbl_size * 8)
            if tbl_off & (s.cluster_size - 1) or tbl_size > BME_MAX_TABLE_SIZE or \
                    tbl_off + tbl_size * 8 > s.file.total_size:
                res["corruptions"] += 1
                raise _fail(errno.EINVAL)
            if not tbl_size:
                continue
            table = struct.unpack(">%dQ" % tbl_size, self._read(tbl_off, tbl_size * 8))
            for e in table:
                off = e & BME_TABLE_ENTRY_OFFSET_MASK
                if e & BME_TABLE_ENTRY_RESERVED_MASK or off & (s.cluster_size - 1) or \
                        (off == 0 and e & ~1 & 0xFFFFFFFFFFFFFFFF and False):
                    res["corruptions"] += 1
                    continue
                if off:
                    self.inc(res, imrt, off, s.cluster_size)

    def check_refblocks(self, res, imrt, fix: int) -> None:
        s = self.s
        cs, cb = s.cluster_size, s.cluster_bits
        # a zero entry has nothing to check (cluster 0 is inside any image that
        # opened), so only nonzero ones are walked: the table size is from the file
        n = s.refcount_table_size
        indexes = nonzero_indexes(s.refcount_table, n) if imrt.n else range(n)
        for idx in indexes:
            raw = s.refcount_table[idx]
            off = raw & REFT_OFFSET_MASK
            cluster = off >> cb
            if raw & REFT_RESERVED_MASK:
                self.msg("ERROR refcount table entry %d has reserved bits set" % idx)
                res["corruptions"] += 1
                self.rebuild = True
                continue
            if off & (cs - 1):
                self.msg("ERROR refcount block %d is not cluster aligned; refcount table "
                         "entry corrupted" % idx)
                res["corruptions"] += 1
                self.rebuild = True
                continue
            if cluster >= imrt.n:
                res["corruptions"] += 1
                self.msg("%s refcount block %d is outside image"
                         % ("Repairing" if fix & FIX_ERRORS else "ERROR", idx))
                if fix & FIX_ERRORS:
                    err = None
                    if off > INT64_MAX - cs:
                        err = errno.EINVAL
                    else:
                        try:
                            s.file.truncate(off + cs)
                        except BlockError as e:
                            error_report(str(e))
                            err = e.errno or errno.EIO
                    if err is None:
                        new_n = -(-s.file.total_size // cs)
                        if new_n > imrt.n:
                            imrt.resize(new_n)
                        if cluster >= imrt.n:
                            err = errno.EINVAL
                    if err is None:
                        res["corruptions"] -= 1
                        res["corruptions-fixed"] += 1
                        self.inc(res, imrt, off, cs)
                        continue
                    self.rebuild = True
                    self.msg("ERROR could not resize image: %s" % os.strerror(err))
                continue
            if off:
                self.inc(res, imrt, off, cs)
                rc = imrt.get(cluster)
                if rc != 1:
                    self.msg("ERROR refcount block %d refcount=%d" % (idx, rc))
                    res["corruptions"] += 1
                    self.rebuild = True

    def calculate(self, res, imrt, fix: int) -> None:
        """calculate_refcounts()."""
        s = self.s
        cs = s.cluster_size
        self.inc(res, imrt, 0, cs)
        self.check_l1(res, imrt, s.l1_table_offset, s.l1_size, CHECK_FRAG_INFO, fix, True)
        if s.has_data_file and s.nb_snapshots:
            self.msg("ERROR %d snapshots in image with data file" % s.nb_snapshots)
            res["corruptions"] += 1
        for sn in s.snapshots:
            if sn.l1_table_offset & (cs - 1):
                self.msg("ERROR snapshot %s (%s) l1_offset=%s: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted"
                         % (sn.id_str, sn.name, _hexalt(sn.l1_table_offset)))
                res["corruptions"] += 1
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // L1E_SIZE:
                self.msg("ERROR snapshot %s (%s) l1_size=%s: L1 table is too large; "
                         "snapshot table entry corrupted"
                         % (sn.id_str, sn.name, _hexalt(sn.l1_size)))
                res["corruptions"] += 1
                continue
            self.check_l1(res, imrt, sn.l1_table_offset, sn.l1_size, 0, fix, False)
        self.inc(res, imrt, s.snapshots_offset, s.snapshots_size)
        self.inc(res, imrt, s.refcount_table_offset, s.refcount_table_size * REFTABLE_ENTRY_SIZE)
        if s.crypto_header[1]:
            self.inc(res, imrt, s.crypto_header[0], s.crypto_header[1])
        self.check_bitmaps(res, imrt)
        self.check_refblocks(res, imrt, fix)

    # ---- comparing ------------------------------------------------------------------------
    def compare(self, res, imrt, fix: int) -> int:
        """compare_refcounts(); returns the highest used cluster."""
        s = self.s
        rbb, rbs = s.refcount_block_bits, s.refcount_block_size
        highest = 0
        self.stored_equals_imrt = True
        i = 0
        n = imrt.n
        tbl = s.refcount_table
        with_block = [t for t in nonzero_indexes(tbl, s.refcount_table_size)
                      if tbl[t] & REFT_OFFSET_MASK]
        while i < n:
            ti = i >> rbb
            k = bisect.bisect_left(with_block, ti)
            if k == len(with_block) or with_block[k] != ti:
                # no refcount block: stored refcounts are zero, so only clusters with
                # a reference need a look; jump to the next one or the next block
                # (a huge sparse image has long runs of both)
                nxt = min(imrt.next_used(i, n),
                          with_block[k] << rbb if k < len(with_block) else n)
                if nxt > i:
                    i = nxt
                    continue
            k = min(rbs - (i & (rbs - 1)), n - i)
            computed = N.refcount_get_range(imrt.buf, imrt.order, i, k)
            stored = self._stored_range(ti, i & (rbs - 1), k)
            if stored != computed:
                self.stored_equals_imrt = False
            if stored is None:
                # the refblock offset is invalid: every lookup fails (QEMU's per-cluster
                # loop).  Once the image is marked corrupt, every other lookup in this
                # block fails the same way without a word: those are not repeated one
                # by one (a block covers thousands of clusters of a huge image)
                for j in range(k):
                    try:
                        s.get_refcount(i + j)
                        continue
                    except BlockError as e:
                        err = e
                    code = err.errno or errno.EIO
                    if code == errno.EINVAL and s.refcount_table[ti] & REFT_OFFSET_MASK > \
                            INT64_MAX - s.cluster_size:
                        # a refblock past INT64_MAX: QEMU's bdrv_pread() fails with EIO
                        # (bdrv_check_qiov_request), blockengine's request check EINVAL
                        code = errno.EIO
                    text = os.strerror(code)
                    if isinstance(err, CorruptImage) and s.signaled_corruption:
                        self.msg_lines(["Can't get refcount for cluster %d: %s" % (c, text)
                                        for c in range(i + j, i + k)])
                        res["check-errors"] += k - j
                        break
                    self.msg("Can't get refcount for cluster %d: %s" % (i + j, text))
                    res["check-errors"] += 1
                i += k
                continue
            if stored == computed:
                nz = computed.tobytes().rstrip(b"\0")
                if nz:
                    highest = i + (len(nz) - 1) // 8
                i += k
                continue
            for j in range(k):
                r1, r2 = stored[j], computed[j]
                idx = i + j
                if r1 or r2:
                    highest = idx
                if r1 == r2:
                    continue
                num_fixed = None
                if r1 == 0:
                    self.rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    num_fixed = "leaks-fixed"
                elif r1 < r2 and fix & FIX_ERRORS:
                    num_fixed = "corruptions-fixed"
                self.msg("%s cluster %d refcount=%d reference=%d" % (
                    "Repairing" if num_fixed else ("ERROR" if r1 < r2 else "Leaked"),
                    idx, r1, r2))
                if num_fixed:
                    try:
                        s.update_refcount(idx << s.cluster_bits, 1, abs(r1 - r2), r1 > r2,
                                          QCOW2_DISCARD_ALWAYS)
                        res[num_fixed] += 1
                        continue
                    except BlockError:
                        pass
                if r1 < r2:
                    res["corruptions"] += 1
                else:
                    res["leaks"] += 1
            i += k
        return highest

    def _stored_range(self, ti: int, index: int, k: int):
        """Stored refcounts of one refblock's range, None if its offset is invalid."""
        s = self.s
        from array import array
        if ti >= s.refcount_table_size:
            return array("Q", bytes(8 * k))
        off = s.refcount_table[ti] & REFT_OFFSET_MASK
        if not off:
            return array("Q", bytes(8 * k))
        if off & (s.cluster_size - 1):
            return None
        try:
            block = s.refcount_cache.get(off)
        except BlockError:
            return None
        return N.refcount_get_range(block, s.refcount_order, index, k)

    # ---- rebuild_refcount_structure ---------------------------------------------------
    def alloc_imrt(self, imrt: IMRT, count: int, first_free: list) -> int:
        """alloc_clusters_imrt(); first_free is a one-element list (in/out)."""
        cluster = first_free[0]
        first_gap = True
        contiguous = 0
        while cluster < imrt.n and contiguous < count:
            if not imrt.get(cluster):
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            imrt.resize(cluster + count - contiguous)
        cluster -= contiguous
        N.refcount_set_range(imrt.buf, imrt.order, cluster, count, 1)
        return cluster << self.s.cluster_bits

    def write_refblocks(self, imrt: IMRT, first: int, end: int, reftable: list) -> bool:
        """rebuild_refcounts_write_refblocks(); reftable is grown in place."""
        s = self.s
        cs, rbb, rbs = s.cluster_size, s.refcount_block_bits, s.refcount_block_size
        first_free = [0]
        grown = False
        cluster = first
        while cluster < end:
            # skip all-zero parts of the IMRT at C speed (huge sparse files)
            pos = (cluster << imrt.order) // 8
            stop = min(len(imrt.buf), -(-(min(end, imrt.n) << imrt.order) // 8))
            pos = _first_nonzero(imrt.buf, pos, stop)
            if pos < 0:
                break
            cluster = max(cluster, (pos * 8) >> imrt.order)
            ri = cluster >> rbb
            lim = min(end, (ri << rbb) + rbs, imrt.n)
            if cluster >= lim:
                break
            vals = N.refcount_get_range(imrt.buf, imrt.order, cluster, lim - cluster)
            nz = vals.tobytes().lstrip(b"\0")
            if not nz:
                cluster = lim
                continue
            cluster += (len(vals) * 8 - len(nz)) // 8
            ri = cluster >> rbb
            start = ri << rbb
            if len(reftable) > ri and reftable[ri]:
                rb_off = reftable[ri]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                rb_off = self.alloc_imrt(imrt, 1, first_free)
                if rb_off // cs >= end:
                    end = rb_off // cs + 1
                if len(reftable) <= ri:
                    entries = -(-((ri + 1) * REFTABLE_ENTRY_SIZE) // cs) * cs \
                        // REFTABLE_ENTRY_SIZE
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[ri] = rb_off
            try:
                s.pre_write_overlap_check(0, rb_off, cs)
                # the refblock is a slice of the IMRT (whose size is whole clusters)
                imrt.ensure_bytes((ri + 1) * cs)
                s.file.pwrite(rb_off, bytes(imrt.buf[ri * cs:(ri + 1) * cs]))
            except BlockError as e:
                error_report("ERROR writing refblock: %s" % os.strerror(e.errno or errno.EIO))
                raise _fail(e.errno or errno.EIO) from None
            cluster = start + rbs
        return grown

    def rebuild_refcount_structure(self, res, imrt: IMRT) -> None:
        s = self.s
        cs = s.cluster_size
        try:
            s.refcount_cache.flush()
        except BlockError:
            pass
        s.refcount_cache.clear()
        reftable: list[int] = []
        try:
            self.write_refblocks(imrt, 0, imrt.n, reftable)
            while True:
                length = len(reftable) * REFTABLE_ENTRY_SIZE
                clusters = -(-length // cs)
                rt_off = self.alloc_imrt(imrt, clusters, [0])
                start = rt_off // cs
                changed = self.write_refblocks(imrt, start, start + clusters, reftable)
                if not changed:
                    break
        except CheckFailed:
            res["check-errors"] += 1
            raise
        data = struct.pack(">%dQ" % len(reftable), *reftable)
        try:
            s.pre_write_overlap_check(0, rt_off, len(data))
            s.file.pwrite(rt_off, data)
        except BlockError as e:
            error_report("ERROR writing reftable: %s" % os.strerror(e.errno or errno.EIO))
            raise _fail(e.errno or errno.EIO) from None
        try:
            s.file.pwrite(OFS_REFCOUNT_TABLE_OFFSET,
                          REFTABLE_OFFSET_AND_CLUSTERS.pack(rt_off, clusters))
            s.file.flush()
        except BlockError as e:
            error_report("ERROR setting reftable: %s" % os.strerror(e.errno or errno.EIO))
            raise _fail(e.errno or errno.EIO) from None
        s.set_refcount_table(rt_off, reftable)

    # ---- OFLAG_COPIED -------------------------------------------------------------------
    def check_oflag_copied(self, res, fix: int, imrt: IMRT | None = None) -> None:
        """check_oflag_copied(); ``imrt``: refcounts equal to the stored ones, if known."""
        s = self.s
        cb, cs = s.cluster_bits, s.cluster_size
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res["check-errors"] and not res["corruptions"] and not res["leaks"]
        else:
            repair = False
        tag = "Repairing" if repair else "ERROR"
        ext = s.extended
        step = 2 if ext else 1
        for i in nonzero_indexes(s.l1_table, s.l1_size):
            l1e = s.l1_table[i]
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                rc = s.get_refcount(l2_offset >> cb)
            except BlockError:
                continue
            if (rc == 1) != bool(l1e & QCOW_OFLAG_COPIED):
                res["corruptions"] += 1
                self.msg("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d"
                         % (tag, i, l1e, rc))
                if repair:
                    s.l1_table[i] = (l1e | QCOW_OFLAG_COPIED) if rc == 1 \
                        else (l1e & ~QCOW_OFLAG_COPIED)
                    try:
                        s.write_l1_entry(i)
                    except BlockError as e:
                        res["check-errors"] += 1
                        raise _fail(e.errno or errno.EIO) from None
                    res["corruptions"] -= 1
                    res["corruptions-fixed"] += 1
            try:
                raw = self._read(l2_offset, s.l2_size * s.l2e_size)
            except BlockError as e:
                self.msg("ERROR: Could not read L2 table: %s"
                         % os.strerror(e.errno or errno.EIO))
                res["check-errors"] += 1
                raise _fail(e.errno or errno.EIO) from None
            table = bytearray(raw)
            dirty = 0
            suspects = None
            if imrt is not None and not s.has_data_file:
                suspects = N.l2_copied_mismatches(raw, s.l2_size, ext, cb, imrt.buf,
                                                  imrt.order, imrt.n)
            if suspects is None:
                words = struct.unpack(">%dQ" % (len(raw) // 8), raw)
                suspects = compress(range(s.l2_size), words[0::step])   # nonzero entries
            for j in suspects:
                e = _BE64.unpack_from(raw, j * step * 8)[0]
                t = s.cluster_type(e)
                if t not in (CL_NORMAL, CL_ZERO_ALLOC):
                    continue
                if s.has_data_file:
                    rc = 1
                else:
                    try:
                        rc = s.get_refcount((e & L2E_OFFSET_MASK) >> cb)
                    except BlockError:
                        continue
                if (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                    res["corruptions"] += 1
                    self.msg("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d"
                             % (tag, e, rc))
                    if repair:
                        struct.pack_into(">Q", table, j * step * 8,
                                         (e | QCOW_OFLAG_COPIED) if rc == 1
                                         else (e & ~QCOW_OFLAG_COPIED))
                        dirty += 1
            if dirty:
                try:
                    s.pre_write_overlap_check(OL.ACTIVE_L2, l2_offset, cs)
                except BlockError as e:
                    self.msg("ERROR: Could not write L2 table; metadata overlap check "
                             "failed: %s" % os.strerror(e.errno or errno.EIO))
                    res["check-errors"] += 1
                    raise _fail(e.errno or errno.EIO) from None
                try:
                    s.file.pwrite(l2_offset, bytes(table[:cs]))
                except BlockError as e:
                    self.msg("ERROR: Could not write L2 table: %s"
                             % os.strerror(e.errno or errno.EIO))
                    res["check-errors"] += 1
                    raise _fail(e.errno or errno.EIO) from None
                s.forget_l2_table(l2_offset)
                res["corruptions"] -= dirty
                res["corruptions-fixed"] += dirty

    # ---- qcow2_check_refcounts ------------------------------------------------------------
    def check_refcounts(self) -> dict:
        s = self.s
        res = self.res
        fix = self.fix
        cs = s.cluster_size
        size = s.file.total_size
        nb = -(-size // cs)
        if nb > INT_MAX:
            res["check-errors"] += 1
            raise _fail(errno.EFBIG)
        res["total-clusters"] = -(-s.get_length() // cs)
        self.rebuild = False
        imrt = IMRT(s, nb)
        self.calculate(res, imrt, fix)
        pre = dict(res)
        highest = self.compare(res, imrt, 0)
        # the stored refcounts are the IMRT's (no repair below changes any): the
        # OFLAG_COPIED check can read them from it in bulk
        exact = imrt if self.stored_equals_imrt and not self.rebuild else None
        if self.rebuild and fix & FIX_ERRORS:
            old = dict(res)
            fresh_leaks = 0
            self.msg("Rebuilding refcount structure")
            self.rebuild_refcount_structure(res, imrt)
            res["corruptions"] = 0
            res["leaks"] = 0
            self.rebuild = False
            imrt.clear()
            self.calculate(res, imrt, 0)
            if fix & FIX_LEAKS:
                saved = dict(res)
                tmp = _new_res()
                highest = self.compare(tmp, imrt, FIX_LEAKS)
                if self.rebuild:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = tmp["leaks"]
                res.clear()
                res.update(saved)
            if res["corruptions"] < old["corruptions"]:
                res["corruptions-fixed"] += old["corruptions"] - res["corruptions"]
            if res["leaks"] < old["leaks"]:
                res["leaks-fixed"] += old["leaks"] - res["leaks"]
            res["leaks"] += fresh_leaks
        elif fix:
            if self.rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res["check-errors"] += 1
                raise _fail(errno.EIO)
            if res["leaks"] or res["corruptions"]:
                res.clear()
                res.update(pre)
                highest = self.compare(res, imrt, fix)
        try:
            s.flush_caches()
        except BlockError:
            pass
        self.check_oflag_copied(res, fix, exact)
        res["image-end-offset"] = (highest + 1) * cs
        return res

    # ---- snapshot table (qcow2_check_read_snapshot_table) -------------------------------
    def read_snapshot_table(self, res: dict) -> None:
        """qcow2_check_read_snapshot_table(): check mode opened the image without its
        snapshot table; read it here, repairing what can be repaired with -r all (the
        snapshot count in the header at once, the rest in fix_snapshot_table())."""
        s = self.s
        from .snapshot import NB_AND_OFFSET, NB_ONLY, OFS_NB_SNAPSHOTS, read_table
        from ....errors import InvalidImage
        try:
            raw = self._read(OFS_NB_SNAPSHOTS, NB_AND_OFFSET.size)
        except BlockError as e:
            res["check-errors"] += 1
            self.msg("ERROR failed to read the snapshot table pointer from the image "
                     "header: %s" % os.strerror(e.errno or errno.EIO))
            raise _fail(e.errno or errno.EIO) from None
        nb, off = NB_AND_OFFSET.unpack(raw)
        nb_reduced = 0
        if nb > QCOW_MAX_SNAPSHOTS and self.fix & FIX_ERRORS:
            self.msg("Discarding %d overhanging snapshots" % (nb - QCOW_MAX_SNAPSHOTS))
            nb_reduced += nb - QCOW_MAX_SNAPSHOTS
            nb = QCOW_MAX_SNAPSHOTS
        err = None
        if nb > QCOW_MAX_SNAPSHOTS:
            err, text = errno.EFBIG, "snapshot table too large"
        elif INT64_MAX - nb * SNAPSHOT_HEADER.size < off or off & (s.cluster_size - 1):
            err, text = errno.EINVAL, "snapshot table offset invalid"
        if err:
            res["check-errors"] += 1
            error_report("ERROR " + text)
            if nb > QCOW_MAX_SNAPSHOTS:
                self.msg("You can force-remove all %d overhanging snapshots with qemu-img "
                         "check -r all" % (nb - QCOW_MAX_SNAPSHOTS))
            self._forget_snapshot_table()
            raise _fail(err)
        s.snapshots_offset, s.nb_snapshots = off, nb
        try:
            table = read_table(s.file, off, nb, s.total_size, bool(self.fix & FIX_ERRORS),
                               self.msg)
        except InvalidImage as e:
            res["check-errors"] += 1
            error_report("ERROR failed to read the snapshot table: %s" % e)
            if e.hint:
                sys.stderr.write(e.hint)
                sys.stderr.flush()
            self._forget_snapshot_table()
            raise _fail(e.errno or errno.EINVAL) from None
        s.snapshots, s.snapshots_size = table.snapshots, table.size
        s.nb_snapshots = len(table.snapshots)
        nb_reduced += table.nb_reduced
        res["corruptions"] += nb_reduced + table.extra_dropped
        if nb_reduced:
            # the header must agree with nb_snapshots before the refcounts are checked;
            # the discarded snapshots' clusters become leaks, which that check frees
            try:
                s.file.pwrite(OFS_NB_SNAPSHOTS, NB_ONLY.pack(s.nb_snapshots))
                s.file.flush()
            except BlockError as e:
                res["check-errors"] += 1
                self.msg("ERROR failed to update the snapshot count in the image header: %s"
                         % os.strerror(e.errno or errno.EIO))
                raise _fail(e.errno or errno.EIO) from None
            s.header.nb_snapshots = s.nb_snapshots
            res["corruptions-fixed"] += nb_reduced
            res["corruptions"] -= nb_reduced
        if s.version >= 3:
            # every v3 entry needs vm_state_size_large and disk_size
            tag = "Repairing" if self.fix & FIX_ERRORS else "ERROR"
            for i, sn in enumerate(s.snapshots):
                if sn.extra_data_size < 16:
                    res["corruptions"] += 1
                    self.msg("%s snapshot table entry %d is incomplete" % (tag, i))

    def _forget_snapshot_table(self) -> None:
        """The table was not read: nothing of it may be used."""
        s = self.s
        s.snapshots_offset = s.nb_snapshots = s.snapshots_size = 0
        s.snapshots = []

    def fix_snapshot_table(self, res: dict) -> None:
        """qcow2_check_fix_snapshot_table(): rewrite a table that had repairable errors
        (after the refcounts were checked, as this allocates clusters)."""
        if not (res["corruptions"] and self.fix & FIX_ERRORS):
            return
        from .snapshot import write_snapshots
        try:
            write_snapshots(self.s)
        except BlockError as e:
            res["check-errors"] += 1
            self.msg("ERROR failed to update snapshot table: %s"
                     % os.strerror(e.errno or errno.EIO))
            raise _fail(e.errno or errno.EIO) from None
        res["corruptions-fixed"] += res["corruptions"]
        res["corruptions"] = 0

    def run(self) -> dict:
        """qcow2_co_check_locked(): snapshot table, refcounts, snapshot table repair;
        the two partial results are added up as qcow2_add_check_result() does."""
        s = self.s
        snapshot_res = _new_res()
        try:
            if getattr(s, "check_mode", False):
                self.read_snapshot_table(snapshot_res)
            self.check_refcounts()
            self.fix_snapshot_table(snapshot_res)
        finally:
            for key in ("corruptions", "leaks", "check-errors", "corruptions-fixed",
                        "leaks-fixed"):
                self.res[key] += snapshot_res[key]
        return self.res
