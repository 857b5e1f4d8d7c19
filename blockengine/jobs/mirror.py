"""mirror (block/mirror.c): copy a node to a target while the guest keeps writing, then
pivot the guest onto the target.  Also the engine of the *active* block-commit.

Setup inserts a ``mirror_top`` filter above the source; a dirty bitmap on the source
records every guest write.  The job first marks what to copy (sync=full: everything;
top: what is allocated above the source's backing; none: nothing), then copies dirty
runs (clearing their bits *before* reading, so a write racing with the copy re-dirties
its chunk).  When nothing is dirty the job becomes READY and keeps copying new writes.

Copy modes (QEMU 7.2's MirrorCopyMode): ``background`` copies only from the dirty bitmap;
``write-blocking`` also mirrors every guest write through the filter to the target
before the write completes (``guest_write``, QEMU's do_sync_target_write), so the
target stops falling behind.  Such a write and the job's copy of an overlapping chunk
never interleave (``copy_lock``): the job cannot write stale data over a newer
synchronous copy after the write has cleared the chunk's dirty bits.  A mirrored write
leaves no mark in the dirty bitmap (QEMU 7.2 disables the bitmap in this mode) and
clears only the chunks it covered whole: a chunk it covers in part may have been
dirtied meanwhile (the initial full-sync marking, a failed copy), and the target holds
only this write's part of it.

block-job-complete (or a soft block-job-cancel once READY) ends the loop; ``prepare``
then takes the filter's lock -- no guest write can be in flight through it -- copies
what is still dirty and, for complete, pivots: the source (or ``replaces``) is replaced
by the target in the graph.  A write that had already entered the old filter is
forwarded to the new node (``redirect``), so nothing is lost.  A failed or force-
cancelled mirror only removes its filter: the target keeps whatever was copied.
"""
from __future__ import annotations

import contextlib
import threading

from .. import bitmaps
from ..bitmaps import BlockDirtyBitmap
from ..drivers.base import BLOCK_ALLOCATED, BLOCK_ZERO
from ..drivers.filter.common import drop_filter, open_implicit_filter
from ..drivers.filter.mirror_top import MirrorTopDriver
from ..errors import BlockError, InvalidArgument, JobError
from ..graph.backend import BlockBackend
from ..graph.perms import Perm
from .block_copy import CopyBuffer, DataExtentCache, copy_pieces
from .job import Job, device_name

DEFAULT_BUF_SIZE = 16 << 20
MAX_CHUNK = 4 << 20
COPY_MODES = ("background", "write-blocking")


class MirrorDirtyBitmap(BlockDirtyBitmap):
    """The job's dirty bitmap.  It records every write that reaches the source, except
    the one the current thread is mirroring synchronously (``unrecorded``): that write
    is on the target too.  Writes of other threads -- e.g. one already on its way to
    the source when the filter went in -- are recorded as usual."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mirroring = threading.local()

    @contextlib.contextmanager
    def unrecorded(self):
        self._mirroring.active = True
        try:
            yield
        finally:
            self._mirroring.active = False

    def set_range(self, offset: int, length: int) -> None:
        if not getattr(self._mirroring, "active", False):
            super().set_range(offset, length)


class JobBackend(BlockBackend):
    """A job's own BlockBackend: unnamed, so permission errors name it "an unnamed
    block device", as QEMU's do for a job's blk."""

    def __init__(self, graph, job, perm, shared):
        super().__init__(graph, perm=perm, shared=shared)
        self.job = job


class MirrorJob(Job):
    job_type = "mirror"

    def __init__(self, graph, job_id, source, target, *, sync: str = "full",
                 granularity: int | None = None, buf_size: int | None = None,
                 replaces=None, unmap: bool = True, on_source_error: str = "report",
                 on_target_error: str = "report", filter_node_name: str | None = None,
                 speed: int = 0, auto_finalize: bool = True, auto_dismiss: bool = True,
                 base=None, is_commit: bool = False, backing_mode: str = "open-backing",
                 copy_mode: str = "background"):
        if sync not in ("full", "top", "none"):
            raise InvalidArgument("Sync mode '%s' not supported" % sync)
        if copy_mode not in COPY_MODES:
            raise InvalidArgument("Parameter 'copy-mode' does not accept value '%s'"
                                  % copy_mode)
        if granularity is None:
            granularity = bitmaps.default_granularity(target)
        elif granularity & (granularity - 1):
            raise InvalidArgument("Parameter 'granularity' expects a power of 2")
        elif not 512 <= granularity <= 64 << 20:
            raise InvalidArgument("Parameter 'granularity' expects a value in range "
                                  "[512B, 64MB]")
        if buf_size is None:
            buf_size = DEFAULT_BUF_SIZE
        elif buf_size < 0:
            raise InvalidArgument("Invalid parameter 'buf-size'")
        if source is target:
            raise InvalidArgument("Can't mirror node into itself")
        if job_id is None:
            job_id = device_name(source)
        if is_commit:
            self.job_type = "commit"
        self.source, self.target = source, target
        self.sync, self.granularity = sync, granularity
        self.buf_size = max(buf_size, granularity)
        self.unmap = unmap
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.replaces = replaces
        self.base = base if base is not None else (source.backing if sync == "top" else None)
        self.is_commit = is_commit
        self.mirror_top = None
        self.dirty: BlockDirtyBitmap | None = None
        self.copy_mode = copy_mode
        self.copy_lock = threading.Lock()
        self.active_error: BaseException | None = None     # a failed synchronous write
        self.stop_error: BaseException | None = None       # ... whose policy says stop
        super().__init__(graph, job_id, source, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        try:
            self._setup(filter_node_name)
        except BaseException:
            self._teardown_filter()
            self._release()
            self.early_fail()
            raise

    def _setup(self, filter_node_name) -> None:
        graph, source, target = self.graph, self.source, self.target
        with graph.lock:
            self.mirror_top = open_implicit_filter(graph, MirrorTopDriver, filter_node_name,
                                                   source)
            self.mirror_top.drv.job = self
            graph.insert_filter(self.mirror_top, source)
            # on the source (QEMU puts it on the filter): it also sees a write that was
            # already on its way to the source when the filter went in
            self.dirty = MirrorDirtyBitmap(source, None, self.granularity,
                                           size=source.total_size)
            bitmaps.add_bitmap(source, self.dirty)
            # the job's main backend (block_job_create on mirror_top)
            blk = JobBackend(graph, self, Perm.CONSISTENT_READ,
                             Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE
                             | Perm.GRAPH_MOD)
            blk.insert(self.mirror_top)
            self.add_backend(blk)
            target_is_backing = target in source.backing_chain()[1:]
            perm = Perm.WRITE
            shared = Perm.WRITE_UNCHANGED
            if target_is_backing:
                shared |= Perm.CONSISTENT_READ | Perm.WRITE | Perm.GRAPH_MOD
            if target.total_size != source.total_size and self.is_commit:
                perm |= Perm.RESIZE
            self.target_blk = JobBackend(graph, self, perm, shared)
            self.target_blk.insert(target)
            self.add_backend(self.target_blk)
            self.block_node(self.mirror_top)
            self.block_node(source)
            self.block_node(target)
            if self.is_commit:
                for n in source.backing_chain()[1:]:
                    if n is target:
                        break
                    self.block_node(n)

    # ---- the copy loop ------------------------------------------------------------------
    def run(self) -> None:
        size = self.source.total_size
        if self.is_commit:
            # mirror_run(): a commit base only grows; a larger one keeps its tail
            if self.target.total_size < size:
                self.target.truncate(size)
        elif self.target.total_size != size:
            raise BlockError("Source and target image have different sizes")
        if size == 0:
            self.set_ready()
            self._wait_for_end()
            return
        self._dirty_init(size)
        self.extents = DataExtentCache(self.source)
        self.buffer = CopyBuffer(min(self.buf_size, MAX_CHUNK))
        self._copy_loop(size)

    def _copy_loop(self, size: int) -> None:
        """Copy what is dirty until READY, then what gets dirty, until the end."""
        cursor = 0
        while True:
            self._take_sync_write_error()
            self.pause_point()
            if self.active_error is not None:
                raise self.active_error
            cnt = min(self.dirty.count(), size)
            self.progress_set_remaining(cnt)
            if cnt:
                # as QEMU: copy, then sleep as the speed says, then look again
                cursor, copied = self._iteration(cursor, size)
                self.ratelimit(copied)
                continue
            if not self.ready:
                self.set_ready()
            if self.completing or self.soft_cancelled:
                return
            self.sleep(0.05)

    def _wait_for_end(self) -> None:
        while not (self.completing or self.soft_cancelled):
            self.pause_point()
            self.sleep(0.05)

    def _dirty_init(self, size: int) -> None:
        if self.sync == "none":
            return
        if self.sync == "full" and self.base is None:
            self.dirty.set_all()
            return
        pos = 0
        while pos < size:
            self.pause_point()
            # is_allocated_above() answers, a batch at a time (a huge sparse source has
            # one per L2 slice)
            for st in self.source.block_status_above_runs(pos, min(size - pos, 1 << 30),
                                                          self.base, want_zero=False):
                n = max(st.length, 1)
                if st.flags & BLOCK_ALLOCATED:
                    self.dirty.set_dirty(pos, n)
                pos += n

    def _iteration(self, cursor: int, size: int) -> tuple[int, int]:
        """Copy one dirty run (at most buf-size); returns (next cursor, bytes)."""
        area = self.dirty.next_dirty_area(cursor, size, min(self.buf_size, MAX_CHUNK))
        if area is None:
            area = self.dirty.next_dirty_area(0, size, min(self.buf_size, MAX_CHUNK))
            if area is None:
                return 0, 0
        off, n = area
        off -= off % self.granularity
        end = min(size, area[0] + n)
        if end % self.granularity and end < size:
            end += self.granularity - end % self.granularity
        n = min(end, size) - off
        self.dirty.reset_dirty(off, n)
        try:
            done = self._copy(off, n)
        except BaseException:
            self.dirty.set_dirty(off, n)
            raise
        self.progress(done)
        return off + n, done

    def _copy(self, offset: int, length: int) -> int:
        """Copy a range; returns the bytes copied (an ignored error re-dirties the rest
        of the range, which a later iteration copies again)."""
        end = offset + length
        self.copied_upto = offset
        while self.copied_upto < end:
            try:
                # no synchronous guest write between a piece's read and its write
                with self.copy_lock:
                    copy_pieces(self.source, self._pieces(self.copied_upto, end),
                                self._write_piece, self.buffer)
            except BlockError as e:
                is_read = getattr(e, "is_read", True)      # block status: a read
                policy = self.on_source_error if is_read else self.on_target_error
                if self.handle_io_error(policy, is_read, e):
                    continue                # stopped and resumed: retry
                self.dirty.set_dirty(self.copied_upto, end - self.copied_upto)
                return self.copied_upto - offset        # ignored: copy again later
        return length

    def _pieces(self, pos: int, end: int):
        """The copy plan of [pos, end): (offset, length, data -- else zeroes)."""
        while pos < end:
            flags, n = self.extents.status(pos, end - pos)
            n = max(1, n)
            yield pos, n, not flags & BLOCK_ZERO
            pos += n

    def _write_piece(self, offset: int, length: int, data) -> None:
        if data is None:
            self.target.pwrite_zeroes(offset, length, may_unmap=self.unmap)
        else:
            self.target.pwrite(offset, data)
        self.copied_upto = offset + length

    # ---- write-blocking: guest writes mirrored synchronously -----------------------------
    def _writes_to_target(self) -> bool:
        """bdrv_mirror_top_do_write()'s copy_to_target: write-blocking mode, while the
        job runs and has not failed or been cancelled."""
        return (self.copy_mode == "write-blocking" and self.thread is not None
                and not self.deferred and not self.cancelled and self.active_error is None)

    def guest_write(self, offset: int, length: int, request) -> None:
        """bdrv_mirror_top_do_write() + do_sync_target_write(): a guest write through the
        filter.  ``request(node, off, n)`` writes the part [off, off+n) of it to a node:
        all of it to the source and, in write-blocking mode, to the target too, minus an
        unaligned head or tail in a chunk that is dirty (its other bytes are not on the
        target yet either: the background copy takes the whole chunk).

        Runs in the guest's thread with the filter node's lock held: it must not wait
        for the job's registry lock (a finishing job holds that while waiting for the
        filter's lock), so errors are handed over to the job (``stop_error``)."""
        if not self._writes_to_target():
            request(self.source, offset, length)      # the bitmap records it
            return
        g, end = self.granularity, offset + length
        with self.copy_lock:
            start = offset
            if start % g and self.dirty.get(start):
                start += g - start % g
            stop = end
            if stop % g and self.dirty.get(stop - 1):
                stop -= stop % g
            try:
                with self.dirty.unrecorded():
                    request(self.source, offset, length)
            except BaseException:
                self.dirty.set_dirty(offset, length)  # whatever part of it landed
                raise
            if stop <= start:
                return          # all in chunks that were dirty, and still are
            if not self._writes_to_target():
                self.dirty.set_dirty(offset, length)  # the job stopped meanwhile
                return
            # only the chunks covered whole: the trimmed ends are dirty, and a clean
            # end chunk got dirty meanwhile would lose the rest of its data
            self.dirty.reset_dirty(start, stop - start)
            self.progress_add_total(stop - start)
            try:
                request(self.target, start, stop - start)
            except BlockError as e:
                self.dirty.set_dirty(start, stop - start)
                self._sync_write_failed(e)
                return
            self.progress(stop - start)

    def _sync_write_failed(self, e: BlockError) -> None:
        """A synchronous copy failed (the guest's write itself succeeded; its range is
        dirty again): 'report' fails the job and stops further synchronous copies,
        'stop' pauses it -- both through the job's thread."""
        action = self.announce_error(self.on_target_error, False, e)
        if action == "report":
            if self.active_error is None:
                self.active_error = e
        elif action == "stop":
            self.stop_error = e

    def _take_sync_write_error(self) -> None:
        """In the job's thread: apply a 'stop' that a synchronous write asked for."""
        e, self.stop_error = self.stop_error, None
        if e is not None:
            self.stop_on_error(e)

    def needs_attention(self) -> bool:
        return self.active_error is not None or self.stop_error is not None

    # ---- complete / cancel --------------------------------------------------------------
    def do_complete(self) -> None:
        if not self.ready:
            raise JobError("The active block job '%s' cannot be completed" % self.id)
        if self.replaces is not None and isinstance(self.replaces, str):
            node = self.graph.find_node(self.replaces)
            if node is None:
                raise BlockError("Can't find node %s" % self.replaces)

    def soft_cancel(self, force: bool) -> bool:
        return force or not self.ready

    # ---- the end --------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.mirror_top is None:
            return
        top = self.mirror_top
        with top.lock:
            # no guest write is in flight through the filter: converge
            size = self.source.total_size
            while True:
                area = self.dirty.next_dirty_area(0, size, MAX_CHUNK)
                if area is None:
                    break
                off, n = area
                self.dirty.reset_dirty(off, n)
                self._copy_final(off, n)
            self.target.flush()
            if not self.soft_cancelled:
                self._pivot()
            self._teardown_filter()

    def _copy_final(self, off: int, n: int) -> None:
        st = self.source.block_status_above(off, n, None)
        if st.flags & BLOCK_ZERO and st.length >= n:
            self.target.pwrite_zeroes(off, n, may_unmap=self.unmap)
        else:
            self.target.pwrite(off, self.source.pread(off, n))

    def _pivot(self) -> None:
        graph = self.graph
        to_replace = self.source
        if self.replaces is not None:
            to_replace = (self.graph.find_node(self.replaces)
                          if isinstance(self.replaces, str) else self.replaces)
        self.target_blk.set_perm(Perm(0), Perm.all())
        self.mirror_top.drv.stopped = True
        graph.refresh_perms([self.mirror_top])
        self._before_pivot()
        graph.replace_node(to_replace, self.target)
        self.mirror_top.drv.redirect = self.target
        self._after_pivot(to_replace)

    def _before_pivot(self) -> None:
        """Hook (active commit: nothing; drive-mirror: nothing)."""

    def _after_pivot(self, replaced) -> None:
        """Hook for active commit."""

    def _teardown_filter(self) -> None:
        top, self.mirror_top = self.mirror_top, None
        if top is None:
            return
        if self.dirty is not None:
            bitmaps.remove_bitmap(self.source, self.dirty)
        top.drv.stopped = True
        try:
            self.graph.refresh_perms([top])
        except BlockError:
            pass
        top.drv.job = None
        if top.drv.redirect is None:
            top.drv.redirect = top.file_child_node()
        for blk in self._backends:
            blk.remove()
        drop_filter(self.graph, top)

    def abort(self) -> None:
        self._teardown_filter()

    def clean(self) -> None:
        self._teardown_filter()


def check_job_nodes(source, target) -> None:
    """QEMU's op-blocker checks for a mirror's source and target."""
    source.check_op_blockers()
    target.check_op_blockers()
