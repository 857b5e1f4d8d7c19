"""Compressed clusters (QEMU's qcow2-threads.c: qcow2_zlib_*/qcow2_zstd_*).

zlib clusters are raw deflate streams (window bits -12); zstd clusters are zstd
frames.  The compressed data of a cluster is stored in whole 512-byte sectors, so
trailing bytes after the stream are ignored.  Decompression must yield exactly one
cluster, else the read fails with EIO as in QEMU.
"""
from __future__ import annotations

import errno
import threading
import zlib

from ....errors import IOFailure
from .layout import QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD


def decompress(data: bytes, out_size: int, compression_type: int) -> bytes:
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, out_size)
        except zlib.error:
            out = b""
    elif compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        import zstandard
        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)[:out_size]
        except zstandard.ZstdError:
            out = b""
    else:
        out = b""
    if len(out) != out_size:
        raise IOFailure("Input/output error", errno=errno.EIO)
    return out


def compress(data: bytes, compression_type: int) -> bytes | None:
    """qcow2_co_compress(): the compressed stream, or None if it does not fit
    in less than the input (the caller then writes the cluster uncompressed)."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        # qcow2_zlib_compress(): best compromise level, 4 KiB window, raw deflate
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    else:
        out = _zstd_compress(data)
    if out is None or len(out) >= len(data):
        return None
    return out


# qcow2-threads.c's QCOW2_MAX_THREADS: compression runs in 4 threads, as in QEMU, even
# on fewer cores (zlib and zstd release the GIL, so they do run in parallel)
MAX_THREADS = 4
_pool = None           # the ThreadPoolExecutor, made on first use
_pool_lock = threading.Lock()
_local = threading.local()


def _zstd_compress(data) -> bytes | None:
    """qcow2_zstd_compress(): one frame at the default level with the content size
    (ZSTD_compressStream2 with ZSTD_e_end on the whole input), into a buffer one byte
    smaller than the input; None when it does not fit.

    The system libzstd (the library QEMU links) is used when it loads, so that the
    compressed clusters are the very bytes qemu-img writes; zstd's output changes
    between library versions, and python-zstandard bundles its own."""
    lib = _system_zstd()
    if lib is None:
        c = getattr(_local, "zstd", None)
        if c is None:
            import zstandard
            c = _local.zstd = zstandard.ZstdCompressor(level=0)
        return c.compress(data)
    return lib.compress(data)


class _SystemZstd:
    """libzstd.so.1 through ctypes (its calls release the GIL): one compression
    context per thread, reset between clusters (as fresh as QEMU's new context)."""

    ZSTD_e_end = 2
    ZSTD_reset_session_only = 1

    def __init__(self, lib):
        import ctypes       # here, not at start-up of every command
        class Buffer(ctypes.Structure):
            _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t),
                        ("pos", ctypes.c_size_t)]
        self.Buffer = Buffer
        lib.ZSTD_createCCtx.restype = ctypes.c_void_p
        lib.ZSTD_CCtx_reset.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ZSTD_CCtx_reset.restype = ctypes.c_size_t
        lib.ZSTD_compressStream2.argtypes = [ctypes.c_void_p, ctypes.POINTER(Buffer),
                                             ctypes.POINTER(Buffer), ctypes.c_int]
        lib.ZSTD_compressStream2.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        self.lib = lib

    def compress(self, data) -> bytes | None:
        import ctypes
        lib = self.lib
        cctx = getattr(_local, "cctx", None)
        if cctx is None:
            cctx = _local.cctx = lib.ZSTD_createCCtx()
            if not cctx:
                raise IOFailure("Input/output error", errno=errno.EIO)
        else:
            lib.ZSTD_CCtx_reset(cctx, self.ZSTD_reset_session_only)
        n = len(data)
        src = (ctypes.c_char * n).from_buffer_copy(data)
        dst = ctypes.create_string_buffer(n - 1)
        out = self.Buffer(ctypes.addressof(dst), n - 1, 0)
        inp = self.Buffer(ctypes.addressof(src), n, 0)
        while True:
            ret = lib.ZSTD_compressStream2(cctx, out, inp, self.ZSTD_e_end)
            if lib.ZSTD_isError(ret):
                raise IOFailure("Input/output error", errno=errno.EIO)
            if ret > out.size - out.pos:
                return None         # the destination is too small
            if ret == 0:
                return dst.raw[:out.pos]


_system_zstd_lib: list = []


def _system_zstd() -> _SystemZstd | None:
    if not _system_zstd_lib:
        import ctypes.util  # ~10 ms of imports (subprocess, shutil...): only when compressing
        try:
            lib = _SystemZstd(ctypes.CDLL(ctypes.util.find_library("zstd") or "libzstd.so.1"))
        except (OSError, AttributeError):
            lib = None
        _system_zstd_lib.append(lib)
    return _system_zstd_lib[0]


def compress_many(clusters: list, compression_type: int):
    """compress() of each cluster, in order, computed in parallel threads when there
    are several: an iterator, so the caller stores the first clusters while the
    threads still compress the later ones."""
    if len(clusters) == 1:
        return iter([compress(clusters[0], compression_type)])
    global _pool
    from concurrent.futures import ThreadPoolExecutor
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="qcow2-compress")
    return _pool.map(compress, clusters, [compression_type] * len(clusters))
