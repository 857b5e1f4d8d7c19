"""Helpers for the block job tests: a QMP-like context over one graph, an event
recorder, raw images, and a guest device whose writes run in another thread."""
from __future__ import annotations

import threading
import time

from blockengine.errors import BlockError
from blockengine.graph.backend import ALL_SHARED, BlockBackend
from blockengine.graph.perms import Perm
from blockengine.qmp.commands import bitmaps as bitmap_cmds
from blockengine.qmp.commands import block_nodes, jobs as job_cmds, queries
from blockengine.qmp.context import QMPContext

COMMANDS = {**block_nodes.COMMANDS, **queries.COMMANDS, **job_cmds.COMMANDS,
            **bitmap_cmds.COMMANDS}


class Events:
    def __init__(self):
        self.list: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def emit(self, name: str, data: dict) -> None:
        with self.cond:
            self.list.append((name, dict(data)))
            self.cond.notify_all()

    def wait(self, name: str, timeout: float = 30, count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [d for n, d in self.list if n == name]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%s not seen; events: %s" % (name, self.list))
                self.cond.wait(left)

    def names(self) -> list:
        return [n for n, _ in self.list]

    def clear(self) -> None:
        with self.cond:
            self.list.clear()


class Ctx:
    """What a QMP monitor would do: dispatch by name, errors as BlockError."""

    def __init__(self):
        self.events = Events()
        self.qmp_ctx = QMPContext(self.events)
        self.graph = self.qmp_ctx.graph

    def cmd(self, _name: str, **args):
        return COMMANDS[_name](self.qmp_ctx, args)

    def error(self, _name: str, **args) -> str:
        try:
            COMMANDS[_name](self.qmp_ctx, args)
        except BlockError as e:
            return str(e)
        raise AssertionError("%s did not fail" % _name)

    def add_raw(self, name: str, path: str, **extra):
        self.cmd("blockdev-add", driver="file", filename=path, **{"node-name": name + "f"})
        self.cmd("blockdev-add", driver="raw", file=name + "f", **{"node-name": name},
                 **extra)
        return self.graph.find_node(name)

    def device(self, name: str, node_name: str) -> BlockBackend:
        """A guest device (named backend) on a node, writing and sharing everything."""
        blk = BlockBackend(self.graph, name,
                           perm=Perm.CONSISTENT_READ | Perm.WRITE, shared=ALL_SHARED)
        blk.insert(self.graph.find_node(node_name))
        return blk

    def close(self) -> None:
        from blockengine.jobs.job import cancel_all_sync
        cancel_all_sync(self.graph, 10)
        for node in list(self.graph.nodes.values()):
            if node.driver_name == "blkdebug":      # let the final flushes through
                node.drv.rules.clear()
                node.drv.active.clear()
        self.graph.close_all()


def make_raw(path, size: int, pattern: bytes | None = None) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern:
            f.seek(0)
            f.write(pattern)
    return str(path)


def random_data(seed: int, n: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


class Writer(threading.Thread):
    """Guest I/O from another thread: random writes (recorded in ``log``) until stopped,
    each write applied to ``model`` (a bytearray) in the order the device saw it."""

    def __init__(self, blk, model: bytearray, *, seed: int = 1, block: int = 4096,
                 max_writes: int = 10_000, pause: float = 0.0, zero_every: int = 0):
        super().__init__(daemon=True)
        import random
        self.blk, self.model, self.rng = blk, model, random.Random(seed)
        self.block, self.max_writes, self.pause = block, max_writes, pause
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.count = 0
        self.error: BaseException | None = None
        self.zero_every = zero_every

    def run(self):
        size = len(self.model)
        try:
            while not self.stop_flag.is_set() and self.count < self.max_writes:
                n = self.rng.choice((512, self.block, 3 * self.block, 65536 + 512))
                off = self.rng.randrange(0, size - n) & ~511
                with self.lock:
                    if self.zero_every and self.count % self.zero_every == 0:
                        self.blk.pwrite_zeroes(off, n)
                        self.model[off:off + n] = bytes(n)
                    else:
                        data = bytes([self.count & 0xFF | 1]) * n
                        self.blk.pwrite(off, data)
                        self.model[off:off + n] = data
                    self.count += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:     # noqa: BLE001
            self.error = e

    def wait_writes(self, n: int, timeout: float = 20) -> None:
        """Wait until the writer has done at least n more writes."""
        target = self.count + n
        deadline = time.monotonic() + timeout
        while self.count < target and time.monotonic() < deadline and self.error is None:
            time.sleep(0.001)
        assert self.count >= target, "writer stalled"

    def snapshot(self) -> bytes:
        """The guest-visible data now (no write in flight)."""
        with self.lock:
            return bytes(self.model)

    def stop(self):
        self.stop_flag.set()
        self.join(30)
        if self.error:
            raise self.error
