"""`qemu-img amend` for qcow2 (QEMU 7.2's qcow2_amend_options() and its helpers
qcow2_upgrade(), qcow2_downgrade(), qcow2_expand_zero_clusters()).

Theory of operation: the options given are validated in AMEND_OPTS order (so the
first error is QEMU's), then applied in QEMU's order: upgrade to v3 first (later
steps may need it), LUKS key slots, data-file settings and a header rewrite, the
backing file check, lazy refcounts, the size, and a downgrade to v2 last (after the
features v2 lacks are gone).  Each step leaves a valid image on its own, so a failure
part way keeps the earlier steps, as in QEMU.

A new refcount width (qcow2_change_refcount_order()) is written as QEMU does it:
walks over the old refcounts allocate the new refcount blocks (through the old
structures, until a walk allocates nothing more) and the new table, a last walk
writes the blocks, then the header switches to the new table and the old
structures are freed through the new ones.  Until the header switch the image is
the old one, so a crash only leaks clusters.
"""
from __future__ import annotations

import errno
import os
from array import array
from functools import partial
from itertools import groupby

from ....errors import BlockError, CorruptImage, InvalidArgument, NotSupported
from ...base import CreateOpt
from ..luks.options import AMEND_OPTS as LUKS_AMEND_OPTS
from . import layout as L
from . import overlap as OL
from .native import N
from .snapshot import write_snapshots
from .layout import CL_ZERO_ALLOC, CL_ZERO_PLAIN, L1E_OFFSET_MASK, L2E_OFFSET_MASK

ENCRYPT_PREFIX = "encrypt."

# qcow2_amend_opts: the LUKS key slot options with the "encrypt." prefix, then
# QCOW_COMMON_OPTIONS
AMEND_OPTS = tuple(CreateOpt(ENCRYPT_PREFIX + o.name, o.type, o.help)
                   for o in LUKS_AMEND_OPTS) + (
    CreateOpt("size", "size", "Virtual disk size"),
    CreateOpt("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    CreateOpt("backing_file", "str", "File name of a base image"),
    CreateOpt("backing_fmt", "str", "Image format of the base image"),
    CreateOpt("data_file", "str", "File name of an external data file"),
    CreateOpt("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    CreateOpt("lazy_refcounts", "bool", "Postpone refcount updates"),
    CreateOpt("refcount_bits", "num", "Width of a reference count entry in bits"),
)

# Qcow2AmendOperation: the steps that report progress
UPGRADING, UPDATING_ENCRYPTION, CHANGING_REFCOUNT_ORDER, DOWNGRADING = range(1, 5)


class _Progress:
    """qcow2_amend_helper_cb(): one status callback across several operations, each
    projected to take as long as the ones before it."""

    def __init__(self, status_cb, total_operations: int):
        self.status_cb = status_cb
        self.total = total_operations
        self.current = self.last = None
        self.completed = 0
        self.offset_completed = 0
        self.last_work_size = 0

    def __call__(self, offset: int, work_size: int) -> None:
        if self.status_cb is None:
            return
        if self.current != self.last:
            if self.last is not None:
                self.offset_completed += self.last_work_size
                self.completed += 1
            self.last = self.current
        self.last_work_size = work_size
        current_work = self.offset_completed + work_size
        projected = (current_work * (self.total - self.completed - 1)
                     // (self.completed + 1))
        self.status_cb(self.offset_completed + offset, current_work + projected)


def amend_options(s, opts: dict, force: bool, status_cb=None) -> None:
    """qcow2_amend_options() on the open driver ``s``; ``opts`` maps each option given
    to (string, typed value)."""
    old_version = new_version = s.version
    new_size = 0
    backing_file = backing_format = data_file = None
    lazy_refcounts = s.use_lazy_refcounts
    data_file_raw = s.data_file_raw
    refcount_bits = s.refcount_bits
    encryption_update = False
    for desc in AMEND_OPTS:
        name = desc.name
        if name not in opts:
            continue
        text, value = opts[name]
        if name == "compat":
            if text in ("0.10", "v2"):
                new_version = 2
            elif text in ("1.1", "v3"):
                new_version = 3
            else:
                raise InvalidArgument("Unknown compatibility level %s" % text)
        elif name == "size":
            new_size = value
        elif name == "backing_file":
            backing_file = text
        elif name == "backing_fmt":
            backing_format = text
        elif name.startswith(ENCRYPT_PREFIX):
            if s.crypto is None:
                raise InvalidArgument("Can't amend encryption options - encryption not "
                                      "present")
            if s.crypt_method_header != L.QCOW_CRYPT_LUKS:
                raise NotSupported("Only LUKS encryption options can be amended")
            encryption_update = True
        elif name == "lazy_refcounts":
            lazy_refcounts = value
        elif name == "refcount_bits":
            refcount_bits = value
            if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
                raise InvalidArgument("Refcount width must be a power of two and may not "
                                      "exceed 64 bits")
        elif name == "data_file":
            data_file = text
            if not s.has_data_file:
                raise InvalidArgument("data-file can only be set for images that use an "
                                      "external data file")
        elif name == "data_file_raw":
            data_file_raw = value
            if data_file_raw and not s.data_file_raw:
                raise InvalidArgument("data-file-raw cannot be set on existing images")

    progress = _Progress(status_cb, (new_version != old_version)
                         + (s.refcount_bits != refcount_bits) + encryption_update)

    if new_version > old_version:
        progress.current = UPGRADING
        upgrade(s, progress)

    if encryption_update:
        progress.current = UPDATING_ENCRYPTION
        crypto_opts = {name[len(ENCRYPT_PREFIX):]: text for name, (text, _) in opts.items()
                       if name.startswith(ENCRYPT_PREFIX)}
        from ..luks.driver import amend_keyslots
        amend_keyslots(s.crypto, s._crypto_hdr_read, partial(_crypto_hdr_write, s),
                       crypto_opts, force, getattr(s.node.graph, "secrets", None),
                       _encrypt_key_secret(s))

    if s.refcount_bits != refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise InvalidArgument("Refcount widths other than 16 bits require compatibility "
                                  "level 1.1 or above (use compat=1.1 or greater)")
        progress.current = CHANGING_REFCOUNT_ORDER
        change_refcount_order(s, refcount_bits.bit_length() - 1, progress)

    # data-file-raw blocks backing files, so clear it first if requested
    if data_file_raw:
        s.autoclear_features |= L.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    else:
        s.autoclear_features &= ~L.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    s.data_file_raw = data_file_raw
    if data_file is not None:
        s.image_data_file = data_file or None
    _update_header(s)

    if backing_file is not None or backing_format is not None:
        if backing_file != s.image_backing_file or backing_format != s.image_backing_format:
            raise InvalidArgument("Cannot amend the backing file",
                                  hint="You can use 'qemu-img rebase' instead.\n")

    if s.use_lazy_refcounts != lazy_refcounts:
        if lazy_refcounts:
            if new_version < 3:
                raise InvalidArgument("Lazy refcounts only supported with compatibility "
                                      "level 1.1 and above (use compat=1.1 or greater)")
            s.compatible_features |= L.QCOW2_COMPAT_LAZY_REFCOUNTS
        else:
            _mark_clean(s)
            s.compatible_features &= ~L.QCOW2_COMPAT_LAZY_REFCOUNTS
        _update_header(s)
        s.use_lazy_refcounts = lazy_refcounts

    if new_size:
        # amending means the image gets exactly the given values: exact=True
        s.node.truncate(new_size, exact=True)

    if new_version < old_version:
        progress.current = DOWNGRADING
        downgrade(s, new_version, progress)


def upgrade(s, progress) -> None:
    """qcow2_upgrade(): v2 -> v3.  v3 needs the 64-bit VM state size and the disk size
    in every snapshot's extra data; the snapshot table is rewritten if one lacks them."""
    progress(0, 2)
    if any(sn.extra_data_size < 16 for sn in s.snapshots):
        try:
            write_snapshots(s)
        except BlockError as e:
            raise _errno_error("Failed to update the snapshot table", e) from None
    progress(1, 2)
    s.version = 3
    try:
        _update_header(s)
    except BlockError:
        s.version = 2
        raise
    progress(2, 2)


def change_refcount_order(s, refcount_order: int, progress) -> None:
    """qcow2_change_refcount_order() (qcow2-refcount.c)."""
    cs = s.cluster_size
    walk = _ReftableWalk(s, refcount_order, progress)
    new_reftable_offset = allocated_size = 0
    walk_index = 0
    try:
        while True:
            # this walk, the writing one, and at least one that allocates nothing
            total_walks = max(walk_index + 2, 3)
            allocated = walk.run(walk.alloc_refblock, walk_index, total_walks)
            walk_index += 1
            if not allocated:
                break
            if new_reftable_offset:
                s.free_clusters(new_reftable_offset, allocated_size * 8,
                                L.QCOW2_DISCARD_NEVER)
            new_reftable_offset = _checked(s.alloc_clusters, len(walk.reftable) * 8,
                                           message="Failed to allocate the new reftable")
            allocated_size = len(walk.reftable)
        walk.run(walk.flush_refblock, walk_index, walk_index + 1)
        new_reftable = walk.reftable
        table = b"".join(e.to_bytes(8, "big") for e in new_reftable)
        _checked(s.pre_write_overlap_check, 0, new_reftable_offset, len(table),
                 message="Overlap check failed")
        _checked(s.file.pwrite, new_reftable_offset, table,
                 message="Failed to write the new reftable")
        _checked(s.refcount_cache.flush, message="Failed to flush the refblock cache")
        old = (s.refcount_order, s.refcount_table_size, s.refcount_table_offset)
        s.refcount_order, s.refcount_table_size, s.refcount_table_offset = (
            refcount_order, len(new_reftable), new_reftable_offset)
        try:
            s.update_header()
        except BlockError as e:
            s.refcount_order, s.refcount_table_size, s.refcount_table_offset = old
            raise _errno_error("Failed to update the qcow2 header", e) from None
    except BlockError:
        # free what was allocated for the new structures (through the old ones)
        for entry in walk.reftable:
            if entry & L.REFT_OFFSET_MASK:
                s.free_clusters(entry & L.REFT_OFFSET_MASK, cs, L.QCOW2_DISCARD_OTHER)
        if new_reftable_offset:
            s.free_clusters(new_reftable_offset, allocated_size * 8, L.QCOW2_DISCARD_OTHER)
        raise
    # switch the in-memory state to the new structures, then free the old ones
    old_reftable, old_offset = s.refcount_table, old[2]
    s.refcount_table = array("Q", new_reftable)
    s._update_max_refcount_table_index()
    s.refcount_bits = 1 << refcount_order
    s.refcount_max = (1 << s.refcount_bits) - 1
    s.refcount_block_bits = s.cluster_bits - (refcount_order - 3)
    s.refcount_block_size = 1 << s.refcount_block_bits
    s.refcount_cache.clear()          # old refblocks: flushed above, never read again
    for entry in old_reftable:
        if entry & L.REFT_OFFSET_MASK:
            s.free_clusters(entry & L.REFT_OFFSET_MASK, cs, L.QCOW2_DISCARD_OTHER)
    s.free_clusters(old_offset, len(old_reftable) * 8, L.QCOW2_DISCARD_OTHER)


class _ReftableWalk:
    """walk_over_reftable(): the old refcounts, in order, cut into the new width's
    refcount blocks; ``operation(index, values, empty)`` runs for each complete new
    block, just before the next refcount is read (QEMU's order: an allocation there
    is seen by the refcounts read after it).  ``values`` are only gathered when
    writing."""

    def __init__(self, s, refcount_order: int, progress):
        self.s = s
        self.order = refcount_order
        self.bits = 1 << refcount_order
        self.block_size = 1 << (s.cluster_bits - (refcount_order - 3))
        self.progress = progress
        self.reftable: list[int] = []
        self.allocated = False

    def run(self, operation, index: int, total: int) -> bool:
        """One walk; True if it allocated a cluster."""
        s = self.s
        self.allocated = False
        collect = operation == self.flush_refblock
        new_index, fill, empty, values = 0, 0, True, array("Q")
        reftable_index = 0
        while reftable_index < s.refcount_table_size:     # the table may grow meanwhile
            self.progress(index * s.refcount_table_size + reftable_index,
                          total * s.refcount_table_size)
            refblock_offset = s.refcount_table[reftable_index] & L.REFT_OFFSET_MASK
            if refblock_offset & (s.cluster_size - 1):
                s.signal_corruption(True, "Refblock offset %#x unaligned (reftable index: "
                                    "%#x)" % (refblock_offset, reftable_index))
            i = 0
            while i < s.refcount_block_size:
                if fill >= self.block_size:
                    operation(new_index, values, empty)
                    new_index, fill, empty, values = new_index + 1, 0, True, array("Q")
                n = min(s.refcount_block_size - i, self.block_size - fill)
                if refblock_offset:
                    got = _old_refcounts(s, refblock_offset, i, n)
                    self._check_width(got, reftable_index, i)
                    empty = empty and not any(got)
                else:
                    got = array("Q", bytes(8 * n))
                if collect:
                    values.extend(got)
                fill += n
                i += n
            reftable_index += 1
        if fill > 0:
            if collect:
                values.extend(array("Q", bytes(8 * (self.block_size - fill))))
            operation(new_index, values, empty)
        self.progress((index + 1) * s.refcount_table_size, total * s.refcount_table_size)
        return self.allocated

    def _check_width(self, values, reftable_index: int, first: int) -> None:
        if self.bits >= 64 or not max(values) >> self.bits:
            return
        k = next(j for j, v in enumerate(values) if v >> self.bits)
        offset = ((reftable_index << self.s.refcount_block_bits) + first + k) \
            << self.s.cluster_bits
        raise InvalidArgument("Cannot decrease refcount entry width to %d bits: Cluster at "
                              "offset %s has a refcount of %d"
                              % (self.bits, "%#x" % offset if offset else "0", values[k]))

    def alloc_refblock(self, index: int, values, empty: bool) -> None:
        """alloc_refblock(): a cluster for every non-empty new refcount block."""
        s = self.s
        if empty:
            return
        if index >= len(self.reftable):
            per_cluster = s.cluster_size // 8
            size = -(-(index + 1) // per_cluster) * per_cluster
            if size > L.QCOW_MAX_REFTABLE_SIZE // 8:
                raise NotSupported("This operation would make the refcount table grow "
                                   "beyond the maximum size supported by QEMU, aborting")
            self.reftable.extend([0] * (size - len(self.reftable)))
        if not self.reftable[index]:
            self.reftable[index] = _checked(s.alloc_clusters, s.cluster_size,
                                            message="Failed to allocate refblock")
            self.allocated = True

    def flush_refblock(self, index: int, values, empty: bool) -> None:
        """flush_refblock(): write the new block where the new table says."""
        s = self.s
        if index < len(self.reftable) and self.reftable[index]:
            offset = self.reftable[index]
            block = bytearray(s.cluster_size)
            first = 0
            for value, run in groupby(values):
                n = sum(1 for _ in run)
                if value:
                    N.refcount_set_range(block, self.order, first, n, value)
                first += n
            _checked(s.pre_write_overlap_check, 0, offset, s.cluster_size,
                     message="Overlap check failed")
            _checked(s.file.pwrite, offset, block, message="Failed to write refblock")
        else:
            assert empty


def _old_refcounts(s, refblock_offset: int, first: int, n: int) -> array:
    """n refcounts of the (live, cached) old refcount block from index first."""
    return N.refcount_get_range(s.refcount_cache.get(refblock_offset), s.refcount_order,
                                first, n)


def _checked(func, *args, message: str):
    """Call func; a failure becomes error_setg_errno(message)."""
    try:
        return func(*args)
    except CorruptImage:
        raise
    except BlockError as e:
        raise _errno_error(message, e) from None


def downgrade(s, target_version: int, progress) -> None:
    """qcow2_downgrade(): v3 -> v2, refused while the image uses what v2 cannot say."""
    if s.refcount_order != 4:
        raise NotSupported("compat=0.10 requires refcount_bits=16")
    if s.has_data_file:
        raise NotSupported("Cannot downgrade an image with a data file")
    for sn in s.snapshots:
        if sn.vm_state_size or sn.disk_size != s.total_size:
            raise NotSupported("Internal snapshots prevent downgrade of image")
    if s.incompatible_features & L.QCOW2_INCOMPAT_DIRTY:
        _mark_clean(s)
    # a corrupt image is never opened read-write, so only unknown bits could be left
    left = s.incompatible_features & ~L.QCOW2_INCOMPAT_COMPRESSION
    if left:
        raise NotSupported("Cannot downgrade an image with incompatible features %#x set"
                           % left)
    # compatible features may be dropped; lazy refcounts were settled by marking clean
    s.compatible_features = 0
    s.autoclear_features = 0
    try:
        expand_zero_clusters(s, progress)
    except BlockError as e:
        raise _errno_error("Failed to turn zero into data clusters", e) from None
    if s.incompatible_features & L.QCOW2_INCOMPAT_COMPRESSION:
        if _has_compressed_clusters(s):
            raise NotSupported("Cannot downgrade an image with zstd compression type and "
                               "existing compressed clusters")
        s.incompatible_features &= ~L.QCOW2_INCOMPAT_COMPRESSION
        s.compression_type = L.QCOW2_COMPRESSION_TYPE_ZLIB
    s.version = target_version
    try:
        _update_header(s)
    except BlockError:
        s.version = 3
        raise


def expand_zero_clusters(s, progress) -> None:
    """qcow2_expand_zero_clusters(): v2 has no zero flag.  Zero clusters of an image
    without backing file become unallocated; otherwise they get a zeroed cluster
    (preallocated zero clusters just lose the flag).  Active L2 tables go through the
    cache, the snapshots' L1 tables are walked on disk after emptying it."""
    l1_entries = s.l1_size + sum(sn.l1_size for sn in s.snapshots)
    visited = [0]
    _expand_in_l1(s, s.l1_table, True, visited, l1_entries, progress)
    # qcow2_cache_depends_on_flush(): the zeroes are stable before the L2 tables that
    # point to them are written, then qcow2_cache_empty()
    s.data_file.flush()
    s.flush_caches()
    s.l2_cache.clear()
    for sn in s.snapshots:
        s._validate_table(sn.l1_table_offset, sn.l1_size, L.L1E_SIZE, L.QCOW_MAX_L1_SIZE,
                          "Snapshot L1 table")
        raw = s.file.pread(sn.l1_table_offset, sn.l1_size * L.L1E_SIZE)
        l1 = [int.from_bytes(raw[i:i + 8], "big") for i in range(0, len(raw), 8)]
        _expand_in_l1(s, l1, False, visited, l1_entries, progress)


def _expand_in_l1(s, l1_table, active: bool, visited: list, l1_entries: int,
                  progress) -> None:
    """expand_zero_clusters_in_l1()."""
    cs = s.cluster_size
    slice_bytes = s.l2_slice_bytes
    for i, l1e in enumerate(l1_table):
        l2_offset = l1e & L1E_OFFSET_MASK
        if l2_offset:
            if l2_offset & (cs - 1):
                s.signal_corruption(True, "L2 table offset %#x unaligned (L1 index: %#x)"
                                    % (l2_offset, i))
            l2_refcount = s.get_refcount(l2_offset >> s.cluster_bits)
            for n in range(cs // slice_bytes):
                slice_offset = l2_offset + n * slice_bytes
                table = (s.l2_cache.get(slice_offset) if active
                         else bytearray(s.file.pread(slice_offset, slice_bytes)))
                if _expand_slice(s, table, n, l2_offset, l2_refcount):
                    if active:
                        s.l2_cache.mark_dirty(slice_offset, table)
                    else:
                        s.pre_write_overlap_check(OL.INACTIVE_L2 | OL.ACTIVE_L2,
                                                  slice_offset, slice_bytes)
                        s.file.pwrite(slice_offset, bytes(table))
        visited[0] += 1
        progress(visited[0], l1_entries)


def _expand_slice(s, table, slice_no: int, l2_offset: int, l2_refcount: int) -> bool:
    """The entries of one L2 slice; True if the slice changed."""
    cs = s.cluster_size
    dirty = False
    for j in range(s.l2_slice_size):
        entry = s.l2_entry(table, j)
        kind = s.cluster_type(entry)
        if kind not in (CL_ZERO_PLAIN, CL_ZERO_ALLOC):
            continue
        offset = entry & L2E_OFFSET_MASK
        if kind == CL_ZERO_PLAIN:
            if s.node.backing is None:
                # not backed: the cluster can simply be deallocated
                s.set_l2_entry(table, j, 0)
                dirty = True
                continue
            offset = s.alloc_clusters(cs)
            if l2_refcount > 1:
                # a shared L2 table: the new cluster gets the table's refcount
                s.update_refcount(offset, cs, l2_refcount - 1, False, L.QCOW2_DISCARD_OTHER)
        if offset & (cs - 1):
            s.signal_corruption(True, "Cluster allocation offset %#x unaligned (L2 offset: "
                                "%#x, L2 index: %#x)"
                                % (offset, l2_offset, slice_no * s.l2_slice_size + j))
        try:
            s.pre_write_overlap_check(0, offset, cs, True)
            s.data_file.pwrite_zeroes(offset, cs)
        except BlockError:
            if kind == CL_ZERO_PLAIN:
                s.free_clusters(offset, cs, L.QCOW2_DISCARD_ALWAYS)
            raise
        s.set_l2_entry(table, j, offset | L.QCOW_OFLAG_COPIED if l2_refcount == 1
                       else offset)
        dirty = True
    return dirty


def _has_compressed_clusters(s) -> bool:
    """qcow2_has_compressed_clusters(): any compressed cluster in the active image."""
    offset, left = 0, s.total_size
    while left:
        runs = s.get_host_runs(offset, min(left, 0x7FFFFFFF))
        for nbytes, sc_type, _ in runs:
            if sc_type == L.SC_COMPRESSED:
                return True
            offset += nbytes
            left -= nbytes
    return False


def _crypto_hdr_write(s, offset: int, data: bytes) -> None:
    """qcow2_crypto_hdr_write_func(): LUKS header writes stay inside its clusters."""
    hoff, hlen = s.crypto_header
    if offset + len(data) > hlen:
        raise InvalidArgument("Request for data outside of extension header")
    s.file.pwrite(hoff + offset, data)


def _encrypt_key_secret(s) -> str | None:
    from .driver import _encrypt_options       # (the driver imports this module)
    opts = s.node.options if isinstance(s.node.options, dict) else {}
    return _encrypt_options(opts).get("key-secret")


def _update_header(s) -> None:
    try:
        s.update_header()
    except BlockError as e:
        raise _errno_error("Failed to update the image header", e) from None


def _mark_clean(s) -> None:
    try:
        s.mark_clean()
    except BlockError as e:
        raise _errno_error("Failed to make the image clean", e) from None


def _errno_error(message: str, cause: BlockError) -> BlockError:
    """error_setg_errno(): ``message: strerror(errno)``."""
    err = cause.errno or errno.EIO
    return BlockError("%s: %s" % (message, os.strerror(err)), errno=err)
