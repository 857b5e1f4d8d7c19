"""A huge, almost empty qcow2 (8 TiB, a few MiB of data in ranges far apart) and an
overlay of it: map, compare, convert and check walk them with QEMU's answers and
outputs, and the converted images equal the source.  Most of its L1 entries have no L2 table: the walk answers
those slices in bulk (and convert/compare take the holes whole when no progress is
shown), which is what keeps these commands from taking seconds here."""
from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.interop

TiB = 1 << 40
DATA_AT = ["0", "1T", "3T", "4100G", "7T", "8191G"]


def make_huge(d, name="huge.qcow2", backing=None):
    """8 TiB qcow2 with 1 MiB written at each of DATA_AT (by qemu-io)."""
    path = str(d / name)
    args = ["qemu-img", "create", "-q", "-f", "qcow2", path, "8T"]
    if backing:
        args[5:5] = ["-b", backing, "-F", "qcow2"]
    subprocess.run(args, check=True)
    for i, off in enumerate(DATA_AT):
        subprocess.run(["qemu-io", "-c", "write -P %d %s 1M" % (i + 1, off), path],
                       check=True, stdout=subprocess.DEVNULL)


def make_pair(d):
    """huge.qcow2, other.qcow2 (one more sector of data) and top.qcow2 (an overlay of
    huge.qcow2 with data of its own)."""
    make_huge(d)
    make_huge(d, "other.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 99 5T 512", str(d / "other.qcow2")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "huge.qcow2", "-F",
                    "qcow2", str(d / "top.qcow2")], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 42 3T 3M", "-c", "write -z 7T 64k",
                    str(d / "top.qcow2")], check=True, stdout=subprocess.DEVNULL)


QUERIES = [["map", "huge.qcow2"], ["map", "--output=json", "huge.qcow2"],
           ["map", "--start-offset=2T", "--max-length=3T", "--output=json", "huge.qcow2"],
           ["check", "huge.qcow2"], ["compare", "huge.qcow2", "huge.qcow2"],
           ["compare", "huge.qcow2", "other.qcow2"], ["compare", "-s", "huge.qcow2",
                                                      "other.qcow2"],
           ["compare", "-p", "huge.qcow2", "huge.qcow2"],
           ["map", "top.qcow2"], ["map", "--output=json", "top.qcow2"],
           ["compare", "top.qcow2", "huge.qcow2"], ["compare", "top.qcow2", "top.qcow2"]]


@pytest.mark.parametrize("query", QUERIES, ids=" ".join)
def test_queries(run_both, query):
    run_both(query, make_pair).assert_same()


# (never -S 0 here: both tools would write 8 TiB of zeroes)
@pytest.mark.parametrize("args", [["-O", "qcow2"], ["-O", "raw"], ["-p", "-O", "qcow2"],
                                  ["-O", "qcow2", "-o", "cluster_size=2M"]],
                         ids=" ".join)
def test_convert(run_both, args):
    out = "out." + args[args.index("-O") + 1]
    both = run_both(["convert", *args, "top.qcow2", out], make_pair)
    both.assert_same()
    for d in (both.ref_dir, both.our_dir):
        res = subprocess.run(["qemu-img", "compare", "top.qcow2", out], cwd=d,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    ref_map = subprocess.run(["qemu-img", "map", "--output=json", out], cwd=both.ref_dir,
                             capture_output=True, check=True).stdout
    our_map = subprocess.run(["qemu-img", "map", "--output=json", out], cwd=both.our_dir,
                             capture_output=True, check=True).stdout
    assert our_map == ref_map
