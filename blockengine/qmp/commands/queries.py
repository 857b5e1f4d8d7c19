"""Query commands: query-block, query-named-block-nodes, query-blockstats."""
from ...info import block_device_info

# fields QEMU 7.2 reports beside the schema's BlockDeviceStats (all zero at node level)
_NODE_ZERO_STATS = (
    "rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations",
    "flush_total_time_ns", "wr_total_time_ns", "rd_total_time_ns", "rd_merged", "wr_merged",
    "failed_rd_operations", "failed_wr_operations", "failed_flush_operations",
    "invalid_rd_operations", "invalid_wr_operations", "invalid_flush_operations",
    "unmap_operations", "unmap_merged", "unmap_bytes", "unmap_total_time_ns",
    "failed_unmap_operations", "invalid_unmap_operations")


def query_named_block_nodes(ctx, args: dict):
    flat = args.get("flat", False)
    # QEMU prepends while walking the graph's nodes: newest first
    return [block_device_info(node, flat=flat) for node in reversed(ctx.graph.nodes.values())]


def block_info(blk) -> dict:
    """BlockInfo of one device."""
    info = {"device": blk.name, "type": blk.dev_type, "removable": blk.removable,
            "locked": blk.locked}
    if blk.removable:
        info["tray_open"] = blk.tray_open
    if blk.root_node is not None:
        info["inserted"] = block_device_info(blk.root_node,
                                             throttle=blk.throttle_info())
    if blk.iostatus_enabled:
        info["io-status"] = blk.io_status
    return info


def query_block(ctx, args: dict):
    return [block_info(blk) for blk in ctx.graph.backends.values()]


def node_stats(node, *, with_backing: bool) -> dict:
    """bdrv_query_bds_stats(): a node's own counters, its file and (optionally) backing."""
    stats = dict.fromkeys(_NODE_ZERO_STATS, 0)
    stats.update({"wr_highest_offset": node.wr_highest_offset, "timed_stats": [],
                  "account_invalid": False, "account_failed": False})
    out = {"node-name": node.node_name, "stats": stats}
    file_node = node.file_child_node()
    if file_node is not None:
        out["parent"] = node_stats(file_node, with_backing=with_backing)
    if with_backing and node.backing is not None:
        out["backing"] = node_stats(node.backing, with_backing=True)
    return out


def query_blockstats(ctx, args: dict):
    if args.get("query-nodes", False):
        return [node_stats(node, with_backing=False) for node in ctx.graph.nodes.values()]
    result = []
    for blk in ctx.graph.backends.values():
        entry = {"device": blk.name, "stats": blk.stats.query()}
        node = blk.root_node
        if node is not None:
            below = node_stats(node, with_backing=True)
            entry["node-name"] = node.node_name
            for key in ("parent", "backing"):
                if key in below:
                    entry[key] = below[key]
        result.append(entry)
    return result


COMMANDS = {
    "query-named-block-nodes": query_named_block_nodes,
    "query-block": query_block,
    "query-blockstats": query_blockstats,
}
