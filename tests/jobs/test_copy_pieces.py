"""copy_pieces (jobs/block_copy.py): the copy loop of mirror, commit and stream.
Against a model node: the writes see the node's bytes in order, holes are written
without a read, and a failure stops the copy at the failed piece (every earlier write
done, none later, the error tagged read/write)."""

import pytest
from hypothesis import given, settings, strategies as st

from blockengine.errors import BlockError
from blockengine.jobs.block_copy import CopyBuffer, copy_pieces


class ModelNode:
    """preadv from a bytes model; optionally fails the read at one offset; counts
    reads."""

    def __init__(self, data: bytes, fail_read_at=None):
        self.data, self.fail_read_at = data, fail_read_at
        self.reads = 0

    def preadv(self, offset, buf):
        self.reads += 1
        if offset == self.fail_read_at:
            raise BlockError("read failed", errno=5)
        buf[:] = self.data[offset:offset + len(buf)]


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

    if fail is None:
        copy_pieces(node, iter(pieces), write, CopyBuffer(piece))
    else:
        with pytest.raises(BlockError) as exc:
            copy_pieces(node, iter(pieces), write, CopyBuffer(piece))
        assert exc.value.is_read == (fail == "read")
    expected = [(p, n, data[p:p + n] if r else None) for p, n, r in pieces
                if fail is None or p < failing]
    assert written == expected


def test_a_planning_error_passes_through():
    """The plan raising (e.g. a cancelled job's pause point) ends the copy after the
    pieces already planned, untagged."""
    data = bytes(range(256)) * 64
    node = ModelNode(data)
    written = []

    def pieces():
        yield 0, 4096, True
        yield 4096, 4096, False
        raise KeyboardInterrupt          # anything: it passes through unchanged

    with pytest.raises(KeyboardInterrupt):
        copy_pieces(node, pieces(), lambda o, n, b: written.append((o, b and bytes(b))),
                    CopyBuffer(4096))
    assert written == [(0, data[:4096]), (4096, None)]
    assert node.reads == 1
