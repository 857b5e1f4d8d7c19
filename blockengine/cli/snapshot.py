"""`img snapshot [-l | -a | -c | -d] snapshot filename` (qemu-img.c img_snapshot).

The format-independent half of internal snapshots lives here too: QEMU's
block/snapshot.c (bdrv_snapshot_list/find/create/goto/delete) asks the node's driver
and, when the driver has no snapshots, falls back to its primary child if that is the
only child holding data (raw over file), as bdrv_snapshot_fallback_child() does.
"""
from __future__ import annotations

import errno
import os
import time

from ..errors import BlockError
from ..graph.child import ChildRole
from . import report
from .common import Session
from .img import FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, getopt
from .output import snapshot_header, snapshot_line

SNAPSHOT_LIST, SNAPSHOT_CREATE, SNAPSHOT_APPLY, SNAPSHOT_DELETE = 1, 2, 3, 4
ACTION_OPTS = {"l": SNAPSHOT_LIST, "a": SNAPSHOT_APPLY, "c": SNAPSHOT_CREATE,
               "d": SNAPSHOT_DELETE}


# ---- block/snapshot.c ---------------------------------------------------------------------
def _fallback(node):
    """bdrv_snapshot_fallback_child(): the primary child, if no other child has data."""
    primary = node.primary_child()
    if primary is None:
        return None
    for c in node.children:
        if c is not primary and c.role & (ChildRole.DATA | ChildRole.METADATA |
                                          ChildRole.FILTERED):
            return None
    return primary.node


def _with_snapshots(node):
    """The node whose driver implements snapshots (following fallbacks), or None."""
    while node is not None:
        if hasattr(node.drv, "snapshot_create"):
            return node
        node = _fallback(node)
    return None


def snapshot_list(node) -> list[dict] | None:
    """bdrv_snapshot_list(): SnapshotInfo dicts, None if unsupported."""
    target = _with_snapshots(node)
    return None if target is None else target.drv.snapshot_list()


def snapshot_find(node, name: str) -> dict | None:
    """bdrv_snapshot_find(): the first snapshot with this name (ids are not looked at,
    unlike the driver's goto, which tries the id first)."""
    for sn in snapshot_list(node) or []:
        if sn["name"] == name:
            return sn
    return None


def snapshot_create(node, name: str, date_sec: int, date_nsec: int) -> None:
    """bdrv_snapshot_create(); raises BlockError (ENOTSUP without snapshot support)."""
    target = _with_snapshots(node)
    if target is None:
        raise BlockError("Operation not supported", errno=errno.ENOTSUP)
    with target.lock:
        target.drv.snapshot_create(name, date_sec, date_nsec)


def snapshot_goto(node, snapshot_id: str, reopened=None) -> None:
    """bdrv_snapshot_goto(); the BlockError carries QEMU's Error message.

    QEMU closes a node it falls back through and opens its driver again after the
    child's goto, whatever that gave: ``reopened(node)`` repeats what that open shows."""
    if node.dirty_bitmaps:
        raise BlockError("Device has active dirty bitmaps", errno=errno.EBUSY)
    target = _with_snapshots(node)
    if target is None:
        fallen = node
        while _fallback(fallen) is not None:
            if reopened is not None:
                reopened(fallen)
            fallen = _fallback(fallen)
        raise BlockError("Block driver does not support snapshots", errno=errno.ENOTSUP)
    with target.lock:
        try:
            target.drv.snapshot_goto(snapshot_id)
        except BlockError as e:
            raise BlockError("Failed to load snapshot: %s" % _strerror(e),
                             errno=e.errno) from None


def snapshot_delete(node, snapshot_id: str, name: str) -> None:
    """bdrv_snapshot_delete(); the BlockError carries QEMU's Error message."""
    target = _with_snapshots(node)
    if target is None:
        raise BlockError("Block format '%s' used by device '' does not support internal "
                         "snapshot deletion" % node.drv.info.name, errno=errno.ENOTSUP)
    with target.lock:
        target.drv.snapshot_delete(snapshot_id, name)


def _strerror(e: BlockError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


# ---- qemu-img snapshot --------------------------------------------------------------------
def dump_snapshots(node) -> str:
    """dump_snapshots(): the table `img info` prints, nothing without snapshots."""
    snaps = snapshot_list(node)
    if not snaps:
        return ""
    return "Snapshot list:\n%s\n%s" % (snapshot_header(),
                                       "".join(snapshot_line(sn) + "\n" for sn in snaps))


def cmd_snapshot(argv: list[str]) -> int:
    session = Session()
    action = 0
    name = None
    quiet = image_opts = force_share = False
    operands: list[str] = []
    for key, arg in getopt(argv, ":la:c:d:hqU", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE]):
        if key is None:
            operands = arg
        elif key in ACTION_OPTS:
            if action:
                raise report.UsageError("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = ACTION_OPTS[key], arg
        elif key == "q":
            quiet = True      # img_snapshot prints nothing that -q would silence
        elif key == "object":
            session.add_object(arg)
        elif key == "image-opts":
            image_opts = True
        elif key == "U":
            force_share = True
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    # -l needs no write access; no action at all still opens read-write, as QEMU
    img = session.open(operands[0], None, image_opts=image_opts,
                       writable=action != SNAPSHOT_LIST, force_share=force_share)
    node = img.node
    failed = False
    try:
        if action == SNAPSHOT_LIST:
            report.qprint(False, dump_snapshots(node))
        elif action == SNAPSHOT_CREATE:
            rt = time.time_ns() // 1000          # g_get_real_time(): microseconds
            try:
                snapshot_create(node, name, rt // 1000000, rt % 1000000 * 1000)
            except BlockError as e:
                err = e.errno or errno.EIO
                report.error("Could not create snapshot '%s': %d (%s)"
                             % (name, -err, os.strerror(err)))
                failed = True
        elif action == SNAPSHOT_APPLY:
            def reopened(n):
                if n is node and n.options.get("x-probed") and n.driver_name == "raw":
                    Session._probed_raw_warning(img)
            try:
                snapshot_goto(node, name, reopened)
            except BlockError as e:
                report.error("Could not apply snapshot '%s': %s" % (name, e))
                failed = True
        elif action == SNAPSHOT_DELETE:
            sn = snapshot_find(node, name)
            if sn is None:
                report.error("Could not delete snapshot '%s': snapshot not found" % name)
                failed = True
            else:
                try:
                    snapshot_delete(node, sn["id"], sn["name"])
                except BlockError as e:
                    report.error("Could not delete snapshot '%s': %s" % (name, e))
                    failed = True
    finally:
        img.close()
    return 1 if failed else 0
