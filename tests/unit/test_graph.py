"""Node graph: names, permissions (QEMU's rules and messages), graph surgery, reopen."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from blockengine import Graph, BlockBackend
from blockengine.errors import BlockError, InvalidArgument, PermissionConflict
from blockengine.graph import registry
from blockengine.graph.backend import NO_SHARE
from blockengine.graph.child import ChildRole
from blockengine.graph.node import id_wellformed, validate_node_name
from blockengine.graph.perms import Perm, perm_names


@pytest.fixture
def graph():
    g = Graph()
    yield g
    g.close_all()


def null(graph, name, size=1 << 20, **kw):
    return graph.open_node({"driver": "null-co", "node-name": name, "size": size,
                            "read-zeroes": True, **kw})


@pytest.mark.parametrize("name", ["a", "disk0", "A.b-c_d", "x" * 31])
def test_valid_node_names(name):
    validate_node_name(name)


@pytest.mark.parametrize("name,message", [
    ("0abc", "Invalid node-name: '0abc'"),
    ("-x", "Invalid node-name: '-x'"),
    ("a b", "Invalid node-name: 'a b'"),
    ("", "Invalid node-name: ''"),
    ("x" * 32, "Node name too long"),
])
def test_invalid_node_names(name, message):
    with pytest.raises(InvalidArgument, match="^" + message.replace(".", r"\.") + "$"):
        validate_node_name(name)


def test_auto_names_and_duplicates(graph):
    n = graph.open_node({"driver": "null-co"})
    assert n.node_name.startswith("#block")
    null(graph, "one")
    with pytest.raises(InvalidArgument, match="Duplicate nodes with node-name='one'"):
        null(graph, "one")


def test_unknown_driver(graph):
    with pytest.raises(InvalidArgument, match="Unknown driver 'nope'"):
        graph.open_node({"driver": "nope"})


def test_perm_names_match_qemu():
    assert perm_names(Perm.WRITE | Perm.RESIZE) == "write, resize"
    assert perm_names(Perm.CONSISTENT_READ | Perm.GRAPH_MOD) == "consistent read, change children"


def test_two_writers_conflict_with_qemu_message(graph):
    node = null(graph, "n0")
    a = BlockBackend(graph, "dev-a", perm=Perm.CONSISTENT_READ | Perm.WRITE, shared=NO_SHARE)
    a.insert(node)
    b = BlockBackend(graph, "dev-b", perm=Perm.CONSISTENT_READ | Perm.WRITE,
                     shared=Perm.all())
    with pytest.raises(PermissionConflict) as e:
        b.insert(node)
    # the new edge comes first in the parent list, as QEMU's QLIST_INSERT_HEAD
    assert str(e.value) == (
        "Permission conflict on node 'n0': permissions 'write' are both required by "
        "block device 'dev-b' (uses node 'n0' as 'root' child) and unshared by "
        "block device 'dev-a' (uses node 'n0' as 'root' child).")
    assert b.root is None and len(node.parents) == 1      # graph unchanged


def test_shared_readers_coexist(graph):
    node = null(graph, "n0")
    for name in ("r1", "r2"):
        BlockBackend(graph, name, perm=Perm.CONSISTENT_READ, shared=Perm.all()).insert(node)
    assert len(node.parents) == 2


def test_format_takes_write_and_resize_on_its_file(graph, tmp_path):
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(65536))
    raw = graph.open_node({"driver": "raw", "node-name": "fmt", "offset": 512,
                           "file": {"driver": "file", "filename": str(path)}})
    edge = raw.child("file")
    assert edge.role == ChildRole.DATA | ChildRole.PRIMARY
    # DATA role with no parents above: nothing needed yet, resize never shared
    assert not edge.shared & Perm.RESIZE
    blk = BlockBackend(graph, "d", perm=Perm.CONSISTENT_READ | Perm.WRITE)
    blk.insert(raw)
    assert edge.perm & Perm.WRITE and edge.perm & Perm.RESIZE


def test_blockdev_del_rules(graph):
    node = null(graph, "n0")
    blk = BlockBackend(graph, "d")
    blk.insert(node)
    with pytest.raises(BlockError, match="Node n0 is in use"):
        graph.delete_node(node)
    blk.delete()
    graph.delete_node(node)
    assert graph.find_node("n0") is None


def test_inline_children_die_with_parent(graph, tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(4096))
    raw = graph.open_node({"driver": "raw", "node-name": "top",
                           "file": {"driver": "file", "node-name": "proto",
                                    "filename": str(path)}})
    proto = graph.find_node("proto")
    with pytest.raises(BlockError, match="Node proto is not owned by the monitor"):
        graph.delete_node(proto)
    graph.delete_node(raw)
    assert graph.find_node("proto") is None


def test_referenced_child_survives_parent(graph, tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(4096))
    proto = graph.open_node({"driver": "file", "node-name": "proto", "filename": str(path)})
    raw = graph.open_node({"driver": "raw", "node-name": "top", "file": "proto"})
    assert raw.file_child_node() is proto
    graph.delete_node(raw)
    assert graph.find_node("proto") is proto and not proto.parents


def test_missing_reference(graph):
    with pytest.raises(InvalidArgument, match="^Cannot find device='nope' nor node-name='nope'$"):
        graph.open_node({"driver": "raw", "file": "nope"})


def test_failed_open_releases_children(graph, tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(4096))
    with pytest.raises(InvalidArgument):
        graph.open_node({"driver": "raw", "size": 8192,
                         "file": {"driver": "file", "node-name": "p", "filename": str(path)}})
    assert graph.find_node("p") is None


def test_replace_node_moves_all_parents(graph):
    old, new = null(graph, "old"), null(graph, "new", size=2 << 20)
    blk = BlockBackend(graph, "d")
    blk.insert(old)
    graph.replace_node(old, new)
    assert blk.root_node is new and not old.parents
    assert blk.getlength() == 2 << 20


class _PassFilter(registry.get_driver("raw")):
    """A test filter: a raw node whose only child is FILTERED."""
    from blockengine.drivers.base import DriverInfo, DriverKind
    info = DriverInfo("test-filter", DriverKind.FILTER)

    @classmethod
    def child_roles(cls, options):
        return {"file": ChildRole.FILTERED | ChildRole.PRIMARY}


def test_insert_filter_above_node(graph, monkeypatch):
    monkeypatch.setitem(registry._DRIVERS, "test-filter", f"{__name__}:_PassFilter")
    base = null(graph, "base")
    blk = BlockBackend(graph, "d", perm=Perm.CONSISTENT_READ | Perm.WRITE)
    blk.insert(base)
    filt = graph.open_node({"driver": "test-filter", "node-name": "f", "file": "base"})
    graph.insert_filter(filt, base)
    assert blk.root_node is filt
    assert [c.parent for c in base.parents] == [filt]
    # the filter passes the device's write permission down
    assert base.parents[0].perm & Perm.WRITE
    blk.pwrite(0, b"x" * 512)


def test_reopen_read_only_and_back(graph, tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(4096))
    node = graph.open_node({"driver": "raw", "node-name": "r",
                            "file": {"driver": "file", "filename": str(path)}})
    graph.reopen(node, True)
    with pytest.raises(BlockError, match="read-only"):
        node.pwrite(0, b"a")
    graph.reopen(node, False)
    node.pwrite(0, b"a")
    assert path.read_bytes()[:1] == b"a"


def test_force_share_needs_read_only(graph):
    with pytest.raises(InvalidArgument,
                       match="force-share=on can only be used with read-only images"):
        graph.open_node({"driver": "null-co", "force-share": True})


def test_replace_node_retargets_parent_drivers(graph, tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"A" * 4096)
    b.write_bytes(b"B" * 4096)
    fa = graph.open_node({"driver": "file", "node-name": "fa", "filename": str(a)})
    fb = graph.open_node({"driver": "file", "node-name": "fb", "filename": str(b)})
    top = graph.open_node({"driver": "raw", "node-name": "top", "file": "fa"})
    assert top.pread(0, 1) == b"A"
    graph.replace_node(fa, fb)
    assert top.file_child_node() is fb and top.pread(0, 1) == b"B"


def test_backing_open_error_keeps_its_class(graph, tmp_path):
    from blockengine.errors import prefixed, LockError
    e = prefixed(LockError('Failed to get "write" lock', "hint"), "Could not open backing file: ")
    assert isinstance(e, LockError) and e.hint == "hint"
    assert str(e) == 'Could not open backing file: Failed to get "write" lock'


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="aZ09_.-é \n\x00Ab", max_size=6))
def test_id_wellformed_is_qemus_pattern(name):
    """QEMU's id_wellformed(): [A-Za-z][A-Za-z0-9_.-]* (ASCII only)."""
    assert id_wellformed(name) == bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]*", name))
