"""Command line option syntaxes of QEMU's tools (util/qemu-option.c, util/cutils.c).

* ``parse_opts``: QemuOpts ``key=value,key2=value2`` lists (``,,`` escapes a comma in a
  value, a bare ``key`` means ``key=on`` and ``nokey`` ``key=off``, an optional implied
  first key).  Used for ``-o``, ``--image-opts`` and ``--object``.
* ``unflatten``: dotted keys (``file.filename``) to nested dicts, for BlockdevOptions.
* ``strtosz`` / ``cvtnum``: sizes with k/M/G/T/P/E suffixes and fractions, exactly as
  qemu_strtosz() accepts and rejects them.
* Typed option values (``OptDesc.parse``) with QemuOpts' error messages.

Every parser raises ``OptionError`` with QEMU's message (and ``hint``, printed on the
lines after it), never prints.
"""
from __future__ import annotations

from .._record import record
from ..errors import InvalidArgument
from .report import PROG

INT64_MAX = (1 << 63) - 1
SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")


class OptionError(InvalidArgument):
    """A malformed option list or value; ``hint`` holds QEMU's extra lines, if any."""


# ---- QemuOpts lists ---------------------------------------------------------------------
def _value(text: str, pos: int) -> tuple[str, int]:
    """get_opt_value(): up to the first single ',' (',,' is a literal comma)."""
    out = []
    while pos < len(text):
        ch = text[pos]
        if ch == ",":
            if text[pos + 1:pos + 2] != ",":
                break
            pos += 1
        out.append(ch)
        pos += 1
    return "".join(out), pos


def is_help_option(value: str) -> bool:
    return value in ("help", "?")


def has_help_option(text: str) -> bool:
    """has_help_option(): any element of the list is 'help' or '?'."""
    pos = 0
    while pos < len(text):
        value, pos = _value(text, pos)
        if pos < len(text):
            pos += 1
        if is_help_option(value):
            return True
    return False


def is_valid_option_list(text: str) -> bool:
    """qemu-img's check of a -o argument: non-empty, no leading or odd trailing commas."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def parse_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """QemuOpts syntax to (key, value) pairs in order; duplicates are kept (last wins)."""
    pairs, pos, first = [], 0, True
    while pos < len(text):
        length = len(_pattern(r"[^=,]*").match(text, pos).group(0))
        if text[pos + length:pos + length + 1] != "=":
            if first and implied:
                value, pos = _value(text, pos)
                pairs.append((implied, value))
            else:
                name = text[pos:pos + length]
                pos += length
                if name.startswith("no"):
                    pairs.append((name[2:], "off"))
                else:
                    pairs.append((name, "on"))
        else:
            name = text[pos:pos + length]
            value, pos = _value(text, pos + length + 1)
            pairs.append((name, value))
        if pos < len(text) and text[pos] == ",":
            pos += 1
        first = False
    return pairs


def unflatten(pairs) -> dict:
    """qdict_crumple()-like nesting of dotted keys: {'file.filename': x} -> {'file': {...}}."""
    out: dict = {}
    for key, value in pairs:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
    return out


# ---- sizes -----------------------------------------------------------------------------
_SUFFIXES = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_INT = r"\s*([+-]?)(\d+)"
_HEX = r"\s*([+-]?)0[xX]([0-9a-fA-F]+)"
_FRAC = r"\.(\d*)"
_EXP = r"[eE][+-]?\d"


def _pattern(text: str):
    """re.compile(text) (cached by re); ``re`` is loaded when a command first parses
    an option or a number, not at every start-up."""
    import re
    return re.compile(text)


class SizeError(ValueError):
    """qemu_strtosz() failure; ``overflow`` is its -ERANGE case."""

    def __init__(self, overflow: bool = False):
        super().__init__("overflow" if overflow else "invalid size")
        self.overflow = overflow


def strtosz(text: str, default_suffix: str = "B") -> int:
    """qemu_strtosz(): bytes for '10M', '1.5G', '0x1000', '512b'; SizeError otherwise.

    Decimal or hex integer part (no sign), an optional decimal fraction (only with a
    unit > 1, rounded to the nearest byte), one optional case-insensitive suffix,
    nothing after it; results must fit in 64 bits.
    """
    m = _pattern(_INT).match(text)
    if not m or m.group(1) == "-":
        raise SizeError()
    val, end, frac = int(m.group(2)), m.end(), None
    if val >= 1 << 64:
        raise SizeError(overflow=True)
    if val == 0 and text[end:end + 1] in ("x", "X"):
        h = _pattern(_HEX).match(text)
        if not h:
            raise SizeError()
        val, end = int(h.group(2), 16), h.end()
        if val >= 1 << 64:
            raise SizeError(overflow=True)
        if text[end:end + 1] == ".":
            raise SizeError()
    elif text[end:end + 1] == ".":
        f = _pattern(_FRAC).match(text, end)
        digits = f.group(1)
        if digits and _pattern(_EXP).match(text, f.end()):
            raise SizeError()      # strtod would have read an exponent
        frac, end = digits, f.end()
    shift = _SUFFIXES.get(text[end:end + 1].upper()) if end < len(text) else None
    if shift is not None:
        end += 1
    else:
        shift = _SUFFIXES[default_suffix.upper()]
    if end != len(text):
        raise SizeError()
    # fraction as 64-bit fixed point, like (uint64_t)(fraction * 0x1p64)
    valf = int(float("0." + frac) * 2.0 ** 64) if frac else 0
    if shift == 0:
        if valf:
            raise SizeError()
        return val
    total = (val << shift) + ((valf << shift) >> 64) + (((valf << shift) >> 63) & 1)
    if total >> 64:
        raise SizeError(overflow=True)
    return total


def cvtnum(name: str, text: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """qemu-img's cvtnum_full(): a size argument with its two error forms."""
    try:
        value = strtosz(text)
    except SizeError as e:
        if not e.overflow:
            raise OptionError("Invalid %s specified. You may use k, M, G, T, P or E "
                              "suffixes for" % name,
                              hint="%s: kilobytes, megabytes, gigabytes, terabytes, "
                                   "petabytes and exabytes." % _prog()) from None
        value = None
    if value is None or not minimum <= value <= maximum:
        raise OptionError("Invalid %s specified. Must be between %d and %d."
                          % (name, minimum, maximum))
    return value


def _prog() -> str:
    return PROG.name


def parse_int(text: str) -> int | None:
    """qemu_strtoi()-style strict decimal integer, or None."""
    m = _pattern(r"\s*[+-]?\d+").fullmatch(text)
    return int(text) if m else None


def parse_c_int(text: str) -> int | None:
    """strtoll()/strtoull() with base 0 over the whole string (leading blanks, a sign,
    0x hex, 0 octal, decimal), unbounded; None if the text is not such a number."""
    m = _pattern(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)").fullmatch(text)
    if not m:
        return None
    digits = m.group(2)
    value = (int(digits, 16) if digits[:2] in ("0x", "0X")
             else int(digits, 8) if digits.startswith("0") else int(digits))
    return -value if m.group(1) == "-" else value


# ---- typed option descriptions -----------------------------------------------------------
OPT_STRING, OPT_BOOL, OPT_NUMBER, OPT_SIZE = "str", "bool", "num", "size"
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


@record(frozen=True)
class OptDesc:
    """One QemuOptDesc: name, type, help text and default (as QEMU prints it)."""
    name: str
    type: str = OPT_STRING
    help: str = ""
    default: str | None = None

    def parse(self, value: str):
        """The typed value of ``value``, with QemuOpts' messages on failure."""
        if self.type == OPT_BOOL:
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise OptionError("Parameter '%s' expects 'on' or 'off'" % self.name)
        if self.type == OPT_SIZE:
            try:
                return strtosz(value)
            except SizeError as e:
                if e.overflow:
                    raise OptionError("Value '%s' is out of range for parameter '%s'"
                                      % (value, self.name)) from None
                raise OptionError("Parameter '%s' expects a non-negative number below 2^64"
                                  % self.name, hint=SIZE_HINT) from None
        if self.type == OPT_NUMBER:
            # parse_option_number(): qemu_strtou64(base 0), a '-' wraps modulo 2^64
            number = parse_c_int(value)
            if number is None:
                raise OptionError("Parameter '%s' expects a number" % self.name)
            if abs(number) >= 1 << 64:
                raise OptionError("Value '%s' is too large for parameter '%s'"
                                  % (value, self.name))
            return number % (1 << 64)
        return value

    def type_label(self) -> str:
        return {"bool": "bool (on/off)"}.get(self.type, self.type)


def print_help(descs, title: str | None = None) -> str:
    """qemu_opts_print_help(): ``  name=<type>`` padded to 24, `` - help``; the lines
    are sorted as whole strings, as QEMU sorts them."""
    lines = []
    for d in descs:
        line = "  %s=<%s>" % (d.name, d.type_label())
        if d.help:
            line = "%-24s - %s" % (line, d.help)
        lines.append(line)
    lines.sort()
    return "\n".join(([title] if title else []) + lines) + "\n"


class OptsSet:
    """A QemuOpts instance over a list of descriptions (qemu_opts_do_parse + get)."""

    def __init__(self, descs):
        self.descs = list(descs)
        self._by_name = {d.name: d for d in self.descs}
        self.values: dict[str, tuple[str, object]] = {}    # name -> (str, typed)

    def parse(self, text: str) -> None:
        for name, value in parse_opts(text):
            self.set(name, value)

    def set(self, name: str, value: str) -> None:
        desc = self._by_name.get(name)
        if desc is None:
            raise OptionError("Invalid parameter '%s'" % name)
        self.values[name] = (value, desc.parse(value))

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str, default=None):
        return self.values[name][1] if name in self.values else default

    def typed(self) -> dict:
        return {k: v[1] for k, v in self.values.items()}

    def print_line(self) -> str:
        """qemu_opts_print(opts, ' '): set values and string defaults in list order."""
        out = []
        for d in self.descs:
            if d.name in self.values:
                text, typed = self.values[d.name]
                if d.type in (OPT_SIZE, OPT_NUMBER):
                    text = str(typed)
                elif d.type == OPT_STRING:
                    text = text.replace(",", ",,")
            elif d.default is not None:
                text = d.default.replace(",", ",,") if d.type == OPT_STRING else d.default
            else:
                continue
            out.append("%s=%s" % (d.name, text))
        return " ".join(out)
