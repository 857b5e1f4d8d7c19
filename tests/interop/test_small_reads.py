"""Small library reads (the one-cluster fast path of the qcow2 driver) against qemu-img.

Images made by qemu-img/qemu-io hold every kind of L2 entry (data, zero with and without
a host cluster, compressed, unallocated over a backing file shorter than the image);
reads inside one cluster and across clusters through ``blockengine.open`` must return
what ``qemu-img convert -O raw`` writes, whatever the cluster size, L2 slice size or
cache mode.
"""
from __future__ import annotations

import random
import subprocess

import pytest

import blockengine
from blockengine.drivers.format.qcow2.layout import (SC_COMPRESSED, SC_NORMAL,
                                                     SC_UNALLOCATED_PLAIN, SC_ZERO_ALLOC,
                                                     SC_ZERO_PLAIN)
from tests.tooling import require_tool


def _qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> None:
    argv = [require_tool("qemu-io"), "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv + [path], check=True, capture_output=True)


def _make_image(tmp_path, cluster_size: int) -> tuple[str, bytes]:
    """An overlay of 16 clusters over a backing file of 11.5, with one kind of cluster
    per cluster index; returns (path, its contents as qemu-img reads them)."""
    qemu_img = require_tool("qemu-img")
    cs = cluster_size
    base, top, raw = (str(tmp_path / n) for n in ("base.qcow2", "top.qcow2", "top.raw"))
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
                    base, str(cs * 23 // 2)], check=True)
    _qemu_io(base, f"write -P 0xb1 0 {cs * 23 // 2}")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
                    "-b", base, "-F", "qcow2", top, str(cs * 16)], check=True)
    rng = random.Random(cs)
    pattern = rng.randbytes(cs * 3)
    with open(tmp_path / "pattern", "wb") as f:
        f.write(pattern)
    _qemu_io(top,
             f"write -P 0x11 0 {cs}",              # cluster 0: data
             f"write -z {cs} {cs}",                # 1: zero, no host cluster
             f"write -P 0x22 {2 * cs} {cs}",       # 2: data, then zeroed in place
             f"write -z {2 * cs} {cs}",
             f"write -c -P 0x33 {3 * cs} {cs}",    # 3: compressed
             f"write -P 0x44 {5 * cs + 512} 512",  # 5: data written partly (COW)
             # 4, 6..: unallocated over the backing file (which ends inside 11)
             f"write -P 0x55 {13 * cs} {cs}")      # 13: data
    subprocess.run([qemu_img, "convert", "-O", "raw", top, raw], check=True)
    with open(raw, "rb") as f:
        return top, f.read()


def _requests(cs: int, size: int, count: int, seed: int):
    """Offsets and lengths of mostly small reads: inside a cluster, at its edges,
    unaligned, and some crossing a cluster boundary."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:                    # inside one cluster
            offset = rng.randrange(size)
            length = rng.randint(1, min(4096, cs - offset % cs))
        elif kind < 0.8:                  # whole 4 KiB-aligned pieces
            length = min(4096, cs)
            offset = rng.randrange(size // length) * length
        else:                             # across a boundary
            offset = rng.randrange(1, size // cs) * cs - rng.randint(1, min(cs, 2048))
            length = rng.randint(2, 8192)
        yield offset, min(length, size - offset)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
def test_small_reads_match_qemu(tmp_path, cluster_size):
    top, expected = _make_image(tmp_path, cluster_size)
    with blockengine.open(top, "qcow2", read_only=True) as img:
        # the image does hold every kind of entry the fast path tells apart
        drv = img.node.drv
        kinds = {drv.get_host_runs(i * cluster_size, 1)[0][1] for i in range(16)}
        assert {SC_NORMAL, SC_ZERO_PLAIN, SC_ZERO_ALLOC, SC_COMPRESSED,
                SC_UNALLOCATED_PLAIN} <= kinds
        for offset, length in _requests(cluster_size, len(expected), 3000, cluster_size):
            assert img.read(offset, length) == expected[offset:offset + length], \
                (offset, length)
        buf = bytearray(4096)        # readinto a reused buffer: stale bytes overwritten
        for offset in range(0, len(expected), max(cluster_size // 2, 4096)):
            n = min(len(buf), len(expected) - offset)
            view = memoryview(buf)[:n]
            buf[:] = b"\xee" * len(buf)
            img.readinto(offset, view)
            assert bytes(view) == expected[offset:offset + n], offset


@pytest.mark.parametrize("options", [{"l2-cache-entry-size": 512},
                                     {"l2-cache-size": 1024, "l2-cache-entry-size": 512}])
def test_small_reads_with_small_l2_slices(tmp_path, options):
    # 4 KiB clusters hold 512 L2 entries: 512-byte slices split each table in 8, and a
    # two-slice cache evicts on nearly every read
    top, expected = _make_image(tmp_path, 4096)
    with blockengine.open(top, "qcow2", read_only=True, options=options) as img:
        assert img.node.drv.l2_slice_bytes == 512
        for offset, length in _requests(4096, len(expected), 2000, 1):
            assert img.read(offset, length) == expected[offset:offset + length]


def test_small_reads_with_o_direct(tmp_path):
    # O_DIRECT files are read through their node (bounce buffer), not the raw descriptor
    top, expected = _make_image(tmp_path, 65536)
    with blockengine.open(top, "qcow2", read_only=True, cache_direct=True) as img:
        assert img.node.file_child_node().drv.plain_fd is None
        for offset, length in _requests(65536, len(expected), 500, 2):
            assert img.read(offset, length) == expected[offset:offset + length]


def test_small_read_past_the_end_of_a_truncated_file(tmp_path):
    # a data cluster whose host offset lies beyond the end of the image file reads as
    # zeroes (the raw descriptor's short read falls back to the file node), as in QEMU
    qemu_img = require_tool("qemu-img")
    top = str(tmp_path / "t.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", top, "1M"], check=True)
    _qemu_io(top, "write -P 0x66 0 192k")
    with blockengine.open(top, "qcow2", read_only=True) as img:
        host = img.node.drv.get_host_runs(131072, 1)[0][2]
    with open(top, "r+b") as f:
        f.truncate(host + 1024)      # the last data cluster loses all but 1 KiB
    out = subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-r", "-c",
                          "read -P 0 132096 3072", "-c", "read -P 0x66 131072 1024", top],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in out.stdout + out.stderr
    with blockengine.open(top, "qcow2", read_only=True) as img:
        buf = bytearray(b"\xee" * 4096)     # stale bytes where the file has none
        img.readinto(131072, buf)
        assert buf == b"\x66" * 1024 + bytes(3072)
        img.readinto(132096, memoryview(buf)[:512])
        assert buf[:512] == bytes(512)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_small_writes_match_qemu(tmp_path, cluster_size):
    # in-place writes into allocated clusters take the one-cluster fast path; clusters
    # shared with an internal snapshot (no OFLAG_COPIED), zero, compressed and
    # unallocated ones need COW or allocation: the general path
    qemu_img = require_tool("qemu-img")
    top, _ = _make_image(tmp_path, cluster_size)
    subprocess.run([qemu_img, "rebase", "-q", "-u", "-b", "", top], check=True)
    subprocess.run([qemu_img, "snapshot", "-c", "snap", top], check=True)
    _qemu_io(top, f"write -P 0x77 {13 * cluster_size} 512",     # COW: copied again
             f"write -P 0x78 {15 * cluster_size} {cluster_size}",
             f"write -P 0x79 {14 * cluster_size} {cluster_size}",  # zeroed in place:
             f"write -z {14 * cluster_size} {cluster_size}")       # zero flag + host
    with blockengine.open(top, "qcow2", read_only=True) as img:
        drv = img.node.drv
        assert drv.get_host_runs(14 * cluster_size, 1)[0][1] == SC_ZERO_ALLOC
    raw = str(tmp_path / "before.raw")
    subprocess.run([qemu_img, "convert", "-O", "raw", top, raw], check=True)
    with open(raw, "rb") as f:
        model = bytearray(f.read())
    snap_before = str(tmp_path / "snap_before.raw")
    subprocess.run([qemu_img, "convert", "-O", "raw", "-l", "snap", top, snap_before],
                   check=True)
    rng = random.Random(cluster_size + 1)
    with blockengine.open(top, "qcow2") as img:
        for i in range(16):                # first one small write into every kind
            offset, data = i * cluster_size + 100, bytes([0xc0 + i]) * 300
            img.write(offset, data)
            model[offset:offset + 300] = data
            assert img.read(i * cluster_size, cluster_size) == \
                model[i * cluster_size:(i + 1) * cluster_size], i
        for i, (offset, length) in enumerate(_requests(cluster_size, len(model), 600, 3)):
            data = bytes([i % 251 + 1]) * length
            img.write(offset, data)
            model[offset:offset + length] = data
            if rng.random() < 0.1:         # reads see the writes at once
                assert img.read(offset, length) == data
    after = str(tmp_path / "after.raw")
    subprocess.run([qemu_img, "convert", "-O", "raw", top, after], check=True)
    with open(after, "rb") as f:
        assert f.read() == model
    snap_after = str(tmp_path / "snap_after.raw")
    subprocess.run([qemu_img, "convert", "-O", "raw", "-l", "snap", top, snap_after],
                   check=True)
    with open(snap_before, "rb") as a, open(snap_after, "rb") as b:
        assert a.read() == b.read()               # the snapshot's clusters were copied
    check = subprocess.run([qemu_img, "check", top], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
