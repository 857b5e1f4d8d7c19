"""Finding the reference QEMU tools: skip locally without them, fail in CI."""
import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of a QEMU tool; a missing tool fails the test when CI=true, else skips it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (install qemu-utils / qemu-system-common)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def copy_sparse(src, dst):
    """shutil.copy() that keeps holes: test images are mostly sparse, and hundreds of
    full copies would fill a small CI disk.  Returns dst, as shutil.copy does."""
    dst = os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fd = fi.fileno()
        size = os.fstat(fd).st_size
        fo.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:             # ENXIO: a hole up to the end
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            fi.seek(data)
            fo.seek(data)
            left = hole - data
            while left:
                chunk = fi.read(min(left, 1 << 20))
                fo.write(chunk)
                left -= len(chunk)
            offset = hole
    shutil.copymode(src, dst)
    return dst
