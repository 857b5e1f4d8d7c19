"""pytest-benchmark cases for the block jobs: mirror and backup of a 256 MiB raw image
(all data, no holes), through QMP handlers as a monitor would run them
(run: pytest bench/test_jobs_bench.py).  ``extra_info['MiB/s']`` is the throughput."""
import os
import shutil
import time

import pytest

from blockengine.qmp.commands import block_nodes, jobs
from blockengine.qmp.context import QMPContext

SIZE = 256 << 20
CMDS = {**block_nodes.COMMANDS, **jobs.COMMANDS}


class Events:
    def __init__(self):
        self.names = []

    def emit(self, name, data):
        self.names.append(name)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobbench") / "src.raw"
    with open(path, "wb") as f:
        for _ in range(SIZE // (16 << 20)):
            f.write(os.urandom(16 << 20))
    return str(path)


def run_job(source, target_dir, command, **extra):
    target = os.path.join(target_dir, "dst.raw")
    with open(target, "wb") as f:
        f.truncate(SIZE)
    ev = Events()
    ctx = QMPContext(ev)
    cmd = lambda name, **a: CMDS[name](ctx, a)   # noqa: E731
    for n, p in (("src", source), ("dst", target)):
        cmd("blockdev-add", driver="file", filename=p, **{"node-name": n + "f"})
        cmd("blockdev-add", driver="raw", file=n + "f", **{"node-name": n})
    cmd(command, device="src", target="dst", sync="full", **{"job-id": "j"}, **extra)
    job = ctx.graph._job_registry.find("j")
    if command == "blockdev-mirror":
        job.wait_status("ready", 120)
        cmd("block-job-complete", device="j")
    job.wait(120)
    assert "BLOCK_JOB_COMPLETED" in ev.names
    ctx.graph.close_all()
    os.unlink(target)


@pytest.mark.parametrize("command", ["blockdev-mirror", "blockdev-backup"])
def test_job_throughput_256mib(benchmark, source, tmp_path, command):
    benchmark.pedantic(run_job, args=(source, str(tmp_path), command), rounds=2,
                       iterations=1)
    benchmark.extra_info["MiB/s"] = round(256 / benchmark.stats.stats.min, 1)


def test_qemu_storage_daemon_reference(benchmark, source, tmp_path):
    """The same mirror in qemu-storage-daemon 7.2, for comparison (skipped without it)."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed")
    from tests.jobs.qsd import QSD

    def mirror():
        target = str(tmp_path / "q.raw")
        with open(target, "wb") as f:
            f.truncate(SIZE)
        q = QSD()
        try:
            for n, p in (("src", source), ("dst", target)):
                q.cmd("blockdev-add", driver="file", filename=p, **{"node-name": n + "f"})
                q.cmd("blockdev-add", driver="raw", file=n + "f", **{"node-name": n})
            t0 = time.monotonic()
            q.cmd("blockdev-mirror", device="src", target="dst", sync="full",
                  **{"job-id": "j"})
            q.wait_event("BLOCK_JOB_READY", 120)
            q.cmd("block-job-complete", device="j")
            q.wait_event("BLOCK_JOB_COMPLETED", 120)
            return time.monotonic() - t0
        finally:
            q.close()
    benchmark.pedantic(mirror, rounds=2, iterations=1)
    benchmark.extra_info["MiB/s"] = round(256 / benchmark.stats.stats.min, 1)
