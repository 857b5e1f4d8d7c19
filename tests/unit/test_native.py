"""blockengine._native: the compiled module against its pure-Python twins.

Three layers:
* hand-computed expectations, run on both backends (so a bug the twins share
  still fails);
* hypothesis differential tests: same arguments (including invalid ones) give
  the same result, the same exception type and the same buffer contents;
* backend selection (BLOCKENGINE_PURE=1, CI=true requires the native module).

Without the compiled module the native half is skipped, except in CI
(CI=true), where a missing native module is a failure.
"""
import os
import struct
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from blockengine import _native
from blockengine import _pynative as PY

NAT = _native.native_api()
ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI") == "true"

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _require_native():
    if NAT is None:
        message = f"blockengine._be_native is not built ({_native.NATIVE_IMPORT_ERROR})"
        if IN_CI:
            pytest.fail(message + "; CI must test the native backend")
        pytest.skip(message)


@pytest.fixture
def native():
    _require_native()
    return NAT


def _backends():
    params = [pytest.param(PY, id="python")]
    params.append(pytest.param("native", id="native"))
    return params


@pytest.fixture(params=_backends())
def be(request):
    """Each backend in turn (the hand-computed tests run on both)."""
    if request.param == "native":
        _require_native()
        return NAT
    return request.param


# ------------------------------------------------------------ differential
def _outcome(impl, name, args, kwargs):
    args = [bytearray(a) if isinstance(a, bytearray) else a for a in args]
    try:
        result = ("ok", getattr(impl, name)(*args, **kwargs))
    except (ValueError, IndexError, TypeError) as exc:
        result = ("raise", type(exc))
    return result, [a for a in args if isinstance(a, bytearray)]


def same(name, *args, **kwargs):
    """Run ``name`` on both backends with copies of the arguments; assert the
    results (or exception types) and the modified buffers are identical."""
    _require_native()
    native = _outcome(NAT, name, args, kwargs)
    python = _outcome(PY, name, args, kwargs)
    assert native == python, (name, args, kwargs)
    return python[0]


# -------------------------------------------------------------- strategies
@st.composite
def sparse_bytes(draw, max_words=64, min_words=0):
    """Bytes of a multiple of 8 long, made of zero, 0xff and random segments
    (long zero and one runs are what the scans must get right)."""
    segments = draw(st.lists(
        st.tuples(st.sampled_from(["zero", "ones", "random", "byte"]),
                  st.one_of(st.integers(1, 16), st.integers(1, 120))), max_size=12))
    out = bytearray()
    for kind, length in segments:
        if kind == "zero":
            out += bytes(length)
        elif kind == "ones":
            out += b"\xff" * length
        elif kind == "byte":
            out += bytes([draw(st.integers(0, 255))]) * length
        else:
            out += draw(st.binary(min_size=length, max_size=length))
    words = draw(st.integers(min_words, max_words))
    out = out[:words * 8]
    out += bytes(words * 8 - len(out))
    return bytearray(out)


def mostly(good, bad):
    """``good`` about three times in four, else ``bad``: invalid arguments
    must be tried, but not crowd out the valid ones."""
    return st.sampled_from((True, True, True, False)).flatmap(lambda ok: good if ok else bad)


def upto(limit):
    """A length in [0, limit], often exactly limit (the whole rest)."""
    limit = max(0, limit)
    return st.one_of(st.just(limit), st.integers(0, limit))


def index_in(limit_hint=3200):
    """Mostly plausible, sometimes out-of-range or absurd indices."""
    return mostly(st.one_of(st.integers(0, limit_hint), st.integers(0, 64)),
                  st.sampled_from([-1, -(1 << 63), (1 << 63) - 1, 1 << 63, 1 << 64]))


@st.composite
def l2_tables(draw, extended):
    cluster_bits = draw(mostly(st.integers(9, 21), st.sampled_from([8, 22])))
    cb = min(max(cluster_bits, 9), 21)
    entries, bitmaps = [], []
    n_segments = draw(st.integers(0, 10))
    for _ in range(n_segments):
        kind = draw(st.sampled_from(["unalloc", "normal", "zero", "zalloc",
                                     "compressed", "garbage", "unaligned"]))
        length = draw(st.integers(1, 12))
        copied = draw(st.booleans()) << 63
        base = draw(st.integers(0, (1 << (56 - cb)) - 1))     # a host cluster number
        jump = draw(st.sampled_from([1, 1, 1, 2]))
        for i in range(length):
            if kind == "unalloc":
                e = copied
            elif kind == "normal":
                e = copied | (((base + i * jump) << cb) & 0x00FFFFFFFFFFFE00)
            elif kind == "zero":
                e = copied | 1
            elif kind == "zalloc":
                e = copied | 1 | (((base + i) << cb) & 0x00FFFFFFFFFFFE00)
            elif kind == "compressed":
                e = (1 << 62) | draw(st.integers(0, (1 << 62) - 1)) | copied
            elif kind == "unaligned":
                e = copied | ((((base + i) << cb) + 512 * draw(st.integers(0, 3)))
                               & 0x00FFFFFFFFFFFE00)
            else:
                e = draw(st.integers(0, (1 << 64) - 1))
            entries.append(e)
            bitmaps.append(draw(st.sampled_from(
                [0, 0xFFFFFFFF, 0xFFFFFFFF00000000, 0x0000FFFF0000FFFF, 0x00FF00000000FF00,
                 0x00000001FFFFFFFE])) if draw(st.booleans()) else draw(st.integers(0, (1 << 64) - 1)))
    if extended:
        table = b"".join(struct.pack(">QQ", e, b) for e, b in zip(entries, bitmaps))
    else:
        table = b"".join(struct.pack(">Q", e) for e in entries)
    return table, cluster_bits, len(entries)


# ------------------------------------------------------------ L2: by hand
def _l2(*entries):
    return b"".join(struct.pack(">Q", e) for e in entries)


COPIED, COMPRESSED = 1 << 63, 1 << 62
C64K = 1 << 16


def test_l2_scan_standard_by_hand(be):
    table = _l2(
        COPIED | 5 * C64K, COPIED | 6 * C64K, COPIED | 7 * C64K,  # 0-2: one run
        9 * C64K,                     # 3: not copied -> new run
        10 * C64K,                    # 4: contiguous with 3
        20 * C64K,                    # 5: jump -> new run
        0, 0,                         # 6-7: unallocated
        COPIED,                       # 8: offset 0 + COPIED: unallocated, copied
        1, 1,                         # 9-10: zero plain
        1 | 30 * C64K, 1 | 31 * C64K,  # 11-12: zero alloc, contiguous
        COMPRESSED | 0x12345, COMPRESSED | 0x12345,  # 13, 14: one run each
        COPIED | 40 * C64K | 0x2,     # 15: reserved bit 1
        41 * C64K + 512,              # 16: unaligned for 64k clusters
        (1 << 56) | 42 * C64K,        # 17: reserved bit 56
    )
    L = PY
    assert be.l2_scan(table, 0, 18, False, 16) == [
        (0, 3, L.L2_NORMAL, 5 * C64K, True),
        (3, 2, L.L2_NORMAL, 9 * C64K, False),
        (5, 1, L.L2_NORMAL, 20 * C64K, False),
        (6, 2, L.L2_UNALLOCATED, 0, False),
        (8, 1, L.L2_UNALLOCATED, 0, True),
        (9, 2, L.L2_ZERO_PLAIN, 0, False),
        (11, 2, L.L2_ZERO_ALLOC, 30 * C64K, False),
        (13, 1, L.L2_COMPRESSED, 0x12345, False),
        (14, 1, L.L2_COMPRESSED, 0x12345, False),
        (15, 1, L.L2_INVALID, 40 * C64K, True),
        (16, 1, L.L2_INVALID, 41 * C64K + 512, False),
        (17, 1, L.L2_INVALID, 42 * C64K, False),
    ]
    # a sub-range, and the 512-byte aligned offset is fine for 512-byte clusters
    assert be.l2_scan(table, 1, 2, False, 16) == [(1, 2, L.L2_NORMAL, 6 * C64K, True)]
    assert be.l2_scan(table, 16, 1, False, 9) == [(16, 1, L.L2_NORMAL, 41 * C64K + 512, False)]
    assert be.l2_scan(table, 5, 0, False, 16) == []


def test_l2_scan_compressed_offset_bits(be):
    # cluster_bits 16: x = 54 offset bits, the rest is the sector count
    entry = COMPRESSED | (3 << 54) | 0x123456789
    assert be.l2_scan(_l2(entry), 0, 1, False, 16) == [(0, 1, PY.L2_COMPRESSED, 0x123456789, False)]
    # cluster_bits 9: x = 61 > 56, offset bits 56..60 must be zero
    assert be.l2_scan(_l2(COMPRESSED | (1 << 57)), 0, 1, False, 9)[0][2] == PY.L2_INVALID
    assert be.l2_scan(_l2(COMPRESSED | (1 << 55)), 0, 1, False, 9)[0][2] == PY.L2_COMPRESSED


def test_l2_scan_data_file(be):
    table = _l2(COPIED, COPIED | C64K, 0)
    assert be.l2_scan(table, 0, 3, False, 16, data_file=True) == [
        (0, 2, PY.L2_NORMAL, 0, True), (2, 1, PY.L2_UNALLOCATED, 0, False)]


def test_l2_scan_extended_by_hand(be):
    def ext(*pairs):
        return b"".join(struct.pack(">QQ", e, b) for e, b in pairs)
    all_alloc = 0xFFFFFFFF
    table = ext(
        (COPIED | 5 * C64K, all_alloc), (COPIED | 6 * C64K, all_alloc),  # 0-1: one run
        (COPIED | 7 * C64K, 0x0000000F),    # 2: other bitmap -> new run
        (0, 0), (0, 0),                     # 3-4: unallocated
        (0, 0xFFFF0000_00000000),           # 5: unallocated, zero subclusters
        (0, 0x1),                           # 6: alloc bit without offset
        (8 * C64K, 0x00000001_00000001),    # 7: alloc and zero overlap
        (COMPRESSED | 0x400, 0),            # 8: compressed
        (COMPRESSED | 0x400, 1),            # 9: compressed with a bitmap
        (1 | 9 * C64K, all_alloc),          # 10: bit 0 is reserved here
        (10 * C64K, 0),                     # 11: normal, all unallocated subclusters
    )
    L = PY
    assert be.l2_scan(table, 0, 12, True, 16) == [
        (0, 2, L.L2_NORMAL, 5 * C64K, True),
        (2, 1, L.L2_NORMAL, 7 * C64K, True),
        (3, 2, L.L2_UNALLOCATED, 0, False),
        (5, 1, L.L2_UNALLOCATED, 0, False),
        (6, 1, L.L2_INVALID, 0, False),
        (7, 1, L.L2_INVALID, 8 * C64K, False),
        (8, 1, L.L2_COMPRESSED, 0x400, False),
        (9, 1, L.L2_INVALID, 0x400, False),
        (10, 1, L.L2_INVALID, 9 * C64K, False),
        (11, 1, L.L2_NORMAL, 10 * C64K, False),
    ]


def test_l2_scan_errors(be):
    table = _l2(0, 0, 0, 0)
    with pytest.raises(ValueError):
        be.l2_scan(table, 0, 4, False, 8)
    with pytest.raises(ValueError):
        be.l2_scan(table, 0, 4, False, 22)
    with pytest.raises(IndexError):
        be.l2_scan(table, 0, 5, False, 16)
    with pytest.raises(IndexError):
        be.l2_scan(table, 0, 3, True, 16)   # only 2 extended entries
    with pytest.raises(IndexError):
        be.l2_scan(table, -1, 1, False, 16)
    with pytest.raises(IndexError):
        be.l2_scan(table, 0, 1 << 70, False, 16)


def test_l2_scan_many_runs(be):
    # more runs than one native chunk: every entry its own run
    n = 5000
    table = _l2(*[(COMPRESSED | i) for i in range(n)])
    runs = be.l2_scan(table, 0, n, False, 16)
    assert runs == [(i, 1, PY.L2_COMPRESSED, i, False) for i in range(n)]


def test_subcluster_runs_by_hand(be):
    bitmap = (0x0000000F << 32) | 0x000000F0   # zero 0-3, allocated 4-7
    assert be.subcluster_runs(bitmap, 0) == (PY.SC_ZERO, 4)
    assert be.subcluster_runs(bitmap, 2) == (PY.SC_ZERO, 2)
    assert be.subcluster_runs(bitmap, 4) == (PY.SC_ALLOCATED, 4)
    assert be.subcluster_runs(bitmap, 8) == (PY.SC_UNALLOCATED, 24)
    assert be.subcluster_runs(bitmap, 31) == (PY.SC_UNALLOCATED, 1)
    assert be.subcluster_runs(0xFFFFFFFF, 0) == (PY.SC_ALLOCATED, 32)
    assert be.subcluster_runs(0xFFFFFFFF << 32, 5) == (PY.SC_ZERO, 27)
    assert be.subcluster_runs((1 << 40) | (1 << 8), 3) == (PY.SC_INVALID, 29)
    with pytest.raises(IndexError):
        be.subcluster_runs(0, 32)
    with pytest.raises(IndexError):
        be.subcluster_runs(0, -1)
    with pytest.raises(ValueError):
        be.subcluster_runs(1 << 64, 0)


# ------------------------------------------------------- L2: differential
@SETTINGS
@given(data=st.data(), extended=st.booleans(), data_file=st.booleans())
def test_l2_scan_same(data, extended, data_file):
    table, cluster_bits, n = data.draw(l2_tables(extended))
    start = data.draw(mostly(st.integers(0, n), index_in(n)))
    count = data.draw(mostly(upto(n - min(start, n)), index_in(n)))
    same("l2_scan", table, start, count, extended, cluster_bits, data_file=data_file)


@SETTINGS
@given(data=st.data(), stop=st.booleans())
def test_l2_map_same(data, stop):
    table, cluster_bits, n = data.draw(l2_tables(False))
    start = data.draw(mostly(st.integers(0, n), index_in(n)))
    count = data.draw(mostly(upto(n - min(start, n)), index_in(n)))
    skip = data.draw(mostly(st.integers(0, (1 << cluster_bits) - 1), st.integers(0, 1 << 22)))
    length = data.draw(st.integers(0, (max(count, 0) << cluster_bits) + 4096))
    unallocated = _native.MAP_STOP if stop else _native.MAP_ZERO
    same("l2_map", table, start, count, cluster_bits, 12345 << 9, skip, length,
         unallocated, 3)


@SETTINGS
@given(data=st.data())
def test_seek_map_same(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("seek") / "sparse"
    size = data.draw(st.integers(0, 1 << 20))
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(data.draw(st.integers(0, 8))):
            f.seek(data.draw(st.integers(0, max(size - 1, 0))))
            f.write(b"x" * data.draw(st.integers(1, 70000)))
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = data.draw(st.integers(0, size + 4096))
        length = data.draw(st.integers(0, size + 8192))
        same("seek_map", fd, offset, length, 2)
    finally:
        os.close(fd)


@SETTINGS
@given(data=st.data(), human=st.booleans())
def test_map_printing_same(data, human):
    """Random entry streams (mergeable neighbours included) print the same."""
    names = [b"", b"a.qcow2", b"b with space.raw"]
    records, start = [], data.draw(st.integers(0, 1 << 40))
    pos = start
    for _ in range(data.draw(st.integers(0, 60))):
        length = data.draw(st.sampled_from([512, 4096, 65536, data.draw(upto(1 << 30))]))
        flags = data.draw(st.integers(0, 15))
        offset = data.draw(st.sampled_from([pos, pos + 65536, 0]))
        records.append(_native.MAP_ENTRY.pack(pos, length, offset, flags,
                                              data.draw(st.integers(0, 2)),
                                              data.draw(st.integers(0, 2)), 0))
        pos += length
    packed = b"".join(records)
    cut = data.draw(st.integers(0, len(records))) * _native.MAP_ENTRY.size
    outputs = []
    for impl in (NAT, PY):
        state = impl.map_state(human, start)
        out = [impl.map_feed(state, packed[:cut], names),
               impl.map_feed(state, packed[cut:], names), impl.map_finish(state, names)]
        outputs.append(out)
    assert outputs[0] == outputs[1]


@SETTINGS
@given(bitmap=mostly(st.one_of(st.integers(0, (1 << 64) - 1),
                              st.integers(0, 0xFFFFFFFF).map(
                                  lambda a: a | (~a & 0xF0F0F0F0) << 32)),
                     st.sampled_from([-1, 1 << 64])),
       first_sc=mostly(st.integers(0, 31), st.sampled_from([-1, 32, 1 << 40])))
def test_subcluster_runs_same(bitmap, first_sc):
    same("subcluster_runs", bitmap, first_sc)


@SETTINGS
@given(data=st.data(), extended=st.booleans())
def test_l2_runs_cover_and_agree_with_entries(data, extended):
    """Property check of one backend against the spec, entry by entry."""
    table, cluster_bits, n = data.draw(l2_tables(extended))
    assume(9 <= cluster_bits <= 21)
    runs = _native.l2_scan(table, 0, n, extended, cluster_bits)
    esize = 16 if extended else 8
    pos = 0
    for first, count, kind, host, copied in runs:
        assert first == pos and count >= 1
        pos += count
        if kind in (PY.L2_COMPRESSED, PY.L2_INVALID):
            assert count == 1
        for k in range(count):
            entry, = struct.unpack_from(">Q", table, (first + k) * esize)
            assert bool(entry & COPIED) == copied
            if kind in (PY.L2_NORMAL, PY.L2_ZERO_ALLOC):
                assert entry & 0x00FFFFFFFFFFFE00 == host + (k << cluster_bits)
            if extended:
                assert table[(first + k) * esize + 8:(first + k + 1) * esize] == \
                    table[first * esize + 8:(first + 1) * esize]
    assert pos == n


# ------------------------------------------------------ refcount: by hand
def test_refcount_get_layouts(be):
    block = bytearray(8)
    block[0] = 0b00000101          # order 0: entries 0 and 2
    assert [be.refcount_get(block, 0, i) for i in range(8)] == [1, 0, 1, 0, 0, 0, 0, 0]
    block[0] = 0b11100100          # order 1: entries 0..3 = 0, 1, 2, 3
    assert [be.refcount_get(block, 1, i) for i in range(4)] == [0, 1, 2, 3]
    block[0] = 0x21                # order 2: entry 0 = 1 (low nibble), entry 1 = 2
    assert [be.refcount_get(block, 2, i) for i in range(3)] == [1, 2, 0]
    block[:] = bytes.fromhex("0102030405060708")
    assert be.refcount_get(block, 3, 1) == 0x02
    assert be.refcount_get(block, 4, 1) == 0x0304
    assert be.refcount_get(block, 5, 1) == 0x05060708
    assert be.refcount_get(block, 6, 0) == 0x0102030405060708
    assert list(be.refcount_get_range(block, 4, 1, 3)) == [0x0304, 0x0506, 0x0708]
    assert isinstance(be.refcount_get_range(block, 4, 0, 0), array)
    assert list(be.refcount_get_range(bytes([0b00000110] + [0] * 7), 0, 0, 4)) == [0, 1, 1, 0]


def test_refcount_set_range(be):
    block = bytearray(8)
    be.refcount_set_range(block, 0, 3, 7, 1)       # bits 3..9
    assert block[:2] == bytes([0b11111000, 0b00000011])
    block = bytearray(8)
    be.refcount_set_range(block, 1, 1, 6, 2)       # 2-bit entries 1..6 = 0b10
    assert block[:2] == bytes([0b10101000, 0b00101010])
    block = bytearray(8)
    be.refcount_set_range(block, 2, 1, 2, 0xA)
    assert block[:2] == bytes([0xA0, 0x0A])
    block = bytearray(16)
    be.refcount_set_range(block, 4, 2, 3, 0x1234)
    assert block[:12] == bytes.fromhex("0000 0000 1234 1234 1234 0000".replace(" ", ""))
    be.refcount_set_range(block, 4, 3, 1, 0)
    assert block[4:10] == bytes.fromhex("123400001234")
    be.refcount_set_range(block, 6, 1, 1, (1 << 64) - 1)
    assert block[8:] == b"\xff" * 8
    with pytest.raises(ValueError):
        be.refcount_set_range(block, 4, 0, 1, 1 << 16)
    with pytest.raises(ValueError):
        be.refcount_set_range(block, 4, 0, 1, -1)
    with pytest.raises(IndexError):
        be.refcount_set_range(block, 4, 7, 2, 1)
    with pytest.raises(TypeError):
        be.refcount_set_range(bytes(8), 4, 0, 1, 1)


def test_refcount_add_range(be):
    block = bytearray(8)
    be.refcount_set_range(block, 4, 0, 4, 0xFFFE)
    be.refcount_set_range(block, 4, 2, 1, 5)
    assert be.refcount_add_range(block, 4, 0, 2, 1) == PY.OK
    assert list(be.refcount_get_range(block, 4, 0, 4)) == [0xFFFF, 0xFFFF, 5, 0xFFFE]
    before = bytes(block)
    assert be.refcount_add_range(block, 4, 1, 3, 1) == PY.E_OVERFLOW   # entry 1 overflows
    assert block == before
    assert be.refcount_add_range(block, 4, 2, 1, -6) == PY.E_UNDERFLOW
    assert be.refcount_add_range(block, 4, 0, 4, -(1 << 70)) == PY.E_UNDERFLOW
    assert be.refcount_add_range(block, 4, 0, 4, 1 << 70) == PY.E_OVERFLOW
    assert block == before
    assert be.refcount_add_range(block, 4, 2, 2, -5) == PY.OK
    assert list(be.refcount_get_range(block, 4, 0, 4)) == [0xFFFF, 0xFFFF, 0, 0xFFF9]
    assert be.refcount_add_range(block, 4, 3, 0, 1 << 70) == PY.OK     # nothing to add to
    b64 = bytearray(8)
    assert be.refcount_add_range(b64, 6, 0, 1, (1 << 64) - 1) == PY.OK
    assert b64 == b"\xff" * 8
    b1 = bytearray(8)
    assert be.refcount_add_range(b1, 0, 5, 2, 1) == PY.OK
    assert b1[0] == 0b01100000
    assert be.refcount_add_range(b1, 0, 4, 2, 1) == PY.E_OVERFLOW


def test_refcount_scans(be):
    block = bytearray(16)                     # 8 entries of 16 bits
    for i in (1, 2, 5):
        be.refcount_set_range(block, 4, i, 1, 1)
    assert be.refcount_count_nonzero(block, 4) == 3
    assert be.refcount_free_run(block, 4, 0) == 1
    assert be.refcount_free_run(block, 4, 1) == 0
    assert be.refcount_free_run(block, 4, 3) == 2
    assert be.refcount_free_run(block, 4, 6) == 2
    assert be.refcount_free_run(block, 4, 8) == 0
    assert be.refcount_find_free(block, 4, 0, 1) == 0
    assert be.refcount_find_free(block, 4, 0, 2) == 3
    assert be.refcount_find_free(block, 4, 4, 2) == 6
    assert be.refcount_find_free(block, 4, 0, 3) == -1
    assert be.refcount_find_free(block, 4, 8, 1) == -1
    order0 = bytes([0b11110111, 0xFF, 0, 0, 0, 0, 0, 0x80])
    assert be.refcount_count_nonzero(order0, 0) == 16
    assert be.refcount_find_free(order0, 0, 0, 1) == 3
    assert be.refcount_find_free(order0, 0, 0, 2) == 16
    assert be.refcount_free_run(order0, 0, 16) == 63 - 16
    assert be.refcount_compare(array("Q", [0, 1, 1, 0, 0]), block, 4, 0) == []
    assert be.refcount_compare([1, 1, 0, 0], block, 4, 2) == [3, 5]
    assert be.refcount_compare([0, 1 << 70], block, 4, 0) == [1]
    with pytest.raises(ValueError):
        be.refcount_find_free(block, 4, 0, 0)
    with pytest.raises(IndexError):
        be.refcount_free_run(block, 4, 9)
    with pytest.raises(ValueError):
        be.refcount_count_nonzero(block, 7)
    with pytest.raises(ValueError):
        be.refcount_get(bytes(12), 4, 0)       # not a multiple of 8 bytes
    with pytest.raises(IndexError):
        be.refcount_compare([0] * 9, block, 4, 0)


# ------------------------------------------------- refcount: differential
orders = mostly(st.integers(0, 6), st.sampled_from([-1, 7]))


@SETTINGS
@given(block=sparse_bytes(), order=orders, data=st.data())
def test_refcount_reads_same(block, order, data):
    total = (len(block) * 8) >> max(0, min(order, 6))
    index = data.draw(mostly(st.integers(0, total), index_in()))
    n = data.draw(mostly(upto(total - min(index, total)), index_in()))
    same("refcount_get", block, order, index)
    same("refcount_get_range", block, order, index, n)
    same("refcount_free_run", block, order, index)
    same("refcount_find_free", block, order, index,
         data.draw(mostly(st.integers(1, 70), st.integers(-1, 0))))
    same("refcount_count_nonzero", block, order)
    same("refcount_get", bytes(block), order, index)   # read-only buffers are fine


@SETTINGS
@given(block=sparse_bytes(), order=orders, data=st.data())
def test_refcount_writes_same(block, order, data):
    width = 1 << max(0, min(order, 6))
    total = (len(block) * 8) // width
    index = data.draw(mostly(st.integers(0, total), index_in()))
    n = data.draw(mostly(upto(total - min(index, total)), index_in()))
    value = data.draw(mostly(st.one_of(st.integers(0, (1 << width) - 1), st.integers(0, 3)),
                             st.sampled_from([-1, 1 << width, 1 << 64])))
    delta = data.draw(st.one_of(st.integers(-3, 3), st.integers(-(1 << width), 1 << width),
                                st.sampled_from([1 << 64, -(1 << 64), 1 << 63])))
    same("refcount_set_range", block, order, index, n, value)
    same("refcount_add_range", block, order, index, n, delta)


@SETTINGS
@given(block=sparse_bytes(max_words=16), order=st.integers(0, 6), data=st.data())
def test_refcount_compare_same(block, order, data):
    total = (len(block) * 8) >> order
    first = data.draw(st.integers(0, total))
    stored = list(PY.refcount_get_range(block, order, first, total - first))
    computed = [data.draw(st.sampled_from([v, v, v + 1, 0, (1 << 64) - 1])) for v in stored]
    computed = computed[:data.draw(st.integers(0, len(computed) + 1))]
    if all(c < (1 << 64) for c in computed) and data.draw(st.booleans()):
        computed = array("Q", computed)
    same("refcount_compare", computed, block, order, first)


def test_refcount_compare_many_mismatches(native):
    block = bytes(2048)                         # order 0: 16384 entries
    computed = array("Q", [1]) * 16384
    assert native.refcount_compare(computed, block, 0, 0) == list(range(16384))


# -------------------------------------------------------- bitmaps: by hand
def test_bitmap_by_hand(be):
    buf = bytearray(16)
    be.bitmap_set_range(buf, 3, 10)             # bits 3..12
    assert buf[:2] == bytes([0xF8, 0x1F])
    be.bitmap_set_range(buf, 64, 64)
    assert buf[8:] == b"\xff" * 8
    assert be.bitmap_count(buf, 0, 128) == 74
    assert be.bitmap_count(buf, 4, 70) == 9 + 10
    be.bitmap_reset_range(buf, 5, 62)           # bits 5..66
    assert buf[:9] == bytes([0x18, 0, 0, 0, 0, 0, 0, 0, 0xF8])
    assert be.bitmap_next_set(buf, 0, 128) == 3
    assert be.bitmap_next_set(buf, 5, 128) == 67
    assert be.bitmap_next_set(buf, 5, 67) == -1
    assert be.bitmap_next_set(buf, 5, 5) == -1
    assert be.bitmap_next_clear(buf, 3, 128) == 5
    assert be.bitmap_next_clear(buf, 67, 128) == -1
    assert be.bitmap_next_dirty_area(buf, 0, 128, 100) == (3, 2)
    assert be.bitmap_next_dirty_area(buf, 4, 128, 100) == (4, 1)
    assert be.bitmap_next_dirty_area(buf, 5, 128, 100) == (67, 61)
    assert be.bitmap_next_dirty_area(buf, 5, 100, 10) == (67, 10)
    assert be.bitmap_next_dirty_area(buf, 5, 70, 10) == (67, 3)
    assert be.bitmap_next_dirty_area(buf, 5, 67, 10) is None
    other = bytearray(16)
    other[0] = 0x81
    be.bitmap_merge_or(buf, other)
    assert buf[0] == 0x99
    with pytest.raises(ValueError):
        be.bitmap_merge_or(buf, bytes(8))
    with pytest.raises(ValueError):
        be.bitmap_next_dirty_area(buf, 0, 128, 0)
    with pytest.raises(IndexError):
        be.bitmap_next_set(buf, 0, 129)
    with pytest.raises(IndexError):
        be.bitmap_set_range(buf, 120, 9)
    with pytest.raises(ValueError):
        be.bitmap_count(bytes(9), 0, 1)
    with pytest.raises(TypeError):
        be.bitmap_set_range(bytes(8), 0, 1)


def test_bitmap_serialize_by_hand(be):
    buf = bytearray(16)
    buf[0:3] = bytes([0b10110000, 0b00000001, 0xFF])
    # qcow2 bitmap data: bit j of the output is bit start + j, little-endian bytes
    assert be.bitmap_serialize(buf, 0, 24) == bytes([0b10110000, 0b00000001, 0xFF])
    assert be.bitmap_serialize(buf, 4, 8) == bytes([0b00011011])
    assert be.bitmap_serialize(buf, 4, 6) == bytes([0b00011011])
    assert be.bitmap_serialize(buf, 5, 3) == bytes([0b101])
    assert be.bitmap_serialize(buf, 0, 0) == b""
    assert be.bitmap_serialize(buf, 8, 12) == bytes([0b00000001, 0x0F])
    dst = bytearray(16)
    be.bitmap_deserialize(dst, 4, 8, bytes([0b00011011]))
    assert dst[:2] == bytes([0b10110000, 0b00000001])
    be.bitmap_deserialize(dst, 6, 3, bytes([0b11111000]))    # writes zeros at 6..8
    assert dst[:2] == bytes([0b00110000, 0b00000000])
    dst = bytearray(b"\xff" * 16)
    be.bitmap_deserialize(dst, 8, 12, bytes([0, 0xF0]))
    assert dst[:4] == bytes([0xFF, 0x00, 0xF0, 0xFF])
    with pytest.raises(IndexError):
        be.bitmap_deserialize(dst, 0, 17, bytes(2))
    with pytest.raises(IndexError):
        be.bitmap_serialize(buf, 100, 29)


def test_zero_detection_by_hand(be):
    buf = bytearray(4096 * 4 + 100)
    assert be.buffer_is_zero(buf)
    assert be.buffer_is_zero(buf, 100, 0)
    buf[5000] = 1
    assert not be.buffer_is_zero(buf)
    assert be.buffer_is_zero(buf, 5001)
    assert be.buffer_is_zero(buf, 0, 5000)
    assert not be.buffer_is_zero(buf, 4999, 2)
    assert be.zero_runs(buf, 4096) == [(0, 4096, True), (4096, 4096, False),
                                       (8192, 8292, True)]
    buf[-1] = 7
    assert be.zero_runs(buf, 4096) == [(0, 4096, True), (4096, 4096, False),
                                       (8192, 8192, True), (16384, 100, False)]
    assert be.zero_runs(b"", 512) == []
    assert be.zero_runs(b"\0\1\0\0", 1) == [(0, 1, True), (1, 1, False), (2, 2, True)]
    with pytest.raises(IndexError):
        be.buffer_is_zero(buf, 10, len(buf))
    with pytest.raises(IndexError):
        be.buffer_is_zero(buf, -1)
    with pytest.raises(ValueError):
        be.zero_runs(buf, 0)


def test_zero_runs_many_runs(be):
    buf = bytes([0, 1] * 3000)
    runs = be.zero_runs(buf, 1)
    assert len(runs) == 6000
    assert runs[:3] == [(0, 1, True), (1, 1, False), (2, 1, True)]


# -------------------------------------------------- bitmaps: differential
def _bit_args(data, nbits):
    start = data.draw(mostly(st.integers(0, nbits), index_in()))
    n = data.draw(mostly(upto(nbits - min(start, nbits)), index_in()))
    return start, n


@SETTINGS
@given(buf=sparse_bytes(), data=st.data())
def test_bitmap_same(buf, data):
    if data.draw(st.sampled_from([False] * 9 + [True])):
        buf = buf + bytearray(data.draw(st.integers(1, 7)))   # invalid length
    nbits = len(buf) * 8
    start, n = _bit_args(data, nbits)
    end = data.draw(mostly(st.integers(max(0, start), nbits).map(lambda e: nbits - e + start)
                           if 0 <= start <= nbits else st.just(nbits), index_in()))
    same("bitmap_set_range", buf, start, n)
    same("bitmap_reset_range", buf, start, n)
    same("bitmap_count", buf, start, n)
    same("bitmap_next_set", buf, start, end)
    same("bitmap_next_clear", buf, start, end)
    same("bitmap_next_dirty_area", buf, start, end, data.draw(
        mostly(st.integers(1, 200), st.sampled_from([0, -1, 1 << 62]))))
    same("bitmap_serialize", buf, start, n)


@SETTINGS
@given(buf=sparse_bytes(), data=st.data())
def test_bitmap_deserialize_same(buf, data):
    nbits = len(buf) * 8
    start, n = _bit_args(data, nbits)
    payload = data.draw(st.binary(max_size=max(0, min(n, nbits) + 7) // 8 + 1))
    same("bitmap_deserialize", buf, start, n, payload)


@SETTINGS
@given(a=sparse_bytes(), b=sparse_bytes())
def test_bitmap_merge_same(a, b):
    same("bitmap_merge_or", a, b)
    same("bitmap_merge_or", a, b[:len(a)] + bytes(max(0, len(a) - len(b))))


@SETTINGS
@given(buf=sparse_bytes(), data=st.data())
def test_serialize_roundtrip(buf, data):
    nbits = len(buf) * 8
    start = data.draw(st.integers(0, nbits))
    n = data.draw(st.integers(0, nbits - start))
    blob = _native.bitmap_serialize(buf, start, n)
    assert len(blob) == (n + 7) // 8
    assert int.from_bytes(blob, "little") == (int.from_bytes(buf, "little") >> start) & ((1 << n) - 1)
    target = bytearray(len(buf))
    _native.bitmap_deserialize(target, start, n, blob)
    assert _native.bitmap_serialize(target, start, n) == blob
    assert _native.bitmap_count(target, 0, nbits) == _native.bitmap_count(buf, start, n)


@SETTINGS
@given(buf=sparse_bytes(), data=st.data())
def test_zero_detection_same(buf, data):
    buf = buf[:len(buf) - data.draw(st.integers(0, min(7, len(buf))))]   # any length
    offset = data.draw(mostly(st.integers(0, len(buf)), st.sampled_from([-1, 1 << 64])))
    length = data.draw(mostly(st.one_of(st.none(), st.integers(0, max(0, len(buf) - offset))),
                              st.integers(-1, len(buf) + 1)))
    same("buffer_is_zero", buf, offset, length)
    same("buffer_is_zero", bytes(buf))
    same("zero_runs", buf, data.draw(mostly(st.integers(1, 70), st.sampled_from([0, -1]))))


# ------------------------------------------------------ backend selection
def test_native_built_in_ci():
    """In CI the compiled module must exist and be the default backend."""
    _require_native()
    if os.environ.get("BLOCKENGINE_PURE", "") in ("", "0"):
        assert _native.BACKEND == "native"
        assert _native.l2_scan is NAT.l2_scan


def _backend_in_subprocess(**env):
    environ = {k: v for k, v in os.environ.items() if k != "BLOCKENGINE_PURE"}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", "import blockengine._native as n; print(n.BACKEND)"],
        env=environ, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pure_env_selects_python():
    assert _backend_in_subprocess(BLOCKENGINE_PURE="1") == "python"


def test_default_backend_is_native_when_built():
    _require_native()
    assert _backend_in_subprocess() == "native"


def test_python_backend_has_the_same_api():
    _require_native()
    for name in _native._API_NAMES:
        assert callable(getattr(PY, name)) and callable(getattr(NAT, name))
        assert getattr(NAT, name).__doc__ == getattr(PY, name).__doc__


def test_large_buffers_by_hand(be):
    """Beyond one internal chunk (64 KiB) of the Python twins and 1024
    result records of the native wrappers."""
    bitmap = bytearray(1 << 18)                       # 2 Mi bits
    assert be.bitmap_next_set(bitmap, 0, 1 << 21) == -1
    for bit in (0, 1 << 19, (1 << 19) + 1, (1 << 21) - 1):
        be.bitmap_set_range(bitmap, bit, 1)
    assert be.bitmap_next_set(bitmap, 1, 1 << 21) == 1 << 19
    assert be.bitmap_next_set(bitmap, (1 << 19) + 2, 1 << 21) == (1 << 21) - 1
    assert be.bitmap_count(bitmap, 0, 1 << 21) == 4
    be.bitmap_set_range(bitmap, 100, (1 << 20) - 100)
    assert be.bitmap_next_clear(bitmap, 100, 1 << 21) == 1 << 20
    assert be.bitmap_next_dirty_area(bitmap, 50, 1 << 21, 1 << 30) == (100, (1 << 20) - 100)
    data = bytearray(3 << 20)
    assert be.buffer_is_zero(data)
    data[-1] = 1
    assert not be.buffer_is_zero(data)
    assert be.buffer_is_zero(data, 0, len(data) - 1)
    assert be.zero_runs(data, 1 << 20) == [(0, 2 << 20, True), (2 << 20, 1 << 20, False)]


# ------------------------------------------------ check: bulk L2 walks of `img check`
@st.composite
def check_tables(draw, extended):
    """An L2 table whose host clusters mostly fall inside a small IMRT, with now and
    then an entry the per-entry walk must report (reserved bits, compressed,
    misaligned, beyond the file or the IMRT, broken subcluster bitmap)."""
    cb = draw(st.integers(9, 16))
    imrt_n = draw(st.integers(1, 64))
    n = draw(st.integers(0, 24))
    entries = []
    for _ in range(n):
        copied = draw(st.booleans()) << 63
        host = draw(st.integers(1, imrt_n - 1)) if imrt_n > 1 else 0
        kind = draw(st.sampled_from(["unalloc", "normal", "normal", "normal", "zero",
                                     "zalloc", "odd"]))
        if kind == "unalloc":
            e = copied
        elif kind == "normal":
            e = copied | host << cb
        elif kind == "zero":
            e = copied | 1
        elif kind == "zalloc":
            e = copied | 1 | host << cb
        else:
            e = draw(st.sampled_from([1 << 62 | host << cb, 1 << 40 | host << cb,
                                      (host << cb) + 512, imrt_n + 3 << cb, 1 << 57]))
        bm = draw(st.sampled_from([0, 0, 0xFFFFFFFF, 1 << 32, 3 | 3 << 32])) if extended else 0
        entries.append((e, bm))
    fmt = ">QQ" if extended else ">Q"
    table = b"".join(struct.pack(fmt, *((e, bm) if extended else (e,))) for e, bm in entries)
    order = draw(st.integers(0, 6))
    imrt = bytearray(max(8, -(-(imrt_n << order) // 64) * 8))
    for i in draw(st.lists(st.integers(0, imrt_n - 1), max_size=8)):
        PY.refcount_set_range(imrt, order, i, 1, draw(st.sampled_from(
            [1, (1 << (1 << order)) - 1, min(2, (1 << (1 << order)) - 1)])))
    file_len = draw(st.sampled_from([imrt_n << cb, (imrt_n - 2) << cb, 1 << 62]))
    return table, n, cb, file_len, imrt, order, imrt_n


@SETTINGS
@given(data=st.data(), extended=st.booleans())
def test_check_l2_same(data, extended):
    table, n, cb, file_len, imrt, order, imrt_n = data.draw(check_tables(extended))
    same("check_l2", table, n, extended, cb, file_len, imrt, order, imrt_n)
    same("l2_copied_mismatches", table, n, extended, cb, imrt, order, imrt_n)


def test_check_l2_by_hand(be):
    cb = 16
    # clusters 2, 3 (contiguous), 7 (a jump), a zero-alloc 9; unallocated/zero skipped
    table = _l2(COPIED | 2 << cb, COPIED | 3 << cb, 0, 1, 7 << cb, 1 | 9 << cb)
    imrt = bytearray(32)                # 16-bit refcounts of clusters 0..15
    assert be.check_l2(table, 6, False, cb, 16 << cb, imrt, 4, 16) == (4, 2)
    assert [be.refcount_get(imrt, 4, i) for i in (2, 3, 7, 9, 5)] == [1, 1, 1, 1, 0]
    # refcount 1 where COPIED is clear (7, 9), none where it is set
    assert be.l2_copied_mismatches(table, 6, False, cb, imrt, 4, 16) == [4, 5]
    # a second reference of cluster 3 overflows 1-bit refcounts: nothing changes
    one_bit = bytearray(8)
    dup = _l2(2 << cb, 3 << cb, 3 << cb)
    assert be.check_l2(dup, 3, False, cb, 16 << cb, one_bit, 0, 16) is None
    assert one_bit == bytearray(8)
    # entries needing a message: reserved bits, compressed, misaligned, past the file
    for bad in (1 << 40 | 2 << cb, COMPRESSED | 2 << cb, (2 << cb) + 512, 20 << cb):
        fresh = bytearray(32)
        assert be.check_l2(_l2(2 << cb, bad), 2, False, cb, 16 << cb, fresh, 4, 16) is None
        assert fresh == bytearray(32)
    # an extended entry whose subcluster is both allocated and zero
    ext = struct.pack(">QQ", 2 << cb, 1 | 1 << 32)
    assert be.check_l2(ext, 1, True, cb, 16 << cb, bytearray(32), 4, 16) is None
    with pytest.raises(ValueError):
        be.check_l2(table, 7, False, cb, 16 << cb, bytearray(32), 4, 16)


@SETTINGS
@given(a=sparse_bytes(max_words=16), data=st.data())
def test_buffers_equal_same(a, data):
    b = bytearray(a)
    if b and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        b = b[:data.draw(st.integers(0, len(b)))]
    result = same("buffers_equal", a, b)
    assert result == ("ok", bytes(a) == bytes(b))


def test_io_buffer_is_aligned_zeroed_and_writable():
    import ctypes
    from blockengine.io.buffers import HUGE_PAGE, io_buffer
    for size in (4096, HUGE_PAGE, 3 * HUGE_PAGE + 512):
        buf = io_buffer(size)
        assert (len(buf), buf.format, buf.readonly) == (size, "B", False)
        assert _native.buffer_is_zero(buf)
        buf[-3:] = b"end"
        assert bytes(buf[-3:]) == b"end"
        if size >= HUGE_PAGE:
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            assert address % HUGE_PAGE == 0
