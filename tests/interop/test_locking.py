"""Image locking interoperates with QEMU: blockengine and qemu-io exclude each other
exactly as two QEMU processes do (OFD locks on bytes 100+perm / 200+perm)."""
import subprocess

import pytest

import blockengine
from blockengine.errors import LockError
from blockengine.graph.backend import NO_SHARE
from blockengine.graph.perms import Perm
from tests.tooling import require_tool

pytestmark = pytest.mark.interop


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "locked.raw"
    path.write_bytes(bytes(1 << 20))
    return str(path)


class QemuIoHolder:
    """A qemu-io process keeping the image open until closed."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([require_tool("qemu-io"), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.proc.stdin.write("read 0 512\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert "read 512/512" in line, line      # the image is open

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def qemu_io_holding(image):
    holders = []

    def hold(*args):
        h = QemuIoHolder(*args, image)
        holders.append(h)
        return h
    yield hold
    for h in holders:
        h.close()


# What each side takes and shares, as measured against qemu-io / qemu-img 7.2:
# qemu-io takes consistent-read (+ write unless -r) and shares everything; a
# convert source (our NO_SHARE) refuses to share write and resize.

def test_two_writers_coexist_like_two_qemu_ios(image, qemu_io_holding):
    qemu_io_holding("-f", "raw")
    with blockengine.open(image, "raw", perm=Perm.CONSISTENT_READ | Perm.WRITE) as img:
        img.write(0, b"x")


def test_exclusive_reader_refused_while_qemu_writes(image, qemu_io_holding):
    qemu_io_holding("-f", "raw")
    with pytest.raises(LockError, match='^Failed to get shared "write" lock$') as e:
        blockengine.open(image, "raw", read_only=True, shared=NO_SHARE)
    assert e.value.hint == "Is another process using the image [%s]?" % image
    # -U (force-share) reads alongside, as qemu-img -U does
    with blockengine.open(image, "raw", read_only=True, shared=NO_SHARE,
                          force_share=True) as img:
        assert img.read(0, 512)[:1] in (b"\0", b"x")


def test_exclusive_reader_allows_qemu_readers(image, qemu_io_holding):
    qemu_io_holding("-r", "-f", "raw")
    with blockengine.open(image, "raw", read_only=True, shared=NO_SHARE) as img:
        assert img.size == 1 << 20


def test_our_exclusive_use_excludes_qemu_writer(image):
    qemu_io = require_tool("qemu-io")
    with blockengine.open(image, "raw", shared=NO_SHARE) as img:
        img.write(0, b"\x5a" * 512)
        r = subprocess.run([qemu_io, "-f", "raw", "-c", "read 0 512", image],
                           capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr == ("qemu-io: can't open device %s: Failed to get \"write\" lock\n"
                            "Is another process using the image [%s]?\n" % (image, image))
        r = subprocess.run([qemu_io, "-r", "-f", "raw", "-c", "read -P 0x5a 0 512", image],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "read 512/512" in r.stdout, r.stderr
    r = subprocess.run([qemu_io, "-f", "raw", "-c", "read -P 0x5a 0 512", image],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr         # released on close


def test_metadata_only_open_takes_nothing(image):
    """qemu-img info (BDRV_O_NO_IO) opens even an exclusively locked image."""
    with blockengine.open(image, "raw", shared=NO_SHARE) as img:
        img.write(0, b"1")
        with blockengine.open(image, "raw", read_only=True, no_io=True) as info:
            assert info.size == 1 << 20


def test_locking_off_ignores_qemu(image, qemu_io_holding):
    qemu_io_holding("-f", "raw")
    with blockengine.open(image, "raw", read_only=True, shared=NO_SHARE,
                          options={"file": {"driver": "file", "filename": image,
                                            "locking": "off"}}) as img:
        assert img.read(0, 16) == bytes(16)


def test_reopen_read_write_checks_locks(image):
    with blockengine.open(image, "raw", read_only=True) as img, \
            blockengine.open(image, "raw", read_only=True, shared=NO_SHARE):
        img.graph.reopen(img.node, False)
        with pytest.raises(LockError, match='Failed to get "write" lock'):
            img.backend.set_perm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
        assert not img.backend.perm & Perm.WRITE


def test_write_permission_on_read_only_node_is_refused(image):
    with pytest.raises(blockengine.BlockError, match="^Block node is read-only$"):
        blockengine.open(image, "raw", read_only=True, perm=Perm.CONSISTENT_READ | Perm.WRITE)
