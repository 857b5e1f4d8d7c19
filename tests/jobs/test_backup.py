"""backup: point-in-time copies under concurrent writes, sync modes, incremental
backups with bitmaps and bitmap modes, error policies (via blkdebug), error texts."""

import pytest

from blockengine import bitmaps

from .helpers import Writer, make_raw, random_data

SIZE = 8 << 20


@pytest.fixture
def images(tmp_path):
    data = random_data(11, SIZE)
    return (make_raw(tmp_path / "src.raw", SIZE, data), make_raw(tmp_path / "dst.raw", SIZE),
            data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def start_backup_at_quiescent_point(ctx, w, **args):
    """Start the job between two guest writes; returns the guest data at that point."""
    with w.lock:
        snap = bytes(w.model)
        ctx.cmd("blockdev-backup", **args)
    return snap


@pytest.mark.parametrize("speed", [0, 16 << 20])
def test_backup_full_is_point_in_time(ctx, images, speed):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("dev0", "src")
    model = bytearray(data)
    w = Writer(blk, model, seed=5, zero_every=5)
    w.start()
    w.wait_writes(20)
    snap = start_backup_at_quiescent_point(ctx, w, device="src", target="dst", sync="full",
                                           speed=speed, **{"job-id": "b1"})
    before = w.count
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    w.stop()
    if speed:
        assert w.count > before + 10          # the guest wrote while the job copied
    assert ev["len"] == ev["offset"] == SIZE and "error" not in ev
    assert read(dst) == snap
    blk.flush()
    assert read(src) == bytes(model)
    assert blk.root_node.node_name == "src"
    assert all(n["drv"] != "copy-before-write" for n in ctx.cmd("query-named-block-nodes"))


def test_backup_sync_none_copies_overwritten_clusters(ctx, images):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("dev0", "src")
    ctx.cmd("blockdev-backup", device="src", target="dst", sync="none",
            **{"job-id": "b1", "filter-node-name": "cbw"})
    assert ctx.graph.find_node("cbw").driver_name == "copy-before-write"
    blk.pwrite(100_000, b"\x55" * 1000)
    ctx.cmd("block-job-cancel", device="b1")
    ctx.events.wait("BLOCK_JOB_CANCELLED")
    out = read(dst)
    # the whole 64 KiB cluster around the write holds the old data, nothing else copied
    assert out[65536:131072] == data[65536:131072]
    assert out[:65536] == bytes(65536) and out[131072:] == bytes(SIZE - 131072)


def test_incremental_backup_on_success_and_failure(ctx, images, tmp_path):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("dev0", "src")
    ctx.cmd("block-dirty-bitmap-add", node="src", name="bm")
    blk.pwrite(0, b"\x01" * 512)
    blk.pwrite(5 << 20, b"\x02" * 70000)
    bm = bitmaps.find_bitmap(ctx.graph.find_node("src"), "bm")
    assert bm.count() == 3 * 65536
    ctx.cmd("blockdev-backup", device="src", target="dst", sync="incremental", bitmap="bm",
            **{"job-id": "b1", "auto-finalize": False})
    # frozen while the job runs
    assert ctx.error("block-dirty-bitmap-clear", node="src", name="bm") == \
        "Bitmap 'bm' is currently in use by another operation and cannot be used"
    assert ctx.error("block-dirty-bitmap-remove", node="src", name="bm") == \
        "Bitmap 'bm' is currently in use by another operation and cannot be used"
    ctx.events.wait("BLOCK_JOB_PENDING")
    blk.pwrite(7 << 20, b"\x03" * 512)        # recorded by the successor
    info = [i for i in bitmaps.dirty_bitmap_info(ctx.graph.find_node("src"))]
    assert [i.get("name") for i in info] == [None, "bm"] and info[1]["busy"]
    ctx.cmd("job-finalize", id="b1")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert ev["len"] == 3 * 65536
    out = read(dst)
    assert out[:65536] == b"\x01" * 512 + data[512:65536]
    assert out[5 << 20:(5 << 20) + 70000] == b"\x02" * 70000
    assert out[65536:5 << 20] == bytes((5 << 20) - 65536)
    # on success the bitmap holds only what was written during the job
    assert bm.count() == 65536 and bm.get(7 << 20) and not bm.in_use()
    # a failed incremental backup keeps the bits (reclaim)
    ctx.cmd("blockdev-add", driver="file", filename=str(make_raw(tmp_path / "t2.raw", SIZE)),
            **{"node-name": "t2f"})
    ctx.cmd("blockdev-add", driver="blkdebug", image="t2f", **{
        "node-name": "t2dbg", "inject-error": [{"event": "write_aio", "errno": 5, "sector": 2048}]})
    ctx.cmd("blockdev-add", driver="raw", file="t2dbg", **{"node-name": "t2"})
    blk.pwrite(1 << 20, b"\x04" * 512)
    ctx.cmd("blockdev-backup", device="src", target="t2", sync="incremental", bitmap="bm",
            **{"job-id": "b2"})
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED", count=2)
    assert ev["error"] == "Input/output error"
    assert bm.count() == 2 * 65536 and bm.get(1 << 20) and bm.get(7 << 20)


@pytest.mark.parametrize("mode,expect_bits", [("always", {0}), ("never", {0, 1 << 20}),
                                              ("on-success", {0, 1 << 20})])
def test_bitmap_modes_on_failure(ctx, images, tmp_path, mode, expect_bits):
    """A full backup with a bitmap that fails after the first cluster."""
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.cmd("blockdev-add", driver="file", filename=dst, **{"node-name": "df"})
    ctx.cmd("blockdev-add", driver="blkdebug", image="df", **{
        "node-name": "dbg", "inject-error": [{"event": "write_aio", "errno": 5,
                                              "sector": (1 << 20) // 512}]})
    ctx.cmd("blockdev-add", driver="raw", file="dbg", **{"node-name": "dst"})
    blk = ctx.device("dev0", "src")
    ctx.cmd("block-dirty-bitmap-add", node="src", name="bm")
    blk.pwrite(0, b"\x01" * 512)
    blk.pwrite(1 << 20, b"\x01" * 512)
    ctx.cmd("blockdev-backup", device="src", target="dst", sync="bitmap", bitmap="bm",
            **{"job-id": "b1", "bitmap-mode": mode})
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert ev["error"] == "Input/output error"
    bm = bitmaps.find_bitmap(ctx.graph.find_node("src"), "bm")
    dirty = {off for off in range(0, SIZE, 65536) if bm.get(off)}
    assert dirty == (expect_bits if mode != "always" else {1 << 20})


def test_backup_argument_errors(ctx, images, tmp_path):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    ctx.add_raw("big", make_raw(tmp_path / "big.raw", 2 * SIZE))
    ctx.cmd("block-dirty-bitmap-add", node="src", name="b0")
    e = ctx.error
    B = {"device": "src", "target": "dst", "job-id": "b"}
    assert e("blockdev-backup", sync="incremental", **B) == \
        "must provide a valid bitmap name for 'incremental' sync mode"
    assert e("blockdev-backup", sync="full", bitmap="b0", **B) == \
        "Bitmap sync mode must be given when providing a bitmap"
    assert e("blockdev-backup", sync="full", **{"bitmap-mode": "always"}, **B) == \
        "Cannot specify bitmap sync mode without a bitmap"
    assert e("blockdev-backup", sync="incremental", bitmap="b0",
             **{"bitmap-mode": "never"}, **B) == \
        "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
    assert e("blockdev-backup", sync="full", bitmap="zz", **{"bitmap-mode": "always"},
             **B) == "Bitmap 'zz' could not be found"
    assert e("blockdev-backup", device="src", target="big", sync="full",
             **{"job-id": "b"}) == "Source and target image have different sizes"
    assert e("blockdev-backup", device="src", target="src", sync="full",
             **{"job-id": "b"}) == "Source and target cannot be the same"
    assert ctx.cmd("query-jobs") == []


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_backup_target_error_policies(ctx, images, policy):
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.cmd("blockdev-add", driver="file", filename=dst, **{"node-name": "df"})
    ctx.cmd("blockdev-add", driver="blkdebug", image="df", **{
        "node-name": "dbg", "inject-error": [{"event": "write_aio", "errno": 5,
                                              "once": True, "sector": 2048}]})
    ctx.cmd("blockdev-add", driver="raw", file="dbg", **{"node-name": "dst"})
    ctx.cmd("blockdev-backup", device="src", target="dst", sync="full",
            **{"job-id": "j", "on-target-error": policy})
    err = ctx.events.wait("BLOCK_JOB_ERROR")
    assert err == {"device": "j", "operation": "write", "action": policy}
    if policy == "stop":
        ctx.graph._job_registry.find("j").wait_status("paused", 10)
        assert ctx.cmd("query-block-jobs")[0]["io-status"] == "failed"
        ctx.cmd("block-job-resume", device="j")
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    if policy == "report":
        assert ev["error"] == "Input/output error" and ev["offset"] < SIZE
    else:
        assert "error" not in ev and read(dst) == data


def test_copy_before_write_blockdev_add(ctx, images):
    """The filter on its own (QEMU 7.2's user-creatable copy-before-write)."""
    src, dst, data = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    ctx.cmd("blockdev-add", driver="copy-before-write", file="src", target="dst",
            **{"node-name": "cbw"})
    blk = ctx.device("dev0", "cbw")
    blk.pwrite(3 << 20, b"\x77" * 4096)
    assert read(dst)[3 << 20:(3 << 20) + 65536] == data[3 << 20:(3 << 20) + 65536]
    assert blk.pread(3 << 20, 4096) == b"\x77" * 4096
