// Orthonormalization of Dion's power-iteration output P (p×r, p ≥ r usually), generic over any
// Backend (SPEC §1.5): Householder QR, Cholesky-QR with a quality check and fallback, and randomized
// Cholesky-QR (a sketch S·P fixes the conditioning, then one Cholesky-QR pass). All factorizations in
// fp32; P is cast back to its own type at the end.
#pragma once

#include <cmath>
#include <cstdint>

#include "dion/core/options.hpp"
#include "dion/core/random.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/view.hpp"

namespace dion::ortho {

/// Sketch rows of randomized Cholesky-QR: ceil(oversample·r/128)·128.
inline std::int64_t rcqr_sketch_rows(std::int64_t r, double oversample) {
  return static_cast<std::int64_t>(std::ceil(oversample * static_cast<double>(r) / 128.0)) * 128;
}

/// Cholesky-QR is trusted only if max|QᵀQ − I| stays under cqr_tolerance(p) (RELIABILITY N9/N10: a
/// Cholesky that "succeeds" on a nearly rank-deficient P can return a far-from-orthogonal Q). The
/// floor is RELIABILITY's 1e-5; for tall P the check's own fp32 rounding (a dot product of p terms,
/// ~√p·u) would reach it, so the bound grows to 16·√p·u (1.1e-4 at p = 14336) and never flags a
/// good factorization as bad.
inline constexpr float kCqrTolerance = 1e-5f;
inline float cqr_tolerance(std::int64_t p) {
  const float noise = 16.0f * std::sqrt(static_cast<float>(p)) * 5.96e-8f;  // u = 2^-24
  return noise > kCqrTolerance ? noise : kCqrTolerance;
}

/// fp32 scratch (in floats) for orthonormalizing `n` matrices of p×r with sketch rows k.
inline std::int64_t qr_scratch_floats(std::int64_t n, std::int64_t p, std::int64_t r, std::int64_t k) {
  return n * (2 * p * r + 2 * r * r + k * p + k * r) + 2 * n;  // Pf, Qc, G, R1, S, SP, flags (as ints)
}

/// Where the randomness of the sketches comes from: (seed, stream) with one stream per matrix.
struct SketchKey {
  std::uint64_t seed = 0;
  const std::uint64_t* streams = nullptr;  ///< host array, one per matrix of the batch
  /// Optional step counter in backend memory mixed into every stream (mix64(stream, *step)), so the
  /// sketch follows the steps actually taken, also in a replayed CUDA graph.
  const float* step = nullptr;
};

/// Orthonormalize the columns of each P_b in place.
/// `use_cqr`: Cholesky-QR first (falls back to RCQR per matrix where it fails the quality check).
template <class Backend, class TP>
void orthonormalize(Backend& be, QrMethod method, bool use_cqr, double oversample, Mat<TP, typename Backend::Space> P,
                    float* scratch, SketchKey key) {
  using Space = typename Backend::Space;
  using MF = Mat<float, Space>;
  const std::int64_t n = P.batch, p = P.rows, r = P.cols;
  if (n == 0 || p == 0 || r == 0) return;
  const std::int64_t k = rcqr_sketch_rows(r, oversample);
  float* cur = scratch;
  auto take = [&](std::int64_t elems) {
    float* q = cur;
    cur += elems;
    return q;
  };
  MF Pf = packed<float, Space>(take(n * p * r), n, p, r);
  MF Qc = packed<float, Space>(take(n * p * r), n, p, r);
  MF G = packed<float, Space>(take(n * r * r), n, r, r);
  MF R1 = packed<float, Space>(take(n * r * r), n, r, r);
  MF S = packed<float, Space>(take(n * k * p), n, k, p);
  MF SP = packed<float, Space>(take(n * k * r), n, k, r);
  int* flags = reinterpret_cast<int*>(take(n));
  int* info = reinterpret_cast<int*>(take(n));

  be.copy(P, Pf);
  if (method == QrMethod::qr || p <= r) {
    be.qr_q(Pf);
    be.copy(Pf, P);
    return;
  }
  if (use_cqr) {
    be.copy(Pf, Qc);
    be.gram(Op::T, Qc, G);  // G = PᵀP
    be.cholesky_upper(G, flags);
    be.trsm_right_upper(Qc, G);
    be.orthogonality_check(Qc, cqr_tolerance(p), flags);
    bool all_ok = false;
    if constexpr (Backend::host_visible) {
      all_ok = true;
      for (std::int64_t b = 0; b < n; ++b) all_ok = all_ok && flags[b] == 0;
    }
    if (all_ok) {
      be.copy(Qc, P);
      return;
    }
  }
  // Randomized Cholesky-QR: R1 = R(QR(S·P)), Q1 = P·R1⁻¹, R2 = chol(Q1ᵀQ1), Q = Q1·R2⁻¹.
  const float stddev = 1.0f / std::sqrt(static_cast<float>(k));
  for (std::int64_t b = 0; b < n; ++b) be.randn(S.at(b), key.seed, key.streams[b], 0, 0, p, stddev, key.step);
  be.gemm(Op::N, Op::N, 1.0f, S, Pf, 0.0f, SP);
  be.qr_r(SP, R1);
  be.trsm_right_upper(Pf, R1);
  be.gram(Op::T, Pf, G);
  be.cholesky_upper(G, info);
  be.trsm_right_upper(Pf, G);
  if (use_cqr) {
    // matrices whose Cholesky-QR passed keep it; the others take the randomized result
    be.copy_if_flag(flags, 0, Qc, Pf);
  }
  if constexpr (Backend::host_visible) {
    // Last resort (RELIABILITY N9): a rank-deficient P (a zero or repeated column) defeats both
    // Cholesky variants; Householder QR still returns an orthonormal basis. Where flags are not
    // host-visible (GPU), a non-finite result is zeroed by Dion's guard instead, as microsoft/dion does.
    for (std::int64_t b = 0; b < n; ++b) info[b] = 0;
    be.orthogonality_check(Pf, cqr_tolerance(p), info);
    bool any = false;
    for (std::int64_t b = 0; b < n; ++b) any = any || info[b] != 0;
    if (any) {
      be.copy(P, Qc);
      be.qr_q(Qc);
      be.copy_if_flag(info, 1, Qc, Pf);
    }
  }
  be.copy(Pf, P);
}

}  // namespace dion::ortho
