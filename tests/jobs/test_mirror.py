"""mirror: concurrent guest writes, READY/complete pivot, cancel semantics, sync modes,
drive-mirror target creation, error policies (via blkdebug), QEMU's error texts."""
import os

import pytest

from .helpers import Writer, make_raw, random_data

SIZE = 8 << 20


@pytest.fixture
def images(tmp_path):
    data = random_data(7, SIZE)
    src = make_raw(tmp_path / "src.raw", SIZE, data)
    dst = make_raw(tmp_path / "dst.raw", SIZE)
    return src, dst, data


def read(path):
    with open(path, "rb") as f:
        return f.read()


def status_seq(events, job_id, timeout: float = 5):
    """The job's statuses, once it reached 'null' (its last transitions come right
    after BLOCK_JOB_COMPLETED, from the job's thread) or after ``timeout``."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        seq = [d["status"] for n, d in list(events.list) if n == "JOB_STATUS_CHANGE"
               and d["id"] == job_id]
        if (seq and seq[-1] == "null") or time.monotonic() > deadline:
            return seq
        time.sleep(0.01)


def test_mirror_full_complete_with_concurrent_writes(ctx, images):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("dev0", "src")
    model = bytearray(data)
    # a guest that writes slower than the job copies, so the mirror converges
    w = Writer(blk, model, seed=3, zero_every=7, pause=0.0005, max_writes=1 << 30)
    w.start()
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "m1", "speed": 64 << 20})
    w.wait_writes(10)
    ctx.events.wait("BLOCK_JOB_READY")
    w.wait_writes(20)                     # keep writing while READY
    ctx.cmd("block-job-complete", device="m1")
    ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.wait_writes(20)                     # writes after the pivot go to the target
    w.stop()
    assert blk.root_node.node_name == "dst"
    blk.flush()
    assert read(dst) == bytes(model)
    assert status_seq(ctx.events, "m1") == ["created", "running", "ready", "waiting",
                                            "pending", "concluded", "null"]
    assert ctx.cmd("query-block-jobs") == []
    # the filter is gone
    assert [n["drv"] for n in ctx.cmd("query-named-block-nodes")
            if n["drv"] == "mirror_top"] == []


def test_mirror_cancel_after_ready_leaves_consistent_copy(ctx, images):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("dev0", "src")
    model = bytearray(data)
    w = Writer(blk, model, seed=4)
    w.start()
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full", **{"job-id": "m1"})
    ctx.events.wait("BLOCK_JOB_READY")
    with w.lock:                  # a quiescent point: the copy must equal the source now
        ctx.cmd("block-job-cancel", device="m1")
        ctx.events.wait("BLOCK_JOB_COMPLETED")
        snap = bytes(model)
    w.stop()
    assert blk.root_node.node_name == "src"      # no pivot
    assert read(dst) == snap
    assert read(src) == bytes(model)
    names = [n for n, _ in ctx.events.list]
    assert "BLOCK_JOB_CANCELLED" not in names    # QEMU 7.2: soft cancel completes


def test_mirror_force_cancel(ctx, images):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    ctx.device("dev0", "src")
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "m1", "speed": 1 << 20})
    ctx.cmd("block-job-cancel", device="m1", force=True)
    ev = ctx.events.wait("BLOCK_JOB_CANCELLED")
    assert ev["type"] == "mirror" and ev["device"] == "m1" and ev["speed"] == 1 << 20
    assert status_seq(ctx.events, "m1")[-3:] == ["aborting", "concluded", "null"]
    assert ctx.graph.find_node("dst").parents == []
    assert ctx.graph.backends["dev0"].root_node.node_name == "src"


def test_mirror_sync_none_copies_only_new_writes(ctx, images):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("dev0", "src")
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="none", **{"job-id": "m1"})
    ctx.events.wait("BLOCK_JOB_READY")
    blk.pwrite(65536, b"\xaa" * 4096)
    ctx.cmd("block-job-complete", device="m1")
    ctx.events.wait("BLOCK_JOB_COMPLETED")
    out = read(dst)
    assert out[65536:65536 + 4096] == b"\xaa" * 4096
    assert out[:65536] == bytes(65536)          # old data never copied


def test_mirror_granularity_and_buf_size(ctx, images):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full", granularity=4096,
            **{"buf-size": 1 << 16, "job-id": "m1", "filter-node-name": "mtop"})
    assert ctx.graph.find_node("mtop").driver_name == "mirror_top"
    bm = [b for b in ctx.graph.find_node("src").dirty_bitmaps]
    assert bm and bm[0].granularity == 4096
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-complete", device="m1")
    ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert read(dst) == data


def test_mirror_errors(ctx, images, tmp_path):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    other = make_raw(tmp_path / "o.raw", SIZE)
    ctx.add_raw("dst2", other)
    e = ctx.error
    assert e("blockdev-mirror", device="src", target="dst", sync="full", granularity=1000,
             **{"job-id": "m1"}) == "Parameter 'granularity' expects a power of 2"
    assert e("blockdev-mirror", device="src", target="dst", sync="full",
             granularity=128 << 20, **{"job-id": "m1"}) == \
        "Parameter 'granularity' expects a value in range [512B, 64MB]"
    assert e("blockdev-mirror", device="src", target="dst", sync="incremental",
             **{"job-id": "m1"}) == "Sync mode 'incremental' not supported"
    assert e("blockdev-mirror", device="src", target="src", sync="full",
             **{"job-id": "m1"}) == "Can't mirror node into itself"
    assert e("blockdev-mirror", device="src", target="dst", sync="full",
             **{"job-id": "1x"}) == "Invalid job ID '1x'"
    assert e("blockdev-mirror", device="src", target="dst", sync="full") == \
        "Invalid job ID ''"
    assert e("blockdev-mirror", device="src", target="dst", sync="full",
             **{"buf-size": -1, "job-id": "m1"}) == "Invalid parameter 'buf-size'"
    assert e("blockdev-mirror", device="srcf", target="dst", sync="full",
             **{"job-id": "m1"}) == "Need a root block node"
    assert e("blockdev-mirror", device="nope", target="dst", sync="full",
             **{"job-id": "m1"}) == "Cannot find device='nope' nor node-name='nope'"
    # nothing was left behind by the failures
    assert ctx.cmd("query-jobs") == []
    assert all(n["drv"] != "mirror_top" for n in ctx.cmd("query-named-block-nodes"))
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full", **{"job-id": "m1"})
    assert e("blockdev-mirror", device="src", target="dst", sync="full",
             **{"job-id": "m2"}) == "Need a root block node"
    assert e("blockdev-backup", device="dst", target="src", sync="full",
             **{"job-id": "m1"}) == \
        "Node 'dst' is busy: block device is in use by block job: mirror"
    assert e("blockdev-backup", device="dst2", target="src", sync="full",
             **{"job-id": "b2"}) == \
        "Node 'src' is busy: block device is in use by block job: mirror"
    assert e("blockdev-del", **{"node-name": "dst"}) == "Node dst is in use"
    ctx.events.wait("BLOCK_JOB_READY")
    assert e("block-job-complete", device="nope") == "Block job 'nope' not found"
    assert e("job-complete", id="nope") == "Job not found"
    assert e("block-job-finalize", id="m1") == \
        "Job 'm1' in state 'ready' cannot accept command verb 'finalize'"
    assert e("block-job-dismiss", id="m1") == \
        "Job 'm1' in state 'ready' cannot accept command verb 'dismiss'"


def test_mirror_different_size_fails_in_job(ctx, images, tmp_path):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("big", make_raw(tmp_path / "big.raw", 2 * SIZE))
    ctx.cmd("blockdev-mirror", device="src", target="big", sync="full", **{"job-id": "m1"})
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert ev == {"device": "m1", "len": 0, "offset": 0, "speed": 0, "type": "mirror",
                  "error": "Source and target image have different sizes"}
    assert status_seq(ctx.events, "m1") == ["created", "running", "aborting", "concluded",
                                            "null"]


def test_drive_mirror_creates_raw_target(ctx, images, tmp_path):
    src, dst, data = images
    ctx.add_raw("src", src)
    blk = ctx.device("dev0", "src")
    target = str(tmp_path / "new.raw")
    ctx.cmd("drive-mirror", device="dev0", target=target, sync="full", format="raw")
    assert os.path.getsize(target) == SIZE
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-complete", device="dev0")      # job-id defaults to the device
    ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert blk.root_node.filename() == target
    assert read(target) == data


def _blkdebug_target(ctx, path, rule):
    ctx.cmd("blockdev-add", driver="file", filename=path, **{"node-name": "dstf"})
    ctx.cmd("blockdev-add", driver="blkdebug", image="dstf",
            **{"node-name": "dbg", "inject-error": [rule]})
    ctx.cmd("blockdev-add", driver="raw", file="dbg", **{"node-name": "dst"})


@pytest.mark.parametrize("policy", ["report", "stop", "ignore", "enospc", "auto"])
def test_mirror_target_error_policies(ctx, images, policy):
    src, dst, data = images
    ctx.add_raw("src", src)
    _blkdebug_target(ctx, dst, {"event": "write_aio", "errno": 5, "once": True,
                                "sector": 2048})
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "j", "on-target-error": policy})
    if policy == "stop":
        ev = ctx.events.wait("BLOCK_JOB_ERROR")
        assert ev == {"device": "j", "operation": "write", "action": "stop"}
        job = ctx.graph._job_registry.find("j")
        job.wait_status("paused", 10)
        info = ctx.cmd("query-block-jobs")[0]
        assert info["io-status"] == "failed" and info["paused"] and info["status"] == "paused"
        ctx.cmd("block-job-resume", device="j")
        assert ctx.cmd("query-block-jobs")[0]["io-status"] == "ok"
    if policy in ("report", "enospc", "auto"):
        ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
        assert ctx.events.wait("BLOCK_JOB_ERROR") == {"device": "j", "operation": "write",
                                                     "action": "report"}
        assert ev["error"] == "Input/output error"
        assert ev["offset"] < ev["len"]
        assert status_seq(ctx.events, "j") == ["created", "running", "aborting",
                                               "concluded", "null"]
        return
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-complete", device="j")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert "error" not in ev
    if policy == "ignore":
        assert ctx.events.wait("BLOCK_JOB_ERROR")["action"] == "ignore"
    assert read(dst) == data


def test_mirror_source_error_read(ctx, images, tmp_path):
    src, dst, data = images
    ctx.cmd("blockdev-add", driver="file", filename=src, **{"node-name": "srcf"})
    ctx.cmd("blockdev-add", driver="blkdebug", image="srcf",
            **{"node-name": "sdbg",
               "inject-error": [{"event": "read_aio", "errno": 28, "sector": 4096}]})
    ctx.cmd("blockdev-add", driver="raw", file="sdbg", **{"node-name": "src"})
    ctx.add_raw("dst", dst)
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "j", "on-source-error": "enospc"})
    ev = ctx.events.wait("BLOCK_JOB_ERROR")
    assert ev == {"device": "j", "operation": "read", "action": "stop"}
    job = ctx.graph._job_registry.find("j")
    job.wait_status("paused", 10)
    assert ctx.cmd("query-block-jobs")[0]["io-status"] == "nospace"
    ctx.cmd("block-job-cancel", device="j", force=True)
    ctx.events.wait("BLOCK_JOB_CANCELLED")
