/*
 * crypto.c - the byte shuffling around bulk AES-ECB calls that lets
 * blockengine.crypto.cipher encrypt many 512-byte sectors at once.
 *
 * Theory of operation
 * -------------------
 * No block cipher lives here: every AES operation is done by the
 * ``cryptography`` package, over whole buffers in ECB mode (AES-NI fast).
 * What a per-sector mode adds around the block cipher is cheap and
 * independent of the key, and that is what these functions do:
 *
 *   XTS  C = E_K1(P ^ T) ^ T, with T = E_K2(iv) * alpha^j for block j of a
 *        sector (IEEE 1619).  The caller encrypts all sector IVs in one ECB
 *        call (giving each sector's first tweak); be_xts_xor() applies the
 *        tweak stream before and after one ECB call over the whole buffer.
 *   CBC  decrypt: P_j = D(C_j) ^ C_{j-1} (C_{-1} = iv), so one ECB decrypt of
 *        the buffer plus be_cbc_decrypt_xor().  Encrypt is sequential within
 *        a sector but independent across sectors: be_cbc_encrypt_step()
 *        gathers block j of every sector ("lanes"), the caller encrypts the
 *        lanes in one ECB call, and the next step scatters them back; that is
 *        one ECB call per block of a sector (32), whatever the buffer size.
 *   CTR  keystream = E(iv + j) (128-bit big-endian counter, as OpenSSL):
 *        be_ctr_counters() writes the counter blocks, the caller encrypts
 *        them, be_xor() applies the keystream.
 *
 * IVs are 16 bytes, one per sector, in a caller-provided array; sector k of
 * a buffer is bytes [k * sector_size, (k + 1) * sector_size).
 */
#include "be.h"

#define BLK 16

/* GF(2^128) multiplication by x of a little-endian tweak (IEEE 1619 5.2). */
static inline void gf_mul_alpha(uint64_t *lo, uint64_t *hi)
{
    uint64_t carry = *hi >> 63;
    *hi = (*hi << 1) | (*lo >> 63);
    *lo = (*lo << 1) ^ (carry * 0x87);
}

static inline void st64be(uint8_t *p, uint64_t v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static int sector_geometry_ok(size_t len, size_t sector_size)
{
    return sector_size > 0 && sector_size % BLK == 0 && len % BLK == 0;
}

/* Number of sectors (the last one may be short) covering len bytes. */
static size_t sectors_in(size_t len, size_t sector_size)
{
    return len / sector_size + (len % sector_size != 0);
}

int be_sector_ivs(uint8_t *out, size_t out_len, uint64_t first_sector,
                  int64_t count, int width)
{
    if ((width != 4 && width != 8) || count < 0)
        return BE_EINVAL;
    if ((uint64_t)count > out_len / BLK)
        return BE_ERANGE;
    for (int64_t i = 0; i < count; i++) {
        uint64_t sector = first_sector + (uint64_t)i;   /* wraps as QEMU's */
        if (width == 4)
            sector &= 0xFFFFFFFFu;
        be_st64le(out + i * BLK, sector);
        memset(out + i * BLK + 8, 0, 8);
    }
    return BE_OK;
}

int be_xts_xor(uint8_t *dst, size_t dst_len, const uint8_t *src, size_t src_len,
               size_t len, const uint8_t *tweaks, size_t tweaks_len,
               size_t sector_size)
{
    if (!sector_geometry_ok(len, sector_size))
        return BE_EINVAL;
    if (len > dst_len || len > src_len
            || sectors_in(len, sector_size) > tweaks_len / BLK)
        return BE_ERANGE;
    for (size_t pos = 0, k = 0; pos < len; k++) {
        uint64_t lo = be_ld64le(tweaks + k * BLK);
        uint64_t hi = be_ld64le(tweaks + k * BLK + 8);
        size_t end = pos + sector_size < len ? pos + sector_size : len;
        for (; pos < end; pos += BLK) {
            /* dst may be src: each block is read before it is written */
            be_st64le(dst + pos, be_ld64le(src + pos) ^ lo);
            be_st64le(dst + pos + 8, be_ld64le(src + pos + 8) ^ hi);
            gf_mul_alpha(&lo, &hi);
        }
    }
    return BE_OK;
}

int be_cbc_decrypt_xor(uint8_t *dst, size_t dst_len,
                       const uint8_t *decrypted, size_t decrypted_len,
                       const uint8_t *ciphertext, size_t ciphertext_len,
                       size_t len, const uint8_t *ivs, size_t ivs_len,
                       size_t sector_size)
{
    if (!sector_geometry_ok(len, sector_size))
        return BE_EINVAL;
    if (len > dst_len || len > decrypted_len || len > ciphertext_len
            || sectors_in(len, sector_size) > ivs_len / BLK)
        return BE_ERANGE;
    /* Backwards, so dst may be decrypted or ciphertext: block b reads
     * ciphertext block b - 1, which is only written after it. */
    for (size_t pos = len; pos > 0;) {
        pos -= BLK;
        const uint8_t *chain = pos % sector_size
            ? ciphertext + pos - BLK : ivs + pos / sector_size * BLK;
        uint64_t a = be_ld64le(decrypted + pos) ^ be_ld64le(chain);
        uint64_t b = be_ld64le(decrypted + pos + 8) ^ be_ld64le(chain + 8);
        be_st64le(dst + pos, a);
        be_st64le(dst + pos + 8, b);
    }
    return BE_OK;
}

int be_cbc_encrypt_step(uint8_t *out, size_t out_len,
                        const uint8_t *plain, size_t plain_len, size_t len,
                        uint8_t *lanes, size_t lanes_len, size_t sector_size,
                        int64_t block)
{
    if (!sector_geometry_ok(len, sector_size) || len % sector_size != 0)
        return BE_EINVAL;
    size_t count = len / sector_size;
    int64_t blocks = (int64_t)(sector_size / BLK);
    if (block < 0 || block > blocks)
        return BE_EINVAL;
    if (len > out_len || len > plain_len || count > lanes_len / BLK)
        return BE_ERANGE;
    for (size_t k = 0; k < count; k++) {
        uint8_t *lane = lanes + k * BLK;
        size_t base = k * sector_size;
        /* out may be plain: block - 1 is written after it was consumed */
        if (block > 0)
            memcpy(out + base + (size_t)(block - 1) * BLK, lane, BLK);
        if (block < blocks) {
            const uint8_t *p = plain + base + (size_t)block * BLK;
            be_st64le(lane, be_ld64le(lane) ^ be_ld64le(p));
            be_st64le(lane + 8, be_ld64le(lane + 8) ^ be_ld64le(p + 8));
        }
    }
    return BE_OK;
}

int be_ctr_counters(uint8_t *out, size_t out_len, size_t len,
                    const uint8_t *ivs, size_t ivs_len, size_t sector_size)
{
    if (!sector_geometry_ok(len, sector_size))
        return BE_EINVAL;
    if (len > out_len || sectors_in(len, sector_size) > ivs_len / BLK)
        return BE_ERANGE;
    for (size_t pos = 0, k = 0; pos < len; k++) {
        uint64_t hi = be_ld64be(ivs + k * BLK);
        uint64_t lo = be_ld64be(ivs + k * BLK + 8);
        size_t end = pos + sector_size < len ? pos + sector_size : len;
        for (; pos < end; pos += BLK) {
            st64be(out + pos, hi);
            st64be(out + pos + 8, lo);
            hi += (++lo == 0);
        }
    }
    return BE_OK;
}

int be_xor(uint8_t *dst, size_t dst_len, const uint8_t *src, size_t src_len,
           size_t len)
{
    if (len > dst_len || len > src_len)
        return BE_ERANGE;
    size_t pos = 0;
    for (; pos + 8 <= len; pos += 8) {
        uint64_t a, b;
        memcpy(&a, dst + pos, 8);
        memcpy(&b, src + pos, 8);
        a ^= b;
        memcpy(dst + pos, &a, 8);
    }
    for (; pos < len; pos++)
        dst[pos] ^= src[pos];
    return BE_OK;
}
