/*
 * refcount.c - qcow2 refcount block accessors for every refcount width
 * (mirrors the get_refcount_roN()/set_refcount_roN() family of
 * block/qcow2-refcount.c, plus the bulk scans the allocator and the checker
 * need).
 *
 * Layout (docs/interop/qcow2.rst, "Host cluster management"): a block holds
 * entries of refcount_bits = 1 << order bits.  Entries of 8 bits and more are
 * big-endian integers; narrower entries are packed into bytes with the lowest
 * index in the least significant bits.  Either way, when the block is read as
 * little-endian 64-bit words, entry k of a word occupies bits
 * [k * w, (k + 1) * w) of it, which is what the word-at-a-time scans use.
 */
#include "be.h"

static const uint64_t low_bit_of_entry[7] = {
    0xffffffffffffffffULL, 0x5555555555555555ULL, 0x1111111111111111ULL,
    0x0101010101010101ULL, 0x0001000100010001ULL, 0x0000000100000001ULL,
    0x0000000000000001ULL,
};

static inline int block_ok(size_t len, int order)
{
    return order >= 0 && order <= 6 && (len & 7) == 0;
}

static inline int64_t n_entries(size_t len, int order)
{
    return (int64_t)((len * 8) >> order);
}

static inline uint64_t rc_max(int order)
{
    return order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
}

static inline uint64_t rc_get(const uint8_t *b, int order, uint64_t i)
{
    const uint8_t *p;

    switch (order) {
    case 0: return (b[i >> 3] >> (i & 7)) & 1;
    case 1: return (b[i >> 2] >> ((i & 3) * 2)) & 3;
    case 2: return (b[i >> 1] >> ((i & 1) * 4)) & 15;
    case 3: return b[i];
    case 4: p = b + 2 * i; return ((uint64_t)p[0] << 8) | p[1];
    case 5:
        p = b + 4 * i;
        return ((uint64_t)p[0] << 24) | ((uint64_t)p[1] << 16) |
               ((uint64_t)p[2] << 8) | p[3];
    default: return be_ld64be(b + 8 * i);
    }
}

static inline void rc_set(uint8_t *b, int order, uint64_t i, uint64_t v)
{
    uint8_t *p;
    unsigned shift, mask;
    int k;

    switch (order) {
    case 0: case 1: case 2:
        shift = (unsigned)((i & ((8u >> order) - 1)) << order);
        mask = ((1u << (1u << order)) - 1) << shift;
        p = b + (i >> (3 - order));
        *p = (uint8_t)((*p & ~mask) | ((unsigned)(v << shift) & mask));
        return;
    default:
        k = 1 << (order - 3);            /* bytes per entry */
        p = b + (size_t)k * i;
        while (k-- > 0) {
            p[k] = (uint8_t)v;
            v >>= 8;
        }
        return;
    }
}

/* Word with bit k * w set iff entry k of the (little-endian loaded) word x is
 * non-zero. */
static inline uint64_t nonzero_marks(uint64_t x, int order)
{
    for (unsigned s = 1; s < (1u << order); s <<= 1) {
        x |= x >> s;
    }
    return x & low_bit_of_entry[order];
}

/* Index of the first entry in [start, limit) that is zero (want_zero) or
 * non-zero (!want_zero), or limit if there is none. */
static int64_t scan_entries(const uint8_t *b, int order, int64_t start,
                            int64_t limit, int want_zero)
{
    const int64_t per_word = 64 >> order;
    int64_t w = start / per_word;
    int64_t word_end = (limit + per_word - 1) / per_word;
    unsigned skip = (unsigned)((start % per_word) << order);

    if (start >= limit) {
        return limit;
    }
    for (; w < word_end; w++, skip = 0) {
        uint64_t marks = nonzero_marks(be_ld64le(b + 8 * w), order);
        if (want_zero) {
            marks = ~marks & low_bit_of_entry[order];
        }
        marks &= ~0ULL << skip;
        if (marks) {
            int64_t idx = w * per_word + (__builtin_ctzll(marks) >> order);
            return idx < limit ? idx : limit;
        }
    }
    return limit;
}

int be_refcount_get(const uint8_t *block, size_t len, int order,
                    int64_t index, uint64_t *out)
{
    if (!block_ok(len, order)) {
        return BE_EINVAL;
    }
    if (index < 0 || index >= n_entries(len, order)) {
        return BE_ERANGE;
    }
    *out = rc_get(block, order, (uint64_t)index);
    return BE_OK;
}

int be_refcount_get_range(const uint8_t *block, size_t len, int order,
                          int64_t index, int64_t n, uint64_t *out)
{
    if (!block_ok(len, order)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(index, n, n_entries(len, order))) {
        return BE_ERANGE;
    }
    for (int64_t i = 0; i < n; i++) {
        out[i] = rc_get(block, order, (uint64_t)(index + i));
    }
    return BE_OK;
}

int be_refcount_set_range(uint8_t *block, size_t len, int order,
                          int64_t index, int64_t n, uint64_t value)
{
    if (!block_ok(len, order) || value > rc_max(order)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(index, n, n_entries(len, order))) {
        return BE_ERANGE;
    }
    int64_t i = index, end = index + n;
    if (order < 3) {
        const int64_t per_byte = 8 >> order;
        uint8_t pattern = 0;
        for (int k = 0; k < per_byte; k++) {
            pattern |= (uint8_t)(value << (k << order));
        }
        for (; i < end && i % per_byte; i++) {
            rc_set(block, order, (uint64_t)i, value);
        }
        if (end - i >= per_byte) {
            int64_t bytes = (end - i) / per_byte;
            memset(block + i / per_byte, pattern, (size_t)bytes);
            i += bytes * per_byte;
        }
    } else if (value == 0) {
        memset(block + ((size_t)i << (order - 3)), 0,
               (size_t)n << (order - 3));
        i = end;
    }
    for (; i < end; i++) {
        rc_set(block, order, (uint64_t)i, value);
    }
    return BE_OK;
}

int be_refcount_add_range(uint8_t *block, size_t len, int order,
                          int64_t index, int64_t n,
                          uint64_t magnitude, int negative)
{
    uint64_t max;

    if (!block_ok(len, order)) {
        return BE_EINVAL;
    }
    if (!be_range_ok(index, n, n_entries(len, order))) {
        return BE_ERANGE;
    }
    max = rc_max(order);
    if (n == 0 || magnitude == 0) {
        return BE_OK;
    }
    /* validate everything first: all-or-nothing */
    if (negative) {
        if (magnitude > max) {
            return BE_EUNDERFLOW;
        }
        for (int64_t i = index; i < index + n; i++) {
            if (rc_get(block, order, (uint64_t)i) < magnitude) {
                return BE_EUNDERFLOW;
            }
        }
    } else {
        if (magnitude > max) {
            return BE_EOVERFLOW;
        }
        for (int64_t i = index; i < index + n; i++) {
            if (rc_get(block, order, (uint64_t)i) > max - magnitude) {
                return BE_EOVERFLOW;
            }
        }
    }
    for (int64_t i = index; i < index + n; i++) {
        uint64_t v = rc_get(block, order, (uint64_t)i);
        rc_set(block, order, (uint64_t)i,
               negative ? v - magnitude : v + magnitude);
    }
    return BE_OK;
}

int64_t be_refcount_free_run(const uint8_t *block, size_t len, int order,
                             int64_t start)
{
    if (!block_ok(len, order)) {
        return BE_EINVAL;
    }
    int64_t total = n_entries(len, order);
    if (start < 0 || start > total) {
        return BE_ERANGE;
    }
    return scan_entries(block, order, start, total, 0) - start;
}

int64_t be_refcount_find_free(const uint8_t *block, size_t len, int order,
                              int64_t start, int64_t n_needed)
{
    if (!block_ok(len, order) || n_needed < 1) {
        return BE_EINVAL;
    }
    int64_t total = n_entries(len, order);
    if (start < 0 || start > total) {
        return BE_ERANGE;
    }
    int64_t i = start;
    while (total - i >= n_needed) {
        int64_t z = scan_entries(block, order, i, total, 1);
        if (total - z < n_needed) {
            break;
        }
        /* only look as far as needed: the run is long enough or it ends */
        int64_t nz = scan_entries(block, order, z, z + n_needed, 0);
        if (nz - z >= n_needed) {
            return z;
        }
        i = nz;  /* entry nz is in use */
    }
    return BE_NONE;
}

int64_t be_refcount_count_nonzero(const uint8_t *block, size_t len, int order)
{
    int64_t count = 0;

    if (!block_ok(len, order)) {
        return BE_EINVAL;
    }
    for (size_t off = 0; off < len; off += 8) {
        count += __builtin_popcountll(nonzero_marks(be_ld64le(block + off),
                                                    order));
    }
    return count;
}

int64_t be_refcount_compare(const uint64_t *computed, int64_t n,
                            const uint8_t *block, size_t len, int order,
                            int64_t first_index, int64_t *pos,
                            uint64_t *out, size_t max_out)
{
    size_t nout = 0;
    int64_t i = *pos;

    if (!block_ok(len, order) || max_out == 0) {
        return BE_EINVAL;
    }
    if (!be_range_ok(first_index, n, n_entries(len, order)) ||
        i < 0 || i > n) {
        return BE_ERANGE;
    }
    for (; i < n && nout < max_out; i++) {
        if (computed[i] != rc_get(block, order, (uint64_t)(first_index + i))) {
            out[nout++] = (uint64_t)(first_index + i);
        }
    }
    *pos = i;
    return (int64_t)nout;
}
