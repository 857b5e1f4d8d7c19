"""The job core: QEMU 7.2's transition and verb tables, pause/resume/cancel/set-speed,
auto-finalize/auto-dismiss, rate limiting, job IDs."""
import threading
import time

import pytest

from blockengine.errors import BlockError
from blockengine.jobs import job as jobmod
from blockengine.jobs.job import Job, JobCancelled, TRANSITIONS, VERBS


class CountingJob(Job):
    """Counts to ``n`` chunks of ``chunk`` bytes, with a pause point per chunk."""

    job_type = "stream"

    def __init__(self, graph, job_id, node, n=50, chunk=65536, **kw):
        self.n, self.chunk = n, chunk
        self.gate = threading.Event()
        self.gate.set()
        self.fail_at = None
        super().__init__(graph, job_id, node, **kw)
        self.progress_set_remaining(n * chunk)

    def run(self):
        for i in range(self.n):
            self.pause_point()
            self.gate.wait(10)
            if self.fail_at == i:
                raise BlockError("Input/output error", errno=5)
            time.sleep(0.001)
            self.progress(self.chunk)
            self.ratelimit(self.chunk)


@pytest.fixture
def node(ctx, tmp_path):
    from .helpers import make_raw
    return ctx.add_raw("disk", make_raw(tmp_path / "d.raw", 1 << 20))


def statuses(ctx, jid="j"):
    return [d["status"] for n, d in ctx.events.list if n == "JOB_STATUS_CHANGE"
            and d["id"] == jid]


def test_tables_are_qemus():
    # spot checks of job.c's JobSTT / JobVerbTable
    assert TRANSITIONS["created"] == {"running", "aborting", "null"}
    assert TRANSITIONS["running"] == {"paused", "ready", "waiting", "aborting"}
    assert TRANSITIONS["ready"] == {"standby", "waiting", "aborting"}
    assert TRANSITIONS["pending"] == {"aborting", "concluded"}
    assert TRANSITIONS["aborting"] == {"aborting", "concluded"}
    assert TRANSITIONS["null"] == frozenset()
    assert VERBS["complete"] == {"ready"}
    assert VERBS["finalize"] == {"pending"}
    assert VERBS["dismiss"] == {"concluded"}
    assert VERBS["cancel"] == {"created", "running", "paused", "ready", "standby",
                               "waiting", "pending"}


def test_illegal_transition_is_refused(ctx, node):
    j = CountingJob(ctx.graph, "j", node)
    with pytest.raises(jobmod.IllegalTransition):
        j._transition("concluded")
    j.early_fail()
    assert statuses(ctx) == ["created", "null"]


def test_success_auto_finalize_dismiss(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=5)
    j.start()
    j.wait()
    assert statuses(ctx) == ["created", "running", "waiting", "pending", "concluded",
                             "null"]
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert ev == {"device": "j", "len": 5 * 65536, "offset": 5 * 65536, "speed": 0,
                  "type": "stream"}
    assert jobmod.jobs_of(ctx.graph).find("j") is None


def test_manual_finalize_and_dismiss(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=3, auto_finalize=False, auto_dismiss=False)
    j.start()
    ctx.events.wait("BLOCK_JOB_PENDING")
    assert ctx.cmd("query-jobs") == [{"id": "j", "type": "stream", "status": "pending",
                                      "current-progress": 3 * 65536,
                                      "total-progress": 3 * 65536}]
    assert ctx.error("job-dismiss", id="j") == \
        "Job 'j' in state 'pending' cannot accept command verb 'dismiss'"
    ctx.cmd("job-finalize", id="j")
    info = ctx.cmd("query-block-jobs")[0]
    assert info["status"] == "concluded" and not info["auto-finalize"]
    ctx.cmd("job-dismiss", id="j")
    assert ctx.cmd("query-jobs") == []
    names = [n for n, _ in ctx.events.list if n != "JOB_STATUS_CHANGE"]
    assert names == ["BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED"]


def test_pause_resume_and_texts(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=200)
    j.start()
    ctx.cmd("block-job-pause", device="j")
    assert ctx.error("block-job-pause", device="j") == "Job is already paused"
    j.wait_status("paused", 5)
    info = ctx.cmd("query-block-jobs")[0]
    assert info["paused"] and not info["busy"] and info["status"] == "paused"
    done = info["offset"]
    time.sleep(0.05)
    assert ctx.cmd("query-block-jobs")[0]["offset"] == done   # really paused
    ctx.cmd("block-job-resume", device="j")
    assert ctx.error("block-job-resume", device="j") == \
        "Can't resume a job that was not paused"
    assert ctx.error("block-job-complete", device="j").endswith(
        "cannot accept command verb 'complete'")
    j.wait()
    assert statuses(ctx)[:4] == ["created", "running", "paused", "running"]


def test_cancel_paused_job(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=1000)
    j.start()
    ctx.cmd("job-pause", id="j")
    j.wait_status("paused", 5)
    ctx.cmd("job-cancel", id="j")
    j.wait()
    assert statuses(ctx)[-5:] == ["paused", "running", "aborting", "concluded", "null"]
    ev = ctx.events.wait("BLOCK_JOB_CANCELLED")
    assert set(ev) == {"device", "len", "offset", "speed", "type"}


def test_failure_reports_error(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=10, auto_dismiss=False)
    j.fail_at = 4
    j.start()
    j.wait()
    ev = ctx.events.wait("BLOCK_JOB_COMPLETED")
    assert ev["error"] == "Input/output error" and ev["offset"] == 4 * 65536
    assert ctx.cmd("query-jobs")[0]["error"] == "Input/output error"
    assert ctx.cmd("query-block-jobs")[0]["error"] == "Input/output error"
    assert statuses(ctx) == ["created", "running", "aborting", "concluded"]


def test_set_speed_limits_throughput(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=40, chunk=65536, speed=1 << 20)
    t0 = time.monotonic()
    j.start()
    time.sleep(0.3)
    assert ctx.error("block-job-set-speed", device="j", speed=-1) == \
        "Parameter 'speed' expects a non-negative value"
    ctx.cmd("block-job-set-speed", device="j", speed=0)
    j.wait()
    # ~0.3 s at 1 MiB/s copies ~0.3 MiB (+ one slice of burst), then unlimited
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert ctx.events.wait("BLOCK_JOB_COMPLETED")["speed"] == 0


def test_rate_limit_accuracy(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=20, chunk=65536, speed=4 << 20)  # 1.25 MiB
    t0 = time.monotonic()
    j.start()
    j.wait()
    assert 0.2 <= time.monotonic() - t0 <= 0.6


def test_job_ids(ctx, node):
    with pytest.raises(BlockError, match="Invalid job ID '1a'"):
        CountingJob(ctx.graph, "1a", node)
    j = CountingJob(ctx.graph, "ok.id-1_x", node)
    with pytest.raises(BlockError, match="Job ID 'ok.id-1_x' already in use"):
        CountingJob(ctx.graph, "ok.id-1_x", node)
    j.early_fail()
    ctx.device("dev0", "disk")
    j2 = CountingJob(ctx.graph, None, node)        # defaults to the device name
    assert j2.id == "dev0"
    j2.early_fail()


def test_cancel_pending_job(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=2, auto_finalize=False)
    j.start()
    ctx.events.wait("BLOCK_JOB_PENDING")
    ctx.cmd("job-cancel", id="j")
    assert statuses(ctx)[-4:] == ["pending", "aborting", "concluded", "null"]
    ctx.events.wait("BLOCK_JOB_CANCELLED")


def test_job_cancelled_exception_unwinds(ctx, node):
    j = CountingJob(ctx.graph, "j", node, n=10)
    j.gate.clear()
    j.start()
    ctx.cmd("block-job-cancel", device="j")
    j.gate.set()
    j.wait()
    assert "BLOCK_JOB_CANCELLED" in ctx.events.names()
    assert JobCancelled


def test_cancel_all_sync(ctx, node):
    from blockengine.jobs.job import cancel_all_sync
    a = CountingJob(ctx.graph, "a", node, n=100000)
    b = CountingJob(ctx.graph, "b", node, n=1, auto_finalize=False)
    c = CountingJob(ctx.graph, "c", node, n=1, auto_dismiss=False)
    for j in (a, b, c):
        j.start()
    b.wait_status("pending", 10)
    c.wait_status("concluded", 10)
    cancel_all_sync(ctx.graph, 10)
    assert ctx.cmd("query-jobs") == []
    assert statuses(ctx, "a")[-1] == statuses(ctx, "b")[-1] == statuses(ctx, "c")[-1] == "null"
