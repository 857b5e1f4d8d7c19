"""qcow2 interoperability with QEMU 7.2's qemu-img / qemu-io (the reference).

Images made by QEMU must read identically in blockengine; images written by
blockengine must pass `qemu-img check` and compare equal; creation and a given
sequence of writes must produce byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

import blockengine
from blockengine.drivers.base import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO
from blockengine.drivers.format.qcow2.driver import Qcow2Driver
from blockengine.errors import BlockError
from tests.tooling import require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools():
    require_tool("qemu-img")
    require_tool("qemu-io")


def qimg(*args, check=True, cwd=None):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          check=check, cwd=cwd)


def qio(path, *cmds, fmt="qcow2", extra=()):
    argv = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stdout.lower() and "failed" not in r.stdout.lower(), r.stdout
    return r


def qcreate(path, size, **o):
    opts = ",".join("%s=%s" % kv for kv in o.items())
    qimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, size)


def qemu_raw(path, tmp_path, fmt="qcow2") -> bytes:
    out = tmp_path / ("conv%d.raw" % random.randrange(1 << 30))
    qimg("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qcheck(path) -> dict:
    r = qimg("check", "--output=json", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def qinfo(path) -> dict:
    return json.loads(qimg("info", "--output=json", path).stdout)


def qmap(path) -> list:
    return json.loads(qimg("map", "--output=json", path).stdout)


def be_read_all(path, **kw) -> bytes:
    with blockengine.open(str(path), "qcow2", read_only=True, **kw) as img:
        return img.read(0, img.size)


def our_map(node) -> list:
    """qemu-img map --output=json computed from node.block_status (img_map's loop)."""
    size = node.total_size
    out, cur = [], None
    offset = 0
    while offset < size:
        n = node
        depth = 0
        length = min(size - offset, 1 << 30)
        while True:
            st = n.block_status(offset, length, True)
            length = st.length
            flags = st.flags
            if flags & (BLOCK_ZERO | BLOCK_DATA):
                break
            cow = n.cow_child()
            if cow is None:
                flags = 0
                break
            n = cow.node
            depth += 1
        e = {"start": offset, "length": length, "depth": depth,
             "present": bool(flags & BLOCK_ALLOCATED), "zero": bool(flags & BLOCK_ZERO),
             "data": bool(flags & BLOCK_DATA)}
        if flags & BLOCK_OFFSET_VALID:
            e["offset"] = st.host_offset
            e["_file"] = st.host_node.filename()
        if cur is not None and all(cur[k] == e[k] for k in ("depth", "present", "zero", "data")) \
                and ("offset" in cur) == ("offset" in e) \
                and ("offset" not in e or (cur["offset"] + cur["length"] == e["offset"]
                                           and cur["_file"] == e["_file"])):
            cur["length"] += length
        else:
            if cur is not None:
                out.append(cur)
            cur = e
        offset += length
    if cur is not None:
        out.append(cur)
    for e in out:
        e.pop("_file", None)
    return out


def strip_map(m):
    return [{k: v for k, v in e.items() if k != "compressed"} for e in m]


# ---------------------------------------------------------------------------------- create
CREATE_COMBOS = [
    {}, {"compat": "0.10"}, {"cluster_size": "512"}, {"cluster_size": "2M"},
    {"cluster_size": "4k", "refcount_bits": "1"}, {"refcount_bits": "64"},
    {"refcount_bits": "8", "cluster_size": "1024"}, {"refcount_bits": "2"},
    {"refcount_bits": "4"}, {"refcount_bits": "32"}, {"lazy_refcounts": "on"},
    {"extended_l2": "on"}, {"extended_l2": "on", "cluster_size": "16k"},
    {"compression_type": "zstd"},
    {"backing_file": "base.qcow2", "backing_fmt": "qcow2"},
    {"backing_file": "base.qcow2", "backing_fmt": "qcow2", "compat": "0.10"},
    {"backing_file": "base.qcow2", "backing_fmt": "qcow2", "cluster_size": "512"},
    {"preallocation": "metadata"}, {"preallocation": "falloc"}, {"preallocation": "full"},
    {"preallocation": "metadata", "extended_l2": "on"},
    {"preallocation": "metadata", "cluster_size": "4k", "refcount_bits": "1"},
    {"data_file": "DATA"}, {"data_file": "DATA", "data_file_raw": "on"},
    {"data_file": "DATA", "preallocation": "full"},
]


def _create_cases():
    """Every combination at every size, except preallocation of huge images (slow, big)."""
    for opts in CREATE_COMBOS:
        for size in (0, 5 * MiB + 512, 1 << 30, 100 << 30):
            if opts.get("preallocation") and size > (1 << 30):
                continue
            if opts.get("preallocation") in ("falloc", "full") and size > 64 * MiB:
                continue
            name = ",".join("%s=%s" % kv for kv in opts.items()) or "default"
            yield pytest.param(opts, size, id="%s-%d" % (name, size))


@pytest.mark.parametrize("opts,size", list(_create_cases()))
def test_create_byte_identical(tmp_path, opts, size):
    os.chdir(tmp_path)
    qcreate("base.qcow2", 64 * MiB)
    oq, ob = dict(opts), dict(opts)
    if "data_file" in opts:
        oq["data_file"], ob["data_file"] = "q.data", "b.data"
    qcreate("q.qcow2", size, **oq)
    Qcow2Driver.create("b.qcow2", size, ob)
    a, b = (tmp_path / "q.qcow2").read_bytes(), (tmp_path / "b.qcow2").read_bytes()
    if "data_file" in opts:
        a = a.replace(b"q.data", b"b.data")
        assert os.path.getsize("q.data") == os.path.getsize("b.data")
    assert a == b
    assert qcheck("b.qcow2")["check-errors"] == 0


def test_create_errors_match_qemu(tmp_path):
    os.chdir(tmp_path)
    for o in ("compat=1.2", "cluster_size=1000", "cluster_size=4M", "refcount_bits=3",
              "compat=0.10,refcount_bits=8", "compat=0.10,lazy_refcounts=on",
              "compat=0.10,extended_l2=on", "extended_l2=on,cluster_size=8k",
              "data_file_raw=on", "compression_type=foo", "compat=0.10,compression_type=zstd",
              "backing_fmt=qcow2"):
        r = qimg("create", "-q", "-f", "qcow2", "-o", o, "w.qcow2", "1M", check=False)
        assert r.returncode == 1
        want = r.stderr.strip().split("w.qcow2: ", 1)[1]
        opts = dict(kv.split("=") for kv in o.split(","))
        with pytest.raises(BlockError) as ei:
            Qcow2Driver.create(str(tmp_path / "x.qcow2"), MiB, opts)
        assert str(ei.value) == want


# ------------------------------------------------------------------------ same layout
def _random_ops(r, size, n):
    ops = []
    for _ in range(n):
        off = r.randrange(0, size) // 512 * 512
        ln = min(r.randrange(1, 300) * 512, size - off)
        if ln <= 0:
            continue
        x = r.random()
        pat = r.randrange(1, 255)
        if x < 0.6:
            ops.append(("write", off, ln, pat))
        elif x < 0.75:
            ops.append(("zero", off, ln, 0))
        elif x < 0.85:
            ops.append(("zero_unmap", off, ln, 0))
        else:
            ops.append(("discard", off, ln, 0))
    return ops


def _apply_ops(img, ops):
    for op, off, ln, pat in ops:
        if op == "write":
            img.write(off, bytes([pat]) * ln)
        elif op == "zero":
            img.write_zeroes(off, ln, may_unmap=False)
        elif op == "zero_unmap":
            img.write_zeroes(off, ln, may_unmap=True)
        else:
            img.discard(off, ln)


def _qemu_io_cmds(ops):
    return [{"write": "write -P %(p)d %(o)d %(n)d", "zero": "write -z %(o)d %(n)d",
             "zero_unmap": "write -z -u %(o)d %(n)d", "discard": "discard %(o)d %(n)d"}[op]
            % {"p": pat, "o": off, "n": ln} for op, off, ln, pat in ops]


LAYOUT_CFGS = [{}, {"cluster_size": "512", "refcount_bits": "64"},
               {"cluster_size": "4096", "refcount_bits": "1"}, {"compat": "0.10"},
               {"extended_l2": "on", "cluster_size": "16k"}, {"cluster_size": "2M"},
               {"lazy_refcounts": "on", "cluster_size": "1024", "refcount_bits": "8"}]


@pytest.mark.parametrize("cfg", LAYOUT_CFGS, ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_writes_produce_qemu_identical_file(tmp_path, cfg, seed):
    size = 8 * MiB
    ops = _random_ops(random.Random(seed), size, 60)
    qcreate(tmp_path / "A.qcow2", size, **cfg)
    Qcow2Driver.create(str(tmp_path / "B.qcow2"), size, cfg)
    qio(tmp_path / "A.qcow2", *_qemu_io_cmds(ops))
    with blockengine.open(str(tmp_path / "B.qcow2"), "qcow2",
                          options={"discard": "unmap"}) as img:
        _apply_ops(img, ops)
    assert (tmp_path / "A.qcow2").read_bytes() == (tmp_path / "B.qcow2").read_bytes()


# ------------------------------------------------------------------------ reading QEMU's
READ_CFGS = [{}, {"compat": "0.10"}, {"cluster_size": "512"}, {"cluster_size": "2M"},
             {"refcount_bits": "1", "cluster_size": "4k"}, {"refcount_bits": "64"},
             {"extended_l2": "on"}, {"extended_l2": "on", "cluster_size": "16k"},
             {"lazy_refcounts": "on"}, {"compression_type": "zstd"}]


@pytest.mark.parametrize("cfg", READ_CFGS, ids=str)
def test_read_qemu_written_image(tmp_path, cfg):
    size = 16 * MiB + 3 * 512
    p = tmp_path / "q.qcow2"
    qcreate(p, size, **cfg)
    ops = _random_ops(random.Random(7), size, 80)
    qio(p, *_qemu_io_cmds(ops))
    ref = qemu_raw(p, tmp_path)
    assert be_read_all(p) == ref
    # reads at many unaligned offsets
    r = random.Random(3)
    with blockengine.open(str(p), "qcow2", read_only=True) as img:
        for _ in range(200):
            off = r.randrange(0, size)
            n = min(r.randrange(1, 300000), size - off)
            assert img.read(off, n) == ref[off:off + n]
        assert strip_map(qmap(p)) == our_map(img.node)
        assert img.node.drv.info_specific() == qinfo(p)["format-specific"]
        res = img.node.drv.check()
    qc = qcheck(p)
    for k in ("image-end-offset", "total-clusters", "check-errors"):
        assert res[k] == qc[k]
    for k in ("allocated-clusters", "fragmented-clusters", "compressed-clusters"):
        assert res[k] == qc.get(k, 0)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", ["512", "64k", "2M"])
def test_compressed_images(tmp_path, ctype, cluster_size):
    size = 6 * MiB
    r = random.Random(5)
    raw = bytearray(size)
    for _ in range(60):
        off = r.randrange(0, size - 70000)
        raw[off:off + 65536] = (r.randbytes(64) * 1024) if r.random() < 0.7 else r.randbytes(65536)
    (tmp_path / "src.raw").write_bytes(raw)
    p = tmp_path / "c.qcow2"
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
         "compression_type=%s,cluster_size=%s" % (ctype, cluster_size), tmp_path / "src.raw", p)
    assert be_read_all(p) == raw
    with blockengine.open(str(p), "qcow2", read_only=True) as img:
        res = img.node.drv.check()
        assert strip_map(qmap(p)) == our_map(img.node)
    qc = qcheck(p)
    assert res["compressed-clusters"] == qc.get("compressed-clusters", 0) > 0
    assert res["image-end-offset"] == qc["image-end-offset"]
    # overwrite parts of compressed clusters (COW from the compressed data)
    with blockengine.open(str(p), "qcow2") as img:
        for _ in range(40):
            off = r.randrange(0, size - 5000)
            d = r.randbytes(r.randrange(1, 5000))
            img.write(off, d)
            raw[off:off + len(d)] = d
        img.write_zeroes(4096, 100000, may_unmap=True)
        raw[4096:104096] = bytes(100000)
    assert qcheck(p)["check-errors"] == 0 and "corruptions" not in qcheck(p)
    assert "leaks" not in qcheck(p)
    assert qemu_raw(p, tmp_path) == raw


# ------------------------------------------------------------------------ snapshots
def test_internal_snapshots(tmp_path):
    p = tmp_path / "s.qcow2"
    qcreate(p, 8 * MiB)
    qio(p, "write -P 1 0 3M")
    qimg("snapshot", "-c", "snap1", p)
    qio(p, "write -P 2 1M 1M")
    qimg("snapshot", "-c", "snap2", p)
    before = qemu_raw(p, tmp_path)
    snaps = qinfo(p)["snapshots"]
    with blockengine.open(str(p), "qcow2") as img:
        assert img.node.drv.snapshots_info() == snaps
        assert img.read(0, img.size) == before
        res = img.node.drv.check()
        assert res["corruptions"] == res["leaks"] == 0
        # clusters with refcount 2 must be copied, never overwritten in place
        img.write(512 * 1024, b"\x03" * 70000)
        img.write_zeroes(2 * MiB, MiB, may_unmap=True)
        img.discard(0, 64 * 1024)
    qc = qcheck(p)
    assert qc["check-errors"] == 0 and "corruptions" not in qc and "leaks" not in qc
    snap1 = tmp_path / "snap1.raw"
    qimg("convert", "-l", "snapshot.name=snap1", "-O", "raw", p, snap1)
    assert snap1.read_bytes()[:3 * MiB] == b"\x01" * (3 * MiB)
    model = bytearray(before)
    model[512 * 1024:512 * 1024 + 70000] = b"\x03" * 70000
    model[2 * MiB:3 * MiB] = bytes(MiB)
    model[0:64 * 1024] = bytes(64 * 1024)
    assert qemu_raw(p, tmp_path) == model


# ------------------------------------------------------------------------ backing chains
@pytest.mark.parametrize("cfg", [{}, {"compat": "0.10"}, {"cluster_size": "512"},
                                 {"extended_l2": "on"}], ids=str)
def test_backing_chain_read_write(tmp_path, cfg):
    os.chdir(tmp_path)
    base = bytearray(random.Random(1).randbytes(3 * MiB))
    (tmp_path / "base.raw").write_bytes(base)
    qcreate("mid.qcow2", 4 * MiB, backing_file="base.raw", backing_fmt="raw", **cfg)
    qio("mid.qcow2", "write -P 7 1M 100k", "write -z 2M 64k")
    qcreate("top.qcow2", 5 * MiB, backing_file="mid.qcow2", backing_fmt="qcow2", **cfg)
    qio("top.qcow2", "write -P 9 1500k 10k")
    ref = qemu_raw("top.qcow2", tmp_path)
    assert be_read_all("top.qcow2") == ref
    ref_map = strip_map(qmap("top.qcow2"))
    with blockengine.open("top.qcow2", "qcow2") as img:
        assert ref_map == our_map(img.node)
        r = random.Random(2)
        model = bytearray(ref)
        for _ in range(50):
            off = r.randrange(0, 5 * MiB - 1)
            n = min(r.randrange(1, 100000), 5 * MiB - off)
            x = r.random()
            if x < 0.7:
                d = r.randbytes(n)
                img.write(off, d)
                model[off:off + n] = d
            elif x < 0.85:
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                img.discard(off, n)     # falls through to the backing file or zeroes
                model[:] = img.read(0, img.size)
        assert img.read(0, img.size) == model
    qc = qcheck("top.qcow2")
    assert qc["check-errors"] == 0 and "corruptions" not in qc and "leaks" not in qc
    assert qemu_raw("top.qcow2", tmp_path) == model


def test_backing_without_format_is_probed(tmp_path):
    os.chdir(tmp_path)
    qcreate("base.qcow2", MiB)
    qio("base.qcow2", "write -P 5 0 64k")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
         "1M")
    data = bytearray((tmp_path / "top.qcow2").read_bytes())
    i = data.index(bytes.fromhex("e2792aca"))
    data[i:i + 4] = bytes.fromhex("11111111")          # now an unknown extension
    (tmp_path / "top.qcow2").write_bytes(data)
    assert qinfo("top.qcow2").get("backing-filename-format") is None
    assert be_read_all("top.qcow2")[:65536] == b"\x05" * 65536


# ------------------------------------------------------------------------ metadata / map
def test_map_metadata_preallocation_recurse(tmp_path):
    p = tmp_path / "m.qcow2"
    qcreate(p, 4 * MiB, preallocation="metadata")
    qio(p, "write -P 1 64k 64k", "write -z 1M 128k")
    with blockengine.open(str(p), "qcow2", read_only=True) as img:
        assert strip_map(qmap(p)) == our_map(img.node)


def test_info_specific_bitmaps_and_data_file(tmp_path):
    os.chdir(tmp_path)
    qcreate("bm.qcow2", 64 * MiB)
    qimg("bitmap", "--add", "bm.qcow2", "b0")
    qimg("bitmap", "--add", "-g", "128k", "bm.qcow2", "b1", "--disable")
    qcreate("d.qcow2", 10 * MiB, data_file="d.data", data_file_raw="on",
            extended_l2="on", compression_type="zstd", refcount_bits=8)
    for f in ("bm.qcow2", "d.qcow2"):
        with blockengine.open(f, "qcow2", read_only=True) as img:
            assert img.node.drv.info_specific() == qinfo(f)["format-specific"]
            res = img.node.drv.check()
            assert res["leaks"] == res["corruptions"] == 0
    # writing an image with bitmaps keeps them (and the autoclear bit) intact
    with blockengine.open("bm.qcow2", "qcow2") as img:
        img.write(0, b"x" * 4096)
    qc = qcheck("bm.qcow2")
    assert "leaks" not in qc and "corruptions" not in qc
    assert len(qinfo("bm.qcow2")["format-specific"]["data"]["bitmaps"]) == 2


@pytest.mark.parametrize("raw_flag", ["off", "on"])
def test_external_data_file(tmp_path, raw_flag):
    os.chdir(tmp_path)
    qcreate("d.qcow2", 4 * MiB, data_file="d.data", data_file_raw=raw_flag)
    qio("d.qcow2", "write -P 3 100k 200k", "write -z 1M 64k")
    ref = qemu_raw("d.qcow2", tmp_path)
    assert be_read_all("d.qcow2") == ref
    ref_map = strip_map(qmap("d.qcow2"))
    with blockengine.open("d.qcow2", "qcow2") as img:
        assert ref_map == our_map(img.node)
        img.write(3 * MiB, b"\x44" * 100000)
        img.write_zeroes(100 * 1024, 50000)
        model = bytearray(ref)
        model[3 * MiB:3 * MiB + 100000] = b"\x44" * 100000
        model[100 * 1024:100 * 1024 + 50000] = bytes(50000)
        assert img.read(0, img.size) == model
    qc = qcheck("d.qcow2")
    assert "leaks" not in qc and "corruptions" not in qc
    assert qemu_raw("d.qcow2", tmp_path) == model
    if raw_flag == "on":
        assert (tmp_path / "d.data").read_bytes()[:4 * MiB] == model


# ------------------------------------------------------------------------ check / repair
def test_check_leaks_and_repair(tmp_path):
    p = tmp_path / "l.qcow2"
    qcreate(p, 8 * MiB)
    qio(p, "write -P 1 0 1M")
    with blockengine.open(str(p), "qcow2") as img:
        off = img.node.drv.alloc_clusters(3 * 65536)      # leak three clusters
        img.node.drv.file.pwrite(off, bytes(3 * 65536))   # inside the file: QEMU counts them
    qc = json.loads(qimg("check", "--output=json", p, check=False).stdout)
    with blockengine.open(str(p), "qcow2", read_only=True) as img:
        res = img.node.drv.check()
        msgs = img.node.drv.check_messages
    assert res["leaks"] == qc["leaks"] == 3
    assert res["image-end-offset"] == qc["image-end-offset"]
    r = qimg("check", p, check=False)
    assert [m for m in r.stderr.splitlines() if m.startswith("Leaked")] == msgs
    with blockengine.open(str(p), "qcow2") as img:
        res = img.node.drv.check("leaks")
        assert res["leaks-fixed"] == 3
    qc = qcheck(p)
    assert "leaks" not in qc


def test_dirty_image_is_repaired_on_open(tmp_path):
    p = tmp_path / "dirty.qcow2"
    qcreate(p, 8 * MiB, lazy_refcounts="on")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "abort", str(p)],
                   capture_output=True)
    assert qinfo(p)["dirty-flag"] is True
    with blockengine.open(str(p), "qcow2", read_only=True) as img:
        assert img.node.drv.dirty_flag
        assert img.read(0, 1 << 20) == b"\x01" * (1 << 20)
    with blockengine.open(str(p), "qcow2") as img:
        assert not img.node.drv.dirty_flag
    assert qinfo(p)["dirty-flag"] is False
    qc = qcheck(p)
    assert "leaks" not in qc and "corruptions" not in qc


# ------------------------------------------------------------------------ invalid images
def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


INVALID = [
    ("magic", 0, b"QFI\xfa"),
    ("version", 4, (4).to_bytes(4, "big")),
    ("cluster_bits", 20, (22).to_bytes(4, "big")),
    ("header_length", 100, (50).to_bytes(4, "big")),
    ("header_too_long", 100, (70000).to_bytes(4, "big")),
    ("backing_offset", 8, (1 << 20).to_bytes(8, "big")),
    ("refcount_order", 96, (7).to_bytes(4, "big")),
    ("reftable_clusters", 56, (0).to_bytes(4, "big")),
    ("reftable_offset", 48, (12345).to_bytes(8, "big")),
    ("reftable_too_large", 56, (1 << 20).to_bytes(4, "big")),
    ("l1_offset", 40, (0x10001).to_bytes(8, "big")),
    ("l1_too_large", 36, (1 << 30).to_bytes(4, "big")),
    ("l1_too_small", 36, (0).to_bytes(4, "big")),
    ("snapshots", 60, (70000).to_bytes(4, "big")),
    ("unknown_incompat", 72, (1 << 10 | 1 << 40).to_bytes(8, "big")),
    ("compression", 104, b"\x05"),
    ("compression_bit", 72, (1 << 3).to_bytes(8, "big")),
    ("crypt_method", 32, (3).to_bytes(4, "big")),
]


@pytest.mark.parametrize("name,offset,data", INVALID, ids=[x[0] for x in INVALID])
def test_invalid_header_messages(tmp_path, name, offset, data):
    p = tmp_path / "bad.qcow2"
    qcreate(p, 64 * MiB)
    _patch(p, offset, data)
    r = qimg("info", "-f", "qcow2", p, check=False)
    assert r.returncode == 1
    want = r.stderr.strip().split("': ", 1)[1]
    with pytest.raises(BlockError) as ei:
        blockengine.open(str(p), "qcow2", read_only=True)
    assert str(ei.value) == want


def test_unsupported_feature_names_from_table(tmp_path):
    p = tmp_path / "f.qcow2"
    qcreate(p, MiB)
    # rename the "extended L2 entries" feature (bit 4) to bit 7 in the name table
    data = bytearray(p.read_bytes())
    i = data.index(b"extended L2 entries")
    data[i - 1] = 7
    p.write_bytes(data)
    _patch(p, 72, (1 << 7).to_bytes(8, "big"))
    r = qimg("info", "-f", "qcow2", p, check=False)
    with pytest.raises(BlockError) as ei:
        blockengine.open(str(p), "qcow2", read_only=True)
    assert str(ei.value) == r.stderr.strip().split("': ", 1)[1]


def test_corrupt_bit(tmp_path):
    p = tmp_path / "c.qcow2"
    qcreate(p, MiB)
    qio(p, "write -P 1 0 4k")
    _patch(p, 72, (1 << 1).to_bytes(8, "big"))
    r = qimg("resize", p, "2M", check=False)
    want = r.stderr.strip().split("': ", 1)[1]
    with pytest.raises(BlockError) as ei:
        blockengine.open(str(p), "qcow2")
    assert str(ei.value) == want
    assert be_read_all(p)[:4096] == b"\x01" * 4096


def test_unknown_extension_preserved(tmp_path):
    p = tmp_path / "u.qcow2"
    qcreate(p, MiB, lazy_refcounts="on")
    data = bytearray(p.read_bytes())
    # insert two unknown extensions before the end marker
    end = data.index(b"\x00" * 8, 112 + 8 + 384)
    ext = (0x12345678).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"hello\0\0\0" + \
        (0x9ABCDEF0).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc\0\0\0\0\0"
    data[end:end + len(ext)] = ext
    p.write_bytes(data)
    q = tmp_path / "q.qcow2"
    q.write_bytes(bytes(data))
    qio(q, "write 0 64k")              # lazy refcounts: marks dirty, then rewrites the header
    with blockengine.open(str(p), "qcow2") as img:
        img.write(0, bytes(65536))
    assert p.read_bytes()[:65536] == q.read_bytes()[:65536]


# ------------------------------------------------------------------------ resize
@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("cfg", [{}, {"cluster_size": "4k"}], ids=str)
def test_resize_like_qemu(tmp_path, prealloc, cfg):
    from blockengine.drivers.base import PreallocMode
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qcreate(p, 3 * MiB + 512, **cfg)
        qio(p, "write -P 1 0 1M", "write -P 2 2M 1M")
    qimg("resize", "--preallocation=%s" % prealloc, a, 7 * MiB + 1024)
    with blockengine.open(str(b), "qcow2") as img:
        img.resize(7 * MiB + 1024, prealloc=PreallocMode(prealloc))
    assert a.read_bytes() == b.read_bytes()
    qimg("resize", "--shrink", a, 1536 * 1024)
    with blockengine.open(str(b), "qcow2") as img:
        img.resize(1536 * 1024)
    assert qemu_raw(a, tmp_path) == qemu_raw(b, tmp_path)
    qc = qcheck(b)
    assert "leaks" not in qc and "corruptions" not in qc
    assert a.read_bytes() == b.read_bytes()


# ------------------------------------------------------------------------ state machine
class Qcow2Machine(RuleBasedStateMachine):
    """Random write/zero/discard/resize/reopen vs a bytearray model; qemu-img check."""

    dir = None

    @initialize(cfg=st.sampled_from([
        {}, {"cluster_size": "512", "refcount_bits": "1"}, {"cluster_size": "4096",
                                                              "refcount_bits": "64"},
        {"compat": "0.10", "cluster_size": "1024"}, {"extended_l2": "on",
                                                     "cluster_size": "16384"},
        {"cluster_size": "2048", "refcount_bits": "4"}]),
        backing=st.booleans(), seed=st.integers(0, 1 << 30))
    def setup(self, cfg, backing, seed):
        d = self.dir
        self.n = getattr(Qcow2Machine, "_n", 0) + 1
        Qcow2Machine._n = self.n
        self.path = str(d / ("m%d.qcow2" % self.n))
        self.r = random.Random(seed)
        self.size = self.r.randrange(1, 64) * 16384
        self.model = bytearray(self.size)
        opts = dict(cfg)
        if backing:
            bpath = str(d / ("m%d.base" % self.n))
            bsize = self.r.randrange(0, 2 * self.size + 1) // 512 * 512
            bdata = self.r.randbytes(bsize)
            with open(bpath, "wb") as f:
                f.write(bdata)
            opts.update(backing_file=bpath, backing_fmt="raw")
            n = min(bsize, self.size)
            self.model[:n] = bdata[:n]
        Qcow2Driver.create(self.path, self.size, opts)
        self.cs = int(cfg.get("cluster_size", 65536))
        self.v2 = cfg.get("compat") == "0.10"
        self.img = blockengine.open(self.path, "qcow2")

    def _range(self, data):
        off = data.draw(st.integers(0, max(0, self.size - 1)))
        n = data.draw(st.integers(0, min(3 * self.cs + 1000, self.size - off)))
        return off, n

    @rule(data=st.data())
    def write(self, data):
        off, n = self._range(data)
        buf = self.r.randbytes(n)
        self.img.write(off, buf)
        self.model[off:off + n] = buf

    @rule(data=st.data(), unmap=st.booleans())
    def zero(self, data, unmap):
        off, n = self._range(data)
        self.img.write_zeroes(off, n, may_unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        off, n = self._range(data)
        self.img.discard(off, n)
        # discarded clusters read as zeroes or backing data: take what the image says,
        # but everything outside the cluster-aligned middle must be unchanged
        s = -(-off // self.cs) * self.cs
        e = (off + n) // self.cs * self.cs
        if off + n == self.size:
            e = self.size
        got = self.img.read(0, self.size)
        if e > s:
            assert got[:s] == self.model[:s] and got[e:] == self.model[e:]
            self.model[s:e] = got[s:e]

    @rule(data=st.data())
    def resize(self, data):
        new = data.draw(st.integers(1, 80)) * 8192
        backing = self.img.node.backing
        zero_write = backing is not None and backing.total_size > self.size
        try:
            self.img.resize(new)
        except BlockError as e:
            # QEMU: v2 images cannot zero the area a longer backing file would show
            assert "Failed to zero out new clusters" in str(e) and self.v2 and zero_write
            return
        if new < self.size:
            del self.model[new:]
        else:
            # without a backing file to hide, QEMU shows what is left in the last cluster
            old = self.size
            self.model += self.img.read(old, new - old)
            fresh = old if zero_write else min(new, -(-old // self.cs) * self.cs)
            assert self.model[fresh:] == bytes(new - fresh)
        self.size = new

    @rule()
    def reopen(self):
        self.img.close()
        self.img = blockengine.open(self.path, "qcow2")

    @invariant()
    def content(self):
        if hasattr(self, "img"):
            assert self.img.read(0, self.size) == self.model

    def teardown(self):
        if hasattr(self, "img"):
            self.img.close()
            qc = qcheck(self.path)
            assert qc["check-errors"] == 0
            assert "corruptions" not in qc and "leaks" not in qc, qc
            r = qimg("compare", "-f", "qcow2", "-F", "raw", self.path,
                     self._write_model(), check=False)
            assert r.returncode == 0, r.stdout + r.stderr

    def _write_model(self):
        p = self.path + ".model"
        with open(p, "wb") as f:
            f.write(self.model)
        return p


def test_state_machine(tmp_path):
    Qcow2Machine.dir = tmp_path
    run_state_machine_as_test(Qcow2Machine, settings=settings(
        max_examples=60, stateful_step_count=25, deadline=None,
        suppress_health_check=list(HealthCheck)))


@pytest.mark.parametrize("extra", [[], ["-B", "base.qcow2", "-F", "qcow2"]],
                         ids=["flatten", "backing"])
def test_convert_chain_byte_identical(tmp_path, be_img, extra):
    """convert of an overlay: flattened, or (-B) only its own clusters over the same base."""
    os.chdir(tmp_path)
    qimg("create", "-f", "qcow2", "base.qcow2", "4M")
    qio("base.qcow2", "write -P 1 0 1M")
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qio("top.qcow2", "write -P 2 512k 1M", "write -z 3M 64k")
    qimg("convert", "-O", "qcow2", *extra, "top.qcow2", "ref.qcow2")
    r = be_img("convert", "-O", "qcow2", *extra, "top.qcow2", "ours.qcow2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "ref.qcow2").read_bytes()
