"""A block layer behind QMP: one graph, one event bus, every command registered.

    engine = QMPEngine()
    engine.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})

``execute`` returns QMP responses ({"return": ...} / {"error": ...}) and never raises;
the server (``blockengine serve``) puts a QMPSession per connection in front of it.
"""
from __future__ import annotations

import functools

from .. import QEMU_VERSION, __version__
from .commands import all_commands
from .context import QMPContext
from .core import Dispatcher, EventBus


def version_info() -> dict:
    """query-version's VersionInfo: the QEMU release we behave as."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": "blockengine %s" % __version__}


class QMPEngine:
    def __init__(self, graph=None, events: EventBus | None = None):
        self.events = events or EventBus()
        self.ctx = QMPContext(self.events, graph)
        self.dispatcher = Dispatcher()
        for name, handler in all_commands().items():
            self.dispatcher.register(name, functools.partial(handler, self.ctx))
        self.dispatcher.register("query-version", lambda args: version_info())

    @property
    def graph(self):
        return self.ctx.graph

    def execute(self, name: str, arguments: dict | None = None) -> dict:
        return self.dispatcher.execute(name, arguments)
