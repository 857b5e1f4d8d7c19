"""Backing-chain lookups the img commands share (block.c, for commit -b and rebase -b).

``find_backing_image`` is bdrv_find_backing_image(): which image below ``top`` a user's
file name means.  QEMU resolves the name relative to each image it walks past (not to
``top``) and compares canonical paths, so ``-b base.qcow2`` names the image the
header of its overlay calls ``base.qcow2``, wherever the command runs.
"""
from __future__ import annotations

import os

from ..graph.graph import abspath_like_qemu


def has_protocol(path: str) -> bool:
    """path_has_protocol(): a ':' before any '/'."""
    return ":" in path.split("/")[0]


def backing_chain_next(node):
    """bdrv_backing_chain_next(): the first non-filter image below ``node``, or None."""
    cow = node.skip_filters().cow_child()
    return cow.node.skip_filters() if cow is not None else None


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        return None


def find_backing_image(top, name: str):
    """bdrv_find_backing_image(): the image below ``top`` that ``name`` refers to."""
    is_protocol = has_protocol(name)
    node = top.skip_filters()
    while (below := backing_chain_next(node)) is not None:
        backing_file = getattr(node.drv, "backing_file", "") or ""
        if not backing_file:
            # backing given by options, not by the header: only its own name matches
            if name == below.filename():
                return below
        elif is_protocol or has_protocol(backing_file):
            if name in (backing_file, abspath_like_qemu(node.filename(), backing_file)):
                return below
        else:
            wanted = _realpath(abspath_like_qemu(node.filename(), name))
            actual = _realpath(abspath_like_qemu(node.filename(), backing_file))
            if wanted is not None and wanted == actual:
                return below
        node = below
    return None
