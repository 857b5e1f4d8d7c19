"""Opening images the way QEMU's tools do (qemu-img.c img_open & friends).

Shared by every tool front end (img, io): ``Session`` holds one invocation's
``--object`` secrets and opens each image in its own graph, as qemu-img opens each
image with its own BlockBackend, with qemu-img's option handling (-f / --image-opts /
-U / cache modes) and its error messages.  Errors are raised as ``report.Exit`` after
being printed, so commands stay linear.
"""
from __future__ import annotations

import errno
import sys

from ..drivers.base import bool_option
from ..errors import BlockError
from ..graph.backend import NO_SHARE
from ..graph.graph import Graph
from ..graph.node import id_wellformed
from ..image import Image
from . import report
from ..graph.filename import typed_options
from .opts import OptionError, parse_opts

# bdrv_parse_cache_mode(): name -> (O_DIRECT, no-flush, writethrough)
CACHE_MODES = {
    "none": (True, False, False), "off": (True, False, False),
    "directsync": (True, False, True),
    "writeback": (False, False, False),
    "unsafe": (False, True, False),
    "writethrough": (False, False, True),
}
DEFAULT_CACHE = "writeback"

SNAPSHOT_OPT_BASE = "snapshot."     # -l snapshot.id=ID,snapshot.name=NAME


def parse_cache(mode: str, source: bool = False) -> tuple[bool, bool]:
    """(cache_direct, no_flush) for a -t/-T argument; Exit(1) with QEMU's message."""
    try:
        direct, no_flush, _ = CACHE_MODES[mode]
    except KeyError:
        raise report.fail("Invalid %scache option: %s" % ("source " if source else "", mode))
    return direct, no_flush


def typed_blockdev_options(flat: dict) -> dict:
    """--image-opts strings to the typed, nested options the graph opens."""
    return typed_options(flat)


class Session:
    """One tool invocation: its user-created objects and the images it opens."""

    def __init__(self, quiet: bool = False):
        self.secrets: dict[str, bytes] = {}
        self.quiet = quiet

    # ---- --object ------------------------------------------------------------------------
    def add_object(self, text: str) -> None:
        """user_creatable_process_cmdline(): only 'secret' objects exist here."""
        pairs = parse_opts(text, implied="qom-type")
        props = dict(pairs)
        qom_type = props.pop("qom-type", None)
        if qom_type == "help":
            sys.stdout.write("List of user creatable objects:\n  secret\n")
            raise report.Exit(0)
        if qom_type != "secret":
            raise report.fail("Parameter 'qom-type' does not accept value '%s'" % qom_type)
        obj_id = props.pop("id", None)
        if obj_id is None:
            raise report.fail("Parameter 'id' is missing")
        if not id_wellformed(obj_id):
            raise report.fail("Parameter 'id' expects an identifier",
                              hint="Identifiers consist of letters, digits, '-', '.', '_',"
                                   " starting with a letter.")
        data, path, fmt = props.pop("data", None), props.pop("file", None), \
            props.pop("format", "raw")
        props.pop("keyid", None), props.pop("iv", None)
        for key in props:
            raise report.fail("Parameter '%s' is unexpected" % key)
        if obj_id in self.secrets:
            raise report.fail("attempt to add duplicate property '%s' to object (type "
                              "'container')" % obj_id)
        if (data is None) == (path is None):
            raise report.fail("Either 'file' or 'data' must be provided" if data is None
                              else "'file' and 'data' are mutually exclusive")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise report.fail("Unable to read %s: Failed to open file \u201c%s\u201d: %s"
                                  % (path, path, e.strerror))
        else:
            raw = data.encode()
        if fmt == "base64":
            import base64       # rare: not worth its start-up cost on every command
            try:
                raw = base64.b64decode(raw, validate=True)
            except ValueError:
                raise report.fail("Unable to decode base64 data") from None
        self.secrets[obj_id] = raw

    # ---- images --------------------------------------------------------------------------
    def open(self, filename: str, fmt: str | None = None, *, image_opts: bool = False,
             writable: bool = False, force_share: bool = False, backing: bool = True,
             cache: str = DEFAULT_CACHE, exclusive: bool = False, source_cache: bool = True,
             no_io: bool = False, check: bool = False,
             options: dict | None = None) -> Image:
        """img_open(): open one image or print QEMU's message and raise Exit(1).

        ``exclusive`` unshares writes (BDRV_O_NO_SHARE, only convert sources use it);
        ``no_io`` takes no permission at all (BDRV_O_NO_IO, as `info` opens);
        ``check`` opens for `check` (BDRV_O_CHECK: the format's ``x-check`` option);
        ``options`` are more format options (e.g. convert's key secrets).
        """
        extra = dict(options or {})
        if check:
            extra["x-check"] = True
        shared = NO_SHARE if exclusive else None
        direct, no_flush = parse_cache(cache, source_cache)
        graph = Graph()
        graph.secrets = self.secrets
        try:
            if image_opts:
                img = self._open_options(graph, filename, fmt, writable, force_share,
                                         shared, no_io, extra)
            else:
                img = Image(filename, fmt, read_only=not writable, force_share=force_share,
                            backing=backing, cache_direct=direct, no_flush=no_flush,
                            graph=graph, shared=shared, no_io=no_io, options=extra)
        except OptionError as e:
            raise report.fail("Could not open '%s': %s" % (filename, e), hint=e.hint)
        except BlockError as e:
            raise report.fail("Could not open '%s': %s" % (filename, e), hint=e.hint)
        if writable and img.node.options.get("x-probed") and img.node.driver_name == "raw":
            self._probed_raw_warning(img)
        return img

    def _open_options(self, graph, text, fmt, writable, force_share, shared, no_io,
                      extra=None):
        if fmt:
            raise report.fail("--image-opts and --format are mutually exclusive")
        flat = dict(parse_opts(text, implied="file"))
        if force_share:
            if flat.get("force-share", "on") != "on":
                raise report.fail("--force-share/-U conflicts with image options")
            flat["force-share"] = "on"
        options = typed_blockdev_options(flat)
        options.update(extra or {})
        # bdrv_open() without a file name: the format is probed unless given
        return Image(None, read_only=not writable,
                     force_share=bool_option(options.get("force-share"), "force-share"),
                     graph=graph, shared=shared, no_io=no_io, options=options)

    @staticmethod
    def _probed_raw_warning(img: Image) -> None:
        """raw_open()'s warning for a writable image whose raw format was guessed."""
        sys.stderr.write(
            "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, "
            "write operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.\n"
            % img.node.file_child_node().filename())
        sys.stderr.flush()


# ---- -l snapshot_param (convert, measure) ----------------------------------------------
def parse_snapshot_param(text: str) -> dict:
    """qemu_opts_parse_noisily(&internal_snapshot_opts, ...) of a -l argument."""
    from .io_commands import parse_qemu_opts        # (warns about short-form flags)
    values = {}
    for name, value in parse_qemu_opts(text).items():
        if name not in ("snapshot.id", "snapshot.name"):
            report.error("Invalid parameter '%s'" % name)
            raise report.fail("Failed in parsing snapshot param '%s'" % text)
        values[name[len(SNAPSHOT_OPT_BASE):]] = value
    return values


def load_snapshot(node, id_or_name: str | None, sn_opts: dict | None) -> None:
    """bdrv_snapshot_load_tmp() (-l snapshot.id=,snapshot.name=) or
    bdrv_snapshot_load_tmp_by_id_or_name() (-l ID_OR_NAME): the source shows the
    snapshot's contents."""
    load = getattr(node.drv, "snapshot_load_tmp", None)
    try:
        if load is None:
            raise BlockError("Block format '%s' used by device '' does not support "
                             "temporarily loading internal snapshots" % node.driver_name)
        if sn_opts is not None:
            if sn_opts.get("id") is None and sn_opts.get("name") is None:
                raise BlockError("snapshot_id and snapshot_name are both NULL")
            load(sn_opts.get("id"), sn_opts.get("name"))
        else:
            try:
                load(id_or_name, None)
            except BlockError as e:
                if e.errno not in (errno.ENOENT, errno.EINVAL):
                    raise
                load(None, id_or_name)
    except BlockError as e:
        raise report.fail("Failed to load snapshot: %s" % e)
