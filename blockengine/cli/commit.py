"""`img commit` (qemu-img.c img_commit): merge an image into its backing file.

As qemu-img does, this runs the active-commit block job (a mirror of the image into
the base, ``jobs.commit.ActiveCommitJob``) on the image's own graph and completes it
as soon as it is READY (run_block_job).  Without -b the base is the immediate backing
file; -b names a deeper one (the images in between are left as they are, now stale,
and the top image is kept: -b implies -d).  Without -d the committed image is emptied
afterwards (bdrv_make_empty), so it reads through to the base again.
"""
from __future__ import annotations

import errno
import os

from ..errors import BlockError
from ..graph.backend import ALL_SHARED, BlockBackend
from ..graph.perms import Perm
from ..jobs.commit import ActiveCommitJob
from . import report
from .chain import backing_chain_next, find_backing_image
from .common import DEFAULT_CACHE, Session, parse_cache
from .img import HELP, IMAGE_OPTS, OBJECT, _cvtnum, _strerror, parse_args
from .output import Progress

JOB_ID = "commit"        # qemu-img's job id
POLL_S = 0.05            # how often the progress line is refreshed while the job runs


class CommitError(Exception):
    """The commit failed; the message (and QEMU's hint lines) are printed after the
    progress line ends."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def cmd_commit(argv: list[str]) -> int:
    session = Session()
    fmt = base = None
    cache = DEFAULT_CACHE
    rate_limit = 0
    progress = quiet = drop = image_opts = False
    opts, operands = parse_args(argv, ":f:ht:b:dpqr:", [HELP, OBJECT, IMAGE_OPTS], session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "t":
            cache = arg
        elif key == "b":
            base = arg
            drop = True          # -b implies -d
        elif key == "d":
            drop = True
        elif key == "p":
            progress = True
        elif key == "q":
            quiet = True
        elif key == "r":
            rate_limit = _cvtnum("rate limit", arg)
        elif key == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    filename = operands[0]
    parse_cache(cache)
    img = session.open(filename, fmt, image_opts=image_opts, writable=True, cache=cache,
                       source_cache=False)
    bar = Progress(progress, 1.0)
    bar.print(0, 100)
    error: CommitError | None = None
    try:
        # opened RDWR without BDRV_O_RESIZE: the job resizes a smaller base itself
        img.backend.set_perm(Perm.CONSISTENT_READ | Perm.WRITE, img.backend.shared)
        _commit(img, filename, base, rate_limit, drop, bar)
    except CommitError as e:
        error = e
    finally:
        bar.end()
        img.close()
    if error is not None:
        raise report.fail(str(error), hint=error.hint)
    report.qprint(quiet, "Image committed.\n")
    return 0


def _commit(img, filename: str, base: str | None, rate_limit: int, drop: bool,
            bar: Progress) -> None:
    top = img.node
    if base is not None:
        base_node = find_backing_image(top, base)
        if base_node is None:
            raise CommitError("Did not find '%s' in the backing chain of '%s'"
                              % (base, filename))
    else:
        # QMP's default is the bottom of the chain; qemu-img's the immediate backing
        base_node = backing_chain_next(top)
        if base_node is None:
            raise CommitError("Image does not have a backing file")
    try:
        job = ActiveCommitJob(img.graph, JOB_ID, top, base_node, speed=rate_limit)
    except BlockError as e:
        raise CommitError(str(e), e.hint) from e
    job.start()
    _run_block_job(job, bar)
    if not drop:
        _make_empty(img.graph, top)


def _run_block_job(job, bar: Progress) -> None:
    """run_block_job(): show progress until READY (or the end), then complete."""
    cond = job.cond
    with cond:
        while not job.ready and not job.done.is_set():
            cond.wait(POLL_S)
            current, total = job.progress_current, job.progress_total
            bar.print(current / total * 100 if total else 0.0, 0)
        if not job.done.is_set():
            job.complete()
    job.wait(None)
    if job.ret is not None or job.cancelled:
        # common_block_job_cb(): error_setg_errno(-ret, "Block job failed")
        code = getattr(job.ret, "errno", None) or (errno.ECANCELED if job.ret is None
                                                   else errno.EIO)
        raise CommitError("Block job failed: %s" % os.strerror(code))
    bar.print(100, 0)


def _make_empty(graph, node) -> None:
    """blk_make_empty() on the committed image; formats that cannot (ENOTSUP) keep
    their data, as with QEMU."""
    make_empty = getattr(node.drv, "make_empty", None)
    if make_empty is None:
        return
    blk = BlockBackend(graph, perm=Perm.WRITE, shared=ALL_SHARED)
    try:
        blk.insert(node)
        make_empty()
        node.flush()
    except BlockError as e:
        raise CommitError("Failed to empty %s: %s" % (node.filename(), _strerror(e))) from e
    finally:
        blk.delete()
