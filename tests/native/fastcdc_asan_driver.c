/* Drives plc_scan (csrc/fastcdc.c) under AddressSanitizer/UBSan or valgrind.
 *
 *   fastcdc_asan_driver selftest [ROUNDS] [BIG_MIB]
 *     Pseudo-random inputs of many sizes and kinds (random, zeros, 0xff, short repeating
 *     patterns, a mix of these) under many chunk sizes; each is chunked byte at a time
 *     by a naive transcription of the contract in fastcdc.h, whole, in random splits
 *     (0- and 1-byte pieces included) and with max_cuts of 1 and 2 looping on
 *     `consumed`. Every piece and every cuts[] array is its own malloc of exactly its
 *     size, so the sanitizers see any access past either. All results must agree and
 *     respect the bounds; exits 1 with a message on the first disagreement.
 *     ROUNDS (default 40) adds random parameter sets; BIG_MIB (default 5) sizes the
 *     large inputs (0: none).
 *   fastcdc_asan_driver cuts FILE MIN AVG MAX
 *     Prints the cut points (chunk end offsets, the last one the file's size) of FILE,
 *     chunked whole, one per line, for the test to compare with the Python reference.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastcdc.h"

#define FAIL(...)                                                                  \
    do {                                                                           \
        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                       \
        fprintf(stderr, __VA_ARGS__);                                              \
        fprintf(stderr, "\n");                                                     \
        exit(1);                                                                   \
    } while (0)

/* Context of the current case, for failure messages. */
static const char *g_kind = "";
static uint64_t g_min, g_avg, g_max, g_n;
#define CASE_FMT " [kind=%s n=%" PRIu64 " min=%" PRIu64 " avg=%" PRIu64 " max=%" PRIu64 "]"
#define CASE_ARGS g_kind, g_n, g_min, g_avg, g_max

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static uint64_t rnd_between(uint64_t lo, uint64_t hi)
{
    return lo + rnd() % (hi - lo + 1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        FAIL("out of memory (%zu bytes)", n);
    return p;
}

/* A growable list of cut points. */
typedef struct {
    uint64_t *v;
    size_t n, cap;
} cutlist;

static void push(cutlist *l, uint64_t x)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        uint64_t *v = realloc(l->v, l->cap * sizeof *v);
        if (!v)
            FAIL("out of memory");
        l->v = v;
    }
    l->v[l->n++] = x;
}

/* The contract of fastcdc.h, one byte at a time, no skipping. */
static void naive_cuts(const plc_params *p, const uint8_t *buf, size_t n, cutlist *out)
{
    uint64_t pos = 0, h = 0;
    for (size_t i = 0; i < n; i++) {
        int cut = 0;
        if (pos >= p->min_size) {
            if (pos == p->min_size)
                h = 0;
            h = (h << 1) + plc_gear(buf[i]);
            uint64_t mask = pos < p->avg_size ? p->mask_s : p->mask_l;
            if (!(h & mask))
                cut = 1;
        }
        if (pos + 1 == p->max_size)
            cut = 1;
        if (cut) {
            push(out, i + 1);
            pos = 0;
        } else {
            pos++;
        }
    }
    if (pos)
        push(out, n);
}

/* Feeds one piece (copied to an exact-size allocation) to plc_scan, max_cuts at a
 * time, looping on `consumed`; appends the cuts as absolute offsets. */
static void scan_piece(const plc_params *p, plc_state *s, const uint8_t *data, size_t len,
                       uint64_t base, size_t max_cuts, cutlist *out)
{
    uint8_t *piece = xmalloc(len);
    if (len)
        memcpy(piece, data, len);
    uint64_t *cuts = xmalloc(max_cuts * sizeof *cuts);
    size_t off = 0;
    do {
        size_t consumed = (size_t)-1;
        size_t k = plc_scan(p, s, piece + off, len - off, cuts, max_cuts, &consumed);
        if (k > max_cuts)
            FAIL("%zu cuts with max_cuts %zu" CASE_FMT, k, max_cuts, CASE_ARGS);
        if (k < max_cuts && consumed != len - off)
            FAIL("consumed %zu of %zu with cuts[] not full" CASE_FMT, consumed, len - off,
                 CASE_ARGS);
        if (k == max_cuts && k > 0 && consumed != cuts[k - 1])
            FAIL("cuts[] full but consumed %zu != last cut %" PRIu64 CASE_FMT, consumed,
                 cuts[k - 1], CASE_ARGS);
        for (size_t j = 0; j < k; j++) {
            /* a cut is the end of a chunk whose last byte is in this buffer */
            if (cuts[j] < 1 || cuts[j] > len - off || (j && cuts[j] <= cuts[j - 1]))
                FAIL("cut %" PRIu64 " outside (0, %zu]" CASE_FMT, cuts[j], len - off,
                     CASE_ARGS);
            push(out, base + off + cuts[j]);
        }
        if (consumed == 0 && off < len)
            FAIL("no progress" CASE_FMT, CASE_ARGS);
        off += consumed;
    } while (off < len);
    free(cuts);
    free(piece);
}

/* Ends a stream: the final chunk, if bytes remain after the last cut. */
static void finish(plc_state *s, uint64_t n, cutlist *out)
{
    uint64_t last = out->n ? out->v[out->n - 1] : 0;
    if (s->pos != n - last)
        FAIL("state pos %" PRIu64 " but %" PRIu64 " bytes after the last cut" CASE_FMT,
             s->pos, n - last, CASE_ARGS);
    if (s->pos)
        push(out, n);
}

static void chunk_whole(const plc_params *p, const uint8_t *buf, size_t n, cutlist *out)
{
    plc_state s = {0, 0};
    scan_piece(p, &s, buf, n, 0, n / p->min_size + 2, out);
    finish(&s, n, out);
}

/* Random piece lengths: many 0- and 1-byte pieces, some small, some large. */
static size_t piece_len(size_t left, const plc_params *p)
{
    switch (rnd() % 6) {
    case 0:
        return 0;
    case 1:
        return left ? 1 : 0;
    case 2:
        return rnd_between(0, left < 64 ? left : 64);
    case 3: /* around the chunk sizes */
        return rnd_between(0, left < 2 * p->max_size ? left : 2 * p->max_size);
    default:
        return rnd_between(0, left);
    }
}

static void chunk_split(const plc_params *p, const uint8_t *buf, size_t n, size_t max_cuts,
                        cutlist *out)
{
    plc_state s = {0, 0};
    size_t off = 0;
    while (off < n || rnd() % 4 == 0) { /* sometimes empty pieces at the end */
        size_t len = piece_len(n - off, p);
        size_t mc = max_cuts ? max_cuts : len / p->min_size + 2;
        scan_piece(p, &s, buf + off, len, off, mc, out);
        off += len;
    }
    finish(&s, n, out);
}

static void check_bounds(const plc_params *p, const cutlist *c, uint64_t n)
{
    if (n == 0) {
        if (c->n)
            FAIL("cuts in an empty input" CASE_FMT, CASE_ARGS);
        return;
    }
    if (c->n == 0 || c->v[c->n - 1] != n)
        FAIL("last cut is not the input's end" CASE_FMT, CASE_ARGS);
    uint64_t prev = 0;
    for (size_t i = 0; i < c->n; i++) {
        uint64_t size = c->v[i] - prev;
        if (c->v[i] <= prev || size > p->max_size)
            FAIL("chunk %zu of %" PRIu64 " bytes" CASE_FMT, i, size, CASE_ARGS);
        /* a hash cut needs p >= min, so the chunk has more than min bytes; a forced
         * one has max */
        if (i + 1 < c->n && !(size > p->min_size || size == p->max_size))
            FAIL("non-final chunk %zu of %" PRIu64 " bytes" CASE_FMT, i, size, CASE_ARGS);
        prev = c->v[i];
    }
}

static void same(const cutlist *a, const cutlist *b, const char *what)
{
    if (a->n != b->n)
        FAIL("%s: %zu cuts, reference %zu" CASE_FMT, what, a->n, b->n, CASE_ARGS);
    for (size_t i = 0; i < a->n; i++)
        if (a->v[i] != b->v[i])
            FAIL("%s: cut %zu at %" PRIu64 ", reference %" PRIu64 CASE_FMT, what, i,
                 a->v[i], b->v[i], CASE_ARGS);
}

static void check_case(const plc_params *p, const uint8_t *buf, size_t n)
{
    g_n = n;
    cutlist ref = {0}, got = {0};
    naive_cuts(p, buf, n, &ref);
    check_bounds(p, &ref, n);

    chunk_whole(p, buf, n, &got);
    same(&got, &ref, "whole");
    for (int round = 0; round < 3; round++) {
        got.n = 0;
        chunk_split(p, buf, n, 0, &got);
        same(&got, &ref, "split");
    }
    for (size_t mc = 1; mc <= 2; mc++) {
        got.n = 0;
        plc_state s = {0, 0};
        scan_piece(p, &s, buf, n, 0, mc, &got);
        finish(&s, n, &got);
        same(&got, &ref, "whole, tiny max_cuts");
        got.n = 0;
        chunk_split(p, buf, n, mc, &got);
        same(&got, &ref, "split, tiny max_cuts");
    }
    free(ref.v);
    free(got.v);
}

enum { K_RANDOM, K_ZEROS, K_FF, K_PATTERN, K_MIXED, K_COUNT };
static const char *kind_names[K_COUNT] = {"random", "zeros", "0xff", "pattern", "mixed"};

static void fill(uint8_t *buf, size_t n, int kind)
{
    switch (kind) {
    case K_RANDOM:
        for (size_t i = 0; i < n; i++)
            buf[i] = (uint8_t)rnd();
        break;
    case K_ZEROS:
        memset(buf, 0, n);
        break;
    case K_FF:
        memset(buf, 0xff, n);
        break;
    case K_PATTERN: {
        uint8_t pat[300];
        size_t period = rnd_between(1, sizeof pat);
        for (size_t i = 0; i < period; i++)
            pat[i] = (uint8_t)rnd();
        for (size_t i = 0; i < n; i++)
            buf[i] = pat[i % period];
        break;
    }
    default: /* runs of the other kinds */
        for (size_t i = 0; i < n;) {
            size_t len = rnd_between(1, 20000);
            if (len > n - i)
                len = n - i;
            fill(buf + i, len, (int)(rnd() % K_MIXED));
            i += len;
        }
    }
}

static void check_params_init(void)
{
    static const uint64_t bad[][3] = {
        {0, 256, 1024}, {63, 256, 1024}, {128, 64, 1024}, {64, 2048, 1024},
        {64, 64, ((uint64_t)1 << 31) + 1}, {64, 64, UINT64_MAX}, {UINT64_MAX, 1, 1},
    };
    plc_params p;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (plc_params_init(&p, bad[i][0], bad[i][1], bad[i][2]) != -EINVAL)
            FAIL("params %zu accepted", i);
    if (plc_params_init(&p, 64, 64, 64) || plc_params_init(&p, 64, 64, (uint64_t)1 << 31))
        FAIL("valid params refused");
    if (plc_params_init(&p, 64, 256, 1024) || p.mask_s != 0xFFC0000000000000ULL ||
        p.mask_l != 0xFC00000000000000ULL)
        FAIL("masks for avg 256");
}

static int selftest(unsigned rounds, size_t big_mib)
{
    static const uint64_t fixed[][3] = {
        {64, 64, 64},       {64, 256, 1024},        {64, 128, 4096},
        {100, 300, 1000},   {1000, 1000, 5000},     {4096, 4096, 4096},
        {64, 12288, 49152}, {2048, 8192, 65536},    {16384, 65536, 262144},
        {512, 512, 513},    {1024, 4096, 4096},
    };
    size_t nfixed = sizeof fixed / sizeof fixed[0];
    size_t big = big_mib << 20;
    uint8_t *buf = xmalloc(big + (4 << 20));
    size_t ncases = 0;
    rng_state = 0x5eed;
    check_params_init();
    for (size_t r = 0; r < nfixed + rounds; r++) {
        if (r < nfixed) {
            g_min = fixed[r][0], g_avg = fixed[r][1], g_max = fixed[r][2];
        } else {
            g_min = rnd_between(64, 2048);
            g_avg = rnd_between(g_min, 4 * g_min);
            g_max = rnd_between(g_avg, 4 * g_avg);
        }
        plc_params p;
        if (plc_params_init(&p, g_min, g_avg, g_max))
            FAIL("params refused" CASE_FMT, CASE_ARGS);
        size_t sizes[] = {0, 1, 2, g_min - 1, g_min, g_min + 1, g_avg - 1, g_avg, g_avg + 1,
                          g_max - 1, g_max, g_max + 1, 2 * g_max, 3 * g_max + 7,
                          rnd_between(0, 1 << 16), rnd_between(0, 4 << 20), big + 3};
        size_t nsizes = sizeof sizes / sizeof sizes[0];
        for (int kind = 0; kind < K_COUNT; kind++) {
            g_kind = kind_names[kind];
            for (size_t i = 0; i < nsizes; i++) {
                size_t n = sizes[i];
                if (i == nsizes - 1 && (!big_mib || r % 4 || kind == K_FF))
                    continue; /* the large input only for some parameter sets */
                if (i == nsizes - 2 && r % 2)
                    continue;
                fill(buf, n, kind);
                check_case(&p, buf, n);
                ncases++;
            }
        }
    }
    free(buf);
    printf("ok %zu cases\n", ncases);
    return 0;
}

static int print_cuts(const char *path, uint64_t min, uint64_t avg, uint64_t max)
{
    plc_params p;
    if (plc_params_init(&p, min, avg, max))
        FAIL("invalid chunk sizes");
    FILE *f = fopen(path, "rb");
    if (!f)
        FAIL("cannot open %s", path);
    size_t cap = 1 << 16, n = 0;
    uint8_t *data = xmalloc(cap);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            uint8_t *d = realloc(data, cap);
            if (!d)
                FAIL("out of memory");
            data = d;
        }
        size_t got = fread(data + n, 1, cap - n, f);
        if (got == 0)
            break;
        n += got;
    }
    if (ferror(f))
        FAIL("cannot read %s", path);
    fclose(f);
    g_kind = "file", g_n = n, g_min = min, g_avg = avg, g_max = max;
    cutlist c = {0};
    chunk_whole(&p, data, n, &c);
    for (size_t i = 0; i < c.n; i++)
        printf("%" PRIu64 "\n", c.v[i]);
    free(c.v);
    free(data);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "selftest") && argc <= 4)
        return selftest(argc > 2 ? (unsigned)strtoul(argv[2], NULL, 10) : 40,
                        argc > 3 ? (size_t)strtoul(argv[3], NULL, 10) : 5);
    if (argc == 6 && !strcmp(argv[1], "cuts"))
        return print_cuts(argv[2], strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10),
                          strtoull(argv[5], NULL, 10));
    fprintf(stderr, "usage: %s selftest [ROUNDS] [BIG_MIB] | cuts FILE MIN AVG MAX\n",
            argv[0]);
    return 2;
}
