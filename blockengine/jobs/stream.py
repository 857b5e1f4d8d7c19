"""stream (block/stream.c): pull the data of the backing chain between a node and
``base`` up into the node, then make ``base`` its backing file.

As QEMU 7.2 does, the job inserts a ``copy-on-read`` filter above the top node (named
by ``filter-node-name``, else implicit) with ``bottom`` the lowest intermediate image,
and walks the image: a range already allocated in the top node is skipped, a range
allocated in an intermediate image is read from the backing chain and copied up into
the top by the filter's copy half (``copy_on_read.copy_up``).  Each copy happens under the top node's lock after
re-checking the allocation, so a guest write to the same range either lands before
(the range is then allocated and skipped) or after (and overwrites the copied old
data): never lost.  Guest reads through the filter copy on read as well.
On success the top's backing edge moves to ``base`` (the image header records
``backing-file``/base's filename through ``drv.change_backing_file`` when the format
has it) and the intermediate images leave the graph.
"""
from __future__ import annotations

from ..drivers.filter.common import drop_filter
from ..drivers.filter.copy_on_read import copy_up
from ..errors import BlockError, prefixed
from ..graph.child import ChildRole
from ..graph.node import BlockNode
from ..graph.perms import Perm
from .block_copy import CopyBuffer, copy_pieces
from .job import Job
from .mirror import JobBackend

PIECE = 4 << 20      # bigger than QEMU's 512 KiB: fewer, larger qcow2 allocations


def change_backing(graph, node, new_backing, backing_file: str | None = None,
                   backing_fmt: str | None = None) -> None:
    """Point ``node``'s backing edge at ``new_backing`` (None: no backing) and record it
    in the image header when the driver can."""
    with graph.lock:
        old = node.child("backing")
        if new_backing is not None:
            graph.attach_child(node, new_backing, "backing", ChildRole.COW)
        if old is not None:
            graph.detach_child(old)
        change = getattr(node.drv, "change_backing_file", None)
        if change is not None:
            if new_backing is None:
                change(None, None)
            else:
                change(backing_file or new_backing.filename(),
                       backing_fmt or new_backing.driver_name)


class StreamJob(Job):
    job_type = "stream"

    def __init__(self, graph, job_id, top, base=None, *, backing_file: str | None = None,
                 on_error: str = "report", speed: int = 0, auto_finalize: bool = True,
                 auto_dismiss: bool = True, bottom=None, filter_node_name: str | None = None):
        self.top, self.base = top, base
        self.backing_file = backing_file
        self.on_error_policy = on_error
        chain = top.backing_chain()
        stop = chain.index(base) if base is not None and base in chain else len(chain)
        if bottom is not None:
            stop = chain.index(bottom) + 1
            self.base = chain[stop] if stop < len(chain) else None
        self.intermediates = chain[1:stop]
        # the lowest image whose data is pulled up (QEMU's base_overlay)
        base_overlay = self.intermediates[-1] if self.intermediates else top
        self.cor = self._insert_filter(graph, filter_node_name, base_overlay)
        try:
            super().__init__(graph, job_id, self.cor, speed=speed,
                             auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                             on_error=on_error)
        except BaseException:
            self._drop_filter()
            raise
        try:
            with graph.lock:
                blk = JobBackend(graph, self, Perm(0), Perm.all())
                blk.insert(self.cor)
                self.add_backend(blk)
                # "active node": no resize, no graph changes below us while we run
                blk = JobBackend(graph, self, Perm(0),
                                 Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE)
                blk.insert(top)
                self.add_backend(blk)
                self.block_node(self.cor)
                self.block_node(top)
                for n in self.intermediates:
                    self.block_node(n)
        except BaseException:
            self._drop_filter()
            self._release()
            self.early_fail()
            raise

    def _insert_filter(self, graph, node_name: str | None, bottom) -> BlockNode:
        """stream_start(): a copy-on-read filter above top (bdrv_insert_node)."""
        opts = {"driver": "copy-on-read", "file": self.top.node_name,
                "bottom": bottom.node_name}
        if node_name is not None:
            opts["node-name"] = node_name
        with graph.lock:
            try:
                cor = graph.open_node(opts)
            except BlockError as e:
                raise prefixed(e, "Could not create node: ") from e
            cor.monitor_owned = False
            cor.implicit = node_name is None
            try:
                graph.insert_filter(cor, self.top)
            except BlockError as e:
                graph.nodes.pop(cor.node_name, None)
                graph._close(cor)
                raise prefixed(e, "Could not replace node: ") from e
        return cor

    def _drop_filter(self) -> None:
        cor, self.cor = self.cor, None
        if cor is None:
            return
        for blk in getattr(self, "_backends", ()):      # none if the job was refused
            blk.remove()
        with self.graph.lock:
            drop_filter(self.graph, cor)
            if not cor.parents:
                self.graph._close(cor)      # and let go of top

    def run(self) -> None:
        if not self.intermediates:
            return                      # nothing to stream (QEMU: len stays 0)
        size = self.top.total_size
        self.progress_set_remaining(size)
        self.done_upto = 0
        self.piece_end = 0          # the end of the piece being copied
        first_error = None
        buffer = CopyBuffer(PIECE)
        while self.done_upto < size:
            try:
                # stream_populate(): the data read from the backing chain (which does not
                # change while the job runs), copied up under top's lock (copy_up)
                copy_pieces(self.top.backing, self._pieces(self.done_upto, size),
                            self._write_piece, buffer)
            except BlockError as e:
                # stream_run(): stop retries, ignore skips the piece but fails the job
                # at the end (the backing chain is then left alone), report fails now
                if self.handle_io_error(self.on_error_policy, getattr(e, "is_read", True), e):
                    continue
                first_error = first_error or e
                end = self.piece_end            # the failed piece, or the plan failed:
                if end <= self.done_upto:       # skip a chunk as QEMU's stream_run does
                    end = min(self.done_upto + PIECE, size)
                self.progress(end - self.done_upto)
                self.done_upto = end
        if first_error is not None:
            raise first_error

    def _pieces(self, pos: int, size: int):
        """The copy plan: (offset, length, to copy up -- allocated below top and above
        base, and not in top)."""
        top, backing = self.top, self.top.backing
        # the intermediate images are not written while the job runs: one question
        # about them covers the rest of the image (top is asked piece by piece, the
        # guest writes it)
        below_end, below_allocated = pos, False
        while pos < size:
            self.pause_point()
            allocated, n = top.is_allocated_above(pos, min(PIECE, size - pos), backing)
            n = max(1, n)
            copy = False
            if not allocated and backing is not None and backing is not self.base:
                if pos >= below_end:
                    below_allocated, m = backing.is_allocated_above(pos, size - pos,
                                                                    self.base)
                    below_end = pos + max(1, m)
                copy, n = below_allocated, min(n, below_end - pos)
            self.piece_end = pos + n
            yield pos, n, copy
            pos += n

    def _write_piece(self, offset: int, length: int, data) -> None:
        if data is not None:
            copy_up(self.top, offset, data)
        self.done_upto = offset + length
        self.progress(length)
        if data is not None:
            self.ratelimit(length)

    def prepare(self) -> None:
        if self.intermediates:
            change_backing(self.graph, self.top, self.base, self.backing_file)

    def clean(self) -> None:
        """stream_clean(): the filter goes, whatever the outcome."""
        self._drop_filter()
