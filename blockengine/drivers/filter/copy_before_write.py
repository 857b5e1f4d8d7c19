"""copy-before-write (block/copy-before-write.c): before a write reaches the filtered
node, the old data of every touched cluster not yet copied goes to the target.

Options (BlockdevOptionsCbw): ``file`` (the source), ``target``; ``bitmap`` (copy only
the clusters dirty in that bitmap of the source).  The hook is a before-write notifier
on the *source node*, so writes from any parent are caught; it runs under the source's
lock, which the backup job also holds while copying a cluster run.
"""
from __future__ import annotations

from ...errors import InvalidArgument
from ...graph.child import ChildRole
from ...graph.perms import Perm, default_child_perm
from ..base import DriverInfo, DriverKind
from .common import PassthroughFilter


class CopyBeforeWriteDriver(PassthroughFilter):
    info = DriverInfo("copy-before-write", DriverKind.FILTER)

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        return {"file": ChildRole.FILTERED | ChildRole.PRIMARY, "target": ChildRole.DATA}

    def open(self, options: dict) -> None:
        from ...jobs.block_copy import BlockCopy
        from ... import bitmaps
        self.source = self.node.file_child_node()
        tc = self.node.child("target")
        if self.source is None:
            raise InvalidArgument("Parameter 'file' is missing")
        if tc is None:
            raise InvalidArgument("Parameter 'target' is missing")
        self.target = tc.node
        if self.source.total_size != self.target.total_size:
            raise InvalidArgument("Source and target image have different sizes")
        cluster = options.get("x-cluster-size") or max(
            65536, bitmaps.default_granularity(self.target))
        self.bcs = BlockCopy(self.source, self.target, cluster)
        bm = options.get("bitmap")
        if bm is not None:
            node = self.node.graph.lookup_node(bm.get("node"), bm.get("node"))
            b = bitmaps.find_bitmap(node, bm["name"])
            if b is None:
                raise InvalidArgument("Dirty bitmap '%s' not found" % bm["name"])
            self.bcs.bitmap.clear()
            self.bcs.bitmap.merge_from(b)
        self.source.before_write_notifiers.append(self._before_write)

    def _before_write(self, node, offset: int, length: int) -> None:
        self.bcs.copy_range(offset, length)

    def close(self) -> None:
        if self._before_write in self.source.before_write_notifiers:
            self.source.before_write_notifiers.remove(self._before_write)

    def child_perm(self, child, perm, shared):
        """cbw_child_perm() of QEMU 7.2: the target is written and shares all but
        resize; the source is used as its parents use the filter, and once the filter
        has parents nobody else may write or resize it."""
        if child.name == "target":
            return Perm.WRITE, Perm.all() & ~Perm.RESIZE
        p, s = default_child_perm(self.node, child, perm, shared)
        if self.node.parents:
            if perm & Perm.WRITE:
                p |= Perm.CONSISTENT_READ
            s &= ~(Perm.WRITE | Perm.RESIZE)
        return p, s
