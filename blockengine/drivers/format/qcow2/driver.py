"""The qcow2 format driver (QEMU 7.2's block/qcow2.c).

Theory of operation: ``open`` validates the header and every table location as
qcow2_do_open() does, loads the L1 and refcount tables, reads the header extensions
(keeping unknown ones for header rewrites) and the snapshot table.  Data I/O maps guest
ranges to host runs with ``cluster.ClusterMixin``; reference counts live in
``refcount.RefcountMixin``; both use the metadata caches of ``cache``.  Flushing writes
refcount blocks before L2 tables; the L1 table and header fields are written through.
A dirty image (lazy refcounts) opened read-write is repaired first, like QEMU.
"""
from __future__ import annotations

import errno
import os
import struct
import sys
from array import array

from ....errors import BlockError, CorruptImage, InvalidArgument, InvalidImage, NotSupported
from ....graph.child import ChildRole
from ...base import CreateOpt
from ...base import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_RECURSE, BLOCK_ZERO, BlockDriver,
                     DriverInfo, DriverKind, PreallocMode, Status)
from . import layout as L
from .cache import Qcow2Cache, cache_sizes
from .cluster import ZEROES as _ZEROES, ClusterMixin, L2Meta, CowRegion, zero_fill as _zero
from .compress import compress_many, decompress
from .native import N
from .layout import (L1E_OFFSET_MASK, SC_COMPRESSED, SC_NORMAL, SC_UNALLOCATED_ALLOC,
                     SC_UNALLOCATED_PLAIN, SC_ZERO_ALLOC, SC_ZERO_PLAIN, Header)
from .refcount import RefcountMixin
from .bitmap import Qcow2BitmapMixin
from .amend import AMEND_OPTS, amend_options
from .snapshot import Qcow2SnapshotMixin, read_snapshots
from . import overlap as OL
from ...base import bool_option

INT64_MAX = (1 << 63) - 1

# qcow2_create_opts in QEMU 7.2's order: the "Formatting ..." line follows it, and
# `-o help` prints it sorted by name
CREATE_OPTS = (
    CreateOpt("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in "
              "favor of encrypt.format=aes)"),
    CreateOpt("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    CreateOpt("encrypt.key-secret", "str",
              "ID of secret providing qcow AES key or LUKS passphrase"),
    CreateOpt("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    CreateOpt("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    CreateOpt("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    CreateOpt("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    CreateOpt("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    CreateOpt("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    CreateOpt("cluster_size", "size", "qcow2 cluster size", "65536"),
    CreateOpt("extended_l2", "bool", "Extended L2 tables", "off"),
    CreateOpt("preallocation", "str",
              "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    CreateOpt("compression_type", "str",
              "Compression method used for image cluster compression", "zlib"),
    CreateOpt("size", "size", "Virtual disk size"),
    CreateOpt("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    CreateOpt("backing_file", "str", "File name of a base image"),
    CreateOpt("backing_fmt", "str", "Image format of the base image"),
    CreateOpt("data_file", "str", "File name of an external data file"),
    CreateOpt("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    CreateOpt("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    CreateOpt("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
)
CREATE_OPTS_DESC_ORDER = tuple(o.name for o in CREATE_OPTS)
CREATE_OPTS_DEFAULTS = {o.name: o.default for o in CREATE_OPTS if o.default is not None}

RUNTIME_OPTS = ("lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
                "pass-discard-other", "overlap-check", "cache-size", "l2-cache-size",
                "l2-cache-entry-size", "refcount-cache-size", "cache-clean-interval",
                "data-file") + OL.OPTION_KEYS[1:]




class Qcow2Driver(Qcow2SnapshotMixin, Qcow2BitmapMixin, RefcountMixin, ClusterMixin,
                  BlockDriver):
    info = DriverInfo("qcow2", DriverKind.FORMAT, supports_backing=True,
                      create_opts=CREATE_OPTS)
    FILENAME_FROM_FILE = ("qcow2",)
    amend_opts = AMEND_OPTS

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        roles = {"file": ChildRole.image()}
        if options.get("data-file") not in (None, ""):
            roles["data-file"] = ChildRole.DATA
        return roles

    @classmethod
    def formatting_options(cls, opts: dict) -> list[tuple[str, str]]:
        """(name, value) pairs of qemu-img create's "Formatting" line after fmt=qcow2:
        every option given or having a default, in qcow2_create_opts order."""
        out = []
        for name in CREATE_OPTS_DESC_ORDER:
            if name in opts and opts[name] is not None:
                v = opts[name]
                if isinstance(v, bool):
                    v = "on" if v else "off"
                out.append((name, str(v)))
            elif name in CREATE_OPTS_DEFAULTS:
                out.append((name, CREATE_OPTS_DEFAULTS[name]))
        for name, v in opts.items():
            if name not in CREATE_OPTS_DESC_ORDER and v is not None:
                out.append((name, str(v)))
        return out

    # ================================================================ open / close
    def open(self, options: dict) -> None:
        self.file = self.node.file_child_node()
        if self.file is None:
            raise InvalidArgument("Parameter 'file' is missing")
        self.check_messages: list[str] = []
        self.signaled_corruption = False
        self.unusable = False
        self._lazy_marked = False
        self.check_mode = _opened_for_check(options)
        self._do_open(options, self.check_mode)

    def _do_open(self, options: dict, check_mode: bool = False) -> None:
        fsize = self.file.total_size
        raw = self.file.pread(0, min(L.HEADER_SIZE, fsize)) if fsize else b""
        raw = raw + bytes(L.HEADER_SIZE - len(raw))     # QEMU reads zeroes past EOF
        h = Header.unpack(raw)
        self.header = h
        if h.magic != L.QCOW_MAGIC:
            raise InvalidImage("Image is not in qcow2 format", errno=errno.EINVAL)
        if h.version < 2 or h.version > 3:
            raise NotSupported("Unsupported qcow2 version %d" % h.version)
        self.version = h.version
        if h.cluster_bits < L.MIN_CLUSTER_BITS or h.cluster_bits > L.MAX_CLUSTER_BITS:
            raise InvalidImage("Unsupported cluster size: 2^%d" % h.cluster_bits)
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        if h.version == 3 and h.header_length < L.HEADER_V3_MIN_SIZE:
            raise InvalidImage("qcow2 header too short")
        if h.header_length > cs:
            raise InvalidImage("qcow2 header exceeds cluster size")
        self.unknown_header_fields = b""
        if h.header_length > L.HEADER_SIZE:
            self.unknown_header_fields = self.file.pread(L.HEADER_SIZE,
                                                         h.header_length - L.HEADER_SIZE)
        if h.backing_file_offset > cs:
            raise InvalidImage("Invalid backing file offset")
        ext_end = h.backing_file_offset if h.backing_file_offset else cs
        self.incompatible_features = h.incompatible_features
        self.compatible_features = h.compatible_features
        self.autoclear_features = h.autoclear_features
        self.compression_type = h.compression_type
        self._validate_compression_type()
        if self.incompatible_features & ~L.QCOW2_INCOMPAT_MASK:
            table = None
            try:
                exts = self._read_extensions(h.header_length, ext_end, parse=False)
                table = exts.get("feature_table")
            except BlockError:
                pass
            self._report_unsupported_feature(table or [],
                                             self.incompatible_features & ~L.QCOW2_INCOMPAT_MASK)
        writable = not self.node.read_only
        if self.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT and writable and not check_mode:
            raise BlockError("qcow2: Image is corrupt; cannot be opened read/write",
                             errno=errno.EACCES)
        self.extended = bool(self.incompatible_features & L.QCOW2_INCOMPAT_EXTL2)
        self.subclusters_per_cluster = 32 if self.extended else 1
        self.subcluster_size = cs // self.subclusters_per_cluster
        self.subcluster_bits = self.subcluster_size.bit_length() - 1
        if self.subcluster_size < 512:
            raise InvalidImage("Unsupported subcluster size: %d" % self.subcluster_size)
        if h.refcount_order > 6:
            raise InvalidImage("Reference count entry width too large; may not exceed 64 bits")
        self.refcount_order = h.refcount_order
        self.refcount_bits = 1 << h.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.crypt_method_header = h.crypt_method
        self.crypto = None
        self.crypto_header = (0, 0)
        if h.crypt_method:
            if h.crypt_method > L.QCOW_CRYPT_LUKS:
                raise InvalidArgument("Unsupported encryption method %d" % h.crypt_method)
        # LUKS tweaks by host sector; legacy AES by guest sector (crypt_physical_offset)
        self.crypt_physical_offset = h.crypt_method != L.QCOW_CRYPT_AES
        self.l2e_size = L.L2E_SIZE_EXTENDED if self.extended else L.L2E_SIZE_NORMAL
        self.l2_bits = cb - (self.l2e_size.bit_length() - 1)
        self.l2_size = 1 << self.l2_bits
        self.refcount_block_bits = cb - (h.refcount_order - 3)
        self.refcount_block_size = 1 << self.refcount_block_bits
        self.total_size = h.size - h.size % 512
        self.csize_shift = 62 - (cb - 8)
        self.csize_mask = (1 << (cb - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.refcount_table_offset = h.refcount_table_offset
        self.refcount_table_size = h.refcount_table_clusters << (cb - 3)
        if h.refcount_table_clusters == 0 and not check_mode:
            raise InvalidImage("Image does not contain a reference count table")
        self._validate_table(h.refcount_table_offset, h.refcount_table_clusters, cs,
                             L.QCOW_MAX_REFTABLE_SIZE, "Reference count table")
        if not check_mode:
            self._validate_table(h.snapshots_offset, h.nb_snapshots, L.SNAPSHOT_HEADER.size,
                                 L.SNAPSHOT_HEADER.size * L.QCOW_MAX_SNAPSHOTS,
                                 "Snapshot table")
        self._validate_table(h.l1_table_offset, h.l1_size, L.L1E_SIZE, L.QCOW_MAX_L1_SIZE,
                             "Active L1 table")
        self.l1_size = h.l1_size
        self.l1_table_offset = h.l1_table_offset
        l1_vm_state_index = L.size_to_l1(cb, self.l2_bits, h.size)
        if l1_vm_state_index > 0x7FFFFFFF:
            raise InvalidImage("Image is too big", errno=errno.EFBIG)
        self.l1_vm_state_index = l1_vm_state_index
        if self.l1_size < l1_vm_state_index:
            raise InvalidImage("L1 table is too small")
        if self.l1_size:
            self.l1_table = list(struct.unpack(">%dQ" % self.l1_size,
                                               self._pread_exact(self.l1_table_offset,
                                                                 self.l1_size * 8)))
        else:
            self.l1_table = []

        self._update_options(options)
        encrypt_opts = _encrypt_options(options)
        self._check_encrypt_format(encrypt_opts)
        self.refcount_init()

        exts = self._read_extensions(h.header_length, ext_end, parse=True)
        if "crypto" in exts:
            self._open_crypto(exts["crypto"], encrypt_opts)
        if self.crypt_method_header == L.QCOW_CRYPT_AES and self.crypto is None:
            self._open_aes(encrypt_opts)
        if self.crypt_method_header and self.crypto is None and not self.node.no_io:
            raise InvalidArgument("Missing CRYPTO header for crypt method %d"
                                  % self.crypt_method_header)
        self.image_backing_format = exts.get("backing_format")
        self.image_data_file = exts.get("data_file")
        self.unknown_exts = exts.get("unknown", [])
        self.bitmaps_ext = exts.get("bitmaps")
        need_update_header = exts.get("need_update", False)
        self._open_data_file(options)

        self.backing_file = None
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(1023, cs - h.backing_file_offset) or n >= 1024:
                raise InvalidImage("Backing file name too long")
            self.backing_file = self.file.pread(h.backing_file_offset, n).decode(
                "utf-8", "surrogateescape")
        self.image_backing_file = self.backing_file

        self.snapshots_offset = h.snapshots_offset
        self.nb_snapshots = h.nb_snapshots
        self.snapshots, self.snapshots_size = ([], 0) if check_mode else read_snapshots(
            self.file, h.snapshots_offset, h.nb_snapshots, self.total_size)

        need_update_header |= bool(self.autoclear_features & ~L.QCOW2_AUTOCLEAR_MASK)
        need_update_header = need_update_header and writable
        if need_update_header:
            self.autoclear_features &= L.QCOW2_AUTOCLEAR_MASK
            self.update_header()

        self.metadata_preallocation = None
        self._decomp_cache = (None, None)
        if not check_mode and writable and self.incompatible_features & L.QCOW2_INCOMPAT_DIRTY:
            try:
                res = self.check("all")
            except BlockError as e:
                raise BlockError("Could not repair dirty image: %s"
                                 % os.strerror(e.errno or errno.EIO),
                                 errno=e.errno or errno.EIO) from None
            if res["check-errors"]:
                raise BlockError("Could not repair dirty image: Input/output error",
                                 errno=errno.EIO)
        if not check_mode and not self.node.no_io:
            self.bitmaps_load()       # bitmap.py: load, set in-use on a read-write open

    def _pread_exact(self, offset: int, length: int) -> bytes:
        return self.file.pread(offset, length)

    def _validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int,
                        name: str) -> None:
        """qcow2_validate_table()."""
        if entries > max_bytes // entry_len:
            raise InvalidImage("%s too large" % name, errno=errno.EFBIG)
        if INT64_MAX - entries * entry_len < offset or offset & (self.cluster_size - 1):
            raise InvalidImage("%s offset invalid" % name, errno=errno.EINVAL)

    def _validate_compression_type(self) -> None:
        ct = self.compression_type
        if ct not in (L.QCOW2_COMPRESSION_TYPE_ZLIB, L.QCOW2_COMPRESSION_TYPE_ZSTD):
            raise NotSupported("qcow2: unknown compression type: %d" % ct)
        bit = self.incompatible_features & L.QCOW2_INCOMPAT_COMPRESSION
        if ct == L.QCOW2_COMPRESSION_TYPE_ZLIB and bit:
            raise InvalidImage("qcow2: Compression type incompatible feature bit must not be set")
        if ct != L.QCOW2_COMPRESSION_TYPE_ZLIB and not bit:
            raise InvalidImage("qcow2: Compression type incompatible feature bit must be set")

    @staticmethod
    def _report_unsupported_feature(table, mask: int) -> None:
        names = []
        for t, bit, name in table:
            if t == L.QCOW2_FEAT_TYPE_INCOMPATIBLE and mask & (1 << bit):
                names.append(name[:46])
                mask &= ~(1 << bit)
        if mask:
            names.append("Unknown incompatible feature: %x" % mask)
        raise NotSupported("Unsupported qcow2 feature(s): %s" % ", ".join(names))

    def _read_extensions(self, start: int, end: int, parse: bool) -> dict:
        """qcow2_read_extensions()."""
        out: dict = {"unknown": []}
        cs = self.cluster_size
        data = self.file.pread(0, min(end, cs)) if end else b""
        data = data + bytes(max(0, end - len(data)))
        offset = start
        while offset < end:
            magic, length = L.EXT_HEADER.unpack_from(data, offset) if offset + 8 <= len(data) \
                else (0, 0)
            offset += 8
            if offset > end or length > end - offset:
                raise InvalidImage("Header extension too large")
            body = data[offset:offset + length]
            if magic == L.QCOW2_EXT_MAGIC_END:
                break
            if magic == L.QCOW2_EXT_MAGIC_BACKING_FORMAT:
                if length >= 16:
                    raise InvalidImage("ERROR: ext_backing_format: len=%d too large (>=16)"
                                       % length)
                out["backing_format"] = body.decode("utf-8", "surrogateescape")
            elif magic == L.QCOW2_EXT_MAGIC_FEATURE_TABLE:
                out["feature_table"] = L.parse_feature_table(body)
            elif magic == L.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
                if parse and self.header.crypt_method != L.QCOW_CRYPT_LUKS:
                    raise InvalidImage("CRYPTO header extension only expected with LUKS "
                                       "encryption method")
                if parse:
                    if length != L.CRYPTO_EXT.size:
                        raise InvalidImage("CRYPTO header extension size %u, but expected "
                                           "size %d" % (length, L.CRYPTO_EXT.size))
                    hoff, hlen = L.CRYPTO_EXT.unpack(body)
                    if hoff % cs:
                        raise InvalidImage("Encryption header offset '%d' is not a multiple "
                                           "of cluster size '%d'" % (hoff, cs))
                    out["crypto"] = (hoff, hlen)
            elif magic == L.QCOW2_EXT_MAGIC_BITMAPS and parse:
                if length != L.BITMAPS_EXT.size:
                    raise InvalidImage("bitmaps_ext: Invalid extension length")
                if not self.autoclear_features & L.QCOW2_AUTOCLEAR_BITMAPS:
                    if self.version < 3:
                        print("qemu-img: warning: This qcow2 v2 image contains bitmaps, but "
                              "they may have been modified by a program without persistent "
                              "bitmap support; so now they must all be considered "
                              "inconsistent", file=sys.stderr)
                    else:
                        print("qemu-img: warning: a program lacking bitmap support modified "
                              "this file, so all bitmaps are now considered inconsistent",
                              file=sys.stderr)
                    print("Some clusters may be leaked, run 'qemu-img check -r' on the image "
                          "file to fix.", file=sys.stderr)
                    out["need_update"] = True
                else:
                    nb, reserved, dsize, doff = L.BITMAPS_EXT.unpack(body)
                    if reserved != bytes(4):
                        raise InvalidImage("bitmaps_ext: Reserved field is not zero")
                    if nb > L.QCOW2_MAX_BITMAPS:
                        raise InvalidImage("bitmaps_ext: Image has %d bitmaps, exceeding the "
                                           "QEMU supported maximum of %d"
                                           % (nb, L.QCOW2_MAX_BITMAPS))
                    if nb == 0:
                        raise InvalidImage("found bitmaps extension with zero bitmaps")
                    if doff & (cs - 1):
                        raise InvalidImage("bitmaps_ext: invalid bitmap directory offset")
                    if dsize > L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
                        raise InvalidImage("bitmaps_ext: bitmap directory size (%d) exceeds "
                                           "the maximum supported size (%d)"
                                           % (dsize, L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE))
                    out["bitmaps"] = (nb, dsize, doff)
            elif magic == L.QCOW2_EXT_MAGIC_DATA_FILE:
                out["data_file"] = body.decode("utf-8", "surrogateescape")
            elif magic != L.QCOW2_EXT_MAGIC_BITMAPS:
                # QLIST_INSERT_HEAD: QEMU rewrites unknown extensions in reverse order
                out["unknown"].insert(0, (magic, body))
            offset += (length + 7) & ~7
        return out

    def _update_options(self, options: dict) -> None:
        """qcow2_update_options_prepare()/commit()."""
        self.options = {k: v for k, v in options.items() if k in RUNTIME_OPTS}
        l2_entries, entry_size, rc_entries = cache_sizes(options, self.cluster_size,
                                                         self.l2e_size, self.total_size)
        self.l2_slice_bytes = entry_size
        self.l2_slice_size = entry_size // self.l2e_size
        self.refcount_cache = Qcow2Cache(self.file, self.cluster_size, rc_entries, "refcount")
        self.l2_cache = Qcow2Cache(self.file, entry_size, l2_entries, "l2")
        self.overlap_check = OL.parse_options(options)
        self.refcount_cache.overlap = lambda off, n: self.pre_write_overlap_check(
            OL.REFCOUNT_BLOCK, off, n)
        self.l2_cache.overlap = lambda off, n: self.pre_write_overlap_check(
            OL.ACTIVE_L2, off, n)
        lazy = options.get("lazy-refcounts")
        self.use_lazy_refcounts = (bool_option(lazy, "lazy-refcounts") if lazy is not None
                                   else bool(self.compatible_features
                                             & L.QCOW2_COMPAT_LAZY_REFCOUNTS))
        if self.use_lazy_refcounts and self.version < 3:
            raise InvalidArgument("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                                  "compatibility level")

        def opt(name, default):
            v = options.get(name)
            return default if v is None else bool_option(v, name)
        self.discard_passthrough = {
            L.QCOW2_DISCARD_NEVER: False,
            L.QCOW2_DISCARD_ALWAYS: True,
            L.QCOW2_DISCARD_REQUEST: opt("pass-discard-request", self.node.discard_unmap),
            L.QCOW2_DISCARD_SNAPSHOT: opt("pass-discard-snapshot", True),
            L.QCOW2_DISCARD_OTHER: opt("pass-discard-other", False),
        }

    # ================================================================ encryption
    def _check_encrypt_format(self, enc: dict) -> None:
        """qcow2_update_options_prepare(): encrypt.format against the header."""
        fmt = enc.get("format")
        if self.crypt_method_header == L.QCOW_CRYPT_NONE:
            if fmt:
                raise InvalidArgument("No encryption in image header, but options specified "
                                      "format '%s'" % fmt)
        elif self.crypt_method_header == L.QCOW_CRYPT_LUKS:
            if fmt and fmt != "luks":
                raise InvalidArgument("Header reported 'luks' encryption format but options "
                                      "specify '%s'" % fmt)
        elif self.crypt_method_header == L.QCOW_CRYPT_AES:
            if fmt and fmt != "aes":
                raise InvalidArgument("Header reported 'aes' encryption format but options "
                                      "specify '%s'" % fmt)

    def _open_crypto(self, ext: tuple[int, int], enc: dict) -> None:
        """The CRYPTO header extension branch of qcow2_read_extensions():
        qcrypto_block_open() with the "encrypt." prefix; the LUKS header lives in
        the clusters at ext[0] (ext[1] bytes)."""
        from ....crypto.luks import LuksBlock
        self.crypto_header = ext
        self.crypto = LuksBlock.load(self._crypto_hdr_read, self._key_secret(enc))

    def _open_aes(self, enc: dict) -> None:
        """qcrypto_block_qcow_open(): the legacy AES key comes from the secret alone."""
        from ....crypto.qcow import QcowBlock
        self.crypto = QcowBlock(self._key_secret(enc))

    def _key_secret(self, enc: dict) -> bytes | None:
        """The "encrypt.key-secret" passphrase (None when the node does no I/O)."""
        if self.node.no_io:
            return None
        from ..luks.driver import lookup_secret
        secret_id = enc.get("key-secret")
        if secret_id is None:
            raise InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher")
        return lookup_secret(getattr(self.node.graph, "secrets", None), secret_id)

    def _crypto_hdr_read(self, offset: int, length: int) -> bytes:
        """qcow2_crypto_hdr_read_func()."""
        hoff, hlen = self.crypto_header
        if offset + length > hlen:
            raise InvalidImage("Request for data outside of extension header")
        return self.file.pread(hoff + offset, length)

    @property
    def encrypted(self) -> bool:
        return bool(getattr(self, "crypt_method_header", 0))

    def refresh_filename(self) -> str | None:
        """encrypt.key-secret is qcow2's strong runtime option: an image opened with it
        is described as json:{...} (QDict order), as QEMU's bdrv_refresh_filename()."""
        opts = self.node.options if isinstance(self.node.options, dict) else {}
        secret = _encrypt_options(opts).get("key-secret")
        if secret is None or self.has_data_file:
            return None
        import json
        from ....cli.output import to_json
        fname = self.file.filename()
        if fname.startswith("json:"):
            file_opts = json.loads(fname[5:])
        else:
            file_opts = {"driver": self.file.driver_name, "filename": fname}
        return "json:" + to_json({"driver": "qcow2", "file": file_opts,
                                  "encrypt.key-secret": secret})

    def request_alignment(self) -> int:
        # qcow2_refresh_limits(): encrypted I/O works on whole sectors
        return 512 if getattr(self, "crypto", None) is not None else 1

    def _open_data_file(self, options: dict) -> None:
        child = self.node.child("data-file")
        self.data_file_raw = bool(self.autoclear_features & L.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        if self.incompatible_features & L.QCOW2_INCOMPAT_DATA_FILE:
            if child is None and self.image_data_file:
                from ....graph.graph import abspath_like_qemu
                path = abspath_like_qemu(self.file.filename(), self.image_data_file)
                graph = self.node.graph
                dnode = graph.open_node({"driver": "file", "filename": path},
                                        inherit={"read-only": self.node.read_only,
                                                 "force-share": self.node.force_share})
                dnode.monitor_owned = False
                child = graph.attach_child(self.node, dnode, "data-file", ChildRole.DATA)
            if child is None:
                raise InvalidArgument("'data-file' is required for this image")
            fchild = self.node.child("file")
            fchild.role &= ~ChildRole.DATA
            self.data_file = child.node
            self.has_data_file = True
        else:
            if child is not None:
                raise InvalidArgument("'data-file' can only be set for images with an "
                                      "external data file")
            self.data_file = self.file
            self.has_data_file = False
            if self.data_file_raw:
                raise InvalidArgument("data-file-raw requires a data file")

    def close(self) -> None:
        if getattr(self, "l2_cache", None) is None or self.unusable:
            return
        if not self.node.read_only:
            self.bitmaps_store_on_close()     # bitmap.py: store, in-use cleared
            try:
                self.flush_caches()
                if self.incompatible_features & L.QCOW2_INCOMPAT_DIRTY:
                    self.mark_clean()
            except BlockError:
                pass

    def reopen(self, read_only: bool) -> None:
        if read_only:
            self.bitmaps_store_on_close(release=False)     # bitmap.py
            self.flush_caches()
            self.mark_clean()
        elif self.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT:
            raise BlockError("qcow2: Image is corrupt; cannot be opened read/write",
                             errno=errno.EACCES)
        else:
            self.bitmaps_reopen_rw()      # bitmap.py

    # ================================================================ header
    def update_header(self) -> None:
        """qcow2_update_header(): rewrite the whole header cluster."""
        cs = self.cluster_size
        h = self.header
        h.version = self.version
        h.size = self.total_size
        h.l1_size, h.l1_table_offset = self.l1_size, self.l1_table_offset
        h.refcount_table_offset = self.refcount_table_offset
        h.refcount_table_clusters = self.refcount_table_size >> (self.cluster_bits - 3)
        h.nb_snapshots, h.snapshots_offset = self.nb_snapshots, self.snapshots_offset
        h.incompatible_features = self.incompatible_features
        h.compatible_features = self.compatible_features
        h.autoclear_features = self.autoclear_features
        h.refcount_order = self.refcount_order
        h.header_length = L.HEADER_SIZE + len(self.unknown_header_fields)
        h.compression_type = self.compression_type
        h.crypt_method = self.crypt_method_header
        h.backing_file_offset = h.backing_file_size = 0
        buf = bytearray(h.pack())
        if self.version >= 3:
            buf += self.unknown_header_fields
        if self.image_backing_format:
            buf += L.pack_extension(L.QCOW2_EXT_MAGIC_BACKING_FORMAT,
                                    self.image_backing_format.encode())
        if self.has_data_file and self.image_data_file:
            buf += L.pack_extension(L.QCOW2_EXT_MAGIC_DATA_FILE, self.image_data_file.encode())
        if self.crypto_header[0]:
            buf += L.pack_extension(L.QCOW2_EXT_MAGIC_CRYPTO_HEADER,
                                    L.CRYPTO_EXT.pack(*self.crypto_header))
        if self.version >= 3 and cs > 4096:
            buf += L.pack_extension(L.QCOW2_EXT_MAGIC_FEATURE_TABLE, L.pack_feature_table())
        if self.bitmaps_ext:
            nb, dsize, doff = self.bitmaps_ext
            buf += L.pack_extension(L.QCOW2_EXT_MAGIC_BITMAPS,
                                    L.BITMAPS_EXT.pack(nb, bytes(4), dsize, doff))
        for magic, body in self.unknown_exts:
            buf += L.pack_extension(magic, body)
        buf += L.pack_extension(L.QCOW2_EXT_MAGIC_END, b"")
        if self.image_backing_file:
            name = self.image_backing_file.encode("utf-8", "surrogateescape")
            if len(buf) + len(name) > cs:
                raise BlockError("No space left on device", errno=errno.ENOSPC)
            off = len(buf)
            buf += name
            h.backing_file_offset, h.backing_file_size = off, len(name)
            buf[:len(h.pack())] = h.pack()
        if len(buf) > cs:
            raise BlockError("No space left on device", errno=errno.ENOSPC)
        buf += bytes(cs - len(buf))
        self.file.pwrite(0, buf)

    def has_zero_init(self) -> bool:
        """qcow2_has_zero_init(): without preallocation no L2 table exists, so all reads
        are zeroes; preallocated images depend on their data file (never if encrypted)."""
        preallocated = self.l1_size > 0 and self.l1_table[0] != 0
        if not preallocated:
            return True
        if self.crypto is not None or self.crypt_method_header:
            return False
        return self.data_file.drv.has_zero_init()

    def child_replaced(self, old, new) -> None:
        super().child_replaced(old, new)
        for cache in (self.refcount_cache, self.l2_cache):
            cache.child_replaced(old, new)

    def change_backing_file(self, backing_file: str | None, backing_fmt: str | None) -> None:
        """qcow2_change_backing_file(): record a new backing file name/format in the header
        (stream and commit relink images; the node's backing child is changed by them)."""
        if backing_file and len(backing_file.encode()) > 1023:
            raise BlockError("Invalid argument", errno=errno.EINVAL)
        if backing_file and self.has_data_file and self.data_file_raw:
            raise BlockError("Invalid argument", errno=errno.EINVAL)
        self.backing_file = backing_file or None
        self.image_backing_file = backing_file or None
        self.image_backing_format = backing_fmt or None
        self.update_header()
        self.file.flush()

    def mark_dirty(self) -> None:
        """qcow2_mark_dirty()."""
        if self.incompatible_features & L.QCOW2_INCOMPAT_DIRTY:
            return
        self.file.pwrite(L.OFS_INCOMPATIBLE_FEATURES,
                         L.BE64.pack(self.incompatible_features | L.QCOW2_INCOMPAT_DIRTY))
        self.file.flush()
        self.incompatible_features |= L.QCOW2_INCOMPAT_DIRTY

    def mark_clean(self) -> None:
        """qcow2_mark_clean()."""
        if self.incompatible_features & L.QCOW2_INCOMPAT_DIRTY:
            self.incompatible_features &= ~L.QCOW2_INCOMPAT_DIRTY
            self.flush_caches()
            self.update_header()

    def mark_consistent(self) -> None:
        if self.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT:
            self.flush_caches()
            self.incompatible_features &= ~L.QCOW2_INCOMPAT_CORRUPT
            self.update_header()

    def signal_corruption(self, fatal: bool, message: str, offset: int = -1,
                          size: int = -1) -> None:
        """qcow2_signal_corruption(): report, mark corrupt if fatal; raises EIO."""
        fatal = fatal and not self.node.read_only
        # QEMU formats every value with %#x, which prints zero as "0"
        import re
        message = re.sub(r"\b0x0\b", "0", message)
        if not (self.signaled_corruption and
                (not fatal or self.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT)):
            if fatal:
                print("qcow2: Marking image as corrupt: %s; further corruption events will be "
                      "suppressed" % message, file=sys.stderr)
            else:
                print("qcow2: Image is corrupt: %s; further non-fatal corruption events will "
                      "be suppressed" % message, file=sys.stderr)
            ev = {"device": "", "node-name": self.node.node_name, "msg": message}
            if offset >= 0:
                ev["offset"] = offset
            if size >= 0:
                ev["size"] = size
            ev["fatal"] = fatal
            try:
                self.node.graph.events.emit("BLOCK_IMAGE_CORRUPTED", ev)
            except Exception:
                pass
            if fatal:
                self.incompatible_features |= L.QCOW2_INCOMPAT_CORRUPT
                try:
                    self.update_header()
                except BlockError:
                    pass
                self.unusable = True
            self.signaled_corruption = True
        raise CorruptImage(message, errno=errno.EIO)

    def _check_usable(self) -> None:
        if self.unusable:
            raise BlockError("No medium found", errno=errno.ENOMEDIUM)

    def pre_write_overlap_check(self, ign: int, offset: int, size: int,
                                data_file: bool = False) -> None:
        """qcow2_pre_write_overlap_check(): refuse a write onto metadata (fatal corruption)."""
        if data_file and self.has_data_file:
            return
        hit = OL.check_metadata_overlap(self, ign, offset, size)
        if hit:
            self.signal_corruption(True, "Preventing invalid write on metadata (overlaps "
                                   "with %s)" % OL.NAMES[hit], offset, size)

    def forget_l2_table(self, l2_offset: int) -> None:
        """Drop the cached slices of an L2 table rewritten behind the cache."""
        self.l2_cache.discard_range(l2_offset, self.cluster_size)

    def set_refcount_table(self, offset: int, entries) -> None:
        """Switch to a refcount table written elsewhere (rebuild_refcount_structure)."""
        self.refcount_table = array("Q", entries)
        self.refcount_table_offset = offset
        self.refcount_table_size = len(entries)
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = len(entries) * 8 // self.cluster_size
        self._update_max_refcount_table_index()

    # ================================================================ geometry / info
    def get_length(self) -> int:
        return self.total_size

    @property
    def dirty_flag(self) -> bool:
        return bool(self.incompatible_features & L.QCOW2_INCOMPAT_DIRTY)

    @property
    def backing_filename(self) -> str | None:
        return self.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.image_backing_format

    def snapshots_info(self) -> list[dict]:
        return [sn.info() for sn in self.snapshots]

    def snapshot_list(self) -> list[dict]:
        return self.snapshots_info()

    def get_info(self) -> dict:
        """qcow2_get_info()."""
        return {"cluster_size": self.cluster_size, "is_dirty": self.dirty_flag,
                "vm_state_offset": self.l1_vm_state_index << (self.cluster_bits + self.l2_bits)}

    def info_specific(self) -> dict:
        """ImageInfoSpecific (key order as qemu-img --output=json prints it)."""
        if self.version == 2:
            data = {"compat": "0.10",
                    "compression-type": L.COMPRESSION_TYPE_NAMES[self.compression_type],
                    "refcount-bits": self.refcount_bits}
            if self.crypto is not None:
                data["encrypt"] = self._encrypt_info()
        else:
            data = {"compat": "1.1",
                    "compression-type": L.COMPRESSION_TYPE_NAMES[self.compression_type],
                    "lazy-refcounts": bool(self.compatible_features
                                           & L.QCOW2_COMPAT_LAZY_REFCOUNTS)}
            bitmaps = self._bitmap_info_list()
            if bitmaps:
                data["bitmaps"] = bitmaps
            data["refcount-bits"] = self.refcount_bits
            if self.crypto is not None:
                data["encrypt"] = self._encrypt_info()
            if self.image_data_file:
                data["data-file"] = self.image_data_file
                data["data-file-raw"] = self.data_file_raw
            data["corrupt"] = bool(self.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT)
            data["extended-l2"] = self.extended
        return {"type": "qcow2", "data": data}

    def _encrypt_info(self) -> dict:
        """ImageInfoSpecificQCow2Encryption: the format, then QCryptoBlockInfoLUKS."""
        out = {"format": "aes" if self.crypt_method_header == L.QCOW_CRYPT_AES else "luks"}
        out.update(self.crypto.info())
        return out

    def _bitmap_info_list(self) -> list[dict]:
        if not self.bitmaps_ext:
            return []
        nb, dsize, doff = self.bitmaps_ext
        data = self.file.pread(doff, dsize)
        out, pos = [], 0
        for _ in range(nb):
            if pos + L.BITMAP_DIR_ENTRY.size > len(data):
                break
            (tbl_off, tbl_size, flags, btype, gran, name_size,
             extra) = L.BITMAP_DIR_ENTRY.unpack_from(data, pos)
            name_off = pos + L.BITMAP_DIR_ENTRY.size + extra
            name = data[name_off:name_off + name_size].decode("utf-8", "replace")
            fl = []
            if flags & 1:
                fl.append("in-use")
            if flags & 2:
                fl.append("auto")
            out.append({"flags": fl, "name": name, "granularity": 1 << gran})
            pos = (name_off + name_size + 7) & ~7
        return out

    def backing_options(self) -> dict | None:
        if not self.backing_file:
            return None
        from ....graph.filename import backing_file_options
        from ....graph.graph import abspath_like_qemu
        path = abspath_like_qemu(self.file.filename(), self.backing_file)
        return backing_file_options(path, self.image_backing_format)

    # ================================================================ reads
    def preadv(self, offset: int, buf: memoryview) -> None:
        if self.unusable:
            self._check_usable()
        # a request inside one cluster (the common small read) maps with one lookup
        if ((offset & (self.cluster_size - 1)) + len(buf) > self.cluster_size
                or not self.read_in_cluster(offset, buf)):
            self.preadv_internal(offset, buf)

    def preadv_internal(self, offset: int, buf: memoryview) -> None:
        """qcow2_co_preadv_part()."""
        pos, total = 0, len(buf)
        while pos < total:
            for n, t, host in self.get_host_runs(offset + pos, total - pos):
                view = buf if n == total else buf[pos:pos + n]
                if t == SC_NORMAL:
                    self.data_file_read(host, view)
                    if self.crypto is not None:
                        # qcow2_co_preadv_encrypted(): LUKS by host, AES by guest sector
                        self.crypto.cipher.decrypt_into(
                            (host if self.crypt_physical_offset else offset + pos) >> 9, view)
                elif t == SC_ZERO_PLAIN or t == SC_ZERO_ALLOC:
                    _zero(view)
                elif t == SC_UNALLOCATED_PLAIN or t == SC_UNALLOCATED_ALLOC:
                    self._read_backing(offset + pos, view)
                elif t == SC_COMPRESSED:
                    self._read_compressed(host, offset + pos, view)
                pos += n

    def _read_backing(self, offset: int, view: memoryview) -> None:
        backing = self.node.backing
        if backing is None:
            _zero(view)
            return
        n = len(view)
        avail = max(0, min(n, backing.total_size - offset))
        if avail:
            backing.preadv(offset, view[:avail])
        if avail < n:
            _zero(view[avail:])

    def _read_compressed(self, l2_entry: int, offset: int, view: memoryview) -> None:
        cs = self.cluster_size
        key, data = self._decomp_cache
        if key != l2_entry:
            coffset, csize = self.parse_compressed_l2_entry(l2_entry)
            comp = self.file.pread(coffset, csize)
            data = decompress(comp, cs, self.compression_type)
            self._decomp_cache = (l2_entry, data)
        start = offset & (cs - 1)
        view[:] = data[start:start + len(view)]

    # ================================================================ block status
    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        """qcow2_co_block_status()."""
        self._check_usable()
        if self.metadata_preallocation is None:
            self.metadata_preallocation = self._detect_metadata_preallocation()
        n, t, host = self.get_host_runs(offset, min(length, 0x7FFFFFFF), max_runs=1)[0]
        return self._run_status(n, t, host)

    def block_status_runs(self, offset: int, length: int, want_zero: bool) -> list[Status]:
        """block_status() for every run of the L2 slice holding offset (imago-style)."""
        self._check_usable()
        if self.metadata_preallocation is None:
            self.metadata_preallocation = self._detect_metadata_preallocation()
        conv = self._run_status
        length = min(length, 0x7FFFFFFF)
        runs = [conv(n, t, host) for n, t, host in
                self.get_host_runs(offset, length, stop_at_error=True)]
        # slices of unallocated L2 tables after this one: their answers too (each what
        # a lookup would give; one Status object for all, which the generic layer
        # recognises), so walking a huge sparse image is not a call per slice
        covered = sum(st.length for st in runs)
        holes = self._bytes_without_l2_table(offset + covered, length - covered)
        slice_bytes = self.l2_slice_size << self.cluster_bits
        whole, rest = divmod(holes, slice_bytes)
        runs += [conv(slice_bytes, SC_UNALLOCATED_PLAIN, 0)] * whole
        if rest:
            runs.append(conv(rest, SC_UNALLOCATED_PLAIN, 0))
        return runs

    def _bytes_without_l2_table(self, offset: int, limit: int) -> int:
        """How many bytes from offset (slice-aligned, or inside a table's range), up to
        limit, no L2 table covers: whole L1 entries at a time.  (No corruption check:
        a lookup at an offset signals that.)"""
        table_bytes = self.l2_size << self.cluster_bits
        done = 0
        while done < limit:
            l1_index = (offset + done) >> (self.cluster_bits + self.l2_bits)
            if l1_index < self.l1_size and self.l1_table[l1_index] & L1E_OFFSET_MASK:
                break
            done += table_bytes - (offset + done) % table_bytes
        return min(done, limit)

    def map_packed(self, offset: int, length: int, file_id) -> tuple[bytes, int] | None:
        """`img map` entries from offset to the end of its L2 slice in one native
        call: packed records (``_native.MAP_ENTRY``) and the bytes they cover, equal to
        what the generic block status walk gives; None where that walk is needed
        (extended L2, data file, encryption, metadata preallocation).  The batch ends
        before an invalid entry and, with a backing file, before unallocated clusters,
        which the generic walk resolves."""
        self._check_usable()
        if self.metadata_preallocation is None:
            self.metadata_preallocation = self._detect_metadata_preallocation()
        if (self.extended or self.has_data_file or self.crypto is not None
                or self.metadata_preallocation):
            return None
        cb, cs = self.cluster_bits, self.cluster_size
        in_cluster = offset & (cs - 1)
        l1_index, slice_no, idx = self._l2_location(offset)
        total = length
        length = min(length, ((self.l2_slice_size - idx) << cb) - in_cluster)
        unallocated = N.MAP_STOP if self.node.cow_child() is not None else N.MAP_ZERO
        l2_offset = self._l2_offset_for_read(l1_index)
        if not l2_offset:
            if unallocated == N.MAP_STOP:
                return None
            # and the unallocated tables after it: map merges them into one entry
            length += self._bytes_without_l2_table(offset + length, total - length)
            return N.MAP_ENTRY.pack(offset, length, 0, N.MAP_ZERO, 0, 0, 0), length
        table = self.l2_cache.get(l2_offset + slice_no * self.l2_slice_bytes)
        return N.l2_map(table, idx, (in_cluster + length + cs - 1) >> cb, cb, offset,
                        in_cluster, length, unallocated, file_id(self.data_file.filename()))

    def _run_status(self, n: int, t: int, host: int) -> Status:
        """The Status of one get_host_runs() run (qcow2_co_block_status())."""
        status = 0
        host_node = None
        host_off = 0
        if t in (SC_NORMAL, SC_ZERO_ALLOC, SC_UNALLOCATED_ALLOC) and self.crypto is None:
            status |= BLOCK_OFFSET_VALID
            host_off, host_node = host, self.data_file
        if t in (SC_ZERO_PLAIN, SC_ZERO_ALLOC):
            status |= BLOCK_ZERO
        elif t not in (SC_UNALLOCATED_PLAIN, SC_UNALLOCATED_ALLOC):
            status |= BLOCK_DATA
        if self.metadata_preallocation and status & BLOCK_DATA and status & BLOCK_OFFSET_VALID:
            status |= BLOCK_RECURSE
        return Status(status, n, host_off, host_node)

    def _detect_metadata_preallocation(self) -> bool:
        """qcow2_detect_metadata_preallocation()."""
        file_length = self.file.total_size
        real = self.file.drv.allocated_file_size()
        if real is None:
            return False
        real_clusters = real // self.cluster_size
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-file_length // self.cluster_size)
        return self.count_allocated_clusters(end_cluster) >= threshold

    # ================================================================ writes
    def _begin_write(self) -> None:
        self._check_usable()
        if self.node.read_only:
            raise BlockError("Block node is read-only", errno=errno.EPERM)

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """qcow2_co_pwritev_part()."""
        self._begin_write()
        data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        pos, total = 0, len(data)
        # a write inside one allocated cluster (the common small write) goes in place
        if (offset & (self.cluster_size - 1)) + total <= self.cluster_size \
                and self.write_in_cluster(offset, data):
            pos = total
        while pos < total:
            cur = min(total - pos, 0x7FFFFFFF)
            done, host, segs = self.alloc_host_offset(offset + pos, cur)
            for guest, h, n, meta in segs:
                self.perform_cow_and_write(guest, h, data[guest - offset:guest - offset + n],
                                           meta)
            for guest, h, n, meta in segs:
                if meta is not None:
                    self.link_l2(meta)
            pos += done
        if fua:
            self.flush_caches()
            self.data_file.flush()

    def pwritev_compressed(self, offset: int, data) -> None:
        """qcow2_co_pwritev_compressed_part(): every cluster of the request is stored
        compressed, in a new place packed after the previous compressed data.

        ``offset`` is cluster aligned and the request is whole clusters, except a last
        partial cluster ending at the end of the image (compressed padded with zeroes).
        A cluster that does not shrink is written normally; a cluster that already has
        a host offset fails with EIO (compressed writes never overwrite).  The clusters
        are compressed in parallel threads, then allocated in guest order."""
        self._begin_write()
        if self.has_data_file:
            raise NotSupported()
        data = memoryview(data).cast("B")
        nbytes = len(data)
        if nbytes == 0:
            # the end of a compressed stream: the file ends on a sector boundary
            # (QEMU truncates it to bdrv_getlength(), its size in whole sectors)
            self.file.truncate(self.file.total_size)
            return
        cs = self.cluster_size
        if offset & (cs - 1) or (nbytes & (cs - 1) and offset + nbytes != self.total_size):
            raise InvalidArgument("Invalid argument", errno=errno.EINVAL)
        chunks = [data[pos:pos + cs] for pos in range(0, nbytes, cs)]
        clusters = [c if len(c) == cs else bytes(c) + bytes(cs - len(c)) for c in chunks]
        compressed = compress_many(clusters, self.compression_type)
        # host bytes of a freed compressed cluster may get the very same L2 entry again
        self._decomp_cache = (None, None)
        for i, (chunk, out) in enumerate(zip(chunks, compressed)):
            guest = offset + i * cs
            try:
                if out is None:
                    self.pwritev(guest, chunk)
                    continue
                host = self.alloc_compressed_cluster_offset(guest, len(out))
                self.pre_write_overlap_check(0, host, len(out), True)
                self.data_file.pwrite(host, out)
            except BlockError as e:
                e.guest_offset = guest      # the cluster that failed (img convert names it)
                raise

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """bdrv_co_do_pwrite_zeroes() split at the subcluster size + qcow2_co_pwrite_zeroes()."""
        self._begin_write()
        if self.version < 3:
            may_unmap = False     # supported_zero_flags == 0
        align = self.subcluster_size
        head = offset % align
        end = offset + length
        tail = end % align
        while length > 0:
            num = length
            if head:
                num = min(length, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            try:
                self._pwrite_zeroes_piece(offset, num, may_unmap)
            except NotSupported:
                pos = 0
                while pos < num:
                    k = min(num - pos, len(_ZEROES))
                    self.pwritev(offset + pos, _ZEROES[:k])
                    pos += k
            offset += num
            length -= num

    def _pwrite_zeroes_piece(self, offset: int, nbytes: int, may_unmap: bool) -> None:
        """qcow2_co_pwrite_zeroes()."""
        scs = self.subcluster_size
        head = offset % scs
        tail = (-(offset + nbytes)) % scs
        if offset + nbytes == self.total_size:
            tail = 0
        if head or tail:
            if not (self._is_zero(offset - head, head) and self._is_zero(offset + nbytes, tail)):
                raise NotSupported()
            offset -= head
            nbytes = scs
            runs = self.get_host_runs(offset, nbytes)
            n, t, host = runs[0]
            if t not in (SC_UNALLOCATED_PLAIN, SC_UNALLOCATED_ALLOC, SC_ZERO_PLAIN,
                         SC_ZERO_ALLOC):
                raise NotSupported()
            if offset + nbytes > self.total_size:
                nbytes = self.total_size - offset
        self.subcluster_zeroize(offset, nbytes, may_unmap)

    def _is_zero(self, offset: int, nbytes: int) -> bool:
        size = self.total_size
        if offset + nbytes > size:
            nbytes = size - offset
        if nbytes <= 0:
            return True
        while nbytes:
            st = self.node.block_status_above(offset, nbytes)
            if not st.flags & BLOCK_ZERO or not st.length:
                return False
            offset += st.length
            nbytes -= st.length
        return True

    def discard(self, offset: int, length: int) -> None:
        """bdrv_co_pdiscard() aligned to the cluster size + qcow2_co_pdiscard()."""
        self._begin_write()
        if self.version < 3 and self.node.backing is not None:
            raise NotSupported()
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = offset + length
        aligned_end = end - end % cs
        if end == self.total_size and end % cs and start <= end - end % cs:
            aligned_end = end      # the partial cluster at the end of an unaligned image
        if aligned_end <= start:
            return
        self.cluster_discard(start, aligned_end - start, L.QCOW2_DISCARD_REQUEST, False)

    def make_empty(self) -> None:
        """qcow2_make_empty() (bdrv_make_empty, `img commit` empties the committed image):
        every cluster unallocated, so reads fall through to the backing file again."""
        self._begin_write()
        cs = self.cluster_size
        l1_clusters = -(-self.l1_size * L.L1E_SIZE // cs)
        if (self.version >= 3 and not self.nb_snapshots
                and not (self.bitmaps_ext and self.bitmaps_ext[0])
                and 3 + l1_clusters <= self.refcount_block_size
                and self.crypt_method_header != L.QCOW_CRYPT_LUKS and not self.has_data_file):
            self._make_completely_empty(l1_clusters)
            return
        # the general path: discard every cluster
        step = (2**31 - 1) // cs * cs
        for offset in range(0, self.total_size, step):
            self.cluster_discard(offset, min(step, self.total_size - offset),
                                 L.QCOW2_DISCARD_SNAPSHOT, True)

    def _make_completely_empty(self, l1_clusters: int) -> None:
        """make_completely_empty(): only the header, a one-cluster refcount table, one
        refcount block and an empty L1 table remain (clusters 0, 1, 2, 3...), and the
        file is truncated after them.  The dirty flag covers the window in which the
        refcounts on disk are wrong; nothing else of the old image is needed."""
        cs = self.cluster_size
        for cache in (self.l2_cache, self.refcount_cache):
            cache.flush()
            cache.clear()
        self.mark_dirty()
        self.file.pwrite_zeroes(self.l1_table_offset, l1_clusters * cs)
        self.l1_table = [0] * self.l1_size
        self.file.pwrite_zeroes(cs, (2 + l1_clusters) * cs)
        # l1_table_offset, refcount_table_offset, refcount_table_clusters (contiguous)
        self.file.pwrite(L.OFS_L1_SIZE + 4, struct.pack(">QQI", 3 * cs, cs, 1))
        self.file.flush()
        self.l1_table_offset = 3 * cs
        self.refcount_table = array("Q", bytes(cs))
        self.refcount_table_offset, self.refcount_table_size = cs, cs // 8
        self.file.pwrite(cs, struct.pack(">Q", 2 * cs))
        self.file.flush()
        self.refcount_table[0] = 2 * cs
        self.max_refcount_table_index = 0
        self.free_cluster_index = 0
        self.free_byte_offset = 0       # its cluster is gone with the old refcounts
        if self.alloc_clusters(3 * cs + self.l1_size * L.L1E_SIZE) != 0:
            raise CorruptImage("First cluster in emptied image is in use")
        self.mark_clean()
        self.file.truncate((3 + l1_clusters) * cs)

    def flush(self) -> None:
        """qcow2_co_flush_to_os(): write back the metadata caches."""
        if getattr(self, "l2_cache", None) is None or self.unusable or self.node.read_only:
            return
        self.flush_caches()

    def flush_caches(self) -> None:
        """qcow2_write_caches(): refcount blocks first (dependency), then L2 tables."""
        self.refcount_cache.flush()
        self.l2_cache.flush()

    # ================================================================ truncate
    def truncate(self, size: int, exact: bool, prealloc: PreallocMode) -> None:
        """qcow2_co_truncate()."""
        self._begin_write()
        cs = self.cluster_size
        if size % 512:
            raise InvalidArgument("The new size must be a multiple of 512")
        if self.nb_snapshots and self.version < 3:
            raise NotSupported("Can't resize a v2 image which has snapshots")
        self.truncate_bitmaps_check()
        old_length = self.total_size
        new_l1_size = L.size_to_l1(self.cluster_bits, self.l2_bits, size)
        # bdrv_co_truncate() asks for zeroes when a longer backing file would show through
        backing = self.node.backing
        zero_write = (size > old_length and backing is not None
                      and backing.total_size > old_length)
        if size < old_length:
            if prealloc is not PreallocMode.OFF:
                raise InvalidArgument("Preallocation can't be used for shrinking an image")
            start = -(-size // cs) * cs
            if old_length > start:
                self.cluster_discard(start, old_length - start, L.QCOW2_DISCARD_ALWAYS, True)
            self.shrink_l1_table(new_l1_size)
            self.flush_caches()
            self.shrink_reftable()
            old_file_size = self.file.total_size
            last = self.get_last_cluster(old_file_size)
            if (last + 1) * cs < old_file_size:
                try:
                    self.file.truncate((last + 1) * cs)
                except BlockError as e:
                    print("qemu-img: warning: Failed to truncate the tail of the image: %s" % e,
                          file=sys.stderr)
        else:
            try:
                self.grow_l1_table(new_l1_size, True)
            except BlockError as e:     # error_setg_errno(errp, -ret, ...)
                raise BlockError("Failed to grow the L1 table: %s"
                                 % os.strerror(e.errno or errno.EIO), errno=e.errno) from e
            if self.data_file_raw and prealloc is PreallocMode.OFF:
                prealloc = PreallocMode.METADATA

        if prealloc is PreallocMode.OFF:
            if self.has_data_file:
                self.data_file.truncate(size, exact=exact, prealloc=PreallocMode.OFF)
        elif prealloc is PreallocMode.METADATA or self.has_data_file:
            self.total_size = max(self.total_size, size)
            self._preallocate(old_length, size, prealloc)
        else:
            self._preallocate_falloc(old_length, size, prealloc)

        if zero_write:
            zero_start = -(-old_length // self.subcluster_size) * self.subcluster_size
            if size > zero_start:
                try:
                    self.subcluster_zeroize(zero_start, size - zero_start, False)
                except NotSupported:
                    raise BlockError("Failed to zero out new clusters: Operation not "
                                     "supported", errno=errno.ENOTSUP) from None
            if zero_start > old_length:
                n = min(zero_start, size) - old_length
                self.total_size = max(self.total_size, old_length + n)
                self.pwritev(old_length, memoryview(bytes(n)))
        if prealloc is not PreallocMode.OFF:
            self.flush_caches()
        self.total_size = size
        self.file.pwrite(L.OFS_SIZE, L.BE64.pack(size))
        self.file.flush()
        self.header.size = size
        self.l1_vm_state_index = new_l1_size
        self.flush_caches()
        self._update_options(self.node.options if isinstance(self.node.options, dict) else {})

    def _preallocate(self, offset: int, new_length: int, mode: PreallocMode) -> None:
        """preallocate_co()."""
        nbytes = new_length - offset
        host = cur = 0
        cs = self.cluster_size
        while nbytes:
            cur = min(nbytes, (0x7FFFFFFF // cs) * cs)
            done, host, segs = self.alloc_host_offset(offset, cur)
            cur = done
            for guest, h, n, meta in segs:
                if meta is not None:
                    meta.prealloc = True
                    self.perform_cow_and_write(guest, h, None, meta)
                    self.link_l2(meta)
            nbytes -= cur
            offset += cur
        file_length = self.data_file.total_size
        if host + cur > file_length:
            m = PreallocMode.OFF if mode is PreallocMode.METADATA else mode
            self.data_file.truncate(host + cur, exact=False, prealloc=m)

    def _preallocate_falloc(self, old_length: int, offset: int, prealloc: PreallocMode) -> None:
        cs, cb = self.cluster_size, self.cluster_bits
        old_file_size = self.file.total_size
        last = self.get_last_cluster(old_file_size)
        old_file_size = (last + 1) * cs if last >= 0 else -(-old_file_size // cs) * cs
        nb_new_data = (-(-offset // cs) * cs - (old_length - old_length % cs)) >> cb
        nb_new_l2 = -(-nb_new_data // (cs // self.l2e_size)) + 1
        allocation_start = self.refcount_area(old_file_size, nb_new_data + nb_new_l2, True, 0, 0)
        got = self.alloc_clusters_at(allocation_start, nb_new_data)
        assert got == nb_new_data
        new_file_size = allocation_start + nb_new_data * cs
        self.file.truncate(new_file_size, exact=False, prealloc=prealloc)
        host, guest = allocation_start, old_length
        while nb_new_data:
            _, _, idx = self._l2_location(guest)
            n = min(nb_new_data, self.l2_slice_size - idx)
            cow_start = guest & (cs - 1)
            guest -= cow_start
            m = L2Meta(guest, host, n, False, CowRegion(0, cow_start), CowRegion(n << cb, 0),
                       prealloc=True)
            self.perform_cow_and_write(guest, host, None, m)
            self.link_l2(m)
            guest += n << cb
            host += n << cb
            nb_new_data -= n

    # ================================================================ amend
    def amend_options(self, opts: dict, force: bool, status_cb=None) -> None:
        """qemu-img amend (amend.py): ``opts`` maps the AMEND_OPTS given to (string,
        typed value)."""
        amend_options(self, opts, force, status_cb)

    # ================================================================ check
    def check(self, fix=None) -> dict:
        """qcow2_co_check_locked(): ImageCheck fields; messages in check_messages.

        fix: None/0, 'leaks', 'all', or BdrvCheckMode flags (1 leaks, 2 errors)."""
        from .check import Checker
        if fix is None or fix is False:
            fix = 0
        elif isinstance(fix, str):
            fix = {"leaks": 1, "errors": 2, "all": 3}[fix]
        fix &= 3
        if fix and self.node.read_only:
            raise BlockError("Block node is read-only", errno=errno.EPERM)
        res = Checker(self, fix).run()
        if fix and not res["check-errors"] and not res["corruptions"]:
            self.mark_clean()
            self.mark_consistent()
        return res

    def allocated_file_size(self):
        size = self.file.drv.allocated_file_size()
        if self.has_data_file and size is not None:
            d = self.data_file.drv.allocated_file_size()
            if d is not None:
                size += d
        return size

    # ================================================================ create
    @classmethod
    def create(cls, filename: str, size: int, opts: dict, secrets: dict | None = None
               ) -> None:
        from .create import create
        create(filename, size, opts, secrets)


def _encrypt_options(options: dict) -> dict:
    """The "encrypt." options, nested (blockdev) or dotted (flat)."""
    enc = {}
    sub = options.get("encrypt")
    if isinstance(sub, dict):
        enc.update(sub)
    for k, v in options.items():
        if k.startswith("encrypt."):
            enc[k[len("encrypt."):]] = v
    return enc


def _opened_for_check(options: dict) -> bool:
    """BDRV_O_CHECK: the image is opened by `qemu-img check` (the ``x-check`` option)."""
    return bool_option(options.get("x-check", False), "x-check")

