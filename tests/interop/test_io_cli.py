"""`blockengine io` against the real qemu-io 7.2: the same command lines, on identical
copies of the same images, must give the same stdout, stderr and exit status.

Only the timing of a request differs between runs; its report line is checked for
qemu-io's shape and then masked (byte and op counts stay compared).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tooling import require_tool

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
OURS = [sys.executable, "-m", "blockengine.cli.io"]
MiB = 1 << 20

_RATE = r"(?:[0-9.]+|inf) (?:bytes|KiB|MiB|GiB|TiB|PiB|EiB)"
_TIME = r"(?:[0-9]{2}\.[0-9]{2} sec|[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2})"
# "4 KiB, 1 ops; 00.00 sec (6.120 MiB/sec and 1566.6639 ops/sec)"
REPORT = re.compile(r"^(?P<total>[0-9.]+ (?:bytes|KiB|MiB|GiB|TiB|PiB|EiB)), (?P<ops>\d+) ops; "
                    + _TIME + r" \(" + _RATE + r"/sec and (?:[0-9]+\.[0-9]{4}|inf) ops/sec\)$",
                    re.M)
# -C: "512,1,0:00:00.00,6330287.707,12363.843"
CSV_REPORT = re.compile(r"^(?P<total>\d+),(?P<ops>\d+),[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2},"
                        r"(?:[0-9]+\.[0-9]{3}|inf),(?:[0-9]+\.[0-9]{3}|inf)$", re.M)


def mask_timing(text: str) -> str:
    text = REPORT.sub(r"\g<total>, \g<ops> ops; <TIME> (<RATE>/sec and <RATE> ops/sec)", text)
    text = CSV_REPORT.sub(r"\g<total>,\g<ops>,<TIME>,<RATE>,<RATE>", text)
    for line in text.splitlines():      # every report line had qemu-io's shape
        assert "ops/sec" not in line or "<TIME>" in line, line
    return text


def run(cmd, args, cwd, stdin=None, executable=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), LC_ALL="C")
    p = subprocess.run([*cmd, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                       timeout=120, env=env, executable=executable)
    return p.returncode, mask_timing(p.stdout), mask_timing(p.stderr)


class Pair:
    """Two directories with identical images: one for qemu-io, one for us."""

    def __init__(self, root: Path):
        self.qemu_io = require_tool("qemu-io")     # run as "qemu-io": glibc names argv[0]
        self.dirs = {"qemu": root / "qemu", "ours": root / "ours"}
        for d in self.dirs.values():
            d.mkdir()

    def image(self, name: str, content=MiB) -> None:
        """A raw image: ``content`` bytes, or a sparse file of that size."""
        for d in self.dirs.values():
            with open(d / name, "wb") as f:
                if isinstance(content, int):
                    f.truncate(content)
                else:
                    f.write(content)

    def read(self, side: str, name: str) -> bytes:
        return (self.dirs[side] / name).read_bytes()

    def run(self, side: str, args, stdin=None):
        if side == "qemu":
            return run(["qemu-io"], args, self.dirs[side], stdin, executable=self.qemu_io)
        return run(OURS, args, self.dirs[side], stdin)

    def compare(self, args, stdin=None):
        """Run both; assert identical results; return qemu-io's (rc, stdout, stderr)."""
        expected = self.run("qemu", args, stdin)
        assert self.run("ours", args, stdin) == expected
        return expected


@pytest.fixture
def pair(tmp_path):
    return Pair(tmp_path)


def cmds(*commands: str) -> list[str]:
    return [arg for c in commands for arg in ("-c", c)]


# ---- command lines compared verbatim -------------------------------------------------------
CASES = {
    "read-write-verify": ["-f", "raw", *cmds(
        "write -P 0xab 0 4k", "read -P 0xab 0 4k", "read -v 0 32", "read -P 0 4k 4k",
        "write -P 0x41 100 20", "read -v 96 30", "w 1k 512", "r -q -P 0xcd 1k 512",
        "read -P 0xab -s 1 -l 2 0 4", "read -p 0 1", "write -p 0 1", "write -f 8k 1k",
        "length", "l", "info", "map", "alloc 0 64k", "alloc 0", "flush", "f", "aio_flush"),
        "img.raw"],
    "probed-raw-warning": cmds("write 0 512", "read -P 0xcd 0 512") + ["img.raw"],
    "probed-raw-read-only": ["-r", *cmds("read 0 512", "write 0 1"), "img.raw"],
    "pattern-mismatch": ["-f", "raw", *cmds("read -P 0xac 0 4k"), "img.raw"],
    "io-errors": ["-f", "raw", *cmds(
        "read 2M 4k", "read 1M 1", "write 1M 1", "readv 2M 512", "writev 1023k 2k",
        "discard 2M 1", "write -c 0 64k", "write -c 1 512", "read -b 0 512",
        "write -b 0 512", "write -z 2M 512", "read 1M 0", "write 1M 0"), "img.raw"],
    "command-errors": ["-f", "raw", *cmds(
        "bogus", "read", "read 0", "length 1", "flush 1", "alloc", "alloc 1 2 3",
        "sleep", "help a b", "map 1", "truncate", "truncate 1 2 3 4", "open", "t",
        "read\tx", "", "   "), "img.raw"],
    "parse-errors": ["-f", "raw", *cmds(
        "read 0 1x", "read x 1", "read 0 99999999999999999999", "read 0 3G", "read -1 1",
        "read 0 -1", "read 0 1.5k", "read 0 0x10", "read 0 1e", "read -z 0 1",
        "read -q 0 1 2", "read -s 1 0 4", "read -l 1 0 4", "read -P 0 -s 5 0 4",
        "read -P 0 -l 5 0 4", "read -P", "read 0 1 -P", "read -- -1 4", "r -x 0 1",
        "read -P 0x100 0 1", "read -P abc 0 1", "read -P -1 0 1", "read -P 010 0 1",
        "read -P 0x0a 0 1", "read -P 0x 0 1", "read -P 08 0 1", "read -P +7 0 1",
        "read -l 1x 0 1", "read -s 8E 0 1", "read -b 1 512", "read -b 0 511",
        "write 0 3G", "write -z -P 1 0 1", "write -u 0 1", "write -b -z 0 1",
        "write -f -c 0 512", "write -n 0 1", "write -z -s x 0 1", "write -P 1 -s x 0 1",
        "write -x 0 1", "write 0", "write 0 1 2", "discard 0 3G", "discard 0 2 3",
        "discard 1x 1", "readv 0 3G", "readv 0 1G 1G 1G", "readv 0 x", "readv 0",
        "writev -P 300 0 1", "aio_read 0 1x", "aio_write -z 0 1 2", "aio_write -u 0 1",
        "alloc 1x", "alloc 0 1x", "a -1", "truncate 1x", "truncate -m bogus 1M",
        "truncate -x 1", "truncate -m off 1x", "sleep x", "sleep -1", "sleep 0x10",
        "sleep 010", "sigraise 70", "sigraise x"), "img.raw"],
    "help": cmds("help", "help read", "help r", "help bogus", "help ?", "?"),
    "help-each-command": cmds(*("help %s" % name for name in (
        "abort", "aio_flush", "aio_read", "aio_write", "alloc", "break", "close",
        "discard", "flush", "help", "info", "length", "map", "open", "quit", "read",
        "readv", "remove_break", "reopen", "resume", "sigraise", "sleep", "truncate",
        "wait_break", "write", "writev", "w", "f", "t", "l", "i", "d", "a", "o", "c",
        "q"))),
    "no-file": cmds("read 0 1", "length", "sleep 1", "close", "map", "help length",
                    "quit 1 2 3", "length"),
    "quit-stops": ["-f", "raw", *cmds("length", "q", "bogus"), "img.raw"],
    "truncate": ["-f", "raw", *cmds(
        "truncate 2M", "length", "truncate -m full 3M", "length", "t 512", "l",
        "truncate -m falloc 2M", "length", "truncate -m off 1 2", "length",
        "truncate 1M", "map"), "img.raw"],
    "discard": ["-f", "raw", *cmds(
        "write -P 7 0 64k", "discard 0 32k", "discard -q 0 1", "discard -C -q 0 1",
        "d 1 1", "discard 4k 0", "read -P 7 32k 32k"), "img.raw"],
    "vectors": ["-f", "raw", *cmds(
        "writev -P 7 0 100 100", "readv -P 7 0 200", "readv 0 512 512",
        "readv -P 0 0 1 2 3", "readv -P 1 200 3", "readv -v 0 17", "readv -q 0 1",
        "writev -q 512 1 2", "writev -f 1k 512", "readv 0 0", "writev 0 0"), "img.raw"],
    "aio": ["-f", "raw", *cmds(
        "aio_write -P 5 0 512 512", "aio_flush", "aio_read -P 5 0 1k", "aio_flush",
        "aio_read -P 6 0 512", "aio_flush", "aio_read -v 0 16", "aio_flush",
        "aio_write -i 0 1", "aio_read -i 0 1", "aio_write -q 0 1", "aio_flush",
        "aio_read 2M 512", "aio_flush", "aio_write 2M 512", "aio_flush",
        "aio_read -q -P 5 0 512", "aio_flush", "aio_read 0 0", "aio_flush"), "img.raw"],
    "aio-write-zeroes": ["-f", "raw", *cmds("aio_write -z 4k 4k", "aio_flush",
                                            "aio_write -z -P 1 0 512", "aio_flush",
                                            "read -P 0 0 8k"), "img.raw"],
    "zero-writes": ["-f", "raw", *cmds(
        "write -P 1 0 64k", "write -z 0 4k", "write -z -u 4k 4k", "write -z -n 8k 4k",
        "write -z -f 12k 4k", "read -P 0 0 16k", "read -P 1 16k 48k", "write -z 0 0"),
        "img.raw"],
    "csv-reports": ["-f", "raw", *cmds(
        "read -C 0 512", "write -C 0 1", "discard -C 0 4k", "readv -C 0 1",
        "writev -C 0 1", "aio_read -C 0 1", "aio_flush", "aio_write -C 0 1", "aio_flush"),
        "img.raw"],
    "read-only": ["-r", "-f", "raw", *cmds(
        "write 0 1", "discard 0 512", "truncate 1M", "write -z 0 1", "aio_write 0 1",
        "writev 0 1", "read -P 0 0 1", "length"), "img.raw"],
    "read-only-force-share": ["-r", "-U", "-f", "raw", *cmds("read -P 0 0 1"), "img.raw"],
    "debug-commands": ["-f", "raw", *cmds(
        "break write_aio foo", "remove_break foo", "resume foo", "sigraise 0"), "img.raw"],
    "reopen": ["-f", "raw", *cmds(
        "reopen -r", "write 0 1", "reopen -w", "write 0 1", "reopen -c writeback",
        "reopen -c bogus", "reopen -r -w", "reopen x", "reopen -o read-only=off -r",
        "reopen -c none -o cache.no-flush=on", "reopen -o foo=bar", "reopen -c unsafe",
        "flush", "read -P 0xcd 0 1"), "img.raw"],
    "null-co": ["--image-opts", "driver=null-co,size=1M", *cmds(
        "length", "info", "map", "read -P 0xab 0 4k", "read -P 0 0 4k", "write 0 4k",
        "alloc 0 4k", "alloc 0", "read -v 0 16")],
    "null-co-read-zeroes": ["--image-opts", "driver=null-co,size=1M,read-zeroes=on", *cmds(
        "read -P 0 0 4k", "map", "alloc 0 4k", "length")],
    "null-co-empty": ["--image-opts", "driver=null-co,size=0", *cmds(
        "map", "length", "read 0 0", "write 0 0", "alloc 0", "read 0 1")],
    "image-opts-raw": ["--image-opts", "driver=raw,file.filename=img.raw", *cmds(
        "length", "write 0 1", "read -P 0xcd 0 1")],
    "image-opts-file": ["--image-opts", "driver=file,filename=img.raw", *cmds(
        "info", "write 0 1", "map")],
    "image-opts-probe": ["--image-opts", "file.filename=img.raw", *cmds("length")],
    "image-opts-flag-warnings": ["--image-opts",
                                 "driver=null-co,size=1M,noread-zeroes,read-zeroes",
                                 *cmds("read -P 0 0 1")],
    "image-opts-file-flag": ["--image-opts", "img.raw", *cmds("length")],
    "image-opts-no-driver": ["--image-opts", "", *cmds("length")],
    "image-opts-file-ref": ["--image-opts", "file=img.raw", *cmds("length")],
    "image-opts-and-format": ["-f", "raw", "--image-opts", "img.raw"],
    "image-opts-force-share-rw": ["-U", "--image-opts", "driver=null-co,size=1M"],
    "image-opts-force-share-conflict": ["-U", "-r", "--image-opts",
                                        "driver=null-co,size=1M,force-share=off"],
    "image-opts-read-only": ["-r", "--image-opts", "driver=null-co,size=1M",
                             *cmds("write 0 1", "read 0 1")],
    "open-missing": ["nonexist.raw", *cmds("length")],
    "open-unknown-driver": ["-f", "bogus", "img.raw", *cmds("length")],
    "force-share-rw": ["-U", "img.raw", *cmds("length")],
    "bad-cache": ["-t", "bogus", "img.raw"],
    "bad-discard": ["-d", "bogus", "img.raw"],
    "bad-aio": ["-i", "bogus", "img.raw"],
    "native-aio-needs-direct": ["-k", "-f", "raw", "img.raw", *cmds("length")],
    "cache-modes": ["-f", "raw", "-t", "none", *cmds("write 0 4k", "read -P 0xcd 0 1")],
    "cache-unsafe": ["-f", "raw", "-n", "-t", "unsafe", "-d", "ignore", "-i", "io_uring",
                     *cmds("write 0 1", "flush", "read -P 0xcd 0 1"), "img.raw"],
    "accepted-options": ["-f", "raw", "-m", "-C", "-i", "threads", "-T", "foo*",
                         *cmds("read 0 1"), "img.raw"],
    "secret-object": ["--object", "secret,id=s0,data=x", "-f", "raw", *cmds("read -q 0 1"),
                      "img.raw"],
    "bad-object": ["--object", "bogus,id=s0", "img.raw"],
    "usage-two-files": ["a", "b"],
    "usage-bad-short": ["-x"],
    "usage-bad-long": ["--bogus"],
    "usage-missing-arg": ["-f"],
    "usage-missing-long-arg": ["img.raw", "--format"],
    "usage-ambiguous": ["--c", "img.raw"],
    "usage-ambiguous-value": ["--fo=raw", "img.raw"],
    "usage-no-arg-allowed": ["--help=1"],
    "usage-cluster": ["-rfraw", "img.raw", "-clength"],
    "long-options": ["--read-only", "--form", "raw", "--cmd", "length", "--nocache",
                     "--cache=writeback", "--discard=unmap", "img.raw"],
    "dashdash": ["--", "img.raw"],
    "help-option": ["-h"],
    "write-from-file": ["-f", "raw", *cmds(
        "write -s src.bin 0 40", "read -v 0 48", "write -s nonexist 0 1",
        "write -s . 0 1", "write -s empty.bin 0 1", "write -s src.bin 0 0"), "img.raw"],
    "probed-raw-sector0-guard": [*cmds("write -s qcow2magic.bin 0 512", "read -P 0 0 512"),
                                 "img.raw"],
}


@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_same_as_qemu_io(pair, args):
    pair.image("img.raw")
    pair.image("src.bin", b"Hello, World! 0123456789 abc\x00\xff\x7f-_.")
    pair.image("empty.bin", b"")
    pair.image("qcow2magic.bin", b"QFI\xfb\x00\x00\x00\x03" + bytes(504))
    pair.compare(args)


def test_exit_status_rules(pair):
    pair.image("img.raw")
    assert pair.compare(["-f", "raw", *cmds("read -P 0xac 0 4k"), "img.raw"])[0] == 1
    assert pair.compare(["-f", "raw", *cmds("read 2M 1"), "img.raw"])[0] == 1
    assert pair.compare(["-f", "raw", *cmds("read 2M 1", "read 0 1"), "img.raw"])[0] == 1
    assert pair.compare(["-f", "raw", *cmds("aio_read 2M 1"), "img.raw"])[0] == 0
    assert pair.compare(["-f", "raw", *cmds("read 0 1"), "img.raw"])[0] == 0


def test_interactive(pair):
    pair.image("img.raw")
    rc, out, _ = pair.compare(["-f", "raw", "img.raw"],
                              stdin="length\n\n  read   0  1 \nbogus\nquit\nlength\n")
    assert out.startswith("qemu-io> 1 MiB\nqemu-io> qemu-io> read 1/1") and rc == 1
    pair.compare(["-f", "raw", "img.raw"], stdin="length")        # EOF without newline
    pair.compare([], stdin="")
    pair.compare([], stdin="open -f raw img.raw\nopen -o driver=raw img.raw\nlength\n"
                           "open img.raw\nclose\nclose\nopen -r -o driver=raw img.raw\n"
                           "write 0 1\nclose\nopen nonexist\nopen\nopen -x\nopen a b\n"
                           "open -t bogus img.raw\nopen -d bogus img.raw\nopen img.raw\n"
                           "write 0 1\nclose\nopen -U img.raw\nopen -U -r img.raw\n"
                           "read 0 1\n")
    pair.compare(["--image-opts"], stdin="open -o driver=raw\n"
                                         "open driver=null-co,size=1M\nlength\n")
    pair.compare([], stdin="r" * 1500 + "\nlength\n")        # fgets() splits long lines


def test_version_shape():
    rc = subprocess.run([*OURS, "-V"], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = rc.stdout.splitlines()
    assert rc.returncode == 0 and lines[0].startswith("qemu-io version 7.2.")
    assert lines[1] == ("Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project "
                        "developers")


# ---- data written by one is read by the other ----------------------------------------------
def test_data_interoperates(pair):
    pair.image("img.raw", 4 * MiB)
    writes = ["write -P 0x11 0 64k", "writev -P 0x22 64k 4k 60k", "write -z 256k 64k",
              "aio_write -P 0x33 1M 8k", "aio_flush", "write -P 0x44 2096640 1k"]
    checks = ["read -q -P 0x11 0 64k", "read -q -P 0x22 64k 64k", "read -q -P 0 256k 64k",
              "read -q -P 0x33 1M 8k", "read -q -P 0x44 2096640 1k", "read -q -P 0 3M 1M"]
    for writer, reader in (("ours", "qemu"), ("qemu", "ours")):
        assert pair.run(writer, ["-f", "raw", *cmds(*writes), "img.raw"])[0] == 0
        (pair.dirs[reader] / "img.raw").write_bytes(pair.read(writer, "img.raw"))
        assert pair.run(reader, ["-f", "raw", *cmds(*checks), "img.raw"]) == (0, "", "")
    assert pair.read("ours", "img.raw") == pair.read("qemu", "img.raw")


def test_pattern_mismatch_found_by_both(pair):
    pair.image("img.raw", bytes(4096) + b"\x01" + bytes(MiB - 4097))
    for side in ("qemu", "ours"):
        rc, out, _ = pair.run(side, ["-f", "raw", *cmds("read -q -P 0 0 8k"), "img.raw"])
        assert (rc, out) == (1, "Pattern verification failed at offset 0, 8192 bytes\n")


def test_report_formatting_units():
    """cvtstr()/timestr() as qemu-io prints them, on values no run would hit."""
    from blockengine.cli.io_commands import cvtstr, report_lines, timestr
    assert [cvtstr(v) for v in (0, 512, 1023, 1024, 1536, 1 << 20, 1.5 * (1 << 30),
                                1 << 60, 0.5)] == [
        "0 bytes", "512 bytes", "1023 bytes", "1 KiB", "1.500 KiB", "1 MiB", "1.500 GiB",
        "1 EiB", "0.500000 bytes"]
    assert timestr(10_000_000, False) == "00.01 sec"
    assert timestr(3_723_450_000_000, False) == "1:02:03.45"
    assert timestr(0, True) == "0:00:00.00"
    assert report_lines("read", 500_000_000, 0, 4096, 4096, 1, False) == (
        "read 4096/4096 bytes at offset 0\n"
        "4 KiB, 1 ops; 00.50 sec (8 KiB/sec and 2.0000 ops/sec)\n")
    assert report_lines("wrote", 2_000_000_000, 0, 1, 1, 1, True) == (
        "1,1,0:00:02.00,0.500,0.500\n")
