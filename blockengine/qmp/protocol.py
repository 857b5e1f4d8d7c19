"""The QMP wire protocol of a server, free of I/O (in the style of h11).

    conn = QMPConnection(session)
    out = conn.greeting_bytes()                 # send first
    for item in conn.receive_data(data):        # bytes read from the client
        if isinstance(item, ParseError):
            out += conn.encode(item.response)   # QEMU answers malformed input at once
        else:
            out += conn.encode(conn.handle(item.request))
    out += conn.encode(event_message)           # events, once conn.negotiated

Input is split into requests by ``JSONStreamer``, a transcription of QEMU 7.2's JSON
lexer, streamer and parser (qobject/json-lexer.c, json-streamer.c, json-parser.c):
objects need not be separated by anything, a value is complete when its brackets
balance, malformed input gives QEMU's "JSON parse error, ..." texts, and input is
bounded as QEMU bounds it (token size 64 MiB, 2M tokens, nesting 1024).  Output is
``to_json()``, QEMU's compact JSON (", " and ": " separators, non-ASCII escaped as
uppercase \\uXXXX, doubles as %.17g), one message per line ending in "\\r\\n".
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from .core import QMPSession, error_response
from ..qapi.errors import QMPError

__all__ = ["JSONStreamer", "JSONParseError", "QMPConnection", "Request", "ParseError",
           "to_json", "encode_message", "parse_json"]

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

# token types
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA = "{", "}", "[", "]", ":", ","
INTEGER, FLOAT, KEYWORD, STRING, ERROR, EOI = "int", "float", "kw", "str", "err", "eoi"

_STRUCTURAL = {ord(c): c for c in "{}[]:,"}
_WHITESPACE = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LOWER = frozenset(range(ord("a"), ord("z") + 1))
_ESCAPES = frozenset(b"bfnrt/\\'\"")
# bytes a string may hold unescaped, besides its quote and backslash
_STRING_RUN = {q: re.compile(rb"[^\\%s\x00-\x1f\xfe\xff]+" % re.escape(bytes([q]))) for q in b"\"'"}


class JSONParseError(QMPError):
    """Malformed JSON, with QEMU's message ("JSON parse error, ...")."""


# ---- lexer + streamer ---------------------------------------------------------------------
class JSONStreamer:
    """Bytes in, complete JSON values (or parse errors) out, as QEMU's monitor sees them.

    ``feed(data)`` returns a list whose items are decoded values or JSONParseError
    instances, in input order.  ``flush()`` ends the input (JSON_END_OF_INPUT).
    """

    def __init__(self) -> None:
        self._state = "start"
        self._token = bytearray()
        self._quote = 0
        self._hex_left = 0
        self._tokens: list[tuple[str, bytes]] = []
        self._brace = self._bracket = 0
        self._size = 0
        self._out: list = []

    # the lexer: one state machine over bytes ------------------------------------------
    def feed(self, data: bytes) -> list:
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state in ("dq", "sq"):
                run = _STRING_RUN[self._quote].match(data, i)
                if run is not None:
                    self._token += run.group(0)
                    i = run.end()
                    self._check_token_size()
                    continue
            i = self._char(data[i], i)
        out, self._out = self._out, []
        return out

    def flush(self) -> list:
        """End of input (json_lexer_flush()): a pending number or keyword is a token,
        any other unfinished token a stray error; then unfinished values are an error."""
        state = self._state
        if state in _TERMINAL:
            self._emit(_TERMINAL[state])
        elif state not in ("start", "recovery"):
            self._error()
        self._state = "start"
        self._token.clear()
        self._process(EOI, b"")
        out, self._out = self._out, []
        return out

    def _check_token_size(self) -> None:
        if len(self._token) > MAX_TOKEN_SIZE:
            # QEMU hands the oversized partial token on as it is, in its lexer state
            self._process(ERROR, bytes(self._token), limit=True)
            self._token.clear()
            self._state = "start"

    def _char(self, ch: int, i: int) -> int:
        """Process byte ``ch`` at position i; returns the next position."""
        st = self._state
        if st == "recovery":
            if ch < 0x20 and ch != 0x09 or ch in (0xFE, 0xFF) or ch in b"[]{}":
                self._state = "start"
                return i            # lookahead: reprocess in the start state
            return i + 1
        if st == "start":
            if ch in _WHITESPACE:
                return i + 1
            if ch in _STRUCTURAL:
                self._process(_STRUCTURAL[ch], bytes([ch]))
                return i + 1
            self._token.append(ch)
            if ch in (0x22, 0x27):
                self._state, self._quote = ("dq" if ch == 0x22 else "sq"), ch
            elif ch == 0x30:
                self._state = "zero"
            elif ch in _DIGITS:
                self._state = "digits"
            elif ch == 0x2D:
                self._state = "sign"
            elif ch in _LOWER:
                self._state = "keyword"
            else:
                self._error()
            return i + 1
        if st in ("dq", "sq"):
            self._token.append(ch)
            if ch == self._quote:
                self._emit(STRING)
            elif ch == 0x5C:
                self._state = st + "_esc"
            else:           # a control character or 0xFE/0xFF
                self._error()
            self._check_token_size()
            return i + 1
        if st.endswith("_esc"):
            # any printable byte: parse_string() judges the escape
            self._token.append(ch)
            if 0x20 <= ch <= 0xFD:
                self._state = st[:2]
            else:
                self._error()
            return i + 1
        # numbers and keywords: a byte < 0x80 that does not continue the token ends it
        nxt = _NUMBER_NEXT[st](ch)
        if nxt is not None:
            self._token.append(ch)
            if nxt == "error":
                self._error()
            else:
                self._state = nxt
            return i + 1
        if st in _TERMINAL and ch < 0x80:
            self._emit(_TERMINAL[st])
            return i        # lookahead
        self._token.append(ch)
        self._error()
        return i + 1

    def _emit(self, kind: str) -> None:
        token = bytes(self._token)
        self._token.clear()
        self._state = "start"
        self._process(kind, token)

    def _error(self) -> None:
        token = bytes(self._token)
        self._token.clear()
        self._state = "recovery"
        self._process(ERROR, token)

    # the streamer ------------------------------------------------------------------------
    def _process(self, kind: str, text: bytes, limit: bool = False) -> None:
        err = None
        if kind == LCURLY:
            self._brace += 1
        elif kind == RCURLY:
            self._brace -= 1
        elif kind == LSQUARE:
            self._bracket += 1
        elif kind == RSQUARE:
            self._bracket -= 1
        elif kind == ERROR and not limit:
            self._reset()
            self._out.append(JSONParseError(
                "JSON parse error, stray '%s'" % text.decode("utf-8", "replace")))
            return
        elif kind == EOI:
            if not self._tokens:
                return
            self._finish()
            return
        if self._size + len(text) + 1 > MAX_TOKEN_SIZE:
            err = "JSON token size limit exceeded"
        elif len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            err = "JSON token count limit exceeded"
        elif self._brace + self._bracket > MAX_NESTING:
            err = "JSON nesting depth limit exceeded"
        if err is not None:
            self._reset()
            self._out.append(JSONParseError(err))
            return
        self._tokens.append((kind, text))
        self._size += len(text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        self._finish()

    def _finish(self) -> None:
        tokens = self._tokens
        self._reset()
        try:
            self._out.append(_Parser(tokens).parse())
        except JSONParseError as e:
            self._out.append(e)

    def _reset(self) -> None:
        self._tokens = []
        self._brace = self._bracket = 0
        self._size = 0


def _zero(ch):
    if ch in _DIGITS:
        return "error"
    return "exp_e" if ch in b"eE" else "mantissa" if ch == 0x2E else None


def _digits(ch):
    if ch in _DIGITS:
        return "digits"
    return "exp_e" if ch in b"eE" else "mantissa" if ch == 0x2E else None


def _sign(ch):
    return "zero" if ch == 0x30 else "digits" if ch in _DIGITS else "error"


def _mantissa(ch):
    return "mantissa_digits" if ch in _DIGITS else "error"


def _mantissa_digits(ch):
    return "mantissa_digits" if ch in _DIGITS else "exp_e" if ch in b"eE" else None


def _exp_e(ch):
    return "exp_sign" if ch in b"+-" else "exp_digits" if ch in _DIGITS else "error"


def _exp_sign(ch):
    return "exp_digits" if ch in _DIGITS else "error"


def _exp_digits(ch):
    return "exp_digits" if ch in _DIGITS else None


def _keyword(ch):
    return "keyword" if ch in _LOWER else None


_NUMBER_NEXT = {"zero": _zero, "digits": _digits, "sign": _sign, "mantissa": _mantissa,
                "mantissa_digits": _mantissa_digits, "exp_e": _exp_e, "exp_sign": _exp_sign,
                "exp_digits": _exp_digits, "keyword": _keyword}
_TERMINAL = {"zero": INTEGER, "digits": INTEGER, "mantissa_digits": FLOAT,
             "exp_digits": FLOAT, "keyword": KEYWORD}


# ---- the parser ---------------------------------------------------------------------------
class _Parser:
    """json-parser.c: a recursive descent over one value's tokens; the first error wins."""

    def __init__(self, tokens: list) -> None:
        self.tokens = tokens
        self.pos = 0

    def parse(self) -> Any:
        return self.value()

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pop(self):
        token = self.peek()
        if token is not None:
            self.pos += 1
        return token

    @staticmethod
    def fail(msg: str):
        raise JSONParseError("JSON parse error, " + msg)

    def value(self) -> Any:
        token = self.peek()
        if token is None:
            self.fail("premature EOI")
        kind = token[0]
        if kind == LCURLY:
            return self.obj()
        if kind == LSQUARE:
            return self.array()
        if kind in (INTEGER, FLOAT):
            self.pop()
            return _number(kind, token[1])
        if kind == STRING:
            self.pop()
            return _string(token[1])
        if kind == KEYWORD:
            self.pop()
            word = token[1].decode("ascii")
            if word in _KEYWORDS:
                return _KEYWORDS[word]
            self.fail("invalid keyword '%s'" % word)
        self.fail("expecting value")

    def obj(self) -> dict:
        self.pop()
        result: dict = {}
        peek = self.peek()
        if peek is None:
            self.fail("premature EOI")
        if peek[0] == RCURLY:
            self.pop()
            return result
        self.pair(result)
        token = self.pop()
        if token is None:
            self.fail("premature EOI")
        while token[0] != RCURLY:
            if token[0] != COMMA:
                self.fail("expected separator in dict")
            self.pair(result)
            token = self.pop()
            if token is None:
                self.fail("premature EOI")
        return result

    def pair(self, result: dict) -> None:
        if self.peek() is None:
            self.fail("premature EOI")
        key = self.value()
        if not isinstance(key, str):
            self.fail("key is not a string in object")
        token = self.pop()
        if token is None:
            self.fail("premature EOI")
        if token[0] != COLON:
            self.fail("missing : in object pair")
        value = self.value()
        if key in result:
            self.fail("duplicate key")
        result[key] = value

    def array(self) -> list:
        self.pop()
        result: list = []
        peek = self.peek()
        if peek is None:
            self.fail("premature EOI")
        if peek[0] == RSQUARE:
            self.pop()
            return result
        result.append(self.value())
        token = self.pop()
        if token is None:
            self.fail("premature EOI")
        while token[0] != RSQUARE:
            if token[0] != COMMA:
                self.fail("expected separator in list")
            result.append(self.value())
            token = self.pop()
            if token is None:
                self.fail("premature EOI")
        return result


_KEYWORDS = {"true": True, "false": False, "null": None}


def _number(kind: str, text: bytes):
    if kind == INTEGER:
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    try:
        return float(text)
    except OverflowError:       # pragma: no cover - float() returns inf instead
        return float("inf")


def _string(token: bytes) -> str:
    """parse_string(): escapes and QEMU's (modified) UTF-8 rules."""
    quote, body = token[0], token[1:-1]
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == 0x5C:
            esc = body[i + 1]
            if esc == 0x75:
                cp = _hex4(body[i + 2:i + 6])
                end = i + 6
                if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == b"\\u":
                    trailing = _hex4(body[end + 2:end + 6])
                    if 0xDC00 <= trailing <= 0xDFFF:
                        cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                        end += 6
                    else:
                        cp = -1
                if not _valid_codepoint(cp):
                    raise JSONParseError("JSON parse error, %s is not a valid Unicode "
                                         "character" % body[i:i + 6].decode("ascii"))
                out.append(chr(cp))
                i = end
            elif esc not in _ESCAPE_CHARS:
                raise JSONParseError("JSON parse error, invalid escape sequence in string")
            else:
                out.append(_ESCAPE_CHARS[esc])
                i += 2
            continue
        if ch < 0x80:
            j = i + 1
            while j < n and body[j] < 0x80 and body[j] != 0x5C:
                j += 1
            out.append(body[i:j].decode("ascii"))
            i = j
            continue
        cp, length = _utf8_codepoint(body, i)
        if cp < 0:
            raise JSONParseError("JSON parse error, invalid UTF-8 sequence in string")
        out.append(chr(cp))
        i += length
    del quote
    return "".join(out)


_ESCAPE_CHARS = {ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r",
                 ord("t"): "\t", ord("/"): "/", ord("\\"): "\\", ord("'"): "'",
                 ord('"'): '"'}


def _hex4(text: bytes) -> int:
    """cvt4hex(): four hex digits, or -1."""
    if len(text) != 4 or any(c not in _HEX for c in text):
        return -1
    return int(text, 16)


def _valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def _utf8_codepoint(buf: bytes, i: int) -> tuple[int, int]:
    """mod_utf8_codepoint(): (code point, bytes used), code point -1 when invalid."""
    first = buf[i]
    if first & 0xE0 == 0xC0:
        length, cp, minimum = 2, first & 0x1F, 0x80
    elif first & 0xF0 == 0xE0:
        length, cp, minimum = 3, first & 0x0F, 0x800
    elif first & 0xF8 == 0xF0:
        length, cp, minimum = 4, first & 0x07, 0x10000
    else:
        return -1, 1
    for k in range(1, length):
        if i + k >= len(buf) or buf[i + k] & 0xC0 != 0x80:
            return -1, k
        cp = (cp << 6) | (buf[i + k] & 0x3F)
    if buf[i:i + 2] == b"\xc0\x80":
        return 0, 2                 # modified UTF-8's NUL
    if cp < minimum or not _valid_codepoint(cp):
        return -1, length
    return cp, length


def parse_json(text: str | bytes) -> Any:
    """qobject_from_json(): exactly one value; JSONParseError otherwise (--blockdev {...})."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    streamer = JSONStreamer()
    items = streamer.feed(data) + streamer.flush()
    # consume_json(): the first error stands; a second value after a good one fails
    if not items:
        raise JSONParseError("Expecting a JSON value")
    first = items[0]
    if isinstance(first, JSONParseError):
        raise first
    if len(items) > 1:
        raise JSONParseError("Expecting at most one JSON value")
    return first


# ---- output -----------------------------------------------------------------------------
_ESCAPE_OUT = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')
_SIMPLE_OUT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
               "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match) -> str:
    ch = m.group(0)
    simple = _SIMPLE_OUT.get(ch)
    if simple is not None:
        return simple
    cp = ord(ch)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD                    # not valid UTF-8: QEMU's replacement character
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def _quoted(s: str) -> str:
    return '"' + _ESCAPE_OUT.sub(_escape_char, s) + '"'


@functools.lru_cache(maxsize=4096)
def _bucket(key: str) -> int:
    """qdict's bucket of a key: tdb_hash() % QDICT_BUCKET_MAX."""
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def _qdict_order(d: dict) -> list:
    """Members in the order QEMU's QDict iterates them: by hash bucket, and within a
    bucket the last inserted first (so output matches the daemon byte for byte)."""
    items = list(d.items())
    order = sorted(range(len(items)), key=lambda i: (_bucket(str(items[i][0])), -i))
    return [items[i] for i in order]


def to_json(value: Any) -> str:
    """qobject_to_json(): QEMU's compact form."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value: Any, out: list) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_quoted(value))
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append("%.17g" % value)
    elif isinstance(value, dict):
        out.append("{")
        first = True
        for k, v in _qdict_order(value):
            if not first:
                out.append(", ")
            first = False
            out.append(_quoted(str(k)))
            out.append(": ")
            _encode(v, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(", ")
            _encode(v, out)
        out.append("]")
    else:
        raise TypeError("cannot encode %r as JSON" % (value,))


def encode_message(message: dict) -> bytes:
    """One message on the wire: compact JSON and "\\r\\n" (as QEMU's monitor sends)."""
    return (to_json(message) + "\r\n").encode("utf-8")


# ---- the connection -----------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A complete JSON value from the client, to be answered by handle()."""
    request: Any


@dataclass(frozen=True)
class ParseError:
    """Malformed input; ``response`` is the error to send (it has no id)."""
    response: dict


class QMPConnection:
    """One client connection's protocol state (no I/O).

    Responses must be sent in request order; events only to negotiated connections
    (``wants_events``), as QEMU only sends events to monitors in command mode.
    """

    def __init__(self, session: QMPSession):
        self.session = session
        self.streamer = JSONStreamer()

    def greeting_bytes(self) -> bytes:
        return encode_message(self.session.greeting())

    def receive_data(self, data: bytes) -> list:
        """Feed bytes read from the client; returns Request / ParseError items."""
        items = []
        for value in self.streamer.feed(data):
            if isinstance(value, JSONParseError):
                items.append(ParseError(error_response(value)))
            else:
                items.append(Request(value))
        return items

    def handle(self, request: Any) -> dict:
        """The response to one request (runs the command: call from a worker thread)."""
        return self.session.handle(request)

    @property
    def wants_events(self) -> bool:
        return self.session.negotiated

    @staticmethod
    def encode(message: dict) -> bytes:
        return encode_message(message)
