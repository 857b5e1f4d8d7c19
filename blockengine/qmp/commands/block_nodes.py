"""Graph commands: blockdev-add/-del, block_resize, write threshold, x-blockdev-change.

Error texts are QEMU 7.2's (checked against qemu-storage-daemon in tests/qmp).
"""
from ...errors import BlockError, InvalidArgument
from ...graph.backend import ALL_SHARED, BlockBackend
from ...graph.perms import Perm


def blockdev_add(ctx, args: dict):
    if "node-name" not in args:
        raise InvalidArgument("'node-name' must be specified for the root node")
    ctx.graph.open_node(args)
    return {}


def blockdev_del(ctx, args: dict):
    name = args["node-name"]
    node = ctx.graph.find_node(name)
    if node is None:
        raise InvalidArgument("Failed to find node with node-name='%s'" % name)
    ctx.graph.delete_node(node)
    return {}


def block_resize(ctx, args: dict):
    node = ctx.graph.lookup_node(args.get("device"), args.get("node-name"))
    size = args["size"]
    if size < 0:
        raise InvalidArgument("Parameter 'size' expects a >0 size")
    if node.op_blockers:        # a job's node; QEMU prints the NULL device as "(null)"
        raise BlockError("Device '%s' is in use" % (args.get("device") or "(null)"))
    # a temporary user that only needs to resize, as qmp_block_resize()'s blk
    blk = BlockBackend(ctx.graph, perm=Perm.RESIZE, shared=ALL_SHARED)
    blk.insert(node)
    try:
        node.truncate(size)
    finally:
        blk.delete()
    return {}


def block_set_write_threshold(ctx, args: dict):
    node = ctx.graph.find_node(args["node-name"])
    if node is None:
        raise InvalidArgument("Device '%s' not found" % args["node-name"])
    node.write_threshold = args["write-threshold"]
    return {}


def x_blockdev_change(ctx, args: dict):
    parent_name = args["parent"]
    parent = ctx.graph.lookup_node(parent_name, parent_name)
    has_child, has_node = "child" in args, "node" in args
    if has_child == has_node:
        raise InvalidArgument("The parameters child and node are in conflict" if has_child
                              else "Either child or node must be specified")
    if has_child:
        child = parent.child(args["child"])
        if child is None:
            raise InvalidArgument("Node '%s' does not have child '%s'"
                                  % (parent_name, args["child"]))
        remove = getattr(parent.drv, "remove_child", None)
        if remove is None:
            raise BlockError("The node %s does not support removing a child"
                             % parent.node_name)
        remove(child)
    else:
        new = ctx.graph.find_node(args["node"])
        if new is None:
            raise InvalidArgument("Node '%s' not found" % args["node"])
        add = getattr(parent.drv, "add_child", None)
        if add is None:
            raise BlockError("The node %s does not support adding a child" % parent.node_name)
        if new.parents:
            raise BlockError("The node %s already has a parent" % new.node_name)
        add(new)
    return {}


COMMANDS = {
    "blockdev-add": blockdev_add,
    "blockdev-del": blockdev_del,
    "block_resize": block_resize,
    "block-set-write-threshold": block_set_write_threshold,
    "x-blockdev-change": x_blockdev_change,
}
