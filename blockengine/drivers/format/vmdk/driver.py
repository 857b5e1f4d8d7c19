"""The VMDK format driver (QEMU 7.2's block/vmdk.c).

Theory of operation: ``open`` reads the start of the file child.  A sparse header
("KDMV"/"COWD") makes the file itself the one extent (its embedded descriptor at
sector 1 holds CID/parentCID/backing hint); anything else is a descriptor file whose
RW extent lines name the extent files, opened as children ``extents.N``.  As in QEMU,
only RW lines of type FLAT/VMFS/SPARSE/VMFSSPARSE count (RDONLY, NOACCESS and ZERO
lines are skipped), and a sparse extent's size comes from its own header.

Guest offsets map to an extent by cumulative size; flat extents are one big cluster
at ``flat_start_offset``; sparse extents go through the grain directory (L1, in
memory) and grain tables (L2, cached).  Writes allocate grains at the end of the
extent file (copying the rest of the grain from the backing file or zeroes) and
update both the GT and the redundant GT.  streamOptimized extents take only whole,
not yet allocated grains, written compressed behind a grain marker.  The first write
after open gives the image a new CID, as QEMU does.
"""
from __future__ import annotations

import errno
import os
import random
import struct
import threading
import zlib
from array import array
from dataclasses import dataclass, field

from ....errors import BlockError, InvalidArgument, InvalidImage, IOFailure, NotSupported
from ....graph.child import ChildRole
from ...base import CreateOpt
from ...base import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_RECURSE, BLOCK_ZERO, BlockDriver,
                     DriverInfo, DriverKind, Status)
from . import layout as L
from .layout import SECTOR

VMDK_OK, VMDK_ERROR, VMDK_UNALLOC, VMDK_ZEROED = 0, -1, -2, -3
VMDK_EXTENT_MAX_SECTORS = 1 << 32
L2_CACHE_SIZE = 16
SUPPORTED_DESC_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
                        "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")


# vmdk_create_opts in QEMU 7.2's order
CREATE_OPTS = (
    CreateOpt("size", "size", "Virtual disk size"),
    CreateOpt("adapter_type", "str", "Virtual adapter type, can be one of ide (default), "
              "lsilogic, buslogic or legacyESX"),
    CreateOpt("backing_file", "str", "File name of a base image"),
    CreateOpt("backing_fmt", "str", "Must be 'vmdk' if present"),
    CreateOpt("compat6", "bool", "VMDK version 6 image", "off"),
    CreateOpt("hwversion", "str", "VMDK hardware version", "undefined"),
    CreateOpt("toolsversion", "str", "VMware guest tools version"),
    CreateOpt("subformat", "str", "VMDK flat extent format, can be one of {monolithicSparse "
              "(default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | "
              "streamOptimized} "),
    CreateOpt("zeroed_grain", "bool",
              "Enable efficient zero writes using the zeroed-grain GTE feature"),
)


# streamOptimized: the whole grains of one write are deflated ahead on a few threads
# (zlib releases the GIL; QEMU deflates one grain at a time), then written in order.
# Each thread takes one contiguous batch, the caller too: few thread wake-ups, which
# cost a lot on a loaded machine.
_deflate_pool = None
_deflate_pool_lock = threading.Lock()


def _deflate_batch(pieces: list) -> list[bytes]:
    return [zlib.compress(p) for p in pieces]


def _deflate_all(pieces: list) -> list[bytes]:
    """zlib.compress() of each piece, in parallel when there are several."""
    global _deflate_pool
    threads = min(os.cpu_count() or 1, len(pieces))
    if threads < 2:
        return _deflate_batch(pieces)
    with _deflate_pool_lock:
        if _deflate_pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _deflate_pool = ThreadPoolExecutor(max_workers=os.cpu_count() - 1,
                                               thread_name_prefix="vmdk-deflate")
    step = -(-len(pieces) // threads)
    batches = [pieces[i:i + step] for i in range(0, len(pieces), step)]
    others = [_deflate_pool.submit(_deflate_batch, b) for b in batches[1:]]
    out = _deflate_batch(batches[0])
    for f in others:
        out += f.result()
    return out


class VmdkError(InvalidImage):
    """A VMDK header, descriptor or table QEMU would refuse."""


@dataclass(eq=False)
class Extent:
    """QEMU's VmdkExtent."""
    file: object                     # the extent's file node
    flat: bool
    sectors: int
    l1_table_offset: int = 0         # bytes
    l1_backup_table_offset: int = 0  # bytes
    l1_size: int = 0
    l2_size: int = 0
    cluster_sectors: int = 0
    l1_entry_sectors: int = 0
    next_cluster_sector: int = 0
    end_sector: int = 0
    flat_start_offset: int = 0
    compressed: bool = False
    has_marker: bool = False
    has_zero_grain: bool = False
    version: int = 0
    type: str | None = None
    l1_table: array = field(default_factory=lambda: array("I"))
    l1_backup_table: array | None = None
    l2_cache: dict = field(default_factory=dict)

    @property
    def start_sector(self) -> int:
        return self.end_sector - self.sectors


def _le32_array(raw: bytes) -> array:
    a = array("I")
    a.frombytes(raw)
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        a.byteswap()
    return a


class VmdkDriver(BlockDriver):
    info = DriverInfo("vmdk", DriverKind.FORMAT, supports_backing=True,
                      create_opts=CREATE_OPTS)

    # ================================================================ open
    def open(self, options: dict) -> None:
        self.file = self.node.file_child_node()
        if self.file is None:
            raise InvalidArgument("Parameter 'file' is missing")
        self.extents: list[Extent] = []
        self.create_type: str | None = None
        self.desc_offset = 0
        self.cid_updated = False
        self.cid_checked = False
        self._pending = None          # a streamOptimized grain being assembled
        self.backing_file = ""
        self.backing_format = ""
        self._options = options
        try:
            self._open(options)
        except BaseException:
            self._close_extent_children()
            raise

    def _read_desc(self, node, offset: int = 0) -> bytes:
        """vmdk_read_desc(): up to 1 MiB - 1 from ``offset`` (zeroes past EOF)."""
        size = node.total_size
        if size < 4:
            raise VmdkError("File is too small, not a valid image")
        size = min(size, (1 << 20) - 1)
        return self._pread_file(node, offset, size)

    @staticmethod
    def _pread_file(node, offset: int, length: int) -> bytes:
        n = max(0, min(length, node.total_size - offset))
        data = node.pread(offset, n) if n else b""
        return data + bytes(length - n)

    def _open(self, options: dict) -> None:
        buf = self._read_desc(self.file)
        magic = buf[:4]
        if magic in (L.VMDK3_MAGIC, L.VMDK4_MAGIC):
            self._open_sparse(self.file, buf, options)
            self.desc_offset = 0x200
        else:
            # no data in the descriptor file
            fchild = self.node.child("file")
            fchild.role &= ~ChildRole.DATA
            self._open_desc_file(L.c_string(buf), options)
        desc = L.c_string(self._pread_file(self.file, self.desc_offset, L.DESC_SIZE))
        einval = BlockError("Could not open '%s': Invalid argument" % self.file.filename(),
                            errno=errno.EINVAL)
        try:
            hint = L.parent_file_name_hint(desc)
        except ValueError:
            raise einval from None
        if hint is not None:
            self.backing_file = hint
            self.backing_format = "vmdk"
        self.cid = L.read_cid(desc, False)
        self.parent_cid = L.read_cid(desc, True)
        if self.cid is None or self.parent_cid is None:
            raise einval

    def _open_sparse(self, fnode, buf: bytes, options: dict) -> None:
        magic = buf[:4]
        if magic == L.VMDK3_MAGIC:
            self._open_vmfs_sparse(fnode)
        elif magic == L.VMDK4_MAGIC:
            self._open_vmdk4(fnode, options)
        else:
            raise VmdkError("Image not in VMDK format")

    def _open_vmfs_sparse(self, fnode) -> None:
        raw = self._pread_file(fnode, 4, L.VMDK3_HEADER.size)
        (version, flags, disk_sectors, granularity, l1dir_offset, l1dir_size, *_rest) = \
            L.VMDK3_HEADER.unpack(raw)
        ext = self._add_extent(fnode, False, disk_sectors, l1dir_offset << 9, 0, l1dir_size,
                               4096, granularity)
        self._init_tables(ext)

    def _open_vmdk4(self, fnode, options: dict) -> None:
        h = L.Vmdk4Header.unpack(self._pread_file(fnode, 4, L.VMDK4_HEADER.size))
        if h.capacity == 0 and h.desc_offset:
            buf = self._read_desc(fnode, h.desc_offset << 9)
            self._open_desc_file(L.c_string(buf), options)
            return
        if not self.create_type:
            self.create_type = "monolithicSparse"
        if h.gd_offset == L.VMDK4_GD_AT_END:
            h = self._read_footer(fnode)
        compressed = h.compress_algorithm == L.VMDK4_COMPRESSION_DEFLATE
        if h.version > 3:
            raise NotSupported("Unsupported VMDK version %d" % h.version)
        if h.version == 3 and not self.node.read_only and not compressed:
            raise VmdkError("VMDK version 3 must be read only")
        if h.num_gtes_per_gt > 512:
            raise VmdkError("L2 table size too big")
        l1_entry_sectors = h.num_gtes_per_gt * h.granularity
        if l1_entry_sectors == 0:
            raise VmdkError("L1 entry size is invalid")
        # uint32_t in QEMU: a huge capacity wraps (and then fails at the first lookup)
        l1_size = ((h.capacity + l1_entry_sectors - 1) // l1_entry_sectors) & 0xFFFFFFFF
        l1_backup = h.rgd_offset << 9 if h.flags & L.VMDK4_FLAG_RGD else 0
        if fnode.total_size // SECTOR < h.grain_offset:
            raise VmdkError("File truncated, expecting at least %d bytes"
                            % (h.grain_offset * SECTOR))
        ext = self._add_extent(fnode, False, h.capacity, (h.gd_offset << 9)
                               & 0xFFFFFFFFFFFFFFFF, l1_backup, l1_size, h.num_gtes_per_gt,
                               h.granularity)
        ext.compressed = compressed
        if compressed:
            self.create_type = "streamOptimized"
        ext.has_marker = bool(h.flags & L.VMDK4_FLAG_MARKER)
        ext.version = h.version
        ext.has_zero_grain = bool(h.flags & L.VMDK4_FLAG_ZERO_GRAIN)
        try:
            self._init_tables(ext)
        except BaseException:
            self.extents.pop()
            raise

    def _read_footer(self, fnode) -> L.Vmdk4Header:
        """The footer (streamOptimized written by VMware) takes precedence over the header:
        footer marker, footer sector, end-of-stream marker at EOF - 1536."""
        end = fnode.total_size // SECTOR * SECTOR
        raw = self._pread_file(fnode, end - 1536, 1536) if end >= 1536 else bytes(1536)
        fm_val, fm_size, fm_type = struct.unpack_from("<QII", raw, 0)
        eos_val, eos_size, eos_type = struct.unpack_from("<QII", raw, 1024)
        if (raw[512:516] != L.VMDK4_MAGIC or fm_size != 0 or fm_type != L.MARKER_FOOTER
                or eos_val != 0 or eos_size != 0 or eos_type != L.MARKER_END_OF_STREAM):
            raise VmdkError("Invalid footer")
        return L.Vmdk4Header.unpack(raw, 516)

    def _add_extent(self, fnode, flat: bool, sectors: int, l1_offset: int, l1_backup: int,
                    l1_size: int, l2_size: int, cluster_sectors: int) -> Extent:
        """vmdk_add_extent()."""
        if cluster_sectors > 0x200000:
            raise VmdkError("Invalid granularity, image may be corrupt")
        if l1_size > 32 * 1024 * 1024:
            raise VmdkError("L1 size too big")
        nb_sectors = fnode.total_size // SECTOR
        ext = Extent(file=fnode, flat=flat, sectors=sectors, l1_table_offset=l1_offset,
                     l1_backup_table_offset=l1_backup, l1_size=l1_size,
                     l1_entry_sectors=l2_size * cluster_sectors, l2_size=l2_size,
                     cluster_sectors=sectors if flat else cluster_sectors)
        ext.next_cluster_sector = (-(-nb_sectors // cluster_sectors) * cluster_sectors
                                   if cluster_sectors else nb_sectors)
        prev = self.extents[-1].end_sector if self.extents else 0
        ext.end_sector = prev + sectors
        self.extents.append(ext)
        return ext

    def _init_tables(self, ext: Extent) -> None:
        """vmdk_init_tables(): load the grain directory (and its redundant copy)."""
        n = ext.l1_size * 4
        ext.l1_table = _le32_array(self._pread_file(ext.file, ext.l1_table_offset, n))
        if ext.l1_backup_table_offset:
            ext.l1_backup_table = _le32_array(
                self._pread_file(ext.file, ext.l1_backup_table_offset, n))

    def _open_desc_file(self, desc: str, options: dict) -> None:
        ct = L.parse_description(desc, "createType")
        if ct is None or len(ct) > 127:
            raise VmdkError("invalid VMDK image descriptor")
        if ct not in SUPPORTED_DESC_TYPES:
            raise NotSupported("Unsupported image type '%s'" % ct)
        self.create_type = ct
        self.desc_offset = 0
        self._parse_extents(desc, options)

    def _parse_extents(self, desc: str, options: dict) -> None:
        """vmdk_parse_extents()."""
        from ....graph.graph import abspath_like_qemu
        pos = 0
        while pos < len(desc):
            line_end = L.next_line(desc, pos)
            line = desc[pos:line_end]
            matches, access, sectors, etype, fname, flat_offset = L.scan_extent_line(line)
            start = pos
            pos = line_end
            if matches < 4 or access != "RW":
                continue
            if etype == "FLAT":
                if matches != 5 or flat_offset < 0:
                    self._invalid_line(desc, start, line_end)
            elif etype == "VMFS":
                if matches == 4:
                    flat_offset = 0
                else:
                    self._invalid_line(desc, start, line_end)
            elif matches != 4:
                self._invalid_line(desc, start, line_end)
            if sectors <= 0 or etype not in ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE",
                                             "SESPARSE"):
                continue
            path = abspath_like_qemu(self.file.filename(), fname)
            index = len(self.extents)
            role = ChildRole.DATA
            if etype not in ("FLAT", "VMFS"):
                role |= ChildRole.METADATA
            enode = self._open_extent_file(path, options, index, role)
            if etype in ("FLAT", "VMFS"):
                ext = self._add_extent(enode, True, sectors, 0, 0, 0, 0, 0)
                ext.flat_start_offset = flat_offset << 9
            elif etype in ("SPARSE", "VMFSSPARSE"):
                buf = self._read_desc(enode)
                self._open_sparse(enode, buf, options)
                ext = self.extents[-1]
            else:
                raise NotSupported("Unsupported extent type '%s'" % etype)
            ext.type = etype

    @staticmethod
    def _invalid_line(desc: str, start: int, end: int) -> None:
        if end > start and desc[end - 1] == "\n":
            end -= 1
        raise VmdkError("Invalid extent line: %s" % desc[start:end])

    def _open_extent_file(self, path: str, options: dict, index: int, role):
        graph = self.node.graph
        ref = options.get("extents.%d" % index)
        if ref is None:
            ref = (options.get("extents") or {}).get(str(index)) \
                if isinstance(options.get("extents"), dict) else None
        if isinstance(ref, str):
            enode = graph.lookup_node(ref, ref)
        else:
            opts = dict(ref) if isinstance(ref, dict) else {}
            opts.setdefault("driver", "file")
            opts.setdefault("filename", path)
            enode = graph.open_node(opts, inherit={"read-only": self.node.read_only,
                                                   "force-share": self.node.force_share,
                                                   "x-no-io": self.node.no_io})
            enode.monitor_owned = False
        graph.attach_child(self.node, enode, "extents.%d" % index, role)
        return enode

    def _close_extent_children(self) -> None:
        for c in list(self.node.children):
            if c.name.startswith("extents."):
                self.node.graph.detach_child(c)

    # ================================================================ geometry / info
    def get_length(self) -> int:
        return (self.extents[-1].end_sector if self.extents else 0) * SECTOR

    def request_alignment(self) -> int:
        return SECTOR

    def allocated_file_size(self):
        total = self.file.drv.allocated_file_size()
        if total is None:
            return None
        for e in self.extents:
            if e.file is not self.file:
                n = e.file.drv.allocated_file_size()
                if n is None:
                    return None
                total += n
        return total

    def has_zero_init(self) -> bool:
        """vmdk_has_zero_init(): yes unless a flat extent's storage is not zeroed."""
        for e in self.extents:
            if e.flat:
                if not e.file.drv.has_zero_init():
                    return False
        return True

    def get_info(self) -> dict | None:
        if not self.extents:
            return None          # QEMU asserts here; an extent-less image just has no info
        first = self.extents[0]
        for e in self.extents[1:]:
            if not (e.flat == first.flat and e.compressed == first.compressed
                    and (first.flat or e.cluster_sectors == first.cluster_sectors)):
                return None
        out = {"needs_compressed_writes": first.compressed}
        if not first.flat:
            out["cluster_size"] = first.cluster_sectors * SECTOR
        return out

    def info_specific(self) -> dict:
        extents = []
        for e in self.extents:
            d = {"filename": e.file.filename(), "format": e.type or "",
                 "virtual-size": e.sectors * SECTOR}
            if not e.flat:
                d["cluster-size"] = e.cluster_sectors * SECTOR
            if e.compressed:
                d["compressed"] = True
            extents.append(d)
        return {"type": "vmdk", "data": {"create-type": self.create_type or "",
                                         "cid": self.cid, "parent-cid": self.parent_cid,
                                         "extents": extents}}

    def backing_options(self) -> dict | None:
        if not self.backing_file:
            return None
        from ....graph.graph import abspath_like_qemu
        path = abspath_like_qemu(self.file.filename(), self.backing_file)
        return {"driver": "vmdk", "file": {"driver": "file", "filename": path}}

    def refresh_filename(self) -> str | None:
        return self.file.filename()

    # ================================================================ mapping
    def _find_extent(self, sector: int) -> Extent | None:
        for e in self.extents:
            if sector < e.end_sector:
                return e
        return None

    def _l2_table(self, ext: Extent, l2_offset: int) -> array:
        t = ext.l2_cache.get(l2_offset)
        if t is None:
            raw = self._pread_file(ext.file, l2_offset * SECTOR, ext.l2_size * 4)
            t = _le32_array(raw)
            if len(ext.l2_cache) >= L2_CACHE_SIZE:
                ext.l2_cache.pop(next(iter(ext.l2_cache)))
            ext.l2_cache[l2_offset] = t
        return t

    def _lookup(self, ext: Extent, offset: int):
        """get_cluster_offset() without allocation: (status, host byte offset, l1, l2)."""
        if ext.flat:
            return VMDK_OK, ext.flat_start_offset, 0, 0
        rel = offset - ext.start_sector * SECTOR
        l1_index = (rel >> 9) // ext.l1_entry_sectors
        if l1_index >= ext.l1_size:
            return VMDK_ERROR, 0, 0, 0
        l2_offset = ext.l1_table[l1_index]
        if not l2_offset:
            return VMDK_UNALLOC, 0, l1_index, 0
        l2_index = ((rel >> 9) // ext.cluster_sectors) % ext.l2_size
        entry = self._l2_table(ext, l2_offset)[l2_index]
        if ext.has_zero_grain and entry == L.VMDK_GTE_ZEROED:
            return VMDK_ZEROED, 0, l1_index, l2_index
        if not entry:
            return VMDK_UNALLOC, 0, l1_index, l2_index
        return VMDK_OK, entry * SECTOR, l1_index, l2_index

    @staticmethod
    def _offset_in_cluster(ext: Extent, offset: int) -> int:
        return (offset - ext.start_sector * SECTOR) % (ext.cluster_sectors * SECTOR)

    def _extent_at(self, offset: int) -> Extent:
        ext = self._find_extent(offset >> 9)
        if ext is None:
            raise IOFailure("Input/output error", errno=errno.EIO)
        return ext

    # ================================================================ reads
    def _cid_valid(self) -> bool:
        """vmdk_is_cid_valid(): the backing file's CID must be our parentCID."""
        if not self.cid_checked and self.node.backing is not None:
            pdrv = self.node.backing.drv
            if not isinstance(pdrv, VmdkDriver):
                return False
            if self.parent_cid != pdrv.current_cid():
                return False
        self.cid_checked = True
        return True

    def current_cid(self) -> int:
        desc = L.c_string(self._pread_file(self.file, self.desc_offset, L.DESC_SIZE))
        return L.read_cid(desc, False)

    def _read_backing(self, offset: int, view: memoryview) -> None:
        backing = self.node.backing
        n = len(view)
        avail = max(0, min(n, backing.total_size - offset))
        if avail:
            backing.preadv(offset, view[:avail])
        if avail < n:
            view[avail:] = bytes(n - avail)

    def preadv(self, offset: int, buf: memoryview) -> None:
        pos, total = 0, len(buf)
        while pos < total:
            off = offset + pos
            ext = self._extent_at(off)
            ret, host, _, _ = self._lookup(ext, off)
            oic = self._offset_in_cluster(ext, off)
            n = min(total - pos, ext.cluster_sectors * SECTOR - oic)
            view = buf[pos:pos + n]
            pend = self._pending
            if pend is not None and pend[0] is ext and pend[1] == off - oic:
                view[:] = pend[2][oic:oic + n]
                pos += n
                continue
            if ret == VMDK_ERROR:
                raise IOFailure("Invalid argument", errno=errno.EINVAL)
            if ret != VMDK_OK:
                if self.node.backing is not None and ret != VMDK_ZEROED:
                    if not self._cid_valid():
                        raise IOFailure("Invalid argument", errno=errno.EINVAL)
                    self._read_backing(off, view)
                else:
                    view[:] = bytes(n)
            elif ext.compressed:
                self._read_compressed(ext, host, oic, view)

            else:
                ext.file.preadv(host + oic, view)
            pos += n

    def _read_compressed(self, ext: Extent, host: int, oic: int, view: memoryview) -> None:
        cbytes = ext.cluster_sectors * SECTOR
        raw = self._pread_file(ext.file, host, 2 * cbytes)
        data, data_len = raw, cbytes
        if ext.has_marker:
            _, data_len = L.GRAIN_MARKER.unpack_from(raw, 0)
            data = raw[L.GRAIN_MARKER.size:]
        if not data_len or data_len > 2 * cbytes:
            raise IOFailure("Invalid argument", errno=errno.EINVAL)
        try:
            d = zlib.decompressobj()
            out = d.decompress(data[:data_len], cbytes)
            if not d.eof:
                raise zlib.error("truncated")
        except zlib.error:
            raise IOFailure("Invalid argument", errno=errno.EINVAL) from None
        if oic + len(view) > len(out):
            raise IOFailure("Invalid argument", errno=errno.EINVAL)
        view[:] = out[oic:oic + len(view)]

    # ================================================================ writes
    def _update_cid(self) -> None:
        """vmdk_write_cid() with a random CID, once per open, on the first write."""
        if self.cid_updated:
            return
        cid = random.getrandbits(32)
        raw = self._pread_file(self.file, self.desc_offset, L.DESC_SIZE)
        desc = L.c_string(raw)
        p = desc.find("parentCID")
        if p < 0:
            raise IOFailure("Invalid argument", errno=errno.EINVAL)
        tail = desc[p:]
        c = desc.find("CID")
        if c >= 0:
            desc = desc[:c + 4] + "%x\n" % cid + tail
        # QEMU edits the buffer it read in place: the new text and its NUL replace the
        # start, whatever followed the old text stays; whole sectors are written back
        new = desc.encode("latin-1")[:L.DESC_SIZE - 1] + b"\0"
        buf = bytearray(raw)
        buf[:len(new)] = new
        data = bytes(buf[:min(L.DESC_SIZE, -(-len(new) // SECTOR) * SECTOR)])
        self.file.pwrite(self.desc_offset, data)
        self.cid = cid
        self.cid_updated = True

    def _l2_update(self, ext: Extent, l1_index: int, l2_index: int, value: int) -> None:
        """vmdk_L2update(): the GT entry and its redundant copy."""
        entry = struct.pack("<I", value)
        l2_offset = ext.l1_table[l1_index]
        ext.file.pwrite(l2_offset * SECTOR + l2_index * 4, entry)
        if ext.l1_backup_table_offset:
            ext.file.pwrite(ext.l1_backup_table[l1_index] * SECTOR + l2_index * 4, entry)
        t = ext.l2_cache.get(l2_offset)
        if t is not None:
            t[l2_index] = value

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._write(offset, len(data), data, False)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._write(offset, length, None, True)
        self._write(offset, length, None, False)

    def _write(self, offset: int, length: int, data, dry_run: bool) -> None:
        zeroed = data is None
        if offset + length > self.get_length():
            raise IOFailure("Input/output error", errno=errno.EIO)
        deflated = {} if zeroed else self._deflate_ahead(offset, length, data)
        pos = 0
        while pos < length:
            off = offset + pos
            ext = self._extent_at(off)
            oic = self._offset_in_cluster(ext, off)
            cbytes = ext.cluster_sectors * SECTOR
            n = min(length - pos, cbytes - oic)
            ret, host, l1i, l2i = self._lookup(ext, off)
            if ret == VMDK_ERROR:
                raise IOFailure("Invalid argument", errno=errno.EINVAL)
            if zeroed:
                if ext.has_zero_grain and oic == 0 and n >= cbytes:
                    n = cbytes
                    if not dry_run and ret != VMDK_ZEROED:
                        if ret == VMDK_UNALLOC and not ext.l1_table[l1i]:
                            raise IOFailure("Input/output error", errno=errno.EIO)
                        self._update_cid()
                        self._l2_update(ext, l1i, l2i, L.VMDK_GTE_ZEROED)
                else:
                    raise NotSupported()
            else:
                piece = data[pos:pos + n]
                if ext.compressed:
                    if ret == VMDK_OK:
                        raise IOFailure("Could not write to allocated cluster for "
                                        "streamOptimized", errno=errno.EIO)
                    self._write_compressed(ext, off, oic, piece, l1i, l2i, ret,
                                           deflated.get(off))
                elif ret == VMDK_OK:
                    ext.file.pwrite(host + oic, piece)
                else:
                    self._allocate_and_write(ext, off, oic, piece, l1i, l2i, ret)
                self._update_cid()
            pos += n

    def _allocate_and_write(self, ext: Extent, off: int, oic: int, piece, l1i: int,
                            l2i: int, ret: int) -> None:
        """get_cluster_offset(allocate) + get_whole_cluster() + write + L2 update."""
        if not ext.l1_table[l1i]:
            # QEMU creates every grain table up front; one missing cannot be allocated
            raise IOFailure("Input/output error", errno=errno.EIO)
        if ext.next_cluster_sector >= VMDK_EXTENT_MAX_SECTORS:
            raise IOFailure("Invalid argument", errno=errno.EINVAL)
        cbytes = ext.cluster_sectors * SECTOR
        sector = ext.next_cluster_sector
        ext.next_cluster_sector += ext.cluster_sectors
        grain = bytearray(cbytes)
        cstart = off - oic
        if self.node.backing is not None and ret != VMDK_ZEROED:
            if not self._cid_valid():
                raise IOFailure("Invalid argument", errno=errno.EINVAL)
            self._read_backing(cstart, memoryview(grain))
        grain[oic:oic + len(piece)] = piece
        ext.file.pwrite(sector * SECTOR, bytes(grain))
        end = sector + ext.cluster_sectors
        ext.next_cluster_sector = max(ext.next_cluster_sector, end)
        self._l2_update(ext, l1i, l2i, sector)

    def _deflate_ahead(self, offset: int, length: int, data) -> dict[int, bytes]:
        """The deflated whole grains of a write into a streamOptimized extent, by guest
        offset (computed side-effect free, before any of them is written)."""
        ext = self._find_extent(offset >> 9)
        if ext is None or not ext.compressed:
            return {}
        cbytes = ext.cluster_sectors * SECTOR
        first = offset + (-self._offset_in_cluster(ext, offset)) % cbytes
        end = min(offset + length, ext.end_sector * SECTOR)
        starts = range(first, end - cbytes + 1, cbytes)
        if len(starts) < 2:
            return {}
        return dict(zip(starts, _deflate_all([data[s - offset:s - offset + cbytes]
                                              for s in starts])))

    def _write_compressed(self, ext: Extent, off: int, oic: int, piece, l1i: int,
                          l2i: int, ret: int = VMDK_UNALLOC,
                          deflated: bytes | None = None) -> None:
        """A grain of a streamOptimized extent.  QEMU takes only whole grains; blockengine
        also takes a grain in sequential pieces (what a converter skipping zero runs
        sends): the grain is assembled in memory and written compressed once its last
        byte arrives, another grain is written, or on flush/close."""
        if not ext.has_marker:
            raise IOFailure("Invalid argument", errno=errno.EINVAL)
        cstart = off - oic
        # the last grain of the extent may be short: QEMU deflates just its bytes
        glen = min(ext.cluster_sectors * SECTOR, ext.end_sector * SECTOR - cstart)
        pend = self._pending
        if pend is not None and pend[1] != cstart:
            self._flush_pending()
            pend = None
        if oic == 0 and len(piece) == glen:
            self._pending = None
            self._compress_grain(ext, off, piece, l1i, l2i, deflated)
            return
        if not ext.l1_table[l1i]:
            raise IOFailure("Input/output error", errno=errno.EIO)
        if pend is None:
            grain = bytearray(glen)
            if self.node.backing is not None and ret != VMDK_ZEROED:
                if not self._cid_valid():
                    raise IOFailure("Invalid argument", errno=errno.EINVAL)
                self._read_backing(cstart, memoryview(grain))
            pend = self._pending = (ext, cstart, grain, l1i, l2i)
        pend[2][oic:oic + len(piece)] = piece
        if oic + len(piece) == glen:
            self._flush_pending()

    def _flush_pending(self) -> None:
        pend, self._pending = self._pending, None
        if pend is not None:
            ext, cstart, grain, l1i, l2i = pend
            self._compress_grain(ext, cstart, grain, l1i, l2i)

    def _compress_grain(self, ext: Extent, off: int, piece, l1i: int, l2i: int,
                        deflated: bytes | None = None) -> None:
        """``deflated``: zlib.compress(piece) when already computed."""
        if not ext.l1_table[l1i]:
            raise IOFailure("Input/output error", errno=errno.EIO)
        sector = ext.next_cluster_sector
        comp = zlib.compress(piece) if deflated is None else deflated
        blob = L.GRAIN_MARKER.pack(off >> 9, len(comp)) + comp
        # QEMU allocates the grain first (a whole zeroed cluster), then writes the
        # marker and data over its start: the same bytes in one write
        cbytes = ext.cluster_sectors * SECTOR
        ext.file.pwrite(sector * SECTOR, blob + bytes(max(0, cbytes - len(blob))))
        ext.next_cluster_sector = -(-(sector * SECTOR + len(blob)) // SECTOR)
        self._stream_written = True
        self._l2_update(ext, l1i, l2i, sector)

    def pwritev_compressed(self, offset: int, data) -> None:
        """vmdk_co_pwritev_compressed(): an empty write marks the end of the stream
        (every extent file is padded to a whole sector)."""
        if len(data) == 0:
            for e in self.extents:
                size = e.file.drv.get_length()
                if size % SECTOR:
                    e.file.truncate(size + SECTOR - size % SECTOR)
            return
        self.pwritev(offset, memoryview(data))

    def flush(self) -> None:
        self._flush_pending()
        for e in self.extents:
            if e.file is not self.file:
                e.file.flush()

    # ================================================================ status / check
    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        ext = self._extent_at(offset)
        ret, host, _, _ = self._lookup(ext, offset)
        oic = self._offset_in_cluster(ext, offset)
        n = min(ext.cluster_sectors * SECTOR - oic, length)
        pend = self._pending
        if pend is not None and pend[0] is ext and pend[1] == offset - oic:
            return Status(BLOCK_DATA, n, 0, ext.file)
        if ret == VMDK_ERROR:
            raise IOFailure("Input/output error", errno=errno.EIO)
        if ret == VMDK_UNALLOC:
            return Status(0, n)
        if ret == VMDK_ZEROED:
            return Status(BLOCK_ZERO, n)
        if ext.compressed:
            return Status(BLOCK_DATA, n, 0, ext.file)
        flags = BLOCK_DATA | BLOCK_OFFSET_VALID
        if ext.flat:
            flags |= BLOCK_RECURSE
        return Status(flags, n, host + oic, ext.file)

    def check(self, fix=None) -> dict:
        """vmdk_co_check(): every grain must lie inside its extent file."""
        if fix:
            raise NotSupported()
        import sys
        total = self.get_length() // SECTOR
        sector = 0
        ext = None
        while sector < total:
            ext = self._find_extent(sector)
            if ext is None:
                sys.stderr.write("ERROR: could not find extent for sector %d\n" % sector)
                raise BlockError("Invalid argument", errno=errno.EINVAL)
            ret, host, _, _ = self._lookup(ext, sector * SECTOR)
            if ret == VMDK_ERROR:
                sys.stderr.write("ERROR: could not get cluster_offset for sector %d\n"
                                 % sector)
                raise BlockError("Operation not permitted", errno=errno.EPERM)
            if ret == VMDK_OK and host >= ext.file.total_size:
                sys.stderr.write("ERROR: cluster offset for sector %d points after EOF\n"
                                 % sector)
                raise BlockError("Invalid argument", errno=errno.EINVAL)
            sector += ext.cluster_sectors
        return {}

    def close(self) -> None:
        # QEMU pads streamOptimized files to a whole sector when qemu-img convert
        # signals the end of the stream; blockengine's convert does not signal it, so
        # a stream written during this open is padded on close instead
        if self._pending is not None and not self.node.read_only:
            try:
                self._flush_pending()
            except BlockError:
                pass
        if getattr(self, "_stream_written", False) and not self.node.read_only:
            try:
                self.pwritev_compressed(0, b"")
            except BlockError:
                pass
        self.extents = []

    # ================================================================ creation
    @classmethod
    def create(cls, filename: str, size: int, opts: dict, secrets: dict | None = None
               ) -> None:
        from .create import create
        create(filename, size, opts)

