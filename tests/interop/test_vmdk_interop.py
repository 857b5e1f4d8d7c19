"""VMDK against qemu-img/qemu-io 7.2: every subformat qemu-img makes reads identically
(data, info, map, check); images blockengine creates are laid out byte for byte like
qemu-img's (except the random CID) and pass `qemu-img check`/`compare`; writes by
blockengine's qemu-io give the same guest data as qemu-io's; damaged images give the
same one-line errors."""
from __future__ import annotations

import random
import re
import struct
import subprocess

import pytest
from tests.tooling import copy_sparse

pytestmark = pytest.mark.interop

MiB = 1 << 20
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")


def _run(argv, cwd=None, check=True):
    r = subprocess.run([str(a) for a in argv], capture_output=True, cwd=cwd, timeout=120)
    if check and r.returncode:
        raise AssertionError("%s failed: %s" % (argv, r.stderr.decode()))
    return r


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 6 MiB raw image: random data, a zero run, a hole, an odd tail."""
    d = tmp_path_factory.mktemp("vmdk-src")
    rnd = random.Random(8)
    p = d / "src.raw"
    with open(p, "wb") as f:
        f.write(rnd.randbytes(3 * MiB))
        f.seek(MiB)
        f.write(bytes(512 * 1024))
        f.seek(4 * MiB + 4096)
        f.write(rnd.randbytes(70000))
        f.truncate(6 * MiB)
    return p


def _cid_free(data: bytes) -> bytes:
    data = re.sub(rb"\nparentCID=[0-9a-f]+\n", b"\nparentCID=X\n", data)
    return re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=X\n", data)


def _same_file(o: bytes, r: bytes) -> bool:
    """Equal apart from the random CIDs (whose hex length varies): a sparse extent's
    header and tables byte for byte, its descriptor area (sectors 1-20) and descriptor
    files as text with the CIDs masked."""
    if r[:4] == b"KDMV":
        def desc(b):
            return _cid_free(b[512:20 * 512 + 512].rstrip(b"\0"))
        return o[:512] == r[:512] and o[21 * 512:] == r[21 * 512:] and desc(o) == desc(r)
    return _cid_free(o.rstrip(b"\0")) == _cid_free(r.rstrip(b"\0"))


def _cid(data: bytes, key=b"CID") -> bytes:
    return re.search(rb"\n" + key + rb"=([0-9a-f]+)\n", data).group(1)


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_qemu_images_read_identically(qemu_img, be_bindir, source, tmp_path, sub):
    copy_sparse(source, tmp_path / "src.raw")
    _run([qemu_img, "convert", "-O", "vmdk", "-o", "subformat=" + sub, "src.raw", "x.vmdk"],
         cwd=tmp_path)
    ours = be_bindir / "qemu-img"
    _run([ours, "convert", "-O", "raw", "x.vmdk", "back.raw"], cwd=tmp_path)
    assert (tmp_path / "back.raw").read_bytes() == source.read_bytes()
    for cmd in (["info"], ["info", "--output=json"], ["map", "--output=json"], ["check"],
                ["check", "--output=json"], ["compare", "src.raw", "x.vmdk"]):
        ref = _run([qemu_img, *cmd, *([] if cmd[0] == "compare" else ["x.vmdk"])],
                   cwd=tmp_path, check=False)
        our = _run([ours, *cmd, *([] if cmd[0] == "compare" else ["x.vmdk"])],
                   cwd=tmp_path, check=False)
        assert (our.returncode, our.stdout, our.stderr) == \
            (ref.returncode, ref.stdout, ref.stderr), cmd


def test_zeroed_grain_and_backing_read(qemu_img, qemu_io, be_bindir, tmp_path):
    _run([qemu_img, "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "z.vmdk", "4M"],
         cwd=tmp_path)
    _run([qemu_io, "-c", "write -P 7 0 200k", "-c", "write -z 1M 128k",
          "-c", "write -P 3 3M 4k", "z.vmdk"], cwd=tmp_path)
    _run([qemu_img, "create", "-q", "-f", "vmdk", "-b", "z.vmdk", "-F", "vmdk", "top.vmdk"],
         cwd=tmp_path)
    _run([qemu_io, "-c", "write -P 9 100k 5k", "top.vmdk"], cwd=tmp_path)
    ours = be_bindir / "qemu-img"
    for img in ("z.vmdk", "top.vmdk"):
        for cmd in (["info", "--backing-chain"], ["map", "--output=json"], ["check"]):
            ref = _run([qemu_img, *cmd, img], cwd=tmp_path, check=False)
            our = _run([ours, *cmd, img], cwd=tmp_path, check=False)
            assert (our.stdout, our.stderr) == (ref.stdout, ref.stderr), (img, cmd)
        _run([qemu_img, "convert", "-O", "raw", img, "ref.raw"], cwd=tmp_path)
        _run([ours, "convert", "-O", "raw", img, "our.raw"], cwd=tmp_path)
        assert (tmp_path / "ref.raw").read_bytes() == (tmp_path / "our.raw").read_bytes()


CREATE_OPTS = ["", "subformat=monolithicFlat", "subformat=twoGbMaxExtentSparse",
               "subformat=twoGbMaxExtentFlat", "subformat=streamOptimized",
               "zeroed_grain=on,adapter_type=lsilogic,hwversion=7,toolsversion=9",
               "compat6=on,adapter_type=legacyESX", "adapter_type=buslogic",
               "backing_file=base.vmdk,backing_fmt=vmdk",
               "adapter_type=foo", "subformat=bar", "compat6=on,hwversion=7",
               "subformat=monolithicFlat,zeroed_grain=on"]


@pytest.mark.parametrize("opts", CREATE_OPTS)
def test_create_byte_compatible(run_both, tmp_path, qemu_img, opts):
    def prepare(d):
        _run([qemu_img, "create", "-q", "-f", "vmdk", "base.vmdk", "5G"], cwd=d)
    args = ["create", "-f", "vmdk"] + (["-o", opts] if opts else []) + ["x.vmdk", "5G"]
    both = run_both(args, prepare)
    both.assert_same()
    ref = sorted(p.name for p in both.ref_dir.iterdir())
    assert sorted(p.name for p in both.our_dir.iterdir()) == ref
    for name in ref:
        if name == "base.vmdk":
            continue
        rp, op = both.ref_dir / name, both.our_dir / name
        if rp.stat().st_size > 16 * MiB:       # flat extents: sparse zeroes
            assert op.stat().st_size == rp.stat().st_size, name
            assert op.stat().st_blocks <= rp.stat().st_blocks + 8
            continue
        r, o = rp.read_bytes(), op.read_bytes()
        assert _same_file(o, r), name
        if "backing_file" in opts and name == "x.vmdk":
            base = (both.our_dir / "base.vmdk").read_bytes()
            assert _cid(o, b"parentCID") == _cid(base)


def test_create_help_matches(run_both):
    run_both(["create", "-f", "vmdk", "-o", "help"]).assert_same()
    run_both(["create", "-f", "vmdk", "-o", "help", "x.vmdk"]).assert_same()


@pytest.mark.parametrize("sub", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                                 "twoGbMaxExtentFlat"])
def test_our_writes_match_qemu_io(qemu_img, qemu_io, be_bindir, tmp_path, sub):
    cmds = ["write -P 0x11 0 64k", "write -P 0x22 70k 3k", "write -P 0x33 2M 1M",
            "write -z 4M 64k", "write -P 0x44 5M 512", "write -P 0x55 1000k 100k"]
    for side, io in (("ref", qemu_io), ("our", be_bindir / "qemu-io")):
        d = tmp_path / side
        d.mkdir()
        _run([qemu_img, "create", "-q", "-f", "vmdk", "-o", "subformat=" + sub, "x.vmdk",
              "6M"], cwd=d)
        args = []
        for c in cmds:
            args += ["-c", c]
        r = _run([io, *args, "x.vmdk"], cwd=d)
        assert b"wrote" in r.stdout
        assert _run([qemu_img, "check", "x.vmdk"], cwd=d).stdout == \
            b"No errors were found on the image.\n"
    ref, our = tmp_path / "ref", tmp_path / "our"
    assert _run([qemu_img, "compare", ref / "x.vmdk", our / "x.vmdk"]).returncode == 0
    ours_map = _run([be_bindir / "qemu-img", "map", "--output=json", "x.vmdk"], cwd=our)
    ref_map = _run([qemu_img, "map", "--output=json", "x.vmdk"], cwd=ref)
    assert ours_map.stdout == ref_map.stdout
    # byte-identical files apart from the CID the first write sets
    for p in sorted(ref.iterdir()):
        assert _same_file((our / p.name).read_bytes(), p.read_bytes()), p.name


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_our_convert_output(qemu_img, be_bindir, source, tmp_path, sub):
    for side, tool in (("ref", qemu_img), ("our", be_bindir / "qemu-img")):
        d = tmp_path / side
        d.mkdir()
        copy_sparse(source, d / "src.raw")
        _run([tool, "convert", "-O", "vmdk", "-o", "subformat=" + sub, "src.raw", "x.vmdk"],
             cwd=d)
        assert _run([qemu_img, "check", "x.vmdk"], cwd=d).returncode == 0
        assert _run([qemu_img, "compare", "src.raw", "x.vmdk"], cwd=d).returncode == 0
    for p in sorted((tmp_path / "ref").iterdir()):
        o = (tmp_path / "our" / p.name).read_bytes()
        assert _same_file(o, p.read_bytes()), p.name


def _corpus(sp: bytes, desc: bytes, so: bytes):
    def m(base, off, data):
        b = bytearray(base)
        b[off:off + len(data)] = data
        return bytes(b)
    yield "version4", m(sp, 4, struct.pack("<I", 4))
    yield "version3", m(sp, 4, struct.pack("<I", 3))
    yield "gtes", m(sp, 44, struct.pack("<I", 1024))
    yield "gtes0", m(sp, 44, struct.pack("<I", 0))
    yield "gran", m(sp, 20, struct.pack("<Q", 0x400000))
    yield "l1big", m(m(sp, 12, struct.pack("<Q", 1 << 50)), 20, struct.pack("<Q", 1))
    yield "grainoff", m(sp, 64, struct.pack("<Q", 1 << 20))
    yield "gdend", m(sp, 56, struct.pack("<Q", (1 << 64) - 1))
    yield "tiny", b"KD"
    yield "magiconly", b"KDMV"
    yield "nocid", m(sp, 512, b"# Disk DescriptorFile\nversion=1\n" + bytes(200))
    yield "gtpast", m(sp, 27 * 512, struct.pack("<I", 0xFFFFFF))
    yield "desc_notype", desc.replace(b"createType", b"creatType")
    yield "desc_badtype", desc.replace(b'"monolithicFlat"', b'"fooBar"')
    yield "desc_sparse", desc.replace(b'"monolithicFlat"', b'"monolithicSparse"')
    yield "desc_flatnooff", desc.replace(b'" 0\n', b'"\n')
    yield "desc_vmfsoff", desc.replace(b" FLAT ", b" VMFS ")
    yield "desc_sparseoff", desc.replace(b" FLAT ", b" SPARSE ")
    yield "desc_missing", desc.replace(b"-flat.vmdk", b"-nonexist.vmdk")
    yield "desc_negoff", desc.replace(b'" 0\n', b'" -5\n')
    yield "stream_bad", m(so, 65536 + 12, bytes(64))
    yield "cowd", b"COWD" + struct.pack("<10I", 1, 3, 2048, 8, 4, 1, 0, 0, 0, 0) + bytes(2004)


def test_damaged_corpus(qemu_img, qemu_io, be_bindir, tmp_path):
    d = tmp_path
    (d / "data.raw").write_bytes(random.Random(3).randbytes(MiB))
    _run([qemu_img, "convert", "-O", "vmdk", "data.raw", "sp.vmdk"], cwd=d)
    _run([qemu_img, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "data.raw",
          "so.vmdk"], cwd=d)
    _run([qemu_img, "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
          "fl.vmdk", "10M"], cwd=d)
    sp, so = (d / "sp.vmdk").read_bytes(), (d / "so.vmdk").read_bytes()
    desc = (d / "fl.vmdk").read_bytes()
    for name, data in _corpus(sp, desc, so):
        (d / (name + ".vmdk")).write_bytes(data)
        for argv in (["info", "-f", "vmdk", name + ".vmdk"],
                     ["check", "-f", "vmdk", name + ".vmdk"]):
            ref = _run([qemu_img, *argv], cwd=d, check=False)
            our = _run([be_bindir / "qemu-img", *argv], cwd=d, check=False)
            assert (our.returncode, our.stdout, our.stderr) == \
                (ref.returncode, ref.stdout, ref.stderr), (name, argv)
            assert b"Traceback" not in our.stderr
        argv = ["-f", "vmdk", "-c", "read 0 64k", name + ".vmdk"]
        ref = _run([qemu_io, *argv], cwd=d, check=False)
        our = _run([be_bindir / "qemu-io", *argv], cwd=d, check=False)
        assert our.stderr == ref.stderr, name



def _stream_convert_both(run_both, tail: int):
    """convert -O vmdk streamOptimized through both tools: (qemu-img's file, ours)."""
    rnd = random.Random(11)
    chunks = [rnd.randbytes(3 * MiB), b"blockengine " * 200000, bytes(MiB),
              bytes(rnd.choice(b"ab") for _ in range(300000))]
    size = sum(map(len, chunks))
    chunks.append(rnd.randbytes(-size % (64 * 1024) + tail))

    def prepare(d):
        with open(d / "src.raw", "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    both = run_both(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                     "src.raw", "out.vmdk"], prepare)
    both.assert_same()
    return (both.ref_dir / "out.vmdk").read_bytes(), (both.our_dir / "out.vmdk").read_bytes()


def test_convert_to_stream_optimized_byte_compatible(run_both):
    """The file is qemu-img's byte for byte (except the CID), whatever order blockengine
    deflates the grains of one write in (it deflates several at once): incompressible,
    compressible and zero grains, buffers of many whole grains."""
    r, o = _stream_convert_both(run_both, 0)
    assert len(o) == len(r) and _same_file(o, r)


def test_convert_to_stream_optimized_partial_last_grain(run_both):
    """A short last grain is deflated up to the end of the disk only, as QEMU does."""
    r, o = _stream_convert_both(run_both, 12345 + 511)
    assert len(o) == len(r) and _same_file(o, r)
