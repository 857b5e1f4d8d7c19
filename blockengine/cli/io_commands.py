"""qemu-io's commands (QEMU 7.2 qemu-io-cmds.c, plus open/close/quit of qemu-io.c).

Every command is one ``Command`` row in ``COMMANDS``: name, alias, argument count
limits, the permission it needs on the image, its help texts and its handler.
``execute()`` is qemuio_command(): it splits a command line at spaces, finds the
command, checks that a file is open and the argument count, takes the permission
and runs the handler.

A handler ``(ctx, cmd, argv) -> int`` gets the session (``ctx.device`` is the open
image, if any) and the words of the line, argv[0] being the name as typed.  It
prints exactly what qemu-io prints -- its own messages on stdout (printf), library
errors on stderr (error_report, prefixed with the program name) -- and returns 0 or
a negative errno, or raises ``Failed`` once its message is out.  Requests are
synchronous, so the aio_* commands complete (and report) before they return.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable      # not typing: its import costs start-up

from .._record import record
from ..drivers.base import BLOCK_ALLOCATED, DriverKind, PreallocMode
from ..errors import BlockError, NotSupported
from ..graph.backend import ALL_SHARED, BlockBackend
from ..graph.perms import Perm
from . import report
from .common import CACHE_MODES
from .getopt import GetOpt
from .opts import SizeError, parse_opts, strtosz
from .output import dump_qobject

MAX_REQUEST = 2147483136            # BDRV_REQUEST_MAX_BYTES: INT_MAX aligned down to 512
SECTOR = 512
NSIG = 65                           # glibc's NSIG on Linux
INT64_MAX = (1 << 63) - 1


# ---- output ---------------------------------------------------------------------------------
def out(text: str) -> None:
    """printf(): qemu-io's own messages and results."""
    try:
        sys.stdout.write(text)
    except BrokenPipeError:
        _stdout_gone()


def err(text: str) -> None:
    """fprintf(stderr): messages without the program prefix."""
    flush_stdout()
    sys.stderr.write(text)
    sys.stderr.flush()


def flush_stdout() -> None:
    """fflush(stdout)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()


def _stdout_gone() -> None:
    """qemu-io ignores SIGPIPE: once the reader is gone, the output is lost but the
    commands still run."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def strerror(ret: int) -> str:
    return os.strerror(-ret)


def neg_errno(e: BlockError, default: int = errno.EIO) -> int:
    """The -errno a failed library call stands for."""
    return -(e.errno or default)


class Failed(Exception):
    """Ends a command with ``ret`` (a negative errno); its message is already out."""

    def __init__(self, ret: int = -errno.EINVAL):
        super().__init__(ret)
        self.ret = ret


def fail(message: str, ret: int = -errno.EINVAL) -> Failed:
    """Print ``message`` on stdout and return the Failed to raise."""
    out(message + "\n")
    return Failed(ret)


# ---- number and string formats (cvtstr, timestr, print_report, dump_buffer) --------------------
_UNITS = ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))


def cvtstr(value: float) -> str:
    """'4 KiB', '1.500 KiB', '512 bytes': everything from a '.000' on is cut off."""
    for shift, unit in _UNITS:
        if value >= 1 << shift:
            text = "%.3f" % (value / (1 << shift))
            break
    else:
        unit, text = "bytes", "%f" % value
    cut = text.find(".000")
    return "%s %s" % (text[:cut] if cut >= 0 else text, unit)


def _per_second(value: float, elapsed_ns: int) -> float:
    """tdiv(): value / elapsed seconds, in C double arithmetic (x/0 is inf)."""
    sec, nsec = divmod(elapsed_ns, 1_000_000_000)
    seconds = sec + nsec / 1e9
    if seconds == 0:
        return float("inf") if value else float("nan")
    return value / seconds


def timestr(elapsed_ns: int, verbose: bool) -> str:
    """'00.01 sec', or 'H:MM:SS.ss' (always with -C, or from one second on)."""
    sec, nsec = divmod(elapsed_ns, 1_000_000_000)
    frac = nsec / 1e9
    if verbose or sec:
        return "%u:%02u:%05.2f" % (sec // 3600, sec % 3600 // 60, sec % 60 + frac)
    return "%05.2f sec" % frac


def report_lines(op: str, elapsed_ns: int, offset: int, count: int, total: int, ops: int,
                 csv: bool) -> str:
    """print_report(): what a finished request prints (-C: one comma-separated line)."""
    ts = timestr(elapsed_ns, csv)
    if csv:
        return "%d,%d,%s,%.3f,%.3f\n" % (total, ops, ts, _per_second(total, elapsed_ns),
                                         _per_second(ops, elapsed_ns))
    return ("%s %d/%d bytes at offset %d\n" % (op, total, count, offset)
            + "%s, %d ops; %s (%s/sec and %.4f ops/sec)\n"
            % (cvtstr(total), ops, ts, cvtstr(_per_second(total, elapsed_ns)),
               _per_second(ops, elapsed_ns)))


def print_report(op: str, elapsed_ns: int, offset: int, count: int, csv: bool) -> None:
    """The report of one complete request of ``count`` bytes."""
    out(report_lines(op, elapsed_ns, offset, count, count, 1, csv))


# isalnum() in the C locale: everything else shows as '.'
_DUMP_CHARS = bytes(c if chr(c).isascii() and chr(c).isalnum() else ord(".")
                    for c in range(256))


def dump_buffer(buf, offset: int) -> None:
    """dump_buffer(): 16 bytes a line, hex then characters."""
    lines = []
    for i in range(0, len(buf), 16):
        chunk = bytes(buf[i:i + 16])
        lines.append("%08x:  %s %s\n" % (offset + i, "".join("%02x " % b for b in chunk),
                                         chunk.translate(_DUMP_CHARS).decode("ascii")))
    out("".join(lines))


# ---- argument parsing --------------------------------------------------------------------------
def cvtnum(text: str) -> int:
    """A size argument ('4k', '0x200', '1.5M'); -EINVAL or -ERANGE when it is not one."""
    try:
        value = strtosz(text)
    except SizeError as e:
        return -errno.ERANGE if e.overflow else -errno.EINVAL
    return -errno.ERANGE if value > INT64_MAX else value


def number(text: str, shown: str | None = None) -> int:
    """cvtnum() or, with print_cvtnum_err()'s message (naming ``shown``), Failed."""
    value = cvtnum(text)
    if value == -errno.EINVAL:
        raise fail("Parsing error: non-numeric argument, or extraneous/unrecognized "
                   "suffix -- %s" % (shown or text), value)
    if value == -errno.ERANGE:
        raise fail("Parsing error: argument too large -- %s" % (shown or text), value)
    return value


_STRTOL_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
LONG_MAX = (1 << 63) - 1


def c_strtol(text: str) -> int | None:
    """strtol(text, &end, 0) when it consumes all of text (saturating), else None."""
    if text == "":
        return 0            # strtol("") stops at the (empty) end: 0, fully consumed
    m = _STRTOL_RE.match(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    else:
        value = int(digits, 8 if digits.startswith("0") else 10)
    value = -value if m.group(1) == "-" else value
    return max(-LONG_MAX - 1, min(LONG_MAX, value))


def pattern_byte(text: str) -> int:
    """parse_pattern(): a byte value (strtol base 0)."""
    value = c_strtol(text)
    if value is None or not 0 <= value <= 255:
        raise fail("%s is not a valid pattern byte" % text)
    return value


def request_length(text: str, limit: bool = True, qualifier: str = "") -> int:
    value = number(text)
    if limit and value > MAX_REQUEST:
        raise fail("length cannot exceed %d%s, given %s" % (MAX_REQUEST, qualifier, text))
    return value


def vector_length(texts: list[str]) -> int:
    """create_iovec(): the total of several lengths, each and all within a request."""
    total = 0
    for text in texts:
        value = cvtnum(text)
        if value < 0:
            number(text)                        # prints the parse error
        if value > MAX_REQUEST:
            raise fail("Argument '%s' exceeds maximum size %d" % (text, MAX_REQUEST))
        if total > MAX_REQUEST - value:
            raise fail("The total number of bytes exceed the maximum size %d" % MAX_REQUEST)
        total += value
    return total


def check_sector_aligned(offset: int, count: int) -> None:
    if offset % SECTOR:
        raise fail("%d is not a sector-aligned value for 'offset'" % offset)
    if count % SECTOR:
        raise fail("%d is not a sector-aligned value for 'count'" % count)


def _short_form_flags(text: str):
    """The flag-style items ('foo', 'nofoo') of a QemuOpts string, as QEMU splits it."""
    pos = 0
    while pos < len(text):
        end = pos
        while end < len(text) and text[end] not in "=,":
            end += 1
        if text[end:end + 1] == "=":
            pos = end + 1
            while pos < len(text) and (text[pos] != "," or text[pos + 1:pos + 2] == ","):
                pos += 2 if text[pos] == "," else 1
        else:
            yield text[pos:end]
            pos = end
        pos += 1


def parse_qemu_opts(text: str) -> dict[str, str]:
    """qemu_opts_parse_noisily() without an implied key: key=value strings (the last of
    a key wins), warning about short-form booleans as QEMU 7.2 does."""
    for item in _short_form_flags(text):
        negated = item.startswith("no")
        name, value = (item[2:], "off") if negated else (item, "on")
        if not negated and name in ("help", "?"):
            continue
        report.warn("short-form boolean option '%s' deprecated" % item)
        if name == "delay":
            err("Please use nodelay=%s instead\n" % ("on" if negated else "off"))
        else:
            err("Please use %s=%s instead\n" % (name, value))
    return dict(parse_opts(text))


class GnuGetOpt(GetOpt):
    """GetOpt that remembers the short option letter it looked at last, for the
    complaints glibc prints itself (GetOpt only reports the word)."""

    letter = ""

    def _short(self):
        self.letter = self._nextchar[:1]
        return super()._short()


def getopt_complaint(prog: str, getopt: GnuGetOpt, opt) -> str:
    """glibc getopt_long()'s message for a '?' or ':' answer."""
    word = opt.word
    if not word.startswith("--") or len(word) == 2:
        what = ("option requires an argument" if opt.key == ":" else "invalid option")
        return "%s: %s -- '%s'\n" % (prog, what, getopt.letter)
    name = word[2:].partition("=")[0]
    exact = [lo for lo in getopt.longopts if lo.name == name]
    found = exact or [lo for lo in getopt.longopts if lo.name.startswith(name)]
    if not found:
        return "%s: unrecognized option '%s'\n" % (prog, word)
    if len(found) > 1 and opt.key == "?" and len({(lo.has_arg, lo.key) for lo in found}) > 1:
        return "%s: option '%s' is ambiguous; possibilities:%s\n" % (
            prog, word, "".join(" '--%s'" % lo.name for lo in found))
    if opt.key == ":":
        return "%s: option '--%s' requires an argument\n" % (prog, found[0].name)
    return "%s: option '--%s' doesn't allow an argument\n" % (prog, found[0].name)


def usage_failure(cmd: "Command") -> Failed:
    """qemuio_command_usage(), then -EINVAL."""
    out("%s %s -- %s\n" % (cmd.name, cmd.args, cmd.oneline))
    return Failed()


class Args:
    """A command's getopt(3) loop: options in order (so an early bad value stops the
    command before later ones are looked at), then the operands."""

    def __init__(self, cmd: "Command", argv: list[str], optstring: str):
        self.cmd = cmd
        self._getopt = GnuGetOpt(argv, optstring)

    def __iter__(self):
        while (opt := self._getopt.next()) is not None:
            if opt.key in "?:":
                err(getopt_complaint(self._getopt.argv[0], self._getopt, opt))
                raise usage_failure(self.cmd)
            yield opt

    def operands(self, exactly: int | None = None, at_least: int = 0) -> list[str]:
        ops = self._getopt.operands
        if (exactly is not None and len(ops) != exactly) or len(ops) < at_least:
            raise usage_failure(self.cmd)
        return ops


# ---- the open image ---------------------------------------------------------------------------
@record
class OpenFlags:
    """What -r/-s/-n/-C/-k/-i/-t/-d/-U select, on the command line and for 'open'."""
    read_only: bool = False
    snapshot: bool = False
    direct: bool = False
    no_flush: bool = False
    writethrough: bool = True       # qemu-io runs without a write cache unless told
    discard: str = "unmap"          # qemu-io opens with BDRV_O_UNMAP
    aio: str = "threads"
    copy_on_read: bool = False      # accepted, not implemented (reads do not copy up)
    force_share: bool = False

    def set(self, key: str, arg: str | None) -> bool:
        """Apply one option; False after QEMU's message for a bad mode."""
        if key == "r":
            self.read_only = True
        elif key == "s":
            self.snapshot = True
        elif key == "n":
            self.direct, self.writethrough = True, False
        elif key == "C":
            self.copy_on_read = True
        elif key == "k":
            self.aio = "native"
        elif key == "U":
            self.force_share = True
        elif key == "t":
            if arg not in CACHE_MODES:
                report.error("Invalid cache option: %s" % arg)
                return False
            self.direct, self.no_flush, self.writethrough = CACHE_MODES[arg]
        elif key == "d":
            if arg not in ("off", "ignore", "on", "unmap"):
                report.error("Invalid discard option: %s" % arg)
                return False
            self.discard = "unmap" if arg in ("on", "unmap") else "ignore"
        elif key == "i":
            if arg not in ("threads", "native", "io_uring"):
                report.error("Invalid aio option: %s" % arg)
                return False
            self.aio = arg
        return True


class Device:
    """qemuio_blk: the open image's graph and the BlockBackend qemu-io uses on it.

    It takes consistent-read (+ write unless read-only) and shares everything; other
    permissions are added by the commands that need them.  Without a write cache
    (writethrough, qemu-io's default) every write is FUA.
    """

    def __init__(self, graph, node, *, writable: bool, writethrough: bool):
        self.graph = graph
        self.writethrough = writethrough
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
        self.backend = BlockBackend(graph, perm=perm, shared=ALL_SHARED)
        self.backend.insert(node)

    @property
    def node(self):
        return self.backend.root_node

    def read(self, offset: int, buf) -> None:
        self.backend.preadv(offset, buf)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self.backend.pwrite(offset, data, fua or self.writethrough)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        self.backend.pwrite_zeroes(offset, length, may_unmap)
        if fua or self.writethrough:
            self.node.flush()           # FUA, emulated with a flush as QEMU does

    def write_compressed(self, offset: int, data) -> None:
        self._optional("pwrite_compressed")(offset, data)

    def load_vmstate(self, offset: int, buf) -> None:
        self._optional("load_vmstate")(offset, buf)

    def save_vmstate(self, offset: int, data) -> None:
        self._optional("save_vmstate")(offset, data)

    def _optional(self, name: str):
        """A backend call not every image supports: -ENOTSUP where it is missing."""
        fn = getattr(self.backend, name, None)
        if fn is None:
            raise NotSupported()
        return fn

    def discard(self, offset: int, length: int) -> None:
        self.backend.discard(offset, length)

    def flush(self) -> None:
        self.backend.flush()

    def close(self) -> None:
        try:
            self.backend.delete()
        finally:
            self.graph.close_all()


def timed(fn, *args) -> tuple[int, int]:
    """Run one request: (0 or -errno, elapsed ns)."""
    start = time.monotonic_ns()
    try:
        fn(*args)
        ret = 0
    except BlockError as e:
        ret = neg_errno(e)
    return ret, time.monotonic_ns() - start


def is_allocated(node, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated(): whether the first n bytes are allocated in this node only."""
    st = node.block_status(offset, length, want_zero=False)
    return bool(st.flags & BLOCK_ALLOCATED), st.length


# ---- read / write ------------------------------------------------------------------------------
def read_f(ctx, cmd, argv) -> int:
    csv = quiet = verbose = vmstate = False
    pattern = p_off = p_len = None
    args = Args(cmd, argv, "bCl:pP:qs:v")
    for o in args:
        if o.key == "b":
            vmstate = True
        elif o.key == "C":
            csv = True
        elif o.key == "l":
            p_len = number(o.arg)
        elif o.key == "P":
            pattern = pattern_byte(o.arg)
        elif o.key == "q":
            quiet = True
        elif o.key == "s":
            p_off = number(o.arg)
        elif o.key == "v":
            verbose = True
        # -p: ignored for backwards compatibility
    off_text, len_text = args.operands(exactly=2)
    offset = number(off_text)
    count = request_length(len_text)
    if pattern is None and (p_len is not None or p_off is not None):
        raise usage_failure(cmd)
    p_off = p_off or 0
    if p_len is None:
        p_len = count - p_off
    if p_len < 0 or p_len + p_off > count:
        raise fail("pattern verification range exceeds end of read data")
    if vmstate:
        check_sector_aligned(offset, count)
    buf = bytearray(b"\xab") * count
    ret, elapsed = timed(ctx.device.load_vmstate if vmstate else ctx.device.read, offset, buf)
    if ret < 0:
        out("read failed: %s\n" % strerror(ret))
        return ret
    if pattern is not None and buf[p_off:p_off + p_len] != bytes([pattern]) * p_len:
        out("Pattern verification failed at offset %d, %d bytes\n" % (offset + p_off, p_len))
        ret = -errno.EINVAL
    if not quiet:
        if verbose:
            dump_buffer(buf, offset)
        print_report("read", elapsed, offset, count, csv)
    return ret


def _source_buffer(path: str, count: int) -> bytes:
    """qemu_io_alloc_from_file(): the file's first bytes, repeated to ``count``."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as e:
        err("%s: %s\n" % (path, e.strerror))
        raise Failed() from None
    if not data:
        err("%s: file is empty\n" % path)
        raise Failed()
    return (data * (count // len(data) + 1))[:count]


def write_f(ctx, cmd, argv) -> int:
    vmstate = compressed = csv = fua = no_fallback = quiet = unmap = zero = False
    pattern = source = None
    args = Args(cmd, argv, "bcCfnpP:qs:uz")
    for o in args:
        if o.key == "b":
            vmstate = True
        elif o.key == "c":
            compressed = True
        elif o.key == "C":
            csv = True
        elif o.key == "f":
            fua = True
        elif o.key == "n":
            no_fallback = True
        elif o.key == "P":
            pattern = pattern_byte(o.arg)
        elif o.key == "q":
            quiet = True
        elif o.key == "s":
            source = o.arg
        elif o.key == "u":
            unmap = True
        elif o.key == "z":
            zero = True
    off_text, len_text = args.operands(exactly=2)
    if vmstate and zero:
        raise fail("-b and -z cannot be specified at the same time")
    if fua and (vmstate or compressed):
        raise fail("-f and -b or -c cannot be specified at the same time")
    if no_fallback and not zero:
        raise fail("-n requires -z to be specified")
    if unmap and not zero:
        raise fail("-u requires -z to be specified")
    if zero + (pattern is not None) + (source is not None) > 1:
        raise fail("Only one of -z, -P, and -s can be specified at the same time")
    offset = number(off_text)
    # -n (no slow fallback) is accepted; blockengine always may fall back
    count = request_length(len_text, limit=not no_fallback, qualifier=" without -n")
    if vmstate or compressed:
        check_sector_aligned(offset, count)
    dev = ctx.device
    if zero:
        request = (dev.write_zeroes, offset, count, unmap, fua)
    else:
        if source is not None:
            buf = _source_buffer(source, count)
        else:
            buf = bytes([0xcd if pattern is None else pattern]) * count
        if vmstate:
            request = (dev.save_vmstate, offset, buf)
        elif compressed:
            request = (dev.write_compressed, offset, buf)
        else:
            request = (dev.write, offset, buf, fua)
    ret, elapsed = timed(*request)
    if ret < 0:
        out("write failed: %s\n" % strerror(ret))
        return ret
    if not quiet:
        print_report("wrote", elapsed, offset, count, csv)
    return 0


def readv_f(ctx, cmd, argv) -> int:
    csv = quiet = verbose = False
    pattern = None
    args = Args(cmd, argv, "CP:qv")
    for o in args:
        if o.key == "C":
            csv = True
        elif o.key == "P":
            pattern = pattern_byte(o.arg)
        elif o.key == "q":
            quiet = True
        elif o.key == "v":
            verbose = True
    ops = args.operands(at_least=2)
    offset = number(ops[0])
    count = vector_length(ops[1:])
    buf = bytearray(b"\xab") * count
    ret, elapsed = timed(ctx.device.read, offset, buf)
    if ret < 0:
        out("readv failed: %s\n" % strerror(ret))
        return ret
    if pattern is not None and buf != bytes([pattern]) * count:
        out("Pattern verification failed at offset %d, %d bytes\n" % (offset, count))
        ret = -errno.EINVAL
    if not quiet:
        if verbose:
            dump_buffer(buf, offset)
        print_report("read", elapsed, offset, count, csv)
    return ret


def writev_f(ctx, cmd, argv) -> int:
    csv = fua = quiet = False
    pattern = 0xcd
    args = Args(cmd, argv, "CfqP:")
    for o in args:
        if o.key == "C":
            csv = True
        elif o.key == "f":
            fua = True
        elif o.key == "q":
            quiet = True
        elif o.key == "P":
            pattern = pattern_byte(o.arg)
    ops = args.operands(at_least=2)
    offset = number(ops[0])
    count = vector_length(ops[1:])
    ret, elapsed = timed(ctx.device.write, offset, bytes([pattern]) * count, fua)
    if ret < 0:
        out("writev failed: %s\n" % strerror(ret))
        return ret
    if not quiet:
        print_report("wrote", elapsed, offset, count, csv)
    return 0


# ---- aio_* (synchronous here: each request completes, and reports, before returning) ----------
def _invalid_vector(ctx, kind: str, texts: list[str]) -> int:
    """vector_length(), counting a bad vector as an invalid request as aio_* do."""
    try:
        return vector_length(texts)
    except Failed:
        ctx.device.backend.stats.invalid_op(kind)
        raise


def aio_read_f(ctx, cmd, argv) -> int:
    csv = quiet = verbose = False
    pattern = None
    args = Args(cmd, argv, "CP:iqv")
    for o in args:
        if o.key == "C":
            csv = True
        elif o.key == "P":
            pattern = pattern_byte(o.arg)
        elif o.key == "i":
            out("injecting invalid read request\n")
            ctx.device.backend.stats.invalid_op("rd")
            return 0
        elif o.key == "q":
            quiet = True
        elif o.key == "v":
            verbose = True
    ops = args.operands(at_least=2)
    offset = number(ops[0])
    count = _invalid_vector(ctx, "rd", ops[1:])
    buf = bytearray(b"\xab") * count
    ret, elapsed = timed(ctx.device.read, offset, buf)
    # completion errors and mismatches are only reported: the request was submitted
    if ret < 0:
        out("readv failed: %s\n" % strerror(ret))
        return 0
    if pattern is not None and buf != bytes([pattern]) * count:
        out("Pattern verification failed at offset %d, %d bytes\n" % (offset, count))
    if not quiet:
        if verbose:
            dump_buffer(buf, offset)
        print_report("read", elapsed, offset, count, csv)
    return 0


def aio_write_f(ctx, cmd, argv) -> int:
    csv = fua = quiet = unmap = zero = False
    pattern = 0xcd
    args = Args(cmd, argv, "CfiqP:uz")
    for o in args:
        if o.key == "C":
            csv = True
        elif o.key == "f":
            fua = True
        elif o.key == "q":
            quiet = True
        elif o.key == "u":
            unmap = True
        elif o.key == "P":
            pattern = pattern_byte(o.arg)
        elif o.key == "i":
            out("injecting invalid write request\n")
            ctx.device.backend.stats.invalid_op("wr")
            return 0
        elif o.key == "z":
            zero = True
    ops = args.operands(at_least=2)
    if zero and len(ops) != 2:
        raise fail("-z supports only a single length parameter")
    if unmap and not zero:
        raise fail("-u requires -z to be specified")
    # (QEMU's "-z and -P cannot be specified at the same time" never fires: -P does not
    # set the flag it tests, so -z -P writes zeroes)
    offset = number(ops[0])
    if zero:
        count = number(ops[1])
        ret, _ = timed(ctx.device.write_zeroes, offset, count, unmap, fua)
        # QEMU never starts the clock for -z: it reports the time since boot
        elapsed = time.monotonic_ns()
    else:
        count = _invalid_vector(ctx, "wr", ops[1:])
        ret, elapsed = timed(ctx.device.write, offset, bytes([pattern]) * count, fua)
    if ret < 0:
        out("aio_write failed: %s\n" % strerror(ret))
        return 0
    if not quiet:
        print_report("wrote", elapsed, offset, count, csv)
    return 0


def aio_flush_f(ctx, cmd, argv) -> int:
    return 0        # nothing is ever outstanding


# ---- other image commands -----------------------------------------------------------------------
def flush_f(ctx, cmd, argv) -> int:
    return timed(ctx.device.flush)[0]


def truncate_f(ctx, cmd, argv) -> int:
    prealloc = PreallocMode.OFF
    args = Args(cmd, argv, "m:")
    for o in args:
        try:
            prealloc = PreallocMode(o.arg)
        except ValueError:
            report.error("Invalid preallocation mode '%s'" % o.arg)
            return -errno.EINVAL
    ops = args.operands(at_least=1)     # (QEMU crashes without an offset)
    offset = number(ops[0], shown=argv[1])      # QEMU names argv[1] in the message
    try:
        ctx.device.backend.truncate(offset, prealloc=prealloc)
    except BlockError as e:
        report.error(str(e), e.hint)
        return neg_errno(e, errno.EINVAL)
    return 0


def length_f(ctx, cmd, argv) -> int:
    try:
        size = ctx.device.backend.getlength()
    except BlockError as e:
        out("getlength: %s\n" % strerror(neg_errno(e)))
        return neg_errno(e)
    out(cvtstr(size) + "\n")
    return 0


def info_f(ctx, cmd, argv) -> int:
    drv = ctx.device.node.drv
    out("format name: %s\n" % drv.info.name)
    if drv.info.kind is DriverKind.PROTOCOL:
        out("format name: %s\n" % drv.info.name)        # its protocol name, the same
    info = drv.get_info()
    if info is None:
        return -errno.ENOTSUP
    out("cluster size: %s\n" % cvtstr(info.get("cluster_size") or 0))
    out("vm state offset: %s\n" % cvtstr(info.get("vm_state_offset") or 0))
    try:
        specific = drv.info_specific()
    except BlockError as e:
        report.error(str(e), e.hint)
        return -errno.EIO
    if specific:
        out("Format specific information:\n" + dump_qobject(specific.get("data", {}), 1))
    return 0


def discard_f(ctx, cmd, argv) -> int:
    csv = quiet = False
    args = Args(cmd, argv, "Cq")
    for o in args:
        if o.key == "C":
            csv = True
        elif o.key == "q":
            quiet = True
    off_text, len_text = args.operands(exactly=2)
    offset = number(off_text)
    count = request_length(len_text)
    ret, elapsed = timed(ctx.device.discard, offset, count)
    if ret < 0:
        out("discard failed: %s\n" % strerror(ret))
        return ret
    if not quiet:
        print_report("discard", elapsed, offset, count, csv)
    return 0


def alloc_f(ctx, cmd, argv) -> int:
    start = offset = number(argv[1])
    count = number(argv[2]) if len(argv) == 3 else SECTOR
    remaining, allocated_sum = count, 0
    while remaining:
        try:
            allocated, n = is_allocated(ctx.device.node, offset, remaining)
        except BlockError as e:
            out("is_allocated failed: %s\n" % strerror(neg_errno(e)))
            return neg_errno(e)
        offset += n
        remaining -= n
        if allocated:
            allocated_sum += n
        if n == 0:
            count -= remaining
            remaining = 0
    out("%d/%d bytes allocated at offset %s\n" % (allocated_sum, count, cvtstr(start)))
    return 0


def _extent(node, offset: int, length: int) -> tuple[bool, int]:
    """map_is_allocated(): the run of equally allocated bytes at offset."""
    first, total = is_allocated(node, offset, length)
    n = total
    while length > 0:
        offset += n
        length -= n
        allocated, n = is_allocated(node, offset, length)
        if allocated != first or not n:
            break
        total += n
    return first, total


def map_f(ctx, cmd, argv) -> int:
    try:
        remaining = ctx.device.backend.getlength()
    except BlockError as e:
        report.error("Failed to query image length: %s" % strerror(neg_errno(e)))
        return neg_errno(e)
    offset = 0
    while remaining:
        try:
            allocated, n = _extent(ctx.device.node, offset, remaining)
        except BlockError as e:
            report.error("Failed to get allocation status: %s" % strerror(neg_errno(e)))
            return neg_errno(e)
        if not n:
            report.error("Unexpected end of image")
            return -errno.EIO
        out("%s (0x%x) bytes %s at offset %s (0x%x)\n"
            % (cvtstr(n), n, "    allocated" if allocated else "not allocated",
               cvtstr(offset), offset))
        offset += n
        remaining -= n
    return 0


def reopen_f(ctx, cmd, argv) -> int:
    dev = ctx.device
    rw_option = cache = None
    opts: dict[str, str] = {}
    args = Args(cmd, argv, "c:o:rw")
    for o in args:
        if o.key == "c":
            if o.arg not in CACHE_MODES:
                report.error("Invalid cache option: %s" % o.arg)
                return -errno.EINVAL
            cache = o.arg
        elif o.key == "o":
            opts.update(parse_qemu_opts(o.arg))
        elif rw_option is not None:
            report.error("Only one -r/-w option may be given")
            return -errno.EINVAL
        else:
            rw_option = o.key
    args.operands(exactly=0)
    node = dev.node
    read_only = node.read_only if rw_option is None else rw_option == "r"
    if read_only:
        backend = dev.backend
        backend.set_perm(backend.perm & ~(Perm.WRITE | Perm.WRITE_UNCHANGED), backend.shared)
    if "read-only" in opts:
        if rw_option is not None:
            report.error("Cannot set both -r/-w and 'read-only'")
            return -errno.EINVAL
        read_only = opts.pop("read-only") in ("on", "true")
    direct, no_flush = node.cache_direct, node.cache_no_flush
    if "cache.direct" in opts or "cache.no-flush" in opts:
        if cache is not None:
            report.error("Cannot set both -c and the cache options")
            return -errno.EINVAL
        direct = opts.pop("cache.direct", "on" if direct else "off") in ("on", "true")
        no_flush = opts.pop("cache.no-flush", "on" if no_flush else "off") in ("on", "true")
    elif cache is not None:
        direct, no_flush, _ = CACHE_MODES[cache]
    for key in opts:
        report.error("Cannot change the option '%s'" % key)
        return -errno.EINVAL
    if direct != node.cache_direct:
        report.error("Cannot change the option 'cache.direct'")     # not in blockengine
        return -errno.EINVAL
    try:
        dev.graph.reopen(node, read_only)
    except BlockError as e:
        report.error(str(e), e.hint)
        return -errno.EINVAL
    for n in _subtree(node):
        n.cache_no_flush = no_flush
    if cache is not None:
        dev.writethrough = CACHE_MODES[cache][2]
    return 0


def _subtree(node):
    yield node
    for child in node.children:
        yield from _subtree(child.node)


# ---- blkdebug, process and session commands ------------------------------------------------
def break_f(ctx, cmd, argv) -> int:
    # blockengine's blkdebug has no breakpoints: QEMU's answer for a graph without any
    out("Could not set breakpoint: %s\n" % os.strerror(errno.ENOTSUP))
    return -errno.ENOTSUP


def remove_break_f(ctx, cmd, argv) -> int:
    out("Could not remove breakpoint %s: %s\n" % (argv[1], os.strerror(errno.ENOTSUP)))
    return -errno.ENOTSUP


def resume_f(ctx, cmd, argv) -> int:
    out("Could not resume request: %s\n" % os.strerror(errno.ENOTSUP))
    return -errno.ENOTSUP


def wait_break_f(ctx, cmd, argv) -> int:
    return -errno.ENOTSUP       # QEMU would wait forever: no request is ever suspended


def abort_f(ctx, cmd, argv) -> int:
    flush_stdout()
    os.abort()


def sigraise_f(ctx, cmd, argv) -> int:
    sig = number(argv[1])
    if sig > NSIG:
        raise fail("signal argument '%s' is too large to be a valid signal" % argv[1])
    flush_stdout()
    sys.stderr.flush()
    if sig:
        try:
            if callable(signal.getsignal(sig)):     # Python's own handler (SIGINT)
                signal.signal(sig, signal.SIG_DFL)  # reacts as a C program does
            signal.raise_signal(sig)
        except (OSError, ValueError):
            pass                                    # raise() fails the same way
    return 0


def sleep_f(ctx, cmd, argv) -> int:
    ms = c_strtol(argv[1])
    if ms is None or ms < 0:
        raise fail("%s is not a valid number" % argv[1])
    time.sleep(min(ms / 1000, threading.TIMEOUT_MAX))
    return 0


def open_f(ctx, cmd, argv) -> int:
    flags = OpenFlags()
    opts: dict[str, str] = {}
    args = Args(cmd, argv, "snCro:ki:t:d:U")
    for o in args:
        if o.key == "o":
            if ctx.image_opts:
                raise fail("--image-opts and 'open -o' are mutually exclusive")
            opts.update(parse_qemu_opts(o.arg))
        elif not flags.set(o.key, o.arg):
            return -errno.EINVAL
    ops = args.operands()
    if ctx.image_opts and len(ops) == 1:
        opts.update(parse_qemu_opts(ops.pop()))
    if len(ops) > 1:
        raise usage_failure(cmd)
    return -errno.EINVAL if ctx.open(ops[0] if ops else None, opts or None, flags) else 0


def close_f(ctx, cmd, argv) -> int:
    ctx.close()
    return 0


def quit_f(ctx, cmd, argv) -> int:
    ctx.quit = True
    return 0


def help_oneline(name: str, cmd: "Command") -> None:
    out("%s %s-- %s\n" % (name, "" if cmd.args is None else cmd.args + " ", cmd.oneline))


def help_f(ctx, cmd, argv) -> int:
    if len(argv) == 1:
        for c in COMMANDS:
            help_oneline(c.name, c)
        out("\nUse 'help commandname' for extended help.\n")
        return 0
    found = find_command(argv[1])
    if found is None:
        raise fail("command %s not found" % argv[1])
    help_oneline(argv[1], found)
    if found.help:
        out(found.help)
    return 0


# ---- the table ------------------------------------------------------------------------------
UNLIMITED = -1


@record(frozen=True)
class Command:
    name: str
    func: Callable
    oneline: str
    args: str | None = None
    altname: str | None = None
    argmin: int = 0
    argmax: int = 0
    nofile_ok: bool = False     # CMD_FLAG_GLOBAL / CMD_NOFILE_OK
    perm: Perm = Perm(0)        # added to the backend's permissions before running
    help: str | None = None     # printed after the one-line help by 'help NAME'


def _help(*lines: str, end: str = "\n") -> str:
    return "\n" + "".join(line + "\n" for line in lines) + end


_AIO_NOTE = (
    " The %s is performed asynchronously and the aio_flush command must be",
    " used to ensure all outstanding aio requests have been completed.",
    " Note that due to its asynchronous nature, this command will be",
    " considered successful once the request is submitted, independently",
    " of potential I/O errors or pattern mismatches.")
_READ_INTRO = (" Reads a segment of the currently open file, optionally dumping it to the",
               " standard output stream (with -v option) for subsequent inspection.")
_WRITE_INTRO = (" Writes into a segment of the currently open file, using a buffer",
                " filled with a set pattern (0xcdcdcdcd).")
_RW = Perm.WRITE

COMMANDS: list[Command] = sorted([
    Command("abort", abort_f, "simulate a program crash using abort(3)", nofile_ok=True),
    Command("aio_flush", aio_flush_f, "completes all outstanding aio requests"),
    Command("aio_read", aio_read_f, "asynchronously reads a number of bytes",
            "[-Ciqv] [-P pattern] off len [len..]", argmin=2, argmax=UNLIMITED, help=_help(
                " asynchronously reads a range of bytes from the given offset", "",
                " Example:",
                " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the "
                "file", "", *_READ_INTRO, _AIO_NOTE[0] % "read", *_AIO_NOTE[1:],
                " -C, -- report statistics in a machine parsable format",
                " -P, -- use a pattern to verify read data",
                " -i, -- treat request as invalid, for exercising stats",
                " -v, -- dump buffer to standard output",
                " -q, -- quiet mode, do not show I/O statistics")),
    Command("aio_write", aio_write_f, "asynchronously writes a number of bytes",
            "[-Cfiquz] [-P pattern] off len [len..]", argmin=2, argmax=UNLIMITED, perm=_RW,
            help=_help(
                " asynchronously writes a range of bytes from the given offset source",
                " from multiple buffers", "", " Example:",
                " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
                "", *_WRITE_INTRO, _AIO_NOTE[0] % "write", *_AIO_NOTE[1:],
                " -P, -- use different pattern to fill file",
                " -C, -- report statistics in a machine parsable format",
                " -f, -- use Force Unit Access semantics",
                " -i, -- treat request as invalid, for exercising stats",
                " -q, -- quiet mode, do not show I/O statistics",
                " -u, -- with -z, allow unmapping",
                " -z, -- write zeroes using blk_aio_pwrite_zeroes")),
    Command("alloc", alloc_f, "checks if offset is allocated in the file", "offset [count]",
            altname="a", argmin=1, argmax=2),
    Command("break", break_f, "sets a breakpoint on event and tags the stopped request as tag",
            "event tag", argmin=2, argmax=2),
    Command("close", close_f, "close the current open file", altname="c"),
    Command("discard", discard_f, "discards a number of bytes at a specified offset",
            "[-Cq] off len", altname="d", argmin=2, argmax=UNLIMITED, perm=_RW, help=_help(
                " discards a range of bytes from the given offset", "", " Example:",
                " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file", "",
                " Discards a segment of the currently open file.",
                " -C, -- report statistics in a machine parsable format",
                " -q, -- quiet mode, do not show I/O statistics")),
    Command("flush", flush_f, "flush all in-core file state to disk", altname="f"),
    Command("help", help_f, "help for one or all commands", "[command]", altname="?",
            argmax=1, nofile_ok=True),
    Command("info", info_f, "prints information about the current file", altname="i"),
    Command("length", length_f, "gets the length of the current file", altname="l"),
    Command("map", map_f, "prints the allocated areas of a file", ""),
    Command("open", open_f, "open the file specified by path",
            "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", altname="o", argmin=1,
            argmax=UNLIMITED, nofile_ok=True, help=_help(
                " opens a new file in the requested mode", "", " Example:",
                " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, "
                "uncached", "",
                " Opens a file for subsequent use by all of the other qemu-io commands.",
                " -r, -- open file read-only",
                " -s, -- use snapshot file",
                " -C, -- use copy-on-read",
                " -n, -- disable host cache, short for -t none",
                " -U, -- force shared permissions",
                " -k, -- use kernel AIO implementation (Linux only, prefer use of -i)",
                " -i, -- use AIO mode (threads, native or io_uring)",
                " -t, -- use the given cache mode for the image",
                " -d, -- use the given discard mode for the image",
                " -o, -- options to be given to the block driver", end="")),
    Command("quit", quit_f, "exit the program", altname="q", argmin=UNLIMITED,
            argmax=UNLIMITED, nofile_ok=True),
    Command("read", read_f, "reads a number of bytes at a specified offset",
            "[-abCqv] [-P pattern [-s off] [-l len]] off len", altname="r", argmin=2,
            argmax=UNLIMITED, help=_help(
                " reads a range of bytes from the given offset", "", " Example:",
                " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file", "",
                *_READ_INTRO,
                " -b, -- read from the VM state rather than the virtual disk",
                " -C, -- report statistics in a machine parsable format",
                " -l, -- length for pattern verification (only with -P)",
                " -p, -- ignored for backwards compatibility",
                " -P, -- use a pattern to verify read data",
                " -q, -- quiet mode, do not show I/O statistics",
                " -s, -- start offset for pattern verification (only with -P)",
                " -v, -- dump buffer to standard output")),
    Command("readv", readv_f, "reads a number of bytes at a specified offset",
            "[-Cqv] [-P pattern] off len [len..]", argmin=2, argmax=UNLIMITED, help=_help(
                " reads a range of bytes from the given offset into multiple buffers", "",
                " Example:",
                " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
                "", *_READ_INTRO,
                " Uses multiple iovec buffers if more than one byte range is specified.",
                " -C, -- report statistics in a machine parsable format",
                " -P, -- use a pattern to verify read data",
                " -v, -- dump buffer to standard output",
                " -q, -- quiet mode, do not show I/O statistics")),
    Command("remove_break", remove_break_f, "remove a breakpoint by tag", "tag", argmin=1,
            argmax=1),
    Command("reopen", reopen_f, "reopens an image with new options",
            "[(-r|-w)] [-c cache] [-o options]", argmax=UNLIMITED, help=_help(
                " Changes the open options of an already opened image", "", " Example:",
                " 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a "
                "qcow2 image", "",
                " -r, -- Reopen the image read-only",
                " -w, -- Reopen the image read-write",
                " -c, -- Change the cache mode to the given value",
                " -o, -- Changes block driver options (cf. 'open' command)")),
    Command("resume", resume_f, "resumes the request tagged as tag", "tag", argmin=1,
            argmax=1),
    Command("sigraise", sigraise_f, "raises a signal", "signal", argmin=1, argmax=1,
            nofile_ok=True, help=_help(
                " raises the given signal", "", " Example:",
                " 'sigraise %d' - raises SIGTERM" % signal.SIGTERM, "",
                ' Invokes raise(signal), where "signal" is the mandatory integer argument',
                " given to sigraise.")),
    Command("sleep", sleep_f, "waits for the given value in milliseconds", argmin=1,
            argmax=1, nofile_ok=True),
    Command("truncate", truncate_f, "truncates the current file at the given offset",
            "[-m prealloc_mode] off", altname="t", argmin=1, argmax=3,
            perm=Perm.WRITE | Perm.RESIZE),
    Command("wait_break", wait_break_f, "waits for the suspension of a request", "tag",
            argmin=1, argmax=1),
    Command("write", write_f, "writes a number of bytes at a specified offset",
            "[-bcCfnquz] [-P pattern | -s source_file] off len", altname="w", argmin=2,
            argmax=UNLIMITED, perm=_RW, help=_help(
                " writes a range of bytes from the given offset", "", " Example:",
                " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file", "",
                *_WRITE_INTRO,
                " -b, -- write to the VM state rather than the virtual disk",
                " -c, -- write compressed data with blk_write_compressed",
                " -f, -- use Force Unit Access semantics",
                " -n, -- with -z, don't allow slow fallback",
                " -p, -- ignored for backwards compatibility",
                " -P, -- use different pattern to fill file",
                " -s, -- use a pattern file to fill the write buffer",
                " -C, -- report statistics in a machine parsable format",
                " -q, -- quiet mode, do not show I/O statistics",
                " -u, -- with -z, allow unmapping",
                " -z, -- write zeroes using blk_co_pwrite_zeroes")),
    Command("writev", writev_f, "writes a number of bytes at a specified offset",
            "[-Cfq] [-P pattern] off len [len..]", argmin=2, argmax=UNLIMITED, perm=_RW,
            help=_help(
                " writes a range of bytes from the given offset source from multiple buffers",
                "", " Example:",
                " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file", "",
                *_WRITE_INTRO,
                " -P, -- use different pattern to fill file",
                " -C, -- report statistics in a machine parsable format",
                " -f, -- use Force Unit Access semantics",
                " -q, -- quiet mode, do not show I/O statistics")),
], key=lambda c: c.name)


def find_command(name: str) -> Command | None:
    for cmd in COMMANDS:
        if name in (cmd.name, cmd.altname):
            return cmd
    return None


# ---- qemuio_command() ---------------------------------------------------------------------------
def _argument_count_error(cmd: Command, typed: str, n: int) -> str:
    if cmd.argmax == UNLIMITED:
        return "bad argument count %d to %s, expected at least %d arguments\n" % (
            n, typed, cmd.argmin)
    if cmd.argmin == cmd.argmax:
        return "bad argument count %d to %s, expected %d arguments\n" % (n, typed, cmd.argmin)
    return "bad argument count %d to %s, expected between %d and %d arguments\n" % (
        n, typed, cmd.argmin, cmd.argmax)


def _take_permission(device: Device, perm: Perm) -> int:
    """Add what the command needs to the backend's permissions (QEMU keeps them)."""
    backend = device.backend
    if perm & ~backend.perm:
        try:
            backend.set_perm(backend.perm | perm, backend.shared)
        except BlockError as e:
            report.error(str(e), e.hint)
            return neg_errno(e, errno.EPERM)
    return 0


def execute(ctx, line: str) -> int:
    """qemuio_command(): run one command line; 0 or a negative errno."""
    argv = [word for word in line.split(" ") if word]
    if not argv:
        return 0
    try:
        cmd = find_command(argv[0])
        if cmd is None:
            err('command "%s" not found\n' % argv[0])
            return -errno.EINVAL
        if not cmd.nofile_ok and ctx.device is None:
            err("no file open, try 'help open'\n")
            return -errno.EINVAL
        n = len(argv) - 1
        if n < cmd.argmin or (cmd.argmax != UNLIMITED and n > cmd.argmax):
            err(_argument_count_error(cmd, argv[0], n))
            return -errno.EINVAL
        if cmd.perm and ctx.device is not None:
            ret = _take_permission(ctx.device, cmd.perm)
            if ret < 0:
                return ret
        try:
            return cmd.func(ctx, cmd, argv)
        except Failed as f:
            return f.ret
    finally:
        flush_stdout()
