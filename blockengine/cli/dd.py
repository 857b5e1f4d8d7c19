"""`img dd` (qemu-img.c img_dd): copy an image, or a part of it, into a new image.

The operands are dd(1)'s ``bs=``, ``count=``, ``skip=``, ``if=`` and ``of=``.  The
output is always created (as -O fmt, default raw) with the size the copy will have, then
the input is copied block by block.  QEMU's arithmetic is kept as it is: ``count``
limits the input to its first count*bs bytes *before* ``skip`` is subtracted, and a
skip beyond that end makes an empty output with a warning.
"""
from __future__ import annotations

from ..errors import BlockError
from ..graph import registry
from ..image import Image
from . import report
from .chain import has_protocol
from .common import Session
from .create import PROTOCOL, driver_create_opts, img_create
from .img import FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, _cvtnum, _strerror, parse_args
from .opts import OptionError, cvtnum

INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
DEFAULT_BLOCK_SIZE = 512


class DdArgs:
    """The dd operands, as img_dd's DdIo/DdInfo hold them."""

    def __init__(self):
        self.bsz = DEFAULT_BLOCK_SIZE
        self.count: int | None = None
        self.skip: int | None = None
        self.input: str | None = None
        self.output: str | None = None

    def set(self, operand: str) -> None:
        """One ``name=value`` operand; report.Exit with QEMU's message if invalid."""
        name, eq, value = operand.partition("=")
        if not eq or name not in ("bs", "count", "if", "of", "skip"):
            raise report.fail("unrecognized operand %s" % name)
        if name == "bs":
            try:
                self.bsz = cvtnum("bs", value, 1, INT_MAX)
            except OptionError as e:
                raise report.fail(str(e), hint=e.hint)
        elif name == "count":
            self.count = _cvtnum("count", value)
        elif name == "skip":
            self.skip = _cvtnum("skip", value)
        elif name == "if":
            self.input = value
        else:
            self.output = value


def cmd_dd(argv: list[str]) -> int:
    session = Session()
    fmt = None
    out_fmt = "raw"
    image_opts = force_share = False
    opts, operands = parse_args(argv, ":hf:O:U", [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE],
                                session)
    for key, arg in opts:
        if key == "O":
            out_fmt = arg
        elif key == "f":
            fmt = arg
        elif key == "U":
            force_share = True
        elif key == "image-opts":
            image_opts = True
    dd = DdArgs()
    for operand in operands:
        dd.set(operand)
    if dd.input is None or dd.output is None:
        raise report.fail("Must specify both input and output files")
    src = session.open(dd.input, fmt, image_opts=image_opts, force_share=force_share)
    dst = None
    try:
        _check_output_drivers(out_fmt, dd.output)
        size = src.size
        if dd.count is not None and dd.count <= INT64_MAX // dd.bsz:
            size = min(size, dd.count * dd.bsz)
        skip_beyond_end = dd.skip is not None and (dd.skip > INT64_MAX // dd.bsz
                                                   or size < dd.skip * dd.bsz)
        in_pos = (dd.skip or 0) * dd.bsz
        try:
            img_create(dd.output, out_fmt,
                       extra={"size": 0 if skip_beyond_end else size - in_pos})
        except BlockError as e:
            raise report.fail("%s: error while creating output image: %s"
                              % (dd.output, e), hint=e.hint)
        # the target has no --image-opts: it is created from a file name just above
        dst = session.open(dd.output, out_fmt, writable=True)
        if skip_beyond_end:
            # like dd(1): warn, and leave the output empty
            report.error("%s: cannot skip to specified offset" % dd.input)
            in_pos = size
        _copy(src, dst, in_pos, size, dd.bsz)
    finally:
        for img in (src, dst):
            if img is not None:
                img.close()
    return 0


def _check_output_drivers(out_fmt: str, filename: str) -> None:
    """bdrv_find_format() / bdrv_find_protocol() and their create support."""
    if not registry.has_driver(out_fmt):
        raise report.fail("Unknown file format")
    if has_protocol(filename):
        proto = filename.split(":", 1)[0]
        if proto != PROTOCOL:
            raise report.fail("Unknown protocol '%s'" % proto)
    for kind, name in (("Format", out_fmt), ("Protocol", PROTOCOL)):
        try:
            driver_create_opts(registry.get_driver(name))
        except BlockError:
            raise report.fail("%s driver '%s' does not support image creation"
                              % (kind, name)) from None


def _copy(src: Image, dst: Image, in_pos: int, end: int, bsz: int) -> None:
    out_pos = 0
    while in_pos < end:
        n = min(bsz, end - in_pos)
        try:
            buf = src.read(in_pos, n)
        except BlockError as e:
            raise report.fail("error while reading from input image file: %s"
                              % _strerror(e))
        in_pos += n
        try:
            dst.write(out_pos, buf)
        except BlockError as e:
            raise report.fail("error while writing to output image file: %s"
                              % _strerror(e))
        out_pos += n
