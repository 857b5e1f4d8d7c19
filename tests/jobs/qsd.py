"""A tiny QMP client around a qemu-storage-daemon process (reference behaviour)."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import tempfile
import time


class _LineFile:
    """File-like access to the monitor socket sharing QSD's read buffer."""

    def __init__(self, qsd):
        self.qsd = qsd

    def write(self, data: bytes) -> int:
        self.qsd.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def readline(self) -> bytes:
        q = self.qsd
        while b"\n" not in q.buf:
            chunk = q.sock.recv(65536)
            if not chunk:
                line, q.buf = q.buf, b""
                return line
            q.buf += chunk
        line, q.buf = q.buf.split(b"\n", 1)
        return line + b"\n"


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
        while True:     # the socket file exists a moment before the daemon listens
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(self.sock_path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                self.sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.01)
        self.buf = b""
        self.file = _LineFile(self)       # raw wire access: write/flush/readline
        self.events: list[dict] = []
        self.timeout = 60.0                            # for one command's answer
        try:
            self._read(self.timeout)                   # greeting
            self.cmd("qmp_capabilities")
        except BaseException:
            self.kill()
            raise

    def _read(self, timeout: float | None = None) -> dict:
        """One JSON line; TimeoutError after ``timeout`` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise TimeoutError("no message from qemu-storage-daemon")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("qemu-storage-daemon closed the monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def raw(self, _cmd: str, **args) -> dict:
        """Send a command; return the response ({'return':..} or {'error':..})."""
        msg = {"execute": _cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while True:
            r = self._read(max(0.0, deadline - time.monotonic()))
            if "event" in r:
                self.events.append(r)
                continue
            if "QMP" in r:      # a second greeting: the daemon opened the monitor twice,
                continue        # a race of its wait=off socket seen once in CI
            return r

    def cmd(self, _cmd: str, **args):
        r = self.raw(_cmd, **args)
        if "error" in r:
            raise RuntimeError(r["error"]["desc"])
        if "return" not in r:
            raise RuntimeError("unexpected QMP message: %r" % (r,))
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
        while True:
            r = self._read(max(0.0, deadline - time.monotonic()))
            if "event" in r:
                self.events.append(r)
                if r["event"] == name:
                    r["_seen"] = True
                    return r

    def event_list(self) -> list:
        """Events so far as (name, data-without-timestamps) pairs."""
        return [(e["event"], e.get("data", {})) for e in self.events]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.timeout = 5.0
        try:
            self.raw("quit")
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
        self.sock.close()
