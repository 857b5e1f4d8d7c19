#!/usr/bin/env python3
"""blockengine as a qcow2 *library* against libqcow-python (pyqcow) and dissect.hypervisor.

Whole-image sequential reads (2 MiB buffers) and random 4 KiB reads on the same qcow2
image; prints the best of --repeat rounds (readers take turns within a round, so load
from other processes hits them alike) as wall and CPU seconds, and the blockengine /
other ratios.  The other readers are optional (pip install libqcow-python
dissect.hypervisor); missing ones are reported and skipped.  All readers must return
identical data (checked).

    python bench/compare_readers.py [--size-mib 512] [--reads 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

CHUNK = 2 << 20


def make_image(work: str, size: int) -> str:
    from compare_qemu import make_raw
    raw, qcow2 = os.path.join(work, "src.raw"), os.path.join(work, "src.qcow2")
    make_raw(raw, size, data_fraction=0.5)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
    return qcow2


class Blockengine:
    name = "blockengine"

    def __init__(self, path):
        import blockengine
        self.img = blockengine.open(path, "qcow2", read_only=True)
        self.size = self.img.size

    def read(self, offset, length):
        return self.img.read(offset, length)

    def close(self):
        self.img.close()


class PyQcow:
    name = "libqcow-python"

    def __init__(self, path):
        import pyqcow
        self.f = pyqcow.file()
        self.f.open(path)
        self.size = self.f.get_media_size()

    def read(self, offset, length):
        return self.f.read_buffer_at_offset(length, offset)

    def close(self):
        self.f.close()


class Dissect:
    name = "dissect.hypervisor"

    def __init__(self, path):
        from dissect.hypervisor.disk.qcow2 import QCow2
        self.fh = open(path, "rb")
        self.stream = QCow2(self.fh).open()
        self.size = self.stream.size

    def read(self, offset, length):
        self.stream.seek(offset)
        return self.stream.read(length)

    def close(self):
        self.fh.close()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def best(a: tuple[float, float] | None, b: tuple[float, float]) -> tuple[float, float]:
    return b if a is None else (min(a[0], b[0]), min(a[1], b[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3, help="rounds (best one counts)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="be-readers-") as work:
        path = make_image(work, args.size_mib << 20)
        with open(path, "rb") as f:       # page cache warm for every reader alike
            while f.read(1 << 24):
                pass
        size = args.size_mib << 20
        readers, reference = [], None
        for cls in (Blockengine, PyQcow, Dissect):
            try:
                reader = cls(path)
            except ImportError as e:
                print(f"{cls.name}: not installed ({e})")
                continue
            # correctness, before timing: every reader returns the same data
            offsets = random_offsets(random.Random(7), size, args.reads)
            digest = [hashlib.sha1(reader.read(o, min(CHUNK, size - o))).digest()
                      for o in range(0, size, CHUNK)]
            sample = [bytes(reader.read(o, 4096)) for o in offsets[:200]]
            if reference is None:
                reference = (digest, sample)
            elif (digest, sample) != reference:
                print(f"{cls.name}: DATA DIFFERS from blockengine")
                return 1
            readers.append(reader)
        results = {r.name: [None, None] for r in readers}
        for round_no in range(args.repeat):
            # fresh offsets each round: a repeated set would find its pages hot in the
            # CPU caches; each buffer is dropped after its read, as a consumer streaming
            # the image would (keeping them all would time the kernel's page allocation)
            offsets = random_offsets(random.Random(round_no), size, args.reads)
            order = readers if round_no % 2 == 0 else readers[::-1]
            for reader in order:
                whole = timed(lambda: [len(reader.read(o, min(CHUNK, size - o)))
                                       for o in range(0, size, CHUNK)])
                rand = timed(lambda: [len(reader.read(o, 4096)) for o in offsets])
                res = results[reader.name]
                res[0], res[1] = best(res[0], whole), best(res[1], rand)
        for reader in readers:
            reader.close()
        (be_whole, be_whole_cpu), (be_rand, be_rand_cpu) = results["blockengine"]
        print(f"best of {args.repeat} rounds; seconds wall (CPU); ratio blockengine/reader")
        print(f"{'reader':20} {'whole image s':>15} {'random 4K s':>15} "
              f"{'be/whole':>11} {'be/random':>11}")
        for name, ((whole, whole_cpu), (rand, rand_cpu)) in results.items():
            print(f"{name:20} {whole:6.3f} ({whole_cpu:6.3f}) {rand:6.3f} ({rand_cpu:6.3f}) "
                  f"{be_whole / whole:4.2f} ({be_whole_cpu / whole_cpu:4.2f}) "
                  f"{be_rand / rand:4.2f} ({be_rand_cpu / rand_cpu:4.2f})")
    return 0


def random_offsets(rng: random.Random, size: int, count: int) -> list[int]:
    return [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]


if __name__ == "__main__":
    sys.exit(main())
