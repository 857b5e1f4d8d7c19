"""blockdev-snapshot-sync / blockdev-snapshot: the same scripts through
qemu-storage-daemon 7.2 and our QMPEngine (returns, error texts, nodes left behind),
then the images: the overlay names its backing file, qemu-io reads through the chain."""
from __future__ import annotations

import json
import subprocess

import pytest

from blockengine.qmp.commands.devices import create_device
from blockengine.qmp.engine import QMPEngine
from tests.jobs.qsd import QSD
from tests.tooling import require_tool

MB = 1 << 20


def _sub(value, d: str):
    if isinstance(value, str):
        return value.replace("{D}", d)
    if isinstance(value, dict):
        return {k: _sub(v, d) for k, v in value.items()}
    if isinstance(value, list):
        return [_sub(v, d) for v in value]
    return value


def _images(d, names=(), backed=()):
    qemu_img = require_tool("qemu-img")
    for n in names:
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", f"{d}/{n}.qcow2", "1M"],
                       check=True)
    for n, base in backed:
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", f"{d}/{base}.qcow2",
                        "-F", "qcow2", f"{d}/{n}.qcow2", "1M"], check=True)


NO_FILENAME = ("ov", "ov2")


def _nodes(result, d: str):
    """The user-named nodes of query-named-block-nodes: what both sides agree on."""
    out = []
    for n in result:
        if n["node-name"].startswith("#"):
            continue
        f = n["file"] if not n["file"].startswith("json:") else "json"
        if n["drv"] == "raw" or n["node-name"] in NO_FILENAME:
            # QEMU names raw over a format node, and an overlay whose header does not
            # name its backing node, json:{...}; ours use the file's name (see report)
            f = "-"
        out.append((n["node-name"], n["drv"], n["ro"], n["backing_file_depth"],
                    f.replace(d, "{D}")))
    return sorted(out)


class Side:
    def __init__(self, d):
        self.d = str(d)

    def run(self, script):
        out = []
        for cmd, args in script:
            r = self.execute(cmd, _sub(args, self.d))
            if cmd == "query-named-block-nodes" and "return" in r:
                r = {"return": _nodes(r["return"], self.d)}
            elif "error" in r:
                r = {"error": {"class": r["error"]["class"],
                               "desc": r["error"]["desc"].replace(self.d, "{D}")}}
            out.append((cmd, r))
        return out


class Ref(Side):
    def __init__(self, d):
        super().__init__(d)
        self.q = QSD(require_tool("qemu-storage-daemon"))

    def execute(self, cmd, args):
        return self.q.raw(cmd, **args)

    def close(self):
        self.q.close()


class Ours(Side):
    def __init__(self, d):
        super().__init__(d)
        self.engine = QMPEngine()

    def execute(self, cmd, args):
        return json.loads(json.dumps(self.engine.execute(cmd, args)))

    def close(self):
        self.engine.graph.close_all()


@pytest.fixture
def compare(tmp_path):
    sides = []

    def run(script, names=(), backed=()):
        results = []
        for cls in (Ref, Ours):
            d = tmp_path / cls.__name__
            d.mkdir()
            _images(d, names, backed)
            side = cls(d)
            sides.append(side)
            results.append(side.run(script))
        ref, ours = results
        for i, (a, b) in enumerate(zip(ref, ours)):
            assert a == b, "step %d %s: qsd %r != ours %r" % (i, script[i], a, b)
        return ref, sides
    yield run
    for s in sides:
        s.close()


def qcow2(name, f, **kw):
    return ("blockdev-add", {"driver": "qcow2", "node-name": name,
                             "file": {"driver": "file", "filename": "{D}/%s" % f,
                                      "node-name": name + "f"}, **kw})


Q = ("query-named-block-nodes", {})


def sync(**a):
    return ("blockdev-snapshot-sync", a)


def snap(node, overlay):
    return ("blockdev-snapshot", {"node": node, "overlay": overlay})


def test_snapshot_sync_errors_and_success(compare):
    ref, _ = compare([
        qcow2("top", "base.qcow2"),
        sync(**{"node-name": "nope", "snapshot-file": "{D}/s1.qcow2"}),
        sync(**{"device": "nope", "snapshot-file": "{D}/s1.qcow2"}),
        sync(**{"snapshot-file": "{D}/s1.qcow2"}),
        sync(**{"device": "top", "snapshot-file": "{D}/s1.qcow2"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.qcow2"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.qcow2",
                "snapshot-node-name": "top"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.qcow2",
                "snapshot-node-name": "topf"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/no/s1.qcow2",
                "snapshot-node-name": "s1"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.qcow2",
                "snapshot-node-name": "s1", "mode": "existing"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.qcow2",
                "snapshot-node-name": "s1", "format": "nope"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.raw",
                "snapshot-node-name": "s1", "format": "raw"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s1.qcow2",
                "snapshot-node-name": "s1", "mode": "bogus"}),
        Q,
        # the image is created before the node-name is checked by the open
        sync(**{"node-name": "top", "snapshot-file": "{D}/s0.qcow2",
                "snapshot-node-name": "1bad"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s0.qcow2",
                "snapshot-node-name": "s0", "mode": "existing"}),
        Q,   # nothing uses s0: closed again, top is read-only now
        ("blockdev-add", {"driver": "raw", "node-name": "user", "file": "top"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s2.qcow2",
                "snapshot-node-name": "s2"}),
        Q,
        sync(**{"node-name": "s2", "snapshot-file": "{D}/s3.qcow2",
                "snapshot-node-name": "s3", "mode": "existing"}),
        sync(**{"node-name": "top", "snapshot-file": "{D}/s3.qcow2",
                "snapshot-node-name": "s3"}),
        sync(**{"node-name": "s2", "snapshot-file": "{D}/s3.qcow2",
                "snapshot-node-name": "s3", "format": "qcow2"}),
        Q,
        ("blockdev-del", {"node-name": "s3"}),
        ("blockdev-del", {"node-name": "user"}),
        Q,
    ], names=("base",))
    assert ref[-5][1] == {"return": {}}
    assert ("s3", "qcow2", True, 2, "{D}/s3.qcow2") in ref[-4][1]["return"]


def test_snapshot_errors_and_success(compare):
    compare([
        qcow2("b", "base.qcow2"),
        qcow2("ovb", "ovb.qcow2"),
        qcow2("ov", "ov.qcow2", backing=None),
        snap("b", "nope"), snap("nope", "ov"),
        snap("b", "ovb"),                      # has a backing child
        snap("b", "ovf"),                      # file node: no backing support
        ("blockdev-add", {"driver": "raw", "node-name": "ovuser", "file": "ov"}),
        snap("b", "ov"),                       # in use
        ("blockdev-add", {"driver": "blkdebug", "node-name": "cor", "image": "ovuser"}),
        snap("b", "cor"),
        ("blockdev-del", {"node-name": "cor"}),
        ("blockdev-del", {"node-name": "ovuser"}),
        ("blockdev-add", {"driver": "raw", "node-name": "buser", "file": "b"}),
        snap("b", "ov"),
        Q,
        snap("b", "ov"),                       # b is a backing node now
        qcow2("ov2", "ov2.qcow2", backing=None, **{"read-only": True}),
        snap("ov", "ov2"),                     # ro overlay over a node used by buser
        Q,
        ("blockdev-del", {"node-name": "ov2"}),
        Q,
    ], names=("base", "other", "ov", "ov2"), backed=(("ovb", "other"),))


def test_snapshot_blocked_by_job(compare):
    compare([
        qcow2("b", "b.qcow2"), qcow2("t", "t.qcow2"), qcow2("ov", "ov.qcow2", backing=None),
        ("blockdev-mirror", {"job-id": "j", "device": "b", "target": "t", "sync": "none"}),
        snap("b", "ov"), snap("t", "ov"),
        sync(**{"node-name": "b", "snapshot-file": "{D}/x.qcow2", "snapshot-node-name": "x"}),
        ("block-job-cancel", {"device": "j", "force": True}),
    ], names=("b", "t", "ov"))


def _io(d, *args):
    qemu_io = require_tool("qemu-io")
    r = subprocess.run([qemu_io, "-r", "-U", *args], capture_output=True, text=True)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), (args, r.stdout, r.stderr)
    return r.stdout


def _info(path):
    r = subprocess.run([require_tool("qemu-img"), "info", "--output=json", "-U", path],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("how", ["sync-device", "sync-node", "snapshot"])
def test_data_through_chain(tmp_path, how):
    """Writes before the snapshot stay in the base, writes after land in the overlay."""
    d = str(tmp_path)
    _images(d, ("base",) + (("ov",) if how == "snapshot" else ()))
    e = QMPEngine()
    ok = {"return": {}}
    assert e.execute("blockdev-add", _sub(qcow2("top", "base.qcow2")[1], d)) == ok
    blk = create_device(e.graph, "dev0", "top")
    blk.pwrite(0, b"\x11" * 65536)
    blk.pwrite(65536, b"\x22" * 65536)
    if how == "sync-device":
        r = e.execute("blockdev-snapshot-sync", {"device": "dev0",
                                                 "snapshot-file": d + "/ov.qcow2"})
    elif how == "sync-node":
        r = e.execute("blockdev-snapshot-sync", {"node-name": "top", "snapshot-node-name": "o",
                                                 "snapshot-file": d + "/ov.qcow2"})
    else:
        assert e.execute("blockdev-add", _sub(qcow2("o", "ov.qcow2", backing=None)[1], d)) == ok
        r = e.execute("blockdev-snapshot", {"node": "top", "overlay": "o"})
    assert r == ok, r
    top = blk.root_node
    assert top.node_name != "top" and top.backing is e.graph.find_node("top")
    assert e.graph.find_node("top").read_only
    blk.pwrite(65536, b"\x33" * 65536)
    blk.pwrite(3 * 65536, b"\x44" * 65536)
    assert blk.pread(0, 4 * 65536) == (b"\x11" * 65536 + b"\x33" * 65536 + b"\0" * 65536
                                       + b"\x44" * 65536)
    e.graph.close_all()
    base, ov = d + "/base.qcow2", d + "/ov.qcow2"
    info = _info(ov)
    if how == "snapshot":
        # QEMU does not write the header: the overlay was made without a backing file
        assert "backing-filename" not in info
        chain = ["-c", "json:" + json.dumps({"driver": "qcow2", "file": {
            "driver": "file", "filename": ov}, "backing": {
            "driver": "qcow2", "file": {"driver": "file", "filename": base}}})]
    else:
        assert info["backing-filename"] == base
        assert info["backing-filename-format"] == "qcow2"
        chain = [ov]
    _io(d, "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 64k 64k",
        "-c", "read -P 0 128k 896k", base)
    read = ("-c", "read -P 0x11 0 64k", "-c", "read -P 0x33 64k 64k",
            "-c", "read -P 0 128k 64k", "-c", "read -P 0x44 192k 64k",
            "-c", "read -P 0 256k 768k")
    _io(d, *read, chain[-1])
    # the overlay alone holds only the new data
    _io(d, "-c", "read -P 0x33 64k 64k", "-c", "read -P 0x44 192k 64k",
        "-c", "read -P 0 0 64k", "-f", "qcow2",
        "json:" + json.dumps({"driver": "qcow2", "backing": None,
                              "file": {"driver": "file", "filename": ov}}))
