/* xorshift.h -- the drivers' random numbers: a xorshift64 generator, seeded per driver
 * (deterministic runs, so a failure repeats). */
#ifndef PL_TEST_XORSHIFT_H
#define PL_TEST_XORSHIFT_H

#include <stddef.h>
#include <stdint.h>

static uint64_t rng;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static inline size_t below(size_t n) { return n ? (size_t)(next() % n) : 0; }

#endif
