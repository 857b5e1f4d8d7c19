"""The ``blockengine`` multi-call program.

    blockengine img ARGS...           qemu-img
    blockengine io ARGS...            qemu-io            (blockengine.cli.io:main)
    blockengine serve ARGS...         qemu-storage-daemon (blockengine.cli.serve:main)
    blockengine install-links DIR     DIR/qemu-img, DIR/qemu-io, DIR/qemu-storage-daemon
    blockengine --version | -V

Started through a link whose name is a tool's (``qemu-img``...), it is that tool and
prefixes its messages with that name, exactly as QEMU uses basename(argv[0]); started
as ``blockengine img`` it prefixes them with "blockengine".

This is the only place where exceptions end: ``main`` turns ``report.Exit``,
``report.UsageError``, ``BlockError`` and anything unexpected into messages and an
exit status, so no traceback ever reaches the user.
"""
from __future__ import annotations

import importlib
import os
import sys

from .. import QEMU_VERSION, __version__
from ..errors import BlockError
from . import report

# tool name -> (subcommand, "module:function")
TOOLS = {
    "qemu-img": ("img", "blockengine.cli.img:main"),
    "qemu-io": ("io", "blockengine.cli.io:main"),
    "qemu-storage-daemon": ("serve", "blockengine.cli.serve:main"),
}
SUBCOMMANDS = {sub: (tool, target) for tool, (sub, target) in TOOLS.items()}
USAGE = """\
usage: blockengine img|io|serve [ARGS...]
       blockengine install-links DIR
       blockengine --version
"""


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit status (never raises)."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "blockengine"
    if prog in TOOLS:
        report.set_program(prog, prog)
        return _guarded(_tool_entry(TOOLS[prog][1]), argv)
    report.set_program("blockengine", "blockengine")
    return _guarded(_multicall, argv)


def _multicall(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        (sys.stdout if len(argv) >= 2 else sys.stderr).write(USAGE)
        return 0 if len(argv) >= 2 else 1
    sub = argv[1]
    if sub in ("--version", "-V"):
        sys.stdout.write("blockengine %s (QEMU %d.%d.%d block layer)\n"
                         % (__version__, *QEMU_VERSION))
        return 0
    if sub == "install-links":
        if len(argv) != 3:
            raise report.UsageError("install-links expects one directory")
        install_links(argv[2])
        return 0
    if sub in SUBCOMMANDS:
        tool, target = SUBCOMMANDS[sub]
        report.set_program("blockengine", "blockengine " + sub)
        return _tool_entry(target)(["blockengine"] + argv[2:])
    raise report.UsageError("unknown command '%s'" % sub)


def _tool_entry(target: str):
    """A tool's main as fn(argv) with argv[0] the program name (tool modules define
    ``main(args, prog)``), or a stub reporting that the tool is missing."""
    module, func = target.split(":")
    try:
        tool_main = getattr(importlib.import_module(module), func)
        return lambda argv: tool_main(argv[1:], os.path.basename(argv[0]))
    except ModuleNotFoundError as e:
        if e.name != module:
            raise

        def missing(argv):
            raise report.fail("this tool (%s) is not available in this blockengine build"
                              % module.rsplit(".", 1)[-1])
        return missing


def _guarded(fn, argv: list[str]) -> int:
    try:
        code = fn(argv)
    except report.Exit as e:
        code = e.code
    except report.UsageError as e:
        report.usage_error(str(e))
        code = 1
    except BlockError as e:
        report.error(str(e), e.hint)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = _broken_pipe()
    except Exception as e:       # noqa: BLE001 - the last line of defence
        report.error("internal error: %s: %s" % (type(e).__name__, e))
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _broken_pipe()
    return code


def _broken_pipe() -> int:
    """The reader went away: drop further output quietly (QEMU dies of SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


# ---- install-links -------------------------------------------------------------------------
LAUNCHER = """#!%(python)s
import sys
sys.path.insert(0, %(root)r)
from blockengine.cli.main import main
sys.exit(main())
"""


def install_links(directory: str) -> list[str]:
    """Make DIR/qemu-img etc. run blockengine as that tool.

    Symlinks to the ``blockengine`` executable when there is one; when running from a
    source tree (``python -m blockengine.cli``) small launcher scripts instead, which
    keep argv[0] as the tool name all the same.
    """
    os.makedirs(directory, exist_ok=True)
    exe = _executable()
    made = []
    for tool in TOOLS:
        path = os.path.join(directory, tool)
        if os.path.lexists(path):
            os.unlink(path)
        if exe is not None:
            os.symlink(exe, path)
        else:
            root = os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            with open(path, "w") as f:
                f.write(LAUNCHER % {"python": sys.executable, "root": root})
            os.chmod(path, 0o755)
        made.append(path)
    return made


def _executable() -> str | None:
    """The blockengine program itself, if argv[0] is an executable (not a .py file)."""
    import shutil       # only `link` needs it; it costs every command start-up ~2 ms
    argv0 = sys.argv[0] if sys.argv else ""
    found = shutil.which(argv0) if os.sep not in argv0 else argv0
    if not found or found.endswith(".py") or not os.access(found, os.X_OK):
        return None
    return os.path.realpath(found)
