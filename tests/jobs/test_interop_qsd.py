"""The same QMP scripts against qemu-storage-daemon 7.2 and blockengine: identical
event sequences (JOB_STATUS_CHANGE order, BLOCK_JOB_* data), identical error texts,
and result images that ``qemu-img compare`` finds identical."""
import os
import shutil
import subprocess

import pytest

from tests.tooling import require_tool

from .helpers import Ctx, make_raw, random_data
from .qsd import QSD

pytestmark = pytest.mark.interop

SIZE = 4 << 20


def _norm(events):
    """Events as (name, data); drop QEMU's drain artefacts: a paused->running (or
    standby->ready) pair that no error or user pause caused."""
    out = []
    for name, data in events:
        data = dict(data)
        if name == "BLOCK_JOB_COMPLETED" and "error" in data:
            data.pop("offset")                  # how far a failing job got varies
        if name == "BLOCK_JOB_CANCELLED":
            data.pop("offset")
            data.pop("len")
        out.append((name, data))
    res = []
    for ev in out:
        if (ev[0] == "JOB_STATUS_CHANGE" and res and res[-1][0] == "JOB_STATUS_CHANGE"
                and (res[-1][1]["status"], ev[1]["status"]) in (("paused", "running"),
                                                               ("standby", "ready"))
                and not (len(res) > 1 and res[-2][0] == "BLOCK_JOB_ERROR")
                and not res[-1][1].get("_user")):
            res.pop()
            continue
        res.append(ev)
    return res


class Both:
    """Runs each step on qemu-storage-daemon and on blockengine, in twin directories."""

    def __init__(self, tmp_path):
        self.dirs = {"qemu": tmp_path / "qemu", "be": tmp_path / "be"}
        for d in self.dirs.values():
            d.mkdir()
        self.qsd = QSD(require_tool("qemu-storage-daemon"))
        self.be = Ctx()

    def image(self, name, data=None, size=SIZE):
        for d in self.dirs.values():
            make_raw(d / name, size, data)

    def path(self, side, name):
        return str(self.dirs[side] / name)

    def _args(self, side, args):
        def fix(v):
            if isinstance(v, str) and v.startswith("@"):
                return self.path(side, v[1:])
            if isinstance(v, dict):
                return {k: fix(x) for k, x in v.items()}
            if isinstance(v, list):
                return [fix(x) for x in v]
            return v
        return {k: fix(v) for k, v in args.items()}

    def cmd(self, _name, **args):
        """Both must succeed (or fail with the same text, returned)."""
        r = self.qsd.raw(_name, **self._args("qemu", args))
        q_err = r["error"]["desc"] if "error" in r else None
        try:
            self.be.cmd(_name, **self._args("be", args))
            b_err = None
        except Exception as e:     # noqa: BLE001
            b_err = str(e)
        assert q_err == b_err, (_name, args)
        return q_err

    def wait(self, event, count=1):
        self.qsd.wait_event(event, 30)
        self.be.events.wait(event, 30, count=count)

    def events(self):
        """Both event lists once they stopped growing."""
        import time
        last = (-1, -1)
        while True:
            self.qsd.raw("query-jobs")            # events sent so far arrive before this
            now = (len(self.qsd.events), len(self.be.events.list))
            if now == last:
                break
            last = now
            time.sleep(0.05)
        return (_norm(self.qsd.event_list()), _norm(self.be.events.list))

    def close(self):
        self.qsd.close()
        self.be.close()


@pytest.fixture
def both(tmp_path):
    b = Both(tmp_path)
    yield b
    b.close()


def add_raw(both, name, file, blkdebug=None):
    both.cmd("blockdev-add", driver="file", filename="@" + file, **{"node-name": name + "f"})
    below = name + "f"
    if blkdebug is not None:
        both.cmd("blockdev-add", driver="blkdebug", image=below,
                 **{"node-name": name + "dbg", "inject-error": blkdebug})
        below = name + "dbg"
    both.cmd("blockdev-add", driver="raw", file=below, **{"node-name": name})


def qemu_img_compare(both, a, b):
    img = require_tool("qemu-img")
    for side in ("qemu", "be"):
        r = subprocess.run([img, "compare", "-f", "raw", "-F", "raw", both.path(side, a),
                            both.path(side, b)], capture_output=True, text=True)
        assert r.returncode == 0, (side, r.stdout, r.stderr)


def test_mirror_complete_script(both):
    both.image("src.raw", random_data(1, SIZE // 2))
    both.image("dst.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    both.cmd("blockdev-mirror", device="src", target="dst", sync="full", **{"job-id": "j1"})
    both.wait("BLOCK_JOB_READY")
    assert both.cmd("block-job-complete", device="nope") == "Block job 'nope' not found"
    both.cmd("block-job-complete", device="j1")
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b
    assert [d["status"] for n, d in b if n == "JOB_STATUS_CHANGE"] == [
        "created", "running", "ready", "waiting", "pending", "concluded", "null"]
    qemu_img_compare(both, "src.raw", "dst.raw")


def test_mirror_soft_cancel_after_ready_script(both):
    both.image("src.raw", random_data(2, SIZE))
    both.image("dst.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    both.cmd("blockdev-mirror", device="src", target="dst", sync="full",
             **{"job-id": "j1", "auto-dismiss": False})
    both.wait("BLOCK_JOB_READY")
    assert both.cmd("blockdev-mirror", device="src", target="dst", sync="full",
                    **{"job-id": "j2"}) == "Need a root block node"
    both.image("other.raw")
    add_raw(both, "other", "other.raw")
    assert both.cmd("blockdev-backup", device="dst", target="other", sync="full",
                    **{"job-id": "j1"}) == \
        "Node 'dst' is busy: block device is in use by block job: mirror"
    assert both.cmd("blockdev-backup", device="other", target="src", sync="full",
                    **{"job-id": "j3"}) == \
        "Node 'src' is busy: block device is in use by block job: mirror"
    both.cmd("block-job-cancel", device="j1")
    both.wait("BLOCK_JOB_COMPLETED")
    assert both.cmd("block-job-cancel", device="j1") == \
        "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'"
    both.cmd("job-dismiss", id="j1")
    q, b = both.events()
    assert q == b
    qemu_img_compare(both, "src.raw", "dst.raw")


def test_mirror_force_cancel_and_errors_script(both):
    both.image("src.raw", random_data(3, SIZE))
    both.image("dst.raw")
    both.image("big.raw", size=2 * SIZE)
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    add_raw(both, "big", "big.raw")
    for args in ({"granularity": 1000}, {"granularity": 128 << 20}, {"buf-size": -1},
                 {"sync": "incremental"}, {"target": "src"}, {"job-id": "1x"},
                 {"job-id": None}, {"device": "srcf"}, {"device": "nope"}):
        a = {"device": "src", "target": "dst", "sync": "full", "job-id": "m", **args}
        if a["job-id"] is None:
            del a["job-id"]
        assert both.cmd("blockdev-mirror", **a) is not None
    both.cmd("blockdev-mirror", device="src", target="dst", sync="full", speed=1,
             **{"job-id": "j1"})
    # the first iteration is copied at once, then the job sleeps (speed 1 B/s): no READY
    import time
    time.sleep(0.3)
    q, b = both.qsd.cmd("query-block-jobs"), both.be.cmd("query-block-jobs")
    assert q == b and q[0]["offset"] == SIZE and q[0]["status"] == "running"
    assert both.cmd("block-job-set-speed", device="j1", speed=-1) is not None
    assert both.cmd("block-job-finalize", id="j1") is not None
    assert both.cmd("block-job-complete", device="dst") == "Block job 'dst' not found"
    assert both.cmd("block-job-resume", device="j1") == \
        "Can't resume a job that was not paused"
    both.cmd("block-job-cancel", device="j1", force=True)
    both.wait("BLOCK_JOB_CANCELLED")
    q, b = both.events()
    assert q == b


def test_mirror_size_mismatch_script(both):
    both.image("src.raw", random_data(4, 4096))
    both.image("big.raw", size=2 * SIZE)
    add_raw(both, "src", "src.raw")
    add_raw(both, "big", "big.raw")
    both.cmd("blockdev-mirror", device="src", target="big", sync="full", **{"job-id": "j"})
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b


@pytest.mark.parametrize("job", ["blockdev-mirror", "blockdev-backup"])
@pytest.mark.parametrize("policy", ["report", "stop", "ignore", "enospc"])
def test_target_error_policy_scripts(both, job, policy):
    both.image("src.raw", random_data(5, SIZE))
    both.image("dst.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw", blkdebug=[{"event": "write_aio", "errno": 5,
                                              "once": True, "sector": 2048}])
    both.cmd(job, device="src", target="dst", sync="full",
             **{"job-id": "j", "on-target-error": policy})
    if policy == "stop":
        both.wait("BLOCK_JOB_ERROR")
        both.qsd.wait_event("JOB_STATUS_CHANGE")
        import time
        for _ in range(100):
            if both.be.graph._job_registry.find("j").status == "paused":
                break
            time.sleep(0.01)
        time.sleep(0.2)
        assert [i["io-status"] for i in both.qsd.cmd("query-block-jobs")] == ["failed"]
        assert [i["io-status"] for i in both.be.cmd("query-block-jobs")] == ["failed"]
        both.cmd("block-job-resume", device="j")
    if job == "blockdev-mirror" and policy in ("stop", "ignore"):
        both.wait("BLOCK_JOB_READY")
        both.cmd("block-job-complete", device="j")
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b
    if policy in ("stop", "ignore"):
        qemu_img_compare(both, "src.raw", "dst.raw")


def test_backup_manual_finalize_script(both):
    both.image("src.raw", random_data(6, SIZE))
    both.image("dst.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    both.cmd("blockdev-backup", device="src", target="dst", sync="full",
             **{"job-id": "b", "auto-finalize": False, "auto-dismiss": False})
    both.wait("BLOCK_JOB_PENDING")
    assert both.cmd("job-dismiss", id="b") == \
        "Job 'b' in state 'pending' cannot accept command verb 'dismiss'"
    both.cmd("job-finalize", id="b")
    both.wait("BLOCK_JOB_COMPLETED")
    assert both.qsd.cmd("query-jobs") == both.be.cmd("query-jobs")
    both.cmd("job-dismiss", id="b")
    q, b = both.events()
    assert q == b
    qemu_img_compare(both, "src.raw", "dst.raw")


def test_incremental_backup_and_bitmap_script(both):
    both.image("src.raw", random_data(7, SIZE))
    both.image("dst.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    B = "block-dirty-bitmap-"
    both.cmd(B + "add", node="src", name="b0")
    for args in ({"name": "b0"}, {"name": "x", "granularity": 1000}, {"name": ""},
                 {"name": "x", "persistent": True}, {"node": "zz", "name": "x"}):
        assert both.cmd(B + "add", **{"node": "src", **args}) is not None
    for c in ("remove", "clear", "enable", "disable"):
        assert both.cmd(B + c, node="src", name="zz") == "Dirty bitmap 'zz' not found"
    both.cmd(B + "add", node="src", name="b1", granularity=4096, disabled=True)
    both.cmd(B + "merge", node="src", target="b1", bitmaps=["b0"])
    from blockengine.qmp.commands import queries

    def node_bitmaps(rows):
        return [n.get("dirty-bitmaps") for n in rows if n["node-name"] == "src"]
    assert node_bitmaps(both.qsd.cmd("query-named-block-nodes")) == node_bitmaps(
        queries.COMMANDS["query-named-block-nodes"](both.be.qmp_ctx, {}))
    bk = {"device": "src", "target": "dst", "job-id": "b"}
    for args in ({"sync": "incremental"}, {"sync": "full", "bitmap": "b0"},
                 {"sync": "full", "bitmap-mode": "always"},
                 {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"}):
        assert both.cmd("blockdev-backup", **bk, **args) is not None
    both.cmd("blockdev-backup", sync="incremental", bitmap="b0",
             **{**bk, "auto-finalize": False})
    for c in ("remove", "clear", "disable"):
        assert both.cmd(B + c, node="src", name="b0") == \
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
    both.wait("BLOCK_JOB_PENDING")
    both.cmd("job-finalize", id="b")
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b


def test_drive_mirror_raw_target_script(both):
    both.image("src.raw", random_data(8, SIZE))
    add_raw(both, "src", "src.raw")
    both.cmd("drive-mirror", device="src", target="@new.raw", format="raw", sync="full",
             **{"job-id": "m"})
    both.wait("BLOCK_JOB_READY")
    both.cmd("block-job-complete", device="m")
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b
    qemu_img_compare(both, "src.raw", "new.raw")
    for side in ("qemu", "be"):
        assert os.path.getsize(both.path(side, "new.raw")) == SIZE
    shutil.rmtree(both.dirs["be"], ignore_errors=True)


def test_mirror_target_with_other_writer_script(both):
    """A second writer on the target: QEMU's permission conflict text, job created and
    dropped (created -> null)."""
    from blockengine.graph.backend import ALL_SHARED, BlockBackend
    from blockengine.graph.perms import Perm
    both.image("src.raw", random_data(9, SIZE))
    both.image("dst.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    # the other writer: an NBD export in QEMU, an unnamed backend here
    both.qsd.cmd("nbd-server-start",
                 addr={"type": "unix", "data": {"path": both.path("qemu", "nbd.sock")}})
    both.qsd.cmd("block-export-add", type="nbd", id="e", writable=True,
                 **{"node-name": "dst"})
    writer = BlockBackend(both.be.graph, perm=Perm.CONSISTENT_READ | Perm.WRITE,
                          shared=ALL_SHARED)
    writer.insert(both.be.graph.find_node("dst"))
    assert both.cmd("blockdev-mirror", device="src", target="dst", sync="full",
                    **{"job-id": "m"}) == (
        "Permission conflict on node 'dst': permissions 'consistent read, write' are both "
        "required by an unnamed block device (uses node 'dst' as 'root' child) and "
        "unshared by an unnamed block device (uses node 'dst' as 'root' child).")
    # backup's target shares writes: allowed
    both.cmd("blockdev-backup", device="src", target="dst", sync="full", **{"job-id": "b"})
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert [e for e in q if e[1].get("id") == "m"] == \
        [e for e in b if e[1].get("id") == "m"] == [
            ("JOB_STATUS_CHANGE", {"status": "created", "id": "m"}),
            ("JOB_STATUS_CHANGE", {"status": "null", "id": "m"})]
    qemu_img_compare(both, "src.raw", "dst.raw")
    writer.delete()


def _qcow2_chain(both):
    img, io = require_tool("qemu-img"), require_tool("qemu-io")
    for side in ("qemu", "be"):
        p = lambda n: both.path(side, n)   # noqa: E731
        subprocess.run([img, "create", "-q", "-f", "qcow2", p("base.qcow2"), str(SIZE)],
                       check=True)
        subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", p("base.qcow2"), "-F",
                        "qcow2", p("mid.qcow2")], check=True)
        subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", p("mid.qcow2"), "-F",
                        "qcow2", p("top.qcow2")], check=True)
        for name, pat, off in (("base", 1, 0), ("mid", 2, 1 << 20), ("top", 3, 2 << 20)):
            subprocess.run([io, "-f", "qcow2", "-c", f"write -P {pat} {off} 1M",
                            p(name + ".qcow2")], check=True, capture_output=True)
    both.cmd("blockdev-add", driver="qcow2", file={"driver": "file",
                                                   "filename": "@base.qcow2"},
             **{"node-name": "base", "read-only": True})
    both.cmd("blockdev-add", driver="qcow2", file={"driver": "file",
                                                   "filename": "@mid.qcow2"},
             backing="base", **{"node-name": "mid", "read-only": True})
    both.cmd("blockdev-add", driver="qcow2", file={"driver": "file",
                                                   "filename": "@top.qcow2"},
             backing="mid", **{"node-name": "top"})


@pytest.fixture
def qcow2_ok():
    from blockengine.graph import registry
    if not registry.has_driver("qcow2"):
        pytest.skip("qcow2 driver not registered yet")


def test_stream_and_commit_qcow2_scripts(both, qcow2_ok):
    _qcow2_chain(both)
    for args in ({"base": "x", "base-node": "y"}, {"base": "/nonexistent"},
                 {"backing-file": "x"}, {"base-node": "top"}):
        assert both.cmd("block-stream", device="top", **args) is not None
    assert both.cmd("block-stream", device="mid", bottom="top") is not None
    for args in ({"base-node": "top"}, {"top-node": "mid", "base-node": "mid"},
                 {"top": "/nope"}, {"base": "/nope"}, {"backing-file": "x"},
                 {"top-node": "base", "base-node": "mid"}):
        assert both.cmd("block-commit", device="top", **args) is not None
    assert both.cmd("block-commit", device="mid", **{"top-node": "top"}) == \
        "Need a root block node"
    both.cmd("block-stream", device="top", **{"job-id": "s", "base-node": "mid"})
    both.wait("BLOCK_JOB_COMPLETED")
    both.cmd("block-commit", device="top", **{"job-id": "c", "base-node": "base"})
    both.wait("BLOCK_JOB_READY")
    assert both.cmd("blockdev-del", **{"node-name": "base"}) == "Node base is in use"
    both.cmd("block-job-complete", device="c")
    both.wait("BLOCK_JOB_COMPLETED", count=2)
    q, b = both.events()
    # how much an active commit copies depends on allocation granularity: not len/offset
    strip = lambda evs: [(n, {k: v for k, v in d.items()       # noqa: E731
                              if not (d.get("device") == "c" and k in ("len", "offset"))})
                         for n, d in evs]
    assert strip(q) == strip(b)
    for n in ("top", "mid", "base"):
        both.cmd("blockdev-del", **{"node-name": n})
    img = require_tool("qemu-img")
    r = subprocess.run([img, "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                        both.path("qemu", "base.qcow2"), both.path("be", "base.qcow2")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([img, "check", both.path("be", "base.qcow2")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mirror_replaces_script(both):
    both.image("src.raw", random_data(10, SIZE))
    both.image("dst.raw")
    both.image("o.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "dst", "dst.raw")
    add_raw(both, "o", "o.raw")
    both.cmd("blockdev-add", driver="blkdebug", image="src", **{"node-name": "flt"})
    m = {"device": "flt", "target": "dst", "sync": "full", "job-id": "m"}
    assert both.cmd("blockdev-mirror", replaces="nope", **m) == \
        "Failed to find node with node-name='nope'"
    assert both.cmd("blockdev-mirror", replaces="o", **m).startswith(
        "Cannot replace 'o' by a node mirrored from 'flt'")
    both.cmd("blockdev-mirror", replaces="src", **m)
    both.wait("BLOCK_JOB_READY")
    both.cmd("block-job-complete", device="m")
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b
    flt = both.be.graph.find_node("flt")
    assert flt.child("image").node.node_name == "dst"      # src was replaced by dst
    qemu_img_compare(both, "src.raw", "dst.raw")
