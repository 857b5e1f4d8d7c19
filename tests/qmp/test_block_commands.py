"""Block-node QMP commands: the same scripts through qemu-storage-daemon and blockengine
must give the same returns and errors; plus behaviour the daemon cannot show (devices)."""
import pytest

from blockengine.qmp.engine import QMPEngine
from tests.tooling import require_tool


@pytest.fixture
def engine():
    e = QMPEngine()
    yield e
    e.graph.close_all()


def script(tmp):
    img = f"{tmp}/a.raw"
    return img, [
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": img}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0",
                          "file": {"driver": "file", "node-name": "f0", "filename": img}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "nonexist"}),
        ("blockdev-add", {"driver": "file", "node-name": "0bad", "filename": img}),
        ("blockdev-add", {"driver": "file", "node-name": "x" * 32, "filename": img}),
        ("blockdev-add", {"driver": "file", "node-name": "ok2", "filename": f"{tmp}/none"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "offset": 512, "size": 1024,
                          "file": {"driver": "file", "filename": img}}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 4096}),
        ("blockdev-add", {"driver": "null-aio", "node-name": "n1"}),
        ("blockdev-add", {"driver": "nope", "node-name": "n2"}),
        ("blockdev-add", {"driver": "file", "node-name": "n3"}),
        ("blockdev-add", {"driver": "file", "node-name": "n3", "filename": img, "bogus": 1}),
        ("block_resize", {"node-name": "nope", "size": 4096}),
        ("block_resize", {"device": "nope", "size": 4096}),
        ("block_resize", {"node-name": "r0", "size": -1}),
        ("block_resize", {"node-name": "r0", "size": 2097152}),
        ("block_resize", {"node-name": "f0", "size": 3145728}),
        ("block_resize", {"size": 4096}),
        ("block-set-write-threshold", {"node-name": "nope", "write-threshold": 5}),
        ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 5}),
        ("x-blockdev-change", {"parent": "r0"}),
        ("x-blockdev-change", {"parent": "r0", "child": "file", "node": "n0"}),
        ("x-blockdev-change", {"parent": "r0", "child": "nochild"}),
        ("x-blockdev-change", {"parent": "r0", "child": "file"}),
        ("x-blockdev-change", {"parent": "r0", "node": "n0"}),
        ("x-blockdev-change", {"parent": "r0", "node": "nonode"}),
        ("x-blockdev-change", {"parent": "nope", "node": "n0"}),
        ("blockdev-del", {"node-name": "f0"}),
        ("blockdev-del", {"node-name": "nope"}),
        ("blockdev-del", {"node-name": "r0"}),
        ("blockdev-del", {"node-name": "f0"}),
        ("blockdev-del", {"node-name": "r2"}),
        ("blockdev-del", {}),
    ]


@pytest.mark.interop
def test_same_returns_and_errors_as_qemu_storage_daemon(tmp_path, engine):
    from tests.jobs.qsd import QSD
    img, steps = script(tmp_path)
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    qsd = QSD(require_tool("qemu-storage-daemon"))
    try:
        for name, args in steps:
            expected = qsd.raw(name, **args)
            assert engine.execute(name, args) == expected, (name, args)
        ours = engine.execute("query-named-block-nodes")["return"]
        theirs = qsd.cmd("query-named-block-nodes")
    finally:
        qsd.close()
    assert [n["node-name"] for n in ours] == [n["node-name"] for n in theirs]
    for a, b in zip(ours, theirs):
        common = set(a) & set(b)
        assert {k: a[k] for k in common} == {k: b[k] for k in common}
        assert set(b) <= set(a) | {"dirty-bitmaps"}


def test_resize_grows_the_file(tmp_path, engine):
    img = tmp_path / "g.raw"
    img.write_bytes(bytes(4096))
    engine.execute("blockdev-add", {"driver": "raw", "node-name": "r",
                                    "file": {"driver": "file", "filename": str(img)}})
    assert engine.execute("block_resize", {"node-name": "r", "size": 1 << 20}) == {"return": {}}
    assert img.stat().st_size == 1 << 20


def test_write_threshold_event_through_qmp(engine):
    engine.execute("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    with engine.events.collect("BLOCK_WRITE_THRESHOLD") as events:
        engine.execute("block-set-write-threshold", {"node-name": "n", "write-threshold": 4096})
        node = engine.graph.find_node("n")
        node.pwrite(4096, b"x" * 10)
        node.pwrite(8192, b"x")
    assert [e["data"] for e in events] == [
        {"node-name": "n", "amount-exceeded": 10, "write-threshold": 4096}]
    assert set(events[0]["timestamp"]) == {"seconds", "microseconds"}
    info = engine.execute("query-named-block-nodes")["return"][0]
    assert info["write_threshold"] == 0


def test_blockstats_of_a_device(engine):
    from blockengine import BlockBackend
    from blockengine.graph.perms import Perm
    engine.execute("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    blk = BlockBackend(engine.graph, "disk0", perm=Perm.CONSISTENT_READ | Perm.WRITE)
    blk.insert(engine.graph.find_node("n"))
    blk.pwrite(0, b"x" * 512)
    blk.pread(0, 1024)
    (entry,) = engine.execute("query-blockstats")["return"]
    assert entry["device"] == "disk0" and entry["node-name"] == "n"
    assert (entry["stats"]["wr_bytes"], entry["stats"]["rd_bytes"]) == (512, 1024)
    (block,) = engine.execute("query-block")["return"]
    assert block["device"] == "disk0" and block["inserted"]["node-name"] == "n"
    assert block["inserted"]["image"]["virtual-size"] == 1 << 20
    nodes = engine.execute("query-blockstats", {"query-nodes": True})["return"]
    assert nodes[0]["stats"]["wr_highest_offset"] == 512
