/* Drives plc_scan (csrc/fastcdc.c) for AddressSanitizer/UBSan and valgrind: many input
 * sizes and contents, chunked whole, in random splits, and with cuts[] of 1 or 2 slots
 * (looping on *consumed); all three must give the same cut points, within bounds.
 * With a file argument, prints that file's cut points (one per line) for the test to
 * compare with the Python reference. Exit 0 when all agree. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastcdc.h"

static uint64_t rng = 88172645463325252ULL;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

/* Chunk buf in pieces of at most `piece` bytes (0: random sizes) with `slots` cut slots. */
static size_t chunk(const plc_params *p, const uint8_t *buf, size_t n, size_t piece,
                    size_t slots, uint64_t *out, size_t cap)
{
    plc_state s = {0, 0};
    uint64_t *cuts = malloc(slots * sizeof *cuts);
    size_t nout = 0, off = 0;
    while (off < n) {
        size_t len = piece ? piece : 1 + next() % 70000;
        if (len > n - off)
            len = n - off;
        size_t done = 0;
        while (done < len) {
            size_t consumed = 0;
            size_t k = plc_scan(p, &s, buf + off + done, len - done, cuts, slots, &consumed);
            for (size_t i = 0; i < k && nout < cap; i++)
                out[nout++] = off + done + cuts[i];
            done += consumed;
        }
        off += len;
    }
    if (s.pos && nout < cap)
        out[nout++] = n;
    free(cuts);
    return nout;
}

int main(int argc, char **argv)
{
    plc_params p;
    if (plc_params_init(&p, 63, 256, 1024) == 0 || plc_params_init(&p, 512, 256, 1024) == 0)
        return 2;
    if (argc == 2) {
        FILE *f = fopen(argv[1], "rb");
        if (!f)
            return 3;
        fseek(f, 0, SEEK_END);
        size_t n = (size_t)ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *buf = malloc(n + 1);
        if (fread(buf, 1, n, f) != n)
            return 3;
        fclose(f);
        plc_params_init(&p, 64, 256, 1024);
        uint64_t *out = malloc((n / 64 + 2) * sizeof *out);
        size_t k = chunk(&p, buf, n, n ? n : 1, n / 64 + 2, out, n / 64 + 2);
        for (size_t i = 0; i < k; i++)
            printf("%llu\n", (unsigned long long)out[i]);
        free(out);
        free(buf);
        return 0;
    }
    const size_t sizes[] = {0, 1, 63, 64, 65, 1023, 1024, 1025, 4096, 100000, 3 << 20};
    const uint64_t params[][3] = {{64, 256, 1024}, {64, 64, 64}, {100, 300, 5000},
                                  {16384, 65536, 262144}};
    for (size_t pi = 0; pi < sizeof params / sizeof params[0]; pi++) {
        if (plc_params_init(&p, params[pi][0], params[pi][1], params[pi][2]) != 0)
            return 4;
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            for (int kind = 0; kind < 3; kind++) {
                size_t n = sizes[si];
                uint8_t *buf = malloc(n ? n : 1);
                for (size_t i = 0; i < n; i++)
                    buf[i] = kind == 0 ? (uint8_t)next() : kind == 1 ? 0 : (uint8_t)(i % 7);
                size_t cap = n / params[pi][0] + 2;
                uint64_t *a = malloc(cap * sizeof *a), *b = malloc(cap * sizeof *b),
                         *c = malloc(cap * sizeof *c);
                size_t na = chunk(&p, buf, n, n ? n : 1, cap, a, cap);
                size_t nb = chunk(&p, buf, n, 0, cap, b, cap);
                size_t nc = chunk(&p, buf, n, 0, 1 + (size_t)(next() % 2), c, cap);
                if (na != nb || na != nc || memcmp(a, b, na * 8) || memcmp(a, c, na * 8)) {
                    fprintf(stderr, "mismatch: params %zu size %zu kind %d\n", pi, n, kind);
                    return 1;
                }
                uint64_t prev = 0;
                for (size_t i = 0; i < na; i++) {
                    if (a[i] <= prev) {
                        fprintf(stderr, "cut points not increasing\n");
                        return 1;
                    }
                    if (a[i] - prev > params[pi][2]) {
                        fprintf(stderr, "chunk over max\n");
                        return 1;
                    }
                    prev = a[i];
                }
                if (n && (na == 0 || a[na - 1] != n))
                    return 1;
                free(a); free(b); free(c); free(buf);
            }
        }
    }
    puts("ok");
    return 0;
}
