"""Queries about nodes: ImageInfo and BlockDeviceInfo as QEMU builds them (block/qapi.c).

Shared by `img info` and the QMP queries, so both describe a node identically.
"""
from __future__ import annotations

from .graph.graph import abspath_like_qemu


def image_info(node, *, backing_chain: bool = False) -> dict:
    """bdrv_query_image_info(): ImageInfo of one node (with backing-image if asked)."""
    drv = node.drv
    info = {
        "filename": node.filename(),
        "format": drv.info.name,
        "virtual-size": node.total_size,
    }
    actual = drv.allocated_file_size()
    if actual is not None and actual >= 0:
        info["actual-size"] = actual
    if getattr(drv, "encrypted", False):
        info["encrypted"] = True
    bdi = drv.get_info()
    if bdi is not None:
        if bdi.get("cluster_size"):
            info["cluster-size"] = bdi["cluster_size"]
        info["dirty-flag"] = bool(bdi.get("is_dirty", False))
    specific = drv.info_specific()
    if specific is not None:
        info["format-specific"] = specific
    backing_file = getattr(drv, "backing_file", "") or ""
    if backing_file:
        info["backing-filename"] = backing_file
        info["full-backing-filename"] = full_backing_filename(node)
        backing_format = getattr(drv, "backing_format", "") or ""
        if backing_format:
            info["backing-filename-format"] = backing_format
    snapshots = drv.snapshots_info() if hasattr(drv, "snapshots_info") else []
    if snapshots:
        info["snapshots"] = snapshots
    if backing_chain and node.backing is not None:
        info["backing-image"] = image_info(node.backing, backing_chain=True)
    return info


def full_backing_filename(node) -> str:
    """bdrv_get_full_backing_filename(): the backing name resolved against the image."""
    if node.backing is not None:
        return node.backing.filename()
    return abspath_like_qemu(node.filename(), node.drv.backing_file)


def backing_file_depth(node) -> int:
    depth, n = 0, node.backing
    while n is not None:
        depth, n = depth + 1, n.backing
    return depth


THROTTLE_FIELDS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


def block_device_info(node, *, flat: bool = False, throttle: dict | None = None) -> dict:
    """bdrv_block_device_info(): BlockDeviceInfo of a node (query-block 'inserted')."""
    info = {
        "file": node.filename(),
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver_name,
        "backing_file_depth": backing_file_depth(node),
        "encrypted": bool(getattr(node.drv, "encrypted", False)),
        "encryption_key_missing": False,
        "detect_zeroes": node.detect_zeroes,
        "cache": {"writeback": True, "direct": node.cache_direct,
                  "no-flush": node.cache_no_flush},
        "write_threshold": node.write_threshold,
        "image": image_info(node, backing_chain=not flat),
    }
    backing_file = getattr(node.drv, "backing_file", "") or ""
    if backing_file:
        info["backing_file"] = backing_file
    for field in THROTTLE_FIELDS:
        info[field] = 0
    if throttle:
        info.update(throttle)
    bitmaps = getattr(node, "dirty_bitmaps", None)
    if bitmaps and hasattr(bitmaps[0], "query"):
        info["dirty-bitmaps"] = [b.query() for b in bitmaps]
    return info
