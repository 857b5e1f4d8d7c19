"""Request checks shared by every node: bounds, overflow and alignment.

Drivers never see a request that fails these checks; they may assume aligned,
in-bounds requests (see ``blockengine.drivers.base``).
"""
import errno

from ..errors import BlockError

# BDRV_MAX_LENGTH: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT (1 GiB); no request
# may reach past it and no node may be larger
INT64_MAX = (1 << 63) - 1
MAX_REQUEST_BYTES = INT64_MAX & ~((1 << 30) - 1)


def check_request(offset: int, length: int, size: int | None = None) -> None:
    """bdrv_check_qiov_request() / blk_check_byte_request(): a negative, overflowing
    or (with size) out-of-bounds range fails with EIO, as in QEMU."""
    if offset < 0 or length < 0 or offset > MAX_REQUEST_BYTES - length:
        raise BlockError(f"Invalid request: offset {offset} length {length}",
                         errno=errno.EIO)
    if size is not None and offset + length > size:
        raise BlockError(f"Request offset {offset} length {length} beyond end of device "
                         f"({size} bytes)", errno=errno.EIO)


def check_truncate(size: int) -> None:
    """bdrv_co_truncate()'s bdrv_check_request(offset, 0): no node may grow past
    BDRV_MAX_LENGTH (QEMU's message, EIO)."""
    if size > MAX_REQUEST_BYTES:
        raise BlockError("offset(%d) exceeds maximum(%d)" % (size, MAX_REQUEST_BYTES),
                         errno=errno.EIO)


def check_node_length(length: int) -> None:
    """refresh_total_sectors() after a driver opened: QEMU refuses nodes larger than
    BDRV_MAX_LENGTH."""
    if length > MAX_REQUEST_BYTES:
        raise BlockError("Could not refresh total sector count: File too large",
                         errno=errno.EFBIG)


def align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def is_aligned(offset: int, length: int, alignment: int) -> bool:
    return offset % alignment == 0 and length % alignment == 0


def chunks(offset: int, length: int, max_transfer: int):
    """Split [offset, offset+length) into pieces no larger than max_transfer."""
    end = offset + length
    while offset < end:
        n = min(max_transfer, end - offset)
        yield offset, n
        offset += n
