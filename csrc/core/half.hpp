// Scalar IEEE half / bfloat16 <-> float conversions, exact (round to nearest even on the way down).
// `static inline` on purpose: the per-ISA kernel units include this too, and internal linkage keeps
// each unit's copy (compiled with its own -m flags) private to it.
#pragma once

#include <cstdint>
#include <cstring>

namespace clinvla {
namespace detail {

// IEEE half / bfloat16 <-> float, scalar and exact (round to nearest even on the way down).
static inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_from_f32(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {
    bits = (em << 13) | 0x7f800000u;  // inf / nan
  } else if (em >= 0x0400u) {
    bits = (em << 13) + 0x38000000u;  // normal: rebias 15 -> 127
  } else {
    // subnormal: em * 2^-24, computed exactly without relying on denormal arithmetic
    const float f = float(em) * 5.9604644775390625e-08f;
    bits = bits_from_f32(f);
  }
  return f32_from_bits(bits | sign);
}

static inline uint16_t float_to_half(float f) {
  const uint32_t x = bits_from_f32(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow
  if (ax < 0x38800000u) {
    // result is subnormal or zero: value / 2^-24, rounded to nearest even
    if (ax < 0x33000000u) return uint16_t(sign);  // < 2^-25 rounds to zero
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(e);  // 14 + (113 - e)
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  // normal: rebias and round the 13 dropped bits to nearest even
  uint32_t h = ((ax - 0x38000000u) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

static inline float bf16_to_float(uint16_t b) { return f32_from_bits(uint32_t(b) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t x = bits_from_f32(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet nan
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(rounded >> 16);
}

}  // namespace detail
}  // namespace clinvla
