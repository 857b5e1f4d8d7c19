"""The `raw` format (block/raw-format.c): the file's bytes, optionally a window of them.

When the format was probed rather than given, writes that would make sector 0 look
like another format's header are refused (EPERM), so a guest cannot turn its raw
disk into, say, a qcow2 image pointing at host files.
"""
import errno

from ...errors import BlockError, InvalidArgument, NotSupported
from ...graph.child import ChildRole
from ...graph import registry
from ..base import (BLOCK_OFFSET_VALID, BLOCK_RAW, BlockDriver, DriverInfo, DriverKind,
                    PreallocMode, Status)

PROBE_SECTOR = 512


class RawDriver(BlockDriver):
    info = DriverInfo("raw", DriverKind.FORMAT, create_opts=("size",))

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        if "offset" in options or "size" in options:
            return {"file": ChildRole.DATA | ChildRole.PRIMARY}
        return {"file": ChildRole.FILTERED | ChildRole.PRIMARY}

    def open(self, options: dict) -> None:
        self.file = self.node.file_child_node()
        if self.file is None:
            raise InvalidArgument("Parameter 'file' is missing")
        self.probed = bool(options.get("x-probed", False))
        self.offset = options.get("offset", 0)
        self.has_size = "size" in options
        file_size = self.file.total_size
        if self.offset < 0 or self.offset > file_size:
            raise InvalidArgument("offset cannot be negative" if self.offset < 0 else
                                  "The sum of offset (%d) and size (0) has to be smaller "
                                  "or equal to the  actual size of the containing file (%d)"
                                  % (self.offset, file_size))
        self.size = options["size"] if self.has_size else None
        if self.has_size and self.offset + self.size > file_size:
            raise InvalidArgument(
                "The sum of offset (%d) and size (%d) has to be smaller or equal to the "
                " actual size of the containing file (%d)" % (self.offset, self.size, file_size))
        if self.has_size and self.size % 512:
            raise InvalidArgument("Specified size is not a multiple of 512")

    def get_length(self) -> int:
        if self.has_size:
            return self.size
        return max(0, self.file.total_size - self.offset)

    def request_alignment(self) -> int:
        return self.file.request_alignment

    def preadv(self, offset: int, buf: memoryview) -> None:
        self.file.preadv(self.offset + offset, buf)

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if self.probed and offset < PROBE_SECTOR and len(data):
            self._check_probe_write(offset, data)
        self.file.pwrite(self.offset + offset, data, fua)

    def _check_probe_write(self, offset: int, data: memoryview) -> None:
        """raw_co_pwritev(): refuse a new sector 0 that probes as a non-raw format."""
        sector = bytearray(self.file.pread(self.offset, PROBE_SECTOR)
                           if self.get_length() >= PROBE_SECTOR else bytes(PROBE_SECTOR))
        n = min(len(data), PROBE_SECTOR - offset)
        sector[offset:offset + n] = data[:n]
        if registry.probe_format(bytes(sector)) != "raw":
            raise BlockError("Operation not permitted", errno=errno.EPERM)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.file.pwrite_zeroes(self.offset + offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self.file.discard(self.offset + offset, length)

    def truncate(self, size: int, exact: bool, prealloc: PreallocMode) -> None:
        if self.has_size:
            raise NotSupported("Cannot resize fixed-size raw disks")
        if self.offset:
            raise NotSupported("Cannot resize raw disks with an offset")
        self.file.truncate(self.offset + size, exact=exact, prealloc=prealloc)

    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        return Status(BLOCK_RAW | BLOCK_OFFSET_VALID, length, self.offset + offset, self.file)

    def map_packed(self, offset: int, length: int, file_id) -> tuple[bytes, int] | None:
        """`img map` in bulk: the file's own entries, which block status passes through
        (BLOCK_RAW) when the mapping is 1:1."""
        fast = getattr(self.file.drv, "map_packed", None)
        if fast is None or self.offset:
            return None
        with self.file.lock:
            return fast(offset, length, file_id)

    def get_info(self) -> dict:
        return {}

    def has_zero_init(self) -> bool:
        return self.file.drv.has_zero_init()

    def allocated_file_size(self):
        return self.file.drv.allocated_file_size()

    def refresh_filename(self) -> str | None:
        strong = {k: self.node.options[k] for k in ("offset", "size")
                  if k in self.node.options}
        fname = self.file.filename()
        # raw's strong_runtime_opts (a window) or a file without a plain name: json:
        if strong or fname.startswith("json:"):
            from ...graph.filename import json_filename
            return json_filename("raw", strong, self.file)
        return fname

    @classmethod
    def create(cls, filename: str, size: int, opts: dict, secrets: dict | None = None
               ) -> None:
        from ..protocol.file import FileDriver
        FileDriver.create(filename, size, opts)
