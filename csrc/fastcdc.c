/* fastcdc.c -- see fastcdc.h for the contract. */
#include <errno.h>
#include "fastcdc.h"
#include "gear_table.h"

/* A mask of `bits` ones in the top bits of the hash: the top bits depend on the
 * last 64 bytes, the low ones only on the last few. */
static uint64_t top_mask(unsigned bits)
{
    if (bits == 0)
        return 0;
    if (bits >= 64)
        return ~(uint64_t)0;
    return ~(uint64_t)0 << (64 - bits);
}

static unsigned log2_round(uint64_t v)
{
    unsigned b = 0;
    while (((uint64_t)1 << (b + 1)) <= v)
        b++;
    /* round to nearest power of two */
    if (b < 63 && v - ((uint64_t)1 << b) > (((uint64_t)1 << (b + 1)) - v))
        b++;
    return b;
}

int plc_params_init(plc_params *p, uint64_t min_size, uint64_t avg_size, uint64_t max_size)
{
    if (min_size < 64 || min_size > avg_size || avg_size > max_size ||
        max_size > ((uint64_t)1 << 31))
        return -EINVAL;
    unsigned bits = log2_round(avg_size);
    p->min_size = min_size;
    p->avg_size = avg_size;
    p->max_size = max_size;
    /* normalized chunking, level 2: harder to cut before avg, easier after */
    p->mask_s = top_mask(bits + 2);
    p->mask_l = top_mask(bits > 2 ? bits - 2 : 0);
    return 0;
}

uint64_t plc_gear(unsigned int byte)
{
    return plc_gear_table[byte & 0xff];
}

size_t plc_scan(const plc_params *p, plc_state *s, const uint8_t *buf, size_t n,
                uint64_t *cuts, size_t max_cuts, size_t *consumed)
{
    const uint64_t *gear = plc_gear_table;
    const uint64_t min = p->min_size, avg = p->avg_size, max = p->max_size;
    const uint64_t mask_s = p->mask_s, mask_l = p->mask_l;
    uint64_t pos = s->pos, h = s->hash;
    size_t i = 0, ncuts = 0;

    while (i < n && ncuts < max_cuts) {
        size_t left = n - i;
        if (pos < min) { /* cut-point skipping: no cut can fall here */
            uint64_t skip = min - pos;
            h = 0; /* the hash starts afresh at min_size */
            if (skip >= left) {
                pos += left;
                i = n;
                break;
            }
            i += (size_t)skip;
            pos = min;
            left = n - i;
        }
        size_t start = i, end;
        if (pos < avg) {
            end = i + (size_t)((avg - pos) < left ? (avg - pos) : left);
            for (; i < end; i++) {
                h = (h << 1) + gear[buf[i]];
                if (!(h & mask_s))
                    goto cut;
            }
            pos += i - start;
            start = i;
            left = n - i;
        }
        end = i + (size_t)((max - pos) < left ? (max - pos) : left);
        for (; i < end; i++) {
            h = (h << 1) + gear[buf[i]];
            if (!(h & mask_l))
                goto cut;
        }
        pos += i - start;
        if (pos == max) { /* forced cut at max_size */
            cuts[ncuts++] = i;
            pos = 0;
        }
        continue;
    cut:
        i++;
        cuts[ncuts++] = i;
        pos = 0;
    }
    s->pos = pos;
    s->hash = h;
    *consumed = i;
    return ncuts;
}
