"""One error hierarchy for the whole engine.

Drivers and the graph raise these; only the QMP and CLI boundaries translate them
into QMP error classes, one-line messages and exit codes.
"""
import copy
import errno as _errno


class BlockError(Exception):
    """Base of every error blockengine raises on purpose.

    ``qmp_class`` is the QAPI error class the QMP layer reports; ``errno`` is set
    when the error corresponds to a failed system call (I/O error policies use it).
    """

    qmp_class = "GenericError"

    def __init__(self, message: str, *, errno: int | None = None, hint: str | None = None):
        super().__init__(message)
        self.errno = errno
        # extra lines QEMU prints after the message (error_append_hint), e.g. lock conflicts
        self.hint = hint


class InvalidArgument(BlockError):
    """A caller passed a bad option, size, name or range."""


class InvalidImage(BlockError):
    """An image's on-disk contents are not valid for its format."""


class CorruptImage(InvalidImage):
    """Metadata is inconsistent; the image was (or must be) marked corrupt."""


class NotSupported(BlockError):
    """The driver cannot do this; the generic layer may fall back (QEMU's -ENOTSUP)."""

    def __init__(self, message: str = "Operation not supported"):
        super().__init__(message, errno=_errno.ENOTSUP)


class PermissionConflict(BlockError):
    """Attaching a child would violate another parent's shared permissions."""

    def __init__(self, message: str):
        super().__init__(message, errno=_errno.EPERM)


class LockError(BlockError):
    """Another process holds an image lock that conflicts with ours."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, errno=_errno.EAGAIN, hint=hint)


class IOFailure(BlockError):
    """A request failed at the protocol level (carries errno)."""


class DeviceNotFound(BlockError):
    qmp_class = "DeviceNotFound"


class DeviceNotActive(BlockError):
    qmp_class = "DeviceNotActive"


class JobError(BlockError):
    """A block job could not be started or controlled."""


def prefixed(exc: BlockError, prefix: str) -> BlockError:
    """The same error (class, errno, hint) with context in front of its message."""
    new = copy.copy(exc)
    new.args = (prefix + str(exc),)
    return new


def io_failure(exc: OSError, what: str = "") -> IOFailure:
    """Wrap an OSError as an IOFailure, keeping its errno and strerror text."""
    text = exc.strerror or str(exc)
    return IOFailure(f"{what}: {text}" if what else text, errno=exc.errno)
