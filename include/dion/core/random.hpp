// Counter-based normal generator (Philox4x32-10 + Box-Muller). The value at a global index depends only
// on (seed, key, index), so every backend, every world size and every sharding produce the same numbers
// for the same global element (SPEC deliberate difference 4). Usable on host and device.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include "dion/core/bf16.hpp"

namespace dion::detail {

struct Philox4x32 {
  std::uint32_t c[4];
};

DION_HD inline void philox_round(std::uint32_t ctr[4], std::uint32_t key[2]) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const std::uint64_t p0 = static_cast<std::uint64_t>(M0) * ctr[0];
  const std::uint64_t p1 = static_cast<std::uint64_t>(M1) * ctr[2];
  const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
  const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
  const std::uint32_t n0 = hi1 ^ ctr[1] ^ key[0];
  const std::uint32_t n1 = lo1;
  const std::uint32_t n2 = hi0 ^ ctr[3] ^ key[1];
  const std::uint32_t n3 = lo0;
  ctr[0] = n0; ctr[1] = n1; ctr[2] = n2; ctr[3] = n3;
}

/// Philox4x32-10 of counter (c0..c3) under a 64-bit key.
DION_HD inline Philox4x32 philox(std::uint64_t counter_hi, std::uint64_t counter_lo, std::uint64_t key64) {
  std::uint32_t ctr[4] = {static_cast<std::uint32_t>(counter_lo), static_cast<std::uint32_t>(counter_lo >> 32),
                          static_cast<std::uint32_t>(counter_hi), static_cast<std::uint32_t>(counter_hi >> 32)};
  std::uint32_t key[2] = {static_cast<std::uint32_t>(key64), static_cast<std::uint32_t>(key64 >> 32)};
  for (int i = 0; i < 10; ++i) {
    philox_round(ctr, key);
    key[0] += 0x9E3779B9u;
    key[1] += 0xBB67AE85u;
  }
  return {{ctr[0], ctr[1], ctr[2], ctr[3]}};
}

/// Standard normal sample number `index` of stream (seed, stream): one Philox block per index,
/// Box-Muller on its first two words (float math with double-free formulas for device parity).
DION_HD inline float normal_at(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  const Philox4x32 r = philox(stream, index, seed);
  // uniform in (0, 1]: (x + 1) / 2^32 with 24-bit resolution to stay exact in float
  const float u1 = (static_cast<float>(r.c[0] >> 8) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = static_cast<float>(r.c[1] >> 8) * (1.0f / 16777216.0f);
  const float rad = sqrtf(-2.0f * logf(u1));
  const float ang = 6.283185307179586f * u2;
  return rad * cosf(ang);
}

/// FNV-1a 64-bit hash: stable parameter keys from names (independent of registration order).
constexpr std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 1469598103934665603ull;
  for (char ch : s) {
    h ^= static_cast<unsigned char>(ch);
    h *= 1099511628211ull;
  }
  return h;
}

/// Mix two 64-bit values (splitmix64 finalizer), for deriving stream ids.
DION_HD constexpr std::uint64_t mix64(std::uint64_t a, std::uint64_t b) {
  std::uint64_t z = a + 0x9E3779B97F4A7C15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace dion::detail
