"""query-blockstats' timed_stats: `serve --device ...,stats-intervals.N=SECONDS` (QEMU's
-drive stats-intervals.N), reported as QEMU 7.2 computes and formats them.

The model is QEMU's util/timed-average.c and block/accounting.c: two windows of 4/3 of
the interval offset by half of that, values read from the older window, queue depth =
latency sum / time elapsed in that window; intervals listed in the order given.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from qemu.qmp import QMPClient

from blockengine.cli.serve import Daemon
from blockengine.graph import backend
from blockengine.graph.backend import BlockAcctStats
from tests.qmp.test_blockdev_create import connect
from tests.qmp.test_server import ROOT, Serve, run

S = 1_000_000_000                       # ns per second
TIMED_KEYS = ["interval_length",
              "min_rd_latency_ns", "max_rd_latency_ns", "avg_rd_latency_ns",
              "min_wr_latency_ns", "max_wr_latency_ns", "avg_wr_latency_ns",
              "min_flush_latency_ns", "max_flush_latency_ns", "avg_flush_latency_ns",
              "avg_rd_queue_depth", "avg_wr_queue_depth"]


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(backend, "_now_ns", c)
    return c


def _timed(stats: BlockAcctStats) -> list[dict]:
    return stats.query()["timed_stats"]


def _read_done(stats, clock, at_s: float, latency_ns: int) -> None:
    """A read that completes at ``at_s`` seconds after taking ``latency_ns``."""
    clock.ns = int(at_s * S)
    stats.done("rd", 512, clock.ns - latency_ns)


def test_windows_follow_qemus_timed_average(clock):
    # interval 60 s: windows of 80 s, expiring first at 40 s and 80 s
    stats = BlockAcctStats()
    stats.add_interval(60)
    _read_done(stats, clock, 0, 100)
    _read_done(stats, clock, 10, 300)
    clock.ns = 20 * S
    (t,) = _timed(stats)
    assert (t["min_rd_latency_ns"], t["max_rd_latency_ns"], t["avg_rd_latency_ns"]) == (
        100, 300, 200)
    assert t["avg_rd_queue_depth"] == 400 / (60 * S)      # 20 s left of the 80 s window
    # at 45 s the first window restarted (until 120 s): values come from the second
    clock.ns = 45 * S
    (t,) = _timed(stats)
    assert (t["min_rd_latency_ns"], t["max_rd_latency_ns"]) == (100, 300)
    assert t["avg_rd_queue_depth"] == 400 / (45 * S)
    _read_done(stats, clock, 45, 50)
    clock.ns = 50 * S
    (t,) = _timed(stats)
    assert (t["min_rd_latency_ns"], t["max_rd_latency_ns"], t["avg_rd_latency_ns"]) == (
        50, 300, 150)
    # at 85 s the second window restarted: the first one only saw the 50 ns read
    clock.ns = 85 * S
    (t,) = _timed(stats)
    assert (t["min_rd_latency_ns"], t["max_rd_latency_ns"], t["avg_rd_latency_ns"]) == (
        50, 50, 50)
    assert t["avg_rd_queue_depth"] == 50 / (45 * S)
    # much later both windows are empty, on their period grid
    clock.ns = 1000 * S
    (t,) = _timed(stats)
    assert [t[k] for k in TIMED_KEYS] == [60] + [0] * 9 + [0.0, 0.0]


def test_every_interval_accounts_every_kind(clock):
    stats = BlockAcctStats()
    for seconds in (1, 60, 3600):
        stats.add_interval(seconds)
    clock.ns = 5000
    stats.done("wr", 4096, 1000)          # 4000 ns
    stats.done("flush", 0, 4000)          # 1000 ns
    stats.failed_op("rd", 3000)           # failed ops count too (account_failed)
    timed = _timed(stats)
    assert [t["interval_length"] for t in timed] == [1, 60, 3600]
    for t, seconds in zip(timed, (1, 60, 3600)):
        assert list(t) == TIMED_KEYS
        period = seconds * S * 4 // 3
        elapsed = period - (period // 2 - 5000)
        assert t == {"interval_length": seconds,
                     "min_rd_latency_ns": 2000, "max_rd_latency_ns": 2000,
                     "avg_rd_latency_ns": 2000,
                     "min_wr_latency_ns": 4000, "max_wr_latency_ns": 4000,
                     "avg_wr_latency_ns": 4000,
                     "min_flush_latency_ns": 1000, "max_flush_latency_ns": 1000,
                     "avg_flush_latency_ns": 1000,
                     "avg_rd_queue_depth": 2000 / elapsed,
                     "avg_wr_queue_depth": 4000 / elapsed}


def test_device_option_reports_real_io():
    daemon = Daemon("qemu-storage-daemon")
    daemon.option("blockdev", "driver=null-co,node-name=n0,size=1048576")
    daemon.option("device", "id=vda,drive=n0,stats-intervals.0=3600,stats-intervals.1=60")
    blk = daemon.graph.backends["vda"]
    for _ in range(3):
        blk.pread(0, 4096)
    blk.pwrite(0, b"x" * 4096)
    [entry] = daemon.engine.execute("query-blockstats")["return"]
    timed = entry["stats"]["timed_stats"]
    assert [t["interval_length"] for t in timed] == [3600, 60]
    for t in timed:
        assert 0 < t["min_rd_latency_ns"] <= t["avg_rd_latency_ns"] <= t["max_rd_latency_ns"]
        assert t["min_wr_latency_ns"] == t["max_wr_latency_ns"] > 0
        assert t["max_flush_latency_ns"] == 0
        assert t["avg_rd_queue_depth"] > 0 and t["avg_wr_queue_depth"] > 0
    # nodes have no timed stats in QEMU (only backends do)
    nodes = daemon.engine.execute("query-blockstats", {"query-nodes": True})["return"]
    assert nodes[0]["stats"]["timed_stats"] == []
    daemon.graph.close_all()


def test_serve_shows_timed_stats_on_the_wire(tmp_path):
    s = Serve(tmp_path, monitors=1, extra=(
        "--blockdev", "driver=null-co,node-name=n0,size=1048576",
        "--device", "id=vda,drive=n0,stats-intervals.0=60,stats-intervals.1=3600",
        "--device", "id=cd0,removable=on"))
    try:
        async def go():
            qmp = QMPClient("stats")
            await connect(qmp, s.socks[0])
            try:
                return await qmp.execute("query-blockstats")
            finally:
                await qmp.disconnect()
        stats = {e["device"]: e["stats"] for e in run(go())}
        zeros = dict.fromkeys(TIMED_KEYS[1:], 0)
        assert stats["vda"]["timed_stats"] == [{"interval_length": 60, **zeros},
                                               {"interval_length": 3600, **zeros}]
        assert stats["cd0"]["timed_stats"] == []
        # on the wire the doubles are QEMU's %.17g: a zero queue depth is "0"
        raw = s.raw()
        raw.line()                                          # greeting
        raw.send(b'{"execute":"qmp_capabilities"}{"execute":"query-blockstats"}')
        assert raw.line() == b'{"return": {}}'
        line = raw.line()
        assert line.count(b'"avg_rd_queue_depth": 0') == 2 and b"0.0" not in line
        assert json.loads(line)["return"][0]["stats"]["timed_stats"] == stats["vda"][
            "timed_stats"]
        raw.close()
    finally:
        s.stop()


@pytest.mark.parametrize("arg,message", [
    ("id=d,stats-intervals.0=0", "Invalid interval length: 0"),
    ("id=d,stats-intervals.0=60,stats-intervals.1=abc", "Invalid interval length: abc"),
    ("id=d,stats-intervals.0=4294967296", "Invalid interval length: 4294967296"),
    ("id=d,stats-intervals.0=-5", "Invalid interval length: -5"),
    ("id=d,stats-intervals.x=5", "Invalid option stats-intervals.x"),
    ("id=d,stats-intervals=5", "The specification of stats-intervals is invalid"),
    ("id=d,stats-intervals.1=5", "Parameter 'stats-intervals.0' missing"),
])
def test_bad_intervals_end_serve_like_the_daemon(arg, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "blockengine.cli.serve", "--device", arg],
                       env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (1, "qemu-storage-daemon: --device %s: %s\n"
                                        % (arg, message))
