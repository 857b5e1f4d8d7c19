"""The state QMP commands act on: one block graph and its event bus."""
from ..graph.graph import Graph


class QMPContext:
    def __init__(self, events, graph: Graph | None = None):
        self.events = events
        self.graph = graph or Graph(events=events)
        if graph is not None:
            graph.events = events
        # set by a server: called by the 'quit' command after its response is queued
        self.on_quit = None
