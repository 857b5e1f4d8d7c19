"""The VMDK driver on its own: descriptor scanning, create layouts, reads and writes of
every subformat, zeroed grains, streamOptimized rules, backing files, VMDK3 (COWD)
sparse extents, and damaged images giving one-line BlockErrors."""
from __future__ import annotations

import os
import struct
import zlib

import pytest

from blockengine.drivers.base import BLOCK_DATA, BLOCK_ZERO
from blockengine.drivers.format.vmdk import VmdkDriver
from blockengine.drivers.format.vmdk import layout as L
from blockengine.drivers.format.vmdk.create import sparse_extent_layout
from blockengine.errors import BlockError, InvalidArgument, NotSupported
from blockengine.graph.graph import Graph

MiB = 1 << 20
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")


def _open(path, read_only=False, backing=True):
    g = Graph()
    opts = {"driver": "vmdk", "file": {"driver": "file", "filename": str(path)}}
    if not backing:
        opts["backing"] = None
    return g, g.open_node(opts, read_only=read_only)


def test_scan_extent_line_like_sscanf():
    assert L.scan_extent_line('RW 2048 FLAT "a b.vmdk" 10\n') == (5, "RW", 2048, "FLAT",
                                                                  "a b.vmdk", 10)
    assert L.scan_extent_line('RW 100 ZERO\n')[0] == 3
    assert L.scan_extent_line('RDONLY 4 SPARSE "x"')[:4] == (4, "RDONLY", 4, "SPARSE")
    assert L.scan_extent_line("# comment")[0] == 1


def test_descriptor_helpers():
    d = 'version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n' \
        'parentFileNameHint="base.vmdk"\n'
    assert L.read_cid(d, False) == 0xFFFFFFFE and L.read_cid(d, True) == 0xFFFFFFFF
    assert L.parse_description(d, "createType") == "vmfs"
    assert L.parent_file_name_hint(d) == "base.vmdk"
    assert L.read_cid("nothing", False) is None


def test_sparse_layout_matches_qemu():
    h, rgd, gd = sparse_extent_layout(10 * MiB, False, False)
    assert (h.capacity, h.granularity, h.num_gtes_per_gt) == (20480, 128, 512)
    assert (h.rgd_offset, h.gd_offset, h.grain_offset) == (21, 26, 128)
    assert struct.unpack_from("<I", rgd)[0] == 22 and struct.unpack_from("<I", gd)[0] == 27
    assert h.pack()[:4] == b"KDMV" and len(h.pack()) == 4 + 75


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_create_write_read(tmp_path, sub):
    p = tmp_path / "x.vmdk"
    VmdkDriver.create(str(p), 3 * MiB, {"subformat": sub})
    data = os.urandom(MiB)
    g, node = _open(p)
    try:
        assert node.total_size == 3 * MiB
        node.pwrite(0, data)                    # whole grains (streamOptimized too)
        if sub != "streamOptimized":
            node.pwrite(2 * MiB + 1000, b"xyz")  # partial grain: allocation + zero fill
        assert node.pread(0, MiB) == data
        info = node.drv.info_specific()["data"]
        assert info["create-type"] == sub
    finally:
        g.close_all()
    g, node = _open(p, read_only=True)
    assert node.pread(0, MiB) == data
    if sub != "streamOptimized":
        assert node.pread(2 * MiB, 2048) == bytes(1000) + b"xyz" + bytes(1045)
    assert node.pread(MiB, MiB) == bytes(MiB)
    g.close_all()


def test_stream_optimized_rules(tmp_path):
    p = tmp_path / "s.vmdk"
    VmdkDriver.create(str(p), MiB, {"subformat": "streamOptimized"})
    g, node = _open(p)
    try:
        node.pwrite(0, b"b" * 65536)             # a whole grain: compressed at once
        with pytest.raises(BlockError, match="allocated cluster for streamOptimized"):
            node.pwrite(0, b"c" * 65536)
        st = node.block_status(0, MiB)
        assert st.flags & (BLOCK_DATA | 0x04) == BLOCK_DATA and st.length == 65536
        # sequential pieces of one grain are assembled, readable meanwhile
        node.pwrite(65536 + 4096, b"d" * 4096)
        assert node.pread(65536, 12288) == bytes(4096) + b"d" * 4096 + bytes(4096)
        node.pwrite(3 * 65536, b"e" * 512)       # another grain: the first is written
        with pytest.raises(BlockError, match="allocated cluster"):
            node.pwrite(65536, b"x" * 512)
    finally:
        g.close_all()
    raw = open(p, "rb").read()
    lba, size = L.GRAIN_MARKER.unpack_from(raw, 65536)
    assert lba == 0 and zlib.decompress(raw[65548:65548 + size]) == b"b" * 65536
    assert len(raw) % 512 == 0
    g, node = _open(p, read_only=True)
    assert node.pread(65536 + 4096, 4096) == b"d" * 4096
    assert node.pread(3 * 65536, 1024) == b"e" * 512 + bytes(512)
    g.close_all()


def test_zeroed_grain(tmp_path):
    p = tmp_path / "z.vmdk"
    VmdkDriver.create(str(p), 2 * MiB, {"zeroed_grain": True})
    g, node = _open(p)
    try:
        node.pwrite(0, b"\1" * 131072)
        node.pwrite_zeroes(0, 65536)
        assert node.block_status(0, MiB).flags & (BLOCK_ZERO | BLOCK_DATA) == BLOCK_ZERO
        assert node.pread(0, 131072) == bytes(65536) + b"\1" * 65536
    finally:
        g.close_all()


def test_backing_chain_and_cow(tmp_path):
    base = tmp_path / "base.vmdk"
    VmdkDriver.create(str(base), MiB, {})
    g, node = _open(base)
    node.pwrite(0, b"B" * MiB)
    g.close_all()
    top = tmp_path / "top.vmdk"
    VmdkDriver.create(str(top), MiB, {"backing_file": "base.vmdk", "backing_fmt": "vmdk"})
    g, node = _open(top)
    try:
        assert node.drv.backing_file == "base.vmdk" and node.backing is not None
        node.pwrite(4096, b"T" * 512)       # COW: the rest of the grain from the backing
        assert node.pread(0, 8192) == b"B" * 4096 + b"T" * 512 + b"B" * 3584
    finally:
        g.close_all()
    # a stale parent CID makes backing reads fail, as in QEMU
    g, node = _open(base)
    node.pwrite(0, b"C" * 512)              # new CID for base
    g.close_all()
    g, node = _open(top, read_only=True)
    with pytest.raises(BlockError):
        node.pread(128 * 1024, 512)
    g.close_all()


def test_create_errors(tmp_path):
    p = str(tmp_path / "e.vmdk")
    for opts, msg in (({"adapter_type": "scsi"}, "invalid parameter value: scsi"),
                      ({"subformat": "x"}, "invalid parameter value: x"),
                      ({"compat6": True, "hwversion": "7"}, "compat6 cannot be enabled"),
                      ({"subformat": "monolithicFlat", "zeroed_grain": True},
                       "Flat image can't enable zeroed grain"),
                      ({"subformat": "monolithicFlat", "backing_file": "b.vmdk"},
                       "Flat image can't have backing file")):
        with pytest.raises(InvalidArgument, match=msg):
            VmdkDriver.create(p, MiB, opts)


def test_vmdk3_cowd_extent(tmp_path):
    """A VMFSSPARSE (COWD) extent named by a vmfsSparse descriptor."""
    gran, nsect = 8, 2048                       # 4 KiB grains, 1 MiB disk
    l1 = bytearray(4 * 1)
    struct.pack_into("<I", l1, 0, 8)            # GT at sector 8 (4096 entries)
    gt = bytearray(4096 * 4)
    struct.pack_into("<I", gt, 4, 80)           # grain 1 at sector 80
    hdr = b"COWD" + struct.pack("<10I", 1, 3, nsect, gran, 4, 1, 0, 0, 0, 0)
    img = bytearray(80 * 512 + 4096)
    img[:len(hdr)] = hdr
    img[4 * 512:4 * 512 + 4] = l1
    img[8 * 512:8 * 512 + len(gt)] = gt
    img[80 * 512:80 * 512 + 4096] = b"G" * 4096
    (tmp_path / "d-delta.vmdk").write_bytes(bytes(img))
    (tmp_path / "d.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
        'createType="vmfsSparse"\n\nRW 2048 VMFSSPARSE "d-delta.vmdk"\n')
    g, node = _open(tmp_path / "d.vmdk", read_only=True)
    try:
        assert node.total_size == MiB
        assert node.pread(0, 12288) == bytes(4096) + b"G" * 4096 + bytes(4096)
        info = node.drv.info_specific()["data"]
        assert info["extents"][0]["format"] == "VMFSSPARSE"
        assert info["extents"][0]["cluster-size"] == 4096
    finally:
        g.close_all()


def _mut(raw, off, data):
    b = bytearray(raw)
    b[off:off + len(data)] = data
    return bytes(b)


def test_damaged_images(tmp_path):
    sp = tmp_path / "sp.vmdk"
    VmdkDriver.create(str(sp), MiB, {})
    raw = sp.read_bytes()
    cases = [
        (_mut(raw, 4, struct.pack("<I", 4)), "Unsupported VMDK version 4"),
        (_mut(raw, 44, struct.pack("<I", 1024)), "L2 table size too big"),
        (_mut(raw, 44, struct.pack("<I", 0)), "L1 entry size is invalid"),
        (_mut(raw, 20, struct.pack("<Q", 0x400000)),
         "Invalid granularity, image may be corrupt"),
        (_mut(raw, 64, struct.pack("<Q", 1 << 20)),
         "File truncated, expecting at least 536870912 bytes"),
        (_mut(raw, 56, struct.pack("<Q", (1 << 64) - 1)), "Invalid footer"),
        (b"KD", "invalid VMDK image descriptor"),
        (b'# Disk DescriptorFile\ncreateType="fooBar"\n', "Unsupported image type 'fooBar'"),
        (b'createType="monolithicFlat"\nRW 10 FLAT "x.raw"\n',
         'Invalid extent line: RW 10 FLAT "x.raw"'),
        (_mut(raw, 512, b"# Disk DescriptorFile\n" + bytes(300)), "Invalid argument"),
    ]
    for i, (data, msg) in enumerate(cases):
        p = tmp_path / ("bad%d.vmdk" % i)
        p.write_bytes(data)
        with pytest.raises(BlockError) as ei:
            _open(p, read_only=True)
        assert msg in str(ei.value) and "\n" not in str(ei.value)
    p = tmp_path / "v3.vmdk"
    p.write_bytes(_mut(raw, 4, struct.pack("<I", 3)))
    with pytest.raises(BlockError, match="VMDK version 3 must be read only"):
        _open(p)
    g, node = _open(p, read_only=True)
    g.close_all()
    # a grain table pointing past EOF: check reports it, reads fail cleanly
    p = tmp_path / "gt.vmdk"
    p.write_bytes(_mut(raw, 27 * 512, struct.pack("<I", 0xFFFFFF)))
    g, node = _open(p, read_only=True)
    with pytest.raises(BlockError, match="Invalid argument"):
        node.drv.check()
    with pytest.raises(NotSupported):
        node.drv.check(fix=1)
    g.close_all()
