"""commit (block/commit.c): merge the images between ``top`` and ``base`` into base.

*Intermediate* commit (top is not the active layer): a ``commit_top`` filter goes
above top, base is reopened read-write, and every range allocated above base up to top
is read (through top's chain) and written into base.  On success top's overlay gets
base as its backing file and the committed images leave the graph; base goes back to
read-only if it was.  The guest keeps writing to the active layer meanwhile, which
does not change anything the job reads.

*Active* commit (top is the active layer) is a mirror of top into base (job type
"commit"): READY once base holds everything, block-job-complete pivots the device
onto base.  See ``mirror.MirrorJob``.
"""
from __future__ import annotations

from ..drivers.filter.commit_top import CommitTopDriver
from ..drivers.filter.common import drop_filter, open_implicit_filter
from ..errors import BlockError
from ..graph.perms import Perm
from .block_copy import CopyBuffer, copy_pieces
from .job import Job
from .mirror import JobBackend, MirrorJob
from .stream import change_backing

PIECE = 4 << 20      # bigger than QEMU's 512 KiB: fewer, larger qcow2 allocations


def overlay_of(node):
    """The node whose backing edge points at ``node`` (bdrv_find_overlay), if any."""
    for c in node.parents:
        if c.name == "backing" and hasattr(c.parent, "children"):
            return c.parent
    return None


class CommitJob(Job):
    job_type = "commit"

    def __init__(self, graph, job_id, top, base, *, backing_file: str | None = None,
                 on_error: str = "report", speed: int = 0, auto_finalize: bool = True,
                 auto_dismiss: bool = True, filter_node_name: str | None = None):
        self.top, self.base = top, base
        self.backing_file = backing_file
        self.on_error_policy = on_error
        self.overlay = overlay_of(top)
        chain = top.backing_chain()
        self.intermediates = chain[1:chain.index(base)]
        self.base_read_only = base.read_only
        self.commit_top = None
        super().__init__(graph, job_id, top, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss, on_error=on_error)
        try:
            with graph.lock:
                if self.base_read_only:
                    graph.reopen(base, read_only=False)
                self.commit_top = open_implicit_filter(graph, CommitTopDriver,
                                                       filter_node_name, top)
                graph.insert_filter(self.commit_top, top)
                blk = JobBackend(graph, self, Perm(0), Perm.all())
                blk.insert(self.commit_top)
                self.add_backend(blk)
                perm = Perm.WRITE | (Perm.RESIZE if base.total_size < top.total_size
                                     else Perm(0))
                self.base_blk = JobBackend(graph, self, perm | Perm.CONSISTENT_READ,
                                           Perm.CONSISTENT_READ | Perm.GRAPH_MOD
                                           | Perm.WRITE_UNCHANGED)
                self.base_blk.insert(base)
                self.add_backend(self.base_blk)
                for n in [self.commit_top, top] + self.intermediates + [base]:
                    self.block_node(n)
        except BaseException:
            self._teardown()
            self._release()
            if self.base_read_only and not base.read_only:
                graph.reopen(base, read_only=True)
            self.early_fail()
            raise

    def run(self) -> None:
        top, base = self.top, self.base
        size = top.total_size
        if base.total_size < size:
            base.truncate(size)
        self.progress_set_remaining(size)
        buffer = CopyBuffer(PIECE)
        self.done_upto = 0
        while self.done_upto < size:
            try:
                copy_pieces(top, self._pieces(self.done_upto, size), self._write_piece,
                            buffer)
            except BlockError as e:
                # commit_run(): anything but report retries the chunk
                self.handle_io_error(self.on_error_policy, getattr(e, "is_read", False), e)

    def _pieces(self, pos: int, size: int):
        """The copy plan: (offset, length, allocated above base -- to copy).  Each question covers the rest of the image and its
        answer is cut into pieces: the images from top down to base are not written
        while the job runs (the guest writes above top), so it stays true."""
        run_end, allocated = pos, False
        while pos < size:
            self.pause_point()
            if pos >= run_end:
                allocated, n = self.top.is_allocated_above(pos, size - pos, self.base)
                run_end = pos + max(1, n)
            n = min(PIECE, run_end - pos)
            yield pos, n, allocated
            pos += n

    def _write_piece(self, offset: int, length: int, data) -> None:
        if data is not None:
            self.base.pwrite(offset, data)
        self.done_upto = offset + length
        self.progress(length)
        if data is not None:
            self.ratelimit(length)

    def prepare(self) -> None:
        self.base.flush()
        self._teardown()
        for blk in self._backends:
            blk.remove()
        if self.overlay is not None:
            change_backing(self.graph, self.overlay, self.base, self.backing_file)

    def _teardown(self) -> None:
        ct, self.commit_top = self.commit_top, None
        if ct is not None:
            ct.drv.stopped = True
            drop_filter(self.graph, ct)

    def abort(self) -> None:
        self._teardown()

    def clean(self) -> None:
        self._teardown()
        for blk in self._backends:
            blk.remove()
        if self.base_read_only and not self.base.read_only and self.base.parents:
            still_written = any(c.perm & Perm.WRITE for c in self.base.parents)
            if not still_written:
                try:
                    self.graph.reopen(self.base, read_only=True)
                except BlockError:
                    pass


class ActiveCommitJob(MirrorJob):
    """block-commit of the active layer: a mirror into base, job type 'commit'."""

    def __init__(self, graph, job_id, top, base, **kw):
        self.base_read_only = base.read_only
        if self.base_read_only:
            graph.reopen(base, read_only=False)
        try:
            super().__init__(graph, job_id, top, base, sync="top", base=base,
                             is_commit=True, **kw)
        except BaseException:
            if self.base_read_only:
                graph.reopen(base, read_only=True)
            raise
        self.committed = False

    def _after_pivot(self, replaced) -> None:
        self.committed = True

    def abort(self) -> None:
        super().abort()
        if self.base_read_only and not self.committed:
            try:
                self.graph.reopen(self.base_ro_node(), read_only=True)
            except BlockError:
                pass

    def base_ro_node(self):
        return self.target
