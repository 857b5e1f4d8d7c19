"""Metadata overlap checks (QEMU's qcow2_check_metadata_overlap() and the
``overlap-check`` runtime options).

Theory of operation: before any write to the image file (guest data, COW, L2 tables,
refcount blocks, L1 and refcount table updates, repairs) the driver asks whether the
target range intersects a metadata structure it is not meant to touch.  Which
structures are checked is a bit mask (Qcow2OverlapCheckFlags): a template — none,
constant (structures whose location is known without reading anything: header,
active L1, refcount table, snapshot table, bitmap directory), cached (also active L2
tables, refcount blocks and inactive L1 tables, known from in-memory tables; the
default), all (also inactive L2 tables, which must be read from disk) — adjusted per
structure by ``overlap-check.<name>`` booleans.  A hit is a fatal corruption
reported through ``qcow2_signal_corruption`` (the driver's ``signal_corruption``).
"""
from __future__ import annotations

import struct

from ....errors import InvalidArgument
from ...base import bool_option
from .sparse import nonzero_indexes

MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8

NONE = 0
CONSTANT = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY
CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1
ALL = CACHED | INACTIVE_L2

TEMPLATES = {"none": NONE, "constant": CONSTANT, "cached": CACHED, "all": ALL}

# option name suffix -> flag, in QEMU's overlap_bool_option_names order
FLAG_OPTIONS = (
    ("main-header", MAIN_HEADER), ("active-l1", ACTIVE_L1), ("active-l2", ACTIVE_L2),
    ("refcount-table", REFCOUNT_TABLE), ("refcount-block", REFCOUNT_BLOCK),
    ("snapshot-table", SNAPSHOT_TABLE), ("inactive-l1", INACTIVE_L1),
    ("inactive-l2", INACTIVE_L2), ("bitmap-directory", BITMAP_DIRECTORY),
)

NAMES = {
    MAIN_HEADER: "qcow2_header", ACTIVE_L1: "active L1 table", ACTIVE_L2: "active L2 table",
    REFCOUNT_TABLE: "refcount table", REFCOUNT_BLOCK: "refcount block",
    SNAPSHOT_TABLE: "snapshot table", INACTIVE_L1: "inactive L1 table",
    INACTIVE_L2: "inactive L2 table", BITMAP_DIRECTORY: "bitmap directory",
}

OPTION_KEYS = ("overlap-check", "overlap-check.template") + tuple(
    "overlap-check." + n for n, _ in FLAG_OPTIONS)

_L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00




def parse_options(options: dict) -> int:
    """The overlap_check mask from runtime options (qcow2_update_options_prepare()).

    Accepts ``overlap-check`` as a template string or as a dict (``template`` plus
    per-structure booleans), and the flat ``overlap-check.<name>`` keys."""
    ov = options.get("overlap-check")
    flat = {k[len("overlap-check."):]: v for k, v in options.items()
            if k.startswith("overlap-check.")}
    if isinstance(ov, dict):
        flat = {**{k: v for k, v in ov.items()}, **flat}
        ov = None
    tmpl = flat.pop("template", None)
    if ov is not None and tmpl is not None and ov != tmpl:
        raise InvalidArgument("Conflicting values for qcow2 options 'overlap-check' ('%s') "
                              "and 'overlap-check.template' ('%s')" % (ov, tmpl))
    name = ov if ov is not None else (tmpl if tmpl is not None else "cached")
    if name not in TEMPLATES:
        raise InvalidArgument("Unsupported value '%s' for qcow2 option 'overlap-check'. "
                              "Allowed are any of the following: none, constant, cached, "
                              "all" % name)
    mask = TEMPLATES[name]
    for opt, flag in FLAG_OPTIONS:
        if opt in flat:
            if bool_option(flat.pop(opt), "overlap-check." + opt):
                mask |= flag
            else:
                mask &= ~flag
    return mask


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return alen > 0 and blen > 0 and a < b + blen and b < a + alen


def check_metadata_overlap(s, ign: int, offset: int, size: int) -> int:
    """qcow2_check_metadata_overlap(): the first overlapping structure's flag, or 0."""
    chk = s.overlap_check & ~ign
    if not size or not chk:
        return 0
    cs = s.cluster_size
    if chk & MAIN_HEADER and offset < cs:
        return MAIN_HEADER
    size = -(-((offset & (cs - 1)) + size) // cs) * cs
    offset &= ~(cs - 1)

    if chk & ACTIVE_L1 and s.l1_size and \
            _overlaps(offset, size, s.l1_table_offset, s.l1_size * 8):
        return ACTIVE_L1
    if chk & REFCOUNT_TABLE and s.refcount_table_size and \
            _overlaps(offset, size, s.refcount_table_offset, s.refcount_table_size * 8):
        return REFCOUNT_TABLE
    if chk & SNAPSHOT_TABLE and s.snapshots_size and \
            _overlaps(offset, size, s.snapshots_offset, s.snapshots_size):
        return SNAPSHOT_TABLE
    if chk & INACTIVE_L1:
        for sn in s.snapshots:
            if sn.l1_size and _overlaps(offset, size, sn.l1_table_offset, sn.l1_size * 8):
                return INACTIVE_L1
    end = offset + size
    if chk & ACTIVE_L2:
        l1 = s.l1_table
        for i in nonzero_indexes(l1):       # l1_size may be huge and mostly empty
            o = l1[i] & _L1E_OFFSET_MASK
            if o and o < end and offset < o + cs:
                return ACTIVE_L2
    if chk & REFCOUNT_BLOCK:
        tbl = s.refcount_table
        for i in nonzero_indexes(tbl, s.max_refcount_table_index + 1):
            o = tbl[i] & _REFT_OFFSET_MASK
            if o and o < end and offset < o + cs:
                return REFCOUNT_BLOCK
    if chk & INACTIVE_L2:
        for sn in s.snapshots:
            n = sn.l1_size
            if not n or n > (32 << 20) // 8 or sn.l1_table_offset & (cs - 1):
                continue
            raw = s.file.pread(sn.l1_table_offset, n * 8) \
                if sn.l1_table_offset + n * 8 <= s.file.total_size else None
            if raw is None:
                continue
            for e in struct.unpack(">%dQ" % n, raw):
                o = e & _L1E_OFFSET_MASK
                if o and o < end and offset < o + cs:
                    return INACTIVE_L2
    if chk & BITMAP_DIRECTORY and s.bitmaps_ext and s.autoclear_features & 1:
        _, dsize, doff = s.bitmaps_ext
        if _overlaps(offset, size, doff, dsize):
            return BITMAP_DIRECTORY
    return 0
