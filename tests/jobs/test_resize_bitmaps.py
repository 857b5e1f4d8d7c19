"""Resizing a qcow2 image with persistent dirty bitmaps, as qemu-img 7.2 and
qemu-storage-daemon do it: allowed when every bitmap is loaded and usable; the bitmaps
follow the new size (bits past a shrunk end dropped, a grown tail clean) and are
stored at the new size.  Checked against the reference tools byte for byte, through
QEMU's own view of the bitmaps (an NBD export of qemu-storage-daemon), and with
qemu-img check."""
import json
import os
import subprocess
import time

import pytest

from tests.tooling import require_tool

from .helpers import Ctx
from .qsd import QSD

pytestmark = pytest.mark.interop

MiB = 1 << 20


def make_image(path, inconsistent=False):
    """4 MiB qcow2, bitmaps b0 (64k) and b1 (512k, disabled), written at 0+64k and
    3M+1M (b0 records; b1 is disabled), then 1M+64k with b1 enabled too."""
    img, io = require_tool("qemu-img"), require_tool("qemu-io")
    subprocess.run([img, "create", "-q", "-f", "qcow2", path, str(4 * MiB)], check=True)
    subprocess.run([img, "bitmap", "--add", path, "b0"], check=True)
    subprocess.run([img, "bitmap", "--add", "-g", "512k", "--disable", path, "b1"],
                   check=True)
    subprocess.run([io, "-c", "write 0 64k", "-c", "write 3M 1M", path], check=True,
                   capture_output=True)
    subprocess.run([img, "bitmap", "--enable", path, "b1"], check=True)
    cmds = ["-c", "write 1M 64k"] + (["-c", "sigraise 9"] if inconsistent else [])
    subprocess.run([io, *cmds, path], capture_output=True)     # sigraise: killed


def qemu_bitmap_view(path, names=("b0", "b1")):
    """QEMU's reading of the bitmaps: qemu-storage-daemon exports the image over NBD
    with its bitmaps and ``qemu-img map`` with x-dirty-bitmap lists their extents
    (dirty chunks are the ones reported without data)."""
    sock = path + ".nbd"
    exports = ",".join("bitmaps.%d=%s" % (i, n) for i, n in enumerate(names))
    proc = subprocess.Popen([require_tool("qemu-storage-daemon"),
                             "--blockdev", "driver=file,filename=%s,node-name=f,read-only=on"
                             % path,
                             "--blockdev", "driver=qcow2,file=f,node-name=n,read-only=on",
                             "--nbd-server", "addr.type=unix,addr.path=" + sock,
                             "--export", "type=nbd,id=e,node-name=n,name=n," + exports],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        view = {}
        for n in names:
            argv = [require_tool("qemu-img"), "map", "--output=json", "--image-opts",
                    "driver=nbd,server.type=unix,server.path=%s,export=n,"
                    "x-dirty-bitmap=qemu:dirty-bitmap:%s" % (sock, n)]
            while True:     # the socket file exists a moment before the server listens
                r = subprocess.run(argv, capture_output=True, text=True)
                if r.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert r.returncode == 0, r.stderr
            view[n] = [(e["start"], e["length"]) for e in json.loads(r.stdout)
                       if not e["data"]]
        return view
    finally:
        proc.kill()
        proc.wait()


def info_bitmaps(path):
    r = subprocess.run([require_tool("qemu-img"), "info", "--output=json", path],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["format-specific"]["data"]["bitmaps"], \
        json.loads(r.stdout)["virtual-size"]


def assert_clean(path):
    r = subprocess.run([require_tool("qemu-img"), "check", path], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# the bitmaps before any resize, in QEMU's view: b0 saw all three writes, b1 only the last
BEFORE = {"b0": [(0, 65536), (MiB, 65536), (3 * MiB, MiB)], "b1": [(MiB, 512 << 10)]}


@pytest.mark.parametrize("args, expect", [
    (["8M"], BEFORE),
    (["+1M"], BEFORE),
    (["--shrink", "3200K"], {"b0": [(0, 65536), (MiB, 65536), (3 * MiB, 128 << 10)],
                             "b1": [(MiB, 512 << 10)]}),
    (["--shrink", "1M"], {"b0": [(0, 65536)], "b1": []}),
])
def test_img_resize_with_bitmaps_like_qemu_img(run_both, args, expect):
    both = run_both(["resize", "-f", "qcow2", "img.qcow2", *args],
                    prepare=lambda d: make_image(str(d / "img.qcow2")))
    both.assert_same()
    assert both.ours.returncode == 0
    ref, ours = str(both.ref_dir / "img.qcow2"), str(both.our_dir / "img.qcow2")
    assert_clean(ours)
    assert info_bitmaps(ours) == info_bitmaps(ref)
    with open(ref, "rb") as a, open(ours, "rb") as b:
        assert a.read() == b.read()          # the same clusters, tables and bits
    assert qemu_bitmap_view(ours) == qemu_bitmap_view(ref) == expect


def test_img_resize_inconsistent_bitmap_refused_like_qemu_img(run_both):
    both = run_both(["resize", "img.qcow2", "8M"],
                    prepare=lambda d: make_image(str(d / "img.qcow2"), inconsistent=True))
    both.assert_same()
    assert both.ours.returncode == 1
    assert b"Bitmap 'b0' is inconsistent and cannot be used" in both.ours.stderr
    assert info_bitmaps(str(both.our_dir / "img.qcow2"))[1] == 4 * MiB


def test_block_resize_with_bitmaps_like_qsd(tmp_path):
    """block_resize over QMP, then the node is deleted (bitmaps stored): the same image
    as qemu-storage-daemon's, and QEMU reads the same bits in it."""
    paths = {}
    for side in ("qemu", "be"):
        paths[side] = str(tmp_path / (side + ".qcow2"))
        make_image(paths[side])
    qsd, ctx = QSD(require_tool("qemu-storage-daemon")), Ctx()
    try:
        results = {}
        for side, run in (("qemu", qsd.raw), ("be", _ctx_raw(ctx))):
            run("blockdev-add", driver="qcow2", **{"node-name": "n"},
                file={"driver": "file", "filename": paths[side]})
            run("block-dirty-bitmap-add", node="n", name="t")
            results[side] = [run("block_resize", **{"node-name": "n"}, size=6 * MiB),
                             run("block-dirty-bitmap-add", node="n", name="b2",
                                 persistent=True),
                             run("block_resize", **{"node-name": "n"}, size=5 * MiB),
                             run("blockdev-del", **{"node-name": "n"})]
        assert results["qemu"] == results["be"]
        assert all(r == {"return": {}} for r in results["be"])
    finally:
        qsd.close()
        ctx.close()
    assert_clean(paths["be"])
    with open(paths["qemu"], "rb") as a, open(paths["be"], "rb") as b:
        assert a.read() == b.read()
    assert qemu_bitmap_view(paths["be"], ("b0", "b1", "b2")) == \
        qemu_bitmap_view(paths["qemu"], ("b0", "b1", "b2"))


def test_resize_shrinks_and_grows_in_memory_bitmaps(tmp_path, ctx):
    """bdrv_dirty_bitmap_truncate() on any node: a raw node's bitmap follows it."""
    path = tmp_path / "r.raw"
    path.write_bytes(bytes(4 * MiB))
    ctx.add_raw("r", str(path))
    ctx.cmd("block-dirty-bitmap-add", node="r", name="t", granularity=65536)
    node = ctx.graph.find_node("r")
    node.pwrite(0, b"x" * 4 * MiB)
    ctx.cmd("block_resize", **{"node-name": "r"}, size=MiB + 512)
    bm = node.dirty_bitmaps[0]
    assert bm.count() == 17 * 65536 and bm.size == MiB + 512
    ctx.cmd("block_resize", **{"node-name": "r"}, size=8 * MiB)
    assert bm.count() == 17 * 65536
    node.pwrite(7 * MiB, b"y")
    assert bm.count() == 18 * 65536
    info = ctx.cmd("query-named-block-nodes", flat=True)
    assert [b["count"] for n in info if n["node-name"] == "r" for b in n["dirty-bitmaps"]] \
        == [18 * 65536]


def _ctx_raw(ctx):
    """A QSD.raw-like call on blockengine's handlers: {'return': ..} or {'error': ..}."""
    from blockengine.errors import BlockError

    def run(_name, **args):
        try:
            return {"return": ctx.cmd(_name, **args) or {}}
        except BlockError as e:
            return {"error": {"class": getattr(e, "qmp_class", "GenericError"),
                              "desc": str(e)}}
    return run
