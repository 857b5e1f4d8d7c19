"""Image creation (QEMU's qcow2_co_create() / qcow2_co_create_opts()).

The steps are QEMU's, so the file is laid out byte for byte as qemu-img creates it:
header cluster 0 (minimal header), refcount table in cluster 1 pointing to the
refcount block in cluster 2; then the image is opened, clusters 0-2 are allocated,
the full header (extensions) is written, the image is truncated to its size (which
allocates the L1 table at cluster 3, and preallocates if asked) and the backing file
is set.
"""
from __future__ import annotations

from collections import namedtuple

from ....errors import BlockError, InvalidArgument, prefixed
from ...base import PreallocMode
from . import layout as L
from .cache import parse_size
from ...base import bool_option




def _size(v) -> int:
    return parse_size(v) if isinstance(v, str) else int(v)


_ENCRYPT_KEYS = ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg")


def _encryption(opts: dict, secrets: dict | None):
    """qcow2_co_create_opts()'s encrypt handling + the QAPI checks of
    QCryptoBlockCreateOptions: None, or (format, password, LuksBlock.create kwargs,
    iter_time), format "luks" or "qcow" (legacy AES)."""
    enc = {k[len("encrypt."):]: v for k, v in opts.items() if k.startswith("encrypt.")}
    if bool_option(opts.get("encryption"), "encryption"):
        # qdict_rename_keys(): the legacy flag is encrypt.format=qcow under another name
        if "format" in enc:
            raise InvalidArgument("'encrypt.format' and its alias 'encryption' can't be "
                                  "used at the same time")
        enc["format"] = "qcow"
    if not enc:
        return None
    fmt = enc.get("format")
    if fmt is None:
        raise InvalidArgument("Parameter 'encrypt.format' is missing")
    if fmt == "aes":
        fmt = "qcow"
    if fmt not in ("qcow", "luks"):
        raise InvalidArgument("Parameter 'format' does not accept value '%s'" % fmt)
    if fmt == "qcow":       # QCryptoBlockCreateOptionsQCow: key-secret, nothing else
        for key in enc:
            if key not in ("format", "key-secret"):
                raise InvalidArgument("Parameter 'encrypt.%s' is unexpected" % key)
    secret_id = enc.get("key-secret")
    if secret_id is None:
        raise InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher")
    from ..luks.driver import lookup_secret     # the LUKS code only when encrypting
    password = lookup_secret(secrets, secret_id)
    if fmt == "qcow":
        return fmt, password, {}, 0
    kw = {k.replace("-", "_"): str(enc[k]) for k in _ENCRYPT_KEYS if k in enc}
    try:
        iter_time = int(enc.get("iter-time", 2000))
    except ValueError:
        raise InvalidArgument("Parameter 'iter-time' expects a number") from None
    return fmt, password, kw, iter_time


def _set_up_encryption(s, fnode, fmt: str, password: bytes, kw: dict,
                       iter_time: int) -> None:
    """qcow2_set_up_encryption(): for LUKS a header in freshly allocated, zeroed
    clusters (qcow2_crypto_hdr_init_func), the CRYPTO header extension, crypt_method 2;
    the legacy AES format ("qcow") has no header: crypt_method 1 only."""
    if fmt == "qcow":
        s.crypt_method_header = L.QCOW_CRYPT_AES
        s.update_header()
        return
    from ....crypto.luks import LuksBlock
    block = LuksBlock.create(password, iter_time=iter_time, **kw)
    headerlen = block.payload_offset
    cs = s.cluster_size
    clusterlen = -(-headerlen // cs) * cs
    off = s.alloc_clusters(headerlen)
    fnode.pwrite(off, bytes(clusterlen))
    s.crypt_method_header = L.QCOW_CRYPT_LUKS
    s.crypto_header = (off, headerlen)
    block.store_key(lambda o, data: fnode.pwrite(off + o, data), 0, password, iter_time)
    s.update_header()


# qcow2_co_create()'s validated options (``check_create_options``); collections'
# namedtuple, not typing's NamedTuple: importing typing costs `img create` start-up
CreateParams = namedtuple("CreateParams", (
    "version cluster_size refcount_order lazy_refcounts extended_l2 compression_type "
    "prealloc backing_file backing_fmt has_data_file data_file_raw encryption"))


def check_create_options(opts: dict, secrets: dict | None = None) -> CreateParams:
    """Validate create options (QemuOpts names; ``data_file`` only tested for presence)
    with qcow2_co_create()'s checks and messages, before anything is written."""
    opts = {k: v for k, v in (opts or {}).items() if v is not None}
    encryption = _encryption(opts, secrets)
    compat = str(opts.get("compat", "v3"))
    version = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(compat)
    if version is None:
        raise InvalidArgument("Parameter 'version' does not accept value '%s'" % compat)
    cluster_size = _size(opts.get("cluster_size", L.DEFAULT_CLUSTER_SIZE))
    if (cluster_size & (cluster_size - 1) or cluster_size < 512
            or cluster_size > (1 << L.MAX_CLUSTER_BITS)):
        raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
    refcount_bits = int(opts.get("refcount_bits", 16))
    if refcount_bits > 64 or refcount_bits < 1 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise InvalidArgument("Different refcount widths than 16 bits require compatibility "
                              "level 1.1 or above (use version=v3 or greater)")
    refcount_order = refcount_bits.bit_length() - 1
    lazy = bool_option(opts.get("lazy_refcounts"), "lazy_refcounts")
    if version < 3 and lazy:
        raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 "
                              "and above (use version=v3 or greater)")
    extended_l2 = bool_option(opts.get("extended_l2"), "extended_l2")
    if extended_l2:
        if version < 3:
            raise InvalidArgument("Extended L2 entries are only supported with compatibility "
                                  "level 1.1 and above (use version=v3 or greater)")
        if cluster_size < 16384:
            raise InvalidArgument("Extended L2 entries are only supported with cluster sizes "
                                  "of at least 16384 bytes")
    ctype_name = opts.get("compression_type", "zlib")
    ctype = {"zlib": 0, "zstd": 1}.get(ctype_name)
    if ctype is None:
        raise InvalidArgument("Parameter 'compression-type' does not accept value '%s'"
                              % ctype_name)
    if ctype and version < 3:
        raise InvalidArgument("Non-zlib compression type is only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)")
    prealloc_name = opts.get("preallocation", "off")
    try:
        prealloc = PreallocMode(prealloc_name) if not isinstance(prealloc_name, PreallocMode) \
            else prealloc_name
    except ValueError:
        raise InvalidArgument("Parameter 'preallocation' does not accept value '%s'"
                              % prealloc_name) from None
    backing_file = opts.get("backing_file")
    backing_fmt = opts.get("backing_fmt")
    data_file = opts.get("data_file")
    data_file_raw = bool_option(opts.get("data_file_raw"), "data_file_raw")
    if data_file and version < 3:
        raise InvalidArgument("External data files are only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)")
    if backing_fmt and not backing_file:
        raise InvalidArgument("Backing format cannot be used without backing file")
    if backing_file and prealloc is not PreallocMode.OFF and not extended_l2:
        raise InvalidArgument("Backing file and preallocation can only be used at the same "
                              "time if extended_l2 is on")
    if data_file_raw and not data_file:
        raise InvalidArgument("data-file-raw requires data-file")
    if data_file_raw and backing_file:
        raise InvalidArgument("Backing file and data-file-raw cannot be used at the same time")
    if data_file_raw and prealloc is PreallocMode.OFF:
        prealloc = PreallocMode.METADATA
    return CreateParams(version, cluster_size, refcount_order, lazy, extended_l2, ctype,
                        prealloc, backing_file, backing_fmt, bool(data_file), data_file_raw,
                        encryption)


def create(filename: str, size: int, opts: dict, secrets: dict | None = None) -> None:
    """qcow2_co_create_opts(): create the file (and data file), then format them;
    on failure both are deleted again, as QEMU does."""
    from ...protocol.file import FileDriver, delete_file_noerr
    from ....graph.graph import Graph

    params = check_create_options(opts, secrets)
    data_file = opts.get("data_file")
    size = -(-int(size) // 512) * 512
    FileDriver.create(filename, 0, {})
    created_data_file = None
    try:
        if data_file:
            FileDriver.create(data_file, 0, {})
            created_data_file = data_file
        graph = Graph()
        try:
            fnode = graph.open_node({"driver": "file", "filename": filename})
            dnode = None
            if data_file:
                dnode = graph.open_node({"driver": "file", "filename": data_file})
            format_nodes(graph, fnode, dnode, data_file, size, params)
        finally:
            graph.close_all()
    except BaseException:
        delete_file_noerr(filename)
        delete_file_noerr(created_data_file)
        raise


def format_nodes(graph, fnode, dnode, data_file_name: str | None, size: int,
                 params: CreateParams) -> None:
    """qcow2_co_create() once the options are checked: lay a qcow2 image of ``size``
    bytes onto the open node ``fnode`` (and the data file node ``dnode``, recorded in
    the header as ``data_file_name``).  The temporary qcow2 node is closed before
    returning; ``fnode`` and ``dnode`` stay open."""
    (version, cluster_size, refcount_order, lazy, extended_l2, ctype, prealloc,
     backing_file, backing_fmt, _, data_file_raw, encryption) = params
    cluster_bits = cluster_size.bit_length() - 1
    header = L.Header(version=version, cluster_bits=cluster_bits, size=0,
                      refcount_table_offset=cluster_size, refcount_table_clusters=1,
                      refcount_order=refcount_order, compression_type=ctype,
                      header_length=L.HEADER_SIZE)
    if lazy:
        header.compatible_features |= L.QCOW2_COMPAT_LAZY_REFCOUNTS
    if dnode is not None:
        header.incompatible_features |= L.QCOW2_INCOMPAT_DATA_FILE
    if data_file_raw:
        header.autoclear_features |= L.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if ctype:
        header.incompatible_features |= L.QCOW2_INCOMPAT_COMPRESSION
    if extended_l2:
        header.incompatible_features |= L.QCOW2_INCOMPAT_EXTL2
    v = header.version
    header.version = 3          # the create header is always written in full
    first = bytearray(header.pack())
    header.version = v
    first[4:8] = L.BE32.pack(version)
    first += bytes(cluster_size - len(first))
    reftable = bytearray(2 * cluster_size)
    reftable[0:8] = L.BE64.pack(2 * cluster_size)

    fnode.pwrite(0, first)
    fnode.pwrite(cluster_size, reftable)
    opts_q = {"driver": "qcow2", "file": fnode.node_name, "backing": None}
    if dnode is not None:
        opts_q["data-file"] = dnode.node_name
    node = graph.open_node(opts_q)
    node.monitor_owned = False
    try:
        s = node.drv
        off = s.alloc_clusters(3 * cluster_size)
        if off != 0:
            raise InvalidArgument("Could not allocate clusters for qcow2 header and refcount "
                                  "table")
        if dnode is not None:
            s.image_data_file = data_file_name
        s.update_header()
        try:
            # blk_truncate() takes the uint64 QAPI size as an int64_t
            node.truncate(size - (1 << 64) if size >= 1 << 63 else size, prealloc=prealloc)
        except BlockError as e:
            raise prefixed(e, "Could not resize image: ") from e
        if backing_file:
            if len(backing_file) > 1023:
                raise InvalidArgument("Could not assign backing file '%s' with format '%s'"
                                      % (backing_file, backing_fmt or ""))
            s.image_backing_file = s.backing_file = backing_file
            s.image_backing_format = backing_fmt
            s.update_header()
        if encryption is not None:
            _set_up_encryption(s, fnode, *encryption)
        node.flush()
    finally:
        with graph.lock:
            graph.nodes.pop(node.node_name, None)
            graph._close(node)
