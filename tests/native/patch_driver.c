/* patch_driver.c -- csrc/patch.c under AddressSanitizer/UBSan and valgrind: random bases,
 * each edited into a new version (bytes changed, inserted, deleted, runs moved), patched
 * and rebuilt; then every op stream damaged (bytes flipped, cut short, grown) and applied
 * again. Every buffer is allocated at its exact size, so a read or write past one is
 * caught. Prints "ok" when every rebuild matched and no damaged stream misbehaved. */
#include "patch.h"
#include "xorshift.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t *dup_exact(const uint8_t *p, size_t n)
{
    uint8_t *q = malloc(n ? n : 1);
    if (n)
        memcpy(q, p, n);
    return q;
}

static size_t edit(const uint8_t *base, size_t n, uint8_t *out, size_t cap)
{
    size_t o = 0, i = 0;
    while (i < n && o < cap) {
        size_t run = 1 + below(4000);
        if (run > n - i)
            run = n - i;
        if (run > cap - o)
            run = cap - o;
        memcpy(out + o, base + i, run);
        o += run;
        i += run;
        switch (below(5)) {
        case 0: /* change a few bytes */
            for (size_t k = below(12); k-- && o;)
                out[below(o)] ^= (uint8_t)(1 + below(255));
            break;
        case 1: /* insert */
            for (size_t k = below(40); k-- && o < cap;)
                out[o++] = (uint8_t)next();
            break;
        case 2: /* delete */
            i += below(60);
            break;
        case 3: /* copy a run from elsewhere in the base */
            if (n) {
                size_t from = below(n), len = below(300);
                if (len > n - from)
                    len = n - from;
                if (len > cap - o)
                    len = cap - o;
                memcpy(out + o, base + from, len);
                o += len;
            }
            break;
        }
    }
    return o;
}

int main(void)
{
    rng = 88172645463325252ULL;
    int failures = 0, patched = 0;
    for (int round = 0; round < 400; round++) {
        size_t n = below(round % 10 ? 20000 : 300000);
        uint8_t *tmp = malloc(n + 1);
        for (size_t k = 0; k < n; k++) /* some runs repeat: a base with repeats */
            tmp[k] = (k > 64 && below(4) == 0) ? tmp[k - 64] : (uint8_t)(below(3) ? next() % 16 : next());
        uint8_t *base = dup_exact(tmp, n);
        free(tmp);
        size_t cap = n + n / 2 + 100;
        uint8_t *buf = malloc(cap);
        size_t m = edit(base, n, buf, cap);
        uint8_t *raw = dup_exact(buf, m);
        free(buf);
        size_t ops_cap = m + m / 8 + 64;
        uint8_t *ops = malloc(ops_cap);
        /* the caller's table in one round of two (of exactly the size asked), else the
         * call's own */
        size_t slots = round % 2 ? pl_patch_table_slots(n) : 0;
        uint32_t *table = slots ? malloc(slots * sizeof *table) : NULL;
        int64_t len = pl_patch_make(raw, m, base, n, ops, ops_cap, round % 3 ? m : m / 32,
                                    table, slots);
        free(table);
        if (len < -1) {
            printf("make failed: %lld\n", (long long)len);
            return 1;
        }
        if (len >= 0) {
            patched++;
            uint8_t *exact = dup_exact(ops, (size_t)len);
            uint8_t *out = malloc(m ? m : 1);
            if (pl_patch_apply(exact, (size_t)len, base, n, out, m) != 0 ||
                (m && memcmp(out, raw, m) != 0)) {
                printf("round %d: rebuild differs\n", round);
                failures++;
            }
            /* a shorter or longer output must be refused */
            if (m && pl_patch_apply(exact, (size_t)len, base, n, out, m - 1) == 0) {
                printf("round %d: short output accepted\n", round);
                failures++;
            }
            /* damaged streams: any result, but nothing outside the buffers */
            for (int d = 0; d < 30; d++) {
                size_t dl = (size_t)len;
                uint8_t *bad = malloc(dl + 16);
                memcpy(bad, exact, dl);
                switch (d % 3) {
                case 0:
                    if (dl)
                        bad[below(dl)] ^= (uint8_t)(1 << below(8));
                    break;
                case 1:
                    dl = below(dl + 1);
                    break;
                case 2:
                    for (int k = 0; k < 16; k++)
                        bad[dl++] = (uint8_t)next();
                    break;
                }
                uint8_t *bad_exact = dup_exact(bad, dl);
                free(bad);
                (void)pl_patch_apply(bad_exact, dl, base, n, out, m);
                free(bad_exact);
            }
            free(out);
            free(exact);
        }
        free(ops);
        free(raw);
        free(base);
    }
    /* varints past 64 bits, a copy before the base's start, or past its end */
    static const uint8_t overlong[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
    static const uint8_t before[] = {0, 4, 3};   /* copy 4 from 0 + (-2) */
    static const uint8_t past[] = {0, 4, 0x0e};  /* copy 4 from 0 + 7 of 8 bytes */
    static const uint8_t good[] = {2, 'x', 4, 4}; /* 'x', then copy 4 from 0 + 2 */
    static const uint8_t in_place[] = {3, 1, 4, 0}; /* 'a' + 1, then copy 4 from 1 + 0 */
    static const uint8_t in_place_past[] = {17, 0, 0, 0, 0, 0, 0, 0, 0}; /* 8 past 0 of 8 */
    uint8_t b8[8] = "abcdefgh", out[5];
    if (pl_patch_apply(overlong, sizeof overlong, b8, 8, out, 5) != -1 ||
        pl_patch_apply(before, sizeof before, b8, 8, out, 4) != -1 ||
        pl_patch_apply(past, sizeof past, b8, 8, out, 4) != -1 ||
        pl_patch_apply(good, sizeof good, b8, 8, out, 5) != 0 || memcmp(out, "xcdef", 5) != 0 ||
        pl_patch_apply(in_place, sizeof in_place, b8, 8, out, 5) != 0 ||
        memcmp(out, "bbcde", 5) != 0 ||
        pl_patch_apply(in_place_past, sizeof in_place_past, b8, 7, out, 8) != -1) {
        printf("a hand-made stream was misread\n");
        failures++;
    }
    if (patched < 200) { /* the edits must leave most versions worth a patch */
        printf("only %d of 400 versions patched\n", patched);
        failures++;
    }
    if (failures)
        return 1;
    printf("ok\n");
    return 0;
}
