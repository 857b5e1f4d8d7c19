"""blkdebug (block/blkdebug.c): a filter that injects errors and follows a state machine.

Rules come from ``inject-error`` / ``set-state`` options (BlockdevOptionsBlkdebug) or a
``config`` file in QEMU's format::

    [inject-error]
    event = "write_aio"
    errno = "5"
    sector = "2048"
    once = "on"

    [set-state]
    event = "write_aio"
    state = "1"
    new_state = "2"

When an event fires (``debug_event``; reads fire ``read_aio``, writes ``write_aio``,
flushes ``flush_to_os``/``flush_to_disk`` — other drivers may call ``debug_event`` on
their child's driver too), every inject-error rule for it whose state matches becomes
*active* (replacing the previously active ones) and set-state rules move the state.
The next request that covers an active rule's sector (any sector without one) fails
with the rule's errno; ``once`` rules are removed after they fired.  The state starts
at 1; a rule's state 0 means any.
"""
from __future__ import annotations

import errno as _errno
import os
import re
import threading

from ...errors import BlockError, InvalidArgument
from ...graph.child import ChildRole
from ..base import BLOCK_OFFSET_VALID, BLOCK_RAW, DriverInfo, DriverKind, Status
from .common import PassthroughFilter

EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero",
    "pwritev_done", "empty_image_prepare")


class Rule:
    def __init__(self, kind: str, event: str, state: int = 0, *, errno: int = _errno.EIO,
                 sector: int = -1, once: bool = False, immediately: bool = False,
                 new_state: int = 0):
        if event not in EVENTS:
            raise InvalidArgument("Invalid event name \"%s\"" % event)
        self.kind, self.event, self.state = kind, event, state
        self.errno, self.once, self.immediately = errno, once, immediately
        self.offset = -1 if sector < 0 else sector * 512
        self.new_state = new_state

    def matches(self, offset: int, length: int) -> bool:
        return self.offset == -1 or (length and offset <= self.offset < offset + length)


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).lower() in ("on", "yes", "true", "1")


def parse_config(path: str) -> list[Rule]:
    try:
        text = open(path).read()
    except OSError as e:
        raise BlockError("Could not read blkdebug config file: %s" % os.strerror(e.errno),
                         errno=e.errno) from e
    rules, section, fields = [], None, {}

    def flush():
        if section is not None:
            rules.append(_rule_from(section, fields))

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"\[(inject-error|set-state)\]\Z", line)
        if m:
            flush()
            section, fields = m.group(1), {}
            continue
        m = re.match(r'([\w-]+)\s*=\s*"?([^"]*)"?\Z', line)
        if m is None or section is None:
            raise InvalidArgument("Could not parse blkdebug config file")
        fields[m.group(1)] = m.group(2)
    flush()
    return rules


def _rule_from(kind: str, f: dict) -> Rule:
    if "event" not in f:
        raise InvalidArgument("Parameter 'event' is missing")
    if kind == "inject-error":
        return Rule(kind, f["event"], int(f.get("state", 0)),
                    errno=int(f.get("errno", _errno.EIO)), sector=int(f.get("sector", -1)),
                    once=_bool(f.get("once", False)),
                    immediately=_bool(f.get("immediately", False)))
    if "new_state" not in f:
        raise InvalidArgument("Parameter 'new_state' is missing")
    return Rule(kind, f["event"], int(f.get("state", 0)), new_state=int(f["new_state"]))


class BlkdebugDriver(PassthroughFilter):
    info = DriverInfo("blkdebug", DriverKind.FILTER)

    @classmethod
    def child_roles(cls, options: dict) -> dict:
        return {"image": ChildRole.FILTERED | ChildRole.PRIMARY}

    @property
    def child_node(self):
        c = self.node.child("image")
        return c.node if c else None

    def open(self, options: dict) -> None:
        if self.child_node is None:
            raise InvalidArgument("Parameter 'image' is missing")
        self.lock = threading.Lock()
        self.state = 1
        self.rules: list[Rule] = []
        self.active: list[Rule] = []
        if options.get("config"):
            self.rules.extend(parse_config(options["config"]))
        for r in options.get("inject-error", []) or []:
            self.rules.append(Rule("inject-error", r["event"], r.get("state", 0),
                                   errno=r.get("errno", _errno.EIO),
                                   sector=r.get("sector", -1), once=r.get("once", False),
                                   immediately=r.get("immediately", False)))
        for r in options.get("set-state", []) or []:
            self.rules.append(Rule("set-state", r["event"], r.get("state", 0),
                                   new_state=r["new_state"]))
        child_align = self.child_node.request_alignment
        self.align = options.get("align", 0) or 0
        if self.align and (self.align >= 1 << 31 or self.align & (self.align - 1)):
            raise InvalidArgument("Cannot meet constraints with align %d" % self.align)
        align = max(self.align, child_align)
        self.max_xfer = options.get("max-transfer", 0) or 0
        if self.max_xfer and (self.max_xfer < 0 or self.max_xfer % align):
            raise InvalidArgument("Cannot meet constraints with max-transfer %d"
                                  % self.max_xfer)
        for key in ("opt-write-zero", "max-write-zero", "opt-discard", "max-discard"):
            v = options.get(key, 0) or 0
            if v and (v < 0 or v % align):
                raise InvalidArgument("Cannot meet constraints with %s %d" % (key, v))

    # ---- geometry --------------------------------------------------------------------
    def request_alignment(self) -> int:
        return max(self.align or 1, self.child_node.request_alignment)

    def max_transfer(self) -> int:
        return self.max_xfer or super().max_transfer()

    # ---- rules -----------------------------------------------------------------------
    def debug_event(self, event: str) -> None:
        """blkdebug_debug_event(): activate inject rules, move the state."""
        with self.lock:
            new_state = self.state
            injected = False
            for rule in list(self.rules):
                if rule.event != event or rule.state not in (0, self.state):
                    continue
                if rule.kind == "inject-error":
                    if not injected:
                        self.active = []
                        injected = True
                    self.active.insert(0, rule)
                else:
                    new_state = rule.new_state
            self.state = new_state

    def set_state(self, state: int) -> None:
        with self.lock:
            self.state = state

    def _check(self, offset: int, length: int) -> None:
        with self.lock:
            for rule in self.active:
                if rule.matches(offset, length):
                    break
            else:
                return
            if rule.once:
                if rule in self.rules:
                    self.rules.remove(rule)
                self.active.remove(rule)
            err = rule.errno
        raise BlockError(os.strerror(err), errno=err)

    # ---- I/O -------------------------------------------------------------------------
    def preadv(self, offset, buf):
        self.debug_event("read_aio")
        self._check(offset, len(buf))
        self.child_node.preadv(offset, buf)

    def pwritev(self, offset, data, fua=False):
        self.debug_event("write_aio")
        self._check(offset, len(data))
        self.child_node.pwrite(offset, data, fua)

    def pwrite_zeroes(self, offset, length, may_unmap):
        self.debug_event("pwritev_zero")
        self._check(offset, length)
        self.child_node.pwrite_zeroes(offset, length, may_unmap)

    def discard(self, offset, length):
        self._check(offset, length)
        self.child_node.discard(offset, length)

    def flush(self):
        self.debug_event("flush_to_os")
        self._check(0, 0)
        self.debug_event("flush_to_disk")

    def block_status(self, offset, length, want_zero):
        self._check(offset, length)
        return Status(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset, self.child_node)

    def refresh_filename(self):
        return None
