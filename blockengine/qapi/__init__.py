"""QAPI: the block layer's QMP schema (generated from block-core.qapi) and validation
of command arguments and event data against it."""
from .errors import QMPError, ValidationError
from .validate import check_value, validate_command_args, validate_event_data

__all__ = ["QMPError", "ValidationError", "check_value", "validate_command_args",
           "validate_event_data"]
