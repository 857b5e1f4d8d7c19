"""Backup with ``compress: true`` and the ``compress`` filter node, side by side with
qemu-storage-daemon 7.2: same errors and events, targets whose clusters are stored
compressed (qemu-img check counts them), equal contents and clean images.

QEMU's block-copy runs up to 64 copy tasks at once, so the order in which compressed
clusters land in the target file varies between runs: the files are compared by
content, allocation and compressed-cluster count, not byte for byte."""
import json
import subprocess

import pytest

from tests.interop.test_qcow2_compress import source_data
from tests.tooling import require_tool

from .test_interop_qsd import Both, add_raw

pytestmark = pytest.mark.interop

SIZE = 4 << 20


@pytest.fixture
def both(tmp_path):
    b = Both(tmp_path)
    yield b
    b.close()


def _qcow2_target(both, name, **opts):
    img = require_tool("qemu-img")
    o = ",".join("%s=%s" % kv for kv in opts.items())
    for side in ("qemu", "be"):
        subprocess.run([img, "create", "-q", "-f", "qcow2", *(["-o", o] if o else []),
                        both.path(side, name), str(SIZE)], check=True)


def _check(path) -> dict:
    r = subprocess.run([require_tool("qemu-img"), "check", "--output=json", path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def _assert_same_targets(both, src, dst):
    img = require_tool("qemu-img")
    checks = []
    for side in ("qemu", "be"):
        r = subprocess.run([img, "compare", "-F", "qcow2", both.path(side, src),
                            both.path(side, dst)], capture_output=True, text=True)
        assert r.returncode == 0, (side, r.stdout, r.stderr)
        c = _check(both.path(side, dst))
        checks.append({k: c[k] for k in ("allocated-clusters", "compressed-clusters",
                                         "total-clusters")})
    assert checks[0] == checks[1]
    assert checks[1]["compressed-clusters"] > 0
    return checks[1]


@pytest.mark.parametrize("opts", [{}, {"compression_type": "zstd", "cluster_size": "4k"}])
def test_backup_compress_script(both, opts):
    both.image("src.raw", source_data(SIZE, seed=5))
    _qcow2_target(both, "dst.qcow2", **opts)
    both.image("plain.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "plain", "plain.raw")
    both.cmd("blockdev-add", driver="file", filename="@dst.qcow2", **{"node-name": "dstf"})
    both.cmd("blockdev-add", driver="qcow2", file="dstf", **{"node-name": "dst"})
    # a raw target cannot store compressed clusters
    assert both.cmd("blockdev-backup", device="src", target="plain", sync="full",
                    compress=True, **{"job-id": "b"}) is not None
    both.cmd("blockdev-backup", device="src", target="dst", sync="full", compress=True,
             **{"job-id": "b"})
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b
    both.cmd("blockdev-del", **{"node-name": "dst"})
    both.cmd("blockdev-del", **{"node-name": "dstf"})
    _assert_same_targets(both, "src.raw", "dst.qcow2")


def test_compress_filter_script(both):
    """blockdev-add {"driver": "compress"} turns a backup's plain writes into
    compressed writes; the filter refuses a child that cannot compress."""
    both.image("src.raw", source_data(SIZE, seed=5))
    _qcow2_target(both, "dst.qcow2")
    both.image("plain.raw")
    add_raw(both, "src", "src.raw")
    add_raw(both, "plain", "plain.raw")
    assert both.cmd("blockdev-add", driver="compress", file="plain",
                    **{"node-name": "bad"}) == \
        "Compression is not supported for underlying format: raw"
    both.cmd("blockdev-add", driver="file", filename="@dst.qcow2", **{"node-name": "dstf"})
    both.cmd("blockdev-add", driver="qcow2", file="dstf", **{"node-name": "dstq"})
    both.cmd("blockdev-add", driver="compress", file="dstq", **{"node-name": "dst"})
    both.cmd("blockdev-backup", device="src", target="dst", sync="full", **{"job-id": "b"})
    both.wait("BLOCK_JOB_COMPLETED")
    q, b = both.events()
    assert q == b
    for name in ("dst", "dstq", "dstf"):
        both.cmd("blockdev-del", **{"node-name": name})
    _assert_same_targets(both, "src.raw", "dst.qcow2")
