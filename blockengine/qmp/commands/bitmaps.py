"""Dirty bitmap commands: block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge.

Semantics and error texts are QEMU 7.2's (blockdev.c / block/monitor/bitmap-qmp-cmds.c),
checked against qemu-storage-daemon in tests/jobs.
"""
from ... import bitmaps
from ...errors import InvalidArgument


def _lookup(ctx, node_name: str, name: str):
    """block_dirty_bitmap_lookup()."""
    node = ctx.graph.lookup_node(node_name, node_name)
    bm = bitmaps.find_bitmap(node, name)
    if bm is None:
        raise InvalidArgument("Dirty bitmap '%s' not found" % name)
    return node, bm


def block_dirty_bitmap_add(ctx, args: dict):
    node = ctx.graph.lookup_node(args["node"], args["node"])
    bitmaps.create_bitmap(node, args["name"], args.get("granularity"),
                          persistent=args.get("persistent", False),
                          disabled=args.get("disabled", False))
    return {}


def block_dirty_bitmap_remove(ctx, args: dict):
    node, bm = _lookup(ctx, args["node"], args["name"])
    bitmaps.check_usable(bm, allow_inconsistent=True)
    if bm.persistent:
        remove = getattr(node.drv, "remove_persistent_bitmap", None)
        if remove is not None:
            remove(bm.name)
    bitmaps.remove_bitmap(node, bm)
    return {}


def block_dirty_bitmap_clear(ctx, args: dict):
    _, bm = _lookup(ctx, args["node"], args["name"])
    bitmaps.check_usable(bm)
    bm.clear()
    return {}


def block_dirty_bitmap_enable(ctx, args: dict):
    _, bm = _lookup(ctx, args["node"], args["name"])
    bitmaps.check_usable(bm, allow_readonly=True)
    bm.disabled = False
    return {}


def block_dirty_bitmap_disable(ctx, args: dict):
    _, bm = _lookup(ctx, args["node"], args["name"])
    bitmaps.check_usable(bm, allow_readonly=True)
    bm.disabled = True
    return {}


def block_dirty_bitmap_merge(ctx, args: dict):
    node, dst = _lookup(ctx, args["node"], args["target"])
    bitmaps.check_usable(dst)
    sources = []
    for src in args["bitmaps"]:
        if isinstance(src, str):
            bm = bitmaps.find_bitmap(node, src)
            if bm is None:
                raise InvalidArgument("Dirty bitmap '%s' not found" % src)
        else:
            _, bm = _lookup(ctx, src["node"], src["name"])
        bitmaps.check_usable(bm, allow_readonly=True)
        if bm.size != dst.size:            # bdrv_merge_dirty_bitmap()
            raise InvalidArgument("Bitmaps are of different sizes (destination size is %d, "
                                  "source size is %d) and can't be merged"
                                  % (dst.size, bm.size))
        sources.append(bm)
    # every source was checked above, so the merges below cannot fail half-way
    for bm in sources:
        dst.merge_from(bm)
    return {}


COMMANDS = {
    "block-dirty-bitmap-add": block_dirty_bitmap_add,
    "block-dirty-bitmap-remove": block_dirty_bitmap_remove,
    "block-dirty-bitmap-clear": block_dirty_bitmap_clear,
    "block-dirty-bitmap-enable": block_dirty_bitmap_enable,
    "block-dirty-bitmap-disable": block_dirty_bitmap_disable,
    "block-dirty-bitmap-merge": block_dirty_bitmap_merge,
}
