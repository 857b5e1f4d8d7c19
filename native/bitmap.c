/*
 * bitmap.c - dirty bitmap primitives (the level-0 operations of
 * util/hbitmap.c) and zero detection (util/bufferiszero.c).
 *
 * A bitmap is an array of little-endian 64-bit words: bit i is bit i % 64 of
 * word i / 64, i.e. bit i % 8 of byte i / 8.  That is also the qcow2 on-disk
 * bitmap data layout (docs/interop/qcow2.rst, "Bitmap data"), so
 * (de)serialization is a bit-shifted copy.
 */
#include "be.h"

static inline int bitmap_ok(size_t len)
{
    return (len & 7) == 0;
}

/* Mask of bits [lo, hi) of a word, 0 <= lo < hi <= 64. */
static inline uint64_t bits_mask(unsigned lo, unsigned hi)
{
    uint64_t m = hi >= 64 ? ~0ULL : (1ULL << hi) - 1;
    return m & (~0ULL << lo);
}

static inline uint8_t byte_mask(unsigned lo, unsigned hi)
{
    return (uint8_t)(((1u << hi) - 1) & (0xffu << lo));
}

static void fill_range(uint8_t *buf, int64_t start, int64_t n, int set)
{
    int64_t end = start + n;
    int64_t b0 = start >> 3, b1 = end >> 3;

    if (n == 0) {
        return;
    }
    if (b0 == b1) {
        uint8_t m = byte_mask((unsigned)(start & 7), (unsigned)(end & 7));
        buf[b0] = set ? (buf[b0] | m) : (buf[b0] & ~m);
        return;
    }
    if (start & 7) {
        uint8_t m = byte_mask((unsigned)(start & 7), 8);
        buf[b0] = set ? (buf[b0] | m) : (buf[b0] & ~m);
        b0++;
    }
    memset(buf + b0, set ? 0xff : 0, (size_t)(b1 - b0));
    if (end & 7) {
        uint8_t m = byte_mask(0, (unsigned)(end & 7));
        buf[b1] = set ? (buf[b1] | m) : (buf[b1] & ~m);
    }
}

int be_bitmap_set_range(uint8_t *buf, size_t len, int64_t start, int64_t n)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(start, n, (int64_t)len * 8)) {
        return BE_ERANGE;
    }
    fill_range(buf, start, n, 1);
    return BE_OK;
}

int be_bitmap_reset_range(uint8_t *buf, size_t len, int64_t start, int64_t n)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(start, n, (int64_t)len * 8)) {
        return BE_ERANGE;
    }
    fill_range(buf, start, n, 0);
    return BE_OK;
}

int64_t be_bitmap_count(const uint8_t *buf, size_t len,
                        int64_t start, int64_t n)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(start, n, (int64_t)len * 8)) {
        return BE_ERANGE;
    }
    if (n == 0) {
        return 0;
    }
    int64_t end = start + n;
    int64_t w0 = start >> 6, w1 = end >> 6;
    int64_t count;

    if (w0 == w1) {
        uint64_t m = bits_mask((unsigned)(start & 63), (unsigned)(end & 63));
        return __builtin_popcountll(be_ld64le(buf + 8 * w0) & m);
    }
    count = __builtin_popcountll(be_ld64le(buf + 8 * w0) &
                                 (~0ULL << (start & 63)));
    for (int64_t w = w0 + 1; w < w1; w++) {
        count += __builtin_popcountll(be_ld64le(buf + 8 * w));
    }
    if (end & 63) {
        count += __builtin_popcountll(be_ld64le(buf + 8 * w1) &
                                      bits_mask(0, (unsigned)(end & 63)));
    }
    return count;
}

/* First bit in [start, end) equal to `value`, or BE_NONE. */
static int64_t find_bit(const uint8_t *buf, int64_t start, int64_t end,
                        int value)
{
    const uint64_t flip = value ? 0 : ~0ULL;
    int64_t w, w_end;
    uint64_t word;

    if (start >= end) {
        return BE_NONE;
    }
    w = start >> 6;
    w_end = (end + 63) >> 6;
    word = (be_ld64le(buf + 8 * w) ^ flip) & (~0ULL << (start & 63));
    for (;;) {
        if (word) {
            int64_t bit = (w << 6) + __builtin_ctzll(word);
            return bit < end ? bit : BE_NONE;
        }
        w++;
        /* skip uninteresting words four at a time */
        while (w + 4 <= w_end) {
            const uint8_t *p = buf + 8 * w;
            uint64_t a = be_ld64le(p) ^ flip, b = be_ld64le(p + 8) ^ flip;
            uint64_t c = be_ld64le(p + 16) ^ flip, d = be_ld64le(p + 24) ^ flip;
            if (a | b | c | d) {
                break;
            }
            w += 4;
        }
        if (w >= w_end) {
            return BE_NONE;
        }
        word = be_ld64le(buf + 8 * w) ^ flip;
    }
}

int64_t be_bitmap_next_set(const uint8_t *buf, size_t len,
                           int64_t start, int64_t end)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (start < 0 || end < start || end > (int64_t)len * 8) {
        return BE_ERANGE;
    }
    return find_bit(buf, start, end, 1);
}

int64_t be_bitmap_next_clear(const uint8_t *buf, size_t len,
                             int64_t start, int64_t end)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (start < 0 || end < start || end > (int64_t)len * 8) {
        return BE_ERANGE;
    }
    return find_bit(buf, start, end, 0);
}

/* mirrors hbitmap_next_dirty_area() */
int64_t be_bitmap_next_dirty_area(const uint8_t *buf, size_t len,
                                  int64_t start, int64_t end,
                                  int64_t max_len, int64_t *length)
{
    if (!bitmap_ok(len) || max_len < 1) {
        return BE_EINVAL;
    }
    if (start < 0 || end < start || end > (int64_t)len * 8) {
        return BE_ERANGE;
    }
    int64_t first = find_bit(buf, start, end, 1);
    if (first < 0) {
        return BE_NONE;
    }
    int64_t limit = end - first < max_len ? end : first + max_len;
    int64_t clear = find_bit(buf, first, limit, 0);
    *length = (clear < 0 ? limit : clear) - first;
    return first;
}

int be_bitmap_merge_or(uint8_t *dst, size_t dst_len,
                       const uint8_t *src, size_t src_len)
{
    if (!bitmap_ok(dst_len) || dst_len != src_len) {
        return BE_EINVAL;
    }
    for (size_t off = 0; off < dst_len; off += 8) {
        be_st64le(dst + off, be_ld64le(dst + off) | be_ld64le(src + off));
    }
    return BE_OK;
}

int be_bitmap_serialize(const uint8_t *buf, size_t len,
                        int64_t start, int64_t n,
                        uint8_t *out, size_t out_len)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(start, n, (int64_t)len * 8) ||
        (uint64_t)out_len < ((uint64_t)n + 7) / 8) {
        return BE_ERANGE;
    }
    size_t nbytes = (size_t)((n + 7) / 8);
    const uint8_t *src = buf + (start >> 3);
    unsigned sh = (unsigned)(start & 7);

    if (nbytes == 0) {
        return BE_OK;
    }
    if (sh == 0) {
        memcpy(out, src, nbytes);
    } else {
        /* the source spans ((start & 7) + n + 7) / 8 bytes */
        size_t src_bytes = (size_t)((sh + n + 7) / 8);
        for (size_t j = 0; j < nbytes; j++) {
            unsigned v = src[j] >> sh;
            if (j + 1 < src_bytes) {
                v |= (unsigned)src[j + 1] << (8 - sh);
            }
            out[j] = (uint8_t)v;
        }
    }
    if (n & 7) {
        out[nbytes - 1] &= byte_mask(0, (unsigned)(n & 7));
    }
    return BE_OK;
}

int be_bitmap_deserialize(uint8_t *buf, size_t len, int64_t start, int64_t n,
                          const uint8_t *data, size_t data_len)
{
    if (!bitmap_ok(len)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(start, n, (int64_t)len * 8) ||
        (uint64_t)data_len < ((uint64_t)n + 7) / 8) {
        return BE_ERANGE;
    }
    uint8_t *dst = buf + (start >> 3);
    unsigned sh = (unsigned)(start & 7);
    int64_t full = n >> 3;      /* whole source bytes */
    unsigned tail = (unsigned)(n & 7);

    if (sh == 0) {
        memcpy(dst, data, (size_t)full);
        if (tail) {
            uint8_t m = byte_mask(0, tail);
            dst[full] = (uint8_t)((dst[full] & ~m) | (data[full] & m));
        }
        return BE_OK;
    }
    for (int64_t j = 0; j <= full; j++) {
        unsigned nbits = j < full ? 8 : tail;
        if (nbits == 0) {
            break;
        }
        /* source bits [0, nbits) of data[j] land at bit sh of dst[j] */
        uint16_t m = (uint16_t)(((1u << nbits) - 1) << sh);
        uint16_t v = (uint16_t)((unsigned)data[j] << sh) & m;
        dst[j] = (uint8_t)((dst[j] & ~m) | v);
        if (m >> 8) {
            dst[j + 1] = (uint8_t)((dst[j + 1] & ~(m >> 8)) | (v >> 8));
        }
    }
    return BE_OK;
}

/* --- zero detection ----------------------------------------------------- */

static int is_zero(const uint8_t *p, size_t len)
{
    /* the first and last bytes catch most non-zero buffers cheaply */
    if (len == 0) {
        return 1;
    }
    if (p[0] | p[len - 1]) {
        return 0;
    }
    while (len >= 64) {
        uint64_t acc = be_ld64le(p) | be_ld64le(p + 8) | be_ld64le(p + 16) |
                       be_ld64le(p + 24) | be_ld64le(p + 32) |
                       be_ld64le(p + 40) | be_ld64le(p + 48) |
                       be_ld64le(p + 56);
        if (acc) {
            return 0;
        }
        p += 64;
        len -= 64;
    }
    while (len >= 8) {
        if (be_ld64le(p)) {
            return 0;
        }
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        if (*p++) {
            return 0;
        }
        len--;
    }
    return 1;
}

int be_buffer_is_zero(const uint8_t *buf, size_t len)
{
    return is_zero(buf, len);
}

int be_buffers_equal(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len)
{
    return a_len == b_len && memcmp(a, b, a_len) == 0;
}

int64_t be_zero_runs(const uint8_t *buf, size_t len, int64_t start,
                     int64_t granularity, be_zrun *runs, size_t max_runs)
{
    size_t nruns = 0;
    be_zrun cur = {0, 0, 0};

    if (granularity < 1 || max_runs == 0) {
        return BE_EINVAL;
    }
    if (start < 0 || (uint64_t)start > len || start % granularity) {
        return BE_ERANGE;
    }
    for (uint64_t off = (uint64_t)start; off < len;) {
        uint64_t chunk = len - off < (uint64_t)granularity ?
                         len - off : (uint64_t)granularity;
        uint32_t z = (uint32_t)is_zero(buf + off, (size_t)chunk);
        if (cur.length != 0) {
            if (z == cur.is_zero) {
                cur.length += chunk;
                off += chunk;
                continue;
            }
            runs[nruns++] = cur;
            if (nruns == max_runs) {
                return (int64_t)nruns;
            }
        }
        cur.start = off;
        cur.length = chunk;
        cur.is_zero = z;
        off += chunk;
    }
    if (cur.length != 0) {
        runs[nruns++] = cur;
    }
    return (int64_t)nruns;
}
