"""The same QMP scripts against qemu-storage-daemon and `blockengine serve`: the bytes
on the wire (responses, errors, parse errors), events and the images left behind."""
from __future__ import annotations

import json
import re
import subprocess
import time

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
            for attempt in range(100):      # the socket exists a moment before it listens
                try:
                    c = Raw(s.socks[0])
                    break
                except ConnectionRefusedError:
                    if attempt == 99:
                        raise
                    time.sleep(0.05)
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


# ---- blockdev-create: the same management script against both daemons ----------------------
MiB = 1 << 20
CREATE_SCRIPT = [
    ("blockdev-create", {"job-id": "mk", "options": {"driver": "file", "size": 0,
                                                     "filename": "DIR/disk.qcow2"}}),
    ("query-jobs", {}),
    ("job-dismiss", {"id": "mk"}),
    ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "DIR/disk.qcow2"}),
    ("blockdev-create", {"job-id": "fmt", "options": {
        "driver": "qcow2", "file": "f0", "size": 64 * MiB, "cluster-size": 65536,
        "backing-file": "base.qcow2", "backing-fmt": "qcow2", "lazy-refcounts": True}}),
    ("query-jobs", {}),
    ("query-block-jobs", {}),
    ("job-dismiss", {"id": "fmt"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": "f0", "backing": None}),
    ("block_resize", {"node-name": "disk", "size": 128 * MiB}),
    ("blockdev-del", {"node-name": "disk"}),
    # an external data file, opened inline by the create
    ("blockdev-create", {"job-id": "mkd", "options": {"driver": "file", "size": 0,
                                                      "filename": "DIR/data.raw"}}),
    ("job-dismiss", {"id": "mkd"}),
    ("blockdev-create", {"job-id": "mke", "options": {"driver": "file", "size": 0,
                                                      "filename": "DIR/ext.qcow2"}}),
    ("job-dismiss", {"id": "mke"}),
    ("blockdev-create", {"job-id": "ext", "options": {
        "driver": "qcow2", "file": {"driver": "file", "filename": "DIR/ext.qcow2"},
        "data-file": {"driver": "file", "filename": "DIR/data.raw"}, "data-file-raw": True,
        "size": 4 * MiB}}),
    ("job-dismiss", {"id": "ext"}),
    # LUKS with the --object secret
    ("blockdev-create", {"job-id": "mkl", "options": {"driver": "file", "size": 0,
                                                      "filename": "DIR/disk.luks"}}),
    ("job-dismiss", {"id": "mkl"}),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "DIR/disk.luks"}),
    ("blockdev-create", {"job-id": "luks", "options": {
        "driver": "luks", "file": "f1", "size": MiB, "key-secret": "sec0", "iter-time": 10,
        "preallocation": "metadata"}}),
    ("job-dismiss", {"id": "luks"}),
    # file options (nocow and the extent size hint are hints)
    ("blockdev-create", {"job-id": "full", "options": {
        "driver": "file", "filename": "DIR/full.raw", "size": MiB + 1,
        "preallocation": "full", "nocow": True, "extent-size-hint": MiB}}),
    ("blockdev-create", {"job-id": "falloc", "options": {
        "driver": "file", "filename": "DIR/falloc.raw", "size": 2 * MiB,
        "preallocation": "falloc"}}),
    *[("job-dismiss", {"id": job}) for job in ("full", "falloc")],
    # qcow2 format options: preallocation, v2, small clusters, extended L2, zstd
    ("blockdev-create", {"job-id": "mkp", "options": {"driver": "file", "size": 0,
                                                      "filename": "DIR/p.qcow2"}}),
    ("blockdev-create", {"job-id": "mkx", "options": {"driver": "file", "size": 0,
                                                      "filename": "DIR/x.qcow2"}}),
    ("blockdev-create", {"job-id": "p", "options": {
        "driver": "qcow2", "file": {"driver": "file", "filename": "DIR/p.qcow2"},
        "size": 5 * MiB, "version": "v2", "cluster-size": 4096,
        "preallocation": "metadata"}}),
    ("blockdev-create", {"job-id": "x", "options": {
        "driver": "qcow2", "file": {"driver": "file", "filename": "DIR/x.qcow2"},
        "size": 5 * MiB + 512, "extended-l2": True, "compression-type": "zstd",
        "refcount-bits": 1, "preallocation": "full"}}),
    *[("job-dismiss", {"id": job}) for job in ("mkp", "mkx", "p", "x")],
    # VMDK: monolithic subformats on 'file'; flat and split ones with their 'extents'
    *[step for name, node in (("s.vmdk", "vs"), ("z.vmdk", "vz"), ("f.vmdk", "vf"),
                              ("f-flat.vmdk", "vff"), ("t.vmdk", "vt"), ("t1.vmdk", "vt1"),
                              ("bad.vmdk", "vbad"))
      for step in (("blockdev-create", {"job-id": "mk", "options": {
                        "driver": "file", "size": 0, "filename": "DIR/" + name}}),
                   ("job-dismiss", {"id": "mk"}),
                   ("blockdev-add", {"driver": "file", "node-name": node,
                                     "filename": "DIR/" + name}))],
    ("blockdev-create", {"job-id": "v1", "options": {"driver": "vmdk", "file": "vz",
                                                     "size": 3 * MiB, "zeroed-grain": True,
                                                     "subformat": "streamOptimized"}}),
    ("blockdev-create", {"job-id": "v2", "options": {"driver": "vmdk", "file": "vs",
                                                     "size": 3 * MiB, "extents": ["vff"]}}),
    ("query-jobs", {}),
    ("blockdev-create", {"job-id": "v3", "options": {"driver": "vmdk", "file": "vs",
                                                     "size": 3 * MiB,
                                                     "backing-file": "z.vmdk"}}),
    ("blockdev-create", {"job-id": "v4", "options": {
        "driver": "vmdk", "file": "vf", "size": 3 * MiB, "subformat": "monolithicFlat",
        "extents": ["vff"], "adapter-type": "lsilogic", "hwversion": "7",
        "toolsversion": "10240"}}),
    ("blockdev-create", {"job-id": "v5", "options": {
        "driver": "vmdk", "file": "vt", "size": 3 * MiB, "subformat": "twoGbMaxExtentSparse",
        "extents": ["vt1"]}}),
    ("blockdev-create", {"job-id": "v6", "options": {"driver": "vmdk", "file": "vbad",
                                                     "size": 3 * MiB + 1}}),
    ("blockdev-create", {"job-id": "v7", "options": {
        "driver": "vmdk", "file": "vbad", "size": MiB, "subformat": "monolithicFlat",
        "zeroed-grain": True, "extents": ["vff"]}}),
    ("blockdev-create", {"job-id": "v8", "options": {
        "driver": "vmdk", "file": "vbad", "size": MiB, "subformat": "twoGbMaxExtentFlat"}}),
    ("query-jobs", {}),
    *[("job-dismiss", {"id": "v%d" % i}) for i in range(1, 9)],
    # errors: refused commands, then jobs that fail
    ("blockdev-create", {"job-id": "1x", "options": {"driver": "file", "filename": "DIR/x",
                                                     "size": 0}}),
    ("blockdev-create", {"job-id": "e", "options": {"driver": "null-co"}}),
    ("blockdev-create", {"job-id": "e", "options": {"driver": "raw", "file": "f0"}}),
    ("blockdev-create", {"job-id": "e", "options": {"driver": "qcow2", "file": "f0"}}),
    ("blockdev-create", {"job-id": "e1", "options": {"driver": "qcow2", "file": "nope",
                                                     "size": MiB}}),
    ("blockdev-create", {"job-id": "e1", "options": {"driver": "file", "filename": "DIR/x",
                                                     "size": 0}}),
    ("block-job-cancel", {"device": "e1"}),
    ("query-jobs", {}),
    ("job-dismiss", {"id": "e1"}),
    ("blockdev-create", {"job-id": "e2", "options": {"driver": "qcow2", "file": "f0",
                                                     "size": MiB, "cluster-size": 1000}}),
    ("query-jobs", {}),
    ("job-dismiss", {"id": "e2"}),
    ("blockdev-create", {"job-id": "e3", "options": {"driver": "luks", "file": "f1",
                                                     "size": MiB}}),
    ("query-jobs", {}),
    ("job-dismiss", {"id": "e3"}),
    ("blockdev-create", {"job-id": "e4", "options": {"driver": "file", "size": MiB,
                                                     "filename": "DIR/no/such"}}),
    ("query-jobs", {}),
    ("job-dismiss", {"id": "e4"}),
]


def _run_create_script(client: Raw, directory) -> list:
    """Each command's response and the events up to it (for a started blockdev-create,
    up to the job's 'concluded'), timestamps and the directory name taken out.  A step
    that hit QEMU's PBKDF2 flake is run again."""
    def here(value):
        return json.loads(json.dumps(value).replace("DIR", str(directory)))

    def strip(message):
        return json.loads(json.dumps({k: v for k, v in message.items() if k != "timestamp"})
                          .replace(str(directory), "DIR"))

    results = []
    while len(results) < len(CREATE_SCRIPT):
        name, args = CREATE_SCRIPT[len(results)]
        client.send(json.dumps({"execute": name, "arguments": here(args)}).encode())
        events, response = [], None
        while response is None:
            message = client.msg()
            if "event" in message:
                events.append(strip(message))
            else:
                response = strip(message)
        if name == "blockdev-create" and "return" in response:
            while not any(e["data"]["status"] == "concluded" for e in events):
                events.append(strip(client.msg()))
            if _pbkdf_flake(client, args["job-id"]):
                continue
        results.append((name, response, events))
    return results


def _pbkdf_flake(client: Raw, job_id: str) -> bool:
    """Whether the job failed on QEMU 7.2's PBKDF2 benchmark flake ("Unable to get
    accurate CPU usage", a 0 ms CPU-time sample); then the job is dismissed unseen."""
    client.send(b'{"execute":"query-jobs"}')
    [job] = [j for j in client.response()["return"] if j["id"] == job_id]
    if "Unable to get accurate CPU usage" not in job.get("error", ""):
        return False
    client.send(json.dumps({"execute": "job-dismiss", "arguments": {"id": job_id}}).encode())
    seen = []                                           # the response and the 'null' event
    while len(seen) < 2:
        seen.append(client.msg())
    return True


def _vmdk_without_cids(path) -> tuple:
    """A VMDK file as (bytes before its descriptor text, the text with the random CID
    and parentCID values replaced, the bytes after it from the first non-zero one, the
    file size unless the file is only the text: a descriptor file's length follows the
    lengths of the CIDs' hex digits)."""
    data = path.read_bytes()
    start = data.find(b"# Disk DescriptorFile")
    if start < 0:
        return data, b"", b"", len(data)
    end = data.find(b"\0", start)
    end = len(data) if end < 0 else end
    text = re.sub(rb"CID=[0-9a-f]+", b"CID=?", data[start:end])
    return data[:start], text, data[end:].lstrip(b"\0"), len(data) if start else None


def test_blockdev_create_script(both, tmp_path):
    def extra(d):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"),
                        "64M"], check=True)
        return ("--object", "secret,id=sec0,data=hunter2")
    clients = both(extra)
    for c in clients:
        c.sock.settimeout(120)          # PBKDF2 runs and a loaded machine
        c.send(b'{"execute":"qmp_capabilities"}')
        c.response()
    ref, ours = (_run_create_script(c, tmp_path / side)
                 for c, side in zip(clients, ("ref", "ours")))
    for step_ref, step_ours in zip(ref, ours):
        assert step_ours == step_ref
    assert len(ref) == len(ours) == len(CREATE_SCRIPT)
    qemu_img = require_tool("qemu-img")

    def info(side, name, *opts):
        out = subprocess.run([qemu_img, "info", "-U", "--output=json", *opts,
                              str(tmp_path / side / name)],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.replace(str(tmp_path / side), "DIR"))

    # the qcow2 images are the same bytes (disk.qcow2 also after its resize)
    for name in ("disk.qcow2", "data.raw", "p.qcow2", "x.qcow2", "full.raw", "falloc.raw"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    for name in ("disk.qcow2", "ext.qcow2", "p.qcow2", "x.qcow2"):
        # the same bytes, but the host file system may allocate them differently
        ours, ref = info("ours", name), info("ref", name)
        assert ours.pop("actual-size") > 0 and ref.pop("actual-size") > 0
        assert ours == ref
        for side in ("ref", "ours"):
            check = subprocess.run([qemu_img, "check", "-U", str(tmp_path / side / name)],
                                   capture_output=True, text=True)
            assert check.returncode == 0, (side, name, check.stdout)
    for side in ("ref", "ours"):          # preallocated: every byte has its block
        for name, size in (("full.raw", MiB + 1), ("falloc.raw", 2 * MiB)):
            assert (tmp_path / side / name).stat().st_blocks * 512 >= size, (side, name)
    # VMDK: the same bytes but for the random CIDs of the descriptors
    for name in ("s.vmdk", "z.vmdk", "f.vmdk", "f-flat.vmdk", "t.vmdk", "t1.vmdk",
                 "bad.vmdk"):
        assert _vmdk_without_cids(tmp_path / "ours" / name) == _vmdk_without_cids(
            tmp_path / "ref" / name), name
    for name in ("s.vmdk", "z.vmdk", "f.vmdk", "t.vmdk"):
        for side in ("ref", "ours"):
            check = subprocess.run([qemu_img, "check", "-U", str(tmp_path / side / name)],
                                   capture_output=True, text=True)
            assert check.returncode == 0, (side, name, check.stdout)
    # LUKS: the same layout; keys, salts and iteration counts are per volume
    luks_ref, luks_ours = info("ref", "disk.luks"), info("ours", "disk.luks")
    for volume in (luks_ref, luks_ours):
        data = volume["format-specific"]["data"]
        del data["uuid"], data["master-key-iters"], data["slots"][0]["iters"]
        del volume["actual-size"]
    assert luks_ours == luks_ref
