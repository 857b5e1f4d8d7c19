"""I/O throttling with leaky buckets and shared groups (QEMU's util/throttle.c).

Theory of operation: each limit (bps/iops, total/read/write) is a leaky bucket whose
level rises by the request's bytes (or operations) and drains at ``avg`` per second.
A request waits while a bucket it touches is over its allowance: ``avg/10`` without a
burst limit, or ``max * burst_length`` with one (plus a short-term burst bucket that
keeps the rate at ``max``).  Devices in one throttle group share one set of buckets,
so the group as a whole stays under the limits.
"""
from __future__ import annotations

import threading
import time

from .._record import factory, record
from ..errors import InvalidArgument

NANOSECONDS_PER_SECOND = 1_000_000_000
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
BURST_LENGTH_MAX = 86400 * 365   # QEMU caps burst length so max * length cannot overflow

# (bucket key, QMP argument prefix, counts bytes?, applies to reads?, applies to writes?)
BUCKETS = (
    ("bps_total", "bps", True, True, True),
    ("bps_read", "bps_rd", True, True, False),
    ("bps_write", "bps_wr", True, False, True),
    ("ops_total", "iops", False, True, True),
    ("ops_read", "iops_rd", False, True, False),
    ("ops_write", "iops_wr", False, False, True),
)


@record
class LeakyBucket:
    avg: float = 0.0
    max: float = 0.0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        """throttle_leak_bucket()."""
        self.level = max(self.level - self.avg * delta_ns / NANOSECONDS_PER_SECOND, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(
                self.burst_level - self.max * delta_ns / NANOSECONDS_PER_SECOND, 0.0)

    def wait_ns(self) -> int:
        """throttle_compute_wait(): how long until one more request may start."""
        if not self.avg:
            return 0
        if not self.max:
            bucket_size, burst_bucket_size = self.avg / 10, 0.0
        else:
            bucket_size = self.max * self.burst_length
            burst_bucket_size = self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return int(extra * NANOSECONDS_PER_SECOND / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_bucket_size
            if extra > 0:
                return int(extra * NANOSECONDS_PER_SECOND / self.max)
        return 0


@record
class ThrottleConfig:
    """Limits as block_set_io_throttle takes them (0 = unlimited)."""
    buckets: dict = factory(lambda: {key: LeakyBucket() for key, *_ in BUCKETS})
    op_size: int = 0

    @classmethod
    def from_qmp(cls, args: dict) -> "ThrottleConfig":
        cfg = cls()
        for key, prefix, *_ in BUCKETS:
            b = cfg.buckets[key]
            b.avg = args.get(prefix, 0) or 0
            b.max = args.get(prefix + "_max", 0) or 0
            b.burst_length = args.get(prefix + "_max_length", 1) or 1
        cfg.op_size = args.get("iops_size", 0) or 0
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """throttle_is_valid(), with QEMU's messages."""
        b = self.buckets
        for total, rd, wr in (("bps_total", "bps_read", "bps_write"),
                              ("ops_total", "ops_read", "ops_write")):
            if (b[total].avg and (b[rd].avg or b[wr].avg)) or \
                    (b[total].max and (b[rd].max or b[wr].max)):
                raise InvalidArgument("bps/iops/max total values and read/write values "
                                      "cannot be used at the same time")
        for key, prefix, *_ in BUCKETS:
            bkt = b[key]
            if bkt.avg < 0 or bkt.max < 0 or bkt.avg > THROTTLE_VALUE_MAX \
                    or bkt.max > THROTTLE_VALUE_MAX:
                raise InvalidArgument("bps/iops/max values must be within [0, %d]"
                                      % THROTTLE_VALUE_MAX)
            if not 1 <= bkt.burst_length <= BURST_LENGTH_MAX:
                raise InvalidArgument("the burst length cannot be 0")
            if bkt.burst_length > 1 and not bkt.max:
                raise InvalidArgument("burst length set without burst rate")
            if bkt.max and not bkt.avg:
                raise InvalidArgument("bps_max/iops_max require corresponding bps/iops values")
            if bkt.max and bkt.max < bkt.avg:
                raise InvalidArgument("bps_max/iops_max cannot be lower than bps/iops values")

    def enabled(self) -> bool:
        return any(b.avg for b in self.buckets.values())

    def to_qmp(self) -> dict:
        """The throttle fields of BlockDeviceInfo."""
        out = {}
        for key, prefix, *_ in BUCKETS:
            b = self.buckets[key]
            out[prefix] = int(b.avg)
            out[prefix + "_max"] = int(b.max)
            out[prefix + "_max_length"] = int(b.burst_length)
        out["iops_size"] = self.op_size
        return out


class ThrottleGroup:
    """Buckets shared by every device in the group (block/throttle-groups.c)."""

    def __init__(self, name: str, config: ThrottleConfig, clock=time.monotonic_ns):
        self.name = name
        self.config = config
        self.clock = clock
        self.members: set = set()
        self.lock = threading.Lock()
        self.last_leak_ns = clock()

    def set_config(self, config: ThrottleConfig) -> None:
        with self.lock:
            self.config = config
            self.last_leak_ns = self.clock()

    def _leak(self, now: int) -> None:
        delta = max(0, now - self.last_leak_ns)
        for b in self.config.buckets.values():
            b.leak(delta)
        self.last_leak_ns = now

    def wait_ns(self, is_write: bool) -> int:
        """Time the next request of this direction must wait (0: go now)."""
        with self.lock:
            self._leak(self.clock())
            return max((self.config.buckets[key].wait_ns()
                        for key, _, _, rd, wr in BUCKETS if (wr if is_write else rd)),
                       default=0)

    def account(self, is_write: bool, size: int) -> None:
        """throttle_account(): charge a request that is about to start."""
        with self.lock:
            cfg = self.config
            units = size / cfg.op_size if cfg.op_size and size > cfg.op_size else 1.0
            for key, _, is_bytes, rd, wr in BUCKETS:
                if not (wr if is_write else rd):
                    continue
                b = cfg.buckets[key]
                amount = size if is_bytes else units
                b.level += amount
                if b.burst_length > 1:
                    b.burst_level += amount

    def throttle(self, is_write: bool, size: int, sleep=time.sleep) -> None:
        """Block the calling thread until the request may start, then charge it."""
        while True:
            wait = self.wait_ns(is_write)
            if wait <= 0:
                break
            sleep(wait / NANOSECONDS_PER_SECOND)
        self.account(is_write, size)


class ThrottleGroups:
    """The named groups of one graph; a group lives while it has members."""

    def __init__(self):
        self.groups: dict[str, ThrottleGroup] = {}

    def join(self, member, name: str, config: ThrottleConfig) -> ThrottleGroup:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = ThrottleGroup(name, config)
        else:
            group.set_config(config)
        group.members.add(member)
        return group

    def leave(self, member, group: ThrottleGroup) -> None:
        group.members.discard(member)
        if not group.members:
            self.groups.pop(group.name, None)
