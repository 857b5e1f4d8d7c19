"""mirror copy-mode (QEMU 7.2's MirrorCopyMode): in write-blocking mode a guest write
through the mirror's filter is on the target when the write returns; background mode
leaves it to the dirty bitmap.  Concurrent writes against a model, target errors of a
synchronous write, and the QMP side against qemu-storage-daemon."""
import subprocess
import threading

import pytest

from tests.tooling import require_tool

from .helpers import Writer, make_raw, random_data
from .test_interop_qsd import add_raw, both, qemu_img_compare  # noqa: F401  (fixture)
from .test_mirror import read, status_seq

SIZE = 16 << 20
CHUNK = 64 << 10


@pytest.fixture
def images(tmp_path):
    data = random_data(11, SIZE)
    return make_raw(tmp_path / "src.raw", SIZE, data), make_raw(tmp_path / "dst.raw", SIZE)


def _start_slow_mirror(ctx, copy_mode):
    """A mirror that copied its first 64 KiB chunk and then sleeps (speed 1 B/s)."""
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full", speed=1,
            **{"job-id": "m", "buf-size": CHUNK, "copy-mode": copy_mode})
    job = ctx.graph._job_registry.find("m")
    import time
    deadline = time.monotonic() + 10
    while job.progress_current < CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.progress_current == CHUNK
    return job


@pytest.mark.parametrize("copy_mode", ["write-blocking", "background"])
def test_guest_write_reaches_target_synchronously(ctx, images, copy_mode):
    src, dst = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("vda", "src")
    job = _start_slow_mirror(ctx, copy_mode)
    assert blk.root_node.driver_name == "mirror_top"
    before = ctx.cmd("query-block-jobs")[0]
    blk.pwrite(8 << 20, b"\x5a" * 100_000)
    blk.pwrite_zeroes(12 << 20, 3 * CHUNK)
    after = ctx.cmd("query-block-jobs")[0]
    on_target = read(dst)
    if copy_mode == "write-blocking":
        # the tail of the first write lies in a chunk still dirty from the initial
        # sync: do_sync_target_write() leaves it to the background copy
        assert on_target[8 << 20:(8 << 20) + CHUNK] == b"\x5a" * CHUNK
        assert on_target[(8 << 20) + CHUNK:(8 << 20) + 100_000] == bytes(100_000 - CHUNK)
        # the zero write reaches the target as a zero write (the file reads zeroes)
        assert on_target[12 << 20:(12 << 20) + 3 * CHUNK] == bytes(3 * CHUNK)
        # the bytes copied count as both remaining and done work
        written = CHUNK + 3 * CHUNK
        assert after["offset"] == before["offset"] + written
        assert after["len"] == before["len"] + written
        assert job.dirty.count_range(8 << 20, 100_000) == CHUNK      # the tail chunk
        assert job.dirty.count_range(12 << 20, 3 * CHUNK) == 0
    else:
        assert on_target[8 << 20:(8 << 20) + 100_000] == bytes(100_000)
        assert after["offset"] == before["offset"]
        assert job.dirty.count_range(8 << 20, 100_000) == 2 * CHUNK
    ctx.cmd("block-job-set-speed", device="m", speed=0)
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-complete", device="m")
    assert "error" not in ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert read(dst) == read(src)


@pytest.mark.parametrize("seed,granularity", [(3, None), (5, 4096), (8, 1 << 20)])
def test_write_blocking_concurrent_writes_match_model(ctx, images, tmp_path, seed,
                                                      granularity):
    src, dst = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("vda", "src")
    model = bytearray(read(src))
    w = Writer(blk, model, seed=seed, zero_every=7)
    w.start()
    w.wait_writes(50)
    extra = {} if granularity is None else {"granularity": granularity}
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "m", "copy-mode": "write-blocking", "buf-size": 1 << 20}, **extra)
    ctx.events.wait("BLOCK_JOB_READY")
    w.wait_writes(200)       # READY: every write now lands on both sides at once
    with w.lock:
        assert read(dst) == bytes(model) == read(src)
    w.wait_writes(50)
    w.stop()
    ctx.cmd("block-job-complete", device="m")
    assert "error" not in ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert blk.root_node.node_name == "dst"
    assert read(dst) == bytes(model)
    ctx.close()
    r = subprocess.run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw",
                        src, dst], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("end", ["complete", "cancel"])
def test_write_blocking_ends_while_guest_writes(ctx, images, end):
    """complete / cancel of a READY write-blocking mirror while a guest keeps writing:
    the job ends (a synchronous write in flight holds the filter's lock that the job's
    end waits for; it must not wait for the job in turn) and no write is lost."""
    src, dst = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("vda", "src")
    model = bytearray(read(src))
    w = Writer(blk, model, seed=4, zero_every=5)
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "m", "copy-mode": "write-blocking"})
    ctx.events.wait("BLOCK_JOB_READY")
    w.start()
    w.wait_writes(100)
    ctx.cmd("block-job-" + end, device="m")
    assert "error" not in ctx.events.wait("BLOCK_JOB_COMPLETED", timeout=20)
    w.wait_writes(100)
    w.stop()
    assert blk.root_node.node_name == ("dst" if end == "complete" else "src")
    assert read(dst if end == "complete" else src) == bytes(model)


def test_write_blocking_write_racing_the_initial_marking(ctx, images, monkeypatch):
    """A synchronous write that covers a chunk in part, while the job marks the whole
    image dirty (sync=full) between the write's look at the bitmap (chunk clean: not
    trimmed) and its end: the chunk must stay dirty, since the target holds only this
    write's part of it.  (Clearing every chunk the write touched lost the rest.)"""
    from blockengine.jobs.mirror import MirrorJob
    src, dst = images
    ctx.add_raw("src", src)
    ctx.add_raw("dst", dst)
    blk = ctx.device("vda", "src")
    go, marked = threading.Event(), threading.Event()
    dirty_init = MirrorJob._dirty_init

    def delayed_dirty_init(job, size):
        assert go.wait(10)
        dirty_init(job, size)
        marked.set()
    monkeypatch.setattr(MirrorJob, "_dirty_init", delayed_dirty_init)

    def during_guest_write(node, offset, length):
        if threading.current_thread() is threading.main_thread() and not go.is_set():
            go.set()                    # the job marks everything dirty right now
            assert marked.wait(10)
    ctx.graph.find_node("src").before_write_notifiers.append(during_guest_write)
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "m", "copy-mode": "write-blocking"})
    blk.pwrite(4096 + 512, b"\x77" * 1000)
    assert marked.is_set()
    ctx.events.wait("BLOCK_JOB_READY")
    ctx.cmd("block-job-complete", device="m")
    assert "error" not in ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert read(dst) == read(src)


def _blkdebug_target_in_state_2(ctx, path):
    """dst on blkdebug that fails the first write at 8 MiB once it is in state 2."""
    ctx.cmd("blockdev-add", driver="file", filename=path, **{"node-name": "dstf"})
    ctx.cmd("blockdev-add", driver="blkdebug", image="dstf",
            **{"node-name": "dbg", "inject-error": [
                {"event": "write_aio", "errno": 5, "once": True, "state": 2,
                 "sector": (8 << 20) // 512}]})
    ctx.cmd("blockdev-add", driver="raw", file="dbg", **{"node-name": "dst"})
    return ctx.graph.find_node("dbg")


@pytest.mark.parametrize("policy", ["report", "stop"])
def test_synchronous_write_target_error(ctx, images, policy):
    """A failing synchronous copy: the guest's write succeeds, the range stays dirty,
    and the job follows on-target-error (report: it fails; stop: it pauses, and
    after resume copies the range again)."""
    src, dst = images
    ctx.add_raw("src", src)
    dbg = _blkdebug_target_in_state_2(ctx, dst)
    blk = ctx.device("vda", "src")
    ctx.cmd("blockdev-mirror", device="src", target="dst", sync="full",
            **{"job-id": "m", "copy-mode": "write-blocking", "on-target-error": policy})
    ctx.events.wait("BLOCK_JOB_READY")
    dbg.drv.set_state(2)
    blk.pwrite(8 << 20, b"\x33" * 4096)          # the guest sees no error
    assert ctx.events.wait("BLOCK_JOB_ERROR") == {"device": "m", "operation": "write",
                                                  "action": policy}
    if policy == "report":
        ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
        assert ev["error"] == "Input/output error"
        assert status_seq(ctx.events, "m")[-3:] == ["aborting", "concluded", "null"]
        assert blk.root_node.node_name == "src"
        return
    job = ctx.graph._job_registry.find("m")
    job.wait_status("standby", 10)
    assert ctx.cmd("query-block-jobs")[0]["io-status"] == "failed"
    ctx.cmd("block-job-resume", device="m")
    job.wait_status("ready", 10)
    ctx.cmd("block-job-complete", device="m")
    assert "error" not in ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert read(dst) == read(src)
    assert read(dst)[8 << 20:(8 << 20) + 4096] == b"\x33" * 4096


WRITES = [(8 << 20, 100_000, 0x5a),          # the tail chunk is dirty: trimmed
          (12 << 20, 3 * CHUNK, None),          # an aligned zero write
          ((4 << 20) + 1000, 5000, 0x21),       # inside one dirty chunk: nothing copied
          (512, 1000, 0x33)]                    # into the first chunk, already copied


def qemu_io_write(off, n, pattern):
    return "write -z %d %d" % (off, n) if pattern is None else \
        "write -P %d %d %d" % (pattern, off, n)


def test_write_blocking_writes_like_qsd(tmp_path):
    """The same guest writes during a slow write-blocking mirror, through an NBD export
    of qemu-storage-daemon (qemu-io) and through a device on blockengine's source: the
    job's progress and the target's bytes are the same right after the writes, and
    the result after block-job-complete too."""
    from .qsd import QSD
    from .helpers import Ctx
    data = random_data(13, SIZE)
    dirs = {side: tmp_path / side for side in ("qemu", "be")}
    for d in dirs.values():
        d.mkdir()
        make_raw(d / "src.raw", SIZE, data)
        make_raw(d / "dst.raw", SIZE)
    sock = str(dirs["qemu"] / "nbd.sock")
    mirror = {"device": "src", "target": "dst", "sync": "full", "speed": 1,
              "job-id": "m", "buf-size": CHUNK, "copy-mode": "write-blocking"}
    qsd = QSD(require_tool("qemu-storage-daemon"))
    ctx = Ctx()
    try:
        for n in ("src", "dst"):
            qsd.cmd("blockdev-add", driver="file", filename=str(dirs["qemu"] / (n + ".raw")),
                    **{"node-name": n + "f"})
            qsd.cmd("blockdev-add", driver="raw", file=n + "f", **{"node-name": n})
            ctx.add_raw(n, str(dirs["be"] / (n + ".raw")))
        qsd.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        qsd.cmd("block-export-add", type="nbd", id="e", writable=True, name="src",
                **{"node-name": "src"})
        blk = ctx.device("vda", "src")
        qsd.cmd("blockdev-mirror", **mirror)
        ctx.cmd("blockdev-mirror", **mirror)
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                qsd.cmd("query-block-jobs")[0]["offset"] < CHUNK
                or ctx.cmd("query-block-jobs")[0]["offset"] < CHUNK):
            time.sleep(0.02)
        io = require_tool("qemu-io")
        for off, n, pattern in WRITES:
            cmd = qemu_io_write(off, n, pattern)
            subprocess.run([io, "-f", "raw", "nbd+unix:///src?socket=" + sock, "-c", cmd],
                           check=True, capture_output=True)
            if pattern is None:
                blk.pwrite_zeroes(off, n)
            else:
                blk.pwrite(off, bytes([pattern]) * n)
            assert qsd.cmd("query-block-jobs") == ctx.cmd("query-block-jobs"), cmd
            assert read(dirs["qemu"] / "dst.raw") == read(dirs["be"] / "dst.raw"), cmd
        for side in (qsd, ctx):
            side.cmd("block-job-set-speed", device="m", speed=0)
        qsd.wait_event("BLOCK_JOB_READY")
        ctx.events.wait("BLOCK_JOB_READY")
        qsd.cmd("block-job-complete", device="m")
        ctx.cmd("block-job-complete", device="m")
        q_done = qsd.wait_event("BLOCK_JOB_COMPLETED")["data"]
        assert ctx.events.wait("BLOCK_JOB_COMPLETED") == q_done
    finally:
        qsd.close()
        ctx.close()
    assert read(dirs["qemu"] / "dst.raw") == read(dirs["be"] / "dst.raw") == \
        read(dirs["be"] / "src.raw")


def test_copy_mode_script_like_qsd(both):
    """blockdev-mirror/drive-mirror with copy-mode: same answers, same events."""
    both.image("src.raw", random_data(12, 4 << 20), size=4 << 20)
    both.image("dst.raw", size=4 << 20)
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    assert both.cmd("blockdev-mirror", device="src", target="dst", sync="full",
                    **{"job-id": "m", "copy-mode": "sideways"}) == \
        "Parameter 'copy-mode' does not accept value 'sideways'"
    both.cmd("blockdev-mirror", device="src", target="dst", sync="full",
             **{"job-id": "m", "copy-mode": "write-blocking"})
    both.wait("BLOCK_JOB_READY")
    assert both.qsd.cmd("query-block-jobs") == both.be.cmd("query-block-jobs")
    both.cmd("block-job-complete", device="m")
    both.wait("BLOCK_JOB_COMPLETED")
    both.cmd("drive-mirror", device="dst", target="@copy.raw", format="raw", sync="full",
             **{"job-id": "d", "copy-mode": "write-blocking"})
    both.wait("BLOCK_JOB_READY", count=2)
    both.cmd("block-job-cancel", device="d")
    both.wait("BLOCK_JOB_COMPLETED", count=2)
    q, b = both.events()
    assert q == b
    qemu_img_compare(both, "src.raw", "dst.raw")
    qemu_img_compare(both, "src.raw", "copy.raw")
