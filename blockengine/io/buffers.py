"""Buffers for bulk copies (convert, compare, block jobs).

The kernel copies page-cache data into and out of a buffer backed by transparent huge
pages with far fewer TLB misses: reading 1 GiB from the page cache in 2 MiB requests
takes ~40 % less system time into such a buffer than into a bytearray (0.07 s against
0.12 s here).  So a large buffer is anonymous memory aligned to 2 MiB and advised
MADV_HUGEPAGE; the system decides whether it gets huge pages (transparent_hugepage
"always" or "madvise"), and it works the same either way.
"""
from __future__ import annotations

import mmap

HUGE_PAGE = 2 << 20


def io_buffer(size: int) -> memoryview:
    """A zeroed, writable buffer of ``size`` bytes (a memoryview of format "B")."""
    if size < HUGE_PAGE:
        return memoryview(bytearray(size))
    area = mmap.mmap(-1, size + HUGE_PAGE)
    pad = -_address(area) % HUGE_PAGE
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            area.madvise(advice, pad, size)
        except OSError:             # a kernel without THP: plain pages then
            pass
    return memoryview(area)[pad:pad + size]     # keeps the mapping alive


def _address(area: mmap.mmap) -> int:
    try:                # cffi is loaded already with the native module
        from .._be_native import ffi
        return int(ffi.cast("uintptr_t", ffi.from_buffer(area)))
    except ImportError:
        import ctypes   # (several ms of start-up)
        return ctypes.addressof(ctypes.c_char.from_buffer(area))
