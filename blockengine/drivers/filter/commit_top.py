"""commit_top (block/commit.c's bdrv_commit_top): the implicit filter an intermediate
commit inserts above its top node; it only shows the job in the graph and keeps
consistent-read on the chain while the job runs."""
from ..base import DriverInfo, DriverKind
from .common import JobFilter


class CommitTopDriver(JobFilter):
    info = DriverInfo("commit_top", DriverKind.FILTER)
