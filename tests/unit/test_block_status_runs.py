"""Differential tests of the bulk block status path.

``block_status_runs`` / ``block_status_above_runs`` (one driver call answering many
extents) must equal repeated ``block_status`` / ``block_status_above`` calls, and the
batched `img map` walk must produce exactly the entries of the per-extent walk, on
random qcow2 images (with a backing file) written through the library.
"""
from __future__ import annotations

import os
import random
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

import blockengine
from blockengine import _native
from blockengine.cli.imageinfo import (ExternalClusters, MapEntry, StatusCursor,
                                       block_status_entry, map_output)
from blockengine.drivers.base import BLOCK_DATA, BLOCK_OFFSET_VALID
from blockengine.drivers.format.qcow2.driver import Qcow2Driver

KiB = 1 << 10


def _scribble(img, r: random.Random, size: int, cs: int, nops: int) -> None:
    for _ in range(nops):
        off = r.randrange(size)
        n = min(r.choice([1, 512, cs, 3 * cs, 17 * cs + 300, r.randrange(1, 8 * cs)]),
                size - off)
        op = r.random()
        if op < 0.5:
            img.write(off, r.randbytes(n) if r.random() < 0.7 else bytes(n))
        elif op < 0.8:
            img.write_zeroes(off, n, may_unmap=r.random() < 0.5)
        else:
            img.discard(off, n)


def _opts(r: random.Random, cs: int) -> dict:
    opts = {"cluster_size": str(cs)}
    v = r.random()
    if v < 0.15:
        opts["compat"] = "0.10"
    elif v < 0.35 and cs >= 16 * KiB:
        opts["extended_l2"] = "on"
    if r.random() < 0.15:
        opts["preallocation"] = "metadata"
    return opts


def _make_chain(d: str, r: random.Random):
    """base.qcow2 <- top.qcow2 (base maybe shorter or longer), both scribbled on."""
    cs = r.choice([512, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB])
    size = r.randrange(1, 48) * max(cs, 16 * KiB) + r.choice([0, 512, 4096])
    base_size = max(512, size + r.choice([-3, -1, 0, 0, 1]) * cs // 2 // 512 * 512)
    base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
    Qcow2Driver.create(base, base_size, _opts(r, cs))
    with blockengine.open(base, "qcow2") as img:
        _scribble(img, r, base_size, cs, r.randrange(0, 40))
    opts = _opts(r, cs)
    if opts.get("extended_l2") != "on":
        opts.pop("preallocation", None)     # with a backing file only for extended L2
    opts.update(backing_file=base, backing_fmt="qcow2")
    Qcow2Driver.create(top, size, opts)
    with blockengine.open(top, "qcow2") as img:
        _scribble(img, r, size, cs, r.randrange(0, 60))
    return top


def _check_runs(runs, single, offset: int, length: int) -> None:
    """Each run equals the single-extent answer at its start for the rest of the range."""
    assert runs
    end = offset + length
    for status in runs:
        assert status == single(offset, end - offset), (offset, end)
        if not status.length:
            break
        offset += status.length
    assert offset <= end


def _walk_runs(bulk, single, start: int, end: int) -> None:
    """Walk [start, end) with the bulk call, checking every run against single."""
    offset = start
    while offset < end:
        runs = bulk(offset, end - offset)
        _check_runs(runs, single, offset, end - offset)
        offset += sum(s.length for s in runs)


def _hex16(v: int) -> str:
    """printf("%#-16" PRIx64): no 0x prefix for zero."""
    return ("0x%x" % v if v else "0").ljust(16)


def _map_text_per_extent(node, start: int, end: int, human: bool) -> bytes:
    """img_map()'s output (without brackets) printed from the per-extent walk."""
    out = []
    for e, nxt in _map_per_extent(node, start, end, human):
        if not human:
            s = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, '
                 '"data": %s' % (e.start, e.length, e.depth, str(e.present).lower(),
                                 str(e.zero).lower(), str(e.data).lower()))
            if e.offset is not None:
                s += ', "offset": %d' % e.offset
            out.append(s + "}" + ("" if nxt is None else ",\n"))
        elif e.data and e.offset is None:
            out.append("<external>")
            break
        elif e.data and not e.zero:
            out.append(_hex16(e.start) + _hex16(e.length) + _hex16(e.offset or 0)
                       + (e.filename or "") + "\n")
    return "".join(out).encode()


def _map_text(node, start: int, end: int, human: bool) -> bytes:
    out = []
    try:
        for chunk in map_output(node, start, end, human):
            out.append(chunk)
    except ExternalClusters:
        out.append(b"<external>")
    return b"".join(out)


def _map_per_extent(node, start: int, end: int, human: bool):
    """The `img map` walk as it was: one block_status_entry per extent."""
    curr = MapEntry(start, 0, False, False, 0, False, None, None)
    while curr.start + curr.length < end:
        offset = curr.start + curr.length
        nxt = block_status_entry(node, offset, min(end - offset, 1 << 30))
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr, nxt
            if human and (not nxt.data or nxt.zero):
                nxt.data, nxt.zero = False, True
        curr = nxt
    yield curr, None


def random_chains(examples: int):
    """The hypothesis settings of the tests below: a seed for the random chain and data
    for the questions asked of it."""
    def wrap(test):
        return settings(max_examples=examples, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow,
                                               HealthCheck.data_too_large])(
            given(seed=st.integers(0, 2**32 - 1), data=st.data())(test))
    return wrap


@random_chains(40)
def test_block_status_runs_equal_repeated_block_status(seed, data):
    r = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        top = _make_chain(d, r)
        with blockengine.open(top, "qcow2", read_only=True) as img:
            chain = img.node.backing_chain()
            for node in chain:
                size = node.total_size
                for want_zero in (True, False):
                    bulk = lambda o, n, nd=node, wz=want_zero: nd.block_status_runs(o, n, wz)
                    single = lambda o, n, nd=node, wz=want_zero: nd.block_status(o, n, wz)
                    _walk_runs(bulk, single, 0, size)
                    above = (lambda o, n, nd=node, wz=want_zero:
                             nd.block_status_above_runs(o, n, None, wz))
                    above1 = (lambda o, n, nd=node, wz=want_zero:
                              nd.block_status_above(o, n, None, wz))
                    _walk_runs(above, above1, 0, size)
                    # random sub-ranges, not aligned to anything
                    for _ in range(3):
                        o = data.draw(st.integers(0, size - 1))
                        n = data.draw(st.integers(1, size - o))
                        _check_runs(bulk(o, n), single, o, n)
                        _check_runs(above(o, n), above1, o, n)
                # EOF answers
                assert node.block_status_runs(size, 512) == [node.block_status(size, 512)]


@random_chains(40)
def test_batched_map_and_cursor_equal_per_extent(seed, data):
    r = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        top = _make_chain(d, r)
        with blockengine.open(top, "qcow2", read_only=True) as img:
            node, size = img.node, img.size
            start = data.draw(st.sampled_from([0, data.draw(st.integers(0, size))]))
            end = data.draw(st.sampled_from([size, data.draw(st.integers(start, size))]))
            for human in (False, True):
                want = _map_text_per_extent(node, start, end, human)
                assert _map_text(node, start, end, human) == want
                if _native.BACKEND == "native":     # and the twins print the same
                    saved = {f: getattr(_native, f) for f in ("l2_map", "map_state",
                                                              "map_feed", "map_finish")}
                    try:
                        for f in saved:
                            setattr(_native, f, getattr(_native.PYTHON, f))
                        assert _map_text(node, start, end, human) == want
                    finally:
                        for f, impl in saved.items():
                            setattr(_native, f, impl)
            # the cursor convert and compare use, walked run by run and inside runs
            for above in (True, False):
                cur = StatusCursor(node, above)
                single = node.block_status_above if above else node.block_status
                offset = 0
                while offset < size:
                    want = (single(offset, size - offset, None, True) if above
                            else single(offset, size - offset, True))
                    assert cur.status(offset, size - offset) == want
                    step = want.length
                    if step > 512 and data.draw(st.booleans()):
                        step = data.draw(st.integers(1, step - 1)) // 512 * 512 or step
                    offset += step
            # merge_holes: a hole's answer spans the equal hole answers after it
            for above in (True, False):
                merged, plain = StatusCursor(node, above, True), StatusCursor(node, above)
                offset = 0
                while offset < size:
                    got = merged.status(offset, size - offset)
                    want = plain.status(offset, size - offset)
                    covered = want.length
                    if not want.flags & (BLOCK_DATA | BLOCK_OFFSET_VALID):
                        while covered < got.length:
                            more = plain.status(offset + covered, size - offset - covered)
                            assert more.flags == want.flags
                            covered += more.length
                    assert got == want._replace(length=covered)
                    offset += covered


@random_chains(30)
def test_raw_map_equals_per_extent(seed, data):
    """The bulk map of raw images (native SEEK_DATA/SEEK_HOLE walk) equals the
    per-extent walk, for sparse files of any size (unaligned tails included)."""
    r = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.raw")
        size = r.randrange(1, 64) * 4096 * 16 + r.choice([0, 100, 512, 4095])
        with open(path, "wb") as f:
            f.truncate(size)
            for _ in range(r.randrange(0, 12)):
                f.seek(r.randrange(size))
                f.write(r.randbytes(r.choice([1, 512, 4096, 70000])))
        with blockengine.open(path, "raw", read_only=True) as img:
            node, size = img.node, img.size
            start = data.draw(st.sampled_from([0, data.draw(st.integers(0, size))]))
            end = data.draw(st.sampled_from([size, data.draw(st.integers(start, size))]))
            for human in (False, True):
                assert (_map_text(node, start, end, human)
                        == _map_text_per_extent(node, start, end, human))
