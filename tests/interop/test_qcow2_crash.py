"""Crash consistency of the qcow2 driver under a simulated host crash.

The ``crash-inject`` filter sits between qcow2 and the image file and models the
page cache: writes become durable only at a flush; at the crash (after the Nth
write) none, or a random subset, of the unflushed writes reach the file.  For every
crash point of randomized workloads the real ``qemu-img check`` must report no
corruption (leaks are allowed), and everything flushed before the crash must read
back intact.  With lazy refcounts the dirty image is repaired when it is opened.
"""
from __future__ import annotations

import json
import random
import subprocess

import pytest

from blockengine.errors import BlockError
from blockengine.graph.graph import Graph
from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

BLOCK = 4096
SIZE = 4 << 20


def workload(seed: int, n_ops: int = 14):
    rng = random.Random(seed)
    ops = []
    for _ in range(n_ops):
        r = rng.random()
        off = rng.randrange(SIZE // BLOCK) * BLOCK
        n = rng.choice((1, 1, 2, 5, 17)) * BLOCK
        n = min(n, SIZE - off)
        if r < 0.6:
            ops.append(("write", off, n, rng.randrange(1, 256)))
        elif r < 0.7:
            ops.append(("zero", off, n, 0))
        elif r < 0.78:
            ops.append(("discard", off, n, 0))
        else:
            ops.append(("flush", 0, 0, 0))
    return ops


def run(path, ops, crash_after=-1, mode="drop", seed=0, lazy=None):
    """Apply ops through crash-inject; returns (writes seen, flushed model, dirty blocks)."""
    g = Graph()
    opts = {"driver": "qcow2", "node-name": "disk",
            "file": {"driver": "crash-inject", "crash-after": crash_after, "mode": mode,
                     "seed": seed, "file": {"driver": "file", "filename": str(path)}}}
    if lazy is not None:
        opts["lazy-refcounts"] = lazy
    node = g.open_node(opts)
    filt = node.file_child_node().drv
    model = {}          # block -> fill byte (0 = zeroes), current guest contents
    flushed = {}        # contents as of the last successful flush
    dirty = set()       # blocks written since the last flush
    try:
        for kind, off, n, fill in ops:
            blocks = range(off // BLOCK, (off + n) // BLOCK)
            dirty.update(blocks)
            if kind == "write":
                node.pwrite(off, bytes([fill]) * n)
                for b in blocks:
                    model[b] = fill
            elif kind == "zero":
                node.pwrite_zeroes(off, n, True)
                for b in blocks:
                    model[b] = 0
            elif kind == "discard":
                node.discard(off, n)    # contents unspecified afterwards
            else:
                node.flush()
                flushed = dict(model)
                dirty = set()
                continue
        node.flush()
        flushed = dict(model)
        dirty = set()
    except BlockError:
        assert filt.crashed
    return close_crashed(g, filt), flushed, dirty


def close_crashed(graph, crash_filter) -> int:
    """The writes a crash-injected run got through, with its graph closed (a crashed
    file fails the closing flushes, which do not matter here)."""
    writes = crash_filter.writes
    try:
        graph.close_all()
    except BlockError:
        pass
    return writes


def discarded(ops):
    return {b for kind, off, n, _ in ops if kind == "discard"
            for b in range(off // BLOCK, (off + n) // BLOCK)}


def verify(path, flushed, dirty, skip):
    g = Graph()
    node = g.open_node({"driver": "qcow2", "read-only": True,
                        "file": {"driver": "file", "filename": str(path)}})
    try:
        for b in range(SIZE // BLOCK):
            if b in dirty or b in skip:
                continue
            want = bytes([flushed.get(b, 0)]) * BLOCK
            got = node.pread(b * BLOCK, BLOCK)
            assert got == want, "block %d lost flushed data" % b
    finally:
        g.close_all()


def qcheck(path):
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                       capture_output=True, text=True)
    assert r.returncode in (0, 3), (r.returncode, r.stdout, r.stderr)
    info = json.loads(r.stdout)
    assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, info
    return info


@pytest.fixture
def base(tmp_path):
    require_tool("qemu-img")

    def make(**o):
        p = tmp_path / ("base%d.qcow2" % random.randrange(1 << 30))
        opts = ",".join("%s=%s" % kv for kv in o.items())
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"]
                       + (["-o", opts] if opts else []) + [str(p), str(SIZE)], check=True)
        return p
    return make


@pytest.mark.parametrize("seed,mode,opts", [
    (1, "drop", {"cluster_size": 4096}),
    (2, "random", {"cluster_size": 4096}),
    (3, "random", {}),
    (4, "random", {"cluster_size": 4096, "refcount_bits": 1}),
    (5, "keep", {"cluster_size": 65536, "extended_l2": "on"}),
])
def test_every_crash_point(tmp_path, base, seed, mode, opts):
    src = base(**opts)
    ops = workload(seed)
    total, _, _ = run(copy_sparse(src, tmp_path / "probe.qcow2"), ops)
    assert total > 0
    skip = discarded(ops)
    for n in range(1, total + 1):
        img = copy_sparse(src, tmp_path / ("crash%d.qcow2" % n))
        _, flushed, dirty = run(img, ops, crash_after=n, mode=mode, seed=seed * 1000 + n)
        qcheck(img)
        verify(img, flushed, dirty, skip)
        (tmp_path / ("crash%d.qcow2" % n)).unlink()


# Random write-back is not used here: with lazy refcounts neither QEMU nor blockengine
# orders a data write before the L2 update that references it, so an L2 entry may
# reach the disk pointing past the end of the file (what QEMU would leave, too).
@pytest.mark.parametrize("seed,mode", [(7, "drop"), (8, "keep")])
def test_lazy_refcounts_crash_repaired_on_open(tmp_path, base, seed, mode):
    src = base(cluster_size=4096, lazy_refcounts="on")
    ops = [op for op in workload(seed, 10) if op[0] != "discard"]
    total, _, _ = run(copy_sparse(src, tmp_path / "probe.qcow2"), ops)
    repaired = 0
    for n in range(1, total + 1):
        img = copy_sparse(src, tmp_path / ("lazy%d.qcow2" % n))
        _, flushed, dirty = run(img, ops, crash_after=n, mode=mode, seed=n)
        was_dirty = int.from_bytes(open(img, "rb").read(80)[72:80], "big") & 1
        # a writable open of a dirty image repairs it (qcow2_do_open's check -r all)
        g = Graph()
        g.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(img)}})
        g.close_all()
        info = qcheck(img)
        hdr = open(img, "rb").read(80)
        assert not int.from_bytes(hdr[72:80], "big") & 1     # dirty bit cleared
        if was_dirty:
            repaired += 1
            assert info.get("leaks", 0) == 0
        verify(img, flushed, dirty, set())
    assert repaired
