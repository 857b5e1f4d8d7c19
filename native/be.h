/*
 * be.h - blockengine native hot paths (the C half of blockengine._native).
 *
 * Theory of operation
 * -------------------
 * A handful of bulk functions over caller-owned buffers.  Every function:
 *   - takes each buffer as a pointer plus its length in bytes and never
 *     touches memory outside [ptr, ptr + len);
 *   - validates its arguments and returns a status code: >= 0 is a result
 *     (a count, an index, ...), BE_NONE means "nothing found" and every other
 *     negative value is an error (BE_E*);
 *   - never allocates memory: results go into caller-provided arrays;
 *   - keeps no global state, so it is safe to call without the GIL from
 *     several threads on distinct buffers.
 *
 * On-disk data is big-endian as qcow2 stores it (L2 entries, refcounts of
 * 8 bits and more).  In-memory dirty bitmaps are arrays of little-endian
 * 64-bit words (bit i lives in word i / 64, bit i % 64), which is byte for
 * byte the qcow2 on-disk bitmap layout (bit i in byte i / 8, bit i % 8).
 *
 * The part between the CDEF markers is fed verbatim to cffi's cdef(), so it
 * must only contain integer #defines, typedefs and prototypes.
 */
#ifndef BE_H
#define BE_H

#include <stddef.h>
#include <stdint.h>

/* BEGIN CDEF */

/* Status codes. */
#define BE_OK 0
#define BE_NONE -1          /* nothing found (not an error) */
#define BE_EINVAL -2        /* invalid parameter (order, cluster_bits, ...) */
#define BE_ERANGE -3        /* index or length outside the buffer */
#define BE_EOVERFLOW -4     /* refcount would exceed its maximum */
#define BE_EUNDERFLOW -5    /* refcount would drop below zero */
#define BE_CHECK_SLOW -6    /* check.c: this table needs the per-entry walk */

/* Kinds of L2 runs (be_run.kind). */
#define BE_L2_UNALLOCATED 0 /* no host offset, no zero flag */
#define BE_L2_ZERO_PLAIN 1  /* zero flag, no host offset */
#define BE_L2_ZERO_ALLOC 2  /* zero flag with a (preallocated) host offset */
#define BE_L2_NORMAL 3      /* data at host_offset, contiguous */
#define BE_L2_COMPRESSED 4  /* one compressed cluster */
#define BE_L2_INVALID 5     /* corrupt entry: one entry per run */

/* Kinds of subcluster runs (extended L2 entries). */
#define BE_SC_UNALLOCATED 0
#define BE_SC_ZERO 1
#define BE_SC_ALLOCATED 2
#define BE_SC_INVALID 3     /* allocated and zero bits overlap in the bitmap */

typedef struct be_run {
    uint32_t first_index;   /* L2 index of the first entry of the run */
    uint32_t n;             /* number of entries in the run (>= 1) */
    uint32_t kind;          /* BE_L2_* */
    uint32_t copied;        /* 1 if QCOW_OFLAG_COPIED is set on all entries */
    uint64_t host_offset;   /* host offset of the first entry, or 0 */
} be_run;

typedef struct be_zrun {
    uint64_t start;         /* byte offset into the buffer */
    uint64_t length;        /* bytes; a multiple of granularity except at EOB */
    uint32_t is_zero;
} be_zrun;

/* --- l2.c ---------------------------------------------------------------- */

/* Classify entries [start_index, start_index + count) of an L2 table into
 * runs.  Writes at most max_runs complete runs and returns how many it wrote;
 * if fewer entries than count were covered, call again from
 * runs[ret - 1].first_index + runs[ret - 1].n (runs end where the entries
 * dictate, so resuming gives the same answer as one big call). */
int64_t be_l2_scan(const uint8_t *table, size_t table_len,
                   int64_t start_index, int64_t count,
                   int extended, int cluster_bits, int data_file,
                   be_run *runs, size_t max_runs);

/* Classify the run of subclusters starting at first_sc (0..31) of an
 * extended L2 subcluster bitmap.  Returns the BE_SC_* kind and stores the
 * run length (1..32 - first_sc) in *n. */
int be_subcluster_run(uint64_t bitmap, int first_sc, uint32_t *n);

/* --- refcount.c ---------------------------------------------------------- */
/* Refcount blocks hold (len * 8) >> order entries; len must be a multiple of
 * 8 and order in 0..6. */

int be_refcount_get(const uint8_t *block, size_t len, int order,
                    int64_t index, uint64_t *out);
int be_refcount_get_range(const uint8_t *block, size_t len, int order,
                          int64_t index, int64_t n, uint64_t *out);
int be_refcount_set_range(uint8_t *block, size_t len, int order,
                          int64_t index, int64_t n, uint64_t value);
/* Adds (negative ? -1 : 1) * magnitude to every entry; checks all entries
 * first, so on BE_EOVERFLOW/BE_EUNDERFLOW the block is unchanged. */
int be_refcount_add_range(uint8_t *block, size_t len, int order,
                          int64_t index, int64_t n,
                          uint64_t magnitude, int negative);
int64_t be_refcount_free_run(const uint8_t *block, size_t len, int order,
                             int64_t start);
int64_t be_refcount_find_free(const uint8_t *block, size_t len, int order,
                              int64_t start, int64_t n_needed);
int64_t be_refcount_count_nonzero(const uint8_t *block, size_t len, int order);
/* Compares computed[0..n) with entries [first_index, first_index + n),
 * starting at position *pos; writes at most max_out mismatching block
 * indices to out, returns how many, and advances *pos (== n when done). */
int64_t be_refcount_compare(const uint64_t *computed, int64_t n,
                            const uint8_t *block, size_t len, int order,
                            int64_t first_index, int64_t *pos,
                            uint64_t *out, size_t max_out);

/* --- bitmap.c ------------------------------------------------------------ */
/* Bitmaps: len must be a multiple of 8; bits are numbered 0..len * 8. */

int be_bitmap_set_range(uint8_t *buf, size_t len, int64_t start, int64_t n);
int be_bitmap_reset_range(uint8_t *buf, size_t len, int64_t start, int64_t n);
int64_t be_bitmap_count(const uint8_t *buf, size_t len,
                        int64_t start, int64_t n);
int64_t be_bitmap_next_set(const uint8_t *buf, size_t len,
                           int64_t start, int64_t end);
int64_t be_bitmap_next_clear(const uint8_t *buf, size_t len,
                             int64_t start, int64_t end);
/* Returns the start of the area (or BE_NONE) and stores its length. */
int64_t be_bitmap_next_dirty_area(const uint8_t *buf, size_t len,
                                  int64_t start, int64_t end,
                                  int64_t max_len, int64_t *length);
int be_bitmap_merge_or(uint8_t *dst, size_t dst_len,
                       const uint8_t *src, size_t src_len);
int be_bitmap_serialize(const uint8_t *buf, size_t len,
                        int64_t start, int64_t n,
                        uint8_t *out, size_t out_len);
int be_bitmap_deserialize(uint8_t *buf, size_t len, int64_t start, int64_t n,
                          const uint8_t *data, size_t data_len);

/* Zero detection over plain byte buffers (any length). */
int be_buffer_is_zero(const uint8_t *buf, size_t len);
/* 1 iff both buffers have the same length and bytes (memcmp). */
int be_buffers_equal(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len);
/* Like be_l2_scan: writes at most max_runs complete runs of the buffer from
 * byte offset start (a multiple of granularity); resume at the end of the
 * last run. */
int64_t be_zero_runs(const uint8_t *buf, size_t len, int64_t start,
                     int64_t granularity, be_zrun *runs, size_t max_runs);

/* --- crypto.c ------------------------------------------------------------ */
/* Sector-mode glue around bulk AES-ECB calls (see crypto.c).  IVs/tweaks are
 * 16 bytes per sector; len and sector_size must be multiples of 16 (EINVAL);
 * dst may be the same buffer as a source. */

/* count IVs of 16 bytes: sector number little-endian, 4 (plain) or 8
 * (plain64) bytes wide, zero padded. */
int be_sector_ivs(uint8_t *out, size_t out_len, uint64_t first_sector,
                  int64_t count, int width);
int be_xts_xor(uint8_t *dst, size_t dst_len, const uint8_t *src, size_t src_len,
               size_t len, const uint8_t *tweaks, size_t tweaks_len,
               size_t sector_size);
int be_cbc_decrypt_xor(uint8_t *dst, size_t dst_len,
                       const uint8_t *decrypted, size_t decrypted_len,
                       const uint8_t *ciphertext, size_t ciphertext_len,
                       size_t len, const uint8_t *ivs, size_t ivs_len,
                       size_t sector_size);
/* len must be a multiple of sector_size; lanes start as the sector IVs. */
int be_cbc_encrypt_step(uint8_t *out, size_t out_len,
                        const uint8_t *plain, size_t plain_len, size_t len,
                        uint8_t *lanes, size_t lanes_len, size_t sector_size,
                        int64_t block);
int be_ctr_counters(uint8_t *out, size_t out_len, size_t len,
                    const uint8_t *ivs, size_t ivs_len, size_t sector_size);
/* dst[0..len) ^= src[0..len) (any len) */
int be_xor(uint8_t *dst, size_t dst_len, const uint8_t *src, size_t src_len,
           size_t len);

/* --- map.c --------------------------------------------------------------- */
/* `qemu-img map` entries in bulk: produced from an L2 slice, merged and
 * printed exactly as img_map() does. */

#define BE_MAP_DATA 1
#define BE_MAP_ZERO 2
#define BE_MAP_PRESENT 4
#define BE_MAP_HAS_OFFSET 8
#define BE_MAP_STOP 0x100      /* unalloc_flags: end the batch at unallocated */
#define BE_MAP_EXTERNAL -6     /* human map of data without a host offset */

typedef struct be_map_entry {
    uint64_t start;
    uint64_t length;
    uint64_t offset;        /* host offset, if BE_MAP_HAS_OFFSET */
    uint32_t flags;         /* BE_MAP_* */
    uint32_t depth;
    uint32_t file;          /* index into the caller's file names; 0 = none */
    uint32_t pad;
} be_map_entry;

typedef struct be_map_state {
    be_map_entry curr;      /* the entry being merged, not printed yet */
    int human;
} be_map_state;

/* Entries of standard L2 entries [start_index, start_index + count) of a
 * slice: the first cluster maps guest offset guest, skip bytes into it; at
 * most length bytes and max_entries entries.  Unallocated clusters get
 * unalloc_flags (or end the batch with BE_MAP_STOP), data on the host gets
 * file; an invalid entry ends the batch.  Returns the number of entries and
 * stores the bytes they cover in *covered. */
int64_t be_l2_map(const uint8_t *table, size_t table_len,
                  int64_t start_index, int64_t count, int cluster_bits,
                  uint64_t guest, uint64_t skip, uint64_t length,
                  uint32_t unalloc_flags, uint32_t file,
                  be_map_entry *out, size_t max_entries, uint64_t *covered);

/* Entries of a file's data and hole extents in [offset, offset + length)
 * found with SEEK_DATA/SEEK_HOLE as the file driver's block status does (data
 * and holes are present, with the host offset in file); at most max_entries.
 * Returns the number of entries and stores the bytes covered. */
int64_t be_seek_map(int fd, uint64_t offset, uint64_t length, uint32_t file,
                    be_map_entry *out, size_t max_entries, uint64_t *covered);

/* Merge entries into st->curr and print each finished one (JSON, or the
 * human format with names[file]) into out.  Stops early with BE_ERANGE when
 * out is full, or BE_MAP_EXTERNAL (human only); *consumed tells how many
 * entries were taken, *written how many bytes were printed. */
int be_map_feed(be_map_state *st, const be_map_entry *entries, size_t n,
                const char *const *names, size_t nnames,
                char *out, size_t out_len, size_t *consumed, size_t *written);
/* Print the last entry (JSON without the trailing ",\n"). */
int be_map_finish(be_map_state *st, const char *const *names, size_t nnames,
                  char *out, size_t out_len, size_t *written);

/* --- check.c ------------------------------------------------------------- */
/* check_refcounts_l2() of a whole L2 table (n_entries standard or extended
 * entries, no data file) in the common case: adds one reference per
 * referenced host cluster to the IMRT (imrt_n entries of width 1 << order)
 * and returns BE_OK with counts[0] = allocated and counts[1] = fragmented
 * clusters.  Returns BE_CHECK_SLOW, with the IMRT unchanged, when any entry
 * needs a message: the caller then walks the table itself. */
int be_check_l2(const uint8_t *table, size_t table_len, int64_t n_entries,
                int extended, int cluster_bits, uint64_t file_len,
                uint8_t *imrt, size_t imrt_len, int order, int64_t imrt_n,
                uint64_t *counts);
/* check_oflag_copied() of a whole L2 table against refcounts known to equal
 * the IMRT's: writes the indexes of entries whose OFLAG_COPIED disagrees with
 * (refcount == 1) to out and returns how many; BE_CHECK_SLOW if an entry
 * points beyond the IMRT or out is full. */
int64_t be_l2_copied_mismatches(const uint8_t *table, size_t table_len,
                                int64_t n_entries, int extended, int cluster_bits,
                                const uint8_t *imrt, size_t imrt_len, int order,
                                int64_t imrt_n, int64_t *out, size_t max_out);

/* END CDEF */

/* --- internal helpers shared by the .c files (not part of the cdef) ------ */

#if !defined(__GNUC__)
#error "blockengine native code needs GCC or clang builtins"
#endif

#include <string.h>

static inline uint64_t be_ld64le(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void be_st64le(uint8_t *p, uint64_t v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline uint64_t be_ld64be(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* True iff [start, start + n) lies within [0, limit); overflow-safe. */
static inline int be_range_ok(int64_t start, int64_t n, int64_t limit)
{
    return start >= 0 && n >= 0 && start <= limit && n <= limit - start;
}

#endif /* BE_H */
