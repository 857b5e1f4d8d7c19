"""The copy-on-read filter (drivers/filter/copy_on_read.py) and block-stream's use of it,
against qemu-io / qemu-storage-daemon 7.2 and against a model under concurrent writes."""
import json
import subprocess
import time

import pytest

from tests.tooling import require_tool

from .helpers import Ctx, Writer
from .test_interop_qsd import _qcow2_chain, both, qcow2_ok  # noqa: F401  (fixtures)

pytestmark = pytest.mark.interop

MiB = 1 << 20


def make_chain(directory, tag=""):
    """base (1 at 0-4M) <- mid (2 at 1M-2M, zeroes at 3M+64k) <- top (empty), 4 MiB."""
    img, io = require_tool("qemu-img"), require_tool("qemu-io")
    p = lambda n: str(directory / (n + tag + ".qcow2"))     # noqa: E731
    subprocess.run([img, "create", "-q", "-f", "qcow2", p("base"), str(4 * MiB)], check=True)
    subprocess.run([io, "-c", "write -P 1 0 4M", p("base")], check=True, capture_output=True)
    subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", p("base"), "-F", "qcow2",
                    p("mid")], check=True)
    subprocess.run([io, "-c", "write -P 2 1M 1M", "-c", "write -z 3M 64k", p("mid")],
                   check=True, capture_output=True)
    subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", p("mid"), "-F", "qcow2",
                    p("top")], check=True)
    return p("base"), p("mid"), p("top")


def qemu_map(path):
    r = subprocess.run([require_tool("qemu-img"), "map", "--output=json", path],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def assert_clean(path):
    r = subprocess.run([require_tool("qemu-img"), "check", path], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def open_chain(ctx, base, mid, top):
    for name, path, backing in (("base", base, None), ("mid", mid, "base"),
                                ("top", top, "mid")):
        ctx.cmd("blockdev-add", driver="qcow2", backing=backing,
                file={"driver": "file", "filename": path}, **{"node-name": name})


READS = [(0, 64 << 10), (MiB, MiB // 2), (3 * MiB, 64 << 10), (3 * MiB + 65536, 1000)]


@pytest.mark.parametrize("bottom", [None, "mid"])
def test_guest_reads_copy_like_qemu_io(tmp_path, bottom):
    """The same reads through copy-on-read with qemu-io and with blockengine: top ends up
    with the same clusters (qemu-img map, host offsets included), the same data."""
    io = require_tool("qemu-io")
    q_base, q_mid, q_top = make_chain(tmp_path, "-q")
    b_base, b_mid, b_top = make_chain(tmp_path, "-b")
    opts = "driver=copy-on-read,file.driver=qcow2,file.file.filename=" + q_top
    if bottom:
        opts += ",file.backing.node-name=midn,bottom=midn"
    cmds = sum((["-c", "read %d %d" % r] for r in READS), [])
    subprocess.run([io, "--image-opts", opts, *cmds], check=True, capture_output=True)

    ctx = Ctx()
    try:
        open_chain(ctx, b_base, b_mid, b_top)
        args = {"bottom": "mid"} if bottom else {}
        ctx.cmd("blockdev-add", driver="copy-on-read", file="top", **{"node-name": "cor"},
                **args)
        cor = ctx.graph.find_node("cor")
        base_data = bytearray(b"\1" * 4 * MiB)
        base_data[MiB:2 * MiB] = b"\2" * MiB
        base_data[3 * MiB:3 * MiB + 65536] = bytes(65536)
        for off, n in READS:
            assert cor.pread(off, n) == base_data[off:off + n]
    finally:
        ctx.close()
    assert qemu_map(b_top) == qemu_map(q_top)
    assert_clean(b_top)
    r = subprocess.run([require_tool("qemu-img"), "compare", "-U", q_top, b_top],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_blockdev_add_errors_like_qsd(both, qcow2_ok):
    _qcow2_chain(both)
    both.cmd("blockdev-add", driver="copy-on-read", file="base", **{"node-name": "flt"})
    for args in ({"file": "top", "bottom": "nope"}, {"file": "top", "bottom": "flt"},
                 {}, {"file": "top", "node-name": "top"}):
        args = {"node-name": "c1", **args}
        assert both.cmd("blockdev-add", driver="copy-on-read", **args) is not None
    both.cmd("blockdev-add", driver="copy-on-read", file="top", bottom="mid",
             **{"node-name": "c1"})
    assert both.cmd("blockdev-del", **{"node-name": "top"}) == "Block device top is in use"
    both.cmd("blockdev-del", **{"node-name": "c1"})
    both.cmd("blockdev-del", **{"node-name": "top"})


def _graph(side_nodes):
    """(node-name, drv) of query-named-block-nodes, auto-generated names as '#'."""
    return sorted((n["node-name"] if not n["node-name"].startswith("#") else "#", n["drv"])
                  for n in side_nodes)


@pytest.mark.parametrize("filter_name", [None, "cor0"])
def test_stream_inserts_filter_like_qsd(both, qcow2_ok, filter_name):
    """During a stream the graph has a copy-on-read node above top (named, or implicit),
    afterwards not; the events and the streamed image are QEMU's."""
    _qcow2_chain(both)
    for bad in ("top", "1x"):
        assert both.cmd("block-stream", device="top",
                        **{"job-id": "s", "filter-node-name": bad}).startswith(
            "Could not create node: ")
    args = {"job-id": "s", "speed": 1}
    if filter_name:
        args["filter-node-name"] = filter_name
    both.cmd("block-stream", device="top", **args)
    time.sleep(0.2)
    q = both.qsd.cmd("query-named-block-nodes")
    b = both.be.cmd("query-named-block-nodes")
    assert _graph(q) == _graph(b)
    assert ("cor0" if filter_name else "#", "copy-on-read") in _graph(b)
    assert both.cmd("block-commit", device="top", **{"job-id": "c"}) == \
        "Need a root block node"
    assert both.cmd("block-stream", device="top", **{"job-id": "c"}) == \
        "Node 'top' is busy: block device is in use by block job: stream"
    if filter_name:
        assert both.cmd("blockdev-del", **{"node-name": "cor0"}) == "Node cor0 is in use"
    assert both.cmd("block_resize", size=8 << 20, **{"node-name": "top"}) == \
        "Device '(null)' is in use"
    assert both.cmd("block_resize", size=8 << 20, **{"node-name": "mid"}) == \
        "Device '(null)' is in use"
    both.cmd("block-job-set-speed", device="s", speed=0)
    both.wait("BLOCK_JOB_COMPLETED")
    q_ev, b_ev = both.events()
    assert q_ev == b_ev
    assert _graph(both.qsd.cmd("query-named-block-nodes")) == \
        _graph(both.be.cmd("query-named-block-nodes"))
    for n in ("top", "mid", "base"):
        both.cmd("blockdev-del", **{"node-name": n})
    img = require_tool("qemu-img")
    r = subprocess.run([img, "compare", "-U", both.path("qemu", "top.qcow2"),
                        both.path("be", "top.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert qemu_map(both.path("be", "top.qcow2")) == qemu_map(both.path("qemu", "top.qcow2"))
    assert_clean(both.path("be", "top.qcow2"))


def test_stream_with_guest_writes_and_reads(tmp_path, ctx):
    """A guest writes (and reads, which copy on read too) through the device on top
    while the stream runs: the result is the model, top stands alone, images clean."""
    base, mid, top = make_chain(tmp_path)
    open_chain(ctx, base, mid, top)
    blk = ctx.device("vda", "top")
    model = bytearray(blk.pread(0, 4 * MiB))
    w = Writer(blk, model, seed=7, pause=0.0005, zero_every=5)
    w.start()
    w.wait_writes(20)
    ctx.cmd("block-stream", device="top", speed=2 * MiB, **{"job-id": "s"})
    cor = blk.root_node
    assert cor.driver_name == "copy-on-read"        # the device now sits on the filter
    for off in range(0, 4 * MiB, 300_000):          # guest reads copy on read
        with w.lock:
            assert blk.pread(off, 4096) == model[off:off + 4096]
    ctx.events.wait("BLOCK_JOB_COMPLETED", 30)
    w.wait_writes(20)
    w.stop()
    done = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert "error" not in done and done["offset"] == done["len"] == 4 * MiB
    assert blk.root_node.driver_name == "qcow2" and blk.root_node.backing is None
    assert bytes(blk.pread(0, 4 * MiB)) == bytes(model)
    ctx.close()
    assert_clean(top)
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    r = subprocess.run([require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw",
                        top, str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert all(e["depth"] == 0 for e in qemu_map(top))


def test_cor_writes_leave_dirty_bitmaps_alone(tmp_path, ctx):
    """Copies made by reads do not change guest-visible data: no dirty bits (QEMU's
    BDRV_REQ_WRITE_UNCHANGED writes go straight to the driver)."""
    base, mid, top = make_chain(tmp_path)
    open_chain(ctx, base, mid, top)
    ctx.cmd("block-dirty-bitmap-add", node="top", name="b0")
    ctx.cmd("blockdev-add", driver="copy-on-read", file="top", **{"node-name": "cor"})
    ctx.graph.find_node("cor").pread(0, 4 * MiB)
    top_node = ctx.graph.find_node("top")
    assert top_node.dirty_bitmaps[0].count() == 0
    assert top_node.is_allocated_above(0, 4 * MiB, top_node.backing) == (True, 4 * MiB)
    ctx.graph.find_node("cor").pwrite(0, b"x" * 512)
    assert top_node.dirty_bitmaps[0].count() == 65536
