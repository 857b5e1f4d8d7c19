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
from typing import Callable

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




U32 = 0xFFFFFFFF


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
    # QEMU's uint32_t grains, gt_size, gt_count, gd_sectors (and their products) wrap:
    # an image of 2^45 bytes or more gets a truncated directory, as qemu-img makes it
    grains = (-(-(size // SECTOR) // h.granularity)) & U32
    gt_size = -(-(h.num_gtes_per_gt * 4) // SECTOR)
    gt_count = ((grains + h.num_gtes_per_gt - 1) & U32) // h.num_gtes_per_gt
    gd_sectors = -(-(gt_count * 4) // SECTOR) & U32
    gt_sectors = (gt_size * gt_count) & U32
    h.desc_offset = 1
    h.desc_size = 20
    h.rgd_offset = h.desc_offset + h.desc_size
    h.gd_offset = h.rgd_offset + gd_sectors + gt_sectors
    end = h.gd_offset + gd_sectors + gt_sectors
    h.grain_offset = -(-end // h.granularity) * h.granularity
    gd_bytes = gd_sectors * SECTOR
    rgd = bytearray(gd_bytes)
    gd = bytearray(gd_bytes)
    for i in range(gt_count):
        struct.pack_into("<I", rgd, i * 4, (h.rgd_offset + gd_sectors + i * gt_size) & U32)
        struct.pack_into("<I", gd, i * 4, (h.gd_offset + gd_sectors + i * gt_size) & U32)
    return h, bytes(rgd), bytes(gd)


def init_extent(node, size: int, flat: bool, compress: bool, zeroed_grain: bool) -> None:
    """vmdk_init_extent(): lay out one extent of ``size`` bytes on an open node (a
    flat extent is only sized)."""
    if flat:
        node.truncate(size)
        return
    h, rgd, gd = sparse_extent_layout(size, compress, zeroed_grain)
    node.pwrite(0, h.pack())
    node.truncate(h.grain_offset * SECTOR)
    node.pwrite(h.rgd_offset * SECTOR, rgd)
    node.pwrite(h.gd_offset * SECTOR, gd)


def _decompose(filename: str):
    """filename_decompose(): directory (with '/'), prefix and '.ext' postfix."""
    slash = filename.rfind("/")
    path, base = filename[:slash + 1], filename[slash + 1:]
    dot = base.rfind(".")
    if dot < 0:
        return path, base, ""
    return path, base[:dot], base[dot:]


def _parent_cid(image_filename: str, backing_file: str) -> int:
    """The CID of the backing file (opened relative to the image, without its backing)."""
    from ....graph.graph import Graph, abspath_like_qemu
    from .driver import VmdkDriver
    full = abspath_like_qemu(image_filename, backing_file)
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
        return node.drv.cid
    finally:
        graph.close_all()


ExtentFn = Callable[[int, int, bool, bool], object]
"""extent_fn(size, idx, flat, split): the open node of extent ``idx`` (0: the
descriptor file), laid out with init_extent() unless ``size`` is -1; None for an
``idx`` that has no node when ``size`` is -1 (the check for unused extents)."""


def do_create(size: int, fmt: str, adapter: str, backing_file: str | None,
              hw_version: str | None, toolsversion: str | None, compat6: bool,
              zeroed_grain: bool, extent_fn: ExtentFn) -> None:
    """vmdk_co_do_create(): the descriptor file and extents of a ``fmt`` image, with
    the nodes ``extent_fn`` gives."""
    if compat6:
        if hw_version:
            raise InvalidArgument("compat6 cannot be enabled with hwversion set")
        hw_version = "6"
    hw_version = hw_version or "4"
    toolsversion = toolsversion or "2147483647"
    heads = 16 if adapter == "ide" else 255
    flat = fmt in ("monolithicFlat", "twoGbMaxExtentFlat")
    split = fmt in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    if flat and backing_file:
        raise InvalidArgument("Flat image can't have backing file")
    if flat and zeroed_grain:
        raise InvalidArgument("Flat image can't enable zeroed grain")
    line_fmt = 'RW %d FLAT "%s" 0\n' if flat else 'RW %d SPARSE "%s"\n'

    def extent_line(extent_size: int, node) -> str:
        return line_fmt % (-(-extent_size // SECTOR), os.path.basename(node.filename()))

    extent_size = SPLIT_EXTENT_SIZE if split else size
    created = extent_size if not split and not flat else 0
    desc_node = extent_fn(created, 0, flat, split)
    ext_lines = []
    if not split and not flat:
        ext_lines.append(extent_line(created, desc_node))
    parent_cid, parent_line = 0xFFFFFFFF, ""
    if backing_file:
        parent_cid = _parent_cid(desc_node.filename(), backing_file)
        parent_line = 'parentFileNameHint="%s"' % backing_file
    idx = 1
    while created < size:
        n = min(size - created, extent_size)
        ext_lines.append(extent_line(n, extent_fn(n, idx, flat, split)))
        created += n
        idx += 1
    if extent_fn(-1, idx, flat, split) is not None:
        raise InvalidArgument("List of extents contains unused extents")
    desc = DESC_TEMPLATE % (random.getrandbits(32), parent_cid, fmt, parent_line,
                            "".join(ext_lines), hw_version, size // (63 * heads * SECTOR),
                            heads, adapter, toolsversion)
    data = desc.encode()
    if split or flat:
        desc_node.pwrite(0, data)
        desc_node.truncate(len(data))     # no padding after a descriptor file's text
    else:
        desc_node.pwrite(SECTOR, data)


def create(filename: str, size: int, opts: dict) -> None:
    """vmdk_co_create_opts(): the QemuOpts checks, then do_create() on new files named
    after ``filename``."""
    from ...protocol.file import FileDriver
    from ....graph.graph import Graph

    opts = {k: v for k, v in (opts or {}).items() if v is not None}
    adapter = opts.get("adapter_type", "ide")
    backing_fmt = opts.get("backing_fmt")
    hw_version = opts.get("hwversion")
    if hw_version == "undefined":
        hw_version = None
    fmt = opts.get("subformat") or "monolithicSparse"
    if backing_fmt and backing_fmt != "vmdk":
        raise InvalidArgument("backing_file must be a vmdk image")
    if adapter not in ADAPTERS:
        raise InvalidArgument("invalid parameter value: %s" % adapter)
    if fmt not in SUBFORMATS:
        raise InvalidArgument("invalid parameter value: %s" % fmt)
    path, prefix, postfix = _decompose(filename)
    graph = Graph()

    def new_extent(extent_size: int, idx: int, flat: bool, split: bool):
        # vmdk_co_create_opts_cb(): files named after the image, made on demand
        if extent_size == -1:
            return None
        if idx == 0:
            name = filename
        elif split:
            name = path + "%s-%c%03d%s" % (prefix, "f" if flat else "s", idx, postfix)
        else:
            name = path + "%s-flat%s" % (prefix, postfix)
        FileDriver.create(name, 0, {})
        node = graph.open_node({"driver": "file", "filename": name})
        init_extent(node, extent_size, flat, fmt == "streamOptimized",
                    bool_option(opts.get("zeroed_grain"), "zeroed_grain"))
        return node

    try:
        do_create(-(-int(size) // SECTOR) * SECTOR, fmt, adapter, opts.get("backing_file"),
                  hw_version, opts.get("toolsversion"),
                  bool_option(opts.get("compat6"), "compat6"),
                  bool_option(opts.get("zeroed_grain"), "zeroed_grain"), new_extent)
    finally:
        graph.close_all()
