"""mirror_top (block/mirror.c's bdrv_mirror_top): the implicit filter a mirror or an
active commit inserts above its source.  Guest writes pass through it to the source,
whose dirty bitmap marks the chunks to (re)copy; in the job's ``write-blocking`` copy
mode the job also writes them to the target before the guest's write completes
(``MirrorJob.guest_write``)."""
from ..base import DriverInfo, DriverKind
from .common import JobFilter


class MirrorTopDriver(JobFilter):
    info = DriverInfo("mirror_top", DriverKind.FILTER)
    job = None      # the MirrorJob while its filter is in the graph

    def pwritev(self, offset, data, fua=False):
        self._do_write(offset, len(data),
                       lambda node, off, n: node.pwrite(off, data[off - offset:off - offset + n],
                                                        fua))

    def pwrite_zeroes(self, offset, length, may_unmap):
        self._do_write(offset, length,
                       lambda node, off, n: node.pwrite_zeroes(off, n, may_unmap))

    def discard(self, offset, length):
        self._do_write(offset, length, lambda node, off, n: node.discard(off, n))

    def _do_write(self, offset: int, length: int, request) -> None:
        """bdrv_mirror_top_do_write(): ``request(node, off, n)`` runs the part
        [off, off+n) of the write on a node."""
        job = self.job
        if job is None or self.redirect is not None:
            request(self.child_node, offset, length)
        else:
            job.guest_write(offset, length, request)
