"""Backing chains for the rebase/commit/dd interop tests, written by the reference tools.

``make_chains(d)`` fills a work directory with the same images on both sides of a
``run_both`` comparison (qemu-img creates them, qemu-io writes the data, so nothing of
blockengine is trusted to build its own test input).  Layout, with data at every
layer, zero clusters over data, and layers of different sizes:

    base.qcow2   1 MiB   P1 @0 64k, P2 @512k 64k, P6 @960k 64k (up to its end)
    mid.qcow2    1 MiB   -> base;  P3 @64k 64k, zeroes @512k 64k, P7 @900k 8k
    top.qcow2    2 MiB   -> mid;   P4 @128k 64k, P5 @1536k 64k, 512 bytes P8 @70000
    other.qcow2  1.5 MiB (no backing)  P9 @0 1M: a different base to rebase onto
    short.qcow2  512 KiB -> base;  P10 @4k 4k (a layer shorter than its backing)
    small/       4 KiB clusters: sbase.qcow2 <- stop.qcow2, sector-sized writes
    sub/         a chain named relatively in a subdirectory: sub/b.qcow2 <- sub/t.qcow2
    plain.raw    1 MiB raw with data (no backing support)

``assert_same_images`` checks what a command left on disk on both sides: the same
guest-visible content (qemu-img compare through each side's chain), the same
allocation (map without host offsets), the same backing file fields, and a clean
qemu-img check (clean unless, on both sides, the image cannot be opened).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

QCOW2_IMAGES = ["base.qcow2", "mid.qcow2", "top.qcow2", "other.qcow2", "short.qcow2",
                "small/sbase.qcow2", "small/stop.qcow2", "sub/b.qcow2", "sub/t.qcow2"]


def _run(*argv, cwd) -> str:
    return subprocess.run(list(argv), cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def _create(d, name, size, backing=None, cluster_size=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    if cluster_size:
        args += ["-o", "cluster_size=%d" % cluster_size]
    _run(*args, name, str(size), cwd=d)


def _io(d, name, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    _run(*args, name, cwd=d)


def make_chains(d: Path) -> None:
    (d / "small").mkdir()
    (d / "sub").mkdir()
    _create(d, "base.qcow2", "1M")
    _io(d, "base.qcow2", "write -P 1 0 64k", "write -P 2 512k 64k", "write -P 6 960k 64k")
    _create(d, "mid.qcow2", "1M", "base.qcow2")
    _io(d, "mid.qcow2", "write -P 3 64k 64k", "write -z 512k 64k", "write -P 7 900k 8k")
    _create(d, "top.qcow2", "2M", "mid.qcow2")
    _io(d, "top.qcow2", "write -P 4 128k 64k", "write -P 5 1536k 64k",
        "write -P 8 70000 512")
    _create(d, "other.qcow2", "1536K")
    _io(d, "other.qcow2", "write -P 9 0 1M")
    _create(d, "short.qcow2", "512K", "base.qcow2")
    _io(d, "short.qcow2", "write -P 10 4k 4k")
    _create(d, "small/sbase.qcow2", "256K", cluster_size=4096)
    _io(d, "small/sbase.qcow2", "write -P 11 0 64k", "write -P 12 100k 3k")
    _create(d, "small/stop.qcow2", "256K", "sbase.qcow2", cluster_size=4096)
    _io(d, "small/stop.qcow2", "write -P 13 1024 512", "write -z 100k 512",
        "write -P 14 200k 4k")
    _create(d, "sub/b.qcow2", "1M")
    _io(d, "sub/b.qcow2", "write -P 15 0 256k")
    _create(d, "sub/t.qcow2", "1M", "b.qcow2")
    _io(d, "sub/t.qcow2", "write -P 16 128k 64k")
    with open(d / "plain.raw", "wb") as f:
        f.truncate(1 << 20)
        f.seek(4096)
        f.write(b"\x17" * 8192)


def _without_offsets(extents: list) -> list:
    """The map's guest view: host offsets dropped, then neighbours that only differed
    by being discontiguous in the file merged."""
    out: list = []
    for e in extents:
        e.pop("offset", None)
        last = out[-1] if out else None
        if last and all(last[k] == e[k] for k in ("depth", "present", "zero", "data")):
            last["length"] += e["length"]
        else:
            out.append(e)
    return out


def image_state(d: Path, name: str) -> dict:
    """What a command may change, without host offsets (allocation may differ there)."""
    info = json.loads(_run("qemu-img", "info", "-U", "--output=json", name, cwd=d))
    res = subprocess.run(["qemu-img", "map", "-U", "--output=json", name], cwd=d,
                         capture_output=True, text=True)
    extents = _without_offsets(json.loads(res.stdout)) if res.returncode == 0 else res.stderr
    return {"virtual-size": info["virtual-size"],
            "backing": (info.get("backing-filename"), info.get("backing-filename-format")),
            "dirty": info.get("dirty-flag"), "map": extents}


def assert_same_images(ref_dir: Path, our_dir: Path, names=None) -> None:
    for name in names or QCOW2_IMAGES:
        assert image_state(our_dir, name) == image_state(ref_dir, name), name
        same = subprocess.run(["qemu-img", "compare", "-U", str(ref_dir / name),
                               str(our_dir / name)], capture_output=True, text=True)
        # 2: the backing file is gone on both sides (a header-only rebase to a new name)
        assert same.returncode in (0, 2), (name, same.stdout, same.stderr)
        ref_check, our_check = (subprocess.run(["qemu-img", "check", "-U", "--output=json",
                                                name], cwd=d, capture_output=True, text=True)
                                for d in (ref_dir, our_dir))
        # clean, or unopenable on both sides (a backing file renamed by the command)
        assert our_check.returncode == ref_check.returncode in (0, 1), (name,
                                                                        our_check.stdout)
        if our_check.returncode == 0:
            problems = [k for k in ("corruptions", "leaks", "check-errors")
                        if json.loads(our_check.stdout).get(k)]
            assert not problems, (name, our_check.stdout)


def make_vmdk_chain(d: Path) -> None:
    """vbase.vmdk (1 MiB, P1 @0 64k) <- vtop.vmdk (P2 @64k 64k): a format that has
    backing files but cannot rewrite them (no change_backing_file) nor empty itself."""
    _run("qemu-img", "create", "-q", "-f", "vmdk", "vbase.vmdk", "1M", cwd=d)
    _run("qemu-io", "-f", "vmdk", "-c", "write -P 1 0 64k", "vbase.vmdk", cwd=d)
    _run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "vbase.vmdk", "-F", "vmdk",
         "vtop.vmdk", cwd=d)
    _run("qemu-io", "-f", "vmdk", "-c", "write -P 2 64k 64k", "vtop.vmdk", cwd=d)


def assert_same_content(ref_dir: Path, our_dir: Path, name: str) -> None:
    """qemu-img compare of one image on both sides (through each side's chain)."""
    same = subprocess.run(["qemu-img", "compare", "-U", str(ref_dir / name),
                           str(our_dir / name)], capture_output=True, text=True)
    assert same.returncode == 0, (name, same.stdout, same.stderr)


SECRET = ["--object", "secret,id=s0,data=pw"]
ENCRYPTED_TOP = "driver=qcow2,encrypt.key-secret=s0,file.filename=et.qcow2"


def make_encrypted_chain(d: Path) -> None:
    """eb.qcow2 (plain, P1 @0 256k) <- et.qcow2 (LUKS-encrypted, P2 @64k 64k), opened
    as ENCRYPTED_TOP with the SECRET object."""
    _run("qemu-img", "create", "-q", "-f", "qcow2", "eb.qcow2", "1M", cwd=d)
    _run("qemu-io", "-c", "write -P 1 0 256k", "eb.qcow2", cwd=d)
    for _ in range(10):
        # QEMU 7.2's PBKDF2 benchmark sometimes fails ("Unable to get accurate CPU
        # usage", a 0 ms CPU-time sample): retry that, as test_luks_interop does
        res = subprocess.run(["qemu-img", "create", "-q", *SECRET, "-f", "qcow2", "-o",
                              "encrypt.format=luks,encrypt.key-secret=s0", "-b", "eb.qcow2",
                              "-F", "qcow2", "et.qcow2"], cwd=d, capture_output=True,
                             text=True)
        if res.returncode == 0:
            break
        assert "Unable to get accurate CPU usage" in res.stderr, res.stderr
    else:
        raise AssertionError("qemu-img create kept failing")
    _run("qemu-io", *SECRET, "--image-opts", "-c", "write -P 2 64k 64k", ENCRYPTED_TOP,
         cwd=d)
