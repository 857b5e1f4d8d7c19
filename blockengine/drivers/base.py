"""The one driver interface every protocol, format and filter driver implements.

Theory of operation: the generic layer (``BlockNode`` + ``blockengine.io.request``)
checks bounds, splits requests at ``max_transfer`` and aligns them to
``request_alignment`` (read-modify-write for unaligned writes) before calling a driver,
so driver methods may assume: offset and length are multiples of the node's
request_alignment, and the range lies inside the node (except truncate).
Optional operations raise ``NotSupported``; the generic layer then falls back, as QEMU
does with -ENOTSUP (a zero write becomes a data write, a discard is ignored).
"""
from __future__ import annotations

import enum
from collections import namedtuple

from .._record import record
from ..errors import InvalidArgument, NotSupported
from ..graph.perms import Perm


class DriverKind(enum.Enum):
    PROTOCOL = "protocol"
    FORMAT = "format"
    FILTER = "filter"


@record(frozen=True)
class CreateOpt:
    """One `img create -o` option (QEMU's QemuOptDesc): type 'str', 'bool', 'num' or 'size'."""
    name: str
    type: str = "str"
    help: str = ""
    default: str | None = None


@record(frozen=True)
class DriverInfo:
    name: str
    kind: DriverKind
    supports_backing: bool = False
    # `img create -o` options in QEMU's order (CreateOpt, or bare names of 'str' options)
    create_opts: tuple = ()


def bool_option(value, name: str) -> bool:
    """A boolean driver option given as JSON bool or as text ('on'/'off', ...); None
    is off.  QEMU's message for anything else."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes", 1):
        return True
    if value in ("off", "false", "no", 0):
        return False
    raise InvalidArgument("Parameter '%s' expects 'on' or 'off'" % name)


class PreallocMode(enum.Enum):
    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"


# QEMU's BDRV_BLOCK_* flags
BLOCK_DATA = 0x01
BLOCK_ZERO = 0x02
BLOCK_OFFSET_VALID = 0x04
BLOCK_RAW = 0x08
BLOCK_ALLOCATED = 0x10
BLOCK_EOF = 0x20
BLOCK_RECURSE = 0x40


# Answer of block_status for the first ``length`` bytes of the range asked.
# ``host_offset``/``host_node`` are meaningful when BLOCK_OFFSET_VALID is set; with
# BLOCK_RAW they name where the generic layer must ask next.  (collections' namedtuple,
# not typing's: importing typing costs every command's start-up a few milliseconds.)
Status = namedtuple("Status", "flags length host_offset host_node", defaults=(0, None))


class BlockDriver:
    """Per-node driver state (QEMU's bs->drv + bs->opaque in one object)."""

    info: DriverInfo            # a class attribute: set by each driver class

    def __init__(self, node):
        self.node = node

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        """Children opened before ``open``: option key -> ChildRole (format: its file)."""
        from ..graph.child import ChildRole
        if cls.info.kind is DriverKind.PROTOCOL:
            return {}
        return {"file": ChildRole.image()}

    def backing_options(self) -> dict | None:
        """BlockdevOptions for the backing file the image header names, if any."""
        return None

    # ---- life cycle -------------------------------------------------------------
    @classmethod
    def parse_filename(cls, filename: str) -> dict:
        """bdrv_parse_filename(): the options a plain filename gives a protocol driver
        opened with it (``qemu-img -f file x``)."""
        return {"filename": filename}

    def open(self, options: dict) -> None:
        """Open using the driver's own options (children are already attached)."""

    def close(self) -> None:
        """Release resources; called once, after the last flush."""

    def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write; raise to refuse (state unchanged)."""

    # ---- geometry ----------------------------------------------------------------
    #: preadv/pwritev may run without the node lock (stateless protocol drivers)
    thread_safe = False

    def get_length(self) -> int:
        raise NotImplementedError

    def request_alignment(self) -> int:
        return 1

    def max_transfer(self) -> int:
        return 1 << 30

    def allocated_file_size(self) -> int | None:
        """Bytes the image occupies on the host (qemu-img's disk size), if known."""
        fnode = self.node.file_child_node()
        return fnode.drv.allocated_file_size() if fnode is not None else None

    # ---- I/O ---------------------------------------------------------------------
    def preadv(self, offset: int, buf: memoryview) -> None:
        """Fill buf completely with the data at offset (never a short read)."""
        raise NotImplementedError

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        raise NotImplementedError

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        raise NotSupported()

    def discard(self, offset: int, length: int) -> None:
        raise NotSupported()

    def flush(self) -> None:
        """Make completed writes stable (the generic layer then flushes children)."""

    def truncate(self, size: int, exact: bool, prealloc: PreallocMode) -> None:
        raise NotSupported("Image format driver does not support resize")

    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        """Default for drivers with one data child: the data lives in that child as is."""
        child = self.node.primary_child()
        if child is None:
            return Status(BLOCK_DATA | BLOCK_ALLOCATED, length)
        return Status(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset, child.node)

    def block_status_runs(self, offset: int, length: int, want_zero: bool) -> list[Status]:
        """Bulk block_status: statuses of consecutive extents from ``offset`` (at least
        one, together at most ``length`` bytes).  Each must equal what ``block_status``
        would answer at its start for the rest of the range, so callers may consume any
        prefix.  Drivers that can answer many extents cheaply (qcow2: one L2 slice)
        override this; the default asks once."""
        return [self.block_status(offset, length, want_zero)]

    def child_replaced(self, old, new) -> None:
        """One of our edges now leads to ``new`` instead of ``old`` (graph.replace_node):
        drivers keep child nodes in attributes for speed, so follow the edge."""
        for name, value in list(vars(self).items()):
            if value is old:
                setattr(self, name, new)

    def has_zero_init(self) -> bool:
        """bdrv_has_zero_init(): does a newly created image read as all zeroes?"""
        return False

    # ---- permissions --------------------------------------------------------------
    def child_perm(self, child, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """Permissions to take/share on ``child`` given the node's cumulative parent use."""
        from ..graph.perms import default_child_perm
        return default_child_perm(self.node, child, perm, shared)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Protocol drivers lock the image here (checked first by check_perm)."""

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Raise LockError if another process's locks conflict with (perm, shared)."""

    # Format and protocol drivers that can make new images define
    #     @classmethod create(cls, filename, size, opts, secrets=None)
    # where opts are the typed `-o` options and secrets map secret ids to their bytes.

    # ---- queries ------------------------------------------------------------------
    def get_info(self) -> dict | None:
        """bdrv_get_info(): {'cluster_size': n?, 'is_dirty': bool?} or None if unsupported."""
        return None

    def info_specific(self) -> dict | None:
        """ImageInfoSpecific for `img info` / query-block (None when the format has none)."""
        return None

    def refresh_filename(self) -> str | None:
        """The plain filename of the node when it is just a file (QEMU's exact_filename)."""
        return None
