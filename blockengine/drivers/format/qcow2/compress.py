"""Compressed clusters (QEMU's qcow2-threads.c: qcow2_zlib_*/qcow2_zstd_*).

zlib clusters are raw deflate streams (window bits -12); zstd clusters are zstd
frames.  The compressed data of a cluster is stored in whole 512-byte sectors, so
trailing bytes after the stream are ignored.  Decompression must yield exactly one
cluster, else the read fails with EIO as in QEMU.
"""
from __future__ import annotations

import errno
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
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    else:
        import zstandard
        out = zstandard.ZstdCompressor(level=0).compress(data)
    if len(out) >= len(data):
        return None
    return out
