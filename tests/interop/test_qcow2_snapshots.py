"""qcow2 internal snapshots (`img snapshot -l/-c/-a/-d`) against the real qemu-img.

* The same command sequences run through qemu-img and blockengine on identical
  copies: stdout, stderr and exit status are byte-identical, and so are the images
  after every step (the snapshot dates, which come from the clock, are set to the
  same values on both sides first); `qemu-img check` finds no error and no leak.
* Snapshots made by one tool are applied and deleted by the other; qemu-io and
  blockengine's io read the reverted data.
* Random write/create/apply/delete sequences run through the library against a
  model of every snapshot's contents (hypothesis, bounded).
* A simulated host crash at every write of create, apply and delete leaves an image
  whose only damage is leaked references (`qemu-img check -r leaks` makes it clean),
  with the active data and every listed snapshot intact.
"""
from __future__ import annotations

import json
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blockengine.errors import BlockError
from blockengine.graph.graph import Graph
from tests.conftest import _run
from tests.interop.test_qcow2_crash import close_crashed
from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

SN_HEADER = struct.Struct(">QIHHIIQII")
DATE_SEC = 1700000000


# ---- helpers -------------------------------------------------------------------------------
def snapshot_entries(path) -> list[tuple[int, int, int]]:
    """(entry offset, id size, name size) of every snapshot table entry."""
    with open(path, "rb") as f:
        f.seek(60)
        nb, pos = struct.unpack(">IQ", f.read(12))
        out = []
        for _ in range(nb):
            f.seek(pos)
            (_, _, id_size, name_size, _, _, _, _, extra) = SN_HEADER.unpack(
                f.read(SN_HEADER.size))
            out.append((pos, id_size, name_size))
            pos = (pos + SN_HEADER.size + extra + id_size + name_size + 7) & ~7
    return out


def pin_dates(path) -> None:
    """Give snapshot i the date DATE_SEC + i (both tools then write equal bytes)."""
    with open(path, "r+b") as f:
        for i, (pos, _, _) in enumerate(snapshot_entries(path)):
            f.seek(pos + 16)
            f.write(struct.pack(">II", DATE_SEC + i, 0))


def qemu_check(path) -> dict:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                       capture_output=True, text=True)
    assert r.returncode in (0, 3), (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def assert_clean(path) -> None:
    info = qemu_check(path)
    for key in ("corruptions", "leaks", "check-errors"):
        assert info.get(key, 0) == 0, info


def qemu_io(path, *cmds, tool="qemu-io") -> subprocess.CompletedProcess:
    argv = [tool, "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(argv + [str(path)], capture_output=True, text=True)


def assert_pattern(path, pattern: dict, tool="qemu-io") -> None:
    """pattern: {(offset, length): byte} must read back with `read -P`."""
    cmds = ["read -P %d %d %d" % (v, off, n) for (off, n), v in pattern.items()]
    r = qemu_io(path, *cmds, tool=tool)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


@pytest.fixture
def image(tmp_path):
    """image(name, opts='', size='16M', writes=()) -> path of a qemu-img made image."""
    require_tool("qemu-img")
    require_tool("qemu-io")

    def make(name, opts="", size="16M", writes=()):
        p = tmp_path / name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"]
                       + (["-o", opts] if opts else []) + [str(p), size], check=True)
        if writes:
            r = qemu_io(p, *writes)
            assert r.returncode == 0, r.stderr
        return p
    return make


# ---- the CLI, step by step, against qemu-img ---------------------------------------------------
WRITES_A = ["write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -c -P 0x66 4M 64k",
            "write -z 8M 64k"]
WRITES_B = ["write -P 0x33 0 64k", "write -P 0x44 2M 8k", "discard 1M 64k"]

_OPERAND = "img.qcow2"
# ("img", args...) runs through both tools with the image as last operand, ("argv", ...)
# exactly as given; ("io", cmds...) writes with qemu-io on both sides
SEQUENCES = {
    "create_apply_delete": [
        ("img", "snapshot", "-c", "s1"), ("img", "snapshot", "-l"), ("io", *WRITES_B),
        ("img", "snapshot", "-c", "s2"), ("img", "snapshot", "-a", "s1"),
        ("img", "snapshot", "-l"), ("img", "snapshot", "-d", "s2"),
        ("img", "snapshot", "-a", "1"), ("img", "snapshot", "-d", "s1"),
        ("img", "snapshot", "-l")],
    "same_names_and_ids": [
        ("img", "snapshot", "-c", "x"), ("img", "snapshot", "-c", "x"),
        ("img", "snapshot", "-c", "2"), ("img", "snapshot", "-d", "2"),
        ("img", "snapshot", "-c", "3"), ("img", "snapshot", "-l"),
        ("img", "snapshot", "-a", "x"), ("img", "snapshot", "-d", "x"),
        ("img", "snapshot", "-l"), ("img", "info"), ("img", "info", "--output=json")],
    "errors": [
        ("img", "snapshot", "-a", "nope"), ("img", "snapshot", "-d", "nope"),
        ("img", "snapshot", "-l", "-c", "x"), ("argv", "snapshot", "-c"),
        ("img", "snapshot", "-x"), ("img", "snapshot", "-f", "qcow2", "-l"),
        ("argv", "snapshot", "-l", "missing.qcow2"), ("argv", "snapshot"),
        ("img", "snapshot", "-q", "-c", "q1"), ("img", "snapshot", "-U", "-l"),
        ("argv", "snapshot", "--image-opts", "-l", "driver=qcow2,file.filename=img.qcow2"),
        ("img", "snapshot", "-a", "q1"), ("img", "snapshot", "-d", "1"),
        ("img", "snapshot"), ("img", "snapshot", "-l", "-l")],
    "resize": [
        ("img", "snapshot", "-c", "s1"), ("argv", "resize", _OPERAND, "32M"),
        ("io", "write -P 0x22 12M 1M"), ("img", "snapshot", "-c", "s2"),
        ("argv", "resize", "--shrink", _OPERAND, "8M"), ("img", "snapshot", "-a", "s1"),
        ("img", "info"), ("img", "snapshot", "-a", "s2"), ("img", "info"),
        ("img", "snapshot", "-d", "s1")],
    "write_after_snapshot": [
        ("img", "snapshot", "-c", "base"), ("io", *WRITES_B),
        ("img", "snapshot", "-c", "second"), ("io", "write -P 0x77 0 192k"),
        ("img", "snapshot", "-d", "base"), ("io", "write -P 0x78 64k 64k"),
        ("img", "snapshot", "-a", "second"), ("img", "snapshot", "-d", "second")],
}
IMAGE_KINDS = {
    "default": "",
    "small_clusters": "cluster_size=4096",
    "refcount_bits_2": "cluster_size=4096,refcount_bits=2",
    "extended_l2": "extended_l2=on",
    "v2": "compat=0.10",
    "lazy": "lazy_refcounts=on",
}
def _argv(step):
    return list(step[1:]) + ([_OPERAND] if step[0] == "img" else [])


def run_sequence(steps, ref_dir, our_dir, be_img):
    failed = False
    for step in steps:
        if step[0] == "io":
            for d in (ref_dir, our_dir):
                assert qemu_io(d / _OPERAND, *step[1:]).returncode == 0
        else:
            args = _argv(step)
            ref = _run(["qemu-img", *args], ref_dir)
            ours = be_img(*args, cwd=our_dir)
            assert ours.stderr.decode() == ref.stderr.decode(), args
            assert ours.stdout.decode() == ref.stdout.decode(), args
            assert ours.returncode == ref.returncode, args
            failed |= ref.returncode != 0 and "-c" in args
            if "-c" in args:
                # new snapshots carry the wall clock: equalise before comparing bytes
                for d in (ref_dir, our_dir):
                    pin_dates(d / _OPERAND)
        assert (ref_dir / _OPERAND).read_bytes() == (our_dir / _OPERAND).read_bytes(), step
        if not failed:
            # (a failed create may leave leaks and stale flags, exactly as QEMU's (the
            # bytes are equal): with refcount_bits=2 a compressed cluster overflows)
            assert_clean(our_dir / _OPERAND)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
@pytest.mark.parametrize("seq", SEQUENCES)
def test_snapshot_cli_matches_qemu(tmp_path, image, be_img, seq, kind):
    if seq == "errors" and kind != "default":
        pytest.skip("the error paths do not depend on the image layout")
    src = image("src.qcow2", IMAGE_KINDS[kind], writes=WRITES_A)
    ref_dir, our_dir = tmp_path / "ref", tmp_path / "ours"
    for d in (ref_dir, our_dir):
        d.mkdir()
        copy_sparse(src, d / _OPERAND)
    run_sequence(SEQUENCES[seq], ref_dir, our_dir, be_img)


@pytest.mark.parametrize("case", ["raw_probed", "raw_explicit", "data_file", "bitmap",
                                  "v2_resized"])
def test_snapshot_unsupported_cases(tmp_path, be_img, case):
    """Images whose snapshots QEMU refuses: the same messages and untouched files."""
    require_tool("qemu-img")
    steps = {
        "raw_probed": ([], ["-l", "-c x", "-a x", "-d x"]),
        "raw_explicit": ([], ["-l", "-c x", "-a x", "-d x"]),
        "data_file": (["-o", "data_file=img.data"], ["-c x", "-a x", "-d x", "-l"]),
        "bitmap": ([], ["-c x", "-a x", "-l", "-d x", "-l"]),
        "v2_resized": (["-o", "compat=0.10"], ["-c x", "-a x", "-l"]),
    }[case]
    dirs = []
    for side in ("ref", "ours"):
        d = tmp_path / side
        d.mkdir()
        fmt = "raw" if case.startswith("raw") else "qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *steps[0], "img.img", "1M"],
                       cwd=d, check=True)
        if case == "bitmap":
            subprocess.run(["qemu-img", "bitmap", "--add", "img.img", "b0"], cwd=d,
                           check=True)
        dirs.append(d)
    operand = (["--image-opts", "driver=raw,file.filename=img.img"]
               if case == "raw_explicit" else ["img.img"])
    for step in steps[1]:
        args = ["snapshot", *step.split(), *operand]
        ref = _run(["qemu-img", *args], dirs[0])
        ours = be_img(*args, cwd=dirs[1])
        assert (ours.stderr.decode(), ours.stdout.decode(), ours.returncode) == \
            (ref.stderr.decode(), ref.stdout.decode(), ref.returncode), args
        if case == "v2_resized" and step == "-c x":
            for d in dirs:
                # QEMU refuses to resize a v2 image with snapshots: grow it by hand
                subprocess.run(["qemu-img", "resize", "img.img", "2M"], cwd=d,
                               capture_output=True)
        if "-c" in step:
            for d in dirs:
                if fmt == "qcow2":
                    pin_dates(d / "img.img")
        assert (dirs[0] / "img.img").read_bytes() == (dirs[1] / "img.img").read_bytes()


# ---- across the tools ------------------------------------------------------------------------------
@pytest.mark.parametrize("creator,user", [("ours", "qemu"), ("qemu", "ours")])
def test_snapshots_across_tools(tmp_path, image, be_img, be_bindir, creator, user):
    """Snapshots made by one tool, applied/deleted by the other; both io tools read."""
    p = image("x.qcow2", "cluster_size=4096", writes=WRITES_A)

    def img(tool, *args):
        r = (_run(["qemu-img", *args, p]) if tool == "qemu" else be_img(*args, str(p)))
        assert r.returncode == 0, r.stderr
        return r

    img(creator, "snapshot", "-c", "first")
    assert qemu_io(p, *WRITES_B).returncode == 0
    img(creator, "snapshot", "-c", "second")
    assert qemu_io(p, "write -P 0x99 0 256k").returncode == 0
    assert_clean(p)
    listing = {tool: (_run(["qemu-img", "snapshot", "-l", p]) if tool == "qemu"
                      else be_img("snapshot", "-l", str(p))).stdout for tool in ("qemu", "ours")}
    assert listing["qemu"] == listing["ours"] and b"second" in listing["qemu"]

    img(user, "snapshot", "-a", "first")
    assert_clean(p)
    first = {(0, 128 << 10): 0x11, (1 << 20, 64 << 10): 0x22, (4 << 20, 64 << 10): 0x66,
             (8 << 20, 64 << 10): 0, (2 << 20, 8 << 10): 0}
    for tool in ("qemu-io", str(be_bindir / "qemu-io")):
        assert_pattern(p, first, tool)
    img(user, "snapshot", "-a", "second")
    second = {(0, 64 << 10): 0x33, (64 << 10, 64 << 10): 0x11, (2 << 20, 8 << 10): 0x44,
              (1 << 20, 64 << 10): 0, (4 << 20, 64 << 10): 0x66}
    for tool in ("qemu-io", str(be_bindir / "qemu-io")):
        assert_pattern(p, second, tool)
    img(user, "snapshot", "-d", "first")
    assert_clean(p)
    assert_pattern(p, second)
    img(creator, "snapshot", "-d", "second")
    assert_clean(p)
    assert_pattern(p, second)
    assert qemu_check(p)["allocated-clusters"] > 0


# ---- random sequences against a model ----------------------------------------------------------------
BLOCK = 4096
NBLOCKS = 64
OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, NBLOCKS - 1), st.integers(1, 9),
              st.integers(1, 255)),
    st.tuples(st.just("zero"), st.integers(0, NBLOCKS - 1), st.integers(1, 9), st.just(0)),
    st.tuples(st.just("create"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("apply"), st.integers(0, 7), st.just(0), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 7), st.just(0), st.just(0)),
), min_size=1, max_size=14)


def _open(path):
    g = Graph()
    node = g.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}})
    return g, node


def _read_all(node) -> list[int]:
    data = node.pread(0, NBLOCKS * BLOCK)
    return [data[i * BLOCK] for i in range(NBLOCKS)]


@pytest.mark.parametrize("opts", ["cluster_size=4096", "cluster_size=4096,refcount_bits=1",
                                  "cluster_size=16384,extended_l2=on"])
def test_random_sequences_against_model(tmp_path, image, opts):
    """refcount_bits=1 makes every second reference fail (EINVAL), as in QEMU."""
    src = image("model.qcow2", opts, size=str(NBLOCKS * BLOCK))
    path = tmp_path / "work.qcow2"

    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(OPS)
    def run(ops):
        copy_sparse(src, path)
        active = [0] * NBLOCKS
        snaps: list[tuple[str, list[int]]] = []     # (name, contents)
        g, node = _open(path)
        drv = node.drv
        try:
            for n, (kind, a, b, fill) in enumerate(ops):
                end = min(NBLOCKS, a + b)
                if kind == "write":
                    node.pwrite(a * BLOCK, bytes([fill]) * ((end - a) * BLOCK))
                    active[a:end] = [fill] * (end - a)
                elif kind == "zero":
                    node.pwrite_zeroes(a * BLOCK, (end - a) * BLOCK, True)
                    active[a:end] = [0] * (end - a)
                elif kind == "create":
                    name = "s%d" % n
                    try:
                        drv.snapshot_create(name, DATE_SEC, 0)
                    except BlockError:
                        assert "refcount_bits=1" in opts
                        continue
                    snaps.append((name, list(active)))
                elif snaps and kind == "apply":
                    name, contents = snaps[a % len(snaps)]
                    try:
                        drv.snapshot_goto(name)
                    except BlockError:
                        assert "refcount_bits=1" in opts
                        continue
                    active = list(contents)
                elif snaps and kind == "delete":
                    name, _ = snaps.pop(a % len(snaps))
                    drv.snapshot_delete(None, name)
                assert _read_all(node) == active, (n, kind)
            assert [sn.name for sn in drv.snapshots] == [name for name, _ in snaps]
        finally:
            g.close_all()
        info = qemu_check(path)
        assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, info
        if "refcount_bits=1" not in opts:
            assert info.get("leaks", 0) == 0, info
        # every snapshot reads back through qemu-img's own apply
        for name, contents in snaps:
            copy = tmp_path / "apply.qcow2"
            copy_sparse(path, copy)
            subprocess.run(["qemu-img", "snapshot", "-a", name, str(copy)], check=True)
            g2 = Graph()
            n2 = g2.open_node({"driver": "qcow2", "read-only": True,
                               "file": {"driver": "file", "filename": str(copy)}})
            try:
                assert _read_all(n2) == contents, name
            finally:
                g2.close_all()
    run()


# ---- crash consistency -------------------------------------------------------------------------------
def _crash_run(path, op, crash_after, mode, seed):
    """Run one snapshot operation through crash-inject; returns the writes it made."""
    g = Graph()
    node = g.open_node({"driver": "qcow2", "file": {
        "driver": "crash-inject", "crash-after": crash_after, "mode": mode, "seed": seed,
        "file": {"driver": "file", "filename": str(path)}}})
    filt = node.file_child_node().drv
    try:
        kind, name = op
        if kind == "create":
            node.drv.snapshot_create(name, DATE_SEC, 0)
        elif kind == "apply":
            node.drv.snapshot_goto(name)
        else:
            node.drv.snapshot_delete(None, name)
    except BlockError:
        assert filt.crashed
    return close_crashed(g, filt)


def _contents(path, snapshot=None) -> bytes:
    """Guest data of the image (or of one snapshot, applied by qemu-img on a copy)."""
    src = path
    if snapshot is not None:
        src = path.with_suffix(".applied")
        copy_sparse(path, src)
        subprocess.run(["qemu-img", "snapshot", "-a", snapshot, str(src)], check=True,
                       capture_output=True)
    out = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(out)],
                   capture_output=True, check=True)
    return out.read_bytes()


@pytest.mark.parametrize("op", [("create", "s3"), ("delete", "s1"), ("delete", "s2"),
                                ("apply", "s1")])
@pytest.mark.parametrize("mode", ["drop", "random", "keep"])
def test_crash_at_every_write(tmp_path, image, op, mode):
    base = image("base.qcow2", "cluster_size=4096", size="1M",
                 writes=["write -P 0x11 0 64k", "write -P 0x22 512k 16k"])
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(base)], check=True)
    assert qemu_io(base, "write -P 0x33 0 8k", "write -P 0x44 768k 4k").returncode == 0
    subprocess.run(["qemu-img", "snapshot", "-c", "s2", str(base)], check=True)
    assert qemu_io(base, "write -P 0x55 4k 4k").returncode == 0
    names = ["s1", "s2"]
    expected = {None: _contents(base), "s1": _contents(base, "s1"),
                "s2": _contents(base, "s2")}
    total = _crash_run(copy_sparse(base, tmp_path / "probe.qcow2"), op, -1, mode, 0)
    assert total > 3
    for n in range(1, total + 1):
        img = copy_sparse(base, tmp_path / ("crash%d.qcow2" % n))
        _crash_run(img, op, n, mode, n)
        # QEMU's order leaves refcounts ahead of OFLAG_COPIED for a moment: create
        # raises them (flushed) before the flags are cleared, apply and delete drop
        # them before the flags are set again.  check calls either a corruption, but
        # the extra references are leaks (the snapshot table does not name them yet,
        # or any more), so repairing only leaks must leave a clean image.
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert all("OFLAG_COPIED" in line for line in r.stderr.splitlines()
                   if line.startswith("ERROR")), (n, r.stderr)
        subprocess.run(["qemu-img", "check", "-q", "-r", "leaks", str(img)],
                       capture_output=True)
        info = qemu_check(img)
        for key in ("corruptions", "leaks", "check-errors"):
            assert info.get(key, 0) == 0, (n, info)
        listed = [e["name"] for e in json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(img)], capture_output=True,
            check=True).stdout).get("snapshots", [])]
        if op[0] == "create":
            assert listed in (names, names + [op[1]]), listed
        elif op[0] == "delete":
            assert listed in (names, [x for x in names if x != op[1]]), listed
        else:
            assert listed == names
        active = _contents(img)
        allowed = (expected[None], expected["s1"]) if op[0] == "apply" else (expected[None],)
        assert active in allowed, n
        for name in listed:
            if name in expected:
                assert _contents(img, name) == expected[name], (n, name)
        img.unlink()
