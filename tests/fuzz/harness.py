"""Shared qcow2 fuzz harness: mutate a valid image, run open/read/write/check on it.

``exercise(path)`` must only ever raise ``blockengine.errors.BlockError`` (anything
else is a bug); callers bound its time.
"""
from __future__ import annotations

import os
import struct
import sys

from blockengine.errors import BlockError
from blockengine.graph.graph import Graph

MiB = 1 << 20
SNAPSHOT_MAX_L1 = 1 << 16


def make_seed_image(path, cluster_size: int = 4096, extra: dict | None = None,
                    snapshot: bool = False) -> bytes:
    """A small valid image with data, zero clusters, two L2 tables (and, with
    ``snapshot``, an internal snapshot sharing them); returns its bytes."""
    from blockengine.drivers.format.qcow2.driver import Qcow2Driver
    opts = {"cluster_size": cluster_size, **(extra or {})}
    Qcow2Driver.create(str(path), 4 * MiB, opts)
    g = Graph()
    node = g.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}})
    node.pwrite(0, b"\x11" * 8192)
    node.pwrite(3 * MiB, b"\x22" * 4096)
    node.pwrite_zeroes(64 * 1024, 8192, False)
    if snapshot:
        node.drv.snapshot_create("seed", 1700000000, 0)
        node.pwrite(4096, b"\x33" * 4096)
    g.close_all()
    with open(path, "rb") as f:
        return f.read()


def interesting_offsets(data: bytes) -> list[int]:
    """Offsets of on-disk structures worth mutating: header fields, extensions, L1,
    L2, refcount table and blocks."""
    out = list(range(0, 112, 4)) + list(range(112, 256, 8))
    try:
        (magic, version, bfo, bfs, cb, size, crypt, l1_size, l1_off, rt_off, rt_cl, nb_sn,
         sn_off) = struct.unpack_from(">IIQIIQIIQQIIQ", data)
        cs = 1 << cb
        out += [l1_off + 8 * i for i in range(min(l1_size, 8))]
        for i in range(min(l1_size, 4)):
            l2 = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
            if l2 and l2 + 64 <= len(data):
                out += [l2 + 8 * j for j in range(8)]
        out += [rt_off + 8 * i for i in range(4)]
        if nb_sn:
            # the first snapshot table entry: L1 offset and size, id/name sizes, extra
            out += [sn_off + o for o in (0, 4, 8, 12, 14, 36, 40, 48, 56)]
            sn_l1 = struct.unpack_from(">Q", data, sn_off)[0]
            out += [sn_l1 + 8 * i for i in range(2)]
        rb = struct.unpack_from(">Q", data, rt_off)[0] & ~0x1FF
        if rb and rb + 32 <= len(data):
            out += [rb + 2 * j for j in range(16)]
    except struct.error:
        pass
    return [o for o in out if 0 <= o < len(data)]


def apply_mutations(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for off, kind, val in muts:
        if not b:
            break           # truncated to nothing: no byte left to mutate
        off %= len(b)
        if kind == "byte":
            b[off] = val & 0xFF
        elif kind == "u32":
            b[off:off + 4] = struct.pack(">I", val & 0xFFFFFFFF)[:len(b) - off]
        elif kind == "u64":
            b[off:off + 8] = struct.pack(">Q", val & 0xFFFFFFFFFFFFFFFF)[:len(b) - off]
        elif kind == "bitflip":
            b[off] ^= 1 << (val & 7)
        elif kind == "truncate":
            del b[max(off, 0):]
    return bytes(b)


def _guarded(fn) -> None:
    try:
        fn()
    except BlockError:
        pass


def exercise(path) -> None:
    """open/read/write/check; raises only on bugs (non-BlockError exceptions)."""
    quiet = open(os.devnull, "w")
    old_err, sys.stderr = sys.stderr, quiet
    try:
        def ro():
            g = Graph()
            try:
                node = g.open_node({"driver": "qcow2", "read-only": True,
                                    "file": {"driver": "file", "filename": str(path)}})
                size = node.total_size
                for off in (0, 64 * 1024, 3 * MiB, max(0, size - 4096)):
                    if off + 4096 <= size:
                        _guarded(lambda: node.pread(off, 4096))
                _guarded(lambda: node.drv.check(0))
                _guarded(lambda: node.drv.snapshot_list())
                _guarded(lambda: node.block_status_above(0, min(size, MiB))
                         if size else None)
            finally:
                _guarded(g.close_all)

        def rw():
            g = Graph()
            try:
                node = g.open_node({"driver": "qcow2", "x-check": True,
                                    "file": {"driver": "file", "filename": str(path)}})
                _guarded(lambda: node.drv.check(3))
            finally:
                _guarded(g.close_all)
            g = Graph()
            try:
                node = g.open_node({"driver": "qcow2",
                                    "file": {"driver": "file", "filename": str(path)}})
                size = node.total_size
                for off in (0, 8192, 3 * MiB + 512):
                    if off + 4096 <= size:
                        _guarded(lambda: node.pwrite(off, b"\x5a" * 4096))
                        _guarded(lambda: node.pread(off, 4096))
                if size >= 2 * MiB:
                    _guarded(lambda: node.pwrite_zeroes(MiB, 65536, True))
                    _guarded(lambda: node.discard(0, 65536))
                _guarded(node.flush)
                drv = node.drv
                # a snapshot copies the whole L1 table (l1_size entries, up to 32 MiB,
                # as in QEMU): only small tables, so that time stays bounded by the file
                if getattr(drv, "l1_size", 1 << 30) <= SNAPSHOT_MAX_L1:
                    _guarded(lambda: drv.snapshot_create("fuzz", 1700000000, 0))
                    for sn in list(getattr(drv, "snapshots", []))[:1]:
                        _guarded(lambda: drv.snapshot_goto(sn.id_str))
                        _guarded(lambda: drv.snapshot_delete(sn.id_str, sn.name))
                    _guarded(node.flush)
            finally:
                _guarded(g.close_all)
        _guarded(ro)
        _guarded(rw)
    finally:
        sys.stderr = old_err
        quiet.close()
