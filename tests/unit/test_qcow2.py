"""qcow2 driver unit tests that need no QEMU tools (see tests/interop for those)."""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

import blockengine
from blockengine.drivers.format.qcow2 import layout as L
from blockengine.drivers.format.qcow2.cache import cache_sizes, parse_size
from blockengine.drivers.format.qcow2.compress import compress, decompress
from blockengine.drivers.format.qcow2.driver import Qcow2Driver
from blockengine.errors import BlockError, CorruptImage, InvalidImage

MiB = 1 << 20


def test_header_roundtrip():
    h = L.Header(version=3, cluster_bits=12, size=5 * MiB, l1_size=3, l1_table_offset=4096,
                 refcount_table_offset=8192, refcount_table_clusters=1, refcount_order=6,
                 incompatible_features=L.QCOW2_INCOMPAT_EXTL2, compression_type=1)
    raw = h.pack()
    assert len(raw) == L.HEADER_SIZE
    assert L.Header.unpack(raw) == h
    h2 = L.Header(version=2, cluster_bits=16)
    raw2 = h2.pack()
    assert len(raw2) == 72
    assert L.Header.unpack(raw2 + bytes(40)).refcount_order == 4


def test_refcount_metadata_size():
    # 3 clusters with 64 KiB clusters and 16-bit refcounts: one block, one table cluster
    assert L.refcount_metadata_size(3, 65536, 4, False) == (2 * 65536, 1)
    size, blocks = L.refcount_metadata_size(1 << 20, 512, 6, True)
    assert blocks > (1 << 20) // 64


def test_cache_sizes_defaults():
    # a 1 GiB image with 64 KiB clusters: the whole L2 fits (2 tables minimum)
    assert cache_sizes({}, 65536, 8, 1 << 30) == (2, 65536, 4)
    # 1 TiB: the 32 MiB default does not cover it -> 4 KiB slices
    assert cache_sizes({}, 65536, 8, 1 << 40) == ((32 << 20) // 4096, 4096, 4)
    assert cache_sizes({"l2-cache-size": "1M"}, 65536, 8, 1 << 40)[0] == 256
    assert cache_sizes({"cache-size": 4 << 20}, 65536, 8, 1 << 30)[2] == (4 << 20) // 65536 - 2
    with pytest.raises(BlockError):
        cache_sizes({"l2-cache-entry-size": 100}, 65536, 8, 1 << 30)
    assert parse_size("64k") == 65536


@pytest.mark.parametrize("ctype", [0, 1])
def test_compress_roundtrip(ctype):
    data = b"abc" * 20000 + bytes(5536)
    c = compress(data, ctype)
    assert c is not None and len(c) < len(data)
    assert decompress(c + bytes(300), len(data), ctype) == data
    with pytest.raises(BlockError):
        decompress(b"garbage", len(data), ctype)


def test_create_write_read_check(tmp_path):
    p = str(tmp_path / "a.qcow2")
    Qcow2Driver.create(p, 8 * MiB, {"cluster_size": "4k", "refcount_bits": "8"})
    model = bytearray(8 * MiB)
    r = random.Random(1)
    with blockengine.open(p, "qcow2") as img:
        for _ in range(200):
            off = r.randrange(0, 8 * MiB)
            n = min(r.randrange(1, 50000), 8 * MiB - off)
            d = r.randbytes(n)
            img.write(off, d)
            model[off:off + n] = d
        img.write_zeroes(100, 20000, may_unmap=True)
        model[100:20100] = bytes(20000)
        assert img.read(0, 8 * MiB) == model
    with blockengine.open(p, "qcow2", read_only=True) as img:
        assert img.read(0, 8 * MiB) == model
        res = img.node.drv.check()
        assert res["corruptions"] == res["leaks"] == res["check-errors"] == 0
        assert res["allocated-clusters"] > 0
        assert img.node.drv.info_specific() == {"type": "qcow2", "data": {
            "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
            "refcount-bits": 8, "corrupt": False, "extended-l2": False}}


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset,data,message", [
    (0, b"XXXX", "Image is not in qcow2 format"),
    (4, struct.pack(">I", 1), "Unsupported qcow2 version 1"),
    (20, struct.pack(">I", 8), "Unsupported cluster size: 2^8"),
    (48, struct.pack(">Q", 100), "Reference count table offset invalid"),
    (36, struct.pack(">I", 0), "L1 table is too small"),
    (96, struct.pack(">I", 9), "Reference count entry width too large; may not exceed 64 bits"),
])
def test_invalid_header(tmp_path, offset, data, message):
    p = str(tmp_path / "a.qcow2")
    Qcow2Driver.create(p, 64 * MiB, {})
    _patch(p, offset, data)
    with pytest.raises(BlockError) as ei:
        blockengine.open(p, "qcow2", read_only=True)
    assert str(ei.value) == message


def test_corrupt_l2_entry_marks_image_corrupt(tmp_path):
    p = str(tmp_path / "a.qcow2")
    Qcow2Driver.create(p, 4 * MiB, {})
    with blockengine.open(p, "qcow2") as img:
        img.write(0, b"x" * 65536)
        l2 = img.node.drv.l1_table[0] & L.L1E_OFFSET_MASK
    _patch(p, l2, struct.pack(">Q", L.QCOW_OFLAG_COPIED | 0x50200))   # unaligned
    with blockengine.open(p, "qcow2", read_only=True) as img:
        with pytest.raises(CorruptImage):
            img.read(0, 512)
    img = blockengine.open(p, "qcow2")
    with pytest.raises(CorruptImage) as ei:
        img.read(0, 512)
    assert "Cluster allocation offset 0x50200 unaligned" in str(ei.value)
    img.close()
    with open(p, "rb") as f:
        f.seek(72)
        assert struct.unpack(">Q", f.read(8))[0] & L.QCOW2_INCOMPAT_CORRUPT
    with pytest.raises(BlockError, match="Image is corrupt; cannot be opened read/write"):
        blockengine.open(p, "qcow2")


def test_refcount_table_growth(tmp_path):
    # 512-byte clusters, 64-bit refcounts: a refcount block covers 64 clusters, the
    # first table 64 blocks -> writing 4 MiB grows both several times
    p = str(tmp_path / "a.qcow2")
    Qcow2Driver.create(p, 8 * MiB, {"cluster_size": "512", "refcount_bits": "64"})
    data = random.Random(2).randbytes(4 * MiB)
    with blockengine.open(p, "qcow2") as img:
        img.write(0, data)
        assert img.node.drv.refcount_table_size > 64
    with blockengine.open(p, "qcow2", read_only=True) as img:
        assert img.read(0, 4 * MiB) == data
        res = img.node.drv.check()
        assert res["corruptions"] == res["leaks"] == 0


class SelfCheckMachine(RuleBasedStateMachine):
    """Random I/O vs a model; the driver's own check() must find no error."""

    dir = None
    counter = 0

    @initialize(cluster_bits=st.integers(9, 16), order=st.integers(0, 6),
                v2=st.booleans(), seed=st.integers(0, 1 << 20))
    def setup(self, cluster_bits, order, v2, seed):
        SelfCheckMachine.counter += 1
        self.path = str(self.dir / ("s%d.qcow2" % self.counter))
        opts = {"cluster_size": str(1 << cluster_bits)}
        if v2:
            opts["compat"] = "0.10"
        else:
            opts["refcount_bits"] = str(1 << order)
        self.r = random.Random(seed)
        self.size = self.r.randrange(1, 40) * 32768
        self.cs = 1 << cluster_bits
        Qcow2Driver.create(self.path, self.size, opts)
        self.model = bytearray(self.size)
        self.img = blockengine.open(self.path, "qcow2")

    def _range(self, data):
        off = data.draw(st.integers(0, self.size - 1))
        return off, data.draw(st.integers(0, min(4 * self.cs + 700, self.size - off)))

    @rule(data=st.data())
    def write(self, data):
        off, n = self._range(data)
        d = self.r.randbytes(n)
        self.img.write(off, d)
        self.model[off:off + n] = d

    @rule(data=st.data(), unmap=st.booleans())
    def zero(self, data, unmap):
        off, n = self._range(data)
        self.img.write_zeroes(off, n, may_unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        off, n = self._range(data)
        self.img.discard(off, n)
        s, e = -(-off // self.cs) * self.cs, (off + n) // self.cs * self.cs
        if off + n == self.size:
            e = self.size
        if e > s:
            self.model[s:e] = bytes(e - s)

    @rule()
    def reopen(self):
        self.img.close()
        self.img = blockengine.open(self.path, "qcow2")

    @invariant()
    def same(self):
        if hasattr(self, "img"):
            assert self.img.read(0, self.size) == self.model

    def teardown(self):
        if hasattr(self, "img"):
            self.img.close()
            with blockengine.open(self.path, "qcow2", read_only=True) as img:
                res = img.node.drv.check()
                assert res["corruptions"] == res["leaks"] == res["check-errors"] == 0, \
                    img.node.drv.check_messages


def test_self_check_machine(tmp_path):
    SelfCheckMachine.dir = tmp_path
    run_state_machine_as_test(SelfCheckMachine, settings=settings(
        max_examples=40, stateful_step_count=20, deadline=None,
        suppress_health_check=list(HealthCheck)))
