"""QMP command handlers, grouped by area.  Each module lists its handlers in COMMANDS
(name -> function(ctx, args) -> return value); ``all_commands()`` collects them."""
from . import (bitmaps, block_nodes, create, devices, jobs, misc, queries, snapshots,
               throttle)

AREAS = (block_nodes, queries, devices, throttle, jobs, create, bitmaps, snapshots, misc)


def all_commands() -> dict:
    table = {}
    for area in AREAS:
        for name, handler in area.COMMANDS.items():
            assert name not in table, name
            table[name] = handler
    return table
