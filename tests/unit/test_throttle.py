"""Leaky-bucket throttling (util/throttle.c) on a simulated clock."""
import pytest
from hypothesis import given, settings, strategies as st

from blockengine.errors import InvalidArgument
from blockengine.io.throttle import (NANOSECONDS_PER_SECOND, LeakyBucket, ThrottleConfig,
                                     ThrottleGroup)


class FakeClock:
    def __init__(self):
        self.now = 0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += int(seconds * NANOSECONDS_PER_SECOND) + 1


def args(**kw):
    base = dict.fromkeys(("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"), 0)
    base.update(kw)
    return base


def run_requests(group, clock, n, size, is_write=True):
    for _ in range(n):
        group.throttle(is_write, size, sleep=clock.sleep)
    return clock.now / NANOSECONDS_PER_SECOND


def test_bucket_wait_matches_qemu_formula():
    b = LeakyBucket(avg=1000)
    b.level = 1000 / 10 + 500          # 500 units over the allowance
    assert b.wait_ns() == NANOSECONDS_PER_SECOND // 2
    b = LeakyBucket(avg=100, max=1000, burst_length=2)
    b.level = 2000 + 50
    assert b.wait_ns() == NANOSECONDS_PER_SECOND // 2


@settings(max_examples=30, deadline=None)
@given(bps=st.integers(1 << 16, 1 << 24), size=st.sampled_from([512, 4096, 65536]))
def test_long_run_rate_converges_to_bps(bps, size):
    clock = FakeClock()
    group = ThrottleGroup("g", ThrottleConfig.from_qmp(args(bps=bps)), clock=clock)
    n = max(50, 20 * bps // size)        # ~20 seconds of traffic
    elapsed = run_requests(group, clock, n, size)
    rate = n * size / elapsed
    assert bps * 0.9 <= rate <= bps * 1.15


def test_iops_limit_and_op_size():
    clock = FakeClock()
    group = ThrottleGroup("g", ThrottleConfig.from_qmp(args(iops=100, iops_size=4096)),
                          clock=clock)
    elapsed = run_requests(group, clock, 500, 8192)    # each counts as 2 ops
    assert 9.0 <= elapsed <= 10.5


def test_burst_allows_max_rate_for_burst_length():
    clock = FakeClock()
    cfg = ThrottleConfig.from_qmp(args(iops=10, iops_max=100, iops_max_length=5))
    group = ThrottleGroup("g", cfg, clock=clock)
    # level grows at 100 - 10 ops/s until it reaches max * length = 500 ops (~5.5 s)
    elapsed = run_requests(group, clock, 500, 512)
    assert 4.5 <= elapsed <= 5.5                          # at the burst rate
    more = run_requests(group, clock, 200, 512) - elapsed
    assert 14 <= more <= 17                               # ~50 more at 100/s, rest at 10/s


def test_reads_unaffected_by_write_limit():
    clock = FakeClock()
    group = ThrottleGroup("g", ThrottleConfig.from_qmp(args(bps_wr=1000)), clock=clock)
    assert run_requests(group, clock, 1000, 65536, is_write=False) == 0


def test_group_members_share_buckets():
    clock = FakeClock()
    group = ThrottleGroup("g", ThrottleConfig.from_qmp(args(iops=100)), clock=clock)
    for _ in range(300):               # two devices alternating share 100 iops
        group.throttle(True, 512, sleep=clock.sleep)
        group.throttle(False, 512, sleep=clock.sleep)
    assert 5.5 <= clock.now / NANOSECONDS_PER_SECOND <= 6.5


@pytest.mark.parametrize("kw,message", [
    (dict(bps=1, bps_rd=1), "bps/iops/max total values and read/write values cannot be "
                            "used at the same time"),
    (dict(iops_max=10), "bps_max/iops_max require corresponding bps/iops values"),
    (dict(bps=-1), r"bps/iops/max values must be within \[0, 1000000000000000\]"),
])
def test_invalid_configs(kw, message):
    with pytest.raises(InvalidArgument, match=message):
        ThrottleConfig.from_qmp(args(**kw))


def test_backend_in_group_is_throttled_and_reported():
    import time
    from blockengine import BlockBackend, Graph
    from blockengine.graph.perms import Perm
    g = Graph()
    node = g.open_node({"driver": "null-co", "node-name": "n", "size": 1 << 30})
    a = BlockBackend(g, "a", perm=Perm.CONSISTENT_READ | Perm.WRITE)
    b = BlockBackend(g, "b", perm=Perm.CONSISTENT_READ | Perm.WRITE)
    a.insert(node)
    b.insert(node)
    cfg = ThrottleConfig.from_qmp(args(bps=1 << 20))
    a.set_io_throttle(cfg, "grp")
    b.set_io_throttle(ThrottleConfig.from_qmp(args(bps=1 << 20)), "grp")
    assert a.throttle_group is b.throttle_group
    assert a.throttle_info()["bps"] == 1 << 20 and a.throttle_info()["group"] == "grp"
    start = time.monotonic()
    for _ in range(4):                   # 512 KiB through each device at 1 MiB/s total
        a.pwrite(0, bytes(128 << 10))
        b.pread(0, 128 << 10)
    # 1 MiB minus the initial allowance (avg/10) and the last, unthrottled request
    assert time.monotonic() - start >= 0.6
    a.set_io_throttle(ThrottleConfig.from_qmp(args()), "grp")
    assert a.throttle_info() is None and "grp" in g.throttle_groups.groups
    b.delete()
    assert "grp" not in g.throttle_groups.groups
