"""blkdebug: inject-error (event/state/errno/sector/once/immediately), set-state,
config files, align and max-transfer."""
import errno

import pytest

from blockengine.errors import BlockError

from .helpers import make_raw


@pytest.fixture
def base(ctx, tmp_path):
    ctx.cmd("blockdev-add", driver="file", filename=make_raw(tmp_path / "d.raw", 1 << 20),
            **{"node-name": "f"})
    return ctx


def dbg(ctx, **opts):
    ctx.cmd("blockdev-add", driver="blkdebug", image="f", **{"node-name": "dbg"}, **opts)
    ctx.cmd("blockdev-add", driver="raw", file="dbg", **{"node-name": "disk"})
    return ctx.device("dev0", "disk")


def test_inject_write_error_once_at_sector(base):
    blk = dbg(base, **{"inject-error": [{"event": "write_aio", "sector": 8, "once": True}]})
    blk.pwrite(0, b"a" * 512)                        # other sector: fine
    with pytest.raises(BlockError) as ei:
        blk.pwrite(4096, b"b" * 512)
    assert ei.value.errno == errno.EIO and str(ei.value) == "Input/output error"
    blk.pwrite(4096, b"b" * 512)                     # once: gone
    assert blk.pread(4096, 512) == b"b" * 512


def test_rule_stays_active_without_once(base):
    blk = dbg(base, **{"inject-error": [{"event": "read_aio", "errno": errno.ENOSPC}]})
    for _ in range(3):
        with pytest.raises(BlockError) as ei:
            blk.pread(0, 512)
        assert ei.value.errno == errno.ENOSPC


def test_states(base):
    blk = dbg(base, **{
        "inject-error": [{"event": "write_aio", "state": 2, "errno": errno.EPERM}],
        "set-state": [{"event": "flush_to_os", "state": 1, "new_state": 2},
                      {"event": "flush_to_disk", "state": 2, "new_state": 3}]})
    node = base.graph.find_node("dbg")
    blk.pwrite(0, b"x" * 512)                        # state 1: no error
    assert node.drv.state == 1
    node.drv.debug_event("flush_to_os")
    assert node.drv.state == 2
    with pytest.raises(BlockError) as ei:
        blk.pwrite(0, b"x" * 512)
    assert ei.value.errno == errno.EPERM
    node.drv.set_state(3)
    node.drv.debug_event("write_aio")                # re-activation needs state 2
    node.drv.active.clear()
    blk.pwrite(0, b"x" * 512)


def test_config_file(base, tmp_path):
    cfg = tmp_path / "blkdebug.conf"
    cfg.write_text('[inject-error]\nevent = "write_aio"\nerrno = "28"\nsector = "1"\n'
                   'once = "on"\n\n[set-state]\nevent = "write_aio"\nstate = "1"\n'
                   'new_state = "5"\n')
    blk = dbg(base, config=str(cfg))
    with pytest.raises(BlockError) as ei:
        blk.pwrite(0, b"y" * 1024)
    assert ei.value.errno == errno.ENOSPC
    assert base.graph.find_node("dbg").drv.state == 5
    blk.pwrite(0, b"y" * 1024)


def test_align_and_max_transfer(base):
    blk = dbg(base, align=4096, **{"max-transfer": 8192})
    node = base.graph.find_node("dbg")
    assert node.request_alignment == 4096 and node.drv.max_transfer() == 8192
    blk.pwrite(100, b"q" * 20000)                    # unaligned, split: still correct
    assert blk.pread(100, 20000) == b"q" * 20000
    assert blk.pread(0, 100) == bytes(100)


def test_bad_options(base):
    assert base.error("blockdev-add", driver="blkdebug", image="f", align=3000,
                      **{"node-name": "x"}) == "Cannot meet constraints with align 3000"
    assert base.error("blockdev-add", driver="blkdebug", image="f", align=4096,
                      **{"node-name": "x", "max-transfer": 5000}) == \
        "Cannot meet constraints with max-transfer 5000"
    assert "x" not in base.graph.nodes
