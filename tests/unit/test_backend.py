"""BlockBackend accounting (query-blockstats' BlockDeviceStats) and device checks."""
import pytest

from blockengine import BlockBackend, Graph
from blockengine.errors import BlockError, DeviceNotActive
from blockengine.graph.perms import Perm

SCHEMA_FIELDS = {
    "rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations",
    "flush_total_time_ns", "wr_total_time_ns", "rd_total_time_ns", "wr_highest_offset",
    "rd_merged", "wr_merged", "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "invalid_rd_operations", "invalid_wr_operations",
    "invalid_flush_operations", "account_invalid", "account_failed", "timed_stats"}


@pytest.fixture
def blk():
    g = Graph()
    node = g.open_node({"driver": "null-co", "node-name": "n", "size": 1 << 20,
                        "read-zeroes": True})
    b = BlockBackend(g, "dev0", perm=Perm.CONSISTENT_READ | Perm.WRITE)
    b.insert(node)
    yield b
    g.close_all()


def test_fresh_stats_have_schema_fields_and_no_idle_time(blk):
    stats = blk.stats.query()
    assert SCHEMA_FIELDS <= set(stats)
    assert "idle_time_ns" not in stats
    assert all(stats[k] == 0 for k in SCHEMA_FIELDS if k.endswith(("bytes", "operations")))


def test_reads_writes_flushes_are_counted(blk):
    blk.pread(0, 4096)
    blk.pwrite(8192, b"x" * 512)
    blk.pwrite_zeroes(65536, 4096)
    blk.flush()
    s = blk.stats.query()
    assert (s["rd_operations"], s["rd_bytes"]) == (1, 4096)
    assert (s["wr_operations"], s["wr_bytes"]) == (2, 512 + 4096)
    assert s["flush_operations"] == 1
    assert s["wr_highest_offset"] == 65536 + 4096
    assert s["idle_time_ns"] >= 0


def test_out_of_range_requests_are_invalid(blk):
    with pytest.raises(BlockError):
        blk.pread((1 << 20) - 10, 20)
    with pytest.raises(BlockError):
        blk.pwrite(1 << 20, b"x")
    s = blk.stats.query()
    assert (s["invalid_rd_operations"], s["invalid_wr_operations"]) == (1, 1)
    assert s["rd_operations"] == 0


def test_read_only_device_refuses_writes(blk):
    g = blk.graph
    ro = BlockBackend(g, "ro", perm=Perm.CONSISTENT_READ)
    ro.insert(blk.root_node)
    with pytest.raises(BlockError, match="read-only"):
        ro.pwrite(0, b"x")
    assert ro.stats.query()["invalid_wr_operations"] == 1


def test_no_medium(blk):
    empty = BlockBackend(blk.graph, "cd0", removable=True)
    with pytest.raises(DeviceNotActive):
        empty.pread(0, 1)


def test_timed_stats_interval(blk):
    blk.stats.add_interval(60)
    blk.pread(0, 512)
    blk.pread(0, 512)
    (timed,) = blk.stats.query()["timed_stats"]
    assert timed["interval_length"] == 60
    assert 0 < timed["min_rd_latency_ns"] <= timed["avg_rd_latency_ns"] <= timed["max_rd_latency_ns"]
    assert timed["max_wr_latency_ns"] == 0


def test_duplicate_device_id(blk):
    with pytest.raises(BlockError, match="Duplicate ID 'dev0' for drive"):
        BlockBackend(blk.graph, "dev0")
