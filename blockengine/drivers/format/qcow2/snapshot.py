"""Internal snapshots (QEMU 7.2's block/qcow2-snapshot.c and
qcow2_update_snapshot_refcount() of qcow2-refcount.c).

Theory of operation: a snapshot is a copy of the active L1 table plus one more
reference on every cluster reachable from it (L2 tables, data clusters), so the
active image and the snapshot share clusters until a write copies them (a cluster
with refcount > 1 lacks QCOW_OFLAG_COPIED, which sends writes down the COW path).
The snapshot table is a run of variable-length entries (40-byte header, extra data,
id, name, each entry 8-byte aligned) that is always rewritten to newly allocated
clusters, and the header switched to it, as qcow2_write_snapshots() does.

Metadata ordering (what makes a crash leave only leaks):

* create: copy the L1 table to new clusters, raise the refcounts (flushed), then
  write the new snapshot table and switch the header to it;
* apply (goto): raise the refcounts of the snapshot's clusters, overwrite the active
  L1 table (synced), then drop the references of the old active clusters;
* delete: write the table without the snapshot and switch the header, then drop its
  references and free its L1 table.

The driver mixes in ``Qcow2SnapshotMixin``; the check code reads the table with
``read_snapshots(..., repair=True)`` and rewrites it with ``write_snapshots``.
"""
from __future__ import annotations

import errno
import struct
from itertools import compress

from ...._record import record
from ....errors import BlockError, InvalidImage, NotSupported
from .layout import (L1E_OFFSET_MASK, L1E_SIZE, L2E_OFFSET_MASK, CL_COMPRESSED,
                     CL_NORMAL, CL_ZERO_ALLOC, QCOW2_DISCARD_ALWAYS, QCOW2_DISCARD_SNAPSHOT,
                     QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS,
                     QCOW_OFLAG_COPIED, SNAPSHOT_EXTRA, SNAPSHOT_HEADER)
from . import overlap as OL
from .sparse import nonzero_indexes

QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
INT_MAX = 0x7FFFFFFF
INT64_MAX = (1 << 63) - 1
ULONG_MAX = (1 << 64) - 1
OFS_NB_SNAPSHOTS = 60                     # offsetof(QCowHeader, nb_snapshots)
NB_AND_OFFSET = struct.Struct(">IQ")      # nb_snapshots, snapshots_offset
NB_ONLY = struct.Struct(">I")
ICOUNT_NONE = ULONG_MAX                   # -1ULL: no icount recorded
# QCowSnapshotExtraData fields: vm_state_size_large, disk_size, icount
EXTRA_END_VM_STATE, EXTRA_END_DISK_SIZE, EXTRA_END_ICOUNT = 8, 16, 24


@record
class Snapshot:
    """QCowSnapshot.  ``id_str`` and ``name`` are C strings (cut at a NUL byte),
    decoded with surrogateescape so that they are written back unchanged."""
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    disk_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int
    extra_data_size: int
    unknown_extra_data: bytes = b""

    def info(self) -> dict:
        """SnapshotInfo as `qemu-img info --output=json` lists it."""
        d = {}
        if self.icount != ICOUNT_NONE:
            d["icount"] = self.icount
        d.update({"vm-clock-nsec": self.vm_clock_nsec % 1000000000,
                  "name": _display(self.name),
                  "date-sec": self.date_sec,
                  "date-nsec": self.date_nsec,
                  "vm-clock-sec": self.vm_clock_nsec // 1000000000,
                  "id": _display(self.id_str),
                  "vm-state-size": self.vm_state_size})
        return d

    def pack(self) -> bytes:
        """One table entry as qcow2_write_snapshots() writes it (without alignment)."""
        id_raw, name_raw = _raw(self.id_str), _raw(self.name)
        # a VM state that does not fit 32 bits: older readers see a disk-only snapshot
        vm32 = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        extra_size = max(SNAPSHOT_EXTRA.size, self.extra_data_size)
        return (SNAPSHOT_HEADER.pack(self.l1_table_offset, self.l1_size, len(id_raw),
                                     len(name_raw), self.date_sec, self.date_nsec,
                                     self.vm_clock_nsec, vm32, extra_size)
                + SNAPSHOT_EXTRA.pack(self.vm_state_size, self.disk_size, self.icount)
                + (self.unknown_extra_data if self.extra_data_size > SNAPSHOT_EXTRA.size
                   else b"")
                + id_raw + name_raw)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _cstring(raw: bytes) -> str:
    return raw.partition(b"\0")[0].decode("utf-8", "surrogateescape")


def _display(text: str) -> str:
    return _raw(text).decode("utf-8", "replace")


def _align8(n: int) -> int:
    return (n + 7) & ~7


class _Reader:
    """bdrv_pread() of the image file in windows: zeroes past its end, and never a
    buffer larger than the window (a hostile header cannot make us allocate more)."""
    WINDOW = 1 << 16

    def __init__(self, file):
        self.file = file
        self.end = file.total_size
        self.base = -1
        self.buf = b""

    def read(self, offset: int, length: int) -> bytes:
        if length > self.WINDOW:
            return b"".join(self.read(offset + i, min(self.WINDOW, length - i))
                            for i in range(0, length, self.WINDOW))
        start = self.at(offset, length)
        return self.buf[start:start + length]

    def at(self, offset: int, length: int) -> int:
        """Where ``length`` (<= WINDOW) bytes at offset are in ``self.buf``."""
        if not (self.base <= offset and offset + length <= self.base + len(self.buf)):
            self.base = offset
            n = max(0, min(2 * self.WINDOW, self.end - offset))
            try:
                self.buf = bytes(self.file.pread(offset, n)) if n else b""
            except BlockError as e:
                raise InvalidImage("Failed to read snapshot table: %s"
                                   % _strerror(e), errno=e.errno or errno.EIO) from None
            self.buf += bytes(2 * self.WINDOW - len(self.buf))
        return offset - self.base


def _strerror(e: BlockError) -> str:
    import os
    return os.strerror(e.errno) if e.errno else str(e)


@record
class TableRead:
    """What qcow2_do_read_snapshots() leaves behind."""
    snapshots: list
    size: int                 # bytes of the table (snapshots_size)
    nb_reduced: int = 0       # overhanging snapshots discarded (repair)
    extra_dropped: int = 0    # entries whose too large extra data was cut (repair)


def read_table(file, snapshots_offset: int, nb_snapshots: int, disk_size: int,
               repair: bool = False, report=None) -> TableRead:
    """qcow2_do_read_snapshots().  With ``repair`` (check -r all), too much extra data
    is cut and a table that is too big loses its overhanging entries instead of
    failing; ``report(text)`` prints the "Discarding ..." lines."""
    snaps: list[Snapshot] = []
    if not nb_snapshots:
        return TableRead(snaps, 0)
    rd = _Reader(file)
    out = TableRead(snaps, 0)
    offset = snapshots_offset
    table_length = 0
    for i in range(nb_snapshots):
        truncate_unknown = False
        pre_sn_offset = offset
        table_length = _align8(table_length)
        offset = _align8(offset)
        rest = nb_snapshots - i
        if offset >= rd.end and \
                table_length + rest * SNAPSHOT_HEADER.size <= QCOW_MAX_SNAPSHOTS_SIZE and \
                offset + rest * SNAPSHOT_HEADER.size - snapshots_offset <= INT_MAX:
            # the rest of the table lies past the end of the file: zeroes, that is
            # empty 40-byte entries all alike (their count is a number from the file)
            snaps.extend(Snapshot(0, 0, "", "", disk_size, 0, 0, 0, 0, ICOUNT_NONE, 0)
                         for _ in range(rest))
            offset += rest * SNAPSHOT_HEADER.size
            break
        at = rd.at(offset, SNAPSHOT_HEADER.size)     # (moves the window: before rd.buf)
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack_from(rd.buf, at)
        offset += SNAPSHOT_HEADER.size
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            if not repair:
                raise InvalidImage("Too much extra metadata in snapshot table entry %d" % i,
                                   errno=errno.EFBIG,
                                   hint="You can force-remove this extra metadata with "
                                        "qemu-img check -r all\n")
            report("Discarding too much extra metadata in snapshot table entry %d "
                   "(%d > %d)" % (i, extra_size, QCOW_MAX_SNAPSHOT_EXTRA_DATA))
            out.extra_dropped += 1
            truncate_unknown = True
        known = min(SNAPSHOT_EXTRA.size, extra_size)
        if known == SNAPSHOT_EXTRA.size:
            at = rd.at(offset, known)
            vm_large, dsize, icount = SNAPSHOT_EXTRA.unpack_from(rd.buf, at)
        else:
            vm_large, dsize, icount = SNAPSHOT_EXTRA.unpack(
                rd.read(offset, known) + bytes(SNAPSHOT_EXTRA.size - known))
        offset += known
        if extra_size >= EXTRA_END_VM_STATE:
            vm_state = vm_large
        if extra_size < EXTRA_END_DISK_SIZE:
            dsize = disk_size
        if extra_size < EXTRA_END_ICOUNT:
            icount = ICOUNT_NONE
        unknown = b""
        if extra_size > SNAPSHOT_EXTRA.size:
            extra_end = offset + extra_size - SNAPSHOT_EXTRA.size
            if truncate_unknown:
                extra_size = QCOW_MAX_SNAPSHOT_EXTRA_DATA
            unknown = rd.read(offset, extra_size - SNAPSHOT_EXTRA.size)
            offset = extra_end
        id_str = _cstring(rd.read(offset, id_size))
        offset += id_size
        name = _cstring(rd.read(offset, name_size))
        offset += name_size
        # the extra data may have been cut: the table length counts what is kept
        table_length += SNAPSHOT_HEADER.size + extra_size + id_size + name_size
        if table_length > QCOW_MAX_SNAPSHOTS_SIZE or offset - snapshots_offset > INT_MAX:
            if not repair:
                raise InvalidImage("Snapshot table is too big", errno=errno.EFBIG,
                                   hint="You can force-remove all %d overhanging snapshots "
                                        "with qemu-img check -r all\n" % (nb_snapshots - i))
            report("Discarding %d overhanging snapshots (snapshot table is too big)"
                   % (nb_snapshots - i))
            out.nb_reduced += nb_snapshots - i
            offset = pre_sn_offset
            break
        snaps.append(Snapshot(l1_off, l1_size, id_str, name, dsize, vm_state, date_sec,
                              date_nsec, vm_clock, icount, extra_size, unknown))
    out.size = offset - snapshots_offset
    return out


def read_snapshots(file, snapshots_offset: int, nb_snapshots: int, disk_size: int
                   ) -> tuple[list[Snapshot], int]:
    """qcow2_read_snapshots(): (snapshots, size of the table in bytes)."""
    t = read_table(file, snapshots_offset, nb_snapshots, disk_size)
    return t.snapshots, t.size


def write_snapshots(s) -> None:
    """qcow2_write_snapshots(): the in-memory list to newly allocated clusters, then the
    header switched to it (synced) and the old table freed."""
    size = 0
    for sn in s.snapshots:
        size = _align8(size) + SNAPSHOT_HEADER.size + \
            max(SNAPSHOT_EXTRA.size, sn.extra_data_size) + len(_raw(sn.id_str)) + \
            len(_raw(sn.name))
        if size > QCOW_MAX_SNAPSHOTS_SIZE:
            raise BlockError("File too large", errno=errno.EFBIG)
    new_offset = s.alloc_clusters(size)
    try:
        s.flush_caches()
        s.file.flush()
        # the header does not point here yet: these clusters must be free
        s.pre_write_overlap_check(0, new_offset, size)
        if size:
            # one write of the whole table; alignment gaps keep what the clusters held,
            # as QEMU writes the entries field by field
            buf = bytearray(_Reader(s.file).read(new_offset, size))
            pos = 0
            for sn in s.snapshots:
                pos = _align8(pos)
                entry = sn.pack()
                buf[pos:pos + len(entry)] = entry
                pos += len(entry)
            s.file.pwrite(new_offset, bytes(buf))
        # the new table and its refcounts must be stable before the header points to it
        s.file.flush()
        s.file.pwrite(OFS_NB_SNAPSHOTS, NB_AND_OFFSET.pack(len(s.snapshots), new_offset))
        s.file.flush()
    except BaseException:
        if new_offset > 0:
            s.free_clusters(new_offset, size, QCOW2_DISCARD_ALWAYS)
        raise
    old_offset, old_size = s.snapshots_offset, s.snapshots_size
    s.nb_snapshots = len(s.snapshots)
    s.snapshots_offset, s.snapshots_size = new_offset, size
    s.header.nb_snapshots, s.header.snapshots_offset = s.nb_snapshots, new_offset
    s.free_clusters(old_offset, old_size, QCOW2_DISCARD_SNAPSHOT)


# ---- qcow2_update_snapshot_refcount ------------------------------------------------------
def update_snapshot_refcount(s, l1_table_offset: int, l1_size: int, addend: int) -> None:
    """qcow2_update_snapshot_refcount(): add addend (-1, 0, 1) to the refcount of every
    cluster reachable from the L1 table and recompute QCOW_OFLAG_COPIED in it and its
    L2 tables.  The active table (l1_table_offset == s.l1_table_offset) is taken from
    memory, which snapshot_goto relies on."""
    assert -1 <= addend <= 1
    cb, cs = s.cluster_bits, s.cluster_size
    decrease = addend < 0
    s.cache_discards = True
    ok = False
    l1_modified = False
    try:
        if l1_table_offset != s.l1_table_offset:
            raw = _Reader(s.file).read(l1_table_offset, l1_size * L1E_SIZE)
            l1_table = list(struct.unpack(">%dQ" % l1_size, raw))
        else:
            assert l1_size == s.l1_size
            l1_table = s.l1_table
        sb = s.l2_slice_bytes
        for i in nonzero_indexes(l1_table, l1_size):
            old_l2_offset = l1_table[i]
            l2_offset = old_l2_offset & L1E_OFFSET_MASK
            if l2_offset & (cs - 1):
                s.signal_corruption(True, "L2 table offset %#x unaligned (L1 index: %#x)"
                                    % (l2_offset, i))
            for slice_no in range(cs // sb):
                _update_slice(s, l2_offset, slice_no, addend)
            if addend:
                s.update_refcount(l2_offset, 1, 1, decrease, QCOW2_DISCARD_SNAPSHOT)
            if s.get_refcount(l2_offset >> cb) == 1:
                l2_offset |= QCOW_OFLAG_COPIED
            if l2_offset != old_l2_offset:
                l1_table[i] = l2_offset
                l1_modified = True
        s.flush_caches()
        s.file.flush()
        ok = True
    finally:
        s.cache_discards = False
        s.process_discards()
    # a table that is being deleted (addend -1) is not rewritten
    if ok and addend >= 0 and l1_modified:
        s.file.pwrite(l1_table_offset, struct.pack(">%dQ" % l1_size, *l1_table))
        s.file.flush()


def _update_slice(s, l2_offset: int, slice_no: int, addend: int) -> None:
    """The entries of one L2 slice, in order, as qcow2_update_snapshot_refcount() walks
    them; runs of consecutive host clusters get their refcounts changed with one call
    (a run that fails is redone cluster by cluster, so that what QEMU would have
    changed before the failing cluster is changed here too)."""
    decrease = addend < 0
    slice_off = l2_offset + slice_no * s.l2_slice_bytes
    table = s.l2_cache.get(slice_off)
    step = s.l2e_size // 8
    words = struct.unpack(">%dQ" % (len(table) // 8), table)
    base = slice_no * s.l2_slice_size
    changes: list[tuple[int, int]] = []
    run: list[tuple[int, int]] = []        # (index, entry) of consecutive host clusters

    def flag(j: int, entry: int, refcount: int) -> None:
        if refcount == 1:
            entry |= QCOW_OFLAG_COPIED
        if entry != words[j * step]:
            changes.append((j, entry))

    def flush_run() -> None:
        if not run:
            return
        first = (run[0][1] & L2E_OFFSET_MASK) >> s.cluster_bits
        try:
            if addend:
                s.update_refcount(first << s.cluster_bits, len(run) << s.cluster_bits, 1,
                                  decrease, QCOW2_DISCARD_SNAPSHOT)
        except BlockError:
            for j, entry in run:        # rolled back: now one by one, up to the failure
                flag(j, entry, _entry_refcount(s, entry, addend, decrease, l2_offset,
                                               base + j))
        else:
            for (j, entry), rc in zip(run, s.get_refcount_range(first, len(run))):
                flag(j, entry, rc)
        run.clear()

    try:
        for j in compress(range(s.l2_slice_size), words[0::step]):
            entry = words[j * step] & ~QCOW_OFLAG_COPIED
            t = s.cluster_type(entry)
            offset = entry & L2E_OFFSET_MASK
            if t in (CL_NORMAL, CL_ZERO_ALLOC) and not s.has_data_file and \
                    not offset & (s.cluster_size - 1):
                if run and (run[-1][1] & L2E_OFFSET_MASK) + s.cluster_size != offset:
                    flush_run()
                run.append((j, entry))
                continue
            flush_run()
            flag(j, entry, _entry_refcount(s, entry, addend, decrease, l2_offset, base + j))
        flush_run()
    finally:
        # what was changed before a failure stays changed, as in QEMU
        if changes:
            if addend > 0:
                # OFLAG_COPIED may only go away once the refcounts are on disk
                s.l2_cache.set_dependency(s.refcount_cache)
            table = s.l2_cache.get(slice_off)
            for j, entry in changes:
                s.set_l2_entry(table, j, entry)
            s.l2_cache.mark_dirty(slice_off, table)


def _entry_refcount(s, entry: int, addend: int, decrease: bool, l2_offset: int,
                    l2_index: int) -> int:
    """The refcount an L2 entry's cluster has after adding addend (2 for compressed
    clusters, which are never written in place; 0 for unallocated ones)."""
    t = s.cluster_type(entry)
    if t == CL_COMPRESSED:
        if addend:
            coffset, csize = s.parse_compressed_l2_entry(entry)
            s.update_refcount(coffset, csize, 1, decrease, QCOW2_DISCARD_SNAPSHOT)
        return 2
    if t in (CL_NORMAL, CL_ZERO_ALLOC):
        offset = entry & L2E_OFFSET_MASK
        if offset & (s.cluster_size - 1):
            s.signal_corruption(True, "Cluster allocation offset %#x unaligned (L2 offset: "
                                "%#x, L2 index: %#x)" % (offset, l2_offset, l2_index))
        if s.has_data_file:
            # clusters of an external data file have no refcounts (never shared)
            return 1
        if addend:
            s.update_refcount(offset, 1, 1, decrease, QCOW2_DISCARD_SNAPSHOT)
        return s.get_refcount(offset >> s.cluster_bits)
    return 0


# ---- lookup ----------------------------------------------------------------------------------
def _strtoul(text: str) -> int:
    """strtoul(text, NULL, 10) of glibc: leading digits, wrapping negation, saturation."""
    t = _raw(text).lstrip(b" \t\n\v\f\r")
    neg = t[:1] == b"-"
    if t[:1] in (b"-", b"+"):
        t = t[1:]
    digits = b""
    for c in t:
        if not 0x30 <= c <= 0x39:
            break
        digits += bytes([c])
    v = int(digits) if digits else 0
    if v > ULONG_MAX:
        return ULONG_MAX
    return (-v) & ULONG_MAX if neg else v


def find_new_snapshot_id(snapshots) -> str:
    """find_new_snapshot_id(): one more than the largest numeric id."""
    id_max = max((_strtoul(sn.id_str) for sn in snapshots), default=0)
    return "%d" % ((id_max + 1) & ULONG_MAX)


def find_by_id_and_name(snapshots, snapshot_id: str | None, name: str | None) -> int:
    """find_snapshot_by_id_and_name(): index, or -1."""
    for i, sn in enumerate(snapshots):
        if (snapshot_id is None or sn.id_str == snapshot_id) and \
                (name is None or sn.name == name) and (snapshot_id or name) is not None:
            return i
    return -1


def find_by_id_or_name(snapshots, id_or_name: str) -> int:
    """find_snapshot_by_id_or_name(): by id first, then by name."""
    i = find_by_id_and_name(snapshots, id_or_name, None)
    return i if i >= 0 else find_by_id_and_name(snapshots, None, id_or_name)


def _validate_l1(s, sn: Snapshot) -> None:
    """qcow2_validate_table() of a snapshot's L1 table."""
    if sn.l1_size > QCOW_MAX_L1_SIZE // L1E_SIZE:
        raise InvalidImage("Snapshot L1 table too large", errno=errno.EFBIG)
    if INT64_MAX - sn.l1_size * L1E_SIZE < sn.l1_table_offset or \
            sn.l1_table_offset & (s.cluster_size - 1):
        raise InvalidImage("Snapshot L1 table offset invalid", errno=errno.EINVAL)


def _error_report(msg: str) -> None:
    from .check import error_report
    error_report(msg)


# ---- the driver's snapshot operations ---------------------------------------------------------
class Qcow2SnapshotMixin:
    """bdrv_snapshot_create/goto/delete of qcow2; mixed into Qcow2Driver.

    Errors are BlockErrors whose errno is what QEMU's function returns; delete's
    message is the one QEMU puts into its Error (create and goto have none)."""

    def snapshot_create(self, name: str, date_sec: int, date_nsec: int,
                        vm_clock_nsec: int = 0, icount: int = 0,
                        vm_state_size: int = 0) -> Snapshot:
        """qcow2_snapshot_create(): a new snapshot of the active image (new id)."""
        s = self
        s._begin_write()
        if s.nb_snapshots >= QCOW_MAX_SNAPSHOTS:
            raise BlockError("File too large", errno=errno.EFBIG)
        if s.has_data_file:
            raise NotSupported()
        sn = Snapshot(0, s.l1_size, find_new_snapshot_id(s.snapshots), name, s.total_size,
                      vm_state_size, date_sec, date_nsec, vm_clock_nsec, icount,
                      SNAPSHOT_EXTRA.size)
        # a copy of the active L1 table (flags included) in new clusters
        sn.l1_table_offset = s.alloc_clusters(s.l1_size * L1E_SIZE)
        s.pre_write_overlap_check(0, sn.l1_table_offset, s.l1_size * L1E_SIZE)
        s.file.pwrite(sn.l1_table_offset, struct.pack(">%dQ" % s.l1_size, *s.l1_table))
        # every shared cluster gets its second reference, stable on disk before the
        # snapshot table points to the copy
        update_snapshot_refcount(s, s.l1_table_offset, s.l1_size, 1)
        s.snapshots.append(sn)
        try:
            write_snapshots(s)
        except BaseException:
            s.snapshots.pop()
            raise
        if vm_state_size:
            # the VM state is not needed in the active L1 table any more
            vm_state_offset = s.l1_vm_state_index << (s.cluster_bits + s.l2_bits)
            n = -(-vm_state_size // s.cluster_size) * s.cluster_size
            s.cluster_discard(vm_state_offset, n, 0, False)
        return sn

    def snapshot_goto(self, snapshot_id: str) -> None:
        """qcow2_snapshot_goto(): the active image becomes the snapshot's contents."""
        s = self
        s._begin_write()
        if s.has_data_file:
            raise NotSupported()
        i = find_by_id_or_name(s.snapshots, snapshot_id)
        if i < 0:
            raise BlockError("No such file or directory", errno=errno.ENOENT)
        sn = s.snapshots[i]
        try:
            _validate_l1(s, sn)
        except BlockError as e:
            _error_report(str(e))
            raise
        if sn.disk_size != s.total_size:
            from ...base import PreallocMode
            try:
                s.node.truncate(sn.disk_size, exact=True, prealloc=PreallocMode.OFF)
            except BlockError as e:
                _error_report(str(e))
                raise
        s.grow_l1_table(sn.l1_size, True)
        cur_l1_bytes = s.l1_size * L1E_SIZE
        raw = _Reader(s.file).read(sn.l1_table_offset, sn.l1_size * L1E_SIZE)
        sn_l1 = list(struct.unpack(">%dQ" % sn.l1_size, raw)) + [0] * (s.l1_size - sn.l1_size)
        # references of the snapshot's clusters first, then the active table replaced
        update_snapshot_refcount(s, sn.l1_table_offset, sn.l1_size, 1)
        s.pre_write_overlap_check(OL.ACTIVE_L1, s.l1_table_offset, cur_l1_bytes)
        # every L2 table it names is shared now (refcount >= 2): written without
        # OFLAG_COPIED, a crash before the flags are recomputed below leaves leaks only
        s.file.pwrite(s.l1_table_offset, struct.pack(">%dQ" % s.l1_size, *(
            e & ~QCOW_OFLAG_COPIED for e in sn_l1)))
        s.file.flush()
        # the in-memory table still is the old one: drop its references
        try:
            update_snapshot_refcount(s, s.l1_table_offset, s.l1_size, -1)
        finally:
            s.l1_table[:] = sn_l1
        # refcounts may have dropped to 1: set OFLAG_COPIED where they did
        update_snapshot_refcount(s, s.l1_table_offset, s.l1_size, 0)

    def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None) -> None:
        """qcow2_snapshot_load_tmp(): a read-only image shows a snapshot's contents
        from now on (its L1 table replaces the active one in memory only)."""
        s = self
        i = find_by_id_and_name(s.snapshots, snapshot_id, name)
        if i < 0:
            raise BlockError("Can't find snapshot", errno=errno.ENOENT)
        sn = s.snapshots[i]
        _validate_l1(s, sn)
        raw = _Reader(s.file).read(sn.l1_table_offset, sn.l1_size * L1E_SIZE)
        s.l1_size, s.l1_table_offset = sn.l1_size, sn.l1_table_offset
        s.l1_table = list(struct.unpack(">%dQ" % sn.l1_size, raw))

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> None:
        """qcow2_snapshot_delete(): the snapshot matching id and name is removed."""
        s = self
        s._begin_write()
        if s.has_data_file:
            raise NotSupported()
        i = find_by_id_and_name(s.snapshots, snapshot_id, name)
        if i < 0:
            raise BlockError("Can't find the snapshot", errno=errno.ENOENT)
        sn = s.snapshots[i]
        _validate_l1(s, sn)
        del s.snapshots[i]
        try:
            write_snapshots(s)
        except BlockError as e:
            s.snapshots.insert(i, sn)
            raise BlockError("Failed to remove snapshot from snapshot list: %s"
                             % _strerror(e), errno=e.errno) from None
        # the snapshot is gone from the table: failing from here on only leaks clusters
        try:
            update_snapshot_refcount(s, sn.l1_table_offset, sn.l1_size, -1)
        except BlockError as e:
            raise BlockError("Failed to free the cluster and L1 table: %s" % _strerror(e),
                             errno=e.errno) from None
        s.free_clusters(sn.l1_table_offset, sn.l1_size * L1E_SIZE, QCOW2_DISCARD_SNAPSHOT)
        try:
            update_snapshot_refcount(s, s.l1_table_offset, s.l1_size, 0)
        except BlockError as e:
            raise BlockError("Failed to update snapshot status in disk: %s" % _strerror(e),
                             errno=e.errno) from None
