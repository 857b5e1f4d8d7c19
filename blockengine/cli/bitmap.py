"""`img bitmap`: persistent dirty bitmaps of an image (qemu-img.c img_bitmap).

Actions run in command-line order through the QMP bitmap commands, exactly as
qemu-img calls qmp_block_dirty_bitmap_add() & co on the image's node; the first
failure stops the run, and what the earlier actions did is still stored when the
image is closed (QEMU's behaviour too).  ``--merge SOURCE`` merges bitmap SOURCE of
the image itself, or of the ``-b`` image, into the named bitmap.
"""
from __future__ import annotations

from ..errors import BlockError
from ..qmp.commands import bitmaps as qmp_bitmaps
from . import report
from .common import Session
from .img import HELP, IMAGE_OPTS, OBJECT, _cvtnum, getopt
from .getopt import NO_ARG, REQUIRED_ARG

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")
LONGOPTS = [HELP, OBJECT, IMAGE_OPTS,
            *((name, NO_ARG, name) for name in ACTIONS if name != "merge"),
            ("merge", REQUIRED_ARG, "merge"), ("granularity", REQUIRED_ARG, "g"),
            ("source-file", REQUIRED_ARG, "b"), ("source-format", REQUIRED_ARG, "F")]
TARGET, SOURCE = "target", "source"      # the node names the QMP commands look up


class _Nodes:
    """What the QMP commands need of a QMPContext: ``graph.lookup_node``.  qemu-img
    has its images in one graph; here each Image has its own, so the target and the
    -b source are looked up under fixed names."""

    def __init__(self, target, source):
        self.graph = self
        self._nodes = {TARGET: target.node, SOURCE: (source or target).node}

    def lookup_node(self, device=None, node_name=None):
        return self._nodes[node_name]


def cmd_bitmap(argv: list[str]) -> int:
    session = Session()
    fmt = src_fmt = src_filename = None
    image_opts = False
    granularity = 0
    actions: list[tuple[str, str | None]] = []
    # option values are checked as they come, before later options are looked at
    for key, arg in getopt(argv, ":b:f:F:g:h", LONGOPTS):
        if key is None:
            operands = arg
        elif key == "object":
            session.add_object(arg)
        elif key == "b":
            src_filename = arg
        elif key == "f":
            fmt = arg
        elif key == "F":
            src_fmt = arg
        elif key == "g":
            granularity = _cvtnum("granularity", arg)
        elif key in ACTIONS:
            actions.append((key, arg))
        elif key == "image-opts":
            image_opts = True
    kinds = {kind for kind, _ in actions}
    if not actions:
        raise report.fail("Need at least one of --add, --remove, --clear, --enable, "
                          "--disable, or --merge")
    if granularity and "add" not in kinds:
        raise report.fail("granularity only supported with --add")
    if src_fmt and not src_filename:
        raise report.fail("-F only supported with -b")
    if src_filename and "merge" not in kinds:
        raise report.fail("Merge bitmap source file only supported with --merge")
    if len(operands) != 2:
        raise report.fail("Expecting filename and bitmap name")
    filename, name = operands

    # no backing chains: the bitmaps live in this image, whatever its contents
    target = session.open(filename, fmt, image_opts=image_opts, writable=True,
                          backing=False)
    source = None
    try:
        if src_filename:
            source = session.open(src_filename, src_fmt, backing=False)
        ctx = _Nodes(target, source)
        for kind, merge_source in actions:
            try:
                _run(ctx, kind, name, merge_source, granularity)
            except BlockError as e:
                raise report.fail("Operation %s on bitmap %s failed: %s" % (kind, name, e),
                                  hint=e.hint)
    finally:
        for img in (source, target):
            if img is not None:
                img.close()
    return 0


def _run(ctx: _Nodes, kind: str, name: str, merge_source: str | None,
         granularity: int) -> None:
    """One action, as img_bitmap() passes it to the QMP command."""
    if kind == "add":
        args = {"node": TARGET, "name": name, "persistent": True}
        if granularity:
            args["granularity"] = granularity
        qmp_bitmaps.block_dirty_bitmap_add(ctx, args)
    elif kind == "merge":
        qmp_bitmaps.block_dirty_bitmap_merge(ctx, {
            "node": TARGET, "target": name,
            "bitmaps": [{"node": SOURCE, "name": merge_source}]})
    else:
        getattr(qmp_bitmaps, "block_dirty_bitmap_" + kind)(ctx, {"node": TARGET,
                                                                 "name": name})


# ---- convert --bitmaps (qemu-img.c convert_check_bitmaps / convert_copy_bitmaps) ---------
def supports_persistent_bitmaps(node) -> bool:
    """bdrv_supports_persistent_dirty_bitmap(): only qcow2 v3 stores bitmaps."""
    return node.driver_name == "qcow2" and node.drv.version >= 3


def check_convert_source(images, skip_broken: bool) -> None:
    """Before the target is created: one source, able to hold bitmaps, none of them
    inconsistent unless --skip-broken-bitmaps."""
    if len(images) > 1:
        raise report.fail("Copying bitmaps only possible with single source")
    node = images[0].node
    if not supports_persistent_bitmaps(node):
        raise report.fail("Source lacks bitmap support")
    for bm in node.dirty_bitmaps:
        if bm.persistent and bm.inconsistent and not skip_broken:
            raise report.fail("Cannot copy inconsistent bitmap '%s'" % bm.name,
                              hint="Try --skip-broken-bitmaps, or use 'qemu-img bitmap "
                                   "--remove' to delete it")


def check_convert_target(target) -> None:
    """Once the target is open: it must be able to store them."""
    if not supports_persistent_bitmaps(target.node):
        raise report.fail("Format driver '%s' does not support bitmaps"
                          % target.node.driver_name)


def copy_bitmaps(source, target, skip_broken: bool) -> None:
    """After the data: each persistent bitmap of the source is added to the target
    (same granularity and enabled state) and filled by a merge; one that cannot be
    filled is removed again before failing."""
    ctx = _Nodes(target, source)
    for bm in list(source.node.dirty_bitmaps):
        if not bm.persistent:
            continue
        if skip_broken and bm.inconsistent:
            report.warn("Skipping inconsistent bitmap '%s'" % bm.name)
            continue
        try:
            qmp_bitmaps.block_dirty_bitmap_add(ctx, {
                "node": TARGET, "name": bm.name, "granularity": bm.granularity,
                "persistent": True, "disabled": bm.disabled})
        except BlockError as e:
            raise report.fail("Failed to create bitmap %s: %s" % (bm.name, e), hint=e.hint)
        try:
            qmp_bitmaps.block_dirty_bitmap_merge(ctx, {
                "node": TARGET, "target": bm.name,
                "bitmaps": [{"node": SOURCE, "name": bm.name}]})
        except BlockError as e:
            report.error("Failed to populate bitmap %s: %s" % (bm.name, e), e.hint)
            try:
                qmp_bitmaps.block_dirty_bitmap_remove(ctx, {"node": TARGET,
                                                            "name": bm.name})
            except BlockError:
                pass             # QEMU ignores this error too
            raise report.Exit(1)
