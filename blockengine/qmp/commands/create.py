"""blockdev-create (QEMU 7.2's qmp_blockdev_create(), block/create.c).

The options are validated against BlockdevCreateOptions by the schema layer; the
command checks the driver, then starts a CreateJob and returns at once.  The job's
result is its JOB_STATUS_CHANGE events and, on failure, query-jobs' 'error'.
"""
from __future__ import annotations

from ...errors import BlockError
from ...jobs.create import CREATORS, CreateJob
from ...qapi import schema

# drivers with a BlockdevCreateOptions branch: all have a bdrv_co_create in QEMU 7.2
_CREATE_BRANCHES = frozenset(schema.UNIONS["BlockdevCreateOptions"]["data"])


def blockdev_create(ctx, args: dict):
    driver = args["options"]["driver"]
    if driver not in CREATORS:
        if driver in _CREATE_BRANCHES:
            # a driver QEMU can create but blockengine does not have, as for a QEMU
            # built without that block driver
            raise BlockError("Block driver '%s' not found or not supported" % driver)
        raise BlockError("Driver does not support blockdev-create")
    CreateJob(ctx.graph, args["job-id"], args["options"]).start()
    return {}


COMMANDS = {
    "blockdev-create": blockdev_create,
}
