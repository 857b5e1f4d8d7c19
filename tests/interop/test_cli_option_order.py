"""Options are taken one by one as QEMU's getopt loops take them: a bad value is
reported before a later unknown option or missing operand, and the other way round."""
from __future__ import annotations

import pytest

from tests.interop.test_img_raw import make_images

pytestmark = pytest.mark.interop

CASES = [
    ["map", "--max-length=-1", "-n", "data.raw", "sparse.raw"],
    ["map", "-n", "--max-length=-1", "data.raw"],
    ["map", "-s", "-p", "data.raw"],
    ["convert", "-S", "7", "-Z", "data.raw", "out.raw"],
    ["convert", "-Z", "-S", "7", "data.raw", "out.raw"],
    ["convert", "-m", "99", "--bogus", "data.raw", "out.raw"],
    ["check", "-r", "bogus", "-Z", "data.raw"],
    ["check", "--output=xml", "-Z", "data.raw"],
    ["compare", "-Z", "-h", "data.raw", "data2.raw"],
    ["resize", "-Z", "data.raw", "+1M"],
    ["info", "--output=xml", "data.raw", "sparse.raw"],
]


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_error_order(run_both, args):
    run_both(args, make_images).assert_same()
