"""blockengine._record: the records of the start-up path behave as the dataclasses they
replace (construction, defaults, fresh factory values, repr, equality, frozen)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from blockengine._record import FrozenInstanceError, factory, record


@record
class Point:
    x: int
    y: int = 0
    tags: list = factory(list)


@dataclasses.dataclass
class PointDC:
    x: int
    y: int = 0
    tags: list = dataclasses.field(default_factory=list)


@record(frozen=True)
class Key:
    name: str
    size: int = 1


@record(eq=False)
class Edge:
    name: str


def test_construction_and_defaults_as_dataclass():
    for cls in (Point, PointDC):
        p = cls(1)
        assert (p.x, p.y, p.tags) == (1, 0, [])
        assert cls(1, 2, ["a"]).tags == ["a"]
        assert cls(x=3, tags=[1]).tags == [1]
        assert cls(1).tags is not cls(1).tags          # a fresh value each time
        with pytest.raises(TypeError):
            cls()
        with pytest.raises(TypeError):
            cls(1, 2, [], 4)
        with pytest.raises(TypeError):
            cls(1, z=2)
    assert "tags" not in Point.__dict__                  # no shared class-level list
    assert repr(Point(1, 2)) == repr(PointDC(1, 2)).replace("PointDC", "Point")


def test_equality_and_hashing():
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(1, 3)
    assert Point(1) != PointDC(1)                         # other classes never equal
    with pytest.raises(TypeError):
        hash(Point(1))                                    # mutable and eq: unhashable
    assert Key("a") == Key("a", 1) and hash(Key("a")) == hash(Key("a", 1))
    assert len({Key("a"), Key("a"), Key("b")}) == 2
    e = Edge("file")
    assert e != Edge("file") and e == e and {e: 1}[e] == 1   # identity


def test_frozen_refuses_changes():
    k = Key("a")
    with pytest.raises(FrozenInstanceError):
        k.size = 2
    with pytest.raises(AttributeError):
        del k.name
    assert k.size == 1


def test_mutable_records_can_change():
    p = Point(1)
    p.y = 5
    p.tags.append("t")
    assert p == Point(1, 5, ["t"])


def test_field_order_is_checked():
    with pytest.raises(TypeError, match="non-default field 'b'"):
        @record
        class Bad:
            a: int = 0
            b: int


def test_own_methods_are_kept():
    @record
    class Named:
        name: str

        def __repr__(self) -> str:
            return "<%s>" % self.name

    assert repr(Named("x")) == "<x>"


def test_img_and_io_start_up_imports_nothing_heavy(tmp_path):
    # the point of _record and of the lazy imports: the start-up path of the img/io
    # commands (their modules, the qcow2 and raw drivers) stays without dataclasses
    # (inspect, ast, dis, tokenize), typing, ctypes, thread pools, throttling, crypto,
    # QMP and jobs, which cost a short command most of its time
    heavy = ("dataclasses", "inspect", "typing", "ctypes", "concurrent.futures", "base64",
             "blockengine.io.throttle", "blockengine.crypto", "blockengine.qmp",
             "blockengine.jobs")
    code = ("import sys; import blockengine.cli.img, blockengine.cli.io, "
            "blockengine.drivers.format.qcow2.driver, blockengine.drivers.format.raw, "
            "blockengine.graph.graph; blockengine.graph.graph.Graph(); "
            "print(sorted(m for m in %r if m in sys.modules))" % (heavy,))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == "[]"
