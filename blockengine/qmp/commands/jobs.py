"""Block job commands: block-stream, block-commit, drive-/blockdev-mirror,
drive-/blockdev-backup, block-job-*, job-*, query-block-jobs, query-jobs.

Semantics and error texts are QEMU 7.2's (blockdev.c, job-qmp.c), checked against
qemu-storage-daemon in tests/jobs.  Argument types are validated by the schema layer.
"""
from __future__ import annotations

import os

from ...errors import BlockError, InvalidArgument
from ...graph import registry
from ...graph.child import ChildRole
from ...graph.node import BlockNode
from ...jobs.backup import BackupJob, check_backup_args
from ...jobs.commit import ActiveCommitJob, CommitJob
from ...jobs.job import device_name, find_block_job, find_job, jobs_of, parse_on_error
from ...jobs.mirror import MirrorJob
from ...jobs.stream import StreamJob


# ---- lookups ----------------------------------------------------------------------------
def _root_bs(ctx, name: str) -> BlockNode:
    """qmp_get_root_bs(): a node some job holds is not a root either (in QEMU the job is
    one of its parents, a child_job edge)."""
    node = ctx.graph.lookup_node(name, name)
    if node.op_blockers or any(isinstance(c.parent, BlockNode) for c in node.parents):
        raise BlockError("Need a root block node")
    return node


def _bs(ctx, name: str) -> BlockNode:
    return ctx.graph.lookup_node(name, name)


def _common(args: dict) -> dict:
    return {"speed": args.get("speed", 0),
            "auto_finalize": args.get("auto-finalize", True),
            "auto_dismiss": args.get("auto-dismiss", True)}


def _check_speed(args: dict) -> None:
    if args.get("speed", 0) < 0:
        raise InvalidArgument("Invalid parameter 'speed'")


def _create_image(ctx, filename: str, fmt: str, size: int, backing=None) -> None:
    drv = registry.get_driver(fmt)
    create = getattr(drv, "create", None)
    if create is None:
        raise BlockError("Driver '%s' does not support image creation" % fmt)
    opts = {}
    if backing is not None:
        opts["backing_file"] = backing.filename()
        opts["backing_fmt"] = backing.driver_name
    create(filename, size, opts)


def _open_target(ctx, filename: str, fmt: str | None, node_name: str | None,
                 backing: bool = True) -> BlockNode:
    if fmt is None:
        node = ctx.graph.open_image(filename, None, backing=backing)
        if node_name is not None:
            raise InvalidArgument("node-name requires a format")
    else:
        opts = {"driver": fmt, "file": {"driver": "file", "filename": filename}}
        if node_name is not None:
            opts["node-name"] = node_name
        if not backing and registry.get_driver(fmt).info.supports_backing:
            opts["backing"] = None
        node = ctx.graph.open_node(opts)
    node.monitor_owned = False
    return node


def _drop_if_unused(ctx, node: BlockNode) -> None:
    if not node.parents and node.node_name in ctx.graph.nodes:
        ctx.graph.nodes.pop(node.node_name, None)
        ctx.graph._close(node)


# ---- mirror -------------------------------------------------------------------------------
def _mirror_common(ctx, args: dict, source: BlockNode, target: BlockNode) -> MirrorJob:
    sync = args["sync"]
    if sync in ("incremental", "bitmap"):
        raise InvalidArgument("Sync mode '%s' not supported" % sync)
    source.check_op_blockers()
    target.check_op_blockers()
    if sync == "top" and source.backing is None:
        sync = "full"
    replaces = args.get("replaces")
    if replaces is not None:
        _check_to_replace(ctx, source, replaces)
    _check_speed(args)
    job = MirrorJob(ctx.graph, args.get("job-id"), source, target, sync=sync,
                    granularity=args.get("granularity"), buf_size=args.get("buf-size"),
                    replaces=replaces, unmap=args.get("unmap", True),
                    on_source_error=parse_on_error(args.get("on-source-error"),
                                                   "on-source-error"),
                    on_target_error=parse_on_error(args.get("on-target-error"),
                                                   "on-target-error"),
                    filter_node_name=args.get("filter-node-name"),
                    copy_mode=args.get("copy-mode", "background"), **_common(args))
    job.start()
    return job


def _check_to_replace(ctx, source: BlockNode, name: str) -> None:
    """check_to_replace_node(): the node must be the source or below it through filters."""
    node = ctx.graph.find_node(name)
    if node is None:
        raise InvalidArgument("Failed to find node with node-name='%s'" % name)
    node.check_op_blockers()
    n = source
    while n is not None:
        if n is node:
            return
        c = n.filtered_child()
        n = c.node if c is not None and not c.role & ChildRole.COW else None
    raise BlockError("Cannot replace '%s' by a node mirrored from '%s', because it cannot "
                     "be guaranteed that doing so would not lead to an abrupt change of "
                     "visible data" % (name, source.node_name))


def blockdev_mirror(ctx, args: dict):
    source = _root_bs(ctx, args["device"])
    target = _bs(ctx, args["target"])
    _mirror_common(ctx, args, source, target)
    return {}


def drive_mirror(ctx, args: dict):
    source = _root_bs(ctx, args["device"])
    sync = args["sync"]
    mode = args.get("mode", "absolute-paths")
    fmt = args.get("format")
    if fmt is None and mode != "existing":
        fmt = source.driver_name
    filename = args["target"]
    if sync == "top" and source.backing is None:
        sync = "full"
    if mode != "existing":
        backing = None
        if sync == "top":
            backing = source.backing
        elif sync == "none":
            backing = source
        if backing is not None and not registry.get_driver(fmt).info.supports_backing:
            backing = None
        if sync == "full" or backing is None:
            backing = None
        _create_image(ctx, filename, fmt, source.total_size, backing)
    elif not os.path.exists(filename):
        raise BlockError("Could not open '%s': No such file or directory" % filename)
    target = _open_target(ctx, filename, fmt, args.get("node-name"),
                          backing=sync != "full")
    try:
        _mirror_common(ctx, dict(args, sync=sync), source, target)
    except BaseException:
        _drop_if_unused(ctx, target)
        raise
    return {}


# ---- backup --------------------------------------------------------------------------------
def _backup_common(ctx, args: dict, source: BlockNode, target: BlockNode) -> BackupJob:
    _check_speed(args)
    source.check_op_blockers()
    target.check_op_blockers()
    compress = bool(args.get("compress"))
    if compress and not supports_compressed_writes(target):
        raise BlockError("Compression is not supported for this drive %s"
                         % device_name(target))
    sync, bmap, mode = check_backup_args(source, args["sync"], args.get("bitmap"),
                                         args.get("bitmap-mode"))
    job = BackupJob(ctx.graph, args.get("job-id"), source, target, sync=sync, bitmap=bmap,
                    bitmap_mode=mode,
                    on_source_error=parse_on_error(args.get("on-source-error"),
                                                   "on-source-error"),
                    on_target_error=parse_on_error(args.get("on-target-error"),
                                                   "on-target-error"),
                    filter_node_name=args.get("filter-node-name"), compress=compress,
                    **_common(args))
    job.start()
    return job


def supports_compressed_writes(node) -> bool:
    """bdrv_supports_compressed_writes(): the node and every filter below it can."""
    while node is not None:
        if not hasattr(node.drv, "pwritev_compressed"):
            return False
        child = node.filtered_child() if node.is_filter else None
        node = child.node if child is not None else None
    return True


def blockdev_backup(ctx, args: dict):
    source = _bs(ctx, args["device"])
    target = _bs(ctx, args["target"])
    _backup_common(ctx, args, source, target)
    return {}


def drive_backup(ctx, args: dict):
    source = _bs(ctx, args["device"])
    mode = args.get("mode", "absolute-paths")
    fmt = args.get("format")
    if fmt is None and mode != "existing":
        fmt = source.driver_name
    filename = args["target"]
    sync = args["sync"]
    if mode != "existing":
        backing = None
        if sync in ("top", "none") and registry.get_driver(fmt).info.supports_backing:
            backing = source.backing if sync == "top" else source
        _create_image(ctx, filename, fmt, source.total_size, backing)
    target = _open_target(ctx, filename, fmt, None, backing=sync != "full")
    try:
        _backup_common(ctx, args, source, target)
    except BaseException:
        _drop_if_unused(ctx, target)
        raise
    return {}


# ---- stream & commit --------------------------------------------------------------------------
def _find_backing_image(top: BlockNode, name: str) -> BlockNode | None:
    for n in top.backing_chain()[1:]:
        if n.filename() == name or n.node_name == name or (
                os.path.realpath(n.filename()) == os.path.realpath(name)):
            return n
    return None


def block_stream(ctx, args: dict):
    for a, b in (("base", "base-node"), ("base", "bottom"), ("base-node", "bottom")):
        if a in args and b in args:
            raise InvalidArgument("'%s' and '%s' cannot be specified at the same time"
                                  % (a, b))
    top = _bs(ctx, args["device"])
    base = bottom = None
    if "base" in args:
        base = _find_backing_image(top, args["base"])
        if base is None:
            raise InvalidArgument("Can't find '%s' in the backing chain" % args["base"])
    if "base-node" in args:
        base = _bs(ctx, args["base-node"])
        if base not in top.backing_chain()[1:]:
            raise InvalidArgument("Node '%s' is not a backing image of '%s'"
                                  % (args["base-node"], args["device"]))
    if "bottom" in args:
        bottom = _bs(ctx, args["bottom"])
        if bottom not in top.backing_chain()[1:]:
            raise InvalidArgument("Node '%s' is not in a chain starting from '%s'"
                                  % (args["bottom"], args["device"]))
    if "backing-file" in args and base is None and bottom is None:
        raise InvalidArgument("backing file specified, but streaming the entire chain")
    chain = top.backing_chain()
    stop = chain.index(base) if base is not None else (
        chain.index(bottom) + 1 if bottom is not None else len(chain))
    for n in chain[:stop]:
        n.check_op_blockers()
    _check_speed(args)
    job = StreamJob(ctx.graph, args.get("job-id"), top, base, bottom=bottom,
                    backing_file=args.get("backing-file"),
                    filter_node_name=args.get("filter-node-name"),
                    on_error=parse_on_error(args.get("on-error"), "on-error"),
                    **_common(args))
    job.start()
    return {}


def block_commit(ctx, args: dict):
    for a, b in (("base", "base-node"), ("top", "top-node")):
        if a in args and b in args:
            raise InvalidArgument("'%s' and '%s' cannot be specified at the same time"
                                  % (a, b))
    bs = _root_bs(ctx, args["device"])
    if "top-node" in args:
        top = _bs(ctx, args["top-node"])
        if top not in bs.backing_chain():
            raise InvalidArgument("'%s' is not in this backing file chain"
                                  % args["top-node"])
    elif "top" in args:
        top = bs if bs.filename() == args["top"] else _find_backing_image(bs, args["top"])
        if top is None:
            raise InvalidArgument("Top image file %s not found" % args["top"])
    else:
        top = bs
    if "base-node" in args:
        base_name = args["base-node"]
        base = _bs(ctx, base_name)
    elif "base" in args:
        base_name = args["base"]
        base = _find_backing_image(top, base_name)
        if base is None:
            raise InvalidArgument("Can't find '%s' in the backing chain" % base_name)
    else:
        chain = top.backing_chain()
        base = chain[-1] if len(chain) > 1 else None
        if base is None:
            raise InvalidArgument("Base 'NULL' not found")
        base_name = base.node_name
    if top is base:
        raise InvalidArgument("cannot commit an image into itself")
    if base not in top.backing_chain()[1:]:
        raise InvalidArgument("'%s' is not in this backing file chain" % base_name)
    for n in bs.backing_chain():
        n.check_op_blockers()
        if n is base:
            break
    _check_speed(args)
    on_error = parse_on_error(args.get("on-error"), "on-error")
    if top is bs:
        if "backing-file" in args:
            raise InvalidArgument("'backing-file' specified, but 'top' is the active layer")
        job = ActiveCommitJob(ctx.graph, args.get("job-id"), top, base,
                              on_source_error=on_error, on_target_error=on_error,
                              filter_node_name=args.get("filter-node-name"),
                              **_common(args))
    else:
        job = CommitJob(ctx.graph, args.get("job-id"), top, base,
                        backing_file=args.get("backing-file"), on_error=on_error,
                        filter_node_name=args.get("filter-node-name"), **_common(args))
    job.start()
    return {}


# ---- job control ----------------------------------------------------------------------------
def block_job_set_speed(ctx, args: dict):
    find_block_job(ctx.graph, args["device"]).set_speed(args["speed"])
    return {}


def block_job_cancel(ctx, args: dict):
    job = find_block_job(ctx.graph, args["device"])
    job.cancel(args.get("force", False))
    return {}


def block_job_pause(ctx, args: dict):
    find_block_job(ctx.graph, args["device"]).user_pause()
    return {}


def block_job_resume(ctx, args: dict):
    find_block_job(ctx.graph, args["device"]).user_resume()
    return {}


def block_job_complete(ctx, args: dict):
    find_block_job(ctx.graph, args["device"]).complete()
    return {}


def block_job_finalize(ctx, args: dict):
    find_block_job(ctx.graph, args["id"]).finalize()
    return {}


def block_job_dismiss(ctx, args: dict):
    find_block_job(ctx.graph, args["id"]).dismiss()
    return {}


def job_pause(ctx, args: dict):
    find_job(ctx.graph, args["id"]).user_pause()
    return {}


def job_resume(ctx, args: dict):
    find_job(ctx.graph, args["id"]).user_resume()
    return {}


def job_cancel(ctx, args: dict):
    find_job(ctx.graph, args["id"]).cancel(True)
    return {}


def job_complete(ctx, args: dict):
    find_job(ctx.graph, args["id"]).complete()
    return {}


def job_finalize(ctx, args: dict):
    find_job(ctx.graph, args["id"]).finalize()
    return {}


def job_dismiss(ctx, args: dict):
    find_job(ctx.graph, args["id"]).dismiss()
    return {}


def query_block_jobs(ctx, args: dict):
    reg = jobs_of(ctx.graph)
    with reg.lock:
        return [j.block_job_info() for j in reg.block_jobs() if j.id is not None]


def query_jobs(ctx, args: dict):
    reg = jobs_of(ctx.graph)
    with reg.lock:
        return [j.job_info() for j in reg.all_jobs() if j.id is not None]


COMMANDS = {
    "block-stream": block_stream,
    "block-commit": block_commit,
    "drive-mirror": drive_mirror,
    "blockdev-mirror": blockdev_mirror,
    "drive-backup": drive_backup,
    "blockdev-backup": blockdev_backup,
    "block-job-set-speed": block_job_set_speed,
    "block-job-cancel": block_job_cancel,
    "block-job-pause": block_job_pause,
    "block-job-resume": block_job_resume,
    "block-job-complete": block_job_complete,
    "block-job-finalize": block_job_finalize,
    "block-job-dismiss": block_job_dismiss,
    "job-pause": job_pause,
    "job-resume": job_resume,
    "job-cancel": job_cancel,
    "job-complete": job_complete,
    "job-finalize": job_finalize,
    "job-dismiss": job_dismiss,
    "query-block-jobs": query_block_jobs,
    "query-jobs": query_jobs,
}
