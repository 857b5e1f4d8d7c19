"""`blockengine img commit` against qemu-img 7.2: the same command lines on copies of
the same backing chains give the same stdout, stderr and exit status, and leave images
with the same content, allocation (host offsets aside: the commit job copies in its
own order), sizes and headers, all passing qemu-img check.  Without -d the committed
image is emptied (into the same bytes as QEMU's); -b commits into a deeper base and keeps
the image.  The -p line is printed while a job runs, so how often it repeats a value
depends on timing (QEMU's too): it is compared as its first and last values."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.interop.backing_chains import (ENCRYPTED_TOP, SECRET, assert_same_content,
                                          assert_same_images, image_state, make_chains,
                                          make_encrypted_chain, make_vmdk_chain)

pytestmark = pytest.mark.interop

COMMITS = [
    ["top.qcow2"],                                 # 2 MiB into a 1 MiB base: it grows
    ["-d", "top.qcow2"],
    ["mid.qcow2"],
    ["short.qcow2"],                               # 512 KiB into a 1 MiB base
    ["-b", "base.qcow2", "top.qcow2"],             # through mid; -b implies -d
    ["-b", "mid.qcow2", "top.qcow2"],
    ["-d", "-b", "base.qcow2", "mid.qcow2"],
    ["small/stop.qcow2"],                          # 4 KiB clusters, sector-sized data
    ["sub/t.qcow2"],
    ["-b", "b.qcow2", "sub/t.qcow2"],              # -b is relative to the overlay
    ["-q", "top.qcow2"],
    ["-f", "qcow2", "-t", "none", "top.qcow2"],
    ["-t", "writethrough", "-r", "100M", "mid.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2"],
    ["--object", "secret,id=s0,data=x", "mid.qcow2"],
    ["-p", "top.qcow2"],
    ["-p", "-b", "base.qcow2", "top.qcow2"],
    ["-q", "-p", "top.qcow2"],
]
ERRORS = [
    ["base.qcow2"],                                # Image does not have a backing file
    ["-p", "base.qcow2"],
    ["plain.raw"],
    ["-f", "raw", "top.qcow2"],
    ["-b", "nothere.qcow2", "top.qcow2"],
    ["-b", "top.qcow2", "top.qcow2"],              # the image itself is not below it
    ["-b", "sub/b.qcow2", "sub/t.qcow2"],          # resolved in sub/: sub/sub/b.qcow2
    ["-p", "-b", "nothere.qcow2", "top.qcow2"],
    ["nonexist.qcow2"],
    ["-r", "-5", "top.qcow2"],
    ["-r", "1x", "top.qcow2"],
    ["-t", "bogus", "top.qcow2"],
    ["top.qcow2", "mid.qcow2"],
    [],
    ["-b"],
    ["--bogus", "top.qcow2"],
    ["--image-opts", "-f", "qcow2", "top.qcow2"],
]

_PROGRESS = re.compile(r"    \((\d+\.\d\d)/100%\)\r")


@pytest.fixture(autouse=True)
def _qemu_io(qemu_io):
    """The chains are written with qemu-io."""


def _progress_outline(stdout: bytes):
    """(first value, last value, every value, the text around the progress line)."""
    text = stdout.decode()
    values = [float(v) for v in _PROGRESS.findall(text)]
    rest = _PROGRESS.sub("", text)
    return (values[:1], values[-1:], values, rest)


def _assert_same_output(both) -> None:
    assert both.ours.stderr.decode() == both.ref.stderr.decode()
    assert both.ours.returncode == both.ref.returncode
    ref_first, ref_last, _, ref_rest = _progress_outline(both.ref.stdout)
    our_first, our_last, values, our_rest = _progress_outline(both.ours.stdout)
    assert (our_first, our_last, our_rest) == (ref_first, ref_last, ref_rest)
    assert values == sorted(values)        # the job only moves forward


@pytest.mark.parametrize("args", COMMITS, ids=" ".join)
def test_commit_like_qemu(run_both, args):
    both = run_both(["commit"] + args, make_chains)
    _assert_same_output(both)
    assert both.ref.returncode == 0, both.ref.stderr
    assert_same_images(both.ref_dir, both.our_dir)
    if not {"-d", "-b", "--image-opts"} & set(args):
        # emptied as QEMU does it (make_completely_empty): the same bytes
        image = args[-1]
        assert (both.our_dir / image).read_bytes() == (both.ref_dir / image).read_bytes()


@pytest.mark.parametrize("args", ERRORS, ids=" ".join)
def test_commit_errors_like_qemu(run_both, args):
    both = run_both(["commit"] + args, make_chains)
    _assert_same_output(both)
    assert both.ref.returncode != 0
    assert_same_images(both.ref_dir, both.our_dir)
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):   # nothing was touched
        assert (both.our_dir / name).read_bytes() == (both.ref_dir / name).read_bytes()


def test_progress_is_printed_while_the_job_runs(run_both):
    both = run_both(["commit", "-p", "top.qcow2"], make_chains)
    _, _, values, rest = _progress_outline(both.ours.stdout)
    assert values[0] == 0.0 and values[-1] == 100.0
    assert rest == "\nImage committed.\n"


@pytest.mark.parametrize("args", [["vtop.vmdk"], ["-d", "vtop.vmdk"]], ids=" ".join)
def test_commit_vmdk(run_both, args):
    """VMDK cannot be emptied (bdrv_make_empty: ENOTSUP, which qemu-img ignores)."""
    both = run_both(["commit"] + args, make_vmdk_chain)
    both.assert_same()
    assert both.ref.returncode == 0
    assert_same_content(both.ref_dir, both.our_dir, "vbase.vmdk")
    check = subprocess.run(["qemu-img", "check", str(both.our_dir / "vbase.vmdk")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_commit_base_in_use_by_another_process(run_both):
    """Another process reading the base (qemu-io -r, which shares no writes): the job
    cannot take the base for writing, and both tools say so with the lock hint."""
    holders = []

    def prepare(d):
        make_chains(d)
        holders.append(subprocess.Popen(["qemu-io", "-r", "-c", "sleep 60000", "mid.qcow2"],
                                        cwd=d, stdout=subprocess.DEVNULL))
        time.sleep(1)          # the holder has the image open and locked

    try:
        both = run_both(["commit", "top.qcow2"], prepare)
    finally:
        for p in holders:
            p.kill()
            p.wait()
    both.assert_same()
    assert both.ref.returncode == 1 and b"lock" in both.ref.stderr
    for name in ("mid.qcow2", "top.qcow2"):
        assert (both.our_dir / name).read_bytes() == (both.ref_dir / name).read_bytes()


def test_commit_encrypted_image(run_both):
    """A LUKS-encrypted qcow2 is emptied the general way (discarding every cluster)."""
    both = run_both(["commit", *SECRET, "--image-opts", ENCRYPTED_TOP],
                    make_encrypted_chain)
    both.assert_same()
    assert both.ref.returncode == 0, both.ref.stderr
    assert (both.our_dir / "eb.qcow2").read_bytes() == (both.ref_dir / "eb.qcow2").read_bytes()
    # (LUKS headers carry random salts: the emptied image is compared by its map)
    assert image_state(both.our_dir, "et.qcow2") == image_state(both.ref_dir, "et.qcow2")
