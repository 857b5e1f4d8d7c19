"""Dirty bitmaps: recording writes (checked against a set-of-chunks model), the
block-dirty-bitmap-* commands and their QEMU 7.2 texts, BlockDirtyInfo."""
import random

import pytest

from blockengine import bitmaps
from blockengine.bitmaps import BlockDirtyBitmap

from .helpers import make_raw

SIZE = 4 << 20


@pytest.fixture
def disk(ctx, tmp_path):
    ctx.add_raw("src", make_raw(tmp_path / "s.raw", SIZE))
    return ctx.device("dev0", "src")


def chunks(off, n, gran):
    return set(range(off // gran, (off + n - 1) // gran + 1))


@pytest.mark.parametrize("gran", [512, 4096, 65536, 1 << 20])
def test_bitmap_records_writes_like_model(ctx, disk, gran):
    ctx.cmd("block-dirty-bitmap-add", node="src", name="b", granularity=gran)
    bm = bitmaps.find_bitmap(ctx.graph.find_node("src"), "b")
    rng = random.Random(gran)
    model = set()
    for i in range(200):
        n = rng.randrange(1, 200_000)
        off = rng.randrange(0, SIZE - n)
        if i % 3 == 0:
            disk.pwrite_zeroes(off, n)
        else:
            disk.pwrite(off, b"x" * n)
        model |= chunks(off, n, gran)
        if i % 50 == 49:       # reset a random range (whole chunks inside it)
            a = rng.randrange(0, SIZE // gran)
            b = rng.randrange(a, min(SIZE // gran, a + 64))
            bm.reset_dirty(a * gran, (b - a) * gran)
            model -= set(range(a, b))
    assert bm.count() == len(model) * gran
    got = set()
    pos = 0
    while (area := bm.next_dirty_area(pos)) is not None:
        got |= set(range(area[0] // gran, (area[0] + area[1] - 1) // gran + 1))
        pos = area[0] + area[1]
    assert got == model
    for c in list(model)[:20]:
        assert bm.get(c * gran)
    nxt = bm.next_clean(0)
    assert nxt == -1 or nxt // gran not in model


def test_add_defaults_and_info(ctx, disk):
    ctx.cmd("block-dirty-bitmap-add", node="src", name="b0")
    ctx.cmd("block-dirty-bitmap-add", node="src", name="b1", disabled=True,
            granularity=4096)
    ctx.cmd("block-dirty-bitmap-add", node="src", name="b2", granularity=131072)
    disk.pwrite(0, b"a" * 5000)
    info = bitmaps.dirty_bitmap_info(ctx.graph.find_node("src"))
    # newest first, as qemu-storage-daemon lists them
    assert info == [
        {"name": "b2", "recording": True, "persistent": False, "busy": False,
         "granularity": 131072, "count": 131072},
        {"name": "b1", "recording": False, "persistent": False, "busy": False,
         "granularity": 4096, "count": 0},
        {"name": "b0", "recording": True, "persistent": False, "busy": False,
         "granularity": 65536, "count": 65536}]


def test_command_errors_are_qemus(ctx, disk):
    B = "block-dirty-bitmap-"
    ctx.cmd(B + "add", node="src", name="b0")
    e = ctx.error
    assert e(B + "add", node="src", name="b0") == "Bitmap already exists: b0"
    assert e(B + "add", node="src", name="x", granularity=1000) == \
        "Granularity must be power of 2 and at least 512"
    assert e(B + "add", node="src", name="x", granularity=256) == \
        "Granularity must be power of 2 and at least 512"
    assert e(B + "add", node="zz", name="x") == "Cannot find device='zz' nor node-name='zz'"
    assert e(B + "add", node="src", name="") == "Bitmap name cannot be empty"
    assert e(B + "add", node="src", name="p", persistent=True) == \
        "Can't store persistent bitmaps to src: Operation not supported"
    for cmd in ("remove", "clear", "enable", "disable"):
        assert e(B + cmd, node="src", name="zz") == "Dirty bitmap 'zz' not found"
    assert e(B + "merge", node="src", target="b0", bitmaps=["zz"]) == \
        "Dirty bitmap 'zz' not found"
    assert e(B + "merge", node="src", target="zz", bitmaps=["b0"]) == \
        "Dirty bitmap 'zz' not found"


def test_enable_disable_clear_remove_merge(ctx, disk):
    B = "block-dirty-bitmap-"
    ctx.cmd(B + "add", node="src", name="a", granularity=4096)
    ctx.cmd(B + "add", node="src", name="b", granularity=65536, disabled=True)
    node = ctx.graph.find_node("src")
    a, b = bitmaps.find_bitmap(node, "a"), bitmaps.find_bitmap(node, "b")
    disk.pwrite(0, b"1" * 4096)
    assert a.count() == 4096 and b.count() == 0
    ctx.cmd(B + "enable", node="src", name="b")
    ctx.cmd(B + "disable", node="src", name="a")
    disk.pwrite(1 << 20, b"2" * 512)
    assert a.count() == 4096 and b.count() == 65536
    # merge of different granularities, source named by node
    ctx.cmd(B + "merge", node="src", target="b", bitmaps=[{"node": "src", "name": "a"}])
    assert b.count() == 2 * 65536
    ctx.cmd(B + "merge", node="src", target="a", bitmaps=["b"])
    assert a.count() == 2 * 65536
    ctx.cmd(B + "clear", node="src", name="a")
    assert a.count() == 0
    ctx.cmd(B + "remove", node="src", name="a")
    assert bitmaps.find_bitmap(node, "a") is None
    assert a not in node.dirty_bitmaps


def test_successor_abdicate_and_reclaim(ctx, disk):
    node = ctx.graph.find_node("src")
    bm = bitmaps.create_bitmap(node, "x", 65536)
    disk.pwrite(0, b"1")
    succ = bm.create_successor()
    assert bm.in_use() and not bm.recording and succ.recording
    disk.pwrite(65536, b"2")
    assert bm.count() == 65536 and succ.count() == 65536
    bm.reclaim()
    assert bm.count() == 2 * 65536 and succ not in node.dirty_bitmaps
    bm.create_successor()
    disk.pwrite(3 * 65536, b"3")
    bm.abdicate()
    assert bm.count() == 65536 and bm.get(3 * 65536) and bm.recording


def test_serialize_roundtrip_for_persistence(ctx, disk):
    node = ctx.graph.find_node("src")
    bm = bitmaps.create_bitmap(node, "x", 4096)
    disk.pwrite(12345, b"z" * 99999)
    data = bm.serialize()
    other = BlockDirtyBitmap(node, "y", 4096)
    other.deserialize(data)
    assert other.copy_bits() == bm.copy_bits()

    stored = []
    node.drv.store_bitmaps = stored.extend     # the hook a format driver provides
    bm.persistent = True
    bitmaps.store_persistent(node)
    assert stored == [bm]
    del node.drv.store_bitmaps


def test_default_granularity_follows_cluster_size(ctx, disk):
    node = ctx.graph.find_node("src")
    assert bitmaps.default_granularity(node) == 65536
    node.drv.get_info = lambda: {"cluster_size": 512}
    assert bitmaps.default_granularity(node) == 4096
    node.drv.get_info = lambda: {"cluster_size": 1 << 21}
    assert bitmaps.default_granularity(node) == 1 << 21
    del node.drv.get_info
