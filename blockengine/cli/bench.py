"""`img bench`: a simple I/O benchmark (qemu-img.c img_bench and bench_cb).

QEMU keeps ``depth`` asynchronous requests in flight and reacts to each completion
in bench_cb().  Here requests complete in the order they were issued, one at a time,
and the same state machine decides what happens next, so the requests (offsets,
wrap-around at the end of the image, pattern) and the flushes (every
``flush_interval`` completions, after draining the queue unless ``--no-drain``) are
QEMU's; only the concurrency is gone, which the timing line shows, not the result.
"""
from __future__ import annotations

import collections
import errno
import os
import signal
import sys
import time

from ..errors import BlockError
from . import report
from .common import CACHE_MODES, Session
from .img import FORCE_SHARE, HELP, IMAGE_OPTS, _cvtnum, getopt
from .getopt import NO_ARG, REQUIRED_ARG
from .opts import OptionError, cvtnum

INT_MAX = (1 << 31) - 1
AIO_MODES = ("threads", "native", "io_uring")         # bdrv_parse_aio()
LONGOPTS = [HELP, ("flush-interval", REQUIRED_ARG, "flush-interval"), IMAGE_OPTS,
            ("pattern", REQUIRED_ARG, "pattern"), ("no-drain", NO_ARG, "no-drain"),
            FORCE_SHARE]


def strtoul(text: str) -> int | None:
    """qemu_strtoul(text, NULL, 0): C integer syntax (0x hex, 0 octal, leading blanks,
    a sign), the whole string; None if it is not one.  '-N' wraps as unsigned long."""
    body = text.lstrip(" \t\n\v\f\r")
    sign = -1 if body[:1] == "-" else 1
    body = body[1:] if body[:1] in "+-" else body
    try:
        if body[:2].lower() == "0x":
            value = int(body[2:], 16) if body[2:].isalnum() else None
        elif body[:1] == "0" and len(body) > 1:
            value = int(body[1:], 8) if body[1:].isdigit() else None
        else:
            value = int(body) if body.isdigit() else None
    except ValueError:
        value = None
    if value is None or value >= 1 << 64:
        return None
    return value if sign > 0 else (-value) % (1 << 64)


def _count(text: str, maximum: int, what: str) -> int:
    value = strtoul(text)
    if value is None or value > maximum:
        raise report.fail("Invalid %s specified" % what)
    return value


def cmd_bench(argv: list[str]) -> int:
    session = Session()
    fmt = None
    count, depth, offset, bufsize, step, pattern = 75000, 64, 0, 4096, 0, 0
    flush_interval, drain_on_flush = 0, True
    image_opts = is_write = force_share = False
    cache, native = "writeback", False
    for key, arg in getopt(argv, ":hc:d:f:ni:o:qs:S:t:wU", LONGOPTS):
        if key is None:
            operands = arg
        elif key == "c":
            count = _count(arg, INT_MAX, "request count")
        elif key == "d":
            depth = _count(arg, INT_MAX, "queue depth")
        elif key == "f":
            fmt = arg
        elif key == "n":
            native = True
        elif key == "i":
            if arg not in AIO_MODES:
                raise report.fail("Invalid aio option: %s" % arg)
            native = arg == "native"
        elif key == "o":
            offset = _cvtnum("offset", arg)
        elif key == "q":
            pass               # -q only quiets img_open(), which prints nothing here
        elif key == "s":
            bufsize = _bounded("buffer size", arg)
        elif key == "S":
            step = _bounded("step_size", arg)
        elif key == "t":
            if arg not in CACHE_MODES:
                raise report.fail("Invalid cache mode")
            cache = arg
        elif key == "w":
            is_write = True
        elif key == "U":
            force_share = True
        elif key == "pattern":
            pattern = _count(arg, 0xFF, "pattern byte")
        elif key == "flush-interval":
            flush_interval = _count(arg, INT_MAX, "flush interval")
        elif key == "no-drain":
            drain_on_flush = False
        elif key == "image-opts":
            image_opts = True
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    filename = operands[0]
    if not is_write and flush_interval:
        raise report.fail("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise report.fail("Flush interval can't be smaller than depth")
    if native and not CACHE_MODES[cache][0]:
        raise report.fail("Could not open '%s': aio=native was specified, but it requires "
                          "cache.direct=on, which was not specified." % filename)

    img = session.open(filename, fmt, image_opts=image_opts, writable=is_write,
                       force_share=force_share, cache=cache, source_cache=False)
    try:
        run = BenchRun(img, count=count, depth=depth, offset=offset, bufsize=bufsize,
                       step=step or bufsize, write=is_write, pattern=pattern,
                       flush_interval=flush_interval, drain_on_flush=drain_on_flush)
        sys.stdout.write("Sending %d %s requests, %d bytes each, %d in parallel "
                         "(starting at offset %d, step size %d)\n"
                         % (count, "write" if is_write else "read", bufsize, depth, offset,
                            run.step))
        if flush_interval:
            sys.stdout.write("Sending flush every %d requests\n" % flush_interval)
        start = time.monotonic()
        run.run()
        sys.stdout.write("Run completed in %3.3f seconds.\n" % (time.monotonic() - start))
    finally:
        img.close()
    return 0


def _bounded(name: str, text: str) -> int:
    """cvtnum_full(name, text, 0, INT_MAX)."""
    try:
        return cvtnum(name, text, 0, INT_MAX)
    except OptionError as e:
        raise report.fail(str(e), hint=e.hint)


class BenchRun:
    """bench_cb()'s state machine with in-order completions."""

    def __init__(self, img, *, count, depth, offset, bufsize, step, write, pattern,
                 flush_interval, drain_on_flush):
        self.img = img
        self.image_size = img.size
        self.n, self.nrreq, self.offset = count, depth, offset
        self.bufsize, self.step, self.write = bufsize, step, write
        self.flush_interval, self.drain_on_flush = flush_interval, drain_on_flush
        self.buf = bytearray([pattern]) * bufsize
        self.in_flight: collections.deque = collections.deque()

    def run(self) -> None:
        self._submit()
        while self.n > 0:
            if not self.in_flight:
                # QEMU waits forever for a completion that never comes (-d 0)
                while True:
                    signal.pause()
            self.in_flight.popleft()
            remaining = self.n - len(self.in_flight)
            self.n -= 1
            if self.flush_interval and remaining % self.flush_interval == 0:
                if not self.in_flight or not self.drain_on_flush:
                    self._flush()
                if self.drain_on_flush and self.in_flight:
                    continue          # drain: no new requests until the flush
            self._submit()

    def _submit(self) -> None:
        while self.n > len(self.in_flight) and len(self.in_flight) < self.nrreq:
            offset = self.offset
            self.offset = (self.offset + self.step) % self.image_size \
                if self.image_size else 0
            self._request(offset)
            self.in_flight.append(offset)

    def _request(self, offset: int) -> None:
        if offset + self.bufsize > self.image_size:
            self._failed("Failed request", errno.EIO)
        try:
            if self.write:
                self.img.write(offset, self.buf)
            else:
                self.img.readinto(offset, self.buf)
        except BlockError as e:
            self._failed("Failed request", e.errno or errno.EIO)

    def _flush(self) -> None:
        try:
            self.img.flush()
        except BlockError as e:
            self._failed("Failed flush request", e.errno or errno.EIO)

    @staticmethod
    def _failed(what: str, err: int) -> None:
        """bench_cb()'s exit(EXIT_FAILURE): what was printed so far stays printed."""
        sys.stdout.flush()
        raise report.fail("%s: %s" % (what, os.strerror(err)))
