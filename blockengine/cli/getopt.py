"""GNU ``getopt_long`` as qemu-img and qemu-io use it.

QEMU's tools parse their command lines with glibc's getopt_long, and several of
their observable behaviours come from it: options may follow operands (argv is
permuted), long options may be abbreviated to any unambiguous prefix, short options
cluster (``-Uf raw``), and error messages quote ``argv[optind - 1]``, which is not
always the offending word (``-zU`` reports the word *before* it).  This module
reproduces glibc's algorithm, including its lazy argv permutation, so those quirks
come out the same.

Contract: ``GetOpt(argv, optstring, longopts).next()`` returns one ``Opt`` per
option until it returns None; ``operands`` then lists the remaining arguments in
order.  With a leading ':' in optstring (as all qemu-img commands use) errors are
returned, not printed: key ``':'`` for a missing argument and ``'?'`` for an unknown
or ambiguous option, both with ``word`` = argv[optind - 1] for the caller's message.
"""
from __future__ import annotations

from .._record import record

NO_ARG, REQUIRED_ARG, OPTIONAL_ARG = 0, 1, 2


@record(frozen=True)
class LongOpt:
    name: str
    has_arg: int
    key: str           # what next() returns as Opt.key: a short letter or a long name


@record
class Opt:
    key: str                 # option letter, LongOpt.key, ':' (missing arg) or '?' (unknown)
    arg: str | None = None
    word: str = ""           # argv[optind - 1] after this option, for error messages


class GetOpt:
    def __init__(self, argv: list[str], optstring: str, longopts=()):
        self.argv = list(argv)
        self.optstring = optstring
        self.longopts = list(longopts)
        self.optind = 1
        self._nextchar = ""
        self._first_nonopt = self._last_nonopt = 1
        self.require_order = optstring.startswith("+") or optstring[1:2] == "+"
        self._shorts = optstring.lstrip("+:")

    # ---- public -----------------------------------------------------------------------
    def next(self) -> Opt | None:
        """The next option, or None when only operands remain (see ``operands``)."""
        argv = self.argv
        if not self._nextchar:
            if self._last_nonopt > self.optind:
                self._last_nonopt = self.optind
            if self._first_nonopt > self.optind:
                self._first_nonopt = self.optind
            if not self.require_order:
                if (self._first_nonopt != self._last_nonopt
                        and self._last_nonopt != self.optind):
                    self._exchange()
                elif self._last_nonopt != self.optind:
                    self._first_nonopt = self.optind
                while self.optind < len(argv) and not self._is_option(argv[self.optind]):
                    self.optind += 1
                self._last_nonopt = self.optind
            if self.optind != len(argv) and argv[self.optind] == "--":
                self.optind += 1
                if (self._first_nonopt != self._last_nonopt
                        and self._last_nonopt != self.optind):
                    self._exchange()
                elif self._first_nonopt == self._last_nonopt:
                    self._first_nonopt = self.optind
                self._last_nonopt = len(argv)
                self.optind = len(argv)
            if self.optind == len(argv):
                if self._first_nonopt != self._last_nonopt:
                    self.optind = self._first_nonopt
                return None
            if not self._is_option(argv[self.optind]):
                return None            # require_order: stop at the first operand
            word = argv[self.optind]
            if word.startswith("--"):
                return self._long(word[2:])
            self._nextchar = word[1:]
        return self._short()

    @property
    def operands(self) -> list[str]:
        """Arguments left after next() returned None (valid only then)."""
        return self.argv[self.optind:]

    def parse(self) -> tuple[list[Opt], list[str]]:
        """All options, then the operands."""
        opts = []
        while (o := self.next()) is not None:
            opts.append(o)
        return opts, self.operands

    # ---- glibc internals ------------------------------------------------------------------
    @staticmethod
    def _is_option(word: str) -> bool:
        return word.startswith("-") and len(word) > 1

    def _exchange(self) -> None:
        """Move the skipped operands [first_nonopt, last_nonopt) after the options
        [last_nonopt, optind), as glibc's exchange() does."""
        a, b, c = self._first_nonopt, self._last_nonopt, self.optind
        self.argv[a:c] = self.argv[b:c] + self.argv[a:b]
        self._first_nonopt += c - b
        self._last_nonopt = c

    def _word(self) -> str:
        return self.argv[self.optind - 1]

    def _long(self, body: str) -> Opt:
        name, eq, value = body.partition("=")
        self.optind += 1
        exact = [lo for lo in self.longopts if lo.name == name]
        matches = exact or [lo for lo in self.longopts if lo.name.startswith(name)]
        if not matches or (len(matches) > 1 and len({(m.has_arg, m.key) for m in matches}) > 1):
            return Opt("?", word=self._word())
        lo = matches[0]
        if eq:
            if lo.has_arg == NO_ARG:
                return Opt("?", word=self._word())
            return Opt(lo.key, value, self._word())
        if lo.has_arg == REQUIRED_ARG:
            if self.optind >= len(self.argv):
                return Opt(":", word=self._word())
            self.optind += 1
            return Opt(lo.key, self.argv[self.optind - 1], self._word())
        return Opt(lo.key, None, self._word())

    def _short(self) -> Opt:
        c, self._nextchar = self._nextchar[0], self._nextchar[1:]
        if not self._nextchar:
            self.optind += 1
        pos = self._shorts.find(c)
        if pos < 0 or c == ":":
            return Opt("?", word=self._word())
        if self._shorts[pos + 1:pos + 2] != ":":
            return Opt(c, None, self._word())
        optional = self._shorts[pos + 2:pos + 3] == ":"
        if self._nextchar:
            arg, self._nextchar = self._nextchar, ""
            self.optind += 1
            return Opt(c, arg, self._word())
        if optional:
            return Opt(c, None, self._word())
        if self.optind >= len(self.argv):
            return Opt(":", word=self._word())
        self.optind += 1
        return Opt(c, self.argv[self.optind - 1], self._word())
