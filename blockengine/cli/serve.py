"""``blockengine serve``: qemu-storage-daemon 7.2's command line in front of a QMP server.

    --blockdev [driver=]DRV,...|JSON   a node (keyval dotted syntax or JSON), like blockdev-add
    --object secret,id=ID,data=D|file=F[,format=raw|base64]      (also JSON)
    --chardev socket,id=ID,path=P|host=H,port=N[,server=on][,wait=off]
    --monitor [chardev=]ID[,mode=control]
    --device id=ID[,drive=NODE][,removable=on|off][,read-only=on|off][,locked=on|off]
             [,share-rw=on|off][,stats-intervals.N=SECONDS]...
                                           (ours: a guest-device-like backend)
    --pidfile PATH, --daemonize, -T/--trace (ignored), -h/--help, -V/--version
    --nbd-server, --export                 accepted, refused: not yet supported

Options are processed in order; an error ends the program with
"qemu-storage-daemon: --OPTION ARG: message" and exit status 1, as the daemon does.
"""
from __future__ import annotations

import base64
import os
import re
import sys

from .. import QEMU_VERSION, __version__
from ..errors import BlockError
from ..qapi import model
from ..qapi.errors import ValidationError
from ..qapi.validate import full_name

HELP = """\
Usage: %(prog)s [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --device id=<id>[,drive=<node-name>][,removable=on|off][,read-only=on|off]
           [,locked=on|off][,share-rw=on|off][,stats-intervals.N=<seconds>]
                         create a device-like block backend (blockengine)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server; not yet supported)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes
                         (not yet supported)

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"""

LONG_OPTIONS = {            # name -> takes an argument
    "blockdev": True, "chardev": True, "daemonize": False, "device": True, "export": True,
    "help": False, "monitor": True, "nbd-server": True, "object": True, "pidfile": True,
    "trace": True, "version": False,
}
SHORT_OPTIONS = {"h": "help", "V": "version", "T": "trace"}
OBJECT_TYPES = ("authz-list", "authz-list-file", "authz-simple", "iothread", "main-loop",
                "pr-manager-helper", "secret", "secret_keyring", "thread-context",
                "throttle-group", "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk",
                "tls-creds-x509")
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


class OptionFailure(Exception):
    """An error to print as 'PROG: [LOC: ]message', then exit 1."""

    def __init__(self, message: str, loc: str | None = None):
        super().__init__(message)
        self.loc = loc


# ---- getopt_long, as far as the daemon's options need it ---------------------------------
def parse_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """(option name, argument, spelling for messages) in order; operands are errors."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            if i < len(argv):
                raise OptionFailure("Unexpected argument", argv[i])
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            matches = [n for n in LONG_OPTIONS if n.startswith(name)]
            if name in LONG_OPTIONS:
                matches = [name]
            if len(matches) != 1:
                if matches:
                    raise OptionFailure("option '%s' is ambiguous; possibilities: %s"
                                        % (word, " ".join("'--%s'" % m for m in matches)))
                raise OptionFailure("unrecognized option '%s'" % word)
            name = matches[0]
            spelled = word
            if LONG_OPTIONS[name]:
                if not eq:
                    if i >= len(argv):
                        raise OptionFailure("option '--%s' requires an argument" % name)
                    value = argv[i]
                    spelled = "%s %s" % (word, value)
                    i += 1
            elif eq:
                raise OptionFailure("option '--%s' doesn't allow an argument" % name)
            else:
                value = None
            out.append((name, value, spelled))
        elif word.startswith("-") and len(word) > 1:
            j = 1
            while j < len(word):
                letter = word[j]
                j += 1
                if letter not in SHORT_OPTIONS:
                    raise OptionFailure("invalid option -- '%s'" % letter)
                name = SHORT_OPTIONS[letter]
                if LONG_OPTIONS[name]:
                    if j < len(word):
                        value, spelled = word[j:], word
                    elif i < len(argv):
                        value = argv[i]
                        spelled = "%s %s" % (word, value)
                        i += 1
                    else:
                        raise OptionFailure("option requires an argument -- '%s'" % letter)
                    out.append((name, value, spelled))
                    break
                out.append((name, None, word))
        else:
            raise OptionFailure("Unexpected argument", word)
    return out


# ---- keyval (util/keyval.c) ----------------------------------------------------------------
def _qapi_name_len(s: str, pos: int) -> int:
    if pos >= len(s) or not s[pos].isascii() or not s[pos].isalpha():
        return 0
    end = pos + 1
    while end < len(s) and (s[end].isascii() and s[end].isalnum() or s[end] in "-_"):
        end += 1
    return end - pos


def _index_len(s: str, pos: int) -> int:
    end = pos
    while end < len(s) and s[end].isdigit():
        end += 1
    return end - pos


def keyval_parse(text: str, implied_key: str | None = None) -> dict:
    """keyval_parse(): 'a=1,b.c=2' -> {'a': '1', 'b': {'c': '2'}}, lists from indices."""
    root: dict = {}
    pos, first = 0, True
    while pos < len(text):
        seg_end = pos
        while seg_end < len(text) and text[seg_end] not in "=,":
            seg_end += 1
        key_text, value = text[pos:seg_end], None
        if seg_end > pos and (seg_end >= len(text) or text[seg_end] != "=") \
                and first and implied_key:
            value, key_text, pos = key_text, implied_key, seg_end
            if pos < len(text) and text[pos] == ",":
                pos += 1
        # key fragments
        fragments, s = [], 0
        while True:
            n = _index_len(key_text, s) if s else 0
            if not n:
                n = _qapi_name_len(key_text, s)
            if not n or (s + n < len(key_text) and key_text[s + n] != "."):
                raise OptionFailure("Invalid parameter '%s'" % key_text)
            if n >= 128:
                raise OptionFailure("Parameter%s%s is too long"
                                    % ("" if s == 0 else " fragment ", key_text[s:s + n]))
            fragments.append(key_text[s:s + n])
            s += n
            if s >= len(key_text) or key_text[s] != ".":
                break
            s += 1
        if value is None:
            pos = seg_end
            if pos >= len(text) or text[pos] != "=":
                raise OptionFailure("Expected '=' after parameter '%s'" % key_text)
            pos += 1
            chars = []
            while pos < len(text):
                if text[pos] == ",":
                    pos += 1
                    if pos >= len(text) or text[pos] != ",":
                        break
                chars.append(text[pos])
                pos += 1
            value = "".join(chars)
        cur = root
        for k, frag in enumerate(fragments[:-1]):
            old = cur.get(frag)
            if old is None:
                old = cur[frag] = {}
            elif not isinstance(old, dict):
                raise OptionFailure("Parameters '%s.*' used inconsistently"
                                    % ".".join(fragments[:k + 1]))
            cur = old
        last = fragments[-1]
        if isinstance(cur.get(last), dict):
            raise OptionFailure("Parameters '%s.*' used inconsistently" % key_text)
        cur[last] = value
        first = False
    return _listify(root, "")


def _listify(d: dict, prefix: str):
    for key, value in list(d.items()):
        if isinstance(value, dict):
            d[key] = _listify(value, prefix + key + ".")
    indices = [k for k in d if k.isdigit()]
    if not indices:
        return d
    if len(indices) != len(d):
        raise OptionFailure("Parameters '%s*' used inconsistently" % prefix)
    by_index = {int(k): v for k, v in d.items()}
    out = []
    for i in range(len(d) + 1):
        if i not in by_index:
            if i < len(d) or len(by_index) > len(out):
                if len(out) < len(d):
                    raise OptionFailure("Parameter '%s%d' missing" % (prefix, i))
            break
        out.append(by_index[i])
    return out


# ---- keyval values typed by the schema (qobject_input_visitor_new_keyval) -------------------
def keyval_typed(type_ref, value, path: tuple = ()):
    """Convert keyval strings to the schema's scalar types, members in schema order."""
    t = model.resolve(type_ref)
    if isinstance(t, model.Object):
        if not isinstance(value, dict):
            return value
        out = dict(value)
        _typed_members(t, value, path, out)
        return out
    if isinstance(t, model.Array):
        if not isinstance(value, list):
            return value
        return [keyval_typed(t.element, v, path + (i,)) for i, v in enumerate(value)]
    if isinstance(t, model.Alternate):
        for branch in t.branches:
            bt = model.resolve(branch)
            if isinstance(value, dict) and isinstance(bt, model.Object):
                return keyval_typed(branch, value, path)
        return value
    if isinstance(t, model.Builtin) and isinstance(value, str):
        return _typed_scalar(t.name, value, path)
    return value


def _typed_members(obj, value: dict, path: tuple, out: dict) -> None:
    for m in obj.members:
        if m.name in value:
            out[m.name] = keyval_typed(m.type, value[m.name], path + (m.name,))
        elif not m.optional:
            raise ValidationError("Parameter '%s' is missing" % full_name(path + (m.name,)))
    if obj.discriminator is not None:
        variant = obj.variants.get(out.get(obj.discriminator))
        if variant is not None:
            _typed_members(model.resolve(variant), value, path, out)


def _typed_scalar(name: str, text: str, path: tuple):
    where = full_name(path)
    if name == "bool":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValidationError("Parameter '%s' expects 'on' or 'off'" % where)
    if name in ("int", "int8", "int16", "int32", "int64"):
        try:
            return int(text, 10) if text.strip() == text and text else _bad(where, "integer")
        except ValueError:
            _bad(where, "integer")
    if name in ("uint8", "uint16", "uint32", "uint64"):
        if not text.isdigit():
            _bad(where, "uint64")
        return int(text)
    if name == "size":
        from .opts import SizeError, strtosz
        try:
            return strtosz(text)
        except SizeError:
            _bad(where, "size")
    if name == "number":
        try:
            return float(text)
        except ValueError:
            _bad(where, "number")
    return text


def _bad(where: str, what: str):
    raise ValidationError("Parameter '%s' expects %s" % (where, what))


def parse_option_value(arg: str, implied_key: str | None, type_name: str | None):
    """A keyval or JSON ({...}) option argument as a dict of typed values."""
    if arg.startswith("{"):
        from ..qmp.protocol import parse_json
        value = parse_json(arg)
        if not isinstance(value, dict):
            raise OptionFailure("Invalid parameter type, expected: object")
        return value
    value = keyval_parse(arg, implied_key)
    if type_name is not None:
        value = keyval_typed(type_name, value)
    return value


# ---- the daemon ------------------------------------------------------------------------------
class Daemon:
    def __init__(self, prog: str):
        from ..qmp.engine import QMPEngine
        self.prog = prog
        self.engine = QMPEngine()
        self.chardevs: dict[str, dict] = {}
        self.monitors: list[str] = []
        self.pidfile: str | None = None

    @property
    def graph(self):
        return self.engine.graph

    def option(self, name: str, arg: str) -> None:
        getattr(self, "opt_" + name.replace("-", "_"))(arg)

    def opt_blockdev(self, arg: str) -> None:
        options = parse_option_value(arg, "driver", "BlockdevOptions")
        self._execute("blockdev-add", options)

    def _execute(self, name: str, args: dict):
        response = self.engine.execute(name, args)
        if "error" in response:
            raise OptionFailure(response["error"]["desc"])
        return response["return"]

    def opt_object(self, arg: str) -> None:
        if arg == "help":
            sys.stdout.write("List of user creatable objects:\n"
                             + "".join("  %s\n" % t for t in OBJECT_TYPES))
            raise SystemExit(0)
        props = parse_option_value(arg, "qom-type", None)
        qom_type = props.get("qom-type")
        if qom_type is None:
            raise OptionFailure("Parameter 'qom-type' is missing")
        if qom_type not in OBJECT_TYPES:
            raise OptionFailure("Parameter 'qom-type' does not accept value '%s'" % qom_type)
        if qom_type != "secret":
            raise OptionFailure("object type '%s' is not yet supported" % qom_type)
        obj_id = props.get("id")
        if obj_id is None:
            raise OptionFailure("Parameter 'id' is missing")
        for key in props:
            if key not in ("qom-type", "id", "data", "file", "format", "keyid", "iv",
                           "loaded"):
                raise OptionFailure("Property 'secret.%s' not found" % key)
        if obj_id in self.graph.secrets:
            raise OptionFailure("attempt to add duplicate property '%s' to object (type "
                                "'container')" % obj_id)
        data, path = props.get("data"), props.get("file")
        if data is not None and path is not None:
            raise OptionFailure("'file' and 'data' are mutually exclusive")
        if data is None and path is None:
            raise OptionFailure("Either 'file' or 'data' must be provided")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise OptionFailure("Unable to read %s: Failed to open file \u201c%s\u201d: %s"
                                    % (path, path, e.strerror)) from None
        else:
            raw = str(data).encode("utf-8")
        fmt = props.get("format", "raw")
        if fmt not in ("raw", "base64"):
            raise OptionFailure("Parameter 'format' does not accept value '%s'" % fmt)
        if fmt == "base64":
            try:
                raw = base64.b64decode(raw, validate=True)
            except ValueError:
                raise OptionFailure("Base64 data is not valid") from None
        self.graph.secrets[obj_id] = raw

    def opt_chardev(self, arg: str) -> None:
        from .opts import parse_opts
        pairs = dict(parse_opts(arg, implied="backend"))
        backend = pairs.get("backend")
        cid = pairs.get("id")
        if cid is None:
            raise OptionFailure("chardev: no id specified")
        if cid in self.chardevs:
            raise OptionFailure("duplicate yank instance")
        if backend != "socket":
            raise OptionFailure("chardev backend '%s' is not yet supported" % backend)
        server = _bool(pairs.get("server", "off"), "server")
        wait = _bool(pairs.get("wait", "on"), "wait")
        path, host, port = pairs.get("path"), pairs.get("host"), pairs.get("port")
        if path is None and port is None:
            raise OptionFailure("Unable to parse FD number %s" % pairs.get("fd", ""))
        if not server:
            raise OptionFailure("client mode sockets (server=off) are not yet supported")
        from ..qmp.server import bind_tcp, bind_unix
        try:
            if path is not None:
                sock = bind_unix(path)
                where = "unix:%s" % path
            else:
                sock = bind_tcp(host or "0.0.0.0", int(port))
                where = "tcp:%s:%s" % (host or "", port)
        except (OSError, ValueError) as e:
            what = path if path is not None else "%s:%s" % (host or "", port)
            raise OptionFailure("Failed to bind socket to %s: %s"
                                % (what, getattr(e, "strerror", None) or e)) from None
        first = None
        if wait:
            sys.stderr.write("%s: --chardev %s: info: QEMU waiting for connection on: "
                             "disconnected:%s,server=on\n" % (self.prog, arg, where))
            sys.stderr.flush()
            first, _ = sock.accept()
        self.chardevs[cid] = {"sock": sock, "path": path, "first": first, "used": False}

    def opt_monitor(self, arg: str) -> None:
        props = keyval_parse(arg, "chardev")
        cid = props.get("chardev")
        if cid is None:
            raise OptionFailure("Parameter 'chardev' is missing")
        for key in props:
            if key not in ("chardev", "mode", "pretty", "id"):
                raise OptionFailure("Parameter '%s' is unexpected" % key)
        if props.get("mode", "control") != "control":
            if props["mode"] != "readline":
                raise OptionFailure("Parameter 'mode' does not accept value '%s'"
                                    % props["mode"])
            raise OptionFailure("Only QMP is supported")
        if _bool(props.get("pretty", "off"), "pretty"):
            raise OptionFailure("pretty=on is not yet supported")
        chardev = self.chardevs.get(cid)
        if chardev is None:
            raise OptionFailure('chardev "%s" not found' % cid)
        if chardev["used"]:
            raise OptionFailure("Device '%s' is in use" % cid)
        chardev["used"] = True
        self.monitors.append(cid)

    def opt_device(self, arg: str) -> None:
        from ..qmp.commands.devices import create_device
        props = keyval_parse(arg)
        for key in props:
            if key not in ("id", "drive", "removable", "read-only", "locked", "share-rw",
                           "stats-intervals"):
                raise OptionFailure("Parameter '%s' is unexpected" % key)
        dev_id = props.get("id")
        if dev_id is None:
            raise OptionFailure("Parameter 'id' is missing")
        flags = {k: _bool(props.get(k, "off"), k)
                 for k in ("removable", "read-only", "locked", "share-rw")}
        intervals = _stats_intervals(props.get("stats-intervals", []))
        try:
            blk = create_device(self.graph, dev_id, props.get("drive"),
                                removable=flags["removable"], read_only=flags["read-only"],
                                locked=flags["locked"], share_rw=flags["share-rw"])
        except BlockError as e:
            raise OptionFailure(str(e)) from None
        for seconds in intervals:
            blk.stats.add_interval(seconds)

    def opt_nbd_server(self, arg: str) -> None:
        raise OptionFailure("--nbd-server is not yet supported by blockengine")

    def opt_export(self, arg: str) -> None:
        raise OptionFailure("--export is not yet supported by blockengine")

    def opt_pidfile(self, arg: str) -> None:
        self.pidfile = arg

    def opt_trace(self, arg: str) -> None:
        pass

    def write_pidfile(self) -> None:
        path = os.path.realpath(self.pidfile)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise OptionFailure("cannot create PID file: Could not create '%s': %s"
                                % (self.pidfile, e.strerror)) from None
        import fcntl
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OptionFailure("cannot create PID file: Cannot lock pid file") from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._pidfile_fd = fd
        self.pidfile = path

    def serve(self, ready_fd: int | None) -> int:
        from ..qmp.server import QMPServer
        server = QMPServer(self.engine)
        for cid in self.monitors:
            c = self.chardevs[cid]
            server.add_listener(c["sock"], c["path"], c["first"])
        if ready_fd is not None:
            _daemon_ready(ready_fd)
        try:
            server.run()
        finally:
            if self.pidfile is not None:
                try:
                    os.unlink(self.pidfile)
                except OSError:
                    pass
        return 0


_UINT = re.compile(r"\s*\+?[0-9]+\Z", re.ASCII)     # parse_uint_full(), base 10


def _stats_intervals(value) -> list[int]:
    """-drive's stats-intervals.N=SECONDS as blockdev.c parses them: the lengths (1 to
    UINT_MAX seconds) of the intervals query-blockstats reports timed_stats for."""
    if isinstance(value, dict):
        raise OptionFailure("Invalid option stats-intervals.%s" % next(iter(value)))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OptionFailure("The specification of stats-intervals is invalid")
    lengths = []
    for text in value:
        length = int(text) if _UINT.match(text) else 0
        if not 0 < length <= 0xFFFFFFFF:
            raise OptionFailure("Invalid interval length: %s" % text)
        lengths.append(length)
    return lengths


def _bool(text: str, name: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise OptionFailure("Parameter '%s' expects 'on' or 'off'" % name)


def _daemonize() -> int:
    """os_daemonize(): the parent exits when the child says it is ready (0) or fails."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        status = os.read(rfd, 1)
        os._exit(0 if status == b"\0" else 1)
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o027)
    return wfd


def _daemon_ready(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.close(devnull)
    os.write(fd, b"\0")
    os.close(fd)


def main(argv: list[str], prog: str = "qemu-storage-daemon") -> int:
    """qemu-storage-daemon's main(); ``argv`` without the program name."""
    def fail(message: str, loc: str | None = None) -> int:
        sys.stderr.write("%s: %s%s\n" % (prog, "%s: " % loc if loc else "", message))
        sys.stderr.flush()
        return 1

    try:
        opts = parse_argv(list(argv))
    except OptionFailure as e:
        return fail(str(e), e.loc)
    daemonize = False
    for name, value, _ in opts:         # the pre-parse pass
        if name == "help":
            sys.stdout.write(HELP % {"prog": prog})
            return 0
        if name == "version":
            sys.stdout.write("%s version %d.%d.%d (blockengine %s)\n"
                             "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project "
                             "developers\n" % (prog, *QEMU_VERSION, __version__))
            return 0
        if name == "daemonize":
            daemonize = True
    ready_fd = _daemonize() if daemonize else None
    daemon = Daemon(prog)
    try:
        for name, value, loc in opts:
            if name in ("help", "version", "daemonize"):
                continue
            try:
                daemon.option(name, value)
            except OptionFailure as e:
                return fail(str(e), e.loc or loc)
            except BlockError as e:       # ValidationError, JSON errors, ...
                return fail(str(e), loc)
        if daemon.pidfile is not None:
            try:
                daemon.write_pidfile()
            except OptionFailure as e:
                return fail(str(e))
    except SystemExit as e:
        return int(e.code or 0)
    except BaseException:
        daemon.graph.close_all()
        raise
    return daemon.serve(ready_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
