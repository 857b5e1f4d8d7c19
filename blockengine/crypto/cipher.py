"""Ciphers, hashes and IV generators as QEMU names and uses them (crypto/cipher.c,
crypto/ivgen*.c, crypto/block.c's sector helpers), implemented with ``cryptography``.

``SectorCipher`` encrypts or decrypts a buffer made of 512-byte sectors (QEMU's
qcrypto_block_cipher_{en,de}crypt_helper): each sector gets its own IV from the IV
generator, computed from its sector number; ECB has no IV and runs on the whole buffer
in one call.
"""
from __future__ import annotations


from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from ..errors import InvalidArgument, NotSupported

SECTOR_SIZE = 512

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
_HASHES = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224,
           "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
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
    return cls()


def digest(name: str, data: bytes) -> bytes:
    h = hashes.Hash(hash_obj(name))
    h.update(data)
    return h.finalize()


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int,
           length: int) -> bytes:
    """qcrypto_pbkdf2() (RFC 2898 PBKDF2-HMAC)."""
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
    if mode == "xts" and alg == "aes-192":
        raise NotSupported("Cipher mode xts with aes-192 is not supported by blockengine "
                           "(cryptography implements AES-XTS with 128/256-bit keys only)")


def _algorithm(alg: str, key: bytes):
    if alg.startswith("aes-"):
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
    """A cipher+IV generator over 512-byte sectors (QEMU's QCryptoBlock payload cipher)."""

    def __init__(self, alg: str, mode: str, key: bytes, ivgen_alg: str,
                 ivgen_hash: str | None = None, sector_size: int = SECTOR_SIZE):
        check_cipher(alg, mode)
        self.sector_size = sector_size
        self.mode = mode
        self.algo = _algorithm(alg, key)
        self.niv = 0 if mode == "ecb" else 16
        self.ivgen = IVGen(ivgen_alg, self.niv, key, ivgen_hash, alg) if self.niv else None
        self._modecls = {"cbc": modes.CBC, "xts": modes.XTS, "ctr": modes.CTR}.get(mode)
        if mode == "ecb":
            self._ecb = Cipher(self.algo, modes.ECB())

    def _run(self, sector: int, data: memoryview, encrypt: bool) -> bytearray:
        """The whole buffer, sector by sector; the result has 15 bytes of slack at the
        end (cryptography's update_into wants block_size - 1 spare bytes)."""
        n = len(data)
        out = bytearray(n + 15)
        if self.mode == "ecb":
            ctx = self._ecb.encryptor() if encrypt else self._ecb.decryptor()
            ctx.update_into(data, out)
            return out
        ss = self.sector_size
        count = -(-n // ss)
        ivs = self.ivgen.ivs(sector, count)
        algo, modecls, C = self.algo, self._modecls, Cipher
        o = memoryview(out)
        s = 0
        for iv in ivs:
            c = C(algo, modecls(iv))
            ctx = c.encryptor() if encrypt else c.decryptor()
            e = min(s + ss, n)
            ctx.update_into(data[s:e], o[s:e + 15])
            s += ss
        return out

    def encrypt(self, sector: int, data) -> bytearray:
        out = self._run(sector, memoryview(data).cast("B"), True)
        del out[len(out) - 15:]
        return out

    def decrypt(self, sector: int, data) -> bytearray:
        out = self._run(sector, memoryview(data).cast("B"), False)
        del out[len(out) - 15:]
        return out

    def decrypt_into(self, sector: int, buf: memoryview) -> None:
        """Decrypt buf in place."""
        n = len(buf)
        buf[:] = memoryview(self._run(sector, memoryview(buf), False))[:n]
