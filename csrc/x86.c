/* x86.c -- the x86 call filter: see x86.h for the transform and its contract. */
#include "x86.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* The first i in [i, end) with buf[i] 0xE8 or 0xE9, or end. Reads buf[i..end) only
 * (end <= n - 4 for the callers, so an operand's bytes follow every opcode found). */
static size_t next_opcode(const uint8_t *buf, size_t i, size_t end)
{
#if defined(__SSE2__)
    const __m128i fe = _mm_set1_epi8((char)0xFE), e8 = _mm_set1_epi8((char)0xE8);
    while (i + 16 <= end) {
        __m128i v = _mm_loadu_si128((const __m128i *)(buf + i));
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(v, fe), e8));
        if (m)
            return i + (size_t)__builtin_ctz(m);
        i += 16;
    }
#endif
    while (i < end && (buf[i] & 0xFE) != 0xE8)
        i++;
    return i;
}

/* whether an operand's top byte is 0x00 or 0xFF (a near target, either way) */
static int near(uint8_t top)
{
    return (uint8_t)(top + 1) <= 1;
}

void pl_x86_filter(uint8_t *buf, size_t n, int encode)
{
    if (n < 5)
        return;
    size_t end = n - 4;
    for (size_t i = next_opcode(buf, 0, end); i < end; i = next_opcode(buf, i + 5, end)) {
        if (!near(buf[i + 4]))
            continue;
        uint8_t *op = buf + i + 1;  /* little-endian, whatever the host */
        uint32_t v = (uint32_t)op[0] | (uint32_t)op[1] << 8 | (uint32_t)op[2] << 16 |
                     (uint32_t)op[3] << 24;
        uint32_t pos = (uint32_t)(i + 5);
        uint32_t r = encode ? v + pos : v - pos;
        /* keep 25 bits, sign-extended from bit 24: the top byte is 0x00 or 0xFF */
        r &= 0x01FFFFFFu;
        if (r & 0x01000000u)
            r |= 0xFE000000u;
        op[0] = (uint8_t)r;
        op[1] = (uint8_t)(r >> 8);
        op[2] = (uint8_t)(r >> 16);
        op[3] = (uint8_t)(r >> 24);
    }
}

size_t pl_x86_calls(const uint8_t *buf, size_t n)
{
    if (n < 5)
        return 0;
    size_t end = n - 4, count = 0;
    for (size_t i = next_opcode(buf, 0, end); i < end; i = next_opcode(buf, i + 5, end))
        count += (size_t)near(buf[i + 4]);
    return count;
}
