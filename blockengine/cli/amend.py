"""`img amend` (qemu-img.c img_amend): change options of an existing image in place.

The format driver declares ``amend_opts`` (its QemuOptsList) and implements
``amend_options(opts, force, status_cb)``, where ``opts`` maps each option given to
(string as typed, typed value).  This module only parses the command line like
qemu-img, opens the image read-write, validates ``-o`` against the driver's amend
options (falling back to its create options to add QEMU's "only supported for image
creation" hint) and prints progress and errors.
"""
from __future__ import annotations

import sys

from ..errors import BlockError
from . import report
from .common import DEFAULT_CACHE, Session
from .create import option_desc, find_format
from .getopt import NO_ARG
from .img import FORMAT, HELP, IMAGE_OPTS, OBJECT, _accumulate_options, parse_args
from .opts import OptionError, OptsSet, has_help_option, print_help
from .output import Progress, float32

FORCE = ("force", NO_ARG, "force")
CREATION_ONLY_HINT = "This option is only supported for image creation\n"


def cmd_amend(argv: list[str]) -> int:
    session = Session()
    fmt = options = None
    cache = DEFAULT_CACHE
    progress = quiet = image_opts = force = False
    opts, operands = parse_args(argv, ":ho:f:t:pq", [HELP, FORMAT, OBJECT, IMAGE_OPTS, FORCE],
                                session)
    for key, arg in opts:
        if key == "o":
            options = _accumulate_options(options, arg)
        elif key == "f":
            fmt = arg
        elif key == "t":
            cache = arg
        elif key == "p":
            progress = True
        elif key == "q":
            quiet = True
        elif key == "image-opts":
            image_opts = True
        elif key == "force":
            force = True
    if not options:
        raise report.UsageError("Must specify options (-o)")
    # qemu_progress_init(): from here on every exit path ends the progress line
    bar = Progress(progress and not quiet, 1.0)
    try:
        return _amend(session, operands, fmt, options, cache, image_opts, force, bar)
    finally:
        bar.end()


def _amend(session: Session, operands: list[str], fmt: str | None, options: str,
           cache: str, image_opts: bool, force: bool, bar: Progress) -> int:
    if fmt and has_help_option(options):
        return _print_amend_help(fmt)
    if len(operands) != 1:
        raise report.fail("Expecting one image file name")
    img = session.open(operands[0], fmt, image_opts=image_opts, writable=True, cache=cache,
                       source_cache=False)
    try:
        drv = img.node.drv
        fmt = img.node.driver_name
        if has_help_option(options):
            return _print_amend_help(fmt)
        amend_opts = getattr(drv, "amend_opts", None)
        if not amend_opts:
            raise report.fail("Format driver '%s' does not support option amendment" % fmt)
        parsed = _parse(options, amend_opts, drv.info.create_opts)
        bar.print(0.0, 0)
        try:
            drv.amend_options(parsed.values, force, lambda done, total: bar.print(
                # amend_status_cb(): 100.f * offset / total_work_size, in C float
                float32(float32(100.0 * float32(done)) / float32(total)), 0))
        except BlockError as e:
            _report(str(e), e.hint)
            raise report.Exit(1)
        bar.print(100.0, 0)
    finally:
        img.close()
    return 0


def _parse(options: str, amend_opts, create_opts) -> OptsSet:
    """qemu_opts_do_parse() over the amend options; on failure, the create options
    decide whether QEMU adds its image-creation hint to the first error."""
    amend_descs = [option_desc(o) for o in amend_opts]
    parsed = OptsSet(amend_descs)
    try:
        parsed.parse(options)
    except OptionError as e:
        names = {d.name for d in amend_descs}
        both = OptsSet(amend_descs + [d for d in map(option_desc, create_opts)
                                      if d.name not in names])
        hint = e.hint + "\n" if e.hint and not e.hint.endswith("\n") else e.hint
        try:
            both.parse(options)
            hint = (hint or "") + CREATION_ONLY_HINT
        except OptionError:
            pass
        _report(str(e), hint)
        raise report.Exit(1)
    return parsed


def _print_amend_help(fmt: str) -> int:
    """print_amend_option_help()."""
    try:
        drv_cls = find_format(fmt)
    except BlockError as e:
        raise report.fail(str(e))
    amend_opts = getattr(drv_cls, "amend_opts", None)
    if not amend_opts:
        raise report.fail("Format driver '%s' does not support option amendment" % fmt)
    sys.stdout.write(print_help([option_desc(o) for o in amend_opts],
                                "Amend options for '%s':" % fmt))
    return 0


def _report(msg: str, hint: str | None) -> None:
    """error_report_err(): the message, then the hint exactly as appended (QEMU adds no
    newline to a hint that lacks one)."""
    report.error(msg)
    if hint:
        sys.stderr.write(hint)
        sys.stderr.flush()
