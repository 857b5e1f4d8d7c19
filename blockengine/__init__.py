"""blockengine: QEMU's block layer as a Python library.

Public API: ``open()``/``Image`` for image files, ``Graph``/``BlockBackend`` for node
graphs, the error hierarchy, and ``create()`` for new images.
"""
from .errors import (BlockError, CorruptImage, DeviceNotActive, DeviceNotFound,
                     InvalidArgument, InvalidImage, LockError, NotSupported,
                     PermissionConflict)
from .graph.backend import BlockBackend
from .graph.graph import Graph
from .image import Image, open

__version__ = "0.1.0"
# the QEMU release whose behaviour and output we match
QEMU_VERSION = (7, 2, 0)

__all__ = ["open", "Image", "Graph", "BlockBackend", "BlockError", "CorruptImage",
           "DeviceNotActive", "DeviceNotFound", "InvalidArgument", "InvalidImage",
           "LockError", "NotSupported", "PermissionConflict", "__version__"]
