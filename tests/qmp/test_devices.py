"""Trays, media and io throttling of --device backends (QEMU 7.2 block/qapi-sysemu.c texts)."""
import pytest

from blockengine.qmp.commands.devices import create_device
from blockengine.qmp.engine import QMPEngine


@pytest.fixture
def engine(tmp_path):
    e = QMPEngine()
    yield e
    e.graph.close_all()


def ok(engine, name, **args):
    r = engine.execute(name, args)
    assert "return" in r, (name, r)
    return r["return"]


def err(engine, name, **args):
    r = engine.execute(name, args)
    assert "error" in r, (name, r)
    return r["error"]["class"], r["error"]["desc"]


def test_tray_open_remove_insert_close_with_events(engine, tmp_path):
    ok(engine, "blockdev-add", driver="null-co", **{"node-name": "m1"})
    ok(engine, "blockdev-add", driver="null-co", **{"node-name": "m2"})
    create_device(engine.graph, "cd0", "m1", removable=True)
    create_device(engine.graph, "hd0", None)
    assert err(engine, "blockdev-open-tray") == (
        "GenericError", "Need exactly one of 'device' and 'id'")
    assert err(engine, "blockdev-open-tray", id="x") == ("DeviceNotFound",
                                                         "Device 'x' not found")
    assert err(engine, "blockdev-open-tray", device="hd0") == (
        "GenericError", "Device 'hd0' is not removable")
    assert err(engine, "x-blockdev-remove-medium", id="cd0") == (
        "GenericError", "Tray of device 'cd0' is not open")
    with engine.events.collect("DEVICE_TRAY_MOVED") as events:
        ok(engine, "blockdev-open-tray", id="cd0")
        ok(engine, "blockdev-open-tray", id="cd0")            # already open: no event
        assert err(engine, "x-blockdev-insert-medium", id="cd0", **{"node-name": "m2"}) == (
            "GenericError", "There already is a medium in the device")
        ok(engine, "x-blockdev-remove-medium", id="cd0")
        assert "m1" in engine.graph.nodes                     # monitor-owned: stays
        assert err(engine, "x-blockdev-insert-medium", id="cd0", **{"node-name": "no"}) == (
            "GenericError", "Node 'no' not found")
        ok(engine, "x-blockdev-insert-medium", device="cd0", **{"node-name": "m2"})
        ok(engine, "blockdev-close-tray", device="cd0")
    assert [e["data"] for e in events] == [
        {"device": "cd0", "id": "cd0", "tray-open": True},
        {"device": "cd0", "id": "cd0", "tray-open": False}]
    (cd, hd) = ok(engine, "query-block")
    assert cd["tray_open"] is False and cd["inserted"]["node-name"] == "m2"
    assert err(engine, "x-blockdev-insert-medium", id="hd0", **{"node-name": "m2"}) == (
        "GenericError", "Node 'm2' is already in use")


def test_locked_tray_needs_force(engine):
    create_device(engine.graph, "cd0", None, removable=True, locked=True)
    ok(engine, "blockdev-open-tray", id="cd0")                # the guest was asked
    assert ok(engine, "query-block")[0]["tray_open"] is False
    ok(engine, "blockdev-open-tray", id="cd0", force=True)
    assert ok(engine, "query-block")[0]["tray_open"] is True


def test_change_medium(engine, tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"a" * 4096)
    b.write_bytes(b"b" * 8192)
    create_device(engine.graph, "cd0", None, removable=True, read_only=True)
    with engine.events.collect("DEVICE_TRAY_MOVED") as events:
        ok(engine, "blockdev-change-medium", id="cd0", filename=str(a), format="raw")
        ok(engine, "blockdev-change-medium", id="cd0", filename=str(b),
           **{"read-only-mode": "read-only"})
    assert [e["data"]["tray-open"] for e in events] == [True, False, True, False]
    (cd,) = ok(engine, "query-block")
    assert cd["inserted"]["file"] == str(b) and cd["inserted"]["ro"] is True
    assert cd["inserted"]["image"]["virtual-size"] == 8192
    # the replaced medium was closed with the device's reference
    assert all(n.filename() != str(a) for n in engine.graph.nodes.values())
    assert err(engine, "blockdev-change-medium", id="cd0",
               filename=str(tmp_path / "none"))[0] == "GenericError"
    assert ok(engine, "query-block")[0]["inserted"]["file"] == str(b)


def test_block_set_io_throttle_groups(engine):
    ok(engine, "blockdev-add", driver="null-co", **{"node-name": "n1"})
    ok(engine, "blockdev-add", driver="null-co", **{"node-name": "n2"})
    create_device(engine.graph, "d1", "n1")
    create_device(engine.graph, "d2", "n2")
    create_device(engine.graph, "d3", None, removable=True)
    zero = dict(bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
    assert err(engine, "block_set_io_throttle", device="nope", **zero) == (
        "DeviceNotFound", "Device 'nope' not found")
    assert err(engine, "block_set_io_throttle", id="d3", **zero) == (
        "GenericError", "Device has no medium")
    assert err(engine, "block_set_io_throttle", device="d1", **dict(zero, bps=5, bps_rd=1)) == (
        "GenericError", "bps/iops/max total values and read/write values cannot be used at "
        "the same time")
    ok(engine, "block_set_io_throttle", device="d1", group="g", **dict(zero, bps=1000000))
    ok(engine, "block_set_io_throttle", device="d2", group="g", **dict(zero, iops=100))
    d1, d2, _ = ok(engine, "query-block")
    for d in (d1, d2):      # one group, one configuration
        assert d["inserted"]["group"] == "g"
        assert (d["inserted"]["bps"], d["inserted"]["iops"]) == (0, 100)
    ok(engine, "block_set_io_throttle", device="d2", **dict(zero, iops=50))   # stays in g
    assert ok(engine, "query-block")[1]["inserted"]["group"] == "g"
    ok(engine, "block_set_io_throttle", device="d1", **zero)                  # leaves
    d1, d2, _ = ok(engine, "query-block")
    assert d1["inserted"]["bps"] == 0 and "group" not in d1["inserted"]
    assert d2["inserted"]["iops"] == 50


def test_block_passwd_and_change_backing_file_errors(engine, tmp_path):
    assert err(engine, "block_passwd", password="x") == (
        "GenericError", "Setting block passwords directly is no longer supported")
    ok(engine, "blockdev-add", driver="null-co", **{"node-name": "n"})
    assert err(engine, "change-backing-file", device="n", **{
        "image-node-name": "n", "backing-file": "x"}) == (
        "GenericError", "not allowing backing file change on an image without a backing file")
