"""img convert -l (from an internal qcow2 snapshot, read as bdrv_snapshot_load_tmp
does) against qemu-img 7.2: same outputs, errors and converted bytes."""
import subprocess

import pytest

from tests.tooling import require_tool

pytestmark = pytest.mark.interop


def _prepare(d):
    """s.qcow2: snapshots snap1 (id 1) and snap2 (id 2) holding different data than
    the active layer; ov.qcow2: an overlay of base.qcow2 with a snapshot of its own;
    x.raw: no snapshots."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")

    def run(*args):
        subprocess.run(args, cwd=d, check=True, capture_output=True)

    def io(image, *cmds):
        run(qemu_io, *[a for c in cmds for a in ("-c", c)], image)
    run(qemu_img, "create", "-q", "-f", "qcow2", "s.qcow2", "2M")
    io("s.qcow2", "write -P 1 0 64k", "write -z 1M 64k")
    run(qemu_img, "snapshot", "-c", "snap1", "s.qcow2")
    io("s.qcow2", "write -P 2 0 64k", "write -P 3 128k 64k", "discard 1M 64k")
    run(qemu_img, "snapshot", "-c", "snap2", "s.qcow2")
    io("s.qcow2", "write -P 4 0 64k", "write -P 5 1536k 4k")
    run(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
    io("base.qcow2", "write -P 6 0 2M")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "ov.qcow2")
    io("ov.qcow2", "write -P 7 64k 64k")
    run(qemu_img, "snapshot", "-c", "old", "ov.qcow2")
    io("ov.qcow2", "write -P 8 0 1M")
    run(qemu_img, "create", "-q", "-f", "raw", "x.raw", "1M")


CASES = {
    "name": ["-l", "snap1", "-O", "raw", "s.qcow2", "out.raw"],
    "id": ["-l", "2", "-O", "raw", "s.qcow2", "out.raw"],
    "opt-name": ["-l", "snapshot.name=snap2", "-O", "raw", "s.qcow2", "out.raw"],
    "opt-id": ["-l", "snapshot.id=1", "-O", "raw", "s.qcow2", "out.raw"],
    "opt-both": ["-l", "snapshot.id=2,snapshot.name=snap2", "-O", "raw", "s.qcow2",
                 "out.raw"],
    "to-qcow2": ["-l", "snap2", "-O", "qcow2", "s.qcow2", "out.qcow2"],
    "to-qcow2-compressed": ["-c", "-l", "snap1", "-O", "qcow2", "s.qcow2", "out.qcow2"],
    "backing-chain": ["-l", "old", "-O", "raw", "ov.qcow2", "out.raw"],
    "backing-target": ["-l", "old", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
                       "ov.qcow2", "out.qcow2"],
    "opts-concatenated": ["-l", "snapshot.name=snap1", "-O", "raw", "s.qcow2", "s.qcow2",
                          "out.raw"],
    "last-l-wins": ["-l", "snapshot.id=9", "-l", "snapshot.name=snap1", "-O", "raw",
                    "s.qcow2", "out.raw"],
    # errors
    "err-concatenated": ["-l", "snap1", "-O", "raw", "s.qcow2", "s.qcow2", "out.raw"],
    "err-unknown": ["-l", "nope", "-O", "raw", "s.qcow2", "out.raw"],
    "err-id-name-mismatch": ["-l", "snapshot.id=1,snapshot.name=snap2", "-O", "raw",
                             "s.qcow2", "out.raw"],
    "err-empty-id": ["-l", "snapshot.id=", "-O", "raw", "s.qcow2", "out.raw"],
    "err-bad-param": ["-l", "snapshot.foo=1", "-O", "raw", "s.qcow2", "out.raw"],
    "err-short-flag": ["-l", "snapshot.id=1,foo", "-O", "raw", "s.qcow2", "out.raw"],
    "err-raw-source": ["-l", "snap1", "-O", "raw", "x.raw", "out.raw"],
    "err-s-option": ["-s", "snap1", "-O", "raw", "s.qcow2", "out.raw"],
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_convert_snapshot_same_as_qemu_img(run_both, qemu_img, args):
    both = run_both(["convert", *args], _prepare)
    both.assert_same()
    out = args[-1]
    ref, ours = both.ref_dir / out, both.our_dir / out
    assert ours.exists() == ref.exists()
    if not ref.exists():
        return
    if out.endswith(".raw"):
        assert ours.read_bytes() == ref.read_bytes()
    else:
        # same guest data and the same allocation map
        for cmd in (["compare", "-s"], ["map", "--output=json"]):
            if cmd[0] == "compare":
                r = subprocess.run([qemu_img, *cmd, str(ref), str(ours)],
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stdout + r.stderr
            else:
                maps = [subprocess.run([qemu_img, *cmd, out], cwd=d, capture_output=True,
                                       text=True, check=True).stdout
                        for d in (both.ref_dir, both.our_dir)]
                assert maps[0] == maps[1]


def test_source_image_unchanged(be_img, tmp_path):
    """Loading a snapshot for reading never writes to the source image."""
    _prepare(tmp_path)
    before = (tmp_path / "s.qcow2").read_bytes()
    r = be_img("convert", "-l", "snap1", "-O", "raw", "s.qcow2", "out.raw", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.qcow2").read_bytes() == before
