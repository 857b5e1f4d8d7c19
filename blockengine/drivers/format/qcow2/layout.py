"""On-disk layout of qcow2 (qcow2.rst: "Header", "Header extensions", "Cluster mapping").

Names follow QEMU's block/qcow2.h.  Every ``struct.Struct`` is compiled once here.
"""
from __future__ import annotations

import struct

from ...._record import record

QCOW_MAGIC = 0x514649FB

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536

# limits (qcow2.h)
QCOW_MAX_CRYPT_CLUSTERS = 32
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_REFTABLE_SIZE = 8 << 20          # S_8MiB
QCOW_MAX_L1_SIZE = 32 << 20               # S_32MiB
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
QCOW_MAX_CLUSTER_OFFSET = (1 << 56) - 1
BDRV_REQUEST_MAX_BYTES = 0x7FFFFE00       # MIN(SIZE_MAX, INT_MAX) aligned down

L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
QCOW2_COMPRESSED_SECTOR_SIZE = 512

# cache sizes (qcow2.h)
MIN_L2_CACHE_SIZE = 2                      # cache entries
MIN_REFCOUNT_CACHE_SIZE = 4                # clusters
DEFAULT_L2_CACHE_MAX_SIZE = 32 << 20       # S_32MiB (Linux)
DEFAULT_CACHE_CLEAN_INTERVAL = 600

# entry flags and masks
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_COMPRESSED_OFFSET_SIZE_MASK = 0x3FFFFFFFFFFFFFFF
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
INV_OFFSET = -1

QCOW_L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32


def QCOW_OFLAG_SUB_ALLOC_RANGE(x: int, y: int) -> int:
    return ((1 << y) - 1) & ~((1 << x) - 1)


def QCOW_OFLAG_SUB_ZERO_RANGE(x: int, y: int) -> int:
    return QCOW_OFLAG_SUB_ALLOC_RANGE(x, y) << 32


# crypt methods
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

# incompatible feature bits
QCOW2_INCOMPAT_DIRTY_BITNR = 0
QCOW2_INCOMPAT_CORRUPT_BITNR = 1
QCOW2_INCOMPAT_DATA_FILE_BITNR = 2
QCOW2_INCOMPAT_COMPRESSION_BITNR = 3
QCOW2_INCOMPAT_EXTL2_BITNR = 4
QCOW2_INCOMPAT_DIRTY = 1 << QCOW2_INCOMPAT_DIRTY_BITNR
QCOW2_INCOMPAT_CORRUPT = 1 << QCOW2_INCOMPAT_CORRUPT_BITNR
QCOW2_INCOMPAT_DATA_FILE = 1 << QCOW2_INCOMPAT_DATA_FILE_BITNR
QCOW2_INCOMPAT_COMPRESSION = 1 << QCOW2_INCOMPAT_COMPRESSION_BITNR
QCOW2_INCOMPAT_EXTL2 = 1 << QCOW2_INCOMPAT_EXTL2_BITNR
QCOW2_INCOMPAT_MASK = (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
                       | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)

# compatible feature bits
QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR = 0
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_COMPAT_FEAT_MASK = QCOW2_COMPAT_LAZY_REFCOUNTS

# autoclear feature bits
QCOW2_AUTOCLEAR_BITMAPS_BITNR = 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR = 1
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_AUTOCLEAR_MASK = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_TYPE_NAMES = {0: "zlib", 1: "zstd"}

# header extension magics
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

QCOW2_FEAT_TYPE_INCOMPATIBLE = 0
QCOW2_FEAT_TYPE_COMPATIBLE = 1
QCOW2_FEAT_TYPE_AUTOCLEAR = 2

# the feature name table qcow2_update_header() writes, in its order
FEATURE_TABLE = (
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_DIRTY_BITNR, "dirty bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_CORRUPT_BITNR, "corrupt bit"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_DATA_FILE_BITNR, "external data file"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_COMPRESSION_BITNR, "compression type"),
    (QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_INCOMPAT_EXTL2_BITNR, "extended L2 entries"),
    (QCOW2_FEAT_TYPE_COMPATIBLE, QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR, "lazy refcounts"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, QCOW2_AUTOCLEAR_BITMAPS_BITNR, "bitmaps"),
    (QCOW2_FEAT_TYPE_AUTOCLEAR, QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR, "raw external data"),
)

# discard types (enum qcow2_discard_type)
QCOW2_DISCARD_NEVER = 0
QCOW2_DISCARD_ALWAYS = 1
QCOW2_DISCARD_REQUEST = 2
QCOW2_DISCARD_SNAPSHOT = 3
QCOW2_DISCARD_OTHER = 4

# subcluster types (QCow2SubclusterType)
SC_NORMAL = 0
SC_COMPRESSED = 1
SC_ZERO_PLAIN = 2
SC_ZERO_ALLOC = 3
SC_UNALLOCATED_PLAIN = 4
SC_UNALLOCATED_ALLOC = 5
SC_INVALID = 6

# cluster types (QCow2ClusterType)
CL_UNALLOCATED = 0
CL_ZERO_PLAIN = 1
CL_ZERO_ALLOC = 2
CL_NORMAL = 3
CL_COMPRESSED = 4

# ---- structs -----------------------------------------------------------------------------
# QCowHeader: version 2 part (72 bytes), version 3 additions (to 104), compression type
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")
HEADER_V3 = struct.Struct(">QQQII")
HEADER_V2_SIZE = HEADER_V2.size                  # 72
HEADER_V3_MIN_SIZE = HEADER_V2.size + HEADER_V3.size   # 104
HEADER_COMPRESSION_TYPE_OFFSET = 104
HEADER_SIZE = 112                                 # sizeof(QCowHeader), padded to 8
OFS_SIZE = 24
OFS_L1_SIZE = 36
OFS_REFCOUNT_TABLE_OFFSET = 48
OFS_INCOMPATIBLE_FEATURES = 72

EXT_HEADER = struct.Struct(">II")
FEATURE_ENTRY = struct.Struct(">BB46s")
BITMAPS_EXT = struct.Struct(">I4sQQ")       # nb_bitmaps, reserved32, dir size, dir offset
CRYPTO_EXT = struct.Struct(">QQ")
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")   # 40 bytes
SNAPSHOT_EXTRA = struct.Struct(">QQQ")
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")    # 24 bytes
BE64 = struct.Struct(">Q")
BE32 = struct.Struct(">I")
L1_SIZE_AND_OFFSET = struct.Struct(">IQ")
REFTABLE_OFFSET_AND_CLUSTERS = struct.Struct(">QI")


@record
class Header:
    magic: int = QCOW_MAGIC
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_SIZE
    compression_type: int = 0

    @classmethod
    def unpack(cls, buf: bytes) -> "Header":
        """Decode the header as qcow2_do_open() does (v2 gets the v3 defaults)."""
        h = cls(*HEADER_V2.unpack_from(buf, 0))
        if h.version == 2 or h.version < 2:
            h.incompatible_features = h.compatible_features = h.autoclear_features = 0
            h.refcount_order = 4
            h.header_length = HEADER_V2_SIZE
        else:
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = HEADER_V3.unpack_from(buf, HEADER_V2_SIZE)
        h.compression_type = (buf[HEADER_COMPRESSION_TYPE_OFFSET]
                              if h.header_length > HEADER_COMPRESSION_TYPE_OFFSET else 0)
        return h

    def pack(self) -> bytes:
        """The header as qcow2_update_header() writes it (sizeof(QCowHeader) for v3)."""
        out = bytearray(HEADER_V2.pack(
            self.magic, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            out += HEADER_V3.pack(self.incompatible_features, self.compatible_features,
                                  self.autoclear_features, self.refcount_order,
                                  self.header_length)
            out += bytes([self.compression_type]) + bytes(7)
        return bytes(out)


@record
class Extension:
    magic: int
    data: bytes = b""


def pack_extension(magic: int, data: bytes) -> bytes:
    """header_ext_add(): type, length, data padded to 8 bytes."""
    pad = (-len(data)) % 8
    return EXT_HEADER.pack(magic, len(data)) + data + bytes(pad)


def pack_feature_table() -> bytes:
    return b"".join(FEATURE_ENTRY.pack(t, bit, name.encode()) for t, bit, name in FEATURE_TABLE)


def parse_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    out = []
    for pos in range(0, len(data) - FEATURE_ENTRY.size + 1, FEATURE_ENTRY.size):
        t, bit, name = FEATURE_ENTRY.unpack_from(data, pos)
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
        if not name:
            break
        out.append((t, bit, name))
    return out


def size_to_clusters(cluster_size: int, size: int) -> int:
    return (size + cluster_size - 1) // cluster_size


def size_to_l1(cluster_bits: int, l2_bits: int, size: int) -> int:
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool) -> tuple[int, int]:
    """qcow2_refcount_metadata_size(): (bytes of refcount metadata, refblock count)."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks
