"""The `file` and `host_device` protocol drivers (QEMU's block/file-posix.c).

Reads and writes use pread/pwrite on one descriptor (no shared seek position, the GIL
is released in the syscall), so this driver runs without the node lock.  Image
locking uses the same OFD byte-range locks as QEMU: byte 100+i is read-locked while
we hold permission bit i, byte 200+i while we refuse to share it.  Two processes
conflict exactly when two QEMUs would.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct

from ... import _native
from ...errors import BlockError, InvalidArgument, LockError, NotSupported, io_failure
from ...graph.perms import PERM_NAMES, Perm
from ..base import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, BlockDriver, DriverInfo,
                    DriverKind, PreallocMode, Status)

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi4x")       # struct flock on 64-bit Linux

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_BLOCKSIZE = 4096

_libc = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode flags (os.posix_fallocate has none); libc loaded on first use."""
    global _libc
    import ctypes           # here: most commands never allocate, and ctypes costs start-up
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)     # the running process's libc
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                   ctypes.c_longlong]
        _libc = libc
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _lock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    """One fcntl OFD lock call on a single byte; returns the resulting l_type."""
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(out)[0]


def check_create_locks(filename: str) -> None:
    """raw_co_create()'s lock check: refuse to re-create a file another user holds."""
    from ...graph.backend import BlockBackend   # the graph imports the drivers
    from ...graph.graph import Graph
    if not os.path.isfile(filename):
        return
    graph = Graph()
    try:
        node = graph.open_node({"driver": "file", "filename": filename})
    except BlockError:
        return                     # creation itself will report the problem
    backend = BlockBackend(graph, perm=Perm.WRITE | Perm.RESIZE,
                           shared=Perm.all() & ~Perm.RESIZE)
    try:
        backend.insert(node)            # LockError if another user conflicts
    finally:
        backend.delete()
        graph.close_all()


class FileDriver(BlockDriver):
    info = DriverInfo("file", DriverKind.PROTOCOL,
                      create_opts=("size", "nocow", "preallocation", "extent_size_hint"))
    thread_safe = True

    def open(self, options: dict) -> None:
        self.filename = options.get("filename")
        if self.filename is None:       # bdrv_open_common(): bdrv_needs_filename
            raise InvalidArgument("The '%s' block driver requires a file name"
                                  % self.info.name)
        locking = options.get("locking", "auto")
        if locking not in ("auto", "on", "off"):
            raise InvalidArgument("Parameter 'locking' does not accept value '%s'" % locking)
        self.use_lock = locking != "off"
        self.locked_perm, self.locked_unshared = Perm(0), Perm(0)
        self.fd = self._open_fd(self.node.read_only)
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._check_type(st)
        self.alignment = self._probe_alignment() if self.node.cache_direct else 1
        self._set_plain_fd()

    def _set_plain_fd(self) -> None:
        # plain_fd: the descriptor a format driver may pread its data from directly, as
        # this node would (no bounce buffer, no alignment); None with O_DIRECT or closed
        self.plain_fd = None if self.node.cache_direct else self.fd

    def _check_type(self, st) -> None:
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise BlockError("'%s' is not a file" % self.filename)

    def _open_fd(self, read_only: bool) -> int:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.node.cache_direct:
            flags |= os.O_DIRECT
        try:
            return os.open(self.filename, flags)
        except OSError as e:
            raise BlockError("Could not open '%s': %s" % (self.filename, e.strerror),
                             errno=e.errno) from e

    def _probe_alignment(self) -> int:
        """Smallest O_DIRECT read size the host accepts (QEMU's raw_probe_alignment)."""
        buf = mmap.mmap(-1, MAX_BLOCKSIZE)
        try:
            for size in (512, 1024, 2048, 4096):
                try:
                    os.preadv(self.fd, [memoryview(buf)[:size]], 0)
                    return size
                except OSError:
                    continue
            return MAX_BLOCKSIZE
        finally:
            buf.close()

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)     # also drops our OFD locks
            self.fd = None
            self.plain_fd = None

    def reopen(self, read_only: bool) -> None:
        new_fd = self._open_fd(read_only)
        old, self.fd = self.fd, new_fd
        self._set_plain_fd()
        os.close(old)             # locks are re-applied on the new fd by set_perm
        self.locked_perm, self.locked_unshared = Perm(0), Perm(0)

    def refresh_filename(self) -> str:
        return self.filename

    # ---- geometry ---------------------------------------------------------------------
    def get_length(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def request_alignment(self) -> int:
        return self.alignment

    def max_transfer(self) -> int:
        return 1 << 30

    def get_info(self) -> dict:
        return {}

    def has_zero_init(self) -> bool:
        return not self.is_block_device

    def allocated_file_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # ---- I/O --------------------------------------------------------------------------
    def preadv(self, offset: int, buf: memoryview) -> None:
        if self.node.cache_direct:
            return self._direct_io(offset, buf, write=False)
        done, total = 0, len(buf)
        try:
            while done < total:
                n = os.preadv(self.fd, [buf[done:] if done else buf], offset + done)
                if n == 0:             # end of file: the rest reads as zeroes
                    buf[done:] = bytes(total - done)
                    return
                done += n
        except OSError as e:
            raise io_failure(e) from e

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if self.node.cache_direct:
            self._direct_io(offset, data, write=True)
        else:
            done, total = 0, len(data)
            try:
                while done < total:
                    done += os.pwritev(self.fd, [data[done:]], offset + done)
            except OSError as e:
                raise io_failure(e) from e
        if fua:
            self.flush()

    def _direct_io(self, offset: int, data: memoryview, write: bool) -> None:
        """O_DIRECT needs page-aligned memory: go through an aligned bounce buffer."""
        bounce = mmap.mmap(-1, min(len(data), 1 << 24))
        try:
            view = memoryview(bounce)
            pos = 0
            while pos < len(data):
                n = min(len(bounce), len(data) - pos)
                try:
                    if write:
                        view[:n] = data[pos:pos + n]
                        os.pwritev(self.fd, [view[:n]], offset + pos)
                    else:
                        got = os.preadv(self.fd, [view[:n]], offset + pos)
                        data[pos:pos + got] = view[:got]
                        data[pos + got:pos + n] = bytes(n - got)
                except OSError as e:
                    raise io_failure(e) from e
                pos += n
            view.release()
        finally:
            bounce.close()

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        size = self.get_length()
        try:
            if may_unmap and offset + length <= size:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise NotSupported() from e
            raise io_failure(e) from e

    def discard(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise NotSupported() from e
            raise io_failure(e) from e

    def flush(self) -> None:
        if self.node.cache_no_flush:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise io_failure(e) from e

    def truncate(self, size: int, exact: bool, prealloc: PreallocMode) -> None:
        if self.is_block_device:
            current = self.get_length()
            if size > current or exact and size != current:
                raise NotSupported("Cannot grow device files")
            return
        truncate_fd(self.fd, size, prealloc, self.filename)

    # ---- block status -----------------------------------------------------------------------
    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        """find_allocation() with SEEK_DATA/SEEK_HOLE; everything is data without them."""
        if not want_zero:
            return Status(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self.node)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # only a hole up to EOF
                return Status(BLOCK_ZERO | BLOCK_OFFSET_VALID, length, offset, self.node)
            return Status(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self.node)
        if data > offset:
            return Status(BLOCK_ZERO | BLOCK_OFFSET_VALID, min(length, data - offset),
                          offset, self.node)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = offset + length
        n = min(length, max(hole - offset, 1))
        # a hole that starts inside an aligned block does not make that block sparse
        return Status(BLOCK_DATA | BLOCK_OFFSET_VALID, n, offset, self.node)

    def block_status_runs(self, offset: int, length: int, want_zero: bool) -> list[Status]:
        """Consecutive data/hole extents in one call (the syscalls are the same)."""
        out, end = [], offset + length
        while offset < end and len(out) < 1024:
            st = self.block_status(offset, end - offset, want_zero)
            out.append(st)
            offset += st.length
        return out

    def map_packed(self, offset: int, length: int, file_id) -> tuple[bytes, int]:
        """`img map` entries of [offset, offset + length) in one native call (the
        extents block_status finds, as packed ``_native.MAP_ENTRY`` records)."""
        length = min(length, max(0, self.node.total_size - offset))
        return _native.seek_map(self.fd, offset, length, file_id(self.node.filename()))

    # ---- image locking ------------------------------------------------------------------------
    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """raw_check_lock_bytes(): would another process's locks conflict?"""
        if not self.use_lock or self.fd is None:
            return
        try:
            for i, (bit, name) in enumerate(PERM_NAMES):
                if perm & bit and self._held_by_other(LOCK_SHARED_BASE + i):
                    raise LockError('Failed to get "%s" lock' % name, self._hint())
            for i, (bit, name) in enumerate(PERM_NAMES):
                if not shared & bit and self._held_by_other(LOCK_PERM_BASE + i):
                    raise LockError('Failed to get shared "%s" lock' % name, self._hint())
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOTSUP) and self.node.options.get(
                    "locking", "auto") == "auto":
                self.use_lock = False     # filesystem without OFD locks
                return
            raise

    def _hint(self) -> str:
        return "Is another process using the image [%s]?" % self.filename

    def _held_by_other(self, byte: int) -> bool:
        return _lock(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """raw_apply_lock_bytes(): hold exactly the locks for (perm, ~shared)."""
        if not self.use_lock or self.fd is None:
            return
        unshared = Perm.all() & ~shared
        for i, (bit, _) in enumerate(PERM_NAMES):
            for base, want, had in ((LOCK_PERM_BASE, perm, self.locked_perm),
                                    (LOCK_SHARED_BASE, unshared, self.locked_unshared)):
                if bool(want & bit) != bool(had & bit):
                    _lock(self.fd, F_OFD_SETLK,
                          fcntl.F_RDLCK if want & bit else fcntl.F_UNLCK, base + i)
        self.locked_perm, self.locked_unshared = perm, unshared

    # ---- creation ------------------------------------------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int, opts: dict, secrets: dict | None = None
               ) -> None:
        """raw_co_create(): create or truncate the file, then preallocate."""
        try:
            prealloc = PreallocMode(opts.get("preallocation", "off"))
        except ValueError:
            raise InvalidArgument("invalid parameter value: %s" % opts["preallocation"]) from None
        if prealloc is PreallocMode.METADATA:
            raise InvalidArgument("Unsupported preallocation mode: metadata")
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise BlockError("Could not create '%s': %s" % (filename, e.strerror),
                             errno=e.errno) from e
        try:
            # as QEMU: a create always starts from an empty file
            try:
                os.ftruncate(fd, 0)
            except OSError as e:
                raise BlockError("Could not resize file: %s" % e.strerror,
                                 errno=e.errno) from e
            truncate_fd(fd, size, prealloc, filename)
        finally:
            os.close(fd)


def delete_file_noerr(filename: str | None) -> None:
    """bdrv_co_delete_file_noerr(): a format's create that failed once the file was
    created removes it (even a file that existed before: it is truncated anyway)."""
    if filename:
        try:
            os.unlink(filename)
        except OSError:
            pass


def truncate_fd(fd: int, size: int, prealloc: PreallocMode, filename: str) -> None:
    """raw_regular_truncate(): resize a regular file, preallocating any growth."""
    current = os.fstat(fd).st_size
    try:
        if prealloc is PreallocMode.OFF or size <= current:
            os.ftruncate(fd, size)
            if current == 0 and size > 0:
                # QEMU's allocate_first_block(): helps later alignment probing
                os.pwrite(fd, bytes(min(MAX_BLOCKSIZE, size)), 0)
        elif prealloc is PreallocMode.FALLOC:
            os.posix_fallocate(fd, current, size - current)
        elif prealloc is PreallocMode.FULL:
            os.ftruncate(fd, size)
            zero = bytes(1 << 20)
            pos = current
            while pos < size:
                n = min(len(zero), size - pos)
                os.pwrite(fd, zero[:n], pos)
                pos += n
        else:
            raise NotSupported("Preallocation mode '%s' unsupported for this storage"
                               % prealloc.value)
    except OSError as e:
        raise BlockError("Could not resize file: %s" % e.strerror, errno=e.errno) from e
    except OverflowError:   # past INT64_MAX: QEMU's int64_t went negative, ftruncate() EINVAL
        raise BlockError("Could not resize file: %s" % os.strerror(errno.EINVAL),
                         errno=errno.EINVAL) from None


class HostDeviceDriver(FileDriver):
    info = DriverInfo("host_device", DriverKind.PROTOCOL)

    def _check_type(self, st) -> None:
        if not stat.S_ISBLK(st.st_mode) and not stat.S_ISCHR(st.st_mode):
            os.close(self.fd)
            raise BlockError("'%s' is not a block device" % self.filename)
