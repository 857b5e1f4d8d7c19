"""blockdev-create's job (QEMU 7.2's block/create.c) and the drivers' create entry points.

A create job is a plain job (job.c), not a block job: query-jobs lists it but
query-block-jobs and the block-job-* commands do not see it, it emits only
JOB_STATUS_CHANGE (created, running, waiting, pending, concluded; aborting instead of
waiting/pending on failure), and it waits in 'concluded' for job-dismiss
(JOB_MANUAL_DISMISS).  Its progress is 0/1 until the driver's create returns, 1/1
after, even when it failed.

``CREATORS`` maps a BlockdevCreateOptions driver to its ``bdrv_co_create``: a function
(graph, options) taking the validated options with their QAPI member names.  The work
itself is the drivers' own create code, shared with `img create`: the options are only
renamed to the drivers' QemuOpts names.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ..drivers.format.luks import driver as luks
from ..drivers.format.qcow2 import create as qcow2
from ..drivers.format.vmdk import create as vmdk
from ..drivers.protocol.file import FileDriver, check_create_locks
from ..errors import InvalidArgument
from ..graph.backend import BlockBackend
from ..graph.perms import Perm
from .job import Job

_INT64_RANGE = 1 << 63


def _size(options: dict) -> int:
    """The 'size' member (QAPI 'size', an uint64) as the int64_t drivers take it."""
    size = options["size"]
    return size - (1 << 64) if size >= _INT64_RANGE else size


def _driver_options(options: dict, rename: Callable[[str], str]) -> dict:
    """The create options besides driver, file and size, under the drivers' QemuOpts
    names; a nested 'encrypt' object becomes 'encrypt.MEMBER' options."""
    out = {}
    for name, value in options.items():
        if name in ("driver", "file", "size"):
            continue
        if name == "encrypt":
            out.update({"encrypt." + key: member for key, member in value.items()})
        else:
            out[rename(name)] = value
    return out


@contextlib.contextmanager
def _opened(graph, ref) -> Iterator:
    """bdrv_open_blockdev_ref(): a node named by ``ref``, or one opened from the options
    ``ref`` for the duration of the create (None: no node)."""
    if ref is None:
        yield None
    elif isinstance(ref, str):
        yield graph.lookup_node(ref, ref)
    else:
        node = graph.open_node(ref)
        try:
            yield node
        finally:
            graph.delete_node(node)


def _check_writable(graph, node) -> None:
    """blk_new_with_bs(bs, WRITE | RESIZE, ALL): the creating user's permissions must
    fit the node's other users (a read-only node refuses them)."""
    blk = BlockBackend(graph, perm=Perm.WRITE | Perm.RESIZE, shared=Perm.all())
    try:
        blk.insert(node)
    finally:
        blk.delete()


def create_file(graph, options: dict) -> None:
    """raw_co_create(): create or truncate the file, then preallocate.  'nocow' and
    'extent-size-hint' are hints QEMU applies when the file system supports them."""
    filename = options["filename"]
    check_create_locks(filename)
    FileDriver.create(filename, _size(options),
                      {"preallocation": options.get("preallocation", "off")})


def create_qcow2(graph, options: dict) -> None:
    """qcow2_co_create(): options checked first, then the qcow2 image laid onto 'file'
    (and 'data-file', whose file name the header records)."""
    size = _size(options)
    if size % 512:
        raise InvalidArgument("Image size must be a multiple of 512 bytes")
    opts = _driver_options(options, lambda name: {"version": "compat"}.get(
        name, name.replace("-", "_")))
    params = qcow2.check_create_options(opts, graph.secrets)
    with _opened(graph, options["file"]) as file_node, \
            _opened(graph, options.get("data-file")) as data_node:
        _check_writable(graph, file_node)
        if data_node is not None:
            _check_writable(graph, data_node)
        qcow2.format_nodes(graph, file_node, data_node,
                           data_node.filename() if data_node is not None else None,
                           size, params)


def create_luks(graph, options: dict) -> None:
    """block_crypto_co_create_luks(): the LUKS header and key slot 0 on 'file', sized
    for 'size' payload bytes."""
    with _opened(graph, options["file"]) as file_node:
        _check_writable(graph, file_node)
        params = luks.check_create_options(_driver_options(options, str), graph.secrets)
        luks.format_node(file_node, _size(options), luks.new_volume(params), params)


def create_vmdk(graph, options: dict) -> None:
    """vmdk_co_create(): 'file' takes the descriptor (and the extent of a monolithic
    subformat); the extents of the flat and split subformats are 'extents', in order."""
    size = _size(options)
    if size % 512:
        raise InvalidArgument("Image size must be a multiple of 512 bytes")
    fmt = options.get("subformat", "monolithicSparse")
    zeroed_grain = options.get("zeroed-grain", False)
    extents = options.get("extents", [])
    with contextlib.ExitStack() as opened:
        def extent_node(extent_size: int, idx: int, flat: bool, split: bool):
            # vmdk_co_create_cb()
            if idx == 0:
                ref = options["file"]
            elif idx - 1 < len(extents):
                ref = extents[idx - 1]
            elif extent_size == -1:
                return None
            else:
                raise InvalidArgument("Extent [%d] not specified" % (idx - 1))
            if extent_size == -1:
                return ref
            node = opened.enter_context(_opened(graph, ref))
            _check_writable(graph, node)
            vmdk.init_extent(node, extent_size, flat, fmt == "streamOptimized", zeroed_grain)
            return node

        vmdk.do_create(size, fmt, options.get("adapter-type", "ide"),
                       options.get("backing-file"), options.get("hwversion"),
                       options.get("toolsversion"), False, zeroed_grain, extent_node)


CREATORS: dict[str, Callable[[object, dict], None]] = {
    "file": create_file,
    "qcow2": create_qcow2,
    "luks": create_luks,
    "vmdk": create_vmdk,
}


class CreateJob(Job):
    """The job blockdev-create runs: ``CREATORS[driver](graph, options)``."""

    job_type = "create"
    block_job = False

    def __init__(self, graph, job_id: str, options: dict):
        self.options = options
        self.creator = CREATORS[options["driver"]]
        super().__init__(graph, job_id, None, auto_dismiss=False)

    def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            self.creator(self.graph, self.options)
        finally:
            self.progress(1)

    def _emit(self, name: str, data: dict) -> None:
        # a plain job: the BLOCK_JOB_* events belong to block jobs only
        if name == "JOB_STATUS_CHANGE":
            super()._emit(name, data)
