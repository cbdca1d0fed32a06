// bfloat16 storage type: 1 sign, 8 exponent, 7 mantissa bits. Conversions round to nearest even
// (as PyTorch and CUDA's __float2bfloat16 do) and keep NaN a NaN. The type is layout-compatible with
// CUDA's __nv_bfloat16, so a user's device buffer of __nv_bfloat16 can be viewed as dion::bf16.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DION_HD __host__ __device__
#else
#define DION_HD
#endif

namespace dion {

struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  DION_HD explicit bf16(float f) : bits(from_float(f)) {}
  DION_HD explicit operator float() const { return to_float(bits); }

  DION_HD static bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }
  DION_HD static std::uint16_t from_float(float f) {
    std::uint32_t u;
#if defined(__CUDA_ARCH__)
    u = __float_as_uint(f);
#else
    std::memcpy(&u, &f, sizeof u);
#endif
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    }
    const std::uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest, ties to even
    return static_cast<std::uint16_t>(u >> 16);
  }
  DION_HD static float to_float(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
#endif
  }
};
static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");

/// Round a float to the nearest bf16 value and back (the rounding a bf16 store applies).
DION_HD inline float round_bf16(float f) { return bf16::to_float(bf16::from_float(f)); }

/// Bit-pattern finiteness test: stays correct even where the compiler assumes finite math.
DION_HD inline bool is_finite_bits(float f) {
  std::uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, sizeof u);
#endif
  return (u & 0x7f800000u) != 0x7f800000u;
}
DION_HD inline bool is_finite_bits(bf16 b) { return (b.bits & 0x7f80u) != 0x7f80u; }

}  // namespace dion
