"""A corpus of damaged qcow2 images, made by editing valid images with struct.

Each case is ``name -> (base, mutate)``: ``base`` names a valid image recipe (made
by ``make_base`` with qemu-img/qemu-io or blockengine's own CLI), ``mutate(path)``
edits the file in place.  Both qemu-img and blockengine then check copies of the
same bytes, so the outputs compare byte for byte.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from tests.tooling import copy_sparse

ROOT = Path(__file__).resolve().parent.parent.parent

HDR = struct.Struct(">IIQIIQIIQQIIQ")


@dataclass
class Layout:
    cluster_size: int
    l1_offset: int
    l1_size: int
    reftable_offset: int
    reftable_clusters: int
    refcount_order: int
    nb_snapshots: int
    snapshots_offset: int
    file_size: int

    def l1(self, f) -> list[int]:
        f.seek(self.l1_offset)
        return list(struct.unpack(">%dQ" % self.l1_size, f.read(8 * self.l1_size)))

    def reftable(self, f) -> list[int]:
        n = self.reftable_clusters * self.cluster_size // 8
        f.seek(self.reftable_offset)
        return list(struct.unpack(">%dQ" % n, f.read(8 * n)))


def layout(path) -> Layout:
    with open(path, "rb") as f:
        raw = f.read(112)
    (magic, version, bfo, bfs, cb, size, crypt, l1_size, l1_off, rt_off, rt_cl, nb_sn,
     sn_off) = HDR.unpack_from(raw)
    order = struct.unpack_from(">I", raw, 96)[0] if version >= 3 else 4
    return Layout(1 << cb, l1_off, l1_size, rt_off, rt_cl, order, nb_sn, sn_off,
                  os.path.getsize(path))


def put64(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def put32(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">I", value))


def get64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def l2_offset(path, l1_index: int = 0) -> int:
    lay = layout(path)
    return get64(path, lay.l1_offset + 8 * l1_index) & 0x00FFFFFFFFFFFE00


def l2_entry_pos(path, l1_index: int, l2_index: int) -> int:
    return l2_offset(path, l1_index) + 8 * l2_index


def refcount_pos(path, cluster: int) -> tuple[int, int]:
    """(file offset, byte width) of the 16-bit refcount of cluster (refcount_order 4)."""
    lay = layout(path)
    per_block = lay.cluster_size * 8 // (1 << lay.refcount_order)
    rt = get64(path, lay.reftable_offset + 8 * (cluster // per_block))
    assert lay.refcount_order == 4
    return (rt & ~0x1FF) + 2 * (cluster % per_block), 2


def set_refcount(path, cluster: int, value: int) -> None:
    pos, _ = refcount_pos(path, cluster)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(">H", value))


def get_refcount(path, cluster: int) -> int:
    pos, _ = refcount_pos(path, cluster)
    with open(path, "rb") as f:
        f.seek(pos)
        return struct.unpack(">H", f.read(2))[0]


# ---- base images ------------------------------------------------------------------------
# (create options, size, qemu-io commands)
BASES = {
    "plain": ("", "16M", ["write -P 0x11 0 128k", "write -P 0x22 1M 64k",
                          "write -P 0x33 8M 64k", "write -z 4M 64k"]),
    "small": ("cluster_size=4096", "4M", ["write -P 0x11 0 16k", "write -P 0x22 1M 4k",
                                          "write -P 0x33 3M 8k"]),
    "lazy": ("lazy_refcounts=on", "16M", ["write -P 0x44 0 64k", "write -P 0x55 2M 64k"]),
    "compressed": ("", "16M", ["write -c -P 0x66 0 64k", "write -P 0x77 64k 64k"]),
    "v2": ("compat=0.10", "16M", ["write -P 0x11 0 64k", "write -P 0x22 3M 64k"]),
    # ("snapshot", name) steps run `img snapshot -c name` between the writes
    "snapshots": ("cluster_size=4096", "4M", [
        "write -P 0x11 0 16k", "write -P 0x22 1M 8k", ("snapshot", "s1"),
        "write -P 0x33 0 4k", "write -P 0x44 2M 4k", ("snapshot", "s2"),
        "write -P 0x55 4k 4k"]),
}


def make_base(path, name: str, qemu_img: str = "qemu-img", qemu_io: str = "qemu-io") -> None:
    """Create base image ``name`` at path with the given tools (argv[0] strings or lists)."""
    opts, size, cmds = BASES[name]
    img = qemu_img if isinstance(qemu_img, list) else [qemu_img]
    io = qemu_io if isinstance(qemu_io, list) else [qemu_io]
    subprocess.run(img + ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
                   + [str(path), size], check=True, capture_output=True)
    argv = io + ["-f", "qcow2"]
    writes: list[str] = []
    for c in cmds + [("snapshot", None)]:
        if isinstance(c, str):
            writes += ["-c", c]
            continue
        if writes:
            subprocess.run(argv + writes + [str(path)], check=True, capture_output=True)
            writes = []
        if c[1] is not None:
            subprocess.run(img + ["snapshot", "-c", c[1], str(path)], check=True,
                           capture_output=True)


def blockengine_tools() -> tuple[list[str], list[str]]:
    py = [sys.executable, "-m", "blockengine.cli"]
    return py + ["img"], py + ["io"]


def snapshot_entry_pos(path, index: int) -> int:
    """File offset of snapshot table entry ``index`` (entries are 8-byte aligned)."""
    lay = layout(path)
    pos = lay.snapshots_offset
    with open(path, "rb") as f:
        for _ in range(index):
            f.seek(pos)
            (_, _, id_size, name_size, _, _, _, _, extra) = SNAPSHOT_HEADER.unpack(
                f.read(SNAPSHOT_HEADER.size))
            pos = (pos + SNAPSHOT_HEADER.size + extra + id_size + name_size + 7) & ~7
    return pos


SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
SN_L1_OFFSET, SN_L1_SIZE, SN_EXTRA_SIZE = 0, 8, 36     # field offsets in an entry


# ---- mutations --------------------------------------------------------------------------
def m_l2_past_eof(p):
    put64(p, l2_entry_pos(p, 0, 0), 0x8000000000000000 | (100 << 20))


def m_l2_far_past_eof(p):
    put64(p, l2_entry_pos(p, 0, 1), 0x8000000000000000 | (1 << 40))


def m_l2_into_reftable(p):
    lay = layout(p)
    put64(p, l2_entry_pos(p, 0, 0), 0x8000000000000000 | lay.reftable_offset)


def m_l2_into_l1(p):
    lay = layout(p)
    put64(p, l2_entry_pos(p, 0, 1), 0x8000000000000000 | lay.l1_offset)


def m_l2_into_header(p):
    put64(p, l2_entry_pos(p, 0, 0), 0x8000000000000000 | 0)
    # an offset of 0 with COPIED set is "unallocated" for a standard cluster; use
    # the zero flag + offset 0 form instead on the second entry
    put64(p, l2_entry_pos(p, 0, 1), 0x8000000000000001)


def m_zero_refcount_data(p):
    e = get64(p, l2_entry_pos(p, 0, 0)) & 0x00FFFFFFFFFFFE00
    set_refcount(p, e // layout(p).cluster_size, 0)


def m_zero_refcount_l2(p):
    set_refcount(p, l2_offset(p) // layout(p).cluster_size, 0)


def m_zero_refcount_l1(p):
    lay = layout(p)
    set_refcount(p, lay.l1_offset // lay.cluster_size, 0)


def m_zero_refcount_reftable(p):
    lay = layout(p)
    set_refcount(p, lay.reftable_offset // lay.cluster_size, 0)


def m_refcount_too_high(p):
    e = get64(p, l2_entry_pos(p, 0, 1)) & 0x00FFFFFFFFFFFE00
    set_refcount(p, e // layout(p).cluster_size, 2)


def m_leak_cluster(p):
    lay = layout(p)
    n = lay.file_size // lay.cluster_size
    with open(p, "r+b") as f:
        f.truncate((n + 2) * lay.cluster_size)
    set_refcount(p, n, 1)
    set_refcount(p, n + 1, 3)


def m_missing_copied(p):
    pos = l2_entry_pos(p, 0, 0)
    put64(p, pos, get64(p, pos) & ~(1 << 63))


def m_missing_copied_l1(p):
    lay = layout(p)
    put64(p, lay.l1_offset, get64(p, lay.l1_offset) & ~(1 << 63))


def m_overlapping_l2(p):
    lay = layout(p)
    e0 = get64(p, lay.l1_offset)
    idx = 1 if lay.l1_size > 1 else 0
    put64(p, lay.l1_offset + 8 * idx, e0)


def m_l2_shared_data(p):
    e = get64(p, l2_entry_pos(p, 0, 0))
    put64(p, l2_entry_pos(p, 0, 5), e)


def m_truncated_data(p):
    lay = layout(p)
    with open(p, "r+b") as f:
        f.truncate(lay.file_size - lay.cluster_size)


def m_truncated_half(p):
    lay = layout(p)
    with open(p, "r+b") as f:
        f.truncate(lay.file_size - lay.cluster_size - lay.cluster_size // 2)


def m_truncated_to_metadata(p):
    lay = layout(p)
    with open(p, "r+b") as f:
        f.truncate(l2_offset(p) + lay.cluster_size)


def m_l1_reserved_bits(p):
    lay = layout(p)
    put64(p, lay.l1_offset, get64(p, lay.l1_offset) | 0x0100000000000000)


def m_l2_reserved_bits(p):
    pos = l2_entry_pos(p, 0, 0)
    put64(p, pos, get64(p, pos) | 0x0200000000000000)


def m_l2_unaligned_data(p):
    pos = l2_entry_pos(p, 0, 0)
    put64(p, pos, get64(p, pos) + 0x200)


def m_l2_unaligned_zero_alloc(p):
    pos = l2_entry_pos(p, 0, 1)
    put64(p, pos, (get64(p, pos) + 0x200) | 1)


def m_l1_unaligned(p):
    lay = layout(p)
    put64(p, lay.l1_offset, get64(p, lay.l1_offset) + 0x200)


def m_l1_past_eof(p):
    lay = layout(p)
    put64(p, lay.l1_offset, 0x8000000000000000 | (64 << 20))


def m_reftable_unaligned(p):
    lay = layout(p)
    put64(p, lay.reftable_offset, get64(p, lay.reftable_offset) + 0x200)


def m_reftable_reserved(p):
    lay = layout(p)
    put64(p, lay.reftable_offset, get64(p, lay.reftable_offset) | 0x100)


def m_reftable_past_eof(p):
    lay = layout(p)
    put64(p, lay.reftable_offset + 8, 32 << 20)


def m_reftable_to_data(p):
    lay = layout(p)
    data = get64(p, l2_entry_pos(p, 0, 0)) & 0x00FFFFFFFFFFFE00
    put64(p, lay.reftable_offset, data)


def m_reftable_to_garbage(p):
    """the refcount block pointer moves to a fresh cluster full of garbage"""
    lay = layout(p)
    off = -(-lay.file_size // lay.cluster_size) * lay.cluster_size
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(bytes((i * 37 + 11) & 0xFF for i in range(lay.cluster_size)))
    put64(p, lay.reftable_offset, off)


def m_reftable_zeroed(p):
    lay = layout(p)
    put64(p, lay.reftable_offset, 0)


def m_refblock_shared(p):
    """refcount block also used as a data cluster"""
    lay = layout(p)
    rb = get64(p, lay.reftable_offset)
    put64(p, l2_entry_pos(p, 0, 7), 0x8000000000000000 | rb)


def m_header_huge_l1(p):
    put32(p, 36, 0x7FFFFFFF)


def m_header_l1_too_small(p):
    put32(p, 36, 0)


def m_header_l1_unaligned(p):
    put64(p, 40, layout(p).l1_offset + 8)


def m_header_reftable_huge(p):
    put32(p, 56, 0x10000000)


def m_header_reftable_zero(p):
    put32(p, 56, 0)


def m_header_length_huge(p):
    put32(p, 100, 0x7FFFFFFF)


def m_header_length_short(p):
    put32(p, 100, 80)


def m_header_cluster_bits(p):
    put32(p, 20, 30)


def m_header_nb_snapshots(p):
    put32(p, 60, 0x7FFFFFFF)


def m_header_snapshots_unaligned(p):
    put32(p, 60, 1)
    put64(p, 64, 12345)


def m_header_refcount_order(p):
    put32(p, 96, 7)


def m_header_backing_offset(p):
    put64(p, 8, 1 << 20)
    put32(p, 16, 10)


def m_header_version(p):
    put32(p, 4, 4)


def m_header_size_huge(p):
    put64(p, 24, 1 << 62)


def m_header_incompat_unknown(p):
    put64(p, 72, get64(p, 72) | (1 << 40))


def m_corrupt_bit(p):
    put64(p, 72, get64(p, 72) | 2)


def m_corrupt_bit_and_leak(p):
    m_corrupt_bit(p)
    m_leak_cluster(p)


def m_dirty_leak(p):
    """lazy refcounts crash model: dirty bit set, refcounts lag the L2 tables"""
    put64(p, 72, get64(p, 72) | 1)
    e = get64(p, l2_entry_pos(p, 0, 0)) & 0x00FFFFFFFFFFFE00
    set_refcount(p, e // layout(p).cluster_size, 0)
    m_leak_cluster(p)


def m_compressed_copied(p):
    pos = l2_entry_pos(p, 0, 0)
    put64(p, pos, get64(p, pos) | (1 << 63))


def m_ext_too_large(p):
    put32(p, 112, 0x12345678)
    put32(p, 116, 0x7FFFFFF0)


def m_snapshots_too_many(p):
    """more snapshots than QEMU_MAX_SNAPSHOTS: -r all discards the overhang"""
    put32(p, 60, (1 << 16) + 3)


def m_snapshots_too_many_past_eof(p):
    put32(p, 60, (1 << 16) + 1)
    put64(p, 64, 1 << 30)


def m_snapshot_extra_too_large(p):
    """overhanging extra data: cut to QCOW_MAX_SNAPSHOT_EXTRA_DATA by -r all"""
    put32(p, snapshot_entry_pos(p, 1) + SN_EXTRA_SIZE, 2000)


def m_snapshot_extra_huge(p):
    """extra data past INT_MAX: the table is too big, every snapshot is discarded"""
    put32(p, snapshot_entry_pos(p, 0) + SN_EXTRA_SIZE, 0x80000000)


def m_snapshot_incomplete(p):
    """a v3 entry without disk_size (extra data shorter than 16 bytes)"""
    put32(p, snapshot_entry_pos(p, 1) + SN_EXTRA_SIZE, 8)


def m_snapshot_table_past_eof(p):
    put64(p, 64, 64 << 20)


def m_snapshot_table_unaligned(p):
    put64(p, 64, layout(p).snapshots_offset + 8)


def m_snapshot_l1_unaligned(p):
    pos = snapshot_entry_pos(p, 0) + SN_L1_OFFSET
    put64(p, pos, get64(p, pos) + 0x200)


def m_snapshot_l1_too_large(p):
    put32(p, snapshot_entry_pos(p, 1) + SN_L1_SIZE, 0x7FFFFFFF)


def m_snapshot_l1_past_eof(p):
    put64(p, snapshot_entry_pos(p, 1) + SN_L1_OFFSET, 256 << 20)


def m_snapshot_shared_refcount_low(p):
    """a cluster shared by a snapshot with refcount 1 (should be 2)"""
    set_refcount(p, l2_offset(p) // layout(p).cluster_size, 1)


CASES = {
    "l2_past_eof": ("plain", m_l2_past_eof),
    "l2_far_past_eof": ("plain", m_l2_far_past_eof),
    "l2_into_reftable": ("plain", m_l2_into_reftable),
    "l2_into_l1": ("plain", m_l2_into_l1),
    "l2_into_header": ("plain", m_l2_into_header),
    "zero_refcount_data": ("plain", m_zero_refcount_data),
    "zero_refcount_l2": ("plain", m_zero_refcount_l2),
    "zero_refcount_l1": ("plain", m_zero_refcount_l1),
    "zero_refcount_reftable": ("plain", m_zero_refcount_reftable),
    "refcount_too_high": ("plain", m_refcount_too_high),
    "leak_cluster": ("plain", m_leak_cluster),
    "leak_cluster_small": ("small", m_leak_cluster),
    "missing_copied": ("plain", m_missing_copied),
    "missing_copied_l1": ("plain", m_missing_copied_l1),
    "overlapping_l2": ("small", m_overlapping_l2),
    "l2_shared_data": ("plain", m_l2_shared_data),
    "truncated_data": ("plain", m_truncated_data),
    "truncated_half": ("plain", m_truncated_half),
    "truncated_to_metadata": ("plain", m_truncated_to_metadata),
    "l1_reserved_bits": ("plain", m_l1_reserved_bits),
    "l2_reserved_bits": ("plain", m_l2_reserved_bits),
    "l2_unaligned_data": ("plain", m_l2_unaligned_data),
    "l2_unaligned_zero_alloc": ("plain", m_l2_unaligned_zero_alloc),
    "l1_unaligned": ("plain", m_l1_unaligned),
    "l1_past_eof": ("plain", m_l1_past_eof),
    "reftable_unaligned": ("plain", m_reftable_unaligned),
    "reftable_reserved": ("plain", m_reftable_reserved),
    "reftable_past_eof": ("plain", m_reftable_past_eof),
    "reftable_to_data": ("plain", m_reftable_to_data),
    "reftable_to_garbage": ("plain", m_reftable_to_garbage),
    "reftable_zeroed": ("plain", m_reftable_zeroed),
    "refblock_shared": ("plain", m_refblock_shared),
    "header_huge_l1": ("plain", m_header_huge_l1),
    "header_l1_too_small": ("plain", m_header_l1_too_small),
    "header_l1_unaligned": ("plain", m_header_l1_unaligned),
    "header_reftable_huge": ("plain", m_header_reftable_huge),
    "header_reftable_zero": ("plain", m_header_reftable_zero),
    "header_length_huge": ("plain", m_header_length_huge),
    "header_length_short": ("plain", m_header_length_short),
    "header_cluster_bits": ("plain", m_header_cluster_bits),
    "header_nb_snapshots": ("plain", m_header_nb_snapshots),
    "header_snapshots_unaligned": ("plain", m_header_snapshots_unaligned),
    "header_refcount_order": ("plain", m_header_refcount_order),
    "header_backing_offset": ("plain", m_header_backing_offset),
    "header_version": ("plain", m_header_version),
    "header_size_huge": ("plain", m_header_size_huge),
    "header_incompat_unknown": ("plain", m_header_incompat_unknown),
    "corrupt_bit": ("plain", m_corrupt_bit),
    "corrupt_bit_and_leak": ("plain", m_corrupt_bit_and_leak),
    "dirty_leak": ("lazy", m_dirty_leak),
    "compressed_copied": ("compressed", m_compressed_copied),
    "ext_too_large": ("plain", m_ext_too_large),
    "v2_leak": ("v2", m_leak_cluster),
    "v2_zero_refcount": ("v2", m_zero_refcount_data),
    "snapshots_clean": ("snapshots", lambda p: None),
    "snapshots_too_many": ("snapshots", m_snapshots_too_many),
    "snapshots_too_many_past_eof": ("snapshots", m_snapshots_too_many_past_eof),
    "snapshot_extra_too_large": ("snapshots", m_snapshot_extra_too_large),
    "snapshot_extra_huge": ("snapshots", m_snapshot_extra_huge),
    "snapshot_incomplete": ("snapshots", m_snapshot_incomplete),
    "snapshot_table_past_eof": ("snapshots", m_snapshot_table_past_eof),
    "snapshot_table_unaligned": ("snapshots", m_snapshot_table_unaligned),
    "snapshot_l1_unaligned": ("snapshots", m_snapshot_l1_unaligned),
    "snapshot_l1_too_large": ("snapshots", m_snapshot_l1_too_large),
    "snapshot_l1_past_eof": ("snapshots", m_snapshot_l1_past_eof),
    "snapshot_shared_refcount_low": ("snapshots", m_snapshot_shared_refcount_low),
    "snapshot_leak": ("snapshots", m_leak_cluster),
}


def build(directory, name: str, base_cache: dict | None = None, tools=None) -> Path:
    """Write case ``name`` as directory/name.qcow2; bases are cached in base_cache."""
    base, mutate = CASES[name]
    directory = Path(directory)
    key = base
    if base_cache is not None and key in base_cache:
        src = base_cache[key]
    else:
        src = directory / ("base-%s.qcow2" % base)
        make_base(src, base, *(tools or ()))
        if base_cache is not None:
            base_cache[key] = src
    dst = directory / ("%s.qcow2" % name)
    copy_sparse(src, dst)
    mutate(dst)
    return dst
