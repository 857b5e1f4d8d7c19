"""pytest-benchmark cases for raw images through the library (run: pytest bench/)."""
import os
import random

import pytest

import blockengine

SIZE = 256 << 20


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(64 << 20))
    return str(path)


def test_random_4k_reads(benchmark, raw_image):
    rng = random.Random(1)
    offsets = [rng.randrange(0, SIZE // 4096) * 4096 for _ in range(2000)]
    buf = bytearray(4096)
    with blockengine.open(raw_image, "raw", read_only=True) as img:
        def reads():
            for off in offsets:
                img.readinto(off, buf)
        benchmark(reads)


def test_random_4k_writes(benchmark, raw_image):
    rng = random.Random(2)
    offsets = [rng.randrange(0, SIZE // 4096) * 4096 for _ in range(2000)]
    data = os.urandom(4096)
    with blockengine.open(raw_image, "raw") as img:
        def writes():
            for off in offsets:
                img.write(off, data)
        benchmark(writes)


def test_sequential_read_whole_image(benchmark, raw_image):
    buf = bytearray(2 << 20)
    with blockengine.open(raw_image, "raw", read_only=True) as img:
        def read_all():
            for off in range(0, SIZE, len(buf)):
                img.readinto(off, buf)
        benchmark.pedantic(read_all, rounds=3)


def test_convert_raw_to_raw(benchmark, raw_image, tmp_path):
    from blockengine.cli.main import main
    out = str(tmp_path / "out.raw")
    benchmark.pedantic(lambda: main(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                     raw_image, out]), rounds=2)
