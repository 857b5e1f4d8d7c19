"""Queries behind `img map` and `img check`, independent of output format.

Library functions over a node (qemu-img.c get_block_status, img_map's grouping and
collect_image_check); ImageInfo itself comes from ``blockengine.info``.

``drv.check(fix)`` returns a dict of BdrvCheckResult fields (keys as in
``CHECK_FIELDS``, '-' or '_' spelling); a driver without ``check`` (or raising
NotSupported) has no checks, so new formats plug in without CLI changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..drivers.base import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO)
from ..errors import NotSupported

FIX_LEAKS, FIX_ERRORS = 1, 2
# ImageCheck members in QAPI order, and the driver result key each comes from
CHECK_FIELDS = ("check-errors", "image-end-offset", "corruptions", "leaks",
                "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                "fragmented-clusters", "compressed-clusters")


def cluster_size(node) -> int:
    """bdrv_get_cluster_size(): the format's cluster size, else the request alignment."""
    info = node.drv.get_info()
    if info and info.get("cluster_size"):
        return info["cluster_size"]
    return node.request_alignment


# ---- map -----------------------------------------------------------------------------------------
@dataclass
class MapEntry:
    """One run of `img map` output; offset/filename are None when not known."""
    start: int
    length: int
    data: bool
    zero: bool
    depth: int
    present: bool
    offset: int | None
    filename: str | None

    def mergeable(self, nxt: "MapEntry") -> bool:
        """entry_mergeable(): nxt continues this run in every respect."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present) != (
                nxt.zero, nxt.data, nxt.depth, nxt.present):
            return False
        if (self.filename is None) != (nxt.filename is None) or (
                self.offset is None) != (nxt.offset is None):
            return False
        if self.filename is not None and self.filename != nxt.filename:
            return False
        if self.offset is not None and self.offset + self.length != nxt.offset:
            return False
        return True


def block_status_entry(node, offset: int, length: int) -> MapEntry:
    """get_block_status() of qemu-img: status at offset, walking down the backing chain."""
    depth = 0
    while True:
        node = node.skip_filters()
        st = node.block_status(offset, length, True)
        length = st.length
        flags = st.flags
        if flags & (BLOCK_ZERO | BLOCK_DATA):
            break
        cow = node.cow_child()
        if cow is None:
            flags = 0
            break
        node = cow.node
        depth += 1
    has_offset = bool(flags & BLOCK_OFFSET_VALID)
    filename = None
    if has_offset and st.host_node is not None:
        filename = st.host_node.filename()
    return MapEntry(offset, length, bool(flags & BLOCK_DATA), bool(flags & BLOCK_ZERO),
                    depth, bool(flags & BLOCK_ALLOCATED),
                    st.host_offset if has_offset else None, filename)


def map_entries(node, start: int, end: int, human: bool = False):
    """Merged MapEntry runs covering [start, end), grouped exactly as img_map() does.

    Yields (entry, next_entry_or_None); an empty range yields one zero-length entry.
    ``human``: the human format does not distinguish unallocated, zero and zero data,
    so runs following a printed entry are normalised to 'zero' before merging.
    """
    curr = MapEntry(start, 0, False, False, 0, False, None, None)
    while curr.start + curr.length < end:
        offset = curr.start + curr.length
        nxt = block_status_entry(node, offset, min(end - offset, 1 << 30))
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr, nxt
            if human and (not nxt.data or nxt.zero):
                nxt.data, nxt.zero = False, True
        curr = nxt
    yield curr, None


# ---- check ---------------------------------------------------------------------------------------
def image_check(node, filename: str, fix: int = 0) -> dict:
    """collect_image_check(): ImageCheck dict; raises NotSupported if the format has none."""
    checker = getattr(node.drv, "check", None)
    if checker is None:
        raise NotSupported("This image format does not support checks")
    result = checker(fix) or {}
    get = lambda k: result.get(k, result.get(k.replace("-", "_"), 0)) or 0  # noqa: E731
    check = {"filename": filename, "format": node.drv.info.name,
             "check-errors": get("check-errors")}
    for key in CHECK_FIELDS[1:]:
        if get(key):
            check[key] = get(key)
    return check
