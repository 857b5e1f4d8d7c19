"""Helpers for the block-job filter drivers: a pass-through filter driver and the
creation/removal of implicit filter nodes above a node."""
from __future__ import annotations

from ...errors import InvalidArgument
from ...graph.child import ChildRole
from ...graph.node import BlockNode, validate_node_name
from ...graph.perms import Perm, filter_perms
from ..base import BLOCK_OFFSET_VALID, BLOCK_RAW, BlockDriver, DriverInfo, DriverKind, Status


class PassthroughFilter(BlockDriver):
    """A filter over its 'file' child: every request goes to the child unchanged."""

    info = DriverInfo("passthrough", DriverKind.FILTER)
    redirect = None     # where requests go once the filter left the graph

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        return {"file": ChildRole.FILTERED | ChildRole.PRIMARY}

    @property
    def child_node(self):
        if self.redirect is not None:
            return self.redirect
        return self.node.file_child_node()

    def get_length(self) -> int:
        return self.child_node.total_size

    def request_alignment(self) -> int:
        return self.child_node.request_alignment

    def preadv(self, offset, buf):
        self.child_node.preadv(offset, buf)

    def pwritev(self, offset, data, fua=False):
        self.child_node.pwrite(offset, data, fua)

    def pwrite_zeroes(self, offset, length, may_unmap):
        self.child_node.pwrite_zeroes(offset, length, may_unmap)

    def discard(self, offset, length):
        self.child_node.discard(offset, length)

    def truncate(self, size, exact, prealloc):
        self.child_node.truncate(size, exact=exact, prealloc=prealloc)

    def block_status(self, offset, length, want_zero):
        return Status(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset, self.child_node)

    def get_info(self):
        return None

    def refresh_filename(self):
        return self.child_node.filename() if self.child_node is not None else None


class JobFilter(PassthroughFilter):
    """mirror_top / commit_top: reads the child consistently, shares everything.

    ``redirect`` (set when the job ends) is the node requests go to once the filter
    left the graph: a request that entered the filter just before keeps working."""

    stopped = False

    def child_perm(self, child, perm, shared):
        if self.stopped:
            return Perm(0), Perm.all()
        p, s = filter_perms(perm, shared)
        return p | Perm.CONSISTENT_READ, Perm.all()


def open_implicit_filter(graph, driver_cls, node_name: str | None, child_node,
                         extra: dict | None = None) -> BlockNode:
    """Create a filter node over ``child_node`` (not yet inserted in the graph)."""
    with graph.lock:
        if node_name is not None:
            validate_node_name(node_name)
            if node_name in graph.nodes:
                raise InvalidArgument("Duplicate nodes with node-name='%s'" % node_name)
            if node_name in graph.backends:
                raise InvalidArgument("node-name=%s is conflicting with a device id"
                                      % node_name)
        node = BlockNode(graph, driver_cls, node_name, {"driver": driver_cls.info.name},
                         child_node.read_only)
        node.monitor_owned = False
        node.implicit = node_name is None
        graph.nodes[node.node_name] = node
        try:
            graph.attach_child(node, child_node, "file", ChildRole.FILTERED | ChildRole.PRIMARY)
            node.drv.open(dict(extra or {}))
        except BaseException:
            graph.nodes.pop(node.node_name, None)
            for c in list(node.children):
                node.children.remove(c)
                c.node.parents.remove(c)
                graph.refresh_perms([c.node])
            raise
        return node


def insert_above(graph, filter_node, node) -> None:
    graph.insert_filter(filter_node, node)


def drop_filter(graph, filter_node) -> None:
    """bdrv_drop_filter(): parents of the filter use its child again; close the filter."""
    with graph.lock:
        child = filter_node.file_child_node()
        if filter_node.drv.redirect is None:
            filter_node.drv.redirect = child
        if filter_node.parents and child is not None:
            graph.replace_node(filter_node, child)
        graph.nodes.pop(filter_node.node_name, None)
        for c in list(filter_node.children):
            graph.detach_child(c)
        filter_node.drv.close()
