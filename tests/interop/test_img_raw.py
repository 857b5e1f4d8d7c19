"""`blockengine img` against qemu-img 7.2 on raw images: same stdout, stderr, exit
status, and for commands that write, the same resulting files and layouts."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _sparse(path, size, chunks=()):
    """A sparse file of ``size`` bytes with ``chunks`` = [(offset, bytes)] written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks:
            f.seek(off)
            f.write(data)


def make_images(d):
    """The raw images the tests use, in directory ``d``."""
    rnd = random.Random(1).randbytes(40960)
    _sparse(d / "sparse.raw", 10 * MiB)
    _sparse(d / "data.raw", 10 * MiB, [(MiB, b"hello"), (2400 * 1024, rnd)])
    _sparse(d / "data2.raw", 10 * MiB, [(MiB, b"hello"), (2400 * 1024, rnd)])
    _sparse(d / "diff.raw", 10 * MiB, [(MiB, b"hello"), (2400 * 1024, rnd[:100] + b"X")])
    _sparse(d / "bigger.raw", 11 * MiB, [(MiB, b"hello"), (2400 * 1024, rnd)])
    _sparse(d / "tail.raw", 11 * MiB, [(MiB, b"hello"), (2400 * 1024, rnd),
                                       (10 * MiB + 100, b"Y")])
    _sparse(d / "zeros.raw", 4 * MiB, [(0, bytes(MiB)), (2 * MiB, b"\1" * 512)])
    _sparse(d / "full.raw", 3 * MiB, [(0, random.Random(2).randbytes(3 * MiB))])
    _sparse(d / "odd.raw", 12345, [(5000, b"abc")])
    _sparse(d / "empty.raw", 0)
    _sparse(d / "small.raw", MiB)


IMAGES = ["sparse.raw", "data.raw", "zeros.raw", "full.raw", "empty.raw", "odd.raw"]
QUERIES = [["info"], ["info", "--output=json"], ["info", "--output", "human"],
           ["info", "-f", "raw"], ["info", "-U"], ["info", "--backing-chain"],
           ["info", "--backing-chain", "--output=json"],
           ["map"], ["map", "--output=json"], ["map", "-f", "raw", "--output=json"],
           ["map", "--start-offset=1M", "--max-length=2M", "--output=json"],
           ["map", "--start-offset=20M", "--output=json"], ["map", "--start-offset=1M"],
           ["map", "-s", "1M", "-l", "2M", "--output=json"],
           ["check"], ["check", "--output=json"], ["check", "-q"], ["check", "-f", "raw"],
           ["check", "-r", "leaks", "-f", "raw"]]


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("query", QUERIES, ids=" ".join)
def test_queries(run_both, image, query):
    run_both(query + [image], make_images).assert_same()


@pytest.mark.parametrize("args", [
    ["info", "--image-opts", "driver=raw,file.filename=data.raw"],
    ["info", "--image-opts", "driver=file,filename=data.raw"],
    ["info", "--output=json", "--image-opts", "driver=raw,file.filename=data.raw"],
    ["map", "--image-opts", "driver=null-co,size=1M"],
    ["map", "--output=json", "--image-opts", "driver=null-co,size=1M,read-zeroes=on"],
    ["info", "--image-opts", "-f", "raw", "data.raw"],
    ["info", "-U", "--image-opts", "driver=file,filename=data.raw,force-share=off"],
    ["compare", "--image-opts", "driver=null-co,size=1M,read-zeroes=on",
     "driver=null-co,size=1M,read-zeroes=on"],
    ["info", "--object", "secret,id=s0,data=x", "data.raw"],
    ["info", "--object", "foo", "data.raw"],
    ["info", "--object", "secret", "data.raw"],
    ["info", "--object", "secret,id=s0", "data.raw"],
    ["info", "--object", "secret,id=s0,data=x,foo=1", "data.raw"],
    ["info", "--object", "secret,id=0s,data=x", "data.raw"],
], ids=" ".join)
def test_options(run_both, args):
    run_both(args, make_images).assert_same()


ERRORS = [
    [], ["foo"], ["-z"], ["-T"], ["info"], ["info", "-z", "data.raw"],
    ["info", "--foo", "data.raw"], ["info", "-f"], ["info", "a", "b"],
    ["info", "nonexist"], ["info", "-f", "foo", "data.raw"],
    ["info", "--output=xml", "data.raw"], ["info", "--output", "data.raw"],
    ["info", "-zU", "data.raw"], ["info", "-Uz", "data.raw"], ["info", "--f", "raw", "x"],
    ["info", "--image-opts=1", "data.raw"], ["info", "-q", "data.raw"],
    ["map"], ["map", "--start-offset=x", "data.raw"], ["map", "--output=yaml", "data.raw"],
    ["check"], ["check", "-r", "foo", "data.raw"], ["check", "-T", "foo", "data.raw"],
    ["check", "nonexist"],
    ["create"], ["create", "x"], ["create", "x", "1M", "2"], ["create", "x", "1Q"],
    ["create", "x", "--", "-1"], ["create", "x", "1e3"], ["create", "x", "99999E"],
    ["create", "x", "8E"], ["create", "x", "-1"], ["create", "-f", "foo", "x", "1M"],
    ["create", "-o", ",,", "x", "1M"], ["create", "-o", "foo=bar", "x", "1M"],
    ["create", "-o", "nocow", "x", "1M"], ["create", "-o", "size=2M", "x", "1M"],
    ["create", "-o", "size=x", "x"], ["create", "-o", "nocow=x", "x", "1M"],
    ["create", "-b", "data.raw", "x", "1M"], ["create", "-F", "raw", "x", "1M"],
    ["create", "/nonexist/x", "1M"], ["create", "-f", "null-co", "-o", "help"],
    ["create", "-f", "foo", "-o", "help"],
    ["convert"], ["convert", "data.raw"], ["convert", "-f", "foo", "data.raw", "c.raw"],
    ["convert", "-O", "foo", "data.raw", "c.raw"], ["convert", "nonexist", "c.raw"],
    ["convert", "-S", "3", "data.raw", "c.raw"], ["convert", "-S", "1x", "data.raw", "c.raw"],
    ["convert", "-n", "data.raw", "c.raw"], ["convert", "-n", "data.raw", "small.raw"],
    ["convert", "-c", "data.raw", "c.raw"], ["convert", "-m", "0", "data.raw", "c.raw"],
    ["convert", "-m", "x", "data.raw", "c.raw"], ["convert", "-t", "foo", "data.raw", "c.raw"],
    ["convert", "-T", "foo", "data.raw", "c.raw"], ["convert", "-B", "x", "data.raw", "c"],
    ["convert", "-o", "foo=bar", "data.raw", "c.raw"],
    ["convert", "--target-image-opts", "data.raw", "c.raw"],
    ["convert", "--target-is-zero", "data.raw", "c.raw"],
    ["convert", "-C", "-S", "4k", "data.raw", "c.raw"],
    ["convert", "-n", "-o", "preallocation=full", "data.raw", "small.raw"],
    ["convert", "-O", "null-co", "data.raw", "c.raw"],
    ["convert", "data.raw", "/nonexist/c.raw"], ["convert", "data.raw", "data.raw"],
    ["convert", "-p", "nonexist", "c.raw"], ["convert", "-p", "-O", "foo", "data.raw", "c"],
    ["compare"], ["compare", "data.raw"], ["compare", "data.raw", "nonexist"],
    ["compare", "-f", "foo", "data.raw", "data2.raw"], ["compare", "a", "b", "c"],
    ["compare", "-T", "foo", "data.raw", "data2.raw"],
    ["resize"], ["resize", "small.raw"], ["resize", "small.raw", "x"],
    ["resize", "small.raw", "1M", "2M"], ["resize", "nonexist", "1M"],
    ["resize", "-U", "small.raw", "1M"], ["resize", "--preallocation=foo", "small.raw", "2M"],
    ["resize", "-f", "raw", "small.raw", "1.5"],
    ["resize", "-f", "raw", "small.raw", "512k"],
    ["resize", "-f", "raw", "--shrink", "small.raw", "-100M"],
    ["resize", "-f", "raw", "--shrink", "--preallocation=full", "small.raw", "512k"],
    ["resize", "-f", "raw", "small.raw", "9223372036854775807"],
    ["resize", "--image-opts", "driver=null-co,size=1M", "2M"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a) or "<none>")
def test_errors(run_both, args):
    run_both(args, make_images).assert_same()


# ---- create ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["x.raw", "10M"], ["-f", "raw", "x.raw", "1G"], ["x.raw", "1.5M"], ["x.raw", "0x10"],
    ["x.raw", "1b"], ["x.raw", "512B"], ["x.raw", "1.5k"], ["x.raw", "0"], ["x.raw", "12345"],
    ["-q", "x.raw", "1M"], ["-u", "x.raw", "1M"], ["x.raw", "1M", "-q"],
    ["-o", "size=2M", "x.raw"], ["-o", "size=1M", "-o", "size=2M", "x.raw"],
    ["-o", "preallocation=falloc", "x.raw", "1M"], ["-o", "preallocation=full", "x.raw", "1M"],
    ["-o", "preallocation=off", "x.raw", "1M"],
    ["-o", "nocow=on", "x.raw", "1M"], ["-o", "extent_size_hint=1M", "x.raw", "1M"],
    ["-f", "file", "x.raw", "1M"], ["data.raw", "1M"],
    ["-f", "raw", "-o", "help"],
    ["-o", "help"],
    ["-o", "help,size=1M"],
    ["-f", "file", "-o", "help"], ["-f", "raw", "x.raw", "-o", "?"],
    ["-f", "raw", "x.raw", "-o", "help"],
    ["-o", "preallocation=full,nocow=off", "x.raw", "1M"],
], ids=" ".join)
def test_create(run_both, qemu_img, args):
    both = run_both(["create"] + args, make_images)
    both.assert_same()
    for name in ("x.raw", "data.raw"):
        ref, ours = both.ref_dir / name, both.our_dir / name
        if ref.exists():
            assert ours.stat().st_size == ref.stat().st_size
            assert ours.read_bytes() == ref.read_bytes()
            assert _map(qemu_img, ours) == _map(qemu_img, ref)


def _map(qemu_img, path) -> str:
    out = subprocess.run([qemu_img, "map", "--output=json", "-f", "raw", path.name],
                         cwd=path.parent, capture_output=True, check=True)
    return out.stdout.decode()


# ---- convert --------------------------------------------------------------------------------
@pytest.mark.parametrize("image", ["sparse.raw", "data.raw", "zeros.raw", "full.raw",
                                   "empty.raw", "odd.raw"])
@pytest.mark.parametrize("opts", [[], ["-O", "raw"], ["-S", "0"], ["-S", "1k"],
                                  ["-S", "64k"], ["-W", "-m", "4"], ["-q"], ["-p"],
                                  ["-t", "none"], ["-U", "-T", "writeback"],
                                  ["-o", "preallocation=full"]], ids=" ".join)
def test_convert(run_both, qemu_img, image, opts):
    both = run_both(["convert", *opts, image, "out.raw"], make_images)
    both.assert_same()
    ref, ours = both.ref_dir / "out.raw", both.our_dir / "out.raw"
    assert ours.read_bytes() == ref.read_bytes()
    assert _map(qemu_img, ours) == _map(qemu_img, ref)
    assert ours.stat().st_blocks == ref.stat().st_blocks


@pytest.mark.parametrize("args", [
    ["data.raw", "zeros.raw", "out.raw"], ["-n", "data.raw", "full.raw", "bigger.raw"],
    ["data.raw", "small.raw"], ["-U", "-p", "full.raw", "small.raw"],
    ["-n", "zeros.raw", "full.raw"], ["-n", "-S", "0", "zeros.raw", "full.raw"],
    ["-p", "full.raw", "data.raw", "out.raw"],
    ["-n", "--target-is-zero", "sparse.raw", "bigger.raw"],
    ["-n", "--target-image-opts", "data.raw", "driver=raw,file.filename=bigger.raw"],
], ids=" ".join)
def test_convert_more(run_both, qemu_img, args):
    both = run_both(["convert", *args], make_images)
    both.assert_same()
    out = args[-1].rsplit("=", 1)[-1]
    ref, ours = both.ref_dir / out, both.our_dir / out
    assert ours.read_bytes() == ref.read_bytes()
    assert _map(qemu_img, ours) == _map(qemu_img, ref)


# ---- compare --------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["data.raw", "data2.raw"], ["data.raw", "diff.raw"], ["data.raw", "bigger.raw"],
    ["bigger.raw", "data.raw"], ["data.raw", "tail.raw"], ["-s", "data.raw", "bigger.raw"],
    ["-s", "data.raw", "data2.raw"], ["-s", "data.raw", "diff.raw"], ["-q", "data.raw", "diff.raw"],
    ["-p", "data.raw", "data2.raw"], ["-p", "data.raw", "diff.raw"], ["-U", "data.raw", "data2.raw"],
    ["-f", "raw", "-F", "raw", "data.raw", "data2.raw"], ["sparse.raw", "zeros.raw"],
    ["full.raw", "zeros.raw"], ["zeros.raw", "sparse.raw"], ["-s", "zeros.raw", "sparse.raw"],
    ["empty.raw", "sparse.raw"], ["-p", "sparse.raw", "tail.raw"],
    ["data.raw", "odd.raw"],
], ids=" ".join)
def test_compare(run_both, args):
    run_both(["compare", *args], make_images).assert_same()


# ---- resize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["small.raw", "2M"], ["small.raw", "+1M"], ["small.raw", "-512k"],
    ["--shrink", "small.raw", "-512k"], ["--shrink", "small.raw", "512k"],
    ["small.raw", "1M"], ["-q", "small.raw", "3M"], ["small.raw", "+0"],
    ["--preallocation=full", "small.raw", "2M"], ["--preallocation=falloc", "small.raw", "2M"],
    ["small.raw", "--", "-1M"], ["small.raw", "1000"],
    ["-f", "raw", "small.raw", "5M"], ["-f", "raw", "--shrink", "data.raw", "1M"],
    ["--image-opts", "driver=raw,file.filename=small.raw", "4M"],
], ids=" ".join)
def test_resize(run_both, args):
    both = run_both(["resize", *args], make_images)
    both.assert_same()
    for name in ("small.raw", "data.raw"):
        ref, ours = both.ref_dir / name, both.our_dir / name
        assert ours.stat().st_size == ref.stat().st_size
        assert ours.read_bytes() == ref.read_bytes()


# ---- the tool itself --------------------------------------------------------------------------
def test_help_matches_except_versions_and_formats(run_both):
    both = run_both(["--help"])
    ours, ref = both.ours.stdout.decode().splitlines(), both.ref.stdout.decode().splitlines()
    assert both.ours.returncode == both.ref.returncode == 0
    assert ours[1:-4] == ref[1:-4]            # all but version, formats and footer
    assert ours[0].startswith("qemu-img version 7.2.")


def test_version(run_both):
    both = run_both(["--version"])
    ours, ref = both.ours.stdout.decode().splitlines(), both.ref.stdout.decode().splitlines()
    assert ours[0].startswith("qemu-img version 7.2.0 (blockengine ")
    assert ours[1:] == ref[1:]
    assert both.ours.returncode == 0


def test_lock_conflict_with_convert_source(run_both):
    """Creating over an image that the same convert reads fails on its lock."""
    run_both(["convert", "data.raw", "data.raw"], make_images).assert_same()


@pytest.mark.parametrize("name", ["amend", "bench", "bitmap", "check", "commit", "compare",
                                  "convert", "create", "dd", "info", "map", "measure",
                                  "snapshot", "rebase", "resize"])
def test_every_qemu_img_command_exists(run_both, name):
    """Every command of qemu-img 7.2 is there: bare, each fails as qemu-img's does."""
    run_both([name]).assert_same()


@pytest.mark.parametrize("args", [
    ["info", "-f", "file", "data.raw"], ["info", "--output=json", "-f", "file", "odd.raw"],
    ["map", "--output=json", "-f", "file", "data.raw"], ["check", "-f", "file", "data.raw"],
    ["info", "file:data.raw"], ["map", "file:odd.raw"],
    ["info", "-f", "null-co", "data.raw"], ["info", "-f", "null-co", "null-co://"],
    ["info", "-f", "null-aio", "null-aio://"],
])
def test_protocol_as_format_and_prefix(run_both, args):
    """-f with a protocol driver opens the file node itself; 'file:' is the file
    protocol's prefix; null drivers take only their URL (bdrv_parse_filename)."""
    run_both(args, make_images).assert_same()


def test_blockengine_img_prefix():
    """As `blockengine img`, messages name blockengine (the program actually run)."""
    out = subprocess.run([sys.executable, "-m", "blockengine.cli", "img", "info"],
                         capture_output=True, cwd=ROOT)
    assert out.returncode == 1
    assert out.stderr == (b"blockengine: Expecting one image file name\n"
                          b"Try 'blockengine img --help' for more information\n")
