"""Persistent dirty bitmaps in qcow2 (QEMU 7.2's block/qcow2-bitmap.c).

On-disk layout (docs/interop/qcow2.txt, "Bitmaps"): the bitmaps header extension points
at the bitmap *directory*, a run of variable-length entries (24-byte header, extra data,
name, padded to 8 bytes).  Each entry points at a *bitmap table* of 64-bit entries, one
per data cluster of serialized bits; an entry with offset 0 means "all zeroes" (or all
ones if bit 0 is set).  The autoclear bit ``bitmaps`` says the extension is consistent.

Life cycle, as QEMU:

* open (``bitmaps_load``): every directory entry becomes a ``BlockDirtyBitmap`` on the
  node (persistent; disabled unless the ``auto`` flag is set).  One with ``in-use`` set
  was not stored cleanly (crash): it is loaded empty and marked inconsistent (it can
  only be removed).  On a read-write open the others get ``in-use`` set on disk, by
  rewriting the directory in place with the autoclear bit dropped around the rewrite.
  On a read-only open the bitmaps are read-only.
* close / reopen read-only (``store_bitmaps``): the bits of every persistent, consistent,
  writable bitmap are written to newly allocated clusters (only chunks with a dirty bit
  get a data cluster), a new directory is written with ``in-use`` clear, the header
  switched to it, then the old directory and the old tables/data clusters are freed.
* block-dirty-bitmap-remove (``remove_persistent_bitmap``): drop it from the directory
  at once and free its clusters.

The driver mixes this in (``Qcow2BitmapMixin``); it needs ``bitmaps_ext`` (nb, size,
offset), ``autoclear_features``, ``update_header()``, ``alloc_clusters``,
``free_clusters``, ``flush_caches`` and ``pre_write_overlap_check``.
"""
from __future__ import annotations

import errno
import struct
import sys

from ....errors import BlockError, InvalidImage, NotSupported
from . import layout as L
from . import overlap as OL

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFF & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)
BT_DIRTY_TRACKING_BITMAP = 1
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MAX_GRANULARITY_BITS = 31
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_NAME_SIZE = 1023
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
DIR_ENTRY = L.BITMAP_DIR_ENTRY      # >QIIBBHI: table offset, table size, flags, type,
#                                     granularity bits, name size, extra data size


def dir_entry_size(name_size: int, extra_size: int = 0) -> int:
    """calc_dir_entry_size()."""
    return (DIR_ENTRY.size + name_size + extra_size + 7) & ~7


class DirEntry:
    """Qcow2Bitmap: one directory entry."""
    __slots__ = ("name", "table_offset", "table_size", "flags", "granularity_bits",
                 "extra", "bitmap")

    def __init__(self, name: str, table_offset: int = 0, table_size: int = 0,
                 flags: int = 0, granularity_bits: int = 16, extra: bytes = b""):
        self.name = name
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.granularity_bits = granularity_bits
        self.extra = extra
        self.bitmap = None       # the BlockDirtyBitmap to store in it

    def pack(self) -> bytes:
        name = self.name.encode("utf-8", "surrogateescape")
        buf = bytearray(DIR_ENTRY.pack(self.table_offset, self.table_size, self.flags,
                                       BT_DIRTY_TRACKING_BITMAP, self.granularity_bits,
                                       len(name), len(self.extra)))
        buf += self.extra + name
        buf += bytes(dir_entry_size(len(name), len(self.extra)) - len(buf))
        return bytes(buf)


class Qcow2BitmapMixin:
    # ------------------------------------------------------------------ directory
    def _bitmap_list_load(self) -> list[DirEntry]:
        """bitmap_list_load(): the directory, each entry checked (check_dir_entry)."""
        if not self.bitmaps_ext:
            return []
        nb, dsize, doff = self.bitmaps_ext
        if dsize == 0:
            raise InvalidImage("Can't load bitmap list: Bitmap directory is empty")
        data = self.file.pread(doff, dsize)
        if len(data) < dsize:
            raise InvalidImage("Failed to read bitmap directory")
        out, pos = [], 0
        length = self.total_size
        while pos < dsize:
            if pos + DIR_ENTRY.size > dsize:
                raise InvalidImage("Broken bitmap directory")
            (toff, tsize, flags, btype, gbits, name_size,
             extra_size) = DIR_ENTRY.unpack_from(data, pos)
            esize = dir_entry_size(name_size, extra_size)
            if pos + esize > dsize:
                raise InvalidImage("Broken bitmap directory")
            body = pos + DIR_ENTRY.size
            extra = data[body:body + extra_size]
            name = data[body + extra_size:body + extra_size + name_size].decode(
                "utf-8", "surrogateescape")
            bad = (tsize == 0 or toff == 0 or toff % self.cluster_size
                   or tsize > BME_MAX_TABLE_SIZE or gbits > BME_MAX_GRANULARITY_BITS
                   or gbits < BME_MIN_GRANULARITY_BITS or flags & BME_RESERVED_FLAGS
                   or name_size > BME_MAX_NAME_SIZE or btype != BT_DIRTY_TRACKING_BITMAP)
            phys = tsize * self.cluster_size
            if not bad and (phys > BME_MAX_PHYS_SIZE or (
                    not flags & BME_FLAG_IN_USE and length > (phys * 8) << gbits)):
                bad = True
            if bad:
                raise InvalidImage("Bitmap '%s' doesn't satisfy the constraints" % name)
            if extra_size:
                # QEMU: extra data is only allowed with the "extra data compatible" flag,
                # which is a reserved flag here, so never reached
                raise InvalidImage("Bitmap '%s' doesn't satisfy the constraints" % name)
            out.append(DirEntry(name, toff, tsize, flags, gbits, extra))
            pos += esize
        if len(out) != nb:
            raise InvalidImage("Can't load bitmap list: Bitmap directory is corrupted")
        names = [e.name for e in out]
        if len(set(names)) != len(names):
            raise InvalidImage("Can't load bitmap list: Bitmap directory is corrupted")
        return out

    def _bitmap_table_load(self, e: DirEntry) -> list[int]:
        raw = self.file.pread(e.table_offset, e.table_size * 8)
        if len(raw) < e.table_size * 8:
            raise InvalidImage("Could not read bitmap table")
        table = list(struct.unpack(">%dQ" % e.table_size, raw))
        for t in table:
            off = t & BME_TABLE_ENTRY_OFFSET_MASK
            if t & BME_TABLE_ENTRY_RESERVED_MASK or off % self.cluster_size or \
                    (off and t & BME_TABLE_ENTRY_FLAG_ALL_ONES):
                raise InvalidImage("Bitmap table is corrupted (bitmap '%s')" % e.name)
        return table

    def _bitmap_list_store(self, entries: list[DirEntry], in_place: bool) -> tuple[int, int]:
        """bitmap_list_store(): write the directory (in place, or to new clusters)."""
        buf = b"".join(e.pack() for e in entries)
        if in_place:
            _, dsize, doff = self.bitmaps_ext
            if dsize != len(buf):
                raise BlockError("Invalid argument", errno=errno.EINVAL)
        else:
            doff = self.alloc_clusters(len(buf))
        # the overlap check must not see the directory being replaced/rewritten
        self.pre_write_overlap_check(OL.BITMAP_DIRECTORY if in_place else 0, doff, len(buf))
        self.file.pwrite(doff, buf)
        return doff, len(buf)

    def _bitmaps_update_ext(self, entries: list[DirEntry]) -> None:
        """update_ext_header_and_dir(): new directory, header switched, old one freed."""
        old = self.bitmaps_ext
        if entries:
            if len(entries) > L.QCOW2_MAX_BITMAPS:
                raise BlockError("Invalid argument", errno=errno.EINVAL)
            doff, dsize = self._bitmap_list_store(entries, in_place=False)
            self.flush_caches()
            self.autoclear_features |= L.QCOW2_AUTOCLEAR_BITMAPS
            self.bitmaps_ext = (len(entries), dsize, doff)
        else:
            self.autoclear_features &= ~L.QCOW2_AUTOCLEAR_BITMAPS
            self.bitmaps_ext = None
        self.update_header()
        self.file.flush()
        if old and old[1]:
            self.free_clusters(old[2], old[1], L.QCOW2_DISCARD_OTHER)

    def _bitmaps_update_in_place(self, entries: list[DirEntry]) -> None:
        """update_ext_header_and_dir_in_place(): flags changed, same directory size.
        The autoclear bit is dropped while the directory is rewritten, so a crash in
        between leaves bitmaps that are all considered inconsistent."""
        if not self.autoclear_features & L.QCOW2_AUTOCLEAR_BITMAPS or not entries or \
                len(entries) != self.bitmaps_ext[0]:
            raise BlockError("Invalid argument", errno=errno.EINVAL)
        self.autoclear_features &= ~L.QCOW2_AUTOCLEAR_BITMAPS
        self.update_header()
        self.file.flush()
        self._bitmap_list_store(entries, in_place=True)
        self.file.flush()
        self.autoclear_features |= L.QCOW2_AUTOCLEAR_BITMAPS
        self.update_header()
        self.file.flush()

    def _free_bitmap_clusters(self, table_offset: int, table_size: int) -> None:
        """free_bitmap_clusters(): the data clusters, then the table."""
        if not table_offset:
            return
        try:
            table = struct.unpack(">%dQ" % table_size,
                                  self.file.pread(table_offset, table_size * 8))
        except (BlockError, struct.error):
            table = ()
        for t in table:
            off = t & BME_TABLE_ENTRY_OFFSET_MASK
            if off:
                self.free_clusters(off, self.cluster_size, L.QCOW2_DISCARD_ALWAYS)
        self.free_clusters(table_offset, table_size * 8, L.QCOW2_DISCARD_OTHER)

    # ------------------------------------------------------------------ load
    def bitmaps_load(self) -> None:
        """qcow2_load_dirty_bitmaps(): called at the end of open."""
        from .... import bitmaps as B
        self.bitmaps_loaded = []
        if not self.bitmaps_ext:
            return
        entries = self._bitmap_list_load()
        writable = not self.node.read_only
        needs_update = False
        cs_bits = self.cluster_size * 8
        for e in entries:
            if e.flags & BME_FLAG_IN_USE and B.find_bitmap(self.node, e.name) is not None:
                continue
            bm = B.BlockDirtyBitmap(self.node, e.name, 1 << e.granularity_bits,
                                    size=self.total_size, persistent=True)
            if not e.flags & BME_FLAG_IN_USE:
                table = self._bitmap_table_load(e)
                need = -(-bm.nbits // cs_bits)
                if need > len(table):
                    raise InvalidImage("Bitmap '%s' doesn't satisfy the constraints"
                                       % e.name)
                for i in range(need):
                    first = i * cs_bits
                    n = min(bm.nbits - first, cs_bits)
                    t = table[i]
                    off = t & BME_TABLE_ENTRY_OFFSET_MASK
                    if off:
                        data = self.file.pread(off, self.cluster_size)
                        data = data + bytes(self.cluster_size - len(data))
                        bm.deserialize_part(first, n, data)
                    elif t & BME_TABLE_ENTRY_FLAG_ALL_ONES:
                        bm.deserialize_part(first, n, b"\xff" * ((n + 7) >> 3))
                e.flags |= BME_FLAG_IN_USE
                needs_update = True
            else:
                bm.inconsistent = True       # bdrv_dirty_bitmap_set_inconsistent()
                bm.disabled = True           # also disables it
            if not e.flags & BME_FLAG_AUTO:
                bm.disabled = True
            if not writable:
                bm.readonly = True
            B.add_bitmap(self.node, bm)
            self.bitmaps_loaded.append(bm)
        if needs_update and writable:
            self._bitmaps_update_in_place(entries)

    def bitmaps_reopen_rw(self) -> None:
        """qcow2_reopen_bitmaps_rw(): read-only bitmaps become writable, set in-use."""
        ro = [bm for bm in self.node.dirty_bitmaps if bm.persistent and bm.readonly]
        if not ro or not self.bitmaps_ext:
            for bm in ro:
                bm.readonly = False
            return
        entries = self._bitmap_list_load()
        names = {bm.name for bm in ro}
        changed = False
        for e in entries:
            if e.name in names and not e.flags & BME_FLAG_IN_USE:
                e.flags |= BME_FLAG_IN_USE
                changed = True
        if changed:
            self._bitmaps_update_in_place(entries)
        for bm in ro:
            bm.readonly = False

    # ------------------------------------------------------------------ store
    def _store_bitmap(self, e: DirEntry, bm) -> None:
        """store_bitmap(): a data cluster for each bitmap cluster holding a dirty bit."""
        cs = self.cluster_size
        cs_bits = cs * 8
        tb_size = -(-bm.nbits // cs_bits)
        if tb_size > BME_MAX_TABLE_SIZE or tb_size * cs > BME_MAX_PHYS_SIZE:
            raise BlockError("Bitmap '%s' is too big" % bm.name, errno=errno.EINVAL)
        table = [0] * tb_size
        bits = bm.copy_bits()
        from .... import _native
        limit = bm.granularity * cs_bits           # bytes covered by one bitmap cluster
        offset = 0
        while True:
            offset = bm.next_dirty(offset)
            if offset < 0:
                break
            i = offset // limit
            first = i * cs_bits
            n = min(bm.nbits - first, cs_bits)
            data = _native.bitmap_serialize(bits, first, n)
            off = self.alloc_clusters(cs)
            table[i] = off
            self.pre_write_overlap_check(0, off, cs)
            self.file.pwrite(off, data + bytes(cs - len(data)))
            offset = (i + 1) * limit
            if offset >= bm.size:
                break
        raw = struct.pack(">%dQ" % tb_size, *table)
        tb_off = self.alloc_clusters(len(raw))
        self.pre_write_overlap_check(0, tb_off, len(raw))
        self.file.pwrite(tb_off, raw)
        e.table_offset, e.table_size = tb_off, tb_size

    def store_bitmaps(self, bitmaps: list, _reopening_ro: bool = False) -> None:
        """qcow2_store_persistent_dirty_bitmaps(): bitmaps.store_persistent's hook."""
        if (self.node.read_only and not _reopening_ro) or self.unusable or getattr(self, "check_mode", False):
            return
        todo = [bm for bm in bitmaps if bm.persistent and bm.name and not bm.inconsistent
                and not bm.readonly]
        if not todo:
            return
        entries = self._bitmap_list_load()
        by_name = {e.name: e for e in entries}
        drop = []
        for bm in todo:
            self._check_constraints(bm.name, bm.granularity)
            e = by_name.get(bm.name)
            if e is None:
                if len(entries) + 1 > L.QCOW2_MAX_BITMAPS:
                    raise BlockError("Too many persistent bitmaps", errno=errno.EINVAL)
                e = DirEntry(bm.name)
                entries.append(e)
                by_name[bm.name] = e
            else:
                if not e.flags & BME_FLAG_IN_USE:
                    raise BlockError("Bitmap '%s' already exists in the image" % bm.name)
                drop.append((e.table_offset, e.table_size))
            e.flags = BME_FLAG_AUTO if not bm.disabled else 0
            e.granularity_bits = bm.granularity.bit_length() - 1
            e.extra = b""
            e.bitmap = bm
        for e in entries:
            if e.bitmap is not None:
                self._store_bitmap(e, e.bitmap)
        self._bitmaps_update_ext(entries)
        for off, size in drop:
            self._free_bitmap_clusters(off, size)
        self.flush_caches()

    def bitmaps_store_on_close(self, release: bool = True) -> None:
        """The close (inactivate) and reopen-read-only path."""
        bms = [bm for bm in list(self.node.dirty_bitmaps) if bm.persistent and bm.name]
        if not bms:
            return
        try:
            self.store_bitmaps(bms, _reopening_ro=not release)
        except BlockError as e:
            print("qemu: Failed to flush the persistent dirty bitmaps of %s: %s"
                  % (self.node.node_name, e), file=sys.stderr)
            return
        from .... import bitmaps as B
        for bm in bms:
            if release:
                if not bm.inconsistent and not bm.readonly:
                    B.remove_bitmap(self.node, bm)
            else:
                bm.readonly = True

    def truncate_bitmaps_check(self) -> None:
        """qcow2_truncate_bitmaps_check(): a resize is refused unless every bitmap of
        the image is loaded and usable: the generic layer resizes them in memory and
        they reach the image, at the new size, when they are stored on close."""
        if not self.bitmaps_ext:
            return
        from .... import bitmaps as B
        for e in self._bitmap_list_load():
            bm = B.find_bitmap(self.node, e.name)
            if bm is None:
                raise NotSupported("Cannot resize qcow2 with persistent bitmaps that "
                                   "were not loaded into memory")
            B.check_usable(bm)

    # ------------------------------------------------------------------ QMP hooks
    def _check_constraints(self, name: str, granularity: int) -> None:
        """check_constraints_on_bitmap()."""
        gbits = granularity.bit_length() - 1
        if self.total_size > BME_MAX_PHYS_SIZE * 8 * granularity:
            raise BlockError("Too much space will be occupied by the bitmap. "
                             "Use larger granularity")
        if gbits > BME_MAX_GRANULARITY_BITS:
            raise BlockError("Granularity exceeds maximum (%d bytes)"
                             % (1 << BME_MAX_GRANULARITY_BITS))
        if gbits < BME_MIN_GRANULARITY_BITS:
            raise BlockError("Granularity is under minimum (%d bytes)"
                             % (1 << BME_MIN_GRANULARITY_BITS))
        if len(name.encode()) > BME_MAX_NAME_SIZE:
            raise BlockError("Name length exceeds maximum (%d characters)"
                             % BME_MAX_NAME_SIZE)

    def can_store_new_bitmap(self, name: str, granularity: int) -> None:
        """qcow2_co_can_store_new_dirty_bitmap(); raises with QEMU's message."""
        try:
            if self.version < 3:
                raise BlockError("Cannot store dirty bitmaps in qcow2 v2 files")
            self._check_constraints(name, granularity)
            if self.bitmaps_ext:
                nb, dsize, _ = self.bitmaps_ext
                if nb >= L.QCOW2_MAX_BITMAPS:
                    raise BlockError("Maximum number of persistent bitmaps is already "
                                     "reached")
                if dsize + dir_entry_size(len(name.encode())) > \
                        L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
                    raise BlockError("Not enough space in the bitmap directory")
                if any(e.name == name for e in self._bitmap_list_load()):
                    raise BlockError("Bitmap with the same name is already stored")
        except BlockError as e:
            raise BlockError("Can't make bitmap '%s' persistent in '%s': %s"
                             % (name, self.node.node_name, e)) from None

    def remove_persistent_bitmap(self, name: str) -> None:
        """qcow2_co_remove_persistent_dirty_bitmap(): absent is not an error."""
        if not self.bitmaps_ext:
            return
        entries = self._bitmap_list_load()
        for e in entries:
            if e.name == name:
                entries.remove(e)
                self._bitmaps_update_ext(entries)
                self._free_bitmap_clusters(e.table_offset, e.table_size)
                self.flush_caches()
                return
