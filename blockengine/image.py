"""The library's front door: open an image file as qemu-img would and do I/O on it.

    with blockengine.open("disk.qcow2") as img:
        data = img.read(0, 4096)
"""
from __future__ import annotations

from .graph.backend import ALL_SHARED, NO_SHARE, BlockBackend  # noqa: F401 (re-export)
from .graph.graph import Graph
from .graph.perms import Perm


class Image:
    """An opened image: its own graph, the format node, and a backend above it.

    ``perm``/``shared`` are what the image's user takes and shares, as qemu-img's
    commands do (e.g. convert's source: ``shared=NO_SHARE``); by default it reads (and
    unless read_only writes and resizes) and shares everything, like qemu-io.
    ``no_io`` opens for metadata only, as ``qemu-img info`` does: no permission taken.
    The backend keeps no I/O statistics: no monitor can query an image's own backend.
    """

    def __init__(self, filename: str, fmt: str | None = None, *, read_only: bool = False,
                 force_share: bool = False, options: dict | None = None,
                 backing: bool = True, cache_direct: bool = False, no_flush: bool = False,
                 graph: Graph | None = None, perm: Perm | None = None,
                 shared: Perm | None = None, no_io: bool = False):
        self.graph = graph or Graph()
        self.node = self.graph.open_image(filename, fmt, read_only=read_only,
                                          force_share=force_share, options=options,
                                          backing=backing, cache_direct=cache_direct,
                                          no_flush=no_flush, no_io=no_io)
        if perm is None:
            perm = Perm(0) if no_io else Perm.CONSISTENT_READ
            if not read_only:
                perm |= Perm.WRITE | Perm.RESIZE
        if shared is None or force_share:
            shared = ALL_SHARED
        self.backend = BlockBackend(self.graph, perm=perm, shared=shared,
                                    accounting=False)
        try:
            self.backend.insert(self.node)
        except BaseException:
            self.graph.close_all()
            raise

    @property
    def size(self) -> int:
        return self.node.total_size

    def read(self, offset: int, length: int) -> bytearray:
        return self.backend.pread(offset, length)

    def readinto(self, offset: int, buf) -> None:
        self.backend.preadv(offset, buf)

    def write(self, offset: int, data) -> None:
        self.backend.pwrite(offset, data)

    def write_compressed(self, offset: int, data) -> None:
        """Whole clusters the format stores compressed (``img convert -c``)."""
        self.backend.pwrite_compressed(offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.backend.pwrite_zeroes(offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self.backend.discard(offset, length)

    def flush(self) -> None:
        self.backend.flush()

    def resize(self, size: int, **kw) -> None:
        self.backend.truncate(size, **kw)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.delete()
            self.backend = None
            self.graph.close_all()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(filename: str, fmt: str | None = None, **kw) -> Image:   # noqa: A001
    return Image(filename, fmt, **kw)
