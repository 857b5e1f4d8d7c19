"""QMP: the typed command dispatcher, session protocol and event bus (core), and
the command handlers (commands)."""
from .core import (Dispatcher, EventBus, QMPError, QMPSession, assert_valid_event, command,
                   error_response)

__all__ = ["Dispatcher", "EventBus", "QMPError", "QMPSession", "assert_valid_event",
           "command", "error_response"]
