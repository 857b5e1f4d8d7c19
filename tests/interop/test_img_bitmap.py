"""`img bitmap` and `img convert --bitmaps` against qemu-img 7.2.

Each case runs the same command line through qemu-img and blockengine on twin images
(same data, same bitmaps, made by qemu-img/qemu-io), then checks:

* stdout, stderr and exit status byte for byte (QEMU's automatic node names, which
  embed a counter, are normalised);
* the images' bitmap lists as ``qemu-img info --output=json`` reports them;
* the bitmap contents as QEMU reads them: qemu-storage-daemon's dirty counts and
  ``x-debug-block-dirty-bitmap-sha256`` of every bitmap, for both images;
* blockengine's image passes ``qemu-img check``.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.jobs.qsd import QSD
from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

NODE_NAME = re.compile(rb"#block\d+")


@pytest.fixture(autouse=True)
def _tools():
    for t in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        require_tool(t)


def qimg(d, *args):
    subprocess.run(["qemu-img", *args], cwd=d, check=True, capture_output=True)


def qio(d, path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [path], cwd=d, check=True, capture_output=True)


def make_images(d):
    """img.qcow2 (data, three bitmaps with dirty bits), src.qcow2 (same size, other
    bits), big.qcow2 (other size), v2.qcow2, disk.raw, broken.qcow2 (b1 in-use)."""
    qimg(d, "create", "-f", "qcow2", "img.qcow2", "64M")
    qimg(d, "bitmap", "--add", "img.qcow2", "b0")
    qimg(d, "bitmap", "--add", "-g", "4k", "img.qcow2", "b1")
    qio(d, "img.qcow2", "write -P 1 0 1M", "write 10M 4k", "write 33M 100k")
    qimg(d, "bitmap", "--add", "--disable", "-g", "1M", "img.qcow2", "b2")
    qio(d, "img.qcow2", "write 40M 512", "write 64000k 512")
    qimg(d, "bitmap", "--add", "img.qcow2", "late")
    qimg(d, "create", "-f", "qcow2", "src.qcow2", "64M")
    qimg(d, "bitmap", "--add", "-g", "512", "src.qcow2", "s0")
    qimg(d, "bitmap", "--add", "-g", "128k", "src.qcow2", "s1")
    qio(d, "src.qcow2", "write 3M 1k", "write 20M 300k", "write 63M 1M")
    qimg(d, "create", "-f", "qcow2", "big.qcow2", "128M")
    qimg(d, "bitmap", "--add", "big.qcow2", "s0")
    qimg(d, "create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M")
    qimg(d, "create", "-f", "raw", "disk.raw", "64M")
    copy_sparse(d / "img.qcow2", d / "broken.qcow2")
    _set_in_use(d / "broken.qcow2", b"b1")
    qimg(d, "create", "-f", "qcow2", "target.qcow2", "64M")
    qimg(d, "create", "-f", "qcow2", "target-big.qcow2", "65M")


def _set_in_use(path, name: bytes) -> None:
    """Mark one bitmap in-use in the directory, as a crash would leave it."""
    import struct
    with open(path, "r+b") as f:
        data = f.read()
        pos = struct.unpack(">I", data[100:104])[0]           # header_length
        while True:
            ext, length = struct.unpack(">II", data[pos:pos + 8])
            assert ext, "no bitmaps extension"
            if ext == 0x23852875:
                nb, _, _, doff = struct.unpack(">IIQQ", data[pos + 8:pos + 32])
                break
            pos += 8 + ((length + 7) & ~7)
        for _ in range(nb):
            _, _, flags, _, _, nsize, esize = struct.unpack(">QIIBBHI", data[doff:doff + 24])
            if data[doff + 24 + esize:doff + 24 + esize + nsize] == name:
                f.seek(doff + 12)
                f.write(struct.pack(">I", flags | 1))
            doff += (24 + esize + nsize + 7) & ~7


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    master = tmp_path_factory.mktemp("bitmap-images")
    make_images(master)

    def prepare(d):
        for f in master.iterdir():
            copy_sparse(f, d / f.name)
    return prepare


def image_bitmaps(path):
    """qemu-img info's bitmap list (or the format, or the error, for other files)."""
    r = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                       capture_output=True)
    if r.returncode:
        return r.stderr.replace(bytes(path), b"IMG")
    info = json.loads(r.stdout)
    if info["format"] != "qcow2":
        return info["format"]
    return info["format-specific"]["data"].get("bitmaps")


def qsd():
    """A qemu-storage-daemon (its start is retried once: it is slow on a busy host)."""
    try:
        return QSD(require_tool("qemu-storage-daemon"))
    except (RuntimeError, TimeoutError):
        return QSD(require_tool("qemu-storage-daemon"))


def bitmap_contents(q, node_name, path):
    """{name: (count, granularity, recording, sha256)} of the bitmaps QEMU loads."""
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": node_name, "read-only": True},
          file={"driver": "file", "filename": str(path)})
    node = [n for n in q.cmd("query-named-block-nodes") if n["node-name"] == node_name][0]
    contents = {}
    for bm in node.get("dirty-bitmaps", []):
        sha = None if bm.get("inconsistent") else q.cmd(
            "x-debug-block-dirty-bitmap-sha256", node=node_name, name=bm["name"])["sha256"]
        contents[bm["name"]] = (bm["count"], bm["granularity"], bm["recording"], sha)
    return contents


def check_status(path):
    """qemu-img check's exit status and output, file names removed."""
    r = subprocess.run(["qemu-img", "check", path.name], cwd=path.parent,
                       capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def assert_same_run(both):
    """Outputs equal up to QEMU's node-name counters."""
    for name in ("stdout", "stderr"):
        ours, ref = getattr(both.ours, name), getattr(both.ref, name)
        assert NODE_NAME.sub(b"#blockN", ours).decode() == \
            NODE_NAME.sub(b"#blockN", ref).decode()
    assert both.ours.returncode == both.ref.returncode


def assert_same_images(both, *names):
    """Same bitmaps (list, counts, contents) in both images; same check verdict."""
    q = None
    try:
        for i, name in enumerate(names):
            ref, ours = both.ref_dir / name, both.our_dir / name
            assert ours.exists() == ref.exists()
            if not ref.exists():
                continue
            listed = image_bitmaps(ref)
            assert image_bitmaps(ours) == listed
            if not isinstance(listed, (list, type(None))):
                continue                    # not a qcow2 image
            q = q or qsd()
            assert bitmap_contents(q, "o%d" % i, ours) == bitmap_contents(q, "r%d" % i, ref)
            assert check_status(ours) == check_status(ref)
    finally:
        if q is not None:
            q.close()


# ---- qemu-img bitmap -------------------------------------------------------------------------
CASES = [
    ["--add", "img.qcow2", "new"], ["--add", "-g", "512", "img.qcow2", "new"],
    ["--add", "-g", "2M", "img.qcow2", "new"], ["--add", "--granularity=64k", "img.qcow2", "n"],
    ["--add", "-g", "0", "img.qcow2", "new"], ["--add", "--disable", "img.qcow2", "new"],
    ["--remove", "img.qcow2", "b1"], ["--remove", "img.qcow2", "late"],
    ["--clear", "img.qcow2", "b0"], ["--clear", "img.qcow2", "b2"],
    ["--enable", "img.qcow2", "b2"], ["--disable", "img.qcow2", "b0"],
    ["--merge", "b1", "img.qcow2", "b0"], ["--merge", "b0", "img.qcow2", "b2"],
    ["--merge", "b2", "img.qcow2", "late"],
    ["--add", "--merge", "b1", "img.qcow2", "copy"],
    ["--add", "-g", "1M", "--merge", "b1", "--merge", "b0", "--disable", "img.qcow2", "c"],
    ["--merge", "s0", "-b", "src.qcow2", "img.qcow2", "b0"],
    ["--merge", "s1", "-b", "src.qcow2", "-F", "qcow2", "img.qcow2", "b1"],
    ["--add", "--merge", "s0", "-b", "src.qcow2", "img.qcow2", "from-src"],
    ["--source-file=src.qcow2", "--merge", "s1", "--source-format", "qcow2", "img.qcow2",
     "late"],
    ["--add", "--add", "img.qcow2", "twice"], ["--add", "--remove", "--add", "img.qcow2", "x"],
    ["--clear", "--enable", "--remove", "img.qcow2", "b2"],
    ["--add", "--clear", "--remove", "--merge", "b0", "img.qcow2", "gone"],
    ["-f", "qcow2", "--add", "img.qcow2", "fmt"],
    ["--image-opts", "--add", "driver=qcow2,file.filename=img.qcow2", "io"],
    ["--remove", "broken.qcow2", "b1"], ["--clear", "broken.qcow2", "b1"],
    ["--add", "broken.qcow2", "b9"], ["--merge", "b1", "broken.qcow2", "b0"],
]
ERRORS = [
    ["img.qcow2", "b0"], ["--add", "img.qcow2"], ["--add", "img.qcow2", "b", "extra"],
    ["--add", "-g", "1000", "img.qcow2", "b"], ["--add", "-g", "256", "img.qcow2", "b"],
    ["--add", "-g", "4G", "img.qcow2", "b"], ["--add", "-g", "x", "img.qcow2", "b"],
    ["-g", "64k", "--remove", "img.qcow2", "b0"], ["-F", "raw", "--add", "img.qcow2", "b"],
    ["-b", "src.qcow2", "--add", "img.qcow2", "b"], ["--add", "img.qcow2", "b0"],
    ["--add", "img.qcow2", ""], ["--add", "img.qcow2", "x" * 1100],
    ["--remove", "img.qcow2", "nosuch"], ["--clear", "img.qcow2", "nosuch"],
    ["--enable", "img.qcow2", "nosuch"], ["--disable", "img.qcow2", "nosuch"],
    ["--merge", "nosuch", "img.qcow2", "b0"], ["--merge", "b0", "img.qcow2", "nosuch"],
    ["--merge", "s0", "-b", "big.qcow2", "img.qcow2", "b0"],
    ["--merge", "s0", "-b", "src.qcow2", "-F", "raw", "img.qcow2", "b0"],
    ["--merge", "s0", "-b", "nonexist.qcow2", "img.qcow2", "b0"],
    ["--merge", "b0", "-b", "img.qcow2", "img.qcow2", "b1"],
    ["--add", "v2.qcow2", "b"], ["--add", "-f", "raw", "img.qcow2", "b"],
    ["--add", "-f", "raw", "disk.raw", "b"], ["--add", "nonexist.qcow2", "b"],
    ["--add", "--image-opts", "-f", "qcow2", "img.qcow2", "b"],
    ["--foo", "img.qcow2", "b"], ["--merge"], ["-b"], ["--add", "-x", "img.qcow2", "b"],
    ["--object", "secret,id=s", "--add", "img.qcow2", "b"],
    ["-g", "x", "--foo", "img.qcow2", "b"], ["-g", "1k", "--object", "bogus", "img.qcow2", "b"],
]


@pytest.mark.parametrize("args", CASES + ERRORS, ids=lambda a: " ".join(a)[:60])
def test_bitmap(run_both, images, args):
    both = run_both(["bitmap", *args], images)
    assert_same_run(both)
    assert_same_images(both, "img.qcow2", "broken.qcow2", "src.qcow2")


# ---- qemu-img convert --bitmaps -------------------------------------------------------------
CONVERT = [
    ["-O", "qcow2", "img.qcow2"], ["-O", "qcow2", "src.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "img.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=2M", "src.qcow2"],
    ["-O", "qcow2", "big.qcow2"], ["-O", "qcow2", "v2.qcow2"],
    ["-O", "raw", "img.qcow2"], ["-O", "vmdk", "img.qcow2"],
    ["-O", "qcow2", "-o", "compat=0.10", "img.qcow2"], ["-O", "qcow2", "disk.raw"],
    ["-O", "qcow2", "-f", "raw", "img.qcow2"], ["-O", "qcow2", "img.qcow2", "src.qcow2"],
    ["-O", "qcow2", "broken.qcow2"], ["--skip-broken-bitmaps", "-O", "qcow2", "broken.qcow2"],
    ["-n", "-O", "qcow2", "src.qcow2"], ["-n", "-O", "qcow2", "img.qcow2"],
]


@pytest.mark.parametrize("args", CONVERT, ids=lambda a: " ".join(a))
def test_convert_bitmaps(run_both, images, args):
    out = "target.qcow2" if "-n" in args else "out.img"
    both = run_both(["convert", "--bitmaps", *args, out], images)
    assert_same_run(both)
    assert_same_images(both, out)


@pytest.mark.parametrize("args", [
    ["--skip-broken-bitmaps", "-O", "qcow2", "img.qcow2", "out.img"],
    ["--bitmaps", "-n", "-O", "qcow2", "img.qcow2", "target-big.qcow2"],
    ["--bitmaps", "-n", "-O", "qcow2", "img.qcow2", "img.qcow2"],
])
def test_convert_bitmaps_errors(run_both, images, args):
    both = run_both(["convert", *args], images)
    assert_same_run(both)
    assert_same_images(both, args[-1])
