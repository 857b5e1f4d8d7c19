"""json:{...} file names against qemu-img / qemu-io 7.2: wherever a file name goes
(info, map, check, compare, convert, create -b, rebase -b, a backing file name in an
image header, qemu-io), with the same outputs and the same errors for bad JSON."""
import json
import subprocess

import pytest

from tests.interop.test_io_cli import Pair, cmds
from tests.tooling import require_tool

pytestmark = pytest.mark.interop

QCOW2 = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"x.qcow2"}}'
RAW = 'json:{"driver":"raw","file":{"driver":"file","filename":"x.raw"}}'


def _prepare(d):
    """x.qcow2 with data at 0 and 1M, x.raw the same bytes, and overlays whose headers
    name their backing file with json: (with and without a driver, bad JSON...)."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")

    def run(*args):
        subprocess.run([*args], cwd=d, check=True, capture_output=True)
    run(qemu_img, "create", "-q", "-f", "qcow2", "x.qcow2", "2M")
    run(qemu_io, "-c", "write -P 7 0 64k", "-c", "write -P 9 1M 4k", "x.qcow2")
    run(qemu_img, "convert", "-O", "raw", "x.qcow2", "x.raw")
    for name, backing in {
            "ov.qcow2": QCOW2,
            "ov_nodriver.qcow2": 'json:{"file":{"filename":"x.qcow2"}}',
            "ov_dotted.qcow2": 'json:{"driver":"qcow2","file.filename":"x.qcow2"}',
            "ov_raw.qcow2": 'json:{"driver":"raw","file":{"filename":"x.qcow2"}}',
            "ov_badjson.qcow2": 'json:{"file":{"filename":"x.qcow2"}',
            "ov_nofile.qcow2": "json:{}",
            "ov_missing.qcow2": 'json:{"driver":"qcow2","file":{"filename":"nope"}}'}.items():
        run(qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
            name, "2M")


CASES = {
    "info": ["info", QCOW2],
    "info-json": ["info", "--output=json", QCOW2],
    "info-raw": ["info", RAW],
    "info-dotted": ["info", 'json:{"file.driver":"file","file.filename":"x.qcow2"}'],
    "info-probed": ["info", 'json:{"file":{"filename":"x.qcow2"}}'],
    "info-single-quotes": ["info", "json:{'driver':'qcow2','file':{'filename':'x.qcow2'}}"],
    "info-protocol": ["info", 'json:{"driver":"file","filename":"x.qcow2"}'],
    "info-f-wins": ["info", "-f", "raw", QCOW2],
    "info-strong-option": ["info", 'json:{"driver":"raw","offset":512,'
                                   '"file":{"filename":"x.raw"}}'],
    "info-chain": ["info", "--backing-chain", "ov.qcow2"],
    "map": ["map", QCOW2],
    "map-json": ["map", "--output=json", QCOW2],
    "check": ["check", QCOW2],
    "check-json": ["check", "--output=json", QCOW2],
    "compare": ["compare", QCOW2, RAW],
    "compare-differ": ["compare", QCOW2, 'json:{"driver":"raw","file":{"filename":"ov.qcow2"}}'],
    "convert": ["convert", "-O", "raw", QCOW2, "out.raw"],
    "measure": ["measure", "-O", "qcow2", QCOW2],
    "create-backing": ["create", "-f", "qcow2", "-b", QCOW2, "-F", "qcow2", "new.qcow2"],
    "rebase-unsafe": ["rebase", "-u", "-b", RAW, "-F", "raw", "ov.qcow2"],
    **{"header-" + name: ["map", "ov_%s.qcow2" % name]
       for name in ("nodriver", "dotted", "raw", "badjson", "nofile", "missing")},
    "header-map-json": ["map", "--output=json", "ov.qcow2"],
    "header-convert": ["convert", "-O", "raw", "ov.qcow2", "out.raw"],
    "header-compare": ["compare", "ov.qcow2", "x.raw"],
    # errors
    "bad-premature": ["info", 'json:{"driver":"qcow2"'],
    "bad-empty": ["info", "json:"],
    "bad-two-values": ["info", "json:{}{}"],
    "bad-trailing": ["info", QCOW2 + "x"],
    "bad-stray": ["info", 'json:{"a":%d}'],
    "bad-not-object": ["info", "json:[1]"],
    "bad-no-driver-no-file": ["info", "json:{}"],
    "bad-format-no-file": ["info", 'json:{"driver":"qcow2"}'],
    "bad-filename-only": ["info", 'json:{"filename":"x.qcow2"}'],
    "bad-unknown-driver": ["info", 'json:{"driver":"nope"}'],
    "bad-file-reference": ["info", 'json:{"driver":"qcow2","file":"x.qcow2"}'],
    "bad-missing-file": ["info", 'json:{"driver":"qcow2","file":{"filename":"nope"}}'],
    # values as the drivers' QemuOpts read them, and their messages
    "typed-size-text": ["info", 'json:{"driver":"raw","offset":"abc","file":{"filename":"x.raw"}}'],
    "typed-size-negative": ["info", 'json:{"driver":"raw","offset":-1,'
                                    '"file":{"filename":"x.raw"}}'],
    "typed-bool-yes": ["info", 'json:{"driver":"qcow2","read-only":"yes",'
                               '"file":{"filename":"x.qcow2"}}'],
    "typed-bool-bad": ["info", 'json:{"driver":"qcow2","read-only":"maybe",'
                               '"file":{"filename":"x.qcow2"}}'],
    "typed-filename-number": ["info", 'json:{"driver":"qcow2","file":{"driver":"file",'
                                      '"filename":1}}'],
    "typed-driver-number": ["info", 'json:{"driver":1}'],
    "typed-file-list": ["info", 'json:{"driver":"qcow2","file":["x"]}'],
    "typed-file-empty": ["info", 'json:{"driver":"qcow2","file":{}}'],
    "typed-nested-beats-dotted": ["info", 'json:{"driver":"qcow2","file.filename":"x.raw",'
                                          '"file":{"filename":"x.qcow2"}}'],
    "typed-size-int": ["info", 'json:{"driver":"raw","offset":512,"size":1024,'
                               '"file":{"filename":"x.raw"}}'],
    # json: names made for what has no plain file name (bdrv_refresh_filename())
    "name-format-over-format": ["info", 'json:{"driver":"qcow2","file":{"driver":"raw",'
                                        '"file":{"filename":"x.qcow2"}}}'],
    "name-raw-over-null": ["info", 'json:{"driver":"raw","file":{"driver":"null-co",'
                                   '"size":1048576}}'],
    "name-null-strong": ["info", 'json:{"driver":"null-co","size":1048576,'
                                 '"read-zeroes":true,"read-only":true}'],
    "name-null-plain": ["info", 'json:{"driver":"null-co","latency-ns":5}'],
    "bad-convert-target-src": ["convert", "-O", "raw", "json:{", "out.raw"],
    "bad-compare": ["compare", QCOW2, "json:[]"],
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_same_as_qemu_img(run_both, args):
    both = run_both(args, _prepare)
    both.assert_same()
    for name in ("out.raw", "new.qcow2", "ov.qcow2"):
        ref, ours = both.ref_dir / name, both.our_dir / name
        if ref.exists() and name.endswith(".raw"):
            assert ours.read_bytes() == ref.read_bytes()
        elif ref.exists():
            assert json.loads(_info(ours)) == json.loads(_info(ref))


def _info(path) -> str:
    return subprocess.run([require_tool("qemu-img"), "info", "--output=json", "-U",
                           path.name], cwd=path.parent, check=True, capture_output=True,
                          text=True).stdout.replace(str(path.parent), "")


@pytest.mark.parametrize("args", [
    cmds("read -P 7 0 64k", "read -P 9 1M 4k", "write -P 3 4k 4k", "map") + [QCOW2],
    cmds("read -P 7 0 64k") + ['json:{"file":{"filename":"x.qcow2"}}'],
    cmds("read -P 7 0 64k") + ["-f", "qcow2", 'json:{"file":{"filename":"x.qcow2"}}'],
    cmds("read -P 0 0 64k") + ['json:{"driver":"qcow2"'],
    cmds("read -P 0 0 64k") + ["json:{}"],
], ids=["rw", "probed", "f-and-json", "bad-json", "no-file"])
def test_same_as_qemu_io(tmp_path, args):
    pair = Pair(tmp_path)
    for d in pair.dirs.values():
        _prepare(d)
    pair.compare(args)
    assert pair.read("ours", "x.qcow2") == pair.read("qemu", "x.qcow2")
