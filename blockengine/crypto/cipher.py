"""Ciphers, hashes and IV generators as QEMU names and uses them (crypto/cipher.c,
crypto/ivgen*.c, crypto/block.c's sector helpers), implemented with ``cryptography``.

``SectorCipher`` encrypts or decrypts a buffer made of 512-byte sectors (QEMU's
qcrypto_block_cipher_{en,de}crypt_helper): each sector gets its own IV from the IV
generator, computed from its sector number; ECB has no IV and runs on the whole buffer
in one call.  Whole buffers of sectors are done with bulk AES-ECB calls plus the native
per-block glue (tweaks, chaining, counters) of ``native/crypto.c`` when it is built:
see ``SectorCipher``.
"""
from __future__ import annotations

# ``cryptography`` is imported where a cipher or hash is first made: loading its
# bindings costs every command start-up several milliseconds, and most never encrypt.
from ..errors import InvalidArgument, NotSupported

SECTOR_SIZE = 512
_AUTO = object()    # SectorCipher's default engine choice

# QCryptoCipherAlgorithm names -> key bytes (QEMU's qcrypto_cipher_alg_key_len)
CIPHER_KEY_LEN = {
    "aes-128": 16, "aes-192": 24, "aes-256": 32,
    "des": 8, "3des": 24, "cast5-128": 16,
    "serpent-128": 16, "serpent-192": 24, "serpent-256": 32,
    "twofish-128": 16, "twofish-192": 24, "twofish-256": 32,
    "sm4": 16,
}
# the subset blockengine can run (cryptography implements them)
SUPPORTED_CIPHERS = ("aes-128", "aes-192", "aes-256")
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
_HASHES = {"md5": "MD5", "sha1": "SHA1", "sha224": "SHA224", "sha256": "SHA256",
           "sha384": "SHA384", "sha512": "SHA512"}      # names in cryptography's hashes
DIGEST_LEN = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48,
              "sha512": 64, "ripemd160": 20}


def hash_obj(name: str):
    """A cryptography hash algorithm instance for a QEMU hash name."""
    cls = _HASHES.get(name)
    if cls is None:
        if name == "ripemd160":
            raise NotSupported("Hash algorithm ripemd160 is not supported by this "
                               "cryptography backend")
        raise InvalidArgument("Hash algorithm %s not supported" % name)
    from cryptography.hazmat.primitives import hashes
    return getattr(hashes, cls)()


def new_hash(name: str):
    """A fresh cryptography hash context for a QEMU hash name."""
    from cryptography.hazmat.primitives import hashes
    return hashes.Hash(hash_obj(name))


def digest(name: str, data: bytes) -> bytes:
    h = new_hash(name)
    h.update(data)
    return h.finalize()


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int,
           length: int) -> bytes:
    """qcrypto_pbkdf2() (RFC 2898 PBKDF2-HMAC)."""
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
    return PBKDF2HMAC(algorithm=hash_obj(hash_name), length=length, salt=salt,
                      iterations=iterations).derive(password)


def key_len(alg: str, mode: str) -> int:
    """qcrypto_cipher_get_key_len() doubled for XTS, as LUKS stores it."""
    n = CIPHER_KEY_LEN[alg]
    return n * 2 if mode == "xts" else n


def check_cipher(alg: str, mode: str) -> None:
    """Refuse what QEMU accepts but blockengine cannot run, with a clear message."""
    if alg not in CIPHER_KEY_LEN:
        raise InvalidArgument("Cipher algorithm %s not supported" % alg)
    if mode not in CIPHER_MODES:
        raise InvalidArgument("Cipher mode %s not supported" % mode)
    if alg not in SUPPORTED_CIPHERS:
        raise NotSupported("Cipher algorithm '%s' is not supported by blockengine "
                           "(supported: %s)" % (alg, ", ".join(SUPPORTED_CIPHERS)))


def _algorithm(alg: str, key: bytes):
    if alg.startswith("aes-"):
        from cryptography.hazmat.primitives.ciphers import algorithms
        return algorithms.AES(key)
    raise NotSupported("Cipher algorithm '%s' is not supported by blockengine" % alg)


class IVGen:
    """qcrypto_ivgen_*: plain (32-bit LE sector), plain64 (64-bit LE), essiv
    (the 64-bit LE sector encrypted by ECB under hash(key))."""

    def __init__(self, alg: str, niv: int, key: bytes, hash_alg: str | None = None,
                 cipher_alg: str | None = None):
        if alg not in IVGEN_ALGS:
            raise InvalidArgument("IV generator %s not supported" % alg)
        self.alg, self.niv = alg, niv
        self._essiv = None
        if alg == "essiv":
            salt = digest(hash_alg, key)
            ivalg = essiv_cipher(cipher_alg, hash_alg)
            from cryptography.hazmat.primitives.ciphers import Cipher, modes
            self._essiv = Cipher(_algorithm(ivalg, salt), modes.ECB())

    def iv(self, sector: int) -> bytes:
        if self.alg == "plain":
            raw = (sector & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            raw = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
        raw = raw[:self.niv] + bytes(max(0, self.niv - len(raw)))
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            raw = enc.update(raw) + enc.finalize()
        return raw

    def ivs(self, first: int, count: int) -> list[bytes]:
        if self._essiv is None:
            return [self.iv(s) for s in range(first, first + count)]
        # essiv: one ECB call for every sector's IV
        buf = b"".join((s & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + bytes(self.niv - 8)
                       for s in range(first, first + count))
        enc = self._essiv.encryptor()
        out = enc.update(buf) + enc.finalize()
        return [out[i * self.niv:(i + 1) * self.niv] for i in range(count)]

    def fill(self, first: int, count: int, out: bytearray, ops) -> None:
        """Write the 16-byte IVs of sectors first.. first + count - 1 to ``out``
        (which has 15 bytes of slack for the essiv ECB call) with the sector_ivs
        of ``ops`` (a :mod:`blockengine._native` backend); needs niv == 16."""
        ops.sector_ivs(out, first & 0xFFFFFFFFFFFFFFFF, count, 4 if self.alg == "plain" else 8)
        if self._essiv is not None:
            self._essiv.encryptor().update_into(memoryview(out)[:count * 16], out)


def essiv_cipher(cipher_alg: str, hash_alg: str) -> str:
    """qcrypto_block_luks_essiv_cipher(): the cipher family keyed by the hash length."""
    n = DIGEST_LEN[hash_alg]
    if not cipher_alg.startswith("aes-"):
        raise InvalidArgument("Cipher %s not supported with essiv" % cipher_alg)
    alg = {16: "aes-128", 24: "aes-192", 32: "aes-256"}.get(n)
    if alg is None:
        raise InvalidArgument("No AES cipher with key size %d available" % n)
    return alg


class SectorCipher:
    """A cipher+IV generator over 512-byte sectors (QEMU's QCryptoBlock payload cipher).

    Two engines give the same bytes.  The per-sector one makes one ``cryptography``
    call per sector in the real mode (XTS, CBC, CTR), as QEMU's helper loops; it is
    the reference, and what BLOCKENGINE_PURE=1 runs.  The bulk one handles a
    buffer of whole sectors with one or a few AES-ECB calls of ``cryptography``
    over the whole buffer, and lets the native sector functions
    (``native/crypto.c``: tweaks, CBC chaining, CTR counters) do the per-block
    work around them, so no Python runs per sector.  A trailing partial sector
    always goes through the per-sector engine.
    """

    def __init__(self, alg: str, mode: str, key: bytes, ivgen_alg: str,
                 ivgen_hash: str | None = None, sector_size: int = SECTOR_SIZE, *,
                 bulk_ops=_AUTO):
        """``bulk_ops``: the sector functions for the bulk engine (a
        :mod:`blockengine._native` backend), None for the per-sector engine; by
        default the bulk engine when the native module is in use."""
        check_cipher(alg, mode)
        self.sector_size = sector_size
        self.mode = mode
        # OpenSSL has no AES-192-XTS: its two ECB passes are all the bulk engine needs
        self._ecb_only = mode == "xts" and alg == "aes-192"
        self.algo = None if self._ecb_only else _algorithm(alg, key)
        self.niv = 0 if mode == "ecb" else 16
        self.ivgen = IVGen(ivgen_alg, self.niv, key, ivgen_hash, alg) if self.niv else None
        from cryptography.hazmat.primitives.ciphers import Cipher, modes
        self._cipher_cls = Cipher
        self._modecls = {"cbc": modes.CBC, "xts": modes.XTS, "ctr": modes.CTR}.get(mode)
        half = len(key) // 2
        if mode == "xts":       # IEEE 1619: data key, then tweak key
            self._data_ecb = Cipher(_algorithm(alg, key[:half]), modes.ECB())
            self._tweak_ecb = Cipher(_algorithm(alg, key[half:]), modes.ECB())
        else:
            self._data_ecb = Cipher(self.algo, modes.ECB())
        if bulk_ops is _AUTO:
            from .. import _native
            bulk_ops = _native if _native.BACKEND == "native" else None
        # OpenSSL refuses XTS encryption with equal key halves: the per-sector
        # engine keeps that error
        if self._ecb_only:
            from .. import _native
            bulk_ops = bulk_ops or _native.PYTHON        # the pure twins if need be
        elif mode == "ecb" or sector_size % 16 or (mode == "xts"
                                                   and key[:half] == key[half:]):
            bulk_ops = None
        self._ops = bulk_ops

    @property
    def engine(self) -> str:
        """"bulk" or "per-sector" (which engine whole sectors go through)."""
        return "per-sector" if self._ops is None else "bulk"

    def encrypt(self, sector: int, data) -> bytearray:
        return self._crypt(sector, memoryview(data).cast("B"), True)

    def decrypt(self, sector: int, data) -> bytearray:
        return self._crypt(sector, memoryview(data).cast("B"), False)

    def decrypt_into(self, sector: int, buf: memoryview) -> None:
        """Decrypt buf in place."""
        buf = memoryview(buf).cast("B")
        n = len(buf)
        whole = self._bulk_length(n)
        if whole:
            self._bulk(sector, buf[:whole], None, False)
        if whole < n:
            buf[whole:] = self._crypt(sector + whole // self.sector_size, buf[whole:], False)

    def _bulk_length(self, n: int) -> int:
        """How many leading bytes of an n-byte buffer the bulk engine takes."""
        return n - n % self.sector_size if self._ops is not None else 0

    def _crypt(self, sector: int, data: memoryview, encrypt: bool) -> bytearray:
        n = len(data)
        # 15 bytes of slack: cryptography's update_into wants block_size - 1 spare
        out = bytearray(n + 15)
        if self.mode == "ecb":
            ctx = self._data_ecb.encryptor() if encrypt else self._data_ecb.decryptor()
            ctx.update_into(data, out)
        else:
            whole = self._bulk_length(n)
            if whole:
                self._bulk(sector, data[:whole], out, encrypt)
            if whole < n:
                self._per_sector(sector + whole // self.sector_size, data[whole:],
                                 memoryview(out)[whole:], encrypt)
        del out[n:]
        return out

    def _per_sector(self, sector: int, data: memoryview, out: memoryview,
                    encrypt: bool) -> None:
        """One cryptography call per sector; out has 15 bytes of slack."""
        if self._ecb_only:
            raise NotSupported("AES-192-XTS works on whole sectors only")
        n, ss = len(data), self.sector_size
        ivs = self.ivgen.ivs(sector, -(-n // ss))
        algo, modecls, C = self.algo, self._modecls, self._cipher_cls
        s = 0
        for iv in ivs:
            c = C(algo, modecls(iv))
            ctx = c.encryptor() if encrypt else c.decryptor()
            e = min(s + ss, n)
            ctx.update_into(data[s:e], out[s:e + 15])
            s += ss

    def _bulk(self, sector: int, data: memoryview, out: bytearray | None,
              encrypt: bool) -> None:
        """Whole sectors of data into out (15 bytes of slack), or in place when
        out is None, with bulk ECB calls and the native sector functions."""
        ops, ss, n = self._ops, self.sector_size, len(data)
        count = n // ss
        ivs = bytearray(count * 16 + 15)
        self.ivgen.fill(sector, count, ivs, ops)
        dst = data if out is None else out
        scratch = bytearray(n + 15) if out is None else out
        scratch_n = memoryview(scratch)[:n]
        if self.mode == "xts":
            self._tweak_ecb.encryptor().update_into(memoryview(ivs)[:count * 16], ivs)
            ops.xts_xor(scratch, data, n, ivs, ss)
            ecb = self._data_ecb.encryptor() if encrypt else self._data_ecb.decryptor()
            ecb.update_into(scratch_n, scratch)
            ops.xts_xor(dst, scratch, n, ivs, ss)
        elif self.mode == "cbc" and not encrypt:
            self._data_ecb.decryptor().update_into(data, scratch)
            ops.cbc_decrypt_xor(dst, scratch, data, n, ivs, ss)
        elif self.mode == "cbc":
            # block j of every sector at once: the IVs become the running "lanes"
            ecb, lanes = self._data_ecb.encryptor(), memoryview(ivs)[:count * 16]
            for block in range(ss // 16):
                ops.cbc_encrypt_step(dst, data, n, ivs, ss, block)
                ecb.update_into(lanes, ivs)
            ops.cbc_encrypt_step(dst, data, n, ivs, ss, ss // 16)
        else:   # ctr: keystream = ECB of the counter blocks
            ops.ctr_counters(scratch, n, ivs, ss)
            self._data_ecb.encryptor().update_into(scratch_n, scratch)
            if out is None:
                ops.xor_into(data, scratch, n)
            else:
                ops.xor_into(out, data, n)
