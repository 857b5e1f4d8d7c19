"""How the tools talk to the user: message prefixes, errors and exit codes.

QEMU prefixes every error with the basename of argv[0] (``error_report``), adds a
"Try 'qemu-img --help'" line after usage errors (``error_exit``) and prints warnings
as ``PROG: warning: ...``.  The program name is set once per invocation by
``blockengine.cli.main``; everything else calls the functions here, so no message
is formatted anywhere else.

Commands signal the end of the run by raising ``Exit(code)`` (after printing) or
``UsageError(msg)``; ``main`` turns those, ``BlockError`` and anything unexpected
into output and an exit status.
"""
from __future__ import annotations

import sys


class Program:
    """Names used in messages: ``name`` prefixes errors, ``help_cmd`` is the command
    the usage hint tells the user to run (``qemu-img`` for byte-exact output)."""

    def __init__(self, name: str = "qemu-img", help_cmd: str = "qemu-img"):
        self.name = name
        self.help_cmd = help_cmd


PROG = Program()


def set_program(name: str, help_cmd: str) -> None:
    PROG.name, PROG.help_cmd = name, help_cmd


class Exit(Exception):
    """End the command with this exit status (messages are already printed)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class UsageError(Exception):
    """error_exit(): a command line error; prints the message and the --help hint, exit 1."""


def error(msg: str, hint: str | None = None) -> None:
    """error_report(): ``PROG: msg`` on stderr, then the optional hint lines as they are."""
    out = sys.stderr
    out.write("%s: %s\n" % (PROG.name, msg))
    if hint:
        out.write(hint if hint.endswith("\n") else hint + "\n")
    out.flush()


def warn(msg: str) -> None:
    """warn_report()."""
    error("warning: " + msg)


def usage_error(msg: str) -> None:
    """What error_exit() prints (the caller then exits with 1)."""
    sys.stderr.write("%s: %s\nTry '%s --help' for more information\n"
                     % (PROG.name, msg, PROG.help_cmd))
    sys.stderr.flush()


def fail(msg: str, code: int = 1, hint: str | None = None) -> "Exit":
    """Report ``msg`` and return the Exit to raise: ``raise fail("...")``."""
    error(msg, hint)
    return Exit(code)


def qprint(quiet: bool, text: str) -> None:
    """qprintf(): stdout unless quiet."""
    if not quiet:
        sys.stdout.write(text)
