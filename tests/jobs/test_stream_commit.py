"""stream and commit over backing chains, with the guest writing to the active layer
meanwhile.  Runs on ``tcow`` (a tiny test COW format); also on qcow2 images made by
qemu-img once the qcow2 driver is registered."""
import subprocess

import pytest

import blockengine
from blockengine.graph import registry

from . import tcow
from .helpers import Writer, random_data

SIZE = 4 << 20
CL = 65536


def formats():
    out = ["tcow"]
    out.append(pytest.param("qcow2", marks=[pytest.mark.interop, pytest.mark.skipif(
        not registry.has_driver("qcow2"), reason="qcow2 driver not registered yet")]))
    return out


def build_chain(tmp_path, fmt):
    """base <- mid <- top, each with its own data in some clusters."""
    paths = [str(tmp_path / f"{n}.{fmt}") for n in ("base", "mid", "top")]
    if fmt == "tcow":
        tcow.register()
        tcow.TcowDriver.create(paths[0], SIZE, {})
        tcow.TcowDriver.create(paths[1], SIZE, {"backing_file": paths[0],
                                                "backing_fmt": "tcow"})
        tcow.TcowDriver.create(paths[2], SIZE, {"backing_file": paths[1],
                                                "backing_fmt": "tcow"})
    else:
        from tests.tooling import require_tool
        img = require_tool("qemu-img")
        subprocess.run([img, "create", "-q", "-f", "qcow2", paths[0], str(SIZE)], check=True)
        for lower, upper in ((paths[0], paths[1]), (paths[1], paths[2])):
            subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", lower, "-F", "qcow2",
                            upper], check=True)
    for i, p in enumerate(paths):
        with blockengine.open(p, fmt) as im:
            for k in range(6):
                off = ((k * 7 + i * 3) % (SIZE // CL)) * CL + (i * 1000)
                im.write(off, random_data(i * 10 + k, 3 * CL // 2))
    with blockengine.open(paths[2], fmt, read_only=True) as im:
        view = im.read(0, SIZE)
    return paths, bytearray(view)


def open_top(ctx, path, fmt):
    ctx.cmd("blockdev-add", driver=fmt, file={"driver": "file", "filename": path},
            **{"node-name": "top"})
    top = ctx.graph.find_node("top")
    return top, top.backing, top.backing.backing


def layer_view(path, fmt):
    with blockengine.open(path, fmt, read_only=True) as im:
        return im.read(0, SIZE)


def own_clusters(path, fmt):
    with blockengine.open(path, fmt, read_only=True, backing=False) as im:
        out = set()
        for c in range(SIZE // CL):
            alloc, _ = im.node.is_allocated_above(c * CL, CL, None)
            if alloc and im.node.block_status(c * CL, CL).flags & 0x10:
                out.add(c)
        return out


@pytest.mark.parametrize("fmt", formats())
@pytest.mark.parametrize("whole", [False, True])
def test_stream_with_concurrent_writes(ctx, tmp_path, fmt, whole):
    paths, model = build_chain(tmp_path, fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    blk = ctx.device("dev0", "top")
    w = Writer(blk, model, seed=9, pause=0.0005)
    w.start()
    args = {} if whole else {"base-node": base.node_name}
    ctx.cmd("block-stream", device="top", speed=8 << 20, **{"job-id": "s"}, **args)
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.stop()
    assert "error" not in ev and ev["len"] == ev["offset"] == SIZE
    assert blk.pread(0, SIZE) == bytes(model)
    assert top.backing is (None if whole else base)
    assert mid.node_name not in ctx.graph.nodes
    ctx.graph.close_all()
    assert layer_view(paths[2], fmt) == bytes(model)      # the header was updated


@pytest.mark.parametrize("fmt", formats())
def test_intermediate_commit_with_concurrent_writes(ctx, tmp_path, fmt):
    paths, model = build_chain(tmp_path, fmt)
    mid_view = layer_view(paths[1], fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    blk = ctx.device("dev0", "top")
    w = Writer(blk, model, seed=10, pause=0.0005)
    w.start()
    ctx.cmd("block-commit", device="top", **{"job-id": "c", "top-node": mid.node_name,
                                             "base-node": base.node_name,
                                             "filter-node-name": "ctop"})
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.stop()
    assert "error" not in ev and ev["type"] == "commit"
    assert blk.pread(0, SIZE) == bytes(model)
    assert top.backing is base and base.read_only
    assert "ctop" not in ctx.graph.nodes
    ctx.graph.close_all()
    assert layer_view(paths[0], fmt) == mid_view      # base now holds what mid showed
    assert layer_view(paths[2], fmt) == bytes(model)


@pytest.mark.parametrize("fmt", formats())
def test_active_commit_ready_complete(ctx, tmp_path, fmt):
    paths, model = build_chain(tmp_path, fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    blk = ctx.device("dev0", "top")
    w = Writer(blk, model, seed=11, pause=0.0005)
    w.start()
    ctx.cmd("block-commit", device="top", **{"job-id": "c", "base-node": base.node_name})
    ready = ctx.events.wait("BLOCK_JOB_READY")
    assert ready["type"] == "commit"
    ctx.cmd("block-job-complete", device="c")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.stop()
    assert "error" not in ev
    assert blk.root_node is base and not base.read_only
    assert blk.pread(0, SIZE) == bytes(model)
    ctx.graph.close_all()
    assert layer_view(paths[0], fmt) == bytes(model)


@pytest.mark.parametrize("fmt", formats())
def test_active_commit_cancel_restores_read_only(ctx, tmp_path, fmt):
    paths, model = build_chain(tmp_path, fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    ctx.device("dev0", "top")
    ctx.cmd("block-commit", device="top", **{"job-id": "c", "base-node": base.node_name})
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-cancel", device="c", force=True)
    ctx.events.wait("BLOCK_JOB_CANCELLED")
    assert ctx.graph.backends["dev0"].root_node is top
    assert base.read_only


def test_stream_commit_errors(ctx, tmp_path):
    paths, model = build_chain(tmp_path, "tcow")
    top, mid, base = open_top(ctx, paths[2], "tcow")
    e = ctx.error
    assert e("block-stream", device="top", base="x", **{"base-node": "y"}) == \
        "'base' and 'base-node' cannot be specified at the same time"
    assert e("block-stream", device="top", base="/nonexistent") == \
        "Can't find '/nonexistent' in the backing chain"
    assert e("block-stream", device="top", **{"backing-file": "x"}) == \
        "backing file specified, but streaming the entire chain"
    assert e("block-commit", device="top", **{"base-node": "top"}) == \
        "cannot commit an image into itself"
    assert e("block-commit", device="top", **{"top-node": base.node_name,
                                              "base-node": mid.node_name}) == \
        "'%s' is not in this backing file chain" % mid.node_name
    assert e("block-commit", device="top", base="/nope") == \
        "Can't find '/nope' in the backing chain"
    assert e("block-commit", device="top", top="/nope") == "Top image file /nope not found"
    assert e("block-commit", device="top", **{"backing-file": "x"}) == \
        "'backing-file' specified, but 'top' is the active layer"
    assert e("block-commit", device=mid.node_name) == "Need a root block node"
    ctx.cmd("block-stream", device="top", speed=1, **{"job-id": "s"})
    # QEMU 7.2: the stream's copy-on-read filter is top's parent now
    assert e("block-commit", device="top", **{"job-id": "c"}) == "Need a root block node"
    assert e("block-stream", device="top", **{"job-id": "c"}) == \
        "Node 'top' is busy: block device is in use by block job: stream"


def backing_file_of(path, fmt):
    if fmt == "tcow":
        import json
        with open(path, "rb") as f:
            return json.loads(f.read(4096).rstrip(b"\0"))["backing"]
    from tests.tooling import require_tool
    import json
    out = subprocess.run([require_tool("qemu-img"), "info", "-U", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out).get("backing-filename")


@pytest.mark.parametrize("fmt", formats())
def test_stream_updates_backing_file_in_header(ctx, tmp_path, fmt):
    paths, model = build_chain(tmp_path, fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    ctx.cmd("block-stream", device="top", **{"job-id": "s", "base-node": base.node_name})
    ctx.events.wait("BLOCK_JOB_COMPLETED")
    ctx.graph.close_all()
    assert backing_file_of(paths[2], fmt) == paths[0]
    if fmt == "qcow2":
        from tests.tooling import require_tool
        ref = tmp_path / "model.raw"
        ref.write_bytes(bytes(model))
        r = subprocess.run([require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw",
                            paths[2], str(ref)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("fmt", formats())
def test_drive_mirror_sync_top_keeps_backing(ctx, tmp_path, fmt):
    paths, model = build_chain(tmp_path, fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    blk = ctx.device("dev0", "top")
    w = Writer(blk, model, seed=12, pause=0.0005)
    w.start()
    target = str(tmp_path / ("new." + fmt))
    ctx.cmd("drive-mirror", device="dev0", target=target, format=fmt, sync="top")
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-complete", device="dev0")
    ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.stop()
    new = blk.root_node
    assert new.filename() == target and new.backing is not None
    assert blk.pread(0, SIZE) == bytes(model)
    # only what top had (plus guest writes) was copied: mid's clusters stay in mid
    assert backing_file_of(target, fmt) == mid.filename()


@pytest.mark.parametrize("fmt", formats())
def test_drive_backup_sync_top_point_in_time(ctx, tmp_path, fmt):
    paths, model = build_chain(tmp_path, fmt)
    top, mid, base = open_top(ctx, paths[2], fmt)
    blk = ctx.device("dev0", "top")
    w = Writer(blk, model, seed=13, pause=0.0002)
    w.start()
    target = str(tmp_path / ("bk." + fmt))
    with w.lock:
        snap = bytes(model)
        ctx.cmd("drive-backup", device="dev0", target=target, format=fmt, sync="top")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.stop()
    assert "error" not in ev
    assert layer_view(target, fmt) == snap


# a sector of mid's data in its 4th cluster (tcow: data 1:1 after 8 KiB of metadata)
MID_SECTOR = (8192 + 3 * CL + 4096) // 512


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_stream_read_error_policies(ctx, tmp_path, policy):
    """A read error in the intermediate image (blkdebug below mid)."""
    paths, model = build_chain(tmp_path, "tcow")
    ctx.cmd("blockdev-add", driver="tcow", **{"node-name": "top"},
            file={"driver": "file", "filename": paths[2]},
            backing={"driver": "tcow", "node-name": "mid",
                     "file": {"driver": "blkdebug", "node-name": "dbg",
                              "inject-error": [{"event": "read_aio", "once": True,
                                                "errno": 5, "sector": MID_SECTOR}],
                              "image": {"driver": "file", "filename": paths[1]}}})
    top = ctx.graph.find_node("top")
    ctx.cmd("block-stream", device="top", **{"job-id": "s", "on-error": policy})
    err = ctx.events.wait("BLOCK_JOB_ERROR")
    assert err == {"device": "s", "operation": "read", "action": policy}
    if policy == "stop":
        ctx.graph._job_registry.find("s").wait_status("paused", 10)
        ctx.cmd("block-job-resume", device="s")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    if policy in ("report", "ignore"):
        # QEMU's stream_run(): an ignored error still fails the job at the end
        assert ev["error"] == "Input/output error"
        assert top.backing is not None
        assert (ev["offset"] == SIZE) == (policy == "ignore")
    else:
        assert "error" not in ev
        assert top.backing is None
    assert top.pread(0, SIZE) == bytes(model)


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_commit_write_error_policies(ctx, tmp_path, policy):
    """A write error in base (blkdebug below it) during an intermediate commit."""
    paths, model = build_chain(tmp_path, "tcow")
    mid_view = layer_view(paths[1], "tcow")
    ctx.cmd("blockdev-add", driver="tcow", **{"node-name": "top"},
            file={"driver": "file", "filename": paths[2]},
            backing={"driver": "tcow", "node-name": "mid",
                     "file": {"driver": "file", "filename": paths[1]},
                     "backing": {"driver": "tcow", "node-name": "base",
                                 "file": {"driver": "blkdebug", "node-name": "dbg",
                                          "inject-error": [{"event": "write_aio",
                                                            "once": True, "errno": 5,
                                                            "sector": MID_SECTOR}],
                                          "image": {"driver": "file",
                                                    "filename": paths[0]}}}})
    blk = ctx.device("dev0", "top")
    ctx.cmd("block-commit", device="top", **{"job-id": "c", "top-node": "mid",
                                             "base-node": "base", "on-error": policy})
    err = ctx.events.wait("BLOCK_JOB_ERROR")
    assert err == {"device": "c", "operation": "write", "action": policy}
    if policy == "stop":
        ctx.graph._job_registry.find("c").wait_status("paused", 10)
        ctx.cmd("block-job-resume", device="c")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    top = ctx.graph.find_node("top")
    if policy == "report":
        assert ev["error"] == "Input/output error" and top.backing.node_name == "mid"
    else:
        assert "error" not in ev and top.backing.node_name == "base"
        assert ctx.graph.find_node("base").pread(0, SIZE) == mid_view
    assert blk.pread(0, SIZE) == bytes(model)
