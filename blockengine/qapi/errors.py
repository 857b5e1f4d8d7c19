"""Errors reported to QMP clients as {"class": ..., "desc": ...}."""
from ..errors import BlockError


class QMPError(BlockError):
    """An error a QMP command reports: class ``qmp_class`` (a QapiErrorClass name),
    text ``desc`` (= ``str(self)``).

    Any exception with a ``qmp_class`` attribute is reported the same way; this class
    is for errors that are about the protocol or a command rather than the block layer.
    """

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.qmp_class = error_class

    @property
    def error_class(self) -> str:
        return self.qmp_class

    @property
    def desc(self) -> str:
        return str(self)


class ValidationError(QMPError):
    """Arguments do not match the schema; ``desc`` is QEMU 7.2's input-visitor text."""
