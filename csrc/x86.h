/* x86.h -- the x86 call filter of a frame of codec 4 (docs/format.md, "x86 frames"):
 * machine code's calls and jumps hold their target relative to where they are, so one
 * function called from a hundred places is a hundred different operands. The filter
 * rewrites each operand as target + position, the same bytes for every call of that
 * function, which zstd then finds as repeats (xz's BCJ idea; this transform is ours).
 *
 * Transform (encode; decode is the inverse)
 *   Scan i = 0, 1, ... while i + 5 <= n. At a byte 0xE8 (call rel32) or 0xE9 (jmp rel32):
 *     when byte i+4 (the operand's top byte) is 0x00 or 0xFF, the operand v (u32 LE at
 *     i+1) becomes r = v + (i + 5) (decode: v - (i + 5)) mod 2^32, cut to its low 25
 *     bits and sign-extended from bit 24, so its top byte is 0x00 or 0xFF again;
 *     either way the scan goes on at i + 5. Any other byte: i + 1.
 *   The opcode bytes are never changed and the scan steps over every operand whether
 *   it converts it or not, so decode visits the same positions and sees the same
 *   top-byte class, and undoes exactly what encode did: decode(encode(b)) == b for
 *   every b, of any length (positions past 2^32 wrap; the transform stays a bijection).
 *
 * Contract
 *   pl_x86_filter(buf, n, encode) transforms buf[0..n) in place.
 *   pl_x86_calls(buf, n) counts the operands encode would convert (how much of `buf`
 *   looks like x86 code: a frame is filtered when this is dense enough).
 *   Neither reads or writes outside buf[0..n).
 */
#ifndef PL_X86_H
#define PL_X86_H

#include <stddef.h>
#include <stdint.h>

void pl_x86_filter(uint8_t *buf, size_t n, int encode);
size_t pl_x86_calls(const uint8_t *buf, size_t n);

#endif
