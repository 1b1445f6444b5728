/* x86_driver.c -- csrc/x86.c under AddressSanitizer/UBSan and valgrind: random buffers
 * of every length up to 3000 bytes and some of a few hundred KiB, each allocated at its
 * exact size, rich in 0xE8/0xE9 opcodes and 0x00/0xFF operand tops; encoded, checked
 * against a plain byte-by-byte version of the transform (x86.h) and decoded back.
 * Prints "ok" when every buffer matched. */
#include "x86.h"
#include "xorshift.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t pick(void)
{
    static const uint8_t common[] = {0xE8, 0xE9, 0x00, 0xFF};
    uint64_t r = next();
    return (r & 3) ? common[(r >> 2) & 3] : (uint8_t)(r >> 8);
}

/* the transform of x86.h, one byte at a time: what the C core must agree with */
static size_t plain(uint8_t *b, size_t n, int encode)
{
    size_t i = 0, count = 0;
    while (i + 5 <= n) {
        if (b[i] != 0xE8 && b[i] != 0xE9) {
            i++;
            continue;
        }
        if (b[i + 4] == 0x00 || b[i + 4] == 0xFF) {
            uint32_t v = (uint32_t)b[i + 1] | (uint32_t)b[i + 2] << 8 |
                         (uint32_t)b[i + 3] << 16 | (uint32_t)b[i + 4] << 24;
            uint32_t r = encode ? v + (uint32_t)(i + 5) : v - (uint32_t)(i + 5);
            r &= 0x01FFFFFFu;
            if (r & 0x01000000u)
                r |= 0xFE000000u;
            for (int k = 0; k < 4; k++)
                b[i + 1 + k] = (uint8_t)(r >> (8 * k));
            count++;
        }
        i += 5;
    }
    return count;
}

static int one(size_t n)
{
    size_t size = n ? n : 1;
    uint8_t *orig = calloc(1, size), *got = calloc(1, size), *want = calloc(1, size);
    for (size_t i = 0; i < n; i++)
        orig[i] = pick();
    if (n)
        memcpy(got, orig, n), memcpy(want, orig, n);
    size_t calls = pl_x86_calls(got, n);
    pl_x86_filter(got, n, 1);
    int bad = plain(want, n, 1) != calls;
    bad |= n && memcmp(got, want, n) != 0;
    pl_x86_filter(got, n, 0);
    bad |= n && memcmp(got, orig, n) != 0;
    free(orig);
    free(got);
    free(want);
    return bad;
}

int main(void)
{
    rng = 0x9E3779B97F4A7C15ULL;
    int bad = 0;
    for (size_t n = 0; n <= 3000; n++)
        bad |= one(n);
    for (int k = 0; k < 20; k++)
        bad |= one(100000 + (size_t)(next() % 300000));
    puts(bad ? "mismatch" : "ok");
    return bad;
}
