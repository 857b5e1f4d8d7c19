"""ReadAhead (jobs/block_copy.py): the copy loop of mirror, commit and stream with the
next piece's read in flight while the current piece is written.  Against a model node:
the writes see the node's bytes in order, a failure stops the copy at the failed piece
(every earlier write done, none later, the error tagged read/write), and no read is
left running into a buffer when ``copy`` returns or raises."""
import threading

import pytest
from hypothesis import given, settings, strategies as st

from blockengine.errors import BlockError
from blockengine.jobs.block_copy import ReadAhead


class ModelNode:
    """preadv from a bytes model; optionally fails the read at one offset; records
    which reads are running (to prove none outlives ``copy``)."""

    def __init__(self, data: bytes, fail_read_at=None):
        self.data, self.fail_read_at = data, fail_read_at
        self.running = 0
        self.lock = threading.Lock()

    def preadv(self, offset, buf):
        with self.lock:
            self.running += 1
        try:
            if offset == self.fail_read_at:
                raise BlockError("read failed", errno=5)
            buf[:] = self.data[offset:offset + len(buf)]
        finally:
            with self.lock:
                self.running -= 1


def plan(size, piece, holes=()):
    pos = 0
    while pos < size:
        n = min(piece, size - pos)
        yield pos, n, pos not in holes
        pos += n


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 40_000), piece=st.sampled_from([512, 4096, 7000]),
       fail=st.sampled_from([None, "read", "write"]), seed=st.integers(0, 1 << 16))
def test_copies_in_order_and_stops_at_a_failure(size, piece, fail, seed):
    import random
    rng = random.Random(seed)
    data = rng.randbytes(size)
    pieces = list(plan(size, piece, holes={p for p, _, _ in plan(size, piece)
                                           if rng.random() < 0.2}))
    failing = rng.choice(pieces)[0]
    node = ModelNode(data, fail_read_at=failing if fail == "read" else None)
    if fail == "read" and not dict((p, r) for p, _, r in pieces)[failing]:
        fail = None             # a hole is not read: nothing fails
    written = []

    def write(offset, length, buf):
        if fail == "write" and offset == failing:
            raise BlockError("write failed", errno=28)
        written.append((offset, length, None if buf is None else bytes(buf)))

    with ReadAhead(piece) as copier:
        if fail is None:
            copier.copy(node, iter(pieces), write)
        else:
            with pytest.raises(BlockError) as exc:
                copier.copy(node, iter(pieces), write)
            assert exc.value.is_read == (fail == "read")
        assert node.running == 0
    expected = [(p, n, data[p:p + n] if r else None) for p, n, r in pieces
                if fail is None or p < failing]
    assert written == expected


def test_planning_error_leaves_no_read_running():
    """The plan raising (e.g. a cancelled job's pause point) ends the copy after the
    writes of the pieces already read; the read started for the next piece is done."""
    data = bytes(range(256)) * 64
    node = ModelNode(data)
    written = []

    def pieces():
        yield 0, 4096, True
        yield 4096, 4096, True
        raise KeyboardInterrupt          # anything: it passes through unchanged

    with ReadAhead(4096) as copier:
        with pytest.raises(KeyboardInterrupt):
            copier.copy(node, pieces(), lambda o, n, b: written.append((o, bytes(b))))
        assert node.running == 0
    assert written == [(0, data[:4096])]


def test_reader_thread_ends_with_the_block():
    before = {t.name for t in threading.enumerate()}
    with ReadAhead(512) as copier:
        copier.copy(ModelNode(bytes(4096)), plan(4096, 512), lambda o, n, b: None)
    assert not [t for t in threading.enumerate()
                if t.name.startswith("job-read") and t.name not in before]
