"""mirror_top (block/mirror.c's bdrv_mirror_top): the implicit filter a mirror or an
active commit inserts above its source.  Guest writes pass through it; the job's dirty
bitmap lives on this node, so every write through it marks the chunks to (re)copy."""
from ..base import DriverInfo, DriverKind
from .common import JobFilter


class MirrorTopDriver(JobFilter):
    info = DriverInfo("mirror_top", DriverKind.FILTER)
