"""Native vs pure-Python hot paths (pytest-benchmark).

    pytest bench/test_native_bench.py --benchmark-group-by=func

Each case runs on both backends; the ``native`` ones are skipped when
``blockengine._be_native`` is not built (a failure when CI=true).
"""
import os
import random
import struct

import pytest

from blockengine import _native
from blockengine import _pynative

NAT = _native.native_api()


@pytest.fixture(params=["native", "python"])
def impl(request):
    if request.param == "python":
        return _pynative
    if NAT is None:
        message = f"native module not built ({_native.NATIVE_IMPORT_ERROR})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return NAT


def _l2_table(n_entries=65536, cluster_bits=19, seed=42):
    """A plausible L2 table: allocated runs of 1..64 clusters (sometimes
    shared, i.e. without COPIED), holes, zero clusters and a few compressed
    ones."""
    rng = random.Random(seed)
    entries = []
    next_host = 1 << 30
    while len(entries) < n_entries:
        kind = rng.random()
        length = rng.randint(1, 64)
        if kind < 0.6:
            copied = (1 << 63) if rng.random() < 0.9 else 0
            entries += [copied | (next_host + (i << cluster_bits)) for i in range(length)]
            next_host += (length + rng.randint(0, 3)) << cluster_bits
        elif kind < 0.8:
            entries += [0] * length
        elif kind < 0.95:
            entries += [1] * length
        else:
            entries += [(1 << 62) | (next_host + 512 * i) for i in range(min(length, 4))]
            next_host += 1 << cluster_bits
    return struct.pack(f">{n_entries}Q", *entries[:n_entries])


L2_TABLE = _l2_table()


def test_bench_l2_scan_64k(benchmark, impl):
    runs = benchmark(impl.l2_scan, L2_TABLE, 0, 65536, False, 19)
    assert sum(r[1] for r in runs) == 65536


# 1 TiB disk at 64 KiB granularity: 2^24 bits = 2 MiB of bitmap
BITMAP = bytearray(1 << 21)
BITMAP[-1] = 0x80


def test_bench_bitmap_next_set_1tib(benchmark, impl):
    found = benchmark(impl.bitmap_next_set, BITMAP, 0, 1 << 24)
    assert found == (1 << 24) - 1


ZERO_2M = bytes(2 << 20)


def test_bench_buffer_is_zero_2m(benchmark, impl):
    assert benchmark(impl.buffer_is_zero, ZERO_2M, 0, len(ZERO_2M)) is True
