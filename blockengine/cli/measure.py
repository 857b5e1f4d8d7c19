"""`img measure`: the file size a new image would need (qemu-img.c img_measure).

The command builds the target format's create options (format options followed by
the file protocol's, as bdrv_measure receives them), optionally opens a source image,
and asks the target format's measure function, which mirrors that driver's
``bdrv_measure``: ``raw_measure`` (raw-format.c), ``qcow2_measure`` (qcow2.c, with
qcow2_calc_prealloc_size and qcow2_get_persistent_dirty_bitmap_size) and
``block_crypto_measure`` (crypto.c).  Formats without one say so, as in QEMU.

A LUKS header's size depends only on the cipher's key length, so it is computed from
the options without creating a header: QEMU creates one in memory (PBKDF2 benchmark
included) just to learn its length.
"""
from __future__ import annotations

import sys

from ..crypto import cipher as C
from ..crypto import luks as LUKS
from ..drivers.base import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO
from ..drivers.format.luks.driver import lookup_secret
from ..drivers.format.qcow2 import layout as Q
from ..drivers.format.qcow2.bitmap import dir_entry_size
from ..errors import BlockError, InvalidArgument
from . import report
from .bitmap import supports_persistent_bitmaps
from .common import SNAPSHOT_OPT_BASE, Session, load_snapshot, parse_snapshot_param
from .create import create_options
from .imageinfo import StatusCursor
from .img import (FORCE_SHARE, IMAGE_OPTS, OBJECT, OUTPUT, _accumulate_options, _cvtnum,
                  help_exit, output_format)
from .getopt import NO_ARG, REQUIRED_ARG, LongOpt
from .io_commands import GnuGetOpt, getopt_complaint
from .opts import OptionError, OptsSet
from .output import to_json

SECTOR = 512
L2E_SIZE_NORMAL, L2E_SIZE_EXTENDED, L1E_SIZE = 8, 16, 8
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
# QCryptoBlockCreateOptionsLUKS enum members (QAPI checks them before anything else)
LUKS_CIPHER_ALGS = ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128",
                    "serpent-128", "serpent-192", "serpent-256",
                    "twofish-128", "twofish-192", "twofish-256")
LUKS_ENUMS = (("cipher-alg", LUKS_CIPHER_ALGS), ("cipher-mode", C.CIPHER_MODES),
              ("ivgen-alg", C.IVGEN_ALGS), ("ivgen-hash-alg", C.HASH_ALGS),
              ("hash-alg", C.HASH_ALGS))
EIGHT_BYTE_BLOCK_CIPHERS = ("des", "3des", "cast5-128")
LONGOPTS = [LongOpt(*spec) for spec in (
    ("help", NO_ARG, "h"), IMAGE_OPTS, OBJECT, OUTPUT, ("size", REQUIRED_ARG, "size"),
    FORCE_SHARE)]


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


# ---- the command ------------------------------------------------------------------------
def cmd_measure(argv: list[str]) -> int:
    session = Session()
    filename = fmt = options = snapshot_name = sn_opts = None
    out_fmt = "raw"
    ofmt = "human"
    image_opts = force_share = False
    img_size = None
    # img_measure's optstring has no leading ':': glibc complains itself, then help()
    parser = GnuGetOpt(argv, "hf:O:o:l:U", LONGOPTS)
    while (opt := parser.next()) is not None:
        key, arg = opt.key, opt.arg
        if key in ("?", ":"):
            sys.stderr.write(getopt_complaint(argv[0], parser, opt))
            help_exit()
        if key == "h":
            help_exit()
        elif key == "f":
            fmt = arg
        elif key == "O":
            out_fmt = arg
        elif key == "o":
            options = _accumulate_options(options, arg)
        elif key == "l":
            if arg.startswith(SNAPSHOT_OPT_BASE):
                sn_opts = parse_snapshot_param(arg)
            else:
                snapshot_name = arg
        elif key == "U":
            force_share = True
        elif key == "object":
            session.add_object(arg)
        elif key == "image-opts":
            image_opts = True
        elif key == "output":
            ofmt = output_format(arg)
        elif key == "size":
            img_size = _cvtnum("image size", arg)
    operands = parser.operands
    if len(operands) > 1:
        raise report.fail("At most one filename argument is allowed.")
    if operands:
        filename = operands[0]
    if filename is None and (image_opts or fmt or snapshot_name or sn_opts):
        raise report.fail("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and img_size is not None:
        raise report.fail("--size N cannot be used together with a filename.")
    if filename is None and img_size is None:
        raise report.fail("Either --size N or one filename must be specified.")

    source = None
    try:
        if filename is not None:
            source = session.open(filename, fmt, image_opts=image_opts,
                                  force_share=force_share)
            if sn_opts is not None or snapshot_name is not None:
                load_snapshot(source.node, snapshot_name, sn_opts)
        opts = _create_opts(out_fmt, options)
        if img_size is not None:
            opts.set("size", str(img_size))
        measurer = MEASURERS.get(out_fmt)
        if measurer is None:
            raise report.fail("Block driver '%s' does not support size measurement"
                              % out_fmt)
        try:
            info = measurer(opts, source.node if source else None, session.secrets)
        except BlockError as e:
            raise report.fail(str(e), hint=e.hint)
    finally:
        if source is not None:
            source.close()
    if ofmt == "human":
        sys.stdout.write("required size: %d\nfully allocated size: %d\n"
                         % (info["required"], info["fully-allocated"]))
        if "bitmaps" in info:
            sys.stdout.write("bitmaps size: %d\n" % info["bitmaps"])
    else:
        sys.stdout.write(to_json(info, pretty=True) + "\n")
    return 0


def _create_opts(out_fmt: str, options: str | None) -> OptsSet:
    """The target's create options: format options, then the file protocol's."""
    try:
        opts = OptsSet(create_options(out_fmt, ""))
    except BlockError as e:
        raise report.fail(str(e))
    if options:
        try:
            opts.parse(options)
        except OptionError as e:
            report.error(str(e), e.hint)
            raise report.fail("Invalid options for file format '%s'" % out_fmt)
    return opts


# ---- raw ---------------------------------------------------------------------------------
def measure_raw(opts: OptsSet, source, secrets) -> dict:
    """raw_measure(): unallocated sectors count towards a raw file's size."""
    if source is not None:
        required = source.total_size
    else:
        required = round_up(opts.get("size", 0), SECTOR)
    return {"required": required, "fully-allocated": required}


# ---- luks --------------------------------------------------------------------------------
def luks_header_size(values: dict, secrets, prefix: str = "") -> int:
    """qcrypto_block_calculate_payload_offset() for LUKS: the header and the 8 key
    slots' material, with qcrypto_block_luks_create()'s checks in its order.
    ``values`` are the QCryptoBlockCreateOptionsLUKS members (strings)."""
    for name, allowed in LUKS_ENUMS:
        value = values.get(name)
        if value is not None and value not in allowed:
            raise InvalidArgument("Parameter '%s' does not accept value '%s'" % (name, value))
    cipher_alg = values.get("cipher-alg", "aes-256")
    cipher_mode = values.get("cipher-mode", "xts")
    secret_id = values.get("key-secret")
    if secret_id is None:
        raise InvalidArgument("Parameter '%skey-secret' is required for cipher" % prefix)
    lookup_secret(secrets, secret_id)
    try:
        LUKS.cipher_name_for_alg(cipher_alg)
    except InvalidArgument:
        raise InvalidArgument("Algorithm '%s' not supported" % cipher_alg) from None
    if values.get("ivgen-alg") == "essiv":
        C.essiv_cipher(cipher_alg, values.get("ivgen-hash-alg", "sha256"))
    if cipher_mode == "xts" and cipher_alg in EIGHT_BYTE_BLOCK_CIPHERS:
        raise InvalidArgument("Unsupported cipher mode xts")     # XTS needs 16-byte blocks
    key_bytes = C.CIPHER_KEY_LEN[cipher_alg] * (2 if cipher_mode == "xts" else 1)
    slot_sectors = LUKS.splitkey_sectors(key_bytes, LUKS.STRIPES)
    return (LUKS.HEADER_SECTORS + LUKS.NUM_KEY_SLOTS * slot_sectors) * SECTOR


def measure_luks(opts: OptsSet, source, secrets) -> dict:
    """block_crypto_measure(): header plus payload; unallocated blocks are still
    encrypted, so allocation makes no difference."""
    size = source.total_size if source is not None else opts.get("size", 0)
    values = {name: opts.values[name][0] for name in
              ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
               "hash-alg") if name in opts.values}
    total = luks_header_size(values, secrets) + size
    return {"required": total, "fully-allocated": total}


# ---- qcow2 -------------------------------------------------------------------------------
def qcow2_calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                             extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size(): the file size of a fully allocated image."""
    aligned_total_size = round_up(total_size, cluster_size)
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    meta_size = cluster_size                                     # header
    nl2e = round_up(aligned_total_size // cluster_size, cluster_size // l2e_size)
    meta_size += nl2e * l2e_size                                 # L2 tables
    nl1e = round_up(nl2e * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta_size += nl1e * L1E_SIZE                                 # L1 table
    refcounts, _ = Q.refcount_metadata_size((meta_size + aligned_total_size) // cluster_size,
                                            cluster_size, refcount_order, False)
    return meta_size + refcounts + aligned_total_size


def persistent_bitmaps_size(node, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size(): the source's persistent bitmaps stored
    fully allocated with the target's cluster size, tables and directory included."""
    total = directory = 0
    for bm in node.dirty_bitmaps:
        if not bm.persistent:
            continue
        nbytes = -(-(-(-bm.size // bm.granularity)) // 8)     # get_bitmap_bytes_needed()
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size + round_up(clusters * 8, cluster_size)
        directory += dir_entry_size(len(bm.name.encode()))
    return total + round_up(directory, cluster_size)


def _qcow2_version(compat: str | None) -> int:
    """qcow2_opt_get_version_del()."""
    if compat is None or compat == "1.1":
        return 3
    if compat == "0.10":
        return 2
    raise InvalidArgument("Invalid compatibility level: '%s'" % compat)


def _source_data_bytes(node, cluster_size: int) -> int:
    """The data clusters a copy of ``node`` writes, counted as qcow2_measure does
    (zero ranges skipped, data ranges extended to the end of their cluster)."""
    ssize = node.total_size
    cursor = StatusCursor(node)
    required = offset = 0
    while offset < ssize:
        try:
            st = cursor.status(offset, ssize - offset)
        except BlockError as e:
            raise BlockError("Unable to get block status: %s" % e) from e
        pnum = st.length
        if st.flags & BLOCK_ZERO:
            pass
        elif st.flags & (BLOCK_DATA | BLOCK_ALLOCATED) == BLOCK_DATA | BLOCK_ALLOCATED:
            pnum = round_up(offset + pnum, cluster_size) - offset
            required += offset % cluster_size + pnum
        offset += pnum
    return required


def measure_qcow2(opts: OptsSet, source, secrets) -> dict:
    """qcow2_measure(): metadata of the fully allocated image plus the data clusters
    that must be written; ``bitmaps`` when source and target both store bitmaps."""
    extended_l2 = opts.get("extended_l2", False)
    cluster_size = opts.get("cluster_size", Q.DEFAULT_CLUSTER_SIZE)
    if (cluster_size < 512 or cluster_size > 1 << Q.MAX_CLUSTER_BITS
            or cluster_size & (cluster_size - 1)):
        raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise InvalidArgument("Extended L2 entries are only supported with cluster sizes "
                              "of at least 16384 bytes")
    version = _qcow2_version(opts.get("compat"))
    refcount_bits = opts.get("refcount_bits", 16)
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 "
                              "bits")
    if version < 3 and refcount_bits != 16:
        raise InvalidArgument("Different refcount widths than 16 bits require compatibility "
                              "level 1.1 or above (use compat=1.1 or greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise InvalidArgument("invalid parameter value: %s" % prealloc)
    has_backing_file = opts.get("backing_file") is not None
    luks_payload_size = 0
    if opts.get("encrypt.format") == "luks":
        values = {name[len("encrypt."):]: text for name, (text, _) in opts.values.items()
                  if name.startswith("encrypt.") and name != "encrypt.format"}
        luks_payload_size = round_up(luks_header_size(values, secrets, "encrypt."),
                                     cluster_size)

    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    virtual_size = round_up(opts.get("size", 0), cluster_size)
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e_size))
    if l2_tables * L1E_SIZE > Q.QCOW_MAX_L1_SIZE:
        raise InvalidArgument("The image size is too large (try using a larger cluster "
                              "size)")
    required = 0
    if source is not None:
        virtual_size = round_up(source.total_size, cluster_size)
        if has_backing_file:
            # the new backing file may share nothing with the source: count it all
            required = virtual_size
        else:
            required = _source_data_bytes(source, cluster_size)
    if prealloc in ("full", "falloc"):
        required = virtual_size
    fully_allocated = luks_payload_size + qcow2_calc_prealloc_size(
        virtual_size, cluster_size, refcount_bits.bit_length() - 1, extended_l2)
    info = {"required": fully_allocated - virtual_size + required,
            "fully-allocated": fully_allocated}
    if version >= 3 and source is not None and supports_persistent_bitmaps(source):
        info["bitmaps"] = persistent_bitmaps_size(source, cluster_size)
    return info


MEASURERS = {"raw": measure_raw, "qcow2": measure_qcow2, "luks": measure_luks}
