"""Pure-Python twins of the native hot paths (``native/*.c``).

Every public function here has exactly the signature, results and exceptions
of its counterpart in :mod:`blockengine._native` when the compiled module
``blockengine._be_native`` is in use; ``tests/unit/test_native.py`` checks
that with hypothesis.  Import :mod:`blockengine._native`, not this module:
it picks the fastest available backend.

Shared contracts
----------------
* Buffers are any C-contiguous objects supporting the buffer protocol
  (``bytes``, ``bytearray``, ``memoryview``, ``array``, ``mmap``).  Functions
  that modify a buffer need a writable one (else ``TypeError``).
* An index or length outside the buffer (including a negative one) raises
  ``IndexError``; an invalid parameter (refcount order, cluster_bits,
  granularity, a bitmap whose length is not a multiple of 8 bytes...) raises
  ``ValueError``.  Neither ever leaves a buffer partially modified.
* On-disk data is big-endian as qcow2 stores it.  Bitmaps are arrays of
  little-endian 64-bit words: bit ``i`` is bit ``i % 64`` of word ``i // 64``,
  which is byte for byte the qcow2 on-disk bitmap layout (bit ``i % 8`` of byte
  ``i // 8``).
"""

from __future__ import annotations

import errno
import os
import struct
from array import array

# ---------------------------------------------------------------- constants
# Status codes (mirror BE_* in native/be.h).
OK = 0
E_OVERFLOW = -4
E_UNDERFLOW = -5

# Kinds of L2 runs.
L2_UNALLOCATED = 0
L2_ZERO_PLAIN = 1
L2_ZERO_ALLOC = 2
L2_NORMAL = 3
L2_COMPRESSED = 4
L2_INVALID = 5

# Kinds of subcluster runs (extended L2 entries).
SC_UNALLOCATED = 0
SC_ZERO = 1
SC_ALLOCATED = 2
SC_INVALID = 3

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED = 0x3F000000000001FE
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF

_U64_MAX = (1 << 64) - 1
_L2_RUN_INDEX_LIMIT = 0xFFFFFFFF

__all__ = [
    "OK", "E_OVERFLOW", "E_UNDERFLOW",
    "L2_UNALLOCATED", "L2_ZERO_PLAIN", "L2_ZERO_ALLOC", "L2_NORMAL",
    "L2_COMPRESSED", "L2_INVALID",
    "SC_UNALLOCATED", "SC_ZERO", "SC_ALLOCATED", "SC_INVALID",
    "l2_scan", "subcluster_runs",
    "refcount_get", "refcount_get_range", "refcount_set_range",
    "refcount_add_range", "refcount_free_run", "refcount_find_free",
    "refcount_count_nonzero", "refcount_compare",
    "bitmap_set_range", "bitmap_reset_range", "bitmap_count",
    "bitmap_next_set", "bitmap_next_clear", "bitmap_next_dirty_area",
    "bitmap_merge_or", "bitmap_serialize", "bitmap_deserialize",
    "buffer_is_zero", "buffers_equal", "zero_runs",
    "sector_ivs", "xts_xor", "cbc_decrypt_xor", "cbc_encrypt_step", "ctr_counters",
    "xor_into",
    "MAP_DATA", "MAP_ZERO", "MAP_PRESENT", "MAP_HAS_OFFSET", "MAP_STOP", "MAP_ENTRY",
    "l2_map", "seek_map", "map_state", "map_feed", "map_finish",
    "check_l2", "l2_copied_mismatches",
]


# ------------------------------------------------------------------ helpers
def _bytes_view(buf, writable: bool = False) -> memoryview:
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise TypeError("a writable buffer is required")
    return mv


def _check_range(start: int, n: int, limit: int) -> None:
    """``IndexError`` unless [start, start + n) lies within [0, limit)."""
    if start < 0 or n < 0 or start > limit or n > limit - start:
        raise IndexError(f"range [{start}, {start}+{n}) outside [0, {limit})")


def _check_span(start: int, end: int, limit: int) -> None:
    if start < 0 or end < start or end > limit:
        raise IndexError(f"range [{start}, {end}) outside [0, {limit})")


# ----------------------------------------------------------------------- L2
def _classify(entry: int, bitmap: int, extended: bool, cluster_bits: int,
              data_file: bool) -> tuple[int, int]:
    """(kind, host_offset) of one L2 entry; mirrors classify() in l2.c."""
    if entry & QCOW_OFLAG_COMPRESSED:
        x = 70 - cluster_bits
        off = entry & ((1 << x) - 1)
        if x > 56 and off >> 56:
            return L2_INVALID, off
        if extended and bitmap:
            return L2_INVALID, off
        return L2_COMPRESSED, off
    off = entry & L2E_OFFSET_MASK
    reserved = L2E_STD_RESERVED | (QCOW_OFLAG_ZERO if extended else 0)
    if entry & reserved:
        return L2_INVALID, off
    if not extended and entry & QCOW_OFLAG_ZERO:
        kind = L2_ZERO_ALLOC if off else L2_ZERO_PLAIN
    elif off == 0 and not (data_file and entry & QCOW_OFLAG_COPIED):
        kind = L2_UNALLOCATED
    else:
        kind = L2_NORMAL
    if kind == L2_NORMAL or kind == L2_ZERO_ALLOC:
        if off & ((1 << cluster_bits) - 1):
            return L2_INVALID, off
    else:
        off = 0
    if extended:
        if kind == L2_NORMAL and (bitmap >> 32) & bitmap:
            return L2_INVALID, off
        if kind == L2_UNALLOCATED and bitmap & L2_BITMAP_ALL_ALLOC:
            return L2_INVALID, off
    return kind, off


def l2_scan(table, start_index: int, count: int, extended: bool,
            cluster_bits: int, *, data_file: bool = False,
            max_runs: int | None = None) -> list[tuple[int, int, int, int, bool]]:
    """Classify L2 entries [start_index, start_index + count) into runs.

    ``table`` holds big-endian L2 entries, 8 bytes each (16 with
    ``extended``: the entry followed by its subcluster bitmap).  Returns a
    list of ``(first_index, n, kind, host_offset, copied)`` tuples that cover
    the range in order, where ``kind`` is an ``L2_*`` constant:

    * ``L2_UNALLOCATED`` / ``L2_ZERO_PLAIN``: host_offset is 0;
    * ``L2_ZERO_ALLOC`` / ``L2_NORMAL``: entries whose host offsets advance by
      one cluster each, starting at host_offset;
    * ``L2_COMPRESSED``: always one entry; host_offset is the compressed data
      offset (bits 0..x-1); read the raw entry for the sector count;
    * ``L2_INVALID``: always one entry that the caller must report as
      corruption: reserved bits set, unaligned host offset, a compressed
      offset beyond 2^56, or (extended) an impossible subcluster bitmap;
      host_offset is the offset field, for the error message.

    ``copied`` is the COPIED flag (bit 63), equal for all entries of a run.
    In extended mode (``ZERO_*`` kinds never occur there: bit 0 is reserved)
    entries of one run also have identical subcluster bitmaps, so the bitmap
    of a run's first entry describes every entry (see ``subcluster_runs``).
    ``data_file``: an external data file is used, so offset 0 with COPIED set
    is a NORMAL cluster at host offset 0 (as qcow2_get_cluster_type()).
    ``max_runs``: return only the first max_runs runs (block status needs one).

    Raises ValueError unless 9 <= cluster_bits <= 21, IndexError if the range
    exceeds the table.
    """
    mv = _bytes_view(table)
    if not 9 <= cluster_bits <= 21:
        raise ValueError(f"invalid cluster_bits {cluster_bits}")
    esize = 16 if extended else 8
    n_entries = len(mv) // esize
    _check_range(start_index, count, n_entries)
    if start_index + count > _L2_RUN_INDEX_LIMIT:
        raise IndexError("L2 index beyond 2^32")
    if count == 0:
        return []
    cluster_size = 1 << cluster_bits
    words = struct.unpack_from(f">{count * esize // 8}Q", mv, start_index * esize)
    step = esize // 8
    runs: list[tuple[int, int, int, int, bool]] = []
    cur_first = cur_n = cur_kind = cur_host = cur_bitmap = 0
    cur_copied = False
    for k in range(count):
        entry = words[k * step]
        bitmap = words[k * step + 1] if extended else 0
        kind, host = _classify(entry, bitmap, extended, cluster_bits, data_file)
        copied = bool(entry & QCOW_OFLAG_COPIED)
        if cur_n:
            if (kind == cur_kind and copied == cur_copied and bitmap == cur_bitmap
                    and kind != L2_COMPRESSED and kind != L2_INVALID
                    and (kind not in (L2_NORMAL, L2_ZERO_ALLOC)
                         or host == cur_host + cur_n * cluster_size)):
                cur_n += 1
                continue
            runs.append((cur_first, cur_n, cur_kind, cur_host, cur_copied))
            if max_runs is not None and len(runs) >= max_runs:
                return runs
        cur_first, cur_n, cur_kind, cur_host = start_index + k, 1, kind, host
        cur_copied, cur_bitmap = copied, bitmap
    runs.append((cur_first, cur_n, cur_kind, cur_host, cur_copied))
    return runs


def subcluster_runs(bitmap: int, first_sc: int) -> tuple[int, int]:
    """Classify the run of subclusters starting at ``first_sc`` (0..31).

    ``bitmap`` is the 64-bit subcluster bitmap of an extended L2 entry (bits
    0-31 allocated, 32-63 reads-as-zero).  Returns ``(kind, n)``: kind is
    ``SC_ZERO`` (zero bit set; takes precedence as in
    qcow2_get_subcluster_type()), ``SC_ALLOCATED`` or ``SC_UNALLOCATED``, and
    n >= 1 the number of consecutive subclusters of that kind.  If any
    subcluster has both bits set the whole cluster is invalid:
    ``(SC_INVALID, 32 - first_sc)``.  IndexError unless 0 <= first_sc < 32,
    ValueError unless 0 <= bitmap < 2^64.
    """
    if not 0 <= bitmap <= _U64_MAX:
        raise ValueError("bitmap must be a 64-bit unsigned integer")
    if not 0 <= first_sc <= 31:
        raise IndexError(f"subcluster index {first_sc} outside [0, 32)")
    alloc = bitmap & 0xFFFFFFFF
    zero = bitmap >> 32
    if alloc & zero:
        return SC_INVALID, 32 - first_sc
    if zero >> first_sc & 1:
        kind, same = SC_ZERO, zero
    elif alloc >> first_sc & 1:
        kind, same = SC_ALLOCATED, alloc
    else:
        kind, same = SC_UNALLOCATED, ~(alloc | zero) & 0xFFFFFFFF
    rest = ~(same >> first_sc) & _U64_MAX
    n = (rest & -rest).bit_length() - 1
    return kind, min(n, 32 - first_sc)


# ----------------------------------------------------------------- refcount
_BE_FORMAT = {3: "B", 4: "H", 5: "I", 6: "Q"}


def _check_block(mv: memoryview, order: int) -> int:
    """Validate a refcount block; return its number of entries."""
    if not 0 <= order <= 6:
        raise ValueError(f"invalid refcount order {order}")
    if len(mv) % 8:
        raise ValueError("refcount block length must be a multiple of 8")
    return (len(mv) * 8) >> order


def _rc_max(order: int) -> int:
    return (1 << (1 << order)) - 1


def _rc_read(mv: memoryview, order: int, index: int, n: int) -> list[int]:
    if order >= 3:
        width = 1 << (order - 3)
        return list(struct.unpack_from(f">{n}{_BE_FORMAT[order]}", mv, index * width))
    w = 1 << order
    per_byte = 8 >> order
    mask = (1 << w) - 1
    out = []
    for i in range(index, index + n):
        out.append(mv[i // per_byte] >> ((i % per_byte) * w) & mask)
    return out


def _rc_write(mv: memoryview, order: int, index: int, values: list[int]) -> None:
    if order >= 3:
        width = 1 << (order - 3)
        struct.pack_into(f">{len(values)}{_BE_FORMAT[order]}", mv, index * width, *values)
        return
    w = 1 << order
    per_byte = 8 >> order
    mask = (1 << w) - 1
    for k, v in enumerate(values):
        i = index + k
        shift = (i % per_byte) * w
        b = i // per_byte
        mv[b] = (mv[b] & ~(mask << shift) & 0xFF) | (v << shift)


def refcount_get(block, order: int, index: int) -> int:
    """Refcount of entry ``index`` of a refcount block of ``1 << order``-bit
    entries (order 0..6; big-endian for >= 8 bits, lowest index in the least
    significant bits of a byte for narrower ones)."""
    mv = _bytes_view(block)
    total = _check_block(mv, order)
    if not 0 <= index < total:
        raise IndexError(f"refcount index {index} outside [0, {total})")
    return _rc_read(mv, order, index, 1)[0]


def refcount_get_range(block, order: int, index: int, n: int) -> array:
    """Refcounts of entries [index, index + n) as an ``array('Q')``."""
    mv = _bytes_view(block)
    total = _check_block(mv, order)
    _check_range(index, n, total)
    return array("Q", _rc_read(mv, order, index, n))


def refcount_set_range(block, order: int, index: int, n: int, value: int) -> None:
    """Set entries [index, index + n) of a writable block to ``value``
    (ValueError unless 0 <= value < 2 ** (1 << order))."""
    mv = _bytes_view(block, writable=True)
    total = _check_block(mv, order)
    if not 0 <= value <= _rc_max(order):
        raise ValueError(f"refcount {value} does not fit in {1 << order} bits")
    _check_range(index, n, total)
    if n:
        _rc_write(mv, order, index, [value] * n)


def refcount_add_range(block, order: int, index: int, n: int, delta: int) -> int:
    """Add ``delta`` (any int) to entries [index, index + n) of a writable block.

    Returns ``OK``, or ``E_OVERFLOW`` / ``E_UNDERFLOW`` if any entry would leave
    [0, 2 ** (1 << order)); in that case nothing was modified.
    """
    mv = _bytes_view(block, writable=True)
    total = _check_block(mv, order)
    _check_range(index, n, total)
    if n == 0 or delta == 0:
        return OK
    values = _rc_read(mv, order, index, n)
    rc_max = _rc_max(order)
    if delta < 0:
        if min(values) + delta < 0:
            return E_UNDERFLOW
    elif max(values) + delta > rc_max:
        return E_OVERFLOW
    _rc_write(mv, order, index, [v + delta for v in values])
    return OK


def _first_nonzero(mv: memoryview, order: int, start: int, limit: int) -> int:
    """First entry in [start, limit) with a non-zero refcount, or limit."""
    if start >= limit:
        return limit
    if order >= 3:
        width = 1 << (order - 3)
        stripped = bytes(mv[start * width:limit * width]).lstrip(b"\0")
        if not stripped:
            return limit
        first_byte = limit * width - len(stripped)
        return first_byte // width
    for i, v in enumerate(_rc_read(mv, order, start, limit - start)):
        if v:
            return start + i
    return limit


def refcount_free_run(block, order: int, start: int) -> int:
    """Number of consecutive zero refcounts from entry ``start`` (which may be
    the number of entries, giving 0)."""
    mv = _bytes_view(block)
    total = _check_block(mv, order)
    if not 0 <= start <= total:
        raise IndexError(f"refcount index {start} outside [0, {total}]")
    return _first_nonzero(mv, order, start, total) - start


def refcount_find_free(block, order: int, start: int, n_needed: int) -> int:
    """Index of the first run of ``n_needed`` (>= 1) zero refcounts at or
    after ``start``, lying entirely within the block, or -1.  (Runs that
    continue into the next block are the caller's business: see
    ``refcount_free_run``.)"""
    mv = _bytes_view(block)
    total = _check_block(mv, order)
    if n_needed < 1:
        raise ValueError("n_needed must be at least 1")
    if not 0 <= start <= total:
        raise IndexError(f"refcount index {start} outside [0, {total}]")
    values = _rc_read(mv, order, start, total - start)
    run = 0
    for i, v in enumerate(values):
        if v:
            run = 0
            continue
        run += 1
        if run == n_needed:
            return start + i - n_needed + 1
    return -1


def refcount_count_nonzero(block, order: int) -> int:
    """Number of entries of the block with a non-zero refcount."""
    mv = _bytes_view(block)
    total = _check_block(mv, order)
    if order == 0:
        return int.from_bytes(mv, "little").bit_count()
    if order == 3:
        return total - bytes(mv).count(0)
    return sum(1 for v in _rc_read(mv, order, 0, total) if v)


def refcount_compare(computed, block, order: int, first_index: int) -> list[int]:
    """Block indices ``first_index + i`` where ``computed[i]`` (a sequence of
    non-negative ints, ideally an ``array('Q')``) differs from the refcount
    stored in the block (for the image checker)."""
    mv = _bytes_view(block)
    total = _check_block(mv, order)
    n = len(computed)
    _check_range(first_index, n, total)
    stored = _rc_read(mv, order, first_index, n)
    return [first_index + i for i, (a, b) in enumerate(zip(computed, stored)) if a != b]


# ------------------------------------------------------------------ bitmaps
_CHUNK = 1 << 16
_ZERO_CHUNK = bytes(_CHUNK)
_ONES_CHUNK = b"\xff" * _CHUNK


def _bitmap_view(buf, writable: bool = False) -> memoryview:
    mv = _bytes_view(buf, writable)
    if len(mv) % 8:
        raise ValueError("bitmap length must be a multiple of 8 bytes")
    return mv


def _fill(mv: memoryview, start: int, n: int, value: int) -> None:
    if n == 0:
        return
    end = start + n
    b0, b1 = start >> 3, end >> 3
    if b0 == b1:
        m = ((1 << (end & 7)) - 1) & (0xFF << (start & 7))
        mv[b0] = (mv[b0] | m) if value else (mv[b0] & ~m & 0xFF)
        return
    if start & 7:
        m = 0xFF << (start & 7) & 0xFF
        mv[b0] = (mv[b0] | m) if value else (mv[b0] & ~m & 0xFF)
        b0 += 1
    mv[b0:b1] = (b"\xff" if value else b"\0") * (b1 - b0)
    if end & 7:
        m = (1 << (end & 7)) - 1
        mv[b1] = (mv[b1] | m) if value else (mv[b1] & ~m & 0xFF)


def _bits(mv: memoryview, start: int, end: int) -> int:
    """Bits [start, end) as an int (bit 0 = bit start)."""
    b0, b1 = start >> 3, (end + 7) >> 3
    v = int.from_bytes(mv[b0:b1], "little") >> (start & 7)
    return v & ((1 << (end - start)) - 1)


def bitmap_set_range(buf, start: int, n: int) -> None:
    """Set bits [start, start + n) of a writable bitmap."""
    mv = _bitmap_view(buf, writable=True)
    _check_range(start, n, len(mv) * 8)
    _fill(mv, start, n, 1)


def bitmap_reset_range(buf, start: int, n: int) -> None:
    """Clear bits [start, start + n) of a writable bitmap."""
    mv = _bitmap_view(buf, writable=True)
    _check_range(start, n, len(mv) * 8)
    _fill(mv, start, n, 0)


def bitmap_count(buf, start: int, n: int) -> int:
    """Number of set bits in [start, start + n)."""
    mv = _bitmap_view(buf)
    _check_range(start, n, len(mv) * 8)
    return _bits(mv, start, start + n).bit_count() if n else 0


def _find_bit(mv: memoryview, start: int, end: int, value: int) -> int:
    boring = _ZERO_CHUNK if value else _ONES_CHUNK
    pos = start
    while pos < end:
        stop = min(end, (pos & ~7) + _CHUNK * 8)
        if boring.startswith(mv[pos >> 3:(stop + 7) >> 3]):   # memcmp
            pos = stop
            continue
        bits = _bits(mv, pos, stop)
        if not value:
            bits = ~bits & ((1 << (stop - pos)) - 1)
        if bits:
            return pos + (bits & -bits).bit_length() - 1
        pos = stop
    return -1


def bitmap_next_set(buf, start: int, end: int) -> int:
    """First set bit in [start, end), or -1."""
    mv = _bitmap_view(buf)
    _check_span(start, end, len(mv) * 8)
    return _find_bit(mv, start, end, 1)


def bitmap_next_clear(buf, start: int, end: int) -> int:
    """First clear bit in [start, end), or -1."""
    mv = _bitmap_view(buf)
    _check_span(start, end, len(mv) * 8)
    return _find_bit(mv, start, end, 0)


def bitmap_next_dirty_area(buf, start: int, end: int, max_len: int) -> tuple[int, int] | None:
    """First run of set bits in [start, end) as ``(first, length)``, with
    length clipped to ``max_len`` (>= 1) and to ``end``; None if no bit is set
    (mirrors hbitmap_next_dirty_area())."""
    mv = _bitmap_view(buf)
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    _check_span(start, end, len(mv) * 8)
    first = _find_bit(mv, start, end, 1)
    if first < 0:
        return None
    limit = min(end, first + max_len)
    clear = _find_bit(mv, first, limit, 0)
    return first, (limit if clear < 0 else clear) - first


def bitmap_merge_or(dst, src) -> None:
    """``dst |= src`` for two bitmaps of the same length (else ValueError)."""
    dmv = _bitmap_view(dst, writable=True)
    smv = _bitmap_view(src)
    if len(dmv) != len(smv):
        raise ValueError("bitmaps differ in length")
    for off in range(0, len(dmv), _CHUNK):
        a = dmv[off:off + _CHUNK]
        merged = int.from_bytes(a, "little") | int.from_bytes(smv[off:off + _CHUNK], "little")
        a[:] = merged.to_bytes(len(a), "little")


def bitmap_serialize(buf, start: int, n: int) -> bytes:
    """Bits [start, start + n) in the qcow2 on-disk bitmap format: ceil(n / 8)
    bytes, bit j of the result being bit start + j, unused tail bits zero."""
    mv = _bitmap_view(buf)
    _check_range(start, n, len(mv) * 8)
    if start & 7 == 0:
        out = bytearray(mv[start >> 3:(start + n + 7) >> 3])
        if n & 7:
            out[-1] &= (1 << (n & 7)) - 1
        return bytes(out)
    return _bits(mv, start, start + n).to_bytes((n + 7) >> 3, "little")


def bitmap_deserialize(buf, start: int, n: int, data) -> None:
    """Overwrite bits [start, start + n) of a writable bitmap with bits
    [0, n) of ``data`` (qcow2 on-disk bitmap format; at least ceil(n / 8)
    bytes, IndexError otherwise).  Other bits are left alone."""
    mv = _bitmap_view(buf, writable=True)
    dmv = _bytes_view(data)
    _check_range(start, n, len(mv) * 8)
    if len(dmv) < (n + 7) >> 3:
        raise IndexError("data shorter than the bit range")
    if n == 0:
        return
    end = start + n
    b0, b1 = start >> 3, (end + 7) >> 3
    old = int.from_bytes(mv[b0:b1], "little")
    sh = start & 7
    mask = ((1 << n) - 1) << sh
    new = (int.from_bytes(dmv[:(n + 7) >> 3], "little") << sh) & mask
    mv[b0:b1] = ((old & ~mask) | new).to_bytes(b1 - b0, "little")


def buffers_equal(a, b) -> bool:
    """True iff the two buffers have the same bytes (memcmp speed, chunk by chunk)."""
    va, vb = _bytes_view(a), _bytes_view(b)
    if len(va) != len(vb):
        return False
    return all(bytes(va[pos:pos + _CHUNK]) == vb[pos:pos + _CHUNK]
               for pos in range(0, len(va), _CHUNK))


def buffer_is_zero(buf, offset: int = 0, length: int | None = None) -> bool:
    """True iff bytes [offset, offset + length) of ``buf`` are all zero
    (length defaults to the rest of the buffer; an empty range is zero)."""
    mv = _bytes_view(buf)
    if length is None:
        length = len(mv) - offset
    _check_range(offset, length, len(mv))
    end = offset + length
    for pos in range(offset, end, _CHUNK):
        if not _ZERO_CHUNK.startswith(mv[pos:min(end, pos + _CHUNK)]):   # memcmp
            return False
    return True


def zero_runs(buf, granularity: int) -> list[tuple[int, int, bool]]:
    """Split ``buf`` into chunks of ``granularity`` (>= 1) bytes (the last one
    may be shorter) and return maximal runs of all-zero / not-all-zero chunks
    as ``(start, length, is_zero)``, alternating, covering the whole buffer
    (for qemu-img convert -S)."""
    if granularity < 1:
        raise ValueError("granularity must be at least 1")
    mv = _bytes_view(buf)
    runs: list[tuple[int, int, bool]] = []
    size = len(mv)
    cur_start = cur_len = 0
    cur_zero = False
    zero_chunk = bytes(granularity) if granularity <= _CHUNK else None
    for off in range(0, size, granularity):
        chunk = mv[off:off + granularity]
        if zero_chunk is not None:
            z = zero_chunk.startswith(chunk)
        else:
            z = buffer_is_zero(chunk)
        if cur_len and z == cur_zero:
            cur_len += len(chunk)
            continue
        if cur_len:
            runs.append((cur_start, cur_len, cur_zero))
        cur_start, cur_len, cur_zero = off, len(chunk), z
    if cur_len:
        runs.append((cur_start, cur_len, cur_zero))
    return runs


# ------------------------------------------------------------ sector crypto
# The byte shuffling around bulk AES-ECB calls (native/crypto.c has the theory):
# IVs and tweaks are 16 bytes per sector, sector k of a buffer is bytes
# [k * sector_size, (k + 1) * sector_size); ``length`` and ``sector_size`` must be
# multiples of 16 (ValueError).  A destination may be the same buffer as a source.
_BLK = 16
_U128_MAX = (1 << 128) - 1


def _check_sectors(length: int, sector_size: int, *limits: int) -> None:
    """ValueError for a bad geometry, IndexError when a buffer is too small:
    ``limits`` are (bytes available for the data..., IVs available)."""
    if sector_size <= 0 or sector_size % _BLK or length % _BLK:
        raise ValueError("length and sector_size must be multiples of 16")
    *data_limits, n_ivs = limits
    if length < 0 or any(length > lim for lim in data_limits) \
            or -(-length // sector_size) > n_ivs:
        raise IndexError(f"{length} bytes of sectors do not fit the buffers")


def sector_ivs(out, first_sector: int, count: int, width: int) -> None:
    """Write ``count`` 16-byte IVs to ``out``: sector ``first_sector + i``
    (modulo 2**64) little-endian, truncated to ``width`` bytes (4: plain,
    8: plain64), zero padded."""
    mv = _bytes_view(out, writable=True)
    if width not in (4, 8) or count < 0:
        raise ValueError("width must be 4 or 8 and count >= 0")
    if count > len(mv) // _BLK:
        raise IndexError(f"{count} IVs do not fit {len(mv)} bytes")
    mask = (1 << (8 * width)) - 1
    mv[:count * _BLK] = b"".join(((first_sector + i) & _U64_MAX & mask).to_bytes(_BLK, "little")
                                for i in range(count))


def xts_xor(dst, src, length: int, tweaks, sector_size: int) -> None:
    """``dst[:length] = src[:length] ^ T``, where the tweak of block j of sector k
    is ``tweaks[k] * alpha**j`` in GF(2**128) (IEEE 1619 XTS, little-endian)."""
    d, s, t = _bytes_view(dst, writable=True), _bytes_view(src), _bytes_view(tweaks)
    _check_sectors(length, sector_size, len(d), len(s), len(t) // _BLK)
    out = bytearray(length)
    for k, start in enumerate(range(0, length, sector_size)):
        tweak = int.from_bytes(t[k * _BLK:(k + 1) * _BLK], "little")
        for pos in range(start, min(start + sector_size, length), _BLK):
            block = int.from_bytes(s[pos:pos + _BLK], "little") ^ tweak
            out[pos:pos + _BLK] = block.to_bytes(_BLK, "little")
            tweak <<= 1
            if tweak >> 128:
                tweak ^= (1 << 128) | 0x87
    d[:length] = out


def _xor16(a, b) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(_BLK, "little")


def cbc_decrypt_xor(dst, decrypted, ciphertext, length: int, ivs, sector_size: int) -> None:
    """Finish a CBC decryption done as ECB: block j of sector k becomes
    ``decrypted[j] ^ ciphertext[j - 1]``, or ``^ ivs[k]`` for j == 0."""
    d = _bytes_view(dst, writable=True)
    dec, c, iv = _bytes_view(decrypted), _bytes_view(ciphertext), _bytes_view(ivs)
    _check_sectors(length, sector_size, len(d), len(dec), len(c), len(iv) // _BLK)
    out = bytearray(length)
    for pos in range(0, length, _BLK):
        k = pos // sector_size
        chain = c[pos - _BLK:pos] if pos % sector_size else iv[k * _BLK:(k + 1) * _BLK]
        out[pos:pos + _BLK] = _xor16(dec[pos:pos + _BLK], chain)
    d[:length] = out


def cbc_encrypt_step(out, plain, length: int, lanes, sector_size: int, block: int) -> None:
    """One step of CBC encryption of all sectors at once.  ``lanes`` holds one
    16-byte block per sector (initially the IVs): for each sector, if block > 0,
    copy its lane (the encrypted block - 1) to ``out``; then, if block < the
    blocks per sector, XOR plaintext block ``block`` into the lane.  The caller
    ECB-encrypts the lanes between steps.  ``length`` must be a multiple of
    ``sector_size``."""
    o, p, ln = _bytes_view(out, writable=True), _bytes_view(plain), _bytes_view(lanes, writable=True)
    blocks = sector_size // _BLK if sector_size > 0 else 0
    if sector_size > 0 and length % sector_size or not 0 <= block <= blocks:
        raise ValueError("length must be whole sectors and block within a sector")
    _check_sectors(length, sector_size, len(o), len(p), len(ln) // _BLK)
    for k in range(length // sector_size):
        lane = slice(k * _BLK, (k + 1) * _BLK)
        base = k * sector_size
        if block > 0:
            pos = base + (block - 1) * _BLK
            o[pos:pos + _BLK] = ln[lane]
        if block < blocks:
            pos = base + block * _BLK
            ln[lane] = _xor16(ln[lane], p[pos:pos + _BLK])


def ctr_counters(out, length: int, ivs, sector_size: int) -> None:
    """Write the CTR counter blocks of ``length`` bytes of sectors: block j of
    sector k is ``ivs[k] + j`` as a 128-bit big-endian number (as OpenSSL)."""
    o, iv = _bytes_view(out, writable=True), _bytes_view(ivs)
    _check_sectors(length, sector_size, len(o), len(iv) // _BLK)
    for k, start in enumerate(range(0, length, sector_size)):
        counter = int.from_bytes(iv[k * _BLK:(k + 1) * _BLK], "big")
        end = min(start + sector_size, length)
        o[start:end] = b"".join(((counter + j) & _U128_MAX).to_bytes(_BLK, "big")
                                for j in range((end - start) // _BLK))


def xor_into(dst, src, length: int) -> None:
    """``dst[:length] ^= src[:length]`` (any length)."""
    d, s = _bytes_view(dst, writable=True), _bytes_view(src)
    _check_range(0, length, min(len(d), len(s)))
    d[:length] = (int.from_bytes(d[:length], "little")
                  ^ int.from_bytes(s[:length], "little")).to_bytes(length, "little")


# ------------------------------------------------------------------ img map
MAP_DATA, MAP_ZERO, MAP_PRESENT, MAP_HAS_OFFSET = 1, 2, 4, 8
MAP_STOP = 0x100
_MAP_FIELDS = MAP_DATA | MAP_ZERO | MAP_PRESENT | MAP_HAS_OFFSET
#: A packed map entry: start, length, host offset, MAP_* flags, depth, file id, pad.
MAP_ENTRY = struct.Struct("=QQQIIII")


def l2_map(table, start_index: int, count: int, cluster_bits: int, guest: int,
           skip: int, length: int, unalloc_flags: int, file: int) -> tuple[bytes, int]:
    """`img map` entries (packed ``MAP_ENTRY`` records) of standard L2 entries
    [start_index, start_index + count): the first cluster maps guest offset
    ``guest``, ``skip`` bytes into it; they cover at most ``length`` bytes.

    NORMAL clusters are data with a host offset in file ``file``, ZERO_ALLOC zero
    with a host offset, ZERO_PLAIN zero, COMPRESSED data without an offset (all
    present); UNALLOCATED ones get ``unalloc_flags``, or end the list when it has
    ``MAP_STOP``, as an invalid entry does.  Returns (records, bytes covered).
    Raises ValueError for bad cluster_bits or skip, IndexError as l2_scan."""
    if not 9 <= cluster_bits <= 21 or skip >> cluster_bits:
        raise ValueError("l2_map: invalid argument")
    out = bytearray()
    covered, left = 0, length
    if count <= 0 or left <= 0:
        return bytes(out), 0
    pack = MAP_ENTRY.pack
    for _first, n, kind, host, _copied in l2_scan(table, start_index, count, False,
                                                  cluster_bits):
        if left <= 0:
            break
        offset = 0
        if kind == L2_NORMAL:
            flags, offset = MAP_DATA | MAP_PRESENT | MAP_HAS_OFFSET, host + skip
        elif kind == L2_ZERO_ALLOC:
            flags, offset = MAP_ZERO | MAP_PRESENT | MAP_HAS_OFFSET, host + skip
        elif kind == L2_ZERO_PLAIN:
            flags = MAP_ZERO | MAP_PRESENT
        elif kind == L2_COMPRESSED:
            flags = MAP_DATA | MAP_PRESENT
        elif kind == L2_UNALLOCATED and not unalloc_flags & MAP_STOP:
            flags = unalloc_flags & _MAP_FIELDS
        else:
            break
        nbytes = min((n << cluster_bits) - skip, left)
        out += pack(guest, nbytes, offset, flags, 0,
                    file if flags & MAP_HAS_OFFSET else 0, 0)
        guest += nbytes
        covered += nbytes
        left -= nbytes
        skip = 0
    return bytes(out), covered


def seek_map(fd: int, offset: int, length: int, file: int) -> tuple[bytes, int]:
    """`img map` entries (packed ``MAP_ENTRY`` records) of the data and hole extents
    of the open file ``fd`` in [offset, offset + length), found with SEEK_DATA and
    SEEK_HOLE as the file driver's block_status(want_zero) does: present, with the
    host offset in file ``file``.  Returns (records, bytes covered).  Raises
    IndexError for a range beyond 2^63."""
    end = offset + length
    if offset < 0 or length < 0 or end >= 1 << 63:
        raise IndexError("seek_map: range out of bounds")
    out = bytearray()
    pack = MAP_ENTRY.pack
    start = offset
    while offset < end:
        left = end - offset
        flags = MAP_DATA
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            flags = MAP_ZERO if e.errno == errno.ENXIO else MAP_DATA
            n = left
        else:
            if data > offset:
                flags, n = MAP_ZERO, min(left, data - offset)
            else:
                try:
                    hole = os.lseek(fd, offset, os.SEEK_HOLE)
                except OSError:
                    hole = end
                n = min(left, max(hole - offset, 1))
        out += pack(offset, n, offset, flags | MAP_PRESENT | MAP_HAS_OFFSET, 0, file, 0)
        offset += n
    return bytes(out), offset - start


class _MapState:
    """The entry being merged (start, length, offset, flags, depth, file)."""
    __slots__ = ("curr", "human")

    def __init__(self, curr: list, human: bool):
        self.curr, self.human = curr, human


def map_state(human: bool, start: int):
    """State of one map walk from ``start`` (for map_feed / map_finish)."""
    return _MapState([start, 0, 0, 0, 0, 0], human)


def _map_mergeable(curr: list, nxt: tuple) -> bool:
    if not curr[1] or (curr[3] ^ nxt[3]) & _MAP_FIELDS or curr[4] != nxt[4] \
            or curr[5] != nxt[5]:
        return False
    return not curr[3] & MAP_HAS_OFFSET or curr[2] + curr[1] == nxt[2]


def _map_print(state, e: list, last: bool, names, out: list) -> bool:
    """Print one finished entry; False: human map of data without an offset."""
    start, length, offset, flags, depth, file = e
    if not state.human:
        b = lambda bit: "true" if flags & bit else "false"   # noqa: E731
        text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, '
                '"data": %s' % (start, length, depth, b(MAP_PRESENT), b(MAP_ZERO),
                                b(MAP_DATA)))
        if flags & MAP_HAS_OFFSET:
            text += ', "offset": %d' % offset
        out.append(text + ("}" if last else "},\n"))
        return True
    if flags & MAP_DATA and not flags & MAP_HAS_OFFSET:
        return False
    if flags & MAP_DATA and not flags & MAP_ZERO:
        hex16 = lambda v: ("%#x" % v if v else "0").ljust(16)   # noqa: E731
        name = names[file].decode(errors="surrogateescape") if file < len(names) else ""
        out.append(hex16(start) + hex16(length) + hex16(offset) + name + "\n")
    return True


def map_feed(state, entries, names) -> tuple[bytes, bool]:
    """Merge packed entries into the walk as img_map() does and print every
    finished entry (JSON, or the human format with ``names[file]``).

    Returns (text, ok); ok is False when a human map meets data without a host
    offset: the text is what came before it and the walk must stop there."""
    out: list[str] = []
    curr = state.curr
    for nxt in MAP_ENTRY.iter_unpack(entries):
        if _map_mergeable(curr, nxt):
            curr[1] += nxt[1]
            continue
        nxt = list(nxt[:6])
        if curr[1]:
            if not _map_print(state, curr, False, names, out):
                return "".join(out).encode(errors="surrogateescape"), False
            if state.human and (not nxt[3] & MAP_DATA or nxt[3] & MAP_ZERO):
                nxt[3] = (nxt[3] & ~MAP_DATA) | MAP_ZERO
        state.curr = curr = nxt
    return "".join(out).encode(errors="surrogateescape"), True


def map_finish(state, names) -> tuple[bytes, bool]:
    """Print the walk's last entry (JSON: without the trailing separator)."""
    out: list[str] = []
    ok = _map_print(state, state.curr, True, names, out)
    return "".join(out).encode(errors="surrogateescape"), ok


# ------------------------------------------------------------------- check (check.c)
def _check_args(table, n_entries: int, extended: bool, cluster_bits: int, imrt,
                order: int, imrt_n: int) -> tuple[list[int], list[int]]:
    """(entries, subcluster bitmaps) of a table, after check.c's argument checks."""
    esz = 16 if extended else 8
    mv = _bytes_view(table)
    if not 9 <= cluster_bits <= 21 or not 0 <= n_entries <= len(mv) // esz or \
            not 0 <= order <= 6 or not 0 <= imrt_n <= (len(_bytes_view(imrt)) * 8) >> order:
        raise ValueError("check: invalid argument")
    words = struct.unpack_from(">%dQ" % (n_entries * esz // 8), mv)
    if extended:
        return list(words[0::2]), list(words[1::2])
    return list(words), [0] * n_entries


def check_l2(table, n_entries: int, extended: bool, cluster_bits: int, file_len: int,
             imrt, order: int, imrt_n: int) -> tuple[int, int] | None:
    """check_refcounts_l2() of a whole table in the plain case: one IMRT reference per
    referenced host cluster, and (allocated, fragmented) clusters; None, with the IMRT
    unchanged, when an entry needs a message (see native/check.c)."""
    entries, bitmaps = _check_args(table, n_entries, extended, cluster_bits, imrt,
                                   order, imrt_n)
    cs = 1 << cluster_bits
    refs = []
    fragmented = next_contig = 0
    for e, bm in zip(entries, bitmaps):
        if e & (QCOW_OFLAG_COMPRESSED | L2E_STD_RESERVED):
            return None
        off = e & L2E_OFFSET_MASK
        if not off:
            if extended and bm & L2_BITMAP_ALL_ALLOC:
                return None
            continue
        if extended and (bm >> 32) & bm:
            return None
        if off & (cs - 1) or off >= file_len or off >> cluster_bits >= imrt_n:
            return None
        if next_contig and off != next_contig:
            fragmented += 1
        next_contig = off + cs
        refs.append(off >> cluster_bits)
    for k, cluster in enumerate(refs):
        if refcount_add_range(imrt, order, cluster, 1, 1) != OK:
            for back in refs[:k]:
                refcount_add_range(imrt, order, back, 1, -1)
            return None
    return len(refs), fragmented


def l2_copied_mismatches(table, n_entries: int, extended: bool, cluster_bits: int,
                         imrt, order: int, imrt_n: int) -> list[int] | None:
    """check_oflag_copied() of a whole table against refcounts equal to the IMRT's:
    indexes of the entries whose OFLAG_COPIED disagrees with (refcount == 1); None if
    an entry points beyond the IMRT."""
    entries, _ = _check_args(table, n_entries, extended, cluster_bits, imrt, order, imrt_n)
    out = []
    for i, e in enumerate(entries):
        off = e & L2E_OFFSET_MASK
        if e & QCOW_OFLAG_COMPRESSED or not off:
            continue
        if off >> cluster_bits >= imrt_n:
            return None
        if (refcount_get(imrt, order, off >> cluster_bits) == 1) != bool(e & QCOW_OFLAG_COPIED):
            out.append(i)
    return out
