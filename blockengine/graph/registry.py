"""The explicit list of drivers, and format probing by magic (QEMU's bdrv_probe_all)."""
from __future__ import annotations

import importlib

from ..errors import InvalidArgument

# driver name -> "module:Class"; one line per driver, nothing registers itself on import
_DRIVERS = {
    "file": "blockengine.drivers.protocol.file:FileDriver",
    "host_device": "blockengine.drivers.protocol.file:HostDeviceDriver",
    "null-co": "blockengine.drivers.protocol.null:NullCoDriver",
    "null-aio": "blockengine.drivers.protocol.null:NullAioDriver",
    "raw": "blockengine.drivers.format.raw:RawDriver",
    "blkdebug": "blockengine.drivers.filter.blkdebug:BlkdebugDriver",
    "crash-inject": "blockengine.drivers.filter.crash_inject:CrashInjectDriver",
    "copy-before-write": "blockengine.drivers.filter.copy_before_write:CopyBeforeWriteDriver",
    "copy-on-read": "blockengine.drivers.filter.copy_on_read:CopyOnReadDriver",
    "compress": "blockengine.drivers.filter.compress:CompressDriver",
    "qcow2": "blockengine.drivers.format.qcow2.driver:Qcow2Driver",
    "quorum": "blockengine.drivers.filter.quorum:QuorumDriver",
    "luks": "blockengine.drivers.format.luks.driver:LuksDriver",
    "vmdk": "blockengine.drivers.format.vmdk:VmdkDriver",
}


def driver_names() -> list[str]:
    return sorted(_DRIVERS)


def get_driver(name: str):
    target = _DRIVERS.get(name)
    if target is None:
        raise InvalidArgument("Unknown driver '%s'" % name)
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def has_driver(name: str) -> bool:
    return name in _DRIVERS


# Format magics as QEMU's probe functions see them.  The first 2 KiB of the image
# (QEMU's BLOCK_PROBE_BUF_SIZE is 2048) are enough for all of them.
PROBE_BYTES = 2048


def probe_format(head: bytes, filename: str = "") -> str:
    """Guess the image format from its first bytes; 'raw' when nothing matches."""
    best, best_score = "raw", 1
    for name, score in (("qcow2", _probe_qcow2(head)), ("luks", _probe_luks(head)),
                        ("vmdk", _probe_vmdk(head))):
        if score > best_score:
            best, best_score = name, score
    return best


def _probe_qcow2(head: bytes) -> int:
    if len(head) >= 8 and head[:4] == b"QFI\xfb" and int.from_bytes(head[4:8], "big") >= 2:
        return 100
    return 0


def _probe_luks(head: bytes) -> int:
    if len(head) >= 8 and head[:6] == b"LUKS\xba\xbe" and head[6:8] == b"\x00\x01":
        return 100
    return 0


def _probe_vmdk(head: bytes) -> int:
    if len(head) >= 4 and head[:4] in (b"KDMV", b"COWD"):
        return 100
    text = head.split(b"\0", 1)[0]
    if b"# Disk DescriptorFile" in text[:64] or b"createType" in text:
        return 100
    return 0
