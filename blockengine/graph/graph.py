"""The block graph: named nodes, devices, and every graph change in one place.

Graph changes (open, attach, detach, replace, insert filter, reopen, delete) happen
here, under ``Graph.lock``.  Each change that affects permissions runs in two phases
like QEMU's bdrv_refresh_perms(): plan the new per-edge permissions for every node
below the change, check them (edge conflicts and, in protocol drivers, other
processes' image locks), then commit.  A failed check leaves the graph unchanged.
"""
from __future__ import annotations

import copy
import errno
import os
import threading

from ..drivers.base import DriverKind
from ..io.request import check_node_length
from ..errors import BlockError, InvalidArgument, PermissionConflict, prefixed
from .child import BdrvChild, ChildRole
from .filename import (infer_file_protocol, is_json_filename, join_options,
                       missing_file, parse_json_filename)
from .node import BlockNode, validate_node_name
from .perms import Perm, perm_names
from . import registry

# options every driver accepts (BlockdevOptionsBase)
BASE_OPTIONS = ("driver", "node-name", "discard", "cache", "read-only", "auto-read-only",
                "force-share", "detect-zeroes", "x-no-io")


class EventSink:
    """Placeholder bus used until a QMP event bus is attached: drops events."""

    def emit(self, name: str, data: dict) -> None:
        pass


class Graph:
    def __init__(self, events=None):
        self.nodes: dict[str, BlockNode] = {}        # by node-name, user and auto names
        self.backends: dict[str, object] = {}        # BlockBackend by id
        self.lock = threading.RLock()
        self.events = events if events is not None else EventSink()
        self.secrets: dict[str, bytes] = {}          # --object secret,...
        self._throttle_groups = None
        # run by close_all() first (the job layer cancels its jobs here)
        self.before_close: list = []

    @property
    def throttle_groups(self):
        """The graph's ThrottleGroups, made on first use (tools never throttle, and
        the module costs their start-up)."""
        if self._throttle_groups is None:
            from ..io.throttle import ThrottleGroups
            with self.lock:
                if self._throttle_groups is None:
                    self._throttle_groups = ThrottleGroups()
        return self._throttle_groups

    # ---- lookup ---------------------------------------------------------------------
    def find_node(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    def lookup_node(self, device: str | None = None, node_name: str | None = None
                    ) -> BlockNode:
        """bdrv_lookup_bs(): a backend's root by device id, or a node by node-name."""
        if device is not None:
            blk = self.backends.get(device)
            if blk is not None:
                if blk.root_node is None:
                    raise BlockError("Device '%s' has no medium" % device)
                return blk.root_node
        if node_name is not None:
            node = self.nodes.get(node_name)
            if node is not None:
                return node
        raise InvalidArgument("Cannot find device='%s' nor node-name='%s'"
                              % (device or "", node_name or ""))

    def user_nodes(self) -> list[BlockNode]:
        return list(self.nodes.values())

    # ---- opening --------------------------------------------------------------------
    def open_node(self, options: dict, *, read_only: bool | None = None,
                  inherit: dict | None = None) -> BlockNode:
        """Open a node (and its inline children) from BlockdevOptions.

        ``inherit`` carries the parent's read-only/force-share/cache settings to
        children opened inline, as QEMU's option inheritance does.
        """
        with self.lock:
            options = dict(options)
            inherit = inherit or {}
            for key in ("read-only", "force-share", "cache", "auto-read-only", "x-no-io"):
                if key in inherit and key not in options:
                    options[key] = inherit[key]
            name = options.get("node-name")
            if name is not None:
                validate_node_name(name)
                if name in self.nodes:
                    raise InvalidArgument("Duplicate nodes with node-name='%s'" % name)
                if name in self.backends:
                    raise InvalidArgument("node-name=%s is conflicting with a device id"
                                          % name)
            drv_name = options.get("driver")
            if drv_name is None:
                raise InvalidArgument("Parameter 'driver' is missing")
            driver_cls = registry.get_driver(drv_name)
            ro = options.get("read-only", False) if read_only is None else read_only
            if options.get("force-share") and not ro:
                raise InvalidArgument("force-share=on can only be used with read-only images")
            node = BlockNode(self, driver_cls, name, options, ro)
            child_inherit = {"read-only": ro, "force-share": options.get("force-share", False),
                             "x-no-io": options.get("x-no-io", False)}
            if "cache" in options:
                child_inherit["cache"] = options["cache"]
            try:
                for key, role in driver_cls.child_roles(options).items():
                    ref = options.get(key)
                    if ref is None or ref == "":
                        continue
                    child = self.resolve_ref(ref, child_inherit)
                    try:
                        self.attach_child(node, child, key, role)
                    except BaseException:
                        self._release(child)    # opened inline just now: not left over
                        raise
                drv_opts = {k: v for k, v in options.items() if k not in BASE_OPTIONS}
                node.drv.open(drv_opts)
                try:
                    check_node_length(node.drv.get_length())
                except BaseException:
                    node.drv.close()
                    raise
                if driver_cls.info.supports_backing:
                    self._open_backing(node, options, child_inherit)
            except BaseException:
                self._drop_children(node)
                raise
            # registered once open, so children come first (QEMU's graph_bdrv_states order)
            self.nodes[node.node_name] = node
            return node

    def _open_backing(self, node: BlockNode, options: dict, inherit: dict) -> None:
        ref = options.get("backing", None)
        if ref == "" or "backing" in options and ref is None:
            return   # "backing": "" / null: no backing file
        if ref is None:
            try:
                ref = node.drv.backing_options()
                if ref is None:
                    return
                backing = self.open_node(ref, read_only=True,
                                         inherit={"force-share": inherit.get("force-share",
                                                                             False)})
            except BlockError as e:
                raise prefixed(e, "Could not open backing file: ") from e
            backing.monitor_owned = False
        else:
            backing = self.resolve_ref(ref, {"read-only": True,
                                             "force-share": inherit.get("force-share")})
        self.attach_child(node, backing, "backing", ChildRole.COW)

    def resolve_ref(self, ref, inherit: dict) -> BlockNode:
        """BlockdevRef: an existing node's name, or options of a new node."""
        if isinstance(ref, str):
            return self.lookup_node(ref, ref)
        node = self.open_node(ref, inherit=inherit)
        node.monitor_owned = False   # lives and dies with its parent
        return node

    def open_image(self, filename: str, fmt: str | None = None, *, read_only: bool = False,
                   force_share: bool = False, options: dict | None = None,
                   backing: bool = True, cache_direct: bool = False,
                   no_flush: bool = False, no_io: bool = False) -> BlockNode:
        """Open a file as qemu-img does: probe the format unless given, file protocol.

        ``filename`` may be a json:{...} name (its options count below ``fmt`` and
        ``options``), or None to open ``options`` alone (--image-opts).
        """
        options = copy.deepcopy(options or {})
        if is_json_filename(filename):
            join_options(options, parse_json_filename(filename))
            filename = None
        driver = options.pop("driver", None)
        fmt = fmt if fmt is not None else driver
        # raw_parse_filename(): the file protocol's "file:" prefix
        path = filename[5:] if filename is not None and filename.startswith("file:") \
            else filename
        file_opts = options.pop("file", None)
        if file_opts is None and path is not None:
            file_opts = {"driver": "file", "filename": path}
        else:
            infer_file_protocol(file_opts)
            if isinstance(file_opts, dict) and "driver" not in file_opts:
                raise missing_file(None)    # the child names neither driver nor file
        if fmt is not None:
            registry.get_driver(fmt)         # "Unknown driver" before anything else
        probed = fmt is None
        inherit = {"read-only": read_only, "force-share": force_share, "x-no-io": no_io}
        if cache_direct or no_flush:
            inherit["cache"] = {"direct": cache_direct, "no-flush": no_flush}
        elif "cache" in options:
            inherit["cache"] = options["cache"]    # --image-opts cache.*: children too
        if not probed and registry.has_driver(fmt) and \
                registry.get_driver(fmt).info.kind is DriverKind.PROTOCOL:
            # a protocol driver as the format (-f file): the image is that node itself
            named = registry.get_driver(fmt).parse_filename(path) if path is not None else {}
            opts = {**named, **options,
                    "driver": fmt, "read-only": read_only, "force-share": force_share}
            if "cache" in inherit:
                opts["cache"] = inherit["cache"]
            return self.open_node(opts, inherit=inherit)
        if file_opts is None:
            raise missing_file(fmt)
        if probed and isinstance(file_opts, str):
            protocol = self.lookup_node(file_opts, file_opts)    # "file": a node's name
            fmt = registry.probe_format(
                protocol.pread(0, min(registry.PROBE_BYTES, protocol.total_size)))
            file_ref = file_opts
        elif probed:
            protocol = self.open_node(dict(file_opts), inherit=inherit)
            try:
                head = protocol.pread(0, min(registry.PROBE_BYTES, protocol.total_size))
                fmt = registry.probe_format(head)
            except BaseException:
                self.delete_node(protocol)
                raise
            protocol.monitor_owned = False
            file_ref = protocol.node_name
        else:
            file_ref = file_opts
        opts = {"driver": fmt, "file": file_ref, **options, "read-only": read_only,
                "force-share": force_share}
        if not backing:
            opts["backing"] = None
        if probed:
            opts["x-probed"] = True
        if "cache" in inherit:
            opts["cache"] = inherit["cache"]
        try:
            node = self.open_node(opts, inherit=inherit)
        except BaseException:
            if probed and not isinstance(file_opts, str) and \
                    protocol.node_name in self.nodes and not protocol.parents:
                protocol.monitor_owned = True      # opened just above: ours to delete
                self.delete_node(protocol)
            raise
        return node

    # ---- edges and permissions ---------------------------------------------------------
    def attach_child(self, parent, node: BlockNode, name: str, role: ChildRole,
                     perm: Perm | None = None, shared: Perm | None = None) -> BdrvChild:
        """Add an edge parent -> node; refused (graph unchanged) on a permission conflict.

        ``parent`` is a BlockNode (its driver computes the edge's permissions) or a
        BlockBackend, which passes ``perm``/``shared`` itself.
        """
        with self.lock:
            child = BdrvChild(name, role, parent, node)
            if perm is not None:
                child.perm, child.shared = perm, shared
            node.parents.insert(0, child)
            if isinstance(parent, BlockNode):
                parent.children.append(child)
            try:
                self.refresh_perms([parent] if isinstance(parent, BlockNode) else [node],
                                   fixed={child: (child.perm, child.shared)}
                                   if perm is not None else None)
            except BaseException:
                node.parents.remove(child)
                if isinstance(parent, BlockNode):
                    parent.children.remove(child)
                raise
            return child

    def detach_child(self, child: BdrvChild) -> None:
        """Remove an edge; the child node is closed when nothing uses it any more."""
        with self.lock:
            if isinstance(child.parent, BlockNode):
                child.parent.children.remove(child)
            node = child.node
            node.parents.remove(child)
            self.refresh_perms([node])
            self._release(node)

    def set_child_perms(self, child: BdrvChild, perm: Perm, shared: Perm) -> None:
        """Change what a backend edge takes/shares (e.g. a device becoming writable)."""
        with self.lock:
            self.refresh_perms([child.node], fixed={child: (perm, shared)})

    def refresh_perms(self, roots: list, fixed: dict | None = None) -> None:
        """Recompute, check and commit permissions of every edge below ``roots``."""
        planned = dict(fixed or {})
        order = self._descendants_topo(roots)
        for node in order:
            perm, shared = node.cumulative_perms(planned)
            for c in node.children:
                p, s = node.drv.child_perm(c, perm, shared)
                if c.node.force_share:
                    s = Perm.all()
                planned[c] = (p, s)
        for node in order:
            self._check_parents(node, planned)
            perm, shared = node.cumulative_perms(planned)
            if perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) and node.read_only:
                raise BlockError("Block node is read-only", errno=errno.EPERM)
            node.drv.check_perm(perm, shared)
        for c, (p, s) in planned.items():
            c.perm, c.shared = p, s
        for node in order:
            node.drv.set_perm(*node.cumulative_perms())

    @staticmethod
    def _descendants_topo(roots: list) -> list[BlockNode]:
        seen, post = set(), []

        def visit(node):
            if id(node) in seen:
                return
            seen.add(id(node))
            for c in node.children:
                visit(c.node)
            post.append(node)

        for r in roots:
            if isinstance(r, BlockNode):
                visit(r)
        return post[::-1]

    @staticmethod
    def _check_parents(node: BlockNode, planned: dict) -> None:
        """bdrv_parent_perms_conflict(): every pair of parent edges must agree."""
        perms = {c: planned.get(c, (c.perm, c.shared)) for c in node.parents}
        for a in node.parents:
            for b in node.parents:
                if a is b:
                    continue
                b_perm, a_shared = perms[b][0], perms[a][1]
                if b_perm & ~a_shared:
                    raise PermissionConflict(
                        "Permission conflict on node '%s': permissions '%s' are both "
                        "required by %s (uses node '%s' as '%s' child) and unshared by "
                        "%s (uses node '%s' as '%s' child)." % (
                            node.node_name, perm_names(b_perm & ~a_shared), b.user_desc(),
                            node.node_name, b.name, a.user_desc(), node.node_name, a.name))

    # ---- graph surgery -----------------------------------------------------------------
    def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """bdrv_replace_node(): every parent of ``old`` (except ``new`` itself) uses ``new``."""
        with self.lock:
            moved = [c for c in old.parents if c.parent is not new]
            for c in moved:
                old.parents.remove(c)
                c.node = new
                new.parents.insert(0, c)
            try:
                self.refresh_perms([new, old] + [c.parent for c in moved
                                                 if isinstance(c.parent, BlockNode)])
            except BaseException:
                for c in moved:
                    new.parents.remove(c)
                    c.node = old
                    old.parents.insert(0, c)
                self.refresh_perms([old])
                raise
            for c in moved:
                if isinstance(c.parent, BlockNode):
                    c.parent.drv.child_replaced(old, new)
            for blk in self.backends.values():
                blk.on_root_replaced()

    def insert_filter(self, filter_node: BlockNode, above: BlockNode) -> None:
        """Put an already opened filter (whose child is ``above``) above ``above``."""
        self.replace_node(above, filter_node)

    def reopen(self, node: BlockNode, read_only: bool) -> None:
        """Switch a node, and the non-backing children it opened, to read-only/read-write.

        Like bdrv_reopen_multiple(): all nodes switch, then permissions are refreshed;
        if anything fails every node goes back to its old mode.
        """
        with self.lock:
            nodes = self._reopen_set(node, read_only)
            done = []
            try:
                for n in nodes:
                    n.read_only = read_only
                    n.drv.reopen(read_only)
                    done.append(n)
                self.refresh_perms([node])
            except BaseException:
                for n in done:
                    n.read_only = not read_only
                    n.drv.reopen(not read_only)
                for n in nodes[len(done):]:
                    n.read_only = not read_only
                self.refresh_perms([node])
                raise

    def _reopen_set(self, node: BlockNode, read_only: bool) -> list[BlockNode]:
        """Nodes to switch, children before parents when becoming writable."""
        out = []

        def visit(n):
            if n.read_only == read_only or n in out:
                return
            if not read_only:
                for c in n.children:
                    if not c.role & ChildRole.COW and not c.node.monitor_owned:
                        visit(c.node)
            out.append(n)
            if read_only:
                for c in n.children:
                    if not c.role & ChildRole.COW and not c.node.monitor_owned:
                        visit(c.node)
        visit(node)
        return out

    def delete_node(self, node: BlockNode) -> None:
        """qmp_blockdev_del(): only unused nodes the monitor owns, checked in QEMU's order."""
        from .backend import BlockBackend
        with self.lock:
            if any(isinstance(c.parent, BlockBackend) for c in node.parents):
                raise BlockError("Node %s is in use" % node.node_name)
            node.check_op_blockers()
            if not node.monitor_owned:
                raise BlockError("Node %s is not owned by the monitor" % node.node_name)
            if node.parents:
                raise BlockError("Block device %s is in use" % node.node_name)
            self.nodes.pop(node.node_name, None)
            self._close(node)

    def _close(self, node: BlockNode) -> None:
        try:
            node.flush()
        finally:
            node.drv.close()
            self._drop_children(node)

    def _release(self, node: BlockNode) -> None:
        """Close a node nobody uses and the monitor does not own."""
        if not node.parents and not node.monitor_owned:
            self.nodes.pop(node.node_name, None)
            self._close(node)

    def _drop_children(self, node: BlockNode) -> None:
        """Detach every child of a closed (or half-open) node, closing orphans."""
        for c in list(node.children):
            node.children.remove(c)
            c.node.parents.remove(c)
            self.refresh_perms([c.node])
            self._release(c.node)

    def close_all(self) -> None:
        """Close every device and node, as QEMU does at exit (jobs are cancelled first)."""
        for hook in list(self.before_close):
            hook()
        with self.lock:
            for blk in list(self.backends.values()):
                blk.delete()
            # top-down: closing a node releases its children, which may then be closed
            while True:
                tops = [n for n in self.nodes.values() if not n.parents]
                if not tops:
                    break
                for node in tops:
                    if self.nodes.get(node.node_name) is node and not node.parents:
                        self.nodes.pop(node.node_name)
                        self._close(node)


def abspath_like_qemu(base_filename: str, relative: str) -> str:
    """path_combine(): resolve a backing file name relative to the image's directory."""
    if relative.startswith("/") or ":" in relative.split("/")[0]:
        return relative
    return os.path.join(os.path.dirname(base_filename), relative)
