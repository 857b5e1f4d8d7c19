"""Image creation as qemu-img does it (block.c bdrv_img_create), library-callable.

``create_options(fmt, filename)`` gives the QemuOpts list qemu-img uses for -o: the
format driver's options followed by the protocol driver's (file), without duplicates.
Drivers name their options in ``DriverInfo.create_opts``, either as ``OptDesc``-like
objects (name/type/help/default) or as plain names described by ``KNOWN_OPTS``.

``img_create(...)`` validates like QEMU, announces the "Formatting ..." line through a
callback and calls ``DriverClass.create(filename, size, options)``; it raises
``BlockError``/``OptionError`` with QEMU's messages (the caller adds "FILE: ").
"""
from __future__ import annotations

import errno

from ..drivers.protocol.file import check_create_locks
from ..errors import BlockError, InvalidArgument
from ..graph import registry
from ..graph.graph import abspath_like_qemu
from ..image import Image
from .opts import OPT_BOOL, OPT_NUMBER, OPT_SIZE, OPT_STRING, OptDesc, OptsSet, print_help

PROTOCOL = "file"

# QEMU's descriptions of the common create options (include/block/block_int-common.h
# BLOCK_OPT_* and the drivers' QemuOptsLists), for drivers that only list names.
KNOWN_OPTS = {d.name: d for d in (
    OptDesc("size", OPT_SIZE, "Virtual disk size"),
    OptDesc("preallocation", OPT_STRING,
            "Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("nocow", OPT_BOOL, "Turn off copy-on-write (valid only on btrfs)"),
    OptDesc("extent_size_hint", OPT_SIZE,
            "Extent size hint for the image file, 0 to disable"),
    OptDesc("backing_file", OPT_STRING, "File name of a base image"),
    OptDesc("backing_fmt", OPT_STRING, "Image format of the base image"),
    OptDesc("cluster_size", OPT_SIZE, "Cluster size (in bytes)"),
    OptDesc("encryption", OPT_BOOL, "Encrypt the image"),
    OptDesc("compat", OPT_STRING, "Compatibility level"),
    OptDesc("lazy_refcounts", OPT_BOOL, "Postpone refcount updates"),
    OptDesc("refcount_bits", OPT_NUMBER, "Width of a reference count entry in bits"),
    OptDesc("data_file", OPT_STRING, "File name of an external data file"),
    OptDesc("data_file_raw", OPT_BOOL,
            "The external data file must stay valid as a raw image"),
    OptDesc("compression_type", OPT_STRING,
            "Compression method used for image cluster compression"),
    OptDesc("extended_l2", OPT_BOOL, "Extended L2 tables"),
)}


def option_desc(opt) -> OptDesc:
    """The CLI description of a driver's create/amend option (an OptDesc, a known
    option name, or a driver CreateOpt)."""
    if isinstance(opt, OptDesc):
        return opt
    if isinstance(opt, str):
        return KNOWN_OPTS.get(opt, OptDesc(opt))
    return OptDesc(opt.name, getattr(opt, "type", OPT_STRING), getattr(opt, "help", ""),
                   getattr(opt, "default", None))


def find_format(fmt: str):
    """bdrv_find_format(): the driver class, or InvalidArgument 'Unknown file format'."""
    if not registry.has_driver(fmt):
        raise InvalidArgument("Unknown file format '%s'" % fmt)
    return registry.get_driver(fmt)


def _creatable(drv_cls) -> bool:
    return callable(getattr(drv_cls, "create", None))


def driver_create_opts(drv_cls) -> list[OptDesc]:
    """The create options of one driver ('does not support image creation' if none)."""
    if not _creatable(drv_cls):
        raise InvalidArgument("Format driver '%s' does not support image creation"
                              % drv_cls.info.name)
    return [option_desc(o) for o in drv_cls.info.create_opts]


def create_options(fmt: str, filename: str | None) -> list[OptDesc]:
    """qemu_opts_append(format opts, protocol opts) as bdrv_img_create builds it."""
    descs = driver_create_opts(find_format(fmt))
    if filename is not None:
        names = {d.name for d in descs}
        proto = registry.get_driver(PROTOCOL)
        if not _creatable(proto):
            raise InvalidArgument("Protocol driver '%s' does not support image creation"
                                  % PROTOCOL)
        descs += [d for d in driver_create_opts(proto) if d.name not in names]
    return descs


def option_help(fmt: str, filename: str | None) -> str:
    """print_block_option_help()'s text for ``-o help``."""
    descs = create_options(fmt, filename)
    if filename is None:
        return print_help(descs, "Supported %s options:" % fmt) + (
            "\nThe protocol level may support further options.\n"
            "Specify the target filename to include those options.\n")
    return print_help(descs, "Supported options:")


def img_create(filename: str, fmt: str, *, options: str | None = None,
               size: int | None = None, base_filename: str | None = None,
               base_fmt: str | None = None, no_open_backing: bool = False,
               announce=None, extra: dict | None = None,
               secrets: dict | None = None) -> None:
    """bdrv_img_create(): create ``filename`` as ``fmt``; ``size`` None = not given.

    ``announce(line)`` receives the "Formatting ..." line before creation starts;
    ``extra`` are options set after -o parsing (convert sets the size this way);
    ``secrets`` are the --object secret values (key-secret options name them).
    """
    drv_cls = find_format(fmt)
    opts = OptsSet(create_options(fmt, filename))
    if options:
        opts.parse(options)
    for key, value in (extra or {}).items():
        opts.set(key, str(value))
    if "size" not in opts.values:
        if size is not None:
            opts.set("size", str(size))
    elif size is not None:
        raise InvalidArgument("The image size must be specified only once")
    for name, value, what in (("backing_file", base_filename, "Backing file"),
                              ("backing_fmt", base_fmt, "Backing file format")):
        if value is not None:
            if not opts.has(name):
                raise InvalidArgument("%s not supported for file format '%s'" % (what, fmt))
            opts.set(name, value)
    backing_file = opts.get("backing_file")
    if backing_file is not None:
        if backing_file == filename:
            raise InvalidArgument("Error: Trying to create an image with the same "
                                  "filename as the backing file")
        if backing_file == "":
            raise InvalidArgument("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    size = opts.get("size")
    if backing_file and not no_open_backing:
        size = _backing_size(filename, backing_file, backing_fmt, size)
        if "size" not in opts.values:
            opts.set("size", str(size))
    elif backing_file and not backing_fmt:
        raise InvalidArgument("Backing file specified without backing format")
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")
    if announce is not None:
        line = "Formatting '%s', fmt=%s " % (filename, fmt) + opts.print_line()
        announce(line)
    check_create_locks(filename)
    typed = opts.typed()
    typed.pop("size", None)
    # the drivers' QemuOpts translators (raw_co_create_opts...) round up to sectors
    try:
        drv_cls.create(filename, -(-size // 512) * 512, typed, secrets=secrets)
    except BlockError as e:
        if e.errno != errno.EFBIG:
            raise
        # bdrv_img_create(): a better message than the driver's, with a hint when the
        # format has a cluster size (qemu_opt_get_size() falls back to its default)
        desc = next((d for d in opts.descs if d.name == "cluster_size"), None)
        hint = desc is not None and bool(opts.get("cluster_size", desc.default))
        raise InvalidArgument("The image size is too large for file format '%s'%s" % (
            fmt, " (try using a larger cluster size)" if hint else "")) from e


def _backing_size(filename: str, backing_file: str, backing_fmt: str | None,
                  size: int | None) -> int | None:
    """Open the backing file (no I/O, shared) to check it and take its size."""
    full = abspath_like_qemu(filename, backing_file)
    try:
        img = Image(full, backing_fmt, read_only=True, force_share=True, backing=False)
    except BlockError as e:
        raise BlockError(str(e), errno=e.errno, hint="Could not open backing image.") from e
    try:
        if not backing_fmt:
            raise InvalidArgument("Backing file specified without backing format",
                                  hint="Detected format of %s." % img.node.driver_name)
        return size if size is not None else img.size
    finally:
        img.close()
