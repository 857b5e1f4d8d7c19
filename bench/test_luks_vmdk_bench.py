"""LUKS payload encryption and VMDK grain I/O throughput (pytest-benchmark).

    pytest bench/test_luks_vmdk_bench.py --benchmark-group-by=func

LUKS: 4 MiB through SectorCipher (one cryptography cipher context per 512-byte
sector for XTS/CBC/CTR; ECB in one call) and through the driver.  VMDK: 4 MiB
sequential writes and reads on monolithicSparse, monolithicFlat and streamOptimized.
"""
import os

import pytest

from blockengine.crypto.cipher import SectorCipher
from blockengine.drivers.format.luks.driver import LuksDriver
from blockengine.drivers.format.vmdk import VmdkDriver
from blockengine.graph.graph import Graph

MiB = 1 << 20
DATA = os.urandom(4 * MiB)


@pytest.mark.parametrize("mode,ivgen,keylen", [("xts", "plain64", 64), ("cbc", "essiv", 32),
                                              ("ctr", "plain64", 32), ("ecb", "plain64", 32)])
@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
def test_sector_cipher(benchmark, mode, ivgen, keylen, op):
    sc = SectorCipher("aes-256", mode, os.urandom(keylen), ivgen,
                      "sha256" if ivgen == "essiv" else None)
    fn = sc.encrypt if op == "encrypt" else sc.decrypt
    benchmark(fn, 0, DATA)


@pytest.fixture
def luks_node(tmp_path):
    p = tmp_path / "b.luks"
    LuksDriver.create(str(p), 8 * MiB, {"key-secret": "s", "iter-time": 5},
                      secrets={"s": b"pw"})
    g = Graph()
    g.secrets = {"s": b"pw"}
    node = g.open_node({"driver": "luks", "key-secret": "s",
                        "file": {"driver": "file", "filename": str(p)}})
    yield node
    g.close_all()


def test_luks_driver_write(benchmark, luks_node):
    benchmark(luks_node.pwrite, 0, DATA)


def test_luks_driver_read(benchmark, luks_node):
    luks_node.pwrite(0, DATA)
    benchmark(luks_node.pread, 0, len(DATA))


@pytest.mark.parametrize("sub", ["monolithicSparse", "monolithicFlat"])
def test_vmdk_write_read(benchmark, tmp_path, sub):
    p = tmp_path / "b.vmdk"
    VmdkDriver.create(str(p), 64 * MiB, {"subformat": sub})
    g = Graph()
    node = g.open_node({"driver": "vmdk", "file": {"driver": "file", "filename": str(p)}})
    try:
        pos = [0]

        def run():
            node.pwrite(pos[0], DATA)
            assert node.pread(pos[0], len(DATA)) == DATA
            pos[0] = (pos[0] + len(DATA)) % (64 * MiB)
        benchmark(run)
    finally:
        g.close_all()


def test_vmdk_stream_optimized_write(benchmark, tmp_path):
    counter = [0]

    def run():
        counter[0] += 1
        p = tmp_path / ("s%d.vmdk" % counter[0])
        VmdkDriver.create(str(p), 4 * MiB, {"subformat": "streamOptimized"})
        g = Graph()
        node = g.open_node({"driver": "vmdk",
                            "file": {"driver": "file", "filename": str(p)}})
        node.pwrite(0, DATA)
        g.close_all()
    benchmark(run)
