"""Hot-path primitives: the compiled ``blockengine._be_native`` module or its
pure-Python twins.

Import the functions from here::

    from blockengine import _native
    runs = _native.l2_scan(table, 0, n, False, cluster_bits)

``BACKEND`` is ``"native"`` when the cffi module (built from ``native/*.c`` by
``pip install .``) could be imported, else ``"python"``.  Setting the
environment variable ``BLOCKENGINE_PURE=1`` forces ``"python"``.  Either way
every function has the same signature, results and exceptions: the contracts
are the docstrings in :mod:`blockengine._pynative`.

The native wrappers below are thin: one ``ffi.from_buffer`` per buffer, one C
call per call (or per chunk of 1024 results), and conversion of the C result
records into Python tuples.  cffi releases the GIL around each C call, so the
functions may run in parallel from worker threads on distinct buffers.
"""

from __future__ import annotations

import os
import struct
from array import array
from types import SimpleNamespace

from blockengine import _pynative as _py
from blockengine._pynative import (  # noqa: F401  (re-exported constants)
    E_OVERFLOW,
    E_UNDERFLOW,
    L2_COMPRESSED,
    L2_INVALID,
    L2_NORMAL,
    L2_UNALLOCATED,
    L2_ZERO_ALLOC,
    L2_ZERO_PLAIN,
    MAP_DATA,
    MAP_ENTRY,
    MAP_HAS_OFFSET,
    MAP_PRESENT,
    MAP_STOP,
    MAP_ZERO,
    OK,
    SC_ALLOCATED,
    SC_INVALID,
    SC_UNALLOCATED,
    SC_ZERO,
)

__all__ = list(_py.__all__) + ["BACKEND", "native_api", "PYTHON"]

#: The pure-Python twins (always available).
PYTHON = _py

_FORCE_PURE = os.environ.get("BLOCKENGINE_PURE", "") not in ("", "0")

# Results come back from C in chunks of this many records.
_CHUNK = 1024

_CONSTANTS = (
    "OK", "E_OVERFLOW", "E_UNDERFLOW",
    "L2_UNALLOCATED", "L2_ZERO_PLAIN", "L2_ZERO_ALLOC", "L2_NORMAL",
    "L2_COMPRESSED", "L2_INVALID",
    "SC_UNALLOCATED", "SC_ZERO", "SC_ALLOCATED", "SC_INVALID",
    "MAP_DATA", "MAP_ZERO", "MAP_PRESENT", "MAP_HAS_OFFSET", "MAP_STOP",
)

_API_NAMES = (
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
    "l2_map", "seek_map", "map_state", "map_feed", "map_finish",
    "check_l2", "l2_copied_mismatches",
)


def _build_api(ffi, lib) -> SimpleNamespace:
    """Wrap the cffi module ``(ffi, lib)`` in the Python-level API."""
    # The C constants must agree with the Python ones.
    for name in _CONSTANTS:
        c_name = "BE_" + (name.replace("E_", "E", 1) if name.startswith("E_") else name)
        if getattr(lib, c_name) != getattr(_py, name):
            raise ImportError(f"native constant {c_name} disagrees with _pynative.{name}")
    if ffi.sizeof("be_run") != 24 or ffi.sizeof("be_zrun") != 24:
        raise ImportError("unexpected native record layout")

    from_buffer = ffi.from_buffer
    new_raw = ffi.new_allocator(should_clear_after_alloc=False)
    unpack_buffer = ffi.buffer
    iter_unpack = struct.iter_unpack
    EINVAL, ERANGE, NONE = lib.BE_EINVAL, lib.BE_ERANGE, lib.BE_NONE

    def fail(rc: int, func: str):
        if rc == EINVAL:
            raise ValueError(f"{func}: invalid argument")
        if rc == ERANGE:
            raise IndexError(f"{func}: index or length out of range")
        raise RuntimeError(f"{func}: unexpected native status {rc}")

    def wbuf(buf):
        try:
            return from_buffer("uint8_t[]", buf, require_writable=True)
        except BufferError as exc:  # as the Python twins (memoryview) do
            raise TypeError(f"a writable buffer is required: {exc}") from None

    # An OverflowError means cffi could not convert an int argument to its C
    # type; the Python twin then raises the same exception it always does
    # for such values (or computes the answer when the value is legal).

    def l2_scan(table, start_index, count, extended, cluster_bits, *, data_file=False,
                max_runs=None):
        try:
            tbuf = from_buffer("uint8_t[]", table)
            nmax = min(count, _CHUNK) if count > 0 else 1
            if max_runs is not None:
                nmax = min(nmax, max(1, max_runs))
            runs = new_raw("be_run[]", nmax)
            result = []
            idx, left = start_index, count
            while True:
                rc = lib.be_l2_scan(tbuf, len(tbuf), idx, left, bool(extended),
                                    cluster_bits, bool(data_file), runs, nmax)
                if rc < 0:
                    fail(rc, "l2_scan")
                result += [(first, n, kind, host, copied != 0) for first, n, kind, copied, host
                           in iter_unpack("=IIIIQ", unpack_buffer(runs, 24 * rc))]
                if rc < nmax or (max_runs is not None and len(result) >= max_runs):
                    return result
                covered = runs[rc - 1].first_index + runs[rc - 1].n - idx
                idx += covered
                left -= covered
                if left == 0:
                    return result
        except OverflowError:
            return _py.l2_scan(table, start_index, count, extended, cluster_bits,
                               data_file=data_file, max_runs=max_runs)

    def subcluster_runs(bitmap, first_sc):
        try:
            n = new_raw("uint32_t *")
            rc = lib.be_subcluster_run(bitmap, first_sc, n)
        except OverflowError:
            return _py.subcluster_runs(bitmap, first_sc)
        if rc < 0:
            fail(rc, "subcluster_runs")
        return rc, n[0]

    def refcount_get(block, order, index):
        try:
            out = new_raw("uint64_t *")
            b = from_buffer("uint8_t[]", block)
            rc = lib.be_refcount_get(b, len(b), order, index, out)
        except OverflowError:
            return _py.refcount_get(block, order, index)
        if rc < 0:
            fail(rc, "refcount_get")
        return out[0]

    def refcount_get_range(block, order, index, n):
        try:
            b = from_buffer("uint8_t[]", block)
            result = array("Q", [0]) * n if 0 <= n <= len(b) * 8 else array("Q")
            rc = lib.be_refcount_get_range(b, len(b), order, index, n,
                                           from_buffer("uint64_t[]", result))
        except OverflowError:
            return _py.refcount_get_range(block, order, index, n)
        if rc < 0:
            fail(rc, "refcount_get_range")
        return result

    def refcount_set_range(block, order, index, n, value):
        try:
            b = wbuf(block)
            rc = lib.be_refcount_set_range(b, len(b), order, index, n, value)
        except OverflowError:
            return _py.refcount_set_range(block, order, index, n, value)
        if rc < 0:
            fail(rc, "refcount_set_range")

    def refcount_add_range(block, order, index, n, delta):
        try:
            b = wbuf(block)
            rc = lib.be_refcount_add_range(b, len(b), order, index, n,
                                           -delta if delta < 0 else delta, delta < 0)
        except OverflowError:
            return _py.refcount_add_range(block, order, index, n, delta)
        if rc == EINVAL or rc == ERANGE:
            fail(rc, "refcount_add_range")
        return rc

    def refcount_free_run(block, order, start):
        try:
            b = from_buffer("uint8_t[]", block)
            rc = lib.be_refcount_free_run(b, len(b), order, start)
        except OverflowError:
            return _py.refcount_free_run(block, order, start)
        if rc < 0:
            fail(rc, "refcount_free_run")
        return rc

    def refcount_find_free(block, order, start, n_needed):
        try:
            b = from_buffer("uint8_t[]", block)
            rc = lib.be_refcount_find_free(b, len(b), order, start, n_needed)
        except OverflowError:
            return _py.refcount_find_free(block, order, start, n_needed)
        if rc < 0 and rc != NONE:
            fail(rc, "refcount_find_free")
        return rc

    def refcount_count_nonzero(block, order):
        try:
            b = from_buffer("uint8_t[]", block)
            rc = lib.be_refcount_count_nonzero(b, len(b), order)
        except OverflowError:
            return _py.refcount_count_nonzero(block, order)
        if rc < 0:
            fail(rc, "refcount_count_nonzero")
        return rc

    def refcount_compare(computed, block, order, first_index):
        try:
            if not (isinstance(computed, array) and computed.typecode == "Q"):
                computed = array("Q", computed)
            b = from_buffer("uint8_t[]", block)
            c = from_buffer("uint64_t[]", computed)
            pos = new_raw("int64_t *")
            pos[0] = 0
            out = new_raw("uint64_t[]", _CHUNK)
            result = []
            while True:
                rc = lib.be_refcount_compare(c, len(computed), b, len(b), order,
                                             first_index, pos, out, _CHUNK)
                if rc < 0:
                    fail(rc, "refcount_compare")
                result += ffi.unpack(out, rc)
                if pos[0] >= len(computed):
                    return result
        except OverflowError:
            return _py.refcount_compare(computed, block, order, first_index)

    def bitmap_set_range(buf, start, n):
        try:
            b = wbuf(buf)
            rc = lib.be_bitmap_set_range(b, len(b), start, n)
        except OverflowError:
            return _py.bitmap_set_range(buf, start, n)
        if rc < 0:
            fail(rc, "bitmap_set_range")

    def bitmap_reset_range(buf, start, n):
        try:
            b = wbuf(buf)
            rc = lib.be_bitmap_reset_range(b, len(b), start, n)
        except OverflowError:
            return _py.bitmap_reset_range(buf, start, n)
        if rc < 0:
            fail(rc, "bitmap_reset_range")

    def bitmap_count(buf, start, n):
        try:
            b = from_buffer("uint8_t[]", buf)
            rc = lib.be_bitmap_count(b, len(b), start, n)
        except OverflowError:
            return _py.bitmap_count(buf, start, n)
        if rc < 0:
            fail(rc, "bitmap_count")
        return rc

    def bitmap_next_set(buf, start, end):
        try:
            b = from_buffer("uint8_t[]", buf)
            rc = lib.be_bitmap_next_set(b, len(b), start, end)
        except OverflowError:
            return _py.bitmap_next_set(buf, start, end)
        if rc < 0 and rc != NONE:
            fail(rc, "bitmap_next_set")
        return rc

    def bitmap_next_clear(buf, start, end):
        try:
            b = from_buffer("uint8_t[]", buf)
            rc = lib.be_bitmap_next_clear(b, len(b), start, end)
        except OverflowError:
            return _py.bitmap_next_clear(buf, start, end)
        if rc < 0 and rc != NONE:
            fail(rc, "bitmap_next_clear")
        return rc

    def bitmap_next_dirty_area(buf, start, end, max_len):
        try:
            b = from_buffer("uint8_t[]", buf)
            length = new_raw("int64_t *")
            rc = lib.be_bitmap_next_dirty_area(b, len(b), start, end, max_len, length)
        except OverflowError:
            return _py.bitmap_next_dirty_area(buf, start, end, max_len)
        if rc == NONE:
            return None
        if rc < 0:
            fail(rc, "bitmap_next_dirty_area")
        return rc, length[0]

    def bitmap_merge_or(dst, src):
        d = wbuf(dst)
        s = from_buffer("uint8_t[]", src)
        rc = lib.be_bitmap_merge_or(d, len(d), s, len(s))
        if rc < 0:
            fail(rc, "bitmap_merge_or")

    def bitmap_serialize(buf, start, n):
        try:
            b = from_buffer("uint8_t[]", buf)
            nbytes = (n + 7) >> 3 if 0 <= n <= len(b) * 8 else 0
            out = bytearray(nbytes)
            rc = lib.be_bitmap_serialize(b, len(b), start, n, wbuf(out), nbytes)
        except OverflowError:
            return _py.bitmap_serialize(buf, start, n)
        if rc < 0:
            fail(rc, "bitmap_serialize")
        return bytes(out)

    def bitmap_deserialize(buf, start, n, data):
        try:
            b = wbuf(buf)
            d = from_buffer("uint8_t[]", data)
            rc = lib.be_bitmap_deserialize(b, len(b), start, n, d, len(d))
        except OverflowError:
            return _py.bitmap_deserialize(buf, start, n, data)
        if rc < 0:
            fail(rc, "bitmap_deserialize")

    def buffer_is_zero(buf, offset=0, length=None):
        b = from_buffer("uint8_t[]", buf)
        size = len(b)
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset > size or length > size - offset:
            raise IndexError(f"buffer_is_zero: range [{offset}, {offset}+{length}) "
                             f"outside [0, {size})")
        return bool(lib.be_buffer_is_zero(b + offset, length))

    def buffers_equal(a, b):
        ba, bb = from_buffer("uint8_t[]", a), from_buffer("uint8_t[]", b)
        return bool(lib.be_buffers_equal(ba, len(ba), bb, len(bb)))

    def zero_runs(buf, granularity):
        try:
            b = from_buffer("uint8_t[]", buf)
            runs = new_raw("be_zrun[]", _CHUNK)
            result = []
            pos = 0
            while True:
                rc = lib.be_zero_runs(b, len(b), pos, granularity, runs, _CHUNK)
                if rc < 0:
                    fail(rc, "zero_runs")
                result += [(start, length, z != 0) for start, length, z
                           in iter_unpack("=QQI4x", unpack_buffer(runs, 24 * rc))]
                if rc < _CHUNK:
                    return result
                pos = runs[rc - 1].start + runs[rc - 1].length
        except OverflowError:
            return _py.zero_runs(buf, granularity)

    # ---- sector crypto (native/crypto.c): the length arguments come first in
    # the Python API, the C functions take each buffer with its size.  Looked up
    # now: a stale build without them raises AttributeError (-> the twins).
    be_sector_ivs, be_xts_xor, be_cbc_decrypt_xor = (
        lib.be_sector_ivs, lib.be_xts_xor, lib.be_cbc_decrypt_xor)
    be_cbc_encrypt_step, be_ctr_counters, be_xor = (
        lib.be_cbc_encrypt_step, lib.be_ctr_counters, lib.be_xor)

    def sector_ivs(out, first_sector, count, width):
        try:
            o = wbuf(out)
            rc = be_sector_ivs(o, len(o), first_sector, count, width)
        except OverflowError:
            return _py.sector_ivs(out, first_sector, count, width)
        if rc < 0:
            fail(rc, "sector_ivs")

    def xts_xor(dst, src, length, tweaks, sector_size):
        try:
            d, s, t = wbuf(dst), from_buffer("uint8_t[]", src), from_buffer("uint8_t[]", tweaks)
            rc = be_xts_xor(d, len(d), s, len(s), length, t, len(t), sector_size)
        except OverflowError:
            return _py.xts_xor(dst, src, length, tweaks, sector_size)
        if rc < 0:
            fail(rc, "xts_xor")

    def cbc_decrypt_xor(dst, decrypted, ciphertext, length, ivs, sector_size):
        try:
            d = wbuf(dst)
            p = from_buffer("uint8_t[]", decrypted)
            c = from_buffer("uint8_t[]", ciphertext)
            iv = from_buffer("uint8_t[]", ivs)
            rc = be_cbc_decrypt_xor(d, len(d), p, len(p), c, len(c), length,
                                    iv, len(iv), sector_size)
        except OverflowError:
            return _py.cbc_decrypt_xor(dst, decrypted, ciphertext, length, ivs, sector_size)
        if rc < 0:
            fail(rc, "cbc_decrypt_xor")

    def cbc_encrypt_step(out, plain, length, lanes, sector_size, block):
        try:
            o, p, ln = wbuf(out), from_buffer("uint8_t[]", plain), wbuf(lanes)
            rc = be_cbc_encrypt_step(o, len(o), p, len(p), length, ln, len(ln),
                                     sector_size, block)
        except OverflowError:
            return _py.cbc_encrypt_step(out, plain, length, lanes, sector_size, block)
        if rc < 0:
            fail(rc, "cbc_encrypt_step")

    def ctr_counters(out, length, ivs, sector_size):
        try:
            o, iv = wbuf(out), from_buffer("uint8_t[]", ivs)
            rc = be_ctr_counters(o, len(o), length, iv, len(iv), sector_size)
        except OverflowError:
            return _py.ctr_counters(out, length, ivs, sector_size)
        if rc < 0:
            fail(rc, "ctr_counters")

    def xor_into(dst, src, length):
        try:
            d, s = wbuf(dst), from_buffer("uint8_t[]", src)
            rc = be_xor(d, len(d), s, len(s), length)
        except OverflowError:
            return _py.xor_into(dst, src, length)
        if rc < 0:
            fail(rc, "xor_into")

    # ---- img map (native/map.c)
    if ffi.sizeof("be_map_entry") != _py.MAP_ENTRY.size:
        raise ImportError("unexpected native record layout")
    MAP_CHUNK = 4096
    EXTERNAL = lib.BE_MAP_EXTERNAL

    CHECK_SLOW = lib.BE_CHECK_SLOW

    def check_l2(table, n_entries, extended, cluster_bits, file_len, imrt, order, imrt_n):
        try:
            counts = new_raw("uint64_t[]", 2)
            tbuf = from_buffer("uint8_t[]", table)
            ibuf = wbuf(imrt)
            rc = lib.be_check_l2(tbuf, len(tbuf), n_entries, bool(extended), cluster_bits,
                                 file_len, ibuf, len(ibuf), order, imrt_n, counts)
        except OverflowError:
            return _py.check_l2(table, n_entries, extended, cluster_bits, file_len, imrt,
                                order, imrt_n)
        if rc == CHECK_SLOW:
            return None
        if rc < 0:
            fail(rc, "check_l2")
        return counts[0], counts[1]

    def l2_copied_mismatches(table, n_entries, extended, cluster_bits, imrt, order, imrt_n):
        try:
            out = new_raw("int64_t[]", max(n_entries, 1))
            tbuf = from_buffer("uint8_t[]", table)
            ibuf = from_buffer("uint8_t[]", imrt)
            rc = lib.be_l2_copied_mismatches(tbuf, len(tbuf), n_entries, bool(extended),
                                             cluster_bits, ibuf, len(ibuf), order, imrt_n,
                                             out, max(n_entries, 1))
        except OverflowError:
            return _py.l2_copied_mismatches(table, n_entries, extended, cluster_bits, imrt,
                                            order, imrt_n)
        if rc == CHECK_SLOW:
            return None
        if rc < 0:
            fail(rc, "l2_copied_mismatches")
        return list(out[0:rc])

    def l2_map(table, start_index, count, cluster_bits, guest, skip, length,
               unalloc_flags, file):
        try:
            tbuf = from_buffer("uint8_t[]", table)
            out = new_raw("be_map_entry[]", MAP_CHUNK)
            covered = new_raw("uint64_t *")
            parts, total = [], 0
            while True:
                rc = lib.be_l2_map(tbuf, len(tbuf), start_index, count, cluster_bits,
                                   guest, skip, length, unalloc_flags, file, out,
                                   MAP_CHUNK, covered)
                if rc < 0:
                    fail(rc, "l2_map")
                parts.append(unpack_buffer(out, 40 * rc)[:])
                done = covered[0]
                total += done
                if rc < MAP_CHUNK or length <= done:
                    break
                # a full batch ends on a cluster boundary: resume there
                clusters = (skip + done) >> cluster_bits
                start_index += clusters
                count -= clusters
                guest += done
                length -= done
                skip = 0
            return b"".join(parts), total
        except OverflowError:
            return _py.l2_map(table, start_index, count, cluster_bits, guest, skip,
                              length, unalloc_flags, file)

    def seek_map(fd, offset, length, file):
        try:
            out = new_raw("be_map_entry[]", MAP_CHUNK)
            covered = new_raw("uint64_t *")
            parts, total = [], 0
            while True:
                rc = lib.be_seek_map(fd, offset, length, file, out, MAP_CHUNK, covered)
                if rc < 0:
                    fail(rc, "seek_map")
                parts.append(unpack_buffer(out, 40 * rc)[:])
                done = covered[0]
                total += done
                if rc < MAP_CHUNK or done >= length:
                    return b"".join(parts), total
                offset += done
                length -= done
        except OverflowError:
            return _py.seek_map(fd, offset, length, file)

    class MapState:
        __slots__ = ("st", "names", "nnames", "c_names")

        def __init__(self, human, start):
            self.st = ffi.new("be_map_state *")
            self.st.human = bool(human)
            self.st.curr.start = start
            self.names, self.nnames = None, 0

        def c_array(self, names):
            # the caller appends names as it meets new files
            if names is not self.names or len(names) != self.nnames:
                keep = [ffi.new("char[]", bytes(n)) for n in names]
                self.c_names = (ffi.new("char *[]", keep), keep)
                self.names, self.nnames = names, len(names)
            return self.c_names[0], len(names)

    def map_state(human, start):
        return MapState(human, start)

    def map_feed(state, entries, names):
        c_names, nnames = state.c_array(names)
        ebuf = from_buffer("be_map_entry[]", entries)
        n = len(entries) // 40
        out_len = 256 * 1024
        out = new_raw("char[]", out_len)
        consumed, written = new_raw("size_t *"), new_raw("size_t *")
        parts, pos = [], 0
        while True:
            rc = lib.be_map_feed(state.st, ebuf + pos, n - pos, c_names, nnames, out,
                                 out_len, consumed, written)
            parts.append(unpack_buffer(out, written[0])[:])
            pos += consumed[0]
            if rc == EXTERNAL:
                return b"".join(parts), False
            if rc != ERANGE or (consumed[0] == 0 and written[0] == 0):
                if rc < 0:
                    fail(rc, "map_feed")
                return b"".join(parts), True

    def map_finish(state, names):
        c_names, nnames = state.c_array(names)
        out_len = 512 + max((len(n) for n in names), default=0)
        out = new_raw("char[]", out_len)
        written = new_raw("size_t *")
        rc = lib.be_map_finish(state.st, c_names, nnames, out, out_len, written)
        if rc < 0 and rc != EXTERNAL:
            fail(rc, "map_finish")
        return unpack_buffer(out, written[0])[:], rc != EXTERNAL

    scope = locals()
    api = SimpleNamespace(**{name: scope[name] for name in _API_NAMES})
    for name in _API_NAMES:
        getattr(api, name).__doc__ = getattr(_py, name).__doc__
    return api


_native_api: SimpleNamespace | None = None
#: Why the compiled module could not be used (None if it could or was not tried).
NATIVE_IMPORT_ERROR: BaseException | None = None


def native_api() -> SimpleNamespace | None:
    """The native implementation of the API (a namespace with the same
    functions as this module), or None if ``blockengine._be_native`` is not
    built.  Ignores ``BLOCKENGINE_PURE``: the tests use it to compare both
    backends."""
    global _native_api, NATIVE_IMPORT_ERROR
    if _native_api is None and NATIVE_IMPORT_ERROR is None:
        try:
            from blockengine._be_native import ffi, lib
            _native_api = _build_api(ffi, lib)
        except (ImportError, AttributeError) as exc:    # AttributeError: a stale build
            NATIVE_IMPORT_ERROR = exc
    return _native_api


_impl = None if _FORCE_PURE else native_api()
if _impl is None:
    _impl = _py
    BACKEND = "python"
else:
    BACKEND = "native"

l2_scan = _impl.l2_scan
subcluster_runs = _impl.subcluster_runs
refcount_get = _impl.refcount_get
refcount_get_range = _impl.refcount_get_range
refcount_set_range = _impl.refcount_set_range
refcount_add_range = _impl.refcount_add_range
refcount_free_run = _impl.refcount_free_run
refcount_find_free = _impl.refcount_find_free
refcount_count_nonzero = _impl.refcount_count_nonzero
refcount_compare = _impl.refcount_compare
bitmap_set_range = _impl.bitmap_set_range
bitmap_reset_range = _impl.bitmap_reset_range
bitmap_count = _impl.bitmap_count
bitmap_next_set = _impl.bitmap_next_set
bitmap_next_clear = _impl.bitmap_next_clear
bitmap_next_dirty_area = _impl.bitmap_next_dirty_area
bitmap_merge_or = _impl.bitmap_merge_or
bitmap_serialize = _impl.bitmap_serialize
bitmap_deserialize = _impl.bitmap_deserialize
buffer_is_zero = _impl.buffer_is_zero
buffers_equal = _impl.buffers_equal
zero_runs = _impl.zero_runs
sector_ivs = _impl.sector_ivs
xts_xor = _impl.xts_xor
cbc_decrypt_xor = _impl.cbc_decrypt_xor
cbc_encrypt_step = _impl.cbc_encrypt_step
ctr_counters = _impl.ctr_counters
xor_into = _impl.xor_into
l2_map = _impl.l2_map
seek_map = _impl.seek_map
map_state = _impl.map_state
map_feed = _impl.map_feed
map_finish = _impl.map_finish
check_l2 = _impl.check_l2
l2_copied_mismatches = _impl.l2_copied_mismatches
del _impl
