"""Bounded hypothesis fuzzing of the qcow2 driver (CI: well under 60 s).

Valid images are mutated (header fields, extensions, L1/L2 entries, refcount table
and blocks, truncation) and fed to open/read/write/check; the driver may refuse them
only with BlockError subclasses, and each example is time bounded (deadline).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.fuzz import harness

SEEDS = {}


def seed(tmp_path_factory, cs, extra=(), snapshot=False):
    key = (cs, extra, snapshot)
    if key not in SEEDS:
        p = tmp_path_factory.mktemp("seed") / "seed.qcow2"
        SEEDS[key] = harness.make_seed_image(p, cs, dict(extra), snapshot)
    return SEEDS[key]


VALUES = st.one_of(st.integers(0, 0xFF), st.integers(0, 1 << 64),
                   st.sampled_from([0, 1, 0x200, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                                    1 << 62, 1 << 63, (1 << 64) - 1, 0x10000, 0x1000]))
MUTATION = st.tuples(st.integers(0, 1 << 20), st.sampled_from(["byte", "u32", "u64",
                                                              "bitflip", "truncate"]), VALUES)
STATS = {"examples": 0}


@pytest.mark.parametrize("cs,extra,snapshot", [(4096, (), False), (65536, (), False),
                                               (4096, (), True)])
def test_fuzz_mutated_images(tmp_path_factory, tmp_path, cs, extra, snapshot):
    data = seed(tmp_path_factory, cs, extra, snapshot)
    offsets = harness.interesting_offsets(data)
    path = tmp_path / "fuzz.qcow2"

    @settings(max_examples=40, deadline=30000, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(offsets), MUTATION), min_size=1, max_size=4),
           st.booleans())
    def one(muts, anywhere):
        ms = [((m[0] if anywhere else o), m[1], m[2]) for o, m in muts]
        if any(k == "truncate" for _, k, _ in ms):
            ms = [m for m in ms if m[1] != "truncate"] + [
                (o % len(data), k, v) for o, k, v in ms if k == "truncate"][:1]
        path.write_bytes(harness.apply_mutations(data, ms))
        STATS["examples"] += 1
        harness.exercise(path)

    one()


# Counts read from the header or the snapshot table (l1_size up to 4M entries, a
# refcount table of 8 MiB, 65536 snapshots) may describe tables far past the end of a
# tiny file.  Work must be bounded by the file, not by those numbers: a 4M-entry L1
# past EOF once took ~15 s here (every metadata overlap check walked all of it).
HOSTILE = {
    "l1_max_past_eof": [(36, ">I", 0x400000), (40, ">Q", 1 << 30)],
    "l1_max_in_file": [(36, ">I", 0x400000)],
    "reftable_max": [(56, ">I", (8 << 20) // 4096)],
    "snapshots_max_past_eof": [(60, ">I", 65536), (64, ">Q", 1 << 30)],
    "snapshots_max_on_header": [(60, ">I", 65536), (64, ">Q", 0)],
    # check -r all grows the file to 2 TiB to hold this refcount block, as qemu-img
    # does (sparse): the refcounts of 2^29 clusters are then compared
    "refblock_2tib_away": [("reftable", 16, ">Q", 1 << 41)],
    # the header read as refcount table: refblocks at absurd offsets, one per entry;
    # every cluster they cover is reported (as qemu-img does), not looked up one by one
    "reftable_on_header": [(48, ">Q", 0), (56, ">I", 165)],
}
HOSTILE_SECONDS = 5.0


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_counts_cost_what_the_file_holds(tmp_path_factory, tmp_path, case):
    import struct
    import time
    data = bytearray(seed(tmp_path_factory, 4096))
    for *where, fmt, value in HOSTILE[case]:
        offset = where[-1]
        if where[0] == "reftable":
            offset += struct.unpack_from(">Q", data, 48)[0]
        struct.pack_into(fmt, data, offset, value)
    path = tmp_path / "hostile.qcow2"
    path.write_bytes(bytes(data))
    start = time.process_time()         # CPU time: other processes share the machine
    harness.exercise(path)
    spent = time.process_time() - start
    path.unlink()                       # (may be a 2 TiB sparse file now)
    assert spent < HOSTILE_SECONDS
