"""blockdev-add of encrypted qcow2 images (QEMU 7.2's 'encrypt' member: legacy AES and
LUKS) side by side with qemu-storage-daemon: the same answers, the same node
description, and a refused add leaves no node behind."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tooling import require_tool

ROOT = Path(__file__).resolve().parents[2]
SECRET = ["--object", "secret,id=s0,data=pw"]


def _session(argv: list[str], sock: str, requests: list[dict]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([*argv, *SECRET, "--chardev",
                             "socket,id=m,path=%s,server=on,wait=off" % sock,
                             "--monitor", "chardev=m"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        deadline = time.monotonic() + 20
        while True:
            try:
                s.connect(sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        f = s.makefile("rwb")
        f.readline()
        out = []
        for req in [{"execute": "qmp_capabilities"}, *requests]:
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    out.append(msg)
                    break
        s.close()
        return out[1:]
    finally:
        proc.terminate()
        proc.wait(10)


def _node(answer: dict, name: str) -> dict:
    node = next(n for n in answer["return"] if n["node-name"] == name)
    node = dict(node)
    node.pop("encryption_key_missing", None)     # (QEMU 7.2 no longer has it)
    node["image"] = {k: v for k, v in node["image"].items() if k != "actual-size"}
    return node


@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_blockdev_add_encrypted_qcow2(tmp_path, fmt):
    qemu_img = require_tool("qemu-img")
    qsd = require_tool("qemu-storage-daemon")
    image = str(tmp_path / "e.qcow2")
    # LUKS: our create (qemu-img's PBKDF timing fails now and then on a busy host)
    tool = [sys.executable, "-m", "blockengine.cli", "img"] if fmt == "luks" else [qemu_img]
    subprocess.run([*tool, "create", "-q", "-f", "qcow2", *SECRET, "-o",
                    "encrypt.format=%s,encrypt.key-secret=s0%s"
                    % (fmt, ",encrypt.iter-time=10" if fmt == "luks" else ""),
                    image, "1M"], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    file_ref = {"driver": "file", "filename": image}
    requests = [
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "bad", "file": file_ref,
            "encrypt": {"format": "luks" if fmt == "aes" else "aes", "key-secret": "s0"}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "nokey", "file": file_ref}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "a", "file": file_ref,
            "encrypt": {"format": fmt, "key-secret": "s0"}}},
        {"execute": "blockdev-add", "arguments": {          # the image is locked now
            "driver": "qcow2", "node-name": "dup", "file": file_ref,
            "encrypt": {"format": fmt, "key-secret": "s0"}}},
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    ]
    ref = _session([qsd], str(tmp_path / "q.sock"), requests)
    ours = _session([sys.executable, "-m", "blockengine.cli.serve"],
                    str(tmp_path / "b.sock"), requests)
    assert ours[:4] == ref[:4]
    assert _node(ours[4], "a") == _node(ref[4], "a")
    # the refused adds left nothing: the image node and its file node only
    assert len(ours[4]["return"]) == len(ref[4]["return"]) == 2
