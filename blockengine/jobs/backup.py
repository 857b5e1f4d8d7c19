"""backup (block/backup.c): a point-in-time copy of a node while the guest writes on.

A ``copy-before-write`` filter goes above the source; before any write reaches the
source, the clusters it touches that were not copied yet are copied to the target (with
their old data).  The job copies the remaining clusters in order.  Both share one
``BlockCopy`` whose copy bitmap says what is still to copy, and both copy under the
source's lock, so the target ends up holding exactly the source as it was when the job
started.

sync: full (everything), top (only what is allocated above the source's backing),
none (only what the guest overwrites, until cancelled), bitmap/incremental (the
clusters dirty in ``bitmap``).  The bitmap is frozen during the job (a successor records
new writes) and, per ``bitmap-mode``, afterwards holds only the new writes (on-success
and the job succeeded, or always), or old + new bits (never, or the job failed; with
``always`` a failed job also keeps the bits it had not copied yet).
"""
from __future__ import annotations

from .. import bitmaps
from ..errors import BlockError, InvalidArgument
from ..graph.perms import Perm
from .job import Job
from .mirror import JobBackend


def check_backup_args(source, sync: str, bitmap_name: str | None,
                      bitmap_mode: str | None) -> tuple[str, object, str | None]:
    """do_backup_common()'s checks; returns (sync, bitmap or None, bitmap_mode)."""
    bmap = None
    if bitmap_name is not None:
        bmap = bitmaps.find_bitmap(source, bitmap_name)
        if bmap is None:
            raise InvalidArgument("Bitmap '%s' could not be found" % bitmap_name)
        if bitmap_mode is None and sync == "incremental":
            bitmap_mode = "on-success"
        if sync == "incremental":
            if bitmap_mode != "on-success":
                raise InvalidArgument("Bitmap sync mode must be '%s' when using sync mode "
                                      "'%s'" % ("on-success", sync))
            sync = "bitmap"
        if bitmap_mode is None:
            raise InvalidArgument("Bitmap sync mode must be given when providing a bitmap")
        bitmaps.check_usable(bmap, allow_readonly=True)
        if sync == "none":
            raise InvalidArgument("sync mode '%s' does not produce meaningful bitmap "
                                  "outputs" % sync)
        if bitmap_mode == "never" and sync != "bitmap":
            raise InvalidArgument("Bitmap sync mode '%s' has no meaningful effect when "
                                  "combined with sync mode '%s'" % (bitmap_mode, sync))
    elif bitmap_mode is not None:
        raise InvalidArgument("Cannot specify bitmap sync mode without a bitmap")
    if sync in ("incremental", "bitmap") and bmap is None:
        raise InvalidArgument("must provide a valid bitmap name for '%s' sync mode" % sync)
    return sync, bmap, bitmap_mode


class BackupJob(Job):
    job_type = "backup"

    def __init__(self, graph, job_id, source, target, *, sync: str = "full",
                 bitmap=None, bitmap_mode: str | None = None,
                 on_source_error: str = "report", on_target_error: str = "report",
                 filter_node_name: str | None = None, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 cluster_size: int | None = None, compress: bool = False):
        if source is target:
            raise InvalidArgument("Source and target cannot be the same")
        if source.total_size != target.total_size:
            raise InvalidArgument("Source and target image have different sizes")
        self.source, self.target = source, target
        self.sync = sync
        self.sync_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.compress = compress
        self.cluster_size = cluster_size or max(65536, bitmaps.default_granularity(target))
        self.cbw = None
        super().__init__(graph, job_id, source, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        try:
            self._setup(filter_node_name)
        except BaseException:
            self._drop_cbw()
            if self.sync_bitmap is not None and self.sync_bitmap.successor is not None:
                self.sync_bitmap.reclaim()
            self._release()
            self.early_fail()
            raise

    def _setup(self, filter_node_name) -> None:
        graph = self.graph
        with graph.lock:
            opts = {"driver": "copy-before-write", "file": self.source.node_name,
                    "target": self.target.node_name,
                    "x-cluster-size": self.cluster_size}
            if filter_node_name is not None:
                opts["node-name"] = filter_node_name
            self.cbw = graph.open_node(opts)
            self.cbw.monitor_owned = False
            self.bcs = self.cbw.drv.bcs
            self.bcs.compress = self.compress
            if self.sync == "top":
                self.bcs.skip_unallocated = True
                self.bcs.base = self.source.backing
            if self.sync == "bitmap":
                self.bcs.bitmap.clear()
                self.bcs.bitmap.merge_from(self.sync_bitmap)
            if self.sync_bitmap is not None:
                self.sync_bitmap.create_successor()
            graph.insert_filter(self.cbw, self.source)
            blk = JobBackend(graph, self, Perm(0), Perm.all())
            blk.insert(self.cbw)
            self.add_backend(blk)
            self.block_node(self.cbw)
            self.block_node(self.target)
        self.bcs.progress = self.progress
        self.progress_set_remaining(self.bcs.dirty_bytes())

    # ---- running ------------------------------------------------------------------------
    def run(self) -> None:
        if self.sync == "none":
            while True:
                self.pause_point()
                self.sleep(0.05)
        size = self.source.total_size
        if self.sync == "top":
            pos = 0
            while pos < size:
                self.pause_point()
                done = self.bcs.reset_unallocated(pos)
                pos += done or min(self.bcs.chunk, size - pos)
                self.progress_set_remaining(self.bcs.dirty_bytes())
        pos = 0
        while pos < size:
            self.pause_point()
            n = min(self.bcs.chunk, size - pos)
            try:
                copied = self.bcs.copy_range(pos, n)
            except BlockError as e:
                policy = (self.on_source_error if getattr(e, "is_read", False)
                          else self.on_target_error)
                self.error_action_retry(policy, e)
                continue
            pos += n
            self.progress_set_remaining(self.bcs.dirty_bytes())
            if copied:
                self.ratelimit(copied)

    def error_action_retry(self, policy: str, exc: BlockError) -> None:
        """backup_loop(): report fails the job, ignore and stop retry the chunk."""
        action = self.error_action(policy, getattr(exc, "is_read", False), exc)
        if action == "report":
            raise exc

    # ---- the end --------------------------------------------------------------------------
    def _cleanup_sync_bitmap(self, ok: bool) -> None:
        bm = self.sync_bitmap
        if bm is None or bm.successor is None:
            return
        sync = (ok or self.bitmap_mode == "always") and self.bitmap_mode != "never"
        if sync:
            bm.abdicate()
        else:
            bm.reclaim()
        if not ok and self.bitmap_mode == "always":
            bm.merge_from(self.bcs.bitmap)

    def commit(self) -> None:
        self._cleanup_sync_bitmap(True)

    def abort(self) -> None:
        self._cleanup_sync_bitmap(False)

    def clean(self) -> None:
        try:
            self.target.flush()
        except BlockError:
            pass
        self._drop_cbw()

    def _drop_cbw(self) -> None:
        cbw, self.cbw = self.cbw, None
        if cbw is None:
            return
        from ..drivers.filter.common import drop_filter
        for blk in self._backends:
            blk.remove()
        drop_filter(self.graph, cbw)
