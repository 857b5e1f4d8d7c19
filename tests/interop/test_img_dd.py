"""`blockengine img dd` against qemu-img 7.2: the same command lines give the same
stdout, stderr and exit status, and the same output image: raw outputs byte for byte,
other formats the same size, content and allocation (compared with qemu-img)."""
from __future__ import annotations

import subprocess

import pytest

from tests.interop.backing_chains import image_state, make_chains

pytestmark = pytest.mark.interop

COPIES = [
    ["if=top.qcow2", "of=o.raw"],                          # through a 3-layer chain
    ["if=mid.qcow2", "of=o.raw", "bs=64k"],
    ["-O", "qcow2", "if=top.qcow2", "of=o.qcow2", "bs=64k", "count=3", "skip=1"],
    ["-O", "qcow2", "if=top.qcow2", "of=o.qcow2"],
    ["-O", "vmdk", "if=mid.qcow2", "of=o.vmdk", "bs=1M"],
    ["if=top.qcow2", "of=o.raw", "bs=1M", "skip=5"],       # skip past the end
    ["if=top.qcow2", "of=o.raw", "bs=1M", "count=1", "skip=1"],   # count before skip
    ["if=top.qcow2", "of=o.raw", "count=0"],
    ["if=top.qcow2", "of=o.raw", "bs=1000", "count=3", "skip=2"],  # unaligned sizes
    ["if=top.qcow2", "of=o.raw", "bs=3000"],               # a short last block
    ["if=top.qcow2", "of=o.raw", "count=9223372036854775807"],   # count*bs overflows
    ["if=top.qcow2", "of=o.raw", "skip=9223372036854775807", "bs=2"],
    ["if=top.qcow2", "of=o.raw", "bs=1.5k", "count=7", "skip=3"],
    ["-O", "raw", "if=top.qcow2", "of=o.raw", "bs=4096", "bs=512", "if=base.qcow2"],
    ["-f", "raw", "if=top.qcow2", "of=o.raw"],             # the qcow2 file's bytes
    ["if=plain.raw", "of=o.raw", "bs=4k", "skip=1"],
    ["-U", "--image-opts", "if=driver=qcow2,file.filename=mid.qcow2", "of=o.raw",
     "bs=7k", "count=100"],
    ["--object", "secret,id=s0,data=x", "if=short.qcow2", "of=o.raw"],
    ["if=small/stop.qcow2", "of=o.raw", "bs=512", "skip=2"],
    ["if=top.qcow2", "of=top.raw"],
]
ERRORS = [
    ["if=top.qcow2", "of=o.raw", "bs=0"],
    ["if=top.qcow2", "of=o.raw", "bs=3G"],
    ["if=top.qcow2", "of=o.raw", "bs=1.5k", "count=x"],
    ["if=top.qcow2", "of=o.raw", "skip=-1"],
    ["if=top.qcow2", "of=o.raw", "count=99999999999999999999"],
    ["if=top.qcow2", "of=o.raw", "foo=1"],
    ["if=top.qcow2", "of=o.raw", "foo"],
    ["if=top.qcow2"],
    ["of=o.raw"],
    [],
    ["if=nonexist", "of=o.raw"],
    ["-O", "foo", "if=top.qcow2", "of=o.raw"],
    ["-O", "qcow2", "if=top.qcow2", "of=nodir/o.raw"],
    ["-O", "luks", "if=top.qcow2", "of=o.raw"],
    ["if=top.qcow2", "of=foo:o.raw"],
    ["-f", "vmdk", "if=top.qcow2", "of=o.raw"],
    ["--bogus", "if=top.qcow2", "of=o.raw"],
    ["-O"],
    ["--image-opts", "-f", "raw", "if=top.qcow2", "of=o.raw"],
]


@pytest.fixture(autouse=True)
def _qemu_io(qemu_io):
    """The chains are written with qemu-io."""


def _output(args):
    return next((a[3:] for a in reversed(args) if a.startswith("of=")), None)


@pytest.mark.parametrize("args", COPIES, ids=" ".join)
def test_dd_like_qemu(run_both, args):
    both = run_both(["dd"] + args, make_chains)
    both.assert_same()
    assert both.ref.returncode == 0, both.ref.stderr
    out = _output(args)
    ref, ours = both.ref_dir / out, both.our_dir / out
    if out.endswith(".raw"):
        assert ours.read_bytes() == ref.read_bytes()
    else:
        assert image_state(both.our_dir, out) == image_state(both.ref_dir, out)
        same = subprocess.run(["qemu-img", "compare", str(ref), str(ours)],
                              capture_output=True, text=True)
        assert same.returncode == 0, same.stdout


@pytest.mark.parametrize("args", ERRORS, ids=" ".join)
def test_dd_errors_like_qemu(run_both, args):
    both = run_both(["dd"] + args, make_chains)
    both.assert_same()
    assert both.ref.returncode != 0
    out = _output(args)
    if out is not None:
        assert (both.our_dir / out).exists() == (both.ref_dir / out).exists()
