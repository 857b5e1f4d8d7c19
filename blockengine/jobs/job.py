"""The job core: QEMU 7.2's job.c + blockjob.c.

Theory of operation
-------------------
A job runs its ``run()`` in a worker thread.  ``run()`` copies in chunks and calls
``pause_point()`` between chunks (where pause requests and cancellation take effect)
and ``ratelimit(nbytes)`` after each (block-job-set-speed).  Callers keep doing I/O on
the nodes meanwhile; the job's filters and notifiers keep the copy consistent.

Every state change goes through ``_transition``, checked against ``TRANSITIONS`` (QEMU's
JobSTT) and announced with JOB_STATUS_CHANGE.  Every QMP verb is checked against
``VERBS`` (QEMU's JobVerbTable) with QEMU's error text.  The end of a job follows
job_completed(): success -> waiting -> pending -> (finalize: prepare+commit,
BLOCK_JOB_COMPLETED) -> concluded -> (dismiss) null; failure or cancellation ->
aborting -> abort -> BLOCK_JOB_COMPLETED with ``error`` / BLOCK_JOB_CANCELLED ->
concluded -> null.  With auto-finalize off the job stops in ``pending`` (event
BLOCK_JOB_PENDING) until job-finalize; with auto-dismiss off in ``concluded`` until
job-dismiss.

Jobs are registered per graph (``jobs_of(graph)``); the job's nodes carry *op
blockers* (``node.op_blockers``: list of reasons), checked by ``BlockNode.check_op_blockers``
with QEMU's "Node '%s' is busy: block device is in use by block job: %s".
"""
from __future__ import annotations

import errno as _errno
import os
import threading
import time

from ..errors import BlockError, InvalidArgument, JobError
from ..graph.node import id_wellformed

# ---- the state machine ------------------------------------------------------------------
STATUSES = ("undefined", "created", "running", "paused", "ready", "standby", "waiting",
            "pending", "aborting", "concluded", "null")

#                  U  C  R  P  Y  S  W  D  X  E  N
_STT = {
    "undefined": (0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "created":   (0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1),
    "running":   (0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0),
    "paused":    (0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0),
    "ready":     (0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0),
    "standby":   (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "waiting":   (0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0),
    "pending":   (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0),
    "aborting":  (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0),
    "concluded": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1),
    "null":      (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
}
TRANSITIONS = {s: frozenset(t for t, ok in zip(STATUSES, row) if ok) for s, row in _STT.items()}

#                  U  C  R  P  Y  S  W  D  X  E  N
_VERBS = {
    "cancel":    (0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    "pause":     (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "resume":    (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "set-speed": (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "complete":  (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "finalize":  (0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0),
    "dismiss":   (0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0),
}
VERBS = {v: frozenset(s for s, ok in zip(STATUSES, row) if ok) for v, row in _VERBS.items()}

ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")
SLICE_NS = 100_000_000          # ratelimit slice (QEMU's BLOCK_JOB_SLICE_TIME)



class JobCancelled(Exception):
    """Raised at a pause point of a cancelled job to unwind ``run()``."""


class IllegalTransition(AssertionError):
    pass


# ---- registry ------------------------------------------------------------------------------
class JobRegistry:
    """All jobs of a graph.  QEMU prepends new jobs to its list: the listings here
    (query-jobs, query-block-jobs) go newest first."""

    def __init__(self, graph):
        self.graph = graph
        self.jobs: dict[str, Job] = {}
        self.lock = threading.RLock()

    def find(self, job_id: str) -> "Job | None":
        return self.jobs.get(job_id)

    def all_jobs(self) -> list["Job"]:
        return list(reversed(self.jobs.values()))

    def block_jobs(self) -> list["Job"]:
        """The block jobs (blockjob.c), without plain jobs such as blockdev-create's."""
        return [job for job in self.all_jobs() if job.block_job]


def jobs_of(graph) -> JobRegistry:
    reg = getattr(graph, "_job_registry", None)
    if reg is None:
        reg = JobRegistry(graph)
        graph._job_registry = reg
        # as QEMU at exit: cancel every job before the nodes are closed
        graph.before_close.append(lambda: cancel_all_sync(graph))
    return reg


# ---- op blockers ---------------------------------------------------------------------------
def add_op_blocker(node, reason: str) -> None:
    node.op_blockers.append(reason)


def remove_op_blocker(node, reason: str) -> None:
    if reason in node.op_blockers:
        node.op_blockers.remove(reason)


def device_name(node) -> str:
    """bdrv_get_device_name(): the name of a backend whose root is this node, or ''."""
    from ..graph.backend import BlockBackend
    for c in node.parents:
        if isinstance(c.parent, BlockBackend) and c.parent.name:
            return c.parent.name
    return ""


def strerror(exc: BaseException) -> str:
    """The job's error text: the error's message (for I/O errors QEMU's strerror)."""
    text = str(exc)
    if text:
        return text
    e = getattr(exc, "errno", None)
    return os.strerror(e) if e else type(exc).__name__


# ---- the job ---------------------------------------------------------------------------------
class Job:
    """A block job.  Subclasses set ``job_type`` and implement ``run`` (+ hooks)."""

    job_type = "none"
    block_job = True        # a BlockJob: block-job-* commands and query-block-jobs see it

    def __init__(self, graph, job_id: str | None, node, *, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 on_error: str = "report", internal: bool = False):
        self.graph = graph
        self.registry = jobs_of(graph)
        self.node = node
        if job_id is None and not internal:
            job_id = device_name(node)
        if job_id is not None:
            if internal:
                raise JobError("Cannot specify job ID for internal job")
            if not id_wellformed(job_id):
                raise InvalidArgument("Invalid job ID '%s'" % job_id)
            if job_id in self.registry.jobs:
                raise JobError("Job ID '%s' already in use" % job_id)
        if speed < 0:
            raise InvalidArgument("Invalid parameter 'speed'")
        self.id = job_id
        self.status = "undefined"
        self.cond = threading.Condition(self.registry.lock)
        self.pause_count = 0
        self.user_paused = False
        self.paused = False            # the worker is parked at a pause point
        self.busy = False
        self.ready = False
        self.cancelled = False
        self.force_cancel = False
        self.soft_cancelled = False    # mirror: cancel after READY = complete w/o pivot
        self.completing = False        # block-job-complete requested
        self.deferred = False          # run() finished, completion in progress
        self.ret: BaseException | None = None
        self.error: str | None = None
        self.progress_current = 0
        self.progress_total = 0
        # a leaf lock: progress is counted from guest-write paths that hold node locks,
        # which must never wait for the registry lock (a finishing job holds it while
        # its prepare/abort waits for those node locks)
        self._progress_lock = threading.Lock()
        self.speed = 0
        self._slice_start = self._slice_end = 0
        self._slice_bytes = 0
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.on_error = on_error
        self.iostatus = "ok"
        self.thread: threading.Thread | None = None
        self.done = threading.Event()   # set when the job reached concluded
        self._blocked_nodes: list = []
        self._backends: list = []
        self.blocker_reason = "block device is in use by block job: %s" % self.job_type
        if speed:
            self.speed = speed
        with self.registry.lock:
            if job_id is not None:
                self.registry.jobs[job_id] = self
            self._transition("created")

    # ---- bookkeeping --------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.id

    def events(self):
        return self.graph.events

    def _emit(self, name: str, data: dict) -> None:
        if self.id is not None:
            self.graph.events.emit(name, data)

    def _transition(self, new: str) -> None:
        if new not in TRANSITIONS[self.status]:
            raise IllegalTransition("job %s: illegal transition %s -> %s"
                                    % (self.id, self.status, new))
        self.status = new
        self._emit("JOB_STATUS_CHANGE", {"status": new, "id": self.id})
        self.cond.notify_all()

    def _check_verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise JobError("Job '%s' in state '%s' cannot accept command verb '%s'"
                           % (self.id, self.status, verb))

    def block_node(self, node) -> None:
        """block_job_add_bdrv(): this job's op blocker on ``node``."""
        add_op_blocker(node, self.blocker_reason)
        self._blocked_nodes.append(node)

    def add_backend(self, blk) -> None:
        self._backends.append(blk)

    def _event_data(self) -> dict:
        return {"device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed, "type": self.job_type}

    # ---- progress & speed ------------------------------------------------------------
    def progress(self, done: int) -> None:
        with self._progress_lock:
            self.progress_current += done

    def progress_add_total(self, n: int) -> None:
        with self._progress_lock:
            self.progress_total += n

    def progress_set_remaining(self, remaining: int) -> None:
        with self._progress_lock:
            self.progress_total = self.progress_current + remaining

    def set_speed(self, speed: int) -> None:
        with self.registry.lock:
            self._check_verb("set-speed")
            if speed < 0:
                raise InvalidArgument("Parameter 'speed' expects a non-negative value")
            self.speed = speed
            self.cond.notify_all()

    def _ratelimit_delay(self, nbytes: int) -> float:
        """QEMU's ratelimit_calculate_delay(): account nbytes, return seconds to wait."""
        if not self.speed:
            return 0.0
        quota = max(self.speed * SLICE_NS / 1e9, 1.0)
        now = time.monotonic_ns()
        if self._slice_end < now:
            self._slice_start, self._slice_end = now, now + SLICE_NS
            self._slice_bytes = 0
        self._slice_bytes += nbytes
        slices = self._slice_bytes / quota
        if slices >= 1.0:
            self._slice_end = self._slice_start + int(slices * SLICE_NS)
            return (self._slice_end - now) / 1e9
        return 0.0

    def ratelimit(self, nbytes: int) -> None:
        """block_job_ratelimit_processed_bytes() + block_job_ratelimit_sleep(): the
        bytes were already dispatched; sleep as long as the speed says.  The sleep ends
        early on cancel, on a pause request (the pause point comes next) and on
        set-speed (which recomputes it)."""
        with self.registry.lock:
            self._ratelimit_delay(nbytes)
            while not self.cancelled and not self.soft_cancelled:
                delay = self._ratelimit_delay(0)
                if delay <= 0 or self.needs_attention():
                    break
                self.busy = False
                # in slices: a guest-write path flags work without notifying
                self.cond.wait(min(delay, SLICE_NS / 1e9))
                self.busy = True
                if self.pause_count:
                    break

    # ---- running ---------------------------------------------------------------------
    def start(self) -> None:
        with self.registry.lock:
            self.busy = True
            self._transition("running")
        self.thread = threading.Thread(target=self._thread_main, name="job-%s" % self.id,
                                       daemon=True)
        self.thread.start()

    def _cancel_requested(self) -> bool:
        return self.cancelled

    def is_cancelled(self) -> bool:
        """job_is_cancelled(): a cancel that stops the job (not a mirror soft cancel)."""
        return self.cancelled

    def pause_point(self) -> None:
        """Where pause requests and cancellation take effect (between chunks)."""
        with self.registry.lock:
            if self.cancelled:
                raise JobCancelled()
            if self.pause_count and not self.cancelled:
                was = self.status
                self._transition("standby" if was == "ready" else "paused")
                self.paused, self.busy = True, False
                while self.pause_count and not self.cancelled:
                    self.cond.wait()
                self.paused, self.busy = False, True
                self._transition(was)
            if self.cancelled:
                raise JobCancelled()

    def needs_attention(self) -> bool:
        """Hook: work flagged by another thread without the registry lock (see
        ``ratelimit``); a waiting job goes back to its loop."""
        return False

    def sleep(self, seconds: float) -> None:
        """Idle wait (e.g. a READY mirror with nothing to do); wakes on any request."""
        with self.registry.lock:
            if (self.cancelled or self.pause_count or self.completing or self.soft_cancelled
                    or self.needs_attention()):
                return
            self.busy = False
            self.cond.wait(seconds)
            self.busy = True

    def kick(self) -> None:
        with self.registry.lock:
            self.cond.notify_all()

    def set_ready(self) -> None:
        """job_transition_to_ready(): READY + BLOCK_JOB_READY."""
        with self.registry.lock:
            self._transition("ready")
            self.ready = True
            self._emit("BLOCK_JOB_READY", self._event_data())

    def _thread_main(self) -> None:
        err: BaseException | None = None
        try:
            self.run()
        except JobCancelled:
            pass
        except BaseException as e:      # noqa: BLE001 - the job's result
            err = e
        self._completed(err)

    def run(self) -> None:
        raise NotImplementedError

    # ---- error policy -----------------------------------------------------------------
    def error_action(self, policy: str, is_read: bool, exc: BaseException) -> str:
        """block_job_error_action(): 'report' (raise), 'ignore' or 'stop' (paused; retry)."""
        action = self.announce_error(policy, is_read, exc)
        if action == "stop":
            self.stop_on_error(exc)
        return action

    def announce_error(self, policy: str, is_read: bool, exc: BaseException) -> str:
        """The action ``policy`` takes on ``exc``, announced with BLOCK_JOB_ERROR (takes
        no job lock: guest-write paths call it)."""
        err = getattr(exc, "errno", None) or _errno.EIO
        if policy in ("enospc", "auto"):
            action = "stop" if err == _errno.ENOSPC else "report"
        else:
            action = policy
        self._emit("BLOCK_JOB_ERROR", {"device": self.id,
                                       "operation": "read" if is_read else "write",
                                       "action": action})
        return action

    def stop_on_error(self, exc: BaseException) -> None:
        """The 'stop' action: paused as by the user, with the error's io-status."""
        err = getattr(exc, "errno", None) or _errno.EIO
        with self.registry.lock:
            if not self.user_paused:
                self.user_paused = True
                self.pause_count += 1
            self.iostatus = "nospace" if err == _errno.ENOSPC else "failed"

    def handle_io_error(self, policy: str, is_read: bool, exc: BaseException) -> bool:
        """Apply the policy; returns True to retry the chunk, False to skip it (ignore).
        'report' re-raises."""
        action = self.error_action(policy, is_read, exc)
        if action == "report":
            raise exc
        if action == "stop":
            self.pause_point()
            return True
        return False

    # ---- user commands ----------------------------------------------------------------
    def user_pause(self) -> None:
        with self.registry.lock:
            self._check_verb("pause")
            if self.user_paused:
                raise JobError("Job is already paused")
            self.user_paused = True
            self.pause_count += 1
            self.cond.notify_all()

    def user_resume(self) -> None:
        with self.registry.lock:
            self._check_verb("resume")
            if not self.user_paused or self.pause_count <= 0:
                raise JobError("Can't resume a job that was not paused")
            self.iostatus = "ok"
            self.user_paused = False
            self.pause_count -= 1
            self.cond.notify_all()

    def pause(self) -> None:
        """Internal pause (drain-like); balanced by resume()."""
        with self.registry.lock:
            self.pause_count += 1
            self.cond.notify_all()

    def resume(self) -> None:
        with self.registry.lock:
            self.pause_count -= 1
            self.cond.notify_all()

    def soft_cancel(self, force: bool) -> bool:
        """Driver hook (QEMU's .cancel): return the effective ``force``."""
        return True

    def cancel(self, force: bool = False) -> None:
        with self.registry.lock:
            self._check_verb("cancel")
            if self.status == "pending" or (self.status == "created"
                                            and self.thread is None):
                self.cancelled = self.force_cancel = True
                if self.status == "pending":
                    self._abort_from_pending()
                return
            force = self.soft_cancel(force)
            if self.user_paused:
                self.user_paused = False
                self.pause_count -= 1
            if self.deferred:
                return
            if force:
                self.cancelled = self.force_cancel = True
            else:
                self.soft_cancelled = True
            self.cond.notify_all()

    def complete(self) -> None:
        with self.registry.lock:
            self._check_verb("complete")
            if self.pause_count or self.cancelled:
                raise JobError("The active block job '%s' cannot be completed" % self.id)
            self.do_complete()
            self.completing = True
            self.cond.notify_all()

    def do_complete(self) -> None:
        """Driver hook, called under the job lock (raise to refuse)."""
        raise JobError("The active block job '%s' cannot be completed" % self.id)

    def finalize(self) -> None:
        with self.registry.lock:
            self._check_verb("finalize")
            self._do_finalize()

    def dismiss(self) -> None:
        with self.registry.lock:
            self._check_verb("dismiss")
            self._do_dismiss()

    # ---- completion ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Hook: may fail (then the job aborts)."""

    def commit(self) -> None:
        """Hook: the job succeeded."""

    def abort(self) -> None:
        """Hook: the job failed or was cancelled."""

    def clean(self) -> None:
        """Hook: always, after commit/abort."""

    def _release(self) -> None:
        for node in self._blocked_nodes:
            remove_op_blocker(node, self.blocker_reason)
        self._blocked_nodes = []
        for blk in self._backends:
            try:
                blk.delete()
            except BlockError:
                pass
        self._backends = []

    def _completed(self, err: BaseException | None) -> None:
        with self.registry.lock:
            self.deferred = True
            self.busy = False
            self.ret = err
            if err is None and not self.cancelled:
                self._transition("waiting")
                self._transition("pending")
                if self.auto_finalize:
                    self._do_finalize()
                else:
                    self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})
            else:
                self._do_abort()

    def _do_finalize(self) -> None:
        try:
            with self.graph.lock:
                self.prepare()
        except BaseException as e:     # noqa: BLE001
            self.ret = e
            self._do_abort()
            return
        try:
            with self.graph.lock:
                self.commit()
                self._clean()
        finally:
            self._emit("BLOCK_JOB_COMPLETED", self._event_data())
            self._conclude()

    def _abort_from_pending(self) -> None:
        self._do_abort()

    def _do_abort(self) -> None:
        self._transition("aborting")
        try:
            with self.graph.lock:
                try:
                    self.abort()
                finally:
                    self._clean()
        except BlockError:
            pass                # the job already failed; keep its first error
        finally:
            if self.cancelled and self.ret is None:
                self._emit("BLOCK_JOB_CANCELLED", self._event_data())
            else:
                data = self._event_data()
                self.error = "Operation canceled" if self.ret is None else strerror(self.ret)
                data["error"] = self.error
                self._emit("BLOCK_JOB_COMPLETED", data)
            self._conclude()

    def _clean(self) -> None:
        try:
            self.clean()
        finally:
            self._release()

    def _conclude(self) -> None:
        self._transition("concluded")
        self.done.set()
        if self.auto_dismiss:
            self._do_dismiss()

    def _do_dismiss(self) -> None:
        self._transition("null")
        if self.id is not None:
            self.registry.jobs.pop(self.id, None)
        self.cond.notify_all()

    def early_fail(self) -> None:
        """job_early_fail(): setup failed after creation -> null, unregistered."""
        with self.registry.lock:
            self._transition("null")
            if self.id is not None:
                self.registry.jobs.pop(self.id, None)

    # ---- waiting (tests, synchronous callers) ----------------------------------------------
    def wait(self, timeout: float | None = 60) -> None:
        if not self.done.wait(timeout):
            raise TimeoutError("job %s did not conclude (status %s)" % (self.id, self.status))

    def wait_status(self, status: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.registry.lock:
            while self.status != status:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("job %s: status %s, waited for %s"
                                       % (self.id, self.status, status))
                self.cond.wait(left)

    # ---- queries -------------------------------------------------------------------------
    def block_job_info(self) -> dict:
        info = {"type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "busy": self.busy,
                "paused": self.pause_count > 0, "speed": self.speed,
                "io-status": self.iostatus, "ready": self.ready, "status": self.status,
                "auto-finalize": self.auto_finalize, "auto-dismiss": self.auto_dismiss}
        if self.error is not None and self.status in ("concluded", "null"):
            info["error"] = self.error
        return info

    def job_info(self) -> dict:
        info = {"id": self.id, "type": self.job_type, "status": self.status,
                "current-progress": self.progress_current,
                "total-progress": self.progress_total}
        if self.error is not None and self.status in ("concluded", "null"):
            info["error"] = self.error
        return info


def cancel_all_sync(graph, timeout: float = 30) -> None:
    """job_cancel_sync_all(): force-cancel every job and wait for it (before closing the
    graph at exit).  Jobs waiting in 'pending' are aborted, 'concluded' ones dismissed."""
    reg = jobs_of(graph)
    for job in list(reg.jobs.values()):
        with reg.lock:
            if job.status == "concluded":
                job._do_dismiss()
                continue
            try:
                job.cancel(True)
            except BlockError:
                pass
        job.done.wait(timeout)
        with reg.lock:
            if job.status == "concluded" and job.id in reg.jobs:
                job._do_dismiss()


def find_block_job(graph, device: str) -> Job:
    """find_block_job(): QEMU's "Block job '%s' not found"."""
    job = jobs_of(graph).find(device)
    if job is None or not job.block_job:
        from ..errors import DeviceNotActive
        raise DeviceNotActive("Block job '%s' not found" % device)
    return job


def find_job(graph, job_id: str) -> Job:
    job = jobs_of(graph).find(job_id)
    if job is None:
        raise JobError("Job not found")
    return job


def parse_on_error(value: str | None, name: str) -> str:
    if value is None:
        return "report"
    if value not in ON_ERROR:
        raise InvalidArgument("Parameter '%s' does not accept value '%s'" % (name, value))
    return value
