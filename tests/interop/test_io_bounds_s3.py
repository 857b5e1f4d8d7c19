"""Requests out of range against qemu-io 7.2, for each format: beyond the end of the
image, past BDRV_MAX_LENGTH (INT64_MAX aligned down to 1 GiB) and nodes larger than
it, with qemu-io's messages (EIO, EFBIG at open) on identical images."""
import os
import subprocess
import sys

import pytest

from tests.interop.test_io_cli import REPO, Pair, cmds
from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)      # BDRV_MAX_LENGTH

BEYOND_END = cmds(
    "read 1M 512", "read 1020k 8k", "read 1048575 2", "read -P 0 1020k 8k",
    "read -p 1M 512", "readv 1020k 4k 4k", "read 2M 512",
    "write 1M 512", "write 1020k 8k", "write 1048575 2", "write -p 1M 512",
    "write -f 1M 512", "writev 1020k 4k 4k", "write -c 1M 64k", "write -c 960k 128k",
    "write -z 1M 512", "write -z 1020k 8k", "write -z -u 1020k 8k",
    "discard 1M 512", "discard 1020k 8k", "alloc 1M 512",
    "read 9223372036854775807 1", "write 9223372036854775807 1", "map")

FORMATS = {
    "raw": ["-f", "raw", "a.raw"],
    "file": ["-f", "file", "a.raw"],
    "qcow2": ["-f", "qcow2", "a.qcow2"],
    "qcow2-data-file": ["-f", "qcow2", "d.qcow2"],
    "vmdk": ["-f", "vmdk", "a.vmdk"],
    "luks": ["--object", "secret,id=s0,data=pw", "--image-opts",
             "driver=luks,key-secret=s0,file.filename=a.luks"],
    "raw-window": ["--image-opts", "driver=raw,offset=512,size=1M,file.filename=w.raw"],
    "null-co": ["--image-opts", "driver=null-co,size=1M"],
}


def _prepare(pair: Pair) -> None:
    """The same images (created once: LUKS salts and VMDK CIDs are random) on both sides."""
    qemu_img = require_tool("qemu-img")
    template = pair.dirs["qemu"].parent / "template"
    template.mkdir()
    for args in (["-f", "raw", "a.raw", "1M"], ["-f", "raw", "w.raw", "2M"],
                 ["-f", "qcow2", "a.qcow2", "1M"],
                 ["-f", "qcow2", "-o", "data_file=d.data", "d.qcow2", "1M"],
                 ["-f", "vmdk", "a.vmdk", "1M"],
                 ["--object", "secret,id=s0,data=pw", "-f", "luks",
                  "-o", "key-secret=s0,iter-time=10", "a.luks", "1M"]):
        # (ours makes the LUKS image: qemu-img's PBKDF timing fails on a busy machine)
        tool = [sys.executable, "-m", "blockengine.cli", "img"] if "luks" in args \
            else [qemu_img]
        r = subprocess.run([*tool, "create", "-q", *args], cwd=template,
                           capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 0, r.stderr
    for d in pair.dirs.values():
        for f in template.iterdir():
            copy_sparse(f, d / f.name)


@pytest.mark.parametrize("image", FORMATS.values(), ids=FORMATS.keys())
def test_beyond_the_end(tmp_path, image):
    pair = Pair(tmp_path)
    _prepare(pair)
    names = ("a.raw", "a.qcow2", "a.vmdk", "a.luks", "w.raw", "d.qcow2", "d.data")
    before = {name: pair.read("ours", name) for name in names}
    pair.compare([*BEYOND_END, *image])
    for name in names:          # nothing was written
        assert pair.read("ours", name) == pair.read("qemu", name) == before[name], name


@pytest.mark.parametrize("size", [MAX_LENGTH, MAX_LENGTH + 512, (1 << 63) - 1])
def test_max_length(tmp_path, size):
    """Past BDRV_MAX_LENGTH every request fails with EIO; a larger node cannot open."""
    pair = Pair(tmp_path)
    pair.compare([*cmds("read %d 512" % (MAX_LENGTH - 512), "read %d 512" % MAX_LENGTH,
                        "write %d 512" % MAX_LENGTH, "write -z %d 512" % MAX_LENGTH,
                        "discard %d 512" % MAX_LENGTH, "alloc %d 512" % MAX_LENGTH,
                        "read %d 1" % (size - 1), "length"),
                  "--image-opts", "driver=null-co,size=%d" % size])
