"""Event order around a command's reply, as qemu-storage-daemon 7.2 sends it: the
events a command raises itself come before its reply, events that jobs raise in
their own threads while the command runs come after it (in QEMU the job's coroutine
cannot run before the command returns).  A hook makes the race deterministic: the
command waits until its job has concluded before returning."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from blockengine.qmp.engine import QMPEngine
from blockengine.qmp.server import QMPServer
from tests.tooling import require_tool


class _Client:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self.file.readline()                       # greeting
        assert self.command("qmp_capabilities") == ["RETURN"]

    def command(self, name: str, arguments: dict | None = None,
                until: tuple[str, ...] = ()) -> list:
        """Send a command; the messages until both its reply and the events whose
        (status) names are ``until`` have come: "RETURN" for the reply, else the
        event's name and its data."""
        msg = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        seen = []
        while True:
            m = json.loads(self.file.readline())
            if "event" in m:
                seen.append([m["event"], m.get("data")])
            else:
                assert "error" not in m, m
                seen.append("RETURN")
            statuses = {m[1].get("status", m[0]) for m in seen if m != "RETURN"}
            if "RETURN" in seen and statuses >= set(until):
                return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    """An in-process server on a unix socket; yields (engine, socket path)."""
    engine = QMPEngine()
    srv = QMPServer(engine)
    path = str(tmp_path / "m.sock")
    srv.add_unix(path)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    yield engine, path
    srv.request_shutdown()
    thread.join(10)


def _replace(engine, name, wrapper):
    original = engine.dispatcher._commands[name].handler
    engine.dispatcher.unregister(name)
    engine.dispatcher.register(name, lambda args: wrapper(original, args))


def test_other_threads_events_follow_the_reply(server):
    engine, path = server

    def handler(args):
        engine.events.emit("JOB_STATUS_CHANGE", {"status": "created", "id": "own"})
        other = threading.Thread(target=engine.events.emit, args=(
            "JOB_STATUS_CHANGE", {"status": "concluded", "id": "other"}))
        other.start()
        other.join()            # raised (and, before the fix, sent) before we return
        return {}
    engine.dispatcher.register("x-emit-from-thread", handler)
    client = _Client(path)
    assert client.command("x-emit-from-thread", until=("concluded",)) == [
        ["JOB_STATUS_CHANGE", {"status": "created", "id": "own"}], "RETURN",
        ["JOB_STATUS_CHANGE", {"status": "concluded", "id": "other"}]]
    client.close()


def _blockdev_create_sequence(client, filename: str) -> list:
    out = client.command("blockdev-create", {"job-id": "job0", "options": {
        "driver": "file", "filename": filename, "size": 1 << 20}}, until=("concluded",))
    out += client.command("job-dismiss", {"id": "job0"})
    return out


EXPECTED = [["JOB_STATUS_CHANGE", {"status": s, "id": "job0"}]
            for s in ("created", "running")] + ["RETURN"] + \
           [["JOB_STATUS_CHANGE", {"status": s, "id": "job0"}]
            for s in ("waiting", "pending", "concluded", "null")] + ["RETURN"]


def test_blockdev_create_job_done_before_the_reply(server, tmp_path):
    engine, path = server

    def finish_job_first(original, args):
        # the hook: the job runs to its end while the command is still running
        done = threading.Event()
        token = engine.events.subscribe(
            lambda m: m.get("data", {}).get("status") == "concluded" and done.set())
        try:
            result = original(args)
            assert done.wait(10)
        finally:
            engine.events.unsubscribe(token)
        return result
    _replace(engine, "blockdev-create", finish_job_first)
    client = _Client(path)
    assert _blockdev_create_sequence(client, str(tmp_path / "a.img")) == EXPECTED
    client.close()
    assert os.path.getsize(tmp_path / "a.img") == 1 << 20


def test_qemu_storage_daemon_sends_the_same_sequence(tmp_path):
    qsd = require_tool("qemu-storage-daemon")
    path = str(tmp_path / "q.sock")
    proc = subprocess.Popen([qsd, "--chardev", "socket,id=m,path=%s,server=on,wait=off"
                             % path, "--monitor", "chardev=m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = _Client(path)
        assert _blockdev_create_sequence(client, str(tmp_path / "a.img")) == EXPECTED
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
