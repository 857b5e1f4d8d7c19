"""VMDK image creation (QEMU 7.2's vmdk_co_do_create / vmdk_init_extent), laid out byte
for byte as qemu-img does, except the random CID.

Sparse extents: header in sector 0, descriptor area sectors 1-20 (monolithic only),
redundant grain directory at sector 21 followed by its grain tables, then the grain
directory and its grain tables, grains from the next 64 KiB boundary.  Flat extents are
sparse files of the extent's size.  Split subformats use 2 GiB extents named
"<prefix>-s001<ext>" / "<prefix>-f001<ext>"; monolithicFlat uses "<prefix>-flat<ext>".
"""
from __future__ import annotations

import os
import random
import struct

from ....errors import BlockError, InvalidArgument
from . import layout as L
from .layout import SECTOR
from ...base import bool_option

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTERS = ("ide", "buslogic", "lsilogic", "legacyESX")
SPLIT_EXTENT_SIZE = 2 << 30

DESC_TEMPLATE = (
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID=%x\n"
    "parentCID=%x\n"
    "createType=\"%s\"\n"
    "%s"
    "\n"
    "# Extent description\n"
    "%s"
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    "\n"
    "ddb.virtualHWVersion = \"%s\"\n"
    "ddb.geometry.cylinders = \"%d\"\n"
    "ddb.geometry.heads = \"%d\"\n"
    "ddb.geometry.sectors = \"63\"\n"
    "ddb.adapterType = \"%s\"\n"
    "ddb.toolsVersion = \"%s\"\n")




def sparse_extent_layout(size: int, compress: bool, zeroed_grain: bool):
    """vmdk_init_extent()'s header and its two grain directories."""
    h = L.Vmdk4Header()
    h.version = 3 if compress else 2 if zeroed_grain else 1
    h.flags = (L.VMDK4_FLAG_RGD | L.VMDK4_FLAG_NL_DETECT
               | (L.VMDK4_FLAG_COMPRESS | L.VMDK4_FLAG_MARKER if compress else 0)
               | (L.VMDK4_FLAG_ZERO_GRAIN if zeroed_grain else 0))
    h.compress_algorithm = L.VMDK4_COMPRESSION_DEFLATE if compress else 0
    h.capacity = size // SECTOR
    h.granularity = 128
    h.num_gtes_per_gt = SECTOR
    grains = -(-(size // SECTOR) // h.granularity)
    gt_size = -(-(h.num_gtes_per_gt * 4) // SECTOR)
    gt_count = -(-grains // h.num_gtes_per_gt)
    gd_sectors = -(-(gt_count * 4) // SECTOR)
    h.desc_offset = 1
    h.desc_size = 20
    h.rgd_offset = h.desc_offset + h.desc_size
    h.gd_offset = h.rgd_offset + gd_sectors + gt_size * gt_count
    end = h.gd_offset + gd_sectors + gt_size * gt_count
    h.grain_offset = -(-end // h.granularity) * h.granularity
    gd_bytes = gd_sectors * SECTOR
    rgd = bytearray(gd_bytes)
    gd = bytearray(gd_bytes)
    for i in range(gt_count):
        struct.pack_into("<I", rgd, i * 4, h.rgd_offset + gd_sectors + i * gt_size)
        struct.pack_into("<I", gd, i * 4, h.gd_offset + gd_sectors + i * gt_size)
    return h, bytes(rgd), bytes(gd)


def _create_extent(path: str, size: int, flat: bool, compress: bool, zeroed_grain: bool):
    """vmdk_create_extent(): a fresh file laid out as one extent."""
    from ...protocol.file import FileDriver
    FileDriver.create(path, 0, {})
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if flat:
            os.ftruncate(fd, size)
            return
        h, rgd, gd = sparse_extent_layout(size, compress, zeroed_grain)
        os.pwrite(fd, h.pack(), 0)
        os.ftruncate(fd, h.grain_offset * SECTOR)
        os.pwrite(fd, rgd, h.rgd_offset * SECTOR)
        os.pwrite(fd, gd, h.gd_offset * SECTOR)
    except OSError as e:
        raise BlockError("Could not write to '%s': %s" % (path, e.strerror),
                         errno=e.errno) from e
    finally:
        os.close(fd)


def _decompose(filename: str):
    """filename_decompose(): directory (with '/'), prefix and '.ext' postfix."""
    slash = filename.rfind("/")
    path, base = filename[:slash + 1], filename[slash + 1:]
    dot = base.rfind(".")
    if dot < 0:
        return path, base, ""
    return path, base[:dot], base[dot:]


def create(filename: str, size: int, opts: dict) -> None:
    from ....graph.graph import Graph, abspath_like_qemu

    opts = {k: v for k, v in (opts or {}).items() if v is not None}
    adapter = opts.get("adapter_type", "ide")
    backing_file = opts.get("backing_file")
    backing_fmt = opts.get("backing_fmt")
    compat6 = bool_option(opts.get("compat6"), "compat6")
    hw_version = opts.get("hwversion")
    if hw_version == "undefined":
        hw_version = None
    toolsver = opts.get("toolsversion") or "2147483647"
    fmt = opts.get("subformat") or "monolithicSparse"
    zeroed_grain = bool_option(opts.get("zeroed_grain"), "zeroed_grain")

    if backing_fmt and backing_fmt != "vmdk":
        raise InvalidArgument("backing_file must be a vmdk image")
    if compat6:
        if hw_version:
            raise InvalidArgument("compat6 cannot be enabled with hwversion set")
        hw_version = "6"
    hw_version = hw_version or "4"
    if adapter not in ADAPTERS:
        raise InvalidArgument("invalid parameter value: %s" % adapter)
    heads = 16 if adapter == "ide" else 255
    if fmt not in SUBFORMATS:
        raise InvalidArgument("invalid parameter value: %s" % fmt)
    flat = fmt in ("monolithicFlat", "twoGbMaxExtentFlat")
    split = fmt in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    compress = fmt == "streamOptimized"
    if flat and backing_file:
        raise InvalidArgument("Flat image can't have backing file")
    if flat and zeroed_grain:
        raise InvalidArgument("Flat image can't enable zeroed grain")
    size = -(-int(size) // SECTOR) * SECTOR

    parent_cid = 0xFFFFFFFF
    parent_line = ""
    if backing_file:
        from .driver import VmdkDriver
        full = abspath_like_qemu(filename, backing_file)
        graph = Graph()
        try:
            try:
                node = graph.open_image(full, None, read_only=True, force_share=True,
                                        options={"backing": None})
            except BlockError as e:
                raise BlockError("Could not open '%s': %s" % (full, e), errno=e.errno) from e
            if not isinstance(node.drv, VmdkDriver):
                raise InvalidArgument("Invalid backing file format: %s. Must be vmdk."
                                      % node.driver_name)
            parent_cid = node.drv.cid
        finally:
            graph.close_all()
        parent_line = 'parentFileNameHint="%s"' % backing_file

    path, prefix, postfix = _decompose(filename)
    ext_lines = []
    if flat or split:
        remaining, idx = size, 1
        while True:
            n = min(remaining, SPLIT_EXTENT_SIZE) if split else remaining
            if split:
                name = "%s-%c%03d%s" % (prefix, "f" if flat else "s", idx, postfix)
            else:
                name = "%s-flat%s" % (prefix, postfix)
            _create_extent(path + name, n, flat, compress, zeroed_grain)
            if flat:
                ext_lines.append('RW %d FLAT "%s" 0\n' % (n // SECTOR, name))
            else:
                ext_lines.append('RW %d SPARSE "%s"\n' % (n // SECTOR, name))
            remaining -= n
            idx += 1
            if remaining <= 0:
                break
    else:
        _create_extent(filename, size, False, compress, zeroed_grain)
        ext_lines.append('RW %d SPARSE "%s"\n' % (size // SECTOR, prefix + postfix))

    desc = DESC_TEMPLATE % (random.getrandbits(32), parent_cid, fmt, parent_line,
                            "".join(ext_lines), hw_version, size // (63 * heads * SECTOR),
                            heads, adapter, toolsver)
    data = desc.encode()
    try:
        if flat or split:
            with open(filename, "wb") as f:
                f.write(data)
        else:
            fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data, SECTOR)
            finally:
                os.close(fd)
    except OSError as e:
        raise BlockError("Could not write description: %s" % e.strerror,
                         errno=e.errno) from e
