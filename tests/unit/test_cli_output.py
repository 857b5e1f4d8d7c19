"""The CLI's formatters: QEMU's JSON writer, sizes, info/check/map text, progress."""
import io
import itertools
import string

import pytest

from blockengine import _native
from blockengine.cli.output import (Progress, image_check_human, image_info_human,
                                    qdict_items, size_to_str, tdb_hash, to_json)

BACKENDS = [pytest.param(_native.PYTHON, id="python")] + (
    [pytest.param(_native.native_api(), id="native")] if _native.native_api() else [])


# ---- JSON -------------------------------------------------------------------------------------
def test_qdict_order_is_qemus_hash_order():
    info = {"filename": "a", "format": "raw", "dirty-flag": False, "actual-size": 1,
            "virtual-size": 2}
    assert [k for k, _ in qdict_items(info)] == ["virtual-size", "filename", "format",
                                                 "actual-size", "dirty-flag"]
    assert [k for k, _ in qdict_items({"driver": 1, "size": 2, "offset": 3, "file": 4})] \
        == ["offset", "driver", "size", "file"]


def test_same_bucket_newest_first():
    a = "filename"
    bucket = tdb_hash(a) % 512
    words = ("".join(t) for t in itertools.product(string.ascii_lowercase + "-", repeat=4))
    b = next(k for k in words if tdb_hash(k) % 512 == bucket)
    assert [k for k, _ in qdict_items({a: 1, b: 2})] == [b, a]


def test_pretty_json_layout():
    assert to_json({"virtual-size": 1, "filename": "a\"b", "format": "raw"}, pretty=True) == (
        '{\n    "virtual-size": 1,\n    "filename": "a\\"b",\n    "format": "raw"\n}')
    assert to_json([{"filename": "x"}], pretty=True) == (
        '[\n    {\n        "filename": "x"\n    }\n]')
    assert to_json({}, pretty=True) == "{\n}"
    assert to_json({"a": {}}, pretty=True) == '{\n    "a": {\n    }\n}'


def test_compact_json_and_escapes():
    assert to_json({"driver": "null-co", "size": "1M"}) == '{"driver": "null-co", "size": "1M"}'
    assert to_json("\x01é\U0001F600\t") == '"\\u0001\\u00E9\\uD83D\\uDE00\\t"'
    assert to_json([True, None, 1.5]) == "[true, null, 1.5]"


# ---- human text -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,text", [(0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "0.977 KiB"),
                                    (4096, "4 KiB"), (12800, "12.5 KiB"), (10 << 20, "10 MiB"),
                                    (3 << 29, "1.5 GiB"), ((1 << 63) - 1, "8 EiB")])
def test_size_to_str(n, text):
    assert size_to_str(n) == text


def test_image_info_human():
    info = {"filename": "a.qcow2", "format": "qcow2", "dirty-flag": True, "actual-size": 4096,
            "virtual-size": 10 << 20, "cluster-size": 65536, "backing-filename": "b",
            "full-backing-filename": "/d/b", "backing-filename-format": "raw",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                                                          "lazy-refcounts": False,
                                                          "bitmaps": []}}}
    text = image_info_human(info)
    assert text.startswith("image: a.qcow2\nfile format: qcow2\nvirtual size: 10 MiB "
                           "(10485760 bytes)\ndisk size: 4 KiB\ncluster_size: 65536\n"
                           "cleanly shut down: no\nbacking file: b (actual path: /d/b)\n"
                           "backing file format: raw\nFormat specific information:\n")
    assert "    lazy refcounts: false\n" in text and "    compat: 1.1\n" in text


def test_image_check_human():
    assert image_check_human({"check-errors": 0}) == "No errors were found on the image.\n"
    text = image_check_human({"check-errors": 0, "leaks": 2, "total-clusters": 10,
                              "allocated-clusters": 4, "image-end-offset": 65536})
    assert text == ("\n2 leaked clusters were found on the image.\nThis means waste of disk "
                    "space, but no harm to data.\n4/10 = 40.00% allocated, 0.00% fragmented,"
                    " 0.00% compressed clusters\nImage end offset: 65536\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_lines(backend):
    """The native printer and its twin print img_map()'s formats."""
    names = [b"", b"a.raw"]
    entry = _native.MAP_ENTRY.pack(0, 4096, 0, _native.MAP_DATA | _native.MAP_PRESENT
                                   | _native.MAP_HAS_OFFSET, 0, 1, 0)
    human = backend.map_state(True, 0)
    assert backend.map_feed(human, entry, names) == (b"", True)
    assert backend.map_finish(human, names) == (
        b"0               0x1000          0               a.raw\n", True)
    json = backend.map_state(False, 0)
    gap = _native.MAP_ENTRY.pack(4096, 512, 0, _native.MAP_ZERO, 0, 0, 0)
    assert backend.map_feed(json, entry + gap, names) == (
        b'{ "start": 0, "length": 4096, "depth": 0, "present": true, "zero": false, '
        b'"data": true, "offset": 0},\n', True)
    assert backend.map_finish(json, names)[0].endswith(b'"data": false}')
    empty = backend.map_state(False, 7)
    assert backend.map_finish(empty, names) == (
        b'{ "start": 7, "length": 0, "depth": 0, "present": false, "zero": false, '
        b'"data": false}', True)
    compressed = _native.MAP_ENTRY.pack(0, 4096, 0, _native.MAP_DATA | _native.MAP_PRESENT,
                                        0, 0, 0)
    human = backend.map_state(True, 0)
    assert backend.map_feed(human, entry + compressed, names) == (
        b"0               0x1000          0               a.raw\n", True)
    assert backend.map_feed(human, gap, names) == (b"", False)


def test_progress_prints_like_qemu():
    out = io.StringIO()
    p = Progress(True, 1.0, out)
    for v in (0, 100.0 * 8 / 88, 100, 100):
        p.print(v, 0)
    p.end()
    assert out.getvalue() == ("    (0.00/100%)\r    (9.09/100%)\r    (100.00/100%)\r"
                              "    (100.00/100%)\r\n")


def test_progress_relative_steps_and_min_skip():
    out = io.StringIO()
    p = Progress(True, 2.0, out)
    p.print(0, 100)
    p.print(1.5, 100)          # below min_skip: not printed
    p.print(1.0, 100)
    assert out.getvalue() == "    (0.00/100%)\r    (2.50/100%)\r"
