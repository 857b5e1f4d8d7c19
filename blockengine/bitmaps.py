"""Dirty bitmaps (QEMU's block/dirty-bitmap.c over hbitmap), and their QMP semantics.

A ``BlockDirtyBitmap`` tracks which granularity-sized chunks of a node were written.
It lives in ``node.dirty_bitmaps``; the generic I/O layer calls ``set_range`` after
every write/zero/discard.  The bits are a bytearray of little-endian 64-bit words
handled by ``blockengine._native`` (no per-bit Python loops).

States as QEMU 7.2 reports them: ``recording`` (enabled and no successor frozen in),
``busy`` (in use by an operation: a job froze it, or it has a successor),
``persistent`` (to be stored in the image by ``node.drv.store_bitmaps(bitmaps)`` when
the driver has it), ``inconsistent`` (loaded from an image that was not closed cleanly).

A job that consumes a bitmap (incremental backup, mirror with a bitmap) *freezes* it:
``create_successor()`` disables it and adds an anonymous enabled successor that records
writes made during the job; at the end ``abdicate()`` (the successor replaces the
bitmap's contents: the job consumed the old bits) or ``reclaim()`` (the successor's bits
are merged back: nothing consumed).
"""
from __future__ import annotations

import threading

from . import _native
from .errors import BlockError, InvalidArgument

DEFAULT_GRANULARITY = 65536
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
BITMAP_NAME_MAX = 1023


class BlockDirtyBitmap:
    def __init__(self, node, name: str | None, granularity: int, *, size: int | None = None,
                 disabled: bool = False, persistent: bool = False):
        self.node = node
        self.name = name
        self.granularity = granularity
        self.size = node.total_size if size is None else size
        self.nbits = -(-self.size // granularity)
        self.buf = bytearray(((self.nbits + 63) // 64) * 8 or 8)
        self.lock = threading.Lock()
        self.disabled = disabled
        self.persistent = persistent
        self.inconsistent = False
        self.readonly = False
        self.busy = False            # in use by an operation (QEMU's bitmap->busy)
        self.successor: BlockDirtyBitmap | None = None

    # ---- state ---------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return not self.disabled and self.successor is None

    @property
    def has_successor(self) -> bool:
        return self.successor is not None

    def in_use(self) -> bool:
        return self.busy or self.successor is not None

    def __repr__(self) -> str:
        return "<BlockDirtyBitmap %s gran=%d count=%d>" % (self.name, self.granularity,
                                                          self.count())

    # ---- bit operations (byte ranges) ------------------------------------------------
    def _bits(self, offset: int, length: int) -> tuple[int, int]:
        if length <= 0 or offset >= self.size:
            return 0, 0
        end = min(offset + length, self.size)
        first = offset // self.granularity
        last = -(-end // self.granularity)
        return first, last - first

    def set_range(self, offset: int, length: int) -> None:
        """Called after each write by the I/O layer: records only when enabled and no
        successor records in its place."""
        if self.disabled or self.successor is not None:
            return
        self.set_dirty(offset, length)

    def set_dirty(self, offset: int, length: int) -> None:
        first, n = self._bits(offset, length)
        if n:
            with self.lock:
                _native.bitmap_set_range(self.buf, first, n)

    def reset_dirty(self, offset: int, length: int) -> None:
        """Clear the chunks covered by [offset, offset+length) (whole chunks only,
        except that the image's last partial chunk counts as whole)."""
        if length <= 0 or offset >= self.size:
            return
        end = min(offset + length, self.size)
        first = -(-offset // self.granularity)
        last = -(-end // self.granularity) if end == self.size else end // self.granularity
        if last > first:
            with self.lock:
                _native.bitmap_reset_range(self.buf, first, last - first)

    def clear(self) -> None:
        with self.lock:
            self.buf[:] = bytes(len(self.buf))

    def truncate(self, size: int) -> None:
        """bdrv_dirty_bitmap_truncate(): follow the node to its new size.  The bits past
        a shrunk end are dropped; the chunks past the old end start clean."""
        nbits = -(-size // self.granularity)
        nbytes = ((nbits + 63) // 64) * 8 or 8
        with self.lock:
            if nbits < self.nbits:
                _native.bitmap_reset_range(self.buf, nbits, self.nbits - nbits)
            if nbytes < len(self.buf):
                del self.buf[nbytes:]
            else:
                self.buf.extend(bytes(nbytes - len(self.buf)))
            self.size, self.nbits = size, nbits

    def set_all(self) -> None:
        with self.lock:
            _native.bitmap_set_range(self.buf, 0, self.nbits)

    def get(self, offset: int) -> bool:
        i = offset // self.granularity
        with self.lock:
            return _native.bitmap_count(self.buf, i, 1) == 1

    def count(self) -> int:
        """Dirty bytes, as QEMU counts them (whole chunks)."""
        with self.lock:
            return _native.bitmap_count(self.buf, 0, self.nbits) * self.granularity

    def count_range(self, offset: int, length: int) -> int:
        first, n = self._bits(offset, length)
        with self.lock:
            return _native.bitmap_count(self.buf, first, n) * self.granularity if n else 0

    def next_dirty(self, offset: int, end: int | None = None) -> int:
        """Byte offset of the first dirty chunk at/after offset (clamped), or -1."""
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return -1
        first = offset // self.granularity
        last = -(-end // self.granularity)
        with self.lock:
            i = _native.bitmap_next_set(self.buf, first, last)
        return -1 if i < 0 else max(offset, i * self.granularity)

    def next_clean(self, offset: int, end: int | None = None) -> int:
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return -1
        first = offset // self.granularity
        last = -(-end // self.granularity)
        with self.lock:
            i = _native.bitmap_next_clear(self.buf, first, last)
        return -1 if i < 0 else max(offset, i * self.granularity)

    def next_dirty_area(self, offset: int, end: int | None = None,
                        max_bytes: int | None = None) -> tuple[int, int] | None:
        """First dirty run in [offset, end) as (offset, length) in bytes, or None."""
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return None
        first = offset // self.granularity
        last = -(-end // self.granularity)
        max_bits = last - first if max_bytes is None else max(1, max_bytes // self.granularity)
        with self.lock:
            area = _native.bitmap_next_dirty_area(self.buf, first, last, max_bits)
        if area is None:
            return None
        start = max(offset, area[0] * self.granularity)
        stop = min(end, (area[0] + area[1]) * self.granularity)
        return start, stop - start

    def merge_from(self, other: "BlockDirtyBitmap") -> None:
        """self |= other (granularities may differ, as in QEMU's hbitmap_merge)."""
        if other is self:
            return
        if other.granularity == self.granularity and len(other.buf) == len(self.buf):
            with other.lock:
                src = bytes(other.buf)
            with self.lock:
                _native.bitmap_merge_or(self.buf, src)
            return
        pos = 0
        while True:
            area = other.next_dirty_area(pos)
            if area is None:
                break
            self.set_dirty(*area)
            pos = area[0] + area[1]

    def copy_bits(self) -> bytes:
        with self.lock:
            return bytes(self.buf)

    def serialize(self) -> bytes:
        """The bits in qcow2's on-disk order (for ``store_bitmaps``)."""
        with self.lock:
            return _native.bitmap_serialize(self.buf, 0, self.nbits)

    def deserialize(self, data) -> None:
        with self.lock:
            _native.bitmap_deserialize(self.buf, 0, self.nbits, data)

    def deserialize_part(self, first_bit: int, nbits: int, data) -> None:
        """Bits [first_bit, first_bit + nbits) from qcow2's on-disk order (loading a
        persistent bitmap one bitmap cluster at a time)."""
        with self.lock:
            _native.bitmap_deserialize(self.buf, first_bit, nbits, data)

    # ---- successors (bdrv_dirty_bitmap_create_successor & co) ------------------------
    def create_successor(self) -> "BlockDirtyBitmap":
        if self.in_use():
            raise BlockError("Cannot create a successor for a bitmap currently in use")
        succ = BlockDirtyBitmap(self.node, None, self.granularity, size=self.size)
        succ.disabled = self.disabled
        self.successor = succ
        self.busy = True
        add_bitmap(self.node, succ)
        return succ

    def _drop_successor(self) -> "BlockDirtyBitmap":
        succ, self.successor = self.successor, None
        remove_bitmap(self.node, succ)
        self.busy = False
        return succ

    def abdicate(self) -> "BlockDirtyBitmap":
        """The successor's bits replace ours (the job consumed the old ones)."""
        succ = self._drop_successor()
        with succ.lock:
            data = bytes(succ.buf)
        with self.lock:
            self.buf[:] = data
        return self

    def reclaim(self) -> "BlockDirtyBitmap":
        """Merge the successor back: nothing was consumed."""
        succ = self._drop_successor()
        self.merge_from(succ)
        return self

    def info(self) -> dict:
        """BlockDirtyInfo as QEMU 7.2 reports it."""
        out = {}
        if self.name is not None:
            out["name"] = self.name
        out.update({"recording": self.recording, "persistent": self.persistent,
                    "busy": self.in_use(), "granularity": self.granularity,
                    "count": self.count()})
        if self.inconsistent:
            out["inconsistent"] = True
        return out

    query = info      # the name blockengine.info's BlockDeviceInfo builder calls


# ---- per-node registry ------------------------------------------------------------------
def add_bitmap(node, bitmap: BlockDirtyBitmap) -> None:
    with node.lock:
        node.dirty_bitmaps.insert(0, bitmap)     # QEMU lists newest first


def remove_bitmap(node, bitmap: BlockDirtyBitmap) -> None:
    with node.lock:
        if bitmap in node.dirty_bitmaps:
            node.dirty_bitmaps.remove(bitmap)


def find_bitmap(node, name: str) -> BlockDirtyBitmap | None:
    for bm in node.dirty_bitmaps:
        if bm.name == name:
            return bm
    return None


def dirty_bitmap_info(node) -> list[dict]:
    """``dirty-bitmaps`` of BlockDeviceInfo / BlockInfo (newest first, anonymous too)."""
    return [bm.info() for bm in list(node.dirty_bitmaps)]


def default_granularity(node) -> int:
    """bdrv_get_default_bitmap_granularity(): the cluster size, at least 4 KiB, else 64 KiB."""
    try:
        info = node.drv.get_info()
    except Exception:
        info = None
    cluster = (info or {}).get("cluster_size") or getattr(node.drv, "cluster_size", 0)
    if cluster:
        return max(4096, cluster)
    return DEFAULT_GRANULARITY


def check_usable(bm: BlockDirtyBitmap, *, allow_readonly: bool = False,
                 allow_inconsistent: bool = False) -> None:
    """bdrv_dirty_bitmap_check(BDRV_BITMAP_DEFAULT), QEMU's messages (removal allows
    an inconsistent bitmap: BDRV_BITMAP_BUSY | BDRV_BITMAP_RO)."""
    if bm.in_use():
        raise BlockError("Bitmap '%s' is currently in use by another operation and cannot be "
                         "used" % bm.name)
    if bm.readonly and not allow_readonly:
        raise BlockError("Bitmap '%s' is readonly and cannot be modified" % bm.name)
    if bm.inconsistent and not allow_inconsistent:
        raise BlockError("Bitmap '%s' is inconsistent and cannot be used" % bm.name,
                         hint="Try block-dirty-bitmap-remove to delete this bitmap from disk")


def create_bitmap(node, name: str | None, granularity: int | None = None, *,
                  persistent: bool = False, disabled: bool = False) -> BlockDirtyBitmap:
    """qmp_block_dirty_bitmap_add()'s checks and creation."""
    if name is not None and not name:
        raise InvalidArgument("Bitmap name cannot be empty")
    if granularity is None:
        granularity = default_granularity(node)
    elif (granularity < MIN_GRANULARITY or granularity & (granularity - 1)
          or granularity > MAX_GRANULARITY):
        raise InvalidArgument("Granularity must be power of 2 and at least 512")
    if name is not None and find_bitmap(node, name) is not None:
        raise BlockError("Bitmap already exists: %s" % name)
    if persistent:
        can_store = getattr(node.drv, "can_store_new_bitmap", None)
        if can_store is None:
            raise BlockError("Can't store persistent bitmaps to %s: Operation not supported"
                             % node.node_name)
        can_store(name, granularity)
    if name is not None and len(name) > BITMAP_NAME_MAX:    # bdrv_create_dirty_bitmap()
        raise InvalidArgument("Bitmap name is too long")
    bm = BlockDirtyBitmap(node, name, granularity, disabled=disabled, persistent=persistent)
    add_bitmap(node, bm)
    return bm


def store_persistent(node) -> None:
    """Hand persistent bitmaps to the format driver (on flush/close/inactivate)."""
    store = getattr(node.drv, "store_bitmaps", None)
    if store is not None:
        store([bm for bm in node.dirty_bitmaps if bm.persistent and bm.name])
