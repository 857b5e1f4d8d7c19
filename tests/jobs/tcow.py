"""``tcow``: a tiny copy-on-write test format with backing files, for stream/commit
tests while the qcow2 driver is being written.

Layout: a JSON header in the first 4 KiB (size, cluster size, backing file/format),
one allocation byte per cluster from 4 KiB on, and the data 1:1 after the map.
Clusters are allocated whole: a partial write to an unallocated cluster first copies
the cluster's data from the backing file (or zeroes).
"""
from __future__ import annotations

import json
import os

from blockengine.drivers.base import (BLOCK_DATA, BLOCK_OFFSET_VALID, BlockDriver,
                                      DriverInfo, DriverKind, Status)
from blockengine.errors import InvalidImage

HEADER = 4096
MAGIC = "TCOW"


def _align(n, a):
    return -(-n // a) * a


class TcowDriver(BlockDriver):
    info = DriverInfo("tcow", DriverKind.FORMAT, supports_backing=True)

    @classmethod
    def create(cls, filename: str, size: int, opts: dict) -> None:
        cluster = opts.get("cluster_size", 65536)
        hdr = {"magic": MAGIC, "size": size, "cluster": cluster,
               "backing": opts.get("backing_file"), "backing_fmt": opts.get("backing_fmt")}
        nclusters = -(-size // cluster)
        with open(filename, "wb") as f:
            f.write(json.dumps(hdr).encode().ljust(HEADER, b"\0"))
            f.truncate(HEADER + _align(nclusters, 4096) + size)

    def open(self, options: dict) -> None:
        self.file = self.node.file_child_node()
        hdr = json.loads(self.file.pread(0, HEADER).rstrip(b"\0"))
        if hdr.get("magic") != MAGIC:
            raise InvalidImage("not a tcow image")
        self.hdr = hdr
        self.size, self.cluster = hdr["size"], hdr["cluster"]
        self.nclusters = -(-self.size // self.cluster)
        self.data_off = HEADER + _align(self.nclusters, 4096)
        self.map = bytearray(self.file.pread(HEADER, self.nclusters))

    def backing_options(self):
        b = self.hdr.get("backing")
        if not b:
            return None
        path = b if b.startswith("/") else os.path.join(
            os.path.dirname(self.file.filename()), b)
        return {"driver": self.hdr.get("backing_fmt") or "tcow",
                "file": {"driver": "file", "filename": path}}

    def change_backing_file(self, filename, fmt) -> None:
        self.hdr["backing"], self.hdr["backing_fmt"] = filename, fmt
        self.file.pwrite(0, json.dumps(self.hdr).encode().ljust(HEADER, b"\0"))

    def get_length(self) -> int:
        return self.size

    def get_info(self):
        return {"cluster_size": self.cluster}

    def _runs(self, offset, length):
        """(offset, length, allocated) runs of whole-cluster allocation."""
        end = offset + length
        pos = offset
        while pos < end:
            c = pos // self.cluster
            alloc = self.map[c]
            c2 = c + 1
            while c2 * self.cluster < end and self.map[c2] == alloc:
                c2 += 1
            stop = min(end, c2 * self.cluster)
            yield pos, stop - pos, bool(alloc)
            pos = stop

    def _read_below(self, offset, buf):
        backing = self.node.backing
        n = len(buf)
        if backing is None:
            buf[:] = bytes(n)
            return
        bsize = backing.total_size
        m = max(0, min(n, bsize - offset))
        if m:
            backing.preadv(offset, buf[:m])
        if m < n:
            buf[m:] = bytes(n - m)

    def preadv(self, offset, buf):
        pos = 0
        for off, n, alloc in self._runs(offset, len(buf)):
            if alloc:
                self.file.preadv(self.data_off + off, buf[pos:pos + n])
            else:
                self._read_below(off, buf[pos:pos + n])
            pos += n

    def pwritev(self, offset, data, fua=False):
        end = offset + len(data)
        first, last = offset // self.cluster, (end - 1) // self.cluster
        # copy-on-write of partially written unallocated edge clusters
        for c in {first, last}:
            if self.map[c]:
                continue
            cs, ce = c * self.cluster, min((c + 1) * self.cluster, self.size)
            if offset <= cs and end >= ce:
                continue
            buf = bytearray(ce - cs)
            self._read_below(cs, memoryview(buf))
            self.file.pwrite(self.data_off + cs, buf)
        self.file.pwrite(self.data_off + offset, data, fua)
        changed = False
        for c in range(first, last + 1):
            if not self.map[c]:
                self.map[c] = 1
                changed = True
        if changed:
            self.file.pwrite(HEADER + first, bytes(self.map[first:last + 1]))

    def truncate(self, size, exact, prealloc):
        raise NotImplementedError

    def block_status(self, offset, length, want_zero):
        for off, n, alloc in self._runs(offset, length):
            if alloc:
                return Status(BLOCK_DATA | BLOCK_OFFSET_VALID, n, self.data_off + off,
                              self.file)
            return Status(0, n)
        return Status(0, length)


def register() -> str:
    """Make 'tcow' a known driver (test-only); returns its name."""
    from blockengine.graph import registry
    registry._DRIVERS["tcow"] = "%s:TcowDriver" % TcowDriver.__module__
    return "tcow"
