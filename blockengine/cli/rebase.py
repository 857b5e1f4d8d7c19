"""`img rebase` (qemu-img.c img_rebase): give an image a new backing file.

Safe mode keeps what the guest sees: before the header changes, every range the image
does not allocate itself (so reads fall through to the backing chain) is read from
the old and from the new backing chain, and where they differ the old data is written
into the image.  A crash in between does no harm: the image shows the same content
with either header.  When the new backing file is already in the old chain (rebasing
onto a deeper image), only ranges the images above it allocate can differ.

Unsafe mode (-u) only rewrites the header; the old backing file is not even opened
(useful after renaming or moving it).
"""
from __future__ import annotations

import errno
import os

from ..errors import BlockError
from ..graph import registry
from ..graph.backend import ALL_SHARED, BlockBackend
from ..graph.graph import Graph, abspath_like_qemu
from ..graph.perms import Perm
from ..image import Image
from . import report
from .chain import find_backing_image, has_protocol
from .common import DEFAULT_CACHE, Session, parse_cache
from .img import FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, _strerror, parse_args
from .io_commands import is_allocated
from .output import Progress

IO_BUF_SIZE = 2 << 20
SECTOR = 512


class RebaseError(Exception):
    """The rebase stops here; the message (and QEMU's hint lines) printed by the caller."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def cmd_rebase(argv: list[str]) -> int:
    session = Session()
    fmt = out_basefmt = out_baseimg = None
    cache = src_cache = DEFAULT_CACHE
    unsafe = progress = quiet = image_opts = force_share = False
    opts, operands = parse_args(argv, ":hf:F:b:upt:T:qU",
                                [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE], session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "F":
            out_basefmt = arg
        elif key == "b":
            out_baseimg = arg
        elif key == "u":
            unsafe = True
        elif key == "p":
            progress = True
        elif key == "t":
            cache = arg
        elif key == "T":
            src_cache = arg
        elif key == "q":
            quiet = True
        elif key == "image-opts":
            image_opts = True
        elif key == "U":
            force_share = True
    if quiet:
        progress = False
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    if not unsafe and out_baseimg is None:
        raise report.UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = operands[0]
    bar = Progress(progress, 2.0)
    bar.print(0, 100)
    img = None
    chains = BackingChains()
    try:
        parse_cache(cache)
        parse_cache(src_cache, source=True)
        img = session.open(filename, fmt, image_opts=image_opts, writable=True,
                           backing=not unsafe, cache=cache, source_cache=False)
        if out_basefmt is not None and not registry.has_driver(out_basefmt):
            raise report.fail("Invalid format name: '%s'" % out_basefmt)
        node = img.node.skip_filters()
        try:
            if not unsafe:
                chains.open(session, img, node, out_baseimg, out_basefmt, src_cache,
                            force_share)
                _copy_differences(img, node, chains, bar)
        except RebaseError as e:
            raise report.fail(str(e), hint=e.hint)
        failed = _change_backing_file(node, out_baseimg, out_basefmt)
        bar.print(100, 0)
        if failed:
            raise report.Exit(1)
    finally:
        bar.end()
        chains.close()
        if img is not None:
            img.close()
    return 0


class BackingChains:
    """Read access to the image's old and new backing chains (QEMU's blk_old_backing and
    blk_new_backing), None where there is no backing file; ``prefix`` is the new
    backing node when it is already in the old chain (bdrv_find_backing_image)."""

    def __init__(self):
        self.old = self.new = self.prefix = None
        self._backends: list[BlockBackend] = []
        self._image: Image | None = None      # a new backing file opened on its own

    def open(self, session, img, node, out_baseimg, out_basefmt, src_cache,
             force_share) -> None:
        old_bs = node.backing
        if old_bs is not None:
            self.old = self._reader(img.graph, old_bs, "Could not reuse old backing file "
                                    "'%s': " % old_bs.filename())
        if not out_baseimg:
            return
        overlay = node.filename()
        if not has_protocol(out_baseimg) and not out_baseimg.startswith("/") and (
                not overlay or overlay.startswith("json:")):
            raise RebaseError("Could not resolve backing filename: Cannot use relative "
                              "backing file names for '%s'" % overlay)
        real_path = abspath_like_qemu(overlay, out_baseimg)
        self.prefix = find_backing_image(img.node, real_path)
        if self.prefix is not None:
            self.new = self._reader(img.graph, self.prefix,
                                    "Could not reuse backing file '%s': " % out_baseimg)
            return
        direct, no_flush = parse_cache(src_cache, source=True)
        graph = Graph()
        graph.secrets = session.secrets
        try:
            self._image = Image(real_path, out_basefmt, read_only=True,
                                force_share=force_share, cache_direct=direct,
                                no_flush=no_flush, graph=graph)
        except BlockError as e:
            raise RebaseError("Could not open new backing file '%s': %s"
                              % (out_baseimg, e), e.hint) from e
        self.new = self._image.backend

    def _reader(self, graph, node, context: str) -> BlockBackend:
        """blk_new(CONSISTENT_READ, ALL) + blk_insert_bs()."""
        blk = BlockBackend(graph, perm=Perm.CONSISTENT_READ, shared=ALL_SHARED)
        try:
            blk.insert(node)
        except BlockError as e:
            raise RebaseError(context + str(e), e.hint) from e
        self._backends.append(blk)
        return blk

    def close(self) -> None:
        for blk in self._backends:
            blk.delete()
        if self._image is not None:
            self._image.close()


def _copy_differences(img, node, chains: BackingChains, bar) -> None:
    """The safe-mode loop of img_rebase, chunk by chunk as QEMU walks the image."""
    old, new, prefix = chains.old, chains.new, chains.prefix
    size = img.size
    old_size = old.root_node.total_size if old is not None else 0
    new_size = new.root_node.total_size if new is not None else 0
    local_progress = 100 / (size // min(size, IO_BUF_SIZE)) if size else 0
    offset = 0
    while offset < size:
        n = min(IO_BUF_SIZE, size - offset)
        try:
            allocated, n = is_allocated(node, offset, n)
            if not allocated and prefix is not None:
                # unchanged since the new backing file: both chains show the same;
                # past the end of the old backing file (no answer, n = 0) the old
                # chain reads zeroes, which must be compared (QEMU 7.2 stable's fix)
                changed, length = node.backing.is_allocated_above(offset, n, prefix)
                if length:
                    allocated, n = not changed, length
        except BlockError as e:
            raise RebaseError("error while reading image metadata: %s" % _strerror(e)) from e
        if allocated:
            offset += n
            continue
        old_is_zero = offset >= old_size
        if not old_is_zero:
            n = min(n, old_size - offset)
        if new is not None and offset < new_size:
            n = min(n, new_size - offset)
        buf_old = bytes(n) if old_is_zero else _read(old, offset, n, "old")
        buf_new = (_read(new, offset, n, "new") if new is not None and offset < new_size
                   else bytes(n))
        written = 0
        while written < n:
            differ, pnum = _compare_buffers(buf_old, buf_new, written, n)
            if differ:
                try:
                    if old_is_zero:
                        img.write_zeroes(offset + written, pnum)
                    else:
                        img.write(offset + written,
                                  memoryview(buf_old)[written:written + pnum])
                except BlockError as e:
                    raise RebaseError("Error while writing to COW image: %s"
                                      % _strerror(e)) from e
            written += pnum
        bar.print(local_progress, 100)
        offset += n


def _read(blk, offset: int, n: int, which: str) -> bytes:
    try:
        return blk.pread(offset, n)
    except BlockError as e:
        raise RebaseError("error while reading from %s backing file" % which) from e


def _compare_buffers(a, b, start: int, end: int) -> tuple[bool, int]:
    """compare_buffers(): whether the first sector differs, and how many bytes from
    ``start`` (whole sectors) share that answer."""
    first = min(end - start, SECTOR)
    differ = a[start:start + first] != b[start:start + first]
    i = start + first
    while i < end:
        step = min(end - i, SECTOR)
        if (a[i:i + step] != b[i:i + step]) != differ:
            break
        i += step
    return differ, i - start


def _change_backing_file(node, backing_file: str | None, backing_fmt: str | None) -> bool:
    """bdrv_change_backing_file() with qemu-img's messages; True if it failed.

    The header alone changes: this process's graph keeps the old chain until exit.
    """
    if backing_file:
        target, fmt, require = backing_file, backing_fmt, True
    else:
        target, fmt, require = None, None, False
    change = getattr(node.drv, "change_backing_file", None)
    code = 0
    if require and not fmt:
        code = errno.EINVAL
    elif change is None:
        code = errno.ENOTSUP
    else:
        try:
            change(target, fmt)
        except BlockError as e:
            code = e.errno or errno.EIO
    if not code:
        return False
    # QEMU prints the -b argument as given, "(null)" when there was none (-u alone)
    shown = "(null)" if backing_file is None else backing_file
    if code == errno.ENOSPC:
        report.error("Could not change the backing file to '%s': No space left in the "
                     "file header" % shown)
    elif code == errno.EINVAL and backing_file and not backing_fmt:
        report.error("Could not change the backing file to '%s': backing format must be "
                     "specified" % shown)
    else:
        report.error("Could not change the backing file to '%s': %s"
                     % (shown, os.strerror(code)))
    return True
