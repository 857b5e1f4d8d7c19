"""The quorum driver: voting reads, QUORUM_* events, x-blockdev-change."""
import pytest

from blockengine.qmp.engine import QMPEngine


@pytest.fixture
def engine(tmp_path):
    e = QMPEngine()
    for i in range(3):
        p = tmp_path / f"c{i}.raw"
        p.write_bytes(b"A" * 4096)
        assert "return" in e.execute("blockdev-add", {
            "driver": "raw", "node-name": f"c{i}",
            "file": {"driver": "file", "filename": str(p)}})
    yield e
    e.graph.close_all()


def add_quorum(engine, **opts):
    args = {"driver": "quorum", "node-name": "q", "children": ["c0", "c1", "c2"],
            "vote-threshold": 2, **opts}
    return engine.execute("blockdev-add", args)


def test_open_errors(engine):
    assert add_quorum(engine, **{"vote-threshold": 0})["error"]["desc"] == \
        "Parameter 'vote-threshold' expects a value >= 1"
    assert add_quorum(engine, **{"vote-threshold": 4})["error"]["desc"] == \
        "threshold may not exceed children count"
    assert add_quorum(engine, blkverify=True)["error"]["desc"] == (
        "blkverify=on can only be set if there are exactly two files and vote-threshold is 2")


def test_vote_reports_and_rewrites(engine, tmp_path):
    assert add_quorum(engine, **{"rewrite-corrupted": True}) == {"return": {}}
    q = engine.graph.find_node("q")
    engine.graph.find_node("c1").pwrite(0, b"B" * 512)
    with engine.events.collect() as events:
        assert q.pread(0, 512) == b"A" * 512
    assert [(e["event"], e["data"]) for e in events] == [
        ("QUORUM_REPORT_BAD", {"type": "read", "node-name": "c1", "sector-num": 0,
                               "sectors-count": 1})]
    assert engine.graph.find_node("c1").pread(0, 512) == b"A" * 512     # rewritten
    engine.graph.find_node("c1").pwrite(0, b"B" * 512)
    engine.graph.find_node("c2").pwrite(0, b"C" * 512)
    with engine.events.collect("QUORUM_FAILURE") as events:
        with pytest.raises(Exception):
            q.pread(0, 512)
    assert events[0]["data"] == {"reference": "q", "sector-num": 0, "sectors-count": 1}


def test_writes_reach_every_child_and_fifo_reads(engine):
    assert add_quorum(engine, **{"read-pattern": "fifo", "vote-threshold": 1}) == \
        {"return": {}}
    q = engine.graph.find_node("q")
    q.pwrite(512, b"Z" * 512)
    for i in range(3):
        assert engine.graph.find_node(f"c{i}").pread(512, 512) == b"Z" * 512
    assert q.pread(512, 512) == b"Z" * 512


def test_x_blockdev_change(engine, tmp_path):
    assert add_quorum(engine) == {"return": {}}
    e = engine.execute
    assert e("x-blockdev-change", {"parent": "q", "node": "c0"})["error"]["desc"] == \
        "The node c0 already has a parent"
    assert e("x-blockdev-change", {"parent": "q", "child": "children.2"}) == {"return": {}}
    assert e("x-blockdev-change", {"parent": "q", "child": "children.1"})["error"]["desc"] == \
        "The number of children cannot be lower than the vote threshold 2"
    assert e("x-blockdev-change", {"parent": "q", "node": "c2"}) == {"return": {}}
    names = [c.name for c in engine.graph.find_node("q").children]
    assert names == ["children.0", "children.1", "children.2"]
