"""`img check [-r leaks|all]` on a corpus of damaged images vs the real qemu-img.

Each image of ``tests.fuzz.qcow2_corpus`` (qemu-img-made images edited with struct)
is checked by both tools on identical copies: stdout, stderr and exit status must be
byte-identical, before and after repair; a repair must leave the same bytes on disk.
"""
from __future__ import annotations


import pytest

from tests.fuzz import qcow2_corpus as C
from tests.tooling import copy_sparse

pytestmark = pytest.mark.interop

CASES = [(n, m) for n in C.CASES for m in ("none", "leaks", "all")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.tooling import require_tool
    require_tool("qemu-img")
    d = tmp_path_factory.mktemp("corpus")
    cache: dict = {}
    return {n: C.build(d, n, cache) for n in C.CASES}


@pytest.mark.parametrize("name,mode", CASES)
def test_check_matches_qemu(run_both, corpus, name, mode):
    src = corpus[name]
    args = ["check"] + ([] if mode == "none" else ["-r", mode]) + ["img.qcow2"]
    both = run_both(args, prepare=lambda d: copy_sparse(src, d / "img.qcow2"))
    both.assert_same()
    if mode != "none":
        assert (both.ref_dir / "img.qcow2").read_bytes() == \
            (both.our_dir / "img.qcow2").read_bytes()
        again = run_both(["check", "--output=json", "img.qcow2"],
                         prepare=lambda d: copy_sparse(
                             (both.ref_dir if d.name.startswith("ref") else both.our_dir)
                             / "img.qcow2", d / "img.qcow2"))
        again.assert_same()
