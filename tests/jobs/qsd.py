"""A tiny QMP client around a qemu-storage-daemon process (reference behaviour)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time


class QSD:
    def __init__(self, binary: str = "qemu-storage-daemon", args: tuple = ()):
        self.dir = tempfile.mkdtemp(prefix="qsd")
        self.sock_path = os.path.join(self.dir, "m.sock")
        self.proc = subprocess.Popen(
            [binary, "--chardev", f"socket,id=m,path={self.sock_path},server=on,wait=off",
             "--monitor", "chardev=m", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start: %s"
                                   % self.proc.stderr.read().decode())
            time.sleep(0.01)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.sock_path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._read()                                   # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise RuntimeError("qemu-storage-daemon closed the monitor")
        return json.loads(line)

    def raw(self, _cmd: str, **args) -> dict:
        """Send a command; return the response ({'return':..} or {'error':..})."""
        msg = {"execute": _cmd}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def cmd(self, _cmd: str, **args):
        r = self.raw(_cmd, **args)
        if "error" in r:
            raise RuntimeError(r["error"]["desc"])
        return r["return"]

    def error(self, _cmd: str, **args) -> str:
        r = self.raw(_cmd, **args)
        assert "error" in r, r
        return r["error"]["desc"]

    def wait_event(self, name: str, timeout: float = 20.0) -> dict:
        """Wait for (and return) the first not yet consumed event called ``name``."""
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e["event"] == name and not e.get("_seen"):
                e["_seen"] = True
                return e
        self.sock.settimeout(timeout)
        while time.monotonic() < deadline:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                if r["event"] == name:
                    r["_seen"] = True
                    return r
        raise TimeoutError(name)

    def event_list(self) -> list:
        """Events so far as (name, data-without-timestamps) pairs."""
        return [(e["event"], e.get("data", {})) for e in self.events]

    def close(self) -> None:
        try:
            self.raw("quit")
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
