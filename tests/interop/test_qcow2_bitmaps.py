"""Persistent dirty bitmaps in qcow2 against QEMU 7.2 (qemu-img / qemu-io /
qemu-storage-daemon as the reference).

* bitmaps QEMU stored (qemu-img bitmap + qemu-io writes) load in blockengine with the
  counts, granularities and recording state qemu-storage-daemon reports, and the exact
  dirty set the writes produced; in-use is set on disk while open and cleared on close;
* bitmaps blockengine created and stored pass ``qemu-img check``, are listed by
  ``qemu-img info`` exactly, and qemu-storage-daemon loads the same counts;
* a bitmap left in-use (crash) is inconsistent in both, and removing it leaves a clean
  image.
"""
from __future__ import annotations

import json
import subprocess

import pytest

import blockengine
from blockengine import bitmaps as B
from blockengine.errors import BlockError
from tests.jobs.qsd import QSD
from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
KEYS = ("name", "granularity", "count", "recording", "persistent", "inconsistent")


@pytest.fixture(autouse=True)
def _tools():
    for t in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        require_tool(t)


def qimg(*args, check=True):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          check=check)


def qio(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(path)], capture_output=True, text=True, check=True)


def json_info(path, *extra):
    return json.loads(qimg("info", "--output=json", *extra, path).stdout)


def image_bitmaps(path, *extra):
    return json_info(path, *extra)["format-specific"]["data"].get("bitmaps")


def qsd_bitmaps(path, read_only=True):
    """dirty-bitmaps of the qcow2 node as qemu-storage-daemon loads them."""
    q = QSD(require_tool("qemu-storage-daemon"))
    try:
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "n"}, **{"read-only": read_only},
              file={"driver": "file", "filename": str(path)})
        rows = q.cmd("query-named-block-nodes")
        return [n.get("dirty-bitmaps", []) for n in rows if n["node-name"] == "n"][0]
    finally:
        q.close()


def norm(infos):
    return sorted(({k: i[k] for k in KEYS if k in i} for i in infos),
                  key=lambda i: i["name"])


def dirty_areas(bm):
    out, pos = [], 0
    while True:
        a = bm.next_dirty_area(pos)
        if a is None:
            return out
        out.append(a)
        pos = a[0] + a[1]


def check_clean(path):
    r = qimg("check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found on the image." in r.stdout


def qemu_image(tmp_path):
    p = tmp_path / "q.qcow2"
    qimg("create", "-f", "qcow2", p, "64M")
    qimg("bitmap", "--add", p, "b0")
    qimg("bitmap", "--add", "-g", "4096", p, "b1")
    qimg("bitmap", "--add", "--disable", p, "b2")
    qio(p, "write 0 1M", "write 10M 4k", "write 33M 100k", "write 64000k 512")
    return p


def test_qemu_bitmaps_load_in_blockengine(tmp_path):
    p = qemu_image(tmp_path)
    qemu_view = norm(qsd_bitmaps(p))
    with blockengine.open(str(p), "qcow2") as img:
        node = img.backend.root_node
        assert norm(B.dirty_bitmap_info(node)) == qemu_view
        assert [bm.name for bm in node.dirty_bitmaps] == ["b2", "b1", "b0"]  # newest first
        b0, b1, b2 = (B.find_bitmap(node, n) for n in ("b0", "b1", "b2"))
        assert all(bm.persistent and not bm.inconsistent for bm in (b0, b1, b2))
        assert b2.disabled and not b0.disabled
        assert dirty_areas(b0) == [(0, MiB), (10 * MiB, 65536), (33 * MiB, 2 * 65536),
                                   (64000 * 1024, 65536)]
        assert dirty_areas(b1) == [(0, MiB), (10 * MiB, 4096), (33 * MiB, 100 * 1024),
                                   (64000 * 1024, 4096)]
        assert dirty_areas(b2) == []
        # in-use while open read-write, the autoclear bit kept
        flags = {b["name"]: b["flags"] for b in image_bitmaps(p, "-U")}
        assert flags == {"b0": ["in-use", "auto"], "b1": ["in-use", "auto"],
                         "b2": ["in-use"]}
        img.write(40 * MiB, b"x" * 512)
        after = norm(B.dirty_bitmap_info(node))
    check_clean(p)
    assert image_bitmaps(p) == [
        {"flags": ["auto"], "name": "b0", "granularity": 65536},
        {"flags": ["auto"], "name": "b1", "granularity": 4096},
        {"flags": [], "name": "b2", "granularity": 65536}]
    assert norm(qsd_bitmaps(p)) == after
    assert [a["count"] for a in after] == [qemu_view[0]["count"] + 65536,
                                          qemu_view[1]["count"] + 4096, 0]


def test_blockengine_bitmaps_load_in_qemu(tmp_path):
    p = tmp_path / "b.qcow2"
    qimg("create", "-f", "qcow2", p, "64M")
    with blockengine.open(str(p), "qcow2") as img:
        node = img.backend.root_node
        B.create_bitmap(node, "p0", persistent=True)
        B.create_bitmap(node, "p1", 4096, persistent=True)
        B.create_bitmap(node, "p2", 1 << 20, persistent=True, disabled=True)
        B.create_bitmap(node, "transient")
        img.write(0, b"a" * (3 * MiB))
        img.write(50 * MiB + 4096, b"b" * 4096)
        img.write(64 * MiB - 512, b"c" * 512)
        ours = norm(i for i in B.dirty_bitmap_info(node) if i["name"] != "transient")
    check_clean(p)
    # QEMU appends new bitmaps to the directory newest first, as blockengine does
    assert image_bitmaps(p) == [
        {"flags": [], "name": "p2", "granularity": 1 << 20},
        {"flags": ["auto"], "name": "p1", "granularity": 4096},
        {"flags": ["auto"], "name": "p0", "granularity": 65536}]
    q = qimg("info", p).stdout
    assert "bitmaps:\n        [0]:\n            flags:\n            name: p2\n" \
           "            granularity: 1048576\n        [1]:\n" in q
    assert norm(qsd_bitmaps(p)) == ours
    assert [i["count"] for i in ours] == [3 * MiB + 2 * 65536, 3 * MiB + 2 * 4096, 0]

    # QEMU records more writes; blockengine reads what QEMU stored (and rewrites it:
    # the old tables/data/directory must be freed, so check stays clean)
    qio(p, "write 20M 64k")
    qemu_view = norm(qsd_bitmaps(p))
    for _ in range(2):
        with blockengine.open(str(p), "qcow2") as img:
            assert norm(B.dirty_bitmap_info(img.backend.root_node)) == qemu_view
        check_clean(p)
    assert json_info(p)["actual-size"] < 4 * MiB


def test_removal_and_qmp_errors(tmp_path):
    p = tmp_path / "r.qcow2"
    qimg("create", "-f", "qcow2", p, "16M")
    qimg("bitmap", "--add", p, "b0")
    qimg("bitmap", "--add", p, "b1")
    with blockengine.open(str(p), "qcow2") as img:
        node = img.backend.root_node
        with pytest.raises(BlockError, match="^Bitmap already exists: b0$"):
            B.create_bitmap(node, "b0", persistent=True)
        node.drv.remove_persistent_bitmap("b0")
        B.remove_bitmap(node, B.find_bitmap(node, "b0"))
        assert [b["name"] for b in image_bitmaps(p, "-U")] == ["b1"]
    check_clean(p)
    assert image_bitmaps(p) == [{"flags": ["auto"], "name": "b1", "granularity": 65536}]
    with blockengine.open(str(p), "qcow2") as img:
        node = img.backend.root_node
        node.drv.remove_persistent_bitmap("b1")
        B.remove_bitmap(node, B.find_bitmap(node, "b1"))
    check_clean(p)
    assert image_bitmaps(p) is None
    assert not json_info(p)["format-specific"]["data"].get("bitmaps")

    v2 = tmp_path / "v2.qcow2"
    qimg("create", "-f", "qcow2", "-o", "compat=0.10", v2, "16M")
    q = QSD(require_tool("qemu-storage-daemon"))
    try:
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "n"},
              file={"driver": "file", "filename": str(v2)})
        qemu_msg = q.error("block-dirty-bitmap-add", node="n", name="x", persistent=True)
    finally:
        q.close()
    with blockengine.open(str(v2), "qcow2") as img:
        node = img.backend.root_node
        with pytest.raises(BlockError) as e:
            B.create_bitmap(node, "x", persistent=True)
    assert str(e.value) == qemu_msg.replace("'n'", "'%s'" % node.node_name)


def test_in_use_after_crash_is_inconsistent(tmp_path):
    p = qemu_image(tmp_path)
    crashed = tmp_path / "crashed.qcow2"
    img = blockengine.open(str(p), "qcow2")
    try:
        copy_sparse(p, crashed)       # the image as a crash would leave it
    finally:
        img.close()
    assert [b["flags"][0] for b in image_bitmaps(crashed)] == ["in-use"] * 3
    qemu_view = norm(qsd_bitmaps(crashed))
    assert all(b.get("inconsistent") for b in qemu_view)
    with blockengine.open(str(crashed), "qcow2") as img:
        node = img.backend.root_node
        assert norm(B.dirty_bitmap_info(node)) == qemu_view
        bm = B.find_bitmap(node, "b0")
        with pytest.raises(BlockError, match="inconsistent and cannot be used"):
            B.check_usable(bm)
        img.write(0, b"z" * 512)
    # inconsistent bitmaps are not stored: still in-use on disk
    assert [b["flags"][0] for b in image_bitmaps(crashed)] == ["in-use"] * 3
    with blockengine.open(str(crashed), "qcow2") as img:
        node = img.backend.root_node
        for name in ("b0", "b1", "b2"):
            node.drv.remove_persistent_bitmap(name)
            B.remove_bitmap(node, B.find_bitmap(node, name))
    check_clean(crashed)
    assert image_bitmaps(crashed) is None
