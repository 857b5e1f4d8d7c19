"""The `luks` format (QEMU 7.2's block/crypto.c): a LUKS1 volume in the file child.

The header and key material occupy the file up to the payload offset; the guest
sees the payload, encrypted per 512-byte sector (sector 0 = first payload sector).
Opened for metadata only (qemu-img info: BDRV_O_NO_IO) no key is needed, as in QEMU;
otherwise ``key-secret`` names the secret (graph.secrets) holding the passphrase.
Reads decrypt in place after reading the ciphertext; writes encrypt into a bounce
buffer of at most 1 MiB (QEMU's BLOCK_CRYPTO_MAX_IO_SIZE).
"""
from __future__ import annotations

import errno
from typing import NamedTuple

from ....crypto.cipher import SECTOR_SIZE
from ....crypto.luks import DEFAULT_ITER_TIME, KEYSLOT_STATES, AmendOptions, LuksBlock
from ....errors import BlockError, InvalidArgument
from ....io.request import INT64_MAX
from .options import AMEND_OPTS
from ...base import CreateOpt
from ...base import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BlockDriver, DriverInfo,
                     DriverKind, PreallocMode, Status)

MAX_IO_SIZE = 1 << 20


# block_crypto_create_opts_luks, in QEMU 7.2's order
CREATE_OPTS = (
    CreateOpt("size", "size", "Virtual disk size"),
    CreateOpt("key-secret", "str", "ID of the secret that provides the keyslot passphrase"),
    CreateOpt("cipher-alg", "str", "Name of encryption cipher algorithm"),
    CreateOpt("cipher-mode", "str", "Name of encryption cipher mode"),
    CreateOpt("ivgen-alg", "str", "Name of IV generator algorithm"),
    CreateOpt("ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    CreateOpt("hash-alg", "str", "Name of encryption hash algorithm"),
    CreateOpt("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
)

def lookup_secret(secrets: dict | None, secret_id: str) -> bytes:
    """qcrypto_secret_lookup_as_utf8()."""
    if not secrets or secret_id not in secrets:
        raise InvalidArgument("No secret with id '%s'" % secret_id)
    data = secrets[secret_id]
    try:
        data.decode("utf-8")
        if b"\0" in data:          # g_utf8_validate() with a length refuses a NUL
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), 1, "NUL")
    except UnicodeDecodeError:
        raise InvalidArgument("Data from secret %s is not valid UTF-8" % secret_id) from None
    return data


def amend_opts_init(opts: dict) -> AmendOptions:
    """block_crypto_amend_opts_init(): option strings through QEMU's keyval input
    visitor, members in QAPI order, with its messages.  Integers are C's strtoll with
    base 0; the key slot ends up in a C int (keyslot=2^32 is slot 0)."""
    from ....cli.opts import parse_c_int       # the tree's one C integer syntax

    def integer(name: str) -> int | None:
        text = opts.get(name)
        if text is None:
            return None
        value = parse_c_int(text)
        if value is None or not -(1 << 63) <= value < 1 << 63:
            raise InvalidArgument("Parameter '%s' expects integer" % name)
        return value

    state = opts.get("state")
    if state is None:
        raise InvalidArgument("Parameter 'state' is missing")
    if state not in KEYSLOT_STATES:
        raise InvalidArgument("Parameter 'state' does not accept value '%s'" % state)
    keyslot = integer("keyslot")
    if keyslot is not None:
        keyslot = (keyslot + (1 << 31)) % (1 << 32) - (1 << 31)
    iter_time = integer("iter-time")
    if iter_time is not None:
        iter_time %= 1 << 64                     # uint64_t in QEMU
    return AmendOptions(state, opts.get("new-secret"), opts.get("old-secret"), keyslot,
                        iter_time, opts.get("secret"))


def amend_keyslots(block: LuksBlock, read, write, opts: dict, force: bool,
                   secrets: dict | None, unlock_secret: str | None) -> None:
    """block_crypto_amend_opts_init() + qcrypto_block_amend_options() on an unlocked
    volume; qcow2 shares it for its ``encrypt.`` options (given here without prefix)."""
    block.amend(read, write, amend_opts_init(opts), force,
                lambda secret_id: lookup_secret(secrets, secret_id), unlock_secret)


class LuksDriver(BlockDriver):
    info = DriverInfo("luks", DriverKind.FORMAT, create_opts=CREATE_OPTS)
    amend_opts = AMEND_OPTS
    encrypted = True

    def open(self, options: dict) -> None:
        self.file = self.node.file_child_node()
        if self.file is None:
            raise InvalidArgument("Parameter 'file' is missing")
        password = None
        if not self.node.no_io:
            secret_id = options.get("key-secret")
            if secret_id is None:
                raise InvalidArgument("Parameter 'key-secret' is required for cipher")
            password = lookup_secret(getattr(self.node.graph, "secrets", None), secret_id)
        self.block = LuksBlock.load(self._read, password)
        self.payload_offset = self.block.payload_offset

    # header I/O through the file child (zeroes past its end, as QEMU reads)
    def _read(self, offset: int, length: int) -> bytes:
        size = self.file.total_size
        n = max(0, min(length, size - offset))
        data = self.file.pread(offset, n) if n else b""
        return data + bytes(length - n)

    def _write(self, offset: int, data: bytes) -> None:
        self.file.pwrite(offset, data)

    # ---- geometry --------------------------------------------------------------------
    def get_length(self) -> int:
        return max(0, self.file.total_size - self.payload_offset)

    def request_alignment(self) -> int:
        return SECTOR_SIZE

    def max_transfer(self) -> int:
        return MAX_IO_SIZE

    # ---- I/O -------------------------------------------------------------------------
    def preadv(self, offset: int, buf: memoryview) -> None:
        self.file.preadv(self.payload_offset + offset, buf)
        self.block.cipher.decrypt_into(offset // SECTOR_SIZE, buf)

    def pwritev(self, offset: int, data: memoryview, fua: bool = False) -> None:
        pos = 0
        while pos < len(data):
            n = min(MAX_IO_SIZE, len(data) - pos)
            enc = self.block.encrypt((offset + pos) // SECTOR_SIZE, data[pos:pos + n])
            self.file.pwrite(self.payload_offset + offset + pos, enc, fua)
            pos += n

    def truncate(self, size: int, exact: bool, prealloc: PreallocMode) -> None:
        self.file.truncate(self.payload_offset + size, exact=exact, prealloc=prealloc)

    def block_status(self, offset: int, length: int, want_zero: bool) -> Status:
        # no bdrv_co_block_status in block/crypto.c: the generic answer
        flags = BLOCK_DATA | BLOCK_ALLOCATED
        if offset + length >= self.node.total_size:
            flags |= BLOCK_EOF
        return Status(flags, length)

    # ---- queries ---------------------------------------------------------------------
    def get_info(self) -> dict:
        return {}

    def refresh_filename(self) -> str | None:
        """key-secret is one of block/crypto.c's strong runtime options: an image opened
        with it is described as json:{...} (in QDict order), like QEMU does."""
        secret = self.node.options.get("key-secret")
        if secret is None:
            return self.file.filename()
        import json
        from ....cli.output import to_json
        fname = self.file.filename()
        if fname.startswith("json:"):
            file_opts = json.loads(fname[5:])
        else:
            file_opts = {"driver": self.file.driver_name, "filename": fname}
        return "json:" + to_json({"driver": "luks", "file": file_opts, "key-secret": secret})

    def info_specific(self) -> dict:
        return {"type": "luks", "data": self.block.info()}

    # ---- key slots (qemu-img amend) ---------------------------------------------------
    def amend_options(self, opts: dict, force: bool, status_cb=None) -> None:
        """block_crypto_amend_options_luks(): ``opts`` maps the AMEND_OPTS given to
        (string, typed value), as QemuOpts holds them."""
        amend_keyslots(self.block, self._read, self._write,
                       {k: text for k, (text, _) in opts.items()}, force,
                       getattr(self.node.graph, "secrets", None),
                       self.node.options.get("key-secret"))

    def add_keyslot(self, password: bytes, iter_time: int = DEFAULT_ITER_TIME,
                    slot: int | None = None) -> int:
        if self.node.read_only:
            raise BlockError("Block node is read-only")
        return self.block.add_key(self._write, password, iter_time, slot)

    def erase_keyslot(self, slot: int) -> None:
        """Erase ``slot``, never the last active one."""
        if self.node.read_only:
            raise BlockError("Block node is read-only")
        if self.block.slot_active(slot):
            self.block.check_erasable(slot)
        self.block.erase_key(self._write, slot)

    # ---- creation --------------------------------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int, opts: dict, secrets: dict | None = None) -> None:
        """block_crypto_co_create_opts_luks(): header + key slot 0, then the payload
        as a (sparse) file extension.  ``secrets`` maps secret ids to their data."""
        from ...protocol.file import FileDriver, delete_file_noerr
        from ....graph.graph import Graph

        params = check_create_options(opts, secrets)
        block = new_volume(params)
        FileDriver.create(filename, 0, {})
        try:
            graph = Graph()
            try:
                fnode = graph.open_node({"driver": "file", "filename": filename})
                format_node(fnode, size, block, params)
            finally:
                graph.close_all()
        except BaseException:
            delete_file_noerr(filename)     # as block_crypto_co_create_opts_luks()
            raise


class CreateParams(NamedTuple):
    """Checked LUKS create options (QCryptoBlockCreateOptionsLUKS + preallocation)."""
    password: bytes
    cipher: dict            # LuksBlock.create keyword arguments
    iter_time: int
    prealloc: PreallocMode


def check_create_options(opts: dict, secrets: dict | None) -> CreateParams:
    """The key secret and algorithm options of a LUKS create, QEMU's messages."""
    opts = {k: v for k, v in (opts or {}).items() if v is not None}
    secret_id = opts.get("key-secret")
    if secret_id is None:
        raise InvalidArgument("Parameter 'key-secret' is required for cipher")
    password = lookup_secret(secrets, secret_id)
    kw = {}
    for name in ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg"):
        if name in opts:
            kw[name.replace("-", "_")] = str(opts[name])
    iter_time = int(opts.get("iter-time", 2000))
    prealloc = opts.get("preallocation", "off")
    try:
        prealloc = PreallocMode(prealloc)
    except ValueError:
        raise InvalidArgument("Parameter 'preallocation' does not accept value '%s'"
                              % prealloc) from None
    if prealloc is PreallocMode.METADATA:
        prealloc = PreallocMode.OFF        # as QEMU: the header is the only metadata
    return CreateParams(password, kw, iter_time, prealloc)


def new_volume(params: CreateParams) -> LuksBlock:
    """qcrypto_block_create(): a fresh master key and header (runs the PBKDF)."""
    return LuksBlock.create(params.password, iter_time=params.iter_time, **params.cipher)


def format_node(fnode, size: int, block: LuksBlock, params: CreateParams) -> None:
    """block_crypto_co_create_generic() on an open node: size the node for the header
    and ``size`` payload bytes, then write the header and key slot 0."""
    try:
        if size + block.payload_offset > INT64_MAX:
            raise BlockError("too large", errno=errno.EFBIG)
        fnode.truncate(block.payload_offset + size, prealloc=params.prealloc)
    except BlockError as e:
        if e.errno != errno.EFBIG:
            raise
        # block_crypto_create_init_func()'s better message (EIO: qcrypto's failure)
        raise BlockError("The requested file size is too large", errno=errno.EIO) from e
    block.store_key(fnode.pwrite, 0, params.password, params.iter_time)
    fnode.flush()
