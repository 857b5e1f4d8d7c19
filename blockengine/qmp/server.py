"""The QMP server's I/O: asyncio listeners in front of one QMPEngine.

Theory of operation: each listener is a QEMU socket chardev with a monitor on it.  As
in QEMU, a chardev serves one client at a time; a second client's connection waits
(unanswered) until the first one leaves.  Bytes read from a client go through a
``protocol.QMPConnection``; commands run one at a time, in request order, in a single
worker thread (QEMU runs all monitors' commands under one lock, the BQL), so the event
loop keeps reading, writing and broadcasting meanwhile.  Events are written to every
monitor that has finished capabilities negotiation.

Event order follows QEMU, where a command runs under the BQL: events the command
raises itself (a job's "created", "running") go out before its reply, but events
that jobs raise in their own threads while a command runs are held back until the
reply is written, since a QEMU job's coroutine cannot run before the command returns.  ``quit`` stops the server after
its response is written; shutdown closes the listeners, then the graph (flush + close
of every node), and unlinks the unix sockets.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

from .core import QMPSession
from .engine import QMPEngine, version_info
from .protocol import ParseError, QMPConnection, encode_message

log = logging.getLogger(__name__)


@dataclass
class Listener:
    """A bound listening socket (one chardev with a monitor)."""
    sock: socket.socket
    path: str | None = None                 # unix socket to unlink at shutdown
    first_client: socket.socket | None = None   # accepted already (wait=on)
    lock: asyncio.Lock | None = None
    server: object = None
    clients: set = field(default_factory=set)


def bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)      # QEMU unlinks a stale socket before binding
        sock.bind(path)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


class _Monitor:
    """One connected client."""

    def __init__(self, conn: QMPConnection, writer: asyncio.StreamWriter):
        self.conn = conn
        self.writer = writer

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class QMPServer:
    def __init__(self, engine: QMPEngine | None = None, *,
                 capabilities: tuple[str, ...] = ("oob",)):
        self.engine = engine or QMPEngine()
        self.capabilities = capabilities
        self.listeners: list[Listener] = []
        self.monitors: set[_Monitor] = set()
        self.quit_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "qmp-command")
        self.engine.ctx.on_quit = self._on_quit
        # events of other threads held while a command runs (see the module docstring)
        self._event_lock = threading.Lock()
        self._command_thread: int | None = None     # the worker, while replies are due
        self._command_seq = 0                       # the command running or last run
        self._held_events: list[tuple[int, bytes]] = []    # (command seq, message)

    # ---- setup ---------------------------------------------------------------------------
    def add_listener(self, sock: socket.socket, path: str | None = None,
                     first_client: socket.socket | None = None) -> None:
        self.listeners.append(Listener(sock, path, first_client))

    def add_unix(self, path: str) -> None:
        self.add_listener(bind_unix(path), path)

    def add_tcp(self, host: str, port: int) -> None:
        self.add_listener(bind_tcp(host, port))

    # ---- running -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until quit (or SIGTERM/SIGINT/SIGHUP), then close everything."""
        asyncio.run(self.serve())

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        token = self.engine.events.subscribe(self._event_from_any_thread)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._loop.add_signal_handler(sig, self._stop.set)
            except (ValueError, RuntimeError, NotImplementedError):
                pass            # not the main thread
        try:
            for lst in self.listeners:
                lst.lock = asyncio.Lock()
                if lst.first_client is not None:
                    sock, lst.first_client = lst.first_client, None
                    reader, writer = await asyncio.open_connection(sock=sock)
                    self._spawn(self._client(lst, reader, writer))

                def handler(reader, writer, lst=lst):
                    return self._client(lst, reader, writer)
                if lst.sock.family == socket.AF_UNIX:
                    lst.server = await asyncio.start_unix_server(handler, sock=lst.sock)
                else:
                    lst.server = await asyncio.start_server(handler, sock=lst.sock)
            await self._stop.wait()
        finally:
            self.engine.events.unsubscribe(token)
            await self._shutdown()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def request_shutdown(self) -> None:
        """Stop the server from any thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass

    def _on_quit(self) -> None:
        # called by the 'quit' command in the worker thread; the server stops once the
        # response has been written
        self.quit_requested = True

    async def _shutdown(self) -> None:
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
        for mon in list(self.monitors):
            try:
                await asyncio.wait_for(mon.writer.drain(), 1)
            except Exception:       # noqa: BLE001 - a gone client
                pass
            mon.writer.close()
        loop = asyncio.get_running_loop()
        # wait for a running command, then close the graph in the worker thread
        await loop.run_in_executor(self._executor, self._close_graph)
        self._executor.shutdown(wait=True)
        for lst in self.listeners:
            try:
                lst.sock.close()
            except OSError:
                pass
            if lst.path is not None:
                try:
                    os.unlink(lst.path)
                except OSError:
                    pass

    def _close_graph(self) -> None:
        try:
            self.engine.graph.close_all()
        except Exception:       # noqa: BLE001 - close what can be closed
            log.exception("closing the block graph failed")

    # ---- clients ---------------------------------------------------------------------------
    async def _client(self, lst: Listener, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        lst.clients.add(writer)
        try:
            async with lst.lock:            # one client per chardev at a time
                if self._stop.is_set():
                    return
                session = QMPSession(self.engine.dispatcher, version_info(),
                                     self.capabilities)
                mon = _Monitor(QMPConnection(session), writer)
                self.monitors.add(mon)
                try:
                    await self._converse(mon, reader)
                finally:
                    self.monitors.discard(mon)
        except (ConnectionError, OSError):
            pass
        finally:
            lst.clients.discard(writer)
            writer.close()

    async def _converse(self, mon: _Monitor, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        mon.send(mon.conn.greeting_bytes())
        await mon.writer.drain()
        while not self._stop.is_set():
            data = await reader.read(65536)
            if not data:
                return
            for item in mon.conn.receive_data(data):
                if isinstance(item, ParseError):
                    mon.send(mon.conn.encode(item.response))
                    continue
                seq = [None]
                try:
                    response = await loop.run_in_executor(
                        self._executor, self._run_command, mon.conn, item.request, seq)
                    mon.send(mon.conn.encode(response))
                finally:
                    self._release_held_events(seq[0])
                if self.quit_requested:
                    await mon.writer.drain()
                    self._stop.set()
                    return
            await mon.writer.drain()

    def _run_command(self, conn: QMPConnection, request, seq: list) -> dict:
        """In the worker thread: other threads' events wait until the reply is out
        (``_release_held_events``, called by the event loop once it has written it)."""
        with self._event_lock:
            self._command_seq += 1
            seq[0] = self._command_seq
            self._command_thread = threading.get_ident()
        return conn.handle(request)

    # ---- events ------------------------------------------------------------------------------
    def _release_held_events(self, seq: int | None) -> None:
        """Command ``seq``'s reply is written: send the events held until then (a
        later command, already running in the worker, keeps holding its own)."""
        if seq is None:
            return
        with self._event_lock:
            if self._command_seq == seq:
                self._command_thread = None
            due = [data for s, data in self._held_events if s <= seq]
            self._held_events = [(s, data) for s, data in self._held_events if s > seq]
        for data in due:
            self._broadcast(data)

    def _event_from_any_thread(self, message: dict) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        data = encode_message(message)
        with self._event_lock:
            running = self._command_thread
            if running is not None and running != threading.get_ident():
                self._held_events.append((self._command_seq, data))
                return
        try:
            loop.call_soon_threadsafe(self._broadcast, data)
        except RuntimeError:
            pass            # the loop is gone: shutting down

    def _broadcast(self, data: bytes) -> None:
        for mon in list(self.monitors):
            if mon.conn.wants_events:
                mon.send(data)
