"""qcow2 integrity: metadata overlap checks, BLOCK_IMAGE_CORRUPTED, repair in-process."""
from __future__ import annotations

import struct

import pytest

from blockengine.drivers.format.qcow2 import overlap as OL
from blockengine.drivers.format.qcow2.driver import Qcow2Driver
from blockengine.errors import BlockError, CorruptImage, InvalidArgument
from blockengine.graph.graph import Graph

MiB = 1 << 20


def make(path, cs=65536):
    Qcow2Driver.create(str(path), 8 * MiB, {"cluster_size": cs})
    g = Graph()
    n = g.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}})
    n.pwrite(0, b"\x11" * cs)
    g.close_all()


def open_node(path, **opts):
    g = Graph()
    events = []
    g.events.emit = lambda name, data: events.append((name, data))
    n = g.open_node({"driver": "qcow2", "node-name": "disk", **opts,
                     "file": {"driver": "file", "filename": str(path)}})
    return g, n, events


def header(path):
    raw = open(path, "rb").read(112)
    return struct.unpack_from(">IIQIIQIIQQIIQ", raw)


def redirect_first_cluster(path, target):
    h = header(path)
    l1_off = h[8]
    l2 = struct.unpack_from(">Q", open(path, "rb").read(l1_off + 8), l1_off)[0] & 0x00FFFFFFFFFFFE00
    with open(path, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | target))


@pytest.mark.parametrize("what", ["l1", "reftable", "header"])
def test_data_write_onto_metadata_is_refused(tmp_path, what, capsys):
    p = tmp_path / "a.qcow2"
    make(p)
    h = header(p)
    target = {"l1": h[8], "reftable": h[9], "header": 0}[what]
    if what == "header":
        redirect_first_cluster(p, 0x10000)   # refcount table cluster in a fresh image
        target = 0x10000
    else:
        redirect_first_cluster(p, target)
    g, n, events = open_node(p)
    with pytest.raises(CorruptImage):
        n.pwrite(0, b"\xee" * 512)
    name, ev = events[0]
    assert name == "BLOCK_IMAGE_CORRUPTED"
    assert ev["fatal"] is True and ev["node-name"] == "disk" and ev["offset"] == target
    assert ev["size"] == 512 and ev["msg"].startswith("Preventing invalid write on metadata")
    with pytest.raises(BlockError):
        n.pread(0, 512)
    g.close_all()
    assert struct.unpack_from(">Q", open(p, "rb").read(80), 72)[0] & 2   # corrupt bit
    assert "Marking image as corrupt" in capsys.readouterr().err


def test_overlap_check_none_allows_the_write(tmp_path):
    p = tmp_path / "a.qcow2"
    make(p)
    h = header(p)
    redirect_first_cluster(p, h[8])
    g, n, events = open_node(p, **{"overlap-check": "none"})
    n.pwrite(0, b"\xee" * 512)      # damages the L1 table: what "none" permits
    assert not events
    g.close_all()


def test_overlap_option_parsing():
    assert OL.parse_options({}) == OL.CACHED
    assert OL.parse_options({"overlap-check": "all"}) == OL.ALL
    assert OL.parse_options({"overlap-check": "constant",
                             "overlap-check.active-l2": "on"}) == OL.CONSTANT | OL.ACTIVE_L2
    assert OL.parse_options({"overlap-check": {"template": "none", "main-header": True}}) \
        == OL.MAIN_HEADER
    with pytest.raises(InvalidArgument):
        OL.parse_options({"overlap-check": "bogus"})
    with pytest.raises(InvalidArgument):
        OL.parse_options({"overlap-check": "all", "overlap-check.template": "none"})


def test_read_only_corruption_is_not_fatal(tmp_path, capsys):
    p = tmp_path / "a.qcow2"
    make(p)
    redirect_first_cluster(p, 0x50200)     # unaligned data cluster
    g, n, events = open_node(p, **{"read-only": True})
    with pytest.raises(CorruptImage):
        n.pread(0, 512)
    assert events[0][1]["fatal"] is False
    g.close_all()
    assert not struct.unpack_from(">Q", open(p, "rb").read(80), 72)[0] & 2


def test_check_repairs_zero_refcount_by_rebuilding(tmp_path, capsys):
    p = tmp_path / "a.qcow2"
    make(p, 4096)
    h = header(p)
    rt = h[9]
    rb = struct.unpack_from(">Q", open(p, "rb").read(rt + 8), rt)[0]
    with open(p, "r+b") as f:           # zero every refcount
        f.seek(rb)
        f.write(bytes(4096))
    g, n, _ = open_node(p, **{"x-check": True})
    res = n.drv.check(0)
    assert res["corruptions"] > 0
    res = n.drv.check(3)
    assert res["corruptions"] == 0 and res["corruptions-fixed"] > 0
    assert "Rebuilding refcount structure" in capsys.readouterr().err
    res = n.drv.check(0)
    assert res["corruptions"] == 0 and res["leaks"] == 0
    assert n.pread(0, 4096) == b"\x11" * 4096
    g.close_all()
