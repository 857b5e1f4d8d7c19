"""The same QMP scripts against qemu-storage-daemon and `blockengine serve`: the bytes
on the wire (responses, errors, parse errors), events and the images left behind."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.qmp.test_server import Raw, Serve
from tests.tooling import require_tool


class RefServe(Serve):
    """qemu-storage-daemon with the same command line as Serve."""

    def __init__(self, binary, tmp, extra=()):
        import os
        import sys
        import time
        self.socks = [str(tmp / "m0.sock")]
        self.proc = subprocess.Popen(
            [binary, "--chardev", f"socket,id=m0,path={self.socks[0]},server=on,wait=off",
             "--monitor", "chardev=m0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socks[0]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.proc.stderr.read().decode())
            time.sleep(0.02)
        del sys


@pytest.fixture
def both(tmp_path):
    binary = require_tool("qemu-storage-daemon")
    servers = []

    def start(extra_for=lambda d: ()):
        for side in ("ref", "ours"):
            d = tmp_path / side
            d.mkdir()
            servers.append(RefServe(binary, d, extra_for(d)) if side == "ref"
                           else Serve(d, monitors=1, extra=extra_for(d)))
        clients = []
        for s in servers:
            c = Raw(s.socks[0])
            c.line()
            clients.append(c)
        return clients
    yield start
    for s in servers:
        s.stop()


def exchange(client: Raw, data: bytes) -> list[bytes]:
    """Send data; collect the lines answered to it and to a closing marker request."""
    client.send(data + b'{"execute":"qmp_capabilities","id":"end"}')
    lines = []
    while True:
        line = client.line()
        if json.loads(line).get("id") == "end":
            return lines
        lines.append(line)


WIRE = [
    b'{"execute":"qmp_capabilities"}',
    b'{"execute": }', b"}", b"@", b"[1]", b'"foo"', b"{'execute':'nope'}",
    b'{"a":1}}', b'{"execute":"nope","id":{"x":[1,2.5,null,true]}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co"},"id":"\\u00e9\\ud83d\\ude00"}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","x":1}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0"}}',
    b'{"execute":"x-blockdev-change","arguments":{"parent":"n0","node":"n0"}}',
    b'{"execute":"qmp_capabilities"}', b'{"execute":"qmp_capabilities","x":1}',
    b'{"execute":1}', b'{"id":1}', b'{"execute":"blockdev-del","arguments":[]}',
    b'{"a":"\\x"}', b'{"a":01}', b'[1 2]', b'{"a":"\\ud800"}', b'{"a":tru}',
    b'["\xff"]', b'{"a":"\xc3"}',
]


def test_wire_bytes_are_the_same(both):
    ref, ours = both()
    for data in WIRE:
        assert exchange(ours, data) == exchange(ref, data), data


def test_quorum_and_backing_scripts(both, tmp_path):
    def extra(d):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "base.raw"), "1M"],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "1M"],
                       check=True)
        for i in range(3):
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / f"c{i}.raw"),
                            "1M"], check=True)
        args = []
        for i in range(3):
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={d}/c{i}.raw"]
        return tuple(args)
    clients = both(extra)
    script = [
        ("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 0,
                          "children": ["f0"]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 3,
                          "children": ["f0", "f1"]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                          "children": ["f0", "f1"], "blkverify": True,
                          "rewrite-corrupted": True}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                          "children": ["f0", "f1"], "read-pattern": "fifo"}),
        ("x-blockdev-change", {"parent": "q", "node": "f0"}),
        ("x-blockdev-change", {"parent": "q", "node": "f2"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.1"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.2"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.0"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.9"}),
        ("x-blockdev-change", {"parent": "q", "node": "f2"}),
        ("change-backing-file", {"device": "q", "image-node-name": "q",
                                 "backing-file": "x"}),
        ("change-backing-file", {"device": "nope", "image-node-name": "q",
                                 "backing-file": "x"}),
        ("change-backing-file", {"device": "q", "image-node-name": "nope",
                                 "backing-file": "x"}),
        ("block_passwd", {"password": "x"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qc",
                          "file": {"driver": "file", "filename": "DIR/a.qcow2"}}),
        ("block_resize", {"node-name": "qc", "size": 2 << 20}),
        ("blockdev-del", {"node-name": "q"}),
        ("blockdev-del", {"node-name": "qc"}),
    ]
    results = []
    for client, side in zip(clients, ("ref", "ours")):
        out = []
        for name, args in script:
            if name == "blockdev-add" and "file" in args:
                args = json.loads(json.dumps(args).replace("DIR", str(tmp_path / side)))
            req = json.dumps({"execute": name, "arguments": args}).encode()
            out.append([json.loads(x) for x in exchange(client, req)])
        results.append(out)
    ref, ours = results
    for (name, args), a, b in zip(script, ref, ours):
        if name == "block_passwd":
            assert a[-1]["error"]["class"] == "CommandNotFound"
            assert b[-1]["error"]["class"] == "GenericError"
            continue
        strip = [{k: v for k, v in m.items() if k != "timestamp"} for m in a]
        assert [{k: v for k, v in m.items() if k != "timestamp"} for m in b] == strip, name
    # final images are the same size and content
    for name in ("a.qcow2", "c0.raw", "c1.raw", "c2.raw"):
        ra = subprocess.run(["qemu-img", "info", "--output=json", "-U",
                             str(tmp_path / "ref" / name)], capture_output=True, text=True)
        rb = subprocess.run(["qemu-img", "info", "--output=json", "-U",
                             str(tmp_path / "ours" / name)], capture_output=True, text=True)
        ia, ib = json.loads(ra.stdout), json.loads(rb.stdout)
        assert ia["virtual-size"] == ib["virtual-size"], name
        cmp = subprocess.run(["qemu-img", "compare", "-U", str(tmp_path / "ref" / name),
                              str(tmp_path / "ours" / name)], capture_output=True)
        assert cmp.returncode == 0, (name, cmp.stdout)
