/*
 * map.c - `qemu-img map` in bulk.
 *
 * A map of a fragmented image has one entry per extent (100k and more), so
 * per-entry work in Python would dominate the command.  be_l2_map turns an
 * L2 slice straight into entries, and be_map_feed merges them and prints the
 * finished ones with img_map()'s rules and printf formats.  Their Python
 * twins are l2_map / map_feed / map_finish in blockengine/_pynative.py.
 */
#define _GNU_SOURCE         /* SEEK_DATA, SEEK_HOLE */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "be.h"

#define MAP_FIELDS (BE_MAP_DATA | BE_MAP_ZERO | BE_MAP_PRESENT | BE_MAP_HAS_OFFSET)
/* the longest JSON entry: five 20-digit numbers and the fixed text */
#define JSON_ENTRY_MAX 200

int64_t be_l2_map(const uint8_t *table, size_t table_len,
                  int64_t start_index, int64_t count, int cluster_bits,
                  uint64_t guest, uint64_t skip, uint64_t length,
                  uint32_t unalloc_flags, uint32_t file,
                  be_map_entry *out, size_t max_entries, uint64_t *covered)
{
    be_run runs[64];
    size_t n_out = 0;
    uint64_t left = length;
    int64_t idx = start_index, end;

    *covered = 0;
    if (cluster_bits < 9 || cluster_bits > 21 || skip >> cluster_bits) {
        return BE_EINVAL;
    }
    if (count <= 0 || length == 0) {
        return 0;
    }
    if (!be_range_ok(start_index, count, (int64_t)(table_len / 8)) ||
        start_index + count > (int64_t)UINT32_MAX) {
        return BE_ERANGE;
    }
    end = start_index + count;
    while (idx < end && left > 0 && n_out < max_entries) {
        int64_t nruns = be_l2_scan(table, table_len, idx, end - idx, 0,
                                   cluster_bits, 0, runs, 64);
        if (nruns <= 0) {
            return nruns < 0 ? nruns : (int64_t)n_out;
        }
        for (int64_t r = 0; r < nruns && left > 0 && n_out < max_entries; r++) {
            const be_run *run = &runs[r];
            uint64_t bytes = ((uint64_t)run->n << cluster_bits) - skip;
            uint32_t flags;
            uint64_t offset = 0;

            switch (run->kind) {
            case BE_L2_NORMAL:
                flags = BE_MAP_DATA | BE_MAP_PRESENT | BE_MAP_HAS_OFFSET;
                offset = run->host_offset + skip;
                break;
            case BE_L2_ZERO_ALLOC:
                flags = BE_MAP_ZERO | BE_MAP_PRESENT | BE_MAP_HAS_OFFSET;
                offset = run->host_offset + skip;
                break;
            case BE_L2_ZERO_PLAIN:
                flags = BE_MAP_ZERO | BE_MAP_PRESENT;
                break;
            case BE_L2_COMPRESSED:
                flags = BE_MAP_DATA | BE_MAP_PRESENT;
                break;
            case BE_L2_UNALLOCATED:
                if (unalloc_flags & BE_MAP_STOP) {
                    return (int64_t)n_out;
                }
                flags = unalloc_flags & MAP_FIELDS;
                break;
            default:            /* invalid: the caller's lookup reports it */
                return (int64_t)n_out;
            }
            if (bytes > left) {
                bytes = left;
            }
            out[n_out].start = guest;
            out[n_out].length = bytes;
            out[n_out].offset = offset;
            out[n_out].flags = flags;
            out[n_out].depth = 0;
            out[n_out].file = (flags & BE_MAP_HAS_OFFSET) ? file : 0;
            out[n_out].pad = 0;
            n_out++;
            guest += bytes;
            left -= bytes;
            *covered += bytes;
            skip = 0;
        }
        idx = runs[nruns - 1].first_index + runs[nruns - 1].n;
    }
    return (int64_t)n_out;
}

int64_t be_seek_map(int fd, uint64_t offset, uint64_t length, uint32_t file,
                    be_map_entry *out, size_t max_entries, uint64_t *covered)
{
    const uint64_t end = offset + length;
    size_t n_out = 0;

    *covered = 0;
    if (end < offset || end > (uint64_t)INT64_MAX) {
        return BE_ERANGE;
    }
    while (offset < end && n_out < max_entries) {
        uint64_t n, left = end - offset;
        uint32_t flags = BE_MAP_DATA;
        off_t data = lseek(fd, (off_t)offset, SEEK_DATA);

        if (data < 0) {
            /* ENXIO: only a hole up to EOF; other errors: all data */
            flags = errno == ENXIO ? BE_MAP_ZERO : BE_MAP_DATA;
            n = left;
        } else if ((uint64_t)data > offset) {
            flags = BE_MAP_ZERO;
            n = (uint64_t)data - offset < left ? (uint64_t)data - offset : left;
        } else {
            off_t hole = lseek(fd, (off_t)offset, SEEK_HOLE);
            uint64_t h = hole < 0 ? end : (uint64_t)hole;
            n = h > offset ? h - offset : 1;
            if (n > left) {
                n = left;
            }
        }
        out[n_out].start = offset;
        out[n_out].length = n;
        out[n_out].offset = offset;
        out[n_out].flags = flags | BE_MAP_PRESENT | BE_MAP_HAS_OFFSET;
        out[n_out].depth = 0;
        out[n_out].file = file;
        out[n_out].pad = 0;
        n_out++;
        offset += n;
        *covered += n;
    }
    return (int64_t)n_out;
}

/* entry_mergeable() of qemu-img.c */
static int mergeable(const be_map_entry *curr, const be_map_entry *next)
{
    if (curr->length == 0 || ((curr->flags ^ next->flags) & MAP_FIELDS) ||
        curr->depth != next->depth || curr->file != next->file) {
        return 0;
    }
    return !(curr->flags & BE_MAP_HAS_OFFSET) ||
           curr->offset + curr->length == next->offset;
}

static const char *json_bool(uint32_t flags, uint32_t bit)
{
    return (flags & bit) ? "true" : "false";
}

/* Print one finished entry at out + *pos (dump_map_entry()). */
static int print_entry(const be_map_state *st, const be_map_entry *e, int last,
                       const char *const *names, size_t nnames,
                       char *out, size_t out_len, size_t *pos)
{
    size_t room = out_len - *pos;
    char *p = out + *pos;
    int n;

    if (!st->human) {
        if (room < JSON_ENTRY_MAX) {
            return BE_ERANGE;
        }
        n = snprintf(p, room, "{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
                     ", \"depth\": %" PRIu32 ", \"present\": %s, \"zero\": %s"
                     ", \"data\": %s", e->start, e->length, e->depth,
                     json_bool(e->flags, BE_MAP_PRESENT),
                     json_bool(e->flags, BE_MAP_ZERO),
                     json_bool(e->flags, BE_MAP_DATA));
        if (e->flags & BE_MAP_HAS_OFFSET) {
            n += snprintf(p + n, room - n, ", \"offset\": %" PRIu64, e->offset);
        }
        n += snprintf(p + n, room - n, "}%s", last ? "" : ",\n");
    } else {
        const char *name = e->file < nnames && names[e->file] ? names[e->file] : "";
        if ((e->flags & BE_MAP_DATA) && !(e->flags & BE_MAP_HAS_OFFSET)) {
            return BE_MAP_EXTERNAL;
        }
        if (!(e->flags & BE_MAP_DATA) || (e->flags & BE_MAP_ZERO)) {
            return BE_OK;
        }
        if (room < 3 * 20 + strlen(name) + 2) {
            return BE_ERANGE;
        }
        n = snprintf(p, room, "%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n",
                     e->start, e->length, e->offset, name);
    }
    *pos += (size_t)n;
    return BE_OK;
}

int be_map_feed(be_map_state *st, const be_map_entry *entries, size_t n,
                const char *const *names, size_t nnames,
                char *out, size_t out_len, size_t *consumed, size_t *written)
{
    size_t pos = 0, i;
    int rc = BE_OK;

    for (i = 0; i < n; i++) {
        be_map_entry next = entries[i];
        if (mergeable(&st->curr, &next)) {
            st->curr.length += next.length;
            continue;
        }
        if (st->curr.length > 0) {
            rc = print_entry(st, &st->curr, 0, names, nnames, out, out_len, &pos);
            if (rc != BE_OK) {
                break;
            }
            /* the human format does not tell unallocated, zero and zero
             * data apart */
            if (st->human && (!(next.flags & BE_MAP_DATA) ||
                              (next.flags & BE_MAP_ZERO))) {
                next.flags = (next.flags & ~BE_MAP_DATA) | BE_MAP_ZERO;
            }
        }
        st->curr = next;
    }
    *consumed = i;
    *written = pos;
    return rc;
}

int be_map_finish(be_map_state *st, const char *const *names, size_t nnames,
                  char *out, size_t out_len, size_t *written)
{
    size_t pos = 0;
    int rc = print_entry(st, &st->curr, 1, names, nnames, out, out_len, &pos);
    *written = pos;
    return rc;
}
