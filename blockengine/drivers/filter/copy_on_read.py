"""copy-on-read (block/copy-on-read.c): a filter whose reads copy the data they find in
the backing chain of its child up into the child.

Options (QEMU 7.2's BlockdevOptionsCor): ``file``, the filtered node, and ``bottom``:
only data allocated in the chain from the child's backing file down to ``bottom``
(inclusive) is copied; data below ``bottom`` is read but stays where it is.  Without
``bottom`` all of the backing chain is copied.  Writes, zero writes and discards pass
through unchanged.  block-stream inserts this filter above its top node and pulls the
data up by reading through it (stream.py).

The copy itself is the generic layer's copy-on-read (QEMU's bdrv_co_do_copy_on_readv):
``read_with_copy`` widens the request to whole clusters and, under the child's lock
(no write can slip in between the allocation check and the copy), writes every run
not allocated in the child with the data read through it.  The guest-visible data
does not change, so these writes skip write notifiers and dirty bitmaps, as QEMU's
BDRV_REQ_WRITE_UNCHANGED writes go straight to the driver.
"""
from __future__ import annotations

from ... import _native
from ...errors import InvalidArgument
from ...graph.perms import Perm
from ..base import DriverInfo, DriverKind
from .common import PassthroughFilter

# copy-on-read.c's PERM_PASSTHROUGH and PERM_UNCHANGED
_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
_UNCHANGED = Perm.all() & ~_PASSTHROUGH
MAX_BOUNCE = 16 << 20       # QEMU's MAX_BOUNCE_BUFFER


class CopyOnReadDriver(PassthroughFilter):
    info = DriverInfo("copy-on-read", DriverKind.FILTER)

    def open(self, options: dict) -> None:
        """cor_open()."""
        if self.node.file_child_node() is None:
            raise InvalidArgument("Parameter 'file' is missing")
        self.bottom = None
        name = options.get("bottom")
        if name is not None:
            bottom = self.node.graph.find_node(name)
            if bottom is None:
                raise InvalidArgument("Bottom node '%s' not found" % name)
            if bottom.is_filter:
                raise InvalidArgument("Bottom node '%s' is a filter" % name)
            self.bottom = bottom
        from ...jobs.block_copy import CopyBuffer
        self.bounce = CopyBuffer()      # one bounce buffer, used under the child's lock

    def child_perm(self, child, perm, shared):
        """cor_child_perm(): the copies need write-unchanged on the child."""
        return (perm & _PASSTHROUGH) | Perm.WRITE_UNCHANGED, (shared & _PASSTHROUGH) | _UNCHANGED

    def preadv(self, offset, buf):
        self._read(offset, len(buf), buf)

    def prefetch(self, offset: int, length: int) -> None:
        """A read for its side effect only (QEMU's BDRV_REQ_PREFETCH): block-stream."""
        self._read(offset, length, None)

    def _read(self, offset: int, length: int, buf) -> None:
        """cor_co_preadv_part(): copy on read what lies at or above ``bottom``."""
        child = self.child_node
        if self.bottom is None:
            read_with_copy(child, offset, length, buf, self.bounce)
            return
        below_bottom = self.bottom.backing
        cow = child.backing
        pos = 0
        while pos < length:
            n = length - pos
            copy = False
            if cow is not None:
                copy, n = cow.is_allocated_above(offset + pos, n, below_bottom)
                n = max(1, min(n, length - pos))
            if copy:
                read_with_copy(child, offset + pos, n,
                               None if buf is None else buf[pos:pos + n], self.bounce)
            elif buf is not None:
                child.preadv(offset + pos, buf[pos:pos + n])
            pos += n


def cluster_size(node) -> int:
    """bdrv_round_to_clusters()'s granularity: the format's cluster, else its alignment."""
    info = node.drv.get_info() or {}
    return info.get("cluster_size") or node.request_alignment


def read_with_copy(node, offset: int, length: int, buf, bounce) -> None:
    """bdrv_co_do_copy_on_readv(): read [offset, offset+length) of ``node`` into ``buf``
    (None: only copy, QEMU's BDRV_REQ_PREFETCH) and write the whole clusters around it
    that are not allocated in ``node`` itself with what they read as (zeroes as a zero
    write).  ``bounce`` is the CopyBuffer the copied data passes through."""
    cluster = cluster_size(node)
    size = node.total_size
    start = offset - offset % cluster
    end = min(-(-(offset + length) // cluster) * cluster, size)
    with node.lock:
        pos = start
        while pos < end:
            allocated, n = node.is_allocated_above(pos, min(end - pos, MAX_BOUNCE), node.backing)
            if n == 0:
                break
            n = min(n, end - pos, MAX_BOUNCE)
            # the part of [pos, pos+n) the caller asked for
            lo, hi = max(pos, offset), min(pos + n, offset + length)
            if allocated:
                if buf is not None and hi > lo:
                    node.preadv(lo, buf[lo - offset:hi - offset])
            else:
                data = bounce.read(node, pos, n)
                _write_unchanged(node, pos, data)
                if buf is not None and hi > lo:
                    buf[lo - offset:hi - offset] = data[lo - pos:hi - pos]
            pos += n


def copy_up(node, offset: int, data) -> None:
    """The copy half of a copy-on-read whose read was done before, from ``node``'s
    backing chain (which does not change meanwhile): write ``data`` -- what
    [offset, offset+len(data)) of ``node`` read as -- into the runs of that range still
    not allocated in ``node``, under its lock.  A run a guest wrote meanwhile keeps the
    guest's data."""
    end = offset + len(data)
    with node.lock:
        pos = offset
        while pos < end:
            allocated, n = node.is_allocated_above(pos, end - pos, node.backing)
            if n == 0:
                break
            n = min(n, end - pos)
            if not allocated:
                _write_unchanged(node, pos, data[pos - offset:pos - offset + n])
            pos += n


def _write_unchanged(node, offset: int, data) -> None:
    """The data does not change: straight to the driver (no notifiers, no dirty bits),
    as QEMU's BDRV_REQ_WRITE_UNCHANGED copy; zeroes as a zero write."""
    if _native.buffer_is_zero(data, 0, len(data)):
        node._zero_aligned_middle(offset, len(data), False)
    else:
        node._aligned_write(offset, data, False)
