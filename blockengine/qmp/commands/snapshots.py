"""External snapshots: blockdev-snapshot-sync and blockdev-snapshot.

QEMU 7.2 blockdev.c external_snapshot_prepare()/_commit()/_clean(): the overlay gets
the old top as its backing (COW) child and takes its place under every parent
(bdrv_append); the old top is then reopened read-only.  Error texts and their order
are QEMU's, checked against qemu-storage-daemon in tests/qmp/test_snapshots.py.

Like QEMU, a node opened by blockdev-snapshot-sync is not owned by the monitor: it lives
only as long as a parent (a device, another node) uses it.  Snapshotting a node nobody
uses therefore writes the overlay image and leaves the old top read-only, but the new
node is closed again at the end of the command.
"""
from __future__ import annotations

from ...cli.create import img_create
from ...errors import BlockError
from ...graph import registry
from ...graph.child import ChildRole
from ...graph.node import BlockNode
from ...graph.perms import Perm


def _check_blockers(node: BlockNode) -> None:
    """bdrv_op_is_blocked(BLOCK_OP_TYPE_EXTERNAL_SNAPSHOT).

    QEMU blocks every operation on a backing node (bdrv_backing_attach's
    "node is used as backing hd of ..." blocker); the graph does not record that
    blocker, so it is derived here from the node's COW parents (newest first, as
    QEMU's blocker list is).
    """
    for c in node.parents:
        if isinstance(c.parent, BlockNode) and c.role & ChildRole.COW:
            raise BlockError("Node '%s' is busy: node is used as backing hd of '%s'"
                             % (node.node_name, c.parent.node_name))
    node.check_op_blockers()


def _close_unused(ctx, node: BlockNode) -> None:
    """bdrv_unref() of the reference the command held on a node it opened."""
    if node.parents or ctx.graph.nodes.get(node.node_name) is not node:
        return
    node.monitor_owned = True
    ctx.graph.delete_node(node)


def _append(ctx, old: BlockNode, new: BlockNode) -> None:
    """The checks of external_snapshot_prepare() on the overlay, then bdrv_append()."""
    perm, _shared = new.cumulative_perms()
    if perm & Perm.CONSISTENT_READ:
        raise BlockError("The overlay is already in use")
    if new.is_filter:
        raise BlockError("Filters cannot be used as overlays")
    if new.cow_child() is not None:
        raise BlockError("The overlay already has a backing image")
    if not new.drv.info.supports_backing:
        raise BlockError("The overlay does not support backing images")
    graph = ctx.graph
    with graph.lock:
        child = graph.attach_child(new, old, "backing", ChildRole.COW)
        try:
            graph.replace_node(old, new)
        except BaseException:
            graph.detach_child(child)
            raise
    # external_snapshot_commit(): the old top becomes read-only (failure ignored)
    if not old.read_only:
        try:
            graph.reopen(old, True)
        except BlockError:
            pass


def _prepare_old(ctx, device, node_name) -> BlockNode:
    old = ctx.graph.lookup_node(device, node_name)
    _check_blockers(old)
    if not old.read_only:
        old.flush()
    return old


def blockdev_snapshot_sync(ctx, args: dict):
    device, node_name = args.get("device"), args.get("node-name")
    old = _prepare_old(ctx, device, node_name)
    fmt = args.get("format", "qcow2")
    mode = args.get("mode", "absolute-paths")
    snap_name = args.get("snapshot-node-name")
    filename = args["snapshot-file"]
    graph = ctx.graph
    if node_name is not None and snap_name is None:
        raise BlockError("New overlay node-name missing")
    if snap_name is not None and (snap_name in graph.nodes or
                                  graph.backends.get(snap_name) is not None):
        raise BlockError("New overlay node-name already in use")
    if mode != "existing":
        # bdrv_img_create() with BDRV_O_NO_BACKING: the backing file is not opened
        img_create(filename, fmt, size=old.total_size, base_filename=old.filename(),
                   base_fmt=old.driver_name, no_open_backing=True)
    opts = {"driver": fmt, "file": {"driver": "file", "filename": filename},
            "read-only": old.read_only}
    if snap_name is not None:
        opts["node-name"] = snap_name
    try:
        if registry.get_driver(fmt).info.supports_backing:
            opts["backing"] = None          # BDRV_O_NO_BACKING
    except BlockError:
        pass                                # open_node reports the unknown driver
    new = graph.open_node(opts)
    new.monitor_owned = False
    try:
        _append(ctx, old, new)
    finally:
        _close_unused(ctx, new)
    return {}


def blockdev_snapshot(ctx, args: dict):
    name = args["node"]
    old = _prepare_old(ctx, name, name)
    ref = args["overlay"]
    new = ctx.graph.lookup_node(ref, ref)
    _append(ctx, old, new)
    return {}


COMMANDS = {
    "blockdev-snapshot-sync": blockdev_snapshot_sync,
    "blockdev-snapshot": blockdev_snapshot,
}
