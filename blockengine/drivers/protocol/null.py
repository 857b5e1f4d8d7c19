"""`null-co` / `null-aio`: a device of a given size that stores nothing (block/null.c)."""
import time

from ...errors import InvalidArgument
from ..base import (BLOCK_OFFSET_VALID, BLOCK_ZERO, BlockDriver, DriverInfo, DriverKind,
                    Status)


class NullCoDriver(BlockDriver):
    info = DriverInfo("null-co", DriverKind.PROTOCOL)
    thread_safe = True

    @classmethod
    def parse_filename(cls, filename: str) -> dict:
        url = cls.info.name + "://"
        if filename != url:
            raise InvalidArgument("The only allowed filename for this driver is '%s'" % url)
        return {}

    def open(self, options: dict) -> None:
        self.size = options.get("size", 1 << 30)
        self.latency_ns = options.get("latency-ns", 0)
        self.read_zeroes = options.get("read-zeroes", False)
        if self.size < 0:
            raise InvalidArgument("Parameter 'size' expects a non-negative value")
        if self.latency_ns < 0:
            raise InvalidArgument("latency-ns is invalid")
        self.options = {k: v for k, v in options.items() if k != "filename"}

    def _delay(self) -> None:
        if self.latency_ns:
            time.sleep(self.latency_ns / 1e9)

    def get_length(self) -> int:
        return self.size

    def preadv(self, offset: int, buf: memoryview) -> None:
        # without read-zeroes QEMU leaves the buffer alone; ours are zeroed by callers
        if self.read_zeroes:
            buf[:] = bytes(len(buf))
        self._delay()

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._delay()

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._delay()

    def flush(self) -> None:
        self._delay()

    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        flags = BLOCK_OFFSET_VALID | (BLOCK_ZERO if self.read_zeroes else 0)
        return Status(flags, length, offset, self.node)

    def refresh_filename(self) -> str | None:
        # null_refresh_filename(): a plain URL only when no option but latency was set
        if set(self.options) - {"latency-ns"}:
            return None
        return "%s://" % self.info.name

    def allocated_file_size(self) -> int:
        return 0


class NullAioDriver(NullCoDriver):
    info = DriverInfo("null-aio", DriverKind.PROTOCOL)
