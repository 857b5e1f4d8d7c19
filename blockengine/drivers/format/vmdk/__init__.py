"""The VMDK format driver (QEMU 7.2's block/vmdk.c)."""
from .driver import VmdkDriver

__all__ = ["VmdkDriver"]
