"""LUKS1's anti-forensic information splitter (crypto/afsplit.c, LUKS1 spec section 2.4).

split(D): stripes s_0..s_{n-2} are random, d = diffuse(d ^ s_i) over them, and the
last stripe is d ^ D; merge() replays the diffusion.  ``diffuse`` hashes the buffer
in digest-sized pieces, each prefixed by its big-endian 32-bit index (the last piece
truncated).
"""
from __future__ import annotations

import os

from .cipher import DIGEST_LEN, new_hash


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(
        len(a), "little")


def _diffuse(hash_name: str, data: bytes, empty) -> bytes:
    """``empty``: a fresh hashes.Hash of hash_name, copied for each piece (cheaper
    than a new one, which matters over thousands of stripes)."""
    dlen = DIGEST_LEN[hash_name]
    out = []
    for i in range(0, len(data), dlen):
        h = empty.copy()
        piece = data[i:i + dlen]
        h.update((i // dlen).to_bytes(4, "big") + piece)
        out.append(h.finalize()[:len(piece)])
    return b"".join(out)


def split(hash_name: str, key: bytes, stripes: int) -> bytes:
    n = len(key)
    rnd = os.urandom(n * (stripes - 1))
    d = bytes(n)
    empty = new_hash(hash_name)
    for i in range(stripes - 1):
        d = _diffuse(hash_name, _xor(d, rnd[i * n:(i + 1) * n]), empty)
    return rnd + _xor(d, key)


def merge(hash_name: str, material: bytes, key_len: int, stripes: int) -> bytes:
    n = key_len
    d = bytes(n)
    empty = new_hash(hash_name)
    for i in range(stripes - 1):
        d = _diffuse(hash_name, _xor(d, material[i * n:(i + 1) * n]), empty)
    return _xor(d, material[(stripes - 1) * n:stripes * n])
