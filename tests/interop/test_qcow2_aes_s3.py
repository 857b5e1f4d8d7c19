"""qcow2's legacy AES encryption (encrypt.format=aes / -o encryption=on) against
qemu-img / qemu-io 7.2, which still create, read and write it: the same headers, the
same encrypted clusters for the same writes, the same outputs and errors."""
import subprocess

import pytest

from tests.tooling import copy_sparse, require_tool

pytestmark = pytest.mark.interop

SECRET = ["--object", "secret,id=s0,data=pw"]
LONG_SECRET = ["--object", "secret,id=s0,data=0123456789abcdefXYZ"]   # key: 16 bytes
# "pw\0xyz": QEMU's UTF-8 check of a secret refuses the NUL
NUL_SECRET = ["--object", "secret,id=s0,data=cHcAeHl6,format=base64"]


def opts(image: str, secret: str = "s0") -> list:
    return ["--image-opts", "driver=qcow2,encrypt.key-secret=%s,file.filename=%s"
            % (secret, image)]


WRITES = ["write -P 0x11 0 64k", "write -P 0x22 70k 3k", "write -P 0x33 130560 1024",
          "write -z 512k 64k", "write -P 0x44 1M 4k", "discard 1M 4k",
          "write -P 0x55 1040k 512"]


def _prepare(d):
    """aes.qcow2: created by qemu-img, data written by qemu-io (COW at both ends of a
    cluster, zeroes, a discard); v2.qcow2 the same with -o encryption=on, compat=0.10
    and a secret longer than the 16-byte key; ref.raw: the guest data."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")

    def run(*args):
        r = subprocess.run(args, cwd=d, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    run(qemu_img, "create", "-q", "-f", "qcow2", *SECRET, "-o",
        "encrypt.format=aes,encrypt.key-secret=s0", "aes.qcow2", "2M")
    run(qemu_io, *SECRET, *[a for c in WRITES for a in ("-c", c)], *opts("aes.qcow2"))
    run(qemu_img, "create", "-q", "-f", "qcow2", *LONG_SECRET, "-o",
        "encryption=on,encrypt.key-secret=s0,compat=0.10", "v2.qcow2", "2M")
    run(qemu_io, *LONG_SECRET, *[a for c in WRITES for a in ("-c", c)], *opts("v2.qcow2"))
    run(qemu_img, "convert", *SECRET, *opts("aes.qcow2"), "-O", "raw", "ref.raw")


CASES = {
    "create": ["create", "-f", "qcow2", *SECRET, "-o",
               "encrypt.format=aes,encrypt.key-secret=s0", "new.qcow2", "1M"],
    "create-legacy-v2": ["create", "-f", "qcow2", *SECRET, "-o",
                         "encryption=on,encrypt.key-secret=s0,compat=0.10", "new.qcow2",
                         "1M"],
    "info": ["info", "aes.qcow2"],
    "info-json": ["info", "--output=json", "aes.qcow2"],
    "info-v2": ["info", "v2.qcow2"],
    "map": ["map", *SECRET, *opts("aes.qcow2")],
    "map-json": ["map", "--output=json", *SECRET, *opts("aes.qcow2")],
    "check": ["check", "aes.qcow2"],
    "compare": ["compare", *SECRET, *opts("aes.qcow2"), "driver=raw,file.filename=ref.raw"],
    "compare-long-key": ["compare", *LONG_SECRET, *opts("v2.qcow2"),
                         "driver=raw,file.filename=ref.raw"],
    "compare-key-cut-at-16": ["compare", "--object",
                              "secret,id=s0,data=0123456789abcdefOTHER", *opts("v2.qcow2"),
                              "driver=raw,file.filename=ref.raw"],
    "compare-wrong-key": ["compare", *LONG_SECRET, *opts("aes.qcow2"),
                          "driver=raw,file.filename=ref.raw"],
    "convert-read": ["convert", *SECRET, *opts("aes.qcow2"), "-O", "raw", "out.raw"],
    "convert-write": ["convert", *SECRET, "-O", "qcow2", "-o",
                      "encrypt.format=aes,encrypt.key-secret=s0", "ref.raw", "out.qcow2"],
    "convert-write-long-key": ["convert", *LONG_SECRET, "-O", "qcow2", "-o",
                               "encryption=on,encrypt.key-secret=s0", "ref.raw",
                               "out.qcow2"],
    "measure": ["measure", "-O", "qcow2", *SECRET, "-o",
                "encrypt.format=aes,encrypt.key-secret=s0", "ref.raw"],
    # errors
    "err-no-secret-option": ["convert", "-O", "raw", "aes.qcow2", "out.raw"],
    "err-unknown-secret": ["convert", *opts("aes.qcow2", "s9"), "-O", "raw", "out.raw"],
    "err-format-mismatch": ["info", "--image-opts",
                            "driver=qcow2,encrypt.format=luks,file.filename=aes.qcow2"],
    "err-nul-in-secret": ["compare", *NUL_SECRET, *opts("aes.qcow2"), "ref.raw"],
    "err-create-no-secret": ["create", "-f", "qcow2", "-o", "encryption=on", "new.qcow2",
                             "1M"],
    "err-create-unknown-secret": ["create", "-f", "qcow2", "-o",
                                  "encrypt.format=aes,encrypt.key-secret=s9", "new.qcow2",
                                  "1M"],
    "err-create-luks-option": ["create", "-f", "qcow2", *SECRET, "-o",
                               "encrypt.format=aes,encrypt.key-secret=s0,"
                               "encrypt.cipher-alg=aes-256", "new.qcow2", "1M"],
    "err-create-alias-clash": ["create", "-f", "qcow2", *SECRET, "-o",
                               "encryption=on,encrypt.format=aes,encrypt.key-secret=s0",
                               "new.qcow2", "1M"],
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_same_as_qemu_img(run_both, args):
    both = run_both(args, _prepare)
    both.assert_same()
    for name in ("new.qcow2", "out.raw"):           # no random parts: byte-identical
        ref = both.ref_dir / name
        assert (both.our_dir / name).exists() == ref.exists()
        if ref.exists():
            assert (both.our_dir / name).read_bytes() == ref.read_bytes()
    if (both.ref_dir / "out.qcow2").exists():
        # the copy writes whole clusters in its own order: same guest data, decrypted
        # by qemu-img with the key, on both sides
        secret = args[1:3]
        for d in (both.ref_dir, both.our_dir):
            r = subprocess.run([require_tool("qemu-img"), "compare", *secret,
                                *opts("out.qcow2"), "driver=raw,file.filename=ref.raw"],
                               cwd=d, capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr


def test_qemu_io_writes_give_the_same_image(be_bindir, tmp_path):
    """The same writes through qemu-io and through us on copies of one fresh image:
    byte-identical files (AES-CBC with plain64 IVs of guest sectors, COW included)."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", *SECRET, "-o",
                    "encrypt.format=aes,encrypt.key-secret=s0", "fresh.qcow2", "2M"],
                   cwd=tmp_path, check=True)
    cmds = [a for c in WRITES + ["read -P 0x22 70k 3k", "read -P 0 73k 1k"]
            for a in ("-c", c)]
    out = {}
    for name, tool in (("ref", qemu_io), ("ours", be_bindir / "qemu-io")):
        copy_sparse(tmp_path / "fresh.qcow2", tmp_path / (name + ".qcow2"))
        r = subprocess.run([str(tool), *SECRET, *cmds, *opts(name + ".qcow2")],
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        out[name] = (tmp_path / (name + ".qcow2")).read_bytes()
    assert out["ours"] == out["ref"]
