"""The json: pseudo-protocol: a file name that spells out BlockdevOptions.

QEMU accepts ``json:{"driver": "qcow2", "file": {...}}`` wherever a file name goes (a
command-line image, -b, a backing file name in an image header) and turns it into
open options in bdrv_open() itself (parse_json_protocol()).  Options given some other
way (``-f``, a header's backing format) win over the JSON ones, as qdict_join() with
overwrite=false does.
"""
from __future__ import annotations

from ..drivers.base import DriverKind
from ..errors import InvalidArgument
from . import registry

JSON_PREFIX = "json:"


def is_json_filename(filename: str | None) -> bool:
    return filename is not None and filename.startswith(JSON_PREFIX)


def parse_json_filename(filename: str) -> dict:
    """parse_json_filename(): the options a json: name stands for, typed as the
    drivers' QemuOpts read them; QEMU's message for anything but one JSON object."""
    from ..qmp.protocol import JSONParseError, parse_json   # the qobject JSON codec
    try:
        value = parse_json(filename[len(JSON_PREFIX):])
    except JSONParseError as e:
        raise InvalidArgument("Could not parse the JSON options: %s" % e) from None
    if not isinstance(value, dict):
        raise InvalidArgument("Invalid JSON object given")
    return typed_options(qemuopts_strings(value))


# BlockdevOptions members whose QemuOpts strings are not plain strings (QEMU converts
# them with each driver's option list; these cover the drivers blockengine has)
_BOOL_OPTS = {"read-only", "auto-read-only", "force-share", "read-zeroes", "direct",
              "no-flush", "x-probed"}
_SIZE_OPTS = {"size", "offset"}
_INT_OPTS = {"latency-ns"}
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")    # qapi_bool_parse
# read with qdict_get_try_str(): any other JSON type counts as absent
_STRING_ONLY = {"driver", "filename"}


def qemuopts_strings(options: dict, prefix: str = "") -> dict:
    """qdict_flatten() + qemu_opts_absorb_qdict(): the dotted-key strings the drivers
    see of typed JSON options (numbers as text, booleans as on/off; a list's items
    are keys .0, .1 ...; null stays None)."""
    flat: dict = {}
    items = list(options.items() if isinstance(options, dict) else enumerate(options))
    for key, value in items:
        name = "%s%s" % (prefix, key)
        if isinstance(value, str) or value is None:
            flat[name] = value
        elif not isinstance(value, (dict, list)) and str(key) not in _STRING_ONLY:
            flat[name] = ("on" if value else "off") if isinstance(value, bool) \
                else str(value)
    for key, value in items:        # flattened members replace dotted ones
        if isinstance(value, (dict, list)):
            flat.update(qemuopts_strings(value, "%s%s." % (prefix, key)))
    return flat


def typed_options(flat: dict) -> dict:
    """QemuOpts strings (--image-opts, json: values) to the typed, nested options the
    graph opens, with QemuOpts' messages for bad values."""
    from ..cli.opts import SIZE_HINT, SizeError, strtosz      # (qemu_strtosz)
    out = {}
    for key, value in flat.items():
        leaf = key.rsplit(".", 1)[-1]
        try:
            if value is None:
                pass
            elif leaf in _BOOL_OPTS:
                if value not in _TRUE + _FALSE:
                    raise InvalidArgument("Parameter '%s' expects 'on' or 'off'" % leaf)
                value = value in _TRUE
            elif leaf in _SIZE_OPTS:
                value = strtosz(value)
            elif leaf in _INT_OPTS:
                value = int(value)
        except SizeError:
            raise InvalidArgument("Parameter '%s' expects a non-negative number below 2^64"
                                  % leaf, hint=SIZE_HINT) from None
        except ValueError:
            raise InvalidArgument("Parameter '%s' expects a non-negative number below 2^64"
                                  % leaf) from None
        out[key] = value
    options = nest_dotted(out)
    _infer_protocols(options)
    return options


def _infer_protocols(options: dict) -> None:
    """bdrv_fill_options(): a child given only a filename uses the file protocol."""
    for value in options.values():
        if isinstance(value, dict):
            infer_file_protocol(value)
            _infer_protocols(value)


def nest_dotted(options: dict) -> dict:
    """qdict_flatten() then qdict_crumple(): "file.filename" keys become nested
    dicts, so {"file.filename": x} and {"file": {"filename": x}} open alike."""
    out: dict = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = nest_dotted(value)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            if isinstance(value, dict) and isinstance(node.get(leaf), dict):
                join_options(node[leaf], value)
            else:
                node.setdefault(leaf, value)
    return out


def join_options(options: dict, weaker: dict) -> dict:
    """qdict_join(options, weaker, false) on nested options: ``weaker``'s members fill
    in what ``options`` does not say.  Changes and returns ``options``."""
    for key, value in weaker.items():
        mine = options.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            join_options(mine, value)
        elif key not in options:
            options[key] = value
    return options


def infer_file_protocol(file_opts) -> None:
    """bdrv_fill_options(): a child given a filename but no driver is a plain file."""
    if isinstance(file_opts, dict) and "driver" not in file_opts and "filename" in file_opts:
        file_opts["driver"] = "file"


def backing_file_options(filename: str, fmt: str | None) -> dict:
    """bdrv_open_backing_file(): the options that open the backing file an image
    header names (a path, made absolute by the caller, or a json: name) with the
    header's backing format, probed from the file when the header has none."""
    options: dict = {"driver": fmt} if fmt else {}
    if is_json_filename(filename):
        join_options(options, parse_json_filename(filename))
        infer_file_protocol(options.get("file"))
    else:
        options["file"] = {"driver": "file", "filename": filename}
    fmt = options.get("driver")
    if "file" not in options and not (fmt and registry.has_driver(fmt) and
                                      registry.get_driver(fmt).info.kind is DriverKind.PROTOCOL):
        raise missing_file(fmt)
    if fmt is None:
        file_opts = options["file"]
        if not isinstance(file_opts, dict) or file_opts.get("driver") != "file":
            raise missing_file(None)
        options["driver"] = _probe_path(file_opts.get("filename", ""))
    return options


def missing_file(fmt: str | None) -> InvalidArgument:
    """Options naming neither a protocol nor a "file" child (bdrv_open_inherit())."""
    return InvalidArgument('A block device must be specified for "file"' if fmt
                           else "Must specify either driver or file")


def _probe_path(path: str) -> str:
    """find_image_format() on a plain file; an unreadable one is left to the open
    (as raw) to report."""
    try:
        with open(path, "rb") as f:
            return registry.probe_format(f.read(registry.PROBE_BYTES))
    except OSError:
        return "raw"


def json_filename(driver: str, strong_options: dict, file_node) -> str:
    """bdrv_refresh_filename() for a node opened with strong runtime options (those
    that change what the guest sees, e.g. raw's offset): json:{...} of the driver,
    those options and the file child's full options, in QDict order."""
    import json
    from ..qmp.protocol import to_json
    fname = file_node.filename()
    file_opts = json.loads(fname[len(JSON_PREFIX):]) if is_json_filename(fname) \
        else {"driver": file_node.driver_name, "filename": fname}
    return JSON_PREFIX + to_json({"driver": driver, **strong_options, "file": file_opts})
