"""The QAPI schema, argument validation and the QMP core (dispatcher, session, events).

Every error text in VALIDATION_CASES and WIRE_CASES was observed from QEMU 7.2's
qemu-storage-daemon; test_cases_match_qemu_storage_daemon replays them against it.
"""
import json
import math
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockengine.errors import DeviceNotFound
from blockengine.qapi import (QMPError, ValidationError, check_value, schema,
                              validate_command_args, validate_event_data)
from blockengine.qapi import model
from blockengine.qmp import Dispatcher, EventBus, QMPSession, assert_valid_event, command
from tests.tooling import require_tool

REPO = Path(__file__).resolve().parents[2]

# (command, arguments, QEMU 7.2's error text); all GenericError
VALIDATION_CASES = [
    # missing / wrong type / unexpected, top level
    ("block_resize", {}, "Parameter 'size' is missing"),
    ("block_resize", {"node-name": "x"}, "Parameter 'size' is missing"),
    ("block_resize", {"foo": 2}, "Parameter 'size' is missing"),
    ("block_resize", {"node-name": "x", "size": "1"},
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": "x", "size": 1.5},
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": "x", "size": True},
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": "x", "size": 2**64 - 1},
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": "x", "size": -2**63 - 1},
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": 1, "size": 1},
     "Invalid parameter type for 'node-name', expected: string"),
    ("block_resize", {"node-name": None, "size": 1},
     "Invalid parameter type for 'node-name', expected: string"),
    ("block_resize", {"node-name": "x", "size": 1, "foo": 2}, "Parameter 'foo' is unexpected"),
    ("query-block-jobs", {"foo": 2}, "Parameter 'foo' is unexpected"),
    ("job-cancel", {"id": "x", "force": True}, "Parameter 'force' is unexpected"),
    ("job-pause", {}, "Parameter 'id' is missing"),
    ("quit", {"x": 1}, "Parameter 'x' is unexpected"),
    # flat union BlockdevOptions: discriminator, variants, nested objects
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "foo"}, "Parameter 'driver' does not accept value 'foo'"),
    ("blockdev-add", {"driver": 1}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "file"}, "Parameter 'filename' is missing"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "aio": "foo"},
     "Parameter 'aio' does not accept value 'foo'"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "locking": "maybe"},
     "Parameter 'locking' does not accept value 'maybe'"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "cache": {"foo": 1}},
     "Parameter 'cache.foo' is unexpected"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "cache": 1},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "file", "filename": "/x", "cache": []},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "qcow2"}, "Parameter 'file' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": {}}, "Parameter 'file.driver' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": "/x", "zzz": 1}},
     "Parameter 'file.zzz' is unexpected"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": "/x", "aio": "zz"}},
     "Parameter 'aio' does not accept value 'zz'"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": 1}},
     "Invalid parameter type for 'file.filename', expected: string"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "raw", "file": {"driver": "file"}}},
     "Parameter 'file.file.filename' is missing"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "file2": 1}, "Parameter 'file2' is unexpected"),
    ("blockdev-add", {"driver": "raw", "node-name": "q", "file": {"driver": "nbd", "server": {}}},
     "Parameter 'file.server.type' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "nbd", "server": {"type": "inet"}}},
     "Parameter 'file.server.host' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "nbd", "server": {"type": "bogus"}}},
     "Parameter 'type' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "nbd", "server": {"type": "fd"}}},
     "Parameter 'file.server.str' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "nbd", "server": {"type": "unix", "path": "/x", "extra": 1}}},
     "Parameter 'file.server.extra' is unexpected"),
    # alternates: BlockdevRef, BlockdevRefOrNull, Qcow2OverlapChecks, BlockDirtyBitmapOrStr
    ("blockdev-add", {"driver": "qcow2", "file": 1},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": None},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": []},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": "nonode", "backing": 1},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": 1},
     "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": "bad"},
     "Parameter 'overlap-check' does not accept value 'bad'"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"template": "bad"}},
     "Parameter 'template' does not accept value 'bad'"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"foo": 1}},
     "Parameter 'overlap-check.foo' is unexpected"),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [1]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": ["a", {"node": "x"}]},
     "Parameter 'bitmaps[1].name' is missing"),
    ("block-dirty-bitmap-merge",
     {"node": "n", "target": "t", "bitmaps": ["a", {"node": "x", "name": "y", "z": 1}]},
     "Parameter 'bitmaps[1].z' is unexpected"),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": "a"},
     "Invalid parameter type for 'bitmaps', expected: array"),
    # arrays: element names
    ("blockdev-add", {"driver": "quorum", "children": [1], "vote-threshold": 1},
     "Invalid parameter type for 'null', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "quorum", "children": ["a", {"driver": "file"}], "vote-threshold": 1},
     "Parameter 'children[1].filename' is missing"),
    ("blockdev-add", {"driver": "quorum", "children": ["a", {"driver": "file", "filename": 1}],
                      "vote-threshold": 1},
     "Invalid parameter type for 'children[1].filename', expected: string"),
    ("blockdev-add", {"driver": "quorum", "children": ["a", {"driver": "qcow2", "file": {"driver": "file"}}],
                      "vote-threshold": 1},
     "Parameter 'children[1].file.filename' is missing"),
    ("blockdev-add", {"driver": "quorum", "children": {}, "vote-threshold": 1},
     "Invalid parameter type for 'children', expected: array"),
    ("blockdev-add", {"driver": "blkdebug", "image": "a",
                      "inject-error": [{"event": "l1_update"}, {"event": 1}]},
     "Invalid parameter type for 'inject-error[1].event', expected: string"),
    ("blockdev-add", {"driver": "blkdebug", "image": "a",
                      "inject-error": [{"event": "l1_update"}, {"event": "zz"}]},
     "Parameter 'event' does not accept value 'zz'"),
    ("blockdev-add", {"driver": "blkdebug", "image": "a", "inject-error": [{"event": "l1_update"}, {}]},
     "Parameter 'inject-error[1].event' is missing"),
    ("blockdev-add", {"driver": "blkdebug", "image": "a", "inject-error": [1]},
     "Invalid parameter type for 'inject-error[0]', expected: object"),
    ("qmp_capabilities", {"enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    # integer ranges: int32 / uint16 / uint32 / uint64 / size
    ("blockdev-add", {"driver": "blkdebug", "image": "a", "max-transfer": 2**31},
     "Parameter 'max-transfer' expects int32_t"),
    ("blockdev-add", {"driver": "blkdebug", "image": "a", "max-transfer": -2**31 - 1},
     "Parameter 'max-transfer' expects int32_t"),
    ("blockdev-add", {"driver": "blkdebug", "image": "a", "max-transfer": "x"},
     "Invalid parameter type for 'max-transfer', expected: integer"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "blkdebug", "image": "x", "max-transfer": 2**31}},
     "Parameter 'max-transfer' expects int32_t"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "blkdebug", "image": "x", "max-transfer": "a"}},
     "Invalid parameter type for 'file.max-transfer', expected: integer"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "ssh", "path": "x",
                               "server": {"host": "h", "port": "1", "to": 70000}}},
     "Parameter 'to' expects uint16_t"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "ssh", "path": "x",
                               "server": {"host": "h", "port": "1", "to": -1}}},
     "Parameter 'to' expects uint16_t"),
    ("blockdev-add", {"driver": "raw", "node-name": "q",
                      "file": {"driver": "ssh", "path": "x",
                               "server": {"host": "h", "port": "1", "to": "a"}}},
     "Parameter 'file.server.to' expects uint64"),
    ("blockdev-add", {"driver": "raw", "node-name": "q", "file": {"driver": "null-co", "latency-ns": "x"}},
     "Parameter 'file.latency-ns' expects uint64"),
    ("blockdev-add", {"driver": "raw", "node-name": "q", "file": {"driver": "null-co", "latency-ns": 1.5}},
     "Parameter 'file.latency-ns' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": "x"},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": True},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": -1},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 2**32},
     "Parameter 'granularity' expects uint32_t"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 2**64},
     "Parameter 'granularity' expects uint64"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "persistent": 1},
     "Invalid parameter type for 'persistent', expected: boolean"),
    ("block-set-write-threshold", {"node-name": "n", "write-threshold": 1.5},
     "Parameter 'write-threshold' expects uint64"),
    ("block-set-write-threshold", {"node-name": "n", "write-threshold": -2**63 - 1},
     "Parameter 'write-threshold' expects uint64"),
    ("block-set-write-threshold", {"node-name": "n", "write-threshold": 2**64},
     "Parameter 'write-threshold' expects uint64"),
    # QEMU 7.2 members added to the old schema
    ("block-stream", {"device": "x", "auto-finalize": 1},
     "Invalid parameter type for 'auto-finalize', expected: boolean"),
    ("block-commit", {"device": "x", "auto-dismiss": "a"},
     "Invalid parameter type for 'auto-dismiss', expected: boolean"),
    ("blockdev-backup", {"device": "x", "target": "y", "sync": "full", "auto-dismiss": "a"},
     "Invalid parameter type for 'auto-dismiss', expected: boolean"),
    ("blockdev-mirror", {"device": "x", "target": "y", "sync": "full", "auto-dismiss": "a"},
     "Invalid parameter type for 'auto-dismiss', expected: boolean"),
    ("drive-mirror", {"device": "x", "target": "y", "sync": "full", "auto-dismiss": "a"},
     "Invalid parameter type for 'auto-dismiss', expected: boolean"),
    ("drive-backup", {"device": "x", "target": "y", "sync": "full", "auto-dismiss": "a"},
     "Invalid parameter type for 'auto-dismiss', expected: boolean"),
]

# (request, QEMU 7.2's response) after negotiation, with the 'oob' capability enabled
WIRE_CASES = [
    ({"execute": "nosuch"},
     {"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}),
    ({"execute": "nosuch", "arguments": []},
     {"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}),
    ({"execute": "block_resize", "arguments": None, "id": 7},
     {"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"},
      "id": 7}),
    ({"execute": "block_resize", "arguments": "x"},
     {"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}),
    ({"exec": "query-block-jobs"},
     {"error": {"class": "GenericError", "desc": "QMP input member 'exec' is unexpected"}}),
    ({"execute": "query-block-jobs", "control": {}},
     {"error": {"class": "GenericError", "desc": "QMP input member 'control' is unexpected"}}),
    ({"execute": 1},
     {"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}),
    ({"exec-oob": 1},
     {"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}),
    ([], {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    ("x", {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    ({"id": 1},
     {"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 1}),
    ({"execute": "query-block-jobs", "exec-oob": "query-block-jobs", "id": 2},
     {"error": {"class": "GenericError",
                "desc": "QMP input member 'execute' clashes with 'exec-oob'"}, "id": 2}),
    ({"exec-oob": "query-block-jobs", "id": 3},
     {"error": {"class": "GenericError",
                "desc": "The command query-block-jobs does not support OOB"}, "id": 3}),
    ({"exec-oob": "x", "id": 3},
     {"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": 3}),
    ({"execute": "query-block-jobs", "arguments": {}, "id": {"x": [1]}},
     {"return": [], "id": {"x": [1]}}),
    ({"execute": "qmp_capabilities"},
     {"error": {"class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored"}}),
]

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "blockengine"}


def error_of(command_name, arguments):
    with pytest.raises(ValidationError) as info:
        validate_command_args(command_name, arguments)
    return info.value


@pytest.mark.parametrize("command_name, arguments, desc", VALIDATION_CASES)
def test_validation_error_text(command_name, arguments, desc):
    error = error_of(command_name, arguments)
    assert (error.qmp_class, str(error)) == ("GenericError", desc)


@pytest.mark.parametrize("command_name, arguments, desc", VALIDATION_CASES)
def test_dispatcher_reports_validation_errors(command_name, arguments, desc):
    called = []
    dispatcher = Dispatcher()
    if command_name not in dispatcher.command_names():
        dispatcher.register(command_name, called.append)
    response = dispatcher.execute(command_name, arguments)
    assert response == {"error": {"class": "GenericError", "desc": desc}}
    assert called == []


def serving_dispatcher():
    dispatcher = Dispatcher()
    dispatcher.register("query-block-jobs", lambda args: [])
    return dispatcher


@pytest.mark.parametrize("request_, response", WIRE_CASES)
def test_wire_protocol_errors(request_, response):
    session = QMPSession(serving_dispatcher(), VERSION, offered_capabilities=("oob",))
    assert session.handle({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) \
        == {"return": {}}
    assert session.handle(request_) == response


@pytest.mark.interop
def test_cases_match_qemu_storage_daemon():
    from tests.jobs.qsd import QSD
    qsd = QSD(require_tool("qemu-storage-daemon"))
    try:
        for command_name, arguments, desc in VALIDATION_CASES:
            if command_name != "qmp_capabilities":
                assert qsd.raw(command_name, **arguments) \
                    == {"error": {"class": "GenericError", "desc": desc}}, command_name
    finally:
        qsd.close()


@pytest.mark.interop
def test_wire_cases_match_qemu_storage_daemon():
    from tests.jobs.qsd import QSD
    qsd = QSD(require_tool("qemu-storage-daemon"))
    try:
        # QSD negotiated without 'oob'; a second qmp_capabilities is refused either way,
        # so compare the oob-dependent cases only where enabling makes no difference
        for request_, response in WIRE_CASES:
            if "exec-oob" in json.dumps(request_):
                continue
            qsd.file.write(json.dumps(request_).encode() + b"\n")
            qsd.file.flush()
            reply = json.loads(qsd.file.readline())
            while "event" in reply:
                reply = json.loads(qsd.file.readline())
            assert reply == response, request_
    finally:
        qsd.close()


# --- capabilities negotiation ----------------------------------------------------------

def test_session_requires_negotiation_first():
    session = QMPSession(serving_dispatcher(), VERSION)
    assert session.greeting() == {"QMP": {"version": VERSION, "capabilities": []}}
    refusal = {"class": "CommandNotFound",
               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert session.handle({"execute": "query-block-jobs"}) == {"error": refusal}
    assert session.handle({"execute": "nosuch", "id": [1]}) == {"error": refusal, "id": [1]}
    assert session.handle({"execute": "qmp_capabilities", "arguments": {"x": 1}, "id": "a"}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}, "id": "a"}
    assert session.handle({"exec-oob": "query-block-jobs"}) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}
    # QEMU 7.2 offers 'oob'; a session that does not offer it refuses it
    # (monitor/qmp-cmds-control.c qmp_caps_accept())
    assert session.handle({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {
        "error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}
    assert not session.negotiated
    assert session.handle({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1}) \
        == {"return": {}, "id": 1}
    assert session.negotiated
    assert session.handle({"execute": "query-block-jobs"}) == {"return": []}
    assert session.handle({"exec-oob": "query-block-jobs"})["error"]["desc"] \
        == "QMP input member 'exec-oob' is unexpected"


# --- validation: normalized results --------------------------------------------------

def test_blockdev_options_file_child_as_object_or_reference():
    nested = {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "/i"}}
    assert validate_command_args("blockdev-add", nested) == nested
    by_name = {"driver": "qcow2", "node-name": "top", "file": "proto", "backing": None}
    assert validate_command_args("blockdev-add", by_name) == by_name
    raw = {"driver": "raw", "file": {"driver": "null-co", "size": 4096}, "offset": 512}
    assert validate_command_args("blockdev-add", raw) == raw
    assert validate_command_args("blockdev-add", {"driver": "null-co"}) == {"driver": "null-co"}


def test_results_follow_schema_order_and_are_copies():
    arguments = {"file": {"filename": "/x", "driver": "file"}, "driver": "raw"}
    result = validate_command_args("blockdev-add", arguments)
    assert list(result) == ["driver", "file"] and list(result["file"]) == ["driver", "filename"]
    result["file"]["filename"] = "changed"
    assert arguments["file"]["filename"] == "/x"


def test_variant_members_of_other_drivers_are_unexpected():
    assert str(error_of("blockdev-add", {"driver": "null-co", "filename": "/x"})) \
        == "Parameter 'filename' is unexpected"


def test_missing_member_is_reported_before_unexpected_one():
    assert str(error_of("blockdev-add", {"driver": "file", "bogus": 1})) \
        == "Parameter 'filename' is missing"


def test_alternate_branch_chosen_by_json_type():
    assert check_value("Qcow2OverlapChecks", "all") == "all"
    assert check_value("Qcow2OverlapChecks", {"template": "none", "main-header": True}) \
        == {"template": "none", "main-header": True}
    assert check_value("BlockdevRefOrNull", None) is None
    assert check_value("BlockdevRefOrNull", "") == ""
    assert check_value("BlockDirtyBitmapOrStr", {"node": "n", "name": "b"}) == {"node": "n", "name": "b"}
    with pytest.raises(ValidationError, match=r"^Invalid parameter type for 'x', expected: BlockdevRef$"):
        check_value("BlockdevRef", True, "x")


def test_enums():
    assert check_value("BlockdevDriver", "qcow2") == "qcow2"
    with pytest.raises(ValidationError, match="^Parameter 'mode' does not accept value 'rw'$"):
        check_value("NewImageMode", "rw", "mode")
    with pytest.raises(ValidationError, match="^Invalid parameter type for 'mode', expected: string$"):
        check_value("NewImageMode", 3, "mode")


def test_simple_union_is_type_and_data():
    value = {"type": "qcow2", "data": {"compat": "1.1", "refcount-bits": 16}}
    assert check_value("ImageInfoSpecific", value) == value
    with pytest.raises(ValidationError, match="^Parameter 'fs.data' is missing$"):
        check_value("ImageInfoSpecific", {"type": "vmdk"}, "fs")
    with pytest.raises(ValidationError, match="^Parameter 'type' does not accept value 'vdi'$"):
        check_value("ImageInfoSpecific", {"type": "vdi", "data": {}}, "fs")


@pytest.mark.parametrize("type_name, low, high", [
    ("int8", -128, 127), ("int16", -2**15, 2**15 - 1), ("int32", -2**31, 2**31 - 1),
    ("uint8", 0, 255), ("uint16", 0, 2**16 - 1), ("uint32", 0, 2**32 - 1)])
def test_narrow_integer_ranges(type_name, low, high):
    assert check_value(type_name, low, "n") == low
    assert check_value(type_name, high, "n") == high
    for outside in (low - 1, high + 1):
        with pytest.raises(ValidationError, match=f"^Parameter 'n' expects {type_name}_t$"):
            check_value(type_name, outside, "n")


@pytest.mark.parametrize("type_name", ["uint64", "size"])
def test_unsigned_64_bit_takes_negative_values_as_twos_complement(type_name):
    assert check_value(type_name, -1, "n") == 2**64 - 1
    assert check_value(type_name, 2**64 - 1, "n") == 2**64 - 1
    assert check_value(type_name, -2**63, "n") == 2**63


def test_number_and_any():
    assert check_value("number", 3, "n") == 3.0 and isinstance(check_value("number", 3), float)
    assert check_value("number", 10**400) == math.inf
    with pytest.raises(ValidationError, match="^Invalid parameter type for 'n', expected: number$"):
        check_value("number", "3", "n")
    assert check_value("any", {"x": [None]}) == {"x": [None]}


def test_path_names_list_elements_and_members():
    bitmaps = [{"node": "n", "name": "x"}, {"node": "n", "name": "y"}, {"name": "z"}]
    with pytest.raises(ValidationError, match=r"^Parameter 'a\[2\]\.node' is missing$"):
        check_value(["BlockDirtyBitmap"], bitmaps, "a")
    with pytest.raises(ValidationError, match=r"^Parameter 'a\.b\[0\]' expects uint64$"):
        check_value("uint64", "x", ("a", "b", 0))
    with pytest.raises(ValidationError, match=r"^Parameter 'null' expects uint8_t$"):
        check_value("uint8", 256, ("a", "b", 0))


def test_unknown_names_are_key_errors():
    with pytest.raises(KeyError):
        validate_command_args("no-such-command", {})
    with pytest.raises(KeyError):
        check_value("NoSuchType", 1)


# --- schema ----------------------------------------------------------------------------

def test_schema_references_resolve():
    def refs(definition):
        if isinstance(definition, str):
            yield definition
        elif isinstance(definition, list):
            yield from (ref for item in definition for ref in refs(item))
        elif isinstance(definition, dict):
            for key, value in definition.items():
                if key not in ("discriminator", "boxed"):
                    yield from refs(value)
    for table in (schema.STRUCTS, schema.UNIONS, schema.ALTERNATES, schema.COMMANDS, schema.EVENTS):
        for definition in table.values():
            for ref in refs(definition):
                model.resolve(ref)


def test_modern_commands_and_members_are_present():
    for name in ("qmp_capabilities", "query-version", "query-commands", "quit", "query-jobs",
                 "job-pause", "job-resume", "job-cancel", "job-complete", "job-dismiss",
                 "job-finalize", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
                 "block-dirty-bitmap-merge"):
        assert name in schema.COMMANDS, name
    assert {"persistent", "disabled"} <= {m.name for m in model.command_arguments(
        "block-dirty-bitmap-add").members}
    for name in ("block-stream", "block-commit", "drive-mirror", "blockdev-mirror",
                 "drive-backup", "blockdev-backup"):
        members = {m.name: m for m in model.command_arguments(name).members}
        assert members["auto-finalize"].optional and members["auto-dismiss"].optional, name


def test_generated_schema_is_up_to_date():
    gen_qapi = load_generator()
    if not gen_qapi.DEFAULT_SCHEMA.exists():
        pytest.skip("block-core.qapi not found")
    assert gen_qapi.generate(gen_qapi.DEFAULT_SCHEMA) \
        == (REPO / "blockengine" / "qapi" / "schema.py").read_text(), \
        "run python3 tools/gen_qapi.py"


def load_generator():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_qapi", REPO / "tools" / "gen_qapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_parsing_details():
    gen_qapi = load_generator()
    text = """# comment { not ' a string
    { 'enum': 'E', 'data': [ 'a', { 'name': 'b', 'if': 'X' } ] } # trailing
    { 'struct': 'S', 'data': { 'x#y': 'str', '*z': { 'type': ['E'], 'if': 'Y' } } }
    { 'command': 'c', 'data': 'S', 'boxed': true, 'if': 'Z' }
    { 'include': 'other.json' }"""
    tables = gen_qapi.normalize(gen_qapi.parse_schema(text))
    assert tables["ENUMS"] == {"E": ["a", "b"]}
    assert tables["STRUCTS"] == {"S": {"data": {"x#y": "str", "*z": ["E"]}}}
    assert tables["COMMANDS"] == {"c": {"data": "S", "boxed": True}}
    with pytest.raises(gen_qapi.SchemaSyntaxError):
        gen_qapi.split_expressions("{ 'a': 1 } x")


# --- hypothesis: validation raises only ValidationError ----------------------------------

SCHEMA_WORDS = sorted({"driver", "file", "filename", "node-name", "backing", "children",
                       "server", "type", "size", "data", "image", "cache", "direct",
                       "vote-threshold", "inject-error", "event", "overlap-check",
                       "bitmaps", "node", "name", "target", "enable", "to", "host", "port",
                       *schema.ENUMS["BlockdevDriver"]})
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats() | st.sampled_from(SCHEMA_WORDS) | st.text(max_size=5))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(SCHEMA_WORDS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=25)
TYPE_NAMES = sorted([*schema.ENUMS, *schema.STRUCTS, *schema.UNIONS, *schema.ALTERNATES,
                     *model.INTEGER_RANGES, "str", "bool", "number", "null", "any"])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(schema.COMMANDS)), st.dictionaries(
    st.sampled_from(SCHEMA_WORDS), json_values, max_size=6))
def test_command_validation_only_raises_validation_error(command_name, arguments):
    try:
        result = validate_command_args(command_name, arguments)
    except ValidationError as exc:
        assert exc.qmp_class == "GenericError" and str(exc)
    else:
        assert isinstance(result, dict) and set(result) <= set(arguments)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TYPE_NAMES), json_values)
def test_check_value_only_raises_validation_error(type_name, value):
    try:
        check_value(type_name, value, "v")
    except ValidationError:
        pass


def values_of(type_ref, depth=3):
    """A strategy for valid values of a QAPI type (optional members left out at depth 0)."""
    qapi_type = model.resolve(type_ref)
    if isinstance(qapi_type, model.Builtin):
        if qapi_type.name in model.INTEGER_RANGES:
            low, high = model.INTEGER_RANGES[qapi_type.name]
            return st.integers(min_value=max(low, 0), max_value=high)
        return {"str": st.text(max_size=4), "bool": st.booleans(), "null": st.none(),
                "number": st.floats(allow_nan=False), "any": json_values}[qapi_type.name]
    if isinstance(qapi_type, model.Enum):
        return st.sampled_from(qapi_type.values)
    if isinstance(qapi_type, model.Array):
        return st.lists(values_of(qapi_type.element, depth - 1), max_size=2 if depth > 0 else 0)
    if isinstance(qapi_type, model.Alternate):
        branches = [b for b in qapi_type.branches
                    if depth > 0 or model.json_type(model.resolve(b)) != model.OBJECT]
        return st.one_of([values_of(b, depth) for b in branches])
    return objects_of(qapi_type, depth)


def objects_of(obj, depth):
    def members_of(obj):
        required = {m.name: values_of(m.type, depth - 1) for m in obj.members if not m.optional}
        optional = {m.name: values_of(m.type, depth - 1) for m in obj.members
                    if m.optional and depth > 0}
        return st.fixed_dictionaries(required, optional=optional)

    base = members_of(obj)
    if obj.discriminator is None:
        return base

    def add_variant(value):
        variant = obj.variants.get(value[obj.discriminator])
        if variant is None:
            return st.just(value)
        return members_of(model.resolve(variant)).map(lambda extra: {**value, **extra})
    return base.flatmap(add_variant)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted([*schema.STRUCTS, *schema.UNIONS, *schema.ALTERNATES])).flatmap(
    lambda name: st.tuples(st.just(name), values_of(name))))
def test_valid_values_validate_unchanged(name_and_value):
    type_name, value = name_and_value
    assert check_value(type_name, value) == value


# --- dispatcher --------------------------------------------------------------------------

class NotAQMPError(Exception):
    qmp_class = "DeviceNotActive"


@pytest.mark.parametrize("exception, error", [
    (DeviceNotFound("Device 'x' not found"), {"class": "DeviceNotFound", "desc": "Device 'x' not found"}),
    (QMPError("nope", "CommandNotFound"), {"class": "CommandNotFound", "desc": "nope"}),
    (NotAQMPError("inactive"), {"class": "DeviceNotActive", "desc": "inactive"}),
    (ValueError("boom"), {"class": "GenericError", "desc": "boom"}),
    (KeyError("k"), {"class": "GenericError", "desc": "'k'"}),
    (AssertionError(), {"class": "GenericError", "desc": "AssertionError"}),
])
def test_dispatcher_translates_exceptions(exception, error):
    def handler(args):
        raise exception
    dispatcher = Dispatcher()
    dispatcher.register("job-pause", handler)
    assert dispatcher.execute("job-pause", {"id": "j"}) == {"error": error}


def test_dispatcher_passes_validated_arguments_and_wraps_results():
    dispatcher = Dispatcher()
    seen = []
    dispatcher.register("block_resize", lambda args: seen.append(args))
    dispatcher.register("query-jobs", lambda args: [{"id": "j"}])
    assert dispatcher.execute("block_resize", {"size": 1, "node-name": "n"}) == {"return": {}}
    assert seen == [{"node-name": "n", "size": 1}]
    assert dispatcher.execute("query-jobs") == {"return": [{"id": "j"}]}


def test_commands_outside_the_schema_are_not_validated():
    dispatcher = Dispatcher()
    dispatcher.register("x-private", lambda args: args)
    assert dispatcher.execute("x-private", {"anything": [1]}) == {"return": {"anything": [1]}}
    assert dispatcher.execute("x-private") == {"return": {}}


def test_unknown_command_and_bad_arguments():
    dispatcher = Dispatcher()
    assert dispatcher.execute("nosuch") == {
        "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}
    assert dispatcher.execute("query-commands", [1]) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}


def test_register_group_and_query_commands():
    class Jobs:
        def __init__(self):
            self.paused = []

        @command("job-pause")
        def pause(self, args):
            self.paused.append(args["id"])

        @command("x-static", allow_oob=True)
        @staticmethod
        def static(args):
            return "static"

        @property
        def broken(self):
            raise RuntimeError("properties are not evaluated")

    jobs, dispatcher = Jobs(), Dispatcher()
    assert sorted(dispatcher.register_group(jobs)) == ["job-pause", "x-static"]
    assert dispatcher.execute("job-pause", {"id": "j1"}) == {"return": {}}
    assert jobs.paused == ["j1"]
    assert dispatcher.dispatch({"exec-oob": "x-static"}, allow_oob=True) == {"return": "static"}
    names = [entry["name"] for entry in dispatcher.execute("query-commands")["return"]]
    assert sorted(names) == ["job-pause", "qmp_capabilities", "query-commands", "x-static"]
    with pytest.raises(ValueError):
        dispatcher.register("job-pause", print)


# --- events ------------------------------------------------------------------------------

def test_event_message_and_timestamp():
    bus = EventBus(clock_ns=lambda: 1_700_000_123_456_789_012, validate=True)
    with bus.collect() as events:
        message = bus.emit("JOB_STATUS_CHANGE", {"id": "j", "status": "running"})
    assert events == [message] == [{
        "event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"},
        "timestamp": {"seconds": 1_700_000_123, "microseconds": 456_789}}]


def test_real_clock_timestamps_are_current():
    import time
    before = time.time()
    stamp = EventBus().emit("X")["timestamp"]
    assert before - 1 <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= time.time() + 1
    assert 0 <= stamp["microseconds"] < 1_000_000


def test_collect_filters_and_unsubscribes():
    bus = EventBus()
    with bus.collect("BLOCK_JOB_READY") as ready:
        bus.emit("JOB_STATUS_CHANGE", {"id": "j", "status": "ready"})
        bus.emit("BLOCK_JOB_READY", {"type": "mirror", "device": "j", "len": 1, "offset": 1,
                                     "speed": 0})
    bus.emit("BLOCK_JOB_READY", {})
    assert [e["event"] for e in ready] == ["BLOCK_JOB_READY"]


def test_event_validation():
    bus = EventBus(validate=True)
    with pytest.raises(AssertionError, match="Parameter 'status' is missing"):
        bus.emit("JOB_STATUS_CHANGE", {"id": "j"})
    with pytest.raises(AssertionError, match="not in the schema"):
        bus.emit("NO_SUCH_EVENT", {})
    assert validate_event_data("BLOCK_WRITE_THRESHOLD", {
        "node-name": "n", "amount-exceeded": 1, "write-threshold": 2}) is not None
    assert_valid_event({"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "j"},
                        "timestamp": {"seconds": 1, "microseconds": 2}})


def test_failing_subscriber_does_not_stop_delivery():
    bus = EventBus()
    bus.subscribe(lambda message: 1 / 0)
    with bus.collect() as events:
        bus.emit("X")
    assert len(events) == 1


def test_concurrent_emit_and_subscribe():
    bus = EventBus()
    received = []
    lock = threading.Lock()

    def subscriber(message):
        with lock:
            received.append(message["data"]["n"])

    token = bus.subscribe(subscriber)

    def churn():
        for _ in range(200):
            bus.unsubscribe(bus.subscribe(lambda message: None))

    def emitter(base):
        for n in range(base, base + 250):
            bus.emit("E", {"n": n})

    threads = [threading.Thread(target=churn)] + [
        threading.Thread(target=emitter, args=(i * 1000,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bus.unsubscribe(token)
    bus.emit("E", {"n": -1})
    assert sorted(received) == sorted(n for i in range(4) for n in range(i * 1000, i * 1000 + 250))
