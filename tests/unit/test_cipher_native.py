"""The bulk sector-cipher engine (bulk AES-ECB + native/crypto.c) against the
per-sector engine (one ``cryptography`` call per sector, QEMU's helper loop).

Three layers:
* known answers: IEEE 1619 XTS vectors and a CBC-ESSIV chain computed by hand
  from single-block AES, on every engine;
* hypothesis differential tests of the sector functions: native against their
  pure-Python twins, valid and invalid arguments (same result, exception type
  and buffer contents);
* hypothesis differential tests of ``SectorCipher``: every supported
  algorithm/mode/IV generator, random sector numbers (around the 2**32 and
  2**64 wraps) and lengths (whole sectors plus a partial tail), bulk engine
  on both backends against the per-sector engine.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings, strategies as st

from blockengine import _native
from blockengine import _pynative as PY
from blockengine.crypto.cipher import SectorCipher, digest

NAT = _native.native_api()
ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI") == "true"
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _require_native():
    if NAT is None:
        message = f"blockengine._be_native is not built ({_native.NATIVE_IMPORT_ERROR})"
        if IN_CI:
            pytest.fail(message + "; CI must test the native backend")
        pytest.skip(message)


@pytest.fixture(params=["per-sector", "bulk-python", "bulk-native"])
def engine(request):
    """The bulk_ops argument of each engine in turn."""
    if request.param == "bulk-native":
        _require_native()
        return NAT
    return PY if request.param == "bulk-python" else None


# ------------------------------------------------------------ known answers
def test_xts_ieee1619_vectors(engine):
    # IEEE 1619-2007 annex B, vectors 2 and 4 (a 32-byte and a 512-byte data unit)
    key = bytes([0x11]) * 16 + bytes([0x22]) * 16
    plain = bytes([0x44]) * 32
    c = SectorCipher("aes-128", "xts", key, "plain64", sector_size=32, bulk_ops=engine)
    assert c.encrypt(0x3333333333, plain).hex() == (
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")
    key = bytes.fromhex("2718281828459045235360287471352631415926535897932384626433832795")
    plain = bytes(range(256)) * 2
    c = SectorCipher("aes-128", "xts", key, "plain64", bulk_ops=engine)
    enc = c.encrypt(0, plain)
    assert enc[:32].hex() == "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    assert enc[-16:].hex() == "0a282df920147beabe421ee5319d0568"
    assert c.decrypt(0, enc) == plain


def test_xts_equal_key_halves_refused_on_encrypt(engine):
    """OpenSSL refuses XTS encryption with equal key halves; every engine keeps that."""
    c = SectorCipher("aes-128", "xts", bytes(32), "plain64", bulk_ops=engine)
    with pytest.raises(ValueError, match="duplicated keys"):
        c.encrypt(0, bytes(1024))
    assert len(c.decrypt(0, bytes(1024))) == 1024


def _aes_block(key, block, encrypt=True):
    c = Cipher(algorithms.AES(key), modes.ECB())
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(block) + ctx.finalize()


def _xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


def test_cbc_essiv_by_hand(engine):
    key = bytes(range(32))
    salt = digest("sha256", key)
    plain = os.urandom(512 * 3)
    c = SectorCipher("aes-256", "cbc", key, "essiv", "sha256", bulk_ops=engine)
    enc = c.encrypt(41, plain)
    for k in range(3):
        chain = _aes_block(salt, (41 + k).to_bytes(8, "little") + bytes(8))
        for j in range(32):
            pos = 512 * k + 16 * j
            chain = _aes_block(key, _xor(plain[pos:pos + 16], chain))
            assert enc[pos:pos + 16] == chain
    buf = bytearray(enc)
    c.decrypt_into(41, memoryview(buf))
    assert buf == plain


def test_ctr_counter_carries_across_64_bits(engine):
    key = bytes(range(16))
    c = SectorCipher("aes-128", "ctr", key, "plain64", bulk_ops=engine)
    # plain64 IV of sector 2**64 - 1: counter bytes ff*8 00*8 (big-endian add)
    enc = c.encrypt((1 << 64) - 1, bytes(64))
    iv = int.from_bytes(b"\xff" * 8 + bytes(8), "big")
    stream = b"".join(_aes_block(key, (iv + j).to_bytes(16, "big")) for j in range(4))
    assert enc == stream


# ----------------------------------------------------- sector functions diff
def _outcome(impl, name, args):
    args = [bytearray(a) if isinstance(a, bytearray) else a for a in args]
    try:
        result = ("ok", getattr(impl, name)(*args))
    except (ValueError, IndexError, TypeError) as exc:
        result = ("raise", type(exc))
    return result, [a for a in args if isinstance(a, bytearray)]


def same(name, *args):
    _require_native()
    assert _outcome(NAT, name, args) == _outcome(PY, name, args), (name, args)


def lengths(limit):
    """Mostly multiples of 16 within limit, sometimes not, negative or huge."""
    good = st.integers(0, limit // 16).map(lambda n: n * 16)
    return st.one_of(good, good, good, st.integers(-32, limit + 32),
                     st.sampled_from([-16, 1 << 64, (1 << 64) + 16]))


sector_sizes = st.one_of(st.sampled_from([16, 32, 48, 512]), st.integers(-16, 80))
buffers = st.integers(0, 1200).flatmap(lambda n: st.binary(min_size=n, max_size=n))


@SETTINGS
@given(first=st.one_of(st.integers(0, 1 << 33), st.integers((1 << 64) - 40, 1 << 64),
                       st.integers(-5, 0)),
       count=st.integers(-2, 40), width=st.sampled_from([4, 8, 8, 4, 0, 16]),
       room=st.integers(0, 700))
def test_sector_ivs_same(first, count, width, room):
    same("sector_ivs", bytearray(os.urandom(room)), first, count, width)


@SETTINGS
@given(src=buffers, dst_slack=st.integers(-32, 32), data=st.data())
def test_xts_xor_same(src, dst_slack, data):
    ss = data.draw(sector_sizes)
    length = data.draw(lengths(len(src)))
    tweaks = data.draw(st.binary(max_size=16 * 80))
    dst = bytearray(max(0, len(src) + dst_slack))
    same("xts_xor", dst, src, length, tweaks, ss)
    src = bytearray(src)            # in place
    same("xts_xor", src, src, length, tweaks, ss)


@SETTINGS
@given(dec=buffers, data=st.data())
def test_cbc_decrypt_xor_same(dec, data):
    ss = data.draw(sector_sizes)
    length = data.draw(lengths(len(dec)))
    ct = data.draw(st.binary(min_size=len(dec), max_size=len(dec) + 16))
    ivs = data.draw(st.binary(max_size=16 * 80))
    same("cbc_decrypt_xor", bytearray(len(dec)), dec, ct, length, ivs, ss)
    # in place over either source, as SectorCipher uses it
    buf = bytearray(ct)
    same("cbc_decrypt_xor", buf, dec, buf, length, ivs, ss)
    buf = bytearray(dec)
    same("cbc_decrypt_xor", buf, buf, ct, length, ivs, ss)


@SETTINGS
@given(plain=buffers, data=st.data())
def test_cbc_encrypt_step_same(plain, data):
    ss = data.draw(sector_sizes)
    length = data.draw(st.one_of(lengths(len(plain)),
                                 st.integers(0, 3).map(lambda n: n * max(ss, 16))))
    block = data.draw(st.one_of(st.integers(0, 33), st.integers(-2, 40)))
    lanes = bytearray(data.draw(st.binary(max_size=16 * 80)))
    same("cbc_encrypt_step", bytearray(len(plain)), plain, length, lanes, ss, block)
    buf = bytearray(plain)
    same("cbc_encrypt_step", buf, buf, length, lanes, ss, block)


@SETTINGS
@given(room=st.integers(0, 1200), data=st.data())
def test_ctr_counters_same(room, data):
    ss = data.draw(sector_sizes)
    length = data.draw(lengths(room))
    ivs = data.draw(st.one_of(st.binary(max_size=16 * 80),
                              st.just(b"\xff" * 16 * 80)))   # carries
    same("ctr_counters", bytearray(room), length, ivs, ss)


@SETTINGS
@given(dst=buffers, src=buffers, length=st.integers(-4, 1300))
def test_xor_into_same(dst, src, length):
    same("xor_into", bytearray(dst), src, length)


@pytest.mark.parametrize("name", ["sector_ivs", "xts_xor", "cbc_decrypt_xor",
                                  "cbc_encrypt_step", "ctr_counters", "xor_into"])
def test_read_only_destination_is_refused(name):
    _require_native()
    args = {"sector_ivs": (bytes(64), 0, 4, 8),
            "xts_xor": (bytes(64), bytes(64), 64, bytes(64), 32),
            "cbc_decrypt_xor": (bytes(64), bytes(64), bytes(64), 64, bytes(64), 32),
            "cbc_encrypt_step": (bytes(64), bytes(64), 64, bytearray(64), 32, 0),
            "ctr_counters": (bytes(64), 64, bytes(64), 32),
            "xor_into": (bytes(64), bytes(64), 64)}[name]
    for impl in (NAT, PY):
        with pytest.raises(TypeError):
            getattr(impl, name)(*args)


# ------------------------------------------------------- SectorCipher diff
# (cipher alg, mode, ivgen alg, ivgen hash) combinations blockengine runs
CONFIGS = [(alg, mode, iv, h)
           for alg in ("aes-128", "aes-192", "aes-256")
           for mode in ("xts", "cbc", "ctr", "ecb")
           if not (mode == "xts" and alg == "aes-192")
           for iv, h in (("plain", None), ("plain64", None), ("essiv", "sha256"),
                         ("essiv", "md5"))]
KEY_LEN = {"aes-128": 16, "aes-192": 24, "aes-256": 32}


@st.composite
def cipher_jobs(draw):
    alg, mode, iv, h = draw(st.sampled_from(CONFIGS))
    key = draw(st.binary(min_size=KEY_LEN[alg] * (2 if mode == "xts" else 1),
                         max_size=KEY_LEN[alg] * (2 if mode == "xts" else 1)))
    sectors = draw(st.integers(0, 9))
    # a partial last sector: blocks for ECB/CBC, a whole block at least for XTS,
    # any bytes for CTR
    tail = draw({"ctr": st.integers(0, 511), "xts": st.integers(1, 31).map(lambda b: 16 * b)}
                .get(mode, st.integers(0, 31).map(lambda b: 16 * b)))
    if draw(st.booleans()):
        tail = 0
    length = max(16, sectors * 512 + tail) if mode == "xts" else sectors * 512 + tail
    data = draw(st.binary(min_size=length, max_size=length))
    sector = draw(st.one_of(st.integers(0, 1 << 20),
                            st.integers((1 << 32) - 10, (1 << 32) + 10),
                            st.integers((1 << 64) - 10, (1 << 64) - 1)))
    return (alg, mode, key, iv, h), sector, data


@SETTINGS
@given(job=cipher_jobs())
def test_sector_cipher_engines_agree(job):
    config, sector, data = job
    key = config[2]
    if config[1] == "xts" and key[:len(key) // 2] == key[len(key) // 2:]:
        return      # refused on encrypt (see test_xts_equal_key_halves_refused_on_encrypt)
    reference = SectorCipher(*config, bulk_ops=None)
    expected = reference.encrypt(sector, data)
    assert reference.decrypt(sector, expected) == data
    for ops in filter(None, (NAT, PY)):
        if ops is PY and len(data) > 2048:
            continue        # the pure twins are slow; short buffers cover them
        c = SectorCipher(*config, bulk_ops=ops)
        assert c.encrypt(sector, data) == expected
        assert c.encrypt(sector, memoryview(data)) == expected
        assert c.decrypt(sector, expected) == data
        buf = bytearray(expected)
        c.decrypt_into(sector, memoryview(buf))
        assert buf == data


def test_bulk_engine_matches_per_sector_on_large_buffers():
    """A few MiB through the bulk engine: what LUKS reads and writes per request."""
    _require_native()
    data = os.urandom(4 << 20)
    for config in (("aes-256", "xts", os.urandom(64), "plain64", None),
                   ("aes-256", "cbc", os.urandom(32), "essiv", "sha256"),
                   ("aes-128", "ctr", os.urandom(16), "plain", None)):
        reference = SectorCipher(*config, bulk_ops=None)
        bulk = SectorCipher(*config, bulk_ops=NAT)
        assert bulk.engine == "bulk" and reference.engine == "per-sector"
        enc = bulk.encrypt(1 << 31, data)
        assert enc == reference.encrypt(1 << 31, data)
        buf = bytearray(enc)
        bulk.decrypt_into(1 << 31, memoryview(buf))
        assert buf == data


# ------------------------------------------------------------ engine choice
def _engine_in_subprocess(**env):
    environ = {k: v for k, v in os.environ.items() if k != "BLOCKENGINE_PURE"}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    code = ("from blockengine.crypto.cipher import SectorCipher; "
            "print(SectorCipher('aes-256', 'xts', bytes(range(64)), 'plain64').engine)")
    out = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pure_env_selects_per_sector_engine():
    assert _engine_in_subprocess(BLOCKENGINE_PURE="1") == "per-sector"


def test_default_engine_is_bulk_when_native_built():
    _require_native()
    assert _engine_in_subprocess() == "bulk"


def test_ecb_and_odd_sector_sizes_use_per_sector_engine():
    _require_native()
    assert SectorCipher("aes-128", "ecb", bytes(16), "plain64", bulk_ops=NAT).engine == "per-sector"
    assert SectorCipher("aes-128", "cbc", bytes(16), "plain64", sector_size=520,
                        bulk_ops=NAT).engine == "per-sector"


def test_stale_native_build_is_not_used():
    """A compiled module from before native/crypto.c (no be_xts_xor...) must fail
    _build_api with AttributeError, which native_api() turns into the pure twins,
    instead of failing later in the middle of a LUKS read."""
    _require_native()
    from blockengine._be_native import ffi, lib

    class StaleLib:
        def __getattr__(self, name):
            if name == "be_xts_xor":
                raise AttributeError(name)
            return getattr(lib, name)
    with pytest.raises(AttributeError):
        _native._build_api(ffi, StaleLib())
