"""The CLI's parsers: GNU getopt emulation, QemuOpts lists, qemu_strtosz sizes."""
import pytest
from hypothesis import given, strategies as st

from blockengine.cli.getopt import NO_ARG, REQUIRED_ARG, GetOpt, LongOpt
from blockengine.cli.opts import (OPT_BOOL, OPT_NUMBER, OPT_SIZE, OptDesc, OptionError,
                                  OptsSet, SizeError, cvtnum, has_help_option,
                                  is_valid_option_list, parse_opts, print_help, strtosz,
                                  unflatten)

LONG = [LongOpt("help", NO_ARG, "h"), LongOpt("format", REQUIRED_ARG, "f"),
        LongOpt("force-share", NO_ARG, "U"), LongOpt("output", REQUIRED_ARG, "output"),
        LongOpt("image-opts", NO_ARG, "image-opts")]


def parse(*argv, optstring=":f:hU"):
    opts, operands = GetOpt(["info", *argv], optstring, LONG).parse()
    return [(o.key, o.arg, o.word) for o in opts], operands


# ---- getopt ---------------------------------------------------------------------------------
def test_options_after_operands_are_permuted():
    assert parse("a.raw", "-f", "raw", "-U") == (
        [("f", "raw", "raw"), ("U", None, "-U")], ["a.raw"])


def test_clustered_short_options_and_attached_argument():
    assert [o[:2] for o in parse("-Ufraw", "x")[0]] == [("U", None), ("f", "raw")]


def test_double_dash_ends_options():
    assert parse("--", "-f", "x") == ([], ["-f", "x"])


def test_single_dash_is_an_operand():
    assert parse("-", "-U") == ([("U", None, "-U")], ["-"])


def test_long_options_abbreviate_unless_ambiguous():
    assert parse("--out=json", "x")[0] == [("output", "json", "--out=json")]
    assert parse("--fo", "raw", "x")[0] == [("?", None, "--fo")]       # format/force-share
    assert parse("--form", "raw", "x")[0] == [("f", "raw", "raw")]


def test_long_option_argument_forms():
    assert parse("--output", "json", "x")[0] == [("output", "json", "json")]
    assert parse("--image-opts=1", "x")[0] == [("?", None, "--image-opts=1")]
    assert parse("--output")[0] == [(":", None, "--output")]


def test_error_words_match_glibc_optind():
    assert parse("-z", "a")[0] == [("?", None, "-z")]
    assert parse("-Uz", "a")[0][1] == ("?", None, "-Uz")
    assert parse("-zU", "a")[0][0] == ("?", None, "info")   # optind not yet advanced
    assert parse("a", "-f")[0] == [(":", None, "-f")]


def test_require_order_stops_at_first_operand():
    p = GetOpt(["qemu-img", "-T", "x", "info", "-f", "raw"], "+:hVT:", [])
    assert [(o.key, o.arg) for o in p.parse()[0]] == [("T", "x")]
    assert p.operands == ["info", "-f", "raw"]


# ---- QemuOpts ---------------------------------------------------------------------------------
def test_parse_opts_escapes_and_flags():
    assert parse_opts("a=b,,c,d=1") == [("a", "b,c"), ("d", "1")]
    assert parse_opts("nocow") == [("cow", "off")]
    assert parse_opts("flag") == [("flag", "on")]
    assert parse_opts("x.raw,driver=raw", implied="file") == [("file", "x.raw"),
                                                              ("driver", "raw")]


def test_option_list_checks():
    assert has_help_option("size=1M,help") and has_help_option("?")
    assert not has_help_option("a=help")
    assert not is_valid_option_list(",,") and not is_valid_option_list(",a")
    assert not is_valid_option_list("a,") and is_valid_option_list("a=b,,")


def test_unflatten():
    assert unflatten([("driver", "raw"), ("file.driver", "file"), ("file.filename", "x")]) \
        == {"driver": "raw", "file": {"driver": "file", "filename": "x"}}


def test_typed_values_and_messages():
    assert OptDesc("n", OPT_BOOL).parse("on") is True
    with pytest.raises(OptionError, match="Parameter 'n' expects 'on' or 'off'"):
        OptDesc("n", OPT_BOOL).parse("x")
    with pytest.raises(OptionError) as e:
        OptDesc("size", OPT_SIZE).parse("1.5")
    assert e.value.hint.startswith("Optional suffix k, M, G")
    assert OptDesc("r", OPT_NUMBER).parse("16") == 16


def test_opts_set_print_line_follows_list_order():
    s = OptsSet([OptDesc("size", OPT_SIZE), OptDesc("nocow", OPT_BOOL),
                 OptDesc("preallocation"), OptDesc("cluster_size", OPT_SIZE, default="65536")])
    s.parse("preallocation=full,nocow=off,size=1k")
    assert s.print_line() == "size=1024 nocow=off preallocation=full cluster_size=65536"
    with pytest.raises(OptionError, match="Invalid parameter 'foo'"):
        s.parse("foo=1")


def test_print_help_sorts_and_pads():
    text = print_help([OptDesc("size", OPT_SIZE, "Virtual disk size"),
                       OptDesc("extent_size_hint", OPT_SIZE, "hint")], "Supported options:")
    assert text == ("Supported options:\n"
                    "  extent_size_hint=<size> - hint\n"
                    "  size=<size>            - Virtual disk size\n")


# ---- sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("1M", 1 << 20), ("1.5M", 3 << 19), ("0x10", 16), ("1b", 1), ("512B", 512),
    ("1.5k", 1536), ("1.0001k", 1024), ("1.k", 1024), ("1.", 1), ("+1M", 1 << 20),
    ("8E", 1 << 63), ("1.5E", 3 << 59), (" 4k", 4096), ("1m", 1 << 20),
])
def test_strtosz_accepts(text, value):
    assert strtosz(text) == value


@pytest.mark.parametrize("text,overflow", [
    ("1e3", False), ("1.5", False), ("-1", False), ("x", False), ("", False),
    ("1Q", False), ("0x1.5k", False), ("16E", True), ("99999E", True),
])
def test_strtosz_rejects(text, overflow):
    with pytest.raises(SizeError) as e:
        strtosz(text)
    assert e.value.overflow is overflow


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_strtosz_plain_integers_roundtrip(n):
    assert strtosz(str(n)) == n


def test_cvtnum_messages():
    with pytest.raises(OptionError, match=r"Invalid image size specified. You may use k, M"):
        cvtnum("image size", "1Q")
    with pytest.raises(OptionError, match=r"Must be between 0 and 9223372036854775807\."):
        cvtnum("image size", "8E")
