#!/usr/bin/env python3
"""Block job throughput: blockengine's mirror, backup, commit and stream against
qemu-storage-daemon 7.2 running the same job on the same images, and against
``qemu-img convert`` of the same data (the copy limit).

Both daemons are driven over QMP by the same client (tests/jobs/qsd.py); blockengine
runs as ``qemu-storage-daemon`` through install-links.  The images are fully allocated
with random (incompressible) data and live in tmpfs (/dev/shm by default), so the page
cache holds them and the figures are CPU, not disk.  Each job is timed from the
command to BLOCK_JOB_COMPLETED (a mirror includes READY + block-job-complete); images
are opened before the clock starts.  Best of --repeat runs.

    python bench/compare_jobs.py [--size-mib 1024] [--repeat 2] [--only mirror]

The ratios: be/qsd (target <= 1.0) and be/convert.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                 # run from a source tree without installing
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

from tests.jobs.qsd import QSD  # noqa: E402

CHUNK = 16 << 20


def make_random_raw(path: str, size: int) -> None:
    """Fully allocated, incompressible data."""
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            f.write(os.urandom(min(CHUNK, size - off)))


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


@dataclass
class Case:
    """One job.  ``setup(work, size)`` makes fresh images and returns the blockdev-add
    argument lists; ``command`` the job command and its arguments; ``convert`` the
    qemu-img convert argv of the same data (output to OUT)."""
    name: str
    setup: Callable[[str, int], list[dict]]
    command: tuple[str, dict]
    convert: Callable[[str], list[str]]
    result: str                 # the image that must equal data.raw afterwards
    needs_complete: bool = False


def _file_node(name: str, path: str, fmt: str, **extra) -> list[dict]:
    return [{"driver": "file", "filename": path, "node-name": name + "f"},
            {"driver": fmt, "file": name + "f", "node-name": name, **extra}]


def setup_copy(work: str, size: int) -> list[dict]:
    """mirror/backup: data.raw -> a new sparse dst.raw of the same size."""
    dst = os.path.join(work, "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(size)
    return (_file_node("src", os.path.join(work, "data.raw"), "raw")
            + _file_node("dst", dst, "raw"))


def _data_qcow2(work: str) -> str:
    path = os.path.join(work, "data.qcow2")
    if not os.path.exists(path):
        qemu_img("convert", "-f", "raw", "-O", "qcow2", os.path.join(work, "data.raw"), path)
    return path


def setup_stream(work: str, size: int) -> list[dict]:
    """stream: all data in the backing file, the top empty; the job pulls it up."""
    base = _data_qcow2(work)
    top = os.path.join(work, "top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    return (_file_node("base", base, "qcow2", backing=None)
            + _file_node("top", top, "qcow2", backing="base"))


def setup_commit(work: str, size: int) -> list[dict]:
    """commit (intermediate): base (empty) <- mid (all data) <- top (empty); the job
    writes mid's data into base."""
    mid = os.path.join(work, "mid.qcow2")
    base = os.path.join(work, "base.qcow2")
    top = os.path.join(work, "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, str(size))
    if not os.path.exists(mid):
        shutil.copyfile(_data_qcow2(work), mid)
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_img("create", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    return (_file_node("base", base, "qcow2", backing=None)
            + _file_node("mid", mid, "qcow2", backing="base")
            + _file_node("top", top, "qcow2", backing="mid"))


def _convert(fmt_in: str, src: str, fmt_out: str):
    return lambda work: ["convert", "-f", fmt_in, "-O", fmt_out, os.path.join(work, src),
                         os.path.join(work, "out." + fmt_out)]


CASES = [
    Case("mirror raw->raw", setup_copy,
         ("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full"}),
         _convert("raw", "data.raw", "raw"), "dst.raw", needs_complete=True),
    Case("backup raw->raw", setup_copy,
         ("blockdev-backup", {"device": "src", "target": "dst", "sync": "full"}),
         _convert("raw", "data.raw", "raw"), "dst.raw"),
    Case("commit qcow2 mid->base", setup_commit,
         ("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"}),
         _convert("qcow2", "data.qcow2", "qcow2"), "base.qcow2"),
    Case("stream qcow2 base->top", setup_stream,
         ("block-stream", {"device": "top"}),
         _convert("qcow2", "data.qcow2", "qcow2"), "top.qcow2"),
]


def check_result(case: Case, work: str) -> None:
    """The job really copied: its result image holds the data (qemu-img compare)."""
    r = subprocess.run(["qemu-img", "compare", "-F", "raw", os.path.join(work, case.result),
                        os.path.join(work, "data.raw")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s: result differs: %s" % (case.name, r.stdout + r.stderr))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_job(binary: str, case: Case, work: str, size: int,
             verify: bool = True) -> tuple[float, float]:
    """(wall seconds, daemon CPU seconds) of one job."""
    adds = case.setup(work, size)
    qmp = QSD(binary)
    qmp.timeout = 600
    try:
        for a in adds:
            qmp.cmd("blockdev-add", **a)
        name, args = case.command
        cpu = cpu_seconds(qmp.proc.pid)
        start = time.perf_counter()
        qmp.cmd(name, **{"job-id": "j"}, **args)
        if case.needs_complete:
            qmp.wait_event("BLOCK_JOB_READY", 600)
            qmp.cmd("block-job-complete", device="j")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", 600)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(qmp.proc.pid) - cpu
        if "error" in ev["data"]:
            raise RuntimeError("%s failed: %s" % (case.name, ev["data"]["error"]))
        if ev["data"]["offset"] != size:
            raise RuntimeError("%s copied %d of %d bytes" % (case.name, ev["data"]["offset"],
                                                              size))
    finally:
        qmp.close()
    if verify:
        check_result(case, work)
    return elapsed, cpu


def profile_job(case: Case, work: str, size: int, top: int = 30) -> None:
    """Run the job in this process under cProfile (the job's worker thread is the one
    profiled) and print the hottest functions by internal time."""
    import cProfile
    import pstats

    from blockengine.jobs import job as job_mod
    from blockengine.qmp.commands import block_nodes, jobs
    from blockengine.qmp.context import QMPContext
    from tests.jobs.helpers import Events

    prof = cProfile.Profile()
    thread_main = job_mod.Job._thread_main
    job_mod.Job._thread_main = lambda self: prof.runcall(thread_main, self)
    commands = {**block_nodes.COMMANDS, **jobs.COMMANDS}
    events = Events()
    ctx = QMPContext(events)
    try:
        for a in case.setup(work, size):
            block_nodes.COMMANDS["blockdev-add"](ctx, a)
        name, args = case.command
        start = time.perf_counter()
        commands[name](ctx, {"job-id": "j", **args})
        if case.needs_complete:
            events.wait("BLOCK_JOB_READY", 600)
            commands["block-job-complete"](ctx, {"device": "j"})
        events.wait("BLOCK_JOB_COMPLETED", 600)
        print("%s in-process: %.3f s" % (case.name, time.perf_counter() - start))
    finally:
        job_mod.Job._thread_main = thread_main
        ctx.graph.close_all()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def time_convert(argv: list[str], work: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one qemu-img convert."""
    out = argv[-1]
    if os.path.exists(out):
        os.unlink(out)
    start = time.perf_counter()
    proc = subprocess.Popen(["qemu-img", *argv])
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if status:
        raise RuntimeError("qemu-img %s failed" % " ".join(argv))
    os.unlink(out)
    return elapsed, usage.ru_utime + usage.ru_stime


def best(runs) -> tuple[float, float]:
    """The least wall time and the least CPU time of (wall, cpu) runs (on a shared
    machine the CPU time is the steadier figure)."""
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (CPU times of tiny images are whole clock ticks)."""
    return a / b if b else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="", help="run cases whose name contains this")
    ap.add_argument("--profile", action="store_true",
                    help="run blockengine's jobs in-process under cProfile instead")
    ap.add_argument("--workdir", default=None,
                    help="where the images go (default: a new directory in /dev/shm)")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print("%s not found" % tool, file=sys.stderr)
            return 2
    import compileall
    compileall.compile_dir(os.path.join(ROOT, "blockengine"), quiet=1)
    from blockengine.cli.main import install_links

    size = args.size_mib << 20
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = args.workdir or tempfile.mkdtemp(prefix="be-jobs-", dir=shm)
    links = tempfile.mkdtemp(prefix="be-links-")
    install_links(links)
    be_daemon = os.path.join(links, "qemu-storage-daemon")
    try:
        data = os.path.join(work, "data.raw")
        if not os.path.exists(data):
            make_random_raw(data, size)
        _data_qcow2(work)
        mib = size / (1 << 20)
        if args.profile:
            for case in CASES:
                if args.only in case.name:
                    profile_job(case, work, size)
            return 0
        # a shared machine's load moves wall times by 2x: say what it was
        print(f"{args.size_mib} MiB random data in {work}; best of {args.repeat}; "
              "load average %.2f %.2f %.2f" % os.getloadavg())
        print(f"{'job':24} {'convert s':>9} {'qsd s':>7} {'be s':>7} {'be MiB/s':>8} "
              f"{'be/qsd':>6} {'be/convert':>10} {'qsd/convert':>11}   CPU s: "
              f"{'convert':>7} {'qsd':>6} {'be':>6} {'be/qsd':>6}")
        worst = 0.0
        for case in CASES:
            if args.only not in case.name:
                continue
            # interleaved, so that a machine shared with others loads all three alike
            runs = [(time_convert(case.convert(work), work),
                     time_job("qemu-storage-daemon", case, work, size),
                     time_job(be_daemon, case, work, size)) for _ in range(args.repeat)]
            (t_conv, c_conv), (t_qsd, c_qsd), (t_be, c_be) = (best(r) for r in zip(*runs))
            worst = max(worst, t_be / t_qsd)
            print(f"{case.name:24} {t_conv:9.3f} {t_qsd:7.3f} {t_be:7.3f} {mib / t_be:8.0f} "
                  f"{t_be / t_qsd:6.2f} {t_be / t_conv:10.2f} {t_qsd / t_conv:11.2f}          "
                  f"{c_conv:7.2f} {c_qsd:6.2f} {c_be:6.2f} {_ratio(c_be, c_qsd):6.2f}", flush=True)
        print(f"worst be/qsd ratio: {worst:.2f}; load average %.2f %.2f %.2f"
              % os.getloadavg())
    finally:
        shutil.rmtree(links, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
