"""blockengine serve through the real qemu.qmp client and raw sockets: greeting,
negotiation, ids, error classes, events to every monitor, malformed input, quit."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from qemu.qmp import ExecuteError, QMPClient

from blockengine.qapi import schema

ROOT = Path(__file__).resolve().parents[2]


class Serve:
    """A `python3 -m blockengine.cli.serve` process with unix monitors m0..mN-1."""

    def __init__(self, tmp: Path, monitors: int = 2, extra: tuple = ()):
        self.dir = tmp
        self.socks = [str(tmp / f"m{i}.sock") for i in range(monitors)]
        args = []
        for i, path in enumerate(self.socks):
            args += ["--chardev", f"socket,id=m{i},path={path},server=on,wait=off",
                     "--monitor", f"chardev=m{i}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "blockengine.cli.serve",
                                      *args, *extra], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not all(os.path.exists(p) for p in self.socks):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("serve did not start: %s" % self.proc.stderr.read().decode())
            time.sleep(0.02)

    def raw(self, index: int = 0) -> "Raw":
        return Raw(self.socks[index])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Raw:
    """A raw socket client: send bytes, read CRLF-terminated messages."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def msg(self) -> dict:
        return json.loads(self.line())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> dict:
        while True:
            m = self.msg()
            if "event" not in m:
                return m

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path, extra=("--blockdev", "driver=null-co,node-name=n0,size=1048576",
                               "--device", "id=cd0,removable=on",
                               "--device", "id=disk0,drive=n0"))
    yield s
    s.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_greeting_negotiation_ids_and_errors_with_qemu_qmp(serve):
    async def go():
        qmp = QMPClient("t")
        await qmp.connect(serve.socks[0])
        try:
            assert qmp.greeting.QMP.version["qemu"]["major"] == 7
            assert list(qmp.greeting.QMP.capabilities) == ["oob"]
            version = await qmp.execute("query-version")
            assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"blockdev-add", "quit", "blockdev-open-tray",
                    "block_set_io_throttle"} <= names
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("nope")
            assert e.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("blockdev-open-tray", {"device": "nope"})
            assert e.value.error_class == "DeviceNotFound"
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("blockdev-add", {"driver": "null-co"})
            assert e.value.error_class == "GenericError"
        finally:
            await qmp.disconnect()
    run(go())


def test_raw_wire_format_and_negotiation(serve):
    c = serve.raw()
    greeting = c.line()
    # QEMU's member order (its QDict hash order), as the daemon sends it
    assert greeting.startswith(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, '
                               b'"major": 7}, "package": "blockengine ')
    c.send(b'{"execute":"query-block"}')
    assert c.msg() == {"error": {"class": "CommandNotFound", "desc":
                                 "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    # two requests in one write, no separator; ids echoed (any JSON value)
    c.send(b'{"execute":"qmp_capabilities","id":1}{"execute":"blockdev-close-tray",'
           b'"arguments":{"id":"cd0"},"id":[1,"x"]}')
    assert c.line() == b'{"return": {}, "id": 1}'
    assert c.line() == b'{"return": {}, "id": [1, "x"]}'
    c.send(b'{"execute":"blockdev-close-tray","arguments":{"id":"cd0"},"id":1.5}\n')
    assert c.line() == b'{"return": {}, "id": 1.5}'
    c.close()


# a command that always answers {} while the device cd0 exists
PING = b'{"execute":"blockdev-close-tray","arguments":{"id":"cd0"},"id":%s}'

MALFORMED = [
    (b'{"execute": }', "JSON parse error, expecting value"),
    (b'}', "JSON parse error, expecting value"),
    (b'@', "JSON parse error, stray '@'"),
    (b'[1}', "JSON parse error, expected separator in list"),
    (b'{"a" 1}', "JSON parse error, missing : in object pair"),
    (b'{1:2}', "JSON parse error, key is not a string in object"),
    (b'{"a":1,"a":2}', "JSON parse error, duplicate key"),
    (b'{"a":foo}', "JSON parse error, invalid keyword 'foo'"),
    (b'[1]', "QMP input must be a JSON object"),
]


def test_malformed_input_does_not_kill_the_server(serve):
    c = serve.raw()
    c.line()
    c.send(b'{"execute":"qmp_capabilities"}')
    c.msg()
    for data, desc in MALFORMED:
        c.send(data)
        assert c.msg() == {"error": {"class": "GenericError", "desc": desc}}, data
    c.send(b"[" * 1100)
    assert c.msg()["error"]["desc"] == "JSON nesting depth limit exceeded"
    c.send(b"\n" + b"]" * 1100 + b"\n")      # resynchronise, as a client would
    c.send(b'\n' + PING % b'"ok"')
    while True:
        m = c.msg()
        if m.get("id") == "ok":
            break
    assert m == {"return": {}, "id": "ok"}
    c.close()
    # a client that disconnects in the middle of a request leaves the server intact
    d = serve.raw()
    d.line()
    d.send(b'{"execute":"qmp_capabilities"}{"execute": "query-bl')
    d.close()
    e = serve.raw()
    e.line()
    e.send(b'{"execute":"qmp_capabilities"}' + PING % b'2')
    assert e.msg() == {"return": {}} and e.msg() == {"return": {}, "id": 2}
    e.close()


def test_events_go_to_every_negotiated_monitor(serve):
    a, b = serve.raw(0), serve.raw(1)
    for c in (a, b):
        c.line()
        c.send(b'{"execute":"qmp_capabilities"}')
        assert c.msg() == {"return": {}}
    a.send(b'{"execute":"blockdev-open-tray","arguments":{"id":"cd0"}}')
    event = a.msg()
    assert a.msg() == {"return": {}}
    assert event["event"] == "DEVICE_TRAY_MOVED"
    assert event["data"] == {"device": "cd0", "id": "cd0", "tray-open": True}
    other = b.msg()
    assert other["event"] == "DEVICE_TRAY_MOVED" and other["data"] == event["data"]
    assert set(other["timestamp"]) == {"seconds", "microseconds"}
    a.close()
    b.close()


def test_one_client_per_monitor_at_a_time(serve):
    a = serve.raw(0)
    a.line()
    b = serve.raw(0)
    b.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        b.line()                 # waits until the first client leaves, as QEMU's chardev
    a.close()
    b.sock.settimeout(10)
    assert b.line().startswith(b'{"QMP"')
    b.close()


def test_quit_closes_the_graph_and_exits(tmp_path):
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(4096))
    pidfile = tmp_path / "pid"
    s = Serve(tmp_path, monitors=1, extra=(
        "--blockdev", f"driver=file,node-name=f,filename={img}", "--pidfile", str(pidfile)))
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(pidfile.read_text()) == s.proc.pid
        c = s.raw()
        c.line()
        c.send(b'{"execute":"qmp_capabilities"}{"execute":"block_resize",'
               b'"arguments":{"node-name":"f","size":8192}}{"execute":"quit"}')
        assert [c.msg(), c.msg(), c.msg()] == [{"return": {}}] * 3
        assert s.proc.wait(10) == 0
        assert img.stat().st_size == 8192
    finally:
        s.stop()
    assert not os.path.exists(s.socks[0]) and not pidfile.exists()


def test_tcp_monitor(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "blockengine.cli.serve", "--chardev",
                             f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off",
                             "--monitor", "chardev=t"], env=env)
    try:
        deadline = time.monotonic() + 20
        while True:                     # wait until it listens (a failed connect attempt
            try:                        # would leave QMPClient in a half-closed state)
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)

        async def go():
            qmp = QMPClient("tcp")
            await qmp.connect(("127.0.0.1", port))
            assert await qmp.execute("query-block") == []
            try:
                await qmp.execute("quit")
                await qmp.disconnect()
            except EOFError:
                pass            # the server closes after its reply; the reader may see EOF first
        run(go())
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors_and_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "blockengine.cli.serve", *args],
                              env=env, capture_output=True, text=True, timeout=30)
    r = serve("--nbd-server", "addr.type=unix,addr.path=/tmp/x")
    assert r.returncode == 1
    assert r.stderr == ("qemu-storage-daemon: --nbd-server addr.type=unix,addr.path=/tmp/x: "
                        "--nbd-server is not yet supported by blockengine\n")
    r = serve("--blockdev", "driver=null-co,node-name=n,size=abc")
    assert (r.returncode, r.stderr) == (1, "qemu-storage-daemon: --blockdev driver=null-co,"
                                        "node-name=n,size=abc: Parameter 'size' expects "
                                        "integer\n")
    r = serve("--device", "id=d,drive=nope")
    assert "Property 'drive' can't find value 'nope'" in r.stderr and r.returncode == 1
    assert serve("--help").stdout.startswith("Usage: qemu-storage-daemon [options]\n")
    assert serve("-V").stdout.startswith("qemu-storage-daemon version 7.2.0")


# ---- generated commands: the server answers everything and stays up ----------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                     st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) |
                     st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_SAFE = sorted(name for name in schema.COMMANDS if name not in ("quit",))


def _argument_names(name):
    data = schema.COMMANDS[name].get("data")
    if isinstance(data, str):
        data = schema.STRUCTS.get(data, {}).get("data", {})
    return [k.lstrip("*") for k in (data or {})]


def _as_qemu_reads_it(value):
    """Integers beyond int64/uint64 become doubles in QEMU's parser."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -2**63 <= value < 2**64 else float(value)
    if isinstance(value, list):
        return [_as_qemu_reads_it(v) for v in value]
    return {k: _as_qemu_reads_it(v) for k, v in value.items()}


@st.composite
def _requests(draw):
    name = draw(st.sampled_from(_SAFE + ["nope"]))
    names = _argument_names(name) if name in schema.COMMANDS else []
    keys = draw(st.lists(st.sampled_from(names + ["bogus"]), max_size=4, unique=True))
    req = {"execute": name}
    if keys or draw(st.booleans()):
        req["arguments"] = {k: draw(_json) for k in keys}
    if draw(st.booleans()):
        req["id"] = draw(_json)
    return req


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("fuzz"), monitors=1,
              extra=("--device", "id=cd0,removable=on"))
    c = s.raw()
    c.line()
    c.send(b'{"execute":"qmp_capabilities"}')
    c.msg()
    yield c
    c.close()
    s.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_requests())
def test_generated_commands_always_get_an_answer(fuzz_server, request_):
    c = fuzz_server
    c.send(json.dumps(request_).encode())
    response = c.response()
    assert ("return" in response) != ("error" in response), response
    if "error" in response:
        assert response["error"]["class"] in ("GenericError", "CommandNotFound",
                                              "DeviceNotFound", "DeviceNotActive")
    if "id" in request_:
        assert response["id"] == _as_qemu_reads_it(request_["id"])
    c.send(PING % b'"alive"')
    assert c.response() == {"return": {}, "id": "alive"}
