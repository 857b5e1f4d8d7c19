"""Compressed qcow2 clusters written by blockengine, against QEMU 7.2.

* ``img convert -c`` writes byte-identical files to qemu-img's (zlib and zstd, cluster
  sizes from 512 B to 2 MiB, extended L2, compat=0.10, refcount_bits=1, unaligned image
  sizes, -S 0, a backing file) and the same errors;
* ``img check``/``map``/``info`` of compressed images print what qemu-img prints;
* ``io write -c`` matches qemu-io's output and leaves the same file;
* random mixes of compressed writes, overwrites, zero writes and discards keep the
  image clean for ``qemu-img check`` and equal to a bytearray model (hypothesis);
* a crash at any write of such a workload leaves no corruption (crash-inject).

QEMU compresses the clusters of one request in parallel threads and allocates them in
the order the threads finish, so multi-cluster ``write -c`` requests are compared by
content; qemu-img convert writes one cluster per request (in order), so its files are
deterministic and compared byte for byte.
"""
from __future__ import annotations

import errno
import json
import random
import subprocess

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, rule,
                                 run_state_machine_as_test)

import blockengine
from blockengine.drivers.format.qcow2.compress import _system_zstd, compress
from blockengine.drivers.format.qcow2.layout import SC_UNALLOCATED_PLAIN, SC_ZERO_PLAIN
from blockengine.errors import BlockError
from blockengine.graph.graph import Graph
from tests.interop.test_io_cli import Pair, cmds
from tests.interop.test_qcow2_crash import close_crashed
from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
SRC_SIZE = 3 * MiB


def source_data(size: int, seed: int = 1) -> bytes:
    """4 KiB runs of zeroes, random bytes (incompressible), text and one repeated byte."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rnd.randrange(5)
        if kind == 0:
            out += bytes(4096)
        elif kind == 1:
            out += rnd.randbytes(4096)
        elif kind == 2:
            out += bytes([rnd.randrange(256)]) * 4096
        else:
            out += (b"cluster text %d " % len(out) * 300)[:4096]
    return bytes(out[:size])


def qimg(*args, cwd=None):
    return subprocess.run([require_tool("qemu-img"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, check=True)


def _prepare(d):
    (d / "src.raw").write_bytes(source_data(SRC_SIZE))
    (d / "odd.raw").write_bytes(source_data(SRC_SIZE - 1536, seed=2))
    with open(d / "sparse.raw", "wb") as f:         # holes: zero block status runs
        f.truncate(8 * MiB)
        f.seek(3 * MiB + 1024)
        f.write(source_data(MiB + 4096, seed=3))
    # an overlay whose unallocated clusters must stay unallocated with -B
    qimg("convert", "-O", "qcow2", "src.raw", "base.qcow2", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
         cwd=d)
    subprocess.run([require_tool("qemu-io"), "-c", "write -P 7 64k 192k", "-c",
                    "write -P 0 1M 128k", "-c", "write -z 2M 64k", "top.qcow2"],
                   cwd=d, capture_output=True, check=True)


def _zstd(opts: str) -> bool:
    return "zstd" in opts


CONVERT_CASES = {
    "zlib-64k": ["src.raw"],
    "zlib-512": ["-o", "cluster_size=512", "odd.raw"],
    "zlib-2M": ["-o", "cluster_size=2M", "odd.raw"],
    "zlib-4k-odd": ["-o", "cluster_size=4k", "odd.raw"],
    "zstd-64k": ["-o", "compression_type=zstd", "src.raw"],
    "zstd-4k-odd": ["-o", "compression_type=zstd,cluster_size=4k", "odd.raw"],
    "extended-l2": ["-o", "extended_l2=on", "odd.raw"],
    "extended-l2-zstd-1M": ["-o", "extended_l2=on,cluster_size=1M,compression_type=zstd",
                            "src.raw"],
    "compat-0.10": ["-o", "compat=0.10", "odd.raw"],
    "refcount-bits-1": ["-o", "refcount_bits=1,cluster_size=4k", "src.raw"],
    "no-sparse": ["-S", "0", "-o", "cluster_size=8k", "src.raw"],
    "backing": ["-B", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    "backing-zstd": ["-B", "base.qcow2", "-F", "qcow2", "-o", "compression_type=zstd",
                     "top.qcow2"],
    "qcow2-source": ["-o", "cluster_size=16k", "top.qcow2"],
    "progress": ["-p", "-o", "cluster_size=1M", "odd.raw"],
    "holes": ["-p", "-o", "cluster_size=4k", "sparse.raw"],
    "holes-no-sparse": ["-p", "-S", "0", "-o", "cluster_size=4k", "sparse.raw"],
    "holes-no-sparse-2M": ["-S", "0", "-o", "cluster_size=2M", "sparse.raw"],
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_c_byte_identical(run_both, case):
    args = CONVERT_CASES[case]
    both = run_both(["convert", "-c", "-O", "qcow2", *args, "out.qcow2"], prepare=_prepare)
    both.assert_same()
    assert both.ref.returncode == 0, both.ref.stderr
    ref = (both.ref_dir / "out.qcow2").read_bytes()
    ours = (both.our_dir / "out.qcow2").read_bytes()
    if _zstd(" ".join(args)) and _system_zstd() is None:
        # python-zstandard's bundled libzstd may compress differently from QEMU's
        qimg("compare", both.ref_dir / "out.qcow2", both.our_dir / "out.qcow2")
        info = json.loads(qimg("check", "--output=json", both.our_dir / "out.qcow2").stdout)
        assert info["compressed-clusters"] > 0
        return
    assert ours == ref
    info = json.loads(qimg("check", "--output=json", both.our_dir / "out.qcow2").stdout)
    assert info["compressed-clusters"] > 0


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "-o", "data_file=df.raw"],             # ENOTSUP from the write
    ["-O", "raw"],
    ["-O", "qcow2", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "-o", "compat=0.10,compression_type=zstd"],
    ["-O", "qcow2", "-o", "encrypt.format=luks"],
    ["-O", "qcow2", "-C"],
], ids=["data-file", "raw", "prealloc", "v2-zstd", "encrypted", "copy-range"])
def test_convert_c_errors(run_both, args):
    both = run_both(["convert", "-c", *args, "src.raw", "out.qcow2"], prepare=_prepare)
    both.assert_same()
    assert both.ref.returncode == 1


def test_convert_c_into_allocated_target(run_both):
    """-n into an image with data: compressed writes cannot overwrite (EIO), named at
    the failing cluster; the clusters before it are written as in qemu-img."""
    def prepare(d):
        _prepare(d)
        qimg("create", "-q", "-f", "qcow2", "t.qcow2", SRC_SIZE, cwd=d)
        subprocess.run([require_tool("qemu-io"), "-c", "write 1M 64k", "t.qcow2"], cwd=d,
                       capture_output=True, check=True)
    both = run_both(["convert", "-n", "-c", "-O", "qcow2", "src.raw", "t.qcow2"],
                    prepare=prepare)
    both.assert_same()
    assert b"error while writing at byte 1048576" in both.ref.stderr
    assert (both.our_dir / "t.qcow2").read_bytes() == (both.ref_dir / "t.qcow2").read_bytes()


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_convert_c_vmdk(run_both, sub):
    """vmdk takes -c too (streamOptimized compresses every grain anyway)."""
    from tests.interop.test_vmdk_interop import _same_file
    both = run_both(["convert", "-c", "-O", "vmdk", "-o", "subformat=" + sub, "odd.raw",
                     "out.vmdk"], prepare=_prepare)
    both.assert_same()
    assert _same_file((both.our_dir / "out.vmdk").read_bytes(),
                      (both.ref_dir / "out.vmdk").read_bytes())


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,compression_type=zstd",
                                  "extended_l2=on", "compat=0.10"])
def test_check_map_info_of_compressed_images(run_both, opts):
    """img check (compressed-clusters), map and info of images qemu-img compressed."""
    def prepare(d):
        _prepare(d)
        qimg("convert", "-c", "-O", "qcow2", *(["-o", opts] if opts else []),
             "odd.raw", "x.qcow2", cwd=d)
    for args in (["check", "x.qcow2"], ["check", "--output=json", "x.qcow2"],
                 ["map", "x.qcow2"], ["map", "--output=json", "x.qcow2"],
                 ["info", "x.qcow2"], ["info", "--output=json", "x.qcow2"],
                 ["compare", "odd.raw", "x.qcow2"]):
        run_both(args, prepare=prepare).assert_same()


# ---- qemu-io write -c ----------------------------------------------------------------------
IO_SCRIPT = (
    "write -c -P 1 0 64k",
    "write -c 512 64k",          # unaligned offset: EINVAL
    "write -c 0 1k",             # partial cluster not at the end: EINVAL
    "write -c 0 64k",            # already allocated: EIO
    "write -c -P 2 64k 64k",     # packed after the first one
    "write -c -P 3 960k 40k",    # the last, partial cluster (padded with zeroes)
    "write -c -z 128k 64k",      # -z wins: a zero write
    "write -P 4 68k 4k",         # overwrite of a compressed cluster: COW, bytes freed
    "discard 0 64k",             # the compressed cluster's bytes freed
    "write -c -P 5 0 64k",       # a zero flag alone can be replaced
    "write -c -s rand.bin 256k 64k",   # incompressible: written as a normal cluster
    "write -c -P 6 320k 64k",
    "read -P 5 0 64k", "read -P 2 64k 4k", "read -P 4 68k 4k", "read -P 3 960k 40k",
    "read -P 1 0 64k",
    "map",
)


@pytest.mark.parametrize("opts", ["", "extended_l2=on", "compat=0.10",
                                  "compression_type=zstd", "cluster_size=4k",
                                  "refcount_bits=1"])
def test_io_write_c_matches_qemu_io(tmp_path, opts):
    pair = Pair(tmp_path)
    rand = random.Random(3).randbytes(64 * KiB)
    for d in pair.dirs.values():
        (d / "rand.bin").write_bytes(rand)
        qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), "c.qcow2",
             "1000k", cwd=d)
    rc, out, err = pair.compare(cmds(*IO_SCRIPT) + ["c.qcow2"])
    assert "wrote 65536/65536 bytes at offset 0" in out
    assert out.count("write failed: Invalid argument") == 2
    ref, ours = pair.read("qemu", "c.qcow2"), pair.read("ours", "c.qcow2")
    if "zstd" in opts and _system_zstd() is None or "cluster_size" in opts:
        # (with 4 KiB clusters the 64 KiB requests are multi-cluster: content only)
        qimg("compare", pair.dirs["qemu"] / "c.qcow2", pair.dirs["ours"] / "c.qcow2")
    else:
        assert ours == ref
    for side in ("qemu", "ours"):
        r = subprocess.run([require_tool("qemu-img"), "check", "c.qcow2"],
                           cwd=pair.dirs[side], capture_output=True, text=True)
        assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout


def test_io_write_c_multi_cluster(tmp_path):
    """A multi-cluster compressed request: the same contents and check results as
    qemu-io (QEMU's allocation order among its clusters depends on thread timing)."""
    pair = Pair(tmp_path)
    for d in pair.dirs.values():
        qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "c.qcow2", "1M",
             cwd=d)
    script = cmds("write -c -P 9 0 256k", "write -c 1020k 4k", "write -c 256k 8k",
                  "read -P 9 0 256k", "read -P 0xcd 256k 8k")
    pair.compare(script + ["c.qcow2"])
    qimg("compare", pair.dirs["qemu"] / "c.qcow2", pair.dirs["ours"] / "c.qcow2")
    checks = [json.loads(qimg("check", "--output=json", d / "c.qcow2").stdout)
              for d in pair.dirs.values()]
    assert checks[0] == dict(checks[1], filename=checks[0]["filename"])


def test_no_packing_into_a_reused_cluster(tmp_path):
    """QEMU 7.2 keeps packing compressed data after ``free_byte_offset`` even when that
    host cluster was freed and then allocated as a normal data cluster: its last
    command here overwrites guest data at 64k (qemu-io reports a pattern mismatch and
    qemu-img check a refcount error).  blockengine starts a new host cluster instead."""
    pair = Pair(tmp_path)
    for d in pair.dirs.values():
        qimg("create", "-q", "-f", "qcow2", "c.qcow2", "1M", cwd=d)
    script = cmds("write -c -P 1 0 64k", "write -P 2 0 64k", "write -P 3 64k 64k",
                  "write -c -P 4 128k 64k", "read -P 3 64k 64k", "read -P 4 128k 64k")
    _, ref_out, _ = pair.run("qemu", script + ["c.qcow2"])
    assert "Pattern verification failed at offset 65536" in ref_out    # QEMU's bug
    rc, out, err = pair.run("ours", script + ["c.qcow2"])
    assert rc == 0 and "Pattern verification failed" not in out, out
    info = json.loads(qimg("check", "--output=json", pair.dirs["ours"] / "c.qcow2").stdout)
    assert not info.get("corruptions") and not info.get("leaks"), info
    assert info["compressed-clusters"] == 1


def test_io_write_c_data_file(tmp_path):
    """Compressed writes need the clusters in the qcow2 file itself: ENOTSUP."""
    pair = Pair(tmp_path)
    for d in pair.dirs.values():
        qimg("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "c.qcow2", "1M",
             cwd=d)
    pair.compare(cmds("write -c 0 64k", "write -P 1 0 64k", "read -P 1 0 64k")
                 + ["c.qcow2"])


@pytest.mark.parametrize("size", ["1M", "1000k"])
def test_compress_filter_matches_qemu_io(tmp_path, size):
    """Plain writes through a ``compress`` filter node (--image-opts): padded to whole
    clusters, stored compressed; EIO over allocated clusters, ENOTSUP for write -c;
    an image size that is not a multiple of the cluster size refuses writing."""
    pair = Pair(tmp_path)
    for d in pair.dirs.values():
        qimg("create", "-q", "-f", "qcow2", "c.qcow2", size, cwd=d)
    opts = "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=c.qcow2"
    pair.compare(["--image-opts", *cmds(
        "write -P 1 0 64k", "write -P 2 64k 1k", "write -P 3 70k 1k", "write 960k 40k",
        "read -P 2 64k 1k", "read -P 0 65k 63k", "read -v 999k 16", "write -z 128k 64k",
        "write -P 5 0 64k", "write -P 6 192k 1k", "discard 192k 64k", "write -P 7 192k 64k",
        "write -c -P 8 320k 64k", "map"), opts])
    assert pair.read("ours", "c.qcow2") == pair.read("qemu", "c.qcow2")


# ---- random workloads: model and qemu-img check ---------------------------------------
class CompressedWorkload(RuleBasedStateMachine):
    """Compressed writes, normal (partial) writes, zero writes and discards on a qcow2
    image against a bytearray model; every few steps and at the end, the image must be
    clean for qemu-img check and read like the model."""

    path = None

    @initialize(layout=st.sampled_from([
        "cluster_size=4k", "cluster_size=512", "cluster_size=64k",
        "cluster_size=8k,compression_type=zstd", "cluster_size=64k,extended_l2=on",
        "cluster_size=4k,compat=0.10", "cluster_size=4k,refcount_bits=1",
        "cluster_size=4k,lazy_refcounts=on"]),
        clusters=st.integers(8, 40), tail=st.sampled_from([0, 512, 1536]))
    def setup(self, layout, clusters, tail):
        self.cs = int(layout.split(",")[0].split("=")[1].replace("k", "")) * (
            1024 if "k" in layout.split(",")[0] else 1)
        size = clusters * self.cs - (tail if tail < self.cs else 0)
        self.path.unlink(missing_ok=True)
        qimg("create", "-q", "-f", "qcow2", "-o", layout, self.path, size)
        self.img = blockengine.open(str(self.path), "qcow2")
        self.size = self.img.size
        self.model = bytearray(self.size)
        self.steps = 0
        self.rnd = random.Random(clusters * 7 + tail)

    def _data(self, n: int, kind: int) -> bytes:
        if kind == 0:
            return self.rnd.randbytes(n)                      # incompressible
        if kind == 1:
            return bytes([self.rnd.randrange(1, 256)]) * n
        return (b"%08x" % self.rnd.randrange(1 << 30)) * (n // 8) + bytes(n % 8)

    def _apply(self, offset: int, data: bytes) -> None:
        self.model[offset:offset + len(data)] = data

    @rule(cluster=st.integers(0, 1 << 20), count=st.integers(1, 3),
          kind=st.integers(0, 2))
    def compressed_write(self, cluster, count, kind):
        nclusters = -(-self.size // self.cs)
        first = cluster % nclusters
        count = min(count, nclusters - first)
        offset = first * self.cs
        n = min(count * self.cs, self.size - offset)
        # a compressed write fails (EIO) at the first cluster that has a host offset
        # and does compress (one that does not is written normally); the clusters
        # before that one are written
        drv = self.img.node.drv
        data = self._data(n, kind)
        writable = 0
        for i in range(count):
            t = drv.get_host_runs(offset + i * self.cs, 1)[0][1]
            chunk = data[i * self.cs:(i + 1) * self.cs]
            compresses = compress(chunk + bytes(self.cs - len(chunk)),
                                  drv.compression_type) is not None
            if compresses and t not in (SC_UNALLOCATED_PLAIN, SC_ZERO_PLAIN):
                break
            writable += 1
        try:
            self.img.write_compressed(offset, data)
            assert writable == count
        except BlockError as e:
            assert writable < count and e.errno == errno.EIO, e
        self._apply(offset, data[:writable * self.cs])
        self._step()

    @rule(offset=st.integers(0, 1 << 30), length=st.integers(1, 3 << 16),
          kind=st.integers(0, 2))
    def write(self, offset, length, kind):
        offset %= self.size
        length = min(length, self.size - offset)
        data = self._data(length, kind)
        self.img.write(offset, data)
        self._apply(offset, data)
        self._step()

    @rule(offset=st.integers(0, 1 << 30), length=st.integers(1, 3 << 16),
          unmap=st.booleans())
    def write_zeroes(self, offset, length, unmap):
        offset %= self.size
        length = min(length, self.size - offset)
        self.img.write_zeroes(offset, length, unmap)
        self._apply(offset, bytes(length))
        self._step()

    @rule(offset=st.integers(0, 1 << 30), length=st.integers(1, 3 << 16))
    def discard(self, offset, length):
        # without a backing file, discarded clusters read as zeroes (v3 zero flag,
        # v2 unallocated); only whole clusters are discarded
        offset %= self.size
        length = min(length, self.size - offset)
        self.img.discard(offset, length)
        start = -(-offset // self.cs) * self.cs
        end = offset + length
        end = end if end == self.size else end - end % self.cs
        if end > start:
            self._apply(start, bytes(end - start))
        self._step()

    def _step(self):
        self.steps += 1
        got = self.img.read(0, self.size)
        assert bytes(got) == bytes(self.model)
        if self.steps % 8 == 0:
            self.img.flush()
            self._qemu_check()

    def _qemu_check(self):
        r = subprocess.run([require_tool("qemu-img"), "check", "-U", "--output=json",
                            str(self.path)], capture_output=True, text=True)
        info = json.loads(r.stdout)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert not info.get("leaks") and not info.get("corruptions"), info

    def teardown(self):
        img = getattr(self, "img", None)
        if img is None:
            return
        img.close()
        self._qemu_check()
        raw = self.path.with_suffix(".raw")
        qimg("convert", "-O", "raw", self.path, raw)
        assert raw.read_bytes() == bytes(self.model)
        raw.unlink()


def test_random_compressed_workloads(tmp_path):
    require_tool("qemu-img")
    CompressedWorkload.path = tmp_path / "w.qcow2"
    run_state_machine_as_test(
        CompressedWorkload,
        settings=settings(max_examples=30, stateful_step_count=25, deadline=None,
                          suppress_health_check=list(HealthCheck)))


# ---- crash consistency -------------------------------------------------------------------
CRASH_BLOCK = 4096          # the cluster size of the crash images: one block, one cluster
CRASH_SIZE = 2 * MiB


def crash_workload(seed: int, n_ops: int = 16):
    """Compressed writes of fresh clusters (never written before) mixed with normal
    writes (some over compressed clusters), zero writes, discards and flushes."""
    rng = random.Random(seed)
    nblocks = CRASH_SIZE // CRASH_BLOCK
    fresh = set(range(nblocks))
    ops = []
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.45 and fresh:
            b = rng.choice(sorted(fresh))
            n = 1
            while n < 4 and b + n in fresh:
                n += 1
            fresh -= set(range(b, b + n))
            ops.append(("cwrite", b * CRASH_BLOCK, n * CRASH_BLOCK, rng.randrange(1, 256)))
            continue
        b = rng.randrange(nblocks)
        n = min(rng.choice((1, 2, 5)), nblocks - b)
        fresh -= set(range(b, b + n))
        if r < 0.7:
            ops.append(("write", b * CRASH_BLOCK, n * CRASH_BLOCK, rng.randrange(1, 256)))
        elif r < 0.8:
            ops.append(("zero", b * CRASH_BLOCK, n * CRASH_BLOCK, 0))
        elif r < 0.88:
            ops.append(("discard", b * CRASH_BLOCK, n * CRASH_BLOCK, 0))
        else:
            ops.append(("flush", 0, 0, 0))
    return ops


def _pattern(fill: int, n: int) -> bytes:
    """n bytes (a multiple of 256) that compress well and differ for each fill."""
    unit = (bytes([fill]) * 64 + b"compressible %d " % fill * 16)[:256]
    return unit * (n // 256)


def crash_run(path, ops, crash_after=-1, mode="drop", seed=0):
    """Apply ops through crash-inject; returns (writes seen, flushed model, dirty)."""
    g = Graph()
    node = g.open_node({
        "driver": "qcow2", "node-name": "disk",
        "file": {"driver": "crash-inject", "crash-after": crash_after, "mode": mode,
                 "seed": seed, "file": {"driver": "file", "filename": str(path)}}})
    filt = node.file_child_node().drv
    model, flushed, dirty = {}, {}, set()
    try:
        for kind, off, n, fill in ops:
            blocks = range(off // CRASH_BLOCK, (off + n) // CRASH_BLOCK)
            dirty.update(blocks)
            if kind == "cwrite":
                node.pwrite_compressed(off, _pattern(fill, n))
            elif kind == "write":
                node.pwrite(off, _pattern(fill, n))
            elif kind == "zero":
                node.pwrite_zeroes(off, n, True)
            elif kind == "discard":
                node.discard(off, n)
            else:
                node.flush()
                flushed, dirty = dict(model), set()
                continue
            for b in blocks:
                model[b] = fill if kind in ("cwrite", "write") else 0
        node.flush()
        flushed, dirty = dict(model), set()
    except BlockError:
        assert filt.crashed
    return close_crashed(g, filt), flushed, dirty


def crash_verify(path, flushed, dirty, skip):
    g = Graph()
    node = g.open_node({"driver": "qcow2", "read-only": True,
                        "file": {"driver": "file", "filename": str(path)}})
    try:
        for b in range(CRASH_SIZE // CRASH_BLOCK):
            if b in dirty or b in skip:
                continue
            want = _pattern(flushed[b], CRASH_BLOCK) if flushed.get(b) else bytes(CRASH_BLOCK)
            assert node.pread(b * CRASH_BLOCK, CRASH_BLOCK) == want, "block %d lost" % b
    finally:
        g.close_all()


@pytest.mark.parametrize("seed,mode,opts", [
    (1, "drop", "cluster_size=4k"),
    (2, "random", "cluster_size=4k"),
    (3, "keep", "cluster_size=4k,compression_type=zstd"),
    (4, "random", "cluster_size=4k,refcount_bits=1"),
])
def test_every_crash_point_with_compressed_writes(tmp_path, seed, mode, opts):
    src = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", opts, src, CRASH_SIZE)
    ops = crash_workload(seed)
    assert any(op[0] == "cwrite" for op in ops)
    total, _, _ = crash_run(copy_sparse(src, tmp_path / "probe.qcow2"), ops)
    skip = {b for kind, off, n, _ in ops if kind == "discard"
            for b in range(off // CRASH_BLOCK, (off + n) // CRASH_BLOCK)}
    for n in range(1, total + 1):
        img = copy_sparse(src, tmp_path / ("crash%d.qcow2" % n))
        _, flushed, dirty = crash_run(img, ops, crash_after=n, mode=mode,
                                      seed=seed * 1000 + n)
        r = subprocess.run([require_tool("qemu-img"), "check", "--output=json", str(img)],
                           capture_output=True, text=True)
        assert r.returncode in (0, 3), (n, r.stdout, r.stderr)
        info = json.loads(r.stdout)
        assert not info.get("corruptions") and not info.get("check-errors"), (n, info)
        crash_verify(img, flushed, dirty, skip)
        img.unlink()
