"""The generic I/O layer: bounds, alignment (read-modify-write), zeroes, against a model."""
import errno
import os

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from blockengine import Graph
from blockengine.drivers.base import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BLOCK_ZERO,
                                      BlockDriver, DriverInfo, DriverKind)
from blockengine.errors import BlockError
from blockengine.graph import registry


class AlignedMemDriver(BlockDriver):
    """A test protocol driver with 512-byte request alignment that checks it is honoured."""
    info = DriverInfo("test-mem512", DriverKind.PROTOCOL)
    ALIGN = 512

    def open(self, options):
        self.data = bytearray(options.get("size", 1 << 20))
        self.zero_calls = 0

    def get_length(self):
        return len(self.data)

    def request_alignment(self):
        return self.ALIGN

    def max_transfer(self):
        return 8192

    def _check(self, offset, length):
        assert offset % self.ALIGN == 0 and length % self.ALIGN == 0, (offset, length)
        assert length <= 8192

    def preadv(self, offset, buf):
        self._check(offset, len(buf))
        buf[:] = self.data[offset:offset + len(buf)]

    def pwritev(self, offset, data, fua=False):
        self._check(offset, len(data))
        self.data[offset:offset + len(data)] = data

    def pwrite_zeroes(self, offset, length, may_unmap):
        assert offset % self.ALIGN == 0 and length % self.ALIGN == 0
        self.zero_calls += 1
        self.data[offset:offset + length] = bytes(length)


@pytest.fixture(autouse=True)
def mem_driver(monkeypatch):
    monkeypatch.setitem(registry._DRIVERS, "test-mem512", f"{__name__}:AlignedMemDriver")


def test_unaligned_write_is_read_modify_write():
    g = Graph()
    n = g.open_node({"driver": "test-mem512", "size": 4096})
    n.drv.data[:] = bytes(range(256)) * 16
    n.pwrite(100, b"\xff" * 10)
    expect = bytearray(bytes(range(256)) * 16)
    expect[100:110] = b"\xff" * 10
    assert n.drv.data == expect
    assert n.pread(95, 20) == bytes(expect[95:115])


def test_zeroes_use_driver_for_aligned_middle():
    g = Graph()
    n = g.open_node({"driver": "test-mem512", "size": 8192})
    n.drv.data[:] = b"\x11" * 8192
    n.pwrite_zeroes(100, 3000)
    assert n.drv.zero_calls == 1
    assert n.drv.data[:100] == b"\x11" * 100 and n.drv.data[100:3100] == bytes(3000)
    assert n.drv.data[3100:] == b"\x11" * (8192 - 3100)


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, -1), ((1 << 63) - 1, 2)])
def test_invalid_ranges_are_refused(offset, length):
    """bdrv_check_qiov_request(): EIO, as QEMU (qemu-io prints Input/output error)."""
    g = Graph()
    n = g.open_node({"driver": "null-co", "size": 4096})
    for op in (n.pwrite_zeroes, n.discard):
        with pytest.raises(BlockError, match="Invalid request") as err:
            op(offset, length)
        assert err.value.errno == errno.EIO


def test_beyond_end_of_format_node(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(bytes(1024))
    g = Graph()
    n = g.open_node({"driver": "raw", "file": {"driver": "file", "filename": str(p)}})
    with pytest.raises(BlockError, match="beyond end of device"):
        n.pread(1000, 100)


def test_file_block_status_sees_holes(tmp_path):
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
        f.seek(2 << 20)
        f.write(b"x" * 65536)
    g = Graph()
    n = g.open_node({"driver": "raw", "file": {"driver": "file", "filename": str(p)}})
    st = n.block_status(0, 8 << 20)
    assert st.flags & BLOCK_ZERO and st.flags & BLOCK_ALLOCATED and st.length == 2 << 20
    st = n.block_status(2 << 20, 6 << 20)
    assert st.flags & BLOCK_DATA and st.length == 65536
    st = n.block_status((8 << 20) - 512, 512)
    assert st.flags & BLOCK_EOF


def test_null_reads_zeroes_and_reports_zero():
    g = Graph()
    n = g.open_node({"driver": "null-co", "size": 1 << 20, "read-zeroes": True})
    assert n.pread(0, 4096) == bytes(4096)
    assert n.block_status(0, 1 << 20).flags & BLOCK_ZERO
    # what qemu-img info prints for json:{"driver":"null-co","size":1048576,
    # "read-zeroes":true} (members in QDict order)
    assert n.filename() == 'json:{"read-zeroes": true, "driver": "null-co", "size": 1048576}'
    assert g.open_node({"driver": "null-aio"}).filename() == "null-aio://"


def test_detect_zeroes_turns_zero_writes_into_holes(tmp_path):
    p = tmp_path / "dz"
    p.write_bytes(b"\xaa" * (1 << 20))
    g = Graph()
    n = g.open_node({"driver": "raw", "detect-zeroes": "unmap", "discard": "unmap",
                     "file": {"driver": "file", "filename": str(p)}})
    n.pwrite(0, bytes(1 << 20))
    n.flush()
    assert p.read_bytes() == bytes(1 << 20)
    assert os.stat(p).st_blocks * 512 < (1 << 20)      # punched, not written


def test_write_threshold_event_is_one_shot():
    events = []

    class Bus:
        def emit(self, name, data):
            events.append((name, data))

    g = Graph(events=Bus())
    n = g.open_node({"driver": "null-co", "node-name": "n", "size": 1 << 20})
    n.write_threshold = 4096
    n.pwrite(0, b"a" * 4096)
    assert events == []
    n.pwrite(4000, b"a" * 200)
    assert events == [("BLOCK_WRITE_THRESHOLD",
                       {"node-name": "n", "amount-exceeded": 104, "write-threshold": 4096})]
    n.pwrite(8000, b"a")
    assert len(events) == 1 and n.write_threshold == 0


class NodeModel(RuleBasedStateMachine):
    """Random unaligned I/O through raw-over-file and the 512-aligned driver vs a bytearray."""

    SIZE = 64 * 1024

    @initialize(kind=st.sampled_from(["file", "mem512"]))
    def open(self, kind):
        import tempfile
        self.graph = Graph()
        self.model = bytearray(self.SIZE)
        if kind == "file":
            fd, self.path = tempfile.mkstemp()
            os.ftruncate(fd, self.SIZE)
            os.close(fd)
            opts = {"driver": "raw", "file": {"driver": "file", "filename": self.path}}
        else:
            self.path = None
            opts = {"driver": "raw", "file": {"driver": "test-mem512", "size": self.SIZE}}
        self.node = self.graph.open_node(opts)

    ranges = st.integers(0, SIZE - 1).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(0, min(9000, NodeModel.SIZE - off))))

    @rule(r=ranges, byte=st.integers(1, 255))
    def write(self, r, byte):
        off, n = r
        self.node.pwrite(off, bytes([byte]) * n)
        self.model[off:off + n] = bytes([byte]) * n

    @rule(r=ranges, unmap=st.booleans())
    def zero(self, r, unmap):
        off, n = r
        self.node.pwrite_zeroes(off, n, unmap)
        self.model[off:off + n] = bytes(n)

    @rule(r=ranges)
    def read(self, r):
        off, n = r
        assert self.node.pread(off, n) == bytes(self.model[off:off + n])

    @rule()
    def flush(self):
        self.node.flush()

    @invariant()
    def whole_image_matches(self):
        if hasattr(self, "node"):
            assert self.node.pread(0, self.SIZE) == bytes(self.model)

    def teardown(self):
        if hasattr(self, "graph"):
            self.graph.close_all()
        if getattr(self, "path", None):
            os.unlink(self.path)


NodeModel.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestNodeModel = NodeModel.TestCase


def test_cache_direct_uses_aligned_io(tmp_path):
    p = tmp_path / "direct.raw"
    p.write_bytes(b"\x11" * 65536)
    g = Graph()
    try:
        n = g.open_node({"driver": "raw", "cache": {"direct": True},
                         "file": {"driver": "file", "filename": str(p)}})
    except BlockError as e:          # a filesystem without O_DIRECT (tmpfs)
        pytest.skip(str(e))
    assert n.file_child_node().request_alignment in (512, 1024, 2048, 4096)
    n.pwrite(3, b"abc")
    n.flush()
    assert n.pread(0, 8) == b"\x11\x11\x11abc\x11\x11"
    g.close_all()
    assert p.read_bytes()[:8] == b"\x11\x11\x11abc\x11\x11"


def test_probed_raw_refuses_format_header_in_sector_0(tmp_path):
    import blockengine
    p = tmp_path / "guest.img"
    p.write_bytes(bytes(65536))
    with blockengine.open(str(p)) as img:          # format probed: raw
        assert img.node.driver_name == "raw"
        with pytest.raises(BlockError, match="Operation not permitted"):
            img.write(0, b"QFI\xfb\x00\x00\x00\x03")
        img.write(512, b"QFI\xfb\x00\x00\x00\x03")   # only sector 0 is guarded
        img.write(0, b"plain data")
    with blockengine.open(str(p), "raw") as img:   # explicit raw: no restriction
        img.write(0, b"QFI\xfb\x00\x00\x00\x03")
