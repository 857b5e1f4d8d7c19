"""Everything qemu-img prints on stdout, formatted byte for byte as QEMU 7.2 does.

* ``to_json``: QEMU's JSON writer.  Objects come out in QDict order (QEMU stores
  dicts in 512 hash buckets, newest entry first within a bucket, and iterates the
  buckets in order), so callers must build dicts in QAPI field order, as QEMU's
  visitors insert them; pretty output indents by 4 spaces.
* ``size_to_str``: "10 MiB", "12.5 KiB" (3 significant digits).
* ``image_info_human`` / ``image_check_human`` / map lines / snapshot table.
* ``Progress``: the "    (12.34/100%)\\r" indicator, with QEMU's float arithmetic.
"""
from __future__ import annotations

import math
import struct
import sys
import time

QDICT_BUCKETS = 512


# ---- JSON --------------------------------------------------------------------------------
def tdb_hash(key: str) -> int:
    """QDict's bucket hash (qobject/qdict.c)."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_items(d: dict) -> list:
    """Items of ``d`` in the order QEMU iterates a QDict filled in d's insertion order."""
    indexed = list(enumerate(d.items()))
    indexed.sort(key=lambda e: (tdb_hash(e[1][0]) % QDICT_BUCKETS, -e[0]))
    return [item for _, item in indexed]


def json_quote(s: str) -> str:
    """quoted_str(): escapes and \\uXXXX (upper-case hex) for control and non-ASCII."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 | (cp >> 10), 0xDC00 | (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _scalar(value) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.17g" % value
    return json_quote(str(value))


def to_json(value, pretty: bool = False) -> str:
    """qobject_to_json() / qobject_to_json_pretty() of a dict/list/scalar tree."""
    out: list[str] = []

    def newline(depth: int) -> None:
        if pretty:
            out.append("\n" + " " * (4 * depth))

    def emit(v, depth: int) -> None:
        if isinstance(v, dict):
            out.append("{")
            items = qdict_items(v)
            for i, (k, item) in enumerate(items):
                if i:
                    out.append(",")
                    if not pretty:
                        out.append(" ")
                newline(depth + 1)
                out.append(json_quote(k) + ": ")
                emit(item, depth + 1)
            if pretty:
                newline(depth)
            out.append("}")
        elif isinstance(v, (list, tuple)):
            out.append("[")
            for i, item in enumerate(v):
                if i:
                    out.append(",")
                    if not pretty:
                        out.append(" ")
                newline(depth + 1)
                emit(item, depth + 1)
            if pretty:
                newline(depth)
            out.append("]")
        else:
            out.append(_scalar(v))

    emit(value, 0)
    return "".join(out)


# ---- sizes -------------------------------------------------------------------------------
_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(val: int) -> str:
    """size_to_str(): '0 B', '4 KiB', '12.5 KiB', '1.5 GiB' (switches unit at 1000)."""
    _, exp = math.frexp(val / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10) if exp > 0 else 0
    return "%0.3g %sB" % (val / float(1 << (i * 10)), _SIZE_SUFFIXES[i])


# ---- img info ----------------------------------------------------------------------------
def image_info_human(info: dict) -> str:
    """bdrv_image_info_dump() of one ImageInfo dict (QAPI key names)."""
    dsize = size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    lines = ["image: %s" % info["filename"],
             "file format: %s" % info["format"],
             "virtual size: %s (%d bytes)" % (size_to_str(info["virtual-size"]),
                                              info["virtual-size"]),
             "disk size: %s" % dsize]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append("cluster_size: %d" % info["cluster-size"])
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = "backing file: %s" % info["backing-filename"]
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += " (actual path: %s)" % full
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append("backing file format: %s" % info["backing-filename-format"])
    text = "\n".join(lines) + "\n"
    if "snapshots" in info:
        text += "Snapshot list:\n" + snapshot_header() + "\n"
        for sn in info["snapshots"]:
            text += snapshot_line(sn) + "\n"
    if "format-specific" in info:
        text += "Format specific information:\n"
        text += dump_qobject(info["format-specific"].get("data", {}), 1)
    return text


def dump_qobject(value, indent: int) -> str:
    """dump_qdict()/dump_qlist() of block/qapi.c: 'key: value' lines, dashes as spaces."""
    out = []
    if isinstance(value, dict):
        entries = [(k.replace("-", " "), v) for k, v in qdict_items(value)]
    elif isinstance(value, list):
        entries = [("[%d]" % i, v) for i, v in enumerate(value)]
    else:
        return _human_scalar(value)
    for key, v in entries:
        if isinstance(v, (dict, list)):
            out.append("%s%s:\n" % (" " * (indent * 4), key))
            out.append(dump_qobject(v, indent + 1))
        else:
            out.append("%s%s: %s\n" % (" " * (indent * 4), key, _human_scalar(v)))
    return "".join(out)


def _human_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "%.17g" % v
    return str(v)


def snapshot_header() -> str:
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
                                          "ICOUNT")


def snapshot_line(sn: dict) -> str:
    """bdrv_snapshot_dump() of one SnapshotInfo dict."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.get("date-sec", 0)))
    clock_ns = sn.get("vm-clock-sec", 0) * 1_000_000_000 + sn.get("vm-clock-nsec", 0)
    secs = clock_ns // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                     (clock_ns // 1_000_000) % 1000)
    icount = str(sn["icount"]) if sn.get("icount") is not None else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (sn.get("id", ""), sn.get("name", ""),
                                           size_to_str(sn.get("vm-state-size", 0)),
                                           date, clock, icount)


# ---- img check ---------------------------------------------------------------------------
def image_check_human(check: dict) -> str:
    """dump_human_image_check() of an ImageCheck dict."""
    out = []
    corruptions = check.get("corruptions", 0)
    leaks = check.get("leaks", 0)
    errors = check.get("check-errors", 0)
    if not (corruptions or leaks or errors):
        out.append("No errors were found on the image.\n")
    else:
        if corruptions:
            out.append("\n%d errors were found on the image.\nData may be corrupted, or "
                       "further writes to the image may corrupt it.\n" % corruptions)
        if leaks:
            out.append("\n%d leaked clusters were found on the image.\nThis means waste "
                       "of disk space, but no harm to data.\n" % leaks)
        if errors:
            out.append("\n%d internal errors have occurred during the check.\n" % errors)
    total = check.get("total-clusters", 0)
    allocated = check.get("allocated-clusters", 0)
    if total and allocated:
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
                   "clusters\n" % (allocated, total, allocated * 100.0 / total,
                                   check.get("fragmented-clusters", 0) * 100.0 / allocated,
                                   check.get("compressed-clusters", 0) * 100.0 / allocated))
    if check.get("image-end-offset"):
        out.append("Image end offset: %d\n" % check["image-end-offset"])
    return "".join(out)


# ---- img map -----------------------------------------------------------------------------
MAP_HUMAN_HEADER = "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")


# ---- progress ----------------------------------------------------------------------------
def float32(x: float) -> float:
    """x rounded to a C float: qemu-img's progress arithmetic is in floats."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Progress:
    """util/qemu-progress.c: prints '    (P/100%)\\r' when P moved by more than
    ``min_skip`` points or hit 0 or 100; all arithmetic in C float like QEMU."""

    def __init__(self, enabled: bool, min_skip: float, out=None):
        self.enabled = enabled
        self.min_skip = float32(min_skip)
        self.current = float32(0.0)
        self.last_print = float32(0.0)
        self.out = out or sys.stdout

    def print(self, delta: float, max_: int) -> None:
        """qemu_progress_print(): max 0 sets the value, else adds delta/100*max."""
        if not self.enabled:        # nothing is shown: a huge sparse image calls this
            return                  # per L2 slice, hundreds of thousands of times
        if max_ == 0:
            current = float32(delta)
        else:
            current = float32(self.current + float32(float32(float32(delta) / 100) * max_))
        if current > 100:
            current = float32(100.0)
        self.current = current
        if (current > float32(self.last_print + self.min_skip)
                or current < float32(self.last_print - self.min_skip)
                or current == 0 or current == 100):
            self.last_print = current
            self.out.write("    (%3.2f/100%%)\r" % current)
            self.out.flush()

    def end(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()
