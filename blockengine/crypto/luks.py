"""The LUKS1 block encryption format (QEMU 7.2's crypto/block-luks.c).

On-disk header (big-endian, 592 bytes at offset 0, per the LUKS1 spec): magic
"LUKS\\xba\\xbe", version 1, cipher name/mode and hash spec strings, payload offset and
key-material offsets in 512-byte sectors, master key length, the master key's PBKDF2
digest (salt, iterations) and 8 key slots (active marker, PBKDF2 iterations and salt,
key-material sector, AF stripes).  A key slot stores the master key AF-split into
``stripes`` copies and encrypted with the payload cipher under PBKDF2(passphrase).

``LuksBlock`` is format-agnostic: it reads and writes the header through callbacks
``read(offset, length) -> bytes`` and ``write(offset, data)``, so the LUKS format
driver and a qcow2 LUKS payload can share it.  Payload sectors are numbered from the
start of the payload (QEMU's offset / 512), which the caller passes in.
"""
from __future__ import annotations

import copy
import errno
import os
import struct
import time
from dataclasses import dataclass, field

from ..errors import BlockError, InvalidArgument, InvalidImage
from . import afsplit
from .cipher import (CIPHER_KEY_LEN, HASH_ALGS, IVGEN_ALGS, CIPHER_MODES,
                     SECTOR_SIZE, SectorCipher, check_cipher, essiv_cipher, hash_obj,
                     key_len, pbkdf2)

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
NUM_KEY_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_SIZE = 20
KEY_SLOT_OFFSET = 4096                # first key material byte (QEMU's layout)
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
SLOT_DISABLED = 0x0000DEAD
SLOT_ENABLED = 0x00AC71F3
MIN_SLOT_KEY_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
ERASE_ITERATIONS = 16
DEFAULT_ITER_TIME = 2000              # QCRYPTO_BLOCK_LUKS_DEFAULT_ITER_TIME_MS
ULLONG_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
KEYSLOT_STATES = ("active", "inactive")     # QCryptoBlockLUKSKeyslotState

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HDR.size + NUM_KEY_SLOTS * _SLOT.size          # 592

# LUKS cipher names <-> QEMU cipher algorithms (qcrypto_block_luks_cipher_name_map)
_CIPHER_FAMILY = {"aes": ("aes-128", "aes-192", "aes-256"), "cast5": ("cast5-128",),
                  "serpent": ("serpent-128", "serpent-192", "serpent-256"),
                  "twofish": ("twofish-128", "twofish-192", "twofish-256")}


class LuksError(InvalidImage):
    """The LUKS header is invalid or uses something QEMU (or blockengine) refuses."""


def _range_error(message: str) -> InvalidArgument:
    """error_setg_errno(ERANGE): QEMU appends strerror(ERANGE) to the message."""
    return InvalidArgument("%s: %s" % (message, os.strerror(errno.ERANGE)), errno=errno.ERANGE)


def _with_hint(exc: BlockError, hint: str) -> BlockError:
    """error_append_hint(): the same error with one more (unterminated) hint line."""
    new = copy.copy(exc)
    new.hint = (exc.hint or "") + hint
    return new


@dataclass(frozen=True)
class AmendOptions:
    """QCryptoBlockAmendOptionsLUKS: what `qemu-img amend -o` changes in the key slots."""
    state: str
    new_secret: str | None = None
    old_secret: str | None = None
    keyslot: int | None = None
    iter_time: int | None = None
    secret: str | None = None


@dataclass
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset: int = 0              # sectors
    stripes: int = STRIPES

    @property
    def enabled(self) -> bool:
        return self.active == SLOT_ENABLED


@dataclass
class LuksHeader:
    cipher_name: bytes = b""
    cipher_mode: bytes = b""
    hash_spec: bytes = b""
    payload_offset: int = 0          # sectors
    key_bytes: int = 0
    mk_digest: bytes = bytes(DIGEST_SIZE)
    mk_digest_salt: bytes = bytes(SALT_LEN)
    mk_digest_iterations: int = 0
    uuid: bytes = bytes(40)
    slots: list = field(default_factory=list)
    magic: bytes = MAGIC
    version: int = VERSION

    @classmethod
    def unpack(cls, raw: bytes) -> "LuksHeader":
        raw = raw[:HEADER_SIZE] + bytes(max(0, HEADER_SIZE - len(raw)))
        (magic, version, cname, cmode, hspec, poff, kbytes, dig, dsalt, diter,
         uuid) = _HDR.unpack_from(raw, 0)
        slots = [KeySlot(*_SLOT.unpack_from(raw, _HDR.size + i * _SLOT.size))
                 for i in range(NUM_KEY_SLOTS)]
        return cls(cname, cmode, hspec, poff, kbytes, dig, dsalt, diter, uuid, slots,
                   magic, version)

    def pack(self) -> bytes:
        out = _HDR.pack(self.magic, self.version, self.cipher_name, self.cipher_mode,
                        self.hash_spec, self.payload_offset, self.key_bytes, self.mk_digest,
                        self.mk_digest_salt, self.mk_digest_iterations, self.uuid)
        return out + b"".join(_SLOT.pack(s.active, s.iterations, s.salt, s.key_offset,
                                         s.stripes) for s in self.slots)


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


def splitkey_sectors(key_bytes: int, stripes: int) -> int:
    """qcrypto_block_luks_splitkeylen_sectors(): key material rounded to 4 KiB."""
    sectors = -(-(key_bytes * stripes) // SECTOR_SIZE)
    return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS


def _lookup(name: str, allowed, what: str) -> str:
    if name not in allowed:
        raise LuksError("%s '%s' not supported" % (what, name))
    return name


def cipher_alg_from_name(name: str, mode: str, key_bytes: int) -> str:
    """qcrypto_block_luks_cipher_name_lookup(): LUKS name + key size -> algorithm."""
    kb = key_bytes // 2 if mode == "xts" else key_bytes
    for alg in _CIPHER_FAMILY.get(name, ()):
        if CIPHER_KEY_LEN[alg] == kb:
            return alg
    raise LuksError("Algorithm '%s' with key size %d bytes not supported" % (name, kb))


def cipher_name_for_alg(alg: str) -> str:
    for name, algs in _CIPHER_FAMILY.items():
        if alg in algs:
            return name
    raise InvalidArgument("Cipher algorithm '%s' not supported by LUKS" % alg)


def count_iters(hash_alg: str, key: bytes, salt: bytes, nout: int) -> int:
    """qcrypto_pbkdf2_count_iters(): PBKDF2 iterations per second of thread CPU time.

    QEMU grows the trial until it takes more than 500 ms; blockengine stops at 50 ms
    (the rate, hence iter-time's meaning, is the same, the estimate a bit noisier)."""
    iters = 1 << 12
    while True:
        t0 = time.thread_time()
        pbkdf2(hash_alg, key, salt, iters, nout)
        delta = time.thread_time() - t0
        if delta >= 0.05:
            return int(iters / delta)
        iters = iters * 10 if delta < 0.01 else int(iters * 0.06 / delta) + 1


class LuksBlock:
    """An opened (or freshly created) LUKS1 volume."""

    def __init__(self, header: LuksHeader):
        self.header = header
        self.master_key: bytes | None = None
        self.cipher: SectorCipher | None = None
        self._parse()

    # ---- parsing ---------------------------------------------------------------------
    @classmethod
    def load(cls, read, password: bytes | None) -> "LuksBlock":
        """qcrypto_block_luks_open(): validate the header; unlock if a password is given
        (None = QCRYPTO_BLOCK_OPEN_NO_IO: metadata only)."""
        h = LuksHeader.unpack(read(0, HEADER_SIZE))
        cls.check_header(h)
        blk = cls(h)
        if password is not None:
            blk.unlock(read, password)
        return blk

    @staticmethod
    def check_header(h: LuksHeader) -> None:
        if h.magic != MAGIC:
            raise LuksError("Volume is not in LUKS format")
        if h.version != VERSION:
            raise LuksError("LUKS version %d is not supported" % h.version)
        for raw, what in ((h.cipher_name, "cipher name"), (h.cipher_mode, "cipher mode"),
                          (h.hash_spec, "hash spec")):
            if b"\0" not in raw:
                raise LuksError("LUKS header %s is not NUL terminated" % what)
        if h.payload_offset < HEADER_SECTORS:
            raise LuksError("LUKS payload is overlapping with the header")
        if h.mk_digest_iterations == 0:
            raise LuksError("LUKS key iteration count is zero")
        for i, s in enumerate(h.slots):
            if s.stripes != STRIPES:
                raise LuksError("Keyslot %d is corrupted (stripes %d != %d)"
                                % (i, s.stripes, STRIPES))
            if s.active not in (SLOT_DISABLED, SLOT_ENABLED):
                raise LuksError("Keyslot %d state (active/disable) is corrupted" % i)
            if s.active == SLOT_ENABLED and s.iterations == 0:
                raise LuksError("Keyslot %d iteration count is zero" % i)
            start, n = s.key_offset, splitkey_sectors(h.key_bytes, s.stripes)
            if start < HEADER_SECTORS:
                raise LuksError("Keyslot %d is overlapping with the LUKS header" % i)
            if start + n > h.payload_offset:
                raise LuksError("Keyslot %d is overlapping with the encrypted payload" % i)
            for j in range(i + 1, NUM_KEY_SLOTS):
                s2 = h.slots[j]
                n2 = splitkey_sectors(h.key_bytes, s2.stripes)
                if start + n > s2.key_offset and s2.key_offset + n2 > start:
                    raise LuksError("Keyslots %d and %d are overlapping in the header"
                                    % (i, j))

    def _parse(self) -> None:
        """qcrypto_block_luks_parse_header(): "<mode>-<ivgen>[:<hash>]" and friends."""
        h = self.header
        spec = _cstr(h.cipher_mode)
        if "-" not in spec:
            raise LuksError("Unexpected cipher mode string format '%s'" % spec)
        mode, ivgen = spec.split("-", 1)
        ivhash = None
        if ":" in ivgen:
            ivgen, ivhash = ivgen.split(":", 1)
            _lookup(ivhash, HASH_ALGS, "Hash algorithm")
        self.cipher_mode = _lookup(mode, CIPHER_MODES, "Cipher mode")
        self.cipher_alg = cipher_alg_from_name(_cstr(h.cipher_name), mode, h.key_bytes)
        self.hash_alg = _lookup(_cstr(h.hash_spec), HASH_ALGS, "Hash algorithm")
        self.ivgen_alg = _lookup(ivgen, IVGEN_ALGS, "IV generator")
        self.ivgen_hash_alg = ivhash
        if self.ivgen_alg == "essiv":
            if ivhash is None:
                raise LuksError("Missing IV generator hash specification")
            try:
                essiv_cipher(self.cipher_alg, ivhash)
            except InvalidArgument as e:
                raise LuksError(str(e)) from None
        self.payload_offset = h.payload_offset * SECTOR_SIZE

    # ---- keys ------------------------------------------------------------------------
    def _slot_cipher(self, key: bytes) -> SectorCipher:
        return SectorCipher(self.cipher_alg, self.cipher_mode, key, self.ivgen_alg,
                            self.ivgen_hash_alg)

    def load_key(self, read, i: int, password: bytes) -> bytes | None:
        """qcrypto_block_luks_load_key(): the master key if ``password`` opens slot i."""
        h, s = self.header, self.header.slots[i]
        if not s.enabled:
            return None
        nkey = h.key_bytes
        slot_key = pbkdf2(self.hash_alg, password, s.salt, s.iterations, nkey)
        material = read(s.key_offset * SECTOR_SIZE, nkey * s.stripes)
        split = self._slot_cipher(slot_key).decrypt(0, material)
        candidate = afsplit.merge(self.hash_alg, bytes(split), nkey, s.stripes)
        dig = pbkdf2(self.hash_alg, candidate, h.mk_digest_salt, h.mk_digest_iterations,
                     DIGEST_SIZE)
        return candidate if dig == h.mk_digest else None

    def unlock(self, read, password: bytes) -> None:
        """Find the master key the password opens and set up the payload cipher."""
        # what QEMU runs but cryptography cannot is refused here, not for metadata
        check_cipher(self.cipher_alg, self.cipher_mode)
        hash_obj(self.hash_alg)
        self._set_master_key(self.find_key(read, password))

    def find_key(self, read, password: bytes) -> bytes:
        """qcrypto_block_luks_find_key(): the master key from the first slot that
        ``password`` opens."""
        for i in range(NUM_KEY_SLOTS):
            key = self.load_key(read, i, password)
            if key is not None:
                return key
        raise BlockError("Invalid password, cannot unlock any keyslot")

    def _set_master_key(self, key: bytes) -> None:
        self.master_key = key
        self.cipher = SectorCipher(self.cipher_alg, self.cipher_mode, key, self.ivgen_alg,
                                   self.ivgen_hash_alg)

    def store_key(self, write, i: int, password: bytes, iter_time: int) -> None:
        """qcrypto_block_luks_store_key(): put the master key into slot i.

        Crash order as QEMU: the slot's key material first, then the header that
        activates it, so a crash in between leaves every active slot as it was.  The
        in-memory header changes only once the material is on disk."""
        h = self.header
        s = h.slots[i]
        nkey = h.key_bytes
        salt = os.urandom(SALT_LEN)
        iters = count_iters(self.hash_alg, password, salt, nkey)
        if iter_time and iters > ULLONG_MAX // iter_time:
            raise _range_error("PBKDF iterations %d too large to scale" % iters)
        iters = iters * iter_time // 1000
        if iters > UINT32_MAX:
            raise _range_error("PBKDF iterations %d larger than %d" % (iters, UINT32_MAX))
        iterations = max(iters, MIN_SLOT_KEY_ITERS)
        slot_key = pbkdf2(self.hash_alg, password, salt, iterations, nkey)
        split = afsplit.split(self.hash_alg, self.master_key, s.stripes)
        write(s.key_offset * SECTOR_SIZE, bytes(self._slot_cipher(slot_key).encrypt(0, split)))
        s.salt, s.iterations, s.active = salt, iterations, SLOT_ENABLED
        write(0, h.pack())

    def erase_key(self, write, i: int) -> None:
        """qcrypto_block_luks_erase_key(): disable the slot in the header first (no crash
        can then leave a half-erased slot marked active), then overwrite its key
        material with random data ERASE_ITERATIONS times."""
        h, s = self.header, self.header.slots[i]
        s.active, s.iterations, s.salt = SLOT_DISABLED, 0, bytes(SALT_LEN)
        write(0, h.pack())
        n = h.key_bytes * s.stripes
        for _ in range(ERASE_ITERATIONS):
            write(s.key_offset * SECTOR_SIZE, os.urandom(n))

    # ---- key slot management (qemu-img amend) ------------------------------------------
    def slot_active(self, i: int) -> bool:
        return self.header.slots[i].enabled

    def count_active_slots(self) -> int:
        return sum(1 for s in self.header.slots if s.enabled)

    def find_free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self.header.slots) if not s.enabled), None)

    def add_key(self, write, password: bytes, iter_time: int = DEFAULT_ITER_TIME,
                slot: int | None = None, force: bool = False) -> int:
        """Enable a free key slot (or ``slot``) for ``password`` with the unlocked
        master key; an active slot is overwritten only with ``force``.  Returns the slot."""
        if self.master_key is None:
            raise BlockError("LUKS volume is not unlocked")
        if slot is None:
            slot = self.find_free_slot()
            if slot is None:
                raise BlockError("Can't add a keyslot - all keyslots are in use")
        if not force and self.slot_active(slot):
            raise BlockError("Refusing to overwrite active keyslot %d - please erase it "
                             "first" % slot)
        try:
            self.store_key(write, slot, password, iter_time)
        except BlockError as e:
            raise _with_hint(e, "Failed to write to keyslot %d" % slot) from None
        return slot

    def check_erasable(self, slot: int, force: bool = False) -> None:
        """Without ``force`` never erase an inactive slot or the last active one."""
        if not force and not self.slot_active(slot):
            raise BlockError("Given keyslot %d is already erased (inactive) " % slot)
        if not force and self.count_active_slots() == 1:
            raise BlockError("Attempt to erase the only active keyslot %d which will "
                             "erase all the data in the image irreversibly - refusing "
                             "operation" % slot)

    def _erase(self, write, slot: int) -> None:
        try:
            self.erase_key(write, slot)
        except BlockError as e:
            raise _with_hint(e, "Failed to erase keyslot %d" % slot) from None

    def amend(self, read, write, opts: "AmendOptions", force: bool, lookup,
              unlock_secret: str | None) -> None:
        """qcrypto_block_luks_amend_options(): add or erase key slots as ``opts`` says.
        ``lookup(secret_id) -> bytes`` resolves secrets; ``unlock_secret`` is the secret
        the volume was opened with (the default for reading the master key)."""
        if opts.state == "active":
            self._amend_add(read, write, opts, force, lookup, unlock_secret)
        else:
            self._amend_erase(read, write, opts, force, lookup)

    def _amend_add(self, read, write, opts, force, lookup, unlock_secret) -> None:
        """qcrypto_block_luks_amend_add_keyslot()."""
        iter_time = opts.iter_time if opts.iter_time is not None else DEFAULT_ITER_TIME
        if opts.new_secret is None:
            raise InvalidArgument("'new-secret' is required to activate a keyslot")
        if opts.old_secret is not None:
            raise InvalidArgument("'old-secret' must not be given when activating keyslots")
        if opts.keyslot is not None:
            slot = opts.keyslot
            if not 0 <= slot < NUM_KEY_SLOTS:
                # QEMU prints the C int with %u here
                raise InvalidArgument("Invalid keyslot %d specified, must be between 0 "
                                      "and %d" % (slot % (1 << 32), NUM_KEY_SLOTS - 1))
        else:
            slot = self.find_free_slot()
            if slot is None:
                raise BlockError("Can't add a keyslot - all keyslots are in use")
        if not force and self.slot_active(slot):
            raise BlockError("Refusing to overwrite active keyslot %d - please erase it "
                             "first" % slot)
        old_password = lookup(opts.secret if opts.secret is not None else unlock_secret)
        try:
            master = self.find_key(read, old_password)
        except BlockError as e:
            raise _with_hint(e, "Failed to retrieve the master key") from None
        new_password = lookup(opts.new_secret)
        if self.master_key is None:
            self._set_master_key(master)
        self.add_key(write, new_password, iter_time, slot, force=True)

    def _amend_erase(self, read, write, opts, force, lookup) -> None:
        """qcrypto_block_luks_amend_erase_keyslots()."""
        if opts.new_secret is not None:
            raise InvalidArgument("'new-secret' must not be given when erasing keyslots")
        if opts.iter_time is not None:
            raise InvalidArgument("'iter-time' must not be given when erasing keyslots")
        if opts.secret is not None:
            raise InvalidArgument("'secret' must not be given when erasing keyslots")
        old_password = lookup(opts.old_secret) if opts.old_secret is not None else None
        if opts.keyslot is not None:
            slot = opts.keyslot
            if not 0 <= slot < NUM_KEY_SLOTS:
                raise InvalidArgument("Invalid keyslot %d specified, must be between 0 "
                                      "and %d" % (slot, NUM_KEY_SLOTS - 1))
            if old_password is not None and self.load_key(read, slot, old_password) is None:
                raise BlockError("Given keyslot %d doesn't contain the given old password "
                                 "for erase operation" % slot)
            self.check_erasable(slot, force)
            self._erase(write, slot)
        elif old_password is not None:
            matching = [i for i in range(NUM_KEY_SLOTS)
                        if self.load_key(read, i, old_password) is not None]
            if not matching:
                raise BlockError("No keyslots match given (old) password for erase operation")
            if not force and len(matching) == self.count_active_slots():
                raise BlockError("All the active keyslots match the (old) password that was "
                                 "given and erasing them will erase all the data in the "
                                 "image irreversibly - refusing operation")
            for i in matching:
                self._erase(write, i)
        else:
            raise InvalidArgument("To erase keyslot(s), either explicit keyslot index or the "
                                  "password currently contained in them must be given")

    # ---- creation --------------------------------------------------------------------
    @classmethod
    def create(cls, password: bytes, *, cipher_alg: str = "aes-256",
               cipher_mode: str = "xts", ivgen_alg: str = "plain64",
               ivgen_hash_alg: str | None = None, hash_alg: str = "sha256",
               iter_time: int = DEFAULT_ITER_TIME) -> "LuksBlock":
        """qcrypto_block_luks_create() up to (not including) writing: the caller makes
        room for ``payload_offset`` bytes, then calls ``store_key(write, 0, ...)``."""
        check_cipher(cipher_alg, cipher_mode)
        for name, allowed, what in ((ivgen_alg, IVGEN_ALGS, "ivgen-alg"),
                                    (hash_alg, HASH_ALGS, "hash-alg")):
            if name not in allowed:
                raise InvalidArgument("Parameter '%s' does not accept value '%s'"
                                      % (what, name))
        if ivgen_hash_alg is not None and ivgen_hash_alg not in HASH_ALGS:
            raise InvalidArgument("Parameter 'ivgen-hash-alg' does not accept value '%s'"
                                  % ivgen_hash_alg)
        hash_obj(hash_alg)
        if ivgen_alg == "essiv":
            if ivgen_hash_alg is None:
                ivgen_hash_alg = "sha256"
            essiv_cipher(cipher_alg, ivgen_hash_alg)
        spec = "%s-%s" % (cipher_mode, ivgen_alg)
        if ivgen_hash_alg is not None:
            spec += ":" + ivgen_hash_alg
        nkey = key_len(cipher_alg, cipher_mode)
        master = os.urandom(nkey)
        h = LuksHeader(cipher_name=cipher_name_for_alg(cipher_alg).encode(),
                       cipher_mode=spec.encode(), hash_spec=hash_alg.encode(),
                       key_bytes=nkey, uuid=str(_uuid4()).encode())
        h.mk_digest_salt = os.urandom(SALT_LEN)
        iters = count_iters(hash_alg, master, h.mk_digest_salt, DIGEST_SIZE)
        if iter_time and iters > ULLONG_MAX // iter_time:
            raise _range_error("PBKDF iterations %d too large to scale" % iters)
        iters = iters * iter_time // 1000 // 8
        if iters > UINT32_MAX:
            raise _range_error("PBKDF iterations %d larger than %d" % (iters, UINT32_MAX))
        h.mk_digest_iterations = max(iters, MIN_MASTER_KEY_ITERS)
        h.mk_digest = pbkdf2(hash_alg, master, h.mk_digest_salt, h.mk_digest_iterations,
                             DIGEST_SIZE)
        per_slot = splitkey_sectors(nkey, STRIPES)
        h.slots = [KeySlot(key_offset=HEADER_SECTORS + i * per_slot)
                   for i in range(NUM_KEY_SLOTS)]
        h.payload_offset = HEADER_SECTORS + NUM_KEY_SLOTS * per_slot
        blk = cls(h)
        blk._set_master_key(master)
        return blk

    # ---- payload ---------------------------------------------------------------------
    def decrypt(self, sector: int, data) -> bytearray:
        return self.cipher.decrypt(sector, data)

    def encrypt(self, sector: int, data) -> bytearray:
        return self.cipher.encrypt(sector, data)

    # ---- queries ---------------------------------------------------------------------
    def info(self) -> dict:
        """QCryptoBlockInfoLUKS, in QAPI field order."""
        h = self.header
        out = {"cipher-alg": self.cipher_alg, "cipher-mode": self.cipher_mode,
               "ivgen-alg": self.ivgen_alg}
        if self.ivgen_alg == "essiv":
            out["ivgen-hash-alg"] = self.ivgen_hash_alg
        out.update({"hash-alg": self.hash_alg, "payload-offset": self.payload_offset,
                    "master-key-iters": h.mk_digest_iterations,
                    "uuid": h.uuid.split(b"\0", 1)[0].decode("ascii", "replace")})
        slots = []
        for s in h.slots:
            d = {"active": s.enabled}
            if s.enabled:
                d["iters"] = s.iterations
                d["stripes"] = s.stripes
            d["key-offset"] = s.key_offset * SECTOR_SIZE
            slots.append(d)
        out["slots"] = slots
        return out


def _uuid4():
    import uuid         # only creating a volume needs it (it loads a C module and platform)
    return uuid.uuid4()
