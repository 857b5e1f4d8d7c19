"""blockengine: QEMU's block layer as a Python library.

Public API: ``open()``/``Image`` for image files, ``Graph``/``BlockBackend`` for node
graphs, the error hierarchy, and ``create()`` for new images.
"""
import importlib as _importlib

from .errors import (BlockError, CorruptImage, DeviceNotActive, DeviceNotFound,
                     InvalidArgument, InvalidImage, LockError, NotSupported,
                     PermissionConflict)

# The graph, drivers and image layers load on first use (PEP 562), so tools that do not
# open images (``--version``, ``--help``, usage errors) do not pay for importing them.
_LAZY = {"BlockBackend": ".graph.backend", "Graph": ".graph.graph", "Image": ".image",
         "open": ".image"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
# the QEMU release whose behaviour and output we match
QEMU_VERSION = (7, 2, 0)

__all__ = ["open", "Image", "Graph", "BlockBackend", "BlockError", "CorruptImage",
           "DeviceNotActive", "DeviceNotFound", "InvalidArgument", "InvalidImage",
           "LockError", "NotSupported", "PermissionConflict", "__version__"]
