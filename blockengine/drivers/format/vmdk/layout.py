"""VMDK on-disk structures and descriptor text, parsed the way QEMU 7.2's block/vmdk.c
parses them (strstr/sscanf semantics included, since they decide what opens).

* Sparse extents: "KDMV" (VMDK4, hosted sparse / streamOptimized) and "COWD" (VMDK3,
  ESX vmfsSparse) headers, little-endian.  A grain directory (L1, sectors) points to
  grain tables (L2, ``num_gtes_per_gt`` 32-bit sector entries) pointing to grains of
  ``granularity`` sectors; entry 1 means "zeroed grain" when the header has the
  zero-grain flag.  streamOptimized grains are deflate streams behind a 12-byte marker
  (lba u64, size u32); its header may defer the directory to the footer (gd_offset -1).
* Descriptor: ``key=value`` lines, extent lines ``ACCESS SECTORS TYPE "file" [OFFSET]``
  and ``ddb.*`` keys.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SECTOR = 512
VMDK3_MAGIC = b"COWD"
VMDK4_MAGIC = b"KDMV"
DESC_SIZE = 20 * SECTOR

VMDK4_FLAG_NL_DETECT = 1 << 0
VMDK4_FLAG_RGD = 1 << 1
VMDK4_FLAG_ZERO_GRAIN = 1 << 2
VMDK4_FLAG_COMPRESS = 1 << 16
VMDK4_FLAG_MARKER = 1 << 17
VMDK4_GD_AT_END = 0xFFFFFFFFFFFFFFFF
VMDK4_COMPRESSION_DEFLATE = 1
VMDK_GTE_ZEROED = 1

MARKER_END_OF_STREAM = 0
MARKER_GRAIN_TABLE = 1
MARKER_GRAIN_DIRECTORY = 2
MARKER_FOOTER = 3
GRAIN_MARKER = struct.Struct("<QI")          # lba, size; compressed data follows

# VMDK4Header after the magic (QEMU_PACKED)
VMDK4_HEADER = struct.Struct("<IIQQQQIQQQB4sH")
# VMDK3Header after the magic
VMDK3_HEADER = struct.Struct("<IIIIIIIIII")


@dataclass
class Vmdk4Header:
    version: int = 1
    flags: int = 0
    capacity: int = 0
    granularity: int = 128
    desc_offset: int = 0
    desc_size: int = 0
    num_gtes_per_gt: int = 512
    rgd_offset: int = 0
    gd_offset: int = 0
    grain_offset: int = 0
    filler: int = 0
    check_bytes: bytes = b"\n \r\n"
    compress_algorithm: int = 0

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> "Vmdk4Header":
        raw = raw[offset:offset + VMDK4_HEADER.size]
        raw += bytes(VMDK4_HEADER.size - len(raw))
        return cls(*VMDK4_HEADER.unpack(raw))

    def pack(self) -> bytes:
        return VMDK4_MAGIC + VMDK4_HEADER.pack(
            self.version, self.flags, self.capacity, self.granularity, self.desc_offset,
            self.desc_size, self.num_gtes_per_gt, self.rgd_offset, self.gd_offset,
            self.grain_offset, self.filler, self.check_bytes, self.compress_algorithm)


def c_string(buf: bytes) -> str:
    """The NUL-terminated text at the start of ``buf`` (QEMU handles it as a C string)."""
    return buf.split(b"\0", 1)[0].decode("latin-1")


def parse_description(desc: str, name: str) -> str | None:
    """vmdk_parse_description(): first ``name``, skip 2 chars ('="'), up to the next '"'."""
    pos = desc.find(name)
    if pos < 0:
        return None
    pos += len(name) + 2
    if pos >= len(desc):
        return None
    end = desc.find('"', pos)
    if end < 0:
        return None
    return desc[pos:end]


def read_cid(desc: str, parent: bool) -> int | None:
    """vmdk_read_cid(): sscanf("%x") after the first "CID"/"parentCID" + one char;
    None when there is none (QEMU's -EINVAL)."""
    key = "parentCID" if parent else "CID"
    pos = desc.find(key)
    if pos < 0:
        return None
    m = re.match(r"\s*([+-]?)(0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)",
                 desc[pos + len(key) + 1:])
    if not m:
        return None
    value = int(m.group(3), 16) & 0xFFFFFFFF
    return (-value) & 0xFFFFFFFF if m.group(1) == "-" else value


def parent_file_name_hint(desc: str) -> str | None:
    """vmdk_parent_open(): the text after 'parentFileNameHint="' up to '"'; raises
    ValueError when unterminated or too long (QEMU's -EINVAL)."""
    pos = desc.find("parentFileNameHint")
    if pos < 0:
        return None
    pos += len("parentFileNameHint") + 2
    end = desc.find('"', pos)
    if end < 0 or end - pos > 1023:
        raise ValueError("bad parentFileNameHint")
    return desc[pos:end]


# sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %" SCNd64, ...)
_WORD = re.compile(r"\s*(\S{1,10})")
_INT = re.compile(r"\s*([+-]?\d+)")
_FNAME = re.compile(r'\s*"([^\n\r"]{1,511})"')


def scan_extent_line(line: str):
    """The sscanf of vmdk_parse_extents(): (matches, access, sectors, type, fname, offset)."""
    out = [0, None, None, None, None, -1]
    pos = 0
    for i, rx in enumerate((_WORD, _INT, _WORD, _FNAME, _INT)):
        m = rx.match(line, pos)
        if not m:
            break
        val = m.group(1)
        out[i + 1] = int(val) if rx is _INT else val
        out[0] = i + 1
        pos = m.end()
    return tuple(out)


def next_line(desc: str, pos: int) -> int:
    """next_line(): past the next '\\n' (or to the end)."""
    nl = desc.find("\n", pos)
    return len(desc) if nl < 0 else nl + 1
