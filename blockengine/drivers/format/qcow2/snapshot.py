"""Internal snapshots: reading the snapshot table (QEMU's qcow2-snapshot.c).

Only reading is implemented: the table is parsed at open (qcow2_read_snapshots) so
that `img info` can list snapshots and `check` can count the clusters they use.
"""
from __future__ import annotations

from dataclasses import dataclass

from ....errors import InvalidImage
from .layout import (QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS, SNAPSHOT_EXTRA,
                     SNAPSHOT_HEADER)

QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
INT_MAX = 0x7FFFFFFF


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    disk_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int
    extra_data_size: int
    unknown_extra_data: bytes = b""

    def info(self) -> dict:
        """SnapshotInfo as `qemu-img info --output=json` lists it."""
        d = {}
        if self.icount != (1 << 64) - 1:
            d["icount"] = self.icount
        d.update({"vm-clock-nsec": self.vm_clock_nsec % 1000000000,
                  "name": self.name,
                  "date-sec": self.date_sec,
                  "date-nsec": self.date_nsec,
                  "vm-clock-sec": self.vm_clock_nsec // 1000000000,
                  "id": self.id_str,
                  "vm-state-size": self.vm_state_size})
        return d


def read_snapshots(file, snapshots_offset: int, nb_snapshots: int, disk_size: int
                   ) -> tuple[list[Snapshot], int]:
    """qcow2_read_snapshots(): (snapshots, size of the table in bytes)."""
    snaps: list[Snapshot] = []
    if not nb_snapshots:
        return snaps, 0
    offset = snapshots_offset
    for i in range(nb_snapshots):
        offset = (offset + 7) & ~7
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack(file.pread(offset, SNAPSHOT_HEADER.size))
        offset += SNAPSHOT_HEADER.size
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise InvalidImage("Too much extra metadata in snapshot table entry %d" % i,
                               hint="You can force-remove this extra metadata with "
                                    "qemu-img check -r all\n")
        known = min(SNAPSHOT_EXTRA.size, extra_size)
        extra = file.pread(offset, known) + bytes(SNAPSHOT_EXTRA.size - known)
        offset += known
        vm_large, dsize, icount = SNAPSHOT_EXTRA.unpack(extra)
        if extra_size >= 8:
            vm_state = vm_large
        if extra_size < 16:
            dsize = disk_size
        if extra_size < 24:
            icount = (1 << 64) - 1
        unknown = b""
        if extra_size > SNAPSHOT_EXTRA.size:
            unknown = file.pread(offset, extra_size - SNAPSHOT_EXTRA.size)
            offset += extra_size - SNAPSHOT_EXTRA.size
        id_str = file.pread(offset, id_size).decode("utf-8", "replace")
        offset += id_size
        name = file.pread(offset, name_size).decode("utf-8", "replace")
        offset += name_size
        if offset - snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE or \
                offset - snapshots_offset > INT_MAX:
            raise InvalidImage("Snapshot table is too big")
        snaps.append(Snapshot(l1_off, l1_size, id_str, name, dsize, vm_state, date_sec,
                              date_nsec, vm_clock, icount, extra_size, unknown))
    return snaps, offset - snapshots_offset
