"""The legacy qcow/qcow2 AES encryption (QEMU's crypto/block-qcow.c).

No on-disk header: the key is the first 16 bytes of the secret (zero-padded), the
payload AES-128-CBC over 512-byte sectors with
plain64 IVs.  qcow2 numbers the sectors by *guest* offset for this format (its
crypt_physical_offset is false), unlike LUKS.  QEMU keeps it for qemu-img and
qemu-io only (system emulators refuse it): it is weak, use LUKS for new images.
"""
from __future__ import annotations

from .cipher import SectorCipher

SECTOR_SIZE = 512
KEY_SIZE = 16


class QcowBlock:
    """An opened qcow AES volume; ``cipher`` is None when opened without I/O."""

    physical_offset = False         # qcow2: IVs from guest sectors

    def __init__(self, password: bytes | None):
        self.sector_size = SECTOR_SIZE
        self.payload_offset = 0
        self.cipher = None
        if password is not None:
            self.cipher = SectorCipher("aes-128", "cbc", derive_key(password), "plain64")

    def encrypt(self, sector: int, data) -> bytearray:
        return self.cipher.encrypt(sector, data)

    def decrypt(self, sector: int, data) -> bytearray:
        return self.cipher.decrypt(sector, data)

    @staticmethod
    def info() -> dict:
        """QCryptoBlockInfoQCow has no members."""
        return {}


def derive_key(password: bytes) -> bytes:
    """qcrypto_block_qcow_init(): memcpy(keybuf, password, MIN(strlen(password), 16))
    (the secret holds no NUL: its UTF-8 check refuses one)."""
    key = password[:KEY_SIZE]
    return key + bytes(KEY_SIZE - len(key))
