/*
 * check.c - `qemu-img check` of qcow2 L2 tables in bulk.
 *
 * The checker (blockengine/drivers/format/qcow2/check.py) walks every L2
 * entry twice: once to count a reference to its host cluster in the
 * in-memory refcount table (IMRT), once to compare OFLAG_COPIED with the
 * cluster's refcount.  An image with 4 KiB clusters has a quarter of a
 * million entries per GiB, so these walks run here for the common case of a
 * healthy table.  Anything that needs a message (reserved bits, misaligned
 * or out-of-file offsets, compressed clusters, refcount overflow, a broken
 * subcluster bitmap) returns BE_CHECK_SLOW without touching anything, and the
 * caller walks that table entry by entry with QEMU's exact messages.
 * The Python twins are check_l2 / l2_copied_mismatches in
 * blockengine/_pynative.py.
 */
#include "be.h"

#define OFLAG_COPIED (1ULL << 63)
#define OFLAG_COMPRESSED (1ULL << 62)
#define OFLAG_ZERO 1ULL
#define L2E_OFFSET_MASK 0x00fffffffffffe00ULL
#define L2E_STD_RESERVED_MASK 0x3f000000000001feULL
#define L2_BITMAP_ALL_ALLOC 0xffffffffULL

/* The host offset a table entry references (0: none), or BE_CHECK_SLOW's
 * reasons folded into *slow.  Mirrors qcow2_get_cluster_type() without a
 * data file. */
static inline uint64_t referenced_offset(uint64_t e, uint64_t bm, int extended,
                                         int *slow)
{
    uint64_t off = e & L2E_OFFSET_MASK;

    if ((e & OFLAG_COMPRESSED) || (e & L2E_STD_RESERVED_MASK)) {
        *slow = 1;
        return 0;
    }
    if (!extended && (e & OFLAG_ZERO)) {
        return off;                                 /* zero-alloc or zero-plain */
    }
    if (!off) {
        if (extended && (bm & L2_BITMAP_ALL_ALLOC)) {
            *slow = 1;                              /* unallocated with data bits */
        }
        return 0;
    }
    if (extended && ((bm >> 32) & bm)) {
        *slow = 1;                                  /* corrupt subcluster bitmap */
    }
    return off;
}

static int table_ok(size_t table_len, int64_t n_entries, int extended,
                    int cluster_bits)
{
    int64_t esz = extended ? 16 : 8;

    return cluster_bits >= 9 && cluster_bits <= 21 && n_entries >= 0 &&
           (uint64_t)n_entries <= table_len / esz;
}

int be_check_l2(const uint8_t *table, size_t table_len, int64_t n_entries,
                int extended, int cluster_bits, uint64_t file_len,
                uint8_t *imrt, size_t imrt_len, int order, int64_t imrt_n,
                uint64_t *counts)
{
    int64_t esz = extended ? 16 : 8;
    uint64_t cs_mask = (1ULL << cluster_bits) - 1;
    uint64_t next_contig = 0, allocated = 0, fragmented = 0;
    int slow = 0;

    if (!table_ok(table_len, n_entries, extended, cluster_bits) || order < 0 ||
        order > 6 || imrt_n < 0 || (uint64_t)imrt_n > ((uint64_t)imrt_len * 8) >> order) {
        return BE_EINVAL;
    }
    /* pass 1: is the whole table the plain case? */
    for (int64_t i = 0; i < n_entries && !slow; i++) {
        uint64_t e = be_ld64be(table + i * esz);
        uint64_t bm = extended ? be_ld64be(table + i * esz + 8) : 0;
        uint64_t off = referenced_offset(e, bm, extended, &slow);

        if (!off || slow) {
            continue;
        }
        if ((off & cs_mask) || off >= file_len ||
            (int64_t)(off >> cluster_bits) >= imrt_n) {
            slow = 1;
        }
        allocated++;
        if (next_contig && off != next_contig) {
            fragmented++;
        }
        next_contig = off + cs_mask + 1;
    }
    if (slow) {
        return BE_CHECK_SLOW;
    }
    /* pass 2: one reference per cluster, undone on overflow */
    for (int64_t i = 0; i < n_entries; i++) {
        /* pass 1 vouched for every entry: any host offset is a reference */
        uint64_t off = be_ld64be(table + i * esz) & L2E_OFFSET_MASK;

        if (!off) {
            continue;
        }
        if (be_refcount_add_range(imrt, imrt_len, order, (int64_t)(off >> cluster_bits),
                                  1, 1, 0) != BE_OK) {
            for (int64_t j = i - 1; j >= 0; j--) {
                uint64_t back = be_ld64be(table + j * esz) & L2E_OFFSET_MASK;

                if (back) {
                    be_refcount_add_range(imrt, imrt_len, order,
                                          (int64_t)(back >> cluster_bits), 1, 1, 1);
                }
            }
            return BE_CHECK_SLOW;
        }
    }
    counts[0] = allocated;
    counts[1] = fragmented;
    return BE_OK;
}

int64_t be_l2_copied_mismatches(const uint8_t *table, size_t table_len,
                                int64_t n_entries, int extended, int cluster_bits,
                                const uint8_t *imrt, size_t imrt_len, int order,
                                int64_t imrt_n, int64_t *out, size_t max_out)
{
    int64_t esz = extended ? 16 : 8;
    size_t n_out = 0;

    if (!table_ok(table_len, n_entries, extended, cluster_bits) || order < 0 ||
        order > 6 || imrt_n < 0 || (uint64_t)imrt_n > ((uint64_t)imrt_len * 8) >> order) {
        return BE_EINVAL;
    }
    for (int64_t i = 0; i < n_entries; i++) {
        uint64_t e = be_ld64be(table + i * esz);
        uint64_t off, rc;
        int64_t cluster;

        if (e & OFLAG_COMPRESSED) {
            continue;
        }
        off = e & L2E_OFFSET_MASK;
        if (!off) {
            continue;           /* unallocated or zero-plain: no refcount to compare */
        }
        cluster = (int64_t)(off >> cluster_bits);
        if (cluster >= imrt_n || n_out == max_out) {
            return BE_CHECK_SLOW;
        }
        be_refcount_get(imrt, imrt_len, order, cluster, &rc);
        if ((rc == 1) != !!(e & OFLAG_COPIED)) {
            out[n_out++] = i;
        }
    }
    return (int64_t)n_out;
}
