"""Metadata caches for L2 slices and refcount blocks (QEMU's qcow2-cache.c).

Theory of operation: a cache maps the host offset of a table (or L2 slice) to a
``bytearray`` holding its on-disk (big-endian) contents.  Entries are evicted in LRU
order; a dirty entry is written back before it leaves the cache.  Write-back order
keeps the image consistent at every step, as QEMU's cache dependencies do: a cache
with a ``depends`` cache flushes that one first (refcount blocks before L2 tables),
and the L1 table is written through only after the L2 cache was flushed.

Sizes follow read_cache_sizes() of QEMU 7.2 (see ``cache_sizes``).
"""
from __future__ import annotations

from collections import OrderedDict

from ....errors import InvalidArgument
from .layout import (DEFAULT_L2_CACHE_MAX_SIZE, MIN_CLUSTER_BITS, MIN_L2_CACHE_SIZE,
                     MIN_REFCOUNT_CACHE_SIZE)

QCOW2_OPT_CACHE_SIZE = "cache-size"
QCOW2_OPT_L2_CACHE_SIZE = "l2-cache-size"
QCOW2_OPT_L2_CACHE_ENTRY_SIZE = "l2-cache-entry-size"
QCOW2_OPT_REFCOUNT_CACHE_SIZE = "refcount-cache-size"


def _size_opt(opts: dict, name: str):
    v = opts.get(name)
    if v is None:
        return None
    if isinstance(v, str):
        return parse_size(v)
    return int(v)


def parse_size(text: str) -> int:
    """qemu_strtosz(): a byte count with an optional k/M/G/T/P/E suffix."""
    t = text.strip()
    mult = 1
    if t and t[-1].lower() in "bkmgtpe":
        mult = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                "p": 1 << 50, "e": 1 << 60}[t[-1].lower()]
        t = t[:-1]
    try:
        return int(float(t) * mult) if "." in t else int(t) * mult
    except ValueError:
        raise InvalidArgument("Parameter expects a size value") from None


def cache_sizes(opts: dict, cluster_size: int, l2_entry_size: int,
                virtual_size: int) -> tuple[int, int, int]:
    """read_cache_sizes() + qcow2_update_options_prepare().

    Returns (l2 cache entries, l2 cache entry size, refcount cache entries).
    """
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * l2_entry_size) // cluster_size) * cluster_size

    combined = _size_opt(opts, QCOW2_OPT_CACHE_SIZE)
    l2_set = _size_opt(opts, QCOW2_OPT_L2_CACHE_SIZE)
    rc_set = _size_opt(opts, QCOW2_OPT_REFCOUNT_CACHE_SIZE)
    entry_set = _size_opt(opts, QCOW2_OPT_L2_CACHE_ENTRY_SIZE)

    l2_cache_max_setting = l2_set if l2_set is not None else DEFAULT_L2_CACHE_MAX_SIZE
    refcount_cache_size = rc_set if rc_set is not None else 0
    l2_cache_entry_size = entry_set if entry_set is not None else cluster_size
    l2_cache_size = min(max_l2_cache, l2_cache_max_setting)

    if combined is not None:
        if l2_set is not None and rc_set is not None:
            raise InvalidArgument("cache-size, l2-cache-size and refcount-cache-size may "
                                  "not be set at the same time")
        if l2_set is not None and l2_cache_max_setting > combined:
            raise InvalidArgument("l2-cache-size may not exceed cache-size")
        if refcount_cache_size > combined:
            raise InvalidArgument("refcount-cache-size may not exceed cache-size")
        if l2_set is not None:
            refcount_cache_size = combined - l2_cache_size
        elif rc_set is not None:
            l2_cache_size = combined - refcount_cache_size
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_cache_size = max_l2_cache
            refcount_cache_size = combined - l2_cache_size
        else:
            refcount_cache_size = min(combined, min_refcount_cache)
            l2_cache_size = combined - refcount_cache_size

    if l2_cache_size < max_l2_cache and entry_set is None:
        l2_cache_entry_size = min(cluster_size, 4096)

    if (l2_cache_entry_size < (1 << MIN_CLUSTER_BITS) or l2_cache_entry_size > cluster_size
            or l2_cache_entry_size & (l2_cache_entry_size - 1)):
        raise InvalidArgument("L2 cache entry size must be a power of two between %d and "
                              "the cluster size (%d)" % (1 << MIN_CLUSTER_BITS, cluster_size))

    l2_entries = max(MIN_L2_CACHE_SIZE, l2_cache_size // l2_cache_entry_size)
    rc_entries = max(MIN_REFCOUNT_CACHE_SIZE, refcount_cache_size // cluster_size)
    if l2_entries > 0x7FFFFFFF:
        raise InvalidArgument("L2 cache size too big")
    if rc_entries > 0x7FFFFFFF:
        raise InvalidArgument("Refcount cache size too big")
    return l2_entries, l2_cache_entry_size, rc_entries


class Qcow2Cache:
    """An LRU write-back cache of fixed-size metadata tables keyed by host offset."""

    def __init__(self, file_node, entry_size: int, capacity: int, name: str):
        self.file = file_node
        self.entry_size = entry_size
        self.capacity = max(1, capacity)
        self.name = name
        self.entries: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.depends: "Qcow2Cache | None" = None
        self.writable = True
        # qcow2_pre_write_overlap_check() for this cache's tables: overlap(offset, size)
        self.overlap = None

    def child_replaced(self, old, new) -> None:
        """The image's file edge was moved to another node (graph.replace_node)."""
        if self.file is old:
            self.file = new

    # ---- lookup ----------------------------------------------------------------------
    def get(self, offset: int) -> bytearray:
        """qcow2_cache_get(): the table at offset, read from disk on a miss."""
        t = self.entries.get(offset)
        if t is not None:
            self.entries.move_to_end(offset)
            return t
        t = bytearray(self.entry_size)
        self.file.preadv(offset, memoryview(t))
        self._insert(offset, t)
        return t

    def get_empty(self, offset: int) -> bytearray:
        """qcow2_cache_get_empty(): an entry for offset without reading it (zeroed)."""
        t = self.entries.get(offset)
        if t is None:
            t = bytearray(self.entry_size)
            self._insert(offset, t)
        else:
            t[:] = bytes(self.entry_size)
            self.entries.move_to_end(offset)
        return t

    def lookup(self, offset: int) -> bytearray | None:
        """qcow2_cache_is_table_offset()."""
        return self.entries.get(offset)

    def _insert(self, offset: int, table: bytearray) -> None:
        while len(self.entries) >= self.capacity:
            old_off, old = next(iter(self.entries.items()))
            if old_off in self.dirty:
                self._write_back(old_off, old)
            del self.entries[old_off]
        self.entries[offset] = table

    # ---- dirty tracking ----------------------------------------------------------------
    def mark_dirty(self, offset: int, table: bytearray) -> None:
        """qcow2_cache_entry_mark_dirty(); re-inserts a table evicted meanwhile."""
        if self.entries.get(offset) is not table:
            if offset in self.entries:
                self.entries[offset][:] = table
                table = self.entries[offset]
            else:
                self._insert(offset, table)
        self.dirty.add(offset)

    # ---- dependencies (qcow2_cache_set_dependency / qcow2_cache_flush_dependency) ------
    def set_dependency(self, dependency: "Qcow2Cache") -> None:
        """Entries of this cache may only be written after dependency's are stable."""
        if dependency.depends is not None:
            dependency._flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            self._flush_dependency()
        self.depends = dependency

    def _flush_dependency(self) -> None:
        dep = self.depends
        if dep is not None:
            dep.flush()
            self.file.flush()
        self.depends = None

    def _write_back(self, offset: int, table: bytearray) -> None:
        if self.depends is not None:
            self._flush_dependency()
        if self.overlap is not None:
            self.overlap(offset, len(table))
        self.file.pwrite(offset, table)
        self.dirty.discard(offset)

    def flush(self) -> None:
        """qcow2_cache_write(): write every dirty entry (dependencies first)."""
        if not self.dirty:
            return
        if self.depends is not None:
            self._flush_dependency()
        for off in sorted(self.dirty):
            if self.overlap is not None:
                self.overlap(off, self.entry_size)
            self.file.pwrite(off, self.entries[off])
            self.dirty.discard(off)

    def discard(self, offset: int) -> None:
        """qcow2_cache_discard(): forget an entry without writing it."""
        self.entries.pop(offset, None)
        self.dirty.discard(offset)

    def discard_range(self, offset: int, length: int) -> None:
        """Forget every entry inside [offset, offset+length) (a freed cluster)."""
        if not self.entries:
            return
        if self.entry_size >= length:
            self.discard(offset)
            return
        for off in [o for o in self.entries if offset <= o < offset + length]:
            self.discard(off)

    def clear(self) -> None:
        """qcow2_cache_empty() (after a flush)."""
        self.entries.clear()
        self.dirty.clear()
