/*
 * l2.c - qcow2 L2 table scanning (mirrors qcow2_get_cluster_type(),
 * qcow2_get_subcluster_type() and the run-building loop of
 * qcow2_get_host_offset() / count_contiguous_subclusters()).
 *
 * Reference: docs/interop/qcow2.rst, "Cluster mapping" and "Extended L2
 * Entries".
 */
#include "be.h"

#define QCOW_OFLAG_COPIED      (1ULL << 63)
#define QCOW_OFLAG_COMPRESSED  (1ULL << 62)
#define QCOW_OFLAG_ZERO        (1ULL << 0)
#define L2E_OFFSET_MASK        0x00fffffffffffe00ULL
/* Reserved bits of a standard cluster descriptor: 1-8 and 56-61. */
#define L2E_STD_RESERVED       0x3f000000000001feULL
#define L2_BITMAP_ALL_ALLOC    0x00000000ffffffffULL

/* Classify one entry.  Stores the host offset in *host (data offset for
 * NORMAL/ZERO_ALLOC, the compressed data offset for COMPRESSED, the masked
 * offset field for INVALID, 0 otherwise). */
static uint32_t classify(uint64_t entry, uint64_t bitmap, int extended,
                         int cluster_bits, int data_file, uint64_t *host)
{
    if (entry & QCOW_OFLAG_COMPRESSED) {
        /* x = 62 - (cluster_bits - 8): bits 0..x-1 are the host offset */
        int x = 70 - cluster_bits;
        uint64_t off = entry & ((1ULL << x) - 1);
        *host = off;
        if (x > 56 && (off >> 56) != 0) {
            return BE_L2_INVALID;
        }
        if (extended && bitmap != 0) {
            return BE_L2_INVALID;
        }
        return BE_L2_COMPRESSED;
    }

    uint64_t off = entry & L2E_OFFSET_MASK;
    uint64_t reserved = L2E_STD_RESERVED | (extended ? QCOW_OFLAG_ZERO : 0);
    uint32_t kind;

    *host = off;
    if (entry & reserved) {
        return BE_L2_INVALID;
    }
    if (!extended && (entry & QCOW_OFLAG_ZERO)) {
        kind = off ? BE_L2_ZERO_ALLOC : BE_L2_ZERO_PLAIN;
    } else if (off == 0 && !(data_file && (entry & QCOW_OFLAG_COPIED))) {
        kind = BE_L2_UNALLOCATED;
    } else {
        kind = BE_L2_NORMAL;
    }
    if (kind == BE_L2_NORMAL || kind == BE_L2_ZERO_ALLOC) {
        if (off & ((1ULL << cluster_bits) - 1)) {
            return BE_L2_INVALID;
        }
    } else {
        *host = 0;
    }
    if (extended) {
        if (kind == BE_L2_NORMAL && ((bitmap >> 32) & bitmap)) {
            return BE_L2_INVALID;
        }
        if (kind == BE_L2_UNALLOCATED && (bitmap & L2_BITMAP_ALL_ALLOC)) {
            return BE_L2_INVALID;
        }
    }
    return kind;
}

/* GCC's SLP vectorizer packs the run fields into one vector register and
 * rebuilds it on every entry, which makes the loop several times slower. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-slp-vectorize")))
#endif
int64_t be_l2_scan(const uint8_t *table, size_t table_len,
                   int64_t start_index, int64_t count,
                   int extended, int cluster_bits, int data_file,
                   be_run *runs, size_t max_runs)
{
    const size_t esize = extended ? 16 : 8;
    const int64_t n_entries = (int64_t)(table_len / esize);
    const uint64_t cluster_size = 1ULL << (cluster_bits & 63);
    size_t nruns = 0;
    int64_t i, end;
    /* the current run */
    uint32_t run_first = 0, run_n = 0, run_kind = 0, run_copied = 0;
    uint64_t run_host = 0, run_bitmap = 0;
    /* Fast path state: the raw entry that would continue the current run. */
    int fast = 0;
    uint64_t expect = 0, step = 0, flags = 0;

    if (cluster_bits < 9 || cluster_bits > 21 || max_runs == 0) {
        return BE_EINVAL;
    }
    if (!be_range_ok(start_index, count, n_entries) ||
        start_index + count > (int64_t)UINT32_MAX) {
        return BE_ERANGE;
    }

    end = start_index + count;
    for (i = start_index; i < end; i++) {
        const uint8_t *p = table + (size_t)i * esize;
        uint64_t entry = be_ld64be(p);
        uint64_t bitmap = extended ? be_ld64be(p + 8) : 0;
        uint64_t host;

        /* Fast path: the raw entry is exactly the one that continues the
         * current run: same bits outside the offset field (so the addition
         * did not carry into the reserved bits), next host cluster, same
         * subcluster bitmap.  Then it needs no classification. */
        if (entry == expect && fast && (entry & ~L2E_OFFSET_MASK) == flags &&
            bitmap == run_bitmap) {
            run_n++;
            expect += step;
            /* and stay in a tight loop while the run goes on */
            while (!extended && i + 1 < end) {
                uint64_t next = be_ld64be(table + (size_t)(i + 1) * 8);
                if (next != expect || (next & ~L2E_OFFSET_MASK) != flags) {
                    break;
                }
                run_n++;
                expect += step;
                i++;
            }
            continue;
        }

        uint32_t kind = classify(entry, bitmap, extended, cluster_bits,
                                 data_file, &host);
        uint32_t copied = (entry & QCOW_OFLAG_COPIED) ? 1 : 0;

        if (run_n != 0) {
            int same = kind == run_kind && copied == run_copied &&
                       bitmap == run_bitmap &&
                       kind != BE_L2_COMPRESSED && kind != BE_L2_INVALID;
            if (same && (kind == BE_L2_NORMAL || kind == BE_L2_ZERO_ALLOC)) {
                same = host == run_host + run_n * cluster_size;
            }
            if (same) {
                /* the reference rule; the fast path catches these first */
                run_n++;
                expect = entry + step;
                continue;
            }
            runs[nruns].first_index = run_first;
            runs[nruns].n = run_n;
            runs[nruns].kind = run_kind;
            runs[nruns].copied = run_copied;
            runs[nruns].host_offset = run_host;
            if (++nruns == max_runs) {
                return (int64_t)nruns;
            }
        }
        run_first = (uint32_t)i;
        run_n = 1;
        run_kind = kind;
        run_copied = copied;
        run_host = host;
        run_bitmap = bitmap;
        flags = entry & ~L2E_OFFSET_MASK;
        switch (kind) {
        case BE_L2_NORMAL:
        case BE_L2_ZERO_ALLOC:
            fast = 1;
            step = cluster_size;
            expect = entry + step;
            break;
        case BE_L2_UNALLOCATED:
        case BE_L2_ZERO_PLAIN:
            fast = 1;
            step = 0;
            expect = entry;
            break;
        default:    /* COMPRESSED and INVALID entries are runs of one */
            fast = 0;
            break;
        }
    }
    if (run_n != 0) {
        runs[nruns].first_index = run_first;
        runs[nruns].n = run_n;
        runs[nruns].kind = run_kind;
        runs[nruns].copied = run_copied;
        runs[nruns].host_offset = run_host;
        nruns++;
    }
    return (int64_t)nruns;
}

int be_subcluster_run(uint64_t bitmap, int first_sc, uint32_t *n)
{
    uint32_t alloc = (uint32_t)bitmap;
    uint32_t zero = (uint32_t)(bitmap >> 32);
    uint32_t same;
    int kind;

    if (first_sc < 0 || first_sc > 31) {
        return BE_ERANGE;
    }
    if (alloc & zero) {
        *n = 32 - first_sc;
        return BE_SC_INVALID;
    }
    /* mirrors qcow2_get_subcluster_type(): zero bits take precedence */
    if ((zero >> first_sc) & 1) {
        kind = BE_SC_ZERO;
        same = zero;
    } else if ((alloc >> first_sc) & 1) {
        kind = BE_SC_ALLOCATED;
        same = alloc;
    } else {
        kind = BE_SC_UNALLOCATED;
        same = ~(alloc | zero);
    }
    /* count the run of ones in `same` starting at first_sc */
    uint64_t rest = ~((uint64_t)same >> first_sc);  /* first 0 marks the end */
    uint32_t len = (uint32_t)__builtin_ctzll(rest);
    if (len > (uint32_t)(32 - first_sc)) {
        len = 32 - first_sc;
    }
    *n = len;
    return kind;
}
