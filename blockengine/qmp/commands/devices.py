"""Devices with removable media: trays and media (QEMU 7.2 block/qapi-sysemu.c).

blockengine has no guest; a *device* is a BlockBackend created by ``--device`` (see
``create_device``) that behaves like a CD-ROM drive when removable: it has a tray that
opens and closes (DEVICE_TRAY_MOVED), a medium that can be removed and inserted while
the tray is open, and a guest lock (``locked``) that makes open-tray without force
leave the tray shut, as a guest that ignores the eject request would.

A device is found by ``device`` (its backend name) or ``id`` (its qdev id); ours use the
same string for both.  Error texts and classes are QEMU's.
"""
from __future__ import annotations

from ...errors import BlockError, DeviceNotFound, InvalidArgument
from ...graph.backend import BlockBackend
from ...graph.perms import Perm

# what a guest device takes and shares on its medium (blkconf_apply_backend_options)
DEVICE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.GRAPH_MOD | Perm.RESIZE


def create_device(graph, dev_id: str, node_name: str | None = None, *,
                  removable: bool = False, read_only: bool = False, locked: bool = False,
                  share_rw: bool = False) -> BlockBackend:
    """A guest-device-like backend ``dev_id`` (with the medium ``node_name``, if any)."""
    perm = Perm.CONSISTENT_READ if read_only else Perm.CONSISTENT_READ | Perm.WRITE
    shared = DEVICE_SHARED | (Perm.WRITE if share_rw else Perm(0))
    node = None
    if node_name is not None:
        node = graph.find_node(node_name)
        if node is None:
            raise InvalidArgument("Property 'drive' can't find value '%s'" % node_name)
        if _has_blk(node):
            raise InvalidArgument("Property 'drive' can't take value '%s', it's in use"
                                  % node_name)
    with graph.lock:
        blk = BlockBackend(graph, dev_id, perm=perm, shared=shared, removable=removable)
        blk.qdev_id = dev_id
        blk.has_tray = removable
        blk.attached = True
        blk.locked = locked and removable
        if node is not None:
            try:
                blk.insert(node)
            except BaseException:
                blk.delete()
                raise
        elif removable:
            blk.tray_open = False
    return blk


def _has_blk(node) -> bool:
    """bdrv_has_blk(): some device uses the node as its root."""
    return any(isinstance(c.parent, BlockBackend) for c in node.parents)


def get_blk(ctx, device: str | None, qdev_id: str | None) -> BlockBackend:
    """qmp_get_blk()."""
    if (device is None) == (qdev_id is None):
        raise InvalidArgument("Need exactly one of 'device' and 'id'")
    backends = ctx.graph.backends
    if qdev_id is not None:
        for blk in backends.values():
            if blk.qdev_id == qdev_id:
                return blk
        if qdev_id in backends:
            # a backend without a device model (e.g. created by a library user)
            raise BlockError("Device does not have a block device backend")
        raise DeviceNotFound("Device '%s' not found" % qdev_id)
    blk = backends.get(device)
    if blk is None:
        raise DeviceNotFound("Device '%s' not found" % device)
    return blk


def _has_tray(blk) -> bool:
    return blk.has_tray


def _attached(blk) -> bool:
    return bool(getattr(blk, "attached", False))


def _change_media(ctx, blk, load: bool) -> None:
    """blk_dev_change_media_cb(): the device's tray follows, DEVICE_TRAY_MOVED if it moved."""
    if not _attached(blk):
        return
    was_open = blk.tray_open
    if _has_tray(blk):
        blk.tray_open = not load
        if not load:
            blk.locked = False
    if was_open != blk.tray_open:
        ctx.events.emit("DEVICE_TRAY_MOVED", {"device": blk.name or "",
                                              "id": blk.qdev_id or "",
                                              "tray-open": blk.tray_open})


class _TrayInProgress(BlockError):
    """do_open_tray()'s -EINPROGRESS: the guest was asked to open it."""


class _NoTray(BlockError):
    """do_open_tray()'s -ENOSYS."""


def do_open_tray(ctx, device, qdev_id, force: bool) -> None:
    blk = get_blk(ctx, device, qdev_id)
    name = qdev_id if qdev_id is not None else device
    if not blk.removable:
        raise BlockError("Device '%s' is not removable" % name)
    if not _has_tray(blk):
        raise _NoTray("Device '%s' does not have a tray" % name)
    if blk.tray_open:
        return
    locked = blk.locked
    if not locked or force:
        _change_media(ctx, blk, False)
    if locked and not force:
        raise _TrayInProgress("Device '%s' is locked and force was not specified, "
                              "wait for tray to open and try again" % name)


def blockdev_open_tray(ctx, args: dict):
    with ctx.graph.lock:
        try:
            do_open_tray(ctx, args.get("device"), args.get("id"), args.get("force", False))
        except (_TrayInProgress, _NoTray):
            pass
    return {}


def blockdev_close_tray(ctx, args: dict):
    device, qdev_id = args.get("device"), args.get("id")
    with ctx.graph.lock:
        blk = get_blk(ctx, device, qdev_id)
        if not blk.removable:
            raise BlockError("Device '%s' is not removable" % (device or qdev_id))
        if not _has_tray(blk) or not blk.tray_open:
            return {}
        _change_media(ctx, blk, True)
    return {}


def remove_medium(ctx, device, qdev_id) -> None:
    blk = get_blk(ctx, device, qdev_id)
    name = device or qdev_id
    attached = _attached(blk)
    if attached and not blk.removable:
        raise BlockError("Device '%s' is not removable" % name)
    if attached and _has_tray(blk) and not blk.tray_open:
        raise BlockError("Tray of device '%s' is not open" % name)
    node = blk.root_node
    if node is None:
        return
    node.check_op_blockers()
    blk.remove()
    if not _has_tray(blk):
        _change_media(ctx, blk, False)



def x_blockdev_remove_medium(ctx, args: dict):
    with ctx.graph.lock:
        remove_medium(ctx, args.get("device"), args.get("id"))
    return {}


def insert_anon_medium(ctx, blk, node) -> None:
    """qmp_blockdev_insert_anon_medium()."""
    attached = _attached(blk)
    if attached and not blk.removable:
        raise BlockError("Device is not removable")
    if attached and _has_tray(blk) and not blk.tray_open:
        raise BlockError("Tray of the device is not open")
    if blk.root_node is not None:
        raise BlockError("There already is a medium in the device")
    blk.insert(node)
    if not _has_tray(blk):
        _change_media(ctx, blk, True)


def x_blockdev_insert_medium(ctx, args: dict):
    with ctx.graph.lock:
        blk = get_blk(ctx, args.get("device"), args.get("id"))
        name = args["node-name"]
        node = ctx.graph.find_node(name)
        if node is None:
            raise BlockError("Node '%s' not found" % name)
        if _has_blk(node):
            raise BlockError("Node '%s' is already in use" % name)
        insert_anon_medium(ctx, blk, node)
    return {}


def blockdev_change_medium(ctx, args: dict):
    device, qdev_id = args.get("device"), args.get("id")
    graph = ctx.graph
    with graph.lock:
        blk = get_blk(ctx, device, qdev_id)
        mode = args.get("read-only-mode", "retain")
        if mode == "retain":
            root = blk.root_node
            read_only = (root.read_only if root is not None
                         else getattr(blk, "root_read_only", False))
        else:
            read_only = mode == "read-only"
        medium = graph.open_image(args["filename"], args.get("format"), read_only=read_only)
        inserted = False
        try:
            try:
                do_open_tray(ctx, device, qdev_id, args.get("force", False))
            except _NoTray:
                pass
            remove_medium(ctx, device, qdev_id)
            insert_anon_medium(ctx, blk, medium)
            inserted = True
            medium.monitor_owned = False        # the device holds the only reference
            blockdev_close_tray(ctx, {"device": device} if device is not None
                                else {"id": qdev_id})
        finally:
            if not inserted and medium.node_name in graph.nodes and not medium.parents:
                graph.delete_node(medium)
    return {}


COMMANDS = {
    "blockdev-open-tray": blockdev_open_tray,
    "blockdev-close-tray": blockdev_close_tray,
    "x-blockdev-remove-medium": x_blockdev_remove_medium,
    "x-blockdev-insert-medium": x_blockdev_insert_medium,
    "blockdev-change-medium": blockdev_change_medium,
}
