"""compress (block/filter-compress.c): a filter whose writes its child stores compressed.

Options (BlockdevOptionsGenericFormat): ``file``, a node whose driver can write
compressed clusters (qcow2, vmdk).  Every data write becomes a compressed write of the
child (BDRV_REQ_WRITE_COMPRESSED); reads, zero writes and discards pass through.  The
request alignment is the child's cluster size, so the generic layer pads a partial
write to whole clusters with what they read as (read-modify-write); for this a
writable filter needs an image size that is a multiple of the cluster size (or the
resize permission).  As in QEMU, a compressed write cannot overwrite an allocated
cluster: the child fails it with EIO.
"""
from __future__ import annotations

import errno

from ...errors import BlockError, InvalidArgument, NotSupported
from ...graph.perms import Perm
from ..base import DriverInfo, DriverKind
from .common import PassthroughFilter


class CompressDriver(PassthroughFilter):
    info = DriverInfo("compress", DriverKind.FILTER)

    def open(self, options: dict) -> None:
        """compress_open()."""
        child = self.node.file_child_node()
        if child is None:
            raise InvalidArgument("Parameter 'file' is missing")
        if not hasattr(child.drv, "pwritev_compressed"):
            raise NotSupported("Compression is not supported for underlying format: %s"
                               % child.driver_name)

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """bdrv_node_refresh_perm()'s rule, which only this alignment can break: a
        padded write must not reach past the end of a node that may not grow."""
        if (perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) and not perm & Perm.RESIZE
                and self.node.total_size % self.request_alignment()):
            raise BlockError("Cannot get 'write' permission without 'resize': Image size "
                             "is not a multiple of request alignment", errno=errno.EPERM)

    def request_alignment(self) -> int:
        """compress_refresh_limits(): the child's cluster size, when it has one."""
        info = self.child_node.drv.get_info() or {}
        return info.get("cluster_size") or self.child_node.request_alignment

    def preadv(self, offset, buf):
        """Reads pass through; the padding of a last partial cluster reads as zeroes
        (QEMU's reads past the end of a node)."""
        child = self.child_node
        n = max(0, min(len(buf), child.total_size - offset))
        if n:
            child.preadv(offset, buf[:n])
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def pwritev(self, offset, data, fua=False):
        """compress_co_pwritev_part().  The padded request may reach past a last
        partial cluster: the child takes the part inside the image (its compressed
        write pads that cluster with zeroes again)."""
        data = memoryview(data).cast("B")
        child = self.child_node
        n = min(len(data), child.total_size - offset)
        child.pwrite_compressed(offset, data[:n])
        if fua:
            child.flush()
