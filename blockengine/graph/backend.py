"""Block backends (QEMU's BlockBackend): named attachment points above a root node.

A backend is what a guest device or a tool uses: it holds a permission edge on its
root node, accounts every request for query-blockstats, and applies the device-level
policies (read-only device, discard policy).
"""
from __future__ import annotations

import errno
import threading
import time

from ..errors import BlockError, DeviceNotActive, InvalidArgument
from .child import ChildRole
from .perms import Perm

ALL_SHARED = Perm.all()
# qemu-img / qemu-io open images exclusively unless -U (BDRV_O_NO_SHARE)
NO_SHARE = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


# QEMU_CLOCK_REALTIME for latency accounting (a module global: tests replace it)
_now_ns = time.monotonic_ns


class TimedAverage:
    """QEMU's TimedAverage (util/timed-average.c): min/max/avg/sum over about
    ``period_s`` seconds.

    Two windows of 4/3 of the period, offset by half of that, both account every value;
    queries read the older one, so their values span between 2/3 and 4/3 of the period.
    ``clock_ns`` is the time source (QEMU_CLOCK_REALTIME: monotonic nanoseconds).
    """

    def __init__(self, period_s: int, clock_ns=None):
        self.clock_ns = clock_ns or _now_ns
        now = self.clock_ns()
        self.period_ns = period_s * 1_000_000_000 * 4 // 3
        self.current = 0
        self.windows = [self._window(now + self.period_ns // 2),
                        self._window(now + self.period_ns)]

    @staticmethod
    def _window(expires: int) -> dict:
        return {"min": None, "max": 0, "sum": 0, "count": 0, "expires": expires}

    def _check_expirations(self) -> int:
        """check_expirations(): reset expired windows; returns the time elapsed in the
        current (oldest) window."""
        now = self.clock_ns()
        for i, w in enumerate(self.windows):
            if w["expires"] <= now:
                # next expiration on the window's own period grid
                self.windows[i] = self._window(
                    now + self.period_ns - (now - w["expires"]) % self.period_ns)
        self.current = 0 if self.windows[0]["expires"] < self.windows[1]["expires"] else 1
        return self.period_ns - (self.windows[self.current]["expires"] - now)

    def account(self, value: int) -> None:
        self._check_expirations()
        for w in self.windows:
            w["min"] = value if w["min"] is None else min(w["min"], value)
            w["max"] = max(w["max"], value)
            w["sum"] += value
            w["count"] += 1

    def _current(self) -> dict:
        self._check_expirations()
        return self.windows[self.current]

    def min(self) -> int:
        w = self._current()
        return 0 if w["min"] is None else w["min"]

    def max(self) -> int:
        return self._current()["max"]

    def avg(self) -> int:
        w = self._current()
        return w["sum"] // w["count"] if w["count"] else 0

    def sum_and_elapsed(self) -> tuple[int, int]:
        """timed_average_sum(): the current window's sum and how long it has run."""
        elapsed = self._check_expirations()
        return self.windows[self.current]["sum"], elapsed


class BlockAcctStats:
    """Per-backend accounting (block/accounting.c)."""

    KINDS = ("rd", "wr", "flush", "unmap")

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = {"rd": 0, "wr": 0, "unmap": 0}
        self.ops = dict.fromkeys(self.KINDS, 0)
        self.failed = dict.fromkeys(self.KINDS, 0)
        self.invalid = dict.fromkeys(self.KINDS, 0)
        self.merged = {"rd": 0, "wr": 0, "unmap": 0}
        self.total_time_ns = dict.fromkeys(self.KINDS, 0)
        self.wr_highest_offset = 0
        self.last_access_ns: int | None = None
        self.account_invalid = True
        self.account_failed = True
        self.intervals: list[tuple[int, dict[str, TimedAverage]]] = []

    def add_interval(self, seconds: int) -> None:
        self.intervals.append((seconds, {k: TimedAverage(seconds) for k in self.KINDS}))

    def done(self, kind: str, nbytes: int, start_ns: int) -> None:
        now = _now_ns()
        with self.lock:
            if nbytes:                  # flushes move no bytes (and have no byte count)
                self.bytes[kind] += nbytes
            self.ops[kind] += 1
            self.total_time_ns[kind] += now - start_ns
            self.last_access_ns = now
            if self.intervals:
                for _, avgs in self.intervals:
                    avgs[kind].account(now - start_ns)

    def failed_op(self, kind: str, start_ns: int) -> None:
        now = _now_ns()
        with self.lock:
            self.failed[kind] += 1
            if self.account_failed:
                self.total_time_ns[kind] += now - start_ns
                self.last_access_ns = now
                for _, avgs in self.intervals:
                    avgs[kind].account(now - start_ns)

    def invalid_op(self, kind: str) -> None:
        with self.lock:
            self.invalid[kind] += 1
            if self.account_invalid:
                self.last_access_ns = _now_ns()

    def query(self) -> dict:
        """BlockDeviceStats."""
        with self.lock:
            out = {
                "rd_bytes": self.bytes["rd"], "wr_bytes": self.bytes["wr"],
                "rd_operations": self.ops["rd"], "wr_operations": self.ops["wr"],
                "flush_operations": self.ops["flush"],
                "flush_total_time_ns": self.total_time_ns["flush"],
                "wr_total_time_ns": self.total_time_ns["wr"],
                "rd_total_time_ns": self.total_time_ns["rd"],
                "wr_highest_offset": self.wr_highest_offset,
                "rd_merged": self.merged["rd"], "wr_merged": self.merged["wr"],
                "failed_rd_operations": self.failed["rd"],
                "failed_wr_operations": self.failed["wr"],
                "failed_flush_operations": self.failed["flush"],
                "invalid_rd_operations": self.invalid["rd"],
                "invalid_wr_operations": self.invalid["wr"],
                "invalid_flush_operations": self.invalid["flush"],
                "account_invalid": self.account_invalid,
                "account_failed": self.account_failed,
                "timed_stats": [self._timed(seconds, avgs) for seconds, avgs in self.intervals],
                # QEMU 7.2 also reports discards
                "unmap_operations": self.ops["unmap"], "unmap_bytes": self.bytes["unmap"],
                "unmap_merged": self.merged["unmap"],
                "unmap_total_time_ns": self.total_time_ns["unmap"],
                "failed_unmap_operations": self.failed["unmap"],
                "invalid_unmap_operations": self.invalid["unmap"],
            }
            if self.last_access_ns is not None:
                out["idle_time_ns"] = _now_ns() - self.last_access_ns
            return out

    @staticmethod
    def _timed(seconds: int, avgs: dict) -> dict:
        out = {"interval_length": seconds}
        for kind in ("rd", "wr", "flush"):
            a = avgs[kind]
            out[f"min_{kind}_latency_ns"] = a.min()
            out[f"max_{kind}_latency_ns"] = a.max()
            out[f"avg_{kind}_latency_ns"] = a.avg()
        for kind in ("rd", "wr"):
            # block_acct_queue_depth(): latency summed over the window's time so far
            total, elapsed = avgs[kind].sum_and_elapsed()
            out[f"avg_{kind}_queue_depth"] = total / elapsed
        return out


class BlockBackend:
    """A device: the named user of a root node.

    ``perm``/``shared`` are what the device takes and shares on its root; tools use
    exclusive sharing (NO_SHARE) like qemu-img, devices created over QMP share all.
    Without ``accounting`` completed requests leave ``stats`` untouched: in QEMU the
    device models account (block_acct_*), not blk_pread(), so a backend that no device
    or monitor sees (the library's Image) need not pay for it on every request.
    """

    def __init__(self, graph, name: str | None = None, *, perm: Perm = Perm.CONSISTENT_READ,
                 shared: Perm = ALL_SHARED, removable: bool = False,
                 dev_type: str = "unknown", accounting: bool = True):
        self.graph = graph
        self.name = name
        self.perm, self.shared = perm, shared
        self.root = None
        self.stats = BlockAcctStats()
        self.accounting = accounting
        self.removable = removable
        self.has_tray = removable
        self.dev_type = dev_type
        self.qdev_id = ""           # the guest device's id (QEMU's qdev id)
        self.attached = False       # a guest device uses this backend
        self.tray_open = False
        self.locked = False
        self.io_status = "ok"
        self.iostatus_enabled = False
        self.read_only_device = not (perm & Perm.WRITE)
        self.throttle_group = None
        if name is not None:
            if name in graph.backends:
                raise InvalidArgument("Duplicate ID '%s' for drive" % name)
            if name in graph.nodes:
                raise InvalidArgument("Device name '%s' conflicts with an existing node name"
                                      % name)
            graph.backends[name] = self

    # ---- graph ----------------------------------------------------------------------
    def parent_desc(self) -> str:
        return "block device '%s'" % self.name if self.name else "an unnamed block device"

    @property
    def root_node(self):
        return self.root.node if self.root is not None else None

    def insert(self, node) -> None:
        """Attach ``node`` as the root (blk_insert_bs)."""
        if self.root is not None:
            raise BlockError("Device already has a medium")
        self.root = self.graph.attach_child(self, node, "root", ChildRole.image(),
                                            self.perm, self.shared)

    def remove(self) -> None:
        """Detach the root node (blk_remove_bs)."""
        if self.root is not None:
            root, self.root = self.root, None
            self.graph.detach_child(root)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.root is not None:
            self.graph.set_child_perms(self.root, perm, shared)
        self.perm, self.shared = perm, shared

    def on_root_replaced(self) -> None:
        """Called after graph surgery; the edge object stays, its node may change."""

    def delete(self) -> None:
        if self.throttle_group is not None:
            self.graph.throttle_groups.leave(self, self.throttle_group)
            self.throttle_group = None
        self.remove()
        if self.name is not None:
            self.graph.backends.pop(self.name, None)

    def _node(self, kind: str, offset: int = 0, length: int = 0):
        """The root node, after blk_check_byte_request()'s checks (invalid ops counted)."""
        node = self.root_node
        if node is None:
            self.stats.invalid_op(kind)
            raise DeviceNotActive("Device '%s' has no medium" % (self.name or ""))
        if offset < 0 or length < 0 or offset + length > node.total_size:
            self.stats.invalid_op(kind)
            raise BlockError("Request of %d bytes at offset %d is outside the device"
                             % (length, offset), errno=errno.EIO)
        return node

    # ---- throttling ---------------------------------------------------------------------
    def set_io_throttle(self, config, group_name: str | None = None) -> None:
        """block_set_io_throttle: join (or leave, when config has no limit) a group."""
        groups = self.graph.throttle_groups
        if self.throttle_group is not None and (
                not config.enabled() or group_name != self.throttle_group.name):
            groups.leave(self, self.throttle_group)
            self.throttle_group = None
        if config.enabled():
            self.throttle_group = groups.join(self, group_name or self.name or "", config)

    def throttle_info(self) -> dict | None:
        """Throttle fields of BlockDeviceInfo (None when not throttled)."""
        if self.throttle_group is None:
            return None
        info = self.throttle_group.config.to_qmp()
        info["group"] = self.throttle_group.name
        return info

    def _throttle(self, is_write: bool, size: int) -> None:
        if self.throttle_group is not None:
            self.throttle_group.throttle(is_write, size)

    # ---- I/O with accounting ----------------------------------------------------------------
    def _run(self, kind: str, fn, *args, nbytes: int = 0):
        if not self.accounting:
            return fn(*args)
        start = _now_ns()
        try:
            result = fn(*args)
        except BlockError as e:
            self._account_error(kind, e, start)
            raise
        self.stats.done(kind, nbytes, start)
        return result

    def _account_error(self, kind: str, e: BlockError, start: int) -> None:
        if e.errno == 22:   # EINVAL: an invalid request, not a failed one
            self.stats.invalid_op(kind)
        else:
            self.stats.failed_op(kind, start)

    def pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.preadv(offset, buf, length)
        return buf

    def preadv(self, offset: int, buf, nbytes: int | None = None) -> None:
        """Read len(buf) bytes at offset into buf (``nbytes``: its size in bytes, when
        the caller knows it)."""
        # _node(), _throttle() and _run() inlined: the per-read path of the library
        n = memoryview(buf).nbytes if nbytes is None else nbytes
        node = self.root_node
        if node is None or offset < 0 or offset + n > node.total_size:
            node = self._node("rd", offset, n)
        if self.throttle_group is not None:
            self.throttle_group.throttle(False, n)
        if not self.accounting:
            node.preadv(offset, buf)
            return
        start = _now_ns()
        try:
            node.preadv(offset, buf)
        except BlockError as e:
            self._account_error("rd", e, start)
            raise
        self.stats.done("rd", n, start)

    def _check_write(self, offset: int, length: int):
        node = self._node("wr", offset, length)
        if not self.perm & Perm.WRITE:
            self.stats.invalid_op("wr")
            raise BlockError("Block node is read-only", errno=1)
        return node

    def _wrote(self, offset: int, length: int) -> None:
        if not self.accounting:
            return
        with self.stats.lock:
            self.stats.wr_highest_offset = max(self.stats.wr_highest_offset, offset + length)

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        n = memoryview(data).nbytes
        node = self._check_write(offset, n)
        self._throttle(True, n)
        self._run("wr", node.pwrite, offset, data, fua, nbytes=n)
        self._wrote(offset, n)

    def pwrite_compressed(self, offset: int, data) -> None:
        """blk_pwrite_compressed()."""
        n = memoryview(data).nbytes
        node = self._check_write(offset, n)
        self._throttle(True, n)
        self._run("wr", node.pwrite_compressed, offset, data, nbytes=n)
        self._wrote(offset, n)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        node = self._check_write(offset, length)
        self._throttle(True, length)
        self._run("wr", node.pwrite_zeroes, offset, length, may_unmap, nbytes=length)
        self._wrote(offset, length)

    def discard(self, offset: int, length: int) -> None:
        node = self._check_write(offset, length)
        self._run("unmap", node.discard, offset, length, nbytes=length)

    def flush(self) -> None:
        node = self._node("flush")
        self._run("flush", node.flush)

    def truncate(self, size: int, **kw) -> None:
        node = self._node("wr")
        if not self.perm & Perm.RESIZE:
            raise BlockError("Device does not allow resizing")
        node.truncate(size, **kw)

    def getlength(self) -> int:
        return self._node("rd").total_size
