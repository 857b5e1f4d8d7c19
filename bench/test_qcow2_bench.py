"""qcow2 through the library: 4 KiB random I/O on a 1 GiB sparse image (pytest-benchmark).

    pytest bench/test_qcow2_bench.py --benchmark-group-by=func

The image is pre-filled over its first 256 MiB so that reads hit allocated clusters
(one L2 lookup + one host read each) and writes overwrite clusters in place
(OFLAG_COPIED); ``alloc`` writes land in unallocated clusters (allocation + COW).
"""
import random

import pytest

import blockengine
from blockengine.drivers.format.qcow2.driver import Qcow2Driver

GiB = 1 << 30
FILLED = 256 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qcow2bench") / "bench.qcow2")
    Qcow2Driver.create(path, GiB, {})
    with blockengine.open(path, "qcow2") as img:
        chunk = random.Random(0).randbytes(1 << 20)
        for off in range(0, FILLED, 1 << 20):
            img.write(off, chunk)
    img = blockengine.open(path, "qcow2")
    yield img
    img.close()


def test_read_4k_random(benchmark, image):
    r = random.Random(1)
    offs = [r.randrange(0, FILLED // 4096) * 4096 for _ in range(4096)]
    it = iter(offs * 1000)
    benchmark(lambda: image.read(next(it), 4096))


def test_read_4k_random_unallocated(benchmark, image):
    r = random.Random(2)
    offs = [FILLED + r.randrange(0, (GiB - FILLED) // 4096) * 4096 for _ in range(4096)]
    it = iter(offs * 1000)
    benchmark(lambda: image.read(next(it), 4096))


def test_write_4k_random_overwrite(benchmark, image):
    r = random.Random(3)
    offs = [r.randrange(0, FILLED // 4096) * 4096 for _ in range(4096)]
    it = iter(offs * 1000)
    buf = bytes(range(256)) * 16
    benchmark(lambda: image.write(next(it), buf))


def test_write_4k_random_alloc(benchmark, image):
    r = random.Random(4)
    offs = [FILLED + r.randrange(0, (GiB - FILLED) // 4096) * 4096 for _ in range(100000)]
    it = iter(offs)
    buf = bytes(range(256)) * 16
    benchmark.pedantic(lambda: image.write(next(it), buf), rounds=2000, iterations=1)
