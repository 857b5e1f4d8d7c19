"""Queries behind `img map` and `img check`, independent of output format.

Library functions over a node (qemu-img.c get_block_status, img_map's grouping and
collect_image_check); ImageInfo itself comes from ``blockengine.info``.

``drv.check(fix)`` returns a dict of BdrvCheckResult fields (keys as in
``CHECK_FIELDS``, '-' or '_' spelling); a driver without ``check`` (or raising
NotSupported) has no checks, so new formats plug in without CLI changes.
"""
from __future__ import annotations


from .. import _native
from .._record import record
from ..drivers.base import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO)
from ..errors import BlockError, NotSupported

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
@record
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


def block_status_entries(node, offset: int, length: int) -> list[MapEntry]:
    """Bulk block_status_entry(): entries for consecutive extents from offset.

    The first is ``block_status_entry(node, offset, length)`` and each further one what
    ``block_status_entry`` answers at its start for the rest of the range (it is built
    from the nodes' block_status_runs and, for a range unallocated on top, from a bulk
    walk of the backing file over just that range).
    """
    out: list[MapEntry] = []
    try:
        _entries(node, offset, length, 0, out, {})
    except BlockError:
        if not out:
            raise
        # the entries before the failing lookup are complete; asked at its start,
        # the error comes again (after the entries before it were output)
    return out


class StatusCursor:
    """block_status_above() (or block_status() with ``above=False``) of one node for a
    caller walking forward, served from bulk queries: an answer at the end of the
    previous one, for a range with the same end, is the next run of the last batch.

    A caller that mostly asks inside runs (compare of differently laid out images)
    would waste most of each batch, so then the cursor asks one status at a time until
    the caller walks run by run again.

    With ``merge_holes`` an answer without data or host offset extends over the runs
    after it in the batch with the same flags: for a caller whose result does not
    depend on where such a range is cut (convert, compare without progress output),
    a huge sparse image is then a few thousand answers instead of one per L2 slice."""

    SEQUENTIAL_TO_BULK = 8

    def __init__(self, node, above: bool = True, merge_holes: bool = False):
        self.node = node
        self.above = above
        self.merge_holes = merge_holes
        self._runs: list = []
        self._i = 0
        self._pos = self._end = -1
        self._bulk = True
        self._seq = 0

    def status(self, offset: int, length: int):
        end = offset + length
        seq = offset == self._pos and end == self._end
        if seq and self._i < len(self._runs):
            st = self._runs[self._i]
        else:
            node = self.node
            if self._bulk:
                if not seq and self._i * 2 < len(self._runs):
                    self._bulk, self._seq = False, 0    # most of the batch was wasted
            elif not seq:
                self._seq = 0
            else:
                self._seq += 1
                if self._seq >= self.SEQUENTIAL_TO_BULK:
                    self._bulk = True
            if self._bulk:
                if self.above:
                    self._runs = node.block_status_above_runs(offset, length, None, True)
                else:
                    self._runs = node.block_status_runs(offset, length, True)
            elif self.above:
                self._runs = [node.block_status_above(offset, length, None, True)]
            else:
                self._runs = [node.block_status(offset, length, True)]
            self._i, self._end = 0, end
            st = self._runs[0]
        if self.merge_holes and not st.flags & (BLOCK_DATA | BLOCK_OFFSET_VALID):
            runs, i, n = self._runs, self._i + 1, st.length
            while i < len(runs) and runs[i].flags == st.flags:
                n += runs[i].length
                i += 1
            st = st._replace(length=n)
            self._i = i - 1
        self._i += 1
        self._pos = offset + st.length if st.length else -1
        return st


def _entries(node, offset: int, length: int, depth: int, out: list, names: dict) -> int:
    """Append entries from offset at ``depth`` of the chain; returns the bytes covered."""
    node = node.skip_filters()
    done = 0
    runs = node.block_status_runs(offset, length, True)
    i = 0
    while i < len(runs):
        st = runs[i]
        i += 1
        n = st.length
        flags = st.flags
        if not flags & (BLOCK_ZERO | BLOCK_DATA):
            cow = node.cow_child()
            if cow is not None:
                # repetitions of one answer (the slices of unallocated L2 tables): one
                # walk below for all of them, whose entries img_map() would merge anyway
                while i < len(runs) and runs[i] is st:
                    n += st.length
                    i += 1
                got = _entries(cow.node, offset, n, depth + 1, out, names)
                done += got
                if got != n or not got:
                    return done     # the lower layer's answer was shorter: ask again
                offset += n
                continue
            flags = 0
        filename = None
        if flags & BLOCK_OFFSET_VALID:
            host_offset, hn = st.host_offset, st.host_node
            if hn is not None:
                filename = names.get(id(hn))
                if filename is None:
                    filename = names[id(hn)] = hn.filename()
        else:
            host_offset = None
        out.append(MapEntry(offset, n, bool(flags & BLOCK_DATA), bool(flags & BLOCK_ZERO),
                            depth, bool(flags & BLOCK_ALLOCATED), host_offset, filename))
        done += n
        offset += n
        if not n:
            break
    return done


class ExternalClusters(Exception):
    """A human map met data without a host offset (compressed, encrypted, ...)."""


def map_output(node, start: int, end: int, human: bool = False):
    """`img map` output for [start, end), in chunks of bytes, grouped exactly as
    img_map() does (JSON entries separated by ",\\n", without the brackets; or the
    human lines of the data extents).

    Entries come from the driver's bulk ``map_packed`` where it has one (a whole L2
    slice in one native call) and otherwise from block_status_entries(); the native
    map_feed merges and prints them.  A human map of data that has no host offset
    raises ExternalClusters after yielding the output before it."""
    names: list[bytes] = [b""]
    ids: dict[str, int] = {}

    def file_id(name: str | None) -> int:
        if name is None:
            return 0
        i = ids.get(name)
        if i is None:
            i = ids[name] = len(names)
            names.append(name.encode(errors="surrogateescape"))
        return i

    state = _native.map_state(human, start)
    offset = start
    while offset < end:
        packed, covered = _map_batch(node, offset, end, file_id)
        text, ok = _native.map_feed(state, packed, names)
        yield text
        if not ok:
            raise ExternalClusters()
        if not covered:
            break
        offset += covered
    text, ok = _native.map_finish(state, names)
    yield text
    if not ok:
        raise ExternalClusters()


def _map_batch(node, offset: int, end: int, file_id) -> tuple[bytes, int]:
    """Packed map entries from offset on, and the bytes they cover."""
    top = node.skip_filters()
    fast = getattr(top.drv, "map_packed", None)
    if fast is not None:
        try:
            with top.lock:
                got = fast(offset, end - offset, file_id)
        except BlockError:
            got = None          # the generic lookup reports it, after what came before
        if got is not None and got[1]:
            return got
    asked = min(end - offset, 1 << 30)
    batch = block_status_entries(node, offset, asked)
    # the last extent may have been cut by the length asked, where a lookup at its
    # own start would ask for more: look it up again then
    if (len(batch) > 1 and offset + asked < end
            and batch[-1].start + batch[-1].length == offset + asked):
        batch.pop()
    if not batch:
        batch = [block_status_entry(node, offset, asked)]
    pack = _native.MAP_ENTRY.pack
    packed = b"".join(pack(e.start, e.length, e.offset or 0, _map_flags(e), e.depth,
                           file_id(e.filename), 0) for e in batch)
    return packed, sum(e.length for e in batch)


def _map_flags(e: MapEntry) -> int:
    """The MAP_* flags of a packed map entry."""
    flags = 0
    for present, bit in ((e.data, _native.MAP_DATA), (e.zero, _native.MAP_ZERO),
                         (e.present, _native.MAP_PRESENT),
                         (e.offset is not None, _native.MAP_HAS_OFFSET)):
        if present:
            flags |= bit
    return flags


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
