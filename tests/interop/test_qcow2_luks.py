"""qcow2 with encrypt.format=luks against the real tools.

The LUKS header lives in qcow2 clusters named by the 0x0537be77 header extension and
payload sectors are encrypted with the *host* offset as the IV sector number
(qcow2_co_encrypt() with crypt_physical_offset).  Images made and written by
qemu-img/qemu-io read identically in blockengine; images blockengine makes and writes
read identically in QEMU and pass `qemu-img check`; `img info` (human and JSON) and the
open errors (wrong passphrase, missing key-secret, ...) match QEMU byte for byte."""
from __future__ import annotations

import subprocess

import pytest

from blockengine.graph.graph import Graph

pytestmark = pytest.mark.interop

PW = "abc"
OBJ = ["--object", "secret,id=sec0,data=%s" % PW]
CREATE_OPTS = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
MiB = 1 << 20

# (pattern, offset, length): unaligned, cluster-crossing, partial-cluster writes
WRITES = [(0x5A, 0, MiB), (0x33, 3000, 1000), (0x77, 5 * MiB + 512, 70 * 1024),
          (0x11, 8 * MiB - 700, 1400), (0x42, 16 * MiB - 512, 512)]
# what reads back (0x33 overwrote part of the 0x5a MiB)
READS = [(0x5A, 0, 3000), (0x33, 3000, 1000), (0x5A, 4000, MiB - 4000), (0, MiB, 4 * MiB)]
READS += WRITES[2:]


def _run(*argv, cwd=None, check=True):
    r = subprocess.run([str(a) for a in argv], capture_output=True, cwd=cwd, timeout=120)
    if check and r.returncode:
        raise AssertionError("%s failed: %s" % (argv, r.stderr.decode()))
    return r


def _iopts(path, secret="sec0"):
    return "driver=qcow2,encrypt.key-secret=%s,file.filename=%s" % (secret, path)


def _qemu_create(qemu_img, path, size="16M", opts=CREATE_OPTS):
    """QEMU 7.2's PBKDF2 benchmark sometimes fails with "Unable to get accurate CPU
    usage" (a 0 ms CPU-time sample): retry that."""
    for _ in range(10):
        r = _run(qemu_img, "create", "-q", "-f", "qcow2", *OBJ, "-o", opts, path, size,
                 check=False)
        if r.returncode == 0:
            return
        assert b"Unable to get accurate CPU usage" in r.stderr, r.stderr
    raise AssertionError("qemu-img create kept failing")


def _write(io_tool, path, writes=WRITES):
    cmds = []
    for pat, off, n in writes:
        cmds += ["-c", "write -P 0x%x %d %d" % (pat, off, n)]
    r = _run(io_tool, *OBJ, "--image-opts", _iopts(path), *cmds)
    assert b"failed" not in r.stdout and b"error" not in r.stderr.lower(), r


def _expected(size=16 * MiB, writes=WRITES) -> bytes:
    buf = bytearray(size)
    for pat, off, n in writes:
        buf[off:off + n] = bytes([pat]) * n
    return bytes(buf)


def _our_read_all(path) -> bytes:
    g = Graph()
    g.secrets = {"sec0": PW.encode()}
    node = g.open_node({"driver": "qcow2", "read-only": True,
                        "encrypt": {"key-secret": "sec0"},
                        "file": {"driver": "file", "filename": str(path)}})
    try:
        assert node.drv.encrypted
        return node.pread(0, node.total_size)
    finally:
        g.close_all()


def _qemu_read_all(qemu_img, path, tmp_path) -> bytes:
    out = tmp_path / ("plain-%s.raw" % path.name)
    _run(qemu_img, "convert", *OBJ, "--image-opts", _iopts(path), "-O", "raw", out)
    return out.read_bytes()


def test_qemu_image_reads_identically(qemu_img, qemu_io, be_bindir, tmp_path):
    p = tmp_path / "q.qcow2"
    _qemu_create(qemu_img, p)
    _write(qemu_io, p)
    want = _expected()
    assert _qemu_read_all(qemu_img, p, tmp_path) == want
    assert _our_read_all(p) == want
    # and blockengine's qemu-io verifies the patterns through the CLI
    cmds = []
    for pat, off, n in READS:
        cmds += ["-c", "read -P 0x%x %d %d" % (pat, off, n)]
    r = _run(be_bindir / "qemu-io", *OBJ, "--image-opts", _iopts(p), *cmds)
    assert b"Pattern verification failed" not in r.stdout, r.stdout


def test_host_offset_is_the_iv_sector(qemu_img, qemu_io, tmp_path):
    """QEMU encrypts by host sector: the same plaintext at two guest offsets is stored
    as different ciphertext, and the stored cluster decrypts with host_offset / 512."""
    p = tmp_path / "q.qcow2"
    _qemu_create(qemu_img, p)
    _write(qemu_io, p, [(0x5A, 0, 65536)])
    g = Graph()
    g.secrets = {"sec0": PW.encode()}
    node = g.open_node({"driver": "qcow2", "read-only": True,
                        "encrypt": {"key-secret": "sec0"},
                        "file": {"driver": "file", "filename": str(p)}})
    try:
        drv = node.drv
        (n, _t, host), = drv.get_host_runs(0, 65536, max_runs=1)
        assert host and host != 0
        raw = node.file_child_node().pread(host, 65536)
        assert bytes(drv.crypto.decrypt(host // 512, raw)) == b"\x5a" * 65536
        assert bytes(drv.crypto.decrypt(0, raw)) != b"\x5a" * 65536
    finally:
        g.close_all()


def test_our_image_reads_in_qemu_and_passes_check(qemu_img, qemu_io, run_both, be_bindir,
                                                 tmp_path):
    both = run_both(["create", "-f", "qcow2", *OBJ, "-o", CREATE_OPTS, "x.qcow2", "16M"])
    if b"Unable to get accurate CPU usage" not in both.ref.stderr:
        both.assert_same()
    ours = both.our_dir / "x.qcow2"
    # qcow2 metadata (header + extensions, refcounts, L1) laid out as QEMU does
    if both.ref.returncode == 0:
        ref = both.ref_dir / "x.qcow2"
        assert ref.read_bytes()[:4 * 65536] == ours.read_bytes()[:4 * 65536]
        assert ref.stat().st_size == ours.stat().st_size
    _write(be_bindir / "qemu-io", ours)
    want = _expected()
    assert _our_read_all(ours) == want
    assert _qemu_read_all(qemu_img, ours, tmp_path) == want
    cmds = []
    for pat, off, n in READS:
        cmds += ["-c", "read -P 0x%x %d %d" % (pat, off, n)]
    r = _run(qemu_io, *OBJ, "--image-opts", _iopts(ours), *cmds)
    assert b"Pattern verification failed" not in r.stdout, r.stdout
    r = _run(qemu_img, "check", *OBJ, "--image-opts", _iopts(ours))
    assert b"No errors were found on the image." in r.stdout
    ourcheck = _run(be_bindir / "qemu-img", "check", *OBJ, "--image-opts", _iopts(ours))
    assert ourcheck.stdout == r.stdout
    # QEMU writes into our image too, and we read its writes back
    more = [(0x66, 2 * MiB + 100 * 512, 3 * 512)]
    _write(qemu_io, ours, more)
    assert _our_read_all(ours) == _expected(writes=WRITES + more)


def test_info_matches_qemu(qemu_img, qemu_io, be_img, tmp_path):
    p = tmp_path / "q.qcow2"
    _qemu_create(qemu_img, p)
    _write(qemu_io, p, WRITES[:2])
    for argv in (["info", p.name], ["info", "--output=json", p.name],
                 ["info", *OBJ, "--image-opts", _iopts(p.name)],
                 ["info", "--output=json", *OBJ, "--image-opts", _iopts(p.name)],
                 ["map", "--output=json", *OBJ, "--image-opts", _iopts(p.name)],
                 ["check", *OBJ, "--image-opts", _iopts(p.name)]):
        ref = _run(qemu_img, *argv, cwd=tmp_path, check=False)
        ours = be_img(*argv, cwd=tmp_path)
        assert (ours.returncode, ours.stderr, ours.stdout) == \
            (ref.returncode, ref.stderr, ref.stdout), argv
    out = _run(qemu_img, "info", p.name, cwd=tmp_path).stdout.decode()
    assert "encrypted: yes" in out and "format: luks" in out


def test_open_errors_match_qemu(qemu_img, qemu_io, be_bindir, tmp_path):
    p = tmp_path / "q.qcow2"
    _qemu_create(qemu_img, p)
    plain = tmp_path / "plain.qcow2"
    _run(qemu_img, "create", "-q", "-f", "qcow2", plain, "1M")
    cases = [
        ["--object", "secret,id=sec0,data=wrong", "--image-opts", _iopts(p.name)],
        [p.name],                                             # no key-secret
        [*OBJ, "--image-opts", _iopts(p.name, "sec1")],      # no such secret
        [*OBJ, "--image-opts", "driver=qcow2,encrypt.format=aes,encrypt.key-secret=sec0,"
                               "file.filename=%s" % p.name],
        [*OBJ, "--image-opts", "driver=qcow2,encrypt.format=luks,file.filename=%s"
                               % plain.name],
    ]
    for argv in cases:
        argv = [*argv, "-c", "read 0 4k"]
        ref = _run(qemu_io, *argv, cwd=tmp_path, check=False)
        ours = _run(be_bindir / "qemu-io", *argv, cwd=tmp_path, check=False)
        assert (ours.returncode, ours.stderr) == (ref.returncode, ref.stderr), argv
        assert ref.returncode != 0 and b"Traceback" not in ours.stderr
    first = _run(qemu_io, *cases[0], "-c", "read 0 4k", cwd=tmp_path, check=False)
    assert b"Invalid password, cannot unlock any keyslot" in first.stderr
    for argv in (["check", p.name], ["convert", "-O", "raw", p.name, "out.raw"]):
        ref = _run(qemu_img, *argv, cwd=tmp_path, check=False)
        ours = _run(be_bindir / "qemu-img", *argv, cwd=tmp_path, check=False)
        assert (ours.returncode, ours.stderr) == (ref.returncode, ref.stderr), argv
        assert b"Parameter 'encrypt.key-secret' is required for cipher" in ours.stderr


def test_create_errors_match_qemu(run_both):
    for opts in ("encrypt.format=luks", "encrypt.key-secret=sec0",
                 "encrypt.format=foo,encrypt.key-secret=sec0",
                 "encrypt.format=luks,encrypt.key-secret=sec9"):
        both = run_both(["create", "-f", "qcow2", *OBJ, "-o", opts, "e.qcow2", "1M"])
        assert both.ref.returncode != 0
        both.assert_same()


def test_convert_into_encrypted_qcow2(qemu_img, be_img, tmp_path):
    """The target is opened with the create options' key secrets (img_add_key_secrets)."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(bytes(range(256)) * 1024)
    r = be_img("convert", "--object", "secret,id=sec0,data=abc", "-O", "qcow2", "-o",
               "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
               str(src), "out.qcow2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run(qemu_img, "compare", "--object", "secret,id=sec0,data=abc", "--image-opts",
             _iopts(tmp_path / "out.qcow2"), "driver=raw,file.filename=%s" % src)
    assert b"Images are identical." in r.stdout
