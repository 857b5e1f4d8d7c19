"""The LUKS1 layer and driver on their own: AF splitter, header round trip, ciphers
and IV generators, create/open/unlock through a graph, key slots, damaged headers."""
from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockengine.crypto import afsplit
from blockengine.crypto.cipher import IVGen, SectorCipher
from blockengine.crypto.luks import (HEADER_SIZE, LuksBlock, LuksError, LuksHeader,
                                     splitkey_sectors)
from blockengine.drivers.format.luks.driver import LuksDriver
from blockengine.errors import BlockError, InvalidArgument, InvalidImage
from blockengine.graph.graph import Graph

SECRETS = {"sec0": b"abc"}


def _create(path, size=1 << 20, **opts):
    opts = {"key-secret": "sec0", "iter-time": 5, **opts}
    LuksDriver.create(str(path), size, opts, secrets=SECRETS)


def _open(path, secret=b"abc", read_only=False, no_io=False):
    g = Graph()
    g.secrets = {"sec0": secret}
    opts = {"driver": "luks", "key-secret": "sec0",
            "file": {"driver": "file", "filename": str(path)}}
    if no_io:
        opts["x-no-io"] = True
    return g, g.open_node(opts, read_only=read_only)


def test_afsplit_roundtrip():
    key = os.urandom(64)
    for h in ("sha1", "sha256", "sha512"):
        material = afsplit.split(h, key, 4000)
        assert len(material) == 64 * 4000
        assert afsplit.merge(h, material, 64, 4000) == key
        bad = bytearray(material)
        bad[5] ^= 1
        assert afsplit.merge(h, bytes(bad), 64, 4000) != key


def test_header_roundtrip_and_layout(tmp_path):
    _create(tmp_path / "a.luks")
    raw = open(tmp_path / "a.luks", "rb").read(HEADER_SIZE)
    h = LuksHeader.unpack(raw)
    assert h.pack() == raw and HEADER_SIZE == 592
    # QEMU's layout: key material from sector 8, 4 KiB aligned, 4000 stripes
    per = splitkey_sectors(64, 4000)
    assert per == 504
    assert [s.key_offset for s in h.slots] == [8 + i * per for i in range(8)]
    assert h.payload_offset == 8 + 8 * per == 4040
    assert h.cipher_name.rstrip(b"\0") == b"aes"
    assert h.cipher_mode.rstrip(b"\0") == b"xts-plain64"
    assert os.path.getsize(tmp_path / "a.luks") == 4040 * 512 + (1 << 20)


def test_ivgens():
    assert IVGen("plain", 16, b"").iv(0x1_2345_6789) == bytes.fromhex("89674523") + bytes(12)
    assert IVGen("plain64", 16, b"").iv(0x1_2345_6789) == \
        bytes.fromhex("8967452301000000") + bytes(8)
    key = os.urandom(16)
    essiv = IVGen("essiv", 16, key, "sha256", "aes-128")
    from cryptography.hazmat.primitives import hashes
    h = hashes.Hash(hashes.SHA256())
    h.update(key)
    enc = Cipher(algorithms.AES(h.finalize()), modes.ECB()).encryptor()
    assert essiv.iv(7) == enc.update((7).to_bytes(8, "little") + bytes(8))
    assert essiv.ivs(5, 3) == [essiv.iv(5), essiv.iv(6), essiv.iv(7)]


@pytest.mark.parametrize("mode", ["xts", "cbc", "ctr", "ecb"])
def test_sector_cipher_matches_per_sector_reference(mode):
    key = os.urandom(64 if mode == "xts" else 32)
    sc = SectorCipher("aes-256", mode, key, "plain64")
    data = os.urandom(4096)
    enc = sc.encrypt(10, data)
    assert sc.decrypt(10, enc) == data
    for i in range(8):
        m = modes.ECB() if mode == "ecb" else {"xts": modes.XTS, "cbc": modes.CBC,
                                               "ctr": modes.CTR}[mode](
            (10 + i).to_bytes(8, "little") + bytes(8))
        ref = Cipher(algorithms.AES(key), m).encryptor().update(data[i * 512:(i + 1) * 512])
        assert enc[i * 512:(i + 1) * 512] == ref


@pytest.mark.parametrize("opts", [
    {},
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv"},
    {"cipher-alg": "aes-192", "cipher-mode": "cbc", "hash-alg": "sha1"},
    {"cipher-mode": "ctr", "ivgen-alg": "plain", "hash-alg": "sha512"},
    {"cipher-alg": "aes-128", "cipher-mode": "ecb"},
])
def test_create_write_read(tmp_path, opts):
    p = tmp_path / "x.luks"
    _create(p, **opts)
    g, node = _open(p)
    try:
        data = os.urandom(3 * 512 + 512)
        node.pwrite(1000, data)             # unaligned: RMW through the generic layer
        assert node.pread(1000, len(data)) == data
        assert node.total_size == 1 << 20
        info = node.drv.info_specific()["data"]
        assert info["slots"][0]["active"] and info["slots"][0]["stripes"] == 4000
        if opts.get("ivgen-alg") == "essiv":
            assert info["ivgen-hash-alg"] == "sha256"
    finally:
        g.close_all()
    # ciphertext on disk, and a reopen decrypts it
    assert data not in open(p, "rb").read()
    g, node = _open(p, read_only=True)
    assert node.pread(1000, len(data)) == data
    g.close_all()


def test_wrong_password_and_missing_secret(tmp_path):
    p = tmp_path / "x.luks"
    _create(p)
    with pytest.raises(BlockError, match="^Invalid password, cannot unlock any keyslot$"):
        _open(p, secret=b"abd")
    g = Graph()
    with pytest.raises(InvalidArgument, match="No secret with id 'sec0'"):
        g.open_node({"driver": "luks", "key-secret": "sec0",
                     "file": {"driver": "file", "filename": str(p)}})
    with pytest.raises(InvalidArgument, match="Parameter 'key-secret' is required"):
        g.open_node({"driver": "luks", "file": {"driver": "file", "filename": str(p)}})
    # metadata-only opens need no key (qemu-img info)
    g2 = Graph()
    node = g2.open_node({"driver": "luks", "x-no-io": True,
                         "file": {"driver": "file", "filename": str(p)}})
    assert node.drv.info_specific()["type"] == "luks"
    g2.close_all()


def test_keyslot_add_erase(tmp_path):
    p = tmp_path / "x.luks"
    _create(p)
    g, node = _open(p)
    node.pwrite(0, b"\x11" * 4096)
    assert node.drv.add_keyslot(b"second", iter_time=5) == 1
    node.drv.erase_keyslot(0)
    g.close_all()
    with pytest.raises(BlockError, match="Invalid password"):
        _open(p)
    g, node = _open(p, secret=b"second")
    assert node.pread(0, 4096) == b"\x11" * 4096
    with pytest.raises(BlockError, match="only active keyslot"):
        node.drv.erase_keyslot(1)
    g.close_all()


def test_create_option_errors(tmp_path):
    p = str(tmp_path / "x.luks")
    with pytest.raises(InvalidArgument, match="key-secret' is required"):
        LuksDriver.create(p, 1 << 20, {}, secrets=SECRETS)
    with pytest.raises(InvalidArgument, match="No AES cipher with key size 20"):
        _create(p, **{"cipher-alg": "aes-128", "ivgen-alg": "essiv",
                      "ivgen-hash-alg": "sha1"})
    with pytest.raises(BlockError, match="not supported"):
        _create(p, **{"cipher-alg": "serpent-256"})
    with pytest.raises(BlockError, match="not supported"):
        _create(p, **{"cipher-mode": "ofb"})


def _mutate(raw, off, data):
    b = bytearray(raw)
    b[off:off + len(data)] = data
    return bytes(b)


@pytest.mark.parametrize("off,data,msg", [
    (0, b"X", "Volume is not in LUKS format"),
    (6, b"\0\2", "LUKS version 2 is not supported"),
    (8, b"a" * 32, "LUKS header cipher name is not NUL terminated"),
    (40, b"ofb-plain64\0", "Cipher mode 'ofb' not supported"),
    (40, b"xts\0", "Unexpected cipher mode string format 'xts'"),
    (72, b"whirlpool\0", "Hash algorithm 'whirlpool' not supported"),
    (104, struct.pack(">I", 4), "LUKS payload is overlapping with the header"),
    (108, struct.pack(">I", 40), "Algorithm 'aes' with key size 20 bytes not supported"),
    (164, struct.pack(">I", 0), "LUKS key iteration count is zero"),
    (208 + 44, struct.pack(">I", 3999), r"Keyslot 0 is corrupted \(stripes 3999 != 4000\)"),
    (208 + 48, struct.pack(">I", 7), r"Keyslot 1 state \(active/disable\) is corrupted"),
    (208 + 40, struct.pack(">I", 2), "Keyslot 0 is overlapping with the LUKS header"),
    (208 + 88, struct.pack(">I", 100), "Keyslots 0 and 1 are overlapping in the header"),
])
def test_damaged_headers(tmp_path, off, data, msg):
    p = tmp_path / "x.luks"
    _create(p)
    raw = open(p, "rb").read()
    open(p, "wb").write(_mutate(raw, off, data))
    with pytest.raises(InvalidImage, match="^%s$" % msg):
        _open(p, no_io=True)
