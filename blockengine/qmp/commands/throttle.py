"""block_set_io_throttle (QEMU 7.2 block/qapi-sysemu.c, qmp_block_set_io_throttle).

The limits belong to the device (BlockBackend), survive medium changes, and are shared
by every device in the same throttle group: setting them on one member changes the
group's configuration for all.  query-block shows them under 'inserted'.
"""
from ...errors import BlockError
from ...io.throttle import ThrottleConfig
from .devices import get_blk


def block_set_io_throttle(ctx, args: dict):
    blk = get_blk(ctx, args.get("device"), args.get("id"))
    if blk.root_node is None:
        raise BlockError("Device has no medium")
    cfg = ThrottleConfig.from_qmp(args)         # throttle_is_valid(), QEMU's messages
    current = blk.throttle_group
    if cfg.enabled():
        if current is None:
            group = args.get("group") or args.get("device") or args.get("id")
        elif "group" in args:
            group = args["group"]
        else:
            group = current.name        # stays in its group
        with ctx.graph.lock:
            blk.set_io_throttle(cfg, group)
    elif current is not None:
        with ctx.graph.lock:
            blk.set_io_throttle(cfg, None)
    return {}


COMMANDS = {
    "block_set_io_throttle": block_set_io_throttle,
}
