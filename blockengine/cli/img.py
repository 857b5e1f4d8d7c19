"""`blockengine img`: the qemu-img 7.2 command line over the blockengine library.

Each ``cmd_*`` function takes the command's argv (argv[0] is the command name, as
qemu-img passes it), parses it with qemu-img's getopt option string, and returns the
exit status or raises ``report.Exit``/``report.UsageError``.  Image access goes
through ``common.Session``; all formatting lives in ``output``; the copy loop of
convert in ``convert``; image creation in ``create``.
"""
from __future__ import annotations

import importlib
import os
import sys

from .. import QEMU_VERSION, __version__
from ..drivers.base import BLOCK_ALLOCATED, BLOCK_ZERO, PreallocMode
from ..errors import BlockError, NotSupported
from ..graph import registry
from . import report
from .common import (DEFAULT_CACHE, SNAPSHOT_OPT_BASE, Session, load_snapshot,
                     parse_cache, parse_snapshot_param)
from .create import create_options, find_format, img_create, option_help
from .getopt import NO_ARG, REQUIRED_ARG, GetOpt, LongOpt
from ..info import image_info
from .imageinfo import (CHECK_FIELDS, FIX_ERRORS, FIX_LEAKS, StatusCursor, image_check,
                        map_output, ExternalClusters)
from .opts import (OPT_SIZE, OptDesc, OptionError, OptsSet, cvtnum, has_help_option,
                   is_valid_option_list, parse_int)
from .output import (MAP_HUMAN_HEADER, Progress, image_check_human, image_info_human,
                     to_json)

IO_BUF_SIZE = 2 << 20
SECTOR = 512          # BDRV_SECTOR_SIZE (convert.SECTOR; convert loads on first use)


def version_text() -> str:
    return ("qemu-img version %d.%d.%d (blockengine %s)\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
            % (*QEMU_VERSION, __version__))


# ---- option parsing ------------------------------------------------------------------------
def _long(*specs) -> list[LongOpt]:
    return [LongOpt(name, has_arg, key) for name, has_arg, key in specs]


HELP = ("help", NO_ARG, "h")
OBJECT = ("object", REQUIRED_ARG, "object")
IMAGE_OPTS = ("image-opts", NO_ARG, "image-opts")
FORCE_SHARE = ("force-share", NO_ARG, "U")
OUTPUT = ("output", REQUIRED_ARG, "output")
FORMAT = ("format", REQUIRED_ARG, "f")


def getopt(argv: list[str], optstring: str, longopts):
    """Yield (key, arg) like qemu-img's getopt loops, handling ':' '?' and -h."""
    parser = GetOpt(argv, optstring, _long(*longopts))
    while (opt := parser.next()) is not None:
        if opt.key == ":":
            raise report.UsageError("missing argument for option '%s'" % opt.word)
        if opt.key == "?":
            raise report.UsageError("unrecognized option '%s'" % opt.word)
        if opt.key == "h":
            help_exit()
        yield opt.key, opt.arg
    yield None, parser.operands


def parse_args(argv, optstring, longopts, session: Session | None = None):
    """(options, operands): the options one by one as the command's loop takes them,
    so a bad value is reported before a later unknown option, as QEMU's getopt loop
    does (``--object`` handled on the way); the operands list is filled when the
    options are exhausted."""
    operands: list[str] = []

    def options():
        for key, arg in getopt(argv, optstring, longopts):
            if key is None:
                operands.extend(arg)
                return
            if key == "object" and session is not None:
                session.add_object(arg)
            yield key, arg
    return options(), operands


def output_format(value: str | None) -> str:
    """--output: 'human' (default) or 'json', else QEMU's error and exit 1."""
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise report.fail("--output must be used with human or json as argument.")


def help_exit() -> None:
    sys.stdout.write(version_text() + HELP_TEXT % " ".join(registry.driver_names()))
    raise report.Exit(0)


# ---- info ------------------------------------------------------------------------------------
def cmd_info(argv: list[str]) -> int:
    session = Session()
    fmt = output = None
    chain = image_opts = force_share = False
    opts, operands = parse_args(argv, ":f:hU", [HELP, FORMAT, OUTPUT,
                                                ("backing-chain", NO_ARG, "backing-chain"),
                                                OBJECT, IMAGE_OPTS, FORCE_SHARE], session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "output":
            output = arg
        elif key == "backing-chain":
            chain = True
        elif key == "image-opts":
            image_opts = True
        elif key == "U":
            force_share = True
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    ofmt = output_format(output)
    infos = []
    seen = set()
    filename = operands[0]
    while filename:
        if filename in seen:
            raise report.fail("Backing file '%s' creates an infinite loop." % filename)
        seen.add(filename)
        img = session.open(filename, fmt, image_opts=image_opts, force_share=force_share,
                           backing=False, no_io=True)
        try:
            info = image_info(img.node)
        finally:
            img.close()
        infos.append(info)
        filename, fmt, image_opts = None, None, False
        if chain:
            if "full-backing-filename" in info:
                filename = info["full-backing-filename"]
            elif "backing-filename" in info:
                raise report.fail("Could not determine absolute backing filename, but "
                                  "backing filename '%s' present" % info["backing-filename"])
            fmt = info.get("backing-filename-format")
    if ofmt == "json":
        sys.stdout.write(to_json(infos if chain else infos[0], pretty=True) + "\n")
    else:
        sys.stdout.write("\n".join(image_info_human(i) for i in infos))
    return 0


# ---- map -------------------------------------------------------------------------------------
def cmd_map(argv: list[str]) -> int:
    session = Session()
    fmt = output = None
    image_opts = force_share = False
    start, max_length = 0, None
    opts, operands = parse_args(argv, ":f:s:l:hU", [HELP, FORMAT, OUTPUT, OBJECT, IMAGE_OPTS,
                                                    FORCE_SHARE,
                                                    ("start-offset", REQUIRED_ARG, "s"),
                                                    ("max-length", REQUIRED_ARG, "l")],
                                session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "output":
            output = arg
        elif key == "image-opts":
            image_opts = True
        elif key == "U":
            force_share = True
        elif key == "s":
            start = _cvtnum("start offset", arg)
        elif key == "l":
            max_length = _cvtnum("max length", arg)
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    ofmt = output_format(output)
    img = session.open(operands[0], fmt, image_opts=image_opts, force_share=force_share)
    try:
        length = img.size
        if max_length is not None:
            length = min(start + max_length, length)
        out = sys.stdout
        out.write(MAP_HUMAN_HEADER if ofmt == "human" else "[")
        out.flush()
        write_bytes = out.buffer.write if hasattr(out, "buffer") else (
            lambda b: out.write(b.decode(errors="surrogateescape")))
        # whatever was produced is written on any exit
        try:
            for chunk in map_output(img.node, start, length, human=ofmt == "human"):
                write_bytes(chunk)
        except ExternalClusters:
            raise report.fail("File contains external, encrypted or compressed clusters.")
        except BlockError as e:
            raise report.fail("Could not read file metadata: %s" % _strerror(e))
        finally:
            out.flush()
        if ofmt == "json":
            out.write("]\n")
    finally:
        img.close()
    return 0


# ---- check -----------------------------------------------------------------------------------
def cmd_check(argv: list[str]) -> int:
    session = Session()
    fmt = output = None
    cache = DEFAULT_CACHE
    fix = 0
    quiet = image_opts = force_share = False
    opts, operands = parse_args(argv, ":hf:r:T:qU", [HELP, FORMAT,
                                                     ("repair", REQUIRED_ARG, "r"), OUTPUT,
                                                     OBJECT, IMAGE_OPTS, FORCE_SHARE],
                                session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "r":
            if arg == "leaks":
                fix = FIX_LEAKS
            elif arg == "all":
                fix = FIX_LEAKS | FIX_ERRORS
            else:
                raise report.UsageError("Unknown option value for -r (expecting 'leaks' or "
                                        "'all'): %s" % arg)
        elif key == "output":
            output = arg
        elif key == "T":
            cache = arg
        elif key == "q":
            quiet = True
        elif key == "U":
            force_share = True
        elif key == "image-opts":
            image_opts = True
    if len(operands) != 1:
        raise report.UsageError("Expecting one image file name")
    filename = operands[0]
    ofmt = output_format(output)
    parse_cache(cache, source=True)
    img = session.open(filename, fmt, image_opts=image_opts, writable=bool(fix),
                       force_share=force_share, cache=cache, check=True)
    try:
        try:
            check = image_check(img.node, filename, fix)
        except NotSupported:
            raise report.fail("This image format does not support checks", 63)
        except BlockError as e:
            raise report.fail("Check failed: %s" % _strerror(e))
        if check.get("corruptions-fixed") or check.get("leaks-fixed"):
            fixed = {k: check[k] for k in ("corruptions-fixed", "leaks-fixed") if k in check}
            if ofmt == "human":
                report.qprint(quiet, "The following inconsistencies were found and repaired:"
                              "\n\n    %d leaked clusters\n    %d corruptions\n\n"
                              "Double checking the fixed image now...\n"
                              % (fixed.get("leaks-fixed", 0),
                                 fixed.get("corruptions-fixed", 0)))
            try:
                check = image_check(img.node, filename, 0)
            except BlockError as e:
                raise report.fail("Check failed: %s" % _strerror(e))
            check = _with_fixed(check, fixed)
        if ofmt == "human":
            report.qprint(quiet, image_check_human(check))
        else:
            report.qprint(quiet, to_json(check, pretty=True) + "\n")
        if check.get("check-errors"):
            raise report.fail("Check failed")
    finally:
        img.close()
    if check.get("corruptions"):
        return 2
    return 3 if check.get("leaks") else 0


def _with_fixed(check: dict, fixed: dict) -> dict:
    """The second check's result with the first run's *-fixed counts, in QAPI order."""
    merged = {**check, **fixed}
    order = ["filename", "format"] + list(CHECK_FIELDS)
    return {k: merged[k] for k in order if k in merged}


# ---- create ----------------------------------------------------------------------------------
def cmd_create(argv: list[str]) -> int:
    session = Session()
    fmt = "raw"
    base_filename = base_fmt = options = None
    quiet = unsafe = False
    opts, operands = parse_args(argv, ":F:b:f:ho:qu", [HELP, OBJECT], session)
    for key, arg in opts:
        if key == "F":
            base_fmt = arg
        elif key == "b":
            base_filename = arg
        elif key == "f":
            fmt = arg
        elif key == "o":
            options = _accumulate_options(options, arg)
        elif key == "q":
            quiet = True
        elif key == "u":
            unsafe = True
    filename = operands[0] if operands else None
    if options and has_help_option(options):
        return _print_option_help(filename, fmt)
    if filename is None:
        raise report.UsageError("Expecting image file name")
    size = _cvtnum("image size", operands[1]) if len(operands) > 1 else None
    if len(operands) > 2:
        raise report.UsageError("Unexpected argument: %s" % operands[2])
    try:
        img_create(filename, fmt, options=options, size=size, base_filename=base_filename,
                   base_fmt=base_fmt, no_open_backing=unsafe,
                   announce=None if quiet else _announce, secrets=session.secrets)
    except BlockError as e:
        raise report.fail("%s: %s" % (filename, e), hint=e.hint)
    return 0


def _announce(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _accumulate_options(options: str | None, arg: str) -> str:
    if not is_valid_option_list(arg):
        raise report.fail("Invalid option list: %s" % arg)
    return arg if not options else "%s,%s" % (options, arg)


def _print_option_help(filename: str | None, fmt: str) -> int:
    try:
        sys.stdout.write(option_help(fmt, filename))
    except BlockError as e:
        raise report.fail(str(e))
    return 0


# ---- convert ---------------------------------------------------------------------------------
def cmd_convert(argv: list[str]) -> int:
    # the copy loop (and the native helpers it needs) load only for convert
    from .convert import MAX_BUF_SECTORS, Converter, CopyError, has_zero_init
    session = Session()
    fmt = out_fmt = options = out_baseimg = backing_fmt = snapshot_name = sn_opts = None
    cache, src_cache = "unsafe", DEFAULT_CACHE
    min_sparse, explicit_sparse = 8 * SECTOR, False
    compressed = skip_create = progress = quiet = force_share = False
    image_opts = tgt_image_opts = target_is_zero = copy_range = bitmaps = False
    skip_broken = False
    opts, operands = parse_args(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", [
        HELP, OBJECT, IMAGE_OPTS, ("salvage", NO_ARG, "salvage"),
        ("target-is-zero", NO_ARG, "target-is-zero"),
        ("target-image-opts", NO_ARG, "target-image-opts"), FORCE_SHARE,
        ("bitmaps", NO_ARG, "bitmaps"),
        ("skip-broken-bitmaps", NO_ARG, "skip-broken-bitmaps")], session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "O":
            out_fmt = arg
        elif key == "B":
            out_baseimg = arg
        elif key == "C":
            copy_range = True
        elif key == "c":
            compressed = True
        elif key == "o":
            options = _accumulate_options(options, arg)
        elif key == "l":
            if arg.startswith(SNAPSHOT_OPT_BASE):
                sn_opts = parse_snapshot_param(arg)
            else:
                snapshot_name = arg
        elif key == "S":
            min_sparse = _cvtnum("buffer size for sparse output", arg)
            if min_sparse % SECTOR or min_sparse // SECTOR > MAX_BUF_SECTORS:
                raise report.fail("Invalid buffer size for sparse output specified. Valid "
                                  "sizes are multiples of %d up to %d. Select 0 to disable "
                                  "sparse detection (fully allocates output)."
                                  % (SECTOR, MAX_BUF_SECTORS * SECTOR))
            explicit_sparse = True
        elif key == "p":
            progress = True
        elif key == "t":
            cache = arg
        elif key == "T":
            src_cache = arg
        elif key == "q":
            quiet = True
        elif key == "n":
            skip_create = True
        elif key == "m":
            n = parse_int(arg)
            if n is None or not 1 <= n <= 16:
                raise report.fail("Invalid number of coroutines. Allowed number of "
                                  "coroutines is between 1 and 16")
        elif key == "r":
            _cvtnum("rate limit", arg)
        elif key == "U":
            force_share = True
        elif key == "image-opts":
            image_opts = True
        elif key == "target-image-opts":
            tgt_image_opts = True
        elif key == "target-is-zero":
            target_is_zero = True
        elif key == "bitmaps":
            bitmaps = True
        elif key == "skip-broken-bitmaps":
            skip_broken = True
        elif key == "F":
            backing_fmt = arg
    if quiet:
        progress = False
    if bitmaps:
        from . import bitmap        # it brings the QMP bitmap commands: only when needed
    if out_fmt is None and not tgt_image_opts:
        out_fmt = "raw"
    for cond, msg in ((skip_broken and not bitmaps, "Use of --skip-broken-bitmaps requires "
                       "--bitmaps"),
                      (compressed and copy_range, "Cannot enable copy offloading when -c "
                       "is used"),
                      (explicit_sparse and copy_range, "Cannot enable copy offloading when "
                       "-S is used"),
                      (target_is_zero and not skip_create, "--target-is-zero requires use "
                       "of -n flag"),
                      (tgt_image_opts and not skip_create, "--target-image-opts requires use "
                       "of -n flag"),
                      (skip_create and options, "-o has no effect when skipping image "
                       "creation")):
        if cond:
            raise report.fail(msg)
    out_filename = operands[-1] if len(operands) >= 2 else None
    sources = operands[:-1]
    if options and has_help_option(options):
        if out_fmt:
            return _print_option_help(out_filename, out_fmt)
        raise report.fail("Option help requires a format be specified")
    if not sources:
        raise report.fail("Must specify image file name")
    parse_cache(src_cache, source=True)
    bar = Progress(progress, 1.0)
    bar.print(0, 100)
    images = []
    target = None
    try:
        for name in sources:
            images.append(session.open(name, fmt, image_opts=image_opts,
                                       force_share=force_share, cache=src_cache,
                                       exclusive=True))
        # the first source shows the snapshot (only it, as in QEMU, for snapshot.*)
        if snapshot_name is not None and sn_opts is None and len(images) > 1:
            raise report.fail("No support for concatenating multiple snapshot")
        if snapshot_name is not None or sn_opts is not None:
            load_snapshot(images[0].node, snapshot_name, sn_opts)
        total = sum(-(-img.size // SECTOR) for img in images) * SECTOR
        key_secrets = {}
        if not skip_create:
            key_secrets, out_baseimg = _convert_create(
                out_filename, out_fmt, options, out_baseimg, backing_fmt, total, compressed,
                skip_broken if bitmaps else None, images, session.secrets)
        else:
            if bitmaps:
                bitmap.check_convert_source(images, skip_broken)
            if compressed:
                _check_compress(out_fmt)
        parse_cache(cache)
        target = session.open(out_filename, out_fmt, image_opts=tgt_image_opts,
                               writable=True, cache=cache, source_cache=False,
                               options=key_secrets)
        if bitmaps:
            bitmap.check_convert_target(target)
        if skip_create and target.size < total:
            raise report.fail("output file is smaller than input file")
        target_has_backing = out_baseimg is not None
        zero_init = target_is_zero or (not skip_create and bool(min_sparse)
                                       and not target_has_backing
                                       and has_zero_init(target.node))
        job = Converter(images, target, min_sparse=min_sparse, has_zero_init=zero_init,
                        target_has_backing=target_has_backing, progress=bar,
                        compressed=compressed)
        try:
            job.run()
        except CopyError as e:
            raise report.fail(str(e))
        if bitmaps:
            bitmap.copy_bitmaps(images[0], target, skip_broken)
        bar.print(100, 0)
    finally:
        bar.end()
        for img in images + ([target] if target is not None else []):
            img.close()
    return 0


def _check_compress(out_fmt: str) -> None:
    drv_cls = find_format(out_fmt)
    if not hasattr(drv_cls, "pwritev_compressed"):
        raise report.fail("Compression not supported for this file format")


def _convert_create(out_filename, out_fmt, options, out_baseimg, backing_fmt, total,
                    compressed, bitmaps, images, secrets=None) -> tuple[dict, str | None]:
    """The create half of img_convert, with its checks in QEMU's order.

    Returns the ``*key-secret`` create options as open options for the new target
    (img_add_key_secrets(), so an encrypted target can be opened to write into), and
    the target's backing file (-B or -o backing_file).
    """
    try:
        opts = OptsSet(create_options(out_fmt, out_filename))
        if options:
            opts.parse(options)
    except BlockError as e:
        raise report.fail(str(e), hint=e.hint)
    for name, value, what in (("backing_file", out_baseimg, "Backing file"),
                              ("backing_fmt", backing_fmt, "Backing file format")):
        if value is not None and not opts.has(name):
            raise report.fail("%s not supported for file format '%s'" % (what, out_fmt))
    if compressed:
        if opts.get("encryption") or opts.get("encrypt.format"):
            raise report.fail("Compression and encryption not supported at the same time")
        prealloc = opts.get("preallocation")
        if prealloc and prealloc != "off":
            raise report.fail("Compression and preallocation not supported at the same "
                              "time")
        _check_compress(out_fmt)
    if bitmaps is not None:            # --bitmaps given; the --skip-broken-bitmaps flag
        from .bitmap import check_convert_source
        check_convert_source(images, bitmaps)
    extra = {"size": total}
    if out_baseimg is not None:
        extra["backing_file"] = out_baseimg
    if backing_fmt is not None:
        extra["backing_fmt"] = backing_fmt
    try:
        img_create(out_filename, out_fmt, options=options, extra=extra,
                   no_open_backing=True, secrets=secrets)
    except BlockError as e:
        raise report.fail("%s: error while converting %s: %s" % (out_filename, out_fmt, e),
                          hint=e.hint)
    key_secrets: dict = {}
    for name, (value, _) in opts.values.items():
        if name.endswith("key-secret"):
            *parents, leaf = name.split(".")
            level = key_secrets
            for part in parents:
                level = level.setdefault(part, {})
            level[leaf] = value
    return key_secrets, opts.get("backing_file") or out_baseimg


# ---- compare ---------------------------------------------------------------------------------
def cmd_compare(argv: list[str]) -> int:
    session = Session()
    fmt1 = fmt2 = None
    cache = DEFAULT_CACHE
    progress = quiet = strict = image_opts = force_share = False
    try:
        opts, operands = parse_args(argv, ":hf:F:T:pqsU", [HELP, OBJECT, IMAGE_OPTS,
                                                           FORCE_SHARE], session)
    except report.Exit as e:
        raise report.Exit(2 if e.code == 1 else e.code)   # --object errors exit 2
    for key, arg in opts:
        if key == "f":
            fmt1 = arg
        elif key == "F":
            fmt2 = arg
        elif key == "T":
            cache = arg
        elif key == "p":
            progress = True
        elif key == "q":
            quiet = True
        elif key == "s":
            strict = True
        elif key == "U":
            force_share = True
        elif key == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    if len(operands) != 2:
        raise report.UsageError("Expecting two image file names")
    name1, name2 = operands
    bar = Progress(progress, 2.0)
    img1 = img2 = None
    try:
        try:
            parse_cache(cache, source=True)
            img1 = session.open(name1, fmt1, image_opts=image_opts, cache=cache,
                                force_share=force_share)
            img2 = session.open(name2, fmt2, image_opts=image_opts, cache=cache,
                                force_share=force_share)
        except report.Exit:
            raise report.Exit(2)
        return _compare(img1, img2, name1, name2, strict, quiet, bar)
    finally:
        bar.end()
        for img in (img2, img1):
            if img is not None:
                img.close()


def _compare(img1, img2, name1, name2, strict, quiet, bar) -> int:
    """The body of img_compare: 0 identical, 1 different, 3/4 errors."""
    size1, size2 = img1.size, img2.size
    total, base = min(size1, size2), max(size1, size2)
    bar.print(0, 100)
    if strict and size1 != size2:
        report.qprint(quiet, "Strict mode: Image size mismatch!\n")
        return 1
    offset = 0
    cur1, cur2 = (StatusCursor(img.node, merge_holes=not bar.enabled) for img in (img1, img2))
    # two reused buffers: a fresh one per read would cost more than the read
    from .. import _native
    from ..io.buffers import io_buffer
    buf1, buf2 = io_buffer(IO_BUF_SIZE), io_buffer(IO_BUF_SIZE)
    while offset < total:
        st1 = _status(cur1, offset, size1 - offset, name1)
        st2 = _status(cur2, offset, size2 - offset, name2)
        alloc1, alloc2 = st1.flags & BLOCK_ALLOCATED, st2.flags & BLOCK_ALLOCATED
        chunk = min(st1.length, st2.length)
        if strict and st1.flags != st2.flags:
            report.qprint(quiet, "Strict mode: Offset %d block status mismatch!\n" % offset)
            return 1
        if st1.flags & BLOCK_ZERO and st2.flags & BLOCK_ZERO:
            pass
        elif bool(alloc1) == bool(alloc2):
            if alloc1:
                chunk = min(chunk, IO_BUF_SIZE)
                data1 = _read(img1, offset, buf1[:chunk], name1)
                data2 = _read(img2, offset, buf2[:chunk], name2)
                if not _native.buffers_equal(data1, data2):
                    report.qprint(quiet, "Content mismatch at offset %d!\n"
                                  % (offset + _same_prefix(data1, data2)))
                    return 1
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            img, name = (img1, name1) if alloc1 else (img2, name2)
            if _check_empty(img, offset, buf1[:chunk], name, quiet):
                return 1
        offset += chunk
        bar.print(chunk / base * 100, 100)
    if size1 != size2:
        report.qprint(quiet, "Warning: Image size mismatch!\n")
        over, name, cur = ((img1, name1, cur1) if size1 > size2
                           else (img2, name2, cur2))
        while offset < base:
            st = _status(cur, offset, base - offset, name)
            chunk = st.length
            if st.flags & BLOCK_ALLOCATED and not st.flags & BLOCK_ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                if _check_empty(over, offset, buf1[:chunk], name, quiet):
                    return 1
            offset += chunk
            bar.print(chunk / base * 100, 100)
    report.qprint(quiet, "Images are identical.\n")
    return 0


def _status(cursor, offset, length, name):
    """block_status_above() of the cursor's node."""
    try:
        return cursor.status(offset, length)
    except BlockError:
        raise report.fail("Sector allocation test failed for %s" % name, 3)


def _read(img, offset, buf: memoryview, name) -> memoryview:
    """Fill buf from offset; returns it."""
    try:
        img.readinto(offset, buf)
        return buf
    except BlockError as e:
        raise report.fail("Error while reading offset %d of %s: %s"
                          % (offset, name, _strerror(e)), 4)


def _same_prefix(a: bytes, b: bytes) -> int:
    """compare_buffers(): length of the equal prefix, in whole 512-byte sectors."""
    for i in range(0, len(a), SECTOR):
        if a[i:i + SECTOR] != b[i:i + SECTOR]:
            return i
    return len(a)


def _check_empty(img, offset, buf: memoryview, name, quiet) -> bool:
    """check_empty_sectors() of len(buf) bytes: report the first non-zero sector."""
    from .. import _native
    _read(img, offset, buf, name)
    if _native.buffer_is_zero(buf, 0, len(buf)):
        return False
    idx = next(i for i in range(0, len(buf), SECTOR)
               if not _native.buffer_is_zero(buf, i, min(SECTOR, len(buf) - i)))
    report.qprint(quiet, "Content mismatch at offset %d!\n" % (offset + idx))
    return True


# ---- resize ----------------------------------------------------------------------------------
def cmd_resize(argv: list[str]) -> int:
    session = Session()
    if len(argv) < 3:
        raise report.UsageError("Not enough arguments")
    size_arg = argv[-1]
    fmt = None
    quiet = image_opts = shrink = False
    prealloc = PreallocMode.OFF
    opts, operands = parse_args(argv[:-1], ":f:hq", [
        HELP, OBJECT, IMAGE_OPTS, ("preallocation", REQUIRED_ARG, "preallocation"),
        ("shrink", NO_ARG, "shrink")], session)
    for key, arg in opts:
        if key == "f":
            fmt = arg
        elif key == "q":
            quiet = True
        elif key == "image-opts":
            image_opts = True
        elif key == "preallocation":
            try:
                prealloc = PreallocMode(arg)
            except ValueError:
                raise report.fail("Invalid preallocation mode '%s'" % arg) from None
        elif key == "shrink":
            shrink = True
    if len(operands) != 1:
        raise report.UsageError("Expecting image file name and size")
    relative = {"+": 1, "-": -1}.get(size_arg[:1], 0)
    try:
        n = OptDesc("size", OPT_SIZE).parse(size_arg[1:] if relative else size_arg)
    except OptionError as e:
        raise report.fail(str(e), hint=e.hint)
    img = session.open(operands[0], fmt, image_opts=image_opts, writable=True)
    try:
        current = img.size
        total = current + n * relative if relative else n
        if total <= 0 or total >= 1 << 63:
            raise report.fail("New image size must be positive")
        if total <= current and prealloc is not PreallocMode.OFF:
            raise report.fail("Preallocation can only be used for growing images")
        if total < current and not shrink:
            report.error("Use the --shrink option to perform a shrink operation.")
            report.warn("Shrinking an image will delete all data beyond the shrunken "
                        "image's end. Before performing such an operation, make sure there "
                        "is no important data there.")
            raise report.Exit(1)
        max_length = ((1 << 63) - 1) // (1 << 30) * (1 << 30)
        if total > max_length:
            raise report.fail("offset(%d) exceeds maximum(%d)" % (total, max_length))
        try:
            img.resize(total, exact=True, prealloc=prealloc)
        except BlockError as e:
            raise report.fail(str(e), hint=e.hint)
    finally:
        img.close()
    report.qprint(quiet, "Image resized.\n")
    return 0


# ---- helpers ---------------------------------------------------------------------------------
def _cvtnum(name: str, text: str) -> int:
    try:
        return cvtnum(name, text)
    except OptionError as e:
        raise report.fail(str(e), hint=e.hint)


def _strerror(e: BlockError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _own_module(name: str):
    """A command living in its own module ``cli/<name>.py`` as ``cmd_<name>``, imported
    when it runs (those modules build on this one)."""
    def run(argv: list[str]) -> int:
        module = importlib.import_module("%s.%s" % (__package__, name))
        return getattr(module, "cmd_" + name)(argv)
    return run


COMMANDS = {
    "check": cmd_check, "compare": cmd_compare, "convert": cmd_convert,
    "create": cmd_create, "info": cmd_info, "map": cmd_map, "resize": cmd_resize,
    "bench": _own_module("bench"), "bitmap": _own_module("bitmap"),
    "measure": _own_module("measure"),
    "commit": _own_module("commit"), "dd": _own_module("dd"), "rebase": _own_module("rebase"),
    "amend": _own_module("amend"), "snapshot": _own_module("snapshot"),
}

TOP_LONGOPTS = [("help", NO_ARG, "h"), ("version", NO_ARG, "V"),
                ("trace", REQUIRED_ARG, "T")]


def main(args: list[str], prog: str = "qemu-img") -> int:
    """qemu-img's main(): global options, then the command (``args`` after the program)."""
    argv = [prog] + list(args)
    if len(argv) < 2:
        raise report.UsageError("Not enough arguments")
    parser = GetOpt(argv, "+:hVT:", _long(*TOP_LONGOPTS))
    while (opt := parser.next()) is not None:
        if opt.key == ":":
            raise report.UsageError("missing argument for option '%s'" % opt.word)
        if opt.key == "?":
            raise report.UsageError("unrecognized option '%s'" % opt.word)
        if opt.key == "h":
            help_exit()
        if opt.key == "V":
            sys.stdout.write(version_text())
            return 0
        if opt.key == "T":
            report.warn("trace event '%s' does not exist" % opt.arg.split(",")[0]
                        .removeprefix("enable="))
    rest = parser.operands
    if not rest:
        return 0
    name = rest[0]
    if name in COMMANDS:
        return COMMANDS[name](rest)
    raise report.UsageError("Command not found: %s" % name)


HELP_TEXT = """\
usage: qemu-img [standard options] command [command options]
QEMU disk image utility

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit
    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options

Command syntax:
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

Command parameters:
  'filename' is a disk image filename
  'objectdef' is a QEMU user creatable object definition. See the qemu(1)
    manual page for a description of the object properties. The most common
    object type is a 'secret', which is used to supply passwords and/or
    encryption keys.
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image, the valid
    options are: 'none', 'writeback' (default, except for convert), 'writethrough',
    'directsync' and 'unsafe' (default for convert)
  'src_cache' is the cache mode used to read input disk images, the valid
    options are the same as for the 'cache' option
  'size' is the disk image size in bytes. Optional suffixes
    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
    supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  'snapshot_param' is param used for internal snapshot, format
    is 'snapshot.id=[ID],snapshot.name=[NAME]', or
    '[ID_OR_NAME]'
  '-c' indicates that target image must be compressed (qcow format only)
  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and
       new backing file match exactly. The image doesn't need a working
       backing file before rebasing in this case (useful for renaming the
       backing file). For image creation, allow creating without attempting
       to open the backing file.
  '-h' with or without a command shows this help and lists the supported formats
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for qemu-img to create a sparse image during
       conversion. If the number of bytes is 0, the source will not be scanned for
       unallocated or zero sectors, and the destination image will always be
       fully allocated
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created
       prior to running qemu-img)

Parameters to bitmap subcommand:
  'bitmap' is the name of the bitmap to manipulate, through one or more
       actions from '--add', '--remove', '--clear', '--enable', '--disable',
       or '--merge source'
  '-g granularity' sets the granularity for '--add' actions
  '-b source' and '-F src_fmt' tell '--merge' actions to find the source
       bitmaps from an alternative file

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors, with a higher risk of choosing the wrong fix or
       hiding corruption that has already occurred.

Parameters to convert subcommand:
  '--bitmaps' copies all top-level persistent bitmaps to destination
  '-m' specifies how many coroutines work in parallel during the convert
       process (defaults to 8)
  '-W' allow to write to the target out of order rather than sequential

Parameters to snapshot subcommand:
  'snapshot' is the name of the snapshot to create, apply or delete
  '-a' applies a snapshot (revert disk to saved state)
  '-c' creates a snapshot
  '-d' deletes a snapshot
  '-l' lists all snapshots in the given image

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Parameters to dd subcommand:
  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)
  'count=N' copy only N input blocks
  'if=FILE' read from FILE
  'of=FILE' write to FILE
  'skip=N' skip N bs-sized blocks at the start of input

Supported formats: %s

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"""
