"""quit, block_passwd and change-backing-file.

(query-version is registered by QMPEngine itself.)
"""
from __future__ import annotations

import errno
import os

from ...errors import BlockError
from ...graph.backend import BlockBackend


def quit_(ctx, args: dict):
    """The server stops after sending the response (QMPServer sets ctx.on_quit)."""
    ctx.quit_requested = True
    hook = ctx.on_quit
    if hook is not None:
        hook()
    return {}


def block_passwd(ctx, args: dict):
    # QEMU 7.2 has no block_passwd any more (CommandNotFound there); encrypted images
    # take their keys from secret objects
    raise BlockError("Setting block passwords directly is no longer supported")


def _root_bs(ctx, name: str):
    """qmp_get_root_bs()."""
    node = ctx.graph.lookup_node(name, name)
    if any(not isinstance(c.parent, BlockBackend) for c in node.parents):
        raise BlockError("Need a root block node")
    return node


def _chain_contains(top, base) -> bool:
    """bdrv_chain_contains(): base is reached from top through filters and backing."""
    node = top
    while node is not None and node is not base:
        child = node.filtered_child()
        node = child.node if child is not None else None
    return node is not None


def _bottom(node):
    """bdrv_find_base(): the last node of the backing chain (filters skipped)."""
    node = node.skip_filters()
    while True:
        cow = node.cow_child()
        if cow is None:
            return node
        node = cow.node.skip_filters()


def change_backing_file(ctx, args: dict):
    graph = ctx.graph
    with graph.lock:
        bs = _root_bs(ctx, args["device"])
        image = graph.lookup_node(None, args["image-node-name"])
        if _bottom(image) is image.skip_filters():
            raise BlockError("not allowing backing file change on an image without a "
                             "backing file")
        bs.check_op_blockers()
        if not _chain_contains(bs, image):
            raise BlockError("'%s' and image file are not in the same chain"
                             % args["device"])
        backing_file = args["backing-file"]
        ro = image.read_only
        if ro:
            graph.reopen(image, False)
        try:
            change = getattr(image.drv, "change_backing_file", None)
            try:
                if change is None:
                    raise BlockError("Operation not supported", errno=errno.ENOTSUP)
                # QEMU passes the image's own format name as the backing format
                change(backing_file, image.driver_name)
            except BlockError as e:
                code = e.errno or errno.EIO
                raise BlockError("Could not change backing file to '%s': %s"
                                 % (backing_file, os.strerror(code)), errno=code) from e
        finally:
            if ro:
                graph.reopen(image, True)
    return {}



COMMANDS = {
    "quit": quit_,
    "block_passwd": block_passwd,
    "change-backing-file": change_backing_file,
}
