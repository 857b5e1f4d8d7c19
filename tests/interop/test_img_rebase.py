"""`blockengine img rebase` against qemu-img 7.2: the same command lines on copies of
the same backing chains give the same stdout (progress included), stderr and exit
status, and leave the same images behind (content, allocation, headers, clean check;
rebase writes the same bytes, so the files are compared byte for byte too)."""
from __future__ import annotations

import subprocess

import pytest

from tests.interop.backing_chains import (ENCRYPTED_TOP, QCOW2_IMAGES, SECRET,
                                          assert_same_content, assert_same_images,
                                          make_chains, make_encrypted_chain,
                                          make_vmdk_chain)

pytestmark = pytest.mark.interop

# safe rebases that copy data: onto a deeper image of the chain, onto nothing, onto an
# unrelated image (larger and smaller than the overlay), with sector-granular
# differences (4 KiB clusters), and relative names resolved from the overlay's directory
SAFE = [
    ["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "", "top.qcow2"],
    ["-b", "", "mid.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "mid.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "short.qcow2"],
    ["-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],            # the current backing
    ["-b", "base.qcow2", "-F", "qcow2", "short.qcow2"],
    ["-b", "", "small/stop.qcow2"],
    ["-b", "../other.qcow2", "-F", "qcow2", "sub/t.qcow2"],
    ["-b", "../base.qcow2", "-F", "qcow2", "small/stop.qcow2"],
    ["-p", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-p", "-b", "", "top.qcow2"],
    ["-q", "-p", "-b", "", "top.qcow2"],
    ["-f", "qcow2", "-t", "none", "-T", "writethrough", "-b", "", "top.qcow2"],
    ["-U", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
    ["--image-opts", "-b", "", "driver=qcow2,file.filename=top.qcow2"],
    ["--object", "secret,id=s0,data=x", "-b", "", "top.qcow2"],
    ["-b", "other.qcow2", "-F", "raw", "-f", "qcow2", "top.qcow2"],  # its bytes as raw
]
# header-only rebases
UNSAFE = [
    ["-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "renamed.qcow2", "-F", "qcow2", "top.qcow2"],   # need not exist
    ["-u", "-b", "", "top.qcow2"],
    ["-u", "top.qcow2"],
    ["-u", "-F", "qcow2", "top.qcow2"],
    ["-p", "-u", "-b", "other.qcow2", "-F", "raw", "mid.qcow2"],
    ["-u", "-b", "b.qcow2", "-F", "qcow2", "sub/t.qcow2"],
]
ERRORS = [
    ["-b", "base.qcow2", "top.qcow2"],           # backing format must be specified
    ["-u", "-b", "base.qcow2", "top.qcow2"],
    ["-p", "-b", "base.qcow2", "top.qcow2"],
    ["-b", "nonexist.qcow2", "top.qcow2"],
    ["-b", "nonexist.qcow2", "-F", "qcow2", "sub/t.qcow2"],
    ["-b", "other.qcow2", "-F", "qcow2", "sub/t.qcow2"],    # relative to sub/
    ["-b", "x", "-F", "foo", "top.qcow2"],
    ["-p", "-b", "x", "-F", "foo", "top.qcow2"],
    ["-b", "", "plain.raw"],
    ["-f", "raw", "-u", "-b", "base.qcow2", "-F", "qcow2", "plain.raw"],
    ["-b", "", "nonexist.qcow2"],
    ["-t", "bogus", "-b", "", "top.qcow2"],
    ["-T", "bogus", "-b", "", "top.qcow2"],
    ["-p", "-T", "bogus", "-b", "", "top.qcow2"],
    ["top.qcow2"],                                 # neither -b nor -u
    ["-b", "x"],
    ["-b", "x", "top.qcow2", "mid.qcow2"],
    ["-b"],
    ["--bogus", "top.qcow2"],
    ["-f", "raw", "-b", "", "top.qcow2"],
    ["--image-opts", "-f", "qcow2", "-b", "", "top.qcow2"],
    ["-b", "top.qcow2", "-F", "qcow2", "top.qcow2"],   # its own write lock, with the hint
    ["-p", "-b", "mid.qcow2", "-F", "qcow2", "sub/t.qcow2"],
]


@pytest.fixture(autouse=True)
def _qemu_io(qemu_io):
    """The chains are written with qemu-io."""


def _run(run_both, args):
    both = run_both(["rebase"] + args, make_chains)
    both.assert_same()
    return both


@pytest.mark.parametrize("args", SAFE + UNSAFE, ids=" ".join)
def test_rebase_like_qemu(run_both, args):
    both = _run(run_both, args)
    assert both.ref.returncode == 0, both.ref.stderr
    assert_same_images(both.ref_dir, both.our_dir)
    for name in QCOW2_IMAGES:
        assert (both.our_dir / name).read_bytes() == (both.ref_dir / name).read_bytes(), name


@pytest.mark.parametrize("args", ERRORS, ids=" ".join)
def test_rebase_errors_like_qemu(run_both, args):
    both = _run(run_both, args)
    assert both.ref.returncode != 0
    # a failed rebase may already have copied data (QEMU does too), never lost any
    assert_same_images(both.ref_dir, both.our_dir)


def test_safe_rebase_keeps_guest_view(run_both, tmp_path):
    """What the overlay shows before the rebase is what it shows after (checked with
    qemu-img against an untouched copy), in the deepest case: three layers folded
    onto an unrelated, differently sized image."""
    both = _run(run_both, ["-b", "other.qcow2", "-F", "qcow2", "top.qcow2"])
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    make_chains(pristine)
    res = subprocess.run(["qemu-img", "compare", str(pristine / "top.qcow2"),
                          str(both.our_dir / "top.qcow2")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("args", [["-u", "-b", "x.vmdk", "-F", "vmdk", "vtop.vmdk"],
                                  ["-b", "", "vtop.vmdk"]], ids=" ".join)
def test_rebase_vmdk_cannot_change_backing(run_both, args):
    """VMDK has backing files but QEMU cannot rewrite them: the safe rebase copies,
    then fails on the header, exactly as qemu-img does."""
    both = run_both(["rebase"] + args, make_vmdk_chain)
    both.assert_same()
    assert both.ref.returncode == 1
    assert_same_content(both.ref_dir, both.our_dir, "vtop.vmdk")


def _make_multi_chunk_chain(d):
    """9 MiB over 7 MiB: several of qemu-img's 2 MiB chunks, the last one partial."""
    for args in (["create", "-q", "-f", "qcow2", "b.qcow2", "7M"],
                 ["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
                  "9M"]):
        subprocess.run(["qemu-img"] + args, cwd=d, check=True)
    for name, cmds in (("b.qcow2", ["write -P 1 0 3M", "write -P 2 5M 1M"]),
                       ("t.qcow2", ["write -P 3 1M 64k", "write -P 4 4M 2M"])):
        argv = ["qemu-io", "-f", "qcow2"]
        for c in cmds:
            argv += ["-c", c]
        subprocess.run(argv + [name], cwd=d, check=True, capture_output=True)


@pytest.mark.parametrize("args", [["-p", "-b", "", "t.qcow2"],
                                  ["-p", "-u", "-b", "", "t.qcow2"]], ids=" ".join)
def test_rebase_progress_over_several_chunks(run_both, args):
    """The -p line steps by 100 / (size / 2 MiB) per chunk handled, as QEMU's does."""
    both = run_both(["rebase"] + args, _make_multi_chunk_chain)
    both.assert_same()
    assert both.ours.stdout.count(b"\r") == (2 if "-u" in args else 7)
    assert (both.our_dir / "t.qcow2").read_bytes() == (both.ref_dir / "t.qcow2").read_bytes()


def test_rebase_encrypted_image(run_both):
    both = run_both(["rebase", *SECRET, "--image-opts", "-b", "", ENCRYPTED_TOP],
                    make_encrypted_chain)
    both.assert_same()
    assert both.ref.returncode == 0, both.ref.stderr
    res = subprocess.run(["qemu-img", "compare", *SECRET, "--image-opts",
                          ENCRYPTED_TOP.replace("et.qcow2", str(both.ref_dir / "et.qcow2")),
                          ENCRYPTED_TOP.replace("et.qcow2", str(both.our_dir / "et.qcow2"))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
