"""The QMP command dispatcher, session protocol and event bus, free of I/O.

A transport reads JSON requests, passes each to ``QMPSession.handle()`` (or, without
capabilities negotiation, ``Dispatcher.dispatch()``) and writes back the response;
it subscribes to an ``EventBus`` to forward events.  Error texts are QEMU 7.2's
(qapi/qmp-dispatch.c, monitor/qmp.c, monitor/qmp-cmds-control.c).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from ..qapi import schema
from ..qapi.errors import QMPError
from ..qapi.validate import validate_command_args, validate_event_data

__all__ = ["QMPError", "Dispatcher", "command", "error_response", "QMPSession", "EventBus",
           "assert_valid_event", "timestamp"]

log = logging.getLogger(__name__)

Handler = Callable[[dict], Any]
"""A command handler: takes the validated arguments (schema member names, dashes
included) and returns the command's result (None means {})."""

_COMMAND_MARK = "_qmp_command"


@dataclass(frozen=True)
class _Command:
    name: str
    handler: Handler
    allow_oob: bool


def command(name: str, *, allow_oob: bool = False) -> Callable[[Callable], Callable]:
    """Mark a function or method as the handler of QMP command ``name``.

    ``Dispatcher.register_group(obj)`` registers every marked attribute of ``obj``
    (an instance, class or module) as bound there.
    """
    def mark(func: Callable) -> Callable:
        # mark the function itself when given a staticmethod/classmethod wrapper
        setattr(getattr(func, "__func__", func), _COMMAND_MARK, (name, allow_oob))
        return func
    return mark


def error_response(exc: BaseException) -> dict:
    """The {"error": ...} response for an exception raised by a command.

    An exception with a ``qmp_class`` attribute (BlockError, QMPError) keeps its class;
    any other is a GenericError.  The text is ``str(exc)``, or the exception's type
    name when that is empty.
    """
    error_class = str(getattr(exc, "qmp_class", "GenericError"))
    return {"error": {"class": error_class, "desc": str(exc) or type(exc).__name__}}


class Dispatcher:
    """Runs registered commands on validated arguments and wraps results as responses.

    Commands in the schema get their arguments validated first; commands registered
    but not in the schema get them unchecked.  Unless ``builtins`` is false,
    'query-commands' and 'qmp_capabilities' (which, as in QEMU's command mode, refuses
    to run again) are registered from the start.
    """

    def __init__(self, *, builtins: bool = True) -> None:
        self._commands: dict[str, _Command] = {}
        if builtins:
            self.register("query-commands", self._query_commands)
            self.register("qmp_capabilities", self._capabilities_already_negotiated)

    def register(self, name: str, handler: Handler, *, allow_oob: bool = False) -> None:
        """Make ``handler`` run command ``name``; ValueError if it already has one."""
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = _Command(name, handler, allow_oob)

    def unregister(self, name: str) -> None:
        """Forget command ``name`` (KeyError if it is not registered)."""
        del self._commands[name]

    def register_group(self, group: object) -> list[str]:
        """Register every @command-marked attribute of ``group``; returns their names."""
        names = []
        for attr_name in dir(group):
            raw = inspect.getattr_static(group, attr_name)      # no property side effects
            mark = getattr(getattr(raw, "__func__", raw), _COMMAND_MARK, None)
            if mark is not None:
                name, allow_oob = mark
                self.register(name, getattr(group, attr_name), allow_oob=allow_oob)
                names.append(name)
        return names

    def command_names(self) -> list[str]:
        """Registered command names, in registration order."""
        return list(self._commands)

    def execute(self, name: str, arguments: Any = None) -> dict:
        """Run command ``name``; returns {"return": result} or {"error": {...}}.

        Never raises (except BaseExceptions that are not Exceptions, e.g. SystemExit).
        """
        if arguments is not None and not isinstance(arguments, dict):
            return error_response(QMPError("QMP input member 'arguments' must be an object"))
        cmd = self._commands.get(name)
        if cmd is None:
            return _command_not_found(name)
        return self._run(cmd, arguments)

    def dispatch(self, request: Any, *, allow_oob: bool = False) -> dict:
        """Handle one decoded QMP request object as qmp_dispatch() does.

        Checks the request's shape ('execute' or, with ``allow_oob``, 'exec-oob';
        'arguments'; 'id'), runs the command and echoes 'id' in the response.
        """
        if not isinstance(request, dict):
            return error_response(QMPError("QMP input must be a JSON object"))
        response = self._dispatch_checked(request, allow_oob)
        if "id" in request:
            response["id"] = request["id"]
        return response

    def _dispatch_checked(self, request: dict, allow_oob: bool) -> dict:
        problem = _request_problem(request, allow_oob)
        if problem:
            return error_response(QMPError(problem))
        oob = "exec-oob" in request
        name = request["exec-oob" if oob else "execute"]
        cmd = self._commands.get(name)
        if cmd is None:
            return _command_not_found(name)
        if oob and not cmd.allow_oob:
            return error_response(QMPError(f"The command {name} does not support OOB"))
        return self._run(cmd, request.get("arguments"))

    def _run(self, cmd: _Command, arguments: dict | None) -> dict:
        try:
            if cmd.name in schema.COMMANDS:
                arguments = validate_command_args(cmd.name, arguments)
            result = cmd.handler({} if arguments is None else arguments)
        except Exception as exc:
            if not hasattr(exc, "qmp_class"):
                log.exception("QMP command %s failed unexpectedly", cmd.name)
            return error_response(exc)
        return {"return": {} if result is None else result}

    def _query_commands(self, args: dict) -> list[dict]:
        return [{"name": name} for name in self._commands]

    @staticmethod
    def _capabilities_already_negotiated(args: dict) -> None:
        raise QMPError("Capabilities negotiation is already complete, command ignored",
                       "CommandNotFound")


def _command_not_found(name: str) -> dict:
    return error_response(QMPError(f"The command {name} has not been found",
                                   "CommandNotFound"))


def _request_problem(request: dict, allow_oob: bool) -> str | None:
    """What qmp_dispatch_check_obj() finds wrong with a request object, if anything."""
    for key, value in request.items():
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                return f"QMP input member '{key}' must be a string"
        elif key == "arguments":
            if not isinstance(value, dict):
                return "QMP input member 'arguments' must be an object"
        elif key != "id":
            return f"QMP input member '{key}' is unexpected"
    if "execute" in request and "exec-oob" in request:
        return "QMP input member 'execute' clashes with 'exec-oob'"
    if "execute" not in request and "exec-oob" not in request:
        return "QMP input lacks member 'execute'"
    return None


class QMPSession:
    """One client connection's protocol state: capabilities negotiation, then commands.

    Until the client runs 'qmp_capabilities', only that command exists and every other
    is refused with CommandNotFound, as QEMU's monitor does.  ``offered_capabilities``
    (e.g. ('oob',)) are announced in the greeting and may be enabled by the client.
    """

    NEGOTIATION_REQUIRED = "Expecting capabilities negotiation with 'qmp_capabilities'"

    def __init__(self, dispatcher: Dispatcher, version: Mapping[str, Any],
                 offered_capabilities: tuple[str, ...] = ()):
        """``version`` is query-version's VersionInfo: {"qemu": {major, minor, micro},
        "package": str}."""
        self.dispatcher = dispatcher
        self.version = dict(version)
        self.offered_capabilities = tuple(offered_capabilities)
        self.enabled_capabilities: frozenset[str] = frozenset()
        self.negotiated = False
        self._negotiation = Dispatcher(builtins=False)
        self._negotiation.register("qmp_capabilities", self._negotiate)

    def greeting(self) -> dict:
        """The message the server sends first on a new connection."""
        return {"QMP": {"version": self.version,
                        "capabilities": list(self.offered_capabilities)}}

    def handle(self, request: Any) -> dict:
        """The response to one decoded request."""
        if self.negotiated:
            return self.dispatcher.dispatch(request,
                                            allow_oob="oob" in self.enabled_capabilities)
        response = self._negotiation.dispatch(request)
        error = response.get("error")
        if error and error["class"] == "CommandNotFound":
            error["desc"] = self.NEGOTIATION_REQUIRED
        return response

    def _negotiate(self, args: dict) -> dict:
        requested = args.get("enable", [])
        for capability in requested:
            if capability not in self.offered_capabilities:
                raise QMPError(f"Capability '{capability}' not available")
        self.enabled_capabilities = frozenset(requested)
        self.negotiated = True
        return {}


def timestamp(time_ns: int) -> dict:
    """QMP's event timestamp for a time in nanoseconds since the epoch."""
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    return {"seconds": seconds, "microseconds": nanoseconds // 1000}


def assert_valid_event(message: dict) -> None:
    """Assert ``message`` is a well-formed QMP event whose data matches the schema
    (for tests and debugging: it costs a full validation)."""
    assert set(message) <= {"event", "data", "timestamp"}, message
    name = message["event"]
    assert name in schema.EVENTS, f"event {name} is not in the schema"
    stamp = message["timestamp"]
    assert set(stamp) == {"seconds", "microseconds"}, stamp
    assert 0 <= stamp["microseconds"] < 1_000_000, stamp
    try:
        validate_event_data(name, message.get("data"))
    except QMPError as exc:
        raise AssertionError(f"event {name}: {exc}") from None


class EventBus:
    """Delivers QMP events to subscribers.

    Thread-safe: events may be emitted from any thread; subscribers are called in the
    emitting thread, outside the bus's lock, in subscription order.  A subscriber
    that raises is logged and skipped.  Subscribers share one message dict and must
    not modify it.  With ``validate=True`` every event is checked by
    assert_valid_event() (meant for tests).
    """

    def __init__(self, *, clock_ns: Callable[[], int] = time.time_ns, validate: bool = False):
        self._clock_ns = clock_ns
        self._validate = validate
        self._lock = threading.Lock()
        self._subscribers: dict[int, Callable[[dict], None]] = {}
        self._next_token = 0

    def subscribe(self, callback: Callable[[dict], None]) -> int:
        """Call ``callback(message)`` for every later event; returns a token for
        unsubscribe()."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._subscribers[token] = callback
        return token

    def unsubscribe(self, token: int) -> None:
        """Stop deliveries to a subscriber; unknown tokens are ignored."""
        with self._lock:
            self._subscribers.pop(token, None)

    def emit(self, name: str, data: dict | None = None) -> dict:
        """Send event ``name`` to all subscribers; returns the message.

        The message is {"event": name, "data": data, "timestamp": {...}}, without
        "data" when ``data`` is None (events without members).
        """
        message: dict = {"event": name}
        if data is not None:
            message["data"] = data
        message["timestamp"] = timestamp(self._clock_ns())
        if self._validate:
            assert_valid_event(message)
        with self._lock:
            subscribers = list(self._subscribers.values())
        for callback in subscribers:
            try:
                callback(message)
            except Exception:
                log.exception("QMP event subscriber failed on %s", name)
        return message

    @contextlib.contextmanager
    def collect(self, *names: str) -> Iterator[list[dict]]:
        """Record events (only those called ``names``, if given) while in the block."""
        events: list[dict] = []

        def record(message: dict) -> None:
            if not names or message["event"] in names:
                events.append(message)

        token = self.subscribe(record)
        try:
            yield events
        finally:
            self.unsubscribe(token)
