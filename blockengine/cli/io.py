"""`blockengine io`: a drop-in for QEMU 7.2's qemu-io.

    qemu-io [-f fmt] [-r] [-U] [-n | -t cache] [-d discard] [--image-opts]
            [--object def] [-c 'command args']... [file]

Opens the image (if given) as qemu-io does -- format probing with the raw warning,
qemu-io's permissions (consistent read, plus write unless -r; everything shared) --
then runs the -c commands in order, or reads commands from stdin after a
"qemu-io> " prompt until EOF or 'quit'.  The exit status is 1 when any command
failed (or the image could not be opened), else 0.  The commands themselves are in
``io_commands``.
"""
from __future__ import annotations

import sys

from .. import QEMU_VERSION, __version__
from ..errors import BlockError
from ..graph.graph import Graph
from . import report
from .common import Session, typed_blockdev_options
from .getopt import NO_ARG, REQUIRED_ARG, LongOpt
from .io_commands import (Device, GnuGetOpt, OpenFlags, execute, flush_stdout,
                          getopt_complaint, out, parse_qemu_opts)

SHORT_OPTS = "hVc:d:f:rsnCmki:t:T:U"
LONG_OPTS = [
    LongOpt("help", NO_ARG, "h"),
    LongOpt("version", NO_ARG, "V"),
    LongOpt("cmd", REQUIRED_ARG, "c"),
    LongOpt("format", REQUIRED_ARG, "f"),
    LongOpt("read-only", NO_ARG, "r"),
    LongOpt("snapshot", NO_ARG, "s"),
    LongOpt("nocache", NO_ARG, "n"),
    LongOpt("copy-on-read", NO_ARG, "C"),
    LongOpt("misalign", NO_ARG, "m"),
    LongOpt("native-aio", NO_ARG, "k"),
    LongOpt("aio", REQUIRED_ARG, "i"),
    LongOpt("discard", REQUIRED_ARG, "d"),
    LongOpt("cache", REQUIRED_ARG, "t"),
    LongOpt("trace", REQUIRED_ARG, "T"),
    LongOpt("object", REQUIRED_ARG, "object"),
    LongOpt("image-opts", NO_ARG, "image-opts"),
    LongOpt("force-share", NO_ARG, "U"),
]

USAGE = """\
Usage: {0} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{0} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"""

VERSION = ("{0} version %d.%d.%d (blockengine %s)\n"
           "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
           % (*QEMU_VERSION, __version__))

MAX_LINE = 1023             # fgets() into qemu-io's 1024-byte line buffer


class QemuIo:
    """One qemu-io session: the open image (if any), and the command loop."""

    def __init__(self, prog: str, image_opts: bool, secrets: dict):
        self.prog = prog
        self.image_opts = image_opts
        self.secrets = secrets
        self.device: Device | None = None
        self.quit = False

    # ---- the image ----------------------------------------------------------------------
    def open(self, name: str | None, opts: dict[str, str] | None, flags: OpenFlags) -> int:
        """openfile(): 0, or 1 after QEMU's message.  ``name`` None: --image-opts."""
        if self.device is not None:
            report.error("file open already, try 'help close'")
            return 1
        opts = dict(opts or {})
        if flags.force_share:
            if opts.get("force-share", "on") != "on":
                report.error("-U conflicts with image options")
                return 1
            opts["force-share"] = "on"
        try:
            self.device = self._open_device(name, opts, flags)
        except BlockError as e:
            report.error("can't open%s%s: %s" % (" device " if name else "", name or "", e),
                         e.hint)
            return 1
        node = self.device.node
        if not flags.read_only and node.options.get("x-probed") and node.driver_name == "raw":
            Session._probed_raw_warning(self.device)
        return 0

    def _open_device(self, name: str | None, flat: dict[str, str],
                     flags: OpenFlags) -> Device:
        """blk_new_open(): the node graph for a file name (format probed unless given)
        or for --image-opts options, and qemu-io's backend on it."""
        if flags.snapshot:
            raise BlockError("snapshot mode (-s) is not supported by blockengine")
        options = typed_blockdev_options(flat)
        force_share = bool(options.pop("force-share", False))
        direct = flags.direct or bool(options.get("cache", {}).get("direct"))
        if flags.aio == "native" and not direct:
            raise BlockError("aio=native was specified, but it requires cache.direct=on, "
                             "which was not specified.")
        options.setdefault("discard", flags.discard)
        file_ref = options.get("file")
        if name is None and "driver" not in options:
            if isinstance(file_ref, str):
                raise BlockError("Cannot find device='%s' nor node-name='%s'"
                                 % (file_ref, file_ref))
            if file_ref is None:
                raise BlockError("Must specify either driver or file")
        graph = Graph()
        graph.secrets = self.secrets
        try:
            if name is None and "driver" in options:
                cache = {"direct": flags.direct, "no-flush": flags.no_flush}
                node = graph.open_node(options, read_only=flags.read_only,
                                       inherit={"cache": cache, "force-share": force_share})
            else:                   # a file name, or options naming only the file: probe
                if isinstance(file_ref, dict) and name is not None:
                    options["file"] = {"driver": "file", "filename": name, **file_ref}
                filename = name if name is not None else file_ref.get("filename", "")
                node = graph.open_image(filename, options.pop("driver", None),
                                        read_only=flags.read_only, force_share=force_share,
                                        options=options, cache_direct=flags.direct,
                                        no_flush=flags.no_flush)
            return Device(graph, node, writable=not flags.read_only,
                          writethrough=flags.writethrough)
        except BaseException:
            graph.close_all()
            raise

    def close(self) -> None:
        device, self.device = self.device, None
        if device is not None:
            device.close()

    # ---- commands -------------------------------------------------------------------------
    def command_loop(self, commands: list[str]) -> int:
        """The -c commands, or else stdin's; the last failure's -errno, or 0."""
        last_error = 0
        lines = iter(commands) if commands else self._stdin_lines()
        for line in lines:
            if self.quit:
                break
            ret = execute(self, line)
            if ret < 0:
                last_error = ret
        return last_error

    def _stdin_lines(self):
        """Lines after a prompt each, as fgets() splits them, until EOF or quit."""
        stdin = sys.stdin.buffer
        while not self.quit:
            out("%s> " % self.prog)
            flush_stdout()
            line = stdin.readline(MAX_LINE)
            if not line:
                if stdin.isatty():
                    out("\n")
                return
            if line.endswith(b"\n"):
                line = line[:-1]
            yield line.decode(errors="surrogateescape")


def _usage(prog: str) -> None:
    sys.stdout.write(USAGE.format(prog))


def main(argv: list[str], prog: str = "qemu-io") -> int:
    """qemu-io's main(); ``argv`` excludes the program name, ``prog`` prefixes messages."""
    report.set_program(prog, prog)
    try:
        return _run(argv, prog)
    except report.Exit as e:
        return e.code
    finally:
        flush_stdout()


def _run(argv: list[str], prog: str) -> int:
    session = Session()
    flags = OpenFlags()
    fmt, image_opts, commands = None, False, []
    getopt = GnuGetOpt([prog, *argv], SHORT_OPTS, LONG_OPTS)
    while (opt := getopt.next()) is not None:
        key = opt.key
        if key in ("?", ":"):
            sys.stderr.write(getopt_complaint(prog, getopt, opt))
            _usage(prog)
            return 1
        if key == "h":
            _usage(prog)
            return 0
        if key == "V":
            sys.stdout.write(VERSION.format(prog))
            return 0
        if key == "c":
            commands.append(opt.arg)
        elif key == "f":
            fmt = opt.arg
        elif key == "object":
            session.add_object(opt.arg)         # prints and raises Exit on errors
        elif key == "image-opts":
            image_opts = True
        elif key in ("m", "T"):
            pass                    # misaligned buffers and tracing: accepted, no effect
        elif not flags.set(key, opt.arg):
            return 1
    operands = getopt.operands
    if len(operands) > 1:
        _usage(prog)
        return 1
    if fmt and image_opts:
        report.error("--image-opts and -f are mutually exclusive")
        return 1
    qemu_io = QemuIo(prog, image_opts, session.secrets)
    try:
        if operands:
            if image_opts:
                ret = qemu_io.open(None, parse_qemu_opts(operands[0]), flags)
            else:
                ret = qemu_io.open(operands[0], {"driver": fmt} if fmt else None, flags)
            if ret:
                return 1
        return 1 if qemu_io.command_loop(commands) < 0 else 0
    finally:
        qemu_io.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
